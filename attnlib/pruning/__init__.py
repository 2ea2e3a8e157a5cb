"""Token pruning / token reduction and KV-cache eviction, for every attention variant.

One interface (:class:`TokenPruner`): after a transformer block, a pruner takes the hidden
states (B, N, C), the block attention's ``importance`` (B, N) and the key-padding mask, and
returns the kept hidden states, their indices and the new mask (:class:`PruneOutput`).
Registered pruners (``configs/pruning/<name>.yaml``):

* ``ltp`` - Learned Token Pruning (learned per-layer thresholds, soft -> hard).
* ``topk`` - keep a fixed ratio by importance; optional EViT fusion of the dropped tokens.
* ``tokenlearner`` - TokenLearner: S learned spatial-attention poolings (+ :class:`TokenFuser`).
* ``dtm`` - LIT's deformable token merging: the patch grid merged 2x2 by a deformable convolution.
* ``iared2`` - IA-RED2: multi-head interpreter policy trained with REINFORCE.
* ``namm`` - NAMM-style KV-cache eviction for :class:`attnlib.models.DecoderLM` decoding,
  scorer trained with :func:`evolve`.

Models take a ``pruning=`` config: ``ViT(attention=..., pruning={"name": "topk", "keep_ratio": 0.5})``
or ``attnlib-train experiment=vit_digits pruning=topk``.
"""

from attnlib.pruning.base import (
    PruneOutput,
    PruningPlan,
    TokenPruner,
    available,
    build_pruning,
    get_pruner,
    pruning_dict,
    register_pruner,
    select_tokens,
)
from attnlib.pruning.dtm import DeformableTokenMerging
from attnlib.pruning.evolve import EvolveResult, evolve
from attnlib.pruning.iared2 import IARed2Pruner, iared2_reward, reinforce_loss
from attnlib.pruning.ltp import LTPPruner, ltp_hard_stage
from attnlib.pruning.namm import NAMMEviction, NAMMScorer, NAMMState, stft_magnitudes
from attnlib.pruning.tokenlearner import TokenFuser, TokenLearnerPruner
from attnlib.pruning.topk import TopKPruner

__all__ = [
    "DeformableTokenMerging",
    "EvolveResult",
    "IARed2Pruner",
    "LTPPruner",
    "NAMMEviction",
    "NAMMScorer",
    "NAMMState",
    "PruneOutput",
    "PruningPlan",
    "TokenFuser",
    "TokenLearnerPruner",
    "TokenPruner",
    "TopKPruner",
    "available",
    "build_pruning",
    "evolve",
    "get_pruner",
    "iared2_reward",
    "ltp_hard_stage",
    "pruning_dict",
    "register_pruner",
    "reinforce_loss",
    "select_tokens",
    "stft_magnitudes",
]
