# attnlib - the two commands of the README quickstart: `make demo` and `make test` (and `make docs`).
# Each bootstraps .venv idempotently (torch==2.13.0 CPU wheel; an installed torch 2.13.0 is kept).

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN := 2.13.0
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
PYTEST_WORKERS ?= 2

.PHONY: demo compare test lint info docs bench-overhead bench bench-speed bench-approx bench-quality bench-smoke setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$(TORCH_PIN)')" 2>/dev/null \
		|| $(PY) -m pip install --disable-pip-version-check "torch==$(TORCH_PIN)"
	$(PY) -m pip install --disable-pip-version-check -q -e ".[dev]"
	@rm -f $(VENV)/.installed-*
	@touch $@

# Train a ViT on scikit-learn's digits with softmax attention on the CPU (~2 min, >= 97% test
# accuracy); it ends by printing the one-line command that swaps the attention.
demo: $(STAMP)
	$(VENV)/bin/attnlib-train experiment=vit_digits

# Capability matrix and a CPU speed/accuracy comparison of every registered variant.
compare: $(STAMP)
	$(PY) examples/compare_variants.py

test: $(STAMP)
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --timeout=900 tests
	$(VENV)/bin/ruff check .

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

info: $(STAMP)
	$(VENV)/bin/attnlib-info

# The documentation site (mkdocs, material theme, API reference from the docstrings) into site/;
# the README's variant table is regenerated from the registry first.
docs: $(STAMP)
	$(PY) docs/gen_variant_table.py
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

bench-overhead: $(STAMP)
	$(PY) benchmarks/module_overhead.py

# Regenerate every committed CPU result table and plot (benchmarks/results/<machine>/): run on a quiet machine.
bench: bench-speed bench-approx bench-quality bench-overhead

bench-speed: $(STAMP)
	$(VENV)/bin/attnlib-bench bench=cpu_full

bench-approx: $(STAMP)
	$(VENV)/bin/attnlib-bench bench=approx_full

bench-quality: $(STAMP)
	$(VENV)/bin/attnlib-bench bench=quality_cpu

bench-smoke: $(STAMP)
	$(VENV)/bin/attnlib-bench bench=smoke out_dir=$${TMPDIR:-/tmp}/attnlib-bench-smoke

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info site
