"""`nmoe agent` as device processes where torch cannot be imported: parity, a SIGKILLed peer, SIGTERM."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fleet_helpers import (
    TOPICS,
    Client,
    TimedApp,
    images_by_need,
    request_frame,
    wait_online,
    with_samples,
)

from broker.process import BrokerOptions, start_broker
from device_agent.agent import Agent, AgentConfig, InferenceResult
from device_agent.bundle import Bundle
from device_agent.device_models import DeviceModels, model_version
from device_agent.nmoe_local import LocalNMoE
from device_agent.wire.mqtt_transport import BrokerUrl, MqttSettings, MqttTransport
from device_agent.wire.protocol import ExpertResponse
from toolkit.cli import main

ROOT = Path(__file__).resolve().parents[2]
DEVICE = r'''
import importlib.abc
import json
import sys

class Absent(importlib.abc.MetaPathFinder):
    """As on a Raspberry Pi with only the agent's extra: torch and the export package are not installed."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("torch", "export"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Absent())
from toolkit.cli import main

code = main(sys.argv[1:])
print(json.dumps(sorted(m for m in sys.modules if m.partition(".")[0] in ("torch", "export"))), flush=True)
sys.exit(code)
'''


def spawn_agent(bundle: Bundle, url: str, events: Path, *options: str) -> subprocess.Popen:
    """`nmoe agent` for `bundle` in a process without torch."""
    return subprocess.Popen(
        [sys.executable, "-c", DEVICE, "agent", "--bundle", str(bundle.path), "--broker", url,
         "--events", str(events), *options],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)


def test_device_processes_without_torch_serve_and_survive_a_killed_peer(
        bundles: dict[int, Bundle], images: np.ndarray, tmp_path: Path) -> None:
    local = LocalNMoE(bundles, "fp32")
    with start_broker(BrokerOptions(tmp_path / "fleet", port=0)) as broker:
        events = {e: tmp_path / f"device-{e}.jsonl" for e in (1, 2)}
        devices = {1: spawn_agent(bundles[1], broker.url, events[1], "--mqtt-version", "5"),
                   2: spawn_agent(bundles[2], broker.url, events[2], "--latent-encoding", "fp16")}
        me = Agent(bundles[0], MqttTransport(MqttSettings(BrokerUrl.parse(broker.url), "test-device-0")),
                   DeviceModels.open(bundles[0]), AgentConfig(deadline_ms=300))
        me.start()
        try:
            assert me.wait_for_experts({1, 2}, 60), {e: p.poll() for e, p in devices.items()}
            assert np.array_equal(me.infer(images).probs, local.predict(0, images).probs)

            app = Client(MqttTransport(MqttSettings(BrokerUrl.parse(broker.url), "test-app")))
            app.publish(TOPICS.infer_request("device-1"),
                        request_frame(1, images.astype(np.float32), me.model_version))
            (_, reply), = app.wait_for(1)
            app.close()
            assert isinstance(reply, ExpertResponse)  # device-1 asked device-0 (here) and device-2
            assert np.array_equal(reply.probs, local.predict(1, images).probs)

            results: list[InferenceResult] = []
            stop = threading.Event()

            def infer_until_stopped() -> None:
                while not stop.is_set():
                    results.append(me.infer(images))

            worker = threading.Thread(target=infer_until_stopped)
            worker.start()
            time.sleep(0.3)
            killed_after = len(results)
            devices[2].send_signal(signal.SIGKILL)
            devices[2].wait()
            end = time.monotonic() + 10
            while time.monotonic() < end and not (results and results[-1].rerouted.get(2)):
                time.sleep(0.02)
            time.sleep(0.2)
            stop.set()
            worker.join()
            assert killed_after > 0 and len(results) > killed_after
            assert all(len(r.labels) == len(images) and np.allclose(r.probs.sum(axis=1), 1, atol=1e-5)
                       for r in results)  # no inference failed
            assert results[-1].rerouted.get(2) and 2 not in results[-1].experts and results[-1].missing == {}

            devices[1].send_signal(signal.SIGTERM)
            out, err = devices[1].communicate(timeout=30)
            assert devices[1].returncode == 0, err
            assert json.loads(out.splitlines()[-1]) == []  # never imported torch (nor export)
            end = time.monotonic() + 5
            while me.fleet.live_experts(me.model_version) and time.monotonic() < end:
                time.sleep(0.02)
            assert me.fleet.live_experts(me.model_version) == set()  # offline presence seen
        finally:
            me.stop()
            for p in devices.values():
                if p.poll() is None:
                    p.kill()
                    p.communicate()
    log = [json.loads(line) for line in events[1].read_text().splitlines()]
    assert log[0]["event"] == "connect" and log[-1]["event"] == "stop"
    counters = next(line["counters"] for line in log if line["event"] == "counters")
    assert counters["expert_server"]["answered"] > 0 and counters["infer_server"]["answered"] == 1
    assert any(line["event"] == "inference" and line["bytes_sent"] > 0 for line in log)


def test_a_sigstopped_peer_delays_only_the_inferences_that_asked_it(
        bundles: dict[int, Bundle], images: np.ndarray, tmp_path: Path) -> None:
    """Issue 9, defect 2, as reported: three `nmoe agent` processes over mosquitto, device-2 SIGSTOPped
    (it stays "online" until its keep-alive runs out). An inference on device-0 that needs expert 2
    waits out the deadline; those sent 50 ms after it that need only experts 0 and 1 keep their
    latency; once device-2 missed a deadline, inputs that chose it are re-routed before sending."""
    deadline_s = 2.0
    needs_2, without_2 = images_by_need(LocalNMoE(bundles, "fp32"), 0, 2, images)
    model = model_version(bundles[0])
    with start_broker(BrokerOptions(tmp_path / "fleet", port=0)) as broker:
        url = BrokerUrl.parse(broker.url)
        events = {e: tmp_path / f"device-{e}.jsonl" for e in bundles}
        devices = {e: spawn_agent(b, broker.url, events[e], "--deadline-ms", str(int(deadline_s * 1000)))
                   for e, b in bundles.items()}
        app = TimedApp(MqttTransport(MqttSettings(url, "test-app")), "device-0", 0, model)
        try:
            wait_online(MqttTransport(MqttSettings(url, "test-watcher")), set(bundles), model, 120)
            def asked_2(line: dict[str, object]) -> bool:
                return line["event"] == "inference" and 2 in line["answered"]  # type: ignore[operator]

            end = time.monotonic() + 120  # device-0 sees device-2: an input that needs it was answered by it
            while not any(asked_2(json.loads(x)) for x in _lines(events[0])):
                assert time.monotonic() < end and all(p.poll() is None for p in devices.values())
                app.latency(*app.send(needs_2[0]))
            alone = [app.latency(*app.send(image)) for image in without_2[:3]]
            devices[2].send_signal(signal.SIGSTOP)
            slow = app.send(needs_2[0])
            time.sleep(0.05)
            unrelated_s = [app.latency(*sent) for sent in [app.send(image) for image in without_2[:5]]]
            slow_s = app.latency(*slow)
            rerouted_s = app.latency(*app.send(needs_2[1]))
        finally:
            devices[2].send_signal(signal.SIGCONT)
            app.client.close()
            for p in devices.values():
                p.send_signal(signal.SIGTERM)
            for p in devices.values():
                p.communicate(timeout=30)
    assert slow_s >= 0.95 * deadline_s
    assert max(unrelated_s) < 0.5 * deadline_s, (alone, unrelated_s)
    assert rerouted_s < 0.5 * deadline_s
    last = [json.loads(x) for x in _lines(events[0]) if json.loads(x)["event"] == "inference"][-1]
    assert last["avoided"] == [2] and last["missing"] == {}


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.parametrize(("args", "message"), [
    (["--broker", "http://127.0.0.1:1883"], "mqtt:// or mqtts://"),
    (["--broker", "mqtt://user:pw@127.0.0.1"], "--password-file"),
    (["--tls-ca", "ca.pem"], "need an mqtts://"),
    (["--runtime", "executorch"], "no gate fp32 executorch model"),
    (["--password-file", "/nonexistent/password"], "--password-file /nonexistent/password: cannot read it (No such file"),
    (["--fleet", "bad/fleet"], "fleet"),
])
def test_unusable_options_exit_2_with_one_line(args: list[str], message: str, bundles: dict[int, Bundle],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["agent", "--bundle", str(bundles[0].path), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_a_bad_bundle_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["agent", "--bundle", str(tmp_path)]) == 2
    assert "manifest.json: cannot read" in capsys.readouterr().err


def test_a_bundle_whose_samples_the_models_do_not_reproduce_exits_2(
        bundles: dict[int, Bundle], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wrong = with_samples(bundles[1], tmp_path / "device-1",
                         lambda samples: samples.__setitem__("expert_probs", samples["expert_probs"][:, ::-1]))
    assert main(["agent", "--bundle", str(wrong.path), "--broker", "mqtt://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "samples.npz: the expert (onnx) differs" in err


def test_help_teaches_with_examples(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["agent", "--help"])
    out = capsys.readouterr().out
    assert "examples:" in out and "mqtts://" in out and "--no-microbatch" in out
