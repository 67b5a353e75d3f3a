"""The feeding plan and the feeder on the in-memory broker: timing, kills, broker restarts, stops, a remote
fleet's absent devices."""

import json
import time
from pathlib import Path

import numpy as np
import pytest
from trial_fakes import (
    MODEL,
    FakeAgents,
    FakeDevice,
    SilentBar,
    answer,
    connected_driver,
    image,
    silent,
)

from device_agent.wire.events import EventLog
from device_agent.wire.memory_transport import MemoryBroker
from device_agent.wire.protocol import ExpertRequest, Topics
from toolkit.fleet.trial import (
    BrokerAccess,
    Feeder,
    Samples,
    StepKind,
    TrialOptions,
    absent_devices,
    feeding_plan,
)
from toolkit.fleet.trial_driver import RequestStatus, TrialDriver, TrialError

TOPICS = Topics()


def samples(n: int, devices: int = 2) -> dict[str, Samples]:
    """n images per device; image i's first pixel is i, so a fake device predicts class i % 4."""
    return {f"device-{d}": Samples(np.stack([image(i) for i in range(n)]), np.arange(n) % 4) for d in range(devices)}


def options(**kwargs: object) -> TrialOptions:
    return TrialOptions(Path("bundles"), Path("out"), **kwargs)  # type: ignore[arg-type]


def test_the_plan_staggers_devices_within_a_period_and_puts_kill_and_restart_before_sends() -> None:
    plan = feeding_plan(options(rate=10.0, kill_device="device-1", kill_after=0.1, restart_broker_after=0.15),
                        samples(3))
    assert [(round(s.at_s, 9), s.kind, s.device, s.index) for s in plan] == [
        (0.0, StepKind.SEND, "device-0", 0), (0.05, StepKind.SEND, "device-1", 0),
        (0.1, StepKind.KILL, "device-1", None), (0.1, StepKind.SEND, "device-0", 1),
        (0.15, StepKind.RESTART_BROKER, None, None), (0.15, StepKind.SEND, "device-1", 1),
        (0.2, StepKind.SEND, "device-0", 2), (0.25, StepKind.SEND, "device-1", 2)]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"kill_device": "device-0", "kill_after": 0.25},
     r"--kill-after 0.25 must be within the feeding, which lasts 0.25 s \(3 samples at 10/s\)"),
    ({"kill_device": "device-0", "kill_after": -1.0}, "--kill-after -1 must be within the feeding"),
    ({"restart_broker_after": 9.0}, "--restart-broker-after 9 must be within the feeding"),
])
def test_kill_and_restart_times_outside_the_feeding_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(TrialError, match=message):
        feeding_plan(options(rate=10.0, **kwargs), samples(3))


class Fleet:
    """Fake devices on a memory broker, a connected driver and the feeder's seams."""

    def __init__(self, tmp_path: Path, behaviours: dict[str, object] | None = None, devices: int = 2) -> None:
        self.broker = MemoryBroker()
        self.devices = {f"device-{d}": FakeDevice(self.broker, TOPICS, f"device-{d}", d,
                                                  (behaviours or {}).get(f"device-{d}", answer))  # type: ignore[arg-type]
                        for d in range(devices)}
        self.events = EventLog(tmp_path / "events.jsonl")
        self.events_path = tmp_path / "events.jsonl"
        self.driver: TrialDriver = connected_driver(self.broker, events=self.events)
        self.agents = FakeAgents(self.devices)
        self.restarted = 0

    def restart(self) -> int:
        self.restarted += 1
        self.broker.restart()
        return 2000 + self.restarted

    def feeder(self, deadline_ms: int = 1000, n: int = 4) -> Feeder:
        access = BrokerAccess("memory://", lambda account: None, 2000, self.restart)
        return Feeder(self.driver, self.agents, access, {d: f.expert for d, f in self.devices.items()},  # type: ignore[arg-type]
                      samples(n, len(self.devices)), deadline_ms, SilentBar())

    def event_kinds(self) -> list[str]:
        self.events.close()
        return [json.loads(line)["event"] for line in self.events_path.read_text().splitlines()]


