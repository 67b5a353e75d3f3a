"""Routing that knows what it does not know: ceilings, class statistics and the extended gate methods."""

from toolkit.gates.ceiling import ceilings
from toolkit.gates.methods import EXTENDED_GATES, ExtendedGates, Stage3Inputs

__all__ = ["EXTENDED_GATES", "ExtendedGates", "Stage3Inputs", "ceilings"]
