"""What `nmoe trial` adds for field conditions: emulated links for its agents, drain commands, telemetry.

- `trial_links`: each local agent's emulated radio link (`--link`, `--link-file`; toolkit.fleet.link);
  `through_proxies` points each agent at its own `LinkProxies` proxy instead of the broker;
- `send_drain`: the operator's drain command (docs/protocol.md §15.2) on the driver's connection;
- the telemetry the driver's connection receives is collected by a `TelemetryCollector` and written
  to trial.json's `telemetry` section (`toolkit.fleet.telemetry_report`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import replace
from typing import TYPE_CHECKING

from device_agent.wire.mqtt_transport import BrokerUrl
from device_agent.wire.protocol import Topics
from device_agent.wire.telemetry import MAX_DRAIN_S, Drain, drain_topic, encode_drain
from device_agent.wire.transport import Transport
from toolkit.fleet.agent_processes import AgentLaunch
from toolkit.fleet.link import LinkError, LinkSpec, link_plan
from toolkit.fleet.link_proxy import LinkProxies
from toolkit.fleet.trial_driver import TrialError

if TYPE_CHECKING:
    from toolkit.fleet.trial import TrialOptions

UNTIL_THE_END_S = MAX_DRAIN_S  # --drain-device drains for the rest of the trial; the trial ends it
FINAL_TELEMETRY_TIMEOUT_S = 10.0  # after the agents were asked to stop, for their last telemetry


def trial_links(options: TrialOptions, devices: Iterable[str]) -> dict[str, LinkSpec]:
    """Each local agent's link ({} without --link/--link-file); TrialError for a bad spec or file, or with --remote."""
    if (options.link or options.link_file) and options.remote:
        raise TrialError("--link/--link-file emulate the radio of the agents the trial starts; a --remote fleet's "
                         "links are real")
    try:
        return link_plan(devices, options.link, options.link_file)
    except LinkError as e:
        raise TrialError(str(e)) from None


def through_proxies(launches: list[AgentLaunch], links: dict[str, LinkSpec], proxies: LinkProxies,
                    broker_url: str) -> list[AgentLaunch]:
    """The launches with each linked agent's `--broker` replaced by its own proxy to the broker."""
    url = BrokerUrl.parse(broker_url)
    scheme = "mqtts" if url.tls else "mqtt"
    routed = []
    for launch in launches:
        if launch.device in links:
            port = proxies.add(launch.device, links[launch.device], url.host, url.port)
            args = list(launch.args)
            args[args.index("--broker") + 1] = f"{scheme}://127.0.0.1:{port}"
            launch = replace(launch, args=tuple(args))
        routed.append(launch)
    return routed


def send_drain(transport: Transport, topics: Topics, device: str, for_s: float) -> None:
    """Ask `device` to stop serving for `for_s` seconds (0: serve again), QoS 1."""
    transport.publish(drain_topic(topics, device), encode_drain(Drain(device, for_s, round(time.time(), 3))), qos=1)
