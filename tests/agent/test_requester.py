"""The Requester (correlation ids, give-up times, sender and expert checks, late and duplicate replies)
and the suspect back-off of routing."""

import json
import time
from pathlib import Path

import numpy as np
import pytest

from device_agent.routing import Suspects
from device_agent.wire.events import EventLog
from device_agent.wire.protocol import (
    ErrorCode,
    ErrorResponse,
    ExpertRequest,
    ExpertResponse,
    ProtocolError,
    encode,
)
from device_agent.wire.requester import Call, Fate, Requester

TOPIC = "nmoe/lab/expert/3/req"
PROBS = np.full((1, 4), 0.25, np.float32)


def request(cid: bytes) -> bytes:
    return encode(ExpertRequest(cid, 3, 1, "m", "nmoe/lab/reply/me", np.zeros((1, 2), np.float32)))


def answer(cid: bytes, expert: int = 3) -> bytes:
    return encode(ExpertResponse(cid, expert, 10, PROBS))


class Wire:
    """Records what the requester publishes."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    def __call__(self, topic: str, payload: bytes) -> None:
        self.sent.append((topic, payload))


def test_a_reply_settles_its_call_only_from_the_device_and_expert_asked() -> None:
    wire = Wire()
    settled: list[Call[str]] = []
    requester: Requester[str] = Requester(wire)
    call = requester.send(TOPIC, "pi-03", 3, request, 5.0, "ctx", settled.append)
    assert wire.sent == [(TOPIC, request(call.correlation_id))] and call.fate is None
    assert call.request_bytes == 2 + 2 + len(TOPIC) + len(wire.sent[0][1])
    cid = call.correlation_id
    requester.deliver("pi-99", answer(cid), 50)  # another device answers in its place
    requester.deliver("pi-03", answer(cid, expert=4), 50)  # the right device, the wrong expert
    assert call.fate is None and requester.pending() == [call] and settled == []
    requester.deliver("pi-03", answer(cid), 50)
    assert call.fate == Fate.ANSWERED and settled == [call] and call.context == "ctx"
    assert isinstance(call.reply, ExpertResponse) and call.reply_bytes == 50 and call.round_trip_s is not None
    requester.deliver("pi-03", answer(cid), 50)  # again
    counts = requester.counters.snapshot()
    assert counts == {"sent": 1, "received": 4, "responses": 1, "dropped_wrong_sender": 1,
                      "dropped_wrong_expert": 1, "dropped_duplicate": 1}
    assert requester.pending() == [] and settled == [call]


def test_errors_timeouts_cancellations_late_and_unknown_replies() -> None:
    requester: Requester[None] = Requester(Wire())
    busy, silent, cancelled = (requester.send(TOPIC, "pi-03", 3, request, s, None) for s in (5.0, 0.0, 5.0))
    requester.deliver("pi-03", encode(ErrorResponse(busy.correlation_id, ErrorCode.BUSY, 3, "full")), 40)
    assert (busy.fate, busy.detail) == (Fate.ERROR, "busy")
    time.sleep(0.01)
    assert requester.expire() == [silent] and silent.fate == Fate.TIMEOUT and silent.reply is None
    assert requester.give_up([cancelled, busy], Fate.CANCELLED, "not_served") == [cancelled]
    assert (cancelled.fate, cancelled.detail, busy.fate) == (Fate.CANCELLED, "not_served", Fate.ERROR)
    requester.deliver("pi-03", answer(silent.correlation_id), 50)  # after its timeout
    requester.deliver("pi-03", answer(cancelled.correlation_id), 50)
    requester.deliver("pi-03", answer(bytes(16)), 50)  # never asked
    requester.deliver("pi-03", request(bytes(16)), 50)  # not a reply
    requester.deliver("pi-03", b"NM\x01\x02garbage", 50)
    counts = requester.counters.snapshot()
    assert counts["error_busy"] == 1 and counts["timed_out"] == 1 and counts["cancelled"] == 1
    assert counts["dropped_late"] == 2 and counts["dropped_unknown"] == 1
    assert counts["dropped_not_reply"] == 1 and counts["dropped_malformed"] == 1


def test_wait_returns_when_every_call_is_settled_or_at_the_time_given() -> None:
    requester: Requester[None] = Requester(Wire())
    calls = [requester.send(TOPIC, "pi-03", 3, request, 5.0, None) for _ in range(2)]
    start = time.monotonic()
    assert not requester.wait(calls, start + 0.1) and time.monotonic() - start >= 0.1
    for call in calls:
        requester.deliver("pi-03", answer(call.correlation_id), 50)
    assert requester.wait(calls, time.monotonic() + 5)


def test_a_frame_that_cannot_be_built_is_never_registered() -> None:
    wire = Wire()
    requester: Requester[None] = Requester(wire)

    def bad(_cid: bytes) -> bytes:
        raise ProtocolError("latent out of range")

    with pytest.raises(ProtocolError):
        requester.send(TOPIC, "pi-03", 3, bad, 5.0, None)
    assert wire.sent == [] and requester.pending() == [] and requester.counters.snapshot() == {}


def test_old_settled_ids_are_forgotten_and_then_unknown() -> None:
    requester: Requester[None] = Requester(Wire(), recent=2)
    calls = [requester.send(TOPIC, "pi-03", 3, request, 5.0, None) for _ in range(3)]
    for call in calls:
        requester.deliver("pi-03", answer(call.correlation_id), 50)
    for call in calls:
        requester.deliver("pi-03", answer(call.correlation_id), 50)
    counts = requester.counters.snapshot()
    assert counts["dropped_unknown"] == 1 and counts["dropped_duplicate"] == 2


def test_malformed_replies_are_logged_rate_limited(tmp_path: Path) -> None:
    log = tmp_path / "events.jsonl"
    events = EventLog(log, malformed_interval_s=0.2)
    requester: Requester[None] = Requester(Wire(), events)
    for _ in range(50):
        requester.deliver("pi-03", b"junk", 4)
    time.sleep(0.25)
    requester.deliver("pi-03", b"NM", 2)
    events.close()
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(e["event"], e["where"], e["source"], e["suppressed"]) for e in lines] == [
        ("malformed", "reply", "pi-03", 0), ("malformed", "reply", "pi-03", 49)]
    assert lines[0]["reason"] == "bad magic" and lines[1]["reason"] == "truncated header"
    assert requester.counters.snapshot()["dropped_malformed"] == 51


def test_suspects_back_off_doubles_per_incident_and_ends_with_an_answer() -> None:
    suspects = Suspects(missed_s=0.2, busy_s=0.1, max_s=0.3)
    before = time.monotonic()
    suspects.missed("pi-03", before)
    suspects.missed("pi-03", before)  # a request sent before the back-off began: the same incident
    assert suspects.avoided() == {"pi-03"}
    time.sleep(0.25)
    assert suspects.avoided() == set()
    suspects.missed("pi-03", time.monotonic())  # a request sent after it: a second miss, 0.4 s capped to 0.3
    time.sleep(0.25)
    assert suspects.avoided() == {"pi-03"}
    suspects.answered("pi-03")
    assert suspects.avoided() == set()
    suspects.busy("pi-04")
    assert suspects.avoided() == {"pi-04"}
    time.sleep(0.15)
    assert suspects.avoided() == set()
