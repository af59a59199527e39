"""The ``abp`` command line: errors as one line, train/experiment/table end to end, the subcommand registry."""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from abp_core import cli
from abp_core.cli import main
from abp_core.config import Config

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture()
def cfg_file(tmp_path):
    cfg = Config.from_dict({
        "data": {"dataset": "qm7b", "targets": ["homo_PBE0"], "subset": 100, "root": str(SHARED_DATA)},
        "model": {"readout": "sum", "readout_hparams": {"abp": {"heads": 2}},
                  "backbone_hparams": {"hidden_channels": 16, "num_filters": 16, "num_interactions": 1,
                                       "num_gaussians": 16, "cutoff": 5.0}},
        "trainer": {"max_epochs": 1, "batch_size": 32, "lr": 1e-3, "output_dir": str(tmp_path / "runs"),
                    "progress_bar": False}})
    return cfg.save(tmp_path / "cfg.yaml")


@pytest.mark.parametrize("overrides, message", [
    (["trainer.lr=abc"], "abp: error: trainer.lr must be a float, got 'abc'"),
    (["model.readout=attention"], "abp: error: model.readout: unknown readout 'attention'"),
    (["model.readout=abp", "model.readout_hparams.abp.heads=3"],
     "abp: error: model.readout_hparams.abp.heads (3) must divide the attention width 16"),
    (["data.targets=[99]"], "abp: error: data.targets[0]: target index 99 is out of range for qm7b"),
    (["trainer.max_epoch=2"], "abp: error: trainer.max_epoch: unknown option (did you mean 'max_epochs'?)"),
])
def test_bad_config_is_one_line_naming_the_field(cfg_file, tmp_path, capsys, overrides, message):
    assert main(["train", "--config", str(cfg_file), *overrides]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), captured.err
    assert "Traceback" not in captured.err + captured.out
    assert not (tmp_path / "runs").exists()  # failed before any training


