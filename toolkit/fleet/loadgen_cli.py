"""`nmoe loadgen`: simulated devices for sizing a broker and measuring a coordinator (docs/scale.md)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path

HELP = """\
Simulate N devices in one process: each announces a retained online presence for its expert and
answers the coordinator's federated-training COMMANDs (docs/protocol.md §16) with plausible RESULTs
(the right tensor names, shapes and dtype, finite values, example counts) after a drawn delay,
without training. Point `nmoe federate` at the same broker to measure the coordinator (or the broker)
at a fleet size no machine could run as real agents. Devices share connections (--per-connection);
MQTT keeps one last will per connection: see docs/scale.md for what that changes.

It runs until Ctrl-C, SIGTERM or --duration, then publishes every device's offline presence and
prints (or writes, --stats) its counters: commands by op, results by op and status, fit updates
sent in time, late and silent fits.
"""

EPILOG = """\
examples:
  nmoe broker --port 1883 &
  nmoe loadgen --devices 1000 --delay lognormal:0.2,0.5 --stats loadgen.json &
  nmoe federate configs/synthetic-1000.toml --out runs/fed1000 --set 'gate.methods=["fedgate"]' --deploy none
  nmoe loadgen --devices 500 --first-expert 500 --broker mqtt://leaf:1883 --failing 0.05 --silent 0.05
"""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `nmoe loadgen`."""
    p = subparsers.add_parser("loadgen", help="simulate N devices answering a coordinator (load generator)",
                              description=HELP, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, required=True, metavar="N", help="simulated devices")
    p.add_argument("--first-expert", type=int, default=0, metavar="E",
                   help="the devices hold experts E .. E+N-1 (default: 0); split a fleet over brokers with it")
    p.add_argument("--broker", default="mqtt://127.0.0.1:1883", metavar="URL", help="mqtt:// or mqtts:// (default: %(default)s)")
    p.add_argument("--username", metavar="U", help="log every connection in as U")
    p.add_argument("--password-file", type=Path, metavar="F", help="file holding U's password")
    p.add_argument("--tls-ca", type=Path, metavar="F", help="CA to verify an mqtts:// broker")
    p.add_argument("--per-connection", type=int, default=50, metavar="K",
                   help="devices per MQTT connection (default: 50; 1: one connection per device)")
    p.add_argument("--delay", default="lognormal:0.2,0.5", metavar="DIST",
                   help="time a device takes per task: fixed:S, uniform:LO,HI or lognormal:MEDIAN,SIGMA "
                        "(default: %(default)s)")
    p.add_argument("--failing", type=float, default=0.0, metavar="F", help="share of devices answering every fit with error")
    p.add_argument("--late", type=float, default=0.0, metavar="F", help="share answering every fit after its deadline")
    p.add_argument("--silent", type=float, default=0.0, metavar="F", help="share never answering a fit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="sim", help="devices are NAME-<expert> (default: sim)")
    p.add_argument("--prefix", default="nmoe", help="topic prefix (default: nmoe)")
    p.add_argument("--fleet", default="default", help="fleet id (default: default)")
    p.add_argument("--duration", type=float, default=0.0, metavar="S", help="stop after S seconds (default: run until stopped)")
    p.add_argument("--stats", type=Path, metavar="FILE", help="write the counters here (JSON) when stopping")
    p.set_defaults(func=_loadgen)


def _loadgen(args: argparse.Namespace) -> int:
    from broker.accounts import read_password
    from device_agent.wire.mqtt_transport import (
        BrokerUrl,
        BrokerUrlError,
        MqttSettings,
        MqttTransport,
    )
    from toolkit.fleet.load_generator import Delay, LoadGenerator, LoadOptions

    try:
        url = BrokerUrl.parse(args.broker)
        if (args.username is None) != (args.password_file is None):
            raise ValueError("--username and --password-file go together")
        password = read_password(args.password_file) if args.password_file else None
        options = LoadOptions(args.devices, args.first_expert, args.per_connection, Delay.parse(args.delay),
                              args.failing, args.late, args.silent, seed=args.seed, name=args.name,
                              prefix=args.prefix, fleet=args.fleet)
    except (BrokerUrlError, ValueError, OSError) as e:
        print(f"nmoe: error: {e}", file=sys.stderr)
        return 2
    generator = LoadGenerator(options, lambda client_id: MqttTransport(
        MqttSettings(url, client_id, args.username, password, args.tls_ca)))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    generator.start()
    if not generator.wait_connected(30):
        generator.stop()
        why = generator.failure() or "no answer in 30 s"
        print(f"nmoe: error: cannot connect to the broker at {args.broker} ({why}); is it running?", file=sys.stderr)
        return 2
    print(f"{args.devices} simulated devices (experts {args.first_expert}..{args.first_expert + args.devices - 1}) "
          f"on {generator.connections} connection(s) to {args.broker}", flush=True)
    end = time.monotonic() + args.duration if args.duration > 0 else float("inf")
    try:
        while not stop.wait(min(1.0, max(0.0, end - time.monotonic()))) and time.monotonic() < end:
            pass
    except KeyboardInterrupt:
        pass
    generator.stop()
    stats = generator.stats()
    if args.stats:
        args.stats.write_text(json.dumps(stats, indent=1) + "\n")
    print(json.dumps(stats))
    return 0
