"""`broker/` and `nmoe broker`: a real mosquitto on a free loopback port, checked with paho clients.

mosquitto 2.0 grants every subscription of an authenticated client (SUBACK 0, also for topics the
ACL does not let it read) and checks the ACL per message instead: a forbidden publish is dropped
silently, a forbidden message is never delivered. So the ACL tests check deliveries, not SUBACKs.
A message that must not arrive is followed by a marker from the same sender to the same reader;
mosquitto keeps their order, so once the marker is in, the forbidden message would be too.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import shutil
import signal
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from broker.accounts import (
    OPERATOR,
    Device,
    fleet_accounts,
    fleet_accounts_from_bundles,
    password_hash,
)
from broker.acl import any_of, render_acl
from broker.layout import FleetLayout
from broker.process import BrokerError, BrokerOptions, RunningBroker, render_config, start_broker
from device_agent.bundle import SCHEMA_VERSION, InputSpec, Manifest, load_bundle
from device_agent.device_models import model_version
from device_agent.wire.clock import now_ms
from device_agent.wire.mqtt_transport import BrokerUrl, MqttSettings, MqttTransport
from device_agent.wire.protocol import (
    ExpertRequest,
    ExpertResponse,
    Topics,
    decode,
    decode_presence,
    encode,
    new_correlation_id,
)
from toolkit.cli import main

pytestmark = pytest.mark.skipif(shutil.which("mosquitto", path="/usr/sbin:/usr/bin:/usr/local/sbin") is None,
                                reason="mosquitto is not installed")

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 5.0
PREFIX, FLEET = "lab/nmoe", "f1"  # not the defaults: the ACL must follow them
TOPICS = Topics(PREFIX, FLEET)
A, B, C = fleet_accounts(3)
REFUSED = (134, 135)  # CONNACK "bad user name or password", "not authorized"


class Peer:
    """A paho client on its own network thread; everything it receives is kept in `received`."""

    def __init__(self, broker: RunningBroker, account: str | None = None, password: str | None = None,
                 client_cert: bool = True, tls: bool | None = None) -> None:
        self.broker = broker
        self.events: queue.Queue[tuple[str, object]] = queue.Queue()
        self.received: list[tuple[str, bytes]] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-{uuid.uuid4().hex[:8]}")
        credential = broker.credentials.get(account) if account else None
        if account:
            self.client.username_pw_set(account, password or credential.password())
        if broker.options.tls if tls is None else tls:  # tls=False: plain MQTT to a TLS listener
            ca = broker.options.layout.ca_cert
            cert, key = (credential.cert_file, credential.key_file) if client_cert and credential else (None, None)
            self.client.tls_set(ca_certs=str(ca), certfile=cert and str(cert), keyfile=key and str(key))
        self.client.on_connect = lambda c, u, flags, rc, props: self.events.put(("connack", rc.value))
        self.client.on_disconnect = lambda c, u, flags, rc, props: self.events.put(("disconnect", rc.value))
        self.client.on_subscribe = lambda c, u, mid, rcs, props: self.events.put(("suback", mid))
        self.client.on_message = lambda c, u, m: self.events.put(("message", (m.topic, m.payload)))

    def connect(self) -> int | None:
        """The CONNACK reason code (0: accepted), or None when the connection was dropped without one.

        The network thread starts only once accepted (it would keep reconnecting a refused client).
        """
        try:
            self.client.connect(self.broker.options.host, self.broker.port)
        except OSError:  # includes a refused TLS handshake
            return None
        deadline = time.monotonic() + TIMEOUT_S
        while self.events.empty() and time.monotonic() < deadline:
            self.client.loop(timeout=0.05)
        kind, value = self._wait(lambda k, v: k in ("connack", "disconnect"))
        if (kind, value) != ("connack", 0):
            self.client.disconnect()
            return value if kind == "connack" else None  # type: ignore[return-value]
        self.client.loop_start()
        return 0

    def subscribe(self, *filters: str) -> None:
        for f in filters:
            _, mid = self.client.subscribe(f)
            self._wait(lambda k, v, mid=mid: (k, v) == ("suback", mid))

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=qos, retain=retain).wait_for_publish(TIMEOUT_S)

    def expect(self, topic: str, payload: bytes) -> None:
        """Wait until (topic, payload) has arrived."""
        if (topic, payload) not in self.received:
            self._wait(lambda k, v: (k, v) == ("message", (topic, payload)))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _wait(self, match: Callable[[str, object], bool]) -> tuple[str, object]:
        while True:
            try:
                kind, value = self.events.get(timeout=TIMEOUT_S)
            except queue.Empty:
                pytest.fail("no answer from the broker within the timeout")
            if kind == "message":
                self.received.append(value)  # type: ignore[arg-type]
            if match(kind, value):
                return kind, value


def token() -> bytes:
    return uuid.uuid4().bytes


def options(fleet_dir: Path, **kw: object) -> BrokerOptions:
    return BrokerOptions(fleet_dir, port=0, prefix=PREFIX, fleet=FLEET, **kw)  # type: ignore[arg-type]


# ---- config, ACL text, passwords: no broker ------------------------------------------------------

def test_config_listens_on_loopback_with_nodelay_limits_and_persistence(tmp_path: Path) -> None:
    lines = render_config(BrokerOptions(tmp_path), 1883).splitlines()
    for line in ["listener 1883 127.0.0.1", "set_tcp_nodelay true", "allow_anonymous true",
                 f"message_size_limit {1 << 20}", "persistence true",
                 f"persistence_location {tmp_path.resolve() / 'mosquitto'}/"]:
        assert line in lines
    secured = render_config(options(tmp_path, auth=True, tls=True, require_client_cert=True), 8883)
    layout = FleetLayout.of(tmp_path)
    for line in ["allow_anonymous false", f"password_file {layout.password_file}", f"acl_file {layout.acl_file}",
                 "use_username_as_clientid true", f"cafile {layout.ca_cert}", f"certfile {layout.server_cert('127.0.0.1')}",
                 "require_certificate true"]:
        assert line in secured.splitlines()


def test_acl_topics_come_from_the_protocol() -> None:
    assert any_of(TOPICS.presence, "a", "b") == TOPICS.presence_filter()
    acl = render_acl(TOPICS, [A]).splitlines()
    device = acl[acl.index("user device-0") + 1: acl.index("user operator") - 1]
    assert device == [
        "topic write lab/nmoe/f1/presence/device-0", "topic write lab/nmoe/f1/reply/+/device-0",
        "topic write lab/nmoe/f1/expert/+/req", "topic read lab/nmoe/f1/presence/+",
        "topic read lab/nmoe/f1/reply/device-0/+", "topic read lab/nmoe/f1/expert/0/req",
        "topic read lab/nmoe/f1/infer/device-0/req"]
    assert acl[acl.index("user operator") + 1:] == [
        "topic write lab/nmoe/f1/infer/+/req", "topic write lab/nmoe/f1/expert/+/req",
        "topic read lab/nmoe/f1/presence/+", "topic read lab/nmoe/f1/reply/operator/+"]


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="mosquitto_passwd is not installed")
def test_password_hash_is_what_mosquitto_passwd_writes(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(path), "alice", "s3cret"], check=True)
    _, hashed = path.read_text().strip().split(":", 1)
    salt = base64.b64decode(hashed.split("$")[3])
    assert password_hash("s3cret", salt) == hashed


def test_print_config_prints_config_and_acl_and_starts_nothing(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    fleet_dir = tmp_path / "fleet"
    assert main(["broker", "--print-config", "--auth", "--devices", "2", "--fleet-dir", str(fleet_dir)]) == 0
    out = capsys.readouterr().out
    assert "listener 1883 127.0.0.1" in out and "set_tcp_nodelay true" in out
    assert "user device-1" in out and "topic read nmoe/default/expert/1/req" in out and "user operator" in out
    assert not fleet_dir.exists()


def test_accounts_from_a_count_and_from_bundles(tmp_path: Path) -> None:
    assert (A, B) == (Device("device-0", 0), Device("device-1", 1))
    with pytest.raises(BrokerError, match="at least one device"):
        fleet_accounts(0)
    for folder, device_id, expert in [("device-1", "pi-b", 1), ("device-0", "pi-a", 0)]:
        manifest = Manifest(
            schema_version=SCHEMA_VERSION, model_version="m1", device_id=device_id, expert_id=expert,
            num_experts=2, top_k=1, latent_dim=4, num_classes=2, class_names=["a", "b"], routing="gate",
            input=InputSpec([1, 2, 2], "uint8", 1 / 255, [0.5], [0.25], "NCHW"), models=[],
            provenance={}, samples=None)
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "manifest.json").write_text(json.dumps(manifest.to_dict()))
    assert fleet_accounts_from_bundles(tmp_path) == (Device("pi-a", 0), Device("pi-b", 1))
    (tmp_path / "device-2").mkdir()
    with pytest.raises(BrokerError, match="device-2/manifest.json: cannot read"):
        fleet_accounts_from_bundles(tmp_path)
    with pytest.raises(BrokerError, match="cannot read the bundles dir"):
        fleet_accounts_from_bundles(tmp_path / "missing")


@pytest.mark.parametrize("content, message", [
    (b'{"device_id": "pi-a", "expert_id": 0', "manifest.json: not valid JSON"),
    (b"[]", "manifest.json: expected a JSON object"),
    (b'{"expert_id": 0}', "manifest.json: device_id: expected a string, got None"),
    (b'{"device_id": "pi-a", "expert_id": true}', "manifest.json: expert_id: expected an integer >= 0"),
    (b'{"device_id": "pi-a", "expert_id": -1}', "manifest.json: expert_id: expected an integer >= 0"),
    (b"\xff\xfe", "manifest.json: not valid JSON"),
    (b" " * ((1 << 20) + 1), "manifest.json: expected a JSON object of at most"),
])
def test_a_damaged_manifest_is_one_clear_error(tmp_path: Path, content: bytes, message: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "device-0").mkdir()
    (tmp_path / "device-0" / "manifest.json").write_bytes(content)
    with pytest.raises(BrokerError, match=message):
        fleet_accounts_from_bundles(tmp_path)
    assert main(["broker", "--auth", "--bundles", str(tmp_path), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nmoe: error: ") and message in err and err.count("\n") == 1


@pytest.mark.parametrize("kw, message", [
    ({"accounts": (A, Device("device-0", 1))}, "'device-0' appears twice"),
    ({"accounts": (Device(OPERATOR, 0),)}, "'operator' appears twice"),
    ({"accounts": (Device("a b", 0),)}, "bad device"),
    ({"prefix": "+"}, "bad topic prefix"),
    ({"require_client_cert": True}, "needs TLS"),
])
def test_bad_options_are_one_clear_error(tmp_path: Path, kw: dict, message: str) -> None:
    with pytest.raises(BrokerError, match=message):
        BrokerOptions(tmp_path, **kw)


# ---- the process ---------------------------------------------------------------------------------

def test_start_stop_and_an_exception_leave_no_process(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), start_broker(options(tmp_path)) as broker:
        peer = Peer(broker)
        assert peer.connect() == 0
        peer.close()
        raise RuntimeError("the caller fails")
    assert broker.process.returncode == 0
    assert not Path(f"/proc/{broker.process.pid}").exists()


def test_retained_presence_survives_a_restart(tmp_path: Path) -> None:
    topic, payload = TOPICS.presence("device-0"), token()
    with start_broker(options(tmp_path)) as broker:
        peer = Peer(broker)
        peer.connect()
        peer.publish(topic, payload, qos=1, retain=True)
        peer.close()
    with start_broker(options(tmp_path)) as broker:
        peer = Peer(broker)
        peer.connect()
        peer.subscribe(TOPICS.presence_filter())
        peer.expect(topic, payload)
        peer.close()


def test_oversize_payload_is_dropped(tmp_path: Path) -> None:
    with start_broker(options(tmp_path)) as broker:
        peer = Peer(broker)
        peer.connect()
        peer.subscribe(TOPICS.presence_filter())
        limit = broker.options.max_payload_bytes
        topic = TOPICS.presence("device-0")
        big, too_big, marker = b"x" * limit, b"y" * (limit + 1), token()
        for payload in (big, too_big, marker):
            peer.publish(topic, payload)
        peer.expect(topic, marker)
        assert (topic, big) in peer.received and (topic, too_big) not in peer.received


def test_busy_port_missing_binaries_are_clear_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with start_broker(options(tmp_path / "a")) as broker, pytest.raises(
            BrokerError, match=f"cannot listen on 127.0.0.1:{broker.port}: Address already in use"):
        start_broker(replace(options(tmp_path / "b"), port=broker.port))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BrokerError, match="openssl is not installed"):
        start_broker(options(tmp_path / "c", tls=True))
    monkeypatch.setattr("broker.process.MOSQUITTO", "mosquitto-not-installed")
    with pytest.raises(BrokerError, match="mosquitto is not installed"):
        start_broker(options(tmp_path / "d"))


# ---- authentication and ACL ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningBroker]:
    with start_broker(options(tmp_path_factory.mktemp("fleet"), auth=True, accounts=(A, B, C))) as broker:
        yield broker


@pytest.fixture(scope="module")
def peers(secured: RunningBroker) -> Iterator[dict[str, Peer]]:
    """The three devices and the operator, each subscribed to everything it may read."""
    peers = {name: Peer(secured, name) for name in (A.device_id, B.device_id, C.device_id, OPERATOR)}
    for name, peer in peers.items():
        assert peer.connect() == 0
        peer.subscribe(TOPICS.presence_filter(), TOPICS.reply_filter(name))
    for device in (A, B, C):
        peers[device.device_id].subscribe(TOPICS.expert_request(device.expert_id),
                                          TOPICS.infer_request(device.device_id))
    yield peers
    for peer in peers.values():
        peer.close()


def marker_topic(sender: str, reader: str) -> str:
    """A topic `sender` may publish on and `reader` reads."""
    return TOPICS.infer_request(reader) if sender == OPERATOR else TOPICS.presence(sender)


def delivered(peers: dict[str, Peer], sender: str, topic: str, reader: str) -> bool:
    """Publish on `topic` as `sender`: does `reader` receive it?"""
    payload, marker = token(), token()
    peers[sender].publish(topic, payload)
    peers[sender].publish(marker_topic(sender, reader), marker)
    peers[reader].expect(marker_topic(sender, reader), marker)
    return (topic, payload) in peers[reader].received


def test_credentials_are_private_and_kept_across_restarts(secured: RunningBroker) -> None:
    credential = secured.credentials[A.device_id]
    assert stat.S_IMODE(credential.password_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(secured.options.layout.password_file.stat().st_mode) == 0o600
    with start_broker(secured.options) as again:
        assert again.credentials[A.device_id].password() == credential.password()
        peer = Peer(again, A.device_id)
        assert peer.connect() == 0
        peer.close()


@pytest.mark.parametrize("account, password", [(None, None), (A.device_id, "wrong"), ("nobody", "x"),
                                               (A.device_id, "B's password")])
def test_anonymous_and_wrong_passwords_are_refused(secured: RunningBroker, account: str | None,
                                                   password: str | None) -> None:
    if password == "B's password":
        password = secured.credentials[B.device_id].password()
    assert Peer(secured, account, password).connect() in REFUSED


@pytest.mark.parametrize("sender, topic, reader", [
    (A.device_id, TOPICS.reply_from(OPERATOR, B.device_id), OPERATOR),  # a reply forged as B's
    (A.device_id, TOPICS.reply_from(A.device_id, B.device_id), A.device_id),  # even into its own inbox
    (A.device_id, TOPICS.presence(B.device_id), OPERATOR),  # B's presence
    (A.device_id, TOPICS.infer_request(B.device_id), B.device_id),  # inference requests: operator only
    (OPERATOR, TOPICS.reply_from(A.device_id, OPERATOR), A.device_id),  # the operator never replies
])
def test_a_device_cannot_publish_on_topics_that_are_not_its_own(peers: dict[str, Peer], sender: str,
                                                                 topic: str, reader: str) -> None:
    assert not delivered(peers, sender, topic, reader)


def test_a_device_cannot_read_what_is_addressed_to_another(peers: dict[str, Peer]) -> None:
    attacker = peers[A.device_id]
    attacker.subscribe("#", TOPICS.reply_filter(B.device_id), TOPICS.expert_request(B.expert_id),
                       TOPICS.infer_request(B.device_id))
    sent = [(C.device_id, TOPICS.reply_from(B.device_id, C.device_id)),
            (OPERATOR, TOPICS.expert_request(B.expert_id)), (OPERATOR, TOPICS.infer_request(B.device_id))]
    for sender, topic in sent:
        payload = token()
        peers[sender].publish(topic, payload)
        peers[B.device_id].expect(topic, payload)  # B gets it (B has the right to read it)...
        marker = token()
        peers[sender].publish(marker_topic(sender, A.device_id), marker)
        attacker.expect(marker_topic(sender, A.device_id), marker)
        assert (topic, payload) not in attacker.received  # ...and A, subscribed to it and to #, does not


def test_devices_exchange_expert_requests_and_replies(peers: dict[str, Peer]) -> None:
    assert delivered(peers, A.device_id, TOPICS.expert_request(B.expert_id), B.device_id)
    assert delivered(peers, B.device_id, TOPICS.reply_from(A.device_id, B.device_id), A.device_id)
    assert delivered(peers, A.device_id, TOPICS.presence(A.device_id), B.device_id)


def test_the_operator_sends_inference_requests_and_reads_its_replies(peers: dict[str, Peer]) -> None:
    assert delivered(peers, OPERATOR, TOPICS.infer_request(A.device_id), A.device_id)
    assert delivered(peers, OPERATOR, TOPICS.expert_request(B.expert_id), B.device_id)
    assert delivered(peers, A.device_id, TOPICS.reply_from(OPERATOR, A.device_id), OPERATOR)


# ---- TLS -----------------------------------------------------------------------------------------

def test_tls_listener_takes_fleet_certificates_only(tmp_path: Path) -> None:
    tls = options(tmp_path, auth=True, tls=True, require_client_cert=True, accounts=(A,))
    with start_broker(tls) as broker:
        assert broker.url.startswith("mqtts://127.0.0.1:")
        peer = Peer(broker, A.device_id)
        assert peer.connect() == 0
        peer.subscribe(TOPICS.presence_filter())
        payload = token()
        peer.publish(TOPICS.presence(A.device_id), payload)
        peer.expect(TOPICS.presence(A.device_id), payload)
        peer.close()
        assert Peer(broker, A.device_id, client_cert=False).connect() is None  # no client certificate
        assert Peer(broker, A.device_id, tls=False).connect() is None  # plain MQTT
    ca = tls.layout.ca_cert.read_bytes()
    with start_broker(replace(tls, require_client_cert=False)) as broker:  # same CA, certificates kept
        assert tls.layout.ca_cert.read_bytes() == ca
        assert Peer(broker, A.device_id, client_cert=False).connect() == 0


# ---- the command ---------------------------------------------------------------------------------

@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_cli_prints_how_to_connect_and_stops_its_mosquitto(tmp_path: Path, stop: signal.Signals) -> None:
    cli = subprocess.Popen(
        [sys.executable, "-m", "toolkit.cli", "broker", "--auth", "--devices", "2", "--port", "0",
         "--fleet-dir", str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = [cli.stdout.readline() for _ in range(8)]
    finally:
        cli.send_signal(stop)
        _, err = cli.communicate(timeout=TIMEOUT_S)
    assert lines[0].startswith("nmoe broker: mqtt://127.0.0.1:"), lines
    password_file = tmp_path.resolve() / "credentials" / "device-0.password"
    assert f"--username device-0 --password-file {password_file}" in lines[4]
    assert lines[-1] == "Ctrl-C or SIGTERM stops it.\n"
    mosquitto_pid = int(lines[0].split("mosquitto pid ")[1].rstrip(")\n"))
    assert cli.returncode == 0, err
    assert f"stopped ({stop.name})" in err
    assert not Path(f"/proc/{mosquitto_pid}").exists()
    assert os.listdir(tmp_path / "credentials")


def test_a_killed_cli_leaves_no_mosquitto_behind(tmp_path: Path) -> None:
    cli = subprocess.Popen(
        [sys.executable, "-m", "toolkit.cli", "broker", "--port", "0", "--fleet-dir", str(tmp_path)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        first = cli.stdout.readline()
    finally:
        cli.kill()  # no handler runs: only the kernel can stop its mosquitto now
        cli.communicate(timeout=TIMEOUT_S)
    mosquitto = Path("/proc", first.split("mosquitto pid ")[1].rstrip(")\n"))
    end = time.monotonic() + TIMEOUT_S
    while _alive(mosquitto) and time.monotonic() < end:
        time.sleep(0.05)
    assert not _alive(mosquitto)


def _alive(proc: Path) -> bool:
    """The process exists and is not a zombie (an orphan is reaped by init, not by us)."""
    try:
        return (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# ---- client ids are tied to accounts (issue 9, defect 1) ------------------------------------------

def connack_as(url: BrokerUrl, account: str, password: str, client_id: str, hold_s: float) -> int | None:
    """Connect as `account` with `client_id`, stay `hold_s`, disconnect: the CONNACK code (None: none)."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
    client.username_pw_set(account, password)
    codes: list[int] = []
    client.on_connect = lambda c, u, flags, rc, props: codes.append(rc.value)
    client.connect(url.host, url.port)
    end = time.monotonic() + TIMEOUT_S
    while not codes and time.monotonic() < end:
        client.loop(timeout=0.05)
    if codes == [0]:
        client.subscribe("x")
        end = time.monotonic() + hold_s
        while time.monotonic() < end:
            client.loop(timeout=0.01)
    client.disconnect()
    return codes[0] if codes else None


