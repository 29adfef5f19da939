"""What an administrator runs: ``main.py users`` (``users``) and ``main.py certs`` (``certs``)."""
