"""Federated engine: strategies, client protocol, executors, one round loop, resumable jobs. Transport-agnostic.

The NMoE recipe built on it (toolkit.federated.recipe) and its device operations
(toolkit.federated.operations) are imported from their modules.
"""

from toolkit.federated.availability import AllAvailable, Availability, sample_clients
from toolkit.federated.client import (
    Client,
    EvaluateIns,
    EvaluateRes,
    Evaluator,
    FitIns,
    FitRes,
    Metrics,
    Stateful,
)
from toolkit.federated.engine import FederatedResult, RoundPolicy, run_federated
from toolkit.federated.executor import Executor, InProcess, ThreadPool
from toolkit.federated.ledger import Failure, Ledger
from toolkit.federated.params import Params, nbytes
from toolkit.federated.strategy import FedAvg, NoSharing, PartialSync, Sequential, Strategy

__all__ = [
    "AllAvailable", "Availability", "Client", "EvaluateIns", "EvaluateRes", "Evaluator", "Executor", "Failure",
    "FedAvg", "FederatedResult", "FitIns", "FitRes", "InProcess", "Ledger", "Metrics", "NoSharing", "Params",
    "PartialSync", "RoundPolicy", "Sequential", "Stateful", "Strategy", "ThreadPool", "nbytes", "run_federated",
    "sample_clients",
]
