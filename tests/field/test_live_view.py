"""`nmoe fleet watch` while a trial runs: the terminal view in tmux (capture-pane) and the live page in
headless Chromium (playwright-core), both checked against the trial's trial.json; and LiveFleet itself."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.process import BrokerOptions, RunningBroker, start_broker
from device_agent.wire.protocol import Caps, Presence
from device_agent.wire.telemetry import LatencyWindow, OnDeviceEval, Telemetry
from toolkit.fleet.live_state import LiveFleet
from toolkit.fleet.live_terminal import render

ROOT = Path(__file__).resolve().parents[2]
BROWSER = Path(__file__).parent / "browser"
NMOE = [sys.executable, "-m", "toolkit.cli"]


def telemetry(device: str, served: int, routing: dict[int, int], status: str = "serving", **kw: object) -> Telemetry:
    return Telemetry(device, 1, 1.0, 5.0, 10.0, "m1", status, {"expert": 2, "infer": served}, 3, served, {"busy": 1},
                     {}, LatencyWindow(4, 1.5, 2.5, 3.0), {"expert": 0, "infer": 1}, 12.5, 50 << 20, 0, 100, 200,
                     routing, **kw)  # type: ignore[arg-type]


def test_live_fleet_snapshot() -> None:
    fleet = LiveFleet("mqtt://x:1")
    caps = Caps(("onnxruntime",), ("fp32",), 8)
    fleet.presence("a", Presence("a", 0, "online", "m1", caps, 1.0))
    fleet.presence("b", Presence("b", 1, "online", "m2", caps, 1.0))
    fleet.telemetry(telemetry("a", 5, {0: 5, 1: 3}, eval=OnDeviceEval(4, 3)))
    fleet.telemetry(telemetry("b", 2, {1: 2}, status="drained"))
    fleet.presence("b", Presence.offline("b", 1))
    s = fleet.snapshot()
    assert s["online"] == 1 and s["devices_known"] == 2 and s["models"] == {"m1": ["a"]}
    a, b = s["devices"]
    assert (a["status"], a["served_infer"], a["errors_sent"], a["p95"], a["queue"], a["accuracy"]) == (
        "online", 5, 1, 2.5, 1, 75.0)
    assert b["status"] == "drained"  # offline presence + drained telemetry
    assert s["routing"] == {"experts": [0, 1], "matrix": {"a": [5, 3], "b": [0, 2]}}
    assert s["totals"] == {"served_infer": 7, "served_expert": 4, "errors_sent": 2, "errors_received": 0}
    text = render(s)
    assert text is not None


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[RunningBroker]:
    with start_broker(BrokerOptions(tmp_path / "fleet", port=0)) as running:
        yield running


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def start_web_watch(broker: RunningBroker, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`nmoe fleet watch --web 0 --no-terminal`; the process and its page's URL."""
    process = subprocess.Popen([*NMOE, "fleet", "watch", "--broker", broker.url, "--web", "0", "--no-terminal"],
                               stderr=log.open("wb"), stdout=subprocess.DEVNULL, env=env(), cwd=ROOT)
    end = time.monotonic() + 120
    while time.monotonic() < end:
        match = re.search(r"live page at (http://\S+)", log.read_text())
        if match:
            return process, match[1]
        assert process.poll() is None, log.read_text()
        time.sleep(0.2)
    raise AssertionError(f"no URL in {log.read_text()}")


class Tmux:
    """`nmoe fleet watch` in a detached tmux session."""

    def __init__(self, name: str, broker: RunningBroker) -> None:
        self.name = name
        command = " ".join([*NMOE, "fleet", "watch", "--broker", broker.url])
        subprocess.run(["tmux", "new-session", "-d", "-s", name, "-x", "200", "-y", "60",
                        f"cd {ROOT} && unset COLUMNS LINES && PYTHONPATH={ROOT} {command}"], check=True)

    def capture(self) -> str:
        return subprocess.run(["tmux", "capture-pane", "-p", "-t", self.name], capture_output=True, text=True,
                              check=True).stdout

    def wait_for(self, pattern: str, timeout_s: float) -> str:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            screen = self.capture()
            if re.search(pattern, screen):
                return screen
            time.sleep(0.25)
        raise AssertionError(f"{pattern!r} never showed; the screen:\n{self.capture()}")

    def close(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.name], check=False)


