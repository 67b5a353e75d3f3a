"""Deterministic seeds derived from a base seed and names, so a resumed run repeats exactly."""

from __future__ import annotations

import hashlib


def derive_seed(*parts: object) -> int:
    """A 63-bit seed that depends only on `parts` (e.g. base seed, job name, round, client)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
