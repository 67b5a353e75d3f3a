# nmoe-edge: every target does its own setup (Debian packages + .venv) and is idempotent.
VENV   := .venv
PY     := $(VENV)/bin/python
NMOE   := $(VENV)/bin/nmoe
STAMP  := $(VENV)/.setup-done
RUN    ?= runs/quick

.PHONY: setup test lint demo bench-accuracy clean

$(STAMP): pyproject.toml constraints.txt scripts/setup.sh
	scripts/setup.sh
	touch $@

setup: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check toolkit export device_agent broker tests bench

test: lint
	$(PY) -m pytest

demo: $(STAMP)
	$(NMOE) train configs/quick.toml --out $(RUN)

bench-accuracy: $(STAMP)
	$(PY) bench/accuracy

clean:
	rm -rf $(VENV) runs .pytest_cache
