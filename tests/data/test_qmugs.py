"""QMugs loader on fixtures in the release layout (summary.csv + structures/<chembl>/<conf>.sdf)."""
from __future__ import annotations

import logging

import pytest
import torch

import abp_data_fixtures as fx
from abp_core.data import DataFormatError, DataNotFoundError, UnitError, get_dataset
from abp_core.data.qmugs import TARGET_TAGS, QMugs


def _check_values(ds, expected, rows):
    for pos, row in enumerate(rows):
        chembl, conf, vals, n_atoms = expected[row]
        d = ds[pos]
        assert d.name == f"{chembl}/{conf}" and int(d.idx) == row and d.z.numel() == n_atoms
        for k, tag in enumerate(TARGET_TAGS):
            assert d.y[0, k].item() == pytest.approx(vals[tag], rel=1e-6, abs=1e-6), (row, tag)  # float32


def test_loads_directory_layout(tmp_path):
    info = fx.write_qmugs(tmp_path / "qmugs")
    ds = QMugs(root=tmp_path, download=False, progress=False)
    assert len(ds) == 4
    assert ds.target_names == TARGET_TAGS and set(ds.target_units) == {"Ha"}
    assert ds.target_index("dft_homo") == 3 and ds.target_index("DFT_TOTAL_ENERGY") == 5
    _check_values(ds, info["expected"], range(4))
    assert ds[0].smiles == "CC(=O)Nc1ccc(O)cc1"
    pos = ds[1].pos.double()
    d = torch.cdist(pos, pos) + torch.eye(len(pos)) * 10
    assert 0.9 < d.min() < 1.2  # Å


def test_streams_the_tar_archive_and_matches_directory(tmp_path):
    info = fx.write_qmugs(tmp_path / "a" / "qmugs", as_tar=True)
    fx.write_qmugs(tmp_path / "b" / "qmugs")
    from_tar = QMugs(root=tmp_path / "a", download=False, progress=False)
    from_dir = QMugs(root=tmp_path / "b", download=False, progress=False)
    assert not (tmp_path / "a" / "qmugs" / "structures").exists()
    _check_values(from_tar, info["expected"], range(4))
    assert torch.equal(from_tar._data.pos, from_dir._data.pos)


def test_missing_tag_falls_back_to_summary_csv(tmp_path):
    info = fx.write_qmugs(tmp_path / "qmugs", drop_tag=(2, "DFT:HOMO_ENERGY"))
    ds = QMugs(root=tmp_path, download=False, progress=False)
    _check_values(ds, info["expected"], range(4))


def test_missing_structure_is_skipped_and_logged(tmp_path, caplog):
    info = fx.write_qmugs(tmp_path / "qmugs", missing_structure=1)
    with caplog.at_level(logging.WARNING, logger="abp_core.data"):
        ds = QMugs(root=tmp_path, download=False, progress=False)
    assert len(ds) == 3
    _check_values(ds, info["expected"], [0, 2, 3])
    assert "qmugs: skipped 1 molecule(s) (1 without a structure file)" in caplog.text
    assert "CHEMBL1000/conf_01" in caplog.text


def test_atom_count_must_match_summary(tmp_path):
    fx.write_qmugs(tmp_path / "qmugs", wrong_atoms=3)
    with pytest.raises(DataFormatError, match="CHEMBL25/conf_01.*summary.csv says"):
        QMugs(root=tmp_path, download=False, progress=False)


def test_max_molecules(tmp_path):
    info = fx.write_qmugs(tmp_path / "qmugs")
    ds = get_dataset("qmugs", root=tmp_path, max_molecules=3, download=False, progress=False)
    assert len(ds) == 3
    _check_values(ds, info["expected"], range(3))


def test_no_network_names_summary_url(tmp_path, no_network):
    with pytest.raises(DataNotFoundError) as err:
        QMugs(root=tmp_path, progress=False)
    assert "libdrive.ethz.ch" in str(err.value) and str(tmp_path / "qmugs" / "summary.csv") in str(err.value)


def test_bohr_geometry_is_an_error(tmp_path):
    fx.write_qmugs(tmp_path / "qmugs")
    sdf = tmp_path / "qmugs" / "structures" / "CHEMBL25" / "conf_00.sdf"
    lines = sdf.read_text().split("\n")
    n_atoms = int(lines[3][:3])
    for k in range(4, 4 + n_atoms):
        x, y, z = (float(lines[k][c:c + 10]) / 0.529177210903 for c in (0, 10, 20))
        lines[k] = f"{x:10.4f}{y:10.4f}{z:10.4f}" + lines[k][30:]
    sdf.write_text("\n".join(lines))
    with pytest.raises(UnitError, match="CHEMBL25/conf_00"):
        QMugs(root=tmp_path, download=False, progress=False)
