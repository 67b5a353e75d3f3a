"""Emulated radio links: the spec, the link file, and the proxy's delay, jitter, rate cap and outages."""

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from toolkit.fleet.link import PRESETS, LinkError, LinkSpec, Outage, link_plan, parse_link
from toolkit.fleet.link_proxy import LinkProxies


def test_parse_presets_items_and_overrides() -> None:
    assert parse_link("lte") == PRESETS["lte"] == LinkSpec(0.040, 0.010, 10e6)
    assert parse_link("delay=30ms,jitter=10ms,rate=5mbit") == LinkSpec(0.030, 0.010, 5e6)
    assert parse_link("lte, rate=2mbit ,outage=10s@5s,outage=1.5s@0.5s") == LinkSpec(
        0.040, 0.010, 2e6, (Outage(0.5, 1.5), Outage(5.0, 10.0)))
    assert parse_link("delay=250us,rate=1gbit").delay_s == 250e-6
    assert parse_link("outage=2s@1s,wifi").outages == (Outage(1.0, 2.0),)  # a preset keeps the outages
    assert parse_link("lte").describe() == "delay=40ms,jitter=10ms,rate=10mbit"


@pytest.mark.parametrize("text, reason", [
    ("", "expected a preset"), ("lte,,wifi", "expected a preset"), ("5g", "unknown preset '5g'"),
    ("delay=30", "expected a duration"), ("delay=-3ms", "expected a duration"), ("delay=11s", "at most 10s"),
    ("rate=5", "expected a rate"), ("rate=0mbit", "expected a rate > 0"), ("outage=10s", "DURATION@START"),
    ("outage=x@1s", "expected a duration"), ("loss=1%", "unknown item 'loss=1%'"),
])
def test_bad_specs_are_one_clear_error(text: str, reason: str) -> None:
    with pytest.raises(LinkError, match=reason):
        parse_link(text)


def test_link_file_per_device_over_the_default(tmp_path: Path) -> None:
    devices = ["device-0", "device-1", "device-2"]
    assert link_plan(devices, None, None) == {}
    assert link_plan(devices, "wifi", None) == dict.fromkeys(devices, PRESETS["wifi"])
    file = tmp_path / "links.toml"
    file.write_text('"*" = "lte"\ndevice-2 = "congested,outage=10s@5s"\n')
    plan = link_plan(devices, "wifi", file)
    assert plan["device-0"] == plan["device-1"] == PRESETS["lte"]
    assert plan["device-2"].outages == (Outage(5.0, 10.0),) and plan["device-2"].delay_s == 0.120
    file.write_text('device-9 = "lte"\n')
    with pytest.raises(LinkError, match="no such device in the fleet: device-9"):
        link_plan(devices, None, file)
    file.write_text('device-1 = "lte,delay=fast"\n')
    with pytest.raises(LinkError, match="device-1: link 'lte,delay=fast'"):
        link_plan(devices, None, file)
    file.write_text("device-1 = [\n")
    with pytest.raises(LinkError, match="not TOML"):
        link_plan(devices, None, file)
    with pytest.raises(LinkError, match="cannot read it"):
        link_plan(devices, None, tmp_path / "missing.toml")


@pytest.fixture
def echo_server() -> Iterator[int]:
    """A TCP server that echoes every byte back; its port."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    server.close()


def round_trip(port: int, payload: bytes) -> tuple[float, bytes]:
    """Send `payload` through the proxy to the echo server; seconds until all of it is back, and what came back."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        start = time.monotonic()
        s.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = s.recv(65536)
            assert chunk, "closed early"
            got += chunk
        return time.monotonic() - start, got


def test_delay_is_added_each_way_and_jitter_keeps_the_stream_in_order(echo_server: int) -> None:
    with LinkProxies() as proxies:
        port = proxies.add("d", LinkSpec(delay_s=0.100), "127.0.0.1", echo_server)
        rtts = [round_trip(port, b"x" * 100)[0] for _ in range(3)]
        assert all(0.195 <= rtt < 0.6 for rtt in rtts), rtts  # 2 x 100 ms, plus a loaded machine's slack
        jittery = proxies.add("j", LinkSpec(delay_s=0.020, jitter_s=0.019), "127.0.0.1", echo_server)
        with socket.create_connection(("127.0.0.1", jittery)) as s:
            for i in range(200):  # 200 small writes, each delayed 1..39 ms: they must come back in order
                s.sendall(i.to_bytes(2, "big"))
            got = b""
            while len(got) < 400:
                got += s.recv(65536)
        assert [int.from_bytes(got[i:i + 2], "big") for i in range(0, 400, 2)] == list(range(200))


def test_rate_cap(echo_server: int) -> None:
    with LinkProxies() as proxies:
        port = proxies.add("d", LinkSpec(rate_bps=2e6), "127.0.0.1", echo_server)
        seconds, got = round_trip(port, bytes(range(256)) * 512)  # 128 KiB = 1.05 Mbit each way at 2 Mbit/s
        assert got == bytes(range(256)) * 512
        assert 0.52 <= seconds < 3.0, seconds  # at least one direction's serialization; both overlap


def test_outage_holds_everything_until_it_ends(echo_server: int) -> None:
    # Times are read against the proxy's own clock (it starts between `began` and `clocked`), not
    # against fixed sleeps: on a loaded machine the first echo alone can take a good part of a second.
    with LinkProxies() as proxies:
        port = proxies.add("d", LinkSpec(outages=(Outage(0.5, 3.0),)), "127.0.0.1", echo_server)
        began = time.monotonic()
        proxies.start_clock()
        clocked = time.monotonic()
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"before")
            assert s.recv(100) == b"before"
            time.sleep(max(0.0, clocked + 1.0 - time.monotonic()))  # inside the outage (0.5 .. 3.5 s)
            sent = time.monotonic()
            assert sent < began + 3.0, "the machine stalled past the outage: nothing to test"
            s.sendall(b"during")
            assert s.recv(100) == b"during"
            assert time.monotonic() >= began + 3.5  # held until the outage ended
        stats = proxies.stats()["d"]
        assert stats.held_by_outage >= 1 and stats.bytes_up == 12
