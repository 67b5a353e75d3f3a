"""The device side runs exported bundles in a process where torch (and toolkit, export) cannot import."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from absent_packages import subprocess_env

ROOT = Path(__file__).resolve().parent.parent

DEVICE_SCRIPT = r'''
import absent_packages
absent_packages.block(("torch", "toolkit", "export"))

import json
import sys
from pathlib import Path

import numpy as np

from device_agent.bundle import load_bundle
from device_agent.nmoe_local import LocalNMoE

bundles = {b.manifest.expert_id: b for b in map(load_bundle, sorted(Path(sys.argv[1]).glob("device-*")))}
result = {}
for fmt, precision in [(f, p) for f in ("onnx", "tflite") for p in ("fp32", "int8")]:
    fleet = LocalNMoE(bundles, precision, fmt)
    for c, bundle in bundles.items():
        s = bundle.samples()
        z = fleet.latents(c, s["images"])
        prediction = fleet.predict(c, s["images"])
        result[f"{fmt}/{precision}/{c}"] = {
            "latent": float(np.abs(z - s["latent"]).max()),
            "gate": float(np.abs(fleet.gates[c].run(s["latent"]) - s["gate_logits"]).max()),
            "expert": float(np.abs(fleet.experts[c](s["latent"]) - s["expert_probs"]).max()),
            "labels": prediction.labels.tolist(),
            "weights_sum": prediction.weights.sum(axis=1).tolist(),
        }
result["modules"] = sorted(m for m in sys.modules
                           if m.partition(".")[0] in ("torch", "toolkit", "export", "executorch"))
print(json.dumps(result))
'''


@pytest.fixture(scope="module")
def bundles_dir(onnx_tflite_bundles: Path) -> Path:
    return onnx_tflite_bundles


def test_bundles_run_without_torch(bundles_dir: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", DEVICE_SCRIPT, str(bundles_dir)], check=False, cwd=ROOT,
                          env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result.pop("modules") == []
    for fmt, c in [(f, c) for f in ("onnx", "tflite") for c in range(3)]:
        fp32, int8 = result[f"{fmt}/fp32/{c}"], result[f"{fmt}/int8/{c}"]
        assert fp32["latent"] < 1e-4 and fp32["gate"] < 1e-4 and fp32["expert"] < 1e-5
        assert int8["expert"] < 0.2 and len(int8["labels"]) == 8
        assert all(abs(w - 1) < 1e-6 for w in fp32["weights_sum"] + int8["weights_sum"])
        agree = sum(a == b for a, b in zip(fp32["labels"], int8["labels"]))
        assert agree >= 6, (c, fp32["labels"], int8["labels"])
