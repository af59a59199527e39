"""Issue 12 evidence: which per-atom attribution of each readout points where the orbital lives, and
which ones does the prediction really depend on?

One command (from the repository root), resumable (finished runs are reused, an interrupted run resumes):

    .venv/bin/python experiments/explain_evidence.py            # = train, then analyse
    .venv/bin/python experiments/explain_evidence.py train      # the models only
    .venv/bin/python experiments/explain_evidence.py analyse    # the attribution study -> results/explain/

Protocol (the existing CPU-scale protocol of ``experiments/qm9_cpu.yaml``, fixed before any run):
  * QM9, first 4,000 molecules of the embedded QM9, random 80/10/10, split and init seeds 0, 1, 2;
    SchNet 64/64/3, batch 64, Adam 5e-4, 25 epochs; HOMO and LUMO models for sum, WA, OWA, ABP
    (OWA supervised with GFN2-xTB shares of the orbital it predicts: HOMO shares for HOMO, LUMO for LUMO).
  * QM7b HOMO (PBE0, target 5) on the paper's split 23887 (``experiments/qm7b_cpu.yaml``, 12 epochs),
    sum, WA, OWA, ABP; OWA and the study use GFN2-xTB HOMO shares of the QM7b molecules.
  * Study: every (readout, method) against the matching xTB shares on the test molecules
    (:func:`abp_core.attribution_study.attribution_study`), plus deletion areas (faithfulness).

Training uses one torch thread (the machine is shared) and ``flock /tmp/abp-train.lock`` when started
from ``run_explain_evidence.sh``.
"""
from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch

from _setup import ROOT  # noqa: E402  (working directory, sys.path, data dirs)

torch.set_num_threads(int(os.environ.get("ABP_THREADS", 1)))
torch.set_flush_denormal(True)

from abp_core.config import Config  # noqa: E402
from abp_core.train import run_training  # noqa: E402

READOUTS = ["sum", "wa", "owa", "abp"]
QM9_TARGETS = ["homo", "lumo"]
QM9_SEEDS = [0, 1, 2]
QM9_N = int(os.environ.get("ABP_QM9_N", 4000))
QM9_EPOCHS = int(os.environ.get("ABP_QM9_EPOCHS", 25))
QM7B_SPLIT = 23887
QM7B_TARGET = 5  # HOMO (PBE0)
QM7B_EPOCHS = int(os.environ.get("ABP_QM7B_EPOCHS", 12))
RUNS = ROOT / "runs" / "explain"
CACHE = ROOT / ".cache" / "orbitals"
QM9_LABELS = CACHE / f"qm9_first{QM9_N}_gfn2_homo_lumo.npz"
QM7B_LABELS = CACHE / "qm7b_gfn2_homo.npz"
OUT = ROOT / "results" / "explain"
LOG = RUNS / "timing.jsonl"


def log(rec) -> None:
    RUNS.mkdir(parents=True, exist_ok=True)
    rec["at"] = time.strftime("%H:%M:%S")
    with open(LOG, "a") as fh:
        fh.write(json.dumps(rec) + "\n")


def qm9_config(target: str, readout: str, seed: int) -> Config:
    return Config.load(ROOT / "experiments" / "qm9_cpu.yaml", [
        f"data.targets=[{target}]", f"model.readout={readout}", f"data.split_seed={seed}",
        f"trainer.seed={seed}", f"trainer.max_epochs={QM9_EPOCHS}",
        f"data.dataset_kwargs.max_molecules={QM9_N}", f"data.orbital_labels={QM9_LABELS}",
        f"model.readout_hparams.owa.coefficient_key={target}_coeff",
        f"trainer.output_dir={RUNS / 'qm9'}"])


def qm7b_config(readout: str) -> Config:
    return Config.load(ROOT / "experiments" / "qm7b_cpu.yaml", [
        f"data.targets=[{QM7B_TARGET}]", f"model.readout={readout}", f"data.split_seed={QM7B_SPLIT}",
        f"trainer.max_epochs={QM7B_EPOCHS}", f"data.orbital_labels={QM7B_LABELS}",
        f"trainer.output_dir={RUNS / 'qm7b'}", f"data.root={os.environ['ABP_DATA_DIR']}"])


def datasets():
    from abp_core.data import get_dataset

    return {"qm9": get_dataset("qm9", max_molecules=QM9_N),
            "qm7b": get_dataset("qm7b", root=os.environ["ABP_DATA_DIR"])}


def label(data) -> None:
    from abp_core.orbitals import label_orbitals

    CACHE.mkdir(parents=True, exist_ok=True)
    for name, path, orbitals in (("qm9", QM9_LABELS, ("homo", "lumo")), ("qm7b", QM7B_LABELS, ("homo",))):
        t0 = time.perf_counter()
        labels = label_orbitals(data[name], path, orbitals=orbitals, num_workers=1, progress=False)
        secs = time.perf_counter() - t0
        print(f"GFN2-xTB {'/'.join(orbitals)} labels for {name}: {len(labels)} molecules, "
              f"{int(labels.failed.sum())} failed, {secs:.1f} s", flush=True)
        log({"phase": "labels", "dataset": name, "seconds": secs})


def run(cfg: Config, dataset) -> None:
    t0 = time.perf_counter()
    res = run_training(cfg, dataset=dataset)
    secs = time.perf_counter() - t0
    mae = next(iter(res.test_mae.values()))
    print(f"{time.strftime('%H:%M:%S')} {cfg.data.dataset} {cfg.data.targets} {cfg.model.readout:>4} "
          f"seed {cfg.data.split_seed}: test MAE {mae:.5g} ({secs:.0f} s{', reused' if res.skipped else ''})",
          flush=True)
    if not res.skipped:
        log({"phase": "run", "dataset": cfg.data.dataset, "targets": cfg.data.targets,
             "readout": cfg.model.readout, "seed": cfg.data.split_seed, "seconds": secs,
             "run_dir": str(res.run_dir)})


def configs():
    """Every run, in priority order: QM9 seed 0 (HOMO, LUMO), QM7b, then QM9 seeds 1 and 2."""
    out = [("qm9", qm9_config(t, ro, QM9_SEEDS[0])) for t in QM9_TARGETS for ro in READOUTS]
    out += [("qm7b", qm7b_config(ro)) for ro in READOUTS]
    out += [("qm9", qm9_config(t, ro, s)) for s in QM9_SEEDS[1:] for t in QM9_TARGETS for ro in READOUTS]
    return out


def train() -> None:
    data = datasets()
    label(data)
    for name, cfg in configs():
        run(cfg, data[name])


def analyse() -> None:
    from abp_core.attribution_study import run_evidence_study

    # per-molecule statistics (1.7 MB) stay beside the runs, not in the repository
    run_evidence_study(configs(), datasets(), OUT, n_random=10, per_molecule_path=RUNS / "per_molecule.csv.gz",
                       command="python experiments/explain_evidence.py analyse")


if __name__ == "__main__":
    phases = sys.argv[1:] or ["train", "analyse"]
    if "train" in phases:
        t0 = time.perf_counter()
        train()
        log({"phase": "train_total", "seconds": time.perf_counter() - t0})
    if "analyse" in phases:
        analyse()
