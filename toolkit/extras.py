"""Which optional extra of nmoe-edge brings which module, and the one error line when one is missing.

A Raspberry Pi installs only `[agent]`; a command that needs another extra must say so in one line
(exit 2) instead of dying on an ImportError. pyproject.toml's [project.optional-dependencies] lists
distributions; EXTRA_MODULES lists the top-level modules they provide that the commands import
(tests/test_extras.py checks that the two agree). A command lists the modules it always imports and
is told which extras bring the missing ones. Stdlib only: runs before anything heavy is imported.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence

EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "agent": ("paho", "onnxruntime", "onnx", "threadpoolctl"),
    "train": ("torch", "matplotlib", "tqdm"),
    "tflite": ("ai_edge_litert",),
    "export": ("onnx", "onnxruntime", "onnxscript", "executorch", "litert_torch", "ai_edge_litert"),
}


def installed(module: str) -> bool:
    """Whether top-level `module` can be imported here (found, not imported)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken or half-installed package
        return False


def extra_providing(module: str) -> str | None:
    """The first extra whose modules include the top-level package of `module`, if any."""
    top = module.partition(".")[0]
    return next((extra for extra, modules in EXTRA_MODULES.items() if top in modules), None)


def missing_extras_error(command: str, modules: Sequence[str]) -> str | None:
    """One line naming the extras that would bring the `modules` `command` needs and that are not
    installed here (None when every one is)."""
    missing = [m for m in modules if not installed(m)]
    if not missing:
        return None
    extras: list[str] = []
    for m in missing:  # prefer an extra already named: [export] also brings ai-edge-litert
        providers = [e for e, ms in EXTRA_MODULES.items() if m in ms] or [m]
        if not set(providers) & set(extras):
            extras.append(providers[0])
    return (f"{command} needs the {' and '.join(f'[{e}]' for e in extras)} extra{'s' * (len(extras) > 1)}, "
            f"not installed here (no module {', '.join(missing)}); install with: "
            f"pip install -c constraints.txt '.[{','.join(extras)}]' in a checkout of nmoe-edge")


def exit_unless_installed(command: str, modules: Sequence[str]) -> None:
    """For `python -m` entry points: print the error line and exit 2 when a module is missing."""
    error = missing_extras_error(command, modules)
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2)
