"""Backbones whose attention is any registered variant, chosen by an attention *config*.

* :class:`ViT` - image classification.
* :class:`DecoderLM` - causal language model with KV-cache / recurrent decoding and ``generate``.
* :class:`EncoderClassifier` - bidirectional encoder for padded token sequences (ListOps).
* :class:`ConformerCTC`, :class:`BranchformerCTC` - speech recognition with a CTC head.
* :class:`TabularICL` - tabular in-context learning with bi-axial (Orion-BiX) row attention.
* :class:`ConformerAED` - speech recognition with an attention decoder (joint CTC/attention).

:func:`build_model` builds one from a model config (``name`` + keyword arguments, the
contents of ``configs/model/<name>.yaml``) and an attention config. A variant that lacks a
capability the model needs raises :class:`attnlib.UnsupportedError` at build time, naming the
variant and the capability.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from attnlib._config import split_named_config
from attnlib.errors import UnsupportedError
from attnlib.models.asr import BranchformerCTC, ConformerCTC, CTCEncoder, LogMelFrontend, ctc_greedy_decode
from attnlib.models.asr_attention import ConformerAED
from attnlib.models.blocks import (
    DropPath,
    FeedForward,
    TransformerBlock,
    attention_dict,
    check_attention,
    make_attention,
    make_pruning,
    variants_serving,
)
from attnlib.models.encoder import EncoderClassifier
from attnlib.models.lm import DecoderCache, DecoderLM
from attnlib.models.tabular import BiAxialRowBlock, TabularICL
from attnlib.models.vit import ViT

__all__ = [
    "MODELS",
    "MODEL_NEEDS",
    "PRUNABLE",
    "BiAxialRowBlock",
    "BranchformerCTC",
    "CTCEncoder",
    "ConformerAED",
    "ConformerCTC",
    "DecoderCache",
    "DecoderLM",
    "DropPath",
    "EncoderClassifier",
    "FeedForward",
    "LogMelFrontend",
    "TabularICL",
    "TransformerBlock",
    "ViT",
    "attention_dict",
    "build_model",
    "check_attention",
    "ctc_greedy_decode",
    "make_attention",
    "make_pruning",
    "variants_serving",
]

#: Model config name -> class.
MODELS: dict[str, type[nn.Module]] = {
    "vit": ViT,
    "lm": DecoderLM,
    "encoder": EncoderClassifier,
    "conformer": ConformerCTC,
    "branchformer": BranchformerCTC,
    "tabular": TabularICL,
    "asr_attention": ConformerAED,
}

#: Model config name -> capabilities its attention needs (field -> reason).
MODEL_NEEDS: dict[str, dict[str, str]] = {
    "vit": {},
    "lm": {"causal": "next-token prediction must not see later tokens"},
    "encoder": {"key_padding": "batches of different-length sequences are padded"},
    "conformer": {"key_padding": "utterances of different lengths are padded in a batch"},
    "branchformer": {"key_padding": "utterances of different lengths are padded in a batch"},
    "tabular": {
        "key_padding": "in-context learning: rows read only the labelled rows (a key-padding mask)",
        "cross": "bi-axial rows: the hierarchical pattern and the CLS tokens attend through context=",
    },
    "asr_attention": {"key_padding": "utterances of different lengths are padded in a batch"},
}


#: Models that accept a ``pruning:`` config (:mod:`attnlib.pruning`).
PRUNABLE = ("lm", "vit")

_NO_PRUNING = {
    "conformer": ConformerCTC.PRUNING_NOTE,
    "branchformer": ConformerCTC.PRUNING_NOTE,
    "asr_attention": ConformerCTC.PRUNING_NOTE,
    "encoder": "Its padded sequence classification could use it, but it is not wired in yet.",
    "tabular": "Its rows are table rows read in context, not tokens to drop.",
}


def build_model(cfg: Mapping[str, Any] | Any, attention: Mapping[str, Any] | Any, **overrides: Any) -> nn.Module:
    """Build a backbone from a model config and an attention config.

    Args:
        cfg: dict / DictConfig with ``name`` (one of :data:`MODELS`) and the model's keyword arguments.
        attention: attention config, e.g. ``{"variant": "flow"}``.
        **overrides: keyword arguments that win over ``cfg`` (the data module's sizes, e.g.
            ``num_classes``, ``vocab_size``, ``sample_rate``).
    """
    name, kwargs = split_named_config(cfg, MODELS, what="model")
    kwargs.update(overrides)
    check_attention(attention, MODEL_NEEDS[name], model=MODELS[name].__name__)
    if "pruning" in kwargs and name not in PRUNABLE:
        if kwargs.pop("pruning") is not None:
            raise UnsupportedError(
                f"model {name!r} ({MODELS[name].__name__}) takes no token pruning; models with a "
                f"pruning config: {', '.join(sorted(PRUNABLE))}. {_NO_PRUNING.get(name, '')}".strip()
            )
    return MODELS[name](attention=attention_dict(attention), **kwargs)
