"""Task gates of gated class-attention (HAT-style masks), the math of exemplar-free continual learning.

Cotogni, Yang, Cusano, Bagdanov & van de Weijer, "Exemplar-free Continual Learning of Vision
Transformers via Gated Class-Attention and Cascaded Feature Drift Compensation" (2022,
arXiv:2211.12292); official code github.com/OcraM17/GCAB-CFDC (``continual/convit.py``,
``continual/engine_GCAB.py``, ``continual/scaler.py``), after HAT (Serra et al., ICML 2018).

Each task t owns embeddings e_t; its gate is ``sigmoid(s * e_t)`` with a scale s annealed
over each epoch from ``1 / s_max`` to ``s_max`` while the task trains (soft gates), and
binarised ``[sigmoid(s e) > 0.5]`` once the task is done. A gate on the input and output
channels of a linear layer is the same as masking its weight matrix, which is how
:func:`gate_linear` applies it: ``diag(out_gate) W diag(in_gate)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "gate_gradient_factor",
    "gate_linear",
    "gate_regularizer",
    "gate_scale",
    "hat_embedding_grad",
    "hat_gate",
]


def hat_gate(embedding: Tensor, s: float, *, binary: bool = False) -> Tensor:
    """``sigmoid(s * e)``, or its binarised form ``[sigmoid(s * e) > 0.5]`` (as e's dtype)."""
    g = torch.sigmoid(s * embedding)
    return (g > 0.5).to(embedding.dtype) if binary else g


def gate_scale(batch: int, num_batches: int, s_max: float) -> float:
    """The annealed gate scale of batch ``batch`` of an epoch of ``num_batches``:
    ``1 / s_max + (s_max - 1 / s_max) * batch / num_batches`` (``1 / s_max`` at the first batch)."""
    if num_batches <= 0 or not 0 <= batch <= num_batches:
        raise ValueError(f"gate_scale: need 0 <= batch <= num_batches and num_batches > 0, got {batch}, {num_batches}")
    return 1.0 / s_max + (s_max - 1.0 / s_max) * batch / num_batches


def gate_linear(
    weight: Tensor, bias: Tensor | None, out_gate: Tensor | None, in_gate: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """A linear layer with gated inputs and outputs as masked parameters.

    ``y = out_gate * (W (in_gate * x) + b)`` equals ``F.linear(x, W', b')`` with
    ``W' = diag(out_gate) W diag(in_gate)`` and ``b' = out_gate * b``. weight (O, I), bias (O,),
    gates (O,) / (I,) or None (ungated).
    """
    w = weight
    if in_gate is not None:
        w = w * in_gate[None, :]
    if out_gate is not None:
        w = w * out_gate[:, None]
        bias = None if bias is None else bias * out_gate
    return w, bias


def gate_regularizer(gates: list[Tensor], previous: list[Tensor]) -> Tensor:
    """GCAB's sparsity term on the current task's gates (before the ``lambda`` weight).

    ``sum_m sum(m * (1 - m_pre)) / sum(1 - m_pre)`` over the gate vectors m, with ``m_pre`` the
    elementwise maximum of the earlier tasks' binary gates; with no earlier task (``m_pre`` all
    zeros) that is the mean gate value. 0 when every channel is taken (``m_pre`` all ones).
    """
    if len(previous) != len(gates):
        raise ValueError(f"gate_regularizer: {len(gates)} gates but {len(previous)} previous masks")
    num = sum((g * (1 - p)).sum() for g, p in zip(gates, previous, strict=True))
    den = sum((1 - p).sum() for p in previous)
    den_t = torch.as_tensor(den, dtype=gates[0].dtype)
    return torch.where(den_t > 0, num / den_t.clamp_min(1.0e-12), torch.zeros_like(den_t))  # type: ignore[arg-type]


def gate_gradient_factor(out_taken: Tensor, in_taken: Tensor | None = None) -> Tensor:
    """Gradient mask of a gated weight (O, I): ``1 - outer(m_out, m_in)`` for the channels earlier tasks
    took (``m = m_pre``, binary), so their weights stay fixed; a bias (in_taken None): ``1 - m_out``."""
    if in_taken is None:
        return 1 - out_taken
    return 1 - out_taken[:, None] * in_taken[None, :]


def hat_embedding_grad(embedding: Tensor, grad: Tensor, s: float, s_max: float, thres_cosh: float = 50.0) -> Tensor:
    """HAT's compensation of a task embedding's gradient for the annealed scale:
    ``grad * s_max / s * (cosh(clamp(s e, +-thres)) + 1) / (cosh(e) + 1)``."""
    num = torch.cosh(torch.clamp(s * embedding, -thres_cosh, thres_cosh)) + 1
    den = torch.cosh(embedding) + 1
    return grad * (s_max / s) * num / den
