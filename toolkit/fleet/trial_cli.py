"""`nmoe trial`: the command line of `toolkit.fleet.trial` (imports nothing heavy until it runs)."""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from device_agent.cli import positive_int

if TYPE_CHECKING:
    from toolkit.fleet.trial_summary import TrialSummary

HELP = """\
Run a field trial of a fleet's bundles over a real MQTT broker, and report how it went: a local
one (it starts the broker and the agents) or, with --remote, one of agents that already run.

  1. starts mosquitto in OUT/fleet on a free port (or uses --broker); with --auth every device
     gets its own account and the trial driver connects as `operator` (docs/broker.md); with
     --tls it listens for TLS only (mqtts://), with a fleet CA and a certificate per account made
     in OUT/fleet, which the driver and the agents use;
  2. starts one `nmoe agent` process per bundle BUNDLES/device-*/ (with the trial's --prefix,
     --fleet, credentials and TLS files) and waits until every agent's presence is online;
  3. feeds each device its OWN personalized test images (the first N of its split in the run dir
     the bundles were exported from) as inference requests on infer/{device}/req, one image per
     request, --rate requests per second per device, all devices at once; an agent must start a
     request within 2 x --deadline-ms, and the driver waits --deadline-ms more for the answer,
     plus 0.5 s, before it counts the request as failed;
  4. with --kill-device, SIGKILLs that agent --kill-after seconds into the feeding: the broker
     publishes its last will (offline), the other agents re-route to live experts, and the killed
     device's remaining samples are reported as not served (not as failures of the fleet);
  5. with --restart-broker-after, pauses the feeding that many seconds in until the requests in
     flight are settled, stops the trial's own mosquitto (SIGTERM: it publishes the agents' wills
     and saves the retained messages) and starts it again on the same port and fleet dir; the
     driver and the agents reconnect by themselves, and the feeding resumes, shifted by the pause,
     once every live agent's presence is online again (not with --broker);
  6. stops the agents (SIGTERM, then SIGKILL after 5 s) and the broker, computes the same samples
     in-process with LocalNMoE, and writes OUT/trial.json (every number; docs/trial.md),
     OUT/events.jsonl (the driver's events), OUT/events/<device>.jsonl (each agent's), OUT/logs/
     and OUT/report.html.

The report gives accuracy per device and overall (over MQTT vs in-process), latency median/p95/p99
by path (local: only the device's own expert answered; remote: at least one peer expert did), from
the driver's round trips and the agents' own timings, bytes on the wire between agents per
inference vs the raw input, the routing matrix, re-routes and failures, and the exactness check:
every answered prediction is compared with LocalNMoE's, per device. An input whose chosen experts
did not all answer (an expert re-routed, timed out or busy, or replaced by the device's own) is
counted as degraded and may legitimately differ; with fp32 latents the check fails only on a
mismatch among the inputs whose chosen experts all answered. Which experts answered comes from
the agents' event logs: an answered input no event describes (a --remote fleet's, whose logs
stay on the devices) counts as if its chosen experts all answered.

--remote: the agents already run, on their devices or elsewhere (`nmoe agent`, with their own
accounts). The trial starts nothing: it connects to --broker (as `operator` with --auth
--fleet-dir, or with --username/--password-file), waits up to --online-timeout for the presence of
every device of BUNDLES (retained presences count), and feeds those online with the bundles' model
version. The others are named in the summary and the report as absent (no presence, offline, or
another model version), their samples as not served, and the exit status is 1. --precision and
--runtime say what the agents run (LocalNMoE computes the reference with them), --latent-encoding
what they send; --kill-device and --restart-broker-after are refused (the trial owns no agent and
no broker). The report lacks the agents' own timings, paths and bytes (their logs stay with them).

With --broker, the broker is yours: --auth reads the passwords `nmoe broker --auth` keeps in
--fleet-dir, and an mqtts:// URL is verified with --tls-ca (default: the system's CAs), with
--tls-cert/--tls-key as the client certificate of the driver and every agent. --prefix and --fleet
name the topics ({prefix}/{fleet}/..., docs/protocol.md), as for `nmoe agent` and `nmoe broker`.

--arm64-devices N runs the agents of the last N devices (before those of --web-devices) as
aarch64 programs under qemu-user: emulated Raspberry Pis (Cortex-A72, a Pi 4; set
QEMU_CPU=cortex-a76 for a Pi 5), with Debian's arm64 Python and the aarch64 wheels of the agent's
packages from the cache scripts/arm64_env.sh builds once (~250 MB in ~/.cache/nmoe-edge/arm64;
`make arm64-env`), and the project's own code. They announce presence, serve their experts to the
x86 agents and classify with the fleet over the same broker; with fp32 latents the exactness
check holds for them too. Emulation is ~300x slower than a real board: this checks the agent's
correctness on ARM, not its speed. Size the trial for it: few samples, a low --rate, a long
--deadline-ms and --online-timeout (an emulated agent takes tens of seconds to start on a loaded
machine).

Ctrl-C or SIGTERM stops everything cleanly and still writes the partial results.
Exit status: 0 done; 1 a request to a live device failed, or, with fp32 latents, a prediction
differs from LocalNMoE's for an input whose chosen experts all answered (mismatches among degraded
inputs are reported, not counted), or a device of a --remote fleet was absent; 2 unusable options
or bundles (one `nmoe: error:` line); 130 interrupted.
"""

