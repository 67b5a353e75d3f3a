"""User-space link emulation: one TCP proxy per device between its agent and the broker.

This kernel has no netem, and no maintained Python proxy library adds delay, jitter, a rate cap and
outages (toxiproxy's Python client needs its Go server; pproxy only tunnels), so this is the
smallest thing that works: an asyncio TCP relay per device, all in one event loop in a child process
of their own (`LinkProxies` talks to it over a pipe, one JSON line per request), so the relays do not
share a GIL with the trial's driver. Each direction of each connection is a FIFO of chunks, each
delivered at

    max(previous chunk's delivery, serialized end + delay + uniform(-jitter, jitter))

where `serialized end` is when the chunk has gone through the rate cap after the chunks before it;
a chunk due inside an outage is held until the outage ends. New connections during an outage are
accepted and their bytes held the same way, so the broker hears nothing from the device for the
whole outage (and publishes its will when that is longer than 1.5 x the keep-alive).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import IO, Any, Self, TypeVar

from broker.child_process import dies_with_parent
from toolkit.fleet.link import LinkSpec, Outage

CHUNK = 65536
MAX_HELD = 16 << 20  # bytes held in one direction before the proxy gives up on the connection
_T = TypeVar("_T")


@dataclass
class LinkStats:
    """What crossed one device's link (both directions, every connection)."""

    connections: int = 0
    bytes_up: int = 0  # agent -> broker
    bytes_down: int = 0  # broker -> agent
    held_by_outage: int = 0  # chunks whose delivery an outage postponed


class _Direction:
    """When each chunk of one direction of one connection is delivered (see the module docstring)."""

    def __init__(self, spec: LinkSpec, rng: random.Random, origin: Callable[[], float]) -> None:
        self.spec, self.rng, self.origin = spec, rng, origin
        self.free_at = 0.0  # when the rate cap has sent the previous chunk
        self.last_at = 0.0  # when the previous chunk is delivered

    def due(self, now: float, size: int) -> tuple[float, bool]:
        """Delivery time (time.monotonic) of a chunk of `size` bytes read at `now`, and whether an outage held it."""
        s = self.spec
        start = max(now, self.free_at)
        self.free_at = start + (size * 8 / s.rate_bps if s.rate_bps else 0.0)
        at = max(self.free_at + max(0.0, s.delay_s + self.rng.uniform(-s.jitter_s, s.jitter_s)), self.last_at)
        held = False
        origin = self.origin()
        for o in s.outages:
            begin = origin + o.start_s
            if begin <= at < begin + o.duration_s or begin <= now < begin + o.duration_s:
                at, held = max(at, begin + o.duration_s + s.delay_s), True
        self.last_at = at
        return at, held


