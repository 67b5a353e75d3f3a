"""Fixtures of the web-device tests: the built app, a broker, web devices in headless Chromium.

scripts/setup.sh installs Chromium and the app's npm packages (`npm ci` in android_demo/); the tests
build the app from the current sources once per session. Where Node, Chromium or the packages are
missing, these tests are skipped with the command that installs them, except under CI (CI=true),
where that is a failure.
"""

import os
import shutil
import subprocess
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
    if not (DEMO_DIR / "node_modules" / "playwright-core").is_dir():
        return f"the web device's npm packages are not installed (cd {DEMO_DIR} && npm ci)"
    return None


@pytest.fixture(scope="session", autouse=True)
def web_built() -> None:
    """Build the app from the current sources; skip (fail under CI) when Node, Chromium or the npm
    packages are missing."""
    missing = _missing()
    if missing is not None:
        if os.environ.get("CI"):
            pytest.fail(f"web device tests: {missing}; scripts/setup.sh installs and builds it")
        pytest.skip(f"web device tests: {missing}")
    built = subprocess.run(["node", "scripts/build.mjs"], cwd=DEMO_DIR, capture_output=True, text=True, check=False)
    assert built.returncode == 0 and (APP_DIR / "app.js").is_file(), built.stderr


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

