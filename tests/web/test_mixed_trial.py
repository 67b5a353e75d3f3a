"""`nmoe trial --web-devices 2`: the tiny fleet with its last two devices in headless Chromium and
one `nmoe agent` process, over mosquitto and the WebSocket bridge; one trial, one report."""

import json
from pathlib import Path

import pytest

from toolkit.cli import main


def _trial(bundles: Path, out: Path, *extra: str) -> dict:
    status = main(["trial", "--bundles", str(bundles), "--out", str(out), "--samples", "20", "--rate", "10",
                   "--web-devices", "2", "--quiet", *extra])
    summary = json.loads((out / "trial.json").read_text())
    assert status == 0, summary["failures"][:5]
    return summary


@pytest.mark.slow
def test_a_mixed_fleet_answers_everything_and_web_devices_predict_like_local_nmoe(onnx_tflite_bundles: Path,
                                                                                   tmp_path: Path) -> None:
    s = _trial(onnx_tflite_bundles, tmp_path, "--precision", "fp32")
    c = s["counts"]
    assert c["sent"] == c["answered"] == 60 and c["failed"] == 0
    assert s["fleet"]["options"]["web_devices"] == 2
    for device in ("device-1", "device-2"):  # the web devices
        exact = s["exactness"]["per_device"][device]
        assert exact["compared"] == 20 and exact["mismatches"] == 0 and exact["degraded"] == 0, exact
        assert exact["max_abs_prob_diff"] < 1e-5
        agent = s["agents"][device]
        assert agent["exit_status"] == 0 and agent["inferences"] > 0
        assert agent["counters"]["infer_server"]["answered"] == 20
    # every device asked its peers: the Python agent's requests reached the web experts and back
    served = {d: a["counters"]["expert_server"].get("answered", 0) for d, a in s["agents"].items()}
    assert all(n > 0 for n in served.values()), served
    assert all(r["path"] == "remote" for r in s["requests"])
    assert (tmp_path / "report.html").stat().st_size > 10_000


@pytest.mark.parametrize(("extra", "message"), [
    (["--web-devices", "4"], "--web-devices 4: the fleet has 3 devices"),
    (["--web-devices", "-1"], "--web-devices -1: the fleet has 3 devices"),
    (["--web-devices", "1", "--runtime", "tflite"], "onnxruntime-web: not with --runtime tflite"),
])
def test_unusable_web_device_options_are_one_clear_error(extra: list[str], message: str, onnx_tflite_bundles: Path,
                                                         tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trial", "--bundles", str(onnx_tflite_bundles), "--out", str(tmp_path), "--quiet", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nmoe: error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "trial.json").exists()  # refused before anything started


@pytest.mark.slow
def test_killing_a_web_device_mid_trial_fails_no_inference(onnx_tflite_bundles: Path, tmp_path: Path) -> None:
    s = _trial(onnx_tflite_bundles, tmp_path, "--kill-device", "device-2", "--kill-after", "1",
               "--auth", "--latent-encoding", "int8")
    c = s["counts"]
    assert c["failed"] == 0 and c["not_served"] > 0
    rows = s["requests"]
    assert all(r["status"] == "answered" for r in rows if r["device"] != "device-2")  # the live devices: all
    assert {r["status"] for r in rows if r["device"] == "device-2"} == {"answered", "not_served"}
    kill = s["timing"]["kills"][0]
    assert kill["device"] == "device-2" and kill["offline_after_ms"] is not None  # the broker published its will
    assert s["agents"]["device-2"]["exit_status"] == -9
    assert s["reroutes"]["inputs_rerouted"] > 0 or s["reroutes"]["experts_missing"]
