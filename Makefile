# inferoute: `make up` runs the demo, `make test` runs every test (and installs what they need).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TESTSTAMP := $(VENV)/.test-installed

.PHONY: up test test-unit test-integration lint bench venv test-deps clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

venv: $(STAMP)

$(TESTSTAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install --quiet -e '.[test,lint,bench]'
	touch $@

# System packages the interop tests use (NGINX). Installed only when missing.
test-deps: $(TESTSTAMP)
	@command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx || { \
	  echo "installing nginx (apt-get)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null) ; }

up: $(STAMP)
	$(VENV)/bin/inferoute up

test: test-deps
	$(PY) -m pytest -q tests

test-unit: $(TESTSTAMP)
	$(PY) -m pytest -q tests/unit

lint: $(TESTSTAMP)
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests
	$(VENV)/bin/mypy

bench: $(TESTSTAMP)
	$(VENV)/bin/inferoute bench sim

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