def test_a_second_login_of_an_account_replaces_the_first(tmp_path: Path) -> None:
    with start_broker(options(tmp_path, auth=True, accounts=(A,))) as broker:
        first, second = Peer(broker, A.device_id), Peer(broker, A.device_id)  # different client ids
        assert first.connect() == 0
        first.client.reconnect_delay_set(TIMEOUT_S * 2, TIMEOUT_S * 2)  # no fight back during the test
        assert second.connect() == 0
        first._wait(lambda kind, value: kind == "disconnect")  # the broker closed the older session
        second.close()
        first.close()


TOPICS_DEFAULT = Topics()  # what `nmoe agent` uses by default


class Operator:
    """The operator account over the agents' own transport: device-1's presences and replies."""

    def __init__(self, url: BrokerUrl, password: str) -> None:
        self.presences: list[str] = []
        self.replies: dict[bytes, object] = {}
        self.transport = MqttTransport(MqttSettings(url, "test-operator", OPERATOR, password))
        for topic_filter in (TOPICS_DEFAULT.presence_filter(), TOPICS_DEFAULT.reply_filter(OPERATOR)):
            self.transport.subscribe(topic_filter)
        self.transport.connect(None, self._on_message, lambda event, detail: None)

    def _on_message(self, topic: str, payload: bytes) -> None:
        if topic == TOPICS_DEFAULT.presence("device-1"):
            self.presences.append(decode_presence(payload).status)
        elif topic == TOPICS_DEFAULT.reply_from(OPERATOR, "device-1"):
            msg = decode(payload)
            self.replies[msg.correlation_id] = msg

    def ask_expert_1(self, latent: np.ndarray, model: str) -> bytes:
        """Send one expert request to expert 1; its correlation id."""
        cid = new_correlation_id()
        request = ExpertRequest(cid, 1, now_ms() + 3000, model, TOPICS_DEFAULT.reply(OPERATOR), latent)
        self.transport.publish(TOPICS_DEFAULT.expert_request(1), encode(request))
        return cid


