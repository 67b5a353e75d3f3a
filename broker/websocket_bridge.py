"""MQTT over WebSockets next to mosquitto, and the web device's page, on one port.

Debian's mosquitto has no WebSockets listener, so browsers and phones (`android_demo/`) reach the
broker through this bridge: every WebSocket on `/mqtt` (subprotocol `mqtt`, no compression) gets
its own TCP (or TLS) connection to mosquitto, and bytes are copied both ways unchanged. MQTT's
CONNECT, with its username and password, goes through untouched, so `--auth` and the ACL apply to
a phone as to any device; a closed page closes its broker connection without a DISCONNECT, so
mosquitto publishes the device's last will. Any other GET is a file: the built app
(`android_demo/dist/`) at `/`, and with a bundles dir its `device-*/` folders at `/bundles/`
(`/bundles/index.json` lists them), so a phone on the LAN joins a fleet by opening a URL.

The bridge runs as a child process (`start_bridge`), like mosquitto: `python -m
broker.websocket_bridge ...` prints `{"port": N}` once it listens. Stdlib plus PyPI `websockets`
(imported by the child only).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import mimetypes
import re
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self
from urllib.parse import unquote, urlsplit

from broker.child_process import dies_with_parent, stop_child
from broker.errors import BrokerError
from broker.layout import FleetLayout
from broker.process import BrokerOptions, RunningBroker

APP_DIR = Path(__file__).resolve().parent.parent / "android_demo" / "dist"
MQTT_PATH = "/mqtt"
MAX_MESSAGE_BYTES = 2 << 20  # an MQTT packet is at most MAX_PAYLOAD + 1 KiB (broker/process.py)
MAX_CONNECTIONS = 512
START_TIMEOUT_S = 60.0  # a loaded 2-core machine starting a fleet of agents at the same time is slow
STOP_TIMEOUT_S = 5.0
_SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")
_TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm", ".json": "application/json",
          ".webmanifest": "application/manifest+json", ".svg": "image/svg+xml", ".onnx": "application/octet-stream"}


@dataclass(frozen=True)
class BridgeOptions:
    """Where the bridge listens, which broker it carries MQTT to, and what files it serves."""

    upstream: tuple[str, int]  # mosquitto's host and port (a wildcard host is reached on loopback)
    host: str = "127.0.0.1"
    port: int = 0  # 0: a free port
    upstream_ca: Path | None = None  # mosquitto speaks TLS: verify it with this CA
    cert: tuple[Path, Path] | None = None  # (certificate, key): serve wss:// and https://
    app_dir: Path | None = APP_DIR  # the built web app (None: no page)
    bundles_dir: Path | None = None  # serve BUNDLES/device-*/ at /bundles/

    def command(self) -> list[str]:
        """`python -m broker.websocket_bridge ...` for these options."""
        host, port = self.upstream
        args = [sys.executable, "-m", "broker.websocket_bridge", "--upstream", f"{host}:{port}",
                "--host", self.host, "--port", str(self.port)]
        if self.upstream_ca is not None:
            args += ["--upstream-ca", str(self.upstream_ca)]
        if self.cert is not None:
            args += ["--cert", str(self.cert[0]), "--key", str(self.cert[1])]
        if self.app_dir is not None:
            args += ["--app", str(self.app_dir)]
        if self.bundles_dir is not None:
            args += ["--bundles", str(self.bundles_dir)]
        return args


@dataclass
class RunningBridge:
    """A started bridge child process."""

    options: BridgeOptions
    port: int
    process: subprocess.Popen[bytes] = field(repr=False)

    @property
    def page_url(self) -> str:
        """The web app (and /bundles/) for a browser on this machine: http(s)://host:port/."""
        scheme = "https" if self.options.cert else "http"
        return f"{scheme}://{_reachable(self.options.host)}:{self.port}/"

    @property
    def url(self) -> str:
        """ws(s)://host:port/mqtt: what mqtt.js connects to."""
        scheme = "wss" if self.options.cert else "ws"
        return f"{scheme}://{_reachable(self.options.host)}:{self.port}{MQTT_PATH}"

    def stop(self) -> None:
        """SIGTERM, wait, SIGKILL if it hangs."""
        stop_child(self.process, STOP_TIMEOUT_S)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _reachable(host: str) -> str:
    """The address a local client uses for a listener on `host` (a wildcard is reached on loopback)."""
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def start_bridge(options: BridgeOptions, log: Path) -> RunningBridge:
    """Start the bridge as a child process (it dies with us) and wait until it listens; its output goes to `log`."""
    try:
        import websockets  # noqa: F401  -- the child needs it; fail here with one clear line
    except ImportError:
        raise BrokerError("the WebSocket bridge needs the Python package websockets: pip install "
                          "'nmoe-edge[web]' (scripts/setup.sh installs it)") from None
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as err:
        process = subprocess.Popen(dies_with_parent(options.command()), stdout=subprocess.PIPE, stderr=err,
                                   stdin=subprocess.DEVNULL, process_group=0)
    assert process.stdout is not None
    bridge = RunningBridge(options, 0, process)
    try:
        bridge.port = _read_port(process, log)
    except BaseException:
        bridge.stop()
        raise
    return bridge


