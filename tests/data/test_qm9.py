"""QM9 from the embedded qm9pack CSVs (the real 130,831 molecules, processed once per session)."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from abp_core.data import QM9, HARTREE_TO_EV


def test_full_qm9_has_130831_molecules(qm9_session):
    ds, _, _, first_seconds = qm9_session
    assert len(ds) == 130_831
    print(f"\nQM9 first load (processing): {first_seconds:.1f} s")
    assert ds[0].name == "dsgdb9nsd_000001" and ds[len(ds) - 1].name == "dsgdb9nsd_133885"
    assert int(ds[len(ds) - 1].idx) == 130_830
    assert ds._data.y.shape == (130_831, 21) and torch.isfinite(ds._data.y).all()


def test_second_load_comes_from_the_cache_and_is_fast(qm9_session, monkeypatch):
    ds, root, cache, _ = qm9_session

    def boom(self):
        raise AssertionError("QM9 processed twice")

    monkeypatch.setattr(QM9, "_build", boom)
    t0 = time.perf_counter()
    again = QM9(root=root, cache_dir=cache)
    seconds = time.perf_counter() - t0
    print(f"\nQM9 second load (cache): {seconds:.2f} s")
    assert seconds < 30
    assert len(again) == len(ds)
    assert torch.equal(again._data.pos, ds._data.pos) and torch.equal(again._data.y, ds._data.y)


def test_spot_checks_methane_water_and_units(qm9_session):
    ds, _, _, _ = qm9_session
    assert ds.target_units[ds.target_index("homo")] == "eV"
    assert ds.target_units[ds.target_index("U0")] == "Ha"
    assert len(ds.target_names) == len(ds.target_units) == 21
    ch4 = ds[0]
    assert ch4.z.tolist() == [6, 1, 1, 1, 1] and ch4.smiles == "C"
    # qm9pack: HOMO_au -0.3877, LUMO_au 0.1171, U0 -40.47893 Ha, mu 0 D, alpha 13.21 Bohr^3
    y = ch4.y[0]
    assert y[ds.target_index("homo")].item() == pytest.approx(-0.3877 * HARTREE_TO_EV, abs=1e-4)
    assert y[ds.target_index("homo")].item() == pytest.approx(-10.5499, abs=1e-3)
    assert y[ds.target_index("lumo")].item() == pytest.approx(0.1171 * HARTREE_TO_EV, abs=1e-4)
    assert y[ds.target_index("U0")].item() == pytest.approx(-40.47893, abs=1e-3)
    assert y[ds.target_index("alpha")].item() == pytest.approx(13.21, abs=1e-4)
    assert y[ds.target_index("alpha_xx")].item() == pytest.approx(13.211, abs=1e-4)
    # C-H bond lengths of methane in Å
    d = (ch4.pos[1:] - ch4.pos[0]).norm(dim=1)
    assert torch.allclose(d, torch.full((4,), 1.0919), atol=2e-3)
    water = ds[2]
    assert water.z.tolist() == [8, 1, 1] and water.name == "dsgdb9nsd_000003"
    assert abs(float(water.mulliken.sum())) < 1e-4  # neutral molecule


def test_gap_equals_lumo_minus_homo_in_ev_everywhere(qm9_session):
    ds, _, _, _ = qm9_session
    y = ds._data.y.double()
    homo, lumo, gap = (y[:, ds.target_index(k)] for k in ("homo", "lumo", "gap"))
    assert (gap - (lumo - homo)).abs().max() < 3e-3  # 4-decimal Hartree inputs
    assert -12 < homo.min() and homo.max() < -2.5  # eV (in Hartree they would lie in -0.43..-0.10)


def test_positions_are_plausible_angstrom(qm9_session):
    ds, _, _, _ = qm9_session
    rng = np.random.default_rng(1)
    for i in rng.choice(len(ds), 300, replace=False):
        d = ds[int(i)]
        dist = torch.cdist(d.pos.double(), d.pos.double())
        dist.fill_diagonal_(float("inf"))
        nn = dist.min(dim=1).values
        assert 0.9 < nn.min() and nn.max() < 1.8, (d.name, nn)


def test_first_n_molecules_subset_is_fast_and_matches(qm9_session, tmp_path):
    ds, _, _, _ = qm9_session
    t0 = time.perf_counter()
    small = QM9(root=tmp_path, max_molecules=3000)
    seconds = time.perf_counter() - t0
    assert len(small) == 3000 and seconds < 20
    n_atoms = int(small.slices["z"][-1])
    assert torch.equal(small._data.z, ds._data.z[:n_atoms])
    assert torch.equal(small._data.y, ds._data.y[:3000])
    assert small[2999].name == ds[2999].name and int(small[2999].idx) == 2999
    assert small.processed_path != ds.processed_path
    # across a part-file boundary (part 1 holds 43,610 rows)
    assert len(QM9(root=tmp_path, max_molecules=43_615)) == 43_615


def test_qm9_target_aliases(qm9_session):
    ds, _, _, _ = qm9_session
    assert ds.target_index("HOMO_au") == 2 and ds.target_index("homo") == 2
    assert ds.target_names[:12] == ["mu", "alpha", "homo", "lumo", "gap", "r2", "zpve", "U0", "U", "H", "G", "Cv"]
    with pytest.raises(ValueError):
        QM9(max_molecules=0)


def test_single_molecule_dataset_keeps_per_molecule_shapes(tmp_path):
    ds = QM9(root=tmp_path, max_molecules=1)
    assert len(ds) == 1
    d = ds[0]
    assert d.idx.dim() == 0 and d.z.tolist() == [6, 1, 1, 1, 1] and d.y.shape == (1, 21)
    assert d.name == "dsgdb9nsd_000001"
