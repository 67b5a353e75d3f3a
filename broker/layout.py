"""Where the broker keeps its files inside a fleet dir: one place, so nothing spells a path twice."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class FleetLayout:
    """Absolute paths of the broker's files under `root` (the fleet dir)."""

    root: Path

    @classmethod
    def of(cls, fleet_dir: Path) -> FleetLayout:
        """The layout of `fleet_dir`, made absolute (mosquitto resolves paths from its own cwd)."""
        return cls(Path(fleet_dir).resolve())

    @property
    def config(self) -> Path:
        return self.root / "mosquitto.conf"

    @property
    def log(self) -> Path:
        return self.root / "mosquitto.log"

    @property
    def persistence(self) -> Path:
        return self.root / "mosquitto"

    @property
    def password_file(self) -> Path:
        """mosquitto's password file (PBKDF2 hashes of every account's password)."""
        return self.root / "mosquitto.passwd"

    @property
    def acl_file(self) -> Path:
        return self.root / "mosquitto.acl"

    @property
    def credentials(self) -> Path:
        """Per-account secrets: `<account>.password` and, with TLS, `<account>.crt` / `<account>.key`."""
        return self.root / "credentials"

    def password(self, account: str) -> Path:
        return self.credentials / f"{account}.password"

    def client_cert(self, account: str) -> Path:
        return self.credentials / f"{account}.crt"

    def client_key(self, account: str) -> Path:
        return self.credentials / f"{account}.key"

    @property
    def tls(self) -> Path:
        """The fleet's CA and the broker's server certificates."""
        return self.root / "tls"

    @property
    def ca_cert(self) -> Path:
        return self.tls / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.tls / "ca.key"

    def server_cert(self, host: str) -> Path:
        """One server certificate per listener host (its names are in the certificate)."""
        return self.tls / f"server-{host}.crt"

    def server_key(self, host: str) -> Path:
        return self.tls / f"server-{host}.key"


def write_private(path: Path, text: str) -> None:
    """Replace `path` atomically with `text`, readable by the owner only (mode 0600)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # a leftover tmp file keeps its mode otherwise
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
