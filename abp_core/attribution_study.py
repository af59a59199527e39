"""The study of per-atom attributions against orbital coefficients: where does a trained model look, does
that match where the frontier orbital lives, and does its prediction really depend on those atoms?

>>> runs = quickstart.train_readouts(["sum", "wa", "abp"], n_molecules=4000, epochs=12)
>>> study = attribution_study(runs)             # every method of every readout vs GFN2-xTB HOMO shares
>>> print(study.text())                         # agreement vs random weights, deletion areas
>>> study.view(study.showcase(1)[0], method="rollout")   # py3Dmol: attributions | HOMO, one colour scale

Attributions come from :func:`abp_core.explain.attribute` (methods ``weights``, ``rollout``, ``gradient``,
``input_x_gradient``, ``integrated_gradients``, ``occlusion``); agreement statistics from
:mod:`abp_core.agreement` (Pearson, Spearman, top-1, L1, each against Dirichlet(1) random weights, with
bootstrap CIs); faithfulness from :func:`abp_core.explain.faithfulness` (deletion area relative to random
orders: > 1 means removing the attributed atoms first moves the prediction more than removing random ones).

Orbital coefficients: the matching orbital of the model's target (HOMO shares for HOMO models, LUMO shares
for LUMO models; ``orbital="auto"``), from the dataset when it carries them (OE62 ``homo_coeff``),
otherwise computed for just the analysed molecules with GFN2-xTB (:mod:`abp_core.orbitals`).
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from .stats import milli_unit as _milli

__all__ = ["AttributionStudy", "attribution_study", "study_models", "orbital_for_target", "method_label",
           "deletion_summary", "run_evidence_study", "across_seeds", "evidence_markdown"]

from .readouts import READOUT_LABELS as _READOUT_NAMES  # noqa: E402  (one table of display names)
_METHOD_NAMES = {"weights": "weights", "rollout": "rollout", "gradient": "gradient",
                 "input_x_gradient": "input x gradient", "integrated_gradients": "integrated gradients",
                 "occlusion": "occlusion"}
Key = Tuple[str, str]  # (readout, method)


def method_label(readout: str, method: str) -> str:
    """``"ABP rollout"``, ``"WA weights"``, ..."""
    return f"{_READOUT_NAMES.get(readout, readout)} {_METHOD_NAMES.get(method, method)}"


def orbital_for_target(target: str) -> str:
    """The orbital whose shares a model of ``target`` is compared with: ``"lumo"`` for LUMO targets, else ``"homo"``."""
    return "lumo" if "lumo" in str(target).lower() else "homo"


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80] or "molecule"


def deletion_summary(df: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> Dict[str, Any]:
    """Mean relative deletion area with a bootstrap CI, and a one-sided Wilcoxon signed-rank test of
    ``deletion_area > random_area`` over molecules (the attribution's order beats random orders)."""
    from scipy import stats

    from .agreement import bootstrap_ci

    d = df.dropna(subset=["relative_area"])
    mean, lo, hi, n = bootstrap_ci(d["relative_area"], 0.95, n_boot, seed)
    diff = (d["deletion_area"] - d["random_area"]).to_numpy()
    p = float(stats.wilcoxon(diff, alternative="greater").pvalue) if np.any(diff != 0) else float("nan")
    return {"n_molecules": n, "relative_area": mean, "ci_low": lo, "ci_high": hi,
            "median_relative_area": float(np.median(d["relative_area"])) if n else float("nan"),
            "p_value": p, "beats_random_order": bool(p < 0.05) if np.isfinite(p) else False}


@dataclass
class AttributionStudy:
    """Per-atom attributions of trained models next to orbital coefficients for a set of (test) molecules.

    Attributes:
        molecules: one row per molecule: ``idx, name, smiles, n_atoms, y_true`` and per readout
            ``y_pred_<ro>``, ``abs_error_<ro>`` (physical units).
        z, pos, coefficients: per molecule (keyed by ``idx``).
        attributions: ``(readout, method)`` -> idx -> per-atom attribution (sums to 1).
        agreement: ``(readout, method)`` -> :func:`abp_core.agreement.per_molecule_agreement` table.
        deletion: ``(readout, method)`` -> :meth:`abp_core.explain.DeletionCurves.to_frame` table.
        baseline: :func:`abp_core.agreement.random_baseline` (Dirichlet(1) weights) for the same molecules.
        summaries: ``(readout, method)`` -> :func:`abp_core.agreement.summarise` table.
    """

    dataset_name: str
    target: str
    unit: str
    coefficient_label: str
    molecules: pd.DataFrame
    z: Dict[int, np.ndarray]
    pos: Dict[int, np.ndarray]
    coefficients: Dict[int, np.ndarray]
    attributions: Dict[Key, Dict[int, np.ndarray]]
    agreement: Dict[Key, pd.DataFrame]
    deletion: Dict[Key, pd.DataFrame]
    baseline: pd.DataFrame
    summaries: Dict[Key, pd.DataFrame]
    failed: List[Tuple[int, str]] = field(default_factory=list)
    coefficient_seconds: float = 0.0
    attribution_seconds: Dict[Key, float] = field(default_factory=dict)

    # ---- what is in it ---------------------------------------------------------------------------
    @property
    def readouts(self) -> List[str]:
        return list(dict.fromkeys(ro for ro, _ in self.attributions))

    def methods(self, readout: str) -> List[str]:
        return [m for ro, m in self.attributions if ro == readout]

    def _key(self, readout: Optional[str], method: Optional[str]) -> Key:
        from .explain import default_method

        ro = readout or ("abp" if "abp" in self.readouts else self.readouts[0])
        if ro not in self.readouts:
            raise ValueError(f"readout {ro!r} is not in this study; choose one of {self.readouts}")
        m = method or default_method(ro)
        if (ro, m) not in self.attributions:
            m_avail = self.methods(ro)
            if method is None and m_avail:  # the default was not computed: take the first available
                m = m_avail[0]
            else:
                raise ValueError(f"method {m!r} was not computed for {ro}; choose one of {m_avail}")
        return ro, m

    # ---- tables ----------------------------------------------------------------------------------
    def summary_table(self) -> pd.DataFrame:
        """One row per (readout, method): mean Pearson r / Spearman / top-1 / L1 over molecules with 95 %
        CIs, the random-weights means, whether each beats random, and the relative deletion area."""
        rows = []
        for key, s in self.summaries.items():
            ro, m = key
            row: Dict[str, Any] = {"readout": _READOUT_NAMES.get(ro, ro), "method": m,
                                   "molecules": int(len(self.agreement[key]))}
            for _, r in s.iterrows():
                st = r["statistic"]
                row[st] = r["mean"]
                row[f"{st} 95% CI"] = f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
                row[f"{st} random"] = r["baseline_mean"]
                row[f"{st} beats random"] = r["beats_random"]
            if key in self.deletion:
                d = deletion_summary(self.deletion[key])
                row["deletion area / random"] = d["relative_area"]
                row["deletion 95% CI"] = f"[{d['ci_low']:.3f}, {d['ci_high']:.3f}]"
                row["deletion p"] = d["p_value"]
                row["faithful (beats random order)"] = d["beats_random_order"]
            rows.append(row)
        return pd.DataFrame(rows)

    def compact_table(self) -> pd.DataFrame:
        """The headline columns of :meth:`summary_table`."""
        t = self.summary_table()
        cols = [c for c in ("readout", "method", "pearson_r", "spearman_rho", "top1_match", "l1",
                            "pearson_r beats random", "deletion area / random", "faithful (beats random order)")
                if c in t]
        return t[cols]

    def text(self) -> str:
        n = len(self.molecules)
        base = self.baseline[["pearson_r", "top1_match", "l1"]].mean()
        lines = [f"Attributions vs {self.coefficient_label} over {n} test molecules (means of per-molecule "
                 f"statistics; random Dirichlet(1) weights: r {base['pearson_r']:.3f}, top-1 "
                 f"{base['top1_match']:.3f}, L1 {base['l1']:.3f}):"]
        with pd.option_context("display.width", 200, "display.max_columns", 20):
            lines.append(self.compact_table().to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        lines.append("pearson_r / spearman_rho: correlation over a molecule's atoms; top1_match: the most "
                     "attributed atom carries the largest share; l1: sum |a - c| (lower is better); deletion "
                     "area / random: how much faster the prediction moves when atoms are removed in the "
                     "attribution's order than in random orders (> 1: faithful).")
        if self.failed:
            lines.append(f"{len(self.failed)} molecule(s) left out: orbital calculation failed "
                         f"(first: idx {self.failed[0][0]}: {self.failed[0][1][:120]})")
        return "\n".join(lines)

    def results_json(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"n_molecules_analysed": int(len(self.molecules)),
                               "coefficients": self.coefficient_label, "n_orbital_failures": len(self.failed)}
        for row in self.summary_table().to_dict(orient="records"):
            key = f"{row['readout'].lower()}_{row['method']}"
            for st in ("pearson_r", "spearman_rho", "top1_match", "l1"):
                v = row.get(st)
                out[f"{key}_{st}"] = None if v is None or not np.isfinite(v) else float(v)
                out[f"random_{st}"] = float(self.baseline[st].mean())
            out[f"{key}_pearson_r_beats_random"] = row.get("pearson_r beats random")
            if "deletion area / random" in row:
                v = row["deletion area / random"]
                out[f"{key}_relative_deletion_area"] = None if not np.isfinite(v) else float(v)
        return out

    # ---- picking molecules -----------------------------------------------------------------------
    def picks(self, readout: Optional[str] = None, k: int = 3, method: Optional[str] = None) -> Dict[str, List[int]]:
        """``{"best agreement", "worst agreement", "largest error"}`` -> up to ``k`` molecule idx each
        (agreement: per-molecule Pearson r of ``readout``'s ``method`` with the coefficients)."""
        key = self._key(readout, method)
        agr = self.agreement[key].dropna(subset=["pearson_r"]).sort_values("pearson_r", kind="stable")
        err_col = f"abs_error_{key[0]}"
        by_err = self.molecules.sort_values(err_col, ascending=False, kind="stable") \
            if err_col in self.molecules else self.molecules.iloc[:0]
        return {"best agreement": [int(i) for i in agr["molecule"].iloc[::-1][:k]],
                "worst agreement": [int(i) for i in agr["molecule"].iloc[:k]],
                "largest error": [int(i) for i in by_err["idx"].iloc[:k]]}

    def showcase(self, n: int = 3, readout: Optional[str] = None, method: Optional[str] = None) -> List[int]:
        """``n`` distinct molecules taken in turn from the best-agreement, worst-agreement and
        largest-error lists."""
        lists = list(self.picks(readout, k=max(n, 1), method=method).values())
        out: List[int] = []
        for rank in range(max(n, 1)):
            for ids in lists:
                if rank < len(ids) and ids[rank] not in out and len(out) < n:
                    out.append(ids[rank])
        return out

    def describe(self, idx: int, readout: Optional[str] = None, method: Optional[str] = None) -> str:
        """One line about a molecule: name, size, errors, agreement."""
        key = self._key(readout, method)
        row = self.molecules.set_index("idx").loc[int(idx)]
        factor, unit = _milli(self.unit)
        parts = [f"{row['name']} (idx {idx}, {int(row['n_atoms'])} atoms)"]
        for r in self.readouts:
            col = f"abs_error_{r}"
            if col in row and np.isfinite(row[col]):
                parts.append(f"|error| {_READOUT_NAMES.get(r, r)} {row[col] * factor:.0f} {unit}")
        agr = self.agreement[key].set_index("molecule").loc[int(idx)]
        r_text = "n/a" if not np.isfinite(agr["pearson_r"]) else f"{agr['pearson_r']:.2f}"
        parts.append(f"r({method_label(*key)}, orbital) = {r_text}")
        return " · ".join(parts)

    # ---- figures ---------------------------------------------------------------------------------
    def _panels(self, idx: int, readouts: Optional[Sequence[str]], method: Optional[str]):
        panels = {}
        for ro in readouts or self.readouts:
            key = self._key(ro, method if method in self.methods(ro) else None)
            panels[method_label(*key)] = self.attributions[key][idx]
        panels[self.coefficient_label] = self.coefficients[idx]
        return panels

    def view(self, idx: int, readouts: Optional[Sequence[str]] = None, *, method: Optional[str] = None,
             labels: Union[bool, int] = 3, panel_width: int = 330, height: int = 320, js_url: Optional[str] = None):
        """py3Dmol view of one molecule: each readout's attribution (``method`` where that readout has it, else
        its default) and the orbital shares side by side on ONE colour scale, labels on the top atoms."""
        from .viz import side_by_side

        idx = int(idx)
        return side_by_side(self.z[idx], self.pos[idx], self._panels(idx, readouts, method),
                            title=self.describe(idx, method=method if method in self.methods(
                                "abp" if "abp" in self.readouts else self.readouts[0]) else None),
                            labels=labels, panel_width=panel_width, height=height, js_url=js_url,
                            value_label="attribution / orbital share")

    def records(self, readout: Optional[str] = None, method: Optional[str] = None) -> pd.DataFrame:
        """Per-atom table (molecule, atom, element, coefficient, weight) for the scatter plot."""
        from .viz import atom_records

        key = self._key(readout, method)
        ids = [int(i) for i in self.molecules["idx"]]
        z = np.concatenate([self.z[i] for i in ids])
        w = np.concatenate([self.attributions[key][i] for i in ids])
        c = np.concatenate([self.coefficients[i] for i in ids])
        batch = np.repeat(np.arange(len(ids)), [self.z[i].size for i in ids])
        return atom_records(z, w, c, batch, mol_ids=self.molecules["name"].astype(str).tolist())

    def scatter(self, readout: Optional[str] = None, method: Optional[str] = None):
        from .viz import scatter_attention_vs_coefficients

        key = self._key(readout, method)
        return scatter_attention_vs_coefficients(
            self.records(*key), title=f"{method_label(*key)} vs {self.coefficient_label} "
                                      f"({len(self.molecules)} test molecules)",
            x_label=f"{self.coefficient_label} (share on atom)", y_label=f"{method_label(*key)} (share on atom)")

    def agreement_figure(self, statistic: str = "pearson_r"):
        """Per-molecule distribution of a statistic for every (readout, method) and for random weights."""
        import plotly.graph_objects as go

        fig = go.Figure()
        for key, df in self.agreement.items():
            fig.add_trace(go.Box(y=df[statistic], name=method_label(*key), boxmean=True))
        fig.add_trace(go.Box(y=self.baseline[statistic], name="random weights", boxmean=True))
        fig.update_layout(title=f"Per-molecule {statistic} with {self.coefficient_label}", yaxis_title=statistic,
                          template="plotly_white", width=max(640, 70 * (len(self.agreement) + 1)), height=440,
                          showlegend=False)
        return fig

    def faithfulness_figure(self):
        """Agreement (mean Pearson r with the orbital) against faithfulness (relative deletion area) for every
        (readout, method): the methods worth showing are up and to the right."""
        import plotly.graph_objects as go

        t = self.summary_table()
        if "deletion area / random" not in t:
            raise ValueError("this study was made without faithfulness (faithfulness=False)")
        fig = go.Figure(go.Scatter(x=t["deletion area / random"], y=t["pearson_r"], mode="markers+text",
                                   text=[f"{r} {m}" for r, m in zip(t["readout"], t["method"])],
                                   textposition="top center"))
        fig.add_vline(x=1.0, line_dash="dash", annotation_text="random order")
        fig.add_hline(y=float(self.baseline["pearson_r"].mean()), line_dash="dot", annotation_text="random weights")
        fig.update_layout(title="Orbital-like vs faithful, one point per (readout, method)",
                          xaxis_title="deletion area / random orders (> 1: faithful)",
                          yaxis_title=f"mean per-molecule Pearson r with {self.coefficient_label}",
                          template="plotly_white", width=760, height=520)
        return fig

    def picker(self, readout: Optional[str] = None, k: int = 5, method: Optional[str] = None):
        """An ipywidgets molecule picker (best/worst agreement, largest error) showing :meth:`view`."""
        import ipywidgets as widgets

        options = []
        by_idx = self.molecules.set_index("idx")
        for category, ids in self.picks(readout, k, method=method).items():
            for rank, i in enumerate(ids, 1):
                options.append((f"{category} #{rank}: {by_idx.loc[i, 'name']}", i))
        if not options:
            return widgets.HTML("no molecules to pick from")
        dropdown = widgets.Dropdown(options=options, description="molecule", layout=widgets.Layout(width="520px"))
        out = widgets.Output()

        def show(change=None):
            out.clear_output(wait=True)
            with out:
                self.view(dropdown.value, method=method).show()  # py3Dmol: show() (display() adds a text repr)

        dropdown.observe(show, names="value")
        show()
        return widgets.VBox([dropdown, out])

    def save_views(self, output_dir: Union[str, os.PathLike], ids: Sequence[int], *, method: Optional[str] = None,
                   png: bool = False, prefix: str = "view") -> List[Path]:
        """Standalone HTML of :meth:`view` for each molecule (offline when a local 3Dmol.js exists)
        and, with ``png=True``, a PNG rendered by headless Chromium where available."""
        from .viz import html_to_png, local_3dmol_js, save_html

        folder = Path(output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        inline = local_3dmol_js() is not None
        paths = []
        for i in ids:
            view = self.view(i, method=method)
            name = str(self.molecules.set_index("idx").loc[int(i), "name"])
            path = save_html(view, folder / f"{prefix}_{_safe(name)}.html", inline_js=inline)
            paths.append(path)
            if png:
                panels = len(view.abp.panels) if getattr(view, "abp", None) is not None else 2
                html_to_png(path, path.with_suffix(".png"), size=(panels * 330 + 40, 460))
        return paths

    def per_molecule_frame(self) -> pd.DataFrame:
        """Long table: one row per (readout, method, molecule) with the agreement and deletion statistics."""
        frames = []
        for key, agr in self.agreement.items():
            df = agr.copy()
            if key in self.deletion:
                df = df.merge(self.deletion[key].drop(columns=["n_atoms"]), on="molecule", how="left")
            df.insert(0, "method", key[1])
            df.insert(0, "readout", key[0])
            frames.append(df)
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


# ==============================================================================================================
# building a study
# ==============================================================================================================
def _rows_by_idx(dataset) -> Dict[int, int]:
    data = getattr(dataset, "_data", None)
    if getattr(dataset, "_indices", None) is None and data is not None and getattr(data, "idx", None) is not None:
        ids = np.asarray(data.idx).reshape(-1)
        if ids.size == len(dataset):
            return {int(v): r for r, v in enumerate(ids.tolist())}
    return {int(dataset[r].idx): r for r in range(len(dataset))}


def _batches(z_list, pos_list, batch_size: int):
    import torch
    from torch_geometric.data import Batch, Data

    for lo in range(0, len(z_list), batch_size):
        items = [Data(z=torch.as_tensor(z, dtype=torch.long), pos=torch.as_tensor(p, dtype=torch.float32))
                 for z, p in zip(z_list[lo:lo + batch_size], pos_list[lo:lo + batch_size])]
        yield lo, Batch.from_data_list(items)


def _resolve_methods(methods, readout: str, model) -> List[str]:
    from .explain import default_method, supported_methods

    allowed = supported_methods(model)
    if methods is None or methods == "all":
        return allowed
    if methods == "default":
        return [default_method(readout)]
    chosen = list(methods.get(readout, []) if isinstance(methods, Mapping) else methods)
    return [m for m in chosen if m in allowed]


def study_models(models: Mapping[str, Any], dataset, test_ids: Sequence[int], *, dataset_name: str,
                 target: str, unit: str, predictions: Optional[Mapping[str, pd.DataFrame]] = None,
                 methods: Union[None, str, Sequence[str], Mapping[str, Sequence[str]]] = None,
                 orbital: str = "auto", orbital_method: str = "gfn2-xtb", coefficients: str = "auto",
                 faithfulness: bool = True, n_random: int = 20, n_draws: int = 1000, seed: int = 0,
                 batch_size: int = 128, verbose: bool = True) -> AttributionStudy:
    """Attributions of trained models vs orbital coefficients for the molecules ``test_ids`` of ``dataset``.

    Args:
        models: readout name -> trained :class:`AtomisticModel` (or Lightning task).
        test_ids: dataset ``idx`` values of the molecules to analyse.
        predictions: readout -> ``idx, y_true, y_pred`` (physical units), for the error columns.
        methods: ``None``/``"all"`` (every method each readout supports), ``"default"``, a list (those each
            readout supports), or readout -> list.
        orbital: ``"auto"`` (LUMO shares for LUMO targets, else HOMO), ``"homo"``, ``"lumo"``, ...
        coefficients: ``"auto"`` (the dataset's ``homo_coeff`` for HOMO when present, else computed),
            ``"dataset"`` or ``"computed"``.
        faithfulness / n_random: deletion curves against ``n_random`` random orders per molecule.
        n_draws / seed: random-weights baseline (:func:`abp_core.agreement.random_baseline`).
    """
    from .agreement import per_molecule_agreement, random_baseline, summarise
    from .explain import attribute
    from .explain import faithfulness as deletion_curves
    from .orbitals import compute_orbitals

    orbital = orbital_for_target(target) if orbital == "auto" else orbital.lower()
    row_of = _rows_by_idx(dataset)
    test_ids = [int(i) for i in test_ids]
    if not test_ids:
        raise ValueError("no molecules to analyse")
    first = dataset[row_of[test_ids[0]]]
    has_coeff = coefficients in ("auto", "dataset") and orbital == "homo" and getattr(first, "homo_coeff", None) is not None
    if coefficients == "dataset" and not has_coeff:
        raise ValueError(f"{dataset_name} carries no per-atom {orbital}_coeff; use coefficients='computed'")
    label = ("HOMO coefficients (dataset)" if has_coeff else
             f"{'GFN2-xTB' if orbital_method == 'gfn2-xtb' else orbital_method} {orbital.upper()} share")
    z_of, pos_of, c_of, names, smiles, failed = {}, {}, {}, {}, {}, []
    t0 = time.perf_counter()
    for idx in test_ids:
        d = dataset[row_of[idx]]
        z = d.z.numpy().astype(np.int64)
        pos = d.pos.double().numpy()
        if has_coeff:
            c = np.asarray(d.homo_coeff, dtype=np.float64).clip(min=0)
            c = c / c.sum() if c.sum() > 0 else c
        else:
            try:
                res = compute_orbitals(z, pos, (orbital,), orbital_method, name=str(getattr(d, "name", idx)))
                c = next(iter(res.values())).coefficients
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
        print(f"  {label}: {len(ids)} molecules in {seconds:.1f} s" + (f", {len(failed)} failed" if failed else ""),
              flush=True)
    mol = pd.DataFrame({"idx": ids, "name": [names[i] for i in ids], "smiles": [smiles[i] for i in ids],
                        "n_atoms": [z_of[i].size for i in ids]})
    for ro, p in (predictions or {}).items():
        p = p.drop_duplicates("idx").set_index("idx")
        if "y_true" not in mol:
            mol["y_true"] = p.reindex(ids)["y_true"].to_numpy()
        mol[f"y_pred_{ro}"] = p.reindex(ids)["y_pred"].to_numpy()
        mol[f"abs_error_{ro}"] = (mol[f"y_pred_{ro}"] - mol["y_true"]).abs()
    z_list, pos_list = [z_of[i] for i in ids], [pos_of[i] for i in ids]
    attributions: Dict[Key, Dict[int, np.ndarray]] = {}
    deletion: Dict[Key, pd.DataFrame] = {}
    timing: Dict[Key, float] = {}
    for ro, model in models.items():
        model = getattr(model, "model", model)
        for m in _resolve_methods(methods, ro, model):
            per_mol: List[np.ndarray] = []
            frames = []
            t1 = time.perf_counter()
            for lo, batch in _batches(z_list, pos_list, batch_size):
                a = attribute(model, batch, m)
                ptr = batch.ptr.cpu().numpy()
                a_np = a.double().cpu().numpy()
                per_mol += [a_np[ptr[k]:ptr[k + 1]] for k in range(len(ptr) - 1)]
                if faithfulness:
                    frames.append(deletion_curves(model, batch, a, n_random=n_random, seed=seed + lo)
                                  .to_frame(ids[lo:lo + len(ptr) - 1]))
            timing[(ro, m)] = time.perf_counter() - t1
            attributions[(ro, m)] = dict(zip(ids, per_mol))
            if faithfulness:
                deletion[(ro, m)] = pd.concat(frames, ignore_index=True)
    batch_vec = np.repeat(np.arange(len(ids)), [z_of[i].size for i in ids])
    c_all = np.concatenate([c_of[i] for i in ids])
    base = random_baseline(c_all, batch_vec, n_draws=n_draws, seed=seed, mol_ids=ids)
    agreement, summaries = {}, {}
    for key, per in attributions.items():
        w_all = np.concatenate([per[i] for i in ids])
        agreement[key] = per_molecule_agreement(w_all, c_all, batch_vec, mol_ids=ids)
        summaries[key] = summarise(agreement[key], base, seed=seed)
    return AttributionStudy(dataset_name=dataset_name, target=target, unit=unit, coefficient_label=label,
                            molecules=mol, z=z_of, pos=pos_of, coefficients=c_of, attributions=attributions,
                            agreement=agreement, deletion=deletion, baseline=base, summaries=summaries,
                            failed=failed, coefficient_seconds=seconds, attribution_seconds=timing)


def attribution_study(runs, readouts: Optional[Sequence[str]] = None, *, max_molecules: Optional[int] = None,
                      methods: Union[None, str, Sequence[str], Mapping[str, Sequence[str]]] = None,
                      orbital: str = "auto", orbital_method: str = "gfn2-xtb", coefficients: str = "auto",
                      faithfulness: bool = True, n_random: int = 20, n_draws: int = 1000, seed: int = 0,
                      verbose: bool = True) -> AttributionStudy:
    """:func:`study_models` on the test molecules of :func:`abp_core.quickstart.train_readouts`'s runs.

    Args:
        readouts: readouts to analyse (default: every trained one; sum and mean have gradient methods and
            occlusion only).
        max_molecules: analyse at most this many test molecules (default: all).
        See :func:`study_models` for the rest.
    """
    readouts = list(readouts) if readouts is not None else list(runs.results)
    bad = [r for r in readouts if r not in runs.results]
    if bad or not readouts:
        raise ValueError(f"readouts {bad or readouts} were not trained; trained: {list(runs.results)}")
    preds = {ro: runs.predictions(ro) for ro in runs.results}
    test = preds[readouts[0]]
    if max_molecules is not None:
        test = test.iloc[:max_molecules]
    models = {ro: runs.task(ro).model for ro in readouts}
    return study_models(models, runs.dataset, test["idx"].astype(int).tolist(), dataset_name=runs.dataset_name,
                        target=runs.target, unit=runs.unit, predictions=preds, methods=methods, orbital=orbital,
                        orbital_method=orbital_method, coefficients=coefficients, faithfulness=faithfulness,
                        n_random=n_random, n_draws=n_draws, seed=seed, verbose=verbose)


# ==============================================================================================================
# the committed evidence (experiments/explain_evidence.py)
# ==============================================================================================================
def _vs_reference(study: AttributionStudy, key: Key, ref: Key) -> Tuple[float, float]:
    """Mean per-molecule Pearson r difference ``key - ref`` and its two-sided Wilcoxon p (same molecules)."""
    from scipy import stats

    a = study.agreement[key].set_index("molecule")["pearson_r"]
    b = study.agreement[ref].set_index("molecule")["pearson_r"].reindex(a.index)
    both = a.notna() & b.notna()
    d = (a[both] - b[both]).to_numpy()
    if d.size == 0 or not np.any(d != 0):
        return float(d.mean()) if d.size else float("nan"), float("nan")
    return float(d.mean()), float(stats.wilcoxon(d).pvalue)


def evidence_rows(study: AttributionStudy, context: Mapping[str, Any]) -> pd.DataFrame:
    """One row per (readout, method) of a study: the agreement means with CIs and tests against random
    weights, the mean r difference to WA's weights (when WA was studied) and the relative deletion area."""
    t = study.summary_table()
    t.insert(0, "orbital", study.coefficient_label)
    for k, v in reversed(list(context.items())):
        t.insert(0, k, v)
    ref = ("wa", "weights") if ("wa", "weights") in study.agreement else None
    diffs, ps = [], []
    for key in study.summaries:
        d, p = _vs_reference(study, key, ref) if ref and key != ref else (float("nan"), float("nan"))
        diffs.append(d)
        ps.append(p)
    t["r minus WA weights r"] = diffs
    t["p vs WA weights (two-sided)"] = ps
    t["seconds"] = [study.attribution_seconds.get(k, float("nan")) for k in study.summaries]
    return t


def run_evidence_study(configs: Sequence[Tuple[str, Any]], datasets: Mapping[str, Any],
                       out_dir: Union[str, os.PathLike], *, command: str, n_random: int = 20,
                       per_molecule_path: Union[None, str, os.PathLike] = None, verbose: bool = True) -> pd.DataFrame:
    """The attribution study on finished training runs, grouped by (dataset, target, seed), written to
    ``out_dir`` (``summary.csv``, ``across_seeds.csv``, ``tables.md``, ``meta.json``) and every molecule's
    statistics to ``per_molecule_path`` (default ``out_dir/per_molecule.csv.gz``).

    ``configs``: ``(dataset name, Config)`` of finished runs (the trainer reuses them, training nothing new
    unless a run is missing).
    """
    import json
    import platform

    import torch

    from .files import atomic_path, write_text  # every file the package writes goes through one writer
    from .train import load_task, run_training

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups: Dict[Tuple[str, str, int], Dict[str, Any]] = {}
    for name, cfg in configs:
        res = run_training(cfg, dataset=datasets[name])
        key = (name, res.metrics["target_names"][0], int(cfg.data.split_seed))
        groups.setdefault(key, {})[cfg.model.readout] = res
    rows, per_mol = [], []
    t_all = time.perf_counter()
    for (name, target, seed), runs in groups.items():
        t0 = time.perf_counter()
        first = next(iter(runs.values()))
        preds, models, maes = {}, {}, {}
        for ro, res in runs.items():
            df = pd.read_csv(Path(res.run_dir) / "predictions_test.csv")
            preds[ro] = df[df["weights"] == "best"][["idx", "y_true", "y_pred"]].reset_index(drop=True)
            models[ro] = load_task(Path(res.run_dir) / "best.ckpt").model
            maes[ro] = next(iter(res.test_mae.values()))
        unit = first.metrics["target_units"][0]
        factor, unit_m = _milli(unit)
        test_ids = preds[next(iter(preds))]["idx"].astype(int).tolist()
        study = study_models(models, datasets[name], test_ids, dataset_name=name, target=target, unit=unit,
                             predictions=preds, methods=None, faithfulness=True, n_random=n_random, seed=seed,
                             verbose=verbose)
        t = evidence_rows(study, {"dataset": name, "target": target, "seed": seed})
        t.insert(5, f"test MAE ({unit_m})", [maes[{v: k for k, v in _READOUT_NAMES.items()}[r]] * factor
                                           for r in t["readout"]])
        rows.append(t)
        pm = study.per_molecule_frame()
        pm.insert(0, "seed", seed)
        pm.insert(0, "target", target)
        pm.insert(0, "dataset", name)
        per_mol.append(pm)
        if verbose:
            print(f"{name} {target} seed {seed}: {len(test_ids)} molecules, {time.perf_counter() - t0:.0f} s\n"
                  + study.compact_table().to_string(index=False, float_format=lambda v: f"{v:.3f}"), flush=True)
    summary = pd.concat(rows, ignore_index=True)
    write_text(out / "summary.csv", summary.to_csv(index=False, float_format="%.6g"))
    with atomic_path(Path(per_molecule_path) if per_molecule_path else out / "per_molecule.csv.gz") as tmp:
        pd.concat(per_mol, ignore_index=True).to_csv(tmp, index=False, float_format="%.6g", compression="gzip")
    across = across_seeds(summary)
    write_text(out / "across_seeds.csv", across.to_csv(index=False, float_format="%.6g"))
    write_text(out / "tables.md", evidence_markdown(summary, across))
    meta = {"command": command, "seconds": time.perf_counter() - t_all, "n_random_orders": n_random,
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu": platform.processor() or platform.machine(), "groups": [list(k) for k in groups]}
    write_text(out / "meta.json", json.dumps(meta, indent=1))
    return summary


def _rank_list(ranks) -> str:
    """``"1,2,1"``: a method's rank on each seed (``-`` where its correlation is undefined)."""
    return ",".join("-" if not np.isfinite(x) else str(int(x)) for x in ranks)


def across_seeds(summary: pd.DataFrame) -> pd.DataFrame:
    """Per (dataset, target, readout, method): mean and range over seeds of the mean Pearson r, top-1 and
    relative deletion area, and the rank of the method among that readout's methods on every seed."""
    s = summary.copy()
    s["rank_r_within_readout"] = s.groupby(["dataset", "target", "seed", "readout"])["pearson_r"] \
        .rank(ascending=False, method="min")
    s["rank_r_overall"] = s.groupby(["dataset", "target", "seed"])["pearson_r"].rank(ascending=False, method="min")
    agg = s.groupby(["dataset", "target", "readout", "method"], sort=False).agg(
        seeds=("seed", "nunique"), pearson_r=("pearson_r", "mean"), pearson_r_min=("pearson_r", "min"),
        pearson_r_max=("pearson_r", "max"), top1_match=("top1_match", "mean"),
        relative_deletion_area=("deletion area / random", "mean"),
        relative_deletion_area_min=("deletion area / random", "min"),
        beats_random_all_seeds=("pearson_r beats random", "all"),
        faithful_all_seeds=("faithful (beats random order)", "all"),
        ranks_within_readout=("rank_r_within_readout", _rank_list),
        ranks_overall=("rank_r_overall", _rank_list)).reset_index()
    return agg


def _markdown(df: pd.DataFrame, digits: int = 3) -> str:
    def cell(v):
        if isinstance(v, (bool, np.bool_)):
            return "yes" if v else "no"
        if isinstance(v, (float, np.floating)):
            return "n/a" if not np.isfinite(v) else (f"{v:.2g}" if 0 < abs(v) < 10 ** -digits else f"{v:.{digits}f}")
        return str(v)

    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def evidence_markdown(summary: pd.DataFrame, across: pd.DataFrame) -> str:
    """``tables.md`` of the evidence: per (dataset, target) the across-seed means, then every seed's table."""
    parts = ["# Attributions vs orbital shares (generated by `experiments/explain_evidence.py analyse`)", ""]
    cols = ["readout", "method", "seeds", "pearson_r", "pearson_r_min", "pearson_r_max", "top1_match",
            "relative_deletion_area", "relative_deletion_area_min", "beats_random_all_seeds", "faithful_all_seeds",
            "ranks_overall"]
    for (ds, tgt), g in across.groupby(["dataset", "target"], sort=False):
        parts += [f"## {ds} {tgt}: mean over seeds", "", _markdown(g[cols]), ""]
    per_seed = ["readout", "method", "pearson_r", "spearman_rho", "top1_match", "l1", "pearson_r beats random",
                "r minus WA weights r", "p vs WA weights (two-sided)", "deletion area / random", "deletion p",
                "faithful (beats random order)"]
    for (ds, tgt, seed), g in summary.groupby(["dataset", "target", "seed"], sort=False):
        mae = [c for c in g.columns if c.startswith("test MAE")][0]
        parts += [f"### {ds} {tgt}, seed {seed} ({int(g['molecules'].iloc[0])} test molecules, {g['orbital'].iloc[0]})",
                  "", _markdown(g[["readout", mae] + per_seed[1:]].rename(columns={mae: mae})), ""]
    return "\n".join(parts)
