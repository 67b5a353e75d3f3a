"""The run report at many clients: plots stay bounded (the routing heatmap grew as N^2 in pixels and
text: ~19 GB of pixels at 1000 clients, which killed synthetic-1000's NMoE runs)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from toolkit.report import write_plots

CLIENTS = 300


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    head = path.read_bytes()[:24]
    return struct.unpack(">II", head[16:24])


def many_clients() -> dict:
    rng = np.random.default_rng(0)
    routing = rng.dirichlet(np.ones(CLIENTS), CLIENTS).tolist()
    rows = [{"client": c, "personalized_accuracy": 0.8, "global_accuracy": 0.6} for c in range(CLIENTS)]
    return {"methods": {
        "fedavg": {"personalized_accuracy": 0.7, "global_accuracy": 0.7, "per_client": rows},
        "nmoe_fedce_fedgate": {"personalized_accuracy": 0.8, "global_accuracy": 0.6, "per_client": rows,
                               "routing": routing}}}


def test_plots_of_300_clients_stay_a_few_thousand_pixels(tmp_path: Path) -> None:
    written = {p.name: p for p in write_plots(many_clients(), tmp_path)}
    assert {"per_client_accuracy.png", "routing_nmoe_fedce_fedgate.png"} <= set(written)
    for path in written.values():
        width, height = png_size(path)
        assert width <= 3000 and height <= 3000, (path.name, width, height)
