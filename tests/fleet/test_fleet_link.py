"""The coordinator's link: a COMMAND sent now and waited for later (`FleetLink.send`), as the round loop's
SendThenWait executor uses it for a thousand devices without a thread each."""

from __future__ import annotations

import time

import pytest

from device_agent.wire.clock import now_ms
from device_agent.wire.memory_transport import MemoryBroker
from device_agent.wire.protocol import Topics
from device_agent.wire.training_frames import Command, Op, Result, Status, encode_training
from device_agent.wire.training_link import new_task_id
from toolkit.fleet.fleet_link import FleetLink, TaskTimeout


def test_a_wait_given_less_time_than_the_deadline_gives_up_then_and_a_later_result_is_dropped() -> None:
    memory, topics = MemoryBroker(), Topics()
    link = FleetLink(topics, 1 << 20)
    link.connect(memory.transport("coordinator"), 5)
    device = memory.transport("dev-a")
    commands: list[bytes] = []
    device.subscribe(topics.train_command("dev-a"), qos=1)
    device.connect(None, lambda topic, payload: commands.append(payload), lambda *a: None)
    answer = Command(new_task_id(), Op.EVALUATE, "run", "job", 1, 0, now_ms() + 60_000, {}, (), {})
    silent = Command(new_task_id(), Op.EVALUATE, "run", "job", 1, 0, now_ms() + 60_000, {}, (), {})
    pending_answer, pending_silent = link.send("dev-a", answer), link.send("dev-a", silent)
    memory.settle()
    assert len(commands) == 2  # both COMMANDs went out before anyone waited
    device.publish(topics.train_result("dev-a"), encode_training(
        Result(answer.task_id, Op.EVALUATE, "run", "job", 1, Status.OK, 5, {"acc": 1.0})), qos=1)
    memory.settle()
    assert pending_answer(0.5).num_examples == 5
    began = time.monotonic()
    with pytest.raises(TaskTimeout):
        pending_silent(0.3)  # the step's deadline, long before the command's own (60 s)
    assert time.monotonic() - began < 5
    device.publish(topics.train_result("dev-a"), encode_training(
        Result(silent.task_id, Op.EVALUATE, "run", "job", 1, Status.OK, 5, {"acc": 1.0})), qos=1)
    memory.settle()
    counts = link.counters.snapshot()
    assert counts.get("timeouts") == 1 and counts.get("dropped_unknown_or_late") == 1 and counts.get("results") == 1
    link.close()
