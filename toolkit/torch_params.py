"""Conversion between torch modules and transport-neutral numpy parameter dicts."""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch
from torch import nn

from toolkit.federated.params import Params

M = TypeVar("M", bound=nn.Module)


def get_params(module: nn.Module) -> Params:
    """A copy of the module's state as float32 numpy arrays."""
    return {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}


def set_params(module: M, params: Params) -> M:
    """Load every parameter (strict: names must match exactly); returns the module."""
    module.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in params.items()}, strict=True)
    return module


def subset(params: Params, prefix: str) -> Params:
    """Parameters under `prefix`, with the prefix removed (e.g. the extractor of a dense model)."""
    return {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}