EPILOG = """\
examples:
  nmoe trial --bundles runs/quick-bundles                                   # 50 samples per device at 10/s
  nmoe trial --bundles runs/quick-bundles --samples 200 --rate 20 --out runs/t1
  nmoe trial --bundles runs/quick-bundles --kill-device device-3 --kill-after 2
  nmoe trial --bundles runs/quick-bundles --restart-broker-after 2          # the broker restarts mid-run
  nmoe trial --bundles runs/quick-bundles --auth --latent-encoding int8
  nmoe trial --bundles runs/quick-bundles --auth --tls --prefix lab --fleet bench1
  nmoe trial --bundles runs/quick-bundles --runtime tflite --precision int8 --deadline-ms 500
  nmoe trial --bundles runs/quick-bundles --web-devices 2                   # 2 of the devices in headless Chromium
  nmoe broker --auth --bundles runs/quick-bundles &                         # your own broker:
  nmoe trial --bundles runs/quick-bundles --broker mqtt://127.0.0.1:1883 --auth --fleet-dir fleet
  nmoe trial --bundles runs/quick-bundles --broker mqtts://127.0.0.1:8883 --tls-ca fleet/tls/ca.crt
  nmoe trial --bundles runs/quick-bundles --remote --broker mqtt://broker.lan:1883 --auth --fleet-dir fleet
  nmoe trial --bundles runs/quick-bundles --arm64-devices 2 --samples 3 --rate 0.5 --deadline-ms 20000 \
             --online-timeout 600                                         # two emulated Raspberry Pis
"""


