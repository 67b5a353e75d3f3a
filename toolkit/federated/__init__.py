"""Federated engine: strategies, client protocol, one round loop, resumable jobs. Transport-agnostic."""

from toolkit.federated.client import Client, FitIns, FitRes
from toolkit.federated.engine import FederatedResult, run_federated
from toolkit.federated.ledger import Ledger
from toolkit.federated.params import Params, nbytes
from toolkit.federated.strategy import FedAvg, NoSharing, PartialSync, Sequential, Strategy

__all__ = [
    "Client", "FedAvg", "FederatedResult", "FitIns", "FitRes", "Ledger", "NoSharing", "Params",
    "PartialSync", "Sequential", "Strategy", "nbytes", "run_federated",
]