def _read_port(process: subprocess.Popen[bytes], log: Path) -> int:
    """The port the child printed as `{"port": N}`, or BrokerError with the last line of its log."""
    import selectors

    with selectors.DefaultSelector() as sel:
        sel.register(process.stdout, selectors.EVENT_READ)  # type: ignore[arg-type]
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if sel.select(0.1):
                line = process.stdout.readline()  # type: ignore[union-attr]
                if line:
                    return int(json.loads(line)["port"])
                process.wait(STOP_TIMEOUT_S)
                break
            if process.poll() is not None:
                break
    lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
    if process.poll() is not None:
        raise BrokerError(f"the WebSocket bridge exited with status {process.returncode}: "
                          f"{lines[-1] if lines else 'no message'} (log: {log})")
    raise BrokerError(f"the WebSocket bridge did not listen within {START_TIMEOUT_S:.0f} s (log: {log})")


# next to `nmoe broker` -------------------------------------------------------------------------


def bridge_log(layout: FleetLayout) -> Path:
    """Where the bridge of a fleet dir writes its messages."""
    return layout.root / "websocket-bridge.log"


def check_bridge_options(options: BrokerOptions, port: int) -> None:
    """BrokerError for a --websockets PORT that cannot work with these broker options."""
    if not 0 <= port <= 65535:
        raise BrokerError(f"--websockets {port}: a port is 0..65535 (0: a free one)")
    if port != 0 and port == options.port:
        raise BrokerError(f"--websockets {port} is mosquitto's port too; choose another")
    if options.require_client_cert:
        raise BrokerError("--websockets cannot be combined with --require-client-cert: browsers do not present "
                          "the fleet's client certificates; use --auth (a phone logs in with its password)")


@contextmanager
def bridge_for(running: RunningBroker, port: int | None, bundles: Path | None) -> Iterator[RunningBridge | None]:
    """The bridge of `nmoe broker --websockets PORT` (None without it): same host, TLS and CA as the broker."""
    if port is None:
        yield None
        return
    o = running.options
    layout = o.layout
    options = BridgeOptions(
        (o.host, running.port), host=o.host, port=port, upstream_ca=layout.ca_cert if o.tls else None,
        cert=(layout.server_cert(o.host), layout.server_key(o.host)) if o.tls else None,
        app_dir=APP_DIR if (APP_DIR / "index.html").is_file() else None, bundles_dir=bundles)
    with start_bridge(options, bridge_log(layout)) as bridge:
        yield bridge


