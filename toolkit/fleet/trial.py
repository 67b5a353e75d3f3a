"""`nmoe trial`: a local field trial of a fleet's bundles over a real MQTT broker.

The trial starts mosquitto (unless given a broker), one `nmoe agent` process per bundle, waits
until every agent is online, then feeds each device its own personalized test images at a fixed
rate from the driver's MQTT connection and records every answer (optionally killing an agent or
restarting the broker on the way). The last `arm64_devices` agents run as aarch64 programs under
qemu-user (`toolkit.arm64_env`): emulated Raspberry Pis in the fleet. Afterwards it computes the same samples in-process with
`LocalNMoE` and writes trial.json, events.jsonl and report.html (`toolkit.fleet.trial_report`).
Whatever happens, no agent or broker outlives `run_trial`.
"""

from __future__ import annotations

import shutil
import signal
import threading
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np

from broker.accounts import Device, FleetCredential
from broker.layout import FleetLayout
from broker.process import BrokerOptions, RunningBroker, start_broker
from device_agent.bundle import Bundle, BundleError, load_bundle
from device_agent.device_models import model_version
from device_agent.nmoe_local import LocalNMoE, Prediction
from device_agent.wire.events import EventLog
from device_agent.wire.mqtt_transport import BrokerUrl, MqttSettings, MqttTransport
from device_agent.wire.protocol import ProtocolError, Topics
from toolkit.arm64_env import Arm64EnvError, emulated_command, ensure_env
from toolkit.artifacts import ArtifactError, load_nmoe
from toolkit.federated_data import prepare, raw_images
from toolkit.fleet.agent_processes import AgentLaunch, AgentProcesses
from toolkit.fleet.trial_driver import OPERATOR, RequestStatus, TrialDriver, TrialError
from toolkit.fleet.trial_record import BrokerRestart, TrialFacts, TrialRecord, options_json
from toolkit.fleet.trial_report import write_outputs
from toolkit.fleet.trial_summary import TrialSummary, summarize
from toolkit.fleet.web_devices import fleet_processes, web_fleet_check
from toolkit.progress import progress_bar

ONLINE_TIMEOUT_S = 120.0  # ten agents importing onnxruntime on two cores take ~10 s
CONNECT_TIMEOUT_S = 10.0
RESTART_TIMEOUT_S = 30.0  # after a broker restart: for the driver to reconnect, then for every live agent
START_WITHIN = 2  # an agent must start a request within START_WITHIN x --deadline-ms ...
WAIT_SLACK_S = 0.5  # ... and the driver waits that, plus --deadline-ms for the peers, plus this
TRIAL_OUTPUTS = ("trial.json", "events.jsonl", "report.html", "events", "logs", "fleet")
ARM64_CPU = "cortex-a72"  # the emulated devices' CPU unless QEMU_CPU says otherwise: a Raspberry Pi 4


@dataclass(frozen=True)
class TrialOptions:
    """Everything `nmoe trial` can be told."""

    bundles: Path
    out: Path
    broker: str | None = None  # None: start mosquitto in OUT/fleet
    fleet_dir: Path | None = None  # --broker with --auth: where `nmoe broker` keeps the credentials
    samples: int = 50
    rate: float = 10.0  # requests per second per device
    auth: bool = False
    tls: bool = False  # the trial's own mosquitto is TLS-only, with a generated fleet CA
    tls_ca: Path | None = None  # with an mqtts:// --broker: the CA that verifies it (None: the system's) ...
    tls_cert: Path | None = None  # ... and a client certificate and key for the driver and every agent
    tls_key: Path | None = None
    prefix: str = "nmoe"  # topics {prefix}/{fleet}/...
    fleet: str = "default"  # the fleet id (also in the client ids)
    remote: bool = False  # the agents already run (on their devices): start nothing, feed those present
    username: str | None = None  # with remote: the driver's own login instead of --auth's operator
    password_file: Path | None = None
    online_timeout: float = ONLINE_TIMEOUT_S  # for every device's presence
    kill_device: str | None = None
    kill_after: float | None = None
    restart_broker_after: float | None = None  # seconds into the feeding; only with the trial's own broker
    latent_encoding: str = "fp32"
    precision: str | None = None  # None: fp32 when the bundles have it, else int8
    runtime: str = "onnx"
    deadline_ms: int = 1000
    arm64_devices: int = 0  # the last N agents before the web devices run as aarch64 programs under qemu-user ...
    arm64_cpu: str = ARM64_CPU  # ... emulating this CPU (QEMU_CPU)
    show_progress: bool = True
    web_devices: int = 0  # the last N devices run as web devices (android_demo/) in headless Chromium


