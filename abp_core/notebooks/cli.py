"""The command line of the notebooks: ``abp notebooks list`` and ``abp notebooks run``.

::

    abp notebooks list
    abp notebooks run 00_quickstart -p epochs=3,6 -p readouts=[sum,abp],[sum,wa,abp] --out outputs/grid

:func:`register` adds the subcommands to ``abp`` (:mod:`abp_core.cli`).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, List

from ..files import write_text
from .grid import list_notebooks, notebook_dir, notebook_parameters, parse_grid_values, run_grid

__all__ = ["register"]


def _cmd_list(args) -> int:
    nbs = list_notebooks(args.dir)
    if not nbs:
        print(f"no notebooks in {args.dir or notebook_dir()}")
        return 1
    for path in nbs:
        print(path.name)
        try:
            params = notebook_parameters(path)
        except Exception as exc:  # noqa: BLE001
            print(f"    (parameters unreadable: {exc})")
            continue
        for name, p in params.items():
            help_text = f"  # {p['help']}" if p.get("help") else ""
            print(f"    {name}: {p['type']} = {p['default']}{help_text}")
    return 0


def _cmd_run(args) -> int:
    import pandas as pd

    grid: Dict[str, List[Any]] = {}
    try:
        for text in args.param or []:
            key, values = parse_grid_values(text)
            grid.setdefault(key, []).extend(values)
        df = run_grid(args.notebook, grid, args.out, kernel_name=args.kernel, log_output=args.log_output,
                      cwd=args.cwd, execution_timeout=args.timeout)
    except (ValueError, FileNotFoundError) as exc:  # bad grid or notebook: one line, exit code 2
        print(f"abp: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    cols = [c for c in df.columns if c not in ("results", "output_dir")]
    with pd.option_context("display.width", 200, "display.max_columns", 40, "display.max_colwidth", 60):
        print(df[cols].to_string(index=False))
    summary = Path(args.out) / "grid.csv"
    write_text(summary, df.drop(columns=["results"]).to_csv(index=False))
    n_failed = int((df["status"] != "ok").sum())
    print(f"\n{len(df) - n_failed}/{len(df)} runs ok; table written to {summary}")
    return 1 if n_failed else 0


def register(subparsers) -> None:
    """Add ``abp notebooks {run,list}`` to the ``abp`` command line (``subparsers`` from argparse)."""
    p = subparsers.add_parser("notebooks", help="run notebooks over parameter grids (papermill), list them",
                              description="Execute the project's notebooks in batch.")
    sub = p.add_subparsers(dest="notebooks_command", metavar="<subcommand>")
    run = sub.add_parser("run", help="execute a notebook over the Cartesian product of parameter values",
                         description="One output notebook per combination; each run's results.json is "
                                     "collected into <out>/grid.csv. A failed run is reported and the "
                                     "others go on (exit code 1 if any failed).")
    run.add_argument("notebook", help="notebook path or name in notebooks/ (e.g. 00_quickstart)")
    run.add_argument("-p", "--param", action="append", metavar="KEY=V1,V2",
                     help="grid values (YAML each; brackets keep lists together: readouts=[sum,abp],[sum,wa])")
    run.add_argument("--out", "-o", required=True, help="directory for output notebooks and per-run outputs")
    run.add_argument("--kernel", default=None, help="Jupyter kernel name (default: the notebook's)")
    run.add_argument("--log-output", action="store_true", help="stream the notebooks' outputs")
    run.add_argument("--cwd", default=None, help="working directory of the kernels")
    run.add_argument("--timeout", type=float, default=None, help="seconds per cell")
    run.set_defaults(handler=_cmd_run)
    lst = sub.add_parser("list", help="list the notebooks and their parameters")
    lst.add_argument("--dir", default=None, help="folder of notebooks (default: the repository's notebooks/)")
    lst.set_defaults(handler=_cmd_list)

    def _no_sub(args) -> int:
        p.print_help()
        return 2

    p.set_defaults(handler=_no_sub)
