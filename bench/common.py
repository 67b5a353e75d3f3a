"""What the benchmarks share: running `nmoe`, percentiles, verdicts, the machine and its load."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def nmoe(*args: str) -> None:
    """Run `nmoe ARGS` with this Python from the repository root; CalledProcessError if it fails."""
    cmd = [sys.executable, "-m", "toolkit.cli", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def verdict(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def pctl(values: list[float], q: float) -> float:
    """The q-th percentile (NaN for no values)."""
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def log(bench: str, msg: str) -> None:
    print(f"[bench/{bench} {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def machine() -> dict[str, str]:
    """`toolkit.rundir.machine()` (CPU, cores, platform, Python, torch) plus the messaging and runtime
    versions: mosquitto, paho-mqtt, onnxruntime."""
    import onnxruntime
    import paho.mqtt

    from toolkit.rundir import machine as run_machine

    mosquitto = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin") or "mosquitto"
    out = subprocess.run([mosquitto, "-h"], check=False, capture_output=True, text=True)
    version = next((ln for ln in (out.stdout + out.stderr).splitlines() if "version" in ln), "mosquitto ?")
    return {**{k: str(v) for k, v in run_machine().items()}, "mosquitto": version.strip(),
            "paho": paho.mqtt.__version__, "onnxruntime": onnxruntime.__version__}


def other_load() -> str:
    """Load average and the busiest processes that are not this benchmark's."""
    mine = {os.getpid()}
    out = subprocess.run(["ps", "-eo", "pid,ppid,pcpu,comm", "--sort=-pcpu"], check=False, capture_output=True,
                         text=True).stdout
    busy = []
    for line in out.splitlines()[1:]:
        pid, ppid, cpu, comm = line.split(None, 3)
        if int(pid) in mine or int(ppid) in mine or float(cpu) < 5:
            continue
        busy.append(f"{comm} {cpu}%")
    la = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"load average {la} (1/5/15 min); other busy processes: {', '.join(busy[:6]) or 'none'}"


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time used so far by these running processes (from /proc)."""
    tick, total = os.sysconf("SC_CLK_TCK"), 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick
    return total
