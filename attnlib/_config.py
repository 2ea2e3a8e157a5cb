"""Config plumbing shared by every ``build_*`` function: DictConfig -> dict, ``name`` lookup.

Hydra hands the builders OmegaConf ``DictConfig`` objects; Python users hand them dicts. Both
end up as a plain ``dict`` here, and a ``name`` that is not in the builder's table raises one
error that lists the known names and the close matches.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["close_matches_hint", "lookup_registered", "register_named", "split_named_config", "to_plain_dict"]


def to_plain_dict(cfg: Any, *, what: str) -> dict[str, Any]:
    """A resolved plain ``dict`` copy of a mapping or OmegaConf ``DictConfig``.

    Args:
        cfg: the config.
        what: the builder's name, used in the error message (e.g. ``"data config"``).

    Raises:
        ValueError: if ``cfg`` is not a mapping.
    """
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover - hydra-core is a runtime dependency
        pass
    if not isinstance(cfg, Mapping):
        raise ValueError(f"{what} must be a mapping / DictConfig, got {type(cfg).__name__}: {cfg!r}")
    return dict(cfg)


def close_matches_hint(name: str, known: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the names in ``known`` close to ``name`` (or ``""``)."""
    close = difflib.get_close_matches(str(name), list(known), n=3, cutoff=0.5)
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def split_named_config(cfg: Any, known: Iterable[str], *, what: str) -> tuple[str, dict[str, Any]]:
    """Split ``{"name": n, **kwargs}`` into ``(n, kwargs)`` and check ``n`` against ``known``.

    Args:
        cfg: mapping / DictConfig with a ``name`` key.
        known: the registered names.
        what: e.g. ``"data"`` or ``"model"``; used in error messages.

    Raises:
        ValueError: if ``cfg`` is not a mapping, has no ``name``, or names something unknown
            (the message lists the known names and the close matches).
    """
    names = sorted(known)
    kwargs = to_plain_dict(cfg, what=f"{what} config")
    if "name" not in kwargs:
        raise ValueError(f"{what} config needs a 'name' (one of {names}); got keys {sorted(kwargs)}")
    name = kwargs.pop("name")
    if name not in names:
        raise ValueError(f"unknown {what} {name!r}{close_matches_hint(name, names)} Known: {', '.join(names)}")
    return str(name), kwargs


def register_named(table: dict[str, Any], name: str, cls: Any, *, kind: str) -> Any:
    """Register ``cls`` in a name registry ``table`` (setting ``cls.name``); returns ``cls``.

    A second class under a taken name raises ValueError ``"{kind} 'name' is already registered by ..."``.
    """
    if name in table and table[name] is not cls:
        raise ValueError(f"{kind} {name!r} is already registered by {table[name].__qualname__}")
    cls.name = name
    table[name] = cls
    return cls


def lookup_registered(table: dict[str, Any], name: str, *, kind: str, plural: str) -> Any:
    """``table[name]``; an unknown name raises ValueError listing the close matches and every name."""
    if name not in table:
        hint = close_matches_hint(name, table)
        raise ValueError(f"unknown {kind} {name!r}{hint} Registered {plural}: {', '.join(sorted(table))}")
    return table[name]
