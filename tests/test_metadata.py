"""Metadata out of results (controller/metadata.py): pure walks over each format's structure."""

from __future__ import annotations

import io
import mmap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, PngImagePlugin

from imaging import metadata

GPS = {1: "N", 2: (48.0, 51.0, 24.0), 3: "W", 4: (2.0, 21.0, 7.0)}


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _exif() -> bytes:
    exif = Image.Exif()
    exif[0x8825] = GPS
    exif[0x010F] = "EvilCam"
    return exif.tobytes()


IMAGE = Image.radial_gradient("L").resize((64, 48)).convert("RGB")
TEXT = PngImagePlugin.PngInfo()
TEXT.add_text("Comment", "taken at the made-up place")
TEXT.add_itxt("XML:com.adobe.xmp", "<x:xmpmeta/>")

CLEAN = {
    "PNG": [_save(IMAGE.convert("L"), "PNG"), _save(IMAGE.convert("RGBA"), "PNG"), _save(IMAGE.convert("P"), "PNG")],
    "JPEG": [_save(IMAGE, "JPEG"), _save(IMAGE, "JPEG", progressive=True), _save(IMAGE.convert("L"), "JPEG"),
             _save(IMAGE.convert("CMYK"), "JPEG")],
    "WEBP": [_save(IMAGE, "WEBP"), _save(IMAGE.convert("RGBA"), "WEBP", lossless=True)],
    "GIF": [_save(IMAGE.convert("P"), "GIF"), _save(IMAGE.convert("L"), "GIF")],
}
DIRTY = {
    "PNG": [_save(IMAGE.convert("L"), "PNG", exif=_exif(), pnginfo=TEXT),
            _save(IMAGE.convert("L"), "PNG") + b"appended after IEND"],
    "JPEG": [_save(IMAGE, "JPEG", exif=_exif(), comment=b"a comment"),
             _save(IMAGE, "JPEG", progressive=True, exif=_exif()) + _save(IMAGE, "JPEG")],  # a second picture
    "WEBP": [_save(IMAGE, "WEBP", exif=_exif(), xmp=b"<x:xmpmeta/>")],
    "GIF": [_save(IMAGE.convert("P"), "GIF", comment=b"a comment")],
}


@pytest.mark.parametrize("fmt", sorted(CLEAN))
def test_a_result_without_metadata_is_left_as_it_is(fmt):
    for data in CLEAN[fmt]:
        assert metadata.keep_ranges(data, fmt) is None
        assert metadata.stripped(data, fmt) is data


@pytest.mark.parametrize("fmt", sorted(DIRTY))
def test_metadata_is_dropped_and_the_pixels_stay(fmt):
    for data in DIRTY[fmt]:
        clean = metadata.stripped(data, fmt)
        assert len(clean) < len(data)
        with Image.open(io.BytesIO(clean)) as out, Image.open(io.BytesIO(data)) as src:
            assert out.format == fmt and out.size == src.size
            assert out.convert("RGB").tobytes() == src.convert("RGB").tobytes()
            assert dict(out.getexif()) == {}
            assert not {"exif", "comment", "Comment", "xmp", "XML:com.adobe.xmp"} & set(out.info)
        assert b"EvilCam" not in clean and b"made-up" not in clean and b"xmpmeta" not in clean
        assert metadata.keep_ranges(clean, fmt) is None, "stripping is idempotent"


def test_the_walk_works_on_a_memory_map_of_a_file(tmp_path):
    data = DIRTY["JPEG"][0]
    path = tmp_path / "r.jpg"
    path.write_bytes(data)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
        ranges = metadata.keep_ranges(view, "JPEG")
        assert ranges is not None
        assert metadata.join(view, ranges, "JPEG") == metadata.stripped(data, "JPEG")


@pytest.mark.parametrize("fmt", sorted(CLEAN))
def test_a_broken_structure_is_malformed_not_a_crash(fmt):
    data = CLEAN[fmt][0]
    for broken in (data[: len(data) // 2], data[:12], data[:4] + b"\xff" * 40):
        with pytest.raises(metadata.Malformed):
            metadata.keep_ranges(broken, fmt)


def test_a_tiff_result_with_metadata_tags_is_refused():
    assert metadata.tiff_problem([256, 257, 258, 273]) is None
    assert "GPS" in metadata.tiff_problem([256, 34853]) and "EXIF" in metadata.tiff_problem([34665])


def test_signs_of_metadata_in_part_of_a_file():
    assert metadata.may_have_metadata(DIRTY["PNG"][0][:200], "PNG")
    assert not metadata.may_have_metadata(CLEAN["PNG"][0], "PNG")
    assert metadata.may_have_metadata(DIRTY["WEBP"][0][-100:], "WEBP")
    # A PNG's beginning is walked chunk by chunk: a sign inside its pixels' compressed data is
    # no metadata; a metadata chunk among the first ones is, wherever it sits in the part.
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    clean = CLEAN["PNG"][0]
    idat_with_a_sign = clean[:33] + chunk(b"IDAT", b"tEXt" * 50) + clean[33:]
    assert not metadata.may_have_metadata(idat_with_a_sign[:400], "PNG")
    late_text = clean[:33] + chunk(b"IDAT", b"\0" * 300) + chunk(b"tEXt", b"k\0v") + clean[33:]
    assert metadata.may_have_metadata(late_text[:400], "PNG")


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(CLEAN)), st.integers(0, 10_000), st.binary(max_size=64), st.integers(0, 3))
def test_crafted_bytes_are_malformed_or_walked_never_a_crash(fmt, at, junk, which):
    """A worker controls every byte of its result: the walk either succeeds or says Malformed."""
    base = (CLEAN[fmt] + DIRTY.get(fmt, []))[which % len(CLEAN[fmt] + DIRTY.get(fmt, []))]
    at %= len(base) + 1
    data = base[:at] + junk + base[at + len(junk):]
    try:
        ranges = metadata.keep_ranges(data, fmt)
    except metadata.Malformed:
        return
    if ranges is not None:
        assert all(0 <= a < b <= len(data) for a, b in ranges)
        metadata.join(data, ranges, fmt)


def test_a_png_of_few_chunks_is_walked_on_the_loop_and_one_of_many_in_a_thread():
    """few_pieces decides where a result's metadata walk runs: a real frame's few chunks on the
    event loop; a crafted PNG of thousands of tiny chunks (or another format) in a thread."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    out = io.BytesIO()
    Image.new("RGB", (640, 360), (10, 200, 30)).save(out, "PNG")
    png = out.getvalue()
    assert metadata.few_pieces(png, "PNG", 256)
    crafted = png[:33] + b"".join(chunk(b"tEXt", b"a") for _ in range(1000)) + png[33:]
    assert not metadata.few_pieces(crafted, "PNG", 256)
    assert metadata.stripped(crafted, "PNG") == png, "walked in a thread, it still drops them all"
    disguised = png[:33] + chunk(b"tEXt", b"xxIEND" * 4) * 300 + png[33:]  # "IEND" inside chunk data
    assert not metadata.few_pieces(disguised, "PNG", 256)
    assert metadata.few_pieces(png[:40], "PNG", 256), "a truncated one: the walk says it is malformed"
    assert not metadata.few_pieces(b"\xff\xd8\xff\xe0", "JPEG", 256)
