"""bench/agent_page.py: the benchmark page from measured results (here made up), section by section."""

import numpy as np

from bench.agent_page import (
    EncodingRun,
    FrozenPeer,
    Results,
    RoundTrip,
    Scaling,
    Setup,
    Throughput,
    batching_costs,
    page,
    table,
)

MACHINE = {"processor": "cpu", "cpus": "2", "platform": "linux", "python": "3.11", "mosquitto": "mosquitto 2",
           "paho": "2.2", "onnxruntime": "1.32"}


def results(unrelated_ms: float) -> Results:
    labels = {0: np.array([1, 2]), 1: np.array([3, 4])}
    encodings = {name: EncodingRun(90.0 - i, 90.0, 4, labels, 0, bytes_, 100 + bytes_, 200.0)
                 for i, (name, bytes_) in enumerate((("fp32", 256), ("fp16", 128), ("int8", 69)))}
    return Results(
        Setup("make bench-agent", False, MACHINE, "load 0.1", "load 0.2", "the fleet", "the 32 fleet", "tests", 32,
              100.0, 0.0),
        RoundTrip("device-1", 1, 391, 76, 3, [0.25, 0.26, 0.27], [0.7, 0.7, 0.7], [0.06, 0.07, 0.06],
                  [0.03, 0.03, 0.03]),
        [Throughput(True, 32, 8.0, 48_000, 0, 4.0, 160.0), Throughput(False, 32, 8.0, 32_000, 0, 1.0, 260.0)],
        [Scaling(2, 1.3, 8.0, 6000, 0, [2.0, 2.5, 3.0], 0, 0, 1.5)],
        encodings,
        FrozenPeer("device-0", "device-3", 3, 1000, 20.0, 6.0, [3.0, 4.0, 5.0], [unrelated_ms] * 3,
                   [4.0, 1001.0], 40, 0),
    )


def test_table_aligns_text_left_and_numbers_right() -> None:
    assert table(("a", "b", "c"), [(1, 2, 3)]) == ["| a | b | c |", "|---|---:|---:|", "| 1 | 2 | 3 |"]


def test_the_page_has_every_section_and_judges_the_targets() -> None:
    text = page(results(unrelated_ms=4.5))
    for heading in ("# Device agent benchmark", "## 1. Remote-expert round trip", "## 2. Expert server throughput",
                    "## 3. Fleet scaling", "## 4. Latent encodings", "## 5. A frozen peer", "## Targets"):
        assert heading in text
    assert "= 0.700 / (0.260 + 0.060) = **2.19x**." in text
    assert "Speed-up: 6000 / 4000 = **1.50x**." in text
    assert "| 2 | 1.3 | 750 | 2.50 | 2.95 | 6000 | 0 | 0 | 0 | 1.50 |" in text
    assert "| fp16 | 89.00 | 90.00 | 100.00 | 128 | 0.500 | 228 | 0.640 | 200 | 0 |" in text
    assert "frozen / before: **0.92x**" in text and "1 waited out the deadline" in text  # 4.5 / 4.9
    assert "(issue 9): p95 0.92x of before the freeze (at most 2x): **met**" in text
    assert "Why the round trip exceeds 2x" in text and "Why micro-batching misses 5x" in text
    blocked = page(results(unrelated_ms=1000.0))  # what head-of-line blocking looked like
    assert "(at most 2x): **missed**" in blocked


def test_batching_costs_solve_the_two_runs() -> None:
    on, off = results(1.0).throughput
    p, b = batching_costs(on, off)
    assert np.isclose(p + b, 1e6 / off.rps) and np.isclose(p + b / on.mean_batch, 1e6 / on.rps)
