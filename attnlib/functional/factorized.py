"""CoaT's conv-attention: factorized attention and the convolutional relative position encoding.

Xu, Xu, Chang & Tu, "Co-Scale Conv-Attentional Image Transformers" (ICCV 2021,
arXiv:2104.06399); official code github.com/mlpc-ucsd/CoaT (``FactorAtt_ConvRelPosEnc``,
``ConvRelPosEnc``). Per head, with q (B, H, N, D), k, v (B, H, M, D):

* factorized attention ``FA(Q, K, V) = scale * Q (softmax_N(K)^T V)``: the softmax runs over the
  TOKEN axis of K (every channel of K is normalised across the M keys), there is no N x M
  attention matrix and the cost is O((N + M) D^2). Its explicit form is the linear map
  ``W = scale * Q softmax_N(K)^T`` (B, H, N, M) with ``FA = W V`` - signed, rows not summing
  to one, so :func:`factorized_attention` reports it as the weights but it is no probability.
* convolutional relative position encoding (CRPE) ``EV = Q_img * DWConv(V_img)`` (Hadamard
  product) on the image tokens of a self-attention call; prefix tokens (the class token) get 0.
  The depthwise convolution's kernel size changes across head groups (official default for 8
  heads: {3: 2 heads, 5: 3 heads, 7: 3 heads}).
* conv-attention ``FA + EV`` (the scale applies to FA only).

Key padding: padded keys get ``-inf`` before the token-axis softmax (weight exactly 0) and their
values are zeroed before the convolution, so padding never reaches a real token; a row whose
keys are all padded gets 0. There is no causal form: the token-axis softmax normalises every
key against all others, the later ones included.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from attnlib._validation import check_qkv, positive_int
from attnlib.functional._common import acc_dtype, repeat_kv
from attnlib.functional.grid import grouped_depthwise_conv, infer_grid

__all__ = [
    "conv_relative_position",
    "crpe_head_split",
    "factorized_attention",
    "factorized_key_softmax",
]

OFFICIAL_WINDOWS: dict[int, int] = {3: 2, 5: 3, 7: 3}
"""CoaT's CRPE head split for 8 heads: kernel size -> number of heads."""


def crpe_head_split(num_heads: int, windows: Mapping[int, int] | int | None = None) -> dict[int, int]:
    """Kernel size -> number of heads of the CRPE convolutions.

    ``windows`` is a mapping ``{kernel: heads}`` (heads summing to ``num_heads``, kernels odd), one
    odd kernel size for every head, or None: the official ``{3: 2, 5: 3, 7: 3}`` for 8 heads and,
    for other head counts, the same 2 : 3 : 3 proportions (``n3 = H * 2 // 8``, ``n5 = (H - n3) // 2``,
    ``n7`` the rest; kernels given no head are left out).
    """
    h = positive_int(num_heads, "crpe: num_heads")
    if windows is None:
        n3 = h * 2 // 8
        n5 = (h - n3) // 2
        split = {3: n3, 5: n5, 7: h - n3 - n5}
        return {k: v for k, v in split.items() if v > 0}
    if isinstance(windows, int) and not isinstance(windows, bool):
        split = {windows: h}
    elif isinstance(windows, Mapping):
        split = {int(k): int(v) for k, v in windows.items()}
    else:
        raise ValueError(f"crpe windows must be a mapping {{kernel: heads}} or one kernel size, got {windows!r}")
    bad = [k for k in split if k <= 0 or k % 2 == 0]
    if bad or any(v <= 0 for v in split.values()) or sum(split.values()) != h:
        raise ValueError(
            f"crpe windows must map odd kernel sizes to head counts > 0 summing to num_heads={h}, got {windows!r}"
        )
    return split


def factorized_key_softmax(k: Tensor, key_padding: Tensor | None = None) -> Tensor:
    """softmax_N(K): k (B, H, M, D) normalised over the M keys per channel, padded keys (``key_padding``
    (B, M), True = real) excluded; rows with no real key give 0. Returned in the accumulation dtype."""
    kf = k.to(acc_dtype(k.dtype))
    if key_padding is None:
        return torch.softmax(kf, dim=2)
    real = key_padding[:, None, :, None]
    empty = ~key_padding.any(1)[:, None, None, None]
    s = torch.softmax(kf.masked_fill(~(real | empty), float("-inf")), dim=2)
    return s.masked_fill(~real, 0.0)


