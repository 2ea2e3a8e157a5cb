"""Test configuration: deterministic, few threads (CI has 2 cores), float64 where exactness is tested."""

from __future__ import annotations

import os

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    torch.set_num_threads(1 if workers else max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def count_calls(monkeypatch: pytest.MonkeyPatch):
    """``count_calls(module, names)`` wraps the functions ``names`` of ``module`` so that each call is
    counted and returns the live counts (e.g. a kernel module's launchers: a test knows the kernel ran)."""

    def count(module: object, names: tuple[str, ...]) -> dict[str, int]:
        calls = dict.fromkeys(names, 0)
        for name in names:
            real = getattr(module, name)

            def wrapped(*a, _real=real, _name=name, **kw):
                calls[_name] += 1
                return _real(*a, **kw)

            monkeypatch.setattr(module, name, wrapped)
        return calls

    return count


@pytest.fixture(params=["one_block", "head_slabs", "many_blocks"])
def block_size(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with the default block size of the linear family's fast path (small inputs:
    every batch row in one unit), with 1000-element blocks (at the tests' sizes, N·width of
    300-1000: one or a few heads of one batch row per unit, see ``_scan.slabs``), and with
    blocks of one chunk (one head, running states carried across many row blocks). Use with
    ``pytestmark = pytest.mark.usefixtures("block_size")`` or per test."""
    from attnlib.functional import _scan

    if request.param == "head_slabs":
        monkeypatch.setattr(_scan, "BLOCK_ELEMENTS", 1000)
    if request.param == "many_blocks":
        monkeypatch.setattr(_scan, "BLOCK_ELEMENTS", 1)
    return request.param
