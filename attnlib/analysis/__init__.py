"""Seeing inside attention: capture, rollout and flow, entropy, distances, head importance,
agreement between variants, attention distillation, attention sorting and probes.

>>> import attnlib, torch
>>> attn = attnlib.Attention(dim=32, num_heads=4)
>>> with attnlib.analysis.capture(attn) as rec:
...     _ = attn(torch.randn(2, 10, 32))
>>> attnlib.analysis.entropy(rec.weights()[0]).shape
torch.Size([2, 4, 10])

Plots and the ``attnlib-analyze <run dir>`` report live in :mod:`attnlib.analysis.report` and
:mod:`attnlib.analysis.plots` (matplotlib, imported when used). See docs/analysis.md.
"""

from attnlib.analysis.agreement import Agreement, variant_agreement
from attnlib.analysis.capture import (
    CaptureSink,
    Record,
    Recorder,
    SupportsCapture,
    attention_sites,
    capture,
    head_mask,
    prune_heads,
)
from attnlib.analysis.distill import AttentionDistiller, attention_distillation
from attnlib.analysis.importance import ablation_head_importance, gradient_head_importance
from attnlib.analysis.measures import (
    attention_distance,
    attention_flow,
    entropy,
    js_divergence,
    kl_divergence,
    l1_distance,
    rollout,
    segment_mass,
)
from attnlib.analysis.probes import InductionReport, RandomFeatureAttention, freeze_qk, induction_probe
from attnlib.analysis.sorting import SortResult, attention_sort, document_attention
from attnlib.analysis.summary import entropy_metrics, head_entropy

__all__ = [
    "Agreement",
    "AttentionDistiller",
    "CaptureSink",
    "InductionReport",
    "RandomFeatureAttention",
    "Record",
    "Recorder",
    "SortResult",
    "SupportsCapture",
    "ablation_head_importance",
    "attention_distance",
    "attention_distillation",
    "attention_flow",
    "attention_sites",
    "attention_sort",
    "capture",
    "document_attention",
    "entropy",
    "entropy_metrics",
    "freeze_qk",
    "gradient_head_importance",
    "head_entropy",
    "head_mask",
    "induction_probe",
    "js_divergence",
    "kl_divergence",
    "l1_distance",
    "prune_heads",
    "rollout",
    "segment_mass",
    "variant_agreement",
]
