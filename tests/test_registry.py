"""The registry: every family module is loaded, capabilities default to unsupported, one forward."""

from __future__ import annotations

import pkgutil
import sys

import pytest
import torch

import attnlib
import attnlib.variants as variants
from attnlib.masks import normalize_mask
from attnlib.registry import Capabilities, get_variant
from attnlib.variants.base import AttentionCore


def test_every_family_module_is_imported_after_import_attnlib() -> None:
    public = sorted(m.name for m in pkgutil.iter_modules(variants.__path__) if not m.name.startswith("_"))
    assert variants.family_modules() == public and "sparse" in public
    missing = [n for n in public if f"attnlib.variants.{n}" not in sys.modules]
    assert not missing, f"family modules not imported by `import attnlib`: {missing}"
    for name in attnlib.available():
        module = get_variant(name).__module__
        assert module.split(".")[-1] in public, f"variant {name!r} is registered from {module}, not a family module"


def test_load_all_names_a_family_module_that_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = pkgutil.ModuleInfo(None, "no_such_family", False)  # type: ignore[arg-type]
    monkeypatch.setattr(variants.pkgutil, "iter_modules", lambda path: [fake])
    with pytest.raises(ImportError, match=r"attnlib\.variants\.no_such_family"):
        variants.load_all()


def test_capabilities_default_to_unsupported() -> None:
    caps = Capabilities()
    assert not any(v for k, v in caps.as_dict().items() if isinstance(v, bool)), caps


@pytest.mark.parametrize("name", attnlib.available())
def test_importance_declared_iff_reported(name: str) -> None:
    """``capabilities.importance`` is declared exactly by the variants whose attend() reports it."""
    cls = get_variant(name)
    core = cls(num_heads=2, head_dim=8, **cls.conformance_kwargs())
    q = torch.randn(1, 2, 8, 8)
    am = normalize_mask(None, causal=False, batch=1, heads=2, n=8, m=8, device=q.device)
    res = core(q, q, q, am, need_importance=True)
    assert (res.importance is not None) == cls.capabilities.importance


@pytest.mark.parametrize("name", attnlib.available())
def test_no_variant_overrides_forward(name: str) -> None:
    """The capability checks live in AttentionCore.forward; attend() receives ``cross`` from it."""
    assert get_variant(name).forward is AttentionCore.forward