@dataclass(frozen=True)
class Fleet:
    """The verified bundles of a trial, by device id in expert order, and where they came from."""

    bundles: dict[str, Bundle]
    precision: str
    run_dir: Path
    method: str

    @property
    def experts(self) -> dict[str, int]:
        return {d: b.manifest.expert_id for d, b in self.bundles.items()}


@dataclass(frozen=True)
class Samples:
    """One device's test images (raw uint8 [N, C, H, W]) and labels."""

    images: np.ndarray
    labels: np.ndarray


class StepKind(StrEnum):
    """What a step of the feeding plan does."""

    SEND = "send"  # send `device` its sample `index`
    KILL = "kill"  # SIGKILL the agent of `device`
    RESTART_BROKER = "restart_broker"  # stop the trial's mosquitto and start it again


@dataclass(frozen=True)
class Step:
    """At `at_s` seconds into the feeding (as planned), one action."""

    at_s: float
    kind: StepKind
    device: str | None = None  # None: a broker restart
    index: int | None = None  # a send's sample


@dataclass(frozen=True)
class TrialResult:
    """Where the outputs are, the summary, and whether the trial was interrupted."""

    out: Path
    summary: TrialSummary
    interrupted: bool

    @property
    def report(self) -> Path:
        return self.out / "report.html"


# setup -------------------------------------------------------------------------------------------


def check_options(options: TrialOptions) -> None:
    """TrialError (or BrokerUrlError) for options that cannot work together, before anything starts."""
    try:
        Topics(options.prefix, options.fleet)
    except ProtocolError as e:
        raise TrialError(f"--prefix/--fleet: {e}") from None
    _check_remote(options)
    _check_arm64(options)
    tls_files = {"--tls-ca": options.tls_ca, "--tls-cert": options.tls_cert, "--tls-key": options.tls_key}
    given = [flag for flag, path in tls_files.items() if path is not None]
    if options.broker is None:
        if given:
            raise TrialError(f"{given[0]} is for an mqtts:// --broker; the trial's own broker makes its CA and "
                             "certificates with --tls")
        return
    url = BrokerUrl.parse(options.broker)  # BrokerUrlError
    if options.restart_broker_after is not None:
        raise TrialError("--restart-broker-after restarts the trial's own mosquitto: not with --broker")
    if options.tls:
        raise TrialError("--tls makes the trial's own mosquitto TLS-only: with --broker, give an mqtts:// URL "
                         "(and --tls-ca)")
    if given and not url.tls:
        raise TrialError(f"{given[0]} needs an mqtts:// broker URL, got {options.broker}")
    if (options.tls_cert is None) != (options.tls_key is None):
        raise TrialError("--tls-cert and --tls-key go together")
    for flag, path in tls_files.items():
        if path is not None and not path.is_file():
            raise TrialError(f"{flag} {path}: no such file")


def _check_remote(options: TrialOptions) -> None:
    """--remote and the driver's own login: what they need and refuse."""
    if options.remote and options.broker is None:
        raise TrialError("--remote drives agents that already run: give their broker with --broker URL")
    if options.remote and options.kill_device is not None:
        raise TrialError("--kill-device: a --remote trial starts no agent, so it has none to kill")
    if (options.username is None) != (options.password_file is None):
        raise TrialError("--username and --password-file go together")
    if options.username is not None and not options.remote:
        raise TrialError("--username/--password-file log the driver in to a --remote fleet's broker; the agents a "
                         "local trial starts log in with --auth")
    if options.username is not None and options.auth:
        raise TrialError("--username/--password-file or --auth (the operator's password in --fleet-dir), not both")


def _check_arm64(options: TrialOptions) -> None:
    """--arm64-devices: what emulated agents cannot do."""
    if not options.arm64_devices:
        return
    if options.remote:
        raise TrialError("--arm64-devices starts emulated agents; a --remote trial starts none")
    if options.runtime == "executorch":
        raise TrialError("--arm64-devices with --runtime executorch: ExecuTorch's aarch64 Python bindings need torch, "
                         "which the emulated environment does not have; use onnx or tflite")