def rows(screen: str, first: str) -> dict[str, list[str]]:
    """The cells of the table rows of `screen` whose first cell starts with `first`, by that cell."""
    found = {}
    for line in screen.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃]", line)[1:-1]]
        if cells and cells[0].startswith(first):
            found.setdefault(cells[0], cells)  # the devices table comes first, the routing matrix second
    return found


def routing_rows(screen: str) -> dict[str, list[int]]:
    """The routing matrix's rows (the second table whose rows start with a device id)."""
    part = screen[screen.index("routing matrix"):]
    return {d: [int(x) for x in cells[1:]] for d, cells in rows(part, "device-").items()}


@pytest.mark.skipif(shutil.which("tmux") is None or not Path("/usr/bin/chromium").exists(),
                    reason="needs tmux and Debian's chromium (apt-get install tmux chromium)")
def test_the_live_views_show_the_trial_as_it_runs_and_end_on_trial_json_s_numbers(
        onnx_tflite_bundles: Path, tmp_path: Path, broker: RunningBroker) -> None:
    assert (BROWSER / "node_modules" / "playwright-core").is_dir(), "run `npm ci` in tests/field/browser"
    web, url = start_web_watch(broker, tmp_path / "web.log")
    tmux = Tmux(f"nmoe-watch-{os.getpid()}", broker)
    out = tmp_path / "trial"
    try:
        tmux.wait_for(r"nmoe fleet watch \S+  connected", 120)
        trial = subprocess.Popen([*NMOE, "trial", "--bundles", str(onnx_tflite_bundles), "--out", str(out), "--quiet",
                                  "--broker", broker.url, "--samples", "8", "--rate", "4"], env=env(), cwd=ROOT,
                                 stdout=(tmp_path / "trial.log").open("wb"), stderr=subprocess.STDOUT)
        during = tmux.wait_for(r"online 3/3", 180)  # the view follows the fleet while the trial runs
        assert trial.poll() is None, "the trial ended before the view showed its fleet online"
        assert re.search(r"│ device-0 +│ +0 +│ online", during), during
        assert trial.wait(300) == 0, (tmp_path / "trial.log").read_text()
        summary = json.loads((out / "trial.json").read_text())
        answered = {d: sum(r["device"] == d and r["status"] == "answered" for r in summary["requests"])
                    for d in summary["fleet"]["devices"]}
        total = sum(answered.values())
        screen = tmux.wait_for(rf"served: {total} inference requests", 60)
        shown = subprocess.run(["node", str(BROWSER / "live_page.mjs"), url, str(tmp_path / "page.png"), str(total),
                                "60000"], check=False, capture_output=True, text=True, timeout=180, cwd=BROWSER)
        assert shown.returncode == 0, shown.stderr
        page = json.loads(shown.stdout)
    finally:
        tmux.close()
        web.terminate()
        web.wait(30)
    matrix = summary["routing"]["matrix"]
    # the terminal: served per device, the routing matrix, offline after the trial stopped its agents
    devices = rows(screen, "device-")
    for device, n in answered.items():
        assert devices[device][2] == "offline" and devices[device][4] == str(n), devices[device]
        assert devices[device][10] == "0"  # no errors
    assert routing_rows(screen) == matrix
    # the page: the same numbers, and the screenshot shows them
    for device, n in answered.items():
        assert page["devices"][device]["served_infer"] == str(n)
        assert page["devices"][device]["errors_total"] == "0"
        experts = summary["routing"]["experts"]
        assert [int(page["routing"][device][str(e)]) for e in experts] == matrix[device]
    assert page["totals"]["served_infer"] == str(total) == str(summary["counts"]["answered"])
    assert page["online"] == "0" and int(re.search(r"#(\d+)", page["polls"])[1]) >= 2  # it kept polling
    png = (tmp_path / "page.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000


def test_watch_refuses_bad_options_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from toolkit.cli import main

    for argv, message in [(["--broker", "http://x"], "the scheme must be mqtt:// or mqtts://"),
                          (["--broker", "mqtt://127.0.0.1:1", "--no-terminal"], "--no-terminal needs --web PORT"),
                          (["--broker", "mqtt://127.0.0.1:1", "--username", "u"], "go together"),
                          (["--broker", "mqtt://127.0.0.1:1"], "cannot connect to the broker")]:
        assert main(["fleet", "watch", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("nmoe: error: ") and message in err[0], err
