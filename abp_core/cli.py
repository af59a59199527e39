"""Command line: ``abp <subcommand> ...``.

Subcommands (``abp <subcommand> --help`` for details)::

    abp train --config cfg.yaml [section.option=value ...]
    abp experiment --config cfg.yaml --targets homo_PBE0,lumo_PBE0 --readouts sum,abp --seeds 23887,386333
    abp predict CHECKPOINT molecules.sdf --out preds.csv [--views DIR]
    abp table RUNS_DIR [--baseline sum --candidate abp] [--paper]      (alias: abp report)
    abp config [--config cfg.yaml] [section.option=value ...]          (print the resolved config)

Adding a subcommand: write ``def _register_x(subparsers)`` that adds a parser and sets
``handler=<function(args) -> int>`` with ``set_defaults``, then decorate it with
``@subcommand("x")`` (or call ``register_subcommand("x", fn)``, or
``register_subcommand("x", "abp_core.x:register")`` to import the module lazily). ``main()`` finds it in
:data:`SUBCOMMANDS`; expected errors (``ConfigError``, bad input files) are printed as one
``abp: error: ...`` line and give exit code 2, a failed run (also a full disk) exit code 1, and a run
stopped by SIGTERM/SIGUSR1 after writing its checkpoint exit code 128 + signal (143/138).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

__all__ = ["main", "SUBCOMMANDS", "register_subcommand", "subcommand", "build_parser"]

#: name -> function(subparsers) that adds the subcommand's parser (with ``handler`` set as a default).
SUBCOMMANDS: Dict[str, Callable[[argparse._SubParsersAction], None]] = {}


def register_subcommand(name: str, register) -> None:
    """Register ``register(subparsers)`` as the builder of subcommand ``name``.

    ``register`` may also be a ``"package.module:function"`` string, imported only when the parser is
    built (keeps ``abp --help`` fast when a subcommand pulls in heavy dependencies), e.g.
    ``register_subcommand("notebooks", "abp_core.notebooks:register")``.
    """
    if isinstance(register, str):
        target = register

        def register(sub, _target=target, _name=name):
            import importlib

            module, _, attr = _target.partition(":")
            try:
                hook = getattr(importlib.import_module(module), attr or "register")
            except (ImportError, AttributeError) as exc:  # one broken plugin must not break every command
                msg = f"subcommand '{_name}' is unavailable ({type(exc).__name__}: {exc})"
                sub.add_parser(_name, help=f"(unavailable: {exc})").set_defaults(
                    handler=lambda args: _unavailable(msg))
                return
            hook(sub)

    SUBCOMMANDS[name] = register


def subcommand(name: str):
    """Decorator form of :func:`register_subcommand`."""

    def deco(fn):
        register_subcommand(name, fn)
        return fn

    return deco


class UsageError(Exception):
    """A user error reported as one line, exit code 2."""


def _unavailable(message: str) -> int:
    print(f"abp: error: {message}", file=sys.stderr)
    return 2


def _csv_list(text: Optional[str]) -> Optional[List[str]]:
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    return items or None


def _int_list(text: Optional[str], name: str) -> Optional[List[int]]:
    items = _csv_list(text)
    if items is None:
        return None
    try:
        return [int(t) for t in items]
    except ValueError:
        raise UsageError(f"{name} must be a comma-separated list of integers, got {text!r}") from None


def _target_list(text: Optional[str]):
    items = _csv_list(text)
    if items is None:
        return None
    return [int(t) if t.lstrip("-").isdigit() else t for t in items]


def _load(args):
    from .config import load_config

    return load_config(args.config, args.overrides)


# ------------------------------------------------------------------------------------------------
# train
# ------------------------------------------------------------------------------------------------
def _cmd_train(args) -> int:
    from .train import run_training

    cfg = _load(args)
    result = run_training(cfg)
    if not result.is_global_zero:  # other DDP ranks stay quiet
        return 0
    _print_result(result)
    return 0


def _save_summary(summary, out) -> None:
    from .files import write_text

    write_text(out, summary.to_csv(index=False))
    print(f"summary written to {out}")


def _print_result(result) -> None:
    m = result.metrics
    state = "already finished (not redone)" if result.skipped else "finished"
    print(f"run {state}: {result.run_dir}")
    for name, met in m.get("metrics", {}).get("test_best", {}).items():
        unit = dict(zip(m.get("target_names", []), m.get("target_units", []))).get(name, "")
        print(f"  test {name}: MAE {met['mae']:.6g} {unit}, RMSE {met['rmse']:.6g}, max {met['max_error']:.6g}, "
              f"R2 {met['r2']:.4f} (best epoch {m.get('best_epoch')}, {m.get('epochs_trained')} epochs)")


@subcommand("train")
def _register_train(sub):
    p = sub.add_parser("train", help="train one model from a config file",
                       description="Train one model. Re-running the same command resumes from last.ckpt; "
                                   "a finished run is not redone.")
    p.add_argument("--config", "-c", help="YAML/JSON config (defaults are used for anything not given)")
    p.add_argument("overrides", nargs="*", metavar="section.option=value",
                   help="config overrides, e.g. model.readout=abp trainer.max_epochs=3")
    p.set_defaults(handler=_cmd_train)


# ------------------------------------------------------------------------------------------------
# experiment
# ------------------------------------------------------------------------------------------------
def _cmd_experiment(args) -> int:
    from . import stats
    from .train import run_experiment

    cfg = _load(args)
    results, failures = run_experiment(
        cfg, targets=_target_list(args.targets), readouts=_csv_list(args.readouts),
        seeds=_int_list(args.seeds, "--seeds"), backbones=_csv_list(args.backbones))
    dirs = {str(r.run_dir) for r in results}
    runs = stats.collect_runs(cfg.trainer.output_dir, weights=args.weights)
    runs = runs[runs["run_dir"].isin(dirs)]
    summary = stats.summarize(runs)
    _print_tables(summary, args.baseline, args.candidate, paper=True)
    if args.out:
        _save_summary(summary, args.out)
    if failures:
        print(f"{len(failures)} run(s) failed:", file=sys.stderr)
        for cfg_, msg in failures:
            print(f"  {cfg_.data.targets} {cfg_.model.readout} seed {cfg_.data.split_seed}: {msg}", file=sys.stderr)
        return 1
    return 0


@subcommand("experiment")
def _register_experiment(sub):
    p = sub.add_parser("experiment", help="run a grid of targets x readouts x split seeds",
                       description="Runs every combination sequentially; finished runs are skipped, and new "
                                   "results go into new run directories (nothing is overwritten).")
    p.add_argument("--config", "-c", help="base YAML/JSON config")
    p.add_argument("--targets", help="comma-separated target names or indices (default: the config's)")
    p.add_argument("--readouts", help="comma-separated readouts, e.g. sum,abp (default: the config's)")
    p.add_argument("--seeds", help="comma-separated split seeds (default: the config's)")
    p.add_argument("--backbones", help="comma-separated backbones (default: the config's)")
    p.add_argument("--baseline", default="sum", help="baseline readout of the comparison (default sum)")
    p.add_argument("--candidate", default="abp", help="readout compared with the baseline (default abp)")
    p.add_argument("--weights", choices=("best", "last"), default="best",
                   help="report the best-validation checkpoint (default) or the final weights (paper)")
    p.add_argument("--out", help="write the summary (mean/std over seeds) to this CSV")
    p.add_argument("overrides", nargs="*", metavar="section.option=value", help="config overrides")
    p.set_defaults(handler=_cmd_experiment)


# ------------------------------------------------------------------------------------------------
# table / report
# ------------------------------------------------------------------------------------------------
def _print_tables(summary, baseline: str, candidate: str, paper: bool) -> None:
    import pandas as pd

    from . import stats

    if summary.empty:
        print("no finished runs found")
        return
    with pd.option_context("display.max_rows", 500, "display.max_columns", 50, "display.width", 200,
                           "display.max_colwidth", 60):
        print("\nTest MAE, mean ± std over split seeds:")
        print(stats.paper_layout(summary, "mae").to_string())
        cmp = stats.compare_readouts(summary, baseline, candidate)
        if len(cmp):
            print(f"\n{candidate} vs {baseline} (improvement % = 100 (baseline - candidate) / baseline):")
            print(cmp.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
            if len(cmp) >= 2:
                try:
                    print(stats.wilcoxon_readouts(summary, baseline, candidate))
                except ValueError as exc:
                    print(f"Wilcoxon test not possible: {exc}")
        if paper:
            joined = stats.with_paper(summary)
            joined = joined[joined["paper_task"].notna()]
            if len(joined):
                cols = ["dataset", "paper_task", "backbone", "readout", "mae_mean", "mae_std", "unit",
                        "ours_in_paper_units_mean", "paper_mean", "paper_std", "paper_unit"]
                print("\nBeside the paper's Table 1 (test MAE; the paper's 'meV' for QM7b/QM8 are milli-Hartree):")
                print(joined[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))


def _cmd_table(args) -> int:
    from . import stats

    if args.paper_only:
        table = stats.paper_table(args.paper_only)
        import pandas as pd

        with pd.option_context("display.max_rows", 500, "display.max_columns", 50, "display.width", 250):
            print(table.to_string(index=False))
        if str(args.paper_only) == "1":
            for bb in ("schnet", "dimenet++"):
                ch = stats.paper_relative_changes(bb)
                print(f"\n{bb}: mean improvement of ABP over sum per dataset (paper convention, "
                      f"relative to ABP):")
                print(ch.groupby("dataset", sort=False)["improvement_pct"].mean().round(2).to_string())
        return 0
    root = Path(args.runs)
    if not root.exists():
        raise UsageError(f"runs directory {str(root)!r} not found")
    runs = stats.collect_runs(root, weights=args.weights)
    summary = stats.summarize(runs)
    _print_tables(summary, args.baseline, args.candidate, paper=args.paper)
    if args.out:
        _save_summary(summary, args.out)
    return 0


def _add_table_args(p):
    p.add_argument("runs", nargs="?", default="runs", help="runs directory (default: runs)")
    p.add_argument("--baseline", default="sum")
    p.add_argument("--candidate", default="abp")
    p.add_argument("--weights", choices=("best", "last"), default="best")
    p.add_argument("--paper", action="store_true", help="show the paper's Table 1 values beside ours")
    p.add_argument("--paper-only", metavar="TABLE", help="just print the paper's table 1, 2, 3, 4 or 2-4")
    p.add_argument("--out", help="write the summary to this CSV")
    p.set_defaults(handler=_cmd_table)


@subcommand("table")
def _register_table(sub):
    _add_table_args(sub.add_parser("table", help="aggregate finished runs (mean ± std, relative change, "
                                                 "Wilcoxon) next to the paper's numbers"))


@subcommand("report")
def _register_report(sub):
    _add_table_args(sub.add_parser("report", help="alias of 'table'"))


# ------------------------------------------------------------------------------------------------
# predict
# ------------------------------------------------------------------------------------------------
def _report_molecules(predictions, messages) -> int:
    """Per-molecule report on stderr: every molecule not predicted, by name, with its reason."""
    failed = predictions[predictions["status"] != "ok"]
    if len(failed):
        print(f"{len(failed)} molecule(s) not predicted (the others were):", file=sys.stderr)
    for msg in messages:
        print(msg, file=sys.stderr)
    return int((predictions["status"] == "ok").sum())


def _molecule_inputs(args):
    if args.molecules is None and not args.smiles:
        raise UsageError("give a molecule file (.sdf/.xyz/.smi/.csv) and/or --smiles SMILES ...")
    return {"molecules": args.molecules, "smiles": args.smiles, "optimize": args.optimize}


def _cmd_predict(args) -> int:
    from .predict import predict_file

    res = predict_file(args.checkpoint, out=args.out, views=args.views, batch_size=args.batch_size,
                       weights_out=args.atom_weights, method=args.method, **_molecule_inputs(args))
    ok = _report_molecules(res.predictions, res.messages)
    print(f"predicted {ok}/{len(res.predictions)} molecules -> {res.out}")
    if res.geometries_path:
        print(f"geometries used -> {res.geometries_path}")
    if res.weights_path:
        print(f"per-atom {'attributions (' + args.method + ')' if args.method else 'readout weights'} "
              f"-> {res.weights_path}")
    return 0 if ok else 1


def _add_molecule_args(p):
    p.add_argument("molecules", nargs="?", help="an .sdf (RDKit), .xyz/.extxyz (ASE, multi-frame), or SMILES in "
                                                ".smi ('SMILES name' per line) / .csv (a 'smiles' column) file")
    p.add_argument("--smiles", nargs="+", metavar="SMILES", help="SMILES strings (3D from RDKit ETKDG + MMFF94)")
    p.add_argument("--optimize", choices=("mmff", "xtb", "none"), default="mmff",
                   help="geometry of SMILES: ETKDG + MMFF94 (default), + GFN2-xTB (tblite; closer to QM9's DFT "
                        "geometries), or ETKDG only")
    p.add_argument("--batch-size", type=int, default=64)


@subcommand("predict")
def _register_predict(sub):
    p = sub.add_parser("predict", help="predict molecules (SMILES, SDF, XYZ) with a shipped model or a checkpoint")
    p.add_argument("checkpoint", metavar="MODEL_OR_CHECKPOINT",
                   help="a shipped model (see 'abp models', e.g. qm9-homo-abp) or a .ckpt written by 'abp train'")
    _add_molecule_args(p)
    p.add_argument("--out", "-o", default="predictions.csv", help="predictions CSV (default predictions.csv); "
                   "geometries made from SMILES go to <out>_geometries.sdf")
    p.add_argument("--atom-weights", help="per-atom values CSV (default: <out>_atom_weights.csv)")
    p.add_argument("--method", help="per-atom attribution instead of the readout's weights: weights, rollout, "
                                    "gradient, input_x_gradient, integrated_gradients, occlusion")
    p.add_argument("--views", metavar="DIR", help="write 3D views of the per-atom values (HTML) into DIR")
    p.set_defaults(handler=_cmd_predict)


# ------------------------------------------------------------------------------------------------
# models / explain
# ------------------------------------------------------------------------------------------------
def _cmd_models(args) -> int:
    import json

    import pandas as pd

    from . import pretrained

    if args.card:
        print(json.dumps(pretrained.card(args.card), indent=2, ensure_ascii=False))
        return 0
    table = pretrained.table()
    if table.empty:
        print("no shipped models in this installation")
        return 1
    with pd.option_context("display.max_columns", 20, "display.width", 200):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.1f}", na_rep="-"))
    print("\ntest MAE/RMSE in meV on the paper's QM9 split 844249 (13,084 test molecules); paper = Table 1, "
          "same readout (SchNet 256/256/8; '-': no such row). Card: abp models --card NAME")
    return 0


@subcommand("models")
def _register_models(sub):
    p = sub.add_parser("models", help="list the shipped pretrained models with their test MAE")
    p.add_argument("--card", metavar="NAME", help="print one model's full card (JSON)")
    p.set_defaults(handler=_cmd_models)


def _cmd_explain(args) -> int:
    from .predict import explain_molecules

    res = explain_molecules(args.model, out_dir=args.out, method=args.method, orbitals=args.orbitals,
                            batch_size=args.batch_size, **_molecule_inputs(args))
    ok = _report_molecules(res.predictions, res.messages)
    print(f"explained {ok}/{len(res.predictions)} molecules ({res.method}) -> {args.out}")
    for key, path in res.files.items():
        print(f"  {key}: {path}")
    if res.views:
        print(f"  {len(res.views)} view(s): {Path(res.views[0]).parent}")
    return 0 if ok else 1


@subcommand("explain")
def _register_explain(sub):
    p = sub.add_parser("explain", help="per-atom attributions (and xTB orbital shares) of new molecules, "
                                       "with one offline HTML view per molecule")
    p.add_argument("model", metavar="MODEL_OR_CHECKPOINT", help="a shipped model (see 'abp models') or a .ckpt")
    _add_molecule_args(p)
    p.add_argument("--out", "-o", required=True, metavar="DIR",
                   help="folder for predictions.csv, attributions.csv, geometries.sdf and views/")
    p.add_argument("--method", help="attribution method (default: the readout's default, e.g. rollout for ABP, "
                                    "weights for WA, gradient for sum)")
    p.add_argument("--orbitals", action="store_true",
                   help="also GFN2-xTB HOMO/LUMO shares of the same geometry, shown beside the attribution")
    p.set_defaults(handler=_cmd_explain)


# ------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------
def _cmd_config(args) -> int:
    cfg = _load(args)
    if args.out:
        cfg.save(args.out)
        print(f"config written to {args.out}")
    else:
        print(cfg.to_yaml(), end="")
    return 0


@subcommand("config")
def _register_config(sub):
    p = sub.add_parser("config", help="print (or save) the resolved config: defaults + file + overrides")
    p.add_argument("--config", "-c")
    p.add_argument("--out", help="save to this YAML/JSON file instead of printing")
    p.add_argument("overrides", nargs="*", metavar="section.option=value")
    p.set_defaults(handler=_cmd_config)


# ------------------------------------------------------------------------------------------------
# subcommands living in other modules (imported when the parser is built)
register_subcommand("notebooks", "abp_core.notebooks:register")


# ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="abp", description="Attention-based pooling for atomistic models.")
    parser.add_argument("--version", action="version", version=f"abp {__version__}")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for register in SUBCOMMANDS.values():
        register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``abp`` script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    logger = logging.getLogger("abp_core")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    from .config import ConfigError

    expected = (ConfigError, UsageError, FileNotFoundError)
    try:
        from .data import DatasetError
        from .predict import MethodError, MoleculeFileError
        from .pretrained import PretrainedError
        from .train import CheckpointError

        expected = expected + (DatasetError, CheckpointError, MoleculeFileError, MethodError, PretrainedError)
    except ImportError:  # pragma: no cover
        pass
    try:
        from .files import StorageError
        from .train import NonFiniteLossError, RunConflictError, TrainingPreempted

        failed_run = (NonFiniteLossError, RunConflictError, StorageError)
    except ImportError:  # pragma: no cover
        failed_run, TrainingPreempted = (), ()
    try:
        return int(args.handler(args) or 0)
    except expected as exc:
        if args.verbose:
            raise
        print(f"abp: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except failed_run as exc:
        if args.verbose:
            raise
        print(f"abp: run failed: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("abp: interrupted (re-run the same command to resume from last.ckpt)", file=sys.stderr)
        return 130
    except TrainingPreempted as exc:  # checkpoint written, already reported by the trainer
        return int(exc.code)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (not at creation)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
