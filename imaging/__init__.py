"""Images as bytes: formats known by their first bytes and the pixel limit (``formats``),
what a header says without decoding (``facts``), EXIF (``exif``), metadata walked out of a
file (``metadata``) and ICC profiles without their text (``icc``). Used by storage/ and worker/."""
