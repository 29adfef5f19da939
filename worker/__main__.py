"""``python -m worker ...``: the same as ``worker/main.py``, including its run again under the
project's venv when this Python lacks DPIP's dependencies."""

from worker.main import run

run()
