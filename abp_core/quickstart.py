"""The quickstart's training: one small SchNet per readout on the same molecules, split and seed.

>>> runs = train_readouts(["sum", "wa", "abp"], n_molecules=4000, epochs=12, runs_dir="outputs/runs")
>>> print(runs.text_table())                     # test MAE per readout
>>> from abp_core.attribution_study import attribution_study
>>> study = attribution_study(runs)              # attributions vs GFN2-xTB orbital shares

Used by ``00_quickstart`` and ``08_attention_vs_orbitals``; the study of attributions against orbital
coefficients lives in :mod:`abp_core.attribution_study`.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import pandas as pd

from .notebooks import quiet_training_logs, resolve_data_root
from .stats import milli_unit as _milli

__all__ = ["ReadoutRuns", "train_readouts", "choose_dataset", "DEFAULT_TARGETS"]

log = logging.getLogger(__name__)

#: HOMO target per dataset (the quickstart's and the showcase's default).
DEFAULT_TARGETS = {"qm9": "homo", "qm7b": 5, "oe62": "HOMO"}
from .readouts import READOUT_LABELS as _READOUT_NAMES  # noqa: E402  (one table of display names)


# ================================================================================================
# Training several readouts on one split
# ================================================================================================
@dataclass
class ReadoutRuns:
    """The runs of :func:`train_readouts` (one per readout, same data, split, seed and backbone)."""

    dataset_name: str
    dataset: Any
    target: str
    unit: str
    results: Dict[str, Any]
    runs_dir: Path
    config: Dict[str, Any] = field(default_factory=dict)

    def table(self) -> pd.DataFrame:
        """Test MAE/RMSE (best validation checkpoint) per readout, in meV (or mHa)."""
        factor, unit = _milli(self.unit)
        rows = []
        for ro, res in self.results.items():
            m = res.metrics
            met = m["metrics"]["test_best"][m["target_names"][0]]
            rows.append({"readout": _READOUT_NAMES.get(ro, ro), f"test MAE ({unit})": met["mae"] * factor,
                         f"test RMSE ({unit})": met["rmse"] * factor, "test R2": met["r2"],
                         "best epoch": m.get("best_epoch"), "epochs": m.get("epochs_trained"),
                         "train time (s)": round(float(m.get("train_time_s") or float("nan")), 1),
                         "parameters": m.get("num_parameters")})
        return pd.DataFrame(rows)

    def text_table(self) -> str:
        df = self.table()
        with pd.option_context("display.width", 160, "display.max_columns", 20):
            return df.to_string(index=False, float_format=lambda v: f"{v:.2f}")

    def histories(self) -> Dict[str, pd.DataFrame]:
        """``history.csv`` of every run (per epoch: losses, validation MAE, time)."""
        out = {}
        for ro, res in self.results.items():
            path = Path(res.run_dir) / "history.csv"
            if path.is_file():
                out[_READOUT_NAMES.get(ro, ro)] = pd.read_csv(path)
        return out

    def learning_curves(self):
        from .viz import learning_curves

        return learning_curves(self.histories(), title=f"{self.dataset_name.upper()} {self.target}: "
                                                       "L1 loss on standardised targets", y_label="L1 loss")

    def mae_chart(self):
        from .viz import mae_bar_chart

        df = self.table()
        col = [c for c in df.columns if c.startswith("test MAE")][0]
        return mae_bar_chart(df, x="readout", y=col, title=f"{self.dataset_name.upper()} {self.target}: test MAE",
                             y_label=col)

    def predictions(self, readout: str) -> pd.DataFrame:
        """Test-set predictions of one run: ``idx, y_true, y_pred``."""
        df = pd.read_csv(Path(self.results[readout].run_dir) / "predictions_test.csv")
        return df[df["weights"] == "best"][["idx", "y_true", "y_pred"]].reset_index(drop=True)

    def task(self, readout: str):
        """The trained model (best validation checkpoint) of one readout, in eval mode."""
        from .train import load_task

        run_dir = Path(self.results[readout].run_dir)
        path = run_dir / "best.ckpt"
        return load_task(path if path.is_file() else run_dir / "last.ckpt")

    def results_json(self) -> Dict[str, Any]:
        factor, unit = _milli(self.unit)
        out = {"dataset": self.dataset_name, "target": self.target, "unit": unit}
        for row in self.table().to_dict(orient="records"):
            ro = row["readout"].lower()
            out[f"test_mae_{ro}"] = row[f"test MAE ({unit})"]
            out[f"epochs_{ro}"] = row["epochs"]
            out[f"train_time_s_{ro}"] = row["train time (s)"]
        return out


def train_readouts(readouts: Sequence[str] = ("sum", "wa", "abp"), *, dataset: str = "qm9",
                   target: Union[str, int, None] = None, n_molecules: Optional[int] = 4000, epochs: int = 12,
                   batch_size: int = 32, lr: float = 5e-4, hidden_channels: int = 64, num_interactions: int = 3,
                   cutoff: float = 5.0, heads: int = 4, seed: int = 0,
                   runs_dir: Union[str, os.PathLike] = "outputs/runs", data_root: Optional[str] = None,
                   download: bool = False, overrides: Sequence[str] = (), dataset_obj: Any = None,
                   verbose: bool = True) -> ReadoutRuns:
    """Train one small SchNet per readout on the same molecules, split and seed.

    Args:
        readouts: e.g. ``("sum", "wa", "abp")``.
        dataset: ``"qm9"`` (embedded; the first ``n_molecules`` rows), ``"qm7b"`` or ``"oe62"``
            (a random subset of ``n_molecules``; ``None`` = all).
        target: target name/index (default: the HOMO, :data:`DEFAULT_TARGETS`).
        epochs: every readout trains exactly this many epochs (a fair comparison).
        hidden_channels / num_interactions / cutoff: SchNet size (filters = hidden channels).
        heads: ABP attention heads.
        runs_dir: trainer output root; a finished run with the same config is reused, not redone.
        overrides: extra ``section.option=value`` config overrides.
        dataset_obj: an already loaded dataset (skips loading).

    Raises:
        abp_core.data.DataNotFoundError: the dataset is not present (and ``download`` is off).
    """
    from .config import Config
    from .data import get_dataset
    from .train import run_training

    quiet_training_logs()
    dataset = dataset.lower()
    target = DEFAULT_TARGETS.get(dataset, 0) if target is None else target
    root = resolve_data_root(data_root)
    loader_kwargs: Dict[str, Any] = {}
    subset = None
    if dataset == "qm9":
        loader_kwargs["max_molecules"] = n_molecules
    elif dataset == "oe62":
        loader_kwargs["source"] = "db"
        subset = n_molecules
    else:
        subset = n_molecules
    if dataset_obj is None:
        dataset_obj = get_dataset(dataset, root=root, download=download, progress=False, **loader_kwargs)
    if subset is not None and subset >= len(dataset_obj):
        subset = None
    runs_dir = Path(runs_dir).expanduser().resolve()
    results = {}
    base = {
        "data": {"dataset": dataset, "targets": [target], "split": "random", "split_seed": seed,
                 "subset": subset, "root": str(root) if root else None, "dataset_kwargs": loader_kwargs},
        "model": {"backbone": "schnet",
                  "backbone_hparams": {"hidden_channels": hidden_channels, "num_filters": hidden_channels,
                                       "num_interactions": num_interactions, "cutoff": cutoff},
                  "readout_hparams": {"abp": {"heads": heads}}},
        "trainer": {"max_epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
                    "output_dir": str(runs_dir), "progress_bar": False},
    }
    configs = {ro: Config.from_dict({**base, "model": {**base["model"], "readout": ro}}, overrides)
               for ro in readouts}  # all validated before the first run
    for ro, cfg in configs.items():
        t0 = time.perf_counter()
        res = run_training(cfg, dataset=dataset_obj)
        results[ro] = res
        if verbose:
            state = "reused finished run" if res.skipped else f"trained in {time.perf_counter() - t0:.0f} s"
            mae = next(iter(res.test_mae.values()))
            factor, unit = _milli(res.metrics.get("target_units", [""])[0])
            print(f"  {_READOUT_NAMES.get(ro, ro):>4}: test MAE {mae * factor:.1f} {unit} ({state}, "
                  f"{res.metrics.get('epochs_trained')} epochs)", flush=True)
    first = next(iter(results.values())).metrics
    return ReadoutRuns(dataset_name=dataset, dataset=dataset_obj, target=first["target_names"][0],
                       unit=first["target_units"][0], results=results, runs_dir=runs_dir,
                       config=configs[readouts[0]].to_dict())


def choose_dataset(dataset: str = "auto", data_root: Optional[str] = None) -> Tuple[str, str]:
    """Resolve the showcase's ``dataset`` parameter: ``(name, message)``.

    ``"auto"`` takes OE62 from Chen et al.'s db (which carries per-atom HOMO coefficients) when it is
    present locally, else the embedded QM9 (coefficients computed with GFN2-xTB); nothing is downloaded.
    """
    name = dataset.strip().lower()
    if name not in ("auto", "qm9", "qm7b", "oe62"):
        raise ValueError(f"dataset must be 'auto', 'qm9', 'qm7b' or 'oe62', got {dataset!r}")
    if name != "auto":
        return name, ""
    from .notebooks import load_dataset

    status = load_dataset("oe62", resolve_data_root(data_root), download=False, source="db")
    if status.available:
        return "oe62", "OE62 (Chen et al.'s db) found: using its per-atom HOMO coefficients."
    first = status.message.splitlines()[0] if status.message else "not present"
    return "qm9", (f"OE62 with Chen et al.'s HOMO coefficients is not available ({first}); using the embedded "
                   "QM9 with GFN2-xTB HOMO shares computed by abp_core.orbitals instead.")
