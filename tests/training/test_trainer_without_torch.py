"""The numpy trainer imports and trains in a process where torch, toolkit and export cannot import."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

DEVICE_SCRIPT = r'''
import json
import sys

for absent in sys.argv[1].split(","):  # as on a device where these packages are not installed
    sys.modules[absent] = None

import numpy as np

from device_agent.training import EXPERT, GATE, Dims, OptimSpec, TrainerUnavailable, load_trainer

rng = np.random.default_rng(0)
classes, dim, n = 4, 16, 600
centers = rng.standard_normal((classes, dim)) * 3
y = rng.integers(0, classes, n)
z = (centers[y] + rng.standard_normal((n, dim))).astype(np.float32)

trainer = load_trainer("numpy")
expert = EXPERT.init(Dims(dim, 32, classes), rng)
trained, expert_metrics = trainer.expert_task(5, 64, OptimSpec("adam", 0.01, weight_decay=5e-4)).fit(expert, z, y, 1)
accuracy = float((EXPERT.forward(trained, z)[0].argmax(1) == y).mean())

# two frozen "experts": the first knows classes 0-1, the second 2-3; the gate must learn who knows what
good, bad = np.eye(classes, dtype=np.float32) * 0.9 + 0.025, np.full(classes, 0.25, np.float32)
probs = np.stack([np.where((y < 2)[:, None], good[y], bad), np.where((y >= 2)[:, None], good[y], bad)], axis=1)
gate = GATE.init(Dims(dim, 16, 2), rng)
gate_task = trainer.gate_task(5, 64, OptimSpec("sgd", 0.1, momentum=0.9))
trained_gate, _ = gate_task.fit(gate, z, probs, y, 2)
routed = float((GATE.forward(trained_gate, z)[0].argmax(1) == (y >= 2)).mean())

try:
    load_trainer("torch")
    torch_backend = "loaded"
except TrainerUnavailable as e:
    torch_backend = str(e)
print(json.dumps({"expert_accuracy": accuracy, "expert_loss": expert_metrics["loss"], "routed": routed,
                  "torch_backend": torch_backend,
                  "torch_modules": sorted(m for m in sys.modules if m.partition(".")[0] == "torch"
                                          and sys.modules[m] is not None)}))
'''


@pytest.mark.parametrize("absent,missing", [
    ("torch,toolkit,export", "toolkit.device_trainer"),  # a device with only device_agent's files
    ("torch", "torch"),  # nmoe-edge[agent]: the whole package, toolkit included, but no torch
])
def test_trains_without_torch(absent: str, missing: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", DEVICE_SCRIPT, absent], check=False, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["torch_modules"] == []
    assert result["expert_accuracy"] > 0.95 and result["expert_loss"] < 1.0
    assert result["routed"] > 0.95
    assert result["torch_backend"] == (f"trainer backend 'torch' is not installed here: no module named "
                                       f"{missing!r} (install nmoe-edge[train])")


STAGE1_SCRIPT = r'''
import sys

sys.modules["torch"] = None  # nmoe-edge[agent]: no torch

import numpy as np

from device_agent.device_data import DeviceData, Split
from device_agent.training.device_ops import OperationRefused
from device_agent.training.numpy_ops import NumpyOps

split = Split(np.zeros((2, 1, 4, 4), np.uint8), np.zeros(2, np.int64))
data = DeviceData(0, "toy", (1, 4, 4), 1 / 255, (0.0,), (1.0,), ("a", "b"), split, split)
try:
    NumpyOps(0, {"data": {"num_clients": 2}}, data, __import__("pathlib").Path(sys.argv[1])).fit(
        "stage1_fedce", 0, {}, (), 0)
except OperationRefused as e:
    print(e)
'''


def test_stage1_refusal_names_the_way_out(tmp_path: Path) -> None:
    """A torch-free device refuses Stage 1 and says how to run the fleet anyway (--stage1-from)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", STAGE1_SCRIPT, str(tmp_path)], check=False, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "needs torch on the device" in proc.stdout and "nmoe federate --stage1-from RUN" in proc.stdout