def test_a_device_cannot_take_over_another_devices_client_id(onnx_tflite_bundles: Path, tmp_path: Path) -> None:
    """device-0's password with device-1's client id, in a loop: device-1 stays online and answers."""
    fleet = tmp_path / "fleet"
    cli = subprocess.Popen(
        [sys.executable, "-m", "toolkit.cli", "broker", "--auth", "--bundles", str(onnx_tflite_bundles),
         "--port", "0", "--fleet-dir", str(fleet)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    agent = None
    try:
        url = BrokerUrl.parse(cli.stdout.readline().split()[2])
        credentials = fleet / "credentials"
        password = {a: (credentials / f"{a}.password").read_text() for a in ("device-0", OPERATOR)}
        bundle = load_bundle(onnx_tflite_bundles / "device-1")
        agent = subprocess.Popen(
            [sys.executable, "-m", "toolkit.cli", "agent", "--bundle", str(bundle.path), "--broker",
             f"mqtt://{url.host}:{url.port}", "--username", "device-1", "--password-file",
             str(credentials / "device-1.password")], cwd=ROOT, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True)
        operator = Operator(url, password[OPERATOR])
        end = time.monotonic() + 60
        while operator.presences[-1:] != ["online"] and time.monotonic() < end:
            time.sleep(0.05)
        assert operator.presences[-1:] == ["online"], agent.poll()
        seen = len(operator.presences)
        latent = bundle.samples()["latent"][:1]
        asked, accepted = [], []
        end = time.monotonic() + 4
        while time.monotonic() < end:  # the attack, with requests to expert 1 in between
            accepted.append(connack_as(url, "device-0", password["device-0"], "default-device-1", 0.1))
            asked.append(operator.ask_expert_1(latent, model_version(bundle)))
        end = time.monotonic() + TIMEOUT_S
        while len(operator.replies) < len(asked) and time.monotonic() < end:
            time.sleep(0.05)
        flips = operator.presences[seen:]
        agent.kill()  # its will still works: the broker reports device-1 offline
        agent.wait()
        end = time.monotonic() + TIMEOUT_S
        while operator.presences[-1:] != ["offline"] and time.monotonic() < end:
            time.sleep(0.05)
        operator.transport.close()
        answered = [cid for cid in asked if isinstance(operator.replies.get(cid), ExpertResponse)]
        print(f"\n{len(accepted)} connections as device-0 with device-1's client id; device-1 presence changes: "
              f"{len(flips)}; {len(answered)} of {len(asked)} requests to expert 1 answered")
        assert accepted and set(accepted) == {0}  # device-0's own credentials: accepted every time
        assert flips == []  # ...and device-1 was never reported offline
        assert len(answered) == len(asked)
        assert operator.presences[-1:] == ["offline"]
    finally:
        for process in (agent, cli):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.communicate(timeout=TIMEOUT_S)
