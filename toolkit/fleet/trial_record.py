"""What a trial collected while it ran, typed: the input of `toolkit.fleet.trial_summary.summarize`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from device_agent.nmoe_local import Prediction
from toolkit.fleet.trial_driver import PresenceChange, Request

if TYPE_CHECKING:
    from toolkit.fleet.trial import TrialOptions


@dataclass
class BrokerRestart:
    """One restart of the trial's own mosquitto, filled in as it happens (None: it did not get that far)."""

    at_s: float  # seconds into the feeding when the broker was stopped
    broker_pid: int | None = None  # the new mosquitto
    driver_reconnect_s: float | None = None  # from the stop until the driver was connected again
    outage_s: float | None = None  # from the stop until every live agent was online again


@dataclass
class TrialFacts:
    """What happened while the trial ran, filled in as it goes (None or empty: it did not get that far)."""

    planned: int  # sends in the feeding plan
    interrupted: bool = False  # by SIGINT or SIGTERM
    broker: str | None = None  # its URL
    broker_pids: list[int] = field(default_factory=list)  # the mosquittos the trial started, in order
    pids: dict[str, int] = field(default_factory=dict)  # device -> its agent's pid
    online_s: float | None = None  # from the agents' start until every presence was online
    feeding_s: float | None = None  # from the first step until the last request was settled
    killed: dict[str, float] = field(default_factory=dict)  # device -> seconds into the feeding
    broker_restarts: list[BrokerRestart] = field(default_factory=list)
    exit_status: dict[str, int] = field(default_factory=dict)  # device -> its agent's exit status
    absent: dict[str, str] = field(default_factory=dict)  # a remote fleet's devices not fed -> why
    emulated: dict[str, str] = field(default_factory=dict)  # device -> the CPU qemu-user emulated for its agent


@dataclass(frozen=True)
class TrialRecord:
    """Everything a trial produced, before it is summarized."""

    options: TrialOptions
    devices: dict[str, int]  # device -> the expert it holds
    num_experts: int
    input_bytes: int  # one raw image: C*H*W uint8
    precision: str  # of the models the agents ran
    run_dir: Path  # the run the bundles were exported from
    method: str  # the NMoE method they hold
    model_version: str
    labels: dict[str, np.ndarray]  # every planned sample's label, per device
    expected: dict[str, Prediction]  # LocalNMoE on the same samples
    requests: list[Request]
    presence: list[PresenceChange]
    facts: TrialFacts
    driver_counters: dict[str, int]  # what the driver dropped (malformed, late, wrong sender...)
    events_dir: Path  # the agents' <device>.jsonl


def options_json(options: TrialOptions) -> dict[str, Any]:
    """The options as JSON values (paths as strings)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()}
