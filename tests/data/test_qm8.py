"""QM8 loader on small fixtures written in the official qm8.sdf / qm8.sdf.csv format."""
from __future__ import annotations

import logging

import pytest
import torch

import abp_data_fixtures as fx
from abp_core.data import (ChecksumError, DataFormatError, DataNotFoundError, MissingTargetError, TooFewAtomsError,
                           UnitError)
from abp_core.data import qm8
from abp_core.data.qm8 import QM8


def test_loads_fixture_with_columns_by_position(tmp_path, patch_qm8_registry):
    info = fx.write_qm8(tmp_path / "qm8")
    patch_qm8_registry(info)
    ds = QM8(root=tmp_path, download=False)
    assert len(ds) == 5
    assert ds.target_names[8] == "E1-PBE0/def2TZVP" and ds.target_units[8] == "Ha"
    assert ds.target_units[ds.target_index("f1-CAM")] == "dimensionless"
    assert ds.target_index("E1-PBE0.1") == 8 and ds.target_index("E1-PBE0") == 4
    for i, (gdb, row) in enumerate(info["rows"].items()):
        d = ds[i]
        assert d.name == f"gdb_{gdb}" and int(d.idx) == i
        assert torch.allclose(d.y[0].double(), torch.tensor(row), atol=1e-6)
        mol = fx.embed(info["smiles"][gdb], seed=gdb)
        assert d.z.tolist() == [a.GetAtomicNum() for a in mol.GetAtoms()]  # hydrogens kept
        assert torch.allclose(d.pos.double(), torch.tensor(mol.GetConformer().GetPositions()), atol=1e-4)


def test_official_checksums_refuse_other_files(tmp_path):
    fx.write_qm8(tmp_path / "qm8")
    with pytest.raises(ChecksumError, match=r"qm8\.sdf"):
        QM8(root=tmp_path, download=False)


def test_extracts_the_official_archive(tmp_path, patch_qm8_registry):
    info = fx.write_qm8(tmp_path / "src")
    patch_qm8_registry(info)
    archive = fx.tar_gz_bytes({"qm8.sdf": info["sdf"].read_bytes(), "qm8.sdf.csv": info["csv"].read_bytes()})
    (tmp_path / "root" / "qm8").mkdir(parents=True)
    (tmp_path / "root" / "qm8" / "gdb8.tar.gz").write_bytes(archive)
    ds = QM8(root=tmp_path / "root", download=False)
    assert len(ds) == 5
    assert (tmp_path / "root" / "qm8" / "qm8.sdf").read_bytes() == info["sdf"].read_bytes()


def test_downloads_and_extracts(tmp_path, patch_qm8_registry, fake_server):
    served, requested = fake_server
    info = fx.write_qm8(tmp_path / "src")
    patch_qm8_registry(info)
    served[qm8.ARCHIVE.url] = fx.tar_gz_bytes({"qm8.sdf": info["sdf"].read_bytes(),
                                               "qm8.sdf.csv": info["csv"].read_bytes()})
    ds = QM8(root=tmp_path / "root", progress=False)
    assert len(ds) == 5 and requested == [qm8.ARCHIVE.url]


def test_no_network_error_names_archive_and_files(tmp_path, no_network):
    with pytest.raises(DataNotFoundError) as err:
        QM8(root=tmp_path, progress=False)
    msg = str(err.value)
    assert qm8.ARCHIVE.url in msg
    assert str(tmp_path / "qm8" / "gdb8.tar.gz") in msg
    assert str(tmp_path / "qm8" / "qm8.sdf") in msg and qm8.RAW_FILES["sdf"].sha256 in msg
    assert str(tmp_path / "qm8" / "qm8.sdf.csv") in msg and qm8.RAW_FILES["csv"].sha256 in msg


def test_nan_target_is_an_error_naming_molecule_and_target(tmp_path, patch_qm8_registry):
    rows = fx.qm8_rows()
    rows[57][13] = None
    info = fx.write_qm8(tmp_path / "qm8", rows=rows)
    patch_qm8_registry(info)
    with pytest.raises(MissingTargetError, match=r"gdb_57.*E2-CAM"):
        QM8(root=tmp_path, download=False)


def test_unreadable_record_is_skipped_and_logged(tmp_path, patch_qm8_registry, caplog):
    rows = fx.qm8_rows()
    rows[999] = rows[132]
    info = fx.write_qm8(tmp_path / "qm8", rows=rows, extra_block=fx.UNREADABLE_SDF_RECORD)
    patch_qm8_registry(info)
    with caplog.at_level(logging.WARNING, logger="abp_core.data"):
        ds = QM8(root=tmp_path, download=False)
    assert len(ds) == 5
    assert "qm8: skipped 1 molecule(s) (1 unreadable by RDKit)" in caplog.text and "gdb_999" in caplog.text
    assert ds.skipped == {"unreadable by RDKit": ["gdb_999 (record 5)"]}


def test_one_atom_molecule_is_an_error(tmp_path, patch_qm8_registry):
    smiles = dict(fx.QM8_SMILES)
    smiles[3] = "[Ne]"
    info = fx.write_qm8(tmp_path / "qm8", smiles=smiles)
    patch_qm8_registry(info)
    with pytest.raises(TooFewAtomsError, match="gdb_3"):
        QM8(root=tmp_path, download=False)


def test_bohr_coordinates_are_an_error(tmp_path, patch_qm8_registry):
    info = fx.write_qm8(tmp_path / "qm8", scale=1 / 0.529177210903)
    patch_qm8_registry(info)
    with pytest.raises(UnitError, match="gdb_1.*Bohr"):
        QM8(root=tmp_path, download=False)


def test_sdf_and_csv_must_have_the_same_length(tmp_path, patch_qm8_registry):
    info = fx.write_qm8(tmp_path / "qm8", drop_csv_rows=1)
    patch_qm8_registry(info)
    with pytest.raises(DataFormatError, match="5 records but qm8.sdf.csv 4 rows"):
        QM8(root=tmp_path, download=False)


def test_wrong_header_is_an_error(tmp_path, patch_qm8_registry):
    info = fx.write_qm8(tmp_path / "qm8")
    text = info["csv"].read_text().replace("gdb9_index,", "smiles,", 1)
    info["csv"].write_text(text)
    info.update(csv_sha=fx.sha256_of(info["csv"]), csv_size=info["csv"].stat().st_size)
    patch_qm8_registry(info)
    with pytest.raises(DataFormatError, match="gdb9_index"):
        QM8(root=tmp_path, download=False)


def test_misaligned_titles_are_rejected(tmp_path, patch_qm8_registry):
    rows = fx.qm8_rows()
    swapped = dict(zip([1, 3, 21, 132, 57], rows.values()))  # CSV rows 3 and 4 swapped relative to the SDF
    info = fx.write_qm8(tmp_path / "qm8", rows=swapped)
    patch_qm8_registry(info)
    with pytest.raises(DataFormatError, match="misaligned.*gdb_57 but CSV row 3 is gdb_132"):
        QM8(root=tmp_path, download=False)
