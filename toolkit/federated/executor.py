"""The executor seam: how the calls of one step reach their clients (in the spirit of httpx's transports).

An executor runs a list of zero-argument calls (e.g. `client.fit` bound to its instructions) and
returns one outcome per call, in the order given: the call's result, or the exception it raised
(`TimeoutError` when it did not finish before the deadline). It never raises for a failing call;
KeyboardInterrupt and other BaseExceptions that are not Exceptions still propagate.

- `InProcess` (the default) runs the calls one after another in this thread: the simulation's exact
  numbers. A deadline is checked after each call: a result that comes late is dropped, and calls not
  started by then are not started.
- `ThreadPool` runs every call at once in its own thread: for clients that wait on a network (MQTT
  proxies). A call still running at the deadline is abandoned (its thread finishes in the background
  and its result is dropped), so only use it with clients that tolerate that.
- `SendThenWait` sends every call first, from the caller's thread, then waits for the answers
  against one deadline: no thread per call. For clients whose calls are messages (the MQTT fleet's
  device proxies), as Flower's `Grid.send_and_receive` pushes a round's messages, then pulls the
  replies. A call qualifies when it is a `SendableCall`; a step with other calls goes to `ThreadPool`.
- A Ray executor (issue 14) is another implementation of the same `map`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

T = TypeVar("T")
Pending = Callable[[float | None], T]  # waits up to the given seconds (None: its own deadline) for the answer;
# raises the call's exception, or TimeoutError when none came in time (the call is then abandoned)


class Executor(Protocol):
    """Runs one step's calls and reports every call's outcome."""

    def map(self, calls: Sequence[Callable[[], T]], timeout: float | None) -> list[T | Exception]:
        """One outcome per call, in order: its result or its exception; `timeout` seconds, None: no deadline."""
        ...


class InProcess:
    """One call after another in the caller's thread."""

    def map(self, calls: Sequence[Callable[[], T]], timeout: float | None) -> list[T | Exception]:
        deadline = None if timeout is None else time.monotonic() + timeout
        outcomes: list[T | Exception] = []
        for call in calls:
            if deadline is not None and time.monotonic() >= deadline:
                outcomes.append(TimeoutError(f"not started within the {timeout:g} s deadline"))
                continue
            try:
                result = call()
            except Exception as e:  # noqa: BLE001 - a failing client is an outcome, not the end of the run
                outcomes.append(e)
                continue
            late = deadline is not None and time.monotonic() > deadline
            outcomes.append(TimeoutError(f"answered after the {timeout:g} s deadline") if late else result)
        return outcomes


class ThreadPool:
    """Every call at once, each in its own thread (at most `max_workers` at a time)."""

    def __init__(self, max_workers: int | None = None) -> None:
        self.max_workers = max_workers

    def map(self, calls: Sequence[Callable[[], T]], timeout: float | None) -> list[T | Exception]:
        if not calls:
            return []
        pool = ThreadPoolExecutor(max_workers=self.max_workers or len(calls), thread_name_prefix="nmoe-client")
        futures = [pool.submit(call) for call in calls]
        done, _ = wait(futures, timeout)
        pool.shutdown(wait=False, cancel_futures=True)
        outcomes: list[T | Exception] = []
        for future in futures:
            if future not in done:
                outcomes.append(TimeoutError(f"no answer within the {timeout:g} s deadline"))
            elif (error := future.exception()) is None:
                outcomes.append(future.result())
            elif isinstance(error, Exception):
                outcomes.append(error)
            else:
                raise error  # KeyboardInterrupt and the like end the run
        return outcomes


@dataclass(frozen=True)
class SendableCall(Generic[T]):
    """A call that can also run in two halves: `send()` puts it on the wire and returns its `Pending`."""

    run: Callable[[], T]
    send: Callable[[], Pending[T]]

    def __call__(self) -> T:
        return self.run()


class SendThenWait:
    """Sends every call in the caller's thread, then waits for each answer until the deadline (see the
    module docstring); steps whose calls are not all `SendableCall`s go to `fallback`."""

    def __init__(self, fallback: Executor | None = None) -> None:
        self.fallback = fallback or ThreadPool()

    def map(self, calls: Sequence[Callable[[], T]], timeout: float | None) -> list[T | Exception]:
        sendable = [c for c in calls if isinstance(c, SendableCall)]
        if len(sendable) != len(calls):
            return self.fallback.map(calls, timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        sent: list[Pending[T] | Exception] = []
        for call in sendable:
            try:
                sent.append(call.send())
            except Exception as e:  # noqa: BLE001 - a call that cannot be sent is that call's outcome
                sent.append(e)
        outcomes: list[T | Exception] = []
        for pending in sent:
            if isinstance(pending, Exception):
                outcomes.append(pending)
                continue
            try:
                outcomes.append(pending(None if deadline is None else max(0.0, deadline - time.monotonic())))
            except Exception as e:  # noqa: BLE001 - a failing client is an outcome, not the end of the run
                outcomes.append(e)
        return outcomes
