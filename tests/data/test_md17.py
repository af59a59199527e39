"""MD17 CCSD(T) loader on sGDML-format fixtures (<stem>.zip with <stem>-train/test.npz)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import abp_data_fixtures as fx
from abp_core.data import DataFormatError, DataNotFoundError, UnitError, UnknownElementError, get_dataset
from abp_core.data.md17 import MD17, resolve_molecule


def test_loads_official_zip_layout(tmp_path):
    fx.write_md17_zip(tmp_path / "md17")
    ds = MD17(root=tmp_path, molecule="ethanol", download=False)
    assert len(ds) == 11 and ds.meta["n_train"] == 6 and ds.meta["n_test"] == 5
    assert ds.target_names == ["energy"] and ds.target_units == ["kcal/mol"]
    train = fx.md17_arrays(6, 1)
    test = fx.md17_arrays(5, 2)
    for i in range(11):
        src, j = (train, i) if i < 6 else (test, i - 6)
        d = ds[i]
        assert int(d.idx) == i and d.name == f"ethanol_ccsd_t-{'train' if i < 6 else 'test'}[{j}]"
        assert d.z.tolist() == src["z"].astype(int).tolist()
        assert torch.allclose(d.pos.double(), torch.tensor(src["R"][j]), atol=1e-5)
        assert d.y.shape == (1, 1) and d.y.item() == pytest.approx(float(src["E"][j, 0]), abs=0.01)
        assert torch.allclose(d.force.double(), torch.tensor(src["F"][j]), atol=1e-4)
    # the extracted npz files now sit beside the zip, so a second dataset needs no archive
    assert (tmp_path / "md17" / "ethanol_ccsd_t-test.npz").is_file()


def test_paper_split_is_torch_random_split_seed_42(tmp_path):
    fx.write_md17_zip(tmp_path / "md17")
    ds = get_dataset("md17", root=tmp_path, molecule="ethanol CCSD(T)", download=False)
    train, val, test = ds.paper_split()
    assert train.tolist() == list(range(6))
    ref_val, ref_test = torch.utils.data.random_split(list(range(5)), [2, 3],
                                                      generator=torch.Generator().manual_seed(42))
    assert val.tolist() == [6 + i for i in ref_val.indices]
    assert test.tolist() == [6 + i for i in ref_test.indices]
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(11))


def test_npz_with_pickled_payload_is_refused(tmp_path):
    fx.write_md17_zip(tmp_path / "md17", pickled=True)
    ds = MD17(root=tmp_path, molecule="ethanol", download=False)  # unused pickled keys are never read
    assert len(ds) == 11
    bad = tmp_path / "bad"
    zpath = fx.write_md17_zip(bad / "md17")
    import io
    import zipfile

    buf = io.BytesIO()
    np.savez(buf, z=np.array([{"a": 1}], dtype=object), R=np.zeros((1, 1, 3)), E=np.zeros(1), F=np.zeros((1, 1, 3)))
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("ethanol_ccsd_t-train.npz", buf.getvalue())
        zf.writestr("ethanol_ccsd_t-test.npz", buf.getvalue())
    with pytest.raises(DataFormatError, match="not a plain sGDML npz"):
        MD17(root=bad, molecule="ethanol", download=False)


def test_unknown_element_and_bohr_are_errors(tmp_path):
    z = fx.md17_arrays(1, 1)["z"].astype(np.int64)
    z[0] = 0
    fx.write_md17_zip(tmp_path / "a" / "md17", z_override=z)
    with pytest.raises(UnknownElementError, match=r"ethanol_ccsd_t-train\[0\].*\[0\]"):
        MD17(root=tmp_path / "a", molecule="ethanol", download=False)
    fx.write_md17_zip(tmp_path / "b" / "md17", scale=1 / 0.529177210903)
    with pytest.raises(UnitError, match="Bohr"):
        MD17(root=tmp_path / "b", molecule="ethanol", download=False)


def test_no_network_error_names_zip_url_and_path(tmp_path, no_network):
    with pytest.raises(DataNotFoundError) as err:
        MD17(root=tmp_path, molecule="toluene", progress=False)
    msg = str(err.value)
    assert "http://www.quantum-machine.org/gdml/data/npz/toluene_ccsd_t.zip" in msg
    assert str(tmp_path / "md17" / "toluene_ccsd_t.zip") in msg
    assert "toluene_ccsd_t-train.npz" in msg


def test_broken_zip_is_reported(tmp_path):
    (tmp_path / "md17").mkdir()
    (tmp_path / "md17" / "aspirin_ccsd.zip").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataFormatError, match="aspirin_ccsd.zip"):
        MD17(root=tmp_path, molecule="aspirin", download=False)


def test_molecule_names():
    assert resolve_molecule("Aspirin CCSD") == "aspirin"
    assert resolve_molecule("benzene_ccsd_t") == "benzene"
    with pytest.raises(ValueError, match="unknown molecule"):
        resolve_molecule("uracil")
