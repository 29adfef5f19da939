"""A DPIP filter plugin: ``vignette`` darkens an image towards its corners.

Installed next to a DPIP worker (``pip install examples/dpip-vignette``), it is found through
the ``dpip.filters`` entry point its ``pyproject.toml`` declares; the worker offers it when it
joins, and the server sends ``vignette`` jobs to that worker only. Written as an array kernel:
``xp`` is NumPy, or CuPy on a worker with an NVIDIA GPU, so the same lines run on both.
"""

from dpip.filters import Param, define


@define("vignette", "darker towards the corners",
        Param("strength", float, 0.5, 0.0, 1.0, "how dark the corners get (0: not at all, 1: black)"),
        Param("radius", float, 0.75, 0.1, 2.0, "where darkening starts, as a fraction of the half-diagonal"),
        kernel=True)
def vignette(xp, rgb, params):
    """``rgb``: height x width x 3, uint8. Each pixel is scaled by 1 - strength * t**2, where t
    goes from 0 at ``radius`` of the half-diagonal to 1 at the corners."""
    h, w = rgb.shape[:2]
    y = (xp.arange(h, dtype=xp.float32) - (h - 1) / 2)[:, None]
    x = (xp.arange(w, dtype=xp.float32) - (w - 1) / 2)[None, :]
    half_diagonal = max(((h - 1) ** 2 + (w - 1) ** 2) ** 0.5 / 2, 1.0)
    r = xp.sqrt(x * x + y * y) / half_diagonal
    start = params["radius"]
    t = xp.clip((r - start) / max(1.0 - start, 1e-6), 0.0, 1.0)
    scale = 1.0 - params["strength"] * t * t
    return xp.rint(rgb.astype(xp.float32) * scale[:, :, None])