def load_fleet(options: TrialOptions) -> Fleet:
    """Verify every bundle of `options.bundles` (one fleet, one run, every expert present)."""
    folders = sorted(p for p in options.bundles.glob("device-*") if p.is_dir()) if options.bundles.is_dir() else []
    if not folders:
        raise TrialError(f"{options.bundles}: no device-*/ bundle folders here (write them with "
                         "`nmoe export RUN_DIR --out DIR`)")
    loaded = sorted((load_bundle(p) for p in folders), key=lambda b: b.manifest.expert_id)
    bundles = {b.manifest.device_id: b for b in loaded}
    origins = {(b.manifest.provenance.get("run_dir"), b.manifest.provenance.get("method"), model_version(b))
               for b in loaded}
    if len(origins) != 1 or len(bundles) != len(loaded):
        raise TrialError(f"{options.bundles}: the bundles come from different runs, methods or models, or "
                         "repeat a device id; export them together")
    run_dir, method, _ = origins.pop()
    if run_dir is None or method is None:
        raise TrialError(f"{options.bundles}: the manifests do not name the run they were exported from "
                         "(provenance.run_dir and provenance.method); the trial reads its test samples there")
    missing = sorted(set(range(loaded[0].manifest.num_experts)) - {b.manifest.expert_id for b in loaded})
    if missing:
        raise TrialError(f"{options.bundles}: no bundle holds expert(s) {missing}; a trial needs the whole fleet")
    if options.kill_device is not None and options.kill_device not in bundles:
        raise TrialError(f"--kill-device {options.kill_device}: no such device in {options.bundles} "
                         f"(devices: {', '.join(bundles)})")
    if options.arm64_devices and options.arm64_devices + options.web_devices > len(bundles):
        raise TrialError(f"--arm64-devices {options.arm64_devices}: the fleet in {options.bundles} has "
                         f"{len(bundles)} devices" + (f", {options.web_devices} of them web devices"
                                                      if options.web_devices else ""))
    return Fleet(bundles, _precision(loaded, options), Path(run_dir), str(method))


def _precision(bundles: list[Bundle], options: TrialOptions) -> str:
    """The requested precision, or fp32 when every bundle has it in the runtime's format, else int8."""
    if options.precision is not None:
        return options.precision
    try:
        for b in bundles:
            b.model("extractor", "fp32", options.runtime)
    except BundleError:
        return "int8"
    return "fp32"


def load_samples(fleet: Fleet, n: int) -> dict[str, Samples]:
    """The first n of each device's personalized test split (client = expert id), as raw pixels."""
    try:
        config = load_nmoe(fleet.run_dir, fleet.method).config
    except ArtifactError as e:
        raise TrialError(f"{e} (the bundles' manifests name it as provenance.run_dir; the trial reads the "
                         "test samples with its config)") from None
    data = prepare(config.data)
    samples = {}
    for device, bundle in fleet.bundles.items():
        test = data.personal_test[bundle.manifest.expert_id]
        samples[device] = Samples(raw_images(test.x[:n], bundle.manifest.input), test.y[:n].numpy())
    return samples


def feeding_plan(options: TrialOptions, samples: dict[str, Samples]) -> list[Step]:
    """Each device's samples at `rate` per second (devices staggered within a period), plus the kill and
    the broker restart (each before the sends planned at the same time)."""
    period, devices = 1 / options.rate, list(samples)
    steps = [Step(i * period + k * period / len(devices), StepKind.SEND, d, i)
             for k, d in enumerate(devices) for i in range(len(samples[d].labels))]
    feeding = (max(s.at_s for s in steps), max(len(s.labels) for s in samples.values()), options.rate)
    if options.kill_device is not None:
        steps.append(Step(_within("--kill-after", options.kill_after or 0.0, *feeding), StepKind.KILL,
                          options.kill_device))
    if options.restart_broker_after is not None:
        steps.append(Step(_within("--restart-broker-after", options.restart_broker_after, *feeding),
                          StepKind.RESTART_BROKER))
    return sorted(steps, key=lambda s: (s.at_s, s.kind == StepKind.SEND))


