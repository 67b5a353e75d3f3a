"""A device rebuilds its bundle in a process where torch (and toolkit, export, sympy) cannot import."""

import json
import subprocess
import sys
from pathlib import Path

from absent_packages import subprocess_env

ROOT = Path(__file__).resolve().parents[2]

DEVICE_SCRIPT = r'''
import absent_packages
ABSENT = ("torch", "toolkit", "export", "sympy")  # not in the [agent] extra (sympy: not an onnxruntime dependency)
absent_packages.block(ABSENT)

import contextlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import onnx

from device_agent import selfcheck
from device_agent.bundle import load_bundle
from device_agent.model_build import read_weights
from device_agent.nmoe_local import LocalNMoE
from device_agent.rebuild import NewWeights, rebuild_bundle

result = {}
rng = np.random.default_rng(0)
for path in sorted(Path(sys.argv[1]).glob("device-*")):
    bundle = load_bundle(path)
    def weights(role):
        w = read_weights(onnx.load_from_string(bundle.model_bytes(bundle.model(role, "fp32"))), role)
        return {k: (v * (1 + 0.01 * rng.standard_normal(v.shape))).astype(np.float32) for k, v in w.items()}
    images = bundle.samples()["images"]
    new = rebuild_bundle(path, bundle, NewWeights(weights("extractor"), weights("gate"), weights("expert")),
                         np.concatenate([images] * 4), model_version="round-3", run_id="r", round_index=3)
    result[path.name] = {"version": new.manifest.model_version, "dropped": new.manifest.provenance["dropped_formats"],
                         "formats": sorted({e.format for e in new.manifest.models})}
bundles = {b.manifest.expert_id: b for b in map(load_bundle, sorted(Path(sys.argv[1]).glob("device-*")))}
fp32, int8 = LocalNMoE(bundles, "fp32"), LocalNMoE(bundles, "int8")
images = np.concatenate([b.samples()["images"] for b in bundles.values()])
result["agree"] = [int(np.sum(fp32.predict(c, images).labels == int8.predict(c, images).labels)) for c in bundles]
result["images"] = len(images)
with contextlib.redirect_stdout(io.StringIO()):
    result["selfcheck"] = selfcheck.main([str(b.path) for b in bundles.values()])
result["modules"] = sorted(m for m in sys.modules if m.partition(".")[0] in ABSENT)
print(json.dumps(result))
'''


def test_rebuild_runs_without_torch(bundles_copy: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", DEVICE_SCRIPT, str(bundles_copy)], check=False, cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result.pop("modules") == [] and result.pop("selfcheck") == 0
    n = result.pop("images")
    agree = result.pop("agree")  # int8 calibrated on only 8 images here (the >= 99% check: test_rebuild.py)
    assert n == 24 and sum(agree) >= 0.9 * 3 * n, agree
    assert result == {f"device-{c}": {"version": "round-3", "dropped": ["tflite"], "formats": ["onnx"]} for c in range(3)}
