"""`nmoe trial --tls`, `--tls-ca/--tls-cert/--tls-key`, `--prefix`, `--fleet`: end to end over mosquitto,
bad combinations as one error line, and what --help promises about the exactness check."""

import json
import threading
from pathlib import Path

import pytest

from broker.process import BrokerOptions, start_broker
from device_agent.wire.mqtt_transport import BrokerUrl, MqttSettings, MqttTransport
from device_agent.wire.transport import ConnectionEvent
from toolkit.cli import main


def trial(bundles: Path, out: Path, *args: str) -> tuple[int, dict]:
    status = main(["trial", "--bundles", str(bundles), "--out", str(out), "--quiet", "--samples", "4", "--rate", "50",
                   *args])
    return status, json.loads((out / "trial.json").read_text())


def test_own_tls_broker_with_accounts_and_another_prefix_and_fleet(onnx_tflite_bundles: Path, tmp_path: Path) -> None:
    out = tmp_path / "tls"
    status, summary = trial(onnx_tflite_bundles, out, "--tls", "--auth", "--prefix", "lab/east", "--fleet", "f1")
    assert status == 0
    assert summary["counts"]["answered"] == 12 and summary["exactness"]["mismatches"] == 0
    assert summary["fleet"]["broker"].startswith("mqtts://")
    config = (out / "fleet" / "mosquitto.conf").read_text()
    assert "cafile" in config and "acl_file" in config
    acl = (out / "fleet" / "mosquitto.acl").read_text()
    # the ACL allows only lab/east/f1/...: had the driver or an agent used other topics, nothing would be answered
    assert "topic write lab/east/f1/presence/device-0" in acl and "nmoe/default" not in acl
    log = (out / "logs" / "device-0.log").read_text()
    assert "on mqtts://127.0.0.1:" in log and "refused" not in log


class Spy:
    """Every topic published on a broker (anonymous, over TLS with a client certificate)."""

    def __init__(self, settings: MqttSettings) -> None:
        self.topics: set[str] = set()
        self._lock, connected = threading.Lock(), threading.Event()
        self.transport = MqttTransport(settings)
        self.transport.subscribe("#")
        self.transport.connect(None, self._on_message,
                               lambda event, _: event == ConnectionEvent.CONNECTED and connected.set())
        assert connected.wait(10)

    def _on_message(self, topic: str, payload: bytes) -> None:
        with self._lock:
            self.topics.add(topic)


def test_your_tls_broker_requiring_client_certificates(onnx_tflite_bundles: Path, tmp_path: Path) -> None:
    with start_broker(BrokerOptions(tmp_path / "fleet", port=0, tls=True, require_client_cert=True)) as broker:
        operator = broker.credentials["operator"]
        tls = ["--tls-ca", str(operator.ca_file), "--tls-cert", str(operator.cert_file), "--tls-key",
               str(operator.key_file)]
        spy = Spy(MqttSettings(BrokerUrl.parse(broker.url), "spy", tls_ca=operator.ca_file,
                               tls_cert=operator.cert_file, tls_key=operator.key_file))
        try:
            status, summary = trial(onnx_tflite_bundles, tmp_path / "t", "--broker", broker.url, *tls,
                                    "--prefix", "p", "--fleet", "f")
        finally:
            spy.transport.close()
    assert status == 0 and summary["counts"]["answered"] == 12
    assert spy.topics and all(t.startswith("p/f/") for t in spy.topics)
    kinds = {t.split("/")[2] for t in spy.topics}
    assert kinds == {"presence", "infer", "expert", "reply"}


@pytest.mark.parametrize(("args", "message"), [
    (["--tls", "--broker", "mqtts://127.0.0.1:1"], "--tls makes the trial's own mosquitto TLS-only: with --broker"),
    (["--tls-ca", "ca.pem"], "--tls-ca is for an mqtts:// --broker; the trial's own broker makes its CA"),
    (["--broker", "mqtt://127.0.0.1:1", "--tls-cert", "c", "--tls-key", "k"],
     "--tls-cert needs an mqtts:// broker URL, got mqtt://127.0.0.1:1"),
    (["--broker", "mqtts://127.0.0.1:1", "--tls-cert", "c"], "--tls-cert and --tls-key go together"),
    (["--broker", "mqtts://127.0.0.1:1", "--tls-ca", "/nonexistent/ca.pem"], "--tls-ca /nonexistent/ca.pem: no such file"),
    (["--prefix", "a b"], "--prefix/--fleet: bad topic prefix 'a b'"),
    (["--fleet", "x/y"], "--prefix/--fleet: "),
    (["--arm64-devices", "1", "--remote", "--broker", "mqtt://127.0.0.1:1"],
     "--arm64-devices starts emulated agents; a --remote trial starts none"),
    (["--arm64-devices", "1", "--runtime", "executorch"],
     "--arm64-devices with --runtime executorch: ExecuTorch's aarch64 Python bindings need torch"),
])
def test_options_that_cannot_work_are_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     args: list[str], message: str) -> None:
    argv = ["trial", "--bundles", str(tmp_path / "bundles"), "--out", str(tmp_path / "t"), "--quiet", *args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nmoe: error:") and message in err[0], err
    assert not (tmp_path / "t").exists()  # refused before anything started


def test_a_tls_file_that_is_not_a_certificate_is_one_error_line(onnx_tflite_bundles: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    argv = ["trial", "--bundles", str(onnx_tflite_bundles), "--out", str(tmp_path / "t"), "--quiet",
            "--broker", "mqtts://127.0.0.1:1", "--tls-ca", str(bad)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"nmoe: error: cannot use the TLS files {bad}"), err


def test_help_says_which_mismatches_fail_the_exactness_check(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["trial", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert ("with fp32 latents the check fails only on a mismatch among the inputs whose chosen experts all "
            "answered") in text
    assert ("1 a request to a live device failed, or, with fp32 latents, a prediction differs from LocalNMoE's for "
            "an input whose chosen experts all answered (mismatches among degraded inputs are reported, not "
            "counted)") in text
    for option in ("--tls ", "--tls-ca F", "--tls-cert F", "--tls-key F", "--prefix P", "--fleet F"):
        assert option in text


def test_qemu_cpu_picks_the_emulated_cpu_and_help_says_emulation_is_slow(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from toolkit.fleet import trial as trial_module
    from toolkit.fleet.trial_driver import TrialError

    seen = []

    def run_trial(options: trial_module.TrialOptions) -> None:
        seen.append(options)
        raise TrialError("stopped here")

    monkeypatch.setattr(trial_module, "run_trial", run_trial)
    argv = ["trial", "--bundles", str(tmp_path), "--out", str(tmp_path / "t"), "--arm64-devices", "2"]
    monkeypatch.delenv("QEMU_CPU", raising=False)
    assert main(argv) == 2
    monkeypatch.setenv("QEMU_CPU", "cortex-a76")
    assert main(argv) == 2
    assert [(o.arm64_devices, o.arm64_cpu) for o in seen] == [(2, "cortex-a72"), (2, "cortex-a76")]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["trial", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--arm64-devices N" in text and "Emulation is ~300x slower than a real board" in text
