"""Trainer acceptance tests on real QM7b molecules with tiny SchNet models (CPU, a few seconds each)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch

from abp_core import allocator, kernels
from abp_core.config import Config, ConfigError
from abp_core.train import (AtomisticTask, FlatParameters, NonFiniteLossError, RunConflictError, evaluate, load_task,
                            regression_metrics, run_directory, run_training)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
TARGET = "Atomization energy (DFT/PBE0)"  # extensive: every readout makes progress within 2-3 epochs
SMALL = {"hidden_channels": 16, "num_filters": 16, "num_interactions": 1, "num_gaussians": 16, "cutoff": 5.0}
READOUTS = ["sum", "mean", "max", "wa", "owa", "abp"]


def tiny_config(out, readout="sum", subset=300, **trainer) -> Config:
    """300 molecules (240/30/30), batch 32 -> 8 steps per epoch."""
    return Config.from_dict({
        "data": {"dataset": "qm7b", "targets": ["E_atomization_PBE0"], "subset": subset, "root": str(SHARED_DATA)},
        "model": {"readout": readout, "backbone_hparams": SMALL, "readout_hparams": {"abp": {"heads": 2}}},
        "trainer": {"max_epochs": 3, "batch_size": 32, "lr": 5e-3, "output_dir": str(out), "progress_bar": False,
                    **trainer},
    })


def synthetic_homo_coeff(data):
    """Per-atom 'orbital coefficients' for the OWA test: a softmax favouring O and N atoms."""
    data = data.clone()
    data.homo_coeff = torch.softmax(2.0 * (data.z == 8).float() + (data.z == 7).float(), 0)
    return data


def state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def history(run_dir) -> pd.DataFrame:
    return pd.read_csv(Path(run_dir) / "history.csv")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """train(readout) -> RunResult, each readout trained once per module (3 epochs)."""
    root = tmp_path_factory.mktemp("runs")
    cache = {}

    def train(readout):
        if readout not in cache:
            cache[readout] = run_training(tiny_config(root, readout),
                                          transform=synthetic_homo_coeff if readout == "owa" else None)
        return cache[readout]

    train.root = root
    return train


# ---- learning --------------------------------------------------------------------------------------
@pytest.mark.parametrize("readout", READOUTS)
def test_every_readout_trains_and_the_loss_goes_down(trained, readout):
    res = trained(readout)
    h = history(res.run_dir)
    assert h["epoch"].tolist() == [0, 1, 2] and h["global_step"].tolist() == [8, 16, 24]
    assert h["train_loss"].iloc[-1] < h["train_loss"].iloc[0]
    assert h["val_loss"].iloc[-1] < h["val_loss"].iloc[0]
    assert (h["lr"] == 5e-3).all() and (h["epoch_time_s"] > 0).all()
    assert res.metrics["config"]["model"]["readout"] == readout
    if readout == "owa":  # both parts of the objective are logged; the total is their sum (beta = 1)
        for split in ("train", "val"):
            assert (h[f"{split}_orbital_loss"] > 0).all()
            assert np.allclose(h[f"{split}_total_loss"], h[f"{split}_loss"] + h[f"{split}_orbital_loss"], rtol=1e-5)
        assert h["train_orbital_loss"].iloc[-1] < h["train_orbital_loss"].iloc[0]
    else:
        assert "train_orbital_loss" not in h.columns


def test_metrics_are_physical_units_and_match_saved_predictions(trained):
    from abp_core.data import get_dataset

    res = trained("sum")
    m = json.loads((res.run_dir / "metrics.json").read_text())
    assert m["target_names"] == [TARGET] and m["target_units"] == ["Ha"] and m["target_indices"] == [3]
    assert set(m["versions"]) >= {"torch", "torch_geometric", "lightning", "abp"}
    assert m["seed"] == 0 and m["config"]["trainer"]["lr"] == 5e-3 and m["wall_time_s"] > 0
    assert m["split_sizes"] == {"train": 240, "val": 30, "test": 30}
    pred = pd.read_csv(res.run_dir / "predictions_test.csv")
    assert len(pred) == 30 and set(pred["weights"]) == {"best"} and set(pred["unit"]) == {"Ha"}
    # y_true are the raw dataset values (Hartree), not standardised ones
    ds = get_dataset("qm7b", root=SHARED_DATA)
    raw = ds.targets(pred["idx"].to_numpy())[:, 3].double().numpy()
    np.testing.assert_array_equal(pred["y_true"].to_numpy(), raw)
    err = pred["y_pred"] - pred["y_true"]
    test = m["metrics"]["test_best"][TARGET]
    assert test["mae"] == pytest.approx(err.abs().mean(), rel=1e-12)   # MAE by hand
    assert test["rmse"] == pytest.approx(np.sqrt((err ** 2).mean()), rel=1e-12)
    assert test["max_error"] == pytest.approx(err.abs().max(), rel=1e-12)
    ss_tot = ((pred["y_true"] - pred["y_true"].mean()) ** 2).sum()
    assert test["r2"] == pytest.approx(1 - (err ** 2).sum() / ss_tot, rel=1e-9)
    assert test["n"] == 30 and abs(raw.mean()) > 1.0 > test["mae"]  # physical scale (Ha), learnt something
    # the same numbers come out of the best checkpoint, which rebuilds itself (config, standardiser)
    task = load_task(res.run_dir / "best.ckpt")
    assert task.hparams["target_std"][0] > 0.1  # Hartree-scale standardiser from the training split
    again = evaluate(task, _test_set(res), batch_size=7)
    assert regression_metrics(again["y_true"], again["y_pred"], [TARGET])[TARGET]["mae"] == pytest.approx(
        test["mae"], rel=1e-6)
    csv = pd.read_csv(res.run_dir / "metrics.csv")
    row = csv[(csv["split"] == "test") & (csv["weights"] == "best")].iloc[0]
    assert row["mae"] == pytest.approx(test["mae"]) and row["unit"] == "Ha"


def _test_set(res):
    return _test_set_from(res.metrics["config"])


def test_finished_run_is_not_redone(trained):
    res = trained("sum")
    metrics = res.run_dir / "metrics.json"
    before = (metrics.stat().st_mtime_ns, (res.run_dir / "last.ckpt").stat().st_mtime_ns)
    again = run_training(tiny_config(trained.root, "sum"))
    assert again.skipped and again.run_dir == res.run_dir and again.metrics == res.metrics
    assert (metrics.stat().st_mtime_ns, (res.run_dir / "last.ckpt").stat().st_mtime_ns) == before
    # the same target given by index is the same run; another learning rate is a new run directory
    assert run_training(tiny_config(trained.root, "sum").with_overrides(["data.targets=[3]"])).skipped
    other = tiny_config(trained.root, "sum", lr=1e-3)
    assert run_directory(other, [TARGET]) != res.run_dir
    # a run directory holding another configuration's results is never overwritten
    doc = json.loads(metrics.read_text())
    metrics.write_text(json.dumps({**doc, "fingerprint": "deadbeef"}))
    try:
        with pytest.raises(RunConflictError, match="not overwriting"):
            run_training(tiny_config(trained.root, "sum"))
    finally:
        metrics.write_text(json.dumps(doc))


def test_reported_metrics_come_from_the_best_checkpoint(tmp_path):
    class WorseLastEpoch(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 2:
                for group in trainer.optimizers[0].param_groups:
                    group["lr"] = 0.2

    res = run_training(tiny_config(tmp_path), callbacks=[WorseLastEpoch()])
    m, h = res.metrics, history(res.run_dir)
    best_epoch = int(h["val_loss"].idxmin())
    assert best_epoch < 2 and h["val_loss"].iloc[2] > 1.2 * h["val_loss"].min()
    assert m["best_epoch"] == best_epoch and m["best_val_loss"] == pytest.approx(h["val_loss"].min(), rel=1e-6)
    assert state(res.run_dir / "best.ckpt")["epoch"] == best_epoch
    assert state(res.run_dir / "last.ckpt")["epoch"] == 2 and state(res.run_dir / "last.ckpt")["global_step"] == 24
    best, last = m["metrics"]["test_best"][TARGET]["mae"], m["metrics"]["test_last"][TARGET]["mae"]
    assert best != last
    ds = _test_set(res)
    for ckpt, value in (("best.ckpt", best), ("last.ckpt", last)):
        r = evaluate(load_task(res.run_dir / ckpt), ds)
        assert np.abs(r["y_pred"] - r["y_true"]).mean() == pytest.approx(value, rel=1e-6)
    assert m["metrics"]["val_best"][TARGET]["mae"] == pytest.approx(h.loc[best_epoch, f"val_mae[{TARGET}]"], rel=1e-5)


def test_early_stopping_and_plateau_scheduler(tmp_path):
    # min_delta = 1 (standardised units): no epoch after the first counts as an improvement -> stop after
    # `patience` more epochs. SGD with lr 1e-6 keeps the validation loss flat (changes far below
    # ReduceLROnPlateau's relative threshold 1e-4), so the scheduler (patience 0) halves the lr after every
    # epoch but the first (which sets its reference). History rows record the lr used during that epoch.
    res = run_training(tiny_config(tmp_path, optimizer="sgd", lr=1e-6, max_epochs=20, patience=3, min_delta=1.0,
                                   scheduler="plateau", scheduler_patience=0, min_lr=0.0))
    h = history(res.run_dir)
    assert res.metrics["stopped_early"] and len(h) == 4 and res.metrics["epochs_trained"] == 4
    assert h["lr"].tolist() == pytest.approx([1e-6, 1e-6, 5e-7, 2.5e-7], rel=1e-9)


def assert_same_training(run_dir, ref_dir):
    """Resumed run == uninterrupted run, to float32 round-off.

    * per-epoch train/val losses agree to 1e-6 (relative) and the final models' test predictions to 1e-5;
    * every weight whose gradient is not identically zero agrees to 1e-5 (absolute). Weights whose exact
      gradient is zero (attention key biases, the Q/K projections of a one-seed decoder, embeddings of
      absent elements) only see round-off noise, which Adam normalises to steps of size lr; they are
      recognised by Adam's second moment (< 1e-14) in the reference and left out. Between fresh processes
      everything is usually bitwise equal, but vectorised float reductions may depend on memory alignment.
    """
    h, h_ref = history(run_dir), history(ref_dir)
    assert h["epoch"].tolist() == h_ref["epoch"].tolist() == list(range(len(h_ref)))
    assert h["global_step"].tolist() == h_ref["global_step"].tolist()
    for col in ("train_loss", "val_loss"):
        np.testing.assert_allclose(h[col], h_ref[col], rtol=1e-6)
    final, ref = state(Path(run_dir) / "last.ckpt"), state(Path(ref_dir) / "last.ckpt")
    names, params = zip(*AtomisticTask(**ref["hyper_parameters"]).named_parameters())
    states = [ref["optimizer_states"][0]]
    FlatParameters.convert_optimizer_states(states, params, flat=False)  # the trainer steps one flat tensor
    moments = states[0]["state"]
    checked = total = 0
    for i, name in enumerate(names):
        live = moments[i]["exp_avg_sq"] > 1e-14
        diff = (final["state_dict"][name] - ref["state_dict"][name]).abs()
        if live.any():
            assert diff[live].max().item() < 1e-5, (name, diff[live].max().item())
        if "embedding" not in name:  # 94 of the 100 element rows never get a gradient on QM7b
            checked, total = checked + int(live.sum()), total + live.numel()
    assert checked > 0.8 * total  # the exclusion is the exception, not the rule
    ds = _test_set_from(ref["hyper_parameters"]["config"])
    a = evaluate(load_task(Path(run_dir) / "last.ckpt"), ds)["y_pred"]
    b = evaluate(load_task(Path(ref_dir) / "last.ckpt"), ds)["y_pred"]
    np.testing.assert_allclose(a, b, rtol=1e-5)


def _test_set_from(config):
    from abp_core.train import AtomisticDataModule

    dm = AtomisticDataModule(Config.from_dict(config))
    dm.setup()
    return dm.test_set


def test_two_targets_and_the_standardiser_from_the_training_split(tmp_path):
    from abp_core.data import get_dataset

    cfg = tiny_config(tmp_path, subset=100, max_epochs=1).with_overrides(["data.targets=[homo_PBE0, 10]"])
    res = run_training(cfg)
    names = ["Highest occupied molecular orbital (PBE0)", "Lowest unoccupied molecular orbital (PBE0)"]
    m = res.metrics
    assert m["target_names"] == names and m["target_indices"] == [5, 10] and m["target_units"] == ["Ha", "Ha"]
    assert set(m["metrics"]["test_best"]) == set(names)
    pred = pd.read_csv(res.run_dir / "predictions_test.csv")
    assert pred.groupby("target").size().to_dict() == {names[0]: 10, names[1]: 10}
    for name in names:
        sub = pred[pred["target"] == name]
        assert m["metrics"]["test_best"][name]["mae"] == pytest.approx((sub["y_pred"] - sub["y_true"]).abs().mean())
    assert {f"val_mae[{n}]" for n in names} <= set(history(res.run_dir).columns)
    # standardiser: mean / population std of the training rows only
    train_rows = np.sort(np.asarray(_split_rows(cfg)["train"]))
    y = get_dataset("qm7b", root=SHARED_DATA).targets(train_rows)[:, [5, 10]].double()
    assert m["standardizer"]["mean"] == pytest.approx(y.mean(0).tolist(), rel=1e-9)
    assert m["standardizer"]["std"] == pytest.approx(y.std(0, unbiased=False).tolist(), rel=1e-9)
    assert m["split_sizes"] == {"train": 80, "val": 10, "test": 10}


def test_target_selection_copies_only_y_unless_a_callers_transform_follows(tmp_path):
    """The loader's molecules share the dataset's tensors (a deep copy per molecule was ~40 % of its time); a
    caller's transform, which may edit tensors in place, gets copies, so the dataset itself never changes."""
    from abp_core.train import AtomisticDataModule

    def shift_in_place(data):
        data.pos += 1.0  # an in-place augmentation
        return data

    cfg = tiny_config(tmp_path, subset=100, max_epochs=1)
    plain = AtomisticDataModule(cfg)
    plain.setup()
    storage = plain.dataset._data
    mol = plain.train_set[0]
    row = int(mol.idx)
    raw = plain.dataset[row]
    assert mol.y.shape == (1, 1) and torch.equal(mol.y, raw.y[:, plain.target_indices])
    assert raw.y.shape[1] > 1  # the dataset keeps every target
    assert mol.pos.untyped_storage().data_ptr() == storage.pos.untyped_storage().data_ptr()  # shared, not copied

    before = storage.pos.clone()
    edited = AtomisticDataModule(cfg, transform=shift_in_place)
    edited.setup()
    mol = edited.train_set[0]
    assert mol.pos.untyped_storage().data_ptr() != edited.dataset._data.pos.untyped_storage().data_ptr()
    assert torch.equal(mol.pos, edited.dataset[int(mol.idx)].pos + 1.0)
    for _ in edited.train_dataloader():
        pass
    assert torch.equal(edited.dataset._data.pos, before)