def _within(flag: str, at_s: float, duration: float, samples: int, rate: float) -> float:
    """`at_s`, or TrialError unless it lies within the feeding (0 <= at_s < duration)."""
    if not 0 <= at_s < duration:
        raise TrialError(f"{flag} {at_s:g} must be within the feeding, which lasts {duration:.2f} s "
                         f"({samples} samples at {rate:g}/s)")
    return at_s


def in_process(fleet: Fleet, samples: dict[str, Samples], runtime: str) -> dict[str, Prediction]:
    """The same samples through `LocalNMoE` (every expert in this process): the exact reference."""
    local = LocalNMoE({b.manifest.expert_id: b for b in fleet.bundles.values()}, fleet.precision, runtime)
    return {d: local.predict(b.manifest.expert_id, samples[d].images) for d, b in fleet.bundles.items()}


def prepare_out(out: Path) -> None:
    """Create OUT, removing the outputs of an earlier trial there."""
    out.mkdir(parents=True, exist_ok=True)
    for name in TRIAL_OUTPUTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    (out / "events").mkdir()


# the broker and the agents ------------------------------------------------------------------


@dataclass(frozen=True)
class BrokerAccess:
    """How the trial reaches its broker."""

    url: str
    credential: Callable[[str], FleetCredential]  # account -> how it logs in (password, TLS files)
    pid: int | None = None  # the mosquitto the trial started
    restart: Callable[[], int] | None = None  # restart the trial's mosquitto; its new pid (None: --broker)


class OwnBroker:
    """The trial's mosquitto, restartable on the same port with the same fleet dir, so its retained
    messages (persistence) and the credentials are kept; `stop` stops whichever one is running."""

    def __init__(self, options: BrokerOptions) -> None:
        self.running: RunningBroker = start_broker(options)

    def restart(self) -> int:
        """Stop it cleanly (SIGTERM: it saves its retained messages), start it again; the new pid."""
        self.running.stop()
        self.running = start_broker(replace(self.running.options, port=self.running.port))
        return self.running.process.pid

    def credential(self, account: str) -> FleetCredential:
        return self.running.credentials.get(account) or FleetCredential(account)

    def stop(self) -> None:
        self.running.stop()


@contextmanager
def fleet_broker(options: TrialOptions, fleet: Fleet, out: Path) -> Iterator[BrokerAccess]:
    """A mosquitto started in OUT/fleet (the running one is stopped on exit), or the given --broker with
    the passwords `nmoe broker --auth` keeps in its fleet dir and the --tls-* files."""
    if options.broker is not None:
        layout = FleetLayout.of(options.fleet_dir or Path("fleet"))
        yield BrokerAccess(options.broker, lambda account: _given_login(options, layout, account))
        return
    accounts = tuple(Device(d, e) for d, e in fleet.experts.items())
    broker = OwnBroker(BrokerOptions(out / "fleet", port=0, auth=options.auth, tls=options.tls, accounts=accounts,
                                     prefix=options.prefix, fleet=options.fleet))
    try:
        yield BrokerAccess(broker.running.url, broker.credential, broker.running.process.pid, broker.restart)
    finally:
        broker.stop()


def _given_login(options: TrialOptions, layout: FleetLayout, account: str) -> FleetCredential:
    """With --broker: the driver's --username/--password-file, or the account's password in --fleet-dir with
    --auth; and the --tls-* files."""
    tls = (options.tls_ca, options.tls_cert, options.tls_key)
    if account == OPERATOR and options.username is not None:
        return FleetCredential(options.username, options.password_file, *tls)
    return FleetCredential(account, _stored_password(layout, account) if options.auth else None, *tls)


def _stored_password(layout: FleetLayout, account: str) -> Path:
    path = layout.password(account)
    if not path.is_file():
        raise TrialError(f"{path} does not exist: with --broker and --auth, --fleet-dir must be the fleet dir of "
                         "`nmoe broker --auth --bundles BUNDLES` (default ./fleet)")
    return path


def emulated_devices(options: TrialOptions, devices: Collection[str]) -> list[str]:
    """The devices whose agents run under emulation: the last --arm64-devices before the --web-devices (in
    expert order)."""
    agents = list(devices)[:len(devices) - options.web_devices]
    return agents[len(agents) - options.arm64_devices:]


def arm64_cache(options: TrialOptions) -> Path | None:
    """With --arm64-devices, the emulated environment (built when missing, scripts/arm64_env.sh); else None."""
    if not options.arm64_devices:
        return None
    try:
        return ensure_env()
    except Arm64EnvError as e:
        raise TrialError(f"--arm64-devices: {e}") from None


