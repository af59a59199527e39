"""Aggregate finished runs into the paper's tables, next to the paper's own numbers.

* :func:`collect_runs` reads every ``metrics.json`` under a runs directory (one row per run and target).
* :func:`summarize` gives mean +- std over split seeds per (dataset, task, backbone, readout).
* :func:`compare_readouts` puts two readouts side by side with the relative change in %.
* :func:`wilcoxon_readouts` runs a Wilcoxon signed-rank test across tasks (paired per task, each task's
  value the mean over splits), as in the paper's section 4.
* :func:`paired_molecule_test` compares two runs on the same test molecules (Wilcoxon on the
  per-molecule absolute errors), for when there are too few split seeds for a test across splits.
* :func:`paper_table` loads the paper's Tables 1-4 (shipped as package data in ``abp_core/reference``),
  :func:`paper_relative_changes` recomputes the paper's per-task changes, :func:`with_paper` joins
  ours and theirs.

Conventions
-----------
``relative_improvement(baseline, candidate)`` is ``100 * (baseline - candidate) / baseline``: positive
means the candidate's error is lower, as a fraction of the baseline's error. The paper's text
divides by the *candidate* (ABP) instead, ``100 * (sum - abp) / abp`` -- e.g. QM9 HOMO with SchNet:
35.985 vs 29.577 meV is "a decrease of 21.67%" in the paper, 17.81% relative to the sum baseline. Pass
``relative_to="candidate"`` to reproduce the paper's percentages (checked in the tests).

Standard deviations are sample standard deviations (``ddof=1``) over the split seeds.

Two inconsistencies in the paper's own numbers (both visible from the shipped tables):

* the QMugs total-energy changes quoted in the text (58.97% / 19.34%) are relative to the sum
  baseline, unlike every other percentage there;
* Table 4 ("SchNet": sum / WA / ABP on the QM7b HOMO tasks) lists as ABP the *DimeNet++* ABP errors
  of Table 1 (2.342 / 2.022 / 1.678 meV), not the SchNet ABP ones (2.405 / 2.178 / 1.752).

The Wilcoxon p-values quoted in the paper (5.4e-6 SchNet, 1.65e-5 DimeNet++) cannot be recomputed
from Table 1's means: scipy on the 40 paired task means gives 7.0e-8 and 9.3e-7 (the paper's test
presumably ran on per-split values, which were not published).

Paper units: the unit column of Table 1 is as printed. For QM7b (and QM8) the printed "meV" are
milli-Hartree of the released Hartree values (see the reference README); Table 1's row
"Atom. energy – ZINDO/s" is QM7b's atomization energy (DFT/PBE0) -- the paper's text quotes its
changes (23.98% / 58.41%) under that name, and QM7b has no ZINDO/s atomization energy.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

__all__ = [
    "paper_table",
    "paper_relative_changes",
    "relative_improvement",
    "collect_runs",
    "summarize",
    "compare_readouts",
    "wilcoxon_readouts",
    "wilcoxon_test",
    "WilcoxonSummary",
    "with_paper",
    "format_mean_std",
    "paper_layout",
    "paper_task_name",
]

_BACKBONE_COLUMNS = {"schnet": "schnet", "dimenet++": "dimenetpp", "dimenetpp": "dimenetpp"}
_DATASET_LABELS = {"qm7b": "QM7b", "qm8": "QM8", "qm9": "QM9", "qmugs": "QMugs", "md17": "MD17", "oe62": "OE62"}

#: QM7b target (loader order, see abp_core.data.qm7b) -> Table 1 task label.
QM7B_TASKS = [
    "First exc. energy – ZINDO",
    "Electron affinity – ZINDO",
    "Exc. energy at MA – ZINDO",
    "Atom. energy – ZINDO/s",  # the paper's label for the atomization energy (DFT/PBE0); see module doc
    "HOMO – GW",
    "HOMO – PBE0",
    "HOMO – ZINDO/s",
    "MA intensity – ZINDO",
    "Ion. potential – ZINDO/s",
    "LUMO – GW",
    "LUMO – PBE0",
    "LUMO – ZINDO/s",
    "Polarizability – SCS",
    "Polarizability – DFT/PBE0",
]
_QM7B_NAMES = [
    "first excitation energy (zindo)", "electron affinity (zindo/s)",
    "excitation energy at maximal absorption (zindo)", "atomization energy (dft/pbe0)",
    "highest occupied molecular orbital (gw)", "highest occupied molecular orbital (pbe0)",
    "highest occupied molecular orbital (zindo/s)", "maximal absorption intensity (zindo)",
    "ionization potential (zindo/s)", "lowest unoccupied molecular orbital (gw)",
    "lowest unoccupied molecular orbital (pbe0)", "lowest unoccupied molecular orbital (zindo/s)",
    "polarizability (self-consistent screening)", "polarizability (dft/pbe0)",
]
_MD17_TASKS = {"aspirin": "Aspirin – CCSD", "benzene": "Benzene – CCSD(T)", "ethanol": "Ethanol – CCSD(T)",
               "malonaldehyde": "MDA – CCSD(T)", "toluene": "Toluene – CCSD(T)"}

#: (dataset, our unit, unit as printed in the paper) -> factor taking our values to the paper's numbers.
_PAPER_UNIT_FACTORS = {
    ("qm7b", "ha", "mev"): 1000.0,  # printed "meV" are milli-Hartree (reference README)
    ("qm8", "ha", "mev"): 1000.0,
    ("qm8", "", "mev"): 1000.0,  # oscillator strengths x 1000, printed as "meV"
    ("*", "ev", "mev"): 1000.0,
    ("*", "mev", "mev"): 1.0,
    ("*", "ev", "ev"): 1.0,
    ("*", "ha", "e_h"): 1.0,
    ("*", "kcal/mol", "kcal/mol"): 1.0,
    ("*", "å^3", "\\aa^3"): 1.0,
    ("*", "a^3", "\\aa^3"): 1.0,
    ("*", "bohr^3", "\\aa^3"): 0.529177210903 ** 3,
    ("*", "arbitrary", "arbitrary u."): 1.0,
    ("*", "", "arbitrary u."): 1.0,
}


# ------------------------------------------------------------------------------------------------
# The paper's numbers
# ------------------------------------------------------------------------------------------------
def _reference_csv(name: str) -> pd.DataFrame:
    ref = resources.files("abp_core") / "reference" / name
    with resources.as_file(ref) as path:
        return pd.read_csv(path)


def paper_table(table: Union[int, str] = 1, long: bool = False) -> pd.DataFrame:
    """The paper's Table 1, 2, 3 or 4 as a DataFrame.

    Table 1 (``table=1``) is wide as shipped (``dataset, task, unit_as_printed,
    schnet_sum_mean, ..., dimenetpp_abp_std``); with ``long=True`` it becomes one row per
    (dataset, task, backbone, readout) with ``mae_mean``/``mae_std``. Tables 2-4 are long already
    (``table, dataset, task, readout, mae_mean, mae_std, rmse_mean, rmse_std, abp_params``).
    ``table="2-4"`` returns all three.
    """
    key = str(table).lower().replace("table", "").strip()
    if key == "1":
        df = _reference_csv("paper_table1.csv")
        if not long:
            return df
        rows = []
        for _, r in df.iterrows():
            for bb, col in (("schnet", "schnet"), ("dimenet++", "dimenetpp")):
                for readout in ("sum", "abp"):
                    rows.append({"dataset": r["dataset"], "task": r["task"], "unit_as_printed": r["unit_as_printed"],
                                 "backbone": bb, "readout": readout,
                                 "mae_mean": r[f"{col}_{readout}_mean"], "mae_std": r[f"{col}_{readout}_std"]})
        return pd.DataFrame(rows)
    df = _reference_csv("paper_tables_2_4.csv")
    if key in ("2-4", "2_4", "all", "2,3,4"):
        return df
    if key in ("2", "3", "4"):
        return df[df["table"] == int(key)].reset_index(drop=True)
    raise ValueError(f"unknown paper table {table!r}; choose 1, 2, 3, 4 or '2-4'")


def relative_improvement(baseline, candidate, relative_to: str = "baseline"):
    """``100 * (baseline - candidate) / reference`` in %; positive = candidate has the lower error.

    ``relative_to="baseline"`` (default) divides by the baseline, ``"candidate"`` by the candidate
    (the paper's convention). Works on scalars, arrays and Series.
    """
    if relative_to not in ("baseline", "candidate"):
        raise ValueError(f"relative_to must be 'baseline' or 'candidate', got {relative_to!r}")
    b = np.asarray(baseline, dtype=float) if not isinstance(baseline, pd.Series) else baseline.astype(float)
    c = np.asarray(candidate, dtype=float) if not isinstance(candidate, pd.Series) else candidate.astype(float)
    ref = b if relative_to == "baseline" else c
    out = 100.0 * (b - c) / ref
    return float(out) if np.ndim(out) == 0 else out


def paper_relative_changes(backbone: str = "schnet", relative_to: str = "candidate") -> pd.DataFrame:
    """Per-task change of ABP vs sum in Table 1 (default: the paper's convention, dividing by ABP).

    Columns: ``dataset, task, sum, abp, improvement_pct``.
    """
    col = _BACKBONE_COLUMNS.get(backbone.lower())
    if col is None:
        raise ValueError(f"unknown backbone {backbone!r}; Table 1 has schnet and dimenet++")
    df = paper_table(1)
    out = df[["dataset", "task"]].copy()
    out["sum"] = df[f"{col}_sum_mean"]
    out["abp"] = df[f"{col}_abp_mean"]
    out["improvement_pct"] = relative_improvement(out["sum"], out["abp"], relative_to)
    return out


# ------------------------------------------------------------------------------------------------
# Our runs
# ------------------------------------------------------------------------------------------------
def collect_runs(root: Union[str, Path], weights: str = "best", split: str = "test") -> pd.DataFrame:
    """One row per (finished run, target) from every ``metrics.json`` under ``root``.

    Args:
        weights: ``"best"`` (best validation checkpoint, our default) or ``"last"`` (the final
            weights, the paper's protocol).
        split: ``"test"`` or ``"val"``.

    Columns: ``dataset, task, target_index, unit, backbone, readout, split_seed, seed, mae, rmse,
    max_error, r2, n, epochs, run_dir, fingerprint``.
    """
    root = Path(root)
    rows = []
    for path in sorted(root.rglob("metrics.json")):
        try:
            m = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        block = m.get("metrics", {}).get(f"{split}_{weights}") or {}
        cfg = m.get("config", {})
        for t, name in enumerate(m.get("target_names", [])):
            met = block.get(name)
            if met is None:
                continue
            rows.append({
                "dataset": cfg.get("data", {}).get("dataset"),
                "task": name,
                "target_index": (m.get("target_indices") or [None] * (t + 1))[t],
                "unit": (m.get("target_units") or [""] * (t + 1))[t],
                "backbone": cfg.get("model", {}).get("backbone"),
                "readout": cfg.get("model", {}).get("readout"),
                "split_seed": cfg.get("data", {}).get("split_seed"),
                "seed": m.get("seed"),
                "mae": met.get("mae"), "rmse": met.get("rmse"), "max_error": met.get("max_error"),
                "r2": met.get("r2"), "n": met.get("n"),
                "epochs": m.get("epochs_trained"),
                "dataset_kwargs": json.dumps(cfg.get("data", {}).get("dataset_kwargs", {}), sort_keys=True),
                "run_dir": str(path.parent), "fingerprint": m.get("fingerprint"),
            })
    cols = ["dataset", "task", "target_index", "unit", "backbone", "readout", "split_seed", "seed", "mae", "rmse",
            "max_error", "r2", "n", "epochs", "dataset_kwargs", "run_dir", "fingerprint"]
    return pd.DataFrame(rows, columns=cols)


_GROUP = ["dataset", "task", "unit", "backbone", "readout"]


def summarize(runs: pd.DataFrame, metrics: Sequence[str] = ("mae", "rmse")) -> pd.DataFrame:
    """Mean and sample std (``ddof=1``) over split seeds per (dataset, task, unit, backbone, readout).

    Columns: the group keys, ``n_splits``, ``seeds`` and ``<metric>_mean``/``<metric>_std`` per metric
    (std is NaN for a single split).
    """
    if runs.empty:
        return pd.DataFrame(columns=_GROUP + ["n_splits", "seeds"]
                            + [f"{m}_{s}" for m in metrics for s in ("mean", "std")])
    keys = [k for k in _GROUP if k in runs.columns]
    if "dataset_kwargs" in runs.columns and runs["dataset_kwargs"].nunique() > 1:
        keys = keys[:1] + ["dataset_kwargs"] + keys[1:]
    rows = []
    for key, g in runs.groupby(keys, sort=True, dropna=False):
        row = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
        row["n_splits"] = int(g["split_seed"].nunique()) if "split_seed" in g else len(g)
        row["seeds"] = ",".join(str(s) for s in sorted(g["split_seed"].unique())) if "split_seed" in g else ""
        for m in metrics:
            v = g[m].astype(float).to_numpy()
            row[f"{m}_mean"] = float(np.mean(v))
            row[f"{m}_std"] = float(np.std(v, ddof=1)) if len(v) > 1 else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def compare_readouts(summary: pd.DataFrame, baseline: str = "sum", candidate: str = "abp",
                     metric: str = "mae", relative_to: str = "baseline") -> pd.DataFrame:
    """Baseline and candidate readout per (dataset, task, backbone) with the relative change in %.

    Only tasks where both readouts have results appear. Columns: ``dataset, task, unit, backbone,
    <baseline>_mean, <baseline>_std, <candidate>_mean, <candidate>_std, improvement_pct``.
    """
    keys = [k for k in ("dataset", "dataset_kwargs", "task", "unit", "backbone") if k in summary.columns]
    cols = [f"{metric}_mean", f"{metric}_std"]
    a = summary[summary["readout"] == baseline][keys + cols]
    b = summary[summary["readout"] == candidate][keys + cols]
    both = a.merge(b, on=keys, suffixes=(f"_{baseline}", f"_{candidate}"))
    both = both.rename(columns={f"{metric}_mean_{baseline}": f"{baseline}_mean",
                                f"{metric}_std_{baseline}": f"{baseline}_std",
                                f"{metric}_mean_{candidate}": f"{candidate}_mean",
                                f"{metric}_std_{candidate}": f"{candidate}_std"})
    both["improvement_pct"] = relative_improvement(both[f"{baseline}_mean"], both[f"{candidate}_mean"], relative_to)
    return both.reset_index(drop=True)


@dataclass
class WilcoxonSummary:
    """Result of a paired Wilcoxon signed-rank test across tasks."""

    statistic: float
    pvalue: float
    n: int
    baseline: str = ""
    candidate: str = ""
    candidate_better: int = 0

    def __str__(self) -> str:
        return (f"Wilcoxon signed-rank ({self.candidate} vs {self.baseline}, {self.n} paired tasks, "
                f"{self.candidate} lower on {self.candidate_better}): W = {self.statistic:g}, p = {self.pvalue:.3g}")


def wilcoxon_test(baseline: Sequence[float], candidate: Sequence[float], **kwargs) -> WilcoxonSummary:
    """:func:`scipy.stats.wilcoxon` on paired values (two-sided by default; kwargs pass through)."""
    from scipy.stats import wilcoxon

    a = np.asarray(baseline, dtype=float)
    b = np.asarray(candidate, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired values need equal 1-D shapes, got {a.shape} and {b.shape}")
    if len(a) < 2:
        raise ValueError(f"a Wilcoxon test needs at least 2 paired tasks, got {len(a)}")
    res = wilcoxon(a, b, **kwargs)
    return WilcoxonSummary(float(res.statistic), float(res.pvalue), int(len(a)),
                           candidate_better=int(np.sum(b < a)))


def wilcoxon_readouts(summary: pd.DataFrame, baseline: str = "sum", candidate: str = "abp",
                      metric: str = "mae", backbone: Optional[str] = None, **kwargs) -> WilcoxonSummary:
    """Wilcoxon signed-rank test of two readouts across tasks (paired per task; mean over splits).

    Raw errors are compared, as the paper does (tasks with large errors weigh more in the ranks).
    """
    table = compare_readouts(summary if backbone is None else summary[summary["backbone"] == backbone],
                             baseline, candidate, metric)
    out = wilcoxon_test(table[f"{baseline}_mean"], table[f"{candidate}_mean"], **kwargs)
    out.baseline, out.candidate = baseline, candidate
    return out


def molecule_errors(run_dir: Union[str, Path], split: str = "test", weights: str = "best") -> pd.DataFrame:
    """Per-molecule absolute errors of one finished run, from its ``predictions_{split}.csv``.

    Columns: ``idx, target, abs_error`` (physical units), one row per molecule and target.
    """
    path = Path(run_dir) / f"predictions_{split}.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no predictions (is the run finished?)")
    df = pd.read_csv(path)
    missing = {"split", "weights", "idx", "target", "y_true", "y_pred"} - set(df.columns)
    if missing:
        raise ValueError(f"{path}: not a predictions file, missing columns {sorted(missing)}")
    df = df[(df["split"] == split) & (df["weights"] == weights)]
    if df.empty:
        raise ValueError(f"{path}: no {weights!r} predictions for the {split!r} split")
    out = df[["idx", "target"]].copy()
    out["abs_error"] = (df["y_pred"] - df["y_true"]).abs().astype(float)
    if out["abs_error"].isna().any():
        raise ValueError(f"{path}: NaN predictions or targets")
    if out.duplicated(["idx", "target"]).any():
        raise ValueError(f"{path}: duplicate (idx, target) rows")
    return out.reset_index(drop=True)


def paired_molecule_test(baseline_run: Union[str, Path], candidate_run: Union[str, Path],
                         split: str = "test", weights: str = "best") -> Dict[str, float]:
    """Two-sided Wilcoxon signed-rank test on the per-molecule absolute errors of two runs.

    Both runs must have predicted the same molecules (the same split), matched by ``(idx, target)``.
    The test is conditional on the two trained models: it says whether one model's errors on this
    test set are systematically lower, not how much training randomness moves that (that needs
    several split seeds, :func:`wilcoxon_readouts`).

    Returns ``n``, ``baseline_mae``, ``candidate_mae``, ``candidate_lower`` (fraction of molecules
    where the candidate's error is lower), ``statistic`` and ``pvalue``.
    """
    from scipy.stats import wilcoxon

    a = molecule_errors(baseline_run, split, weights)
    b = molecule_errors(candidate_run, split, weights)
    both = a.merge(b, on=["idx", "target"], suffixes=("_a", "_b"), how="outer", indicator=True)
    if (both["_merge"] != "both").any():
        raise ValueError(f"the runs predicted different molecules ({int((both['_merge'] != 'both').sum())} "
                         f"unmatched rows): compare runs on the same split")
    ea, eb = both["abs_error_a"].to_numpy(), both["abs_error_b"].to_numpy()
    if len(ea) < 2:
        raise ValueError(f"a Wilcoxon test needs at least 2 paired molecules, got {len(ea)}")
    res = wilcoxon(ea, eb)
    return {"n": int(len(ea)), "baseline_mae": float(ea.mean()), "candidate_mae": float(eb.mean()),
            "candidate_lower": float(np.mean(eb < ea)), "statistic": float(res.statistic),
            "pvalue": float(res.pvalue)}


# ------------------------------------------------------------------------------------------------
# Ours beside theirs
# ------------------------------------------------------------------------------------------------
def _norm(text: str) -> str:
    text = str(text).lower().replace("–", "-").replace("—", "-")
    return re.sub(r"[^a-z0-9]+", " ", text).strip()


def paper_task_name(dataset: str, task: str, target_index: Optional[int] = None,
                    dataset_kwargs: Optional[dict] = None) -> Optional[str]:
    """The Table 1 task label of one of our (dataset, target), or None if the paper has no such row."""
    ds = (dataset or "").lower()
    if ds == "qm7b":
        if isinstance(target_index, (int, np.integer)) and 0 <= int(target_index) < len(QM7B_TASKS):
            return QM7B_TASKS[int(target_index)]
        name = str(task).lower()
        if name in _QM7B_NAMES:
            return QM7B_TASKS[_QM7B_NAMES.index(name)]
    if ds == "md17":
        mol = str((dataset_kwargs or {}).get("molecule", "")).lower()
        if mol in _MD17_TASKS:
            return _MD17_TASKS[mol]
    label = _DATASET_LABELS.get(ds)
    table = paper_table(1)
    rows = table[table["dataset"] == label]
    wanted = _norm(task)
    aliases = {"homo": "homo dft", "lumo": "lumo dft", "total energy": "total energy dft"}
    wanted = aliases.get(wanted, wanted)
    for t in rows["task"]:
        if _norm(t) == wanted or _norm(t).split(" dft")[0] == wanted:
            return t
    return None


def _paper_factor(dataset: str, unit: str, printed: str) -> float:
    u, p = str(unit or "").strip().lower(), str(printed).strip().lower()
    for key in ((dataset.lower(), u, p), ("*", u, p)):
        if key in _PAPER_UNIT_FACTORS:
            return _PAPER_UNIT_FACTORS[key]
    return math.nan


def with_paper(summary: pd.DataFrame, metric: str = "mae") -> pd.DataFrame:
    """``summary`` plus the paper's Table 1 values for the same (dataset, task, backbone, readout).

    Adds ``paper_task``, ``paper_unit`` (as printed), ``paper_mean``, ``paper_std`` and our mean/std
    converted to the paper's printed scale (``ours_in_paper_units_mean``/``_std``; NaN when the units
    cannot be matched). Rows without a paper counterpart keep NaN.
    """
    long = paper_table(1, long=True)
    out = summary.copy()
    tasks, units, pm, ps, om, os_ = [], [], [], [], [], []
    for _, r in out.iterrows():
        kwargs = json.loads(r["dataset_kwargs"]) if isinstance(r.get("dataset_kwargs"), str) else None
        t = paper_task_name(r["dataset"], r["task"], r.get("target_index"), kwargs)
        bb = str(r.get("backbone", "")).lower()
        match = long[(long["task"] == t) & (long["backbone"] == bb) & (long["readout"] == r["readout"])
                     & (long["dataset"] == _DATASET_LABELS.get(str(r["dataset"]).lower()))] if t else long.iloc[:0]
        if len(match):
            m = match.iloc[0]
            f = _paper_factor(r["dataset"], r.get("unit", ""), m["unit_as_printed"])
            tasks.append(t), units.append(m["unit_as_printed"]), pm.append(m["mae_mean"]), ps.append(m["mae_std"])
            om.append(r[f"{metric}_mean"] * f), os_.append(r[f"{metric}_std"] * f)
        else:
            tasks.append(t), units.append(None)
            pm.append(math.nan), ps.append(math.nan), om.append(math.nan), os_.append(math.nan)
    out["paper_task"], out["paper_unit"] = tasks, units
    out["ours_in_paper_units_mean"], out["ours_in_paper_units_std"] = om, os_
    out["paper_mean"], out["paper_std"] = pm, ps
    return out


def format_mean_std(mean: float, std: float, digits: int = 3) -> str:
    """``"3.039 ± 0.131"`` (std omitted when NaN)."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return ""
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def paper_layout(summary: pd.DataFrame, metric: str = "mae", digits: int = 4,
                 readouts: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """The paper's layout: rows (dataset, task), columns (backbone, readout), cells "mean ± std"."""
    if summary.empty:
        return pd.DataFrame()
    df = summary.copy()
    if readouts is not None:
        df = df[df["readout"].isin(readouts)]
    df["cell"] = [format_mean_std(m, s, digits) for m, s in zip(df[f"{metric}_mean"], df[f"{metric}_std"])]
    index = [k for k in ("dataset", "task", "unit") if k in df.columns]
    table = df.pivot_table(index=index, columns=["backbone", "readout"], values="cell", aggfunc="first")
    if readouts is not None:
        order = [c for bb in table.columns.get_level_values(0).unique() for r in readouts
                 for c in [(bb, r)] if c in table.columns]
        table = table[order]
    return table


def milli_unit(unit: str) -> Tuple[float, str]:
    """Factor and unit to show errors in: ``(1000, "meV")`` for eV, ``(1000, "mHa")`` for Hartree, else ``(1, unit)``."""
    u = (unit or "").strip().lower()
    if u == "ev":
        return 1000.0, "meV"
    if u in ("ha", "hartree"):
        return 1000.0, "mHa"
    return 1.0, unit