def _split_rows(cfg):
    from abp_core.train import AtomisticDataModule

    dm = AtomisticDataModule(cfg)
    dm.setup()
    parts = {k: set(map(int, v)) for k, v in dm.split_indices.items()}
    assert not (parts["train"] & parts["val"]) and not (parts["train"] & parts["test"]) and not (parts["val"] & parts["test"])
    return dm.split_indices


def test_owa_with_xtb_orbital_labels_from_the_config(tmp_path):
    """OWA end to end from the config alone: GFN2-xTB HOMO shares attached through data.orbital_labels."""
    from abp_core.orbitals import label_orbitals

    cfg = tiny_config(tmp_path, "owa", subset=60, max_epochs=1, batch_size=16)
    rows = np.concatenate([np.asarray(v) for v in _split_rows(cfg.with_overrides(["model.readout=sum"])).values()])
    from abp_core.data import get_dataset

    molecules = get_dataset("qm7b", root=SHARED_DATA).index_select(torch.as_tensor(rows))
    labels = label_orbitals(molecules, tmp_path / "homo.npz", orbitals=("homo",), num_workers=1, progress=False)
    assert len(labels) == 60
    res = run_training(cfg.with_overrides([f"data.orbital_labels={tmp_path / 'homo.npz'}"]))
    h = history(res.run_dir)
    assert (h["train_orbital_loss"] > 0).all() and np.isfinite(h["val_total_loss"]).all()
    assert res.metrics["config"]["data"]["orbital_labels"] == str(tmp_path / "homo.npz")


