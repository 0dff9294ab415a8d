# inferoute: `make up` runs the demo, `make test` runs every test (and installs what they need).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TESTSTAMP := $(VENV)/.test-installed

.PHONY: up test test-unit test-integration lint bench venv test-deps clean

$(STAMP): pyproject.toml
	@echo "installing inferoute and its dependencies into $(VENV) (first run only: 1-2 minutes)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

venv: $(STAMP)

$(TESTSTAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install --quiet -e '.[test,lint,bench]'
	touch $@

# System packages the interop tests use (NGINX; curl, iproute2 and unshare for the runnable docs; nghttp2's
# h2load for the HTTP/2 interop test; redis-server for the picker's cross-replica syncer tests).
# Installed only when missing.
test-deps: $(TESTSTAMP)
	@missing=""; \
	{ command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx; } || missing="$$missing nginx"; \
	command -v curl >/dev/null 2>&1 || missing="$$missing curl"; \
	{ command -v ip >/dev/null 2>&1 || test -x /usr/sbin/ip || test -x /sbin/ip; } || missing="$$missing iproute2"; \
	command -v unshare >/dev/null 2>&1 || missing="$$missing util-linux"; \
	command -v h2load >/dev/null 2>&1 || missing="$$missing nghttp2-client"; \
	{ command -v redis-server >/dev/null 2>&1 || test -x /usr/bin/redis-server; } || missing="$$missing redis-server"; \
	if [ -n "$$missing" ]; then echo "installing$$missing (apt-get)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi

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

# Quick benchmarks (about 2 minutes). The full runs and their commands are in docs/benchmarks.md.
# wrk (Debian) drives the gateway/NGINX benchmarks; installed only when missing. Results: bench-results/
# scheduler.json and routing-quick/; the BBR speed is printed only.
bench: test-deps
	@command -v wrk >/dev/null 2>&1 || { echo "installing wrk (apt-get)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null) ; }
	$(VENV)/bin/inferoute bench scheduler --out bench-results/scheduler.json
	$(VENV)/bin/inferoute bench gateway --bbr-only
	$(VENV)/bin/inferoute bench routing --quick --out bench-results/routing-quick

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
