"""The clients' own evaluations -> what metrics.json reports: means over clients, per-client rows, routing."""

from __future__ import annotations

from typing import Any

from device_agent.wire.training_frames import ROUTING
from toolkit.federated.client import EvaluateRes, Metrics

ACCURACIES = ("personalized_accuracy", "global_accuracy")


def summarize(per_client: list[dict[str, Any]]) -> dict[str, Any]:
    """Each accuracy's mean over clients (unweighted, in the rows' order) and the rows themselves."""
    means = {key: sum(row[key] for row in per_client) / len(per_client) for key in ACCURACIES}
    return {**means, "per_client": per_client}


def client_rows(results: list[tuple[int, EvaluateRes]]) -> list[dict[str, Any]]:
    """One row per evaluated client: its id and accuracies."""
    return [{"client": cid, **{key: res.metrics[key] for key in ACCURACIES}} for cid, res in results]


def mean_accuracies(results: list[tuple[int, EvaluateRes]]) -> Metrics:
    """A curve point: the mean accuracies of the clients that answered."""
    summary = summarize(client_rows(results))
    return {key: summary[key] for key in ACCURACIES}


def routing_rows(results: list[tuple[int, EvaluateRes]], num_experts: int) -> list[list[float]]:
    """Row per client: the shares of its top-k choices per expert, from its `routing.<e>` metrics (absent: 0,
    so a device with many experts may send only its nonzero shares)."""
    return [[res.metrics.get(f"{ROUTING}{e}", 0.0) for e in range(num_experts)] for _, res in results]
