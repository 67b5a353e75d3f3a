# nmoe-edge: every target does its own setup (Debian packages + .venv) and is idempotent.
VENV   := .venv
PY     := $(VENV)/bin/python
NMOE   := $(VENV)/bin/nmoe
STAMP  := $(VENV)/.setup-done
RUN    ?= runs/quick
BUNDLES ?= runs/quick-bundles

.PHONY: setup test lint demo bench-accuracy bench-export bench-agent bench-federated bench-field bench-scale clean arm64-env arm64-check

$(STAMP): pyproject.toml constraints.txt scripts/setup.sh
	scripts/setup.sh
	touch $@

setup: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check toolkit export device_agent broker tests bench
	$(VENV)/bin/mypy

test: lint arm64-env
	$(PY) -m pytest

demo: $(STAMP)
	$(NMOE) train configs/quick.toml --out $(RUN)
	$(NMOE) export $(RUN) --out $(BUNDLES) --formats onnx,tflite --precision int8
	$(NMOE) trial --bundles $(BUNDLES) --samples 50 --out runs/quick-trial
	# the same config trained through 10 agent processes over MQTT (FedGate), then a trial on what they committed
	$(NMOE) trial --federate configs/quick.toml --set 'gate.methods=["fedgate"]' --set 'baselines.methods=["fedavg"]' \
	  --auth --samples 30 --out runs/quick-federated

bench-accuracy: $(STAMP)
	$(PY) -m bench.accuracy

bench-export: $(STAMP) arm64-env
	$(PY) -m bench.export

# Agents over mosquitto on loopback: round trip, micro-batching, fleet scaling, latent encodings (~5 min).
bench-agent: $(STAMP)
	$(PY) -m bench.agent

# The quick config in-process vs through 10 agent processes over MQTT, then a killed device and stragglers (~55 min
# on 2 shared cores: four fleet runs after the in-process one).
bench-federated: $(STAMP)
	$(PY) -m bench.federated

# The demo fleet (runs/quick-bundles; trained and exported first when missing) under emulated wifi/lte/congested
# links and a 10 s outage, against loopback in one run (~10 min).
bench-field: $(STAMP)
	$(PY) -m bench.field --bundles $(BUNDLES)

# Stage 1 in-process vs Ray, inference and federated rounds across a bridged broker, the coordinator at 10, 100
# and 1000 simulated devices (nmoe loadgen) -> docs/results/scale.md (its hand-measured section 3 is kept; ~15 min).
bench-scale: $(STAMP)
	nice -n 10 $(PY) -m bench.scale

# Emulated aarch64 Python (qemu-user + Debian arm64 sysroot + aarch64 wheels), cached in ~/.cache/nmoe-edge/arm64.
arm64-env:
	scripts/arm64_env.sh

# ARM64 parity of $(BUNDLES) (x86 vs emulated Cortex-A72/A76); makes a tiny fleet first when there is none.
arm64-check: $(STAMP) arm64-env
	@ls $(BUNDLES)/device-*/manifest.json >/dev/null 2>&1 || { \
	  echo "arm64-check: no bundles in $(BUNDLES): exporting a tiny run"; \
	  $(NMOE) train configs/tiny.toml --out runs/tiny && $(NMOE) export runs/tiny --out $(BUNDLES) --quiet; }
	$(PY) -m export.arm64_check $(BUNDLES)

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache
