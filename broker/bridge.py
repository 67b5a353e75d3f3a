"""Past one broker: this fleet's mosquitto bridged to another broker (issue 14).

`nmoe broker --bridge-to mqtt://HUB:PORT` adds a mosquitto `connection` section to mosquitto.conf:
this broker (the leaf) connects to the hub as a client and forwards the whole fleet namespace
`<prefix>/<fleet>/#` both ways, so a device on either broker reaches every other one. Nothing in it
is topic-specific: presence, expert and inference requests, replies and the federated training
topics (`<prefix>/<fleet>/train/...`) all cross it alike.

- MQTT 5 bridge (mosquitto 2.x), `try_private`: the hub knows the connection is a bridge, so
  messages are not looped back and retained flags are kept; the retained presences of the devices
  on either side are stored on both (a device's last will crosses the bridge like any message).
- QoS 1 on the link and a persistent session (`cleansession false`): what is published while the
  link is down is queued and delivered when it comes back; QoS 0 messages (most of the fleet's
  traffic) keep QoS 0 and may be lost during a link outage, as on one broker.
- The hub may require a password (`--bridge-username`, `--bridge-password-file`) and TLS
  (mqtts://, `--bridge-ca`); its ACL must let that account read and write `<prefix>/<fleet>/#`
  (docs/scale.md shows the rule for mosquitto, EMQX, HiveMQ and VerneMQ).
Stdlib only, like the rest of `broker`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from broker.errors import BrokerError

BRIDGE_QOS = 1
KEEPALIVE_S = 15
RESTART_BACKOFF_S = (1, 15)  # mosquitto's restart_timeout base and cap: back off between reconnects


@dataclass(frozen=True)
class Bridge:
    """A connection from this broker to a hub broker, carrying one fleet's topics both ways."""

    url: str  # mqtt://HOST:PORT or mqtts://HOST:PORT of the hub
    name: str = "nmoe-bridge"  # the connection's name; its client id on the hub
    username: str | None = None
    password_file: Path | None = None
    ca_file: Path | None = None  # the hub's CA (mqtts://); default: the system's trust store

    def __post_init__(self) -> None:
        _ = self.address  # checks the URL
        if self.password_file is not None and self.username is None:
            raise BrokerError("--bridge-password-file needs --bridge-username")
        if self.ca_file is not None and not self.tls:
            raise BrokerError("--bridge-ca needs an mqtts:// --bridge-to URL")
        if not self.name or any(c.isspace() or c in "#+/" for c in self.name):
            raise BrokerError(f"bridge name {self.name!r} must be one word without '#', '+' or '/'")

    @property
    def tls(self) -> bool:
        return self.url.startswith("mqtts://")

    @property
    def address(self) -> str:
        """HOST:PORT of the hub (BrokerError for anything but mqtt(s)://HOST[:PORT])."""
        parts = urlsplit(self.url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname or parts.path not in ("", "/"):
            raise BrokerError(f"--bridge-to {self.url!r}: expected mqtt://HOST:PORT or mqtts://HOST:PORT")
        try:
            port = parts.port or (8883 if self.tls else 1883)
        except ValueError:
            raise BrokerError(f"--bridge-to {self.url!r}: the port is not a number in 1..65535") from None
        return f"{parts.hostname}:{port}"

    def password(self) -> str | None:
        """The hub password from `password_file` (first line), or None."""
        if self.password_file is None:
            return None
        try:
            lines = self.password_file.read_text().splitlines()
        except OSError as e:
            raise BrokerError(f"cannot read --bridge-password-file {self.password_file}: "
                              f"{e.strerror or e}") from None
        if not lines or not lines[0]:
            raise BrokerError(f"--bridge-password-file {self.password_file} is empty")
        return lines[0]


def render_bridge(bridge: Bridge, prefix: str, fleet: str) -> list[str]:
    """The mosquitto.conf lines of `bridge` for the fleet `<prefix>/<fleet>` (a `connection` section,
    which must come after every global and listener setting)."""
    lines = [
        "",
        f"# bridge to {bridge.url}: the whole fleet namespace, both ways (broker/bridge.py)",
        f"connection {bridge.name}",
        f"address {bridge.address}",
        f"topic {prefix}/{fleet}/# both {BRIDGE_QOS}",
        "bridge_protocol_version mqttv50",
        "try_private true",
        "cleansession false",
        f"remote_clientid {bridge.name}",
        "start_type automatic",
        f"keepalive_interval {KEEPALIVE_S}",
        f"restart_timeout {RESTART_BACKOFF_S[0]} {RESTART_BACKOFF_S[1]}",
        "notifications false",
    ]
    if bridge.username is not None:
        lines.append(f"remote_username {bridge.username}")
    password = bridge.password()
    if password is not None:
        lines.append(f"remote_password {password}")
    if bridge.tls:
        lines.append(f"bridge_cafile {bridge.ca_file}" if bridge.ca_file else "bridge_capath /etc/ssl/certs")
    return lines
