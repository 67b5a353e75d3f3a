"""JSON as the wire protocol reads it (docs/protocol.md §10): no duplicate keys, no NaN or Infinity, each a
ProtocolError naming what was parsed (presence, telemetry, drain, a training frame's header)."""

from __future__ import annotations

import json

from device_agent.wire.tensor_codec import ProtocolError, byte_view


def strict_loads(text: str, what: str) -> object:
    """Parse `text`; a duplicate key or NaN/Infinity is a ProtocolError, json's own errors (ValueError,
    RecursionError) reach the caller."""

    def unique(pairs: list[tuple[str, object]]) -> dict[str, object]:
        obj = dict(pairs)
        if len(obj) != len(pairs):
            raise ProtocolError(f"duplicate key in {what} JSON")
        return obj

    def constant(name: str) -> None:
        raise ProtocolError(f"{name} is not allowed in {what} JSON")

    return json.loads(text, object_pairs_hook=unique, parse_constant=constant)


def load_json(payload: bytes | bytearray | memoryview, limit: int, what: str) -> object:
    """A UTF-8 JSON payload of at most `limit` bytes, parsed by `strict_loads`; any fault is a ProtocolError."""
    view = byte_view(payload)
    if len(view) > limit:
        raise ProtocolError(f"{what} larger than {limit} bytes")
    try:
        return strict_loads(bytes(view).decode("utf-8"), what)
    except ProtocolError:
        raise
    except (ValueError, RecursionError) as e:
        raise ProtocolError(f"{what} is not UTF-8 JSON") from e
