# mcpgw developer commands. Everything installs itself on first use into .venv/.
#   make run     start the demo MCP server and the gateway in front of it (Ctrl-C stops both)
#   make test    lint (ruff), types (mypy) and the whole test suite (pytest)
#   make bench   added latency and throughput vs direct and the reference proxy; policy cost
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

.PHONY: run test lint typecheck unit bench clean

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt \
	    -e '.[dev,demo]' --config-settings editable_mode=compat
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m mcpgw.demo.run --config etc/mcpgw.yaml

lint: $(STAMP)
	$(VENV)/bin/ruff check mcpgw tests twisted bench

typecheck: $(STAMP)
	$(VENV)/bin/mypy

unit: $(STAMP)
	$(VENV)/bin/pytest -q

test: lint typecheck unit

bench: $(STAMP)
	$(PY) bench/run.py
	$(PY) bench/run.py --systems direct,mcpgw --rounds 2 --policy-rules 1000
	$(PY) bench/policy_bench.py

clean:
	rm -rf $(VENV) build dist *.egg-info run _trial_temp twisted/plugins/dropin.cache
