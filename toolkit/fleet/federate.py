"""`nmoe federate`: the coordinator. The NMoE recipe of `nmoe train`, with device agents as clients.

The same `NMoERecipe`, strategies and round loop as the in-process simulation (toolkit.pipeline),
but every device is a `RemoteDevice` (one COMMAND per operation over MQTT, asked concurrently) and
clients are sampled from the devices whose presence is online. The run dir has the same contract
(config.json, checkpoints/, run.log, metrics.json, report.md, plots): `nmoe results` reads it, a
killed coordinator resumes from its last completed round with the same command. What differs:
- only the NMoE methods run: the baselines `local`, `fedavg_ft` and `centralized` need the server
  to hold every device's data, which a fleet never sends;
- OUT/fleet.json holds the run id (kept across restarts), the devices, the traffic and, after the
  commit, the model version the devices serve;
- the devices keep their private models: `nmoe export` cannot build their bundles (each device
  rebuilt its own at the commit).
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from device_agent.wire.events import EventLog
from device_agent.wire.protocol import Topics
from device_agent.wire.training_frames import Result
from device_agent.wire.training_link import DEFAULT_MAX_MESSAGE
from device_agent.wire.transport import Transport
from toolkit.artifacts import stage3_job
from toolkit.config import Config
from toolkit.federated.engine import ask
from toolkit.federated.executor import SendThenWait, ThreadPool
from toolkit.federated.recipe import NMoERecipe
from toolkit.fleet.fleet_link import FleetLink
from toolkit.fleet.remote_devices import FleetSession, Initializations, RemoteDevice
from toolkit.fleet.stage1_source import FEDAVG_JOB, take_stage1
from toolkit.run_files import FLEET_FILE
from toolkit.rundir import claim, finish, run_log, write_json
from toolkit.simulation import ModelFactory

log = logging.getLogger("nmoe")


class FederateError(RuntimeError):
    """The fleet cannot run this config (missing devices, inconsistent data, a failed commit)."""


@dataclass(frozen=True)
class FederateOptions:
    """How the coordinator reaches and drives the fleet."""

    prefix: str = "nmoe"
    fleet: str = "default"
    wait_s: float = 120.0  # for every device's presence, and for a quorum of them in a round
    task_timeout_s: float = 900.0  # a COMMAND's deadline when the config sets no round_timeout
    max_message: int = DEFAULT_MAX_MESSAGE
    device_threads: int = 0  # torch threads on torch devices (0: as many as this process uses)
    deploy: str | None = None  # "STAGE1/GATE" to commit after training; None: the first; "": no commit
    commit_precisions: tuple[str, ...] = ("fp32", "int8")
    show_progress: bool = True
    stage1_from: Path | None = None  # a finished run dir whose Stage 1 is taken (toolkit.fleet.stage1_source)


class LiveDevices:
    """The round loop's `Availability` on a fleet: clients whose device is online now."""

    def __init__(self, link: FleetLink, num_clients: int, wait_s: float) -> None:
        self.link, self.num_clients, self.wait_s = link, num_clients, wait_s

    def available(self, at_least: int) -> list[int]:
        """The online clients, waiting up to `wait_s` while fewer than `at_least` are."""
        everyone, end = set(range(self.num_clients)), time.monotonic() + self.wait_s
        while len(live := set(self.link.live()) & everyone) < at_least and time.monotonic() < end:
            time.sleep(0.1)
        return sorted(live)


def run_id(out: Path, cfg: Config) -> str:
    """This run's id on the fleet: kept in OUT/fleet.json, so a restarted coordinator continues it."""
    path = out / FLEET_FILE
    if path.exists():
        try:
            return str(json.loads(path.read_text())["run"])
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged fleet.json (it is rewritten below); the checkpoints hold the progress
    run = f"{cfg.hash()[:12]}-{secrets.token_hex(4)}"
    write_json(path, {"run": run})
    return run


def deployment(cfg: Config, deploy: str | None) -> tuple[str, str] | None:
    """(Stage 1 method, gate) to commit, or None; FederateError for a choice the config does not train."""
    if deploy == "":
        return None
    stage1, _, gate = (deploy or "").partition("/")
    stage1 = stage1 or cfg.stage1.methods[0]
    gate = gate or ("fedgate" if "fedgate" in cfg.gate.methods else cfg.gate.methods[0])
    if stage1 not in cfg.stage1.methods or gate not in cfg.gate.methods:
        raise FederateError(f"--deploy {deploy}: the config trains Stage 1 {cfg.stage1.methods} and gates "
                            f"{cfg.gate.methods}")
    return stage1, gate


