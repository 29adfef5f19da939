"""Local files: which ones ``dpip push`` may send, and the names ``dpip pull`` writes.

Pure functions of paths and the server's image listing, so that they are tested without a server.
"""

from __future__ import annotations

import re
from pathlib import Path

from cli.session import CliError
from imaging.formats import FORMATS, sniff_format

EXTENSIONS = {fmt: ext for fmt, (ext, _) in FORMATS.items()}
HEAD_BYTES = 16  # enough for every signature sniff_format knows (WEBP's is at 8..12)
#: A file name the pull writes stays under this many bytes: room for "-<id>" and the
#: temporary ".<name>.part" within the 255 of common file systems.
MAX_NAME_BYTES = 200


def check_images(files: list[Path]) -> None:
    """Raise a :class:`CliError` naming the first file that cannot be read or does not start
    like an image the server accepts (its first bytes, as the server judges them), before
    anything is created on the server."""
    unreadable: list[tuple[Path, OSError]] = []
    not_images: list[Path] = []
    for path in files:
        try:
            with open(path, "rb") as f:
                head = f.read(HEAD_BYTES)
        except OSError as e:
            unreadable.append((path, e))
            continue
        if sniff_format(head) is None:
            not_images.append(path)
    if unreadable:
        path, e = unreadable[0]
        more = f" (and {len(unreadable) - 1} more)" if len(unreadable) > 1 else ""
        raise CliError(f"{path}: cannot read it: {e.strerror or e}{more}; nothing was pushed")
    if not_images:
        more = f" (and {len(not_images) - 1} more files)" if len(not_images) > 1 else ""
        kinds = ", ".join(FORMATS)
        raise CliError(f"{not_images[0]}{more}: not an image (its first bytes are none of {kinds});"
                       " nothing was pushed")


def id_name(entry: dict) -> str:
    """``<id>.<ext>``: what the reference's pull client writes."""
    return f"{entry['image_id']}.{EXTENSIONS.get(entry.get('format') or 'PNG', 'png')}"


_UNSAFE = re.compile(r'[\x00-\x1f\x7f<>:"|?*]')


def safe_name(raw: object) -> str | None:
    """The base name of ``raw`` (a name a client uploaded), harmless as a file name here: no
    directory part, no control characters, not hidden, not ``.`` or ``..``, not too long; None
    if nothing is left."""
    if not isinstance(raw, str):
        return None
    base = raw.replace("\\", "/").rsplit("/", 1)[-1]
    base = _UNSAFE.sub("_", base).strip().lstrip(".").rstrip(". ")
    if not base:
        return None
    if len(base.encode()) > MAX_NAME_BYTES:
        stem, suffix = _split(base)
        suffix = suffix if len(suffix.encode()) <= 16 else ""
        budget = MAX_NAME_BYTES - len(suffix.encode())
        stem = stem.encode()[:budget].decode("utf-8", "ignore").rstrip(". ")
        base = stem + suffix if stem else None
    return base or None


def _split(name: str) -> tuple[str, str]:
    dot = name.rfind(".")
    return (name[:dot], name[dot:]) if dot > 0 else (name, "")


def local_names(entries: list[dict], names: str, originals: dict[int, object] | None = None) -> dict[int, str]:
    """The file name for each image of the listing, by id. ``names`` is ``id`` (``<id>.<ext>``)
    or ``original``: the name the image was uploaded with (the entry's ``filename``, else
    ``originals[image_id]``), made safe, else ``<id>.<ext>``. Two images never get one name
    (compared case-insensitively, for the file systems that are): the later id gets
    ``<stem>-<id><suffix>``. The same listing always gives the same names, so a second pull
    finds the files of the first."""
    ordered = sorted(entries, key=lambda e: e["image_id"])
    wanted: dict[int, str] = {}
    for e in ordered:
        name = None
        if names == "original":
            raw = e.get("filename") or (originals or {}).get(e["image_id"])
            name = safe_name(raw)
        wanted[e["image_id"]] = name or id_name(e)
    used: set[str] = set()
    result: dict[int, str] = {}
    # Uploaded names first, then the <id>.<ext> fallbacks: an uploaded "3.png" keeps its name.
    for fallback in (False, True):
        for e in ordered:
            image_id = e["image_id"]
            name = wanted[image_id]
            if (name == id_name(e)) != fallback or image_id in result:
                continue
            if name.casefold() in used:
                stem, suffix = _split(name)
                name, n = f"{stem}-{image_id}{suffix}", 1
                while name.casefold() in used:
                    name, n = f"{stem}-{image_id}-{n}{suffix}", n + 1
            used.add(name.casefold())
            result[image_id] = name
    return result
