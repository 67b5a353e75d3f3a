"""Federated training through device agents over MQTT vs the in-process simulation -> docs/results/federated.md.

    .venv/bin/python -m bench.federated [--config configs/quick.toml] [--set KEY=VALUE ...] [--no-disturbed]

In one invocation, on the same config and seeds:
  1. `nmoe train` in-process (the simulation), baselines reduced to `fedavg` (the one a fleet runs);
  2. `nmoe federate` through one `nmoe agent --data --trainer torch` process per client on a mosquitto
     of its own (all on this machine: the agents share its cores with the coordinator);
  3. the same with one device SIGKILLed during a FedGate round and restarted 5 s later, and with two
     stragglers (two agents SIGSTOPped 2/3 of the time: about 3x slower), gates reduced to fedgate.
Reported: accuracies (fleet vs in-process: equal?), wall time per round by job from both run.logs (the
ratio is the figure), PUBLISH bytes of the FIT commands and results vs the ledger's tensor bytes, the
other traffic (set-up, extractor, evaluation, commit), time to finish when disturbed, and accuracy then.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from bench.common import ROOT, log, machine, other_load, verdict
from broker.process import BrokerOptions, start_broker
from device_agent.wire.mqtt_transport import BrokerUrl, MqttSettings, MqttTransport
from toolkit.config import Config, load
from toolkit.fleet.agent_processes import AgentLaunch, AgentProcesses
from toolkit.fleet.device_data_files import write_fleet_data
from toolkit.fleet.federate import FederateOptions, federate
from toolkit.fleet.trial_federate import training_launches
from toolkit.rundir import train

WORK = ROOT / "runs" / "bench" / "federated"
NOTE = ("Reading the times: the in-process run is one process that trains the clients one after another; the fleet is "
        "one process per device, and the devices of a step train at the same time on the machine's cores. Stage 1 "
        "rounds (convolutions, seconds per client) gain from that parallelism, which is why they can be faster "
        "through the fleet; on a machine shared with other work (see the load above) the fleet's processes also get a "
        "larger share of the CPU than the one in-process run. Stage 3 rounds are short (small MLPs), so messaging "
        "and set-up show there.")
ROUND = re.compile(r"INFO (\S+): round (\d+) fit ([\d.]+) s, evaluate ([\d.]+) s")


def round_times(run_dir: Path) -> dict[str, list[float]]:
    """Job -> wall seconds (fit + evaluate) of each round, from run.log (the last run of each round)."""
    times: dict[str, dict[int, float]] = {}
    for m in ROUND.finditer((run_dir / "run.log").read_text()):
        times.setdefault(m[1], {})[int(m[2])] = float(m[3]) + float(m[4])
    return {job: [t for _, t in sorted(rounds.items())] for job, rounds in times.items()}


@contextmanager
def fleet_of(cfg: Config, work: Path) -> Iterator[tuple[str, AgentProcesses, list[AgentLaunch]]]:
    """A mosquitto and one training agent per client (no auth: the ACL is tested in tests/fleet)."""
    data = write_fleet_data(cfg, work / "data")
    with start_broker(BrokerOptions(work / "broker", port=0)) as broker, AgentProcesses() as agents:
        launches = training_launches(data, work, broker)
        for launch in launches:
            agents.start(launch)
        yield broker.url, agents, launches


def run_fleet(cfg: Config, work: Path, disturb: str | None = None) -> tuple[dict[str, Any], float]:
    """`nmoe federate` on a fresh fleet; (metrics, wall seconds from the coordinator's start)."""
    out = work / "run"
    with fleet_of(cfg, work) as (url, agents, launches):
        stop = threading.Event()
        if disturb == "kill":
            threading.Thread(target=_kill_during_fedgate, args=(out, agents, launches[3], stop), daemon=True).start()
        elif disturb == "stragglers":
            for launch in launches[1:3]:
                threading.Thread(target=_straggle, args=(agents.pid(launch.device), stop), daemon=True).start()
        transport = MqttTransport(MqttSettings(BrokerUrl.parse(url), "coordinator"))
        started = time.perf_counter()
        try:
            metrics = federate(cfg, out, transport, FederateOptions(wait_s=300, show_progress=False, deploy=""))
        finally:
            stop.set()
        return metrics, time.perf_counter() - started


def _kill_during_fedgate(out: Path, agents: AgentProcesses, launch: AgentLaunch, stop: threading.Event) -> None:
    """SIGKILL one agent once the FedGate job has checkpointed its 2nd round; restart it 5 s later."""
    while not stop.is_set() and not _round_done(out, "stage3_fedce_fedgate", 2):
        time.sleep(0.1)
    if stop.is_set():
        return
    agents.kill(launch.device)
    log("federated", f"killed {launch.device}")
    time.sleep(5)
    agents.start(launch)


def _round_done(out: Path, job: str, rnd: int) -> bool:
    path = out / "run.log"
    return path.exists() and f"{job}: round {rnd} fit" in path.read_text()


def _straggle(pid: int, stop: threading.Event) -> None:
    """About 3x slower: stopped 200 ms of every 300 ms."""
    try:
        while not stop.is_set():
            os.kill(pid, signal.SIGSTOP)
            time.sleep(0.2)
            os.kill(pid, signal.SIGCONT)
            time.sleep(0.1)
    except ProcessLookupError:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)


