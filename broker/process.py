"""mosquitto as a child process: a generated config, a free loopback port, a clean stop.

`start_broker(BrokerOptions(...))` is the one way tests, `nmoe broker` and `nmoe trial` start the
fleet's broker. With `auth` it writes per-account passwords and an ACL, with `tls` a CA and
certificates; `RunningBroker.credentials` says where. Stdlib only (plus the protocol's topics):
mosquitto is the Debian binary, never a Python dependency.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Self

from broker.accounts import (
    OPERATOR,
    Device,
    FleetCredential,
    ensure_passwords,
    password_file_text,
)
from broker.acl import render_acl
from broker.child_process import dies_with_parent
from broker.errors import BrokerError
from broker.layout import FleetLayout, write_private
from broker.tls import ensure_tls
from device_agent.wire.protocol import ProtocolError, Topics

__all__ = ["BrokerError", "BrokerOptions", "RunningBroker", "free_port", "render_config", "start_broker",
           "write_credentials"]

MOSQUITTO = "mosquitto"
MAX_PAYLOAD_BYTES = 1 << 20  # a latent batch is a few KB; nothing legitimate comes near this
PACKET_OVERHEAD_BYTES = 1024  # fixed header, topic (<= 256 B) and MQTT 5 properties
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class BrokerOptions:
    """What to start: where it listens, where it keeps its files, and who may connect."""

    fleet_dir: Path
    port: int = 1883  # 0: pick a free port
    host: str = "127.0.0.1"
    max_payload_bytes: int = MAX_PAYLOAD_BYTES
    auth: bool = False  # per-account passwords and an ACL; anonymous clients are refused
    tls: bool = False  # a TLS-only listener, certificates from a generated fleet CA
    require_client_cert: bool = False  # with tls: clients must also show a certificate of that CA
    accounts: tuple[Device, ...] = ()  # the devices; the operator account is always added
    prefix: str = "nmoe"  # topic prefix and fleet id of the ACL's topics
    fleet: str = "default"

    def __post_init__(self) -> None:
        object.__setattr__(self, "accounts", tuple(self.accounts))
        if self.require_client_cert and not self.tls:
            raise BrokerError("requiring client certificates needs TLS (--tls)")
        repeated = [name for name, n in Counter(self.account_names).items() if n > 1]
        if repeated:
            raise BrokerError(f"account {repeated[0]!r} appears twice (device ids must be unique and not "
                              f"{OPERATOR!r})")
        topics = self.topics  # checks prefix and fleet
        try:
            for device in self.accounts:
                topics.presence(device.device_id)
                topics.expert_request(device.expert_id)
        except ProtocolError as e:
            raise BrokerError(f"cannot write an ACL: {e}") from None

    @cached_property
    def topics(self) -> Topics:
        """The topics of this fleet (BrokerError for a bad prefix or fleet id)."""
        try:
            return Topics(self.prefix, self.fleet)
        except ProtocolError as e:
            raise BrokerError(str(e)) from None

    @property
    def account_names(self) -> list[str]:
        """Every account: the devices in order, then the operator."""
        return [d.device_id for d in self.accounts] + [OPERATOR]

    @property
    def layout(self) -> FleetLayout:
        return FleetLayout.of(self.fleet_dir)


@dataclass
class RunningBroker:
    """A started mosquitto child process."""

    options: BrokerOptions
    port: int
    config_path: Path
    process: subprocess.Popen[bytes] = field(repr=False)
    credentials: dict[str, FleetCredential] = field(default_factory=dict)  # empty without auth/TLS

    @property
    def url(self) -> str:
        """mqtt://host:port (mqtts:// with TLS) for agents and clients."""
        return f"{'mqtts' if self.options.tls else 'mqtt'}://{self.options.host}:{self.port}"

    def stop(self) -> None:
        """SIGTERM, wait (mosquitto saves its persistence file), SIGKILL if it hangs."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    return _bind(host, 0)


def render_config(options: BrokerOptions, port: int) -> str:
    """mosquitto.conf: one listener, low latency, size limits, persistence in the fleet dir."""
    layout = options.layout
    return "\n".join([
        "# generated by nmoe-edge (broker/process.py)",
        "per_listener_settings false",
        f"listener {port} {options.host}",
        *_tls_lines(options, layout),
        *_auth_lines(options, layout),
        "set_tcp_nodelay true",  # Nagle + delayed ACK cost ~90 ms per QoS1 round trip otherwise
        f"message_size_limit {options.max_payload_bytes}",  # larger payloads are dropped
        # larger packets disconnect their sender before the broker buffers them
        f"max_packet_size {options.max_payload_bytes + PACKET_OVERHEAD_BYTES}",
        # Started as root, mosquitto would switch to user `mosquitto`, who cannot enter a private
        # fleet dir: it keeps running as whoever started it (no-op for a normal user).
        f"user {getpass.getuser()}",
        "persistence true",
        f"persistence_location {layout.persistence}/",
        "autosave_interval 30",
        "log_dest stdout",  # mosquitto run as root drops to user mosquitto; stdout is always writable
        "log_type error",
        "log_type warning",
        "log_type notice",
        "",
    ])


def _tls_lines(options: BrokerOptions, layout: FleetLayout) -> list[str]:
    if not options.tls:
        return []
    return [f"cafile {layout.ca_cert}", f"certfile {layout.server_cert(options.host)}",
            f"keyfile {layout.server_key(options.host)}",
            f"require_certificate {str(options.require_client_cert).lower()}"]


def _auth_lines(options: BrokerOptions, layout: FleetLayout) -> list[str]:
    if not options.auth:
        return ["allow_anonymous true"]
    # The client id becomes the username: an account can only ever hold its own session, so a
    # device's credentials cannot take over (and disconnect) another device's connection.
    return ["allow_anonymous false", f"password_file {layout.password_file}", f"acl_file {layout.acl_file}",
            "use_username_as_clientid true"]


def write_credentials(options: BrokerOptions) -> dict[str, FleetCredential]:
    """Create what `options` needs (passwords, password file, ACL, TLS files); each account's files."""
    layout, names = options.layout, options.account_names
    if options.auth:
        write_private(layout.password_file, password_file_text(ensure_passwords(layout, names)))
        write_private(layout.acl_file, render_acl(options.topics, options.accounts))
    if options.tls:
        ensure_tls(layout, options.host, names)
    if not (options.auth or options.tls):
        return {}
    return {name: FleetCredential(
        name,
        password_file=layout.password(name) if options.auth else None,
        ca_file=layout.ca_cert if options.tls else None,
        cert_file=layout.client_cert(name) if options.tls else None,
        key_file=layout.client_key(name) if options.tls else None,
    ) for name in names}


