"""The trial driver on the in-memory broker: each fate of a request, what it refuses, presence waits."""

import json
import time
from pathlib import Path

import numpy as np
import pytest
from trial_fakes import (
    MODEL,
    FakeDevice,
    Reply,
    answer,
    connected_driver,
    error,
    image,
    probs_for,
    silent,
)

from device_agent.wire.clock import now_ms
from device_agent.wire.events import EventLog
from device_agent.wire.memory_transport import MemoryBroker
from device_agent.wire.protocol import (
    ErrorCode,
    ExpertRequest,
    ExpertResponse,
    Topics,
    encode,
    new_correlation_id,
)
from device_agent.wire.transport import ConnectionEvent, publish_packet_size
from toolkit.fleet.trial_driver import OPERATOR, RequestStatus, TrialDriver, TrialError

TOPICS = Topics()


def events_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_an_answer_is_recorded_with_its_prediction_round_trip_and_size(tmp_path: Path) -> None:
    broker = MemoryBroker()
    events = EventLog(tmp_path / "events.jsonl")
    device = FakeDevice(broker, TOPICS, "device-0", 0)
    driver = connected_driver(broker, events=events)
    driver.start_clock()
    request = driver.send("device-0", 0, image(6), label=2, index=7, deadline_ms=1000, wait_s=5)
    broker.settle()
    assert request.status == RequestStatus.ANSWERED and driver.pending() == 0 and driver.done() == 1
    assert request.predicted == 2 and np.array_equal(request.probs, probs_for(image(6))[0])
    assert request.rtt_ms is not None and 0 <= request.rtt_ms < 1000
    sent, = device.requests
    assert sent.correlation_id.hex() == request.id and sent.reply_topic == TOPICS.reply(OPERATOR)
    assert sent.expert_id == 0 and sent.model_version == MODEL
    assert np.array_equal(sent.latent, image(6)[None].astype(np.float32))
    reply = ExpertResponse(sent.correlation_id, 0, 10, probs_for(image(6)))
    assert request.reply_bytes == publish_packet_size(TOPICS.reply_from(OPERATOR, "device-0"), encode(reply))
    assert request.request_bytes > 8  # the image as fp16 plus the frame
    events.close()
    answers = [e for e in events_of(tmp_path / "events.jsonl") if e["event"] == "answer"]
    assert answers == [{**answers[0], "device": "device-0", "index": 7, "id": request.id, "predicted": 2,
                        "label": 2}]


def test_pixels_go_as_uint8_to_protocol_2_devices_and_as_fp16_to_version_1_devices() -> None:
    broker = MemoryBroker()
    v2 = FakeDevice(broker, TOPICS, "device-0", 0, protocols=(1, 2))
    v1 = FakeDevice(broker, TOPICS, "device-1", 1)
    driver = connected_driver(broker)
    picture = np.arange(16, dtype=np.uint8).reshape(1, 4, 4) * 17  # 0..255
    to_v2 = driver.send("device-0", 0, picture, 0, 0, 1000, 5)
    to_v1 = driver.send("device-1", 1, picture, 0, 0, 1000, 5)
    broker.settle()
    assert to_v2.status == to_v1.status == RequestStatus.ANSWERED
    (got_v2,), (got_v1,) = v2.requests, v1.requests
    assert (got_v2.encoding, got_v1.encoding) == ("uint8", "fp16")
    assert np.array_equal(got_v2.latent, picture[None]) and np.array_equal(got_v1.latent, picture[None])
    assert to_v1.request_bytes - to_v2.request_bytes == picture.size  # one byte per pixel instead of two


def test_an_error_answer_records_its_code() -> None:
    broker = MemoryBroker()
    FakeDevice(broker, TOPICS, "device-0", 0, error(ErrorCode.BUSY))
    driver = connected_driver(broker)
    request = driver.send("device-0", 0, image(1), 1, 0, 1000, 5)
    broker.settle()
    assert request.status == RequestStatus.ERROR and request.detail == "busy" and request.predicted is None
    assert request.status.failed and request.rtt_ms is not None