def print_bridge(running: RunningBroker, bridge: RunningBridge) -> None:
    """How browsers and phones join (after `nmoe broker`'s own lines)."""
    host = running.options.host
    shown = "<this machine's LAN address>" if host in ("0.0.0.0", "::") else host
    page = bridge.page_url.replace(_reachable(host), shown, 1)
    print(f"web devices: {page} (MQTT over WebSockets at {bridge.url.replace(_reachable(host), shown, 1)}, "
          f"bridge pid {bridge.process.pid})")
    if bridge.options.app_dir is None:
        print(f"warning: the web device is not built ({APP_DIR} is missing: cd {APP_DIR.parent} && npm ci && "
              "npm run build); only MQTT over WebSockets is served", file=sys.stderr)
    for account, credential in running.credentials.items():
        if credential.password_file is not None and account != "operator":
            print(f"  {account} joins at {page}#device={account} (password: {credential.password_file})")
    if host in ("127.0.0.1", "localhost", "::1"):
        print("  (listening on loopback only: for phones on the LAN, add --host 0.0.0.0 or this machine's address)")


def wait_either(mosquitto: subprocess.Popen[bytes], bridge: RunningBridge | None) -> tuple[str, int]:
    """Wait until mosquitto or the bridge exits: which one, and its status."""
    while True:
        if (status := mosquitto.poll()) is not None:
            return "mosquitto", status
        if bridge is not None and (status := bridge.process.poll()) is not None:
            return "the WebSocket bridge", status
        time.sleep(0.2)


# the child process ------------------------------------------------------------------------------


class StaticFiles:
    """GET responses for the app and the bundles; nothing outside those folders, no listing but index.json."""

    def __init__(self, app_dir: Path | None, bundles_dir: Path | None) -> None:
        self.app_dir = app_dir.resolve() if app_dir is not None else None
        self.bundles_dir = bundles_dir.resolve() if bundles_dir is not None else None

    def lookup(self, raw_path: str) -> tuple[int, str, bytes]:
        """(status, content type, body) for a request path."""
        path = unquote(urlsplit(raw_path).path)
        if path == "/bundles/index.json" and self.bundles_dir is not None:
            devices = sorted(p.name for p in self.bundles_dir.glob("device-*") if (p / "manifest.json").is_file())
            return 200, "application/json", json.dumps({"devices": devices}).encode()
        parts = [p for p in path.split("/") if p]
        if parts[:1] == ["bundles"] and self.bundles_dir is not None:
            if len(parts) != 3 or not parts[1].startswith("device-"):  # only files of device-*/ bundles
                return 404, "text/plain", b"not found\n"
            return self._file(self.bundles_dir, parts[1:], depth=2)
        if self.app_dir is None:
            return 404, "text/plain", b"no web app here\n"
        return self._file(self.app_dir, parts or ["index.html"], depth=3)

    def _file(self, root: Path, parts: Sequence[str], depth: int) -> tuple[int, str, bytes]:
        if not parts or len(parts) > depth or not all(_SAFE_NAME.fullmatch(p) for p in parts):
            return 404, "text/plain", b"not found\n"
        target = root.joinpath(*parts)
        if not target.is_file() or root not in target.resolve().parents:
            return 404, "text/plain", b"not found\n"
        kind = _TYPES.get(target.suffix) or mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        return 200, kind, target.read_bytes()


