"""Emulated radio links: what `nmoe trial --link SPEC` and `--link-file FILE` say, parsed and checked.

A spec is a comma-separated list of a preset and/or `key=value` items (later items win):

    delay=40ms       one-way delay, each direction (us, ms or s)
    jitter=10ms      each chunk's delay is delay + uniform(-jitter, +jitter), never below 0; a TCP
                     stream stays in order, so a chunk is never delivered before the one sent before it
    rate=5mbit       bandwidth cap per direction (bit, kbit, mbit, gbit per second)
    outage=10s@5s    nothing crosses for 10 s from 5 s into the trial's feeding (repeatable); what is
                     sent meanwhile is held and delivered after it, as TCP would retransmit it

Presets (one-way figures; a preset's items can be overridden: `lte,rate=2mbit`): see PRESETS.
A link file is TOML: `device-id = "spec"` per device and optionally `"*" = "spec"` for the others.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path


class LinkError(ValueError):
    """A link spec or file that cannot be used (one line, naming what is wrong)."""


@dataclass(frozen=True)
class Outage:
    start_s: float  # seconds after the feeding started
    duration_s: float


@dataclass(frozen=True)
class LinkSpec:
    """One device's link to the broker, applied to each direction."""

    delay_s: float = 0.0
    jitter_s: float = 0.0
    rate_bps: float | None = None  # None: no cap
    outages: tuple[Outage, ...] = ()

    def describe(self) -> str:
        """The spec written back (`delay=40ms,jitter=10ms,rate=10mbit,outage=10s@5s`)."""
        items = [f"delay={_ms(self.delay_s)}", f"jitter={_ms(self.jitter_s)}"]
        if self.rate_bps is not None:
            items.append(f"rate={self.rate_bps / 1e6:g}mbit")
        items += [f"outage={o.duration_s:g}s@{o.start_s:g}s" for o in self.outages]
        return ",".join(items)


PRESETS = {
    "loopback": LinkSpec(),
    "wifi": LinkSpec(delay_s=0.004, jitter_s=0.002, rate_bps=50e6),  # a home/office access point
    "lte": LinkSpec(delay_s=0.040, jitter_s=0.010, rate_bps=10e6),  # the example: 40 ms one way, 10 ms jitter
    "congested": LinkSpec(delay_s=0.120, jitter_s=0.040, rate_bps=1e6),  # a busy cell or a crowded hotspot
}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(us|ms|s)")
_RATE = re.compile(r"(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit)")
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
MAX_DELAY_S = 10.0


def parse_link(text: str) -> LinkSpec:
    """A LinkSpec from `text` (see the module docstring); LinkError naming the bad item."""
    spec, outages = LinkSpec(), []
    items = [item.strip() for item in text.split(",")]
    if not text.strip() or not all(items):
        raise LinkError(f"link {text!r}: expected a preset ({', '.join(PRESETS)}) and/or key=value items")
    for item in items:
        key, eq, value = item.partition("=")
        key = key.strip().lower()
        if not eq:
            if key not in PRESETS:
                raise LinkError(f"link {text!r}: unknown preset {key!r} (presets: {', '.join(PRESETS)})")
            spec = replace(PRESETS[key], outages=spec.outages)
        elif key in ("delay", "jitter"):
            seconds = _duration(value, item, text)
            if seconds > MAX_DELAY_S:
                raise LinkError(f"link {text!r}: {item}: at most {MAX_DELAY_S:g}s")
            spec = replace(spec, delay_s=seconds) if key == "delay" else replace(spec, jitter_s=seconds)
        elif key == "rate":
            spec = replace(spec, rate_bps=_rate(value, item, text))
        elif key == "outage":
            duration, at, start = value.partition("@")
            if not at:
                raise LinkError(f"link {text!r}: {item}: expected outage=DURATION@START, e.g. outage=10s@5s")
            outages.append(Outage(_duration(start, item, text), _duration(duration, item, text)))
        else:
            raise LinkError(f"link {text!r}: unknown item {item!r} (delay, jitter, rate, outage or a preset)")
    return replace(spec, outages=tuple(sorted(outages, key=lambda o: o.start_s)))


def link_plan(devices: Iterable[str], spec: str | None, file: Path | None) -> dict[str, LinkSpec]:
    """Each device's link: `spec` for all, then the file's `"*"` and per-device entries over it (empty: no
    emulation). LinkError for a bad spec, an unreadable file or a device the fleet does not have."""
    devices = list(devices)
    if spec is None and file is None:
        return {}
    default = parse_link(spec) if spec is not None else LinkSpec()
    per_device = {} if file is None else _read_file(file)
    unknown = sorted(set(per_device) - {"*", *devices})
    if unknown:
        raise LinkError(f"--link-file {file}: no such device in the fleet: {', '.join(unknown)} "
                        f"(devices: {', '.join(devices)})")
    default = per_device.get("*", default)
    return {d: per_device.get(d, default) for d in devices}


def _read_file(file: Path) -> dict[str, LinkSpec]:
    try:
        table = tomllib.loads(file.read_text(encoding="utf-8"))
    except OSError as e:
        raise LinkError(f"--link-file {file}: cannot read it ({e.strerror or e})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise LinkError(f"--link-file {file}: not TOML ({e})") from None
    links = {}
    for device, text in table.items():
        if not isinstance(text, str):
            raise LinkError(f"--link-file {file}: {device} = ...: expected a spec string like \"lte\"")
        try:
            links[device] = parse_link(text)
        except LinkError as e:
            raise LinkError(f"--link-file {file}: {device}: {e}") from None
    return links


def _duration(value: str, item: str, text: str) -> float:
    match = _DURATION.fullmatch(value.strip())
    if match is None:
        raise LinkError(f"link {text!r}: {item}: expected a duration like 40ms, 250us or 2s")
    return float(match[1]) * _UNITS[match[2]]


def _rate(value: str, item: str, text: str) -> float:
    match = _RATE.fullmatch(value.strip().lower())
    if match is None or float(match[1]) <= 0:
        raise LinkError(f"link {text!r}: {item}: expected a rate > 0 like 5mbit, 500kbit or 1gbit")
    return float(match[1]) * _UNITS[match[2]]


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:g}ms"
