"""Shared logic of ``00_quickstart`` and ``08_attention_vs_orbitals``: train readouts, then compare the
atoms a readout attends to with where the frontier orbital lives.

>>> runs = train_readouts(["sum", "wa", "abp"], n_molecules=4000, epochs=12, runs_dir="outputs/runs")
>>> print(runs.text_table())                     # test MAE per readout
>>> study = attention_study(runs)                # GFN2-xTB HOMO shares for the test molecules
>>> print(study.text())                          # agreement vs a random-weights readout
>>> study.view(study.picks()["best agreement"][0])   # py3Dmol: attention | HOMO, one colour scale

Orbital coefficients: when the dataset carries per-atom HOMO coefficients (OE62 from Chen et al.'s db,
``homo_coeff``) those are used; otherwise they are computed for just the analysed molecules with
GFN2-xTB (:mod:`abp_core.orbitals`, a few ms per molecule).

Figures are plotly / py3Dmol objects (interactive in JupyterLab) and :func:`save_figure_files` /
:meth:`AttentionStudy.save_views` write standalone HTML (3Dmol.js inlined when a local copy exists, so
the pages work offline) plus a PNG where possible (plotly via kaleido, else both via headless Chromium
if installed; skipped otherwise).
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from .notebooks import quiet_training_logs, resolve_data_root

__all__ = [
    "ReadoutRuns",
    "train_readouts",
    "AttentionStudy",
    "attention_study",
    "save_figure_files",
    "html_to_png",
    "find_chromium",
    "choose_dataset",
    "DEFAULT_TARGETS",
]

log = logging.getLogger(__name__)

#: HOMO target per dataset (the quickstart's and the showcase's default).
DEFAULT_TARGETS = {"qm9": "homo", "qm7b": 5, "oe62": "HOMO"}
_READOUT_NAMES = {"sum": "sum", "mean": "mean", "max": "max", "wa": "WA", "owa": "OWA", "abp": "ABP"}


def _milli(unit: str) -> Tuple[float, str]:
    """Factor and unit to show errors in (meV for eV, mHa for Ha)."""
    u = (unit or "").strip()
    if u.lower() == "ev":
        return 1000.0, "meV"
    if u.lower() in ("ha", "hartree"):
        return 1000.0, "mHa"
    return 1.0, u


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


# ================================================================================================
# Attention vs orbital coefficients
# ================================================================================================
def _rows_by_idx(dataset) -> Dict[int, int]:
    data = getattr(dataset, "_data", None)
    if getattr(dataset, "_indices", None) is None and data is not None and getattr(data, "idx", None) is not None:
        ids = np.asarray(data.idx).reshape(-1)
        if ids.size == len(dataset):
            return {int(v): r for r, v in enumerate(ids.tolist())}
    return {int(dataset[r].idx): r for r in range(len(dataset))}


@dataclass
class AttentionStudy:
    """Readout weights next to orbital coefficients for a set of (test) molecules.

    Attributes:
        molecules: one row per molecule: ``idx, name, smiles, n_atoms, y_true`` and per readout
            ``y_pred_<ro>``, ``abs_error_<ro>`` (physical units).
        z, pos, coefficients: per molecule (keyed by ``idx``).
        weights: readout -> idx -> per-atom weights.
        agreement: readout -> :func:`abp_core.agreement.per_molecule_agreement` table.
        baseline: :func:`abp_core.agreement.random_baseline` (Dirichlet(1) weights) for the same molecules.
        summaries: readout -> :func:`abp_core.agreement.summarise` table.
    """

    dataset_name: str
    target: str
    unit: str
    coefficient_label: str
    molecules: pd.DataFrame
    z: Dict[int, np.ndarray]
    pos: Dict[int, np.ndarray]
    coefficients: Dict[int, np.ndarray]
    weights: Dict[str, Dict[int, np.ndarray]]
    agreement: Dict[str, pd.DataFrame]
    baseline: pd.DataFrame
    summaries: Dict[str, pd.DataFrame]
    failed: List[Tuple[int, str]] = field(default_factory=list)
    coefficient_seconds: float = 0.0

    # ---- tables ---------------------------------------------------------------------------------
    @property
    def readouts(self) -> List[str]:
        return list(self.weights)

    def summary_table(self) -> pd.DataFrame:
        """Per readout and statistic: mean over molecules [95% CI], random-weights mean, p, beats random."""
        rows = []
        for ro, s in self.summaries.items():
            for _, r in s.iterrows():
                rows.append({"readout": _READOUT_NAMES.get(ro, ro), "statistic": r["statistic"],
                             "molecules": r["n_molecules"], "mean": r["mean"],
                             "95% CI": f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]",
                             "random weights": r["baseline_mean"], "p (one-sided)": r["p_value"],
                             "beats random": r["beats_random"]})
        return pd.DataFrame(rows)

    def text(self) -> str:
        n = len(self.molecules)
        lines = [f"Agreement of readout weights with {self.coefficient_label} over {n} test molecules "
                 f"(per-molecule statistics; random = Dirichlet(1) weights):"]
        with pd.option_context("display.width", 160, "display.max_columns", 20):
            lines.append(self.summary_table().to_string(index=False, float_format=lambda v: f"{v:.3g}"))
        lines.append("pearson_r / spearman_rho: correlation over a molecule's atoms; top1_match: the most "
                     "attended atom carries the largest coefficient; l1: sum |w - c| (lower is better).")
        if self.failed:
            lines.append(f"{len(self.failed)} molecule(s) left out: orbital calculation failed "
                         f"(first: idx {self.failed[0][0]}: {self.failed[0][1][:120]})")
        return "\n".join(lines)

    def results_json(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"n_molecules_analysed": int(len(self.molecules)),
                               "coefficients": self.coefficient_label, "n_orbital_failures": len(self.failed)}
        for ro, s in self.summaries.items():
            for _, r in s.iterrows():
                key = f"{ro}_{r['statistic']}"
                out[key] = None if not np.isfinite(r["mean"]) else float(r["mean"])
                out[f"random_{r['statistic']}"] = None if not np.isfinite(r["baseline_mean"]) else float(r["baseline_mean"])
                out[f"{key}_beats_random"] = r["beats_random"]
        return out

    # ---- picking molecules ------------------------------------------------------------------------
    def picks(self, readout: Optional[str] = None, k: int = 3) -> Dict[str, List[int]]:
        """``{"best agreement", "worst agreement", "largest error"}`` -> up to ``k`` molecule idx each.

        Agreement is the per-molecule Pearson r of ``readout`` (default: ABP if trained, else the first
        weighted readout) with the coefficients; error is that readout's absolute test error.
        """
        ro = readout or ("abp" if "abp" in self.weights else self.readouts[0])
        agr = self.agreement[ro].dropna(subset=["pearson_r"]).sort_values("pearson_r", kind="stable")
        err_col = f"abs_error_{ro}"
        by_err = self.molecules.sort_values(err_col, ascending=False, kind="stable") \
            if err_col in self.molecules else self.molecules.iloc[:0]
        return {"best agreement": [int(i) for i in agr["molecule"].iloc[::-1][:k]],
                "worst agreement": [int(i) for i in agr["molecule"].iloc[:k]],
                "largest error": [int(i) for i in by_err["idx"].iloc[:k]]}

    def showcase(self, n: int = 3, readout: Optional[str] = None) -> List[int]:
        """``n`` distinct molecules taken in turn from the best-agreement, worst-agreement and
        largest-error lists (what the quickstart shows in 3D)."""
        lists = list(self.picks(readout, k=max(n, 1)).values())
        out: List[int] = []
        for rank in range(max(n, 1)):
            for ids in lists:
                if rank < len(ids) and ids[rank] not in out and len(out) < n:
                    out.append(ids[rank])
        return out

    def describe(self, idx: int, readout: Optional[str] = None) -> str:
        """One line about a molecule: name, size, errors, agreement."""
        ro = readout or ("abp" if "abp" in self.weights else self.readouts[0])
        row = self.molecules.set_index("idx").loc[int(idx)]
        factor, unit = _milli(self.unit)
        parts = [f"{row['name']} (idx {idx}, {int(row['n_atoms'])} atoms)"]
        for r in self.readouts:
            col = f"abs_error_{r}"
            if col in row and np.isfinite(row[col]):
                parts.append(f"|error| {_READOUT_NAMES.get(r, r)} {row[col] * factor:.0f} {unit}")
        agr = self.agreement[ro].set_index("molecule").loc[int(idx)]
        r_text = "n/a" if not np.isfinite(agr["pearson_r"]) else f"{agr['pearson_r']:.2f}"
        parts.append(f"r({_READOUT_NAMES.get(ro, ro)}, orbital) = {r_text}")
        return " · ".join(parts)

    # ---- figures ------------------------------------------------------------------------------------
    def view(self, idx: int, readouts: Optional[Sequence[str]] = None, *, labels: Union[bool, int] = 3,
             panel_width: int = 330, height: int = 320, js_url: Optional[str] = None):
        """py3Dmol view of one molecule: each readout's weights and the orbital coefficients side by
        side, on ONE colour scale (equal colours = equal values), labels on the top atoms."""
        from .viz import side_by_side

        idx = int(idx)
        panels = {f"{_READOUT_NAMES.get(r, r)} attention": self.weights[r][idx] for r in (readouts or self.readouts)}
        panels[self.coefficient_label] = self.coefficients[idx]
        return side_by_side(self.z[idx], self.pos[idx], panels, title=self.describe(idx), labels=labels,
                            panel_width=panel_width, height=height, js_url=js_url,
                            value_label="attention weight / orbital share")

    def records(self, readout: Optional[str] = None) -> pd.DataFrame:
        """Per-atom table (molecule, atom, element, coefficient, weight) for the scatter plot."""
        from .viz import atom_records

        ro = readout or ("abp" if "abp" in self.weights else self.readouts[0])
        ids = [int(i) for i in self.molecules["idx"]]
        z = np.concatenate([self.z[i] for i in ids])
        w = np.concatenate([self.weights[ro][i] for i in ids])
        c = np.concatenate([self.coefficients[i] for i in ids])
        batch = np.repeat(np.arange(len(ids)), [self.z[i].size for i in ids])
        names = self.molecules["name"].astype(str).tolist()
        return atom_records(z, w, c, batch, mol_ids=names)

    def scatter(self, readout: Optional[str] = None):
        from .viz import scatter_attention_vs_coefficients

        ro = readout or ("abp" if "abp" in self.weights else self.readouts[0])
        return scatter_attention_vs_coefficients(
            self.records(ro), title=f"{_READOUT_NAMES.get(ro, ro)} attention vs {self.coefficient_label} "
                                    f"({len(self.molecules)} test molecules)",
            x_label=f"{self.coefficient_label} (share on atom)", y_label=f"{_READOUT_NAMES.get(ro, ro)} attention weight")

    def agreement_figure(self, statistic: str = "pearson_r"):
        """Per-molecule distribution of a statistic for every readout and for random weights (box plot)."""
        import plotly.graph_objects as go

        fig = go.Figure()
        for ro, df in self.agreement.items():
            fig.add_trace(go.Box(y=df[statistic], name=f"{_READOUT_NAMES.get(ro, ro)} attention", boxmean=True))
        fig.add_trace(go.Box(y=self.baseline[statistic], name="random weights (Dirichlet(1))", boxmean=True))
        fig.update_layout(title=f"Per-molecule {statistic} with {self.coefficient_label}",
                          yaxis_title=statistic, template="plotly_white", width=640, height=420, showlegend=False)
        return fig

    def picker(self, readout: Optional[str] = None, k: int = 5):
        """An ipywidgets molecule picker (best/worst agreement, largest error) showing :meth:`view`."""
        import ipywidgets as widgets

        options = []
        for category, ids in self.picks(readout, k).items():
            for rank, i in enumerate(ids, 1):
                name = self.molecules.set_index("idx").loc[i, "name"]
                options.append((f"{category} #{rank}: {name}", i))
        if not options:
            return widgets.HTML("no molecules to pick from")
        dropdown = widgets.Dropdown(options=options, description="molecule", layout=widgets.Layout(width="520px"))
        out = widgets.Output()

        def show(change=None):
            out.clear_output(wait=True)
            with out:
                self.view(dropdown.value).show()  # py3Dmol: show() (display() adds a text repr)

        dropdown.observe(show, names="value")
        show()
        return widgets.VBox([dropdown, out])

    def save_views(self, output_dir: Union[str, os.PathLike], ids: Sequence[int], *, png: bool = False,
                   prefix: str = "view") -> List[Path]:
        """Standalone HTML of :meth:`view` for each molecule (offline when a local 3Dmol.js exists)
        and, with ``png=True``, a PNG rendered by headless Chromium where available."""
        from .viz import local_3dmol_js, save_html

        folder = Path(output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        inline = local_3dmol_js() is not None
        paths = []
        for i in ids:
            view = self.view(i)
            name = str(self.molecules.set_index("idx").loc[int(i), "name"])
            path = save_html(view, folder / f"{prefix}_{_safe(name)}.html", inline_js=inline)
            paths.append(path)
            if png:
                panels = len(view.abp.panels) if getattr(view, "abp", None) is not None else 2
                html_to_png(path, path.with_suffix(".png"), size=(panels * 330 + 40, 460))
        return paths


def _safe(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80] or "molecule"


def _weights_per_molecule(task, z_list, pos_list, batch_size: int = 128) -> List[np.ndarray]:
    import torch
    from torch_geometric.data import Batch, Data

    out: List[np.ndarray] = []
    task.eval()
    with torch.no_grad():
        for lo in range(0, len(z_list), batch_size):
            items = [Data(z=torch.as_tensor(z, dtype=torch.long), pos=torch.as_tensor(p, dtype=torch.float32))
                     for z, p in zip(z_list[lo:lo + batch_size], pos_list[lo:lo + batch_size])]
            batch = Batch.from_data_list(items)
            w = task.model.atom_weights(batch).double().cpu().numpy()
            ptr = batch.ptr.cpu().numpy()
            out += [w[ptr[k]:ptr[k + 1]] for k in range(len(items))]
    return out


def attention_study(runs: ReadoutRuns, readouts: Optional[Sequence[str]] = None, *,
                    max_molecules: Optional[int] = None, orbital: str = "homo", method: str = "gfn2-xtb",
                    coefficients: str = "auto", n_draws: int = 1000, seed: int = 0,
                    verbose: bool = True) -> AttentionStudy:
    """Readout weights vs orbital coefficients on the test molecules of ``runs``.

    Args:
        readouts: weighted readouts to analyse (default: every trained one of WA/OWA/ABP).
        max_molecules: analyse at most this many test molecules (default: all).
        orbital / method: what :func:`abp_core.orbitals.compute_orbitals` computes (GFN2-xTB HOMO).
        coefficients: ``"auto"`` (the dataset's ``homo_coeff`` if it has them, else computed),
            ``"dataset"`` or ``"computed"``.
        n_draws / seed: random-weights baseline (:func:`abp_core.agreement.random_baseline`).
    """
    from .agreement import per_molecule_agreement, random_baseline, summarise
    from .orbitals import compute_orbitals

    weighted = [r for r in runs.results if r in ("wa", "owa", "abp")]
    readouts = list(readouts) if readouts is not None else weighted
    bad = [r for r in readouts if r not in weighted]
    if bad or not readouts:
        raise ValueError(f"attention needs a trained weighted readout (wa, owa, abp); got {readouts}, "
                         f"trained: {list(runs.results)}")
    preds = {ro: runs.predictions(ro) for ro in runs.results}
    test = preds[readouts[0]]
    if max_molecules is not None:
        test = test.iloc[:max_molecules]
    ds = runs.dataset
    row_of = _rows_by_idx(ds)
    has_coeff = coefficients in ("auto", "dataset") and orbital == "homo" and \
        getattr(ds[row_of[int(test["idx"].iloc[0])]], "homo_coeff", None) is not None
    if coefficients == "dataset" and not has_coeff:
        raise ValueError(f"{runs.dataset_name} carries no per-atom homo_coeff; use coefficients='computed'")
    label = "HOMO coefficients (dataset)" if has_coeff else f"{'GFN2-xTB' if method == 'gfn2-xtb' else method} " \
                                                              f"{orbital.upper()} share"
    z_of, pos_of, c_of, names, smiles, failed = {}, {}, {}, {}, {}, []
    t0 = time.perf_counter()
    for idx in test["idx"].astype(int):
        d = ds[row_of[idx]]
        z = d.z.numpy().astype(np.int64)
        pos = d.pos.double().numpy()
        if has_coeff:
            c = np.asarray(d.homo_coeff, dtype=np.float64).clip(min=0)
            c = c / c.sum() if c.sum() > 0 else c
        else:
            try:
                c = compute_orbitals(z, pos, (orbital,), method, name=str(getattr(d, "name", idx)))
                c = next(iter(c.values())).coefficients
            except (ValueError, RuntimeError) as exc:  # OrbitalCalculationError is a ValueError
                failed.append((idx, str(exc)))
                continue
        z_of[idx], pos_of[idx], c_of[idx] = z, pos, c
        names[idx] = str(getattr(d, "name", idx))
        smiles[idx] = str(getattr(d, "smiles", ""))
    seconds = time.perf_counter() - t0
    ids = list(z_of)
    if not ids:
        raise RuntimeError(f"no molecule could be analysed: every orbital calculation failed ({failed[:1]})")
    if verbose and not has_coeff:
        print(f"  {label}: {len(ids)} molecules in {seconds:.1f} s"
              + (f", {len(failed)} failed" if failed else ""), flush=True)
    mol = pd.DataFrame({"idx": ids, "name": [names[i] for i in ids], "smiles": [smiles[i] for i in ids],
                        "n_atoms": [z_of[i].size for i in ids]})
    for ro, p in preds.items():
        p = p.drop_duplicates("idx").set_index("idx")
        if "y_true" not in mol:
            mol["y_true"] = p.reindex(ids)["y_true"].to_numpy()
        mol[f"y_pred_{ro}"] = p.reindex(ids)["y_pred"].to_numpy()
        mol[f"abs_error_{ro}"] = (mol[f"y_pred_{ro}"] - mol["y_true"]).abs()
    weights: Dict[str, Dict[int, np.ndarray]] = {}
    for ro in readouts:
        task = runs.task(ro)
        w = _weights_per_molecule(task, [z_of[i] for i in ids], [pos_of[i] for i in ids])
        weights[ro] = dict(zip(ids, w))
    batch = np.repeat(np.arange(len(ids)), [z_of[i].size for i in ids])
    c_all = np.concatenate([c_of[i] for i in ids])
    base = random_baseline(c_all, batch, n_draws=n_draws, seed=seed, mol_ids=ids)
    agreement, summaries = {}, {}
    for ro in readouts:
        w_all = np.concatenate([weights[ro][i] for i in ids])
        agreement[ro] = per_molecule_agreement(w_all, c_all, batch, mol_ids=ids)
        summaries[ro] = summarise(agreement[ro], base, seed=seed)
    return AttentionStudy(dataset_name=runs.dataset_name, target=runs.target, unit=runs.unit,
                          coefficient_label=label, molecules=mol, z=z_of, pos=pos_of, coefficients=c_of,
                          weights=weights, agreement=agreement, baseline=base, summaries=summaries,
                          failed=failed, coefficient_seconds=seconds)


# ================================================================================================
# Files: HTML + PNG
# ================================================================================================
def find_chromium() -> Optional[str]:
    """A headless-capable Chromium (``$CHROMIUM``, ``/usr/bin/chromium``, or on the PATH), else None."""
    for cand in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                 shutil.which("chromium-browser"), shutil.which("google-chrome")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def html_to_png(html_path: Union[str, os.PathLike], png_path: Union[str, os.PathLike],
                size: Tuple[int, int] = (900, 600), timeout: float = 120.0) -> Optional[Path]:
    """Screenshot a local HTML page with headless Chromium (software WebGL, no network).

    Returns the PNG path, or None (logged) when Chromium is missing or fails.
    """
    chromium = find_chromium()
    if chromium is None:
        log.info("PNG of %s skipped: no Chromium found (bash scripts/browser_deps.sh installs it)", html_path)
        return None
    html_path, png_path = Path(html_path).resolve(), Path(png_path).resolve()
    with tempfile.TemporaryDirectory(prefix="abp-chromium-") as profile:
        args = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--host-resolver-rules=MAP * ~NOTFOUND",
                "--hide-scrollbars", f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}",
                "--virtual-time-budget=8000", f"--screenshot={png_path}", html_path.as_uri()]
        try:
            proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("PNG of %s skipped: Chromium failed (%s)", html_path.name, exc)
            return None
    if proc.returncode != 0 or not png_path.is_file():
        log.warning("PNG of %s skipped: Chromium exited with %s", html_path.name, proc.returncode)
        return None
    return png_path


def save_figure_files(fig, path: Union[str, os.PathLike], *, png: bool = True,
                      size: Tuple[int, int] = (760, 520)) -> Dict[str, Optional[Path]]:
    """Standalone HTML of a plotly figure (plotly.js inlined: works offline) and a PNG where possible
    (kaleido if installed, else headless Chromium)."""
    from .viz import save_figure

    out = save_figure(fig, path, png=png)
    if png and out.get("png") is None:
        out["png"] = html_to_png(out["html"], Path(out["html"]).with_suffix(".png"), size=size)
    return out
