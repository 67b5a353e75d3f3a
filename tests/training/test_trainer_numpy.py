"""The numpy trainer on its own: checks of its inputs, the batch order, the seam's registry."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from device_agent.training import (
    BACKENDS,
    EXPERT,
    GATE,
    Dims,
    ExpertTask,
    GateTask,
    OptimSpec,
    Permute,
    TrainerUnavailable,
    clip_grad_norm,
    load_trainer,
    minibatches,
)
from device_agent.training.backends import Backend

ADAM = OptimSpec("adam", 0.01)


def blobs(n: int, dim: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Separable latents: one Gaussian blob per class."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((classes, dim)) * 3
    y = rng.integers(0, classes, n)
    return (centers[y] + rng.standard_normal((n, dim))).astype(np.float32), y


def expert_params() -> dict[str, np.ndarray]:
    """An expert 8 -> 16 -> 4 classes."""
    return EXPERT.init(Dims(8, 16, 4), np.random.default_rng(0))


def test_init_has_torch_names_shapes_and_bounds() -> None:
    params = GATE.init(Dims(64, 32, 10), np.random.default_rng(0))
    assert list(params) == ["body.0.weight", "body.0.bias", "final.weight", "final.bias"]
    assert [p.shape for p in params.values()] == [(32, 64), (32,), (10, 32), (10,)]
    assert all(p.dtype == np.float32 for p in params.values())
    assert np.abs(params["body.0.weight"]).max() <= 1 / 8 and np.abs(params["final.bias"]).max() <= 1 / np.sqrt(32)
    assert list(expert_params()) == ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"]


def test_expert_learns_and_leaves_the_callers_params_alone() -> None:
    x, y = blobs(400, 8, 4, 0)
    params = expert_params()
    before = {k: v.copy() for k, v in params.items()}
    trained, metrics = ExpertTask(3, 32, ADAM).fit(params, x, y, seed=1)
    assert all(np.array_equal(before[k], params[k]) for k in params)
    logits, _ = EXPERT.forward(trained, x)
    assert (logits.argmax(1) == y).mean() > 0.95 and metrics["loss"] < 1.0


def test_minibatches_drop_only_a_trailing_single_sample() -> None:
    perm = np.arange(10)[::-1]
    assert [b.tolist() for b in minibatches(10, 3, lambda n: perm)] == [[9, 8, 7], [6, 5, 4], [3, 2, 1]]
    assert [len(b) for b in minibatches(11, 3, lambda n: np.arange(n))] == [3, 3, 3, 2]


def test_batch_order_comes_from_the_callers_function() -> None:
    """order(seed) once per fit, its permutation once per epoch; the default is numpy's PCG64."""
    x, y = blobs(50, 8, 4, 1)
    calls: list[tuple[str, int]] = []

    def order(seed: int) -> Permute:
        calls.append(("seed", seed))
        rng = np.random.default_rng(seed)
        return lambda n: (calls.append(("epoch", n)), rng.permutation(n))[1]

    explicit, _ = ExpertTask(3, 16, ADAM, order).fit(expert_params(), x, y, seed=7)
    assert calls == [("seed", 7), ("epoch", 50), ("epoch", 50), ("epoch", 50)]
    default, _ = ExpertTask(3, 16, ADAM).fit(expert_params(), x, y, seed=7)
    assert all(np.array_equal(explicit[k], default[k]) for k in explicit)
    other, _ = ExpertTask(3, 16, ADAM).fit(expert_params(), x, y, seed=8)
    assert not np.array_equal(other["net.0.weight"], default["net.0.weight"])


def test_clip_grad_norm_scales_to_max_norm_and_leaves_small_gradients() -> None:
    grads = {"a": np.full((2, 2), 3.0, np.float32), "b": np.full(1, 4.0, np.float32)}  # norm sqrt(36 + 16)
    assert clip_grad_norm(grads, 5.0) == pytest.approx(np.sqrt(52))
    assert np.sqrt(sum(float((g * g).sum()) for g in grads.values())) == pytest.approx(5.0, rel=1e-5)
    small = {"a": np.full(3, 0.1, np.float32)}
    clip_grad_norm(small, 5.0)
    assert np.array_equal(small["a"], np.full(3, 0.1, np.float32))