def agent_launches(options: TrialOptions, fleet: Fleet, broker: BrokerAccess, out: Path,
                   arm64: Path | None = None) -> list[AgentLaunch]:
    """One `nmoe agent` per bundle, its events in OUT/events/<device>.jsonl, its log in OUT/logs/; the
    emulated devices' under the aarch64 Python of the `arm64` cache."""
    launches = []
    emulated = emulated_devices(options, fleet.bundles) if arm64 is not None else []
    for device, bundle in fleet.bundles.items():
        args = ["--bundle", str(bundle.path), "--broker", broker.url, "--runtime", options.runtime,
                "--precision", fleet.precision, "--latent-encoding", options.latent_encoding,
                "--deadline-ms", str(options.deadline_ms), "--prefix", options.prefix, "--fleet", options.fleet,
                "--events", str(out / "events" / f"{device}.jsonl"), *_login_args(broker.credential(device))]
        launch = AgentLaunch(device, tuple(args), out / "logs" / f"{device}.log")
        if arm64 is not None and device in emulated:
            python, env = emulated_command(arm64, options.arm64_cpu)
            launch = replace(launch, python=tuple(python), env=env)
        launches.append(launch)
    return launches


def _login_args(login: FleetCredential) -> list[str]:
    """`nmoe agent` options for what `login` holds: user name and password file, TLS files."""
    args = [] if login.password_file is None else ["--username", login.username, "--password-file",
                                                   str(login.password_file)]
    for flag, path in (("--tls-ca", login.ca_file), ("--tls-cert", login.cert_file), ("--tls-key", login.key_file)):
        args += [] if path is None else [flag, str(path)]
    return args


@contextmanager
def connected(driver: TrialDriver, url: str, login: FleetCredential, fleet: str) -> Iterator[TrialDriver]:
    """The driver connected to the broker (as `operator` with --auth); disconnected on exit."""
    password = None if login.password_file is None else login.password()
    settings = MqttSettings(BrokerUrl.parse(url), f"{fleet}-{OPERATOR}-trial",
                            None if password is None else login.username, password, login.ca_file, login.cert_file,
                            login.key_file)
    try:
        transport = MqttTransport(settings)
    except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
        raise TrialError(f"cannot use the TLS files {login.ca_file}, {login.cert_file}, {login.key_file}: {e}") from None
    try:  # a failed connect closes the transport too: it would retry in the background forever
        driver.connect(transport, CONNECT_TIMEOUT_S)
        yield driver
    finally:
        driver.close()


def absent_devices(driver: TrialDriver, devices: Collection[str], timeout_s: float) -> dict[str, str]:
    """A remote fleet: wait up to `timeout_s` for every device's presence; the devices that cannot take part (no
    presence, offline, another model version than the bundles') and why. TrialError when none can."""
    absent = {}
    for device, p in driver.wait_present(set(devices), timeout_s).items():
        if p is None or p.status != "online":
            absent[device] = f"no presence within {timeout_s:g} s" if p is None else "offline"
        elif p.model != driver.model_version:
            absent[device] = f"runs model {str(p.model)[:12]}, not the bundles' {driver.model_version[:12]}"
    if len(absent) == len(devices):
        raise TrialError("no device of the fleet can take part: " + "; ".join(f"{d} {why}" for d, why in absent.items()))
    return absent


def _check_alive(agents: AgentProcesses, when: str, killed: Collection[str] = ()) -> None:
    """TrialError naming an agent (not one the trial killed) that exited `when`, with the last line of its log."""
    exited = {d: status for d, status in agents.exited().items() if d not in killed}
    if exited:
        device, status = next(iter(exited.items()))
        raise TrialError(f"the agent of {device} exited with status {status} {when}: "
                         f"{_last_line(agents.logs[device])}")


def _last_line(path: Path) -> str:
    lines = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
    return lines[-1] if lines else f"(no output; see {path})"


# feeding -----------------------------------------------------------------------------------------


