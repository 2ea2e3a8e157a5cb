"""What the benchmarks run: attnlib variants and the baselines, as uniform callables.

A :class:`MethodSpec` names a registered variant (with constructor kwargs) or a baseline:

* ``sdpa`` - ``torch.nn.functional.scaled_dot_product_attention`` (fused flash kernels);
* ``flex`` - FlexAttention through ``torch.compile`` (compile time is reported separately,
  never timed); ``flex[<label>]`` runs Flex with the mask a variant imposes on itself
  (e.g. ``local``'s sliding window), the like-for-like baseline of a structured-sparse variant;
* ``math`` - SDPA's MATH backend: explicit attention with an (N, M) score matrix (naive).

A :class:`Case` is one shape point (device, dtype, B, H, D, N, causal, pass). :class:`Runner`
turns a spec and a case into the timed callable (``fwd`` under ``torch.no_grad``, or ``fwd_bwd``:
forward plus backward of a fixed Gaussian upstream gradient into q, k, v) and the forward output
used by the correctness gate. Variants are timed at the core level (per-head q, k, v -> out),
like the baselines; the shared projections are not part of the comparison.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlib.errors import UnsupportedError
from attnlib.masks import AttentionMask, BlockMask, MaskLike, normalize_mask
from attnlib.registry import Capabilities, available, get_variant
from attnlib.testing import make_qkv
from attnlib.variants.base import AttentionCore

__all__ = [
    "BASELINES",
    "Case",
    "Inputs",
    "MethodSpec",
    "Runner",
    "density_block_mask",
    "flex_block_mask",
    "is_subquadratic",
    "variant_defaults",
]

BASELINES: dict[str, str] = {
    "sdpa": "torch SDPA (fused flash kernel)",
    "flex": "FlexAttention (torch.compile; compile time excluded)",
    "math": "SDPA MATH backend (explicit N x M scores)",
}

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "attention"
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_of(name: str) -> torch.dtype:
    """``"float32"`` -> ``torch.float32`` (also accepts fp32 / bf16 / fp16 / fp64)."""
    alias = {"fp32": "float32", "fp64": "float64", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
    key = alias.get(str(name), str(name)).replace("torch.", "")
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[key]


def is_subquadratic(complexity: str) -> bool:
    """Whether a ``Capabilities.complexity`` string is below O(N^2) (e.g. "O(N)", "O(N·w)")."""
    c = complexity.replace(" ", "").replace("²", "^2")
    return not ("N^2" in c or "N*N" in c or "N·N" in c or "NM" in c or "N·M" in c)


def _ctor_params(cls: type[AttentionCore]) -> set[str] | None:
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return {n for n in params if n not in ("self", "num_heads", "head_dim")}


def variant_defaults(name: str) -> dict[str, Any]:
    """The constructor kwargs of ``configs/attention/<name>.yaml`` (what ``attention=<name>`` builds).

    Keys the core's constructor does not take (module-level options such as ``rope``) are dropped.
    """
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.exists():
        return {}
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    assert isinstance(data, dict)
    data.pop("variant", None)
    accepted = _ctor_params(get_variant(name))
    return {k: v for k, v in data.items() if accepted is None or k in accepted}


@dataclass
class MethodSpec:
    """One benchmarked method: a variant (with kwargs) or a baseline.

    Attributes:
        label: row name in the tables (the variant name, a user label, or ``sdpa`` / ``flex`` /
            ``math`` / ``flex[<label>]``).
        kind: "variant", "sdpa", "flex" or "math".
        variant: registry name (kind "variant").
        kwargs: constructor kwargs (on top of the YAML defaults and ``benchmark_kwargs``).
        mask_from: for kind "flex": run Flex under this variant's ``implied_mask()``.
        core_cls: an explicit core class instead of the registry entry (tests).
        block_density: run under a block-sparse caller mask keeping this fraction of the
            128 x 128 blocks (:func:`density_block_mask`): the density axis of block-sparse kernels.
    """

    label: str
    kind: str = "variant"
    variant: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    mask_from: MethodSpec | None = None
    core_cls: type[AttentionCore] | None = None
    block_density: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("variant", *BASELINES):
            raise ValueError(f"method kind must be 'variant' or one of {sorted(BASELINES)}, got {self.kind!r}")
        if self.kind == "variant" and self.variant is None and self.core_cls is None:
            raise ValueError(f"method {self.label!r}: a variant method needs `variant` or `core_cls`")
        if self.block_density is not None and not 0.0 < float(self.block_density) <= 1.0:
            raise ValueError(f"method {self.label!r}: block_density must be in (0, 1], got {self.block_density!r}")

    @property
    def is_baseline(self) -> bool:
        """True for sdpa / flex / math."""
        return self.kind != "variant"

    def core_class(self) -> type[AttentionCore]:
        """The variant's core class."""
        if self.core_cls is not None:
            return self.core_cls
        assert self.variant is not None
        return get_variant(self.variant)

    @property
    def capabilities(self) -> Capabilities:
        """The variant's capabilities (baselines: exact softmax, every mask)."""
        if self.is_baseline:
            return Capabilities(causal=True, exact=True, complexity="O(N^2)", family="baseline")
        return self.core_class().capabilities

    @property
    def exact(self) -> bool:
        """Exact softmax attention (under its implied mask)."""
        return self.capabilities.exact

    @property
    def subquadratic(self) -> bool:
        """Below O(N^2) (runs at the long-N points)."""
        return False if self.is_baseline else is_subquadratic(self.capabilities.complexity)

    def ctor_kwargs(self, n: int) -> dict[str, Any]:
        """YAML defaults < ``benchmark_kwargs(n)`` < this spec's kwargs."""
        cls = self.core_class()
        base = variant_defaults(self.variant) if self.core_cls is None and self.variant else {}
        return {**base, **cls.benchmark_kwargs(n), **self.kwargs}

    def build_core(self, case: Case) -> AttentionCore:
        """A fresh core for ``case`` on its device and dtype (seeded from ``torch.manual_seed``)."""
        cls = self.core_class()
        core = cls(num_heads=case.heads, head_dim=case.head_dim, **self.ctor_kwargs(case.n))
        return core.to(device=case.device, dtype=dtype_of(case.dtype))

    def describe(self) -> dict[str, Any]:
        """JSON-ready description."""
        d: dict[str, Any] = {"label": self.label, "kind": self.kind}
        if self.is_baseline:
            d["what"] = BASELINES[self.kind]
            if self.mask_from is not None:
                d["mask_from"] = self.mask_from.label
            if self.block_density is not None:
                d["block_density"] = self.block_density
            return d
        caps = self.capabilities
        d.update(
            variant=self.variant or getattr(self.core_cls, "__name__", "?"),
            kwargs=dict(self.kwargs),
            exact=caps.exact,
            family=caps.family,
            complexity=caps.complexity,
            trainable=caps.trainable,
        )
        if self.block_density is not None:
            d["block_density"] = self.block_density
        return d

    @classmethod
    def parse(cls, name: str, extra: Mapping[str, Mapping[str, Any]] | None = None) -> MethodSpec:
        """A spec from a table name: a baseline, a registered variant or a label of ``extra``.

        ``extra`` maps labels to ``{"variant": name, **kwargs}`` (the same variant with other
        settings, e.g. several block-sparse densities). Unknown names raise ValueError.
        """
        extra = extra or {}
        if name in BASELINES:
            return cls(label=name, kind=name)
        if name in extra:
            entry = dict(extra[name])
            variant = entry.pop("variant", None)
            if variant is None:
                raise ValueError(f"extra variant {name!r} needs a `variant:` key")
            if variant not in available():
                raise ValueError(f"extra variant {name!r}: variant {variant!r} is not registered")
            return cls(label=name, variant=str(variant), kwargs=entry)
        if name in available():
            return cls(label=name, variant=name)
        get_variant(name)  # raises ValueError with suggestions
        raise AssertionError  # pragma: no cover