def start_broker(options: BrokerOptions) -> RunningBroker:
    """Write the config and credentials into the fleet dir, start mosquitto, wait until it listens."""
    binary = shutil.which(MOSQUITTO) or shutil.which(MOSQUITTO, path="/usr/sbin:/usr/local/sbin")
    if binary is None:
        raise BrokerError("mosquitto is not installed: apt-get install mosquitto (scripts/setup.sh does it)")
    port = _bind(options.host, options.port)
    layout = options.layout
    layout.persistence.mkdir(parents=True, exist_ok=True)
    credentials = write_credentials(options)
    layout.config.write_text(render_config(options, port))
    log_start = layout.log.stat().st_size if layout.log.exists() else 0
    with layout.log.open("ab") as log:
        # Its own process group: Ctrl-C reaches only us, and we stop it in order; if we die, so does it.
        process = subprocess.Popen(dies_with_parent([binary, "-c", str(layout.config)]), stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, process_group=0)
    broker = RunningBroker(options, port, layout.config, process, credentials)
    try:
        _wait_listening(broker, log_start)
    except BaseException:
        broker.stop()
        raise
    return broker


def _wait_listening(broker: RunningBroker, log_start: int) -> None:
    host, port, log = broker.options.host, broker.port, broker.options.layout.log
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if broker.process.poll() is not None:
            with log.open("rb") as f:
                f.seek(log_start)
                lines = f.read().decode(errors="replace").strip().splitlines() or ["no message"]
            raise BrokerError(f"mosquitto exited with status {broker.process.returncode}: {lines[-1]} "
                              f"(log: {log})")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.05)
    raise BrokerError(f"mosquitto did not listen on {host}:{port} within {START_TIMEOUT_S:.0f} s (log: {log})")


def _bind(host: str, port: int) -> int:
    """Bind and release host:port as mosquitto will (SO_REUSEADDR); the port bound."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except OSError as e:
        raise BrokerError(f"cannot resolve the listener host {host!r}: {e.strerror or e}") from None
    try:
        with socket.create_server((host, port), family=family) as s:
            return int(s.getsockname()[1])
    except OSError as e:  # create_server's message repeats the address: keep the reason only
        reason = os.strerror(e.errno) if e.errno else str(e)
        hint = " (another broker? choose another --port, or 0 for a free one)" if port else ""
        raise BrokerError(f"cannot listen on {host}:{port}: {reason}{hint}") from None
