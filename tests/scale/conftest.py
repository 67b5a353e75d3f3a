"""Fixtures of the scale tests: the agent tests' helpers (fleet_helpers) and the tiny fleet's bundles."""

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.bridge import Bridge
from broker.process import BrokerOptions, RunningBroker, start_broker
from device_agent.bundle import Bundle, load_bundle

# the agent tests' fleet helpers (start_agents, Client, request_frame) are reused here
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "agent"))


@pytest.fixture(scope="session")
def fleet_bundles(onnx_tflite_bundles: Path) -> dict[int, Bundle]:
    """The shared export of the tiny run (3 devices) by expert id."""
    loaded = [load_bundle(p) for p in sorted(onnx_tflite_bundles.glob("device-*"))]
    return {b.manifest.expert_id: b for b in loaded}


@pytest.fixture(scope="module")
def brokers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningBroker, RunningBroker]]:
    """(hub, leaf): two mosquittos, the leaf bridged to the hub (`nmoe broker --bridge-to`)."""
    with start_broker(BrokerOptions(tmp_path_factory.mktemp("hub"), port=0)) as hub, \
            start_broker(BrokerOptions(tmp_path_factory.mktemp("leaf"), port=0, bridge=Bridge(hub.url))) as leaf:
        yield hub, leaf
