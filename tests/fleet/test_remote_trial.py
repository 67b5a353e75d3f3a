"""`nmoe trial --remote`: a fleet the trial did not start (a broker with accounts and agents in their own
process groups, each with its own credentials), over a real mosquitto."""

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.accounts import fleet_accounts_from_bundles
from broker.process import BrokerOptions, RunningBroker, start_broker
from device_agent.bundle import load_bundle
from device_agent.device_models import model_version
from device_agent.wire.mqtt_transport import BrokerUrl, MqttSettings, MqttTransport
from device_agent.wire.protocol import Caps, Presence, Topics, decode_presence, encode_presence
from device_agent.wire.transport import ConnectionEvent
from toolkit.cli import main
from toolkit.fleet.agent_processes import AgentLaunch, AgentProcesses


@pytest.fixture
def broker(onnx_tflite_bundles: Path, tmp_path: Path) -> Iterator[RunningBroker]:
    """`nmoe broker --auth --bundles BUNDLES`: an account per device and the operator's."""
    options = BrokerOptions(tmp_path / "fleet", port=0, auth=True, accounts=fleet_accounts_from_bundles(onnx_tflite_bundles))
    with start_broker(options) as running:
        yield running


def start_agents(agents: AgentProcesses, bundles: Path, broker: RunningBroker, devices: list[str], logs: Path) -> None:
    """`nmoe agent` for each device, logged in with its own account."""
    for device in devices:
        login = broker.credentials[device]
        agents.start(AgentLaunch(device, ("--bundle", str(bundles / device), "--broker", broker.url, "--username",
                                          device, "--password-file", str(login.password_file)), logs / f"{device}.log"))


def remote_trial(bundles: Path, out: Path, broker: RunningBroker, *args: str) -> tuple[int, dict]:
    status = main(["trial", "--bundles", str(bundles), "--out", str(out), "--quiet", "--remote", "--broker",
                   broker.url, "--samples", "6", "--rate", "50", *args])
    return status, json.loads((out / "trial.json").read_text())


def test_a_remote_fleet_gives_local_nmoe_s_predictions_and_keeps_running(onnx_tflite_bundles: Path, tmp_path: Path,
                                                                        broker: RunningBroker) -> None:
    with AgentProcesses() as agents:
        start_agents(agents, onnx_tflite_bundles, broker, ["device-0", "device-1", "device-2"], tmp_path / "logs")
        status, summary = remote_trial(onnx_tflite_bundles, tmp_path / "t", broker, "--auth", "--fleet-dir",
                                       str(tmp_path / "fleet"))
        assert agents.exited() == {}  # the trial neither started nor stopped them
    assert status == 0
    counts, accuracy, exact = summary["counts"], summary["accuracy"]["overall"], summary["exactness"]
    assert counts["sent"] == counts["answered"] == 18 and counts["failed"] == counts["not_served"] == 0
    assert accuracy["accuracy"] == accuracy["in_process_accuracy"] == accuracy["in_process_accuracy_all"]
    assert exact["compared"] == exact["unverified"] == 18 and exact["mismatches"] == 0 and exact["exact"]
    assert exact["max_abs_prob_diff"] < 1e-6
    fleet = summary["fleet"]
    assert fleet["remote"] and fleet["absent"] == {} and fleet["pids"] == {} and fleet["broker_pids"] == []
    assert summary["latency_ms"]["end_to_end"]["all"]["n"] == 18
    assert not (tmp_path / "t" / "fleet").exists() and not (tmp_path / "t" / "logs").exists()  # started nothing


def wait_online(broker: RunningBroker, devices: set[str], timeout_s: float = 120) -> None:
    """Until each device's retained presence is online (as the operator sees it)."""
    online: set[str] = set()
    ready = threading.Event()

    def on_message(topic: str, payload: bytes) -> None:
        presence = decode_presence(payload) if payload else None
        if presence is not None and presence.status == "online":
            online.add(presence.device)
        if devices <= online:
            ready.set()

    login = broker.credentials["operator"]
    spy = MqttTransport(MqttSettings(BrokerUrl.parse(broker.url), "spy", "operator", login.password()))
    spy.subscribe(Topics().presence_filter())
    spy.connect(None, on_message, lambda event, detail: None)
    try:
        assert ready.wait(timeout_s), f"online: {sorted(online)}"
    finally:
        spy.close()