class Feeder:
    """Runs the feeding plan on the driver: sends, kills and broker restarts on time, expires late requests."""

    def __init__(self, driver: TrialDriver, agents: AgentProcesses | None, broker: BrokerAccess,
                 experts: dict[str, int], samples: dict[str, Samples], deadline_ms: int, bar: Any,
                 absent: Collection[str] = ()) -> None:
        """`agents`: the processes the trial started (None: a remote fleet); `absent`: devices not fed."""
        self.driver, self.agents, self.broker, self.experts, self.samples = driver, agents, broker, experts, samples
        self.deadline_ms, self.bar, self.absent = deadline_ms, bar, absent
        self.killed: dict[str, float] = {}  # device -> seconds into the feeding
        self.restarts: list[BrokerRestart] = []
        self.delay = 0.0  # how far the rest of the plan is shifted by the broker restarts' pauses

    def run(self, plan: list[Step]) -> float:
        """Feed every step, then wait for the last answers; the feeding's duration in seconds."""
        self.driver.start_clock()
        for step in plan:
            self._wait(step.at_s + self.delay)
            self._do(step)
        self._wait(None)
        return round(self.driver.elapsed(), 3)

    def _do(self, step: Step) -> None:
        match step:
            case Step(kind=StepKind.SEND, device=str(device), index=int(index)):
                self._send(device, index)
            case Step(kind=StepKind.KILL, device=str(device)):
                self._kill(device)
            case Step(kind=StepKind.RESTART_BROKER):
                self._restart_broker(step.at_s)

    def _send(self, device: str, index: int) -> None:
        s = self.samples[device]
        label = int(s.labels[index])
        if device in self.killed or device in self.absent:
            self.driver.skip(device, label, index, round(self.driver.elapsed(), 6))
            return
        ms = self.deadline_ms
        self.driver.send(device, self.experts[device], s.images[index], label, index,
                         START_WITHIN * ms, (START_WITHIN + 1) * ms / 1000 + WAIT_SLACK_S)

    def _kill(self, device: str) -> None:
        assert self.agents is not None, "check_options refuses --kill-device with --remote"
        pid, self.killed[device] = self.agents.pid(device), round(self.driver.elapsed(), 6)
        self.agents.kill(device)
        self.driver.events.emit("kill", device=device, pid=pid, at_s=self.killed[device])
        self.driver.abandon(RequestStatus.NOT_SERVED, device)

    def _restart_broker(self, planned_s: float) -> None:
        """Pause the feeding until the requests in flight are settled (no QoS 0 message crosses the outage),
        restart the broker, wait until the driver and every live agent are back, and shift the rest of
        the plan by the pause."""
        agents, restart_broker = self.agents, self.broker.restart
        assert restart_broker is not None and agents is not None, "check_options refuses it with --broker"
        self._wait(None)
        since, stopped = time.time(), time.monotonic()
        restart = BrokerRestart(round(self.driver.elapsed(), 6))
        self.restarts.append(restart)
        self.driver.events.emit("broker_restart", at_s=restart.at_s)
        restart.broker_pid = restart_broker()
        live = set(self.experts) - set(self.killed)
        try:
            restart.driver_reconnect_s = round(self.driver.wait_reconnected(stopped, RESTART_TIMEOUT_S), 3)
            self.driver.wait_online(live, since, RESTART_TIMEOUT_S,
                                    lambda: _check_alive(agents, "after the broker restart", self.killed))
        except TrialError as e:
            raise TrialError(f"the broker restart at {restart.at_s:.2f} s: {e}") from None
        restart.outage_s = round(time.monotonic() - stopped, 3)
        self.driver.events.emit("broker_back", **asdict(restart))
        self.delay = self.driver.elapsed() - planned_s

    def _wait(self, at_s: float | None) -> None:
        """Until `at_s` seconds into the feeding (None: until every request is settled), expiring late
        requests and moving the progress bar."""
        while True:
            self.driver.raise_if_stopped()
            self.driver.expire()
            self.bar.update(self.driver.done() - self.bar.n)
            if (self.driver.pending() == 0) if at_s is None else (self.driver.elapsed() >= at_s):
                return
            time.sleep(0.002)


# the whole trial ---------------------------------------------------------------------------------


