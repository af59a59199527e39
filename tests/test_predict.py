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