def test_an_unanswered_request_times_out_only_after_its_wait() -> None:
    broker = MemoryBroker()
    FakeDevice(broker, TOPICS, "device-0", 0, silent)
    driver = connected_driver(broker)
    request = driver.send("device-0", 0, image(1), 1, 0, 1000, wait_s=0.5)
    driver.expire()
    assert request.status == RequestStatus.PENDING and driver.pending() == 1
    time.sleep(0.55)
    driver.expire()
    assert request.status == RequestStatus.TIMEOUT and request.status.failed and driver.pending() == 0


def test_a_late_reply_after_the_timeout_is_dropped_and_counted() -> None:
    broker = MemoryBroker()
    device = FakeDevice(broker, TOPICS, "device-0", 0, silent)
    driver = connected_driver(broker)
    request = driver.send("device-0", 0, image(1), 1, 0, 1000, wait_s=0.05)
    time.sleep(0.1)
    driver.expire()
    assert request.status == RequestStatus.TIMEOUT
    broker.settle()
    sent, = device.requests
    late = ExpertResponse(sent.correlation_id, 0, 1, probs_for(image(1)))
    device.transport.publish(TOPICS.reply_from(OPERATOR, "device-0"), encode(late))  # as the device would, late
    broker.settle()
    assert request.status == RequestStatus.TIMEOUT and request.predicted is None
    assert driver.counters.snapshot() == {"late_or_unknown_replies": 1}


@pytest.mark.parametrize(("sender", "expert", "dropped"), [("device-1", 0, "wrong_sender"),
                                                           ("device-0", 1, "wrong_expert")])
def test_a_reply_from_another_device_or_for_another_expert_is_refused_and_the_right_one_still_counts(
        sender: str, expert: int, dropped: str) -> None:
    broker = MemoryBroker()

    def impostor_first(device: str, request: ExpertRequest) -> list[Reply]:
        wrong = ExpertResponse(request.correlation_id, expert, 1, np.eye(4, dtype=np.float32)[[3]])
        return [Reply(wrong, sender), *answer(device, request)]

    FakeDevice(broker, TOPICS, "device-0", 0, impostor_first)
    driver = connected_driver(broker)
    request = driver.send("device-0", 0, image(2), 2, 0, 1000, 5)
    broker.settle()
    assert request.status == RequestStatus.ANSWERED and request.predicted == 2
    assert driver.counters.snapshot() == {dropped: 1}


def test_duplicate_unknown_malformed_and_non_reply_frames_are_counted_not_recorded() -> None:
    broker = MemoryBroker()
    FakeDevice(broker, TOPICS, "device-0", 0, lambda d, r: answer(d, r) * 2)
    driver = connected_driver(broker)
    request = driver.send("device-0", 0, image(1), 1, 0, 1000, 5)
    app = broker.transport("app")
    app.connect(None, lambda t, p: None, lambda e, d: None)
    inbox = TOPICS.reply_from(OPERATOR, "device-0")
    app.publish(inbox, encode(ExpertResponse(new_correlation_id(), 0, 1, probs_for(image(0)))))
    app.publish(inbox, b"\x00garbage")
    app.publish(inbox, encode(ExpertRequest(new_correlation_id(), 0, now_ms() + 1000, MODEL, TOPICS.reply("app"),
                                            np.zeros((1, 2), np.float32))))
    broker.settle()
    assert request.status == RequestStatus.ANSWERED and driver.done() == 1
    assert driver.counters.snapshot() == {"late_or_unknown_replies": 2, "malformed": 1, "not_a_reply": 1}


