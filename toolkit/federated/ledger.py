"""Counts the bytes and names of every parameter message a federated job exchanges."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from toolkit.federated.params import Params, nbytes


@dataclass(frozen=True)
class Message:
    """One transfer between server and a client."""

    round: int
    client: int
    direction: str  # "down" (server -> client) or "up"
    names: tuple[str, ...]
    nbytes: int


class Ledger:
    """Append-only record of exchanged tensors."""

    def __init__(self, messages: list[Message] | None = None) -> None:
        self.messages = list(messages or [])

    def record(self, rnd: int, client: int, direction: str, params: Params) -> None:
        """Record one message carrying `params`."""
        self.messages.append(Message(rnd, client, direction, tuple(sorted(params)), nbytes(params)))

    def total(self, direction: str) -> int:
        """Total bytes sent in one direction."""
        return sum(m.nbytes for m in self.messages if m.direction == direction)

    def names_sent(self) -> set[str]:
        """Every parameter name that ever crossed the wire."""
        return {n for m in self.messages for n in m.names}

    def to_json(self) -> list[dict]:
        """Plain-data form for checkpoints."""
        return [asdict(m) for m in self.messages]

    @classmethod
    def from_json(cls, data: list[dict]) -> Ledger:
        """Inverse of to_json."""
        return cls([Message(d["round"], d["client"], d["direction"], tuple(d["names"]), d["nbytes"]) for d in data])
