"""Web devices (`android_demo/`) in headless Chromium, next to `nmoe agent` processes.

`WebDevices` runs one Node process (`android_demo/scripts/web-devices.mjs`, playwright-core) that
drives one Debian Chromium with a page per device. The pages load the built app from a WebSocket
bridge (`broker.websocket_bridge`, started here and pointed at the fleet's broker), verify their
bundle (served by the bridge from the bundles' folder), and join the fleet over MQTT-over-WebSockets
like a phone would. `WebDevices.start` takes the same `AgentLaunch` as an `nmoe agent` process
(`--bundle`, `--broker`, credentials, `--precision`, `--latent-encoding`, `--deadline-ms`,
`--max-batch`, `--queue`, `--no-microbatch`, `--prefix`, `--fleet`, `--events`, and for federated
training `--data FILE`; `--state` and `--trainer` are ignored: a page keeps its
training state in memory and trains Stages 2-3 in TypeScript), so `MixedFleet` can run the last N
devices of a trial in the browser with no other change to the trial: one fleet, one trial, one report.
"""

from __future__ import annotations

import json
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any, Self

from broker.child_process import dies_with_parent
from broker.websocket_bridge import APP_DIR, BridgeOptions, RunningBridge, start_bridge
from device_agent.wire.mqtt_transport import BrokerUrl
from toolkit.fleet.agent_processes import AgentLaunch, AgentProcesses
from toolkit.fleet.trial_driver import TrialError

DEMO_DIR = APP_DIR.parent
RUNNER = DEMO_DIR / "scripts" / "web-devices.mjs"
CHROMIUM = "/usr/bin/chromium"
START_TIMEOUT_S = 60.0
EVAL_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
KILLED = -9  # the exit status reported for a page closed by `kill` (as for a SIGKILLed agent)
FAILED = 2  # a page that refused to start (as `nmoe agent` exits 2 for a bundle that does not verify)


def check_web_setup() -> None:
    """TrialError naming what is missing to run web devices on this machine."""
    if shutil.which("node") is None:
        raise TrialError("web devices need Node.js: apt-get install nodejs npm (scripts/setup.sh does it)")
    if not Path(CHROMIUM).exists():
        raise TrialError(f"web devices need Chromium at {CHROMIUM}: apt-get install chromium (scripts/setup.sh does it)")
    if not (DEMO_DIR / "node_modules" / "playwright-core").is_dir() or not (APP_DIR / "app.js").is_file():
        raise TrialError(f"the web device is not built: cd {DEMO_DIR} && npm ci && npm run build "
                         "(scripts/setup.sh does it)")


def last_devices(devices: Iterable[str], n: int) -> list[str]:
    """The last `n` devices (in expert order): the ones a trial runs in the browser."""
    ordered = list(devices)
    if not 0 <= n <= len(ordered):
        raise TrialError(f"--web-devices {n}: the fleet has {len(ordered)} devices")
    return ordered[len(ordered) - n:]


def web_fleet_check(web: int, runtime: str, devices: Iterable[str]) -> list[str]:
    """The devices to run in the browser (the last `web`), or TrialError before anything starts."""
    chosen = last_devices(devices, web)
    if chosen and runtime != "onnx":
        raise TrialError(f"--web-devices runs ONNX models in onnxruntime-web: not with --runtime {runtime}")
    if chosen:
        check_web_setup()
    return chosen


def fleet_processes(web: int, devices: Iterable[str], work_dir: Path) -> AgentProcesses:
    """The trial's devices: `nmoe agent` processes, the last `web` of them web devices in Chromium."""
    return MixedFleet(last_devices(devices, web), work_dir) if web else AgentProcesses()


