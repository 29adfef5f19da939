"""``make bench`` and its parts, each run as ``python -m bench.NAME``: the whole table (``suite``),
tail latency (``tail``), the CLI (``cli``), wide fleets (``scale``), several servers (``cluster``),
the server's floor (``serverfloor``), and what they share (``clients``, ``table``, ``celery_noop``)."""
