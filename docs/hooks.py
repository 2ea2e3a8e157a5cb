"""MkDocs hooks: tables generated from the registry, and the committed benchmark results in the site.

* ``<!-- variant-table -->`` becomes the table of every registered variant (name, family,
  complexity, paper), ``<!-- capability-matrix -->`` the full capability matrix (as printed by
  ``attnlib-info``) and ``<!-- capabilities: NAME -->`` one variant's capabilities - all read
  from ``attnlib.available()`` / ``attnlib.variant_info`` at build time, never typed by hand.
* ``benchmarks/results/**/*.md`` (and their plots) are added to the site under ``results/``;
  links written ``../benchmarks/results/...`` in a page (which work when browsing the
  repository) are pointed there.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from mkdocs.structure.files import File, Files, InclusionLevel

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:  # MkDocs restores sys.path after loading a hook: import what we need now
    sys.path.insert(0, str(ROOT))

from gen_variant_table import variant_table  # noqa: E402  (docs/ is on sys.path while MkDocs loads hooks)

import attnlib  # noqa: E402
from attnlib.cli.info import capability_matrix  # noqa: E402

_CAPS = re.compile(r"<!--\s*capabilities:\s*([A-Za-z_][A-Za-z0-9_]*)\s*-->")
_FLAGS = [
    ("causal", "causal"),
    ("cross", "cross-attention"),
    ("key_padding", "key padding"),
    ("full_mask", "full mask"),
    ("block_mask", "BlockMask"),
    ("window", "SlidingWindow"),
    ("causal_cross", "causal with N ≠ M (KV cache)"),
    ("exact", "exact"),
    ("has_weights", "weights"),
    ("importance", "importance"),
    ("recurrent", "recurrent step"),
    ("gqa", "native GQA"),
    ("attn_dropout", "attention dropout"),
    ("trainable", "own parameters"),
    ("permutation_equivariant", "permutation equivariant"),
    ("score_mod", "score_mod (score modifiers)"),
]


def capability_summary(name: str) -> str:
    """One variant's capabilities as a short markdown block."""
    caps = attnlib.variant_info(name)
    yes = [title for field, title in _FLAGS if getattr(caps, field)]
    no = [title for field, title in _FLAGS if not getattr(caps, field)]
    return (
        f"**Capabilities** (from `attnlib.variant_info({name!r})`): family `{caps.family}`, "
        f"complexity `{caps.complexity}`.  \n"
        f"Supports: {', '.join(yes) or '-'}.  \n"
        f"Not: {', '.join(no) or '-'}."
    )


def on_files(files: Files, config) -> Files:
    for path in sorted(RESULTS.rglob("*")):
        if path.suffix in (".md", ".png") and path.is_file():
            uri = "results/" + path.relative_to(RESULTS).as_posix()
            files.append(File.generated(config, uri, abs_src_path=str(path), inclusion=InclusionLevel.NOT_IN_NAV))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri.startswith("results/"):
        return markdown
    markdown = markdown.replace("../benchmarks/results/", "results/")
    if "<!-- variant-table -->" in markdown:
        markdown = markdown.replace("<!-- variant-table -->", variant_table(link_prefix="variants.md"))
    if "<!-- capability-matrix -->" in markdown:
        markdown = markdown.replace("<!-- capability-matrix -->", capability_matrix())
    return _CAPS.sub(lambda m: capability_summary(m.group(1)), markdown)
