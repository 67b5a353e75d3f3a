"""Past one machine (issue 14): Stage 1 rounds in-process vs on Ray, inference through one broker vs across a bridge.

`python -m bench.scale` (run it with `nice -n 10` on a shared machine) writes docs/results/scale.md.

1. Stage 1 (FedCE) rounds of a 10-client Fashion-MNIST config (configs/quick.toml, a stratified
   subsample of the training set to keep the benchmark short), measured as wall time per round
   (training of every client + the per-round evaluation + the checkpoint), each executor in turn
   (in-process with torch's default threads, in-process with 1 thread, Ray with 2 workers x 1 thread),
   `--repeats` times interleaved so that the machine's changing load falls on every one alike.
   The Ray session is started before the measurements (its start-up is reported separately).
2. Expert round trips of a tiny fleet of in-process agents: device-0 and device-1 on the hub broker,
   device-2 on a second broker bridged to it (`nmoe broker --bridge-to`); device-0 classifies images
   and the round trips to expert 1 (same broker) and expert 2 (across the bridge) are compared, in
   the same run. Every inference must lose no expert.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.agent import TINY_OVERRIDES, load_fleet, train_export
from bench.common import ROOT, log, machine, other_load, pctl

OUT = ROOT / "docs" / "results" / "scale.md"
STAGE1 = ['stage1.methods=["fedce"]', 'baselines.methods=["fedavg"]', "gate.methods=[]"]


def say(msg: str) -> None:
    log("scale", msg)


def stage1_rounds(samples: int, rounds: int, repeats: int) -> tuple[dict[str, list[float]], float, str]:
    """Seconds per Stage 1 round by executor, Ray's start-up seconds, and the config used."""
    import torch

    from toolkit.config import load
    from toolkit.federated.ray_executor import RayExecutor
    from toolkit.federated_data import prepare
    from toolkit.pipeline import Pipeline

    overrides = [*STAGE1, f"data.max_train_samples={samples}", f"federated.rounds={rounds}"]
    cfg = load(ROOT / "configs" / "quick.toml", overrides)
    data = prepare(cfg.data)
    default_threads = torch.get_num_threads()
    start = time.perf_counter()
    ray = RayExecutor(num_cpus=2)
    startup = time.perf_counter() - start

    def run(threads: int, executor: RayExecutor | None) -> float:
        torch.set_num_threads(threads)
        with tempfile.TemporaryDirectory() as tmp:
            pipeline = Pipeline(cfg, Path(tmp), show_progress=False, data=data, executor=executor,
                                place=executor.place if executor else (lambda task: task))
            began = time.perf_counter()
            pipeline.recipe.stage1("fedce")
            return (time.perf_counter() - began) / rounds

    runs: dict[str, Callable[[], float]] = {
        f"in-process, torch {default_threads} threads (the default)": lambda: run(default_threads, None),
        "in-process, torch 1 thread": lambda: run(1, None),
        "Ray, 2 workers x 1 torch thread": lambda: run(1, ray),
    }
    run(1, ray)  # warm-up: worker processes import torch, the data goes into the object store
    times: dict[str, list[float]] = {name: [] for name in runs}
    for repeat in range(repeats):
        for name, measure in runs.items():
            times[name].append(measure())
            say(f"repeat {repeat + 1}/{repeats}: {name}: {times[name][-1]:.2f} s per round")
    ray.close()
    torch.set_num_threads(default_threads)
    return times, startup, f"`configs/quick.toml` with {', '.join(f'`{o}`' for o in overrides)}"


def bridge_round_trips(images_per_pass: int, passes: int) -> tuple[list[float], list[float], int, int]:
    """(round trips ms to the expert on the same broker, across the bridge, inferences, missing experts)."""
    from broker.bridge import Bridge
    from broker.process import BrokerOptions, start_broker
    from device_agent.agent import Agent
    from device_agent.device_models import DeviceModels
    from device_agent.wire.mqtt_transport import BrokerUrl, MqttSettings, MqttTransport

    bundles_dir = ROOT / "runs/bench/agent-tiny-bundles"
    train_export("tiny.toml", ROOT / "runs/bench/agent-tiny", bundles_dir, TINY_OVERRIDES, "fp32,int8")
    bundles = load_fleet(bundles_dir)
    images = np.concatenate([b.samples()["images"] for b in bundles.values()])
    same, across, inferences, missing = [], [], 0, 0
    with tempfile.TemporaryDirectory() as tmp, \
            start_broker(BrokerOptions(Path(tmp) / "hub", port=0)) as hub, \
            start_broker(BrokerOptions(Path(tmp) / "leaf", port=0, bridge=Bridge(hub.url))) as leaf:
        where = {0: hub, 1: hub, 2: leaf}
        agents = {e: Agent(b, MqttTransport(MqttSettings(BrokerUrl.parse(where[e].url), f"bench-{e}")),
                           DeviceModels.open(b)) for e, b in bundles.items() if e in where}
        try:
            for agent in agents.values():
                agent.start()
            for agent in agents.values():
                if not agent.wait_for_experts(set(agents), 30):
                    raise SystemExit(f"bench/scale: the agents did not see each other across the bridge: {agent.stats()}")
            for _ in range(passes):
                for image in images[:images_per_pass]:
                    result = agents[0].infer(image[None])
                    inferences += 1
                    missing += len(result.missing)
                    same += [ms for e, ms in result.remote_ms.items() if e == 1]
                    across += [ms for e, ms in result.remote_ms.items() if e == 2]
        finally:
            for agent in agents.values():
                agent.stop()
    return same, across, inferences, missing


