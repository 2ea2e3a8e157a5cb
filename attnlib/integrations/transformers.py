"""A Hugging Face ``transformers`` attention backend: any attnlib variant inside a model you did not write.

.. code-block:: python

    import attnlib.integrations.transformers as hf_attnlib
    hf_attnlib.register()                                     # once per process
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="attnlib")   # softmax
    hf_attnlib.set_variant(model, "linear")                   # every attention layer, or layers=[...]

:func:`register` adds ``"attnlib"`` to transformers' attention-function *and* attention-mask
interfaces (the mask one builds the same boolean (B, 1, N, M) masks as ``"sdpa"``; without it the
model would pass no mask at all). Per call, :func:`attention_forward`:

* splits transformers' combined 4-D mask back into ``causal`` + a (B, M) key-padding mask and
  checks that the split rebuilds it exactly; a mask that does not split (packed sequences, sliding
  windows, ...) goes whole to variants with ``full_mask`` support and raises
  :class:`attnlib.UnsupportedError` for the others;
* takes grouped-query k/v (repeated for variants without ``gqa``), the model's ``scaling``
  (q is rescaled when it differs from head_dim**-0.5), attention dropout in training, and q / k / v
  of mixed dtype under autocast (cast to the autocast dtype, as SDPA does);
* decodes with transformers' key/value cache: where :func:`attnlib.decoding.kv_decode_exact` holds
  (variants with ``causal_cross``) the new queries attend to the cached keys; a recurrent variant
  keeps its own state on the layer beside the framework's cache and steps each new token in O(1)
  (the state is used only while the cache continues it: same length, same first and last keys; a
  reset or crop drops it); ``local`` attends over the last ``window`` keys; the other causal
  variants (and the recurrent ones under key padding) keep the queries of the sequence so far on
  the layer and recompute over the prefix (:func:`attnlib.decoding.attend_new_queries`), so
  ``generate()`` with the cache equals recomputing the prefix. Beam search and the other batch
  edits of a cache (``reorder_cache``, ``batch_select_indices``, ``batch_repeat_interleave``) are
  followed: :func:`set_variant` installs a forward pre-hook on the model that wraps those methods of
  the cache it is given, so the layers' states and kept queries are re-indexed with the cache. A
  cache edited behind the model's back (cropped, or reordered by code that bypasses those methods)
  fails the state's check and recomputes, or raises UnsupportedError when the prefix queries are
  gone, instead of giving a wrong answer;
* keeps the variant's auxiliary loss on the layer (``pending_aux_loss``), so
  :func:`attnlib.aux_loss` ``(model)`` collects it in the training loop.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlib.decoding import attend_new_queries, kv_decode_exact, select_state_rows, step_tokens
from attnlib.errors import UnsupportedError
from attnlib.masks import normalize_mask
from attnlib.masks.predicates import causal_mod, evaluate_rows
from attnlib.variants import AttentionCore, CoreOutput, build_core

__all__ = ["attention_forward", "attention_layers", "register", "set_variant", "split_mask"]

NAME = "attnlib"
_DEFAULT_CORES: dict[tuple[int, int], AttentionCore] = {}
_QUERIES = "_attnlib_queries"  # (queries so far (B, H, M, D), last key (B, H_kv, D)) on a layer
_STATE = "_attnlib_state"  # a recurrent variant's decoding state on a layer (see _State)
_HOOK = "_attnlib_cache_hook"  # the forward pre-hook on a model that follows its cache's batch edits
_CACHE_KWARGS = ("cache", "past_key_values")  # the cache's keyword in a model call (newer, older transformers)
_BATCH_EDITS = ("reorder_cache", "batch_select_indices", "batch_repeat_interleave")


class _State:
    """A recurrent core's state after the first ``length`` positions of the sequence a framework's
    key/value cache holds, with that cache's first and last keys (B, H_kv, D) to prove it is current."""

    def __init__(self, state: dict[str, Tensor], length: int, first: Tensor, last: Tensor) -> None:
        self.state, self.length, self.first, self.last = state, length, first, last

    def current(self, key: Tensor, n: int) -> bool:
        """Whether the cache ``key`` (B, H_kv, M, D), whose last ``n`` entries are new, continues
        exactly the sequence this state has consumed (same batch, length M - n, same first and
        last keys: a reset, crop, reorder or another sequence fails)."""
        m = key.shape[2]
        return (
            self.length == m - n
            and self.first.shape == key[:, :, 0].shape
            and torch.equal(self.first, key[:, :, 0])
            and torch.equal(self.last, key[:, :, m - n - 1])
        )

    def select(self, index: Tensor) -> None:
        """Keep the sequences ``index`` (B',) long of the batch, in that order (a beam-search reorder)."""
        self.state = select_state_rows(self.state, index, self.first.shape[0])
        self.first, self.last = self.first.index_select(0, index), self.last.index_select(0, index)


