"""`nmoe loadgen` against the real coordinator on mosquitto: a round completes at 50 devices with some
failing, late and silent; quorum and deadlines hold; nothing sent in time is lost; the coordinator's
CPU per round grows about linearly with the fleet (issue 14)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator

import pytest

from bench.scale_coordinator import measure, overrides
from broker.process import BrokerOptions, RunningBroker, start_broker
from device_agent.wire.memory_transport import MemoryBroker
from device_agent.wire.protocol import Topics
from toolkit.cli import main
from toolkit.fleet.fleet_link import FleetLink
from toolkit.fleet.load_generator import Delay, LoadGenerator, LoadOptions


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningBroker]:
    with start_broker(BrokerOptions(tmp_path_factory.mktemp("broker"), port=0)) as running:
        yield running


def test_delays_parse_and_bad_ones_are_one_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert Delay.parse("fixed:0.5") == Delay("fixed", 0.5)
    assert Delay.parse("lognormal:0.2,0.5") == Delay("lognormal", 0.2, 0.5)
    for bad in ("", "fixed", "uniform:2,1", "lognormal:1", "gamma:1,2", "fixed:-1", "fixed:nan", "uniform:a,b"):
        with pytest.raises(ValueError, match="expected fixed:S"):
            Delay.parse(bad)
    assert main(["loadgen", "--devices", "3", "--delay", "uniform:2,1"]) == 2
    assert main(["loadgen", "--devices", "3", "--failing", "0.7", "--silent", "0.7"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("nmoe: error: ") for line in err)


def test_devices_announce_their_experts_and_share_connections() -> None:
    memory = MemoryBroker()
    made: list[str] = []

    def transport(client_id: str):  # type: ignore[no-untyped-def]
        made.append(client_id)
        return memory.transport(client_id)

    generator = LoadGenerator(LoadOptions(10, first_expert=5, per_connection=4, late=0.2, silent=0.1), transport)
    link = FleetLink(Topics(), 1 << 20)
    link.connect(memory.transport("coordinator"), 5)
    generator.start()
    try:
        assert generator.wait_connected(5) and len(made) == 3
        assert link.wait_live(set(range(5, 15)), 5) == set(range(5, 15))
        behaviours = [d.behaviour for d in generator.devices.values()]
        assert behaviours.count("late") == 2 and behaviours.count("silent") == 1
    finally:
        generator.stop()
    memory.settle()
    assert not link.live()  # a clean stop publishes every device's offline presence


def test_live_is_computed_once_per_presence_change() -> None:
    """A round asks live() once per device; rebuilding it from every presence each time was O(N^2)."""
    memory = MemoryBroker()
    generator = LoadGenerator(LoadOptions(20), memory.transport)
    link = FleetLink(Topics(), 1 << 20)
    link.connect(memory.transport("coordinator"), 5)
    generator.start()
    try:
        assert link.wait_live(set(range(20)), 5) == set(range(20))
        calls = 0
        online = link.fleet.online

        def counted():  # type: ignore[no-untyped-def]
            nonlocal calls
            calls += 1
            return online()

        link.fleet.online = counted  # type: ignore[method-assign]
        assert all(link.live()[c] == f"sim-{c}" for c in range(20) for _ in range(5))
        assert calls <= 1  # 100 calls: at most one computation
        before = calls
        generator.stop()
        memory.settle()
        assert not link.live() and not link.live() and calls == before + 1
    finally:
        generator.stop()


def test_a_round_completes_with_failing_late_and_silent_devices(broker: RunningBroker) -> None:
    # 50 devices, 20 sampled per round, 5 failing, 5 late, 5 silent; a 4 s deadline and a quorum of half
    config = overrides(50, 20, rounds=2, gate_rounds=1, timeout=4.0, quorum=0.5)
    m = measure(broker.url, [broker.url], config, "uniform:0.01,0.2", (0.1, 0.1, 0.1))
    assert not m.error, m.error
    fits = {k: n for k, n in m.failures.items() if ".fit." in k}
    sampled_bad = m.loadgen.get("commands_fit", 0) - m.loadgen.get("fit_updates_in_time", 0) \
        - m.loadgen.get("results_fit_refused", 0)
    assert sum(fits.values()) == sampled_bad > 0  # every failing, late or silent device sampled is a failure
    assert set(fits) <= {f"{job}.fit.{kind}" for job in ("stage1_fedce", "stage3_fedce_fedgate")
                         for kind in ("error", "timeout")}
    errors = sum(n for k, n in fits.items() if k.endswith(".error"))
    assert errors == m.loadgen.get("results_fit_error", 0)  # failing devices: errors; late and silent: timeouts
    assert m.lost_updates == 0 and m.fit_uploads == m.loadgen["fit_updates_in_time"]
    assert m.coordinator.get("dropped_wrong_sender", 0) == 0
    for r in m.rounds:  # a round with silent devices waits for its deadline, not longer
        assert r.fit_s < 4.0 + 3.0


def test_coordinator_cpu_per_round_grows_linearly_not_quadratically(broker: RunningBroker) -> None:
    """Coordinator CPU per round at 2N < 3x that at N (linear: 2x; quadratic: 4x), same sample size."""
    cpu = {}
    for n in (60, 120):
        began = time.monotonic()
        m = measure(broker.url, [broker.url], overrides(n, 10, rounds=4, gate_rounds=1, timeout=30.0, quorum=0.8),
                    "fixed:0.05")
        assert not m.error, m.error
        cpu[n] = statistics.median(r.cpu_s for r in m.rounds if r.job == "stage1_fedce")
        assert time.monotonic() - began < 300
    assert cpu[120] < 3 * cpu[60], cpu


def test_routing_rows_read_absent_shares_as_zero() -> None:
    """With 1000 experts every share in the RESULT header outgrows its 16 KiB: devices leave out zeros."""
    from toolkit.federated.client import EvaluateRes
    from toolkit.federated.summary import routing_rows

    rows = routing_rows([(0, EvaluateRes(5, {"routing.2": 0.5, "routing.0": 0.5})), (1, EvaluateRes(5, {}))], 3)
    assert rows == [[0.5, 0.0, 0.5], [0.0, 0.0, 0.0]]


def test_no_broker_is_one_error_line_at_once(capsys: pytest.CaptureFixture[str]) -> None:
    began = time.monotonic()
    assert main(["loadgen", "--devices", "3", "--broker", "mqtt://127.0.0.1:1"]) == 2  # nothing listens there
    assert time.monotonic() - began < 20  # it waited 30 s for connections that had already failed
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nmoe: error: cannot connect to the broker") and "unreachable" in err[0]