# ---- resume ------------------------------------------------------------------------------------------
KILL_SCRIPT = """
import json, os, sys
import lightning as L
from abp_core.config import Config
from abp_core.train import run_training

class HardKill(L.Callback):
    def __init__(self, step): self.step = step
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            os._exit(17)      # no cleanup, no checkpoint: like SIGKILL or a power cut

cfg = Config.from_dict(json.load(open(sys.argv[1])))
kill = int(sys.argv[2])
res = run_training(cfg, callbacks=[HardKill(kill)] if kill >= 0 else [])
print("RESUMED_FROM", json.dumps(res.resumed_from))
"""


@pytest.mark.slow
def test_hard_kill_mid_epoch_and_resume_exactly(tmp_path, trained):
    """Killed (os._exit) at step 13, resumed from the step-12 checkpoint in the middle of epoch 1.

    Asserted: the rerun continues at epoch 1 / step 12 (not from zero), ends at step 24 like an
    uninterrupted run, and its training is the uninterrupted one (see :func:`assert_same_training`).
    Without the exact mid-epoch data position (a plain DataLoader) the losses differ by ~1e-2.
    """
    ref = trained("abp")  # the same training (checkpoint_every_n_steps does not change it), uninterrupted
    cfg = tiny_config(tmp_path / "killed", "abp", checkpoint_every_n_steps=3)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    (tmp_path / "kill.py").write_text(KILL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, str(tmp_path / "kill.py"), str(tmp_path / "cfg.json")]
    first = subprocess.run(cmd + ["13"], capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 17, first.stderr[-2000:]
    run_dir = run_directory(cfg, [TARGET])
    assert not (run_dir / "metrics.json").exists()
    ck = state(run_dir / "last.ckpt")
    assert (ck["epoch"], ck["global_step"]) == (1, 12)

    second = subprocess.run(cmd + ["-1"], capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "from last.ckpt (epoch 1, global step 12)" in second.stderr
    assert 'RESUMED_FROM {"epoch": 1, "global_step": 12}' in second.stdout
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["global_step"] == 24 and m["resumed_from"] == {"epoch": 1, "global_step": 12}
    assert_same_training(run_dir, ref.run_dir)
    assert m["metrics"]["test_best"][TARGET]["mae"] == pytest.approx(
        ref.metrics["metrics"]["test_best"][TARGET]["mae"], rel=1e-5)


def test_crash_and_resume_from_end_of_epoch_checkpoint(tmp_path, trained):
    """An exception at step 13 (no step checkpoints): resume from the epoch-0 checkpoint (step 8)."""
    class Crash(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 13:
                raise RuntimeError("simulated crash")

    ref = trained("wa")  # uninterrupted reference
    cfg = tiny_config(tmp_path / "crashed", "wa")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_training(cfg, callbacks=[Crash()])
    run_dir = run_directory(cfg, [TARGET])
    assert state(run_dir / "last.ckpt")["global_step"] == 8
    res = run_training(cfg)
    assert res.resumed_from == {"epoch": 0, "global_step": 8} and res.metrics["global_step"] == 24
    assert_same_training(run_dir, ref.run_dir)


# ---- failures ----------------------------------------------------------------------------------------
def test_nan_targets_stop_with_a_clear_message_and_keep_the_checkpoint(tmp_path):
    class PoisonTargets(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 10:
                batch.y[:2] = float("nan")

    cfg = tiny_config(tmp_path)
    with pytest.raises(NonFiniteLossError) as info:
        run_training(cfg, callbacks=[PoisonTargets()])
    msg = str(info.value)
    assert "non-finite training loss at epoch 1, global step 10" in msg
    assert "non-finite targets in the batch" in msg and "Training stopped" in msg
    run_dir = run_directory(cfg, [TARGET])
    assert f"{run_dir / 'last.ckpt'} (epoch 0, global step 8)" in msg
    ck = state(run_dir / "last.ckpt")
    assert ck["global_step"] == 8 and all(torch.isfinite(v).all() for v in ck["state_dict"].values())
    assert not (run_dir / "metrics.json").exists()
    assert load_task(run_dir / "last.ckpt") is not None


def test_divergence_restores_the_previous_checkpoint(tmp_path):
    """lr jumps to 1e12 at step 5: the update of step 6 blows the weights up, the loss of step 7 is inf/NaN.

    last.ckpt (written every step) then holds the diverged weights of step 6; it is set aside as
    last-nonfinite.ckpt and the step-5 checkpoint becomes last.ckpt again.
    """
    class Explode(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 5:
                for group in trainer.optimizers[0].param_groups:
                    group["lr"] = 1e12

    cfg = tiny_config(tmp_path, checkpoint_every_n_steps=1, optimizer="sgd")
    with pytest.raises(NonFiniteLossError, match=r"global step 6 .*diverged.*previous checkpoint was restored"):
        run_training(cfg, callbacks=[Explode()])
    run_dir = run_directory(cfg, [TARGET])
    good, bad = state(run_dir / "last.ckpt"), state(run_dir / "last-nonfinite.ckpt")
    assert good["global_step"] == 5 and bad["global_step"] == 6
    assert max(v.abs().max().item() for v in good["state_dict"].values()) < 1e3


def test_bf16_mixed_precision_runs(tmp_path):
    dtypes = []

    class Probe(L.Callback):
        def on_fit_start(self, trainer, pl_module):
            pl_module.model.head[0].register_forward_hook(lambda mod, inp, out: dtypes.append(out.dtype))

    res = run_training(tiny_config(tmp_path, "abp", subset=100, max_epochs=1, precision="bf16-mixed"),
                       callbacks=[Probe()])
    assert torch.bfloat16 in dtypes  # autocast was active in the forward pass
    assert res.metrics["config"]["trainer"]["precision"] == "bf16-mixed"
    assert np.isfinite(res.metrics["metrics"]["test_best"][TARGET]["mae"])


def test_fit_freezes_the_objects_that_existed_before_and_unfreezes_them_after(tmp_path):
    import gc

    assert gc.get_freeze_count() == 0
    marker = [object()]  # a tracked container created before the run
    seen = {}

    class Probe(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            # frozen objects leave the collector's generations: gc.get_objects() no longer lists them
            seen["frozen"] = gc.get_freeze_count()
            seen["marker listed"] = any(o is marker for o in gc.get_objects())

    run_training(tiny_config(tmp_path, "sum", subset=100, max_epochs=1), callbacks=[Probe()])
    assert seen["frozen"] > 10_000 and not seen["marker listed"]
    assert gc.get_freeze_count() == 0 and any(o is marker for o in gc.get_objects())

    gc.freeze()  # a caller's own freeze is left alone
    try:
        run_training(tiny_config(tmp_path / "again", "sum", subset=100, max_epochs=1))
        assert gc.get_freeze_count() > 10_000 and not any(o is marker for o in gc.get_objects())
    finally:
        gc.unfreeze()


@pytest.mark.skipif(not kernels.available(), reason="without the native library only the calling thread is set")
def test_training_on_the_cpu_flushes_subnormals_on_all_threads_and_then_restores_them(tmp_path):
    x = torch.full((1 << 21,), 1e-40)  # sub-normal in float32
    kept = []

    class Probe(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            kept.append(int(((x * 1.0) != 0).sum()))

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run_training(tiny_config(tmp_path, "sum", subset=100, max_epochs=1), callbacks=[Probe()])
        assert kept == [0]
        assert int(((x * 1.0) != 0).sum()) == x.numel()  # the caller's state after the run
        res = run_training(tiny_config(tmp_path / "off", "sum", subset=100, max_epochs=1, flush_denormals=False),
                           callbacks=[Probe()])
        assert kept == [0, x.numel()]
        assert res.metrics["config"]["trainer"]["flush_denormals"] is False
    finally:
        torch.set_num_threads(threads)


def test_training_on_the_cpu_keeps_freed_memory_for_reuse_and_then_gives_it_back(tmp_path, fake_glibc):
    seen = []

    class Probe(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            seen.append(allocator.kept())

    run_training(tiny_config(tmp_path, "sum", subset=100, max_epochs=1), callbacks=[Probe()])
    assert seen == [True] and not allocator.kept()
    assert fake_glibc.calls[:2] == [("mallopt", allocator.M_MMAP_MAX, 0),
                                    ("mallopt", allocator.M_TRIM_THRESHOLD, allocator.KEEP_TRIM_THRESHOLD)]
    assert fake_glibc.calls[-1] == ("malloc_trim", 0)
    res = run_training(tiny_config(tmp_path / "off", "sum", subset=100, max_epochs=1, keep_freed_memory=False),
                       callbacks=[Probe()])
    assert seen == [True, False]  # (the evaluation after training keeps it either way)
    assert res.metrics["config"]["trainer"]["keep_freed_memory"] is False


def test_evaluation_on_the_cpu_keeps_freed_memory_and_gives_the_same_predictions(tmp_path, request, monkeypatch):
    res = run_training(tiny_config(tmp_path, "abp", subset=100, max_epochs=1))
    task, ds = load_task(res.run_dir / "best.ckpt"), _test_set(res)
    kept = evaluate(task, ds, 4, "cpu")  # glibc's settings really changed (where the C library is glibc)
    request.getfixturevalue("fake_glibc")  # from here on the settings are only recorded: glibc's defaults stay
    seen = []
    forward = task.predict_physical
    monkeypatch.setattr(task, "predict_physical", lambda batch: seen.append(allocator.kept()) or forward(batch))
    released = evaluate(task, ds, 4, "cpu")
    assert len(seen) > 1 and all(seen) and not allocator.kept()
    np.testing.assert_array_equal(kept["y_pred"], released["y_pred"])


# ---- DDP ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ddp_two_gloo_processes_match_one_process(tmp_path):
    """2 CPU processes (gloo) with batch 8 each vs 1 process with batch 16, same seed and init.

    40 molecules -> 32 training molecules = 2 optimisation steps per epoch in both runs; with the
    DistributedSampler semantics each step sees the same 16 molecules and DDP averages the two halves'
    gradients, so after 2 SGD steps the weights agree to float32 round-off (atol 1e-6), while they moved
    away from the initial weights by over 1000x more than that. (Summed instead of averaged gradients, or
    overlapping/duplicated shards, would show up as differences of the order of the move itself.)
    """
    base = tiny_config(tmp_path / "runs", "abp", subset=40, max_epochs=1, optimizer="sgd", lr=0.5,
                       accelerator="cpu")
    path = base.save(tmp_path / "cfg.yaml")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-m", "abp_core.cli", "train", "--config", str(path),
                           "trainer.batch_size=8", "trainer.devices=2", "trainer.strategy=ddp"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Starting with 2 processes" in proc.stderr + proc.stdout
    two = run_directory(base.with_overrides(["trainer.batch_size=8"]), [TARGET])
    one = run_training(base.with_overrides(["trainer.batch_size=16", "trainer.devices=1"]))
    a, b = state(two / "last.ckpt"), state(one.run_dir / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 2
    assert a["hyper_parameters"]["config"]["trainer"]["batch_size"] == 8
    L.seed_everything(base.seed, verbose=False)
    hp = b["hyper_parameters"]
    init = AtomisticTask(**hp).state_dict()
    moved = max((b["state_dict"][k] - init[k]).abs().max().item() for k in init)
    diff = max((a["state_dict"][k] - b["state_dict"][k]).abs().max().item() for k in init)
    assert moved > 1e-4 and diff < 1e-6 and diff < 1e-3 * moved, (moved, diff)
    m2 = json.loads((two / "metrics.json").read_text())
    assert m2["metrics"]["test_best"][TARGET]["mae"] == pytest.approx(
        one.metrics["metrics"]["test_best"][TARGET]["mae"], rel=1e-4)


# ---- the flat parameter layout (FlatParameters) ---------------------------------------------------
def _per_parameter_layout(m):
    """Within a monkeypatch context: the trainer keeps one optimizer entry per parameter (the reference)."""
    m.setattr(FlatParameters, "applies", staticmethod(lambda params, trainer=None: False))


def _flat_and_per_parameter_tasks(tmp_path, monkeypatch, readout="abp", heads=2, **trainer):
    """Two identical tasks and their optimizers from configure_optimizers: the flat layout and the per-parameter
    one (FlatParameters.applies switched off for the second). ABP with ``heads=1`` (head dimension 16) runs the
    native whole-readout node, with 2 the module path."""
    cfg = tiny_config(tmp_path, readout, **trainer).to_dict()
    cfg["model"]["readout_hparams"] = {"abp": {"heads": heads}}
    out = []
    for flat in (True, False):
        torch.manual_seed(0)
        task = AtomisticTask(cfg, [TARGET], ["eV"], [0.0], [1.0])
        with monkeypatch.context() as m:
            if not flat:
                _per_parameter_layout(m)
            out.append((task, task.configure_optimizers()))
    return out


def _train_steps(task, opt, batches):
    for batch in batches:
        opt.zero_grad()
        task._losses(batch)[0].backward()
        task.on_before_optimizer_step(opt)  # where Lightning calls it: after the backward, before clipping
        opt.step()


@pytest.mark.parametrize("optimizer,heads", [("adam", 2), ("adamw", 2), ("sgd", 2), ("adam", 1)])
def test_the_flat_layout_steps_to_bitwise_the_same_weights(tmp_path, monkeypatch, qm7b, optimizer, heads):
    """heads=1: ABP's native node, its gradient through the readout's parameter block; heads=2: its module path."""
    from torch_geometric.data import Batch

    (flat, opt_flat), (ref, opt_ref) = _flat_and_per_parameter_tasks(tmp_path, monkeypatch, optimizer=optimizer,
                                                                     weight_decay=1e-2, heads=heads)
    assert flat.model.readout in flat._flat.parameter_blocks  # offered and taken; heads=1 trains through it
    assert flat._flat is not None and ref._flat is None
    assert [len(g["params"]) for g in opt_flat.param_groups] == [1]
    assert len(opt_ref.param_groups[0]["params"]) == len(list(ref.parameters())) > 30
    batches = [Batch.from_data_list([qm7b[i] for i in range(k, k + 8)]) for k in range(0, 40, 8)]
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    _train_steps(flat, opt_flat, batches)
    _train_steps(ref, opt_ref, batches)
    pairs = list(zip(flat.state_dict().items(), ref.state_dict().items()))
    assert all(na == nb and torch.equal(a, b) for (na, a), (nb, b) in pairs)
    moved = [k for k, v in ref.state_dict().items() if not torch.equal(v, before[k])]
    assert len(moved) > 30  # the steps did something, to both
    # the per-parameter gradients were moved, not copied and kept
    assert all(p.grad is None for p in flat.parameters()) and opt_flat.param_groups[0]["params"][0].grad is not None


def test_abps_readout_takes_its_gradient_as_one_block_and_the_module_path_adds_to_it(tmp_path, monkeypatch, qm7b):
    """The flat layout gives ABP's readout its slice of the flat tensor as one parameter block: the gradient
    arrives there in one tensor (no per-parameter .grad), and a batch that ran the readout's other path in the
    same step (gradient accumulation) adds its per-parameter gradients: the gathered gradient equals the
    per-parameter layout's, bitwise."""
    from torch_geometric.data import Batch

    from abp_core import kernels, native_readout

    if not kernels.has_blas():
        pytest.skip("the whole-readout call needs PyTorch's sgemm_")
    (flat, _), (ref, _) = _flat_and_per_parameter_tasks(tmp_path, monkeypatch, heads=1)
    readout = flat.model.readout
    block = flat._flat.parameter_blocks[readout]
    first, second = (Batch.from_data_list([qm7b[i] for i in range(k, k + 8)]) for k in (0, 8))
    for task in (flat, ref):
        task._losses(first)[0].backward()
    assert block.grad is not None and all(p.grad is None for p in readout.parameters())
    assert all(p.grad is not None for p in flat.model.head.parameters())
    for task in (flat, ref):
        with native_readout.stepwise():  # the per-layer node: gradients to each parameter
            task._losses(second)[0].backward()
    assert all(p.grad is not None for p in readout.parameters())
    expected = torch.cat([p.grad.reshape(-1) for p in ref.parameters()])
    flat._flat.gather_grads()
    assert torch.equal(flat._flat.flat.grad, expected)
    assert block.grad is None and all(p.grad is None for p in flat.parameters())
    flat.on_fit_end()  # released: the readout trains through its own parameters again
    assert not flat._flat.parameter_blocks and "_parameter_block" not in readout.__dict__


def test_the_flat_layout_moves_gradients_and_refuses_a_replaced_storage(tmp_path, monkeypatch):
    (task, opt), _ = _flat_and_per_parameter_tasks(tmp_path, monkeypatch, readout="wa")
    flat, params = task._flat, list(task.parameters())
    assert all(p.data_ptr() >= flat.flat.data_ptr() for p in params)
    flat.gather_grads()  # no gradient at all: nothing to step
    assert flat.flat.grad is None
    before = flat.flat.detach().clone()
    opt.step()
    assert torch.equal(flat.flat, before)
    for k, p in enumerate(params):
        p.grad = None if k == 3 else torch.full_like(p, float(k))
    with pytest.warns(UserWarning, match="1 parameter tensor"):
        flat.gather_grads()
    expected = torch.cat([torch.full((p.numel(),), 0.0 if k == 3 else float(k)) for k, p in enumerate(params)])
    assert torch.equal(flat.flat.grad, expected) and all(p.grad is None for p in params)
    opt.step()  # the parameters are views: a step moves them
    buffer = flat.flat.grad.data_ptr()
    for k, p in enumerate(params):  # the next step's gradients land in the same buffer, none left from the last
        p.grad = None if k == 0 else torch.full_like(p, -1.0)
    flat.gather_grads()
    assert flat.flat.grad.data_ptr() == buffer
    assert torch.equal(flat.flat.grad, torch.cat([torch.full((p.numel(),), 0.0 if k == 0 else -1.0)
                                                  for k, p in enumerate(params)]))
    offset = params[0].numel()  # params[0] got a zero gradient; params[1] a nonzero one
    assert not torch.equal(params[1], before[offset:offset + params[1].numel()].view_as(params[1]))
    params[2].data = params[2].data.clone()  # e.g. module.to(...) after the optimizer was set up
    params[2].grad = torch.ones_like(params[2])
    with pytest.raises(RuntimeError, match="stale copy"):
        flat.gather_grads()


def test_the_flat_layout_is_released_after_fit_and_optimizer_states_convert_both_ways(tmp_path, monkeypatch):
    from abp_core.train import CheckpointError

    (task, opt), _ = _flat_and_per_parameter_tasks(tmp_path, monkeypatch, readout="abp")
    params = list(task.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    task.on_before_optimizer_step(opt)
    opt.step()
    values = [p.detach().clone() for p in params]
    task.on_fit_end()
    assert all(torch.equal(p, v) for p, v in zip(params, values))
    assert len({p.untyped_storage().data_ptr() for p in params}) == len(params)  # each its own storage again

    flat_state = opt.state_dict()
    states = [flat_state]
    FlatParameters.convert_optimizer_states(states, params, flat=False)
    per_param = states[0]
    assert len(per_param["param_groups"][0]["params"]) == len(params)
    assert [tuple(per_param["state"][i]["exp_avg"].shape) for i in range(len(params))] == [tuple(p.shape) for p in params]
    assert all(torch.equal(per_param["state"][i]["step"], flat_state["state"][0]["step"]) for i in range(len(params)))
    FlatParameters.convert_optimizer_states(states, params, flat=True)
    again = states[0]
    assert again["param_groups"] == flat_state["param_groups"]
    assert all(torch.equal(again["state"][0][k], v) for k, v in flat_state["state"][0].items())
    FlatParameters.convert_optimizer_states(states, params, flat=True)  # already flat: unchanged
    assert states[0] is again
    with pytest.raises(CheckpointError, match="parameter tensors"):
        FlatParameters.convert_optimizer_states([per_param], params[:-1], flat=True)
    per_param["state"][1]["step"] = per_param["state"][1]["step"] + 1
    with pytest.raises(CheckpointError, match="different numbers of times"):
        FlatParameters.convert_optimizer_states([per_param], params, flat=True)


def test_a_run_resumes_from_a_checkpoint_of_the_per_parameter_layout(tmp_path, trained):
    """Checkpoints written before the flat layout (one optimizer entry per parameter) resume to the same run."""
    class Crash(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 13:
                raise RuntimeError("simulated crash")

    ref = trained("abp")
    cfg = tiny_config(tmp_path / "old-layout", "abp")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_training(cfg, callbacks=[Crash()])
    path = run_directory(cfg, [TARGET]) / "last.ckpt"
    ck = state(path)
    params = list(AtomisticTask(**ck["hyper_parameters"]).parameters())
    assert len(ck["optimizer_states"][0]["param_groups"][0]["params"]) == 1  # written in the flat layout
    FlatParameters.convert_optimizer_states(ck["optimizer_states"], params, flat=False)
    torch.save(ck, path)
    res = run_training(cfg)
    assert res.resumed_from == {"epoch": 0, "global_step": 8} and res.metrics["global_step"] == 24
    assert_same_training(path.parent, ref.run_dir)


def test_gradient_clipping_sees_the_gathered_gradients(tmp_path, monkeypatch):
    """Lightning clips after on_before_optimizer_step: with the flat layout the clipped run equals the
    per-parameter one (and differs from the unclipped run, so clipping did act)."""
    def final_weights(name, clip, flat=True):
        with monkeypatch.context() as m:
            if not flat:
                _per_parameter_layout(m)
            res = run_training(tiny_config(tmp_path / name, "wa", max_epochs=1, gradient_clip=clip))
        return state(res.run_dir / "last.ckpt")["state_dict"]

    flat, per_param, unclipped = final_weights("flat", 0.05), final_weights("ref", 0.05, flat=False), \
        final_weights("unclipped", None)
    assert all(torch.allclose(flat[k], per_param[k], rtol=1e-4, atol=1e-6) for k in flat)
    assert not all(torch.allclose(flat[k], unclipped[k], rtol=1e-4, atol=1e-6) for k in flat)
