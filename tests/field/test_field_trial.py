"""`nmoe trial` in field conditions: emulated links, the drain command on a remote fleet, telemetry in
trial.json, and a link outage longer than the keep-alive, over a real mosquitto and `nmoe agent` processes."""

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.accounts import fleet_accounts_from_bundles
from broker.process import BrokerOptions, RunningBroker, start_broker
from device_agent.wire.mqtt_transport import BrokerUrl, MqttSettings, MqttTransport
from device_agent.wire.protocol import Topics, decode_presence
from device_agent.wire.tap import TappedTransport
from toolkit.cli import main
from toolkit.fleet.agent_processes import AgentLaunch, AgentProcesses
from toolkit.fleet.link import LinkSpec, Outage
from toolkit.fleet.link_proxy import LinkProxies
from toolkit.fleet.telemetry_collector import TelemetryCollector

DEVICES = ["device-0", "device-1", "device-2"]


def trial(bundles: Path, out: Path, *args: str) -> tuple[int, dict]:
    status = main(["trial", "--bundles", str(bundles), "--out", str(out), "--quiet", *args])
    return status, json.loads((out / "trial.json").read_text())


def test_a_trial_behind_emulated_links_pays_the_delay_and_reports_telemetry(onnx_tflite_bundles: Path,
                                                                           tmp_path: Path) -> None:
    status, summary = trial(onnx_tflite_bundles, tmp_path / "t", "--samples", "6", "--rate", "5",
                            "--link", "delay=25ms,jitter=5ms")
    assert status == 0 and summary["exactness"]["exact"] and summary["counts"]["answered"] == 18
    e2e = summary["latency_ms"]["end_to_end"]
    # a remote inference crosses its device's link 6 times (infer request, expert request, peer, its reply,
    # the reply back, the response), a local one twice: each crossing 20..30 ms
    assert e2e["remote"]["n"] == 0 or e2e["remote"]["median"] >= 6 * 20
    assert e2e["local"]["n"] == 0 or e2e["local"]["median"] >= 2 * 20
    assert e2e["all"]["median"] < 6 * 30 + 1500  # and no more than a loaded machine explains
    telemetry = summary["telemetry"]
    for device in DEVICES:
        reports = telemetry["per_device"][device]
        assert reports[-1]["final"] and [r["seq"] for r in reports] == list(range(len(reports)))
        answered = [r for r in summary["requests"] if r["device"] == device and r["status"] == "answered"]
        assert reports[-1]["served"]["infer"] == len(answered) == 6
        row = summary["routing"]["matrix"][device]
        assert reports[-1]["routing"] == {str(e): n for e, n in enumerate(row) if n}
        cost = telemetry["cost"][device]
        assert 0 < cost["share_pct"] < 100 and 0 < cost["feeding_share_pct"] < 100
        assert cost["feeding_mqtt_bytes"] < cost["mqtt_bytes"]
        assert telemetry["period_s"][device] == 10.0
    report = (tmp_path / "t" / "report.html").read_text()
    assert "Telemetry over time" in report and "telemetry share of MQTT bytes %" in report


@pytest.fixture
def broker(onnx_tflite_bundles: Path, tmp_path: Path) -> Iterator[RunningBroker]:
    """`nmoe broker --auth --bundles BUNDLES`: an account per device and the operator's."""
    accounts = fleet_accounts_from_bundles(onnx_tflite_bundles)
    with start_broker(BrokerOptions(tmp_path / "fleet", port=0, auth=True, accounts=accounts)) as running:
        yield running


class PresenceSpy:
    """Every presence status the operator sees, by device, in order."""

    def __init__(self, broker: RunningBroker, account: str = "operator") -> None:
        self.seen: dict[str, list[str]] = {}
        self.cond = threading.Condition()
        login = broker.credentials[account]
        self.tap = TappedTransport(MqttTransport(MqttSettings(BrokerUrl.parse(broker.url), "spy", account,
                                                               login.password())))
        self.telemetry = TelemetryCollector(Topics())
        self.telemetry.attach(self.tap)
        self.tap.subscribe(Topics().presence_filter(), qos=1)
        self.tap.connect(None, self._on_message, lambda *_: None)

    def _on_message(self, topic: str, payload: bytes) -> None:
        if payload:
            p = decode_presence(payload)
            with self.cond:
                self.seen.setdefault(p.device, []).append(p.status)
                self.cond.notify_all()

    def wait(self, device: str, status: str, after: int = 0, timeout_s: float = 120) -> int:
        """Until `device` has a presence `status` at an index >= `after`; that index."""
        def found() -> int | None:
            return next((i for i, s in enumerate(self.seen.get(device, [])) if i >= after and s == status), None)

        with self.cond:
            assert self.cond.wait_for(lambda: found() is not None, timeout_s), self.seen
            return found()  # type: ignore[return-value]


