"""The device's training service keeps serving when one of its results cannot be sent."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from test_federate_memory import ResultLog, fleet, small_config

from device_agent.wire.training_frames import Command, Op, Status
from device_agent.wire.training_link import frames_of, new_task_id


def test_an_unsendable_result_goes_out_as_an_error_and_the_worker_keeps_serving(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A result whose header is over the protocol's 16 KiB (e.g. thousands of routing.<e> metrics) is answered
    with an ERROR RESULT saying so; the next command is served as usual."""
    cfg = small_config('gate.methods=["fedgate"]')
    with fleet(cfg, tmp_path, "numpy") as f:
        service, agent = f.services[0], f.agents[0]
        log = ResultLog(agent.me)
        coordinator = f.broker.transport("coordinator")
        coordinator.subscribe(agent.topics.train_result(agent.me))
        coordinator.connect(None, log.deliver, lambda _event, _detail: None)
        huge = {f"routing.{e}": 0.001 for e in range(2000)}
        sizes = iter([huge, {"loss": 0.5}])
        monkeypatch.setattr(service, "_execute", lambda cmd: service._result(cmd, Status.OK, 1, next(sizes)))
        for sent in range(1, 3):
            cmd = Command(new_task_id(), Op.EVALUATE, "run", "stage3_fedce_fedgate", 1, 0,
                          int(time.time() * 1000) + 60_000)
            for payload in frames_of(cmd, agent.topics.train_command(agent.me), 256 * 1024):
                coordinator.publish(agent.topics.train_command(agent.me), payload, qos=1)
            assert log.wait_for(sent, 10)
        first, second = log.results
        assert first.status == Status.ERROR and first.error.startswith("result not sendable: header larger than")
        assert first.metrics == {} and first.num_examples == 0
        assert second.status == Status.OK and second.metrics == {"loss": 0.5}
        assert service.counters.snapshot()["unsendable_results"] == 1
