"""The coordinator at N simulated devices (issue 14): its CPU, memory and wall time per round.

One measurement = one child process running the real coordinator (`toolkit.fleet.federate.federate`,
what `nmoe federate` runs) against `nmoe loadgen` in another process, on mosquitto (one broker, or
the coordinator on a hub and the devices on a leaf bridged to it by `nmoe broker --bridge-to`).
The child is the coordinator process: its CPU time (user + system, every thread: process CPU, not
wall) and resident memory are read at every round the round loop logs (`RoundMeter`).

    python -m bench.scale_coordinator --devices 1000 --sampled 100 --coordinator-broker URL --out DIR
                                    # the coordinator child: one run against devices already online, JSON on stdout
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parent.parent
ROUND_LOG = "%s: round %d fit %.3f s, evaluate %.3f s"  # toolkit.federated.engine.run_federated's per-round line
STARTED = ("baseline fedavg", "nmoe stage 1")  # toolkit.fleet.federate's lines once every device is set up
CONFIG = ROOT / "configs" / "synthetic-1000.toml"


@dataclass(frozen=True)
class RoundSample:
    """The coordinator process at the end of one round (wall and CPU since the previous round of the job)."""

    job: str
    round: int
    fit_s: float
    evaluate_s: float
    wall_s: float
    cpu_s: float
    rss_mb: float


def rss_mb(key: str = "VmRSS") -> float:
    """This process's resident memory (VmRSS) or its peak so far (VmHWM), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