def ledger_bytes(metrics: dict[str, Any]) -> int:
    """Tensor bytes the ledger counts: Stage 1 once, plus each trained gate's rounds."""
    m = metrics["methods"]
    stage1 = m["fedavg"]["upload_bytes"] + m["fedavg"]["download_bytes"]
    gates = sum(v["upload_bytes"] + v["download_bytes"] - stage1 for k, v in m.items() if k.startswith("nmoe_"))
    return int(stage1 + gates)


def accuracy_rows(sim: dict[str, Any], fleet: dict[str, Any]) -> list[str]:
    rows = ["| method | in-process pers. / global | fleet pers. / global | equal |", "|---|---|---|---|"]
    for name, s in sim["methods"].items():
        f = fleet["methods"].get(name)
        if f is None:
            continue
        same = (s["personalized_accuracy"], s["global_accuracy"]) == (f["personalized_accuracy"], f["global_accuracy"])
        rows.append(f"| {name} | {100 * s['personalized_accuracy']:.2f} / {100 * s['global_accuracy']:.2f} | "
                    f"{100 * f['personalized_accuracy']:.2f} / {100 * f['global_accuracy']:.2f} | {'yes' if same else 'no'} |")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "quick.toml")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--no-disturbed", action="store_true", help="skip the killed-device and straggler runs")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads in-process and in every agent (default 1: with 2, a loaded machine "
                        "makes torch's threads wait for each other and a Stage 3 round takes minutes)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "federated.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)  # the agents get as many (FederateOptions.device_threads: the coordinator's)
    cfg = load(args.config, ['baselines.methods=["fedavg"]', *args.set])
    shutil.rmtree(WORK, ignore_errors=True)
    load_before = other_load()
    log("federated", "in-process simulation")
    began = time.perf_counter()
    sim = train(cfg, WORK / "sim", show_progress=False)
    sim_s = time.perf_counter() - began
    log("federated", f"fleet of {cfg.data.num_clients} agents")
    fleet, fleet_s = run_fleet(cfg, WORK / "fleet")
    sim_rounds, fleet_rounds = round_times(WORK / "sim"), round_times(WORK / "fleet" / "run")
    counters = fleet["fleet"]["counters"]
    fit_bytes = counters.get("bytes_sent_fit", 0) + counters.get("bytes_received_fit", 0)
    ledger = ledger_bytes(fleet)
    other = {op: counters.get(f"bytes_sent_{op}", 0) + counters.get(f"bytes_received_{op}", 0)
             for op in ("setup", "evaluate", "use_extractor", "train_expert", "prepare_gate")}
    disturbed: dict[str, tuple[dict[str, Any], float]] = {}
    if not args.no_disturbed:
        gate_cfg = load(args.config, ['baselines.methods=["fedavg"]', 'gate.methods=["fedgate"]', *args.set])
        log("federated", "undisturbed fedgate-only fleet")
        disturbed["undisturbed"] = run_fleet(gate_cfg, WORK / "undisturbed")
        for how in ("kill", "stragglers"):
            log("federated", f"fleet with {how}")
            disturbed[how] = run_fleet(gate_cfg, WORK / how, how)
    write_page(args.out, cfg, sim, sim_s, fleet, fleet_s, sim_rounds, fleet_rounds, fit_bytes, ledger, other,
               disturbed, load_before, other_load())
    log("federated", f"wrote {args.out}")


