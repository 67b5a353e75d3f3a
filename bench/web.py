"""Web device benchmark (android_demo/ in headless Chromium), written to docs/results/web.md.

    .venv/bin/python -m bench.web [--bundles DIR] [--trips N] [--calls N] [--no-install] [--out FILE]

Measures, in one invocation:
  1. the remote-expert round trip Python requester -> web device (mqtt.js over the WebSocket bridge,
     its expert in onnxruntime-web) -> Python, median and p95, as a ratio to the same round trip to
     an `nmoe agent` process serving another expert of the same fleet through the same mosquitto,
     interleaved in blocks in the same run (target: at most 3x);
  2. the web device's local inference (preprocess + extractor + gate + own expert, batch 1) in
     onnxruntime-web, fp32 and int8, median and p95, next to ONNX Runtime in Python on the same files;
  3. what the browser tests add to CI: `npm ci` from an empty cache, the app's build, node_modules
     and Chromium on disk (and, as root, `apt-get install --reinstall chromium`).

Bundles: --bundles DIR (ONNX fp32 and int8, 3+ devices), else configs/tiny.toml trained and exported
here (runs/bench/web-tiny-bundles, reused).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.agent import TINY_OVERRIDES, FleetClient, launch, load_fleet, train_export
from bench.common import ROOT, machine, other_load, pctl, verdict
from bench.common import log as bench_log
from broker.process import BrokerOptions, start_broker
from device_agent.bundle import Bundle
from device_agent.device_models import model_version
from device_agent.nmoe_local import preprocess
from device_agent.runtime import open_runtime
from device_agent.wire.clock import now_ms
from device_agent.wire.protocol import ExpertRequest, ExpertResponse, Topics, encode
from toolkit.fleet.agent_processes import AgentLaunch, AgentProcesses
from toolkit.fleet.web_devices import CHROMIUM, DEMO_DIR, WebDevices

TARGET_RATIO = 3.0
REQUESTER = "bench-requester"
WEB_FP32, WEB_INT8 = "web device, fp32 (onnxruntime-web)", "web device, int8 (onnxruntime-web)"


def log(msg: str) -> None:
    bench_log("web", msg)


def fleet(args: argparse.Namespace) -> tuple[dict[int, Bundle], str]:
    if args.bundles:
        bundles = load_fleet(Path(args.bundles))
        config = Path(str(next(iter(bundles.values())).manifest.provenance.get("run_dir"))) / "config.json"
        origin = f"`{args.bundles}`"
        if config.is_file():
            data = json.loads(config.read_text())["data"]
            origin = f"given bundles of a {data['num_clients']}-client {data['dataset']} run"
        return bundles, origin
    run, out = ROOT / "runs/bench/web-tiny", ROOT / "runs/bench/web-tiny-bundles"
    train_export("tiny.toml", run, out, [*TINY_OVERRIDES, "data.num_clients=3"], "fp32,int8")
    return load_fleet(out), "`configs/tiny.toml` (3 clients) trained and exported here (`runs/bench/web-tiny-bundles`)"


def stats(values: list[float]) -> str:
    return f"{pctl(values, 50):.3f} / {pctl(values, 95):.3f}"


def round_trip(client: FleetClient[None], bundles: dict[int, Bundle], python_expert: int, web_expert: int,
               trips: int, blocks: int) -> dict[str, list[float]]:
    """Closed-loop 1-latent expert requests to each expert, `blocks` alternating blocks each."""
    out: dict[str, list[float]] = {"python": [], "web": [], "web_compute": [], "python_compute": []}
    for b in range(blocks):
        for who, e in (("python", python_expert), ("web", web_expert)):
            server = bundles[e]
            latent = server.samples()["latent"][:1].astype(np.float32)
            version, device = model_version(server), server.manifest.device_id

            def frame(cid: bytes, e: int = e, latent: np.ndarray = latent, version: str = version) -> bytes:
                return encode(ExpertRequest(cid, e, now_ms() + 5000, version, client.inbox, latent, "fp32"))

            warmup = 50 if b == 0 else 10
            for i in range(warmup + trips // blocks):
                call = client.requester.send(client.topics.expert_request(e), device, e, frame, 5.0, None)
                if not client.requester.wait([call], time.monotonic() + 5) or \
                        not isinstance(call.reply, ExpertResponse):
                    raise SystemExit(f"bench/web: expert {e} did not answer: {call.fate} {call.reply}")
                if i >= warmup:
                    out[who].append(1000 * (call.round_trip_s or 0.0))
                    out[f"{who}_compute"].append(call.reply.compute_us / 1000)
        log(f"  block {b + 1}/{blocks}: python {pctl(out['python'], 50):.3f} ms, web {pctl(out['web'], 50):.3f} ms")
    return out


def python_models(bundle: Bundle, precision: str, calls: int) -> list[float]:
    """ONNX Runtime in Python on the same files: preprocess + extractor + gate + expert, batch 1."""
    run = {role: open_runtime(bundle, bundle.model(role, precision, "onnx")) for role in ("extractor", "gate", "expert")}
    image = bundle.samples()["images"][:1]
    times = []
    for i in range(calls + 20):
        t0 = time.perf_counter()
        z = run["extractor"].run(preprocess(image, bundle.manifest.input))
        run["gate"].run(z)
        run["expert"].run(z)
        if i >= 20:
            times.append(1000 * (time.perf_counter() - t0))
    return times


def web_models(web: WebDevices, device: str, bundle: Bundle, calls: int) -> list[float]:
    pixels = bundle.samples()["images"][0].ravel().tolist()
    times = web.evaluate(device, f"return await window.nmoe.timeModels({pixels}, {calls + 20})", timeout_s=300)
    return [float(t) for t in times[20:]]


def ci_cost(install: bool) -> dict[str, str]:
    """Install time and disk of what the browser tests need."""
    out: dict[str, str] = {}
    sizes = subprocess.run(["dpkg-query", "-W", "-f=${Package} ${Installed-Size}\n", "chromium", "chromium-common"],
                           capture_output=True, text=True, check=False).stdout.split()
    if sizes:
        kib = sum(int(v) for v in sizes[1::2])
        out["Chromium packages on disk (dpkg Installed-Size of chromium, chromium-common)"] = f"{kib / 1024:.0f} MB"
    nm = DEMO_DIR / "node_modules"
    du = subprocess.run(["du", "-sm", str(nm), str(DEMO_DIR / "dist")], capture_output=True, text=True, check=False)
    for line in du.stdout.splitlines():
        mb, path = line.split(None, 1)
        out[f"`{Path(path).relative_to(ROOT)}` on disk"] = f"{mb} MB"
    t0 = time.monotonic()
    subprocess.run(["npm", "run", "--silent", "build"], cwd=DEMO_DIR, check=True)
    out["`npm run build` (esbuild + copying the wasm)"] = f"{time.monotonic() - t0:.1f} s"
    if install:
        with tempfile.TemporaryDirectory() as tmp:
            for f in ("package.json", "package-lock.json"):
                shutil.copy(DEMO_DIR / f, tmp)
            t0 = time.monotonic()
            subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error", "--cache", f"{tmp}/cache"],
                           cwd=tmp, check=True, capture_output=True)
            out["`npm ci` from an empty npm cache (download + unpack)"] = f"{time.monotonic() - t0:.1f} s"
        if os.geteuid() == 0:
            t0 = time.monotonic()
            subprocess.run(["apt-get", "install", "--reinstall", "-y", "-qq", "chromium", "chromium-common"],
                           check=True, capture_output=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
            out["`apt-get install --reinstall chromium chromium-common` (download + unpack)"] = \
                f"{time.monotonic() - t0:.1f} s"
    return out


def write(path: Path, args: argparse.Namespace, how: str, fleet_info: str, rt: dict[str, list[float]],
          models: dict[str, list[float]], cost: dict[str, str], load_before: str, load_after: str) -> None:
    ratio = pctl(rt["web"], 50) / pctl(rt["python"], 50)
    m = machine()
    browser = subprocess.run([CHROMIUM, "--version"], capture_output=True, text=True, check=False).stdout.strip()
    node = subprocess.run(["node", "--version"], capture_output=True, text=True, check=False).stdout.strip()
    lines = [
        "# Web device benchmark (`python -m bench.web`)", "",
        f"Written by `bench/web.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Fleet: {how}; {fleet_info}.",
        "",
        (f"Machine: {m['processor']}, {m['cpus']} cores, {m['platform']}; Python {m['python']}, {m['mosquitto']}, "
        f"paho-mqtt {m['paho']}, onnxruntime {m['onnxruntime']}; {browser} (headless), Node {node}, "
        "onnxruntime-web 1.30.0 (WebAssembly, 1 thread), mqtt.js 5.16.0."), "",
        f"Load: before {load_before}; after {load_after}.", "",
        "## Targets", "",
        "| target | measured | verdict |", "|---|---|---|",
        (f"| remote-expert round trip Python -> web device -> Python, median, at most {TARGET_RATIO:g}x the Python agent's "
        f"| {pctl(rt['web'], 50):.3f} ms vs {pctl(rt['python'], 50):.3f} ms = **{ratio:.2f}x** | {verdict(ratio <= TARGET_RATIO)} |"),
        ("| web device local inference, fp32 and int8, median / p95 | "
        f"fp32 {stats(models[WEB_FP32])} ms, int8 {stats(models[WEB_INT8])} ms | reported |"),
        "| CI cost of the browser tests under 3 minutes | see below | see below |", "",
        "## 1. Remote-expert round trip", "",
        (f"A Python requester (paho, TCP_NODELAY) sends one 1-latent fp32 expert REQUEST at a time (closed loop) to "
        f"expert {args.python_expert} (an `nmoe agent` process) and to expert {args.web_expert} (a web device: Chromium, "
        "mqtt.js over `ws://` to the bridge, `broker/websocket_bridge.py`, then TCP to mosquitto), alternating blocks; "
        f"{len(rt['python'])} trips each after warm-up. Milliseconds:"), "",
        "| server | round trip median / p95 | server compute (its `compute_us`) median / p95 |", "|---|---|---|",
        f"| `nmoe agent` (Python, ONNX Runtime) | {stats(rt['python'])} | {stats(rt['python_compute'])} |",
        f"| web device (Chromium, onnxruntime-web) | {stats(rt['web'])} | {stats(rt['web_compute'])} |", "",
        ("The web device's extra hops: the bridge (a Python asyncio relay: WebSocket frame <-> TCP bytes) in both "
        "directions, and the browser's WebSocket and mqtt.js parsing; its model call is the WebAssembly build of "
        "ONNX Runtime."), "",
        "## 2. Local inference on the device (batch 1)", "",
        (f"preprocess + extractor + gate + own expert on one of the bundle's sample images, {len(models[WEB_FP32])} "
        "calls after 20 warm-up calls; web: `WebDevice.timeModels` in the page (the bridge serves the page "
        "cross-origin isolated, so `performance.now()` has microsecond resolution). Milliseconds:"), "",
        "| runtime | median / p95 |", "|---|---|",
        *[f"| {k} | {stats(v)} |" for k, v in models.items()], "",
        "## 3. CI cost", "",
        "What `scripts/setup.sh` adds for the browser tests, and what they take:", "",
        "| item | measured |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in cost.items()], "",
        ("The tests themselves (`tests/web/`, timed in the full `pytest` run) are listed with their durations in "
        "`android_demo/README.md`."), "",
    ]
    path.write_text("\n".join(lines))
    log(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundles", help="ONNX fp32 + int8 bundles of 3+ devices")
    p.add_argument("--trips", type=int, default=400, help="round trips per server (default: 400)")
    p.add_argument("--calls", type=int, default=300, help="local inference calls per runtime (default: 300)")
    p.add_argument("--no-install", action="store_true", help="skip timing npm ci / apt-get install")
    p.add_argument("--out", type=Path, default=ROOT / "docs/results/web.md")
    args = p.parse_args()
    bundles, how = fleet(args)
    experts = sorted(bundles)
    if len(experts) < 3:
        raise SystemExit("bench/web: needs 3+ devices")
    args.python_expert, args.web_expert, int8_expert = experts[0], experts[1], experts[2]
    first = bundles[experts[0]].manifest
    fleet_info = (f"{len(experts)} devices, input {list(first.input.shape)}, latent {first.latent_dim}, "
                  f"{first.num_classes} classes")
    load_before = other_load()
    with tempfile.TemporaryDirectory(prefix="bench-web-") as tmp_name:
        tmp = Path(tmp_name)
        with start_broker(BrokerOptions(tmp / "fleet", port=0)) as broker, WebDevices(tmp) as web, \
                AgentProcesses() as procs:
            url = broker.url
            launch(procs, bundles[args.python_expert], url, "default", tmp)
            for e, precision in ((args.web_expert, "fp32"), (int8_expert, "int8")):
                d = bundles[e].manifest.device_id
                web.start(AgentLaunch(d, ("--bundle", str(bundles[e].path), "--broker", url, "--precision",
                                          precision, "--events", str(tmp / f"{d}.jsonl")), tmp / f"{d}.log"))
            web.wait_online({bundles[e].manifest.device_id for e in (args.web_expert, int8_expert)})
            client: FleetClient[None] = FleetClient(url, Topics(), REQUESTER)
            try:
                client.wait_online({args.python_expert, args.web_expert, int8_expert},
                                   model_version(bundles[args.python_expert]), 60)
                log(f"1. round trip: {args.trips} trips to the Python agent and to the web device")
                rt = round_trip(client, bundles, args.python_expert, args.web_expert, args.trips, 4)
            finally:
                client.close()
            log("2. local inference")
            models = {
                WEB_FP32: web_models(web, bundles[args.web_expert].manifest.device_id, bundles[args.web_expert],
                                     args.calls),
                WEB_INT8: web_models(web, bundles[int8_expert].manifest.device_id, bundles[int8_expert], args.calls),
                "Python, fp32 (ONNX Runtime)": python_models(bundles[args.web_expert], "fp32", args.calls),
                "Python, int8 (ONNX Runtime)": python_models(bundles[int8_expert], "int8", args.calls),
            }
    log("3. CI cost")
    cost = ci_cost(not args.no_install)
    write(args.out, args, how, fleet_info, rt, models, cost, load_before, other_load())


if __name__ == "__main__":
    main()