def test_console_entry_point_exit_code(cfg_file, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-m", "abp_core.cli", "train", "--config", str(cfg_file),
                           "trainer.batch_size=many"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "abp: error: trainer.batch_size must be an integer, got 'many'"
    proc = subprocess.run([sys.executable, "-m", "abp_core.cli", "train", "--config", str(tmp_path / "nope.yaml")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("abp: error: config file") and "Traceback" not in proc.stderr


def test_config_subcommand_prints_the_resolved_config(cfg_file, tmp_path, capsys):
    assert main(["config", "--config", str(cfg_file), "model.readout=wa", "trainer.lr=3e-4"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["readout"] == "wa" and printed["trainer"]["lr"] == 3e-4
    assert Config.from_dict(printed).fingerprint() == Config.load(cfg_file, ["model.readout=wa", "trainer.lr=3e-4"]).fingerprint()
    assert main(["config", "--out", str(tmp_path / "defaults.json")]) == 0
    assert json.loads((tmp_path / "defaults.json").read_text())["trainer"]["patience"] == 10


def test_failed_run_exit_code_1(cfg_file, capsys, monkeypatch):
    # Lightning's log handlers keep the stderr of the test that first imported it (closed by now)
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        for h in logging.getLogger(name).handlers:
            if isinstance(h, logging.StreamHandler):
                monkeypatch.setattr(h, "stream", sys.stderr)
    code = main(["train", "--config", str(cfg_file), "trainer.lr=1e30", "trainer.optimizer=sgd"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("abp:")]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith("abp: run failed: non-finite training loss at epoch 0, global step 1")


def test_experiment_grid_then_table(cfg_file, tmp_path, capsys):
    argv = ["experiment", "--config", str(cfg_file), "--targets", "homo_PBE0,10", "--readouts", "sum,abp",
            "--seeds", "1,2", "--out", str(tmp_path / "summary.csv")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Test MAE, mean ± std over split seeds" in out and "abp vs sum" in out
    assert "Beside the paper's Table 1" in out and "HOMO – PBE0" in out
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert len(summary) == 4 and (summary["n_splits"] == 2).all()
    assert set(summary["task"]) == {"Highest occupied molecular orbital (PBE0)", "Lowest unoccupied molecular orbital (PBE0)"}
    runs = sorted((tmp_path / "runs").rglob("metrics.json"))
    assert len(runs) == 8
    # mean +- std over the two split seeds, by hand from the runs' metrics.json
    maes = [json.loads(p.read_text()) for p in runs]
    vals = [m["metrics"]["test_best"][m["target_names"][0]]["mae"] for m in maes
            if m["config"]["model"]["readout"] == "abp" and m["target_indices"] == [5]]
    row = summary[(summary["readout"] == "abp") & (summary["task"].str.startswith("Highest"))].iloc[0]
    assert row["mae_mean"] == pytest.approx(np.mean(vals)) and row["mae_std"] == pytest.approx(np.std(vals, ddof=1))
    # the same command again: nothing is retrained or overwritten
    stamps = {p: p.stat().st_mtime_ns for p in runs}
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert err.count("already finished") == 8
    assert {p: p.stat().st_mtime_ns for p in runs} == stamps
    # a new seed adds new run directories beside the old ones
    assert main(argv[:-2] + ["--seeds", "3", "--readouts", "sum", "--targets", "homo_PBE0"]) == 0
    assert len(list((tmp_path / "runs").rglob("metrics.json"))) == 9
    capsys.readouterr()
    assert main(["table", str(tmp_path / "runs"), "--paper", "--out", str(tmp_path / "t.csv")]) == 0
    out = capsys.readouterr().out
    assert "± " in out and "Wilcoxon" in out
    assert len(pd.read_csv(tmp_path / "t.csv")) == 4


def test_table_of_the_papers_numbers(capsys):
    assert main(["table", "--paper-only", "1"]) == 0
    out = capsys.readouterr().out
    assert "HOMO – PBE0" in out
    assert re.search(r"schnet: mean improvement.*\n.*\nQM7b\s+50\.46", out)  # mean over the QM7b tasks
    assert main(["report", "--paper-only", "2"]) == 0
    assert "ABP(64,16,2)" in capsys.readouterr().out


def test_subcommand_registry_and_usage(capsys, monkeypatch):
    monkeypatch.setattr(cli, "SUBCOMMANDS", dict(cli.SUBCOMMANDS))

    @cli.subcommand("hello")
    def _register(sub):
        p = sub.add_parser("hello")
        p.add_argument("--name", default="world")
        p.set_defaults(handler=lambda args: print(f"hello {args.name}") or 7)

    assert main(["hello", "--name", "abp"]) == 7
    assert capsys.readouterr().out == "hello abp\n"
    # lazy form: "module:function", imported when the parser is built
    plugin = type(sys)("_abp_cli_test_plugin")
    plugin.register = lambda sub: sub.add_parser("plugin").set_defaults(handler=lambda args: 5)
    monkeypatch.setitem(sys.modules, "_abp_cli_test_plugin", plugin)
    cli.register_subcommand("plugin", "_abp_cli_test_plugin:register")
    assert main(["plugin"]) == 5
    cli.register_subcommand("broken", "_abp_no_such_module:register")  # does not break the other commands
    assert main(["plugin"]) == 5 and main(["broken"]) == 2
    assert "subcommand 'broken' is unavailable (ModuleNotFoundError" in capsys.readouterr().err
    assert set(cli.SUBCOMMANDS) >= {"train", "experiment", "predict", "table", "report", "config", "notebooks",
                                    "hello"}
    assert main([]) == 2
    assert main(["table", str(Path("/nonexistent/runs"))]) == 2
    assert "runs directory" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# shipped models: abp models, abp predict/explain from SMILES
# ------------------------------------------------------------------------------------------------
def test_models_lists_the_shipped_models_with_their_test_mae(capsys):
    from abp_core import pretrained

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in pretrained.available():
        line = next(ln for ln in out.splitlines() if ln.split()[:1] == [name])
        assert f"{pretrained.card(name)['metrics']['test']['mae_meV']:.1f}" in line
    assert main(["models", "--card", "qm9-homo-abp"]) == 0
    assert json.loads(capsys.readouterr().out)["split"]["seed"] == 844249
    assert main(["models", "--card", "qm9-gap-abp"]) == 2
    assert "no shipped model named 'qm9-gap-abp'" in capsys.readouterr().err


def test_predict_and_explain_smiles_with_a_shipped_model(tmp_path, capsys):
    smiles = ["CC(=O)C", "c1ccncc1", "CCCl", "[NH4+]", "C" * 25, "C1=CC=CC1("]
    out = tmp_path / "p.csv"
    assert main(["predict", "qm9-homo-abp", "--smiles", *smiles, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    p = pd.read_csv(out).set_index("name")
    assert p["status"].tolist() == ["ok", "ok", "unknown_element", "charged", "too_large", "invalid_smiles"]
    assert p.loc["CC(=O)C", "homo [eV]"] == pytest.approx(-6.62, abs=0.4)  # acetone: QM9 molecule 17, -6.62 eV
    assert "4 molecule(s) not predicted" in captured.err and "too_large): 25 heavy atoms" in captured.err
    assert f"geometries used -> {tmp_path / 'p_geometries.sdf'}" in captured.out

    folder = tmp_path / "explained"
    assert main(["explain", "qm9-homo-abp", "--smiles", "CC(=O)C", "c1ccncc1", "[CH3]", "--out", str(folder),
                 "--orbitals"]) == 0
    captured = capsys.readouterr()
    assert "explained 2/3 molecules (rollout)" in captured.out and "'[CH3]' not predicted (radical)" in captured.err
    att = pd.read_csv(folder / "attributions.csv")
    assert (att["method"] == "rollout").all() and set(att["name"]) == {"CC(=O)C", "c1ccncc1"}
    sums = att.groupby("molecule")[["attribution", "homo_share", "lumo_share"]].sum().to_numpy()
    assert sums == pytest.approx(np.ones_like(sums), abs=1e-5)
    acetone = att[att["name"] == "CC(=O)C"]
    assert acetone.loc[acetone["homo_share"].idxmax(), "element"] == "O"  # the lone pair of the carbonyl O
    views = sorted((folder / "views").glob("*.html"))
    assert [v.name for v in views] == ["00000_CC-O-C.html", "00001_c1ccncc1.html"]
    html = views[0].read_text()
    assert "rollout attribution" in html and "GFN2-xTB HOMO share" in html and "shared scale" in html
    from abp_core.viz import local_3dmol_js

    if local_3dmol_js() is not None:  # offline: 3Dmol.js is embedded, no script comes from the network
        assert not re.search(r"<script[^>]*src=[\"']https?:", html) and len(html) > 500_000
    else:
        assert "views load 3Dmol.js from its CDN" in captured.err
    pred = pd.read_csv(folder / "predictions.csv")
    assert pred["xtb_homo_eV"].notna().sum() == 2 and (folder / "geometries.sdf").is_file()
