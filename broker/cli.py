"""`nmoe broker`: the fleet's mosquitto with a generated config, credentials, ACL and TLS files.

toolkit.cli loads this as a plugin; the broker modules are imported by the command itself.
"""

from __future__ import annotations

import argparse
import ipaddress
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from broker.errors import BrokerError

if TYPE_CHECKING:
    from broker.process import BrokerOptions, RunningBroker

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

HELP = """\
Run the fleet's MQTT broker: mosquitto as a child process with a generated config, until Ctrl-C
or SIGTERM stops it (cleanly: retained messages are saved).

Everything lives in the fleet dir (--fleet-dir): mosquitto.conf, mosquitto.log, the persistence
store mosquitto/ (retained presences survive a restart), and with --auth / --tls the credentials.
The broker listens on 127.0.0.1 unless --host says otherwise, with TCP_NODELAY and a 1 MiB payload
limit (larger messages are dropped).

--auth: an account per device, from --devices N (device-0 .. device-N-1, holding experts
0 .. N-1) or --bundles DIR (each DIR/device-*/manifest.json written by `nmoe export`), plus
`operator` for the trial driver, coordinator and apps. Passwords are generated once into
FLEET/credentials/<account>.password (mode 0600) and kept across restarts. Anonymous clients are
refused; the username is the client id (one connection per account: a device cannot take over
another's session), and the ACL allows
  a device  to publish: its presence, its replies (reply/+/<device>), expert requests (expert/+/req)
            to read:    presence/+, reply/<device>/+, expert/<its expert>/req, infer/<device>/req
  operator  to publish: infer/+/req, expert/+/req;  to read: presence/+, reply/operator/+
(topics under <prefix>/<fleet>/, see docs/protocol.md). Anything else is silently dropped.

--tls: the listener speaks TLS only (mqtts://, default port 8883). A fleet CA (FLEET/tls/ca.crt),
a server certificate for --host (also valid for 127.0.0.1 and localhost) and a certificate per
account (FLEET/credentials/<account>.crt and .key) are made with openssl once and kept.
--require-client-cert also refuses clients without a certificate of the fleet CA.

--websockets PORT also starts a WebSocket endpoint carrying MQTT to mosquitto (ws://HOST:PORT/mqtt,
wss:// with --tls; the same accounts and ACL) and serves the web device (android_demo/, built by
scripts/setup.sh) at http://HOST:PORT/, with --bundles their folders at /bundles/: a phone on the
LAN joins the fleet by opening that URL (docs/broker.md, android_demo/README.md).

--print-config prints mosquitto.conf (and with --auth the ACL) for a mosquitto you run yourself,
and starts nothing; make its password file with `mosquitto_passwd`.
"""

EPILOG = """\
examples:
  nmoe broker                                     # mqtt://127.0.0.1:1883, anonymous, files in ./fleet
  nmoe broker --auth --devices 3                  # device-0..2 + operator; passwords in fleet/credentials/
  nmoe broker --auth --bundles bundles/quick --fleet-dir fleets/quick --port 0   # any free port
  nmoe broker --auth --tls --require-client-cert --devices 3 --host 192.168.1.10
  nmoe broker --auth --devices 3 --print-config   # config + ACL for your own mosquitto
  nmoe broker --auth --bundles bundles/quick --host 0.0.0.0 --websockets 9001   # phones join at http://HOST:9001/
  nmoe broker --port 1884 --fleet-dir fleet-b --bridge-to mqtt://127.0.0.1:1883  # a second broker, bridged
"""


