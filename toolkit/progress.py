"""Progress bars for long work (tqdm on a terminal; quiet in logs and tests when disabled)."""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm


def progress_bar(total: int, desc: str, unit: str, enabled: bool = True, initial: int = 0) -> Any:
    """A tqdm bar; `enabled=False` gives a silent bar with the same interface."""
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled,
                dynamic_ncols=True, leave=True)
