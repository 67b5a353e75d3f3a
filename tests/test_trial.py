"""`nmoe trial` end to end: real mosquitto, one `nmoe agent` process per bundle of the shared 3-device fleet."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from toolkit.cli import main
from toolkit.fleet.trial_summary import read_events

ROOT = Path(__file__).resolve().parent.parent


def trial(bundles: Path, out: Path, *args: str) -> tuple[int, dict]:
    """Run `nmoe trial` in-process; its exit status and trial.json."""
    status = main(["trial", "--bundles", str(bundles), "--out", str(out), "--quiet", *args])
    return status, json.loads((out / "trial.json").read_text())


def gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


def assert_nothing_left(summary: dict) -> None:
    assert all(gone(pid) for pid in [*summary["fleet"]["pids"].values(), *summary["fleet"]["broker_pids"]])


def test_trial_over_mqtt_predicts_exactly_like_local_nmoe(onnx_tflite_bundles: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "trial"
    status, summary = trial(onnx_tflite_bundles, out, "--samples", "10", "--rate", "50")
    assert status == 0
    assert f"report: {out / 'report.html'}" in capsys.readouterr().out
    counts, accuracy, exact = summary["counts"], summary["accuracy"]["overall"], summary["exactness"]
    assert counts["sent"] == counts["answered"] == 30 and counts["failed"] == counts["not_served"] == 0
    assert accuracy["accuracy"] == accuracy["in_process_accuracy"] == accuracy["in_process_accuracy_all"]
    assert exact["compared"] == 30 and exact["mismatches"] == 0 and exact["max_abs_prob_diff"] < 1e-6
    assert all(d["mismatches"] == 0 for d in exact["per_device"].values())
    rows = summary["requests"]
    assert all(r["path"] in ("local", "remote") and r["agent_ms"] > 0 and r["rtt_ms"] >= r["agent_ms"] for r in rows)
    assert summary["latency_ms"]["end_to_end"]["all"]["n"] == 30
    assert summary["bytes"]["raw_input"] == 16 * 16 and summary["bytes"]["between_agents_per_inference"]["all"] > 0
    assert summary["bytes"]["app_request"] < 2 * 16 * 16  # the agents list protocol 2: pixels as uint8, not fp16
    assert sum(map(sum, summary["routing"]["matrix"].values())) == sum(len(r["answered"]) for r in rows)
    skipped = sum(a["counters"]["agent"]["zero_weight_skipped"] for a in summary["agents"].values())
    assert summary["reroutes"]["zero_weight_skipped"] == skipped  # every inference event, as the agents counted
    assert all(a["exit_status"] == 0 and a["inferences"] > 0 for a in summary["agents"].values())
    kinds = [json.loads(line)["event"] for line in (out / "events.jsonl").read_text().splitlines()]
    assert kinds[0] == "start" and kinds[-1] == "stop" and "online" in kinds
    assert kinds.count("request") == kinds.count("answer") == 30
    assert sorted(p.name for p in (out / "events").iterdir()) == [f"device-{i}.jsonl" for i in range(3)]
    page = (out / "report.html").read_text()
    sources = re.findall(r"(?:src|href)=['\"]([^'\"]*)", page)
    figures = 5 + bool(any(summary["telemetry"]["per_device"].values()))  # + telemetry over time, if any arrived
    assert len(sources) == figures and all(s.startswith("data:image/png;base64,") for s in sources)  # self-contained
    assert_nothing_left(summary)


def test_killed_device_is_not_served_and_the_others_reroute(onnx_tflite_bundles: Path, tmp_path: Path) -> None:
    status, summary = trial(onnx_tflite_bundles, tmp_path / "kill", "--samples", "10", "--rate", "10",
                            "--kill-device", "device-1", "--kill-after", "0.45", "--deadline-ms", "300")
    assert status == 0
    kill, = summary["timing"]["kills"]
    assert kill["device"] == "device-1" and kill["offline_after_ms"] is not None
    rows = summary["requests"]
    assert summary["counts"]["failed"] == 0 and summary["failures"] == []
    assert {r["device"] for r in rows if r["status"] == "not_served"} == {"device-1"}
    assert summary["counts"]["not_served"] >= 4
    assert all(r["status"] == "answered" for r in rows if r["device"] != "device-1")
    offline_at = kill["at_s"] + kill["offline_after_ms"] / 1000
    later = [r for r in rows if r["device"] != "device-1" and r["sent_s"] > offline_at + 0.05]
    assert later and all(1 not in r["answered"] for r in later)  # nobody asks the dead expert
    assert summary["exactness"]["mismatches_intact"] == 0
    assert summary["agents"]["device-1"]["exit_status"] == -signal.SIGKILL
    assert_nothing_left(summary)


def test_auth_trial_runs_with_per_device_accounts(onnx_tflite_bundles: Path, tmp_path: Path) -> None:
    out = tmp_path / "auth"
    status, summary = trial(onnx_tflite_bundles, out, "--auth", "--samples", "4", "--rate", "50",
                            "--runtime", "tflite", "--precision", "int8", "--latent-encoding", "int8")
    assert status == 0 and summary["counts"]["answered"] == 12 and summary["fleet"]["auth"]
    assert "acl_file" in (out / "fleet" / "mosquitto.conf").read_text()
    log = (out / "logs" / "device-0.log").read_text()
    assert "connect device=device-0" in log and "refused" not in log
    assert_nothing_left(summary)


def test_broker_restart_mid_trial_agents_reconnect_and_the_trial_completes(onnx_tflite_bundles: Path,
                                                                          tmp_path: Path) -> None:
    out = tmp_path / "restart"
    status, summary = trial(onnx_tflite_bundles, out, "--samples", "20", "--rate", "10",
                            "--restart-broker-after", "1")
    assert status == 0
    counts, exact = summary["counts"], summary["exactness"]
    assert counts["sent"] == counts["answered"] == 60 and counts["failed"] == 0
    assert exact["compared"] == 60 and exact["mismatches"] == 0
    restart, = summary["timing"]["broker_restarts"]
    assert 0 < restart["driver_reconnect_s"] <= restart["outage_s"]
    first, second = summary["fleet"]["broker_pids"]
    assert first != second == restart["broker_pid"]
    restarted_at = next(e["ts"] for e in read_events(out / "events.jsonl") if e["event"] == "broker_restart")
    for device in summary["fleet"]["devices"]:
        agent_events = read_events(out / "events" / f"{device}.jsonl")
        assert any(e["event"] == "reconnect" and e["ts"] > restarted_at for e in agent_events), device
    later = [r for r in summary["requests"] if r["sent_s"] > restart["at_s"]]
    assert len(later) == 30 and all(r["status"] == "answered" for r in later)  # samples 10..19 of each device
    assert min(r["sent_s"] for r in later) > restart["at_s"] + restart["outage_s"] - 0.001  # waited (ms rounding)
    assert "broker restarted at" in (out / "report.html").read_text()
    assert_nothing_left(summary)


@pytest.mark.parametrize("args, message", [
    (["--bundles", "/nonexistent/bundles"], "no device-*/ bundle folders"),
    (["--kill-device", "device-7", "--kill-after", "1"], "--kill-device device-7: no such device"),
    (["--kill-device", "device-1"], "--kill-device and --kill-after go together"),
    (["--kill-device", "device-1", "--kill-after", "60"], "must be within the feeding"),
    (["--broker", "http://example.com"], "bad broker URL"),
    (["--broker", "mqtt://127.0.0.1:1"], "cannot reach the broker (nothing answers at 127.0.0.1:1); is it running?"),
    (["--broker", "mqtt://127.0.0.1:1", "--restart-broker-after", "1"], "not with --broker"),
    (["--restart-broker-after", "60"], "--restart-broker-after 60 must be within the feeding"),
])
def test_bad_input_is_one_clear_error(onnx_tflite_bundles: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      args: list[str], message: str) -> None:
    argv = ["trial", "--bundles", str(onnx_tflite_bundles), "--out", str(tmp_path / "t"), "--quiet", *args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nmoe: error:") and message in err[0]


def test_sigint_then_sigterm_stop_everything_cleanly_and_keep_partial_results(onnx_tflite_bundles: Path, tmp_path: Path) -> None:
    out = tmp_path / "interrupted"
    trial_process = subprocess.Popen(
        [sys.executable, "-m", "toolkit.cli", "trial", "--bundles", str(onnx_tflite_bundles), "--out", str(out),
         "--samples", "100", "--rate", "5", "--quiet"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        events = out / "events.jsonl"
        deadline = time.monotonic() + 60
        while '"answer"' not in (events.read_text() if events.exists() else "") and time.monotonic() < deadline:
            time.sleep(0.1)
        trial_process.send_signal(signal.SIGINT)
        time.sleep(0.3)
        if trial_process.poll() is None:  # a second signal during the shutdown must not cut it short
            trial_process.send_signal(signal.SIGTERM)
        stdout, stderr = trial_process.communicate(timeout=90)  # agents' stop, broker stop, report under load
    finally:
        if trial_process.poll() is None:
            trial_process.kill()
    assert trial_process.returncode == 130, stderr
    summary = json.loads((out / "trial.json").read_text())
    assert summary["timing"]["interrupted"] and 0 < summary["counts"]["answered"] < 300
    assert summary["counts"]["not_sent"] > 0 and "report:" in stdout and "interrupted" in stderr
    assert all(a["exit_status"] == 0 for a in summary["agents"].values())  # SIGTERM: a clean stop
    assert_nothing_left(summary)
    assert os.path.exists(out / "report.html")
