"""The sample systemd unit (scripts/nmoe-agent.service + nmoe-agent.env, docs/raspberry-pi.md) runs an
`nmoe agent` command line that the agent's own parser accepts, with credentials from systemd's
credential directory, and is a unit systemd accepts (`systemd-analyze verify`, as on Pi OS bookworm)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from toolkit.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "scripts" / "nmoe-agent.service"
ENV = ROOT / "scripts" / "nmoe-agent.env"
CREDENTIALS = "/run/credentials/nmoe-agent.service"  # what systemd substitutes for %d


def unit_entries(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) of each setting, continuation lines joined, comments dropped."""
    entries, section, pending = [], "", ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if not line or line.startswith(("#", ";")):
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def environment() -> dict[str, str]:
    return dict(line.split("=", 1) for line in ENV.read_text().splitlines() if line and not line.startswith("#"))


def exec_start_argv() -> list[str]:
    """ExecStart as systemd runs it: ${VAR} is one word, $VAR splits on spaces, %d the credentials dir."""
    command = next(v for s, k, v in unit_entries(UNIT.read_text()) if (s, k) == ("Service", "ExecStart"))
    env = environment()
    command = re.sub(r"\$\{(\w+)\}", lambda m: shlex.quote(env[m.group(1)]), command)
    command = re.sub(r"\$(\w+)", lambda m: env[m.group(1)], command)
    return shlex.split(command.replace("%d", CREDENTIALS))


def test_the_unit_runs_an_agent_command_line_the_agent_accepts() -> None:
    argv = exec_start_argv()
    assert argv[0] == "/opt/nmoe-edge/venv/bin/nmoe" and argv[1] == "agent"
    args = build_parser().parse_args(argv[1:])  # SystemExit(2) on an unknown option or a bad value
    assert args.func.__module__ == "device_agent.cli" and args.broker.startswith("mqtts://")
    assert args.username == environment()["NMOE_USERNAME"]
    loaded = [v.split(":", 1)[0] for s, k, v in unit_entries(UNIT.read_text()) if k == "LoadCredential"]
    assert sorted(loaded) == sorted([args.password_file.name, args.tls_ca.name])
    for path in (args.password_file, args.tls_ca):
        assert str(path.parent) == CREDENTIALS  # from systemd's private copy, never a world-readable path


def test_the_unit_restarts_crashes_but_not_usage_errors() -> None:
    service = {k: v for s, k, v in unit_entries(UNIT.read_text()) if s == "Service"}
    assert service["Restart"] == "on-failure" and service["RestartPreventExitStatus"] == "2"  # nmoe: error: exit 2
    assert service["DynamicUser"] == "yes" and service["EnvironmentFile"] == "/etc/nmoe/agent.env"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    """Every key is known to systemd; the program path is swapped for one that exists here."""
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/opt/nmoe-edge/venv/bin/nmoe", sys.executable))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], check=False, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and result.stderr == "", result.stderr
