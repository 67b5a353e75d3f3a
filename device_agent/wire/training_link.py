"""Training messages over a Transport: one message out as one frame or as CHUNKs, and incoming
frames (whole or chunked) back into messages. Shared by the coordinator and the device agent.

Training traffic uses QoS 1 (docs/protocol.md §15): a redelivered frame is harmless because
chunks are idempotent and commands and results are matched by task id.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from device_agent.wire.chunks import Reassembler, decode_chunk, is_chunk, split
from device_agent.wire.events import Counters
from device_agent.wire.tensor_codec import ProtocolError
from device_agent.wire.training_frames import TrainMessage, decode_training, encode_training
from device_agent.wire.transport import Transport, publish_packet_size

COORDINATOR = "coordinator"  # the broker account (and sender name) that alone publishes COMMANDs
DEFAULT_MAX_MESSAGE = 256 * 1024  # AWS IoT caps messages at 128 KB, EMQX at 1 MB: configurable
TRAINING_QOS = 1

Receiver = Callable[[str, TrainMessage, int], None]  # (sender device, message, bytes on the wire)


def new_task_id() -> bytes:
    """16 random bytes naming one task (the COMMAND's correlation id, echoed by its RESULT)."""
    return os.urandom(16)


def frames_of(msg: TrainMessage, topic: str, max_message: int) -> list[bytes]:
    """The MQTT payloads carrying `msg` on `topic`: one frame, or CHUNKs when the frame's PUBLISH
    packet would exceed `max_message` bytes."""
    frame = encode_training(msg)
    if publish_packet_size(topic, frame) <= max_message:
        return [frame]
    overhead = publish_packet_size(topic, b"") + 4  # the remaining-length field may grow by a few bytes
    return split(frame, msg.task_id, max_message - overhead)


def send_training(transport: Transport, topic: str, msg: TrainMessage, max_message: int) -> int:
    """Publish `msg` (QoS 1); the bytes of the PUBLISH packets sent."""
    sent = 0
    for payload in frames_of(msg, topic, max_message):
        transport.publish(topic, payload, qos=TRAINING_QOS)
        sent += publish_packet_size(topic, payload)
    return sent


class TrainingInbox:
    """Turns the payloads of one side's training topics into messages for `receive`.

    Malformed frames and chunks are dropped and counted (`malformed`); the reassembler counts
    duplicates, conflicts, bad digests and expired transfers. Bytes on the wire of a chunked
    message are those of all its chunks (the last one delivers the message).
    """

    def __init__(self, receive: Receiver, ttl_s: float = 120.0) -> None:
        self.receive = receive
        self.counters = Counters()
        self.chunks = Reassembler(ttl_s=ttl_s)
        self._bytes: dict[tuple[str, bytes], int] = {}

    def deliver(self, sender: str, topic: str, payload: bytes) -> None:
        """Handle one payload that arrived on a training topic of `sender`."""
        size = publish_packet_size(topic, payload)
        try:
            if is_chunk(payload):
                chunk = decode_chunk(payload)
                key = (sender, chunk.transfer_id)
                self._bytes[key] = self._bytes.get(key, 0) + size
                whole = self.chunks.add(sender, chunk)
                if whole is None:
                    self._forget_stale()
                    return
                payload, size = whole, self._bytes.pop(key, size)
            msg = decode_training(payload)
        except ProtocolError:
            self.counters.add("malformed")
            return
        self.counters.add("messages")
        self.receive(sender, msg, size)

    def _forget_stale(self) -> None:
        """Byte counts only for transfers still in progress (bounded like the reassembler)."""
        if len(self._bytes) > 4 * 1024:
            self._bytes.clear()
