"""What a federated job exchanged (bytes and names of every parameter message) and who failed."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from toolkit.federated.params import Params, nbytes

FailureKind = Literal["error", "timeout", "refused"]


@dataclass(frozen=True)
class Message:
    """One transfer between server and a client."""

    round: int
    client: int
    direction: str  # "down" (server -> client) or "up"
    names: tuple[str, ...]
    nbytes: int


@dataclass(frozen=True)
class Failure:
    """A client that did not deliver: it raised (`error`), missed the deadline (`timeout`), or its
    upload was refused before aggregation (`refused`: wrong names or shapes, non-finite values)."""

    round: int
    attempt: int  # 0, then 1, 2, ... when a round without quorum is asked again
    client: int
    op: str  # "fit", "evaluate", or a recipe operation ("train_expert", ...)
    kind: FailureKind
    reason: str


class Ledger:
    """Append-only record of a job's fit messages (what `upload_bytes`/`download_bytes` count) and failures."""

    def __init__(self, messages: list[Message] | None = None, failures: list[Failure] | None = None) -> None:
        self.messages = list(messages or [])
        self.failures = list(failures or [])

    def record(self, rnd: int, client: int, direction: str, params: Params) -> None:
        """Record one message carrying `params`."""
        self.messages.append(Message(rnd, client, direction, tuple(sorted(params)), nbytes(params)))

    def fail(self, failure: Failure) -> None:
        """Record a client that did not deliver."""
        self.failures.append(failure)

    def total(self, direction: str) -> int:
        """Total bytes sent in one direction."""
        return sum(m.nbytes for m in self.messages if m.direction == direction)

    def names_sent(self) -> set[str]:
        """Every parameter name that ever crossed the wire."""
        return {n for m in self.messages for n in m.names}

    def to_json(self) -> dict[str, Any]:
        """Plain-data form for checkpoints."""
        return {"messages": [asdict(m) for m in self.messages], "failures": [asdict(f) for f in self.failures]}

    @classmethod
    def from_json(cls, data: dict[str, Any] | list[dict[str, Any]]) -> Ledger:
        """Inverse of to_json (a bare list: the messages of a checkpoint written before failures were kept)."""
        messages, failures = (data, []) if isinstance(data, list) else (data["messages"], data["failures"])
        return cls([Message(d["round"], d["client"], d["direction"], tuple(d["names"]), d["nbytes"]) for d in messages],
                   [Failure(**d) for d in failures])
