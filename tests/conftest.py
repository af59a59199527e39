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