def test_skip_and_abandon_settle_requests_as_not_served_or_interrupted(tmp_path: Path) -> None:
    broker = MemoryBroker()
    events = EventLog(tmp_path / "events.jsonl")
    for i in range(2):
        FakeDevice(broker, TOPICS, f"device-{i}", i, silent)
    driver = connected_driver(broker, events=events)
    a0 = driver.send("device-0", 0, image(1), 1, 0, 1000, 5)
    a1 = driver.send("device-0", 0, image(1), 1, 1, 1000, 5)
    b0 = driver.send("device-1", 1, image(1), 1, 0, 1000, 5)
    driver.skip("device-0", label=3, index=2, at_s=0.5)
    driver.abandon(RequestStatus.NOT_SERVED, "device-0")
    assert a0.status == a1.status == RequestStatus.NOT_SERVED and b0.status == RequestStatus.PENDING
    driver.abandon(RequestStatus.INTERRUPTED)
    assert b0.status == RequestStatus.INTERRUPTED and driver.pending() == 0
    skipped = driver.requests[-1]
    assert (skipped.status, skipped.id, skipped.label, skipped.index, skipped.sent_s) == \
        (RequestStatus.NOT_SERVED, "", 3, 2, 0.5)
    assert not any(r.status.failed for r in driver.requests)
    events.close()
    kinds = [e["event"] for e in events_of(tmp_path / "events.jsonl")]
    assert kinds.count("request") == 3 and kinds.count("not_served") == 3 and kinds.count("interrupted") == 1


def test_wait_online_counts_only_presences_born_after_since_and_names_the_missing() -> None:
    broker = MemoryBroker()
    FakeDevice(broker, TOPICS, "device-0", 0)
    driver = connected_driver(broker)
    since = time.time()
    with pytest.raises(TrialError, match=r"^device-0, device-1 did not come online within 0 s"):
        driver.wait_online({"device-0", "device-1"}, since, 0.2, lambda: None)  # device-0's presence is older
    FakeDevice(broker, TOPICS, "device-1", 1)
    driver.wait_online({"device-1"}, since, 5, lambda: None)
    checks = []

    def check() -> None:  # what run_trial passes: raises once an agent has exited
        checks.append(time.monotonic())
        if len(checks) == 3:
            raise RuntimeError("agent died")

    with pytest.raises(RuntimeError, match="agent died"):
        driver.wait_online({"device-7"}, since, 5, check)
    assert 0.15 < checks[-1] - checks[0] < 5  # every POLL_S (0.1 s)


def test_offline_wills_and_reconnects_are_seen() -> None:
    broker = MemoryBroker()
    device = FakeDevice(broker, TOPICS, "device-0", 0)
    driver = connected_driver(broker)
    driver.start_clock()
    device.kill()
    broker.settle()
    assert [(c.device, c.status) for c in driver.presence_changes()] == [("device-0", "online"),
                                                                         ("device-0", "offline")]
    online, offline = driver.presence_changes()
    assert online.at_s <= 0 <= offline.at_s  # seconds after start_clock()
    before = time.monotonic()
    broker.restart()
    assert 0 <= driver.wait_reconnected(before, 5) < 5


def test_a_requested_stop_raises_where_the_driver_waits() -> None:
    broker = MemoryBroker()
    driver = connected_driver(broker)
    driver.request_stop()
    with pytest.raises(KeyboardInterrupt):
        driver.wait_online({"device-0"}, time.time(), 60, lambda: None)
    with pytest.raises(KeyboardInterrupt):
        driver.raise_if_stopped()


class RefusingTransport:
    """A transport whose broker refuses (or never answers) the connection."""

    def __init__(self, event: ConnectionEvent | None) -> None:
        self.event, self.closed = event, False

    def subscribe(self, topic_filter: str, qos: int = 0) -> None:
        pass

    def connect(self, will: object, on_message: object, on_connection: object) -> None:
        if self.event is not None:
            on_connection(self.event, "not authorised")  # type: ignore[operator]

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        raise AssertionError("nothing is published before connecting")

    def close(self, last: object = None, timeout_s: float = 2.0) -> None:
        self.closed = True


@pytest.mark.parametrize(("event", "message"), [
    (ConnectionEvent.REFUSED, r"cannot connect to the broker \(refused: not authorised\)"),
    (ConnectionEvent.UNREACHABLE, r"cannot reach the broker \(not authorised\); is it running\?"),
    (None, r"cannot connect to the broker \(no answer\)"),
])
def test_a_failed_connect_is_one_trial_error(event: ConnectionEvent | None, message: str) -> None:
    driver = TrialDriver(TOPICS, MODEL, EventLog())
    with pytest.raises(TrialError, match=message):
        driver.connect(RefusingTransport(event), 0.2)  # type: ignore[arg-type]