class RoundMeter(logging.Handler):
    """Process CPU, wall time and RSS at every round line of the round loop; rounds after a job's first."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.samples: list[RoundSample] = []
        self._last: dict[str, tuple[float, float]] = {}  # job -> (wall, cpu) at its previous round
        self.startup_cpu = float("nan")  # process CPU until the first federated job starts (after every setup)

    def emit(self, record: logging.LogRecord) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        if str(record.msg).startswith(STARTED) and math.isnan(self.startup_cpu):
            self.startup_cpu = cpu
        if record.msg != ROUND_LOG or not isinstance(record.args, tuple):
            return
        job, rnd, fit, evaluate = cast(tuple[str, int, float, float], record.args)
        if job in self._last:
            w0, c0 = self._last[job]
            self.samples.append(RoundSample(str(job), int(rnd), float(fit), float(evaluate), wall - w0, cpu - c0,
                                            rss_mb()))
        self._last[str(job)] = (wall, cpu)


@dataclass
class Measurement:
    """What one coordinator run gave."""

    devices: int
    sampled: int
    rounds: list[RoundSample]
    peak_rss_mb: float
    startup_cpu_s: float  # connect, every presence, every device's setup: until the first job starts
    total_cpu_s: float  # the whole run, report included
    wall_s: float
    coordinator: dict[str, Any]  # fleet.json's counters
    failures: dict[str, int]  # the run's failures by "job.op.kind"
    fit_uploads: int  # fit RESULTs the round loop accepted (ledger "up" messages of every job)
    error: str = ""
    loadgen: dict[str, int] = field(default_factory=dict)  # the load generators' counters, summed

    @property
    def lost_updates(self) -> int:
        """Fit updates the devices sent before their deadline that the coordinator did not accept."""
        return self.loadgen.get("fit_updates_in_time", 0) - self.fit_uploads


def overrides(devices: int, sampled: int, rounds: int, gate_rounds: int, timeout: float, quorum: float) -> list[str]:
    """The synthetic-1000 config at `devices` clients, `sampled` per round, FedGate, a deadline and a quorum."""
    fraction = sampled / devices
    return [f"data.num_clients={devices}", f"federated.rounds={rounds}", f"federated.client_fraction={fraction}",
            f"federated.round_timeout={timeout}", f"federated.min_fit_fraction={quorum}",
            'gate.methods=["fedgate"]', f"gate.rounds={gate_rounds}", f"gate.client_fraction={fraction}",
            f"gate.round_timeout={timeout}", f"gate.min_fit_fraction={quorum}"]


def coordinate(broker: str, out: Path, config: list[str]) -> Measurement:
    """Run the coordinator in this process (the one measured) against devices online on `broker`."""
    import torch

    from device_agent.wire.mqtt_transport import BrokerUrl, MqttSettings, MqttTransport
    from toolkit.checkpoint import JobStore
    from toolkit.config import load
    from toolkit.federated.ledger import Ledger
    from toolkit.fleet.federate import FederateOptions, federate

    torch.set_num_threads(1)
    cfg = load(CONFIG, config)
    meter = RoundMeter()
    logger = logging.getLogger("nmoe")
    logger.addHandler(meter)
    logger.setLevel(logging.INFO)
    began, cpu0 = time.perf_counter(), time.process_time()
    transport = MqttTransport(MqttSettings(BrokerUrl.parse(broker), "bench-coordinator"))
    error, metrics = "", {}
    try:
        metrics = federate(cfg, out, transport, FederateOptions(wait_s=120, show_progress=False,
                                                               commit_precisions=("fp32",)))
    except Exception as e:  # noqa: BLE001 - reported in the measurement, not a crash of the benchmark
        error = f"{type(e).__name__}: {e}"
    wall, cpu = time.perf_counter() - began, time.process_time() - cpu0
    fleet = json.loads((out / "fleet.json").read_text()) if (out / "fleet.json").exists() else {}
    failures: dict[str, int] = {}
    for f in metrics.get("methods", {}).get("nmoe_fedce_fedgate", {}).get("failures", []):
        key = f"{f['job']}.{f['op']}.{f['kind']}"
        failures[key] = failures.get(key, 0) + 1
    uploads = 0
    for job in ("stage1_fedce", "stage3_fedce_fedgate"):
        saved = JobStore(out / "checkpoints", job).load()
        if saved:
            uploads += sum(m.direction == "up" for m in Ledger.from_json(saved.meta["ledger"]).messages)
    return Measurement(cfg.data.num_clients, round(cfg.federated.client_fraction * cfg.data.num_clients),
                       meter.samples, rss_mb("VmHWM"), meter.startup_cpu - cpu0, cpu, wall,
                       fleet.get("counters", {}), failures, uploads, error)


@contextlib.contextmanager
def load_generator(broker: str, devices: int, first: int, delay: str, stats: Path,
                   faults: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> Iterator[subprocess.Popen[str]]:
    """`nmoe loadgen` in its own process, its devices online; stopped (SIGTERM) and its counters in `stats`
    on exit. `faults`: shares of failing, late and silent devices."""
    cmd = [sys.executable, "-m", "toolkit.cli", "loadgen", "--devices", str(devices), "--first-expert", str(first),
           "--broker", broker, "--delay", delay, "--stats", str(stats), "--failing", str(faults[0]),
           "--late", str(faults[1]), "--silent", str(faults[2])]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        if "simulated devices" not in line:
            proc.kill()
            raise RuntimeError(f"nmoe loadgen did not start: {line}{proc.stderr.read() if proc.stderr else ''}")
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def measure(coordinator_broker: str, device_brokers: list[str], config: list[str], delay: str,
            faults: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> Measurement:
    """One coordinator run in a child process (`coordinate`), the devices split evenly over `device_brokers`
    (one load generator each); the load generators' counters added."""
    devices = int(next(o for o in config if o.startswith("data.num_clients=")).split("=")[1])
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        parts = len(device_brokers)
        bounds = [round(devices * i / parts) for i in range(parts + 1)]
        stats = [Path(tmp) / f"loadgen-{i}.json" for i in range(parts)]
        for i, url in enumerate(device_brokers):
            stack.enter_context(load_generator(url, bounds[i + 1] - bounds[i], bounds[i], delay, stats[i], faults))
        child = subprocess.run([sys.executable, "-m", "bench.scale_coordinator", "--coordinator-broker",
                                coordinator_broker, "--out", str(Path(tmp) / "run"), "--set", *config],
                               cwd=ROOT, capture_output=True, text=True, check=False)
        if child.returncode != 0:
            raise RuntimeError(f"the coordinator child failed: {child.stderr[-2000:]}")
        result = json.loads(child.stdout.splitlines()[-1])
        result["rounds"] = [RoundSample(**r) for r in result["rounds"]]
        m = Measurement(**result)
        stack.close()
        for path in stats:
            for key, n in json.loads(path.read_text()).items():
                m.loadgen[key] = m.loadgen.get(key, 0) + n
    return m


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--coordinator-broker", required=True, metavar="URL")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides (see overrides())")
    args = parser.parse_args()
    print(json.dumps(asdict(coordinate(args.coordinator_broker, args.out, args.set))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