def _select_rows(model: nn.Module, method: str, arg: Any) -> None:
    """Apply a cache's batch edit ``method`` (one of ``_BATCH_EDITS``, with its argument) to the decoding
    state and kept queries of every attention layer of ``model``."""
    for module in attention_layers(model):
        held, kept = module.__dict__.get(_STATE), module.__dict__.get(_QUERIES)
        batch = held.first.shape[0] if held is not None else kept[0].shape[0] if kept is not None else None
        if batch is None:
            continue
        if method == "batch_repeat_interleave":
            index = torch.arange(batch).repeat_interleave(int(arg))
        else:  # integer indices, or a bool (B,) selection as the cache's own indexing accepts
            chosen = torch.as_tensor(arg)
            index = chosen.nonzero().flatten() if chosen.dtype == torch.bool else chosen.long().flatten()
        device = held.first.device if held is not None else kept[0].device
        index = index.to(device)
        if held is not None:
            held.select(index)
        if kept is not None:
            module.__dict__[_QUERIES] = (kept[0].index_select(0, index), kept[1].index_select(0, index))


def _follow_cache(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
    """Forward pre-hook: wrap the batch edits of the model's key/value cache (once per cache
    object) so that they also re-index the layers' decoding state (see the module docstring)."""
    cache = next((kwargs[k] for k in _CACHE_KWARGS if kwargs.get(k) is not None), None)
    if cache is None or getattr(cache, "_attnlib_follows", False):
        return
    for method in _BATCH_EDITS:
        original = getattr(cache, method, None)
        if original is None:
            continue

        def edit(arg: Any, _original: Any = original, _method: str = method) -> Any:
            result = _original(arg)
            _select_rows(model, _method, arg)
            return result

        setattr(cache, method, edit)
    try:
        cache._attnlib_follows = True
    except AttributeError:  # a cache type with __slots__: it is wrapped again next call, harmlessly
        pass


def _steps(core: AttentionCore, module: nn.Module, kp: Tensor | None, want_weights: bool, p: float) -> bool:
    """Whether decoding steps of this layer may use the core's recurrent state (an O(1) step per token):
    a recurrent variant whose options decode, no key padding (the step takes no mask), no weights,
    no dropout, no gradient, and the layer's ``attnlib_fast_decode`` switch on (the default)."""
    return (
        core.capabilities.recurrent
        and getattr(module, "attnlib_fast_decode", True)
        and kp is None
        and not want_weights
        and p == 0
        and not torch.is_grad_enabled()
        and core.decoding_error() is None
    )


def _recurrent_decode(
    module: nn.Module, core: AttentionCore, query: Tensor, key: Tensor, value: Tensor
) -> Tensor | None:
    """The new rows (B, H, N, Dv) from the layer's recurrent state, stepping the N new tokens; the
    state comes from the last step when it is current, else from the kept queries of the prefix
    (stepped once), else None (the caller raises). The state replaces the kept queries."""
    n, m = query.shape[2], key.shape[2]
    held = module.__dict__.get(_STATE)
    if held is not None and held.current(key, n):
        state = held.state
    else:
        prefix = _kept_queries(module, query, key)
        if prefix is None:
            return None
        state = core.initial_state(query.shape[0], dtype=query.dtype, device=query.device)
        _, state = step_tokens(core, prefix, key[:, :, : m - n], value[:, :, : m - n], state)
    out, state = step_tokens(core, query, key[:, :, m - n :], value[:, :, m - n :], state)
    module.__dict__[_STATE] = _State(state, m, key[:, :, 0].detach(), key[:, :, -1].detach())
    module.__dict__.pop(_QUERIES, None)
    return out


def _kept_queries(module: nn.Module, query: Tensor, key: Tensor) -> Tensor | None:
    """The queries of the M - N earlier positions kept on the layer, if they belong to this cache."""
    n, m = query.shape[2], key.shape[2]
    kept = module.__dict__.get(_QUERIES)
    if kept is not None and kept[0].shape[2] == m - n and kept[0].shape[0] == query.shape[0]:
        if torch.equal(kept[1], key[:, :, m - n - 1]):
            return kept[0]
    return None


def register(name: str = NAME) -> None:
    """Register ``name`` (default ``"attnlib"``) with transformers' attention-function and attention-mask
    interfaces; build models with ``attn_implementation=name``. Idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)


def _heads(module: nn.Module) -> tuple[int, int]:
    """(query heads, head size) of a transformers attention layer."""
    head_dim = getattr(module, "head_dim", None) or getattr(module, "attention_head_size", None)
    heads = getattr(module, "num_heads", None) or getattr(module, "num_attention_heads", None)
    cfg = getattr(module, "config", None)
    if heads is None and cfg is not None:
        heads = getattr(cfg, "num_attention_heads", None)
    if head_dim is None and cfg is not None and heads:
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    if not heads or not head_dim:
        raise ValueError(f"cannot read the heads / head size of {type(module).__name__}")
    return int(heads), int(head_dim)


def attention_layers(model: nn.Module) -> list[nn.Module]:
    """The attention layers of a transformers model that call the attention interface, in module order
    (modules with ``config``, ``is_causal`` and ``scaling`` attributes, e.g. LlamaAttention, GPT2Attention,
    BertSelfAttention, ViTSelfAttention)."""
    return [
        m
        for m in model.modules()
        if hasattr(m, "config") and hasattr(m, "is_causal") and hasattr(m, "scaling") and not hasattr(m, "layers")
    ]


def set_variant(
    model: nn.Module, variant: str, *, layers: list[int] | None = None, fast_decode: bool = True, **kwargs: Any
) -> nn.Module:
    """Use ``variant`` (with its options ``kwargs``) in the attention layers of ``model``.

    ``layers``: indices into :func:`attention_layers` (default all). ``fast_decode`` (default True):
    on the framework's key/value cache a recurrent variant decodes from its own state and ``local``
    from the last ``window`` keys, O(1) per token; False recomputes over the prefix, O(prefix) per
    token, with the same outputs (the layer attribute ``attnlib_fast_decode``). Each chosen layer gets its own
    core as the submodule ``attnlib_core`` (so the variant's parameters train with the model and
    appear in its ``state_dict``), on the layer's device and dtype. The model must use
    ``attn_implementation="attnlib"`` (:func:`register` first); ``set_variant(model, "softmax")``
    goes back to exact attention. Returns the model.
    """
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if impl != NAME:
        raise ValueError(
            f"the model uses attn_implementation={impl!r}; call attnlib.integrations.transformers.register() "
            f"and build it with attn_implementation={NAME!r}"
        )
    found = attention_layers(model)
    if not found:
        raise ValueError(f"no transformers attention layers found in {type(model).__name__}")
    chosen = range(len(found)) if layers is None else layers
    for i in chosen:
        if not 0 <= i < len(found):
            raise ValueError(f"layers holds {i}, but the model has {len(found)} attention layers")
        mod = found[i]
        heads, head_dim = _heads(mod)
        core = build_core(variant, heads, head_dim, **kwargs).train(mod.training)
        p = next(mod.parameters(), None)
        if p is not None:
            core = core.to(device=p.device, dtype=p.dtype)
        mod.attnlib_core = core
        mod.attnlib_fast_decode = bool(fast_decode)
        mod.__dict__.pop(_QUERIES, None)
        mod.__dict__.pop(_STATE, None)
    if _HOOK not in model.__dict__:
        model.__dict__[_HOOK] = model.register_forward_pre_hook(_follow_cache, with_kwargs=True)
    return model


def _core_of(module: nn.Module, heads: int, head_dim: int) -> AttentionCore:
    core = getattr(module, "attnlib_core", None)
    if core is not None:
        return core
    key = (heads, head_dim)
    if key not in _DEFAULT_CORES:
        _DEFAULT_CORES[key] = build_core("softmax", heads, head_dim)
    return _DEFAULT_CORES[key]


def split_mask(mask: Tensor, causal: bool) -> tuple[bool, Tensor | None] | None:
    """transformers' combined mask (B|1, 1, N, M) -> (causal, key padding (B, M) True = real key | None).

    ``mask`` is bool (True = may attend) or additive float (0 / -inf). The key padding is the keys
    any query may see; the split is returned only when ``causal`` (bottom-right aligned, as is the
    transformers layout of a cache that grows by appending) AND that padding rebuilds ``mask``
    exactly, else None.
    """
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    if mask.dtype != torch.bool and bool((mask.masked_fill(~allowed, 0) != 0).any()):
        return None  # a real additive bias, not a mask
    if allowed.dim() != 4 or allowed.shape[1] != 1:
        return None
    n, m = allowed.shape[-2:]
    kp = allowed[:, 0].any(-2)  # (B, M)
    rebuilt = kp[:, None, None, :]
    if causal:
        rebuilt = rebuilt & evaluate_rows(causal_mod(n, m), 0, n, m, batch=1, heads=1, device=mask.device)
    if not torch.equal(rebuilt.expand_as(allowed), allowed):
        return None
    return causal, None if bool(kp.all()) else kp


def attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """transformers' attention-function interface: q (B, H, N, D), k, v (B, H_kv, M, D) ->
    (out (B, N, H, Dv), weights (B, H, N, M) | None). See the module docstring."""
    for opt in ("softcap", "position_bias", "sliding_window", "s_aux"):
        if kwargs.get(opt) is not None:
            raise UnsupportedError(f"the attnlib attention backend does not support {opt}=")
    b, h, n, d = query.shape
    m = key.shape[2]
    core = _core_of(module, h, d)
    caps = core.capabilities
    dev = query.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        query, key, value = query.to(dt), key.to(dt), value.to(dt)
    if scaling is not None and abs(scaling - d**-0.5) > 1e-12 * d**-0.5:
        query = query * (scaling * d**0.5)
    last_key = key[:, :, -1]
    causal_flag = bool(getattr(module, "is_causal", False) if is_causal is None else is_causal)
    cross = bool(getattr(module, "is_cross_attention", False))
    full: Tensor | None = None
    kp: Tensor | None = None
    causal = causal_flag and not cross
    if attention_mask is not None:
        split = split_mask(attention_mask, causal)
        if split is None:
            if not caps.full_mask:
                raise UnsupportedError(
                    f"variant {core.name!r} takes causal + key-padding masks only (no full (B, H, N, M) mask), "
                    "and this attention mask is not causal + key padding"
                )
            full = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
            causal = False
        else:
            causal, kp = split
    want_weights = bool(kwargs.get("output_attentions", False)) and caps.has_weights
    p = dropout if module.training else 0.0
    exact_kv = kv_decode_exact(core)
    decoding = causal and full is None and n != m and not exact_kv
    fast = getattr(module, "attnlib_fast_decode", True)
    windowed = fast and core.causal_reach() is not None and not want_weights  # reads the last keys only
    keep = causal and not exact_kv and not windowed and not torch.is_grad_enabled()
    stepped = _steps(core, module, kp, want_weights, p)
    if not decoding:
        module.__dict__.pop(_STATE, None)  # a new sequence (prefill) or a call without the cache
    out = _recurrent_decode(module, core, query, key, value) if decoding and stepped else None
    if out is not None:
        res = CoreOutput(out)
        query_all = None
    elif decoding:
        prefix = None if windowed else _kept_queries(module, query, key)
        if prefix is None and not windowed:
            raise UnsupportedError(
                f"variant {core.name!r} decodes with a key/value cache by recomputing over the prefix, which "
                "needs the queries of every earlier position; they are kept when the cache grows by appending "
                "from the first token (DynamicCache; greedy, sampled or beam-search generate on a model passed "
                "to set_variant), not after a crop, a static cache or a reorder that bypassed the cache's methods"
            )
        res = attend_new_queries(
            core,
            query,
            key,
            value,
            key_padding_mask=kp,
            prefix_queries=prefix,
            need_weights=want_weights,
            dropout_p=p if caps.attn_dropout else 0.0,
        )
        query_all = None if prefix is None else torch.cat([prefix, query], 2)
    else:
        if not caps.gqa and key.shape[1] != h:
            g = h // key.shape[1]
            key, value = key.repeat_interleave(g, 1), value.repeat_interleave(g, 1)
        am = normalize_mask(full, causal=causal, batch=b, heads=h, n=n, m=m, device=query.device, key_padding_mask=kp)
        res = core(
            query, key, value, am, cross=cross, need_weights=want_weights, dropout_p=p if caps.attn_dropout else 0.0
        )
        query_all = query
    if keep and query_all is not None and query_all.shape[2] == m:
        module.__dict__[_QUERIES] = (query_all.detach(), last_key.detach())
    out = res.out
    if p > 0 and not caps.attn_dropout:
        out = F.dropout(out, p)
    module.pending_aux_loss = res.aux_loss
    return out.transpose(1, 2).contiguous(), res.weights