def write_page(out: Path, cfg: Config, sim: dict[str, Any], sim_s: float, fleet: dict[str, Any], fleet_s: float,
               sim_rounds: dict[str, list[float]], fleet_rounds: dict[str, list[float]], fit_bytes: int, ledger: int,
               other: dict[str, int], disturbed: dict[str, tuple[dict[str, Any], float]], load_before: str,
               load_after: str) -> None:
    equal = all(line.endswith("| yes |") for line in accuracy_rows(sim, fleet)[2:])
    lines = ["# Federated training through device agents over MQTT (bench/federated)", "",
             (f"Reproduce: `{shlex.join(['.venv/bin/python', '-m', 'bench.federated', *sys.argv[1:]])}` (this page; `make "
              "bench-federated` runs the quick config). The same config and seeds run in-process "
             f"(`nmoe train`) and through {cfg.data.num_clients} `nmoe agent --data --trainer torch` processes on one "
             "mosquitto (`nmoe federate`), all on this machine: the agents share its cores with the coordinator."), "",
             f"Machine: {json.dumps(machine())}", "",
             (f"Torch intra-op threads: {torch.get_num_threads()} in the in-process run and in every agent "
              "(`--threads`)."), "", f"Load before: {load_before}", "", f"Load after: {load_after}", "",
             (f"Config: `{cfg.data.dataset}`, {cfg.data.num_clients} clients, config hash `{cfg.hash()[:12]}`; "
             "baselines reduced to `fedavg` (the others need the server to hold the data)."), "",
             "## Accuracy: fleet vs in-process", "", *accuracy_rows(sim, fleet), "",
             f"Target: the torch fleet's accuracies equal the in-process run's exactly: {verdict(equal)}.", "",
             "## Wall time per round (fit + evaluate), median over the job's rounds", "",
             "| job | in-process s | fleet s | fleet / in-process |", "|---|---|---|---|"]
    ratios_stage3 = []
    for job, times in sorted(sim_rounds.items()):
        if job not in fleet_rounds:
            continue
        a, b = statistics.median(times), statistics.median(fleet_rounds[job])
        lines.append(f"| {job} | {a:.3f} | {b:.3f} | {b / a:.2f}x |")
        if job.startswith("stage3"):
            ratios_stage3.append(b / a)
    worst = max(ratios_stage3) if ratios_stage3 else float("nan")
    lines += ["", NOTE, "", (f"Whole run: in-process {sim_s:.1f} s, fleet {fleet_s:.1f} s ({fleet_s / sim_s:.2f}x; the fleet's "
              "includes the agents' set-up and the commit-free end)."),
              f"Target: Stage 3 rounds at most 1.5x in-process: worst {worst:.2f}x, {verdict(worst <= 1.5)}.", "",
              "## Bytes on the wire", "",
              (f"FIT commands and results (PUBLISH packets: topic, framing, JSON header, tensors, chunking): "
              f"{fit_bytes:,} B; the ledger's tensor bytes of the same rounds: {ledger:,} B; ratio "
              f"{fit_bytes / ledger:.3f} (target at most 1.05: {verdict(fit_bytes <= 1.05 * ledger)})."), "",
              "Traffic the ledger does not count (the recipe's other operations): " +
              ", ".join(f"{op} {b:,} B" for op, b in other.items()) + ".", ""]
    if disturbed:
        base, _base_s = disturbed["undisturbed"]
        ref = base["methods"]["nmoe_fedce_fedgate"]
        lines += ["## Failures (gates reduced to fedgate)", "",
                  "| run | wall s | fedgate pers. / global | Δ vs undisturbed (points) | failures recorded |",
                  "|---|---|---|---|---|"]
        ok = True
        for name, (m, secs) in disturbed.items():
            g = m["methods"]["nmoe_fedce_fedgate"]
            delta = max(abs(g[k] - ref[k]) for k in ("personalized_accuracy", "global_accuracy")) * 100
            ok = ok and delta <= 0.5
            lines.append(f"| {name} | {secs:.1f} | {100 * g['personalized_accuracy']:.2f} / "
                         f"{100 * g['global_accuracy']:.2f} | {delta:.2f} | {len(g.get('failures', []))} |")
        lines += ["", ("kill: device-3 SIGKILLed once the FedGate job logged its 2nd round, restarted 5 s later (it "
                  "resumes with its persisted state); stragglers: device-1 and device-2 stopped 200 ms of every "
                  "300 ms (about 3x slower)."),
                  f"Target: the runs complete and accuracy stays within 0.5 points: {verdict(ok)}.", ""]
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
