"""Models shipped with the package: trained on QM9, loadable by name, verified before they are read.

>>> from abp_core import pretrained
>>> pretrained.available()                 # ['qm9-homo-abp', 'qm9-homo-sum', 'qm9-homo-wa', 'qm9-lumo-abp', ...]
>>> task = pretrained.load("qm9-homo-abp")  # an AtomisticTask in eval mode, as abp_core.train.load_task gives
>>> task.card["metrics"]["test"]["mae_meV"]

Names are ``qm9-<target>-<readout>``. Each model is two files of package data in
``abp_core/pretrained_models/``: the weights (``<name>.pt``: state dict + the task's hyperparameters,
i.e. config, standardiser, target names/units and training elements) and the model card
(``<name>.json``: config, data, split, epochs, wall time, test MAE/RMSE in meV beside the paper's
Table 1 row, library versions, and the SHA-256 of the weights). :func:`load` hashes the weights file
and compares it with the card **before** anything is unpickled, and then reads it with
``torch.load(weights_only=True)`` (tensors and plain containers only), so a damaged or altered file is
refused with :class:`PretrainedIntegrityError` and never executed.

The models are trained by ``experiments/train_pretrained.py`` (see its docstring for the protocol);
:func:`export_run` turns one of its finished runs into the two files.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

__all__ = ["MODEL_DIR", "FORMAT", "CHECK_ROWS", "PretrainedError", "PretrainedIntegrityError", "available",
           "card", "load", "resolve", "table", "sha256", "export_run", "write_weights", "write_card", "check_indices", "is_model_name"]

#: Where the shipped weights and cards live (package data).
MODEL_DIR = Path(__file__).resolve().parent / "pretrained_models"
#: Layout version of the weights file.
FORMAT = "abp-pretrained/1"
#: The reproducibility check of each card uses the test molecules of the split among the first
#: CHECK_ROWS rows of QM9 (a few hundred molecules that load in seconds, see :func:`check_indices`).
CHECK_ROWS = 3000
_HASH_CHUNK = 1 << 20


class PretrainedError(ValueError):
    """An unknown model name, or a card/weights file that cannot be used."""


class PretrainedIntegrityError(PretrainedError):
    """The weights file does not match the SHA-256 its card records; it was not read."""


def _dir(directory) -> Path:
    return Path(directory) if directory is not None else MODEL_DIR


def available(directory: Optional[Union[str, Path]] = None) -> List[str]:
    """Names of the models with a card in ``directory`` (default: the shipped ones), sorted."""
    folder = _dir(directory)
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.json") if is_model_name(p.stem))


def is_model_name(text: str) -> bool:
    """``qm9-<target>-<readout>`` with lower-case letters/digits in each part."""
    parts = str(text).split("-")
    return len(parts) == 3 and all(p and p.isalnum() and p == p.lower() for p in parts)


def card(name: str, directory: Optional[Union[str, Path]] = None) -> Dict[str, Any]:
    """The model card of ``name`` (a dict read from ``<name>.json``)."""
    folder = _dir(directory)
    path = folder / f"{name}.json"
    if not is_model_name(name) or not path.is_file():
        names = available(directory)
        raise PretrainedError(f"no shipped model named {name!r}; available: {', '.join(names) or 'none'}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PretrainedError(f"model card {path} is unreadable ({exc})") from None
    if data.get("name") != name or "weights" not in data:
        raise PretrainedError(f"model card {path} does not describe {name!r}")
    return data


def sha256(path: Union[str, Path]) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_HASH_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def load(name: str, directory: Optional[Union[str, Path]] = None, map_location: str = "cpu"):
    """The shipped model ``name`` as an :class:`~abp_core.train.AtomisticTask` in eval mode.

    The weights file is hashed and compared with the card first; only a match is read, with
    ``torch.load(weights_only=True)``. The card is attached as ``task.card``.

    Raises:
        PretrainedError: unknown name (the message lists the available ones), missing or malformed file.
        PretrainedIntegrityError: the weights' SHA-256 differs from the card's (the file was not read).
    """
    info = card(name, directory)
    folder = _dir(directory)
    weights = info["weights"]
    path = folder / str(weights.get("file", f"{name}.pt"))
    if path.parent != folder or not path.is_file():
        raise PretrainedError(f"weights of {name!r} not found: {path}")
    digest = sha256(path)
    if digest != str(weights.get("sha256", "")).lower():
        raise PretrainedIntegrityError(
            f"{path} does not match its model card (sha256 {digest[:16]}..., card says "
            f"{str(weights.get('sha256', ''))[:16]}...): the file is damaged or was altered, and was not read. "
            f"Reinstall abp to restore it.")
    import torch

    from .train import AtomisticTask

    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a hash-matching file that still fails is a packaging bug
        raise PretrainedError(f"{path} could not be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise PretrainedError(f"{path} is not an abp pretrained model ({FORMAT})")
    task = AtomisticTask(**blob["hparams"])
    task.load_state_dict(blob["state_dict"])
    task.eval()
    task.card = info
    return task


def resolve(model_or_checkpoint: Union[str, Path, Any], map_location: str = "cpu"):
    """A shipped model name, a checkpoint path (``abp train``'s ``best.ckpt``) or a loaded task -> task.

    Shipped models carry their card as ``task.card``; checkpoints get ``task.card = None``.
    """
    from .train import AtomisticTask, load_task

    if isinstance(model_or_checkpoint, AtomisticTask):
        if not hasattr(model_or_checkpoint, "card"):
            model_or_checkpoint.card = None
        return model_or_checkpoint
    text = str(model_or_checkpoint)
    path = Path(text)
    if path.is_file():
        task = load_task(path, map_location=map_location)
        task.card = None
        return task
    if text in available():
        return load(text, map_location=map_location)
    raise PretrainedError(f"{text!r} is neither a shipped model nor a checkpoint file; shipped models: "
                          f"{', '.join(available()) or 'none'} (list them with `abp models`)")


def table(directory: Optional[Union[str, Path]] = None):
    """One row per shipped model: name, target, readout, test MAE/RMSE (meV), the paper's row, epochs, time."""
    import pandas as pd

    rows = []
    for name in available(directory):
        c = card(name, directory)
        test = c.get("metrics", {}).get("test", {})
        paper = c.get("paper_table1", {})
        rows.append({
            "name": name, "target": c["target"]["name"], "readout": c["model"]["readout"],
            "test_mae_meV": test.get("mae_meV"), "test_rmse_meV": test.get("rmse_meV"),
            "paper_mae_meV": paper.get("same_readout_mean"), "epochs": c["training"]["epochs"],
            "train_min": round(c["training"]["train_time_s"] / 60, 1), "parameters": c["model"]["num_parameters"],
            "MB": round(c["weights"]["bytes"] / 1e6, 2),
        })
    return pd.DataFrame(rows, columns=["name", "target", "readout", "test_mae_meV", "test_rmse_meV", "paper_mae_meV",
                                       "epochs", "train_min", "parameters", "MB"])


# ------------------------------------------------------------------------------------------------
# the reproducibility check: test molecules of the split among the first CHECK_ROWS rows of QM9
# ------------------------------------------------------------------------------------------------
def check_indices(info: Dict[str, Any], n_molecules: int) -> np.ndarray:
    """Dataset rows of the card's check subset: the split's test rows that are ``< CHECK_ROWS``, sorted.

    The split is recomputed from the card (``torch.utils.data.random_split`` semantics, the paper's
    seed), so the check also confirms that the split is the one the card names.
    """
    from .data import paper_split

    split = info["split"]
    if split["kind"] != "paper":
        raise PretrainedError(f"{info['name']}: check_indices needs a paper split, got {split['kind']!r}")
    _, _, test = paper_split(info["data"]["dataset"], int(split["seed"]), n=n_molecules)
    test = np.asarray(test)
    rows = int(info.get("check", {}).get("rows_below", CHECK_ROWS))
    return np.sort(test[test < rows])


# ------------------------------------------------------------------------------------------------
# export (used by experiments/train_pretrained.py)
# ------------------------------------------------------------------------------------------------
def _paper_row(dataset: str, target: str, backbone: str, readout: str) -> Dict[str, Any]:
    import pandas as pd

    from importlib import resources

    with resources.files("abp_core").joinpath("reference/paper_table1.csv").open("r", encoding="utf-8") as fh:
        df = pd.read_csv(fh)
    task = {"homo": "HOMO – DFT", "lumo": "LUMO – DFT"}.get(target)
    row = df[(df["dataset"].str.lower() == dataset) & (df["task"] == task)]
    if row.empty:
        return {}
    r = row.iloc[0]
    bb = {"schnet": "schnet", "dimenet++": "dimenetpp"}[backbone]
    out = {"source": "abp_core/reference/paper_table1.csv", "dataset": r["dataset"], "task": task,
           "unit": "meV", "backbone": backbone,
           "sum_mean": float(r[f"{bb}_sum_mean"]), "sum_std": float(r[f"{bb}_sum_std"]),
           "abp_mean": float(r[f"{bb}_abp_mean"]), "abp_std": float(r[f"{bb}_abp_std"])}
    if readout in ("sum", "abp"):
        out["same_readout_mean"], out["same_readout_std"] = out[f"{readout}_mean"], out[f"{readout}_std"]
    else:
        out["same_readout_mean"] = out["same_readout_std"] = None
        out["note_readout"] = f"Table 1 has no {readout.upper()} row (sum and ABP only)"
    return out


def _mev(block: Dict[str, float], unit: str) -> Dict[str, float]:
    factor = {"eV": 1000.0, "meV": 1.0}.get(unit)
    if factor is None:
        raise PretrainedError(f"cannot express {unit!r} in meV")
    return {"mae_meV": round(block["mae"] * factor, 3), "rmse_meV": round(block["rmse"] * factor, 3),
            "max_error_meV": round(block["max_error"] * factor, 1), "r2": round(block["r2"], 5), "n": block["n"]}


def _size_stats(dataset, rows: np.ndarray) -> Dict[str, int]:
    import torch

    ptr = dataset.slices["z"]
    counts = (ptr[1:] - ptr[:-1]).numpy()
    heavy_atom = (dataset._data.z > 1).to(torch.int64)
    heavy = torch.zeros(len(counts), dtype=torch.int64).index_add_(
        0, torch.repeat_interleave(torch.arange(len(counts)), torch.as_tensor(counts)), heavy_atom).numpy()
    rows = np.asarray(rows)
    return {"max_atoms": int(counts[rows].max()), "max_heavy_atoms": int(heavy[rows].max()),
            "median_heavy_atoms": int(np.median(heavy[rows]))}


def export_run(run_dir: Union[str, Path], name: str, *, epoch_log: Sequence[Dict[str, Any]] = (),
               measure_log: Sequence[Dict[str, Any]] = (), budget_minutes: Optional[float] = None,
               script: str = "experiments/train_pretrained.py",
               directory: Optional[Union[str, Path]] = None) -> Path:
    """Write ``<name>.pt`` (weights of ``run_dir/best.ckpt``) and ``<name>.json`` (its card); returns the card.

    The card's numbers come from the run's ``metrics.json`` (test metrics of the best-validation
    checkpoint over the whole test split) and ``predictions_test.csv`` (the check subset's MAE).
    """
    import pandas as pd

    from .train import load_task

    run_dir = Path(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    cfg = metrics["config"]
    task = load_task(run_dir / "best.ckpt")
    folder = _dir(directory)
    write_weights(task, name, folder)

    target, unit = metrics["target_names"][0], metrics["target_units"][0]
    data_cfg, model_cfg, trainer_cfg = cfg["data"], cfg["model"], cfg["trainer"]
    from .config import Config
    from .train import AtomisticDataModule

    dm = AtomisticDataModule(Config.from_dict(cfg))  # the trainer's own dataset and split
    dm.setup()
    ds, train_rows = dm.dataset, dm.split_indices["train"]
    preds = pd.read_csv(run_dir / "predictions_test.csv")
    preds = preds[(preds["weights"] == "best") & (preds["target"] == target)]
    sub = preds[preds["idx"] < CHECK_ROWS]
    factor = 1000.0 if unit == "eV" else 1.0
    check_mae = float(np.mean(np.abs(sub["y_pred"] - sub["y_true"]))) * factor
    secs = [float(r["seconds"]) for r in epoch_log]
    rows_hist = pd.read_csv(run_dir / "history.csv") if (run_dir / "history.csv").exists() else None
    info = {
        "name": name,
        "format": FORMAT,
        "description": f"SchNet + {model_cfg['readout'].upper()} readout predicting the QM9 {target.upper()} energy "
                       f"({unit}) of a neutral, closed-shell organic molecule (H, C, N, O, F; up to 9 heavy atoms "
                       f"in training) from its 3D geometry (B3LYP-like; RDKit/MMFF or GFN2-xTB geometries are "
                       f"approximations of QM9's DFT geometries).",
        "target": {"name": target, "unit": unit, "dataset_column": metrics["target_indices"][0],
                   "definition": f"QM9 {target.upper()} energy, B3LYP/6-31G(2df,p) (Ramakrishnan et al. 2014)"},
        "model": {"backbone": model_cfg["backbone"], "readout": model_cfg["readout"],
                  "backbone_hparams": model_cfg["backbone_hparams"],
                  "readout_hparams": task.cfg.model.readout_kwargs(),
                  "num_parameters": int(sum(p.numel() for p in task.parameters()))},
        "config": cfg,
        "data": {"dataset": data_cfg["dataset"], "source": "qm9pack 1.0.3 (embedded in the PyPI package, no download)",
                 "molecules": len(ds), "train_elements": metrics["train_elements"],
                 "charge": 0, "spin": "closed shell", **_size_stats(ds, train_rows)},
        "split": {"kind": data_cfg["split"], "seed": int(data_cfg["split_seed"]), "sizes": metrics["split_sizes"],
                  "how": "the paper's code: torch.utils.data.random_split(range(n), [int(0.8 n), int(0.1 n), "
                         "int(0.1 n) + 1], torch.Generator().manual_seed(seed)); abp_core.data.paper_split"},
        "training": {"script": script, "epochs": int(metrics["epochs_trained"]), "best_epoch": metrics["best_epoch"],
                     "stopped_early": metrics["stopped_early"], "train_time_s": round(metrics["train_time_s"], 1),
                     "wall_time_s": round(metrics["wall_time_s"], 1),
                     "epoch_times_s": [round(s, 1) for s in secs],
                     "mean_epoch_time_s": round(float(np.mean(secs)), 1) if secs else None,
                     "load_average_per_epoch": ([round(float(r["loadavg"]), 2) for r in epoch_log]
                                                if epoch_log and all("loadavg" in r for r in epoch_log) else None),
                     "epoch_time_note": "wall-clock seconds on a machine shared with other jobs (2 cores): "
                                        "their load (load_average_per_epoch, where logged) stretches them; "
                                        "measured_step_s is the one-thread step time measured before training",
                     "val_mae_per_epoch_eV": ([round(float(v), 5) for v in rows_hist.filter(like="val_mae").iloc[:, 0]]
                                              if rows_hist is not None else None),
                     "torch_threads": int(epoch_log[0].get("threads", 1)) if epoch_log else None,
                     "measured_step_s": measure_log[0]["s_per_step"] if measure_log else None,
                     "hardware": f"{_cpu_name()}, {os.cpu_count()} cores shared with other jobs, no GPU",
                     "budget": (f"all shipped models together: about {budget_minutes:.0f} minutes of one-thread training "
                                f"on a shared 2-core machine (the issue allowed up to two hours on 2 cores); width, "
                                f"depth and epochs were chosen from the measured step time. The paper trained "
                                f"SchNet 256/256/8 with early stopping on a GPU." if budget_minutes else None)},
        "metrics": {"weights": "best validation-loss checkpoint (best.ckpt)",
                    "test": _mev(metrics["metrics"]["test_best"][target], unit),
                    "val": _mev(metrics["metrics"]["val_best"][target], unit),
                    "test_last_epoch": _mev(metrics["metrics"]["test_last"][target], unit)},
        "paper_table1": _paper_row(data_cfg["dataset"], target, model_cfg["backbone"], model_cfg["readout"]),
        "check": {"rows_below": CHECK_ROWS, "n": int(len(sub)), "mae_meV": round(check_mae, 2),
                  "what": f"test molecules of the split among the first {CHECK_ROWS} rows of QM9, predicted by "
                          f"the trainer's evaluation of best.ckpt; tests/test_pretrained.py re-predicts them "
                          f"from the shipped weights"},
        "versions": metrics["versions"],
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    card_path = write_card(info, folder)
    _write_index(folder)
    return card_path


def write_weights(task, name: str, directory: Optional[Union[str, Path]] = None) -> Path:
    """``<name>.pt``: the task's hyperparameters and state dict (tensors and plain types only, readable with
    ``torch.load(weights_only=True)``), written atomically."""
    import torch

    from .files import atomic_open

    if not is_model_name(name):
        raise PretrainedError(f"{name!r} is not a model name qm9-<target>-<readout>")
    path = _dir(directory) / f"{name}.pt"
    state = {k: v.detach().cpu().contiguous() for k, v in task.state_dict().items()}
    with atomic_open(path) as fh:
        torch.save({"format": FORMAT, "name": name, "hparams": dict(task.hparams), "state_dict": state}, fh)
    path.chmod(0o644)
    return path


def write_card(info: Dict[str, Any], directory: Optional[Union[str, Path]] = None) -> Path:
    """``<name>.json`` with the SHA-256 and size of ``<name>.pt`` (which must exist) filled in."""
    from .files import write_text

    folder = _dir(directory)
    weights = folder / f"{info['name']}.pt"
    info = dict(info)
    info["weights"] = {"file": weights.name, "sha256": sha256(weights), "bytes": weights.stat().st_size}
    path = write_text(folder / f"{info['name']}.json",
                      json.dumps(info, indent=2, ensure_ascii=False, default=_json_default) + "\n")
    path.chmod(0o644)
    return path


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or f"{platform.machine()} CPU"


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return None if math.isnan(float(value)) else float(value)
    return str(value)


def _write_index(folder: Path) -> None:
    """``README.md`` of the model folder: one table of the cards (written from them, never by hand)."""
    from .files import write_text

    lines = ["# Shipped models (generated from the model cards by abp_core.pretrained.export_run)", "",
             "Trained by `experiments/train_pretrained.py` on the full QM9 (qm9pack) with the paper's split "
             "seed 844249 (80/10/10). Test metrics in meV over the whole test split (best validation "
             "checkpoint), beside the paper's Table 1 (SchNet 256/256/8, early stopping, GPU; mean over 5 splits).",
             "", "| model | params | epochs | train min | test MAE | test RMSE | paper sum | paper ABP | sha256 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in available(folder):
        c = card(name, folder)
        t, p = c["metrics"]["test"], c.get("paper_table1", {})
        lines.append(f"| {name} | {c['model']['num_parameters']:,} | {c['training']['epochs']} | "
                     f"{c['training']['train_time_s'] / 60:.1f} | {t['mae_meV']:.1f} | {t['rmse_meV']:.1f} | "
                     f"{p.get('sum_mean', float('nan')):.1f} | {p.get('abp_mean', float('nan')):.1f} | "
                     f"`{c['weights']['sha256'][:12]}` |")
    write_text(folder / "README.md", "\n".join(lines) + "\n").chmod(0o644)
