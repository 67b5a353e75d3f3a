"""For a test's device-side subprocess: make packages unimportable, as on a Raspberry Pi with only the agent's extra.

    import absent_packages; absent_packages.block(("torch", "toolkit", "export"))

first thing in the script, run with `tests/` on PYTHONPATH (`subprocess_env()` sets it).
"""

import importlib.abc
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


class Absent(importlib.abc.MetaPathFinder):
    """Refuses to find the named top-level packages (and everything under them)."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)

    def find_spec(self, name: str, path: Sequence[str] | None = None, target: ModuleType | None = None) -> None:
        if name.partition(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


def block(names: Sequence[str]) -> None:
    """From now on, importing any of `names` fails in this process (checked on the first one)."""
    sys.meta_path.insert(0, Absent(names))
    try:
        __import__(names[0])
    except ModuleNotFoundError:
        return
    raise SystemExit("the import block does not work")


def subprocess_env() -> dict[str, str]:
    """This environment with the worktree and tests/ (for this module) on PYTHONPATH."""
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