@pytest.mark.parametrize("change,message", [
    (lambda p: p.pop("net.2.bias"), "missing ['net.2.bias']"),
    (lambda p: p.update({"extra": np.zeros(1, np.float32)}), "unexpected ['extra']"),
    (lambda p: p.update({"net.0.bias": np.zeros(3, np.float32)}), "do not form Linear"),
    (lambda p: p.update({"net.0.weight": np.zeros((16, 8), np.int64)}), "must be floating point"),
])
def test_bad_parameters_are_named(change, message: str) -> None:  # type: ignore[no-untyped-def]
    params = expert_params()
    change(params)
    x, y = blobs(10, 8, 4, 0)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ExpertTask(1, 4, ADAM).fit(params, x, y, 0)


def test_bad_data_is_named() -> None:
    x, y = blobs(10, 8, 4, 0)
    gate = GATE.init(Dims(8, 6, 3), np.random.default_rng(0))
    probs = np.full((10, 3, 4), 0.25, np.float32)
    task = GateTask(1, 4, ADAM)
    with pytest.raises(ValueError, match=r"latents must be floating point \[N, 8\], got float32 \[10, 5\]"):
        task.fit(gate, x[:, :5], probs, y, 0)
    with pytest.raises(ValueError, match=r"expert probabilities .* \[10, 3, classes\], got float32 \[10, 2, 4\]"):
        task.fit(gate, x, probs[:, :2], y, 0)
    with pytest.raises(ValueError, match=r"labels must be integers \[10\]"):
        task.fit(gate, x, probs, y[:9], 0)
    with pytest.raises(ValueError, match=r"labels must lie in 0..3, got 1..4"):
        task.fit(gate, x, probs, np.where(y == 0, 4, y), 0)
    with pytest.raises(ValueError, match="optimizer lr must be a finite number >= 0"):
        OptimSpec("adam", float("nan"))
    with pytest.raises(ValueError, match="'rmsprop'"):
        OptimSpec("rmsprop", 0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size >= 1"):
        GateTask(1, 0, ADAM)


def test_registry_loads_both_backends_and_refuses_unknown_names() -> None:
    assert type(load_trainer("numpy")).__name__ == "NumpyTrainer"
    torch_trainer = load_trainer("torch")  # toolkit and torch are installed in this venv
    assert type(torch_trainer).__module__ == "toolkit.device_trainer"
    with pytest.raises(ValueError, match="unknown trainer backend 'jax'; known: numpy, torch"):
        load_trainer("jax")


def test_registry_says_which_package_is_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "toolkit.device_trainer", None)  # as if toolkit were not installed
    with pytest.raises(TrainerUnavailable, match=r"'torch' is not installed here: .*install nmoe-edge\[train\]"):
        load_trainer("torch")
    (tmp_path / "broken_backend.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(BACKENDS, "broken", Backend("broken_backend", ("broken_backend",), "x"))
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_xyz"):  # a real bug is not hidden
        load_trainer("broken")


def test_training_keeps_blas_on_one_thread() -> None:
    """Tiny matmuls: a fit limits BLAS to one thread while it runs and restores the setting after."""
    x, y = blobs(50, 8, 4, 1)
    seen: list[int] = []

    def order(seed: int) -> Permute:
        rng = np.random.default_rng(seed)
        return lambda n: (seen.extend(blas_threads()), rng.permutation(n))[1]

    with threadpool_limits(limits=2, user_api="blas"):  # every BLAS loaded in this process (numpy's, torch's)
        assert set(blas_threads()) == {2}
        ExpertTask(2, 16, ADAM, order).fit(expert_params(), x, y, seed=0)
        assert len(seen) >= 2 and set(seen) == {1}
        assert set(blas_threads()) == {2}


def blas_threads() -> list[int]:
    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]
