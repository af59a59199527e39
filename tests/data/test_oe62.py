"""OE62: df_62k.json and Chen et al.'s ASE db on fixtures, the paper's split files for real."""
from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch

import abp_data_fixtures as fx
from abp_core.data import (ChecksumError, DataFormatError, MissingTargetError, UnitError, UnknownElementError,
                           get_dataset)
from abp_core.data.oe62 import OE62, SPLIT_SHA256, paper_split, parse_xyz

MOLS = [("ABECAL", "c1ccccc1O"), ("BAFMEQ", "CC(=O)Nc1ccccc1"), ("CUKJEW", "O=C1C=CC(=O)C=C1"),
        ("DIVHOV", "Cc1ccc(cc1)S(=O)(=O)N"), ("EBIBUV", "c1ccc2ccccc2c1")]


def _rows(overrides=None):
    rows = [fx.oe62_row(ref, smi, seed=10 + k) for k, (ref, smi) in enumerate(MOLS)]
    for k, kw in (overrides or {}).items():
        ref, smi = MOLS[k]
        rows[k] = fx.oe62_row(ref, smi, seed=10 + k, **kw)
    return rows


def test_json_homo_is_last_occupied_and_lumo_first_unoccupied(tmp_path):
    rows = _rows()
    fx.write_oe62_json(tmp_path / "oe62", rows)
    ds = OE62(root=tmp_path, download=False, progress=False)
    assert len(ds) == 5
    assert ds.target_names == ["homo_pbe0_vac_tier2", "lumo_pbe0_vac_tier2"]
    assert ds.target_units == ["eV", "eV"]
    for i, row in enumerate(rows):
        d = ds[i]
        assert d.name == row["refcode_csd"] and d.smiles == row["canonical_smiles"] and int(d.idx) == i
        assert d.y[0, 0].item() == pytest.approx(row["energies_occ_pbe0_vac_tier2"][-1], abs=1e-5)
        assert d.y[0, 1].item() == pytest.approx(row["energies_unocc_pbe0_vac_tier2"][0], abs=1e-5)
        symbols, pos = parse_xyz(row["xyz_pbe_relaxed"], row["refcode_csd"])
        assert torch.allclose(d.pos.double(), torch.tensor(pos), atol=1e-5)
        assert len(symbols) == d.z.numel()


def test_missing_level_is_skipped_and_counted(tmp_path, caplog):
    rows = _rows({1: dict(drop_tier2=True), 3: dict(empty_unocc=True)})
    fx.write_oe62_json(tmp_path / "oe62", rows)
    with caplog.at_level(logging.WARNING, logger="abp_core.data"):
        ds = OE62(root=tmp_path, download=False, progress=False)
    assert [d.name for d in ds] == ["ABECAL", "CUKJEW", "EBIBUV"]
    assert [int(d.idx) for d in ds] == [0, 2, 4]  # idx stays the row of df_62k.json
    assert "oe62: skipped 2 molecule(s) (2 lacking a requested level), kept 3" in caplog.text
    assert "BAFMEQ" in caplog.text and "DIVHOV" in caplog.text
    with pytest.raises(MissingTargetError, match=r"BAFMEQ.*homo_pbe0_vac_tier2"):
        OE62(root=tmp_path, download=False, progress=False, missing="error")


def test_several_levels(tmp_path, caplog):
    rows = _rows({0: dict(full=False), 2: dict(full=False)})  # rows 0 and 2 lack the GW/TZVP/QZVP levels
    fx.write_oe62_json(tmp_path / "oe62", rows)
    ds = OE62(root=tmp_path, download=False, progress=False, levels=["pbe", "pbe0_water"])
    assert len(ds) == 5 and ds.target_names == ["homo_pbe", "lumo_pbe", "homo_pbe0_water", "lumo_pbe0_water"]
    assert ds[4].y[0, 2].item() == pytest.approx(rows[4]["energies_occ_pbe0_water"][-1], abs=1e-5)
    with caplog.at_level(logging.WARNING, logger="abp_core.data"):
        full = OE62(root=tmp_path, download=False, progress=False, levels="all")
    assert [d.name for d in full] == ["BAFMEQ", "DIVHOV", "EBIBUV"] and full.num_targets == 16
    assert full.target_names[10] == "homo_gw_cbs"
    assert full[0].y[0, 11].item() == pytest.approx(rows[1]["cbs_unocc_gw"][0], abs=1e-5)
    assert "skipped 2" in caplog.text
    with pytest.raises(ValueError, match="unknown level"):
        OE62(root=tmp_path, levels=["b3lyp"])


def test_unknown_element_is_an_error(tmp_path):
    mol = fx.embed("CCO", seed=1)
    syms = [a.GetSymbol() for a in mol.GetAtoms()]
    syms[1] = "Qq"
    rows = _rows({2: dict(xyz=fx.xyz_string(mol, symbols=syms))})
    fx.write_oe62_json(tmp_path / "oe62", rows)
    with pytest.raises(UnknownElementError, match=r"CUKJEW \(row 2\).*'Qq'"):
        OE62(root=tmp_path, download=False, progress=False)


