"""The numpy trainer (device_agent.training) against toolkit.training's torch updates.

Same initial parameters, same batches (the numpy tasks take torch's permutation stream as their
batch order), same optimizer: the parameters after several epochs agree within 1e-5.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch

from device_agent.training import (
    EXPERT,
    GATE,
    ExpertTask,
    GateTask,
    OptimSpec,
    Params,
    Permute,
    cross_entropy,
    load_trainer,
    mixture_nll,
)
from toolkit import training
from toolkit.models import Expert, Gate
from toolkit.torch_params import get_params

TOL = 1e-5
N, D, C, E = 641, 64, 10, 10  # 641 = 10 batches of 64 + a trailing batch of one (dropped)
EXPERT_HIDDEN, GATE_HIDDEN, BATCH, EPOCHS = 128, 64, 64, 5
ADAM = {"kind": "adam", "lr": 0.01, "weight_decay": 5e-4}
SGD = {"kind": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny matmuls: two torch threads spin against each other on a loaded 2-core machine (50x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def torch_order(seed: int) -> Permute:
    """toolkit.training.minibatches' stream: one seeded generator, one randperm per epoch."""
    gen = torch.Generator().manual_seed(seed)
    return lambda n: torch.randperm(n, generator=gen).numpy()


def data(seed: int, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Latents [N, D], labels [N], and every expert's class probabilities [N, E, C]."""
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal((N, D)) * scale).astype(np.float32)
    y = rng.integers(0, C, N)
    logits = rng.standard_normal((N, E, C)) * 2
    probs = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)
    return z, y, probs


def init(build: Callable[[], torch.nn.Module], seed: int) -> Params:
    torch.manual_seed(seed)
    return get_params(build())


def max_diff(a: Params, b: Params) -> float:
    assert set(a) == set(b)
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def fit_expert_both(optim: dict, seed: int, scale: float = 1.0) -> tuple[tuple, tuple]:
    z, y, _ = data(seed, scale)
    build = lambda: Expert(D, EXPERT_HIDDEN, C)
    params = init(build, seed)
    torch_task = training.SupervisedTask(build, EPOCHS, BATCH, training.OptimSpec(**optim))
    numpy_task = ExpertTask(EPOCHS, BATCH, OptimSpec(**optim), torch_order)
    return (torch_task.fit(params, training.TensorData(torch.tensor(z), torch.tensor(y)), seed + 100),
            numpy_task.fit(params, z, y, seed + 100))


def fit_gate_both(optim: dict, seed: int, scale: float = 1.0) -> tuple[tuple, tuple]:
    z, y, probs = data(seed, scale)
    build = lambda: Gate(D, GATE_HIDDEN, E)
    params = init(build, seed)
    torch_task = training.GateTask(build, EPOCHS, BATCH, training.OptimSpec(**optim))
    numpy_task = GateTask(EPOCHS, BATCH, OptimSpec(**optim), torch_order)
    gate_data = training.GateData(torch.tensor(z), torch.tensor(probs), torch.tensor(y))
    return torch_task.fit(params, gate_data, seed + 100), numpy_task.fit(params, z, probs, y, seed + 100)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("optim", [ADAM, SGD], ids=["adam", "sgd"])
@pytest.mark.parametrize("fit_both", [fit_expert_both, fit_gate_both], ids=["expert", "gate"])
def test_update_equals_torch(fit_both: Callable, optim: dict, seed: int) -> None:
    (torch_params, torch_metrics), (numpy_params, numpy_metrics) = fit_both(optim, seed)
    assert max_diff(torch_params, numpy_params) < TOL
    assert all(v.dtype == np.float32 for v in numpy_params.values())
    assert numpy_metrics["loss"] == pytest.approx(torch_metrics["loss"], rel=1e-6)


def test_expert_clipping_at_5_triggers_and_equals_torch() -> None:
    """Inputs x10 with SGD: the gradient norm exceeds 5; clipped updates still agree with torch."""
    (torch_params, _), (numpy_params, _) = fit_expert_both(SGD, 0, scale=10)
    assert max_diff(torch_params, numpy_params) < TOL
    (_, _), (unclipped, _) = fit_expert_both({**SGD, "grad_clip": 1e9}, 0, scale=10)
    assert max_diff(unclipped, numpy_params) > 1e-2  # clipping changed the result


def test_gate_clipping_triggers_and_equals_torch() -> None:
    """mixture_nll's gradients are small: a clip of 0.05 bites, with SGD at lr 0.1 and momentum 0.9."""
    optim = {"kind": "sgd", "lr": 0.1, "momentum": 0.9, "grad_clip": 0.05}
    (torch_params, _), (numpy_params, _) = fit_gate_both(optim, 0, scale=3)
    assert max_diff(torch_params, numpy_params) < TOL
    (_, _), (unclipped, _) = fit_gate_both({**optim, "grad_clip": 1e9}, 0, scale=3)
    assert max_diff(unclipped, numpy_params) > 1e-2


