"""The run report at many clients: plots stay bounded (the routing heatmap grew as N^2 in pixels and
text: ~19 GB of pixels at 1000 clients, which killed synthetic-1000's NMoE runs)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from toolkit.report import block_means, write_plots

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


def test_routing_heatmaps_beyond_max_cells_draw_block_means() -> None:
    matrix = np.arange(25, dtype=np.float32).reshape(5, 5)
    same, k = block_means(matrix, max_cells=5)
    assert k == 1 and same is matrix
    means, k = block_means(matrix, max_cells=2)  # 5 rows in blocks of 3: rows 0-2 and 3-4 (a smaller last block)
    assert k == 3 and means.shape == (2, 2)
    np.testing.assert_allclose(means, [[matrix[:3, :3].mean(), matrix[:3, 3:].mean()],
                                       [matrix[3:, :3].mean(), matrix[3:, 3:].mean()]])
    wide, k = block_means(np.ones((2, 1000), np.float32))  # the larger side decides; values are kept
    assert k == 3 and wide.shape == (1, 334) and np.all(wide == 1.0)
