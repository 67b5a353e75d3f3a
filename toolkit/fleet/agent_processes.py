"""The trial's device agents: one `nmoe agent` process per bundle, started, killed and stopped.

Each agent runs in its own process group, so a Ctrl-C in the terminal reaches only the trial,
which then stops the agents in order: SIGTERM (the agent publishes its offline presence and exits),
SIGKILL for any still running after a timeout. Leaving the context always does that, and an agent
whose trial is SIGKILLed gets SIGTERM from the kernel (`broker.child_process`). An agent runs with
this Python (the venv's) or another interpreter, e.g. an emulated aarch64 one (qemu-user forwards
the signals to it).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from broker.child_process import dies_with_parent

STOP_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class AgentLaunch:
    """How to run one device's agent."""

    device: str
    args: tuple[str, ...]  # the `nmoe agent` options
    log: Path  # its stdout and stderr
    python: tuple[str, ...] = (sys.executable,)  # the interpreter (a command prefix): this venv's by default
    env: dict[str, str] | None = None  # its environment (None: this process's)


def agent_command(launch: AgentLaunch) -> list[str]:
    """`nmoe agent ARGS` run by the launch's Python."""
    return [*launch.python, "-m", "toolkit.cli", "agent", *launch.args]


class AgentProcesses:
    """Running agents by device id; a context manager that never leaves one behind."""

    def __init__(self) -> None:
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}

    def start(self, launch: AgentLaunch) -> None:
        """Start one agent, its output appended to `launch.log`."""
        launch.log.parent.mkdir(parents=True, exist_ok=True)
        self.logs[launch.device] = launch.log
        with launch.log.open("ab") as log:
            self.processes[launch.device] = subprocess.Popen(
                dies_with_parent(agent_command(launch)), stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, process_group=0, env=launch.env)

    def pid(self, device: str) -> int:
        return self.processes[device].pid

    def exited(self) -> dict[str, int]:
        """Agents that have exited on their own: device -> exit status."""
        return {d: p.returncode for d, p in self.processes.items() if p.poll() is not None}

    def kill(self, device: str) -> None:
        """SIGKILL one agent (no offline presence: the broker publishes its last will)."""
        process = self.processes[device]
        process.kill()
        process.wait()

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> dict[str, int]:
        """SIGTERM every running agent, SIGKILL those still running after `timeout_s`; exit statuses."""
        try:
            for process in self.processes.values():
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            end = time.monotonic() + timeout_s
            for process in self.processes.values():
                try:
                    process.wait(max(0.0, end - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
        finally:  # also when interrupted while waiting
            for process in self.processes.values():
                if process.poll() is None:
                    process.kill()
                    process.wait()
        return {d: p.returncode for d, p in self.processes.items()}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
