"""Where DPIP keeps things: the datastore (SQLite or PostgreSQL, one set of queries) and the image
store (files or an S3-compatible bucket), with what judging and keeping image bytes takes."""
