"""The web device's training service keeps the rules of docs/protocol.md §16.5 (a coordinator played
here by hand over mosquitto + the bridge): a COMMAND arriving as CHUNKs is reassembled, a repeated
task id is answered with the stored RESULT (not run again), other runs and passed deadlines are
refused, Stage 1 is declined with `error` at once, an op without what it needs is an `error`, and
malformed payloads on the command topic are dropped."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from web_helpers import launch

from broker.process import RunningBroker
from device_agent.wire.clock import now_ms
from device_agent.wire.mqtt_transport import BrokerUrl, MqttSettings, MqttTransport
from device_agent.wire.training_frames import Command, Op, Result, Status
from device_agent.wire.training_link import TrainingInbox, new_task_id, send_training
from toolkit.fleet.device_data_files import write_fleet_data
from toolkit.fleet.web_devices import WebDevices
from toolkit.run_files import read_config

TOPIC = "nmoe/default/train/device-2"


class Coordinator:
    """Sends COMMANDs to device-2 and collects its RESULTs."""

    def __init__(self, broker: RunningBroker) -> None:
        self.results: queue.Queue[Result] = queue.Queue()
        self.inbox = TrainingInbox(lambda _sender, msg, _n: self.results.put(msg))  # type: ignore[arg-type]
        self.transport = MqttTransport(MqttSettings(BrokerUrl.parse(broker.url), "test-coordinator"))
        self.transport.subscribe(f"{TOPIC}/up", qos=1)
        self.transport.connect(None, lambda topic, payload: self.inbox.deliver("device-2", topic, payload),
                               lambda *_: None)

    def send(self, cmd: Command, max_message: int = 256 * 1024) -> int:
        return send_training(self.transport, f"{TOPIC}/cmd", cmd, max_message)

    def result(self, timeout_s: float = 30) -> Result:
        return self.results.get(timeout=timeout_s)


def _cmd(op: Op, job: str, rnd: int = 0, run: str = "r1", config: dict | None = None, deadline_s: float = 60,
         task: bytes | None = None) -> Command:
    return Command(task or new_task_id(), op, run, job, rnd, 7, now_ms() + int(deadline_s * 1000), config or {})


@pytest.fixture(scope="module")
def coordinator(run_dir: Path, onnx_tflite_bundles: Path, web_broker: RunningBroker,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coordinator]:
    out = tmp_path_factory.mktemp("web-training")
    data = write_fleet_data(read_config(run_dir), out / "data")
    with WebDevices(out) as web:
        web.start(launch(onnx_tflite_bundles, "device-2", web_broker, out, "--data", str(data[2])))
        web.wait_online(["device-2"])
        c = Coordinator(web_broker)
        time.sleep(0.5)  # the coordinator's subscription
        yield c
        c.transport.close()


def test_setup_in_chunks_then_repeats_refusals_and_declines(coordinator: Coordinator, run_dir: Path) -> None:
    config = {"run_config": read_config(run_dir).to_dict()}
    setup = _cmd(Op.SETUP, "setup", config=config)
    sent = coordinator.send(setup, max_message=300)  # the resolved config does not fit: CHUNKs
    assert sent > 300
    first = coordinator.result()
    assert first.task_id == setup.task_id and first.status == Status.OK, first.error
    assert first.metrics["client"] == 2 and first.metrics["wants_init"] == 1 and first.num_examples > 0
    coordinator.send(setup)  # the same task again: the stored RESULT, not a second run
    again = coordinator.result()
    assert again.task_id == setup.task_id and again.metrics == first.metrics
    for cmd, status, why in [
        (_cmd(Op.FIT, "stage3_fedce_fedgate", 1, run="other"), Status.REFUSED, "not set up for run other"),
        (_cmd(Op.FIT, "stage3_fedce_fedgate", 1, deadline_s=-1), Status.REFUSED, "deadline passed"),
        (_cmd(Op.FIT, "stage1_fedce", 1), Status.ERROR, "Stage 1 trains convolutions"),
        (_cmd(Op.EVALUATE, "stage1_fedce", 1), Status.ERROR, "Stage 1 trains convolutions"),
        (_cmd(Op.TRAIN_EXPERT, "stage2_fedce", config={"stage1": "fedce", "init_seed": 1}), Status.ERROR,
         "send init.*"),
        (_cmd(Op.PREPARE_GATE, "stage2_fedce", config={"stage1": "fedce", "experts": [0, 1, 2]}), Status.ERROR,
         "no extractor of fedce"),
    ]:
        started = time.monotonic()
        coordinator.send(cmd)
        r = coordinator.result()
        assert (r.task_id, r.status) == (cmd.task_id, status) and why in r.error, (cmd.op, cmd.job, r.status, r.error)
        assert time.monotonic() - started < 10  # answered at once: the coordinator counts a failure, no hang
        assert r.tensors == {}


def test_a_malformed_command_is_dropped_and_the_device_keeps_answering(coordinator: Coordinator) -> None:
    coordinator.transport.publish(f"{TOPIC}/cmd", b"NM\x02\x04" + bytes(40), qos=1)
    coordinator.transport.publish(f"{TOPIC}/cmd", np.arange(100, dtype=np.uint8).tobytes(), qos=1)
    with pytest.raises(queue.Empty):
        coordinator.result(timeout_s=2)
    cmd = _cmd(Op.FIT, "stage3_fedce_fedgate", 1, run="r2")
    coordinator.send(cmd)
    assert coordinator.result().status == Status.REFUSED