def factorized_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_padding: Tensor | None = None,
    scale: float | None = None,
    return_weights: bool = False,
    return_importance: bool = False,
) -> Tensor | tuple[Tensor, ...]:
    """CoaT factorized attention ``scale * Q (softmax_N(K)^T V)`` in O((N + M) D Dv).

    Args:
        q: (B, H, N, D); k: (B, H_kv, M, D); v: (B, H_kv, M, Dv) (H a multiple of H_kv).
        key_padding: (B, M) bool, True = real key; padded keys get no weight.
        scale: default D**-0.5.
        return_weights: also return the explicit linear map ``W = scale * Q softmax_N(K)^T``
            (B, H, N, M), ``out == W @ v`` (O(N M) memory; signed, not a probability).
        return_importance: also return ``W`` averaged over the queries (B, H, M), computed in
            O(M D) as ``scale * mean_i(q_i) . softmax_N(K)_j`` (signed).

    Returns:
        out (B, H, N, Dv), then the weights and / or importance when requested.
    """
    check_qkv(q, k, v, where="factorized_attention")
    if key_padding is not None and tuple(key_padding.shape) != (q.shape[0], k.shape[2]):
        raise ValueError(
            f"factorized_attention: key_padding must be (B, M) = ({q.shape[0]}, {k.shape[2]}), "
            f"got {tuple(key_padding.shape)}"
        )
    g = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, g), repeat_kv(v, g)
    sc = q.shape[-1] ** -0.5 if scale is None else float(scale)
    dt = acc_dtype(q.dtype)
    sk = factorized_key_softmax(k, key_padding)  # (B, H, M, D)
    qf = q.to(dt)
    context = sk.transpose(-1, -2) @ v.to(dt)  # (B, H, D, Dv)
    out = (sc * (qf @ context)).to(q.dtype)
    extra: list[Tensor] = []
    if return_weights:
        extra.append((sc * (qf @ sk.transpose(-1, -2))).to(q.dtype))
    if return_importance:
        extra.append((sc * (qf.mean(2, keepdim=True) @ sk.transpose(-1, -2))).squeeze(2).to(q.dtype))
    return (out, *extra) if extra else out


def conv_relative_position(
    q: Tensor,
    v: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None],
    *,
    num_prefix_tokens: int = 0,
    grid: Sequence[int] | None = None,
    key_padding: Tensor | None = None,
) -> Tensor:
    """CoaT's convolutional relative position encoding ``EV = Q_img * DWConv(V_img)``.

    Args:
        q: (B, H, N, D); v: (B, H, N, Dv) with Dv == D (self-attention: same tokens).
        weights: per head group g a depthwise kernel (heads_g * D, 1, k_g, k_g), groups in head
            order (channel ``h * D + d`` belongs to head h), covering all H heads.
        biases: per group (heads_g * D,) or None.
        num_prefix_tokens: tokens before the grid (class token); their rows of EV are 0.
        grid: (H_img, W_img) of the remaining tokens; default the most square factorisation of
            their count (square when it is a perfect square; :func:`attnlib.functional.grid.most_square_grid`).
        key_padding: (B, N) bool, True = real token; padded values are zeroed before the
            convolution so they cannot reach a real token's output, and a sequence with no
            real token gets EV = 0 (no ``q * bias`` term: a query with no key returns 0).

    Returns:
        EV (B, H, N, D).
    """
    b, h, n, d = q.shape
    if v.shape != q.shape:
        raise ValueError(
            f"conv_relative_position: q and v must share (B, H, N, D) (self-attention on one token grid), "
            f"got q {tuple(q.shape)} and v {tuple(v.shape)}"
        )
    gh, gw = infer_grid(n, num_prefix_tokens, grid, where="conv_relative_position", square_only=False)
    p = n - gh * gw
    vi = v[:, :, p:]
    if key_padding is not None:
        vi = vi * key_padding[:, None, p:, None].to(vi.dtype)
    img = vi.permute(0, 1, 3, 2).reshape(b, h * d, gh, gw)  # channel h*D + d
    conv = grouped_depthwise_conv(img, weights, biases)
    conv = conv.reshape(b, h, d, gh * gw).transpose(-1, -2)
    ev = q[:, :, p:] * conv
    if key_padding is not None:
        ev = ev * key_padding.any(1)[:, None, None, None].to(ev.dtype)
    return torch.cat([ev.new_zeros(b, h, p, d), ev], 2)