class _Stop(Exception):
    """A stop signal arrived (SIGINT, SIGTERM or SIGHUP)."""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `nmoe broker`."""
    p = subparsers.add_parser("broker", help="run the fleet's MQTT broker (mosquitto) with credentials and ACL",
                              description=HELP, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fleet-dir", type=Path, default=Path("fleet"), metavar="DIR",
                   help="config, log, persistence and credentials (default: ./fleet)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, metavar="P",
                   help="TCP port; 0 picks a free one (default: 1883, with --tls 8883)")
    p.add_argument("--auth", action="store_true", help="per-account passwords and ACL; no anonymous clients")
    p.add_argument("--tls", action="store_true", help="TLS-only listener with a generated fleet CA")
    p.add_argument("--require-client-cert", action="store_true",
                   help="with --tls: clients must present a certificate of the fleet CA")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--devices", type=int, metavar="N", help="accounts device-0 .. device-N-1 (experts 0 .. N-1)")
    who.add_argument("--bundles", type=Path, metavar="DIR", help="accounts for the bundles DIR/device-*/")
    p.add_argument("--prefix", default="nmoe", help="topic prefix of the ACL (default: nmoe)")
    p.add_argument("--fleet", default="default", help="fleet id of the ACL (default: default)")
    p.add_argument("--websockets", type=int, metavar="PORT",
                   help="also serve MQTT over WebSockets and the web device on PORT (0: a free port)")
    bridge = p.add_argument_group("bridging to another broker (docs/scale.md)")
    bridge.add_argument("--bridge-to", metavar="URL",
                        help="forward the fleet's topics (<prefix>/<fleet>/#) both ways to and from the broker "
                             "at URL (mqtt://HOST:PORT or mqtts://...): devices on either broker form one fleet")
    bridge.add_argument("--bridge-name", default="nmoe-bridge", metavar="NAME",
                        help="the bridge's connection name and client id on that broker (default: nmoe-bridge)")
    bridge.add_argument("--bridge-username", metavar="USER", help="account of the bridge on that broker")
    bridge.add_argument("--bridge-password-file", type=Path, metavar="FILE", help="its password (first line)")
    bridge.add_argument("--bridge-ca", type=Path, metavar="FILE", help="CA of that broker's TLS certificate")
    p.add_argument("--print-config", action="store_true",
                   help="print mosquitto.conf (and the ACL) and exit without starting anything")
    p.set_defaults(func=_broker)


def _broker(args: argparse.Namespace) -> int:
    try:
        options = _options(args)
        if args.websockets is not None:
            from broker.websocket_bridge import check_bridge_options

            check_bridge_options(options, args.websockets)
        return _print_config(options) if args.print_config else _serve(options, args.bundles, args.websockets)
    except BrokerError as e:
        print(f"nmoe: error: {e}", file=sys.stderr)
        return 2


def _options(args: argparse.Namespace) -> BrokerOptions:
    from broker.accounts import fleet_accounts, fleet_accounts_from_bundles
    from broker.bridge import Bridge
    from broker.process import BrokerOptions

    if args.auth and args.devices is None and args.bundles is None:
        raise BrokerError("--auth needs the fleet's devices: --devices N or --bundles DIR")
    if args.print_config and args.port == 0:
        raise BrokerError("--print-config needs a fixed --port")
    if args.devices is not None:
        accounts = fleet_accounts(args.devices)
    else:
        accounts = fleet_accounts_from_bundles(args.bundles) if args.bundles else ()
    port = args.port if args.port is not None else (8883 if args.tls else 1883)
    return BrokerOptions(args.fleet_dir, port=port, host=args.host, auth=args.auth, tls=args.tls,
                         require_client_cert=args.require_client_cert, accounts=accounts,
                         prefix=args.prefix, fleet=args.fleet,
                         bridge=Bridge(args.bridge_to, args.bridge_name, args.bridge_username,
                                       args.bridge_password_file, args.bridge_ca) if args.bridge_to else None)


def _print_config(options: BrokerOptions) -> int:
    from broker.acl import render_acl
    from broker.process import render_config

    layout = options.layout
    print(f"# ---- mosquitto.conf ({layout.config}) ----")
    print(render_config(options, options.port), end="")
    if options.auth:
        print(f"\n# ---- password_file {layout.password_file}: one line per account, made with\n"
              f"#   mosquitto_passwd -c -b {layout.password_file} {options.account_names[0]} PASSWORD; "
              f"then without -c for: {', '.join(options.account_names[1:])}")
        print(f"\n# ---- acl_file ({layout.acl_file}) ----")
        print(render_acl(options.topics, options.accounts), end="")
    return 0


def _serve(options: BrokerOptions, bundles: Path | None, websockets: int | None = None) -> int:
    """Start the broker, print how to connect, wait for a stop signal; the child never outlives us."""
    from broker.process import start_broker
    from broker.websocket_bridge import bridge_for, bridge_log, print_bridge, wait_either

    previous = {sig: signal.signal(sig, _on_stop_signal) for sig in STOP_SIGNALS}
    try:
        with start_broker(options) as running, bridge_for(running, websockets, bundles) as bridge:

            def show_bridge() -> None:
                if bridge is not None:
                    print_bridge(running, bridge)

            _print_started(running, bundles, show_bridge)
            name, status = wait_either(running.process, bridge)
        log = options.layout.log if name == "mosquitto" else bridge_log(options.layout)
        print(f"nmoe: error: {name} exited with status {status}; see {log}", file=sys.stderr)
        return 1
    except _Stop as e:
        print(f"nmoe broker: stopped ({e})", file=sys.stderr)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _on_stop_signal(signum: int, frame: FrameType | None) -> None:
    for sig in STOP_SIGNALS:  # a second Ctrl-C must not interrupt the stop in progress
        signal.signal(sig, signal.SIG_IGN)
    raise _Stop(signal.Signals(signum).name)


def _print_started(running: RunningBroker, bundles: Path | None, more: Callable[[], object] = lambda: None) -> None:
    options, layout = running.options, running.options.layout
    print(f"nmoe broker: {running.url} (mosquitto pid {running.process.pid})")
    print(f"fleet dir: {layout.root} (mosquitto.conf, mosquitto.log, persistence in mosquitto/)")
    if _exposed(options):
        print(f"warning: listening on {options.host} without --auth: anyone who reaches the port may "
              "read and publish everything", file=sys.stderr)
    if options.accounts:
        print("accounts: " + ", ".join(f"{d.device_id} (expert {d.expert_id})" for d in options.accounts)
              + ", operator")
    device = options.accounts[0].device_id if options.accounts else "device-0"
    bundle = (bundles or Path("BUNDLES")) / device
    print(f"an agent connects with:\n  nmoe agent --bundle {bundle} {_connect_args(running, device)}")
    if running.credentials:
        print("the operator (trial driver, coordinator, apps) with:\n  " + _connect_args(running, "operator"))
    more()
    print("Ctrl-C or SIGTERM stops it.", flush=True)


def _connect_args(running: RunningBroker, account: str) -> str:
    """`--broker ... --username ...` options for `account` (no credentials without --auth / --tls)."""
    credential = running.credentials.get(account)
    args = ["--broker", running.url]
    if credential and credential.password_file:
        args += ["--username", credential.username, "--password-file", str(credential.password_file)]
    if credential and credential.ca_file:
        args += ["--tls-ca", str(credential.ca_file)]
        if running.options.require_client_cert:
            args += ["--tls-cert", str(credential.cert_file), "--tls-key", str(credential.key_file)]
    return " ".join(args)


def _exposed(options: BrokerOptions) -> bool:
    """Listening beyond loopback without authentication."""
    try:
        loopback = ipaddress.ip_address(options.host).is_loopback
    except ValueError:
        loopback = options.host == "localhost"
    return not (loopback or options.auth)