def _positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `nmoe trial`."""
    p = subparsers.add_parser("trial", help="run the fleet's agents over MQTT on local test data and report",
                              description=HELP, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundles", required=True, type=Path, metavar="DIR", help="bundles written by `nmoe export`")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="where the results go (default: runs/trial-<timestamp>; an earlier trial's outputs there "
                        "are replaced)")
    p.add_argument("--broker", metavar="URL", help="use this broker (mqtt://HOST:PORT) instead of starting one")
    p.add_argument("--fleet-dir", type=Path, metavar="DIR",
                   help="with --broker and --auth: the broker's fleet dir holding credentials/ (default: ./fleet)")
    p.add_argument("--auth", action="store_true", help="per-device accounts and an ACL; the driver is `operator`")
    p.add_argument("--tls", action="store_true",
                   help="the trial's own mosquitto speaks TLS only, with a generated fleet CA (not with --broker)")
    p.add_argument("--tls-ca", type=Path, metavar="F",
                   help="with an mqtts:// --broker: CA certificate(s) to verify it (default: the system's)")
    p.add_argument("--tls-cert", type=Path, metavar="F",
                   help="with an mqtts:// --broker: client certificate of the driver and every agent")
    p.add_argument("--tls-key", type=Path, metavar="F", help="that certificate's private key")
    p.add_argument("--remote", action="store_true",
                   help="the agents already run: start nothing, feed the devices present on --broker")
    p.add_argument("--username", metavar="U", help="with --remote: the driver's broker user name")
    p.add_argument("--password-file", type=Path, metavar="F", help="with --remote: file holding its password")
    p.add_argument("--online-timeout", type=_positive_float, default=120.0, metavar="S",
                   help="how long to wait for every device's presence (default: 120)")
    p.add_argument("--prefix", default="nmoe", metavar="P", help="topic prefix (default: nmoe)")
    p.add_argument("--fleet", default="default", metavar="F", help="fleet id (default: default)")
    p.add_argument("--samples", type=positive_int, default=50, metavar="N",
                   help="test images per device (default: 50; fewer if its split is smaller)")
    p.add_argument("--rate", type=_positive_float, default=10.0, metavar="R",
                   help="requests per second per device (default: 10)")
    p.add_argument("--kill-device", metavar="ID", help="SIGKILL this device's agent during the feeding")
    p.add_argument("--kill-after", type=float, metavar="S", help="seconds into the feeding to kill it")
    p.add_argument("--restart-broker-after", type=float, metavar="S",
                   help="restart the trial's own mosquitto (same port and files) S seconds into the feeding; the "
                        "agents reconnect and the feeding resumes once they are all online again")
    p.add_argument("--latent-encoding", choices=("fp32", "fp16", "int8"), default="fp32",
                   help="how agents send latents to peers (default: fp32, exact)")
    p.add_argument("--precision", choices=("fp32", "int8"),
                   help="models to run (default: fp32 if the bundles have it, else int8)")
    p.add_argument("--runtime", choices=("onnx", "tflite", "executorch"), default="onnx",
                   help="model format the agents run (default: onnx)")
    p.add_argument("--deadline-ms", type=positive_int, default=1000, metavar="MS",
                   help="how long an agent waits for peer experts (default: 1000)")
    p.add_argument("--web-devices", type=int, default=0, metavar="N",
                   help="run the last N devices as web devices (android_demo/) in headless Chromium, reaching the "
                        "broker through a WebSocket bridge (default: 0)")
    p.add_argument("--arm64-devices", type=positive_int, default=0, metavar="N",
                   help="run the agents of the last N devices (before the web devices) as aarch64 programs under "
                        "qemu-user (slow: see above)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_trial)


def _trial(args: argparse.Namespace) -> int:
    if (args.kill_device is None) != (args.kill_after is None):
        print("nmoe: error: --kill-device and --kill-after go together", file=sys.stderr)
        return 2
    from broker.errors import BrokerError
    from device_agent.bundle import BundleError
    from device_agent.runtime import UnsupportedFormat
    from device_agent.wire.mqtt_transport import BrokerUrlError
    from toolkit.fleet.trial import ARM64_CPU, TrialOptions, run_trial
    from toolkit.fleet.trial_driver import TrialError
    from toolkit.fleet.trial_report import summary_text

    out = args.out or Path("runs") / f"trial-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    options = TrialOptions(
        args.bundles, out, broker=args.broker, fleet_dir=args.fleet_dir, samples=args.samples, rate=args.rate,
        auth=args.auth, tls=args.tls, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
        prefix=args.prefix, fleet=args.fleet, remote=args.remote, username=args.username,
        password_file=args.password_file, online_timeout=args.online_timeout, kill_device=args.kill_device, kill_after=args.kill_after,
        restart_broker_after=args.restart_broker_after, latent_encoding=args.latent_encoding,
        precision=args.precision, runtime=args.runtime, deadline_ms=args.deadline_ms, show_progress=not args.quiet,
        web_devices=args.web_devices, arm64_devices=args.arm64_devices,
        arm64_cpu=os.environ.get("QEMU_CPU") or ARM64_CPU)
    try:
        result = run_trial(options)
    except (TrialError, BundleError, BrokerError, BrokerUrlError, UnsupportedFormat) as e:
        print(f"nmoe: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before anything was started
        print("\nnmoe trial: interrupted before the feeding began; nothing was written", file=sys.stderr)
        return 130
    print(summary_text(result.summary))
    print(f"\nreport: {result.report}")
    if result.interrupted:
        print("nmoe trial: interrupted; partial results written", file=sys.stderr)
        return 130
    return 0 if _healthy(result.summary) else 1


def _healthy(summary: TrialSummary) -> bool:
    """No request to a live device failed, fp32 latents gave LocalNMoE's predictions, and every device of a
    remote fleet took part."""
    exact = summary.exactness.exact or summary.fleet.latent_encoding != "fp32"
    return summary.counts.failed == 0 and exact and not summary.fleet.absent
