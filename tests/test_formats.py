"""Every kind of image an upload can bring, through every filter: each one is filtered into a
result of its own format and size that the server accepts (a grayscale one truly gray, a blur
one of the same kind), or it is refused at upload with a clear reason.

The table is every (format, mode) Pillow writes and reads back for the six formats, plus what
other writers make and Pillow reads (16-bit RGB PNG and TIFF, signed and 32-bit TIFF, RLE and
alpha BMP, animations and multi-page TIFF, transparency by colour). First through the worker's
``process`` and the server's result check, then uploaded to a real system.
"""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from PIL import Image, ImageChops, ImageFilter, ImageSequence

from common.models import BadInput
from controller.results import result_problem
from filtering import pipeline, registry
from imaging import metadata
from imaging.facts import header_of
from imaging.formats import FORMATS, sniff_format
from storage.images import ReceivedImage
from tests.helpers import ref, wait_completed, workload
from worker.filters import FilterError, process

W, H = 24, 16
PARAMS = {"grayscale": {}, "blur": {"radius": 2}}
GRAY = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
DEEP = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


# -- the images -------------------------------------------------------------------------------

def base() -> Image.Image:
    """Colours, a sharp edge (so a blur shows) and alpha that varies."""
    im = Image.new("RGBA", (W, H))
    for x in range(W):
        for y in range(H):
            edge = 230 if x >= W // 2 else 20
            im.putpixel((x, y), (edge, x * 10, y * 15, 255 if (x + y) % 5 else 90))
    return im


def picture(mode: str) -> Image.Image:
    """The base picture in ``mode``; the deep modes with values over a wide range."""
    if mode in DEEP:
        im = Image.new("I" if mode != "F" else "F", (W, H))
        for x in range(W):
            for y in range(H):
                edge = x >= W // 2
                if mode == "F":
                    im.putpixel((x, y), (250.5 if edge else -20.25) + y * 0.01)
                elif mode == "I":
                    im.putpixel((x, y), (18_000_000 if edge else -5_000_000) + y * 1000)
                else:
                    im.putpixel((x, y), (60_000 if edge else 1_000) + y * 100)
        return im if mode in ("I", "F") else im.convert(mode)
    if mode == "LAB":
        r, g, b, _ = base().split()
        return Image.merge("LAB", (r, g, b))
    if mode in ("La", "PA"):
        return base().convert("LA" if mode == "La" else "RGBA").convert(mode)
    if mode in ("P", "1"):
        return base().convert("RGB").convert(mode)
    return base().convert(mode)


def saved(im: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **options)
    return buf.getvalue()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_raw(depth: int, colour: int, pixel, extra: bytes = b"") -> bytes:
    """A PNG written by hand (kinds Pillow does not write): ``pixel(x, y)`` gives its bytes."""
    rows = b"".join(b"\0" + b"".join(pixel(x, y) for x in range(W)) for y in range(H))
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, depth, colour, 0, 0, 0))
            + extra + _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IEND", b""))


def tiff_raw(bits: tuple[int, ...], photometric: int, pixel, sample_format: int = 1,
             extra_samples: tuple[int, ...] = ()) -> bytes:
    """A little-endian, uncompressed TIFF written by hand: ``pixel(x, y)`` gives its bytes."""
    data = b"".join(pixel(x, y) for y in range(H) for x in range(W))
    tags = sorted([(256, 3, [W]), (257, 3, [H]), (258, 3, list(bits)), (259, 3, [1]), (262, 3, [photometric]),
                   (273, 4, [0]), (277, 3, [len(bits)]), (278, 3, [H]), (279, 4, [len(data)]), (284, 3, [1]),
                   (339, 3, [sample_format] * len(bits))] + ([(338, 3, list(extra_samples))] if extra_samples else []))
    blob_at = 8 + 2 + 12 * len(tags) + 4
    blobs, entries = b"", []
    for tag, kind, values in tags:
        body = struct.pack("<" + ("H" if kind == 3 else "I") * len(values), *values)
        if len(body) > 4:
            body, blobs = struct.pack("<I", blob_at + len(blobs)), blobs + body
        entries.append((tag, kind, len(values), body.ljust(4, b"\0")))
    data_at = blob_at + len(blobs)
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHI", tag, kind, count) + (struct.pack("<I", data_at) if tag == 273 else value)
        for tag, kind, count, value in entries) + b"\0\0\0\0"
    return b"II*\0" + struct.pack("<I", 8) + ifd + blobs + data