def test_every_sample_is_sent_on_time_and_answered(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    plan = feeding_plan(options(rate=20.0), samples(4))
    feeding_s = fleet.feeder().run(plan)
    rows = fleet.driver.requests
    assert len(rows) == 8 and all(r.status == RequestStatus.ANSWERED for r in rows)
    assert [r.predicted for r in rows if r.device == "device-0"] == [0, 1, 2, 3]
    for step, r in zip(plan, rows, strict=True):
        assert (r.device, r.index) == (step.device, step.index)
        assert step.at_s <= r.sent_s < step.at_s + 2  # on time (generous: a loaded machine)
    assert feeding_s >= plan[-1].at_s and fleet.driver.pending() == 0


def test_a_killed_device_is_not_served_in_flight_nor_later(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path, {"device-1": silent})
    plan = feeding_plan(options(rate=20.0, kill_device="device-1", kill_after=0.1), samples(4))
    feeder = fleet.feeder()
    feeder.run(plan)
    assert fleet.agents.killed == ["device-1"] and 0.1 <= feeder.killed["device-1"] < 3
    by_device = {d: [(r.index, r.status, bool(r.id)) for r in fleet.driver.requests if r.device == d]
                 for d in fleet.devices}
    assert by_device["device-0"] == [(i, RequestStatus.ANSWERED, True) for i in range(4)]
    assert by_device["device-1"] == [(0, RequestStatus.NOT_SERVED, True), (1, RequestStatus.NOT_SERVED, True),
                                     (2, RequestStatus.NOT_SERVED, False), (3, RequestStatus.NOT_SERVED, False)]
    assert [(c.device, c.status) for c in fleet.driver.presence_changes()][-1] == ("device-1", "offline")
    kinds = fleet.event_kinds()
    assert kinds.count("kill") == 1 and kinds.count("not_served") == 4 and "timeout" not in kinds


def test_requests_without_an_answer_time_out_after_the_wait(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path, {"device-0": silent}, devices=1)
    feeder = fleet.feeder(deadline_ms=1, n=1)
    started = time.monotonic()
    feeder.run(feeding_plan(options(rate=20.0), samples(1, 1)))
    request, = fleet.driver.requests
    assert request.status == RequestStatus.TIMEOUT
    assert 0.5 <= time.monotonic() - started < 5  # START_WITHIN + 1 deadlines (3 ms) + WAIT_SLACK_S (0.5 s)


def test_a_broker_restart_pauses_the_feeding_until_everyone_is_back_and_shifts_the_rest(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    feeder = fleet.feeder()
    feeder.run(feeding_plan(options(rate=20.0, restart_broker_after=0.1), samples(4)))
    restart, = feeder.restarts
    assert fleet.restarted == 1 and restart.broker_pid == 2001
    assert restart.driver_reconnect_s is not None and restart.outage_s is not None
    assert 0 <= restart.driver_reconnect_s <= restart.outage_s
    rows = fleet.driver.requests
    assert len(rows) == 8 and all(r.status == RequestStatus.ANSWERED for r in rows)
    after = [r for r in rows if r.sent_s > restart.at_s]
    assert (after[0].device, after[0].index) == ("device-0", 2)  # the plan's sends at 0.1 s and later
    assert min(r.sent_s for r in after) >= restart.at_s + restart.outage_s - 0.001
    assert feeder.delay >= restart.outage_s - 0.001
    kinds = fleet.event_kinds()
    assert kinds.count("broker_restart") == kinds.count("broker_back") == 1


def test_a_device_that_dies_during_a_broker_restart_stops_the_trial_with_its_name(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    log = tmp_path / "device-1.log"
    log.write_text("starting\nnmoe agent: error: boom\n")
    fleet.agents.logs["device-1"] = log
    fleet.devices["device-1"].announce = False  # it never comes back online
    fleet.agents.exited = lambda: {"device-1": 3}  # type: ignore[method-assign]
    with pytest.raises(TrialError, match=r"^the broker restart at 0\.\d+ s: the agent of device-1 exited with "
                                         r"status 3 after the broker restart: nmoe agent: error: boom$"):
        fleet.feeder().run(feeding_plan(options(rate=20.0, restart_broker_after=0.1), samples(4)))


def test_a_stop_request_interrupts_the_feeding_and_leaves_the_rest_unsent(tmp_path: Path) -> None:
    fleet: Fleet

    def stop_at_the_second(device: str, request: ExpertRequest) -> list:
        if len(fleet.devices[device].requests) == 2:
            fleet.driver.request_stop()  # what SIGINT does
            return []
        return answer(device, request)

    fleet = Fleet(tmp_path, {"device-0": stop_at_the_second})
    with pytest.raises(KeyboardInterrupt):
        fleet.feeder().run(feeding_plan(options(rate=20.0), samples(4)))
    fleet.driver.abandon(RequestStatus.INTERRUPTED)  # what run_trial does on the way out
    rows = {(r.device, r.index): r.status for r in fleet.driver.requests}
    assert rows["device-0", 1] == RequestStatus.INTERRUPTED and fleet.driver.pending() == 0
    assert 3 <= len(rows) < 8 and set(rows.values()) <= {RequestStatus.ANSWERED, RequestStatus.INTERRUPTED}


def test_a_remote_fleet_s_absent_devices_are_named_and_not_fed(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path, devices=2)
    FakeDevice(fleet.broker, TOPICS, "device-2", 2, model="0" * 64)  # another model version
    FakeDevice(fleet.broker, TOPICS, "device-3", 3).kill()  # its will says offline
    experts = {f"device-{i}": i for i in range(5)}  # device-4 never announces itself
    started = time.monotonic()
    absent = absent_devices(fleet.driver, experts, 0.3)
    assert 0.3 <= time.monotonic() - started < 5
    assert absent == {"device-2": f"runs model 000000000000, not the bundles' {MODEL[:12]}",
                      "device-3": "offline", "device-4": "no presence within 0.3 s"}
    access = BrokerAccess("memory://", lambda account: None)  # type: ignore[arg-type,return-value]
    feeder = Feeder(fleet.driver, None, access, experts, samples(2, 5), 1000, SilentBar(), set(absent))
    feeder.run(feeding_plan(options(rate=20.0), samples(2, 5)))
    by_status = {(r.device, r.status) for r in fleet.driver.requests}
    assert by_status == {("device-0", RequestStatus.ANSWERED), ("device-1", RequestStatus.ANSWERED),
                         *((f"device-{i}", RequestStatus.NOT_SERVED) for i in (2, 3, 4))}
    assert all(r.id == "" for r in fleet.driver.requests if r.status == RequestStatus.NOT_SERVED)


def test_a_remote_fleet_with_nobody_ready_is_a_trial_error(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path, devices=0)
    FakeDevice(fleet.broker, TOPICS, "device-0", 0, model="0" * 64)
    with pytest.raises(TrialError, match=r"^no device of the fleet can take part: device-0 runs model 000000000000, "
                                         r"not the bundles' m{12}; device-1 no presence within 0.1 s$"):
        absent_devices(fleet.driver, {"device-0": 0, "device-1": 1}, 0.1)
