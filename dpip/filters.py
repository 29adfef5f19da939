"""The contract of DPIP filter plugins: everything a plugin imports, and nothing else. Stable:
names are added here, none is removed or changes meaning within a major version.

A filter is a pure function ``(PIL.Image, params) -> PIL.Image`` (no sockets, no clocks, no
global state) with a name, a help line, typed and bounded parameters and a declaration of what
its output looks like; a package offers it through the ``dpip.filters`` entry-point group::

    from dpip.filters import Param, define

    @define("posterize", "fewer colour levels", Param("bits", int, 4, 1, 8, "bits per band"))
    def posterize(im, params):
        ...

With ``kernel=True`` the function is ``(xp, rgb, params) -> rgb`` on arrays (``xp`` is NumPy, or
CuPy on a worker with an NVIDIA GPU). See the user guide, "Write a filter".

- :func:`define` makes a filter (a :class:`FilterSpec`), :class:`Param` a parameter.
- :func:`eight_bit` gives an image in a mode 8-bit operations take (L, LA, RGB or RGBA).
- :func:`checkpoint` raises :class:`Stopped` once the job was cancelled (call it in long loops).
"""

from filtering.builtins import eight_bit
from filtering.model import FilterSpec, Param, define
from filtering.work import Stopped, checkpoint

__all__ = ["FilterSpec", "Param", "Stopped", "checkpoint", "define", "eight_bit"]