def bmp_raw(bits: int, pixels: bytes, palette: bytes = b"", compression: int = 0,
            masks: tuple[int, ...] = ()) -> bytes:
    """A BMP written by hand; four ``masks`` make a V5 header (alpha), three a plain bitfield one."""
    info = struct.pack("<IiiHHIIiiII", 124 if len(masks) == 4 else 40, W, H, 1, bits, compression, len(pixels),
                       2835, 2835, len(palette) // 4, 0)
    if len(masks) == 4:
        info += struct.pack("<IIII", *masks) + b"BGRs" + b"\0" * 48 + struct.pack("<IIII", 4, 0, 0, 0)
    elif masks:
        info += struct.pack("<III", *masks)
    offset = 14 + len(info) + len(palette)
    return b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + info + palette + pixels


def frames(mode: str = "RGB") -> list[Image.Image]:
    first = base().convert(mode)
    return [first, first.transpose(Image.Transpose.FLIP_LEFT_RIGHT), first.transpose(Image.Transpose.ROTATE_180)]


def pillow_cases() -> dict[str, tuple[str, bytes]]:
    """Every (format, mode) Pillow writes and reads back; a mode Pillow cannot write in a format
    is left out here (and what other writers make of it is among :func:`other_cases`)."""
    cases = {}
    for fmt in FORMATS:
        for mode in Image.MODES:
            try:
                data = saved(picture(mode), fmt)
                with Image.open(io.BytesIO(data)) as im:
                    im.load()
            except (OSError, ValueError):
                continue  # cannot write mode X as FMT
            cases[f"{fmt}/{mode}"] = (fmt, data)
    return cases


def other_cases() -> dict[str, tuple[str, bytes]]:
    rgb, gray = base().convert("RGB"), base().convert("L")
    pal = b"".join(bytes([i * 40 % 256, i * 80 % 256, 255 - i * 30, 0]) for i in range(8))
    rle8 = b"".join(bytes([4, x // 4 % 8]) for x in range(0, W, 4)) + b"\0\0"
    argb = b"".join(bytes([x * 10, y * 15, 200 if x >= W // 2 else 30, 50 + x * 8]) for y in range(H) for x in range(W))
    rgb565 = b"".join(struct.pack("<H", (x % 32) << 11 | (y * 4) << 5 | 10) for y in range(H) for x in range(W))
    return {
        "PNG/P with tRNS": ("PNG", saved(rgb.quantize(16), "PNG", transparency=0)),
        "PNG/L with tRNS": ("PNG", saved(gray, "PNG", transparency=20)),
        "PNG/RGB with tRNS": ("PNG", saved(rgb, "PNG", transparency=(230, 0, 0))),
        "PNG/P 4-bit": ("PNG", saved(rgb.quantize(16), "PNG", bits=4)),
        "PNG/P 2-bit": ("PNG", saved(gray.quantize(4), "PNG", bits=2)),
        "PNG/16-bit RGB": ("PNG", png_raw(16, 2, lambda x, y: struct.pack(">HHH", x * 2700, y * 4000, 30000))),
        "PNG/16-bit RGBA": ("PNG", png_raw(16, 6, lambda x, y: struct.pack(">HHHH", x * 2700, y * 4000, 9, 40000))),
        "PNG/16-bit LA": ("PNG", png_raw(16, 4, lambda x, y: struct.pack(">HH", x * 2700, 20000 + y * 3000))),
        "PNG/16-bit gray with tRNS": ("PNG", png_raw(16, 0, lambda x, y: struct.pack(">H", x * 2700),
                                                     _chunk(b"tRNS", struct.pack(">H", 0)))),
        "PNG/APNG": ("PNG", saved(frames()[0], "PNG", save_all=True, append_images=frames()[1:],
                                  duration=[100, 200, 300])),
        "PNG/APNG with a still default image": ("PNG", saved(frames()[0], "PNG", save_all=True, default_image=True,
                                                             append_images=frames()[1:], duration=[0, 200, 300])),
        "JPEG/progressive": ("JPEG", saved(rgb, "JPEG", progressive=True)),
        "JPEG/CMYK progressive": ("JPEG", saved(base().convert("CMYK"), "JPEG", progressive=True)),
        "JPEG/turned by EXIF": ("JPEG", saved(rgb, "JPEG", exif=_orientation(6))),
        "JPEG/MPO of two pictures": ("JPEG", saved(frames()[0], "MPO", save_all=True, append_images=frames()[1:2])),
        "GIF/gray palette": ("GIF", saved(gray, "GIF", optimize=False)),
        "GIF/transparency": ("GIF", saved(rgb.convert("P"), "GIF", transparency=0)),
        "GIF/animated": ("GIF", saved(frames()[0], "GIF", save_all=True, append_images=frames()[1:],
                                      duration=[100, 200, 300], loop=0)),
        "GIF/animated with transparency": ("GIF", saved(frames("RGBA")[0], "GIF", save_all=True,
                                                        append_images=frames("RGBA")[1:], duration=100, disposal=2)),
        "BMP/RLE8": ("BMP", bmp_raw(8, rle8 * H + b"\0\1", pal, compression=1)),
        "BMP/32-bit with alpha": ("BMP", bmp_raw(32, argb, compression=3,
                                                 masks=(0xFF0000, 0xFF00, 0xFF, 0xFF000000))),
        "BMP/16-bit RGB565": ("BMP", bmp_raw(16, rgb565, compression=3, masks=(0xF800, 0x07E0, 0x001F))),
        "WEBP/lossless RGBA": ("WEBP", saved(base(), "WEBP", lossless=True)),
        "WEBP/animated": ("WEBP", saved(frames()[0], "WEBP", save_all=True, append_images=frames()[1:],
                                        duration=[100, 200, 300])),
        "WEBP/animated RGBA": ("WEBP", saved(frames("RGBA")[0], "WEBP", save_all=True,
                                             append_images=frames("RGBA")[1:], duration=100)),
        "TIFF/multi-page": ("TIFF", saved(frames()[0], "TIFF", save_all=True,
                                          append_images=[base().convert("L"), base()])),
        "TIFF/LZW": ("TIFF", saved(rgb, "TIFF", compression="tiff_lzw")),
        "TIFF/JPEG-compressed": ("TIFF", saved(rgb, "TIFF", compression="jpeg")),
        "TIFF/1 group 4 fax": ("TIFF", saved(base().convert("1"), "TIFF", compression="group4")),
        "TIFF/16-bit RGB": ("TIFF", tiff_raw((16, 16, 16), 2, lambda x, y: struct.pack("<HHH", x * 2700, y * 4000, 3))),
        "TIFF/16-bit RGBA": ("TIFF", tiff_raw((16,) * 4, 2, lambda x, y: struct.pack("<HHHH", x * 2700, 9, 3, 40000),
                                              extra_samples=(2,))),
        "TIFF/16-bit CMYK": ("TIFF", tiff_raw((16,) * 4, 5,
                                              lambda x, y: struct.pack("<HHHH", x * 2700, 0, y * 4000, 9))),
        "TIFF/signed 16-bit": ("TIFF", tiff_raw((16,), 1, lambda x, y: struct.pack("<h", x * 1000 - 12000), 2)),
        "TIFF/signed 32-bit": ("TIFF", tiff_raw((32,), 1, lambda x, y: struct.pack("<i", x * 10**6 - 5 * 10**6), 2)),
        "TIFF/32-bit float": ("TIFF", tiff_raw((32,), 1, lambda x, y: struct.pack("<f", x * 0.25 - 2), 3)),
        "TIFF/64-bit float": ("TIFF", tiff_raw((64,), 1, lambda x, y: struct.pack("<d", x * 0.25 - 2), 3)),
        "TIFF/16-bit float": ("TIFF", tiff_raw((16,), 1, lambda x, y: struct.pack("<e", x * 0.25 - 2), 3)),
        "TIFF/gray with alpha": ("TIFF", tiff_raw((8, 8), 1, lambda x, y: bytes([x * 10, 200]), extra_samples=(2,))),
    }


def _orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


CASES = {**pillow_cases(), **other_cases()}

#: What the upload refuses, with the words its 400 says: TIFF sample formats Pillow cannot read
#: (its header is refused as it is judged). Every other case is filtered.
REFUSED_AT_UPLOAD = {
    "TIFF/64-bit float": "cannot identify",
    "TIFF/16-bit float": "cannot identify",
}


def test_the_table_covers_every_format_and_the_modes_in_question():
    assert {fmt for fmt, _ in CASES.values()} == set(FORMATS)
    for name in ("GIF/P", "WEBP/RGB", "TIFF/I;16", "TIFF/I", "TIFF/F", "TIFF/LAB", "TIFF/YCbCr", "PNG/I;16",
                 "JPEG/CMYK", "TIFF/PA", "BMP/1"):
        assert name in CASES, name
    assert set(REFUSED_AT_UPLOAD) <= set(CASES)


# -- through the worker and the result check --------------------------------------------------

def original_of(data: bytes, fmt: str) -> tuple[str, int, int, str]:
    head = header_of(io.BytesIO(data), fmt)
    return fmt, head.width, head.height, head.mode


def is_gray(frame: Image.Image, fmt: str) -> bool:
    """Whether every pixel is gray; in a lossy WebP to within 1 (its decoder's rounding)."""
    if frame.mode in GRAY:
        return True
    r, g, b = frame.convert("RGB").split()
    off = max(ImageChops.difference(r, g).getextrema()[1], ImageChops.difference(r, b).getextrema()[1])
    return off <= (1 if fmt == "WEBP" else 0)


def values(frame: Image.Image) -> list[float]:
    """The pixels of a one-band image, as numbers."""
    raw = frame.convert("F").tobytes()
    return list(struct.unpack(f"{len(raw) // 4}f", raw))


def blurred_mode(fmt: str, src: Image.Image) -> set[str]:
    """The modes a blur of ``src`` may come back in: its own, unless the format forces another
    or the mode has no blur of its own (palettes and bilevel images are blurred decoded)."""
    if fmt == "GIF":  # GIF stores palettes; Pillow reads a gray ramp as L, later frames as RGB(A)
        return {"P", "L", "RGB", "RGBA"}
    if "transparency" in src.info and src.mode not in DEEP:
        return {"LA"} if src.mode in ("1", "L") else {"RGBA"}
    if fmt == "BMP" and src.mode == "RGBA":
        return {"RGB"}  # Pillow writes a BMP's alpha as a fourth byte that readers take for padding
    return {"1": {"L"}, "P": {"RGB"}, "PA": {"RGBA"}}.get(src.mode, {src.mode})


def flat(im: Image.Image) -> bool:
    """Whether every pixel is alike: nothing to blur (a GIF made of a 16-bit image, clipped white)."""
    if im.mode in DEEP:
        return len(set(values(im))) == 1
    extrema = im.getextrema()
    return all(low == high for low, high in (extrema if isinstance(extrema[0], tuple) else [extrema]))


def frames_of(im: Image.Image) -> list[tuple[Image.Image, object]]:
    return [(frame.copy(), frame.info.get("duration")) for frame in ImageSequence.Iterator(im)]


@pytest.mark.parametrize("name", registry.COURSE)  # the other operations: tests/test_filters.py
@pytest.mark.parametrize("case", list(CASES))
def test_every_format_and_mode_is_filtered_or_refused_at_upload(case, name):
    fmt, data = CASES[case]
    if case in REFUSED_AT_UPLOAD:
        with pytest.raises(BadInput, match=REFUSED_AT_UPLOAD[case]):
            header_of(io.BytesIO(data), fmt)
        return
    original = original_of(data, fmt)
    out, out_fmt = process(data, name, PARAMS[name])
    got_fmt, width, height, mode = original_of(out, out_fmt)
    stored = ReceivedImage(None, got_fmt, len(out), width, height, mode, out)
    assert result_problem(name, original, stored) is None
    assert (sniff_format(out[:16]), width, height) == original[:3]
    with Image.open(io.BytesIO(out)) as got, Image.open(io.BytesIO(data)) as src:
        if fmt == "TIFF":  # a TIFF's own tags are its "EXIF" to Pillow: no EXIF directory among them
            assert metadata.tiff_problem(list(got.tag_v2.keys())) is None
        else:
            assert metadata.keep_ranges(out, fmt) is None, "nothing for the server to strip"
            assert not got.getexif() and "exif" not in got.info
        results, sources = frames_of(got), frames_of(src)
        if fmt == "JPEG":
            sources = sources[:1]  # an MPO's pictures after the first: the server keeps no such thing
        assert len(results) == len(sources), "every frame (page) is filtered"
        if len(sources) > 1 and fmt != "TIFF":
            assert [d for _, d in results] == [d for _, d in sources], "the animation keeps its timing"
            assert got.info.get("loop") == src.info.get("loop")
        for (result, _), (source, _) in zip(results, sources):
            if name == "grayscale":
                assert is_gray(result, fmt), f"a {result.mode} frame that is not gray"
                if source.mode in DEEP or source.mode == "LAB":  # already gray (or its lightness): as it was
                    expected = source if source.mode in DEEP else source.getchannel("L")
                    assert (result.mode, result.tobytes()) == (expected.mode, expected.tobytes())
            else:
                assert result.mode in blurred_mode(fmt, source), (result.mode, source.mode)
                if not flat(source):
                    assert result.tobytes() != source.tobytes(), "nothing was blurred"
                if source.mode in DEEP:
                    before, after = values(source), values(result)
                    assert min(before) <= min(after) and max(after) <= max(before), "within its range"


def test_a_blur_of_a_16_bit_image_keeps_its_values_and_is_exact_within_256_levels():
    narrow = Image.new("I", (W, H))
    gray = base().convert("L")
    for x in range(W):
        for y in range(H):
            narrow.putpixel((x, y), 1000 + gray.getpixel((x, y)))
    out, _ = process(saved(narrow.convert("I;16"), "PNG"), "blur", {"radius": 3})
    with Image.open(io.BytesIO(out)) as im:
        expected = [1000 + v for v in gray.filter(ImageFilter.GaussianBlur(3)).tobytes()]
        assert im.mode == "I;16" and values(im) == expected
    wide = picture("I;16")  # 1000..61500: blurred over 256 levels of its own range
    out, _ = process(saved(wide, "TIFF"), "blur", {"radius": 3})
    with Image.open(io.BytesIO(out)) as im:
        got = values(im)
        assert im.mode == "I;16" and 1000 <= min(got) and max(got) <= 61500
        assert max(got) > 60_000 and min(got) < 2_000, "the values stay where they were, not clipped to 255"


def test_lab_and_ycbcr_are_blurred_band_by_band():
    for mode in ("LAB", "YCbCr"):
        src = picture(mode)
        out, _ = process(saved(src, "TIFF"), "blur", {"radius": 2})
        with Image.open(io.BytesIO(out)) as im:
            expected = Image.merge(mode, [band.filter(ImageFilter.GaussianBlur(2)) for band in src.split()])
            assert im.mode == mode and im.tobytes() == expected.tobytes()


def test_a_tiff_result_keeps_its_compression_where_its_mode_allows():
    def compression(data: bytes) -> str:
        with Image.open(io.BytesIO(data)) as im:
            return im.info["compression"]

    for case, name, expected in (("TIFF/LZW", "blur", "tiff_lzw"), ("TIFF/JPEG-compressed", "grayscale", "jpeg"),
                                 ("TIFF/RGBA", "blur", "raw"), ("TIFF/1 group 4 fax", "blur", "tiff_adobe_deflate")):
        assert compression(process(CASES[case][1], name)[0]) == expected, case


def test_a_float_image_with_infinite_values_fails_its_job_clearly():
    im = picture("F")
    im.putpixel((3, 3), float("inf"))
    with pytest.raises(FilterError, match="infinite"):
        process(saved(im, "TIFF"), "blur")
    out, _ = process(saved(im, "TIFF"), "grayscale")  # already gray: as it is
    with Image.open(io.BytesIO(out)) as got:
        assert got.mode == "F" and got.getpixel((3, 3)) == float("inf")


def test_an_animation_beyond_the_limits_fails_its_job_clearly(monkeypatch):
    limits = pipeline.Limits(2 * W * H, 10**9)  # the frames' pixels count together
    with pytest.raises(FilterError, match=f"3 frames .* of {W}x{H} exceed the limit of {2 * W * H} pixels"):
        process(CASES["GIF/animated"][1], "blur", limits=limits)
    process(CASES["GIF/P"][1], "blur", limits=limits)  # one frame is within it
    with pytest.raises(FilterError, match="pixel-steps"):  # and a job's budget counts every frame
        process(CASES["GIF/animated"][1], "blur|sharpen", limits=pipeline.Limits(10**9, 5 * W * H))
    monkeypatch.setattr("imaging.codec.MAX_FRAMES", 2)
    for case in ("GIF/animated", "WEBP/animated", "PNG/APNG", "TIFF/multi-page"):
        with pytest.raises(FilterError, match="more than 2 frames"):
            process(CASES[case][1], "grayscale")


def test_result_check_allows_what_each_format_stores_and_no_more():
    def result(fmt: str, mode: str) -> ReceivedImage:
        return ReceivedImage(None, fmt, 1, W, H, mode)

    assert result_problem("grayscale", ("GIF", W, H, "P"), result("GIF", "P")) is None
    assert result_problem("grayscale", ("WEBP", W, H, "RGB"), result("WEBP", "RGB")) is None
    assert result_problem("grayscale", ("WEBP", W, H, "RGBA"), result("WEBP", "RGBA")) is None
    assert result_problem("grayscale", ("TIFF", W, H, "I;16B"), result("TIFF", "I;16B")) is None
    for fmt in ("PNG", "JPEG", "BMP", "TIFF"):  # these store grayscale: a palette or colour is refused
        for mode in ("P", "RGB", "RGBA", "CMYK"):
            assert "not grayscale" in result_problem("grayscale", (fmt, W, H, "RGB"), result(fmt, mode))
    assert "not grayscale" in result_problem("grayscale", ("GIF", W, H, "P"), result("GIF", "RGB"))
    assert "grayscale result" in result_problem("blur", ("PNG", W, H, "RGB"), result("PNG", "L"))
    assert "grayscale result" in result_problem("blur", ("TIFF", W, H, "LAB"), result("TIFF", "L"))
    assert "a PNG result" in result_problem("blur", ("GIF", W, H, "P"), result("PNG", "P"))


# -- through a real system --------------------------------------------------------------------

def test_every_case_uploaded_to_a_real_system_is_filtered_or_refused_clearly(system):
    token = ref.login(system.url, "admin", system.admin_password)
    for name in registry.COURSE:
        wid = workload(system.url, token, filter=name, **{k: str(v) for k, v in PARAMS[name].items()})
        accepted = {}
        for i, (case, (fmt, data)) in enumerate(CASES.items()):
            r = ref.upload(system.url, token, wid, f"{i}.{FORMATS[fmt][0]}", data)
            if case in REFUSED_AT_UPLOAD:
                assert r.status in (400, 415) and REFUSED_AT_UPLOAD[case] in r.json()["error"], (case, r.body)
                continue
            assert r.status == 200, (case, r.body)
            accepted[r.json()["image_id"]] = case
        view = wait_completed(system.url, token, wid)
        assert view["failed_images"] == [] and sorted(view["filtered_images"]) == sorted(accepted)
        for image_id, case in accepted.items():
            fmt, data = CASES[case]
            r = ref.pull(system.url, token, wid, image_id)
            assert r.status == 200 and r.headers["content-type"] == FORMATS[fmt][1], case
            assert original_of(r.body, fmt)[:3] == original_of(data, fmt)[:3], case
            with Image.open(io.BytesIO(r.body)) as got, Image.open(io.BytesIO(data)) as src:
                assert len(frames_of(got)) == (1 if fmt == "JPEG" else len(frames_of(src))), case
                if name == "grayscale":
                    assert all(is_gray(frame, fmt) for frame, _ in frames_of(got)), case
