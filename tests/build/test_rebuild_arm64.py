"""A rebuild under emulated aarch64 (a Raspberry Pi's Python with the [agent] wheels, onnx included) equals x86's.

The environment comes from scripts/arm64_env.sh (built once and cached, as for tests/test_arm64.py).
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from device_agent.bundle import load_bundle
from device_agent.device_models import DeviceModels
from device_agent.nmoe_local import preprocess
from export.arm64_check import ROOT, emulated_command, ensure_env

REBUILD = r'''
import json, platform, sys, time
from pathlib import Path
import numpy as np, onnx
from device_agent.bundle import load_bundle
from device_agent.model_build import read_weights
from device_agent.rebuild import NewWeights, rebuild_bundle
path = Path(sys.argv[1])
bundle = load_bundle(path)
def weights(role):
    w = read_weights(onnx.load_from_string(bundle.model_bytes(bundle.model(role, "fp32"))), role)
    return {k: v * np.float32(1.01) for k, v in w.items()}
start = time.perf_counter()
new = rebuild_bundle(path, bundle, NewWeights(weights("extractor"), weights("gate"), weights("expert")),
                     np.concatenate([bundle.samples()["images"]] * 4), model_version="v2", run_id="r", round_index=1)
print(json.dumps({"machine": platform.machine(), "seconds": time.perf_counter() - start,
                  "sha256": {e.file: e.sha256 for e in new.manifest.models}}))
'''


def rebuild(python: list[str], env: dict[str, str] | None, bundle: Path) -> dict:
    proc = subprocess.run([*python, "-c", REBUILD, str(bundle)], check=False, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_rebuild_under_emulated_aarch64_matches_x86(bundles_copy: Path, tmp_path: Path) -> None:
    python, env = emulated_command(ensure_env(), "cortex-a72")
    x86_dir, arm_dir = bundles_copy / "device-1", tmp_path / "device-1"
    arm_dir.mkdir()
    for f in x86_dir.iterdir():
        (arm_dir / f.name).write_bytes(f.read_bytes())
    x86 = rebuild([sys.executable], {"PYTHONPATH": str(ROOT)}, x86_dir)
    arm = rebuild(python, env, arm_dir)
    assert (x86["machine"], arm["machine"]) == ("x86_64", "aarch64")
    fp32 = {f for f in x86["sha256"] if ".fp32." in f}
    assert len(fp32) == 3 and all(x86["sha256"][f] == arm["sha256"][f] for f in fp32)  # the same bytes
    samples = load_bundle(x86_dir).samples()
    x = preprocess(samples["images"], load_bundle(x86_dir).manifest.input)
    on_x86, on_arm = (DeviceModels.open(load_bundle(d), "int8") for d in (x86_dir, arm_dir))
    for role in ("extractor", "gate", "expert"):
        inputs = x if role == "extractor" else samples["latent"]
        a, b = getattr(on_x86, role).run(inputs), getattr(on_arm, role).run(inputs)
        assert np.array_equal(a.argmax(axis=1), b.argmax(axis=1)) and np.abs(a - b).max() < 0.1, role
