"""`nmoe broker --websockets PORT`: MQTT over WebSockets to mosquitto (paho's websockets transport as
a second client implementation), with --auth and --tls as for TCP clients, and the web app and the
bundles served over HTTP on the same port, nothing else."""

import re
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from broker.accounts import fleet_accounts
from broker.process import BrokerOptions, start_broker
from broker.websocket_bridge import APP_DIR, bridge_for

ROOT = Path(__file__).resolve().parent.parent.parent
TIMEOUT_S = 10.0


class WsClient:
    """A paho client over WebSockets (`/mqtt`, subprotocol mqtt); `rc` is the CONNACK reason (None: no CONNACK)."""

    def __init__(self, url: str, username: str | None = None, password: str | None = None, ca: Path | None = None):
        m = re.fullmatch(r"(wss?)://([^:/]+):(\d+)/mqtt", url)
        assert m, url
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"ws-{uuid.uuid4().hex[:8]}",
                                  transport="websockets")
        self.client.ws_set_options(path="/mqtt")
        if username:
            self.client.username_pw_set(username, password)
        if m.group(1) == "wss":
            self.client.tls_set(ca_certs=str(ca))
        self.messages: list[tuple[str, bytes]] = []
        self.connack = threading.Event()
        self.rc: int | None = None
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda c, u, msg: self.messages.append((msg.topic, msg.payload))
        self.client.connect(m.group(2), int(m.group(3)))
        self.client.loop_start()
        self.connack.wait(TIMEOUT_S)

    def _on_connect(self, client, userdata, flags, rc, props) -> None:
        self.rc = rc.value
        self.connack.set()

    def wait_message(self, topic: str, payload: bytes) -> None:
        end = time.monotonic() + TIMEOUT_S
        while (topic, payload) not in self.messages:
            assert time.monotonic() < end, f"{topic} {payload!r} never arrived (got {self.messages})"
            time.sleep(0.02)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _get(url: str, context: ssl.SSLContext | None = None) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S, context=context) as r:
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read()


@pytest.fixture()
def cli(tmp_path: Path, onnx_tflite_bundles: Path) -> Iterator[tuple[subprocess.Popen, list[str]]]:
    """`nmoe broker --websockets 0 --bundles B` running; its first lines up to "Ctrl-C"."""
    proc = subprocess.Popen([sys.executable, "-m", "toolkit.cli", "broker", "--port", "0", "--websockets", "0",
                             "--bundles", str(onnx_tflite_bundles), "--fleet-dir", str(tmp_path / "fleet")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    try:
        while not lines or not lines[-1].startswith("Ctrl-C"):
            line = proc.stdout.readline()
            assert line, f"nmoe broker stopped early: {lines} {proc.stderr.read()}"
            lines.append(line)
        yield proc, lines
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=TIMEOUT_S)


def test_cli_serves_the_app_the_bundles_and_mqtt_over_websockets(cli, onnx_tflite_bundles: Path) -> None:
    proc, lines = cli
    page = next(re.search(r"web devices: (http://127\.0\.0\.1:\d+/)", line) for line in lines if "web devices" in line)
    assert page is not None, lines
    base = page.group(1)
    bridge_pid = int(re.search(r"bridge pid (\d+)", "".join(lines)).group(1))
    status, kind, body = _get(base)
    assert status == 200 and kind.startswith("text/html") and b"app.js" in body
    assert _get(base + "app.js")[1] == "text/javascript"
    assert _get(base + "ort/ort-wasm-simd-threaded.wasm")[1] == "application/wasm"
    assert _get(base + "bundles/index.json")[2] == b'{"devices": ["device-0", "device-1", "device-2"]}'
    assert _get(base + "bundles/device-1/manifest.json")[2] == (onnx_tflite_bundles / "device-1" / "manifest.json").read_bytes()
    for outside in ("bundles/device-1/../../fleet/mosquitto.conf", "..%2f..%2fetc%2fpasswd", "bundles/report.md",
                    "bundles/device-1/missing.onnx", "fleet/mosquitto.conf", "%2e%2e/pyproject.toml"):
        assert _get(base + outside)[0] == 404, outside
    port = base.rsplit(":", 1)[1].rstrip("/")
    tcp_port = int(re.search(r"mqtt://127\.0\.0\.1:(\d+)", lines[0]).group(1))
    browser, python = WsClient(f"ws://127.0.0.1:{port}/mqtt"), mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    try:
        assert browser.rc == 0
        python.connect("127.0.0.1", tcp_port)
        python.loop_start()
        browser.client.subscribe("nmoe/default/expert/2/req")
        time.sleep(0.3)
        python.publish("nmoe/default/expert/2/req", b"\x00\x01binary\xff" * 100).wait_for_publish(TIMEOUT_S)
        browser.wait_message("nmoe/default/expert/2/req", b"\x00\x01binary\xff" * 100)
    finally:
        browser.close()
        python.disconnect()
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0
    assert not Path(f"/proc/{bridge_pid}").exists() or "Z" in Path(f"/proc/{bridge_pid}/stat").read_text().split()[2]


def test_auth_and_tls_apply_to_websocket_clients(tmp_path: Path) -> None:
    options = BrokerOptions(tmp_path / "fleet", port=0, auth=True, tls=True, accounts=fleet_accounts(2))
    with start_broker(options) as broker, bridge_for(broker, 0, None) as bridge:
        assert bridge is not None and bridge.url.startswith("wss://")
        ca = options.layout.ca_cert
        device = broker.credentials["device-0"]
        assert WsClient(bridge.url, "device-0", "wrong password", ca).rc in (134, 135)
        assert WsClient(bridge.url, None, None, ca).rc in (134, 135)
        ok = WsClient(bridge.url, "device-0", device.password(), ca)
        other = WsClient(bridge.url, "device-1", broker.credentials["device-1"].password(), ca)
        try:
            assert ok.rc == 0 and other.rc == 0
            other.client.subscribe("nmoe/default/infer/device-0/req")  # the ACL lets only device-0 read it
            ok.client.subscribe("nmoe/default/presence/+")
            time.sleep(0.3)
            other.client.publish("nmoe/default/presence/device-1", b"x", qos=1).wait_for_publish(TIMEOUT_S)
            ok.wait_message("nmoe/default/presence/device-1", b"x")
            ok.client.publish("nmoe/default/infer/device-0/req", b"y")  # a device may not send inference requests
            time.sleep(0.5)
            assert ("nmoe/default/infer/device-0/req", b"y") not in other.messages
        finally:
            ok.close()
            other.close()
        status, _, body = _get(bridge.page_url, ssl.create_default_context(cafile=str(ca)))
        assert (status, b"app.js" in body) == ((200, True) if (APP_DIR / "index.html").is_file() else (404, False))


def test_websockets_refuses_options_it_cannot_honour(tmp_path: Path) -> None:
    for extra, message in ((["--tls", "--require-client-cert"], "browsers do not present"),
                           (["--websockets", "70000"], "a port is 0..65535")):
        result = subprocess.run([sys.executable, "-m", "toolkit.cli", "broker", "--port", "0", "--websockets", "0",
                                 "--fleet-dir", str(tmp_path), *extra], cwd=ROOT, capture_output=True, text=True,
                                timeout=60, check=False)
        assert result.returncode == 2, result
        assert result.stderr.startswith("nmoe: error: ") and message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
