"""Federated rounds across bridged brokers (issue 14): the coordinator on the hub, the devices (`nmoe
loadgen`) on a leaf bridged to it by `nmoe broker --bridge-to`; every update sent in time arrives."""

from __future__ import annotations

from bench.scale_coordinator import measure, overrides
from broker.process import RunningBroker


def test_rounds_through_the_bridge_lose_no_update(brokers: tuple[RunningBroker, RunningBroker]) -> None:
    hub, leaf = brokers
    m = measure(hub.url, [leaf.url, hub.url], overrides(40, 10, rounds=3, gate_rounds=2, timeout=30.0, quorum=1.0),
                "uniform:0.01,0.1")
    assert not m.error, m.error
    assert m.fit_uploads == m.loadgen["fit_updates_in_time"] == (3 + 2) * 10
    assert m.lost_updates == 0 and not m.failures
    assert m.coordinator["results"] == m.loadgen["results_in_time"]  # every RESULT of every op, too