def _option(args: tuple[str, ...], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


class WebDevices:
    """Pages in one headless Chromium, each a web device; the `AgentProcesses` interface."""

    def __init__(self, work_dir: Path, logs: dict[str, Path] | None = None, host: str = "127.0.0.1") -> None:
        """`host`: where the bridge serves the page; a LAN address loads it as a phone on the network does
        (plain http:// beyond loopback: not a secure context, so no WebCrypto)."""
        check_web_setup()
        self.work_dir, self.host = work_dir, host
        self.logs = {} if logs is None else logs  # device -> its log (shared with the agents' in a MixedFleet)
        self.bridge: RunningBridge | None = None
        self._bundles_dir: Path | None = None
        self._opened: list[str] = []
        self._status: dict[str, int] = {}  # device -> exit status once it failed, closed or was killed
        self._online: set[str] = set()
        self._errors: dict[str, str] = {}
        self._results: dict[int, queue.Queue[dict[str, Any]]] = {}
        self._cond = threading.Condition()
        self._ids = 0
        self._profile = tempfile.TemporaryDirectory(prefix="nmoe-chromium-")
        self._lock = threading.Lock()
        self._node: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    # the AgentProcesses interface ------------------------------------------------------------------

    def start(self, launch: AgentLaunch) -> None:
        """Open a page for `launch.device` with the options an `nmoe agent` would get."""
        args = launch.args
        bundle = Path(_option(args, "--bundle") or "").resolve()
        broker = _option(args, "--broker")
        if broker is None or not (bundle / "manifest.json").is_file():
            raise TrialError(f"{launch.device}: a web device needs --bundle DIR and --broker URL")
        self._ensure_running(BrokerUrl.parse(broker), bundle.parent)
        assert self.bridge is not None
        password_file = _option(args, "--password-file")
        config: dict[str, Any] = {
            "broker": self.bridge.url, "bundle": f"{self.bridge.page_url}bundles/{bundle.name}/",
            "latentEncoding": _option(args, "--latent-encoding") or "fp32",
            "deadlineMs": int(_option(args, "--deadline-ms") or 1000),
        }
        for flag, key in (("--precision", "precision"), ("--username", "username"), ("--prefix", "prefix"),
                          ("--fleet", "fleet")):
            if (value := _option(args, flag)) is not None:
                config[key] = value
        for flag, key in (("--max-batch", "maxBatch"), ("--queue", "queueSize")):
            if (value := _option(args, flag)) is not None:
                config[key] = int(value)
        if "--no-microbatch" in args:
            config["microbatch"] = False
        if password_file is not None:
            config["password"] = Path(password_file).read_text().strip()
        command: dict[str, Any] = {}
        if (data := _option(args, "--data")) is not None:  # the page fetches it from a URL the runner answers
            config["data"] = f"{self.bridge.page_url}nmoe-data/{launch.device}.npz"
            command["dataFile"] = str(Path(data).resolve())
        events = Path(_option(args, "--events") or self.work_dir / "events" / f"{launch.device}.jsonl")
        self.logs[launch.device] = launch.log
        self._opened.append(launch.device)
        launch.log.parent.mkdir(parents=True, exist_ok=True)
        self._send({"cmd": "open", "device": launch.device, "url": self.bridge.page_url, "config": config,
                    "events": str(events), "log": str(launch.log), **command})

    def pid(self, device: str) -> int:
        """The Node process driving the pages (a page has no pid of its own)."""
        assert self._node is not None
        return self._node.pid

    def exited(self) -> dict[str, int]:
        """Pages that failed to start or closed by themselves: device -> status."""
        with self._cond:
            return dict(self._status)

    def kill(self, device: str) -> None:
        """Close the page abruptly: its WebSocket drops without a DISCONNECT, so the broker publishes its will."""
        with self._cond:
            self._status[device] = KILLED
        self._send({"cmd": "kill", "device": device})

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> dict[str, int]:
        """Every page leaves cleanly (offline presence, counters), then Chromium, Node and the bridge stop."""
        try:
            if self._node is not None and self._node.poll() is None:
                try:
                    self._send({"cmd": "stop"})
                    self._node.wait(timeout_s)
                except (subprocess.TimeoutExpired, BrokenPipeError, OSError):
                    self._node.kill()
                    self._node.wait()
        finally:
            if self.bridge is not None:
                self.bridge.stop()
            self._profile.cleanup()
        with self._cond:
            return {d: self._status.get(d, 0) for d in self._opened}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # for tests and benchmarks ----------------------------------------------------------------------

    def wait_online(self, devices: Collection[str], timeout_s: float = START_TIMEOUT_S) -> None:
        """Wait until every page in `devices` is connected; TrialError naming a page that failed."""
        end = time.monotonic() + timeout_s
        with self._cond:
            while not set(devices) <= self._online:
                failed = {d: self._errors.get(d, f"status {s}") for d, s in self._status.items() if d in devices}
                if failed:
                    device, error = next(iter(failed.items()))
                    raise TrialError(f"web device {device}: {error}")
                left = end - time.monotonic()
                if left <= 0:
                    raise TrialError(f"web devices {sorted(set(devices) - self._online)} not online within {timeout_s:.0f} s")
                self._cond.wait(min(left, 0.5))

    def error(self, device: str) -> str | None:
        """Why a page refused to start (its one-line message), if it did."""
        with self._cond:
            return self._errors.get(device)

    def evaluate(self, device: str, script: str, timeout_s: float = EVAL_TIMEOUT_S) -> Any:
        """Run `script` (an async function body; `return` gives the value) in the device's page."""
        with self._lock:
            self._ids += 1
            request_id = self._ids
            self._results[request_id] = queue.Queue()
        self._send({"cmd": "eval", "id": request_id, "device": device, "script": script})
        try:
            answer = self._results[request_id].get(timeout=timeout_s)
        except queue.Empty:
            raise TrialError(f"web device {device}: no answer within {timeout_s:.0f} s") from None
        finally:
            self._results.pop(request_id, None)
        if "error" in answer:
            raise TrialError(f"web device {device}: {answer['error']}")
        return answer.get("value")

    # internals ----------------------------------------------------------------------------------

    def _ensure_running(self, broker: BrokerUrl, bundles_dir: Path) -> None:
        """Start the bridge (to `broker`, serving `bundles_dir`) and the Node runner, once."""
        if self._node is not None:
            if bundles_dir != self._bundles_dir:
                raise TrialError(f"web devices serve one bundles folder ({self._bundles_dir}), not also {bundles_dir}")
            return
        if broker.tls:
            raise TrialError("web devices in a trial reach the broker through a plain ws:// bridge: not with mqtts://")
        self._bundles_dir = bundles_dir
        self.bridge = start_bridge(BridgeOptions((broker.host, broker.port), self.host, bundles_dir=bundles_dir),
                                   self.work_dir / "logs" / "websocket-bridge.log")
        self._node = subprocess.Popen(
            dies_with_parent(["node", str(RUNNER), self._profile.name]), cwd=DEMO_DIR, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=(self.work_dir / "logs" / "web-devices.log").open("ab"), text=True,
            bufsize=1, process_group=0)
        self._reader = threading.Thread(target=self._read, name="web-devices", daemon=True)
        self._reader.start()

    def _send(self, command: dict[str, Any]) -> None:
        assert self._node is not None and self._node.stdin is not None
        with self._lock:
            self._node.stdin.write(json.dumps(command) + "\n")
            self._node.stdin.flush()

    def _read(self) -> None:
        """The runner's answers, on this thread."""
        assert self._node is not None and self._node.stdout is not None
        for line in self._node.stdout:
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                continue
            event, device = msg.get("event"), msg.get("device")
            if event == "result":
                waiting = self._results.get(msg.get("id"))
                if waiting is not None:
                    waiting.put(msg)
                continue
            with self._cond:
                if event == "online":
                    self._online.add(device)
                elif event == "failed":
                    self._errors[device] = msg.get("error", "failed")
                    self._status.setdefault(device, FAILED)
                elif event == "closed":
                    self._status.setdefault(device, 1)
                self._cond.notify_all()


class MixedFleet(AgentProcesses):
    """`nmoe agent` processes, except for the devices in `web`, which run as web devices."""

    def __init__(self, web: Collection[str], work_dir: Path) -> None:
        super().__init__()
        self.web_devices = set(web)
        self.web = WebDevices(work_dir, self.logs)

    def start(self, launch: AgentLaunch) -> None:
        (self.web.start if launch.device in self.web_devices else super().start)(launch)

    def pid(self, device: str) -> int:
        return self.web.pid(device) if device in self.web_devices else super().pid(device)

    def exited(self) -> dict[str, int]:
        return {**super().exited(), **self.web.exited()}

    def kill(self, device: str) -> None:
        (self.web.kill if device in self.web_devices else super().kill)(device)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> dict[str, int]:
        try:
            agents = super().stop()
        finally:
            web = self.web.stop(timeout_s)
        return {**agents, **web}
