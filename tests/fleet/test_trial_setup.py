"""What `nmoe trial` checks before it starts anything."""

import json
import shutil
import sys
from pathlib import Path

import pytest

from broker.accounts import FleetCredential
from toolkit.arm64_env import QEMU, ROOT
from toolkit.cli import main
from toolkit.fleet.trial import (
    BrokerAccess,
    TrialError,
    TrialOptions,
    agent_launches,
    emulated_devices,
    load_fleet,
)


def test_bundles_that_do_not_name_their_run_are_one_clear_error(onnx_tflite_bundles: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    bundles = tmp_path / "bundles"
    for src in sorted(onnx_tflite_bundles.glob("device-*")):
        dst = shutil.copytree(src, bundles / src.name)
        manifest = json.loads((dst / "manifest.json").read_text())
        del manifest["provenance"]["run_dir"]
        (dst / "manifest.json").write_text(json.dumps(manifest))
    assert main(["trial", "--bundles", str(bundles), "--out", str(tmp_path / "t"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [(f"nmoe: error: {bundles}: the manifests do not name the run they were exported from "
                   "(provenance.run_dir and provenance.method); the trial reads its test samples there")]


def test_the_last_arm64_devices_run_under_qemu_with_the_cached_aarch64_python(onnx_tflite_bundles: Path,
                                                                              tmp_path: Path) -> None:
    options = TrialOptions(onnx_tflite_bundles, tmp_path, arm64_devices=2, arm64_cpu="cortex-a76")
    cache = tmp_path / "arm64"
    launches = agent_launches(options, load_fleet(options), BrokerAccess("mqtt://127.0.0.1:1", FleetCredential),
                              tmp_path, cache)
    native, *emulated = launches
    assert (native.device, native.python, native.env) == ("device-0", (sys.executable,), None)
    assert [launch.device for launch in emulated] == ["device-1", "device-2"]
    for launch in emulated:
        sysroot = cache / "sysroot"
        assert launch.python == (QEMU, "-L", str(sysroot), str(sysroot / "usr" / "bin" / "python3.11"))
        assert launch.env is not None and launch.env["QEMU_CPU"] == "cortex-a76"
        assert launch.env["PYTHONPATH"] == f"{cache / 'site-packages'}:{ROOT}"
        assert launch.args == tuple(a.replace("device-0", launch.device) for a in native.args)
    without = agent_launches(options, load_fleet(options), BrokerAccess("mqtt://127.0.0.1:1", FleetCredential),
                             tmp_path)
    assert all(launch.python == (sys.executable,) for launch in without)  # no cache given: nothing emulated


def test_more_arm64_devices_than_the_fleet_has_is_one_clear_error(onnx_tflite_bundles: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["trial", "--bundles", str(onnx_tflite_bundles), "--out", str(tmp_path / "t"), "--quiet",
            "--arm64-devices", "4"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"nmoe: error: --arm64-devices 4: the fleet in {onnx_tflite_bundles} has 3 devices"]


def test_emulated_devices_come_before_the_web_devices(onnx_tflite_bundles: Path, tmp_path: Path) -> None:
    devices = ["device-0", "device-1", "device-2", "device-3"]
    placed = {(arm64, web): emulated_devices(TrialOptions(tmp_path, tmp_path, arm64_devices=arm64, web_devices=web),
                                             devices) for arm64, web in ((0, 0), (2, 0), (1, 1), (2, 2), (0, 4))}
    assert placed == {(0, 0): [], (2, 0): ["device-2", "device-3"], (1, 1): ["device-2"],
                      (2, 2): ["device-0", "device-1"], (0, 4): []}
    with pytest.raises(TrialError, match=r"--arm64-devices 2: the fleet in .* has 3 devices, 2 of them web devices"):
        load_fleet(TrialOptions(onnx_tflite_bundles, tmp_path, arm64_devices=2, web_devices=2))
