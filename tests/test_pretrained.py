"""Shipped models: every card is complete, loading checks the SHA-256 before unpickling, and each model
reproduces its card's test MAE on the test molecules of its split among the first rows of QM9."""
from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch

from abp_core import pretrained
from abp_core.pretrained import PretrainedError, PretrainedIntegrityError

SHIPPED = pretrained.available()
REQUIRED = ["qm9-homo-abp", "qm9-homo-wa", "qm9-homo-sum", "qm9-lumo-abp"]


def test_the_required_models_are_shipped_and_small():
    assert set(REQUIRED) <= set(SHIPPED), f"shipped: {SHIPPED}"
    total = sum((pretrained.MODEL_DIR / f"{n}.pt").stat().st_size for n in SHIPPED)
    assert total < 10e6, f"{total / 1e6:.1f} MB of weights"


@pytest.mark.parametrize("name", SHIPPED)
def test_card_is_complete_and_matches_its_weights(name):
    card = pretrained.card(name)
    target, readout = name.split("-")[1:]
    assert card["target"]["name"] == target and card["model"]["readout"] == readout
    assert card["config"]["model"]["readout"] == readout and card["config"]["data"]["targets"] == [target]
    assert card["split"] == {**card["split"], "kind": "paper", "seed": 844249}
    assert card["split"]["sizes"] == {"train": 104664, "val": 13083, "test": 13084}
    assert card["data"]["molecules"] == 130831 and card["config"]["data"]["subset"] is None
    assert card["training"]["epochs"] >= 1 and card["training"]["train_time_s"] > 0
    assert len(card["training"]["epoch_times_s"]) == card["training"]["epochs"]
    test = card["metrics"]["test"]
    assert test["n"] == 13084 and 0 < test["mae_meV"] <= test["rmse_meV"]
    paper = card["paper_table1"]
    assert paper["task"] == f"{target.upper()} – DFT" and paper["unit"] == "meV"
    if readout in ("sum", "abp"):
        assert paper["same_readout_mean"] == paper[f"{readout}_mean"]
    for lib in ("torch", "torch_geometric", "lightning", "abp"):
        assert card["versions"][lib]
    path = pretrained.MODEL_DIR / card["weights"]["file"]
    assert pretrained.sha256(path) == card["weights"]["sha256"] and path.stat().st_size == card["weights"]["bytes"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_reproduces_its_card_on_test_molecules(name):
    """The card's check MAE (the trainer's own evaluation of the best checkpoint on the split's test molecules
    among QM9's first 3,000 rows) comes back from the shipped weights, within the card's rounding."""
    from abp_core.data import get_dataset
    from abp_core.predict import Molecule, predict

    card = pretrained.card(name)
    task = pretrained.load(name)
    assert task.card == card and not task.training
    qm9 = get_dataset("qm9", max_molecules=card["check"]["rows_below"])
    rows = pretrained.check_indices(card, card["data"]["molecules"])
    assert len(rows) == card["check"]["n"] and 200 <= len(rows) <= 400 and rows.max() < len(qm9)
    mols = [Molecule(str(i), z=qm9[int(i)].z.numpy(), pos=qm9[int(i)].pos.double().numpy()) for i in rows]
    res = predict(task, mols, batch_size=128)
    col = f"{card['target']['name']} [eV]"
    assert (res.predictions["status"] == "ok").all()
    y = torch.stack([qm9[int(i)].y[0, card["target"]["dataset_column"]] for i in rows]).double().numpy()
    mae_mev = float(np.mean(np.abs(res.predictions[col].to_numpy() - y))) * 1000
    assert mae_mev == pytest.approx(card["check"]["mae_meV"], abs=0.0051)
    # and a typical QM9 molecule is predicted close to its label (the model is trained, not random)
    assert mae_mev < 3 * card["metrics"]["test"]["mae_meV"]


@pytest.fixture()
def copy_of_a_model(tmp_path):
    name = SHIPPED[0]
    for suffix in (".pt", ".json"):
        shutil.copy(pretrained.MODEL_DIR / f"{name}{suffix}", tmp_path / f"{name}{suffix}")
    return name, tmp_path


def test_a_tampered_file_is_refused_before_unpickling(copy_of_a_model, monkeypatch):
    name, folder = copy_of_a_model
    assert pretrained.load(name, directory=folder).card["name"] == name  # the copy itself loads
    data = bytearray((folder / f"{name}.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of the weights
    (folder / f"{name}.pt").write_bytes(bytes(data))

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called on a file whose hash did not match")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(PretrainedIntegrityError, match="does not match its model card.*was not read"):
        pretrained.load(name, directory=folder)


class _Payload:
    def __reduce__(self):  # unpickling this would call print: code execution
        return (print, ("pwned",))


def test_a_matching_hash_still_never_runs_pickled_code(tmp_path, capsys):
    """Even a file whose hash matches its card (e.g. both replaced) is read with weights_only=True."""
    name = "qm9-homo-abp"
    path = tmp_path / f"{name}.pt"
    torch.save({"format": pretrained.FORMAT, "payload": _Payload()}, path)
    pretrained.write_card({"name": name}, tmp_path)
    with pytest.raises(PretrainedError, match="could not be read"):
        pretrained.load(name, directory=tmp_path)
    assert "pwned" not in capsys.readouterr().out


def test_unknown_names_and_bad_cards(tmp_path, copy_of_a_model):
    with pytest.raises(PretrainedError, match="no shipped model named 'qm9-gap-abp'; available: .*qm9-homo-abp"):
        pretrained.load("qm9-gap-abp")
    with pytest.raises(PretrainedError, match="neither a shipped model nor a checkpoint file"):
        pretrained.resolve(tmp_path / "missing.ckpt")
    name, folder = copy_of_a_model
    card = json.loads((folder / f"{name}.json").read_text())
    card["weights"]["file"] = "../elsewhere.pt"  # a card may not point outside its folder
    (folder / f"{name}.json").write_text(json.dumps(card))
    with pytest.raises(PretrainedError, match="weights of .* not found"):
        pretrained.load(name, directory=folder)
    assert pretrained.available(tmp_path / "nothing-here") == []


def test_table_lists_every_model_with_its_mae():
    table = pretrained.table()
    assert table["name"].tolist() == SHIPPED
    for row in table.itertuples():
        assert row.test_mae_meV == pretrained.card(row.name)["metrics"]["test"]["mae_meV"]



def test_smiles_of_test_molecules_come_back_close_to_their_labels():
    """The whole SMILES path (RDKit ETKDG + MMFF94 geometry, not QM9's DFT one) on 26 test molecules of the split.

    benchmarks/predict.py measures the same on 64 molecules: MMFF geometries cost about 50 meV of MAE over the
    card's (DFT geometries), GFN2-xTB geometries almost nothing."""
    from abp_core.data import get_dataset
    from abp_core.predict import predict

    card = pretrained.card("qm9-homo-abp")
    qm9 = get_dataset("qm9", max_molecules=card["check"]["rows_below"])
    rows = pretrained.check_indices(card, card["data"]["molecules"])[::12]
    smiles = [qm9[int(i)].smiles for i in rows]
    y = np.array([float(qm9[int(i)].y[0, card["target"]["dataset_column"]]) for i in rows])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a molecule RDKit cannot embed is reported, and checked below
        res = predict("qm9-homo-abp", smiles=smiles)
    ok = (res.predictions["status"] == "ok").to_numpy()
    assert ok.mean() >= 0.9, res.predictions.loc[~ok, ["name", "status", "message"]]
    mae = float(np.mean(np.abs(res.predictions["homo [eV]"].to_numpy()[ok] - y[ok])))
    assert mae < 2.5 * card["metrics"]["test"]["mae_meV"] / 1000, mae