class Device:
    """A device that announces itself with another model version (with its own account)."""

    def __init__(self, broker: RunningBroker, device: str, expert: int, model: str) -> None:
        login, connected = broker.credentials[device], threading.Event()
        self.transport = MqttTransport(MqttSettings(BrokerUrl.parse(broker.url), f"default-{device}", device,
                                                    login.password()))
        self.transport.connect(None, lambda t, p: None,
                               lambda event, _: event == ConnectionEvent.CONNECTED and connected.set())
        assert connected.wait(10)
        presence = Presence(device, expert, "online", model, Caps(("onnxruntime",), ("fp32",), 32), time.time())
        self.transport.publish(Topics().presence(device), encode_presence(presence), qos=1, retain=True)


def test_devices_missing_or_on_another_model_are_reported_not_fed(onnx_tflite_bundles: Path, tmp_path: Path,
                                                                  broker: RunningBroker) -> None:
    other = Device(broker, "device-2", 2, "0" * 64)
    try:
        with AgentProcesses() as agents:
            start_agents(agents, onnx_tflite_bundles, broker, ["device-0"], tmp_path / "logs")
            wait_online(broker, {"device-0", "device-2"})
            operator = broker.credentials["operator"]
            status, summary = remote_trial(onnx_tflite_bundles, tmp_path / "t", broker, "--username", "operator",
                                           "--password-file", str(operator.password_file), "--online-timeout", "2")
    finally:
        other.transport.close()
    assert status == 1  # the fleet was not all there
    ours = model_version(load_bundle(onnx_tflite_bundles / "device-0"))[:12]
    assert summary["fleet"]["absent"] == {"device-1": "no presence within 2 s",
                                          "device-2": f"runs model 000000000000, not the bundles' {ours}"}
    rows = summary["requests"]
    assert all(r["status"] == "answered" for r in rows if r["device"] == "device-0")
    assert all(r["status"] == "not_served" and r["id"] == "" for r in rows if r["device"] != "device-0")
    assert summary["counts"]["answered"] == 6 and summary["counts"]["not_served"] == 12
    assert summary["counts"]["failed"] == 0
    text = (tmp_path / "t" / "report.html").read_text()
    assert "absent, not fed: device-1 (no presence within 2 s); device-2 (runs model 000000000000" in text


def test_a_remote_fleet_with_nobody_there_is_one_error_line(onnx_tflite_bundles: Path, tmp_path: Path,
                                                            broker: RunningBroker,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["trial", "--bundles", str(onnx_tflite_bundles), "--out", str(tmp_path / "t"), "--quiet", "--remote",
            "--broker", broker.url, "--auth", "--fleet-dir", str(tmp_path / "fleet"), "--online-timeout", "0.5"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [("nmoe: error: no device of the fleet can take part: device-0 no presence within 0.5 s; device-1 "
                   "no presence within 0.5 s; device-2 no presence within 0.5 s")]


@pytest.mark.parametrize(("args", "message"), [
    (["--remote"], "--remote drives agents that already run: give their broker with --broker URL"),
    (["--remote", "--broker", "mqtt://127.0.0.1:1", "--kill-device", "device-1", "--kill-after", "1"],
     "--kill-device: a --remote trial starts no agent, so it has none to kill"),
    (["--remote", "--broker", "mqtt://127.0.0.1:1", "--username", "u"], "--username and --password-file go together"),
    (["--broker", "mqtt://127.0.0.1:1", "--username", "u", "--password-file", "p"],
     "--username/--password-file log the driver in to a --remote fleet's broker"),
    (["--remote", "--broker", "mqtt://127.0.0.1:1", "--username", "u", "--password-file", "p", "--auth"],
     "--username/--password-file or --auth"),
    (["--remote", "--broker", "mqtt://127.0.0.1:1", "--restart-broker-after", "1"], "not with --broker"),
])
def test_what_a_remote_trial_refuses(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                     message: str) -> None:
    argv = ["trial", "--bundles", str(tmp_path / "bundles"), "--out", str(tmp_path / "t"), "--quiet", *args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nmoe: error: ") and message in err[0], err