def test_single_atom_entry_is_skipped_and_logged(tmp_path, caplog):
    rows = _rows({4: dict(xyz="1\n\nXe 0.0 0.0 0.0\n")})
    fx.write_oe62_json(tmp_path / "oe62", rows)
    with caplog.at_level(logging.WARNING, logger="abp_core.data"):
        ds = OE62(root=tmp_path, download=False, progress=False)
    assert len(ds) == 4 and "1 with fewer than 2 atoms" in caplog.text and "EBIBUV" in caplog.text


def test_bohr_xyz_is_an_error(tmp_path):
    mol = fx.embed("c1ccccc1O", seed=10)
    rows = _rows({0: dict(xyz=fx.xyz_string(mol, scale=1 / 0.529177210903))})
    fx.write_oe62_json(tmp_path / "oe62", rows)
    with pytest.raises(UnitError, match="ABECAL"):
        OE62(root=tmp_path, download=False, progress=False)


def test_not_a_split_json_is_reported(tmp_path):
    (tmp_path / "oe62").mkdir()
    (tmp_path / "oe62" / "df_62k.json").write_text('{"records": 1}')
    with pytest.raises(DataFormatError, match="df_62k.json"):
        OE62(root=tmp_path, download=False, progress=False)


def test_no_network_names_mediatum_file(tmp_path, no_network):
    from abp_core.data import DataNotFoundError

    with pytest.raises(DataNotFoundError) as err:
        OE62(root=tmp_path, progress=False)
    assert "dataserv.ub.tum.de/s/m1507656" in str(err.value)
    assert str(tmp_path / "oe62" / "df_62k.json") in str(err.value)


# --- Chen et al.'s ASE db ----------------------------------------------------------------------------
DB_MOLS = [("c1ccccc1O", 1), ("CC(=O)Nc1ccccc1", 2), ("O=C1C=CC(=O)C=C1", 3)]


def test_db_exposes_homo_coeff_per_atom(tmp_path):
    import ase.db

    path = fx.write_oe62_db(tmp_path / "oe62", DB_MOLS)
    ds = get_dataset("oe62", root=tmp_path, source="db", download=False)
    assert len(ds) == 3 and ds.target_names == ["HOMO", "LUMO"] and ds.target_units == ["eV", "eV"]
    with ase.db.connect(str(path)) as db:
        for i, row in enumerate(db.select(sort="id")):
            d = ds[i]
            assert int(d.idx) == row.id - 1
            assert d.z.tolist() == row.numbers.tolist()
            assert torch.allclose(d.homo_coeff.double(), torch.tensor(row.data["coeff"]), atol=1e-6)
            assert d.y[0].tolist() == pytest.approx([row.data["HOMO"][0], row.data["LUMO"][0]], abs=1e-5)
            assert d.homo_coeff.shape == d.z.shape


def test_db_without_coeff_is_an_error(tmp_path):
    fx.write_oe62_db(tmp_path / "oe62", DB_MOLS, drop_coeff_at=1)
    with pytest.raises(DataFormatError, match=r"db id 2.*coeff"):
        OE62(root=tmp_path, source="db", download=False)


def test_missing_db_says_where_to_put_it(tmp_path, no_network):
    from abp_core.data import DataNotFoundError

    with pytest.raises(DataNotFoundError, match=str(tmp_path / "oe62" / "dataset_OE62_all.db")):
        OE62(root=tmp_path, source="db")
    assert no_network == []


# --- the paper's split files (real) -------------------------------------------------------------------
@pytest.mark.parametrize("i", range(5))
def test_paper_splits(shared_root, i):
    train, val, test = paper_split(i, shared_root, allow_download=False)
    assert (len(train), len(val), len(test)) == (32000, 19480, 10000)
    assert len(np.unique(np.concatenate([train, val, test]))) == 61480
    assert min(train.min(), val.min(), test.min()) == 0 and max(train.max(), val.max(), test.max()) == 61479


def test_paper_splits_differ_and_hashes_match_sha256sums(shared_root):
    published = dict(line.split()[::-1] for line in (shared_root / "oe62_splits" / "SHA256SUMS").read_text().splitlines()
                     if line.strip())
    assert {int(k.rsplit("_", 1)[1][:-4]): v for k, v in published.items()} == SPLIT_SHA256
    assert not np.array_equal(paper_split(0, shared_root)[2], paper_split(1, shared_root)[2])


def test_tampered_split_file_is_refused(shared_root, tmp_path):
    (tmp_path / "oe62_splits").mkdir()
    target = tmp_path / "oe62_splits" / "split_32000_19480_10000_3.npz"
    shutil.copy(shared_root / "oe62_splits" / target.name, target)
    with open(target, "r+b") as f:
        f.seek(5000)
        byte = f.read(1)
        f.seek(5000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ChecksumError, match=str(target)):
        paper_split(3, tmp_path, allow_download=False)


def test_paper_split_needs_the_db(tmp_path, shared_root, monkeypatch):
    fx.write_oe62_json(tmp_path / "oe62", _rows())
    with pytest.raises(ValueError, match="source='db'"):
        OE62(root=tmp_path, download=False, progress=False).paper_split(0)
    fx.write_oe62_db(tmp_path / "oe62", DB_MOLS)
    shutil.copytree(shared_root / "oe62_splits", tmp_path / "oe62_splits")
    with pytest.raises(DataFormatError, match="the db has 3 rows"):
        OE62(root=tmp_path, source="db", download=False).paper_split(0)
