"""``attnlib-info``: print the capability matrix of every registered variant as markdown."""

from __future__ import annotations

import argparse

import attnlib
from attnlib.decoding import decode_mode
from attnlib.registry import get_variant

__all__ = ["capability_matrix", "main"]

_COLUMNS = [
    ("causal", "causal"),
    ("cross", "cross"),
    ("key_padding", "key pad"),
    ("full_mask", "full mask"),
    ("block_mask", "BlockMask"),
    ("window", "window"),
    ("causal_cross", "causal N≠M"),
    ("exact", "exact"),
    ("has_weights", "weights"),
    ("trainable", "params"),
    ("recurrent", "step"),
    ("importance", "importance"),
]


def capability_matrix(names: list[str] | None = None) -> str:
    """Markdown table: one row per variant, one column per capability, generated from the registry."""
    names = attnlib.available() if names is None else names
    head = ["variant", "family", "complexity", *[title for _, title in _COLUMNS], "decode", "paper"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        caps = get_variant(name).capabilities
        cells = [f"`{name}`", caps.family, caps.complexity]
        cells += ["✓" if getattr(caps, field) else "·" for field, _ in _COLUMNS]
        cells.append(decode_mode(caps) or "·")  # how attnlib.AttentionCache decodes it
        cells.append(caps.paper)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Print the capability matrix (``--variants a b`` limits the rows)."""
    parser = argparse.ArgumentParser(prog="attnlib-info", description=__doc__)
    parser.add_argument("--variants", nargs="*", default=None, help="only these variants")
    args = parser.parse_args(argv)
    print(capability_matrix(args.variants))


if __name__ == "__main__":  # pragma: no cover
    main()