@contextmanager
def stop_signals(driver: TrialDriver) -> Iterator[None]:
    """While the trial runs in the main thread, Ctrl-C (SIGINT) and SIGTERM ask the driver to stop: the
    next wait raises KeyboardInterrupt there, never inside a lock or a half-written event, and a signal
    during the shutdown that follows does not cut it short."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        driver.request_stop()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def run_trial(options: TrialOptions) -> TrialResult:
    """Run the trial and write its outputs (also, partially, after Ctrl-C or SIGTERM)."""
    check_options(options)
    fleet = load_fleet(options)
    web_fleet_check(options.web_devices, options.runtime, fleet.bundles)
    samples = load_samples(fleet, options.samples)
    plan = feeding_plan(options, samples)
    expected = in_process(fleet, samples, options.runtime)
    prepare_out(options.out)
    events = EventLog(options.out / "events.jsonl")
    events.emit("start", options=options_json(options), devices=fleet.experts, precision=fleet.precision)
    driver = TrialDriver(Topics(options.prefix, options.fleet), model_version(next(iter(fleet.bundles.values()))), events)
    facts = TrialFacts(planned=sum(s.kind == StepKind.SEND for s in plan))
    with stop_signals(driver):  # also while the outputs are written: a late signal must not lose them
        try:
            _run(options, fleet, samples, plan, driver, facts)
        except KeyboardInterrupt:
            facts.interrupted = True
        finally:
            events.emit("stop", interrupted=facts.interrupted)
            events.close()
        first = next(iter(fleet.bundles.values())).manifest
        record = TrialRecord(
            options, fleet.experts, first.num_experts, int(np.prod(first.input.shape)), fleet.precision,
            fleet.run_dir, fleet.method, driver.model_version, {d: s.labels for d, s in samples.items()}, expected,
            driver.requests, driver.presence_changes(), facts, driver.counters.snapshot(), options.out / "events")
        summary = summarize(record)
        write_outputs(summary, options.out)
    return TrialResult(options.out, summary, facts.interrupted)


def _run(options: TrialOptions, fleet: Fleet, samples: dict[str, Samples], plan: list[Step], driver: TrialDriver,
         facts: TrialFacts) -> None:
    """Broker, driver connection, agents, feeding; all stopped on the way out, in reverse order."""
    arm64 = arm64_cache(options)
    with ExitStack() as stack:
        broker = stack.enter_context(fleet_broker(options, fleet, options.out))
        facts.broker, facts.broker_pids = broker.url, [] if broker.pid is None else [broker.pid]
        stack.enter_context(connected(driver, broker.url, broker.credential(OPERATOR), options.fleet))
        if options.remote:
            since = time.time()
            facts.absent = absent_devices(driver, fleet.experts, options.online_timeout)
            facts.online_s = round(time.time() - since, 3)
            driver.events.emit("online", devices=sorted(set(fleet.bundles) - set(facts.absent)), absent=facts.absent,
                               after_s=facts.online_s)
            _feed(options, fleet, samples, plan, driver, None, broker, facts)
            return
        agents = stack.enter_context(fleet_processes(options.web_devices, fleet.bundles, options.out))
        since = time.time()
        for launch in agent_launches(options, fleet, broker, options.out, arm64):
            agents.start(launch)
        facts.pids = {d: agents.pid(d) for d in fleet.bundles}
        facts.emulated = {d: options.arm64_cpu for d in emulated_devices(options, fleet.bundles)}
        try:
            driver.wait_online(set(fleet.bundles), since, options.online_timeout,
                               lambda: _check_alive(agents, "before the trial started"))
            facts.online_s = round(time.time() - since, 3)
            driver.events.emit("online", devices=sorted(fleet.bundles), after_s=facts.online_s)
            _feed(options, fleet, samples, plan, driver, agents, broker, facts)
        finally:
            facts.exit_status = agents.stop()


def _feed(options: TrialOptions, fleet: Fleet, samples: dict[str, Samples], plan: list[Step], driver: TrialDriver,
          agents: AgentProcesses | None, broker: BrokerAccess, facts: TrialFacts) -> None:
    with progress_bar(facts.planned, "trial", "req", options.show_progress) as bar:
        feeder = Feeder(driver, agents, broker, fleet.experts, samples, options.deadline_ms, bar, set(facts.absent))
        try:
            facts.feeding_s = feeder.run(plan)
        finally:
            facts.killed, facts.broker_restarts = feeder.killed, feeder.restarts
            facts.broker_pids += [r.broker_pid for r in feeder.restarts if r.broker_pid is not None]
            driver.abandon(RequestStatus.INTERRUPTED)