def federate(cfg: Config, out: Path, transport: Transport, options: FederateOptions = FederateOptions(),
             events: EventLog | None = None, check: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Run (or resume) the NMoE recipe of `cfg` on the fleet reachable through `transport`; `check` is called
    while waiting for the devices (it may raise, e.g. when the agents it started have exited)."""
    if not cfg.stage1.methods or not cfg.gate.methods:
        raise FederateError("nothing to federate: the config selects no Stage 1 method or no gate")
    deploy = deployment(cfg, options.deploy)
    resuming = claim(out, cfg)
    with run_log(out):
        run = run_id(out, cfg)
        log.info("%s federated run %s in %s (config %s)", "resuming" if resuming else "starting", run, out,
                 cfg.hash()[:12])
        skipped = [b for b in cfg.baselines.methods if b != "fedavg"]
        if skipped:
            log.info("baselines %s are not run on a fleet: they need the server to hold the devices' data", skipped)
        start = time.perf_counter()
        taken = _take_stage1(cfg, out, options.stage1_from)
        link = FleetLink(Topics(options.prefix, options.fleet), options.max_message,
                         events or EventLog(out / "coordinator.jsonl"))
        link.connect(transport, options.wait_s)
        try:
            return _run(cfg, out, link, run, deploy, options, resuming, start, check, taken)
        finally:
            link.close()


def _run(cfg: Config, out: Path, link: FleetLink, run: str, deploy: tuple[str, str] | None,
         options: FederateOptions, resuming: bool, start: float, check: Callable[[], None],
         taken: list[str] | None = None) -> dict[str, Any]:
    n = cfg.data.num_clients
    missing = set(range(n)) - link.wait_live(set(range(n)), options.wait_s, check)
    if missing:
        raise FederateError(f"no online device holds expert(s) {sorted(missing)} after {options.wait_s:g} s "
                            f"(a config with data.num_clients={n} needs devices for experts 0..{n - 1})")
    timeout = cfg.federated.round_timeout or options.task_timeout_s
    session = FleetSession(link, run, timeout)
    at_start = {str(c): device for c, device in sorted(link.live().items()) if c < n}
    devices = [RemoteDevice(session, c) for c in range(n)]
    threads = options.device_threads or torch.get_num_threads()
    setups = _every(devices, "setup", lambda d: d.setup({**cfg.to_dict(), "torch_threads": threads}), timeout)
    models = ModelFactory(cfg, *_data_shape(setups))
    session.inits = Initializations(models, frozenset(c for c, r in enumerate(setups) if r.metrics.get("wants_init")))
    recipe = NMoERecipe(cfg, devices, models.initial, out / "checkpoints", executor=SendThenWait(),
                        availability=LiveDevices(link, n, options.wait_s), show_progress=options.show_progress)
    methods: dict[str, dict[str, Any]] = {}
    if "fedavg" in cfg.baselines.methods and taken is not None and FEDAVG_JOB not in taken:
        log.info("baseline fedavg skipped: it is Stage 1 fedce, which --stage1-from %s did not finish",
                 options.stage1_from)
    elif "fedavg" in cfg.baselines.methods:
        log.info("baseline fedavg (Stage 1 fedce, evaluated by the devices)")
        methods["fedavg"] = fedavg_metrics(recipe)
    for method in cfg.stage1.methods:
        log.info("nmoe stage 1 = %s", method)
        methods.update(recipe.nmoe(method))
    committed = _commit(cfg, out, recipe, devices, run, deploy, options, timeout) if deploy else None
    traffic = link.traffic()
    online = set(link.live())
    fleet = {"run": run, "devices": at_start, "offline_at_end": [c for c in range(n) if c not in online],
             "traffic": {"commands_bytes": traffic.sent, "results_bytes": traffic.received},
             "counters": dict(link.counters.snapshot()), "committed": committed, "device_threads": threads,
             "stage1_from": None if options.stage1_from is None else str(options.stage1_from)}
    write_json(out / FLEET_FILE, fleet)
    return finish(out, cfg, methods, time.perf_counter() - start, resuming, fleet=fleet)


def _take_stage1(cfg: Config, out: Path, source: Path | None) -> list[str] | None:
    """With --stage1-from: copy the source's finished Stage 1 jobs into OUT (the devices train no Stage 1)."""
    if source is None:
        return None
    taken = take_stage1(cfg, source, out / "checkpoints")
    log.info("Stage 1 taken from %s: %s (no device trains Stage 1)", source, ", ".join(taken))
    return taken


def fedavg_metrics(recipe: NMoERecipe[RemoteDevice]) -> dict[str, Any]:
    """The `fedavg` baseline on a fleet: Stage 1 FedCE's last round, as the devices evaluated it."""
    res = recipe.stage1("fedce")
    last = res.curve[-1] if res.curve else {}
    return {**{k: v for k, v in last.items() if k != "round"}, "curve": res.curve,
            "upload_bytes": res.ledger.total("up"), "download_bytes": res.ledger.total("down")}


def _every(devices: Sequence[RemoteDevice], op: str, call: Callable[[RemoteDevice], Result],
           timeout: float) -> list[Result]:
    """One call per device, concurrently; FederateError naming every device that failed."""
    answers, errors = ask(ThreadPool(), {d.cid: partial(call, d) for d in devices}, timeout)
    if errors:
        raise FederateError(f"{op} failed on {len(errors)} device(s): " +
                            "; ".join(f"client {cid}: {e}" for cid, e in errors[:4]))
    return [r for _, r in sorted(answers, key=lambda a: a[0])]


def _data_shape(setups: Sequence[Result]) -> tuple[tuple[int, int, int], int, int]:
    """(input shape, classes, clients) the devices' data files agree on; FederateError if they differ."""
    shapes = {(int(r.metrics["input_channels"]), int(r.metrics["input_height"]), int(r.metrics["input_width"]),
               int(r.metrics["num_classes"])) for r in setups}
    if len(shapes) != 1:
        raise FederateError(f"the devices' data files disagree on input shape / classes: {sorted(shapes)}")
    wrong = [(c, int(r.metrics["client"])) for c, r in enumerate(setups) if int(r.metrics["client"]) != c]
    if wrong:
        raise FederateError("a device's data file belongs to another client: " +
                            ", ".join(f"expert {c} has client {d}'s data" for c, d in wrong))
    c, h, w, classes = shapes.pop()
    return (c, h, w), classes, len(setups)


def model_version(run: str, stage1: str, gate: str) -> str:
    """The model version every device serves after committing (stage1, gate) of `run`."""
    return hashlib.sha256(f"{run}/{stage1}/{gate}".encode()).hexdigest()[:16]


def _commit(cfg: Config, out: Path, recipe: NMoERecipe[RemoteDevice], devices: Sequence[RemoteDevice], run: str, deploy: tuple[str, str],
            options: FederateOptions, timeout: float) -> dict[str, Any]:
    """Every device rebuilds its inference files with the final models and serves them."""
    stage1, gate = deploy
    job = stage3_job(stage1, gate)
    version = model_version(run, stage1, gate)
    config = {"stage1": stage1, "gate_job": None if gate == "rangate" else job, "num_experts": len(devices),
              "model_version": version, "precisions": list(options.commit_precisions), "config_hash": cfg.hash(),
              "provenance": {"run_dir": str(out.resolve()), "method": f"nmoe_{stage1}_{gate}"}}
    shared = recipe.gates.get(job, {})
    online = devices[0].session.link.live() if devices else {}
    live = [d for d in devices if d.cid in online]
    log.info("commit %s/%s as model version %s on %d of %d devices", stage1, gate, version, len(live), len(devices))
    started = time.perf_counter()
    answers, errors = ask(ThreadPool(), {d.cid: partial(d.commit, config, shared) for d in live},
                          max(timeout, 600.0))
    failed = {str(d.cid): "offline" for d in devices if d not in live} | {str(c): str(e) for c, e in errors}
    for cid, why in failed.items():
        log.warning("commit: client %s did not commit: %s", cid, why)
    return {"method": f"nmoe_{stage1}_{gate}", "model_version": version, "seconds": round(time.perf_counter() - started, 1),
            "committed": sorted(c for c, _ in answers), "failed": failed,
            "rebuild_s": [r.metrics.get("rebuild_s") for _, r in sorted(answers, key=lambda a: a[0])]}

