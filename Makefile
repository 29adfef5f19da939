# DPIP: `make run` starts a local system, `make test` runs the whole suite from a clean clone.
PYTHON ?= python3
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.install-stamp

.PHONY: install browser run test e2e bench bench-tail bench-cli bench-scale clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

run: install
	$(PY) scripts/run_local.py

# The dashboard test drives Debian's chromium through its chromedriver.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  echo "installing chromium and chromedriver (Debian packages) for the dashboard test"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver >/dev/null; }

test: install browser
	$(PY) -m pytest -q

e2e: install
	$(PY) scripts/e2e_local.py

bench: install
	$(PY) scripts/bench.py

bench-tail: install
	$(PY) scripts/bench_tail.py

bench-cli: install
	$(PY) scripts/bench_cli.py

bench-scale: install
	$(PY) scripts/bench_scale.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
