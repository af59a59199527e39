"""Shared fixtures: paths to the real data beside the checkout, and small real molecules."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

# The data root and cache dir are set for the whole session in the repo's root conftest.py.


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "qm7b").is_dir():
        pytest.fail(f"real test data missing: expected {SHARED_DATA}/qm7b (../shared/data beside the repo)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def qm7b(shared_data):
    """The real QM7b dataset (7,211 molecules, Å) from the paper's release."""
    from abp_core.data import get_dataset

    return get_dataset("qm7b", root=shared_data)


@pytest.fixture(scope="session")
def qm7b_molecules(qm7b):
    """Twelve real QM7b molecules of varied size (4-23 atoms), float64 positions."""
    sizes = torch.tensor([qm7b[i].z.numel() for i in range(400)])
    order = torch.argsort(sizes)
    picks = order[torch.linspace(0, len(order) - 1, 12).long()].tolist()
    out = []
    for i in picks:
        d = qm7b[i].clone()
        d.pos = d.pos.double()
        out.append(d)
    return out



class FakeGlibc:
    """Stands in for :func:`abp_core.allocator.glibc` and records the allocator settings it is given (what glibc
    then does with them is tested in tests/test_allocator.py, in a fresh process)."""

    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


@pytest.fixture
def fake_glibc(monkeypatch) -> FakeGlibc:
    """``abp_core.allocator`` talking to a :class:`FakeGlibc` instead of the process's C library."""
    from abp_core import allocator

    fake = FakeGlibc()
    monkeypatch.setattr(allocator, "glibc", lambda: fake)
    return fake
