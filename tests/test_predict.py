"""Predicting new molecules from a checkpoint: SDF and multi-frame XYZ with bad molecules among good ones."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from rdkit import Chem
from rdkit.Chem import AllChem

from abp_core.cli import main
from abp_core.config import Config
from abp_core.predict import PredictionWarning, predict, predict_file, read_molecules
from abp_core.train import CheckpointError, load_task, run_training

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
TARGET = "Highest occupied molecular orbital (PBE0)"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("predict_runs")
    cfg = Config.from_dict({
        "data": {"dataset": "qm7b", "targets": ["homo_PBE0"], "subset": 120, "root": str(SHARED_DATA)},
        "model": {"readout": "abp", "readout_hparams": {"heads": 2},
                  "backbone_hparams": {"hidden_channels": 16, "num_filters": 16, "num_interactions": 1,
                                       "num_gaussians": 16, "cutoff": 5.0}},
        "trainer": {"max_epochs": 1, "batch_size": 32, "lr": 1e-3, "output_dir": str(out), "progress_bar": False}})
    res = run_training(cfg)
    return res.run_dir / "best.ckpt"


def _mol(smiles, name, mode="3d"):
    m = Chem.AddHs(Chem.MolFromSmiles(smiles)) if mode != "heavy" else Chem.MolFromSmiles(smiles)
    if mode == "2d":
        AllChem.Compute2DCoords(m)
    else:
        assert AllChem.EmbedMolecule(m, randomSeed=7) == 0
    m.SetProp("_Name", name)
    return m


@pytest.fixture()
def sdf(tmp_path):
    path = tmp_path / "mols.sdf"
    w = Chem.SDWriter(str(path))
    for smi, name, mode in [("CCO", "ethanol", "3d"), ("CBr", "bromomethane", "3d"), ("Oc1ccccc1", "phenol-2d", "2d"),
                            ("CC(=O)N", "acetamide", "3d"), ("CCN", "ethylamine-no-H", "heavy")]:
        w.write(_mol(smi, name, mode))
    w.close()
    with open(path, "a") as f:  # a broken record between good ones
        f.write("broken\n  junk\n\n  2  1  0  0  0  0  0  0  0  0999 V2000\nthis is not a mol block\n$$$$\n")
    w = Chem.SDWriter(str(tmp_path / "tail.sdf"))
    w.write(_mol("CS", "methanethiol", "3d"))
    w.close()
    path.write_text(path.read_text() + (tmp_path / "tail.sdf").read_text())
    return path


def test_sdf_with_bad_molecules(checkpoint, sdf):
    with pytest.warns(PredictionWarning) as record:
        res = predict(checkpoint, sdf)
    messages = " | ".join(str(w.message) for w in record)
    for name in ("bromomethane", "phenol-2d", "ethylamine-no-H"):
        assert name in messages
    p = res.predictions.set_index("name")
    assert p.loc["ethanol", "status"] == "ok" and p.loc["acetamide", "status"] == "ok"
    assert p.loc["methanethiol", "status"] == "ok"  # after the broken record: still read
    assert p.loc["bromomethane", "status"] == "unknown_element" and "Br" in p.loc["bromomethane", "message"]
    assert p.loc["phenol-2d", "status"] == "no_3d"
    assert p.loc["ethylamine-no-H", "status"] == "implicit_hydrogens"
    assert (res.predictions["status"] == "unreadable").sum() == 1
    col = f"{TARGET} [Ha]"
    ok = res.predictions["status"] == "ok"
    assert res.predictions.loc[ok, col].notna().all() and res.predictions.loc[~ok, col].isna().all()
    assert p.loc["ethanol", "formula"] == "C2H6O" and p.loc["ethanol", "n_atoms"] == 9
    # HOMO energies in Hartree: the standardiser from the checkpoint puts them on the physical scale
    assert (res.predictions.loc[ok, col].between(-0.6, 0.0)).all()
    # per-atom ABP weights: one row per atom of every predicted molecule, summing to 1 per molecule
    w = res.atom_weights
    assert set(w["name"]) == {"ethanol", "acetamide", "methanethiol"}
    assert w.groupby("molecule")["weight"].sum().to_numpy() == pytest.approx(1.0, abs=1e-5)
    eth = w[w["name"] == "ethanol"]
    assert eth["atom_index"].tolist() == list(range(9)) and eth["element"].tolist()[:3] == ["C", "C", "O"]


def test_predictions_match_the_model_and_standardiser(checkpoint, sdf):
    from torch_geometric.data import Batch, Data

    with pytest.warns(PredictionWarning):
        res = predict(checkpoint, sdf)
    task = load_task(checkpoint)
    mol = next(m for m in read_molecules(sdf) if m.name == "acetamide")
    batch = Batch.from_data_list([Data(z=torch.as_tensor(mol.z), pos=torch.as_tensor(mol.pos, dtype=torch.float32))])
    raw = task.model(batch).item()  # standardised output
    mean, std = task.hparams["target_mean"][0], task.hparams["target_std"][0]
    got = res.predictions.set_index("name").loc["acetamide", f"{TARGET} [Ha]"]
    assert got == pytest.approx(raw * std + mean, rel=1e-5)
    assert task.hparams["train_elements"] == [1, 6, 7, 8, 16, 17] or set(task.hparams["train_elements"]) <= {
        1, 6, 7, 8, 16, 17}
    atoms = res.atom_weights[res.atom_weights["name"] == "acetamide"]["weight"].to_numpy()
    with torch.no_grad():
        assert atoms == pytest.approx(task.model.atom_weights(batch).numpy(), abs=1e-6)


def test_multiframe_xyz_and_cli(checkpoint, tmp_path, capsys, monkeypatch):
    xyz = tmp_path / "frames.xyz"
    m = Chem.AddHs(Chem.MolFromSmiles("CCO"))
    AllChem.Compute2DCoords(m)  # a depiction: z = 0 and every bond (C-H too) 1.5 Å long
    depiction = Chem.MolToXYZBlock(m).splitlines()
    depiction[1] = "ethanol drawing"
    xyz.write_text(
        "3\nwater\nO 0.000 0.000 0.117\nH 0.000 0.757 -0.469\nH 0.000 -0.757 -0.469\n"
        "2\nnonsense element\nXx 0 0 0\nH 0 0 1.0\n"
        "3\nplanar water\nO 0.0 0.0 0.0\nH 0.757 0.586 0.0\nH -0.757 0.586 0.0\n"
        + "\n".join(depiction) + "\n"
        "5\nmethane\nC 0.000 0.000 0.000\nH 0.629 0.629 0.629\nH -0.629 -0.629 0.629\n"
        "H -0.629 0.629 -0.629\nH 0.629 -0.629 -0.629\n")
    out = tmp_path / "preds.csv"
    monkeypatch.setitem(sys.modules, "abp_core.viz", None)  # viz missing: --views is skipped with a message
    code = main(["predict", str(checkpoint), str(xyz), "--out", str(out), "--views", str(tmp_path / "views")])
    captured = capsys.readouterr()
    assert code == 0
    assert "predicted 3/5 molecules" in captured.out
    assert "'nonsense element' not predicted (unreadable)" in captured.err and "Xx" in captured.err
    assert "'ethanol drawing' not predicted (no_3d)" in captured.err
    assert "--views skipped: abp_core.viz" in captured.err
    p = pd.read_csv(out)
    assert p["status"].tolist() == ["ok", "unreadable", "ok", "no_3d", "ok"]  # a planar molecule is 3D-valid
    assert p["name"].tolist() == ["water", "nonsense element", "planar water", "ethanol drawing", "methane"]
    w = pd.read_csv(tmp_path / "preds_atom_weights.csv")
    assert w.groupby("name").size().to_dict() == {"methane": 5, "planar water": 3, "water": 3}
    assert not (tmp_path / "views").exists()


def test_views_with_viz(checkpoint, tmp_path):
    pytest.importorskip("abp_core.viz")
    xyz = tmp_path / "one.xyz"
    xyz.write_text("3\nwater\nO 0.000 0.000 0.117\nH 0.000 0.757 -0.469\nH 0.000 -0.757 -0.469\n")
    res = predict_file(checkpoint, xyz, out=tmp_path / "p.csv", views=tmp_path / "views")
    assert [v.name for v in res.views] == ["00000_water.html"]
    assert "<html" in res.views[0].read_text().lower()


def test_bad_inputs(checkpoint, tmp_path, capsys):
    with pytest.raises(FileNotFoundError):
        read_molecules(tmp_path / "none.sdf")
    (tmp_path / "m.pdb").write_text("x")
    with pytest.raises(ValueError, match="unsupported molecule format"):
        read_molecules(tmp_path / "m.pdb")
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="is not a readable abp checkpoint"):
        load_task(junk)
    xyz = tmp_path / "w.xyz"
    xyz.write_text("3\nwater\nO 0.000 0.000 0.117\nH 0.000 0.757 -0.469\nH 0.000 -0.757 -0.469\n")
    assert main(["predict", str(junk), str(xyz)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("abp: error: ") and "not a readable abp checkpoint" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------
# Molecules from SMILES (abp_core.conformers) and the per-molecule report
# ------------------------------------------------------------------------------------------------
def test_smiles_parsing_and_conformer_failures():
    from abp_core.conformers import from_smiles

    mols = from_smiles(["CC(=O)C", "xyz(", "", "C1#CC1", "C1C[C@H]2C[C@@H]2C1", "[NH4+]", "[CH3]", "C" * 12],
                       names=["acetone", "bad", "empty", "cyclopropyne", "trans-fused", "ammonium", "methyl",
                              "dodecane"], max_heavy_atoms=10)
    status = {m.name: m.status for m in mols}
    assert status == {"acetone": "ok", "bad": "invalid_smiles", "empty": "invalid_smiles",
                      "cyclopropyne": "embedding_failed", "trans-fused": "embedding_failed", "ammonium": "charged",
                      "methyl": "radical", "dodecane": "too_large"}
    acetone = mols[0]
    assert acetone.z.tolist() == [6, 6, 8, 6] + [1] * 6 and acetone.pos.shape == (10, 3)
    assert acetone.geometry == "ETKDGv3+MMFF94" and acetone.smiles == "CC(=O)C"
    assert np.linalg.norm(acetone.pos[1] - acetone.pos[2]) == pytest.approx(1.22, abs=0.03)  # C=O (MMFF94)
    assert "net charge +1" in mols[5].message and "1 unpaired electron" in mols[6].message
    assert "12 heavy atoms" in mols[7].message and mols[7].pos is None  # refused before any embedding
    again = from_smiles(["CC(=O)C"])[0]
    assert np.array_equal(again.pos, acetone.pos)  # seeded: the same SMILES gives the same geometry
    raw = from_smiles(["CC(=O)C"], optimize="none")[0]
    assert raw.geometry == "ETKDGv3" and not np.allclose(raw.pos, acetone.pos, atol=1e-3)
    with pytest.raises(ValueError, match="optimize must be one of"):
        from_smiles(["C"], optimize="dft")


def test_xtb_geometry_is_closer_to_dft():
    from abp_core.conformers import from_smiles

    mmff, xtb = from_smiles(["CO"])[0], from_smiles(["CO"], optimize="xtb")[0]
    assert xtb.status == "ok" and xtb.geometry == "ETKDGv3+MMFF94+GFN2-xTB"
    assert not np.allclose(xtb.pos, mmff.pos, atol=1e-3)
    # methanol, B3LYP: C-O 1.42 Å, O-H 0.96 Å (QM9 molecule 5); GFN2-xTB lands within ~0.02 Å
    assert np.linalg.norm(xtb.pos[0] - xtb.pos[1]) == pytest.approx(1.42, abs=0.03)
    assert np.linalg.norm(xtb.pos[1] - xtb.pos[5]) == pytest.approx(0.96, abs=0.03)


def test_smi_and_csv_files_and_the_geometry_written_beside(checkpoint, tmp_path):
    smi = tmp_path / "mine.smi"
    smi.write_text("# my molecules\nCCO ethanol\n\nCC(=O)N acetamide\nnot-a-smiles broken one\nCBr\n")
    out = tmp_path / "p.csv"
    res = predict_file(checkpoint, smi, out=out)
    p = pd.read_csv(out)
    assert p["name"].tolist() == ["ethanol", "acetamide", "broken one", "CBr"]
    assert p["status"].tolist() == ["ok", "ok", "invalid_smiles", "unknown_element"]
    assert p["smiles"].tolist() == ["CCO", "CC(=O)N", "not-a-smiles", "CBr"]
    assert res.geometries_path == tmp_path / "p_geometries.sdf"
    # the geometry written is the one predicted: reading it back gives the same predictions
    back = read_molecules(res.geometries_path)
    assert [m.name for m in back] == ["ethanol", "acetamide", "CBr"]
    with pytest.warns(PredictionWarning, match="CBr"):
        again = predict(checkpoint, back)
    col = f"{TARGET} [Ha]"
    assert again.predictions[col].to_numpy()[:2] == pytest.approx(p[col].to_numpy()[:2], abs=1e-6)
    csv = tmp_path / "mine.csv"
    csv.write_text("ID,SMILES,other\nm1,CCO,x\nm2,c1ccccc1O,y\n")
    res = predict(checkpoint, csv)
    assert res.predictions["name"].tolist() == ["m1", "m2"] and (res.predictions["status"] == "ok").all()
    (tmp_path / "nosmiles.csv").write_text("name,structure\na,CCO\n")
    with pytest.raises(ValueError, match="no 'smiles' column \\(columns: name, structure\\)"):
        predict(checkpoint, tmp_path / "nosmiles.csv")


def test_per_molecule_error_report(checkpoint, tmp_path, capsys):
    xyz = tmp_path / "no.xyz"  # nitric oxide: 15 electrons, a radical in a file without charges
    xyz.write_text("2\nnitric oxide\nN 0 0 0\nO 0 0 1.15\n")
    smiles = ["CCO", "C(", "[O-]C(=O)C", "[CH2]C", "FC(F)(F)F", "C1#CC1", "OCCS"]
    code = main(["predict", str(checkpoint), str(xyz), "--smiles", *smiles, "--out", str(tmp_path / "r.csv")])
    err = capsys.readouterr().err
    assert code == 0
    p = pd.read_csv(tmp_path / "r.csv").set_index("name")
    assert p["status"].to_dict() == {"nitric oxide": "radical", "CCO": "ok", "C(": "invalid_smiles",
                                     "[O-]C(=O)C": "charged", "[CH2]C": "radical", "FC(F)(F)F": "unknown_element",
                                     "C1#CC1": "embedding_failed", "OCCS": "ok"}
    assert "6 molecule(s) not predicted (the others were)" in err
    for name, reason in [("nitric oxide", "radical"), ("C(", "invalid_smiles"), ("[O-]C(=O)C", "charged"),
                         ("FC(F)(F)F", "unknown_element"), ("C1#CC1", "embedding_failed")]:
        assert f"molecule {name!r} not predicted ({reason})" in err
    assert p.loc["OCCS", f"{TARGET} [Ha]"] < 0 and np.isnan(p.loc["C(", f"{TARGET} [Ha]"])
    assert main(["predict", str(checkpoint)]) == 2  # neither a file nor --smiles
    assert "give a molecule file" in capsys.readouterr().err


def test_method_option_uses_the_explain_module(checkpoint, tmp_path, capsys):
    from torch_geometric.data import Batch, Data

    from abp_core.explain import attribute
    from abp_core.predict import MethodError

    res = predict(checkpoint, smiles=["CCO", "OCC(=O)N"], method="gradient")
    w = res.atom_weights
    assert (w["method"] == "gradient").all()
    assert w.groupby("molecule")["weight"].sum().to_numpy() == pytest.approx(1.0, abs=1e-5)
    task = load_task(checkpoint)
    mol = res._mols[1]
    batch = Batch.from_data_list([Data(z=torch.as_tensor(mol.z), pos=torch.as_tensor(mol.pos, dtype=torch.float32))])
    expected = attribute(task.model, batch, method="gradient").numpy()
    assert w[w["molecule"] == 1]["weight"].to_numpy() == pytest.approx(expected, abs=1e-6)
    assert not np.allclose(expected, task.model.atom_weights(batch).detach().numpy(), atol=1e-3)
    with pytest.raises(MethodError, match="not available for the abp readout"):
        predict(checkpoint, smiles=["CCO"], method="saliency")
    code = main(["predict", str(checkpoint), "--smiles", "CCO", "--method", "occlusion", "--views", str(tmp_path / "v"),
                 "--out", str(tmp_path / "p.csv")])
    assert code == 0 and "per-atom attributions (occlusion)" in capsys.readouterr().out
    views = sorted((tmp_path / "v").glob("*.html"))
    assert [v.name for v in views] == ["00000_CCO.html"] and "occlusion attribution" in views[0].read_text()
