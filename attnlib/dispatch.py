"""Machine and backend policy: every rule that picks one of several equivalent code paths.

The math lives in :mod:`attnlib.functional` and :mod:`attnlib.kernels`; which of its
interchangeable forms runs for a given call (device, dtype, shape) is decided here, so that
tuning attnlib for a machine means editing this module only. No rule changes what is computed:
each path gives the same result up to rounding. The measurements behind the thresholds are in
``benchmarks/results/`` (``cpu_small_attention.md`` for the short-sequence CPU rules).

This is a leaf module (it imports torch only), so the functional and kernel layers can ask it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch

__all__ = [
    "ENTMAX_SORT_MAX_N",
    "FEW_KEYS",
    "KERNELIZED_DENSE_MAX_N",
    "MASKED_DENSE_MAX_ELEMENTS",
    "OT_BLOCK_ELEMENTS",
    "OT_WHOLE_MATRIX_MAX",
    "ROW_BLOCK_ELEMENTS",
    "SERIAL_LOOP_ELEMENTS",
    "SHORT_ROW",
    "block_layout_as_dense",
    "block_layout_as_masked_dense",
    "cpu_key_padding",
    "cpu_vector_width",
    "entmax_fused",
    "entmax_sorts",
    "few_keys_explicit",
    "fused_cpu_block_parts",
    "kernelized_dense",
    "ot_blocks",
    "ot_whole_matrix",
    "row_block",
    "serial_cpu_loop",
    "softmax_backend",
    "softmax_rows_explicit",
    "triton_preferred",
]

SHORT_ROW = 32
"""Softmax rows shorter than this are computed explicitly on CPU (:func:`softmax_rows_explicit`)."""

FEW_KEYS = 16
"""Below this many keys the ``softmax`` variant runs the explicit path on CPU, not SDPA (:func:`few_keys_explicit`)."""


ROW_BLOCK_ELEMENTS = 1 << 22
"""Elements of one (rows x columns) block that the blocked (O(N · block) memory) paths hold at once."""


def row_block(rows: int, cols: int, lead: int = 1) -> int:
    """How many of ``rows`` query rows a blocked path processes at once.

    The blocked forms (Sparsifiner's predictor, Sinkhorn / IPOT iterations, the matmul form of
    AFT-full) never hold more than about :data:`ROW_BLOCK_ELEMENTS` floats of a (lead, rows, cols)
    intermediate, so their memory grows with N · block, not N²; at least 16 rows (or all of them).
    """
    return max(1, min(rows, max(16, ROW_BLOCK_ELEMENTS // max(1, cols * lead))))


ENTMAX_SORT_MAX_N = 128
"""Rows up to this long take 1.5-entmax's sort-based threshold (:func:`entmax_sorts`)."""


def entmax_sorts(n: int) -> bool:
    """Whether 1.5-entmax sorts rows of length ``n`` rather than finding the threshold sort-free.

    The sort-free threshold (block maxima, candidates, Newton steps) has a fixed bookkeeping cost
    per call; on short rows the sort is cheaper (a (64, 17, 64) training batch: 2.3x softmax's
    time sort-free vs 1.8x sorted, one loaded CPU thread), on long rows it is several times slower.
    """
    return n <= ENTMAX_SORT_MAX_N


def entmax_fused(device: torch.device) -> bool:
    """Whether entmax attention tries the fused Triton kernel (:mod:`attnlib.kernels.entmax`) first.

    True on CUDA (the call still takes the PyTorch path when Triton is missing or the kernel does
    not support it: a learned alpha, weights, dropout, masks other than causal / right padding).
    On CPU the PyTorch path (sort-free 1.5-entmax, query chunks) runs; the kernel there is only
    Triton's interpreter.
    """
    return device.type == "cuda"


OT_WHOLE_MATRIX_MAX = 1 << 18
"""Up to this many (batch x heads x N x M) elements OT attention runs on the whole matrix (:func:`ot_whole_matrix`)."""


def ot_whole_matrix(elements: int) -> bool:
    """Whether OT attention (IPOT / Sinkhorn over N x M per head) holds the whole cost matrix.

    The blocked form recomputes each block of costs at every step and checkpoints it under
    autograd (memory O(N · block)); on small problems (short sequences) its per-block calls cost
    far more than the arithmetic, so up to :data:`OT_WHOLE_MATRIX_MAX` elements the solver runs on
    the whole matrix (autograd then keeps every step's matrices: n_iters x a few x 1 MB at most).
    """
    return elements <= OT_WHOLE_MATRIX_MAX


