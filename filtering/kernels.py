"""Array kernels: a filter written as ``(xp, rgb, params) -> rgb`` on arrays, where ``xp`` is
NumPy, or CuPy on a worker with an NVIDIA GPU (:func:`use_gpu`), so the same code runs on both;
a pointwise one is given a band of rows at a time."""

from __future__ import annotations

from collections.abc import Callable

from PIL import Image

from filtering.work import checkpoint
from imaging.formats import ALPHA_MODES

Kernel = Callable[..., object]

def array_module(gpu: bool):
    """CuPy where there is a GPU to run it on and it is installed, else NumPy."""
    if gpu:
        try:
            import cupy  # type: ignore[import-not-found]  # only on machines with a GPU
            return cupy
        except ImportError:
            pass
    import numpy
    return numpy



_gpu = False


def use_gpu(on: bool) -> None:
    """Run kernels on the GPU (a worker with one and CuPy says so at its start)."""
    global _gpu
    _gpu = on


def on_gpu() -> bool:
    return _gpu



#: Pixels a pointwise kernel is given at once: its float arrays stay near 12 MB each however
#: large the image (a 50-megapixel image as float32 RGB is 600 MB an array).
TILE_PIXELS = 1 << 20


def run_kernel(kernel: Kernel, im: Image.Image, params: dict, xp=None, pointwise: bool = False) -> Image.Image:
    """Apply an array kernel to ``im``'s colour bands (as 8-bit RGB), keeping its alpha; a
    pointwise one a band of at most :data:`TILE_PIXELS` at a time, :func:`checkpoint` between."""
    xp = xp or array_module(_gpu)
    alpha = im.mode in ALPHA_MODES or "transparency" in im.info
    mode = "RGBA" if alpha else "RGB"
    if not pointwise or im.width * im.height <= TILE_PIXELS:
        return _kernel_on(kernel, im.convert(mode), params, xp)
    out = Image.new(mode, im.size)
    rows = max(1, TILE_PIXELS // max(1, im.width))
    for top in range(0, im.height, rows):
        checkpoint()
        box = (0, top, im.width, min(im.height, top + rows))
        out.paste(_kernel_on(kernel, im.crop(box).convert(mode), params, xp), box[:2])
    return out


def _kernel_on(kernel: Kernel, rgba: Image.Image, params: dict, xp) -> Image.Image:
    import numpy
    a = numpy.asarray(rgba)
    out = kernel(xp, xp.asarray(a[..., :3]), params)
    out = out.get() if hasattr(out, "get") else numpy.asarray(out)  # from the GPU
    if out.shape != a[..., :3].shape:
        raise ValueError(f"the kernel returned an array of shape {out.shape} for {a[..., :3].shape}")
    rgb = numpy.clip(out, 0, 255).astype(numpy.uint8)
    if rgba.mode == "RGBA":
        rgb = numpy.dstack([rgb, a[..., 3]])
    return Image.fromarray(rgb, rgba.mode)
