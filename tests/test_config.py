"""The typed config: defaults, round trips, overrides, and errors that name the field."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from abp_core.config import Config, ConfigError, load_config, parse_override

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

TINY = {"backbone_hparams": {"hidden_channels": 16, "num_filters": 16, "num_interactions": 1}}


def test_defaults_are_the_paper_protocol():
    cfg = Config()
    t = cfg.trainer
    assert (t.lr, t.optimizer, t.loss, t.batch_size, t.patience) == (1e-4, "adam", "l1", 128, 10)
    assert t.scheduler is None and t.precision == "32-true" and t.accelerator == "auto"
    assert cfg.data.split_fractions == [0.8, 0.1, 0.1]
    assert cfg.model.backbone == "schnet" and cfg.model.readout == "abp"
    assert cfg.seed == cfg.data.split_seed  # training seed follows the split seed unless set


def test_yaml_and_json_round_trip(tmp_path):
    cfg = Config.from_dict({"data": {"dataset": "QM7b", "targets": "homo_PBE0", "split": "paper",
                                     "split_seed": 23887},
                            "model": {"readout": "ABP", **TINY, "readout_hparams": {"heads": 4}},
                            "trainer": {"lr": 3e-4, "devices": 1, "precision": "bf16"}})
    assert cfg.data.dataset == "qm7b" and cfg.data.targets == ["homo_PBE0"] and cfg.model.readout == "abp"
    assert cfg.trainer.precision == "bf16-mixed"
    for name in ("cfg.yaml", "cfg.json"):
        path = cfg.save(tmp_path / name)
        back = Config.load(path)
        assert back == cfg and back.fingerprint() == cfg.fingerprint()
    assert json.loads((tmp_path / "cfg.json").read_text())["trainer"]["lr"] == 3e-4


def test_overrides_from_cli_strings(tmp_path):
    path = Config().save(tmp_path / "c.yaml")
    cfg = load_config(path, ["model.readout=sum", "trainer.max_epochs=3", "trainer.lr=1e-3",
                             "model.backbone_hparams.hidden_channels=32", "data.targets=[3, homo_GW]",
                             "trainer.scheduler=plateau", "data.subset=null", "trainer.progress_bar=false"])
    assert cfg.model.readout == "sum" and cfg.trainer.max_epochs == 3
    assert cfg.trainer.lr == pytest.approx(1e-3)  # "1e-3" is a string in YAML 1.1: accepted for floats
    assert cfg.model.backbone_hparams == {"hidden_channels": 32}
    assert cfg.data.targets == [3, "homo_GW"] and cfg.trainer.scheduler == "plateau"
    assert cfg.trainer.progress_bar is False
    assert parse_override("trainer.devices=2") == ("trainer.devices", 2)
    # dotted keys in from_dict are overrides too (the notebooks' parameters cell)
    assert Config.from_dict({"model.readout": "wa", "trainer.batch_size": 64}).trainer.batch_size == 64


def test_per_readout_hparams_serve_an_experiment_grid():
    cfg = Config.from_dict({"model": {"readout": "sum", **TINY,
                                      "readout_hparams": {"abp": {"heads": 4}, "owa": {"beta": 10}}}})
    assert cfg.model.readout_kwargs() == {}
    assert cfg.with_overrides(["model.readout=abp"]).model.readout_kwargs() == {"heads": 4}
    assert cfg.with_overrides(["model.readout=owa"]).model.readout_kwargs() == {"beta": 10.0}
    with pytest.raises(ConfigError, match=r"^model\.readout_hparams\.abp\.heads \(3\) must divide"):
        cfg.with_overrides(["model.readout_hparams.abp.heads=3"])


def test_fingerprint_ignores_paths_and_workers_but_not_hyperparameters():
    a = Config()
    assert a.fingerprint() == a.with_overrides(["trainer.output_dir=/elsewhere", "trainer.num_workers=4",
                                                "trainer.progress_bar=false", "trainer.flush_denormals=false",
                                                "trainer.keep_freed_memory=true"]).fingerprint()
    assert a.fingerprint() != a.with_overrides(["trainer.lr=0.001"]).fingerprint()
    assert a.fingerprint() != a.with_overrides(["data.split_seed=1"]).fingerprint()


@pytest.mark.parametrize("overrides, message", [
    (["trainer.lr=abc"], r"^trainer\.lr must be a float, got 'abc'$"),
    (["trainer.batch_size=1.5"], r"^trainer\.batch_size must be an integer, got 1\.5$"),
    (["trainer.batch_size=0"], r"^trainer\.batch_size must be > 0"),
    (["trainer.max_epochs=ten"], r"^trainer\.max_epochs must be an integer, got 'ten'"),
    (["trainer.progress_bar=maybe"], r"^trainer\.progress_bar must be a boolean"),
    (["trainer.flush_denormals=sometimes"], r"^trainer\.flush_denormals must be a boolean \(true/false\) or null"),
    (["trainer.keep_freed_memory=1"], r"^trainer\.keep_freed_memory must be a boolean \(true/false\) or null"),
    (["trainer.lr=-1"], r"^trainer\.lr must be > 0"),
    (["trainer.loss=huber"], r"^trainer\.loss must be one of \['l1', 'mse'\]"),
    (["trainer.precision=bf17"], r"^trainer\.precision must be one of"),
    (["trainer.strategy=horovod"], r"^trainer\.strategy must be one of"),
    (["trainer.max_epoch=3"], r"^trainer\.max_epoch: unknown option \(did you mean 'max_epochs'\?\)"),
    (["model.readout=abpp"], r"^model\.readout: unknown readout 'abpp' \(did you mean 'abp'\?\)"),
    (["model.backbone=painn"], r"^model\.backbone: unknown backbone 'painn'"),
    (["model.backbone_hparams.hidden_channels=20"],
     r"^model\.readout_hparams\.heads \(8\) must divide the attention width 20 "
     r"\(model\.backbone_hparams\.hidden_channels\)$"),
    (["model.readout_hparams.heads=3"], r"^model\.readout_hparams\.heads \(3\) must divide"),
    (["model.backbone_hparams.hidden=3"], r"^model\.backbone_hparams\.hidden: unknown option for SchNetBackbone"),
    (["model.backbone_hparams.num_interactions=two"], r"^model\.backbone_hparams\.num_interactions must be an integer"),
    (["model.readout=sum", "model.readout_hparams.heads=4"], r"^model\.readout_hparams\.heads: unknown option for SumPooling"),
    (["model.readout=owa", "model.readout_hparams.beta=-1"], r"^model\.readout_hparams\.beta must be non-negative"),
    (["data.dataset=qm10"], r"^data\.dataset: unknown dataset 'qm10'"),
    (["data.targets=-1"], r"^data\.targets\[0\]: target index must be >= 0"),
    (["data.targets=[1, 1]"], r"^data\.targets: duplicate targets"),
    (["data.split=scaffold"], r"^data\.split must be one of"),
    (["data.split_fractions=[0.5, 0.1, 0.1]"], r"^data\.split_fractions must be three positive fractions"),
    (["data.subset=5"], r"^data\.subset must be >= 10"),
    (["foo.bar=1"], r"^foo\.bar: unknown config section 'foo'"),
    (["trainer.lr"], r"overrides must look like section\.option=value"),
    (["trainer.lr.x=1"], r"^trainer\.lr\.x: trainer\.lr has no sub-options"),
])
def test_bad_values_fail_naming_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        Config().with_overrides(overrides)


def test_wrong_types_from_a_parameters_dict():
    # what a papermill parameters cell would pass
    with pytest.raises(ConfigError, match=r"^trainer\.lr must be a float, got 'abc'$"):
        Config.from_dict({"trainer": {"lr": "abc"}})
    with pytest.raises(ConfigError, match=r"^trainer\.patience must be an integer or null, got True$"):
        Config.from_dict({"trainer": {"patience": True}})
    with pytest.raises(ConfigError, match=r"^model\.backbone_hparams must be a mapping"):
        Config.from_dict({"model": {"backbone_hparams": [64]}})
    with pytest.raises(ConfigError, match=r"^trainer must be a mapping"):
        Config.from_dict({"trainer": 3})
    with pytest.raises(ConfigError, match=r"^optimiser: unknown config section"):
        Config.from_dict({"optimiser": {}})


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        Config.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: [unclosed\n")
    with pytest.raises(ConfigError, match="could not be parsed"):
        Config.load(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        Config.load(lst)


# ---- checks that need the dataset: at data setup, before any training ---------------------------
def _tiny(tmp_path, **data):
    return Config.from_dict({"data": {"dataset": "qm7b", "subset": 100, "root": str(SHARED_DATA), **data},
                             "model": {"readout": "sum", **TINY},
                             "trainer": {"max_epochs": 1, "output_dir": str(tmp_path / "runs"),
                                         "progress_bar": False}})


def test_target_out_of_range_fails_before_training(tmp_path):
    from abp_core.train import run_training

    with pytest.raises(ConfigError, match=r"^data\.targets\[1\]: target index 14 is out of range for qm7b "
                                          r"\(14 targets: 0\.\.13\)"):
        run_training(_tiny(tmp_path, targets=[0, 14]))
    with pytest.raises(ConfigError, match=r"^data\.targets\[0\]: unknown target 'homo_b3lyp'"):
        run_training(_tiny(tmp_path, targets=["homo_b3lyp"]))
    with pytest.raises(ConfigError, match=r"^data\.targets\[1\]: target .* is listed twice"):
        run_training(_tiny(tmp_path, targets=[5, "homo_PBE0"]))
    assert not (tmp_path / "runs").exists()  # nothing was started


def test_paper_split_seed_and_owa_labels_checked_before_training(tmp_path):
    from abp_core.train import run_training

    with pytest.raises(ConfigError, match=r"^data\.split_seed: .*23887"):
        run_training(_tiny(tmp_path, targets=[5], split="paper", split_seed=1))
    cfg = _tiny(tmp_path, targets=[5]).with_overrides(["model.readout=owa"])
    with pytest.raises(ConfigError, match=r"^model\.readout: 'owa' needs per-atom 'homo_coeff'.*data\.orbital_labels"):
        run_training(cfg)
    with pytest.raises(ConfigError, match=r"^data\.orbital_labels: .* not found"):
        run_training(cfg.with_overrides(["data.orbital_labels=/nonexistent/labels.npz"]))
    with pytest.raises(ConfigError, match=r"^data\.dataset_kwargs: "):
        run_training(_tiny(tmp_path, targets=[5], dataset_kwargs={"nonsense": 1}))
    assert not (tmp_path / "runs").exists()
