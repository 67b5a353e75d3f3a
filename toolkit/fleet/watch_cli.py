"""`nmoe fleet watch`: the live view of a fleet, in the terminal and/or as a web page (imports nothing heavy
until it runs)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

HELP = """\
Watch a fleet live: which devices are online with which model version, what each has served,
its latency percentiles and errors, and the routing matrix filling in, from the devices'
presences and telemetry (docs/protocol.md §4, §15). It only reads; run it next to `nmoe trial`
(local or --remote) or any fleet of `nmoe agent`s.

The terminal view redraws twice a second (Ctrl-C stops). --web PORT also serves a live web page
at http://HOST:PORT/ (its numbers at /state.json); --no-terminal serves only the page.

Telemetry is readable by the operator only (`nmoe broker --auth`): log in with --auth --fleet-dir
(the operator's password there) or --username/--password-file. A broker account holds one
connection at a time: while a trial driver is logged in as `operator`, watch with another
account that may read telemetry, or without --auth.
"""

EPILOG = """\
examples:
  nmoe fleet watch --broker mqtt://127.0.0.1:1883
  nmoe fleet watch --broker mqtt://127.0.0.1:1883 --web 8080
  nmoe fleet watch --broker mqtts://broker.lan:8883 --tls-ca fleet/tls/ca.crt --auth --fleet-dir fleet --web 8080 --no-terminal
"""
CONNECT_TIMEOUT_S = 10.0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `nmoe fleet` (subcommand `watch`)."""
    fleet = subparsers.add_parser("fleet", help="watch a running fleet (live terminal view and web page)")
    sub = fleet.add_subparsers(dest="fleet_command", required=True, metavar="COMMAND")
    p = sub.add_parser("watch", help="live view of a fleet's presence and telemetry", description=HELP, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--broker", required=True, metavar="URL", help="mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")
    p.add_argument("--auth", action="store_true", help="log in as `operator` with the password in --fleet-dir")
    p.add_argument("--fleet-dir", type=Path, default=Path("fleet"), metavar="DIR",
                   help="with --auth: the broker's fleet dir (default: ./fleet)")
    p.add_argument("--username", metavar="U", help="log in with this account ...")
    p.add_argument("--password-file", type=Path, metavar="F", help="... and the password in this file")
    p.add_argument("--tls-ca", type=Path, metavar="F", help="with mqtts://: CA certificate(s) (default: the system's)")
    p.add_argument("--tls-cert", type=Path, metavar="F", help="with mqtts://: client certificate")
    p.add_argument("--tls-key", type=Path, metavar="F", help="its private key")
    p.add_argument("--prefix", default="nmoe", metavar="P", help="topic prefix (default: nmoe)")
    p.add_argument("--fleet", default="default", metavar="F", help="fleet id (default: default)")
    p.add_argument("--web", type=int, metavar="PORT", help="also serve the live page on this port (0: a free one)")
    p.add_argument("--web-host", default="127.0.0.1", metavar="H", help="address of the page (default: 127.0.0.1)")
    p.add_argument("--no-terminal", action="store_true", help="no terminal view (with --web: the page only)")
    p.set_defaults(func=_watch)


def _watch(args: argparse.Namespace) -> int:
    from broker.accounts import OPERATOR
    from broker.layout import FleetLayout
    from device_agent.cli import _check_tls_files, _read_password
    from device_agent.wire.mqtt_transport import BrokerUrl, BrokerUrlError, MqttSettings
    from device_agent.wire.protocol import ProtocolError, Topics
    from toolkit.fleet.live_state import LiveFleet
    from toolkit.fleet.live_watch import FleetWatcher, WatchError
    from toolkit.fleet.live_web import LiveServer

    try:
        if args.no_terminal and args.web is None:
            raise ValueError("--no-terminal needs --web PORT (otherwise nothing would show)")
        if args.auth and args.username is not None:
            raise ValueError("--auth (the operator's password in --fleet-dir) or --username/--password-file, not both")
        if (args.username is None) != (args.password_file is None):
            raise ValueError("--username and --password-file go together")
        if args.web is not None and not 0 <= args.web <= 65535:
            raise ValueError(f"--web {args.web}: a port is 0..65535")
        url = BrokerUrl.parse(args.broker)
        if not url.tls and (args.tls_ca or args.tls_cert or args.tls_key):
            raise ValueError(f"--tls-ca/--tls-cert/--tls-key need an mqtts:// broker URL, got {args.broker}")
        _check_tls_files(args.tls_ca, args.tls_cert, args.tls_key)
        topics = Topics(args.prefix, args.fleet)
        username, password_file = args.username, args.password_file
        if args.auth:
            username, password_file = OPERATOR, FleetLayout.of(args.fleet_dir).password(OPERATOR)
        password = None if password_file is None else _read_password(password_file)
        settings = MqttSettings(url, f"{args.fleet}-watch-{os.getpid()}", username, password, args.tls_ca, args.tls_cert,
                                args.tls_key)
        fleet = LiveFleet(args.broker)
        watcher = FleetWatcher(topics, settings, fleet)
        watcher.start(CONNECT_TIMEOUT_S)
        server = None if args.web is None else LiveServer(fleet, args.web_host, args.web).start()
    except (ValueError, OSError, ProtocolError, BrokerUrlError, WatchError) as e:
        print(f"nmoe: error: {e}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if server is not None:
        print(f"nmoe fleet watch: live page at {server.url}", file=sys.stderr, flush=True)
    try:
        if args.no_terminal:
            stop.wait()
        else:
            from toolkit.fleet.live_terminal import run_terminal

            run_terminal(fleet, stop)
    finally:
        watcher.close()
        if server is not None:
            server.close()
    return 0
