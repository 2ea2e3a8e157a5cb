"""Record what every attention of a model computes: :func:`capture`, and head masks / pruning.

``with capture(model) as rec: model(x)`` records, for every attention call inside the block,
the per-head weights (B, H, N, M) (or sampled query rows of them), the per-head importance
(B, H, M) - the attention mass each key receives, which every variant with ``importance``
reports even when it has no weights - the call's mask, and optionally the pre-rotary q, k, v.
Hooks exist only inside the ``with`` block: outside it the model runs its ordinary code path.

**Capture sites.** A *site* is one attention layer. :func:`attention_sites` finds them, in
module order:

* every :class:`attnlib.Attention` (its variant core is hooked; q, k, v come from
  :meth:`attnlib.Attention.project`, i.e. before rotary positions);
* every :class:`attnlib.variants.base.AttentionCore` not held by such a module (any wrapper built
  on the registry - e.g. a ``MultiheadAttention`` holding a core - is covered without code);
* every module implementing :class:`SupportsCapture`: ``attnlib_capture(sink) -> handles``. Such
  a module (e.g. an adapter into a framework that computes attention in a function) reports
  each call with :meth:`CaptureSink.record` and returns the hook handles to remove at exit; its
  submodules are not searched further.

Head masks (:func:`head_mask`) multiply each head's output by a factor - differentiable, so
the gradient with respect to the mask is the head importance of Michel et al. (2019);
:func:`prune_heads` zeroes heads permanently through :mod:`torch.nn.utils.prune`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from attnlib._validation import describe
from attnlib.attention import Attention
from attnlib.errors import UnsupportedError
from attnlib.masks import AttentionMask
from attnlib.variants.base import AttentionCore, CoreOutput

__all__ = [
    "CaptureSink",
    "Record",
    "Recorder",
    "Removable",
    "SupportsCapture",
    "attention_sites",
    "capture",
    "core_call_hooks",
    "head_mask",
    "prune_heads",
    "sample_rows",
    "site_core",
]


@dataclass
class Record:
    """One attention call seen by :func:`capture`.

    Attributes:
        name: qualified module name of the site (e.g. ``"blocks.0.attn"``).
        layer: index of the site in :func:`attention_sites` order.
        call: how many calls of this site came before this one inside the capture.
        n, m: queries and keys of the call.
        weights: (B, H, R, M) attention weights of the recorded query rows, or None (not asked
            for, or the variant has none).
        rows: (R,) long indices of the recorded query rows, or None when all N rows are kept.
        importance: (B, H, M) attention mass each key receives, averaged over the queries, or None.
        mask: the call's :class:`attnlib.masks.AttentionMask` (causal, padding, ...), or None.
        q, k, v: (B, H, N, D), (B, H_kv, M, D), (B, H_kv, M, Dv) projections before rotary
            positions, with ``qkv=True`` (None otherwise, or when the site cannot give them).
    """

    name: str
    layer: int
    call: int
    n: int
    m: int
    weights: Tensor | None = None
    rows: Tensor | None = None
    importance: Tensor | None = None
    mask: AttentionMask | None = None
    q: Tensor | None = None
    k: Tensor | None = None
    v: Tensor | None = None

    def allowed(self) -> Tensor | None:
        """Which keys each recorded query row may attend: bool (B|1, H|1, R, M), or None (all)."""
        if self.mask is None or self.mask.is_empty:
            return None
        dense = self.mask.dense()
        assert dense is not None
        dense = dense.expand(dense.shape[0], dense.shape[1], self.n, self.m)
        return dense if self.rows is None else dense[:, :, self.rows.to(dense.device)]


@dataclass
class CaptureSink:
    """Where one capture site reports its calls (what :class:`SupportsCapture` modules receive).

    Attributes:
        name, layer: the site's qualified name and index.
        weights, importance, qkv: what the capture asks for; a site computes weights and
            importance only when asked (they may cost O(N·M)).
    """

    recorder: Recorder
    name: str
    layer: int
    weights: bool
    importance: bool
    qkv: bool
    pending_qkv: list[tuple[Tensor, Tensor, Tensor] | None] = field(default_factory=lambda: [None])

    def record(
        self,
        *,
        n: int,
        m: int,
        weights: Tensor | None = None,
        importance: Tensor | None = None,
        mask: AttentionMask | None = None,
        q: Tensor | None = None,
        k: Tensor | None = None,
        v: Tensor | None = None,
    ) -> None:
        """Report one call: N queries, M keys, weights (B, H, N, M), importance (B, H, M), q/k/v."""
        self.recorder._add(self, n=n, m=m, weights=weights, importance=importance, mask=mask, q=q, k=k, v=v)


class Removable(Protocol):
    """Anything with ``remove()`` (a :class:`torch.utils.hooks.RemovableHandle`, or one's own)."""

    def remove(self) -> None: ...


@runtime_checkable
class SupportsCapture(Protocol):
    """A module that computes attention without an :class:`AttentionCore` and supports capture.

    ``attnlib_capture(sink)`` installs whatever it needs (hooks, a flag) so that each of its
    attention calls reports to ``sink.record(n=, m=, weights=, importance=, mask=, q=, k=, v=)``
    - weights only when ``sink.weights``, and so on - and returns handles whose ``remove()``
    undoes that at the end of the capture (e.g. the :class:`torch.utils.hooks.RemovableHandle` of
    its hooks).
    """

    def attnlib_capture(self, sink: CaptureSink) -> Iterable[Removable]: ...


def attention_sites(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The capture sites of ``model`` in module order: ``[(qualified name, module), ...]``.

    An :class:`attnlib.Attention`, a :class:`SupportsCapture` module, or a bare
    :class:`AttentionCore` not inside either. ``model`` itself may be a site.
    """
    sites: list[tuple[str, nn.Module]] = []
    for name, mod in model.named_modules():
        if sites and (sites[-1][0] == "" or name.startswith(sites[-1][0] + ".")):
            continue  # inside the previous site (named_modules is depth first)
        if isinstance(mod, (Attention, AttentionCore, SupportsCapture)):
            sites.append((name, mod))
    return sites


def sample_rows(n: int, rows: int | Sequence[int] | Tensor | None) -> Tensor | None:
    """Query rows to keep out of ``n``: None (all), at most ``rows`` evenly spaced ones (always the
    first and the last), or the given indices (validated). Returns (R,) long or None."""
    if rows is None:
        return None
    if isinstance(rows, bool):
        raise ValueError(f"rows must be None, a positive int or a list of row indices, got {rows!r}")
    if isinstance(rows, int):
        if rows <= 0:
            raise ValueError(f"rows must be a positive int (how many query rows to keep), got {rows}")
        if rows >= n:
            return None
        return torch.linspace(0, n - 1, rows).round().long().unique()
    idx = torch.as_tensor(rows, dtype=torch.long).flatten()
    if idx.numel() == 0:
        raise ValueError("rows must name at least one query row, got an empty list")
    if int(idx.min()) < -n or int(idx.max()) >= n:
        raise ValueError(f"rows must be query indices in [-{n}, {n}), got {idx.tolist()}")
    return idx % n


class Recorder:
    """What :func:`capture` yields: the :class:`Record` of every attention call, in call order.

    Attributes:
        records: every call's :class:`Record`.
        sites: the qualified names of the capture sites, in layer order.
    """

    def __init__(self, sites: list[str], rows: int | Sequence[int] | Tensor | None, detach: bool) -> None:
        self.sites = sites
        self.records: list[Record] = []
        self._rows = rows
        self._detach = detach
        self._calls: dict[str, int] = {}

    def _keep(self, t: Tensor | None) -> Tensor | None:
        return None if t is None else (t.detach() if self._detach else t)

    def _add(self, sink: CaptureSink, *, n: int, m: int, **parts: Any) -> None:
        rows = sample_rows(n, self._rows)
        w = parts["weights"]
        if w is not None and rows is not None:
            w = w[:, :, rows.to(w.device)]
        call = self._calls.get(sink.name, 0)
        self._calls[sink.name] = call + 1
        self.records.append(
            Record(
                name=sink.name,
                layer=sink.layer,
                call=call,
                n=n,
                m=m,
                weights=self._keep(w),
                rows=rows,
                importance=self._keep(parts["importance"]),
                mask=parts["mask"],
                q=self._keep(parts["q"]),
                k=self._keep(parts["k"]),
                v=self._keep(parts["v"]),
            )
        )

    def clear(self) -> None:
        """Forget the records (the hooks stay until the ``with`` block ends)."""
        self.records.clear()
        self._calls.clear()

    def layers(self, call: int = -1) -> list[Record]:
        """One record per site that was called, in layer order: the site's ``call``-th call
        (default -1: its last)."""
        out = []
        for name in self.sites:
            mine = [r for r in self.records if r.name == name]
            if mine:
                out.append(mine[call])
        return out

    def weights(self, call: int = -1) -> list[Tensor]:
        """The (B, H, R, M) weights of every site, in layer order (``call`` as in :meth:`layers`).

        Raises ValueError naming the sites without weights (a variant without them, or a capture
        with ``weights=False``).
        """
        recs = self.layers(call)
        if not recs:
            raise ValueError("nothing was captured: run the model inside the `with capture(model)` block")
        missing = [r.name for r in recs if r.weights is None]
        if missing:
            raise ValueError(
                f"no attention weights from {missing}: their variant has none (capabilities.has_weights=False) "
                "or the capture was made with weights=False; use the importance (Record.importance) instead"
            )
        return [r.weights for r in recs]  # type: ignore[misc]

    def importance(self, call: int = -1) -> list[Tensor]:
        """The (B, H, M) importance of every site, in layer order (``call`` as in :meth:`layers`)."""
        recs = self.layers(call)
        missing = [r.name for r in recs if r.importance is None]
        if missing or not recs:
            raise ValueError(f"no importance from {missing or 'any site'} (variant without importance?)")
        return [r.importance for r in recs]  # type: ignore[misc]


def core_call_hooks(
    core: AttentionCore,
    on_call: Callable[[tuple[Any, ...], dict[str, Any], CoreOutput], None],
    *,
    weights: bool,
    importance: bool,
    on_tokens: Callable[[Tensor, AttentionMask, CoreOutput], None] | None = None,
) -> list[Removable]:
    """Hooks on a core that ask it for weights / importance, show every call to
    ``on_call(args, kwargs, output)`` (args: q, k, v, mask), and hand the caller exactly what it
    asked for. A core that computes the layer from the module's tokens (``projects_tokens``, e.g.
    MoSA) is also watched there: ``on_tokens(x (B, N, C), mask, output)`` sees each such call
    (ignored when None). Returns the handles to remove."""
    asked: list[tuple[bool, bool]] = []

    def pre(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        asked.append((bool(kwargs.get("need_weights", False)), bool(kwargs.get("need_importance", False))))
        if weights:
            kwargs["need_weights"] = True
        if importance:
            kwargs["need_importance"] = True
        return args, kwargs

    def post(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: CoreOutput) -> CoreOutput:
        want_w, want_i = asked.pop()
        on_call(args, kwargs, out)
        return replace(out, weights=out.weights if want_w else None, importance=out.importance if want_i else None)

    handles: list[Removable] = [
        core.register_forward_pre_hook(pre, with_kwargs=True),
        core.register_forward_hook(post, with_kwargs=True),
    ]
    if core.projects_tokens:
        handles.append(_TokenPathHook(core, weights, importance, on_tokens))
    return handles


class _TokenPathHook:
    """Wraps ``forward_tokens`` of one core instance (the token path bypasses module hooks):
    asks it for weights / importance, shows each call to ``on_tokens`` and hands the caller what
    it asked for. ``remove()`` restores the class's method."""

    def __init__(
        self,
        core: AttentionCore,
        weights: bool,
        importance: bool,
        on_tokens: Callable[[Tensor, AttentionMask, CoreOutput], None] | None,
    ) -> None:
        self.core = core
        original = core.forward_tokens

        def wrapped(x: Tensor, mask: AttentionMask, **kw: Any) -> tuple[Tensor, CoreOutput]:
            want_w, want_i = kw["need_weights"], kw["need_importance"]
            kw["need_weights"], kw["need_importance"] = want_w or weights, want_i or importance
            y, out = original(x, mask, **kw)
            if on_tokens is not None:
                on_tokens(x, mask, out)
            kept = replace(out, weights=out.weights if want_w else None, importance=out.importance if want_i else None)
            return y, kept

        core.forward_tokens = wrapped  # type: ignore[method-assign]

    def remove(self) -> None:
        self.core.__dict__.pop("forward_tokens", None)


def _core_hooks(core: AttentionCore, sink: CaptureSink) -> list[Removable]:
    """Record every call of a core into ``sink``."""

    def on_call(args: tuple[Any, ...], _kwargs: dict[str, Any], out: CoreOutput) -> None:
        q, k, _v, mask = args[:4]
        pre_rope = sink.pending_qkv[0] or (None, None, None)
        sink.pending_qkv[0] = None
        sink.record(
            n=q.shape[2],
            m=k.shape[2],
            weights=out.weights if sink.weights else None,
            importance=out.importance if sink.importance else None,
            mask=mask,
            q=pre_rope[0],
            k=pre_rope[1],
            v=pre_rope[2],
        )

    def on_tokens(x: Tensor, mask: AttentionMask, out: CoreOutput) -> None:
        on_call((x.unsqueeze(1), x.unsqueeze(1), None, mask), {}, out)  # q, k stand-ins: (B, 1, N, C)

    return core_call_hooks(core, on_call, weights=sink.weights, importance=sink.importance, on_tokens=on_tokens)


def _qkv_hooks(attn: Attention, sink: CaptureSink) -> list[RemovableHandle]:
    """Hooks on an Attention: its projections before rotary positions, kept for the core's record
    of this forward (and dropped after it, e.g. when recurrent decoding never calls the core)."""

    def pre(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = args[0] if args else kwargs["x"]
        context = args[1] if len(args) > 1 else kwargs.get("context")
        sink.pending_qkv[0] = attn.project(x, context)

    def post(_mod: nn.Module, _args: Any, _out: Any) -> None:
        sink.pending_qkv[0] = None

    return [attn.register_forward_pre_hook(pre, with_kwargs=True), attn.register_forward_hook(post)]


@contextlib.contextmanager
def capture(
    model: nn.Module,
    *,
    rows: int | Sequence[int] | Tensor | None = None,
    weights: bool = True,
    importance: bool = True,
    qkv: bool = False,
    detach: bool = True,
) -> Iterator[Recorder]:
    """Record every attention call of ``model`` made inside the ``with`` block.

    Args:
        model: any module containing capture sites (:func:`attention_sites`).
        rows: query rows of the weights to keep: None (all), an int R (at most R evenly spaced
            rows, for long sequences: the weights are still computed, only R rows are stored), or
            a list of row indices (e.g. ``[0]`` for a class token).
        weights: record the (B, H, N, M) weights where the variant has them (it is asked for
            them, which may switch it to its explicit O(N·M) path for the duration).
        importance: record the (B, H, M) importance where the variant computes it.
        qkv: record the projections before rotary positions (from :meth:`Attention.project`,
            one extra input projection per call), e.g. for relation distillation.
        detach: detach what is recorded (default); ``False`` keeps the graph for losses.

    Yields:
        a :class:`Recorder`. Outside the block no hook remains: the model's forward is its
        ordinary code path. Variants asked for weights may take their explicit path, so outputs
        inside the block equal the outputs outside up to floating-point rounding.

    Calls of a variant's recurrent ``step`` (recurrent decoding) are not attention calls of the
    core and are not recorded.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"capture expects an nn.Module, got {describe(model)}")
    sites = attention_sites(model)
    if not sites:
        raise ValueError(
            f"capture: {type(model).__name__} contains no attention to record (no attnlib.Attention, "
            "AttentionCore or module implementing attnlib_capture)"
        )
    rec = Recorder([name for name, _ in sites], rows, detach)
    if rows is not None:
        sample_rows(1 << 30, rows)  # validate now, not at the first call
    handles: list[Removable] = []
    try:
        for layer, (name, mod) in enumerate(sites):
            sink = CaptureSink(rec, name, layer, weights=weights, importance=importance, qkv=qkv)
            if isinstance(mod, Attention):
                handles += _core_hooks(mod.core, sink)
                if qkv:
                    handles += _qkv_hooks(mod, sink)
            elif isinstance(mod, AttentionCore):
                handles += _core_hooks(mod, sink)
            else:
                handles += list(mod.attnlib_capture(sink))  # type: ignore[union-attr]
        yield rec
    finally:
        for h in handles:
            h.remove()


# -- head masks and pruning -------------------------------------------------------------------------


def site_core(name: str, mod: nn.Module) -> AttentionCore:
    """The variant core of capture site ``name`` (UnsupportedError for a site without one)."""
    core = mod.core if isinstance(mod, Attention) else mod
    if not isinstance(core, AttentionCore):
        raise UnsupportedError(f"head masks act on attention cores; site {name!r} ({type(mod).__name__}) has none")
    return core


def _masks_by_site(
    sites: list[tuple[str, nn.Module]], mask: Tensor | Mapping[str, Tensor | Sequence[float]]
) -> dict[str, Tensor]:
    names = [n for n, _ in sites]
    if isinstance(mask, Tensor):
        if mask.dim() != 2 or mask.shape[0] != len(sites):
            raise ValueError(
                f"head mask must be (layers={len(sites)}, heads) - one row per attention site {names} - "
                f"got shape {tuple(mask.shape)}"
            )
        return {n: mask[i] for i, n in enumerate(names)}
    unknown = sorted(set(mask) - set(names))
    if unknown:
        raise ValueError(f"head mask names unknown attention sites {unknown}; the sites are {names}")
    return {n: m if isinstance(m, Tensor) else torch.tensor(list(m), dtype=torch.float32) for n, m in mask.items()}


@contextlib.contextmanager
def head_mask(model: nn.Module, mask: Tensor | Mapping[str, Tensor | Sequence[float]]) -> Iterator[None]:
    """Multiply each head's attention output by a factor inside the ``with`` block.

    Args:
        model: a model with attention sites (:func:`attention_sites`) holding variant cores.
        mask: (L, H) factors, one row per site in order, or ``{site name: (H,) factors}``; 0
            removes a head, 1 keeps it. The product is differentiable: with a mask that requires
            grad, ``d loss / d mask`` is the head importance of Michel et al. (2019).

    The core's output (B, H, N, Dv) is scaled per head before the heads are merged and projected,
    which equals removing the head from the output projection. Hooks are removed at exit.
    """
    sites = attention_sites(model)
    per_site = _masks_by_site(sites, mask)
    handles: list[RemovableHandle] = []

    def make(factors: Tensor, name: str) -> Any:
        def post(_mod: nn.Module, _args: Any, out: CoreOutput) -> CoreOutput:
            h = out.out.shape[1]
            if factors.numel() != h:
                raise ValueError(
                    f"head mask for {name!r} has {factors.numel()} entries but the attention has {h} heads"
                )
            f = factors.to(device=out.out.device, dtype=out.out.dtype).view(1, h, 1, 1)
            return replace(out, out=out.out * f)

        return post

    try:
        for name, mod in sites:
            if name in per_site:
                handles.append(site_core(name, mod).register_forward_hook(make(per_site[name], name)))
        yield
    finally:
        for h in handles:
            h.remove()


def prune_heads(model: nn.Module, heads: Mapping[str, Sequence[int]]) -> None:
    """Remove heads for good: zero their columns of each :class:`attnlib.Attention`'s ``out_proj``.

    Args:
        model: the model (or one Attention, addressed by the name ``""``).
        heads: ``{site name: [head indices]}`` (names as in :func:`attention_sites`).

    Uses :func:`torch.nn.utils.prune.custom_from_mask`, so the zeros survive further training
    (the mask is a buffer, ``out_proj.weight_mask``); ``torch.nn.utils.prune.remove(attn.out_proj,
    "weight")`` folds it into the weight. The output equals :func:`head_mask` with those heads at
    0; the compute is not reduced (the head is still evaluated, its contribution is dropped).
    """
    from torch.nn.utils import prune

    sites = dict(attention_sites(model))
    for name, idx in heads.items():
        mod = sites.get(name)
        if not isinstance(mod, Attention):
            raise UnsupportedError(
                f"prune_heads acts on attnlib.Attention sites; {name!r} is "
                f"{'not a site' if mod is None else type(mod).__name__} (sites: {sorted(sites)})"
            )
        bad = [i for i in idx if not 0 <= int(i) < mod.num_heads]
        if bad:
            raise ValueError(f"prune_heads: {name!r} has {mod.num_heads} heads, got head indices {bad}")
        keep = torch.ones(mod.num_heads, device=mod.out_proj.weight.device)
        keep[list(map(int, idx))] = 0.0
        cols = keep.repeat_interleave(mod.head_dim).to(mod.out_proj.weight.dtype)
        old = getattr(mod.out_proj, "weight_mask", None)
        new = cols.expand_as(mod.out_proj.weight).clone()
        if old is not None:  # pruned before: combine, then re-apply
            new = new * old
            prune.remove(mod.out_proj, "weight")
        prune.custom_from_mask(mod.out_proj, "weight", new)
