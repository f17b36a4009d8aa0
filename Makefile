# The README's two commands, `make demo` and `make test`, must work on a machine
# that has only Python and pip: every target builds its own virtual environment.
# The first supported interpreter that runs (a pyenv shim may exist but not run), in this order.
SUPPORTED_PYTHONS := 3.11 3.12 3.13
PYTHON ?= $(or $(shell for v in $(SUPPORTED_PYTHONS); do python$$v -c '' 2>/dev/null && echo python$$v && break; done),python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo check test test-fast dev run bench bench-quick clean lock venv test-system-packages

$(STAMP): requirements.lock pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(f"{sys.version_info[0]}.{sys.version_info[1]}" not in "$(SUPPORTED_PYTHONS)".split())' \
		2>/dev/null || { echo "m365-pipeline needs Python 3.11, 3.12 or 3.13 (python3.11/3.12/3.13 in PATH, or PYTHON=/path/to/python3.x); $(PYTHON) does not run or is not one"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m m365_pipeline.demo demo

dev: $(STAMP)
	$(BIN)/python -m m365_pipeline.demo dev

# The nightly_refresh job once, now, against the configured sources, recorded in DAGSTER_HOME's instance.
run: $(STAMP)
	$(BIN)/python -m m365_pipeline.demo run

# The browser, load and nights tests drive Debian's chromium, wrk and faketime for real.
test-system-packages:
	@sh scripts/system-packages.sh chromium wrk faketime postgresql tinyproxy

# Lint and the code location's own validation first: both take seconds and fail loudly.
check: $(STAMP)
	$(BIN)/ruff check .
	DAGSTER_HOME= PYTHONWARNINGS=ignore $(BIN)/dagster definitions validate -m m365_pipeline.definitions >/dev/null

test: $(STAMP) check test-system-packages
	$(BIN)/pytest $(PYTEST_ARGS)

# Everything but the slow, browser and load tests (markers in pyproject.toml): ~3.5 min on 2 cores,
# 2 of them the ~120 data-contract tests (one Dagster run each).
test-fast: $(STAMP)
	$(BIN)/pytest -m "not slow and not browser and not load" $(PYTEST_ARGS)

# The real product against m365-simulate at 700, 100k and 1M users, and m365-serve against nginx
# (wrk), then 30 nights at 100k (bench/nights.py): writes bench/RESULTS.md (~40 min). BENCH_ARGS=--nights-1m
# adds the 1M nights cell (~15 min). bench-quick: the demo scale only, under two minutes.
bench: $(STAMP)
	@sh scripts/system-packages.sh nginx wrk
	$(BIN)/python bench/run.py $(BENCH_ARGS)

bench-quick: $(STAMP)
	@sh scripts/system-packages.sh nginx wrk
	$(BIN)/python bench/run.py --quick

clean:
	rm -rf $(VENV) .pytest_cache

# Re-resolve the pinned set after changing pyproject.toml's dependencies. One lock serves 3.11-3.13 (every
# pin has wheels for each); setuptools is pinned too, since 3.12+ venvs come without it and the editable
# install builds without isolation.
lock:
	rm -rf /tmp/m365-lock-venv && $(PYTHON) -m venv /tmp/m365-lock-venv
	/tmp/m365-lock-venv/bin/pip install --quiet -e '.[test]' "$$(grep '^setuptools==' requirements.lock)"
	/tmp/m365-lock-venv/bin/pip freeze --all --exclude-editable | grep -v '^pip==' > requirements.lock
