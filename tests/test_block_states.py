"""BlockMask block classification (full / partial / empty) against the dense truth, ragged edges included.

Round trips (dense -> BlockMask -> dense) cannot see a full block filed as partial (its tile
then holds all ones); the kernels can (a partial block pays for its element mask), so the
classification is checked directly here.
"""

from __future__ import annotations

import math

import pytest
import torch

from attnlib.masks import BlockMask


def dense_states(mask: torch.Tensor, bq: int, bk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial, full) per block (B, H, n_q, n_k) of a (B, H, N, M) mask, block by block."""
    b, h, n, m = mask.shape
    nq, nk = math.ceil(n / bq), math.ceil(m / bk)
    partial = torch.zeros(b, h, nq, nk, dtype=torch.bool)
    full = torch.zeros_like(partial)
    for i in range(nq):
        for j in range(nk):
            tile = mask[:, :, i * bq : (i + 1) * bq, j * bk : (j + 1) * bk]
            full[:, :, i, j] = tile.flatten(2).all(-1)
            partial[:, :, i, j] = tile.flatten(2).any(-1) & ~full[:, :, i, j]
    return partial, full


@pytest.mark.parametrize(
    ("n", "m", "bq", "bk"), [(10, 10, 4, 4), (9, 13, 4, 3), (8, 8, 4, 4), (5, 11, 2, 4), (7, 3, 8, 8)]
)
def test_from_dense_classifies_every_block_as_the_dense_mask_says(n: int, m: int, bq: int, bk: int) -> None:
    g = torch.Generator().manual_seed(n * 100 + m)
    keep = torch.ones(2, 3, n, m, dtype=torch.bool)
    # random tiles: all allowed, all forbidden, or a random pattern (ragged tiles at the edges)
    for i in range(0, n, bq):
        for j in range(0, m, bk):
            kind = int(torch.randint(3, (1,), generator=g))
            tile = keep[:, :, i : i + bq, j : j + bk]
            if kind == 1:
                tile.zero_()
            elif kind == 2:
                tile.copy_(torch.rand(tile.shape, generator=g) > 0.5)
    for mask in (keep, torch.ones(1, 1, n, m, dtype=torch.bool)):
        bm = BlockMask.from_dense(mask, (bq, bk))
        partial, full = bm.block_states()
        want_partial, want_full = dense_states(mask, bq, bk)
        assert torch.equal(full, want_full), "full blocks"
        assert torch.equal(partial, want_partial), "partial blocks"
        assert torch.equal(bm.to_dense().expand_as(mask), mask)
