"""Tests for abp_core.orbitals: per-atom HOMO/LUMO shares (GFN2-xTB via tblite, optional PySCF)."""

from __future__ import annotations

import pickle
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("tblite")

from abp_core import orbitals as orb  # noqa: E402
from abp_core.orbitals import (  # noqa: E402
    OrbitalCacheMismatchError,
    OrbitalCalculationError,
    OrbitalLabels,
    OrbitalLabelWarning,
    compute_orbitals,
    label_orbitals,
    mulliken_shares,
    orbital_coefficients,
)

WATER_Z = np.array([8, 1, 1])
WATER_POS = np.array([[0.0, 0.0, 0.1173], [0.0, 0.7572, -0.4692], [0.0, -0.7572, -0.4692]])

_GEOMETRY_CACHE: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def rdkit_molecule(smiles: str) -> tuple[np.ndarray, np.ndarray]:
    """ETKDG + MMFF geometry with a fixed seed (deterministic)."""
    if smiles not in _GEOMETRY_CACHE:
        from rdkit import Chem
        from rdkit.Chem import AllChem

        mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
        params = AllChem.ETKDGv3()
        params.randomSeed = 0xABC
        assert AllChem.EmbedMolecule(mol, params) == 0
        AllChem.MMFFOptimizeMolecule(mol)
        z = np.array([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int64)
        _GEOMETRY_CACHE[smiles] = (z, mol.GetConformer().GetPositions())
    z, pos = _GEOMETRY_CACHE[smiles]
    return z.copy(), pos.copy()


def random_rotation(seed: int) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return Rotation.random(random_state=seed).as_matrix()


def share_of(result, z: np.ndarray, element: int) -> float:
    return float(result.coefficients[z == element].sum())


# ----------------------------------------------------------------------------------------
# single molecules
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("smiles", ["O", "CN", "CC(C)=O", "C=C", "c1ccccc1", "OCC(N)C#N"])
def test_shares_nonnegative_and_sum_to_one(smiles):
    z, pos = rdkit_molecule(smiles)
    res = compute_orbitals(z, pos, ("homo", "lumo", "homo-1", "lumo+1"))
    assert set(res) == {"homo", "lumo", "homo-1", "lumo+1"}
    for name, r in res.items():
        assert r.orbital == name and r.method == "gfn2-xtb"
        assert r.coefficients.shape == (len(z),) and r.coefficients.dtype == np.float64
        assert np.all(r.coefficients >= 0)
        assert r.coefficients.sum() == pytest.approx(1.0, abs=1e-12)
    # aufbau order of the energies
    assert res["homo-1"].energy_ev <= res["homo"].energy_ev < res["lumo"].energy_ev <= res["lumo+1"].energy_ev
    assert res["lumo"].orbital_index == res["homo"].orbital_index + 1


def test_orbital_coefficients_matches_compute_orbitals_and_accepts_torch():
    z, pos = rdkit_molecule("CC(C)=O")
    a = orbital_coefficients(z, pos, "lumo")
    b = orbital_coefficients(torch.as_tensor(z), torch.as_tensor(pos, dtype=torch.float32), "LUMO")
    c = compute_orbitals(z, pos, ("homo", "lumo"))["lumo"]
    assert a.orbital == b.orbital == "lumo"
    np.testing.assert_allclose(a.coefficients, c.coefficients, atol=1e-10)
    np.testing.assert_allclose(a.coefficients, b.coefficients, atol=1e-4)  # float32 positions


def test_mulliken_negative_share_is_clipped_and_renormalised():
    # two AOs on two atoms, overlap 0.5; c = (0.2, -x) normalised: atom 0's raw share is negative
    s = np.array([[1.0, 0.5], [0.5, 1.0]])
    x = (0.2 + np.sqrt(0.04 - 4 * (0.04 - 1))) / 2  # solves 0.04 + x^2 - 0.2 x = 1
    c = np.array([0.2, -x])
    assert c @ s @ c == pytest.approx(1.0)
    raw0 = c[0] * (s @ c)[0]
    assert raw0 < 0
    shares, clipped = mulliken_shares(c, s, np.array([0, 1]), 2)
    np.testing.assert_allclose(shares, [0.0, 1.0])
    assert clipped == pytest.approx(-raw0)
    # an unnormalised orbital is an error, not a silently renormalised answer
    with pytest.raises(OrbitalCalculationError):
        mulliken_shares(2 * c, s, np.array([0, 1]), 2)


def test_atom_permutation_permutes_shares():
    z, pos = rdkit_molecule("OCC(N)C#N")
    perm = np.random.default_rng(3).permutation(len(z))
    ref = compute_orbitals(z, pos)
    per = compute_orbitals(z[perm], pos[perm])
    for name in ("homo", "lumo"):
        np.testing.assert_allclose(per[name].coefficients, ref[name].coefficients[perm], atol=1e-6)
        assert per[name].energy_ev == pytest.approx(ref[name].energy_ev, abs=1e-6)


@pytest.mark.parametrize("smiles", ["CC(C)=O", "OCC(N)C#N"])
def test_rigid_motion_leaves_shares_unchanged(smiles):
    z, pos = rdkit_molecule(smiles)
    moved = (pos - pos.mean(0)) @ random_rotation(7).T + np.array([3.0, -11.0, 25.0])
    ref, new = compute_orbitals(z, pos), compute_orbitals(z, moved)
    for name in ("homo", "lumo"):
        np.testing.assert_allclose(new[name].coefficients, ref[name].coefficients, atol=1e-6)
        assert new[name].energy_ev == pytest.approx(ref[name].energy_ev, abs=1e-6)


def test_degenerate_homo_is_averaged_so_invariant():
    # exact Td methane: the HOMO is a triply degenerate t2 set, a single member of which would
    # depend on the orientation; the averaged shares are equal on the 4 H and orientation-free
    a = 1.087 / np.sqrt(3)
    pos = np.array([[0, 0, 0], [a, a, a], [-a, -a, a], [-a, a, -a], [a, -a, -a]])
    z = np.array([6, 1, 1, 1, 1])
    ref = orbital_coefficients(z, pos, "homo")
    assert ref.degeneracy == 3
    np.testing.assert_allclose(ref.coefficients[1:], ref.coefficients[1], atol=1e-6)
    for seed in (1, 2):
        rot = orbital_coefficients(z, pos @ random_rotation(seed).T, "homo")
        np.testing.assert_allclose(rot.coefficients, ref.coefficients, atol=1e-6)


@pytest.mark.parametrize("smiles", ["CN", "CN(C)C"])
def test_amine_homo_is_nitrogen_lone_pair(smiles):
    z, pos = rdkit_molecule(smiles)
    r = orbital_coefficients(z, pos, "homo")
    assert share_of(r, z, 7) > 0.6
    assert int(z[np.argmax(r.coefficients)]) == 7


@pytest.mark.parametrize("smiles", ["C=O", "CC(C)=O"])
def test_carbonyl_homo_is_oxygen_lone_pair(smiles):
    z, pos = rdkit_molecule(smiles)
    r = orbital_coefficients(z, pos, "homo")
    assert share_of(r, z, 8) > 0.5
    assert int(z[np.argmax(r.coefficients)]) == 8
    # the LUMO (pi*) is mostly on the carbonyl carbon, which is bonded to O
    lumo = orbital_coefficients(z, pos, "lumo")
    carbonyl_c = int(np.argmax(np.where(z == 6, lumo.coefficients, -1)))
    assert np.linalg.norm(pos[carbonyl_c] - pos[z == 8][0]) < 1.3


def test_ethylene_homo_is_pi_on_carbons():
    z, pos = rdkit_molecule("C=C")
    r = orbital_coefficients(z, pos, "homo")
    assert share_of(r, z, 6) > 0.95
    np.testing.assert_allclose(r.coefficients[z == 6], 0.5 * share_of(r, z, 6), atol=1e-3)


def test_water_homo_energy_in_gfn2_range():
    res = compute_orbitals(WATER_Z, WATER_POS)
    # GFN2-xTB: HOMO of water at about -12.2 eV (the 1b1 O lone pair), LUMO above 0
    assert -13.0 < res["homo"].energy_ev < -11.5
    assert res["lumo"].energy_ev > 0
    assert res["homo"].coefficients[0] > 0.99


def test_open_shell_uses_somo():
    # methyl radical (7 valence electrons): the "HOMO" is the singly occupied C 2p orbital
    z = np.array([6, 1, 1, 1])
    pos = np.array([[0, 0, 0], [1.08, 0, 0], [-0.54, 0.935, 0], [-0.54, -0.935, 0]])
    res = compute_orbitals(z, pos)
    assert res["homo"].orbital_index == 3 and res["homo"].coefficients[0] > 0.95
    assert res["lumo"].energy_ev > res["homo"].energy_ev
    with pytest.raises(ValueError, match="unpaired"):
        compute_orbitals(z, pos, uhf=0)
    cation = compute_orbitals(z, pos, charge=1)  # 6 electrons: the empty 2p is now the LUMO
    assert cation["lumo"].coefficients[0] > 0.95


def test_no_stdout_chatter(capfd):
    orbital_coefficients(WATER_Z, WATER_POS)
    with pytest.raises(OrbitalCalculationError):
        orbital_coefficients(WATER_Z, WATER_POS, max_iter=1)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_unconverged_scf_raises_dedicated_error():
    z, pos = rdkit_molecule("CC(C)=O")
    with pytest.raises(OrbitalCalculationError, match=r"GFN2-xTB for C3H6O.*not converged") as info:
        orbital_coefficients(z, pos, max_iter=1, name="acetone")
    assert isinstance(info.value, ValueError)
    assert "acetone" in str(info.value)


def test_tblite_failure_is_wrapped(monkeypatch):
    from tblite.exceptions import TBLiteRuntimeError
    from tblite.interface import Calculator

    def boom(self, *args, **kwargs):
        raise TBLiteRuntimeError("Electronic structure failed")

    monkeypatch.setattr(Calculator, "singlepoint", boom)
    with pytest.raises(OrbitalCalculationError, match="H2O.*Electronic structure failed"):
        orbital_coefficients(WATER_Z, WATER_POS)


@pytest.mark.parametrize(
    "z, pos, kwargs, match",
    [
        (np.array([87, 1]), np.array([[0, 0, 0], [2.0, 0, 0]]), {}, r"Z=\[87\].*1\.\.86"),
        (np.array([8, 1, 1]), np.zeros((2, 3)), {}, "shape"),
        (np.array([8, 1, 1]), WATER_POS.reshape(-1), {}, "shape"),
        (np.array([8, 1, 1]), np.where(np.eye(3, dtype=bool), np.nan, WATER_POS), {}, "NaN"),
        (np.zeros(0, dtype=int), np.zeros((0, 3)), {}, "zero atoms"),
        (np.array([8, 1, 1]), np.array([[0, 0, 0], [0, 0, 0.05], [0.9, 0, 0]]), {}, "overlap"),
        (np.array([8.5, 1, 1]), WATER_POS, {}, "integer"),
        (np.array([0, 1, 1]), WATER_POS, {}, ">= 1"),
        (WATER_Z, WATER_POS, {"method": "hf-xtb"}, "unknown method"),
        (WATER_Z, WATER_POS, {"orbital": "somo"}, "unknown orbital"),
        (WATER_Z, WATER_POS, {"orbital": "homo-9"}, "does not exist"),
        (WATER_Z, WATER_POS, {"charge": 0.5}, "integer"),
        (WATER_Z, WATER_POS, {"uhf": 1}, "unpaired"),
    ],
)
def test_bad_input_raises_value_error(z, pos, kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        orbital_coefficients(z, pos, **kwargs)
    assert not isinstance(info.value, OrbitalCalculationError)


def test_missing_pyscf_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyscf", None)  # makes `import pyscf` fail
    with pytest.raises(ImportError, match=r"abp\[dft\]"):
        orbital_coefficients(WATER_Z, WATER_POS, method="pyscf-sto-3g")


def test_pyscf_water_sto3g():
    pytest.importorskip("pyscf")
    r = orbital_coefficients(WATER_Z, WATER_POS, "homo", method="pyscf-sto-3g")
    assert r.method == "pyscf-sto-3g"
    assert r.coefficients.sum() == pytest.approx(1.0, abs=1e-12) and np.all(r.coefficients >= 0)
    assert r.coefficients[0] > 0.95
    assert r.energy_ev < 0
    with pytest.raises(OrbitalCalculationError, match="not converged"):
        orbital_coefficients(WATER_Z, WATER_POS, method="pyscf-sto-3g", max_iter=1)


# ----------------------------------------------------------------------------------------
# dataset labeller
# ----------------------------------------------------------------------------------------

LABEL_SMILES = ["O", "CN", "C=O", "C=C", "CC(C)=O", "CN(C)C", "OCC(N)C#N", "c1ccoc1", "CC#N", "NC=O"]


def make_data_list(smiles=LABEL_SMILES, idx=None):
    from torch_geometric.data import Data

    out = []
    for k, smi in enumerate(smiles):
        z, pos = rdkit_molecule(smi)
        i = k if idx is None else idx[k]
        out.append(
            Data(
                z=torch.as_tensor(z),
                pos=torch.as_tensor(pos, dtype=torch.float32),
                idx=torch.tensor(i, dtype=torch.long),
            )
        )
    return out


class CallCounter:
    def __init__(self, monkeypatch, fail_at=None):
        self.calls = 0
        self.fail_at = fail_at
        self._orig = orb._label_one
        monkeypatch.setattr(orb, "_label_one", self)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise KeyboardInterrupt  # simulates the user pressing Ctrl-C mid-run
        return self._orig(*args, **kwargs)


@pytest.fixture(scope="module")
def serial_labels(tmp_path_factory):
    path = tmp_path_factory.mktemp("labels") / "serial.npz"
    return label_orbitals(make_data_list(), path, num_workers=1, chunk_size=3, progress=False)


def assert_labels_equal(a: OrbitalLabels, b: OrbitalLabels, atol=1e-8):
    assert a.orbitals == b.orbitals and a.method == b.method
    np.testing.assert_array_equal(a.ptr, b.ptr)
    np.testing.assert_array_equal(a.z, b.z)
    np.testing.assert_array_equal(a.idx, b.idx)
    for o in a.orbitals:
        np.testing.assert_allclose(a.coeffs[o], b.coeffs[o], atol=atol)
        np.testing.assert_allclose(a.energies_ev[o], b.energies_ev[o], atol=atol)
    np.testing.assert_array_equal(a.failed, b.failed)


def test_labels_match_single_molecule_results(serial_labels):
    data = make_data_list()
    assert len(serial_labels) == len(data)
    assert serial_labels.fingerprint and len(serial_labels.failed) == 0
    for i in (0, 4, len(data) - 1):
        ref = compute_orbitals(data[i].z, data[i].pos)
        rec = serial_labels[i]
        np.testing.assert_allclose(rec["homo_coeff"], ref["homo"].coefficients, atol=1e-10)
        np.testing.assert_allclose(rec["lumo_coeff"], ref["lumo"].coefficients, atol=1e-10)
        assert rec["homo_energy_ev"] == pytest.approx(ref["homo"].energy_ev)
        assert serial_labels.lumo_energy_ev[i] == pytest.approx(ref["lumo"].energy_ev)
        np.testing.assert_array_equal(rec["z"], data[i].z.numpy())
    a, b = serial_labels.ptr[4], serial_labels.ptr[5]
    np.testing.assert_array_equal(serial_labels.homo_coeff[a:b], serial_labels[4]["homo_coeff"])
    assert np.all(np.diff(serial_labels.ptr) == [d.num_nodes for d in data])


def test_parallel_equals_serial(tmp_path, monkeypatch, serial_labels):
    counter = CallCounter(monkeypatch)  # counts calls in this process only
    par = label_orbitals(make_data_list(), tmp_path / "par.npz", num_workers=2, chunk_size=3, progress=False)
    assert counter.calls == 0  # every molecule was computed in the worker processes
    assert_labels_equal(par, serial_labels)


def test_tuples_accepted_and_finished_cache_loads_without_computing(tmp_path, monkeypatch):
    mols = [rdkit_molecule(s) for s in LABEL_SMILES[:4]]
    path = tmp_path / "t.npz"
    first = label_orbitals(mols, path, orbitals=("homo",), num_workers=1, progress=False)
    assert first.orbitals == ("homo",) and not hasattr(first, "lumo_coeff")
    assert path.exists() and not Path(str(path) + ".partial").exists()
    counter = CallCounter(monkeypatch)
    again = label_orbitals(mols, path, orbitals=("homo",), num_workers=1, progress=False)
    assert counter.calls == 0
    assert_labels_equal(again, first, atol=0)


def test_resume_after_max_chunks(tmp_path, monkeypatch, serial_labels):
    path = tmp_path / "r.npz"
    data = make_data_list()
    assert label_orbitals(data, path, num_workers=1, chunk_size=3, max_chunks=1, progress=False) is None
    assert not path.exists()
    assert len(list(Path(str(path) + ".partial").glob("chunk_*.npz"))) == 1
    counter = CallCounter(monkeypatch)
    labels = label_orbitals(data, path, num_workers=1, chunk_size=3, progress=False)
    assert counter.calls == len(data) - 3  # only the molecules of the unfinished chunks
    assert_labels_equal(labels, serial_labels)


def test_resume_after_interruption(tmp_path, monkeypatch, serial_labels):
    path = tmp_path / "i.npz"
    data = make_data_list()
    counter = CallCounter(monkeypatch, fail_at=3 + 3 + 2)  # dies inside the third chunk
    with pytest.raises(KeyboardInterrupt):
        label_orbitals(data, path, num_workers=1, chunk_size=3, progress=False)
    assert not path.exists()
    monkeypatch.undo()
    counter = CallCounter(monkeypatch)
    labels = label_orbitals(data, path, num_workers=1, chunk_size=3, progress=False)
    assert counter.calls == len(data) - 6
    assert_labels_equal(labels, serial_labels)


def test_cache_for_other_molecules_or_settings_is_refused(tmp_path, serial_labels):
    data = make_data_list()
    path = tmp_path / "c.npz"
    label_orbitals(data, path, num_workers=1, chunk_size=3, progress=False)
    moved = make_data_list()
    moved[2].pos = moved[2].pos + 0.01  # same atoms, different geometry
    with pytest.raises(OrbitalCacheMismatchError, match="fingerprint"):
        label_orbitals(moved, path, num_workers=1, chunk_size=3, progress=False)
    with pytest.raises(OrbitalCacheMismatchError, match="n_molecules"):
        label_orbitals(data[:-1], path, num_workers=1, progress=False)
    with pytest.raises(OrbitalCacheMismatchError, match="orbitals"):
        label_orbitals(data, path, orbitals=("homo",), num_workers=1, progress=False)
    with pytest.raises(OrbitalCacheMismatchError, match="options"):
        label_orbitals(data, path, num_workers=1, progress=False, electronic_temperature=1000.0)
    # a partial (interrupted) cache is checked too
    part = tmp_path / "p.npz"
    label_orbitals(data, part, num_workers=1, chunk_size=3, max_chunks=1, progress=False)
    with pytest.raises(OrbitalCacheMismatchError, match="fingerprint"):
        label_orbitals(moved, part, num_workers=1, chunk_size=3, progress=False)
    assert issubclass(OrbitalCacheMismatchError, ValueError)


def _truncate(path: Path) -> bytes:
    data = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(data)
    return data


def test_truncated_cache_is_set_aside_and_recomputed(tmp_path, monkeypatch, serial_labels):
    data = make_data_list()
    path = tmp_path / "t.npz"
    serial_labels.save(path)
    broken = _truncate(path)  # e.g. a partial copy from another machine
    with pytest.raises(orb.OrbitalCacheCorruptError, match=rf"{path} is not a readable orbital-label file"):
        OrbitalLabels.load(path)  # what AttachOrbitalLabels(path) reports too
    counter = CallCounter(monkeypatch)
    with pytest.warns(orb.OrbitalCacheWarning, match=rf"unreadable orbital-label cache file {path} .*kept as t\.npz\.corrupt"):
        labels = label_orbitals(data, path, num_workers=1, chunk_size=3, progress=False)
    assert counter.calls == len(data)
    assert_labels_equal(labels, serial_labels)
    assert (tmp_path / "t.npz.corrupt").read_bytes() == broken  # set aside, not deleted
    assert OrbitalLabels.load(path).fingerprint == serial_labels.fingerprint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.npz", "t.npz.corrupt"]  # no temporary files


def test_truncated_chunk_of_a_partial_cache_is_set_aside_and_recomputed(tmp_path, monkeypatch, serial_labels):
    data = make_data_list()
    path = tmp_path / "p.npz"
    assert label_orbitals(data, path, num_workers=1, chunk_size=3, max_chunks=2, progress=False) is None
    partial = Path(str(path) + ".partial")
    chunk = partial / "chunk_000001.npz"
    _truncate(chunk)
    counter = CallCounter(monkeypatch)
    with pytest.warns(orb.OrbitalCacheWarning, match=rf"{chunk} .*kept as chunk_000001\.npz\.corrupt"):
        labels = label_orbitals(data, path, num_workers=1, chunk_size=3, progress=False)
    assert counter.calls == len(data) - 3  # only chunk 0 was reused
    assert_labels_equal(labels, serial_labels)
    assert sorted(p.name for p in partial.iterdir()) == ["chunk_000001.npz.corrupt"]  # kept for inspection
    # an unreadable description of a partial cache: its chunks cannot be trusted, all are set aside
    other = tmp_path / "q.npz"
    label_orbitals(data, other, num_workers=1, chunk_size=3, max_chunks=1, progress=False)
    (Path(str(other) + ".partial") / "meta.json").write_text('{"format_version": 1, "meth')
    with pytest.warns(orb.OrbitalCacheWarning, match=r"partial cache .*kept as q\.npz\.partial\.corrupt"):
        labels = label_orbitals(data, other, num_workers=1, chunk_size=3, progress=False)
    assert_labels_equal(labels, serial_labels)
    assert (tmp_path / "q.npz.partial.corrupt" / "chunk_000000.npz").exists()


def test_failed_molecules_are_recorded_and_reported(tmp_path, serial_labels):
    data = make_data_list()
    data[5].pos = data[5].pos.clone()
    data[5].pos[1] = data[5].pos[0]  # two atoms on top of each other
    with pytest.warns(OrbitalLabelWarning, match=r"1 of 10 molecules.*#5"):
        labels = label_orbitals(data, tmp_path / "f.npz", num_workers=1, chunk_size=4, progress=False)
    assert labels.failed.tolist() == [5]
    assert "overlap" in labels.errors[0] and "molecule 5" in labels.errors[0]
    rec = labels[5]
    assert rec["failed"] and np.all(np.isnan(rec["homo_coeff"])) and np.isnan(rec["lumo_energy_ev"])
    ok = [i for i in range(len(data)) if i != 5]
    for i in ok:
        np.testing.assert_allclose(labels[i]["homo_coeff"], serial_labels[i]["homo_coeff"], atol=1e-8)
    # reloading the finished cache reports the failure again
    with pytest.warns(OrbitalLabelWarning):
        label_orbitals(data, tmp_path / "f.npz", num_workers=1, chunk_size=4, progress=False)


def test_save_load_roundtrip(tmp_path, serial_labels):
    serial_labels.save(tmp_path / "x.npz")
    back = OrbitalLabels.load(tmp_path / "x.npz")
    assert_labels_equal(back, serial_labels, atol=0)
    assert back.fingerprint == serial_labels.fingerprint and back.options == serial_labels.options
    assert back[-1]["idx"] == len(back) - 1
    with pytest.raises(IndexError):
        back[len(back)]


def test_unknown_option_rejected(tmp_path):
    with pytest.raises(TypeError, match="max_iters"):
        label_orbitals([(WATER_Z, WATER_POS)], tmp_path / "u.npz", max_iters=3, progress=False)


# ----------------------------------------------------------------------------------------
# PyG transform
# ----------------------------------------------------------------------------------------


def test_attach_orbital_labels(serial_labels):
    from torch_geometric.data import Batch
    from torch_geometric.transforms import BaseTransform

    from abp_core.orbitals import AttachOrbitalLabels

    data = make_data_list()
    t = AttachOrbitalLabels(serial_labels)
    assert isinstance(t, BaseTransform)
    for i in (7, 2, 0):  # any order: found by data.idx
        out = t(data[i])
        ref = compute_orbitals(data[i].z, data[i].pos)
        assert out.homo_coeff.dtype == torch.float32 and out.homo_coeff.shape == (data[i].num_nodes,)
        np.testing.assert_allclose(out.homo_coeff.numpy(), ref["homo"].coefficients, atol=1e-5)
        np.testing.assert_allclose(out.lumo_coeff.numpy(), ref["lumo"].coefficients, atol=1e-5)
        assert out.homo_xtb.shape == (1,) and out.homo_xtb.item() == pytest.approx(ref["homo"].energy_ev, abs=1e-4)
        assert out.lumo_xtb.item() == pytest.approx(ref["lumo"].energy_ev, abs=1e-4)
        assert not hasattr(data[i], "homo_coeff")  # the input Data is not modified
    batch = Batch.from_data_list([t(d) for d in data[:4]])
    assert batch.homo_xtb.shape == (4,) and batch.homo_coeff.shape == (batch.num_nodes,)
    # picklable (DataLoader workers under spawn), and the clone attaches the same labels
    clone = pickle.loads(pickle.dumps(t))
    assert type(clone) is AttachOrbitalLabels
    torch.testing.assert_close(clone(data[3]).lumo_coeff, t(data[3]).lumo_coeff)


def test_attach_uses_idx_of_subset_and_checks_atoms(tmp_path):
    from abp_core.orbitals import AttachOrbitalLabels

    idx = [10, 3, 42]
    data = make_data_list(LABEL_SMILES[:3], idx=idx)
    labels = label_orbitals(data, tmp_path / "s.npz", num_workers=1, progress=False)
    np.testing.assert_array_equal(labels.idx, idx)
    t = AttachOrbitalLabels(tmp_path / "s.npz")  # a path works too
    out = t(data[2])  # idx 42 -> row 2 (formaldehyde)
    np.testing.assert_allclose(out.homo_coeff.numpy(), labels[2]["homo_coeff"], atol=1e-6)
    other = make_data_list(["CN"], idx=[42])[0]  # same idx, different molecule / atom count
    with pytest.raises(ValueError, match="atoms"):
        t(other)
    with pytest.raises(ValueError, match="idx=5"):
        t(make_data_list(["C=O"], idx=[5])[0])
    no_idx = data[0].clone()
    del no_idx.idx
    with pytest.raises(ValueError, match="idx"):
        t(no_idx)


def test_attach_refuses_failed_molecule_unless_allowed(tmp_path):
    from abp_core.orbitals import AttachOrbitalLabels

    data = make_data_list(LABEL_SMILES[:2])
    data[1].pos = data[1].pos.clone()
    data[1].pos[1] = data[1].pos[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OrbitalLabelWarning)
        labels = label_orbitals(data, tmp_path / "x.npz", num_workers=1, progress=False)
    with pytest.raises(ValueError, match="failed"):
        AttachOrbitalLabels(labels)(data[1])
    out = AttachOrbitalLabels(labels, allow_failed=True)(data[1])
    assert torch.isnan(out.homo_coeff).all()
