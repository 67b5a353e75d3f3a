"""Helpers of the web-device tests."""

from pathlib import Path

from broker.process import RunningBroker
from toolkit.fleet.agent_processes import AgentLaunch


def launch(bundles: Path, device: str, broker: RunningBroker, out: Path, *extra: str) -> AgentLaunch:
    """The `nmoe agent` options of `device` (what a trial would pass), for a web device."""
    return AgentLaunch(device, ("--bundle", str(bundles / device), "--broker", broker.url,
                                "--events", str(out / "events" / f"{device}.jsonl"), *extra),
                       out / "logs" / f"{device}.log")
