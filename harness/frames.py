"""Synthetic video-like frames for tests and benchmarks (made here, nothing downloaded)."""

from __future__ import annotations

import io
import random

from PIL import Image, ImageDraw


def make_frame(index: int, width: int = 1280, height: int = 720, noise: int = 40) -> Image.Image:
    """A deterministic RGB frame: moving gradients and shapes plus sensor-like noise.

    At 1280x720 it encodes to ~1.46 MB of PNG at Pillow's default level, like a real
    720p video frame (pure noise would be ~2.7 MB, flat colour a few KB).
    """
    rng = random.Random(index)
    base = Image.merge("RGB", (
        Image.linear_gradient("L").resize((width, height)),
        Image.linear_gradient("L").rotate(90).resize((width, height)),
        Image.new("L", (width, height), (index * 7) % 256),
    ))
    draw = ImageDraw.Draw(base)
    for k in range(12):
        x = (rng.randrange(width) + index * 9 * (k + 1)) % width
        y = rng.randrange(height)
        r = rng.randrange(10, max(11, height // 5))
        colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
    draw.text((10, 10), f"frame {index}", fill=(255, 255, 255))
    if noise:
        # Seeded grain (Image.effect_noise is not reproducible), scaled to +-noise around grey.
        raw = Image.frombytes("L", (width, height), rng.randbytes(width * height))
        grain = raw.point(lambda v: 128 + (v - 128) * noise // 128)
        base = Image.blend(base, Image.merge("RGB", (grain, grain, grain)), 0.25)
    return base


def frame_png(index: int, width: int = 1280, height: int = 720, level: int = 6) -> bytes:
    buf = io.BytesIO()
    make_frame(index, width, height).save(buf, "PNG", compress_level=level)
    return buf.getvalue()