class LinkProxies:
    """Proxies by device on 127.0.0.1, run by a child process; a context manager that stops them all."""

    def __init__(self, seed: int = 0) -> None:
        self._child = subprocess.Popen(dies_with_parent([sys.executable, "-m", "toolkit.fleet.link_proxy", str(seed)]),
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def add(self, device: str, spec: LinkSpec, host: str, port: int) -> int:
        """Start `device`'s proxy to the broker at host:port; the local port its agent connects to."""
        return int(self._ask({"op": "add", "device": device, "spec": asdict(spec), "host": host, "port": port}))

    def start_clock(self) -> None:
        """The feeding starts now: outages are scheduled from here."""
        self._ask({"op": "clock"})

    def stats(self) -> dict[str, LinkStats]:
        """What crossed each device's link so far."""
        return {d: LinkStats(**v) for d, v in self._ask({"op": "stats"}).items()}

    def close(self) -> None:
        """Stop every proxy (their connections drop) and the child."""
        if self._child.poll() is None:
            assert self._child.stdin is not None
            with contextlib.suppress(OSError):
                self._child.stdin.close()
            try:
                self._child.wait(10)
            except subprocess.TimeoutExpired:
                self._child.kill()
                self._child.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ask(self, request: dict[str, Any]) -> Any:
        assert self._child.stdin is not None and self._child.stdout is not None
        try:
            self._child.stdin.write(json.dumps(request) + "\n")
            self._child.stdin.flush()
            reply = json.loads(self._child.stdout.readline() or "null")
        except (OSError, ValueError):
            reply = None
        if not isinstance(reply, dict) or "ok" not in reply:
            raise RuntimeError(f"the link proxies' process failed (exit status {self._child.poll()})")
        return reply["ok"]


def serve(seed: int, requests: IO[str], replies: IO[str]) -> None:
    """The child: answer `LinkProxies` requests until its pipe closes."""
    with _Relays(seed) as relays:
        for line in requests:
            r = json.loads(line)
            if r["op"] == "add":
                spec = LinkSpec(**{**r["spec"], "outages": tuple(Outage(**o) for o in r["spec"]["outages"])})
                ok: Any = relays.add(r["device"], spec, r["host"], r["port"])
            elif r["op"] == "clock":
                relays.start_clock()
                ok = None
            else:
                ok = {d: asdict(v) for d, v in relays.stats.items()}
            replies.write(json.dumps({"ok": ok}) + "\n")
            replies.flush()


class _Relays:
    """The relays of every device, run by one event-loop thread (in the child process)."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.stats: dict[str, LinkStats] = {}
        self._origin = float("inf")  # outages count from here (time.monotonic); none before `start_clock`
        self._loop = asyncio.new_event_loop()
        self._servers: list[asyncio.Server] = []
        self._thread = threading.Thread(target=self._loop.run_forever, name="link-proxies", daemon=True)
        self._thread.start()

    def add(self, device: str, spec: LinkSpec, host: str, port: int) -> int:
        """Start `device`'s proxy to the broker at host:port; the local port its agent connects to."""
        self.stats[device] = LinkStats()
        rng = random.Random(f"{self.seed}-{device}")

        async def serve() -> int:
            server = await asyncio.start_server(
                lambda r, w: self._relay(device, spec, rng, r, w, host, port), "127.0.0.1", 0)
            self._servers.append(server)
            return int(server.sockets[0].getsockname()[1])

        return self._run(serve())

    def start_clock(self) -> None:
        """The feeding starts now: outages are scheduled from here."""
        self._origin = time.monotonic()

    def close(self) -> None:
        """Stop accepting, drop every connection, stop the loop."""
        async def shutdown() -> None:
            for server in self._servers:
                server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self._loop.is_running():
            self._run(shutdown())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
        self._loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, coro: Awaitable[_T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()  # type: ignore[arg-type]

    async def _relay(self, device: str, spec: LinkSpec, rng: random.Random, agent_r: asyncio.StreamReader,
                     agent_w: asyncio.StreamWriter, host: str, port: int) -> None:
        stats = self.stats[device]
        stats.connections += 1
        up, down = _Direction(spec, rng, lambda: self._origin), _Direction(spec, rng, lambda: self._origin)
        writers = [agent_w]
        try:
            first = await agent_r.read(CHUNK)  # the agent speaks first (CONNECT): connect when it has
            if not first:
                return
            at, held = up.due(time.monotonic(), len(first))
            stats.held_by_outage += held
            await _sleep_until(at)  # an outage postpones the TCP connection to the broker, too
            broker_r, broker_w = await asyncio.open_connection(host, port)
            writers.append(broker_w)
            pipes = {asyncio.create_task(_pipe(agent_r, broker_w, up, deque([(at, first)]), stats, "bytes_up")),
                     asyncio.create_task(_pipe(broker_r, agent_w, down, deque(), stats, "bytes_down"))}
            while pipes:
                done, pipes = await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
                if not all(task.result() for task in done):  # a connection failed: drop the other side too
                    for task in pipes:
                        task.cancel()
                    break
        except (OSError, asyncio.CancelledError):  # a cancelled handler must end normally: Python 3.11's
            return  # StreamReaderProtocol asks it for its exception and prints a traceback otherwise
        finally:
            for w in writers:
                w.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: _Direction,
                queue: deque[tuple[float, bytes]], stats: LinkStats, counter: str) -> bool:
    """Read chunks and deliver each at its time; at EOF deliver what is left and half-close (True), or
    False when a side failed."""
    ready = asyncio.Event()
    if queue:
        ready.set()
    end: float | None = None  # when the EOF is delivered (it crosses the link like data)

    async def read() -> None:
        nonlocal end
        with contextlib.suppress(OSError):
            while sum(len(d) for _, d in queue) <= MAX_HELD:
                data = await reader.read(CHUNK)
                if not data:
                    break
                at, held = direction.due(time.monotonic(), len(data))
                stats.held_by_outage += held
                queue.append((at, data))
                ready.set()
        end = direction.due(time.monotonic(), 0)[0]
        ready.set()

    reading = asyncio.create_task(read())
    try:
        while True:
            await ready.wait()
            ready.clear()
            while queue:
                at, data = queue[0]
                await _sleep_until(at)
                queue.popleft()
                writer.write(data)
                setattr(stats, counter, getattr(stats, counter) + len(data))
                await writer.drain()
            if end is not None and not queue:
                await _sleep_until(end)
                if writer.can_write_eof():
                    writer.write_eof()
                return True
    except OSError:
        return False
    finally:
        reading.cancel()


async def _sleep_until(at: float) -> None:
    delay = at - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


if __name__ == "__main__":
    serve(int(sys.argv[1]), sys.stdin, sys.stdout)
