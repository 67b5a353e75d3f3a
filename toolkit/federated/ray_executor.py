"""The Ray executor: a step's client updates run as Ray tasks, on one machine or a cluster (issue 14).

Modelled on Flower's simulation engine (flwr.simulation.ray_transport): the server-side round loop
stays in this process and asks the step's clients from threads (Flower's ClientProxies), each
blocking on its own Ray job; the Ray workers are stateless. What moves is the client update, a pure
function `task.fit(params, data, seed) -> (params, metrics)` (toolkit.training.Task): `place(task)`
wraps a task so that its `fit` runs as a Ray task with `num_cpus=1` and `threads_per_worker` torch
threads. A client's private state stays in its in-process `Client` (checkpointed as before, so a run
resumes exactly, with or without Ray); its data goes into Ray's object store once, the first time it
is trained on, and every later round passes only the reference.

Numbers equal an in-process run with the same torch thread count (torch's intra-op thread count
changes the last bits of a convolution's sums; docs/scale.md). A call still running at the deadline
is abandoned as in `ThreadPool`: its Ray task finishes in the background and its result is dropped.
"""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from toolkit.federated.executor import ThreadPool
from toolkit.federated.params import Params


def _fit_in_worker(task: Any, params: Params, data: Any, seed: int,
                   threads: int) -> tuple[Params, dict[str, float]]:
    """What a Ray worker runs: one client update with `threads` torch threads."""
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return task.fit(writable(params), data, seed)  # type: ignore[no-any-return]


def writable(params: Params) -> Params:
    """Own copies of parameters read zero-copy from the object store (those are read-only)."""
    return {name: np.array(value) for name, value in params.items()}


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Raise ConnectionError unless HOST:PORT accepts a TCP connection ("auto" is left to Ray): ray.init
    retries an unreachable address for minutes."""
    if address == "auto":
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        raise ConnectionError(f"--ray-address {address}: expected 'auto' or HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout).close()
    except OSError as e:
        raise ConnectionError(f"--ray-address {address}: no Ray cluster reachable ({e})") from None


class RayExecutor(ThreadPool):
    """Asks a step's clients from threads of this process; client updates placed with `place` run on Ray.

    `address`: None starts a local Ray with `num_cpus` CPUs (default: every core here); "auto" or
    "HOST:PORT" joins a running cluster (`ray start --head` ...; every node needs nmoe-edge importable).
    At most `in_flight` calls (default: twice the cluster's CPUs) are asked at once.
    """

    def __init__(self, address: str | None = None, num_cpus: int | None = None, threads_per_worker: int = 1,
                 in_flight: int | None = None) -> None:
        import ray

        if address is not None:
            check_reachable(address)
        if not ray.is_initialized():
            if address is None:
                # Ray renices its workers by +15 by default: under load they would lose the CPU to
                # everything else, including an in-process run; they keep this process's priority.
                os.environ.setdefault("RAY_worker_niceness", "0")
                ray.init(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False,
                         configure_logging=False, log_to_driver=True)
            else:
                try:
                    ray.init(address=address, configure_logging=False)
                except ConnectionError as e:  # one line for the CLI, not Ray's traceback
                    raise ConnectionError(f"--ray-address {address}: no Ray cluster reachable: "
                                          f"{str(e).splitlines()[0]}") from None
        self.cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))  # type: ignore[no-untyped-call]
        super().__init__(in_flight or 2 * self.cpus)
        self.threads = threads_per_worker
        self._fit = ray.remote(num_cpus=1, max_retries=0)(_fit_in_worker)
        self._refs: dict[int, tuple[object, Any]] = {}  # id(data) -> (data kept alive, its ObjectRef)
        self._lock = threading.Lock()

    def ref(self, data: object) -> Any:
        """The object-store reference of `data`, put there on first use only."""
        import ray

        with self._lock:
            held = self._refs.get(id(data))
            if held is None:
                held = self._refs[id(data)] = (data, ray.put(data))
            return held[1]

    @property
    def puts(self) -> int:
        """How many data objects have been put in the object store."""
        return len(self._refs)

    def fit(self, task: Any, params: Params, data: object, seed: int) -> tuple[Params, dict[str, float]]:
        """task.fit(params, data, seed) as a Ray task (blocks this thread until it is done)."""
        import ray

        params, metrics = ray.get(self._fit.remote(task, params, self.ref(data), seed, self.threads))
        return writable(params), metrics

    def place(self, task: Any) -> RemoteTask:
        """`task` with its `fit` run on Ray."""
        return RemoteTask(task, self)

    def close(self) -> None:
        """Drop the object-store references and leave Ray (a local Ray stops)."""
        import ray

        self._refs.clear()
        ray.shutdown()


@dataclass(frozen=True)
class RemoteTask:
    """A client-update task whose `fit` runs on Ray (the same Task protocol as the task it wraps)."""

    task: Any
    executor: RayExecutor

    def fit(self, params: Params, data: Any, seed: int) -> tuple[Params, dict[str, float]]:
        return self.executor.fit(self.task, params, data, seed)