OT_BLOCK_ELEMENTS = 1 << 18
"""Elements of one (heads x rows x keys) block of blocked IPOT attention (:func:`ot_blocks`)."""


def ot_blocks(lead: int, rows: int, cols: int) -> tuple[int, int]:
    """(heads, rows) of one block of blocked IPOT attention over ``lead`` (rows x cols) problems.

    A block's logits are formed by one matmul and read back at once by a softmax, so blocks of
    about :data:`OT_BLOCK_ELEMENTS` floats (1 MB in float32) stay in cache between the two:
    whole heads, several at a time, when a head fits, else a band of at least 16 rows of one head
    (never more than :data:`ROW_BLOCK_ELEMENTS`).
    """
    budget = max(1, min(ROW_BLOCK_ELEMENTS, OT_BLOCK_ELEMENTS))
    if rows * cols <= budget:
        return max(1, min(lead, budget // max(1, rows * cols))), rows
    return 1, max(1, min(rows, max(16, budget // max(1, cols))))


KERNELIZED_DENSE_MAX_N = 32768
"""Up to this many keys per row read densely, kernelized RPE attention applies its Toeplitz
weights directly (:func:`kernelized_dense`) rather than by FFT."""


def kernelized_dense(n: int, window: int | None = None) -> bool:
    """Whether kernelized RPE attention of length ``n`` takes its dense (row-blocked) form.

    ``window``: the keys a row must read with their own weight, ``min(N, R_l + R_r + 1)`` for a
    bias that is constant beyond offsets -R_l and R_r (a clipped bias), else N. The FFT form
    transforms m·(Dv + 1) channels of length >= 2N per head (O(m·Dv·N log N), memory-bound); the
    dense form is two matmuls over row blocks of the window plus running sums for the keys
    outside it (O(N·window·(m + Dv))). On a 1-thread CPU with m = 64, Dv = 64 and 8 heads the
    dense form over the whole sequence was 4x faster than the FFT at N = 4096 and 2.5x at
    N = 16384 (46.8 s vs 119 s); the FFT pays only beyond a few ten thousand keys per row.
    """
    return min(n, n if window is None else window) <= KERNELIZED_DENSE_MAX_N


def softmax_rows_explicit(m: int, device: torch.device) -> bool:
    """Whether a row softmax over ``m`` entries is written out as ``exp(x - max) / sum``.

    True on CPU for rows shorter than :data:`SHORT_ROW`, where PyTorch's softmax kernel has a
    per-row overhead that dominates (the rows of a pruned ViT's attention); else ``torch.softmax``.
    """
    return device.type == "cpu" and m < SHORT_ROW


def few_keys_explicit(m: int, device: torch.device) -> bool:
    """Whether exact softmax attention over ``m`` keys takes the explicit path instead of SDPA.

    True on CPU with fewer than :data:`FEW_KEYS` keys, where the fixed per-(batch, head) cost of
    SDPA's flash kernel dominates (e.g. the 9-token blocks of a pruned ViT). Used by the
    ``softmax`` variant's "auto" backend.
    """
    return device.type == "cpu" and m < FEW_KEYS


@functools.lru_cache(maxsize=1)
def cpu_vector_width() -> int:
    """fp32 lanes of the CPU kernels PyTorch dispatches to (16 with AVX-512, 8 with AVX2, else 4)."""
    cap = torch.backends.cpu.get_cpu_capability()
    return 16 if "AVX512" in cap else 8 if "AVX2" in cap else 4


def cpu_key_padding(m: int, device: torch.device, dtype: torch.dtype) -> int:
    """Keys to append (masked out) before PyTorch's CPU SDPA so its key loops have no long scalar tail.

    The CPU flash-attention kernel vectorises its per-row max / exp / sum over the keys in
    chunks of the vector width W (:func:`cpu_vector_width`) and handles the last ``M % W`` keys
    one by one, each several times the cost of a vectorised key. Padding the keys to the next
    multiple of W with an additive -inf mask gives the same softmax (the padded keys weigh
    exactly 0). Returns the padding: 0 unless on CPU, float32, and the tail is more than W / 4
    keys (shorter tails cost no more than the padded keys and the copy;
    ``benchmarks/results/cpu_small_attention.md``).
    """
    if device.type != "cpu" or dtype != torch.float32:
        return 0
    w = cpu_vector_width()
    tail = m % w
    return w - tail if tail > w // 4 else 0


def softmax_backend(
    backend: str, *, return_weights: bool, block_mask: bool, dropout_p: float, score_mod: str | None = None
) -> str:
    """The backend of :func:`attnlib.functional.softmax_attention`: ``backend`` unless it is "auto".

    "auto" is "math" when weights are requested (the only backend that returns them);
    "block_sparse" when the masks include a BlockMask and there is no dropout, so the BlockMask is
    never densified; "chunked" (the query-chunked explicit path) for a ``score_mod`` that is not a
    score-independent additive bias (``score_mod="general"``; an ``"additive"`` one goes to SDPA as a
    float mask); else "sdpa" (PyTorch's fused kernels, on CPU and GPU).
    """
    if backend != "auto":
        return backend
    if return_weights:
        return "math"
    if block_mask and dropout_p == 0:
        return "block_sparse"
    if score_mod == "general":
        return "chunked"
    return "sdpa"


def block_layout_as_dense(block_mask: Any) -> bool:
    """Whether attention under a block-sparse layout runs as dense attention instead of the kernel.

    True when every block is full (e.g. a window wider than the sequence, or a sequence shorter
    than one block): the dense path (SDPA / the short-row CPU softmax) then computes the same
    thing without padding the sequence to the block size.
    """
    return bool(block_mask.all_full())


MASKED_DENSE_MAX_ELEMENTS = 1 << 26
"""Largest (B'·H'·N·M) layout :func:`block_layout_as_masked_dense` turns into a cached float mask (256 MB in fp32)."""


def block_layout_as_masked_dense(block_mask: Any, device: torch.device) -> bool:
    """Whether attention under a block layout runs as one SDPA call with the layout's dense additive mask.

    True on CPU when the layout visits every block (each one full or partial, none skipped - e.g. a
    learned element-wise mask with no empty block) and its dense form has at most
    :data:`MASKED_DENSE_MAX_ELEMENTS` entries: the block-sparse path would then do all the dense
    work and, beyond its bias cache, rebuild the partial blocks' float masks on every call, while
    PyTorch's fused CPU kernel with a cached float mask costs about as much as unmasked attention.
    The caller caches the mask with the layout. Not on CUDA, where the Triton kernel masks
    partial blocks from the layout's tiles.
    """
    if device.type != "cpu":
        return False
    bp, hp = block_mask.kv_num_blocks.shape[:2]
    n, m = block_mask.seq_lengths
    if bp * hp * n * m > MASKED_DENSE_MAX_ELEMENTS:
        return False
    cache = getattr(block_mask, "_cache", {})
    if "all_active" not in cache:
        nk = block_mask.kv_indices.shape[-1]
        visited = block_mask.kv_num_blocks + block_mask.full_kv_num_blocks
        cache["all_active"] = bool((visited == nk).all()) and not bool((block_mask.kv_num_blocks == 0).all())
    return bool(cache["all_active"])


SERIAL_LOOP_ELEMENTS = 1 << 20
"""Largest operand (elements) of a long sequential loop that :func:`serial_cpu_loop` runs on one thread."""


@contextlib.contextmanager
def serial_cpu_loop(elements: int, device: torch.device) -> Iterator[None]:
    """Run the enclosed loop of many small tensor ops on one intra-op thread (CPU, operands up to
    :data:`SERIAL_LOOP_ELEMENTS` elements); the thread count is restored afterwards.

    Each op of a long chain of dependent small ops (e.g. thousands of optimisation steps on a few
    thousand numbers) pays the thread pool's fork/join; on a busy machine a worker that is not
    scheduled stalls every op. Measured on a 2-core machine under load: EcoFormer's hash learning on
    a (64, 17, 64) batch took 23 s on 2 threads and 3 s on one. ``torch.set_num_threads`` is
    process-wide, so other threads running torch meanwhile also run single-threaded.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or elements > SERIAL_LOOP_ELEMENTS or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def triton_preferred(device: torch.device) -> bool:
    """Whether :func:`attnlib.kernels.block_sparse_attention`'s "auto" backend tries Triton first.

    True on CUDA (it still falls back to the PyTorch path when the Triton kernel cannot run the
    call); elsewhere the PyTorch path runs.
    """
    return device.type == "cuda"


def fused_cpu_block_parts(device: torch.device, head_dim: int, value_dim: int) -> bool:
    """Whether the PyTorch block-sparse path runs each part through PyTorch's fused CPU flash kernel.

    That kernel (forward and backward, with the log-sum-exp the parts are merged by) exists on CPU
    only and needs D == Dv; elsewhere each part is computed explicitly.
    """
    return device.type == "cpu" and head_dim == value_dim
