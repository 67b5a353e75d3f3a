"""Fixtures of the web-device tests: the built app, a broker, web devices in headless Chromium.

The app is built by scripts/setup.sh (`npm ci && npm run build` in android_demo/). Where it is not
built, these tests are skipped with the command to build it, except under CI (CI=true), where a
missing build is a failure.
"""

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.process import BrokerOptions, RunningBroker, start_broker
from toolkit.fleet.web_devices import APP_DIR, CHROMIUM, DEMO_DIR, WebDevices

# the agent tests' raw protocol client (fleet_helpers.Client, request_frame) is reused here
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "agent"))
from web_helpers import launch


def _missing() -> str | None:
    if shutil.which("node") is None:
        return "node is not installed"
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} is not installed (apt-get install chromium)"
    if not (DEMO_DIR / "node_modules" / "playwright-core").is_dir() or not (APP_DIR / "app.js").is_file():
        return f"the web device is not built (cd {DEMO_DIR} && npm ci && npm run build)"
    return None


@pytest.fixture(scope="session", autouse=True)
def web_built() -> None:
    """Skip (fail under CI) when Node, Chromium or the built app is missing."""
    missing = _missing()
    if missing is not None:
        if os.environ.get("CI"):
            pytest.fail(f"web device tests: {missing}; scripts/setup.sh installs and builds it")
        pytest.skip(f"web device tests: {missing}")


@pytest.fixture(scope="module")
def web_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningBroker]:
    with start_broker(BrokerOptions(tmp_path_factory.mktemp("fleet"), port=0)) as broker:
        yield broker


@pytest.fixture(scope="module")
def web_device(onnx_tflite_bundles: Path, web_broker: RunningBroker,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDevices]:
    """device-2 of the tiny fleet as a web device (fp32, a queue of 8 requests) on `web_broker`."""
    out = tmp_path_factory.mktemp("web")
    with WebDevices(out) as web:
        web.start(launch(onnx_tflite_bundles, "device-2", web_broker, out, "--precision", "fp32", "--queue", "8"))
        web.wait_online(["device-2"])
        yield web