async def _relay(ws: Any, options: BridgeOptions, upstream_ssl: ssl.SSLContext | None) -> None:
    """Copy bytes between one WebSocket and its own broker connection until either side closes."""
    from websockets.exceptions import ConnectionClosed

    host, port = options.upstream
    try:
        reader, writer = await asyncio.open_connection(_reachable(host), port, ssl=upstream_ssl,
                                                       server_hostname=_reachable(host) if upstream_ssl else None)
    except (OSError, ssl.SSLError) as e:
        print(f"websocket bridge: cannot reach the broker at {host}:{port}: {e}", file=sys.stderr, flush=True)
        await ws.close(1011, "broker unreachable")
        return

    async def to_broker() -> None:
        async for message in ws:
            if isinstance(message, str):  # MQTT over WebSockets is binary only
                await ws.close(1003, "binary frames only")
                return
            writer.write(message)
            await writer.drain()

    async def to_client() -> None:
        while data := await reader.read(65536):
            await ws.send(data)

    tasks = [asyncio.ensure_future(to_broker()), asyncio.ensure_future(to_client())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except (asyncio.CancelledError, ConnectionClosed, OSError):
                pass
        writer.close()  # no DISCONNECT: mosquitto publishes the will of a page that went away
        await ws.close()


async def serve(options: BridgeOptions) -> None:
    """Listen until SIGTERM/SIGINT; print `{"port": N}` once listening."""
    from websockets.asyncio.server import ServerConnection
    from websockets.asyncio.server import serve as ws_serve
    from websockets.datastructures import Headers
    from websockets.http11 import Request, Response
    from websockets.typing import Subprotocol

    files = StaticFiles(options.app_dir, options.bundles_dir)
    upstream_ssl = ssl.create_default_context(cafile=str(options.upstream_ca)) if options.upstream_ca else None
    server_ssl = None
    if options.cert is not None:
        server_ssl = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ssl.minimum_version = ssl.TLSVersion.TLSv1_2
        server_ssl.load_cert_chain(options.cert[0], options.cert[1])
    active = 0

    def process_request(connection: ServerConnection, request: Request) -> Response | None:
        if urlsplit(request.path).path == MQTT_PATH:
            if active >= MAX_CONNECTIONS:
                return connection.respond(503, "too many connections\n")
            return None
        status, kind, body = files.lookup(request.path)
        # cross-origin isolation: precise timers and SharedArrayBuffer for the page; bundles stay readable by the app
        headers = Headers([("Content-Type", kind), ("Content-Length", str(len(body))), ("Cache-Control", "no-cache"),
                           ("Access-Control-Allow-Origin", "*"), ("Cross-Origin-Resource-Policy", "cross-origin"),
                           ("Cross-Origin-Opener-Policy", "same-origin"),
                           ("Cross-Origin-Embedder-Policy", "require-corp"), ("X-Content-Type-Options", "nosniff")])
        return Response(status, "OK" if status == 200 else "Not Found", headers, body)

    async def handler(ws: Any) -> None:
        nonlocal active
        active += 1
        try:
            await _relay(ws, options, upstream_ssl)
        finally:
            active -= 1

    stop = asyncio.get_running_loop().create_future()

    def request_stop() -> None:
        if not stop.done():
            stop.set_result(None)

    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, request_stop)
    async with ws_serve(handler, options.host, options.port, subprotocols=[Subprotocol("mqtt")], compression=None,
                        process_request=process_request, max_size=MAX_MESSAGE_BYTES, ssl=server_ssl,
                        server_header=None) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        print(json.dumps({"port": port}), flush=True)
        await stop


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def main(argv: Sequence[str] | None = None) -> int:
    """The child process: python -m broker.websocket_bridge --upstream HOST:PORT [options]."""
    p = argparse.ArgumentParser(prog="python -m broker.websocket_bridge", description=__doc__.split("\n\n")[0])
    p.add_argument("--upstream", type=_host_port, required=True, help="mosquitto's HOST:PORT")
    p.add_argument("--upstream-ca", type=Path, help="mosquitto speaks TLS: its CA")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--cert", type=Path, help="serve wss:// and https:// with this certificate ...")
    p.add_argument("--key", type=Path, help="... and key")
    p.add_argument("--app", type=Path, help="the built web app to serve at /")
    p.add_argument("--bundles", type=Path, help="serve BUNDLES/device-*/ at /bundles/")
    args = p.parse_args(argv)
    options = BridgeOptions(args.upstream, args.host, args.port, args.upstream_ca,
                            (args.cert, args.key) if args.cert and args.key else None, args.app, args.bundles)
    try:
        asyncio.run(serve(options))
    except OSError as e:
        print(f"websocket bridge: cannot listen on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
