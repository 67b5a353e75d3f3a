"""The cached emulated aarch64 environment of scripts/arm64_env.sh and the qemu-user command that runs its Python.

`ensure_env()` runs the script (it builds what is missing or outdated, and is a no-op of ~50 ms when cached) and
returns the cache: `sysroot/` (Debian's arm64 python3.11 and its libraries) and `site-packages/` (aarch64 wheels:
numpy, onnxruntime, onnx, ai-edge-litert, paho-mqtt). `emulated_command(cache, cpu)` runs that Python as
`QEMU_CPU=cpu` (cortex-a72: Raspberry Pi 4, cortex-a76: Pi 5) with the project's own code (pure Python) on its
path. Used by `export.arm64_check` (model parity) and `nmoe trial --arm64-devices` (emulated agents).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV_SCRIPT = ROOT / "scripts" / "arm64_env.sh"
QEMU = "qemu-aarch64-static"


class Arm64EnvError(RuntimeError):
    """The emulated environment cannot be built or run (one line, saying what to do)."""


def ensure_env() -> Path:
    """The arm64 cache (sysroot/, site-packages/): scripts/arm64_env.sh builds it when missing and rebuilds what
    a changed pin outdates (a no-op of ~50 ms when cached); its messages go to stderr."""
    cache = Path(os.environ.get("NMOE_ARM64_CACHE") or Path.home() / ".cache" / "nmoe-edge" / "arm64")
    if ENV_SCRIPT.exists():
        code = subprocess.run(["bash", str(ENV_SCRIPT)], check=False, stdout=2).returncode  # fd 2: stderr
        if code != 0:
            raise Arm64EnvError(f"{ENV_SCRIPT.relative_to(ROOT)} failed (exit {code}, output above); fix it, then "
                                "run `make arm64-env`")
    if not (cache / "sysroot" / "usr" / "bin" / "python3.11").exists() or not (cache / "site-packages").is_dir():
        raise Arm64EnvError(f"no arm64 environment in {cache}: run `make arm64-env` in the nmoe-edge repo")
    return cache


def qemu_version() -> str:
    """First line of `qemu-aarch64-static --version`."""
    try:
        return subprocess.run([QEMU, "--version"], check=True, capture_output=True, text=True).stdout.splitlines()[0]
    except (OSError, subprocess.CalledProcessError) as e:
        raise Arm64EnvError(f"{QEMU} does not run ({e}): run `make arm64-env`") from None


def emulated_command(cache: Path, cpu: str) -> tuple[list[str], dict[str, str]]:
    """Command prefix and environment that run the aarch64 python3.11 as `QEMU_CPU=cpu`."""
    sysroot = cache / "sysroot"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "QEMU_"))}
    env |= {"QEMU_CPU": cpu, "PYTHONPATH": f"{cache / 'site-packages'}:{ROOT}", "PYTHONNOUSERSITE": "1"}
    return [QEMU, "-L", str(sysroot), str(sysroot / "usr" / "bin" / "python3.11")], env
