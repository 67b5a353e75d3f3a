"""The losses of the MLP stages with their gradients w.r.t. the model outputs (as toolkit.training).

Each returns (loss, d loss / d outputs); the loss is a Python float of the float32 value.
"""

from __future__ import annotations

import numpy as np

P_MIN = np.float32(1e-8)  # mixture_nll's clamp on the mixture's probability of the true class


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis (keeps x's float dtype)."""
    e: np.ndarray = np.exp(x - x.max(axis=-1, keepdims=True))
    e /= e.sum(axis=-1, keepdims=True)
    return e


def cross_entropy(logits: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy of logits [B, C] against labels y [B] (torch.nn.functional.cross_entropy)."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_sum = np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    log_probs = shifted - log_sum
    rows = np.arange(len(y))
    loss = -log_probs[rows, y].mean()
    d_logits = np.exp(log_probs)
    d_logits[rows, y] -= 1
    d_logits /= np.float32(len(y))
    return float(loss), d_logits


def mixture_nll(gate_logits: np.ndarray, probs: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Negative log-likelihood of the gate-weighted mixture of frozen expert class probabilities.

    gate_logits [B, E], probs [B, E, C] (every expert's softmax output), y [B]:
    p_true = sum_j softmax(gate_logits)_j * probs[:, j, y], loss = -mean(log(max(p_true, 1e-8))).
    """
    weights = softmax(gate_logits)
    p_label = probs[np.arange(len(y)), :, y]  # [B, E]: each expert's probability of the true class
    p_true = (weights * p_label).sum(axis=1)
    kept = p_true >= P_MIN  # the clamp passes the gradient only where it does not bite (as torch)
    loss = -np.log(np.maximum(p_true, P_MIN)).mean()
    d_p_true = np.zeros_like(p_true)
    np.divide(np.float32(-1.0 / len(y)), p_true, out=d_p_true, where=kept)
    d_weights = d_p_true[:, None] * p_label
    d_logits = weights * (d_weights - (d_weights * weights).sum(axis=1, keepdims=True))
    return float(loss), d_logits.astype(np.float32, copy=False)
