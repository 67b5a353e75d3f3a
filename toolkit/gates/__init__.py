"""Routing that knows what it does not know: ceilings, class statistics and the gate methods of issue 13
(fedgate_ood, fedgate_vl, localgate_vl, fedgate_heldout), as device operations of the NMoE recipe."""

from toolkit.gates.device import GateSimDevice
from toolkit.gates.methods import EXTENDED_GATES
from toolkit.gates.recipe import GatesRecipe

__all__ = ["EXTENDED_GATES", "GateSimDevice", "GatesRecipe"]
