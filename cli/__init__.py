"""``dpip``: the command-line client (login, push, watch, pull, tables, video in and out)."""