def ms(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} | {pctl(values, 99):.3f} | {len(values)}"


def report(times: dict[str, list[float]], startup: float, config: str, same: list[float], across: list[float],
           inferences: int, missing: int, load_before: str, load_after: str, wall: float) -> str:
    m = machine()
    inproc_default, inproc_one, ray = (statistics.median(v) for v in times.values())
    names = list(times)
    speedup, parallel = inproc_default / ray, inproc_one / ray
    default_threads = names[0].split("torch ")[1].split(" ")[0]
    best = min(zip((inproc_default, inproc_one, ray), names))[1]
    rows = "\n".join(f"| {name} | {statistics.median(v):.2f} | {min(v):.2f} | {max(v):.2f} | "
                     f"{inproc_default / statistics.median(v):.2f}x |" for name, v in times.items())
    return f"""# Scale benchmark

Command: `nice -n 10 python -m bench.scale` (wrote this file after {wall:.0f} s of wall time).

Machine: {m['processor']}, {m['cpus']} cores, {m['platform']}, Python {m['python']}, torch {m['torch']}, {m['mosquitto']}.

Load: at start {load_before}. At end {load_after}. Other agents were building and testing on the same
2 cores during the run: absolute times are those of a shared machine; the ratios within each part
were measured in the same run, interleaved.

## 1. Stage 1 round wall time: in-process vs Ray

Config: {config} (10 clients, every client trains every round, FedCE evaluates every round).
Per round: every client's local epoch, the FedAvg aggregate, every client's evaluation (in this process)
and the checkpoint. {len(next(iter(times.values())))} repeats of {{in-process default, in-process 1 thread,
Ray}} interleaved; Ray's local start-up ({startup:.1f} s) and its warm-up job are not counted.

| executor | median s/round | min | max | speed-up vs in-process default |
|---|---:|---:|---:|---:|
{rows}

Ray vs in-process at torch's default threads (the issue's comparison): **{speedup:.2f}x** per round
(target >= 1.6x: {'met' if speedup >= 1.6 else 'missed'}). Fastest here: {best}.

Why: the two comparisons measure different things. Against the in-process run at 1 thread, Ray's gain
is what running two clients at once on 2 cores buys: **{parallel:.2f}x** (parallel efficiency
{parallel / 2:.0%}; less than 2x because the driver evaluates every client in this process, Ray adds a
task launch and a parameter copy per client, and the other processes on the machine take their share of
both cores). Against the default run the difference between the two in-process rows adds to it: torch's
{default_threads} intra-op threads split each small convolution of one client over both cores and wait for
each other at every operation; when other processes keep the cores busy those waits grow to many times
the work ({inproc_default / inproc_one:.1f}x slower than 1 thread here). On an idle machine that row is
close to the 1-thread row and the ratio approaches the parallel gain.

## 2. Inference round trip: one broker vs across a bridge

Two mosquitto brokers on loopback, the second with the `connection` section of `nmoe broker --bridge-to`
(broker/bridge.py: MQTT 5 bridge, QoS 1 link). Agents in this process: device-0 and device-1 on the hub,
device-2 on the bridged broker. device-0 classified {inferences} images one at a time (the tiny fleet's
samples); a round trip is the time from device-0's expert REQUEST to the RESPONSE for one peer expert.

| peer expert | median ms | p99 ms | trips |
|---|---:|---:|---:|
| expert 1, same broker | {ms(same)} |
| expert 2, across the bridge | {ms(across)} |

Across the bridge / same broker (medians): **{statistics.median(across) / statistics.median(same):.2f}x**.
Failed inferences: {missing} experts missing in {inferences} inferences.
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=12000, help="training images of the 10 clients together")
    parser.add_argument("--rounds", type=int, default=2, help="Stage 1 rounds per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved measurements per executor")
    parser.add_argument("--images", type=int, default=24, help="images per pass of the bridge measurement")
    parser.add_argument("--passes", type=int, default=20)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    began, load_before = time.perf_counter(), other_load()
    say("1. Stage 1 rounds: in-process vs Ray")
    times, startup, config = stage1_rounds(args.samples, args.rounds, args.repeats)
    say("2. inference round trips: one broker vs across a bridge")
    same, across, inferences, missing = bridge_round_trips(args.images, args.passes)
    text = report(times, startup, config, same, across, inferences, missing, load_before, other_load(),
                  time.perf_counter() - began)
    args.out.write_text(text)
    print(text)
    return 0 if missing == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