def test_drain_takes_a_device_out_of_a_remote_fleet_and_the_trial_resumes_it(onnx_tflite_bundles: Path,
                                                                            tmp_path: Path,
                                                                            broker: RunningBroker) -> None:
    with AgentProcesses() as agents:
        for device in DEVICES:
            login = broker.credentials[device]
            agents.start(AgentLaunch(device, ("--bundle", str(onnx_tflite_bundles / device), "--broker", broker.url,
                                              "--username", device, "--password-file", str(login.password_file),
                                              "--telemetry-period", "0.5"), tmp_path / "logs" / f"{device}.log"))
        status, summary = trial(onnx_tflite_bundles, tmp_path / "t", "--remote", "--broker", broker.url, "--auth",
                                "--fleet-dir", str(tmp_path / "fleet"), "--samples", "10", "--rate", "10",
                                "--drain-device", "device-1", "--drain-after", "0.3")
        spy = PresenceSpy(broker)
        try:
            spy.wait("device-1", "online")  # the trial ended the drain: it serves again
        finally:
            spy.tap.close()
        assert agents.exited() == {}
    assert status == 0  # a drained device's samples are not served, not failed
    counts = summary["counts"]
    assert counts["failed"] == 0 and counts["not_served"] >= 5 and counts["answered"] == 30 - counts["not_served"]
    (kill,) = summary["timing"]["kills"]
    assert kill["device"] == "device-1" and kill["offline_after_ms"] is not None
    rows = [r for r in summary["requests"] if r["device"] == "device-1"]
    assert all(r["status"] == "not_served" for r in rows if r["sent_s"] > kill["at_s"])
    drained = [r for r in summary["telemetry"]["per_device"]["device-1"] if r["status"] == "drained"]
    assert drained and drained[0]["at_s"] >= kill["at_s"]  # the device reports it, over telemetry


def test_an_outage_longer_than_the_keepalive_makes_the_broker_publish_the_will(onnx_tflite_bundles: Path,
                                                                              tmp_path: Path,
                                                                              broker: RunningBroker) -> None:
    spy = PresenceSpy(broker)
    url = BrokerUrl.parse(broker.url)
    login = broker.credentials["device-0"]
    try:
        with LinkProxies() as proxies, AgentProcesses() as agents:
            port = proxies.add("device-0", LinkSpec(outages=(Outage(0.0, 12.0),)), url.host, url.port)
            agents.start(AgentLaunch("device-0", ("--bundle", str(onnx_tflite_bundles / "device-0"), "--broker",
                                                  f"mqtt://127.0.0.1:{port}", "--username", "device-0",
                                                  "--password-file", str(login.password_file), "--keepalive", "2"),
                                     tmp_path / "device-0.log"))
            online = spy.wait("device-0", "online")
            proxies.start_clock()  # 12 s of silence from now: much more than 1.5 x 2 s
            started = time.monotonic()
            offline = spy.wait("device-0", "offline", online, timeout_s=30)
            will_after = time.monotonic() - started
            back = spy.wait("device-0", "online", offline, timeout_s=60)  # it reconnects once the link is back
            assert back > offline and agents.exited() == {}
            assert 2.5 <= will_after < 11.0, will_after  # the broker's keep-alive (3 s), not the outage's end (12 s)
            stats = proxies.stats()["device-0"]
            assert stats.held_by_outage >= 1 and stats.connections >= 2
    finally:
        spy.tap.close()


@pytest.mark.parametrize("args, message", [
    (["--link", "5g"], "unknown preset '5g'"),
    (["--link", "lte", "--remote", "--broker", "mqtt://127.0.0.1:1"], "--link/--link-file emulate the radio"),
    (["--drain-device", "device-1"], "--drain-device and --drain-after go together"),
    (["--drain-device", "device-7", "--drain-after", "1"], "--drain-device device-7: no such device"),
    (["--drain-device", "device-1", "--drain-after", "99"], "--drain-after 99 must be within the feeding"),
    (["--link-file", "missing.toml"], "--link-file missing.toml: cannot read it"),
])
def test_bad_field_options_are_one_error_line(onnx_tflite_bundles: Path, tmp_path: Path, args: list[str],
                                              message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trial", "--bundles", str(onnx_tflite_bundles), "--out", str(tmp_path / "t"), "--quiet",
                 *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nmoe: error: ") and message in err[0], err
