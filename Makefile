# The README's two commands, `make demo` and `make test`, must work on a machine
# that has only Python and pip: every target builds its own virtual environment.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test dev bench bench-quick clean lock venv test-system-packages

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m m365_pipeline.demo demo

dev: $(STAMP)
	$(BIN)/python -m m365_pipeline.demo dev

# The browser and load tests drive Debian's chromium and wrk for real.
test-system-packages:
	@sh scripts/system-packages.sh chromium wrk

test: $(STAMP) test-system-packages
	$(BIN)/pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache

# Re-resolve the pinned set after changing pyproject.toml's dependencies.
lock:
	rm -rf /tmp/m365-lock-venv && $(PYTHON) -m venv /tmp/m365-lock-venv
	/tmp/m365-lock-venv/bin/pip install --quiet -e '.[test]'
	/tmp/m365-lock-venv/bin/pip freeze --exclude-editable > requirements.lock