@pytest.mark.parametrize("model,build", [(EXPERT, lambda: Expert(D, EXPERT_HIDDEN, C)),
                                         (GATE, lambda: Gate(D, GATE_HIDDEN, E))], ids=["expert", "gate"])
def test_forward_backward_equal_autograd(model, build) -> None:  # type: ignore[no-untyped-def]
    """One batch: outputs, loss and every parameter gradient as torch autograd computes them."""
    z, y, probs = data(3)
    module = build()
    params = get_params(module)
    out, acts = model.forward(params, z)
    torch_out = module(torch.tensor(z))
    assert np.abs(out - torch_out.detach().numpy()).max() < 1e-5
    if model is EXPERT:
        loss, d_out = cross_entropy(out, y)
        torch_loss = torch.nn.functional.cross_entropy(torch_out, torch.tensor(y))
    else:
        loss, d_out = mixture_nll(out, probs, y)
        torch_loss = training.mixture_nll(torch_out, torch.tensor(probs), torch.tensor(y))
    torch_loss.backward()
    assert loss == pytest.approx(torch_loss.item(), rel=1e-6)
    grads = model.backward(params, acts, d_out)
    assert set(grads) == set(params)
    for name, p in module.named_parameters():
        assert np.abs(grads[name] - p.grad.numpy()).max() < 1e-6, name


def test_mixture_nll_clamp_equals_torch() -> None:
    """Where the mixture gives the true class (almost) nothing, the clamp at 1e-8 stops the gradient."""
    logits = np.array([[0.0, 1.0], [2.0, -1.0]], dtype=np.float32)
    probs = np.array([[[1e-12, 1.0], [1e-12, 1.0]], [[0.5, 0.5], [0.9, 0.1]]], dtype=np.float32)
    y = np.array([0, 1])
    loss, d = mixture_nll(logits, probs, y)
    t_logits = torch.tensor(logits, requires_grad=True)
    t_loss = training.mixture_nll(t_logits, torch.tensor(probs), torch.tensor(y))
    t_loss.backward()
    assert loss == pytest.approx(t_loss.item(), rel=1e-6)
    assert np.all(d[0] == 0) and np.abs(d[1]).max() > 0
    assert np.abs(d - t_logits.grad.numpy()).max() < 1e-7


def test_torch_backend_through_the_seam_equals_numpy_backend() -> None:
    """load_trainer("torch") runs toolkit.training's tasks; with torch's batch order the numpy one agrees."""
    optim = OptimSpec("sgd", lr=0.03, momentum=0.5, weight_decay=1e-3, grad_clip=0.5)
    z, y, probs = data(4, scale=3)
    expert, gate = init(lambda: Expert(D, EXPERT_HIDDEN, C), 4), init(lambda: Gate(D, GATE_HIDDEN, E), 4)
    torch_trainer, numpy_trainer = load_trainer("torch"), load_trainer("numpy")
    numpy_expert = dataclasses.replace(numpy_trainer.expert_task(3, 32, optim), order=torch_order)  # type: ignore[type-var]
    numpy_gate = dataclasses.replace(numpy_trainer.gate_task(3, 32, optim), order=torch_order)  # type: ignore[type-var]
    torch_expert_params, torch_metrics = torch_trainer.expert_task(3, 32, optim).fit(expert, z, y, 9)
    numpy_expert_params, numpy_metrics = numpy_expert.fit(expert, z, y, 9)
    assert max_diff(torch_expert_params, numpy_expert_params) < TOL
    assert numpy_metrics["loss"] == pytest.approx(torch_metrics["loss"], rel=1e-6)
    torch_gate_params, _ = torch_trainer.gate_task(3, 32, optim).fit(gate, z, probs, y, 9)
    assert max_diff(torch_gate_params, numpy_gate.fit(gate, z, probs, y, 9)[0]) < TOL
    # the same settings straight through toolkit.training: the adapter hands every field over
    direct = training.SupervisedTask(lambda: Expert(D, EXPERT_HIDDEN, C), 3, 32,
                                     training.OptimSpec("sgd", 0.03, 0.5, 1e-3, 0.5))
    direct_params, _ = direct.fit(expert, training.TensorData(torch.tensor(z), torch.tensor(y)), 9)
    assert max_diff(direct_params, torch_expert_params) == 0


def test_torch_backend_fits_on_one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny matmuls: the torch backend trains on one thread and gives the process its setting back."""
    seen: list[int] = []
    loss = training.mixture_nll
    monkeypatch.setattr(training, "mixture_nll", lambda *a: (seen.append(torch.get_num_threads()), loss(*a))[1])
    z, y, probs = data(5)
    torch.set_num_threads(2)
    try:
        load_trainer("torch").gate_task(1, 64, OptimSpec("adam", 0.01)).fit(
            init(lambda: Gate(D, GATE_HIDDEN, E), 5), z, probs, y, 0)
        assert seen and set(seen) == {1} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)  # this module's setting (one_torch_thread)
