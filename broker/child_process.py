"""Child processes that do not outlive their parent: mosquitto, and the agents of a trial.

`dies_with_parent(command)` runs the command under util-linux's `setpriv --pdeathsig TERM`, which
execs it (same pid) after asking the kernel (prctl PR_SET_PDEATHSIG) to send it SIGTERM when the
thread that started it exits. So a trial or `nmoe broker` that is SIGKILLed leaves no mosquitto or
agent running. Start children from a thread that lives as long as they should (the main thread).
Without setpriv (not Linux) the command runs as given. (A `preexec_fn` would do the same without
setpriv, but is unsafe in a process with threads, like any with a paho connection.)
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from typing import Any


def dies_with_parent(command: list[str]) -> list[str]:
    """`command`, made to get SIGTERM when this process dies where the platform allows it."""
    setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
    return command if setpriv is None else [setpriv, "--pdeathsig", "TERM", "--", *command]


def stop_child(process: subprocess.Popen[Any], timeout_s: float) -> None:
    """SIGTERM a child, wait up to `timeout_s` for it, SIGKILL it if it hangs."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
