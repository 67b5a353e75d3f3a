"""Who may connect: one account per device (from bundles or a count), the operator, and passwords."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from broker.errors import BrokerError
from broker.layout import FleetLayout, write_private

OPERATOR = "operator"  # the trial driver, coordinator and apps: sends inference and expert requests
PASSWORD_ITERATIONS = 101  # mosquitto_passwd's default; the passwords are 256-bit random anyway
SALT_BYTES = 12  # as mosquitto_passwd
MANIFEST = "manifest.json"  # a bundle's manifest (docs/bundle.md); the broker reads two of its fields
MAX_MANIFEST_BYTES = 1 << 20


@dataclass(frozen=True)
class Device:
    """A device account: its id (also its MQTT username) and the expert it holds."""

    device_id: str
    expert_id: int


@dataclass(frozen=True)
class FleetCredential:
    """How one account connects; paths are None when the broker runs without auth / TLS."""

    username: str
    password_file: Path | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None  # this account's client certificate and key
    key_file: Path | None = None

    def password(self) -> str:
        """The password stored in `password_file`."""
        if self.password_file is None:
            raise BrokerError(f"{self.username} has no password: the broker runs without --auth")
        return read_password(self.password_file)


def fleet_accounts(n: int) -> tuple[Device, ...]:
    """device-0 .. device-(n-1), holding experts 0 .. n-1 (the naming of `nmoe export`)."""
    if n < 1:
        raise BrokerError(f"a fleet needs at least one device, got {n}")
    return tuple(Device(f"device-{i}", i) for i in range(n))


def fleet_accounts_from_bundles(bundles_dir: Path) -> tuple[Device, ...]:
    """One account per bundle `bundles_dir/device-*/`, ordered by expert id."""
    try:
        folders = [p for p in Path(bundles_dir).iterdir() if p.name.startswith("device-") and p.is_dir()]
    except OSError as e:
        raise BrokerError(f"{bundles_dir}: cannot read the bundles dir ({e.strerror or e})") from None
    if not folders:
        raise BrokerError(f"{bundles_dir}: no device-*/ bundle folders (write them with `nmoe export`)")
    return tuple(sorted(map(device_of_bundle, folders), key=lambda d: (d.expert_id, d.device_id)))


def device_of_bundle(folder: Path) -> Device:
    """The `device_id` and `expert_id` of `folder/manifest.json` (the agent verifies the rest)."""
    path = folder / MANIFEST
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as e:
        raise BrokerError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        manifest = json.loads(raw) if len(raw) <= MAX_MANIFEST_BYTES else None
    except (ValueError, RecursionError) as e:
        raise BrokerError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise BrokerError(f"{path}: expected a JSON object of at most {MAX_MANIFEST_BYTES} bytes (a bundle "
                          "manifest written by `nmoe export`)")
    device_id, expert_id = manifest.get("device_id"), manifest.get("expert_id")
    if not isinstance(device_id, str):
        raise BrokerError(f"{path}: device_id: expected a string, got {device_id!r}")
    if isinstance(expert_id, bool) or not isinstance(expert_id, int) or expert_id < 0:
        raise BrokerError(f"{path}: expert_id: expected an integer >= 0, got {expert_id!r}")
    return Device(device_id, expert_id)


def ensure_passwords(layout: FleetLayout, accounts: Iterable[str]) -> dict[str, str]:
    """Each account's password, read from `credentials/<account>.password`, created (0600) if missing."""
    passwords = {}
    for account in accounts:
        path = layout.password(account)
        if not path.exists():
            write_private(path, secrets.token_urlsafe(32))
        passwords[account] = read_password(path)
    return passwords


def read_password(path: Path) -> str:
    """The password in `path` (surrounding whitespace ignored)."""
    try:
        password = path.read_bytes().decode("utf-8").strip()
    except OSError as e:
        raise BrokerError(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise BrokerError(f"{path}: not UTF-8 text; delete it to generate a new password") from None
    if not password:
        raise BrokerError(f"{path}: empty password file; delete it to generate a new password")
    return password


def password_file_text(passwords: dict[str, str]) -> str:
    """mosquitto's password file: `username:$7$iterations$salt$hash` (PBKDF2-SHA512) per account."""
    return "".join(f"{account}:{password_hash(password)}\n" for account, password in passwords.items())


def password_hash(password: str, salt: bytes | None = None) -> str:
    """The hash mosquitto_passwd writes for `password` (format $7$, mosquitto >= 2.0)."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PASSWORD_ITERATIONS)
    b64 = base64.b64encode
    return f"$7${PASSWORD_ITERATIONS}${b64(salt).decode()}${b64(digest).decode()}"
