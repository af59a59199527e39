"""The paper's experiments as the notebooks ``01_qm7b`` ... ``07_qm7b_wa_vs_abp`` run them.

All go through :func:`run_paper_experiment`: data check (a missing dataset is reported in plain words,
never as a traceback; :mod:`.datasets`), typed config (:mod:`abp_core.config`), trainer
(:func:`abp_core.train.run_experiment`), statistics (:mod:`abp_core.stats`) and the paper's reference
tables (:func:`paper_reference`), plus a ``results.json`` (:func:`.outputs.write_results`). The readouts
compared are :class:`Arm` s (:func:`arms`); the result is an :class:`ExperimentReport`.
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from ..files import write_text
from ..stats import format_mean_std
from .datasets import DATASET_LABELS, DataStatus, load_dataset, resolve_data_root
from .outputs import prepare_output_dir, quiet_training_logs, runs_directory, write_results
from .params import ParameterError

__all__ = ["SMOKE_CONFIG", "Arm", "arms", "ExperimentReport", "paper_reference", "run_paper_experiment"]


SMOKE_CONFIG: Dict[str, Any] = {
    "data": {"subset": 160},
    "model": {"backbone_hparams": {"hidden_channels": 32, "num_filters": 32, "num_interactions": 2}},
    "trainer": {"max_epochs": 1, "batch_size": 32, "patience": None, "progress_bar": False},
}


@dataclass
class Arm:
    """One readout of an experiment: ``label`` names it in the tables (e.g. ``"ABP(64,4,2)"``)."""

    label: str
    readout: str
    readout_hparams: Dict[str, Any] = field(default_factory=dict)


_ARM_LABELS = {"mean": "average"}


def arms(readouts: Sequence[str], abp_variants: Sequence[str] = ()) -> List[Arm]:
    """Arms from readout names; ``"abp"`` becomes one arm per ABP variant when variants are given.

    A variant ``"(64,4,2)"`` is the paper's ABP(64, 4, 2) of Tables 2-3: 64 channels per head, 4 heads
    and 2 SAB encoder blocks (our reading of its parameter counts), i.e. ``hidden_channels=256,
    heads=4, num_encoder_blocks=2``; its label is ``"ABP(64,4,2)"``. ``"mean"`` is labelled
    ``"average"`` as in the paper.
    """
    out: List[Arm] = []
    for ro in readouts:
        key = ro.strip().lower()
        if key == "abp" and abp_variants:
            for v in abp_variants:
                nums = re.findall(r"\d+", str(v))
                if len(nums) != 3:
                    raise ParameterError(f"ABP variant {v!r} must be three integers (channels per head, heads, "
                                         f"SAB blocks), e.g. '(64,4,2)'")
                per_head, heads, blocks = (int(n) for n in nums)
                out.append(Arm(f"ABP({per_head},{heads},{blocks})", "abp",
                               {"hidden_channels": per_head * heads, "heads": heads, "num_encoder_blocks": blocks}))
        else:
            out.append(Arm(_ARM_LABELS.get(key, key), key))
    return out


def _deep_merge(base: Dict[str, Any], extra: Mapping[str, Any]) -> Dict[str, Any]:
    out = json.loads(json.dumps(base, default=str)) if base else {}
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = json.loads(json.dumps(v, default=str)) if isinstance(v, (dict, list)) else v
    return out


def paper_reference(dataset: str, tables: Sequence[int] = (1,)) -> "pd.DataFrame":
    """The paper's numbers for ``dataset`` from Table 1 (and/or Tables 2-4), formatted "mean ± std".

    Table 1 rows get one column per (backbone, readout) and the paper's relative change of ABP over
    sum (its convention: relative to ABP). Tables 2-4 rows: ``table, task, readout, MAE, RMSE``.
    """
    import pandas as pd

    from .. import stats

    label = DATASET_LABELS.get(dataset.lower(), dataset)
    frames = []
    for table in tables:
        if int(table) == 1:
            t1 = stats.paper_table(1)
            t1 = t1[t1["dataset"] == label]
            rows = []
            for _, r in t1.iterrows():
                row = {"table": 1, "task": r["task"], "unit": r["unit_as_printed"]}
                for col, bb in (("schnet", "SchNet"), ("dimenetpp", "DimeNet++")):
                    for ro, rl in (("sum", "sum"), ("abp", "ABP")):
                        row[f"{bb} {rl}"] = format_mean_std(r[f"{col}_{ro}_mean"], r[f"{col}_{ro}_std"])
                    change = stats.relative_improvement(r[f"{col}_sum_mean"], r[f"{col}_abp_mean"], "candidate")
                    row[f"{bb} change %"] = round(float(change), 2)
                rows.append(row)
            frames.append(pd.DataFrame(rows))
        else:
            t = stats.paper_table(int(table))
            t = t[t["dataset"] == label]
            frames.append(pd.DataFrame({
                "table": t["table"], "task": t["task"], "readout": t["readout"],
                "MAE": [format_mean_std(m, s, 4) for m, s in zip(t["mae_mean"], t["mae_std"])],
                "RMSE": [format_mean_std(m, s, 4) for m, s in zip(t["rmse_mean"], t["rmse_std"])],
                "ABP parameters": t["abp_params"].astype("Int64")}).reset_index(drop=True))
    if not frames:
        return pd.DataFrame()
    if len(frames) == 1:
        return frames[0]
    return pd.concat(frames, ignore_index=True)


@dataclass
class ExperimentReport:
    """What :func:`run_paper_experiment` found and ran.

    ``status``: ``"ok"`` (every run finished), ``"partial"`` (some runs or datasets missing/failed),
    ``"data_missing"`` (no data at all: only the paper's numbers are shown) or ``"failed"``.
    """

    dataset: str
    status: str
    smoke: bool
    paper: Any
    messages: List[str] = field(default_factory=list)
    runs: Any = None
    summary: Any = None
    comparison: Any = None
    beside_paper: Any = None
    wilcoxon: Any = None
    failures: List[Dict[str, Any]] = field(default_factory=list)
    runs_dir: Optional[str] = None
    elapsed_s: float = 0.0
    baseline: str = "sum"
    candidate: str = "abp"
    output_dir: Optional[str] = None

    @property
    def has_results(self) -> bool:
        return self.summary is not None and len(self.summary) > 0

    def text(self) -> str:
        """Plain-text report (what the notebook prints, so ``papermill --log-output`` shows it)."""
        import pandas as pd

        label = DATASET_LABELS.get(self.dataset, self.dataset)
        lines = [f"== {label}: {self.status}" + (" (smoke mode: tiny data, 1 epoch; numbers are NOT "
                                                  "comparable with the paper)" if self.smoke else "")]
        for msg in self.messages:
            lines.append(msg)
        with pd.option_context("display.width", 200, "display.max_columns", 30, "display.max_colwidth", 48):
            if self.has_results:
                from .. import stats

                lines.append("\nOur test MAE (best-validation checkpoint), mean ± std over split seeds:")
                lines.append(stats.paper_layout(self.summary, "mae").to_string())
                if self.comparison is not None and len(self.comparison):
                    lines.append(f"\n{self.candidate} vs {self.baseline}: improvement % = "
                                 f"100 (baseline - candidate) / baseline")
                    lines.append(self.comparison.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
                if self.wilcoxon is not None:
                    lines.append(str(self.wilcoxon) + ("  [only a handful of tasks: not meaningful]"
                                                       if self.wilcoxon.n < 5 else ""))
                if self.beside_paper is not None and len(self.beside_paper):
                    lines.append("\nBeside the paper (our values converted to the paper's printed units):")
                    lines.append(self.beside_paper.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        for f in self.failures:
            lines.append(f"FAILED run {f.get('label')} {f.get('targets')} seed {f.get('seed')}: {f.get('error')}")
        lines.append(f"({self.elapsed_s:.0f} s)")
        return "\n".join(lines)

    def results(self) -> Dict[str, Any]:
        """The content of ``results.json``."""
        out: Dict[str, Any] = {"dataset": self.dataset, "status": self.status, "smoke": self.smoke,
                               "messages": self.messages, "elapsed_s": round(self.elapsed_s, 1),
                               "n_runs": 0 if self.runs is None else int(self.runs["run_dir"].nunique()),
                               "n_failed": len(self.failures), "failures": self.failures}
        if self.has_results:
            out["summary"] = self.summary
            if self.comparison is not None and len(self.comparison):
                out["comparison"] = self.comparison
                out["mean_improvement_pct"] = float(self.comparison["improvement_pct"].mean())
            if self.wilcoxon is not None:
                out["wilcoxon"] = {"statistic": self.wilcoxon.statistic, "pvalue": self.wilcoxon.pvalue,
                                   "n_tasks": self.wilcoxon.n}
        return out

    def show(self, png: bool = False) -> None:
        """Print :meth:`text`; with results, also show the MAE chart and save it (and the summary CSV)
        into the output directory."""
        print(self.text())
        fig = self.figure()
        if fig is None:
            return
        if self.output_dir:
            out = Path(self.output_dir)
            write_text(out / "summary.csv", self.summary.to_csv(index=False))
            if self.beside_paper is not None:
                write_text(out / "beside_paper.csv", self.beside_paper.to_csv(index=False))
            from ..viz import save_figure

            save_figure(fig, out / "mae", png=png)
        fig.show()

    def figure(self):
        """Bar chart of our MAE per task and readout (None without results)."""
        if not self.has_results:
            return None
        from ..viz import mae_bar_chart

        df = self.summary.copy()
        df["task"] = df["task"].astype(str).str.slice(0, 40)
        many = df["task"].nunique() > 1
        return mae_bar_chart(df, x="task" if many else "readout", color="readout" if many else None,
                             title=f"{DATASET_LABELS.get(self.dataset, self.dataset)}: test MAE "
                                   f"(mean ± std over splits)")


def _table_2_4_beside(summary, dataset: str, tables: Sequence[int]):
    """Our results next to the paper's Tables 2-4 (OE62 readouts; QM7b WA vs ABP)."""
    import pandas as pd

    from .. import stats

    if summary is None or not len(summary):
        return None
    label = DATASET_LABELS.get(dataset, dataset)
    rows = []
    for table in tables:
        if int(table) == 1:
            continue
        ref = stats.paper_table(int(table))
        ref = ref[ref["dataset"] == label]
        for _, r in ref.iterrows():
            mine = _match_table_task(summary, dataset, r["task"], r["readout"])
            factor = 1000.0 if dataset == "qm7b" else 1.0  # Table 4 prints QM7b in milli-Hartree
            rows.append({"table": int(table), "task": r["task"], "readout": r["readout"],
                         "paper MAE": format_mean_std(r["mae_mean"], r["mae_std"], 4),
                         "ours MAE": "" if mine is None else format_mean_std(mine["mae_mean"] * factor,
                                                                   mine["mae_std"] * factor, 4),
                         "ours splits": None if mine is None else int(mine["n_splits"])})
    return pd.DataFrame(rows) if rows else None


def _norm(text: Any) -> str:
    return re.sub(r"[^a-z0-9]+", " ", str(text).lower()).strip()


def _match_table_task(summary, dataset: str, task: str, readout: str):
    """Our summary row for a Table 2-4 (task, readout) entry, or None."""
    want_readout = _norm(readout)
    rows = summary[[_norm(r) == want_readout or (_norm(r) == "mean" and want_readout == "average")
                    for r in summary["readout"]]]
    if not len(rows):
        return None
    t = _norm(task)
    kind = "highest occupied" if t.startswith("homo") else "lowest unoccupied" if t.startswith("lumo") else t
    level = re.search(r"\(([^)]*)\)", task)
    level = _norm(level.group(1)) if level and dataset == "qm7b" else ""
    for _, r in rows.iterrows():
        name = _norm(r["task"])
        if (kind in name or name.startswith(t.split()[0])) and (not level or f"({level})" in str(r["task"]).lower()
                                                                  or name.endswith(level)):
            return r
    return None


def run_paper_experiment(dataset: str, *, targets: Sequence[Union[str, int]], arms: Sequence[Arm],
                         seeds: Sequence[int], backbones: Sequence[str] = ("schnet",),
                         config: Optional[Mapping[str, Any]] = None, overrides: Sequence[str] = (),
                         output_dir: Union[str, os.PathLike] = "outputs", data_root: Optional[str] = None,
                         download: bool = True, smoke: bool = False,
                         variants: Sequence[Mapping[str, Any]] = ({},), tables: Sequence[int] = (1,),
                         baseline: str = "sum", candidate: Optional[str] = None, runs_dir: Optional[str] = None,
                         write: bool = True, extra_results: Optional[Mapping[str, Any]] = None) -> ExperimentReport:
    """Run one of the paper's experiments: targets x arms (readouts) x backbones x split seeds.

    Args:
        dataset: registry name (``qm7b``, ``qm8``, ``qm9``, ``qmugs``, ``md17``, ``oe62``).
        targets: target names or indices (one model per target, as in the paper).
        arms: the readouts to compare (:class:`Arm`); labels must be distinct.
        seeds: split seeds (``data.split="paper"`` by default: the paper's published splits).
        backbones: ``schnet`` and/or ``dimenet++``.
        config: base config (nested dict for :class:`abp_core.config.Config`), e.g. model sizes.
        overrides: ``section.option=value`` strings applied last (the notebook's ``overrides`` parameter).
        output_dir: ``results.json`` goes here; run directories under ``runs_dir`` or ``output_dir/runs``.
        data_root: data root (default ``$ABP_DATA_DIR``, see :func:`resolve_data_root`).
        download: allow downloads of missing raw files (forced off in smoke mode).
        smoke: tiny runs (:data:`SMOKE_CONFIG`), runs in a temporary directory.
        variants: loader keyword sets, one dataset each (e.g. MD17 molecules); recorded in the config's
            ``data.dataset_kwargs`` so that run directories differ.
        tables: which of the paper's tables to show and compare (1, 2, 3, 4).
        baseline / candidate: arm labels of the relative comparison (default candidate: the first ABP arm).
        write: write ``output_dir/results.json``.
        extra_results: more entries for ``results.json``.

    Missing data never raises: the report's ``status`` is ``"data_missing"`` (or ``"partial"``) and
    ``messages`` say what is missing and where to put it. An invalid config raises
    :class:`abp_core.config.ConfigError` before anything runs; a failed run is recorded and the
    others go on.
    """
    import pandas as pd

    from .. import stats
    from ..config import Config
    from ..train import run_experiment

    t0 = time.perf_counter()
    quiet_training_logs()
    dataset = dataset.lower()
    labels = [a.label for a in arms]
    if not labels:
        raise ValueError("at least one arm (readout) is needed")
    if len(set(labels)) != len(labels):
        raise ValueError(f"arm labels must be distinct, got {labels}")
    if candidate is None:
        candidate = next((a.label for a in arms if a.readout == "abp"), labels[-1])
    variants = [{k: v for k, v in dict(v).items() if v is not None} for v in variants] or [{}]
    root = resolve_data_root(data_root)
    out_dir = prepare_output_dir(output_dir)
    runs_root = runs_directory(out_dir, smoke, runs_dir)
    report = ExperimentReport(dataset=dataset, status="ok", smoke=smoke,
                              paper=paper_reference(dataset, tables), runs_dir=str(runs_root),
                              baseline=baseline, candidate=candidate, output_dir=str(out_dir))
    base = _deep_merge({}, config or {})
    if smoke:
        base = _deep_merge(base, SMOKE_CONFIG)
    base = _deep_merge(base, {"data": {"dataset": dataset, "root": str(root) if root else None},
                              "trainer": {"output_dir": str(runs_root)}})
    base.setdefault("trainer", {}).setdefault("progress_bar", False)

    # Every config is built (validated) before anything is loaded or trained.
    plans = []
    for variant in variants:
        for arm in arms:
            values = _deep_merge(base, {"data": {"dataset_kwargs": dict(variant)},
                                        "model": {"readout": arm.readout,
                                                  "readout_hparams": {arm.readout: dict(arm.readout_hparams)}}})
            plans.append((dict(variant), arm, Config.from_dict(values, overrides)))

    label_of: Dict[str, str] = {}
    missing = 0
    datasets: Dict[str, DataStatus] = {}
    for variant, arm, cfg in plans:
        key = json.dumps(variant, sort_keys=True)
        if key not in datasets:
            status = load_dataset(dataset, root, download=download and not smoke, **variant)
            datasets[key] = status
            if not status.available:
                missing += 1
                report.messages.append(status.message)
        status = datasets[key]
        if not status.available:
            continue
        results, failures = run_experiment(cfg, targets=list(targets), seeds=list(seeds), backbones=list(backbones),
                                           dataset=status.dataset)
        for res in results:
            label_of[str(res.run_dir)] = arm.label
        for fcfg, msg in failures:
            report.failures.append({"label": arm.label, "variant": variant, "targets": fcfg.data.targets,
                                    "backbone": fcfg.model.backbone, "seed": fcfg.data.split_seed, "error": msg})

    if label_of:
        runs = stats.collect_runs(runs_root)
        runs = runs[runs["run_dir"].isin(label_of)].copy()
        runs["readout"] = runs["run_dir"].map(label_of)
        report.runs = runs
        report.summary = stats.summarize(runs)
        if baseline in labels and candidate in labels:
            report.comparison = stats.compare_readouts(report.summary, baseline, candidate)
            if len(report.comparison) >= 2:
                try:
                    report.wilcoxon = stats.wilcoxon_readouts(report.summary, baseline, candidate)
                except ValueError as exc:
                    report.messages.append(f"Wilcoxon test not possible: {exc}")
        if 1 in tables:
            joined = stats.with_paper(report.summary)
            joined = joined[joined["paper_task"].notna()]
            if len(joined):
                cols = ["task", "backbone", "readout", "n_splits", "ours_in_paper_units_mean",
                        "ours_in_paper_units_std", "paper_mean", "paper_std", "paper_unit"]
                report.beside_paper = joined[cols].rename(columns={
                    "ours_in_paper_units_mean": "ours_mean", "ours_in_paper_units_std": "ours_std"}).reset_index(drop=True)
        others = [t for t in tables if int(t) != 1]
        if others:
            extra = _table_2_4_beside(report.summary, dataset, others)
            if extra is not None:
                report.beside_paper = extra if report.beside_paper is None else pd.concat(
                    [report.beside_paper, extra], ignore_index=True)

    if missing == len(datasets) and datasets:
        report.status = "data_missing"
    elif report.failures and not label_of:
        report.status = "failed"
    elif missing or report.failures:
        report.status = "partial"
    report.elapsed_s = time.perf_counter() - t0
    if write:
        payload = report.results()
        payload.update(extra_results or {})
        write_results(out_dir, payload)
    return report