@dataclass(frozen=True)
class Case:
    """One benchmark point. ``pass_`` is "fwd" or "fwd_bwd"."""

    device: str
    dtype: str
    batch: int
    heads: int
    head_dim: int
    n: int
    causal: bool
    pass_: str = "fwd"

    def __post_init__(self) -> None:
        if self.pass_ not in ("fwd", "fwd_bwd"):
            raise ValueError(f"pass must be 'fwd' or 'fwd_bwd', got {self.pass_!r}")

    def flops(self) -> float:
        """Dense-attention FLOPs by the FlashAttention convention: 4·B·H·N²·D, x0.5 causal, x3.5 fwd+bwd."""
        f = 4.0 * self.batch * self.heads * self.n * self.n * self.head_dim
        if self.causal:
            f *= 0.5
        return f * (3.5 if self.pass_ == "fwd_bwd" else 1.0)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``pass`` instead of ``pass_``)."""
        d = asdict(self)
        d["pass"] = d.pop("pass_")
        return d


@dataclass
class Inputs:
    """Shared inputs of one shape point: Gaussian q, k, v (logit std 1) and an upstream gradient."""

    q: Tensor
    k: Tensor
    v: Tensor
    grad_out: Tensor

    @classmethod
    def make(cls, case: Case, *, seed: int = 0, logit_scale: float = 1.0) -> Inputs:
        """Inputs for ``case`` (``attnlib.testing.make_qkv``), leaf tensors requiring grad for fwd_bwd."""
        dt = dtype_of(case.dtype)
        q, k, v = make_qkv(
            *(case.batch, case.heads, case.n, case.head_dim),
            dtype=dt,
            device=case.device,
            seed=seed,
            logit_scale=logit_scale,
        )
        g = torch.Generator().manual_seed(seed + 1)
        go = torch.randn((*q.shape[:-1], v.shape[-1]), generator=g, dtype=torch.float64).to(dt).to(case.device)
        return cls(q, k, v, go)

    def with_grad(self, flag: bool) -> Inputs:
        """The same values, as leaves that require grad (or not)."""
        if all(t.requires_grad == flag for t in (self.q, self.k, self.v)):
            return self
        return Inputs(*(t.detach().requires_grad_(flag) for t in (self.q, self.k, self.v)), self.grad_out)


def density_block_mask(n: int, density: float, *, block: int = 128, device: torch.device | str = "cpu") -> BlockMask:
    """A deterministic block-sparse (N, N) mask keeping about ``density`` of the ``block``² blocks.

    The diagonal blocks are always kept (no empty rows); the others are kept by a fixed hash of
    (query block, key block), so the pattern is the same on every run and device.
    """
    thr = round(float(density) * 1024)

    def mask_mod(b: Tensor, h: Tensor, qi: Tensor, kv: Tensor) -> Tensor:
        qb, kb = qi // block, kv // block
        return (qb == kb) | (((qb * 1103515245 + kb * 12345 + 7) % 1024) < thr)

    return BlockMask.from_mask_mod(mask_mod, None, None, n, n, block, device=device)


def flex_block_mask(am: AttentionMask) -> Any:
    """A FlexAttention ``BlockMask`` equal to ``am`` (causal / sliding window / attnlib BlockMask), or None.

    Built once per shape, outside the timed region. Other mask kinds raise UnsupportedError.
    """
    kinds = am.kinds()
    if not kinds:
        return None
    unsupported = set(kinds) - {"causal", "window", "block_mask"}
    if unsupported:
        raise UnsupportedError(f"flex baseline: mask kinds {sorted(unsupported)} are not benchmarked")
    if am.block is not None and len(kinds) > 1:
        # a BlockMask AND causal / window: the very BlockMask the block-sparse kernels run on
        # (AttentionMask.as_block_mask, at the BlockMask's block size), so both time one layout
        combined = am.as_block_mask(am.block.block_size)
        assert combined is not None
        return combined.to_flex()
    return am.to_flex()


@functools.lru_cache(maxsize=2)
def _compiled_flex(dynamic: bool = False) -> Callable[..., Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=dynamic)


FLEX_DYNAMIC = {"value": False}


def set_flex_dynamic(flag: bool) -> None:
    """Compile FlexAttention with dynamic shapes (one compile for all N; fewer recompiles on GPU sweeps)."""
    FLEX_DYNAMIC["value"] = bool(flag)


class Runner:
    """The timed callable of one (method, case), plus its forward output for the correctness gate.

    Attributes:
        call: zero-argument callable: the forward (``fwd``) or forward + backward (``fwd_bwd``).
        grad_to_none: tensors whose ``.grad`` is reset before each call.
        reference_mask: the mask under which the output should equal exact softmax attention
            (the caller's causal mask, plus the variant's implied mask for exact variants).
        info: extra facts for the result row (e.g. the implied mask's density).
    """

    def __init__(self, spec: MethodSpec, case: Case, inputs: Inputs) -> None:
        self.spec, self.case = spec, case
        train = case.pass_ == "fwd_bwd"
        self.inputs = inputs.with_grad(train)
        q = self.inputs.q
        b, h, n, _ = q.shape
        extra: MaskLike = None
        self.info: dict[str, Any] = {}
        if spec.block_density is not None:
            extra = density_block_mask(n, spec.block_density, device=q.device)
            self.info["density"] = round(extra.density(), 4)
        self.caller_mask = normalize_mask(extra, causal=case.causal, batch=b, heads=h, n=n, m=n, device=q.device)
        self.grad_to_none = [self.inputs.q, self.inputs.k, self.inputs.v] if train else []
        implied: MaskLike = None
        if spec.kind == "variant":
            caps = spec.capabilities
            if case.causal and not caps.causal:
                raise UnsupportedError(f"{spec.label} does not support causal=True")
            if spec.block_density is not None and not caps.block_mask:
                raise UnsupportedError(f"{spec.label} does not support a BlockMask")
            self.core = spec.build_core(case)
            self.core.train(train)
            implied = self.core.implied_mask(n, n, q.device)
            if spec.block_density is not None and implied is not None:
                raise UnsupportedError(
                    f"{spec.label}: {spec.variant} imposes a mask of its own on top of the density mask, so this row "
                    f"would not time the same mask as flex[d={spec.block_density:g}]; give it maskless settings "
                    f"(variant_kwargs['{spec.variant}[density]'], e.g. pattern: dense)"
                )
            self._forward = self._variant_forward
        elif spec.kind == "flex":
            if spec.mask_from is not None:
                target = spec.mask_from.build_core(case)
                implied = target.implied_mask(n, n, q.device)
                if implied is None:
                    raise UnsupportedError(f"{spec.mask_from.label} imposes no mask of its own")
            am = self._mask([self.caller_mask, implied])
            self.block_mask = flex_block_mask(am)
            if self.block_mask is not None and hasattr(self.block_mask, "sparsity") and "density" not in self.info:
                self.info["density"] = round(1.0 - float(self.block_mask.sparsity()) / 100.0, 4)
            self._forward = self._flex_forward
        elif spec.block_density is not None:
            raise UnsupportedError(f"{spec.label}: block densities are benchmarked with flex or variants only")
        elif spec.kind == "sdpa":
            self._forward = self._sdpa_forward
        else:
            self._forward = self._math_forward
        self.reference_mask = (
            self._mask([self.caller_mask, implied]) if (implied is not None and spec.exact) else self.caller_mask
        )
        if isinstance(implied, BlockMask) and "density" not in self.info:
            self.info["density"] = round(implied.density(), 4)

    def _mask(self, masks: list[MaskLike]) -> AttentionMask:
        b, h, n, _ = self.inputs.q.shape
        return normalize_mask(masks, causal=self.case.causal, batch=b, heads=h, n=n, m=n, device=self.inputs.q.device)

    # -- forwards ------------------------------------------------------------------------------

    def _variant_forward(self) -> Tensor:
        i = self.inputs
        return self.core(i.q, i.k, i.v, self.caller_mask).out

    def _sdpa_forward(self) -> Tensor:
        i = self.inputs
        return F.scaled_dot_product_attention(i.q, i.k, i.v, is_causal=self.case.causal)

    def _math_forward(self) -> Tensor:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        i = self.inputs
        with sdpa_kernel([SDPBackend.MATH]):
            return F.scaled_dot_product_attention(i.q, i.k, i.v, is_causal=self.case.causal)

    def _flex_forward(self) -> Tensor:
        i = self.inputs
        return _compiled_flex(FLEX_DYNAMIC["value"])(i.q, i.k, i.v, block_mask=self.block_mask)

    # -- public ----------------------------------------------------------------------------------

    def forward_output(self) -> Tensor:
        """The forward output (B, H, N, D) without autograd (for the error columns)."""
        with torch.no_grad():
            return self._forward().detach()

    def call(self) -> Tensor:
        """One timed call; returns the forward output (detached)."""
        if self.case.pass_ == "fwd":
            with torch.no_grad():
                return self._forward()
        for t in self.grad_to_none:
            t.grad = None
        out = self._forward()
        out.backward(self.inputs.grad_out)
        return out.detach()


def spec_for_child(spec: MethodSpec) -> MethodSpec:
    """A copy safe to pickle into a child process (registry lookups by name)."""
    return replace(spec, mask_from=spec_for_child(spec.mask_from) if spec.mask_from else None)
