"""Batch runs of the notebooks: papermill over a grid of parameter values.

:func:`run_grid` executes a notebook for every combination of parameter values (the Cartesian product;
one output notebook and one output directory per combination) and collects each run's ``results.json``;
a failed combination is reported with its parameters and does not stop the others.
:func:`list_notebooks` and :func:`notebook_parameters` say what there is to run; the command line is
in :mod:`.cli`.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import re
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ..coercion import parse_yaml_text, split_top_level
from ..files import atomic_path, refused_errno
from .outputs import _jsonable, prepare_output_dir

__all__ = ["notebook_dir", "list_notebooks", "notebook_parameters", "parse_grid_values", "run_grid"]

log = logging.getLogger(__name__)
_REPO_ROOT = Path(__file__).resolve().parents[2]


def notebook_dir() -> Path:
    """The repository's ``notebooks/`` folder (falls back to ``./notebooks``)."""
    for cand in (_REPO_ROOT / "notebooks", Path.cwd() / "notebooks"):
        if cand.is_dir():
            return cand
    return _REPO_ROOT / "notebooks"


def list_notebooks(folder: Optional[Union[str, Path]] = None) -> List[Path]:
    """The ``*.ipynb`` files of ``folder`` (default :func:`notebook_dir`), sorted."""
    folder = Path(folder) if folder else notebook_dir()
    return sorted(p for p in folder.glob("*.ipynb") if not p.name.startswith("."))


def _resolve_notebook(notebook: Union[str, Path]) -> Path:
    path = Path(notebook)
    if path.is_file():
        return path
    for cand in (notebook_dir() / path, notebook_dir() / f"{path}.ipynb"):
        if cand.is_file():
            return cand
    matches = [p for p in list_notebooks() if p.stem.startswith(str(notebook))]
    if len(matches) == 1:
        return matches[0]
    raise FileNotFoundError(f"notebook {str(notebook)!r} not found (looked in the current directory and "
                            f"{notebook_dir()}; `abp notebooks list` shows them)")


def notebook_parameters(notebook: Union[str, Path]) -> Dict[str, Dict[str, Any]]:
    """The parameters of a notebook's ``parameters`` cell: name -> {type, default, help} (papermill)."""
    import papermill

    params = papermill.inspect_notebook(str(_resolve_notebook(notebook)))
    return {name: {"type": p.get("inferred_type_name"), "default": p.get("default"), "help": p.get("help", "")}
            for name, p in params.items()}


def parse_grid_values(text: str) -> Tuple[str, List[Any]]:
    """``"key=v1,v2"`` -> ``("key", [v1, v2])``; values parsed as YAML (``3``, ``true``, ``[a, b]``).

    Commas inside brackets or quotes do not split: ``readouts=[sum,abp],[sum,wa,abp]`` gives two lists.
    """
    if "=" not in text:
        raise ValueError(f"{text!r}: grid parameters look like key=value1,value2")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not re.fullmatch(r"[A-Za-z_]\w*", key):
        raise ValueError(f"{key!r} is not a valid parameter name")
    values = []
    for part in split_top_level(raw, ","):
        part = part.strip()
        if not part:
            continue
        value = parse_yaml_text(part)
        values.append(value.strip() if isinstance(value, str) else value)
    if not values:
        raise ValueError(f"{text!r}: no values given for {key}")
    return key, values


def _slug(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        text = "+".join(_slug(v) for v in value)
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-") or "x"


def _run_name(stem: str, params: Mapping[str, Any]) -> str:
    parts = [f"{k}={_slug(v)}" for k, v in params.items()]
    name = "__".join([stem] + parts) if parts else stem
    if len(name) > 120:
        digest = hashlib.sha256(json.dumps(_jsonable(dict(params)), sort_keys=True).encode()).hexdigest()[:10]
        name = name[:100].rstrip("_-") + "__" + digest
    return name


def _flatten(prefix: str, value: Any, out: Dict[str, Any]) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif value is None or isinstance(value, (bool, int, float, str)):
        out[prefix] = value


def run_grid(notebook: Union[str, Path], grid: Mapping[str, Sequence[Any]], output_dir: Union[str, Path],
             kernel_name: Optional[str] = None, log_output: bool = False, *, cwd: Optional[Union[str, Path]] = None,
             execution_timeout: Optional[float] = None, results_name: str = "results.json") -> "pd.DataFrame":
    """Execute ``notebook`` with papermill for every combination of ``grid`` values.

    Args:
        notebook: path (or name in ``notebooks/``, e.g. ``"00_quickstart"``).
        grid: parameter -> list of values; a scalar counts as a one-value list. When the notebook has
            an ``output_dir`` parameter and the grid does not set it, every run gets its own
            ``<output_dir>/<run name>/``.
        output_dir: output notebooks (``<run name>.ipynb``) and per-run output directories go here.
        kernel_name: Jupyter kernel (default: the notebook's).
        log_output: stream the notebooks' outputs to this process's log (papermill ``--log-output``).
        cwd: working directory of the kernels (default: this process's).
        execution_timeout: seconds per cell (default: none).

    Returns:
        One row per run, in grid order: ``run`` (name), the grid parameters, ``status`` (``"ok"`` or
        ``"failed"``), ``error`` (exception type and message of a failed run, else None), ``duration_s``,
        ``output_notebook``, ``output_dir``, ``results`` (the run's ``results.json`` as a dict, or None)
        and every scalar entry of ``results.json`` flattened into ``result.<key>`` columns.
        A failed run does not stop the others.
    """
    import pandas as pd
    import papermill
    from papermill.exceptions import PapermillExecutionError

    nb_path = _resolve_notebook(notebook)
    grid = {str(k): (list(v) if isinstance(v, (list, tuple)) else [v]) for k, v in grid.items()}
    for k, v in grid.items():
        if not v:
            raise ValueError(f"grid parameter {k!r} has no values")
    declared = papermill.inspect_notebook(str(nb_path))
    if declared:
        unknown = [k for k in grid if k not in declared]
        if unknown:
            raise ValueError(f"{nb_path.name} has no parameter(s) {unknown}; its parameters: {list(declared)}")
    out_root = prepare_output_dir(output_dir)
    per_run_dir = "output_dir" in declared and "output_dir" not in grid
    keys = list(grid)
    rows = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        params = dict(zip(keys, combo))
        name = _run_name(nb_path.stem, params)
        run_params = dict(params)
        run_out = out_root / name
        if per_run_dir:
            run_params["output_dir"] = str(run_out)
        elif "output_dir" in params:
            run_out = Path(str(params["output_dir"]))
            if not run_out.is_absolute():
                run_out = Path(cwd or Path.cwd()) / run_out
        out_nb = out_root / f"{name}.ipynb"
        row: Dict[str, Any] = {"run": name, **params, "status": "ok", "error": None}
        t0 = time.perf_counter()
        with atomic_path(out_nb) as tmp_nb:  # a failed run's notebook is kept too: it shows the error
            try:
                papermill.execute_notebook(str(nb_path), str(tmp_nb), parameters=run_params,
                                           kernel_name=kernel_name, log_output=log_output, progress_bar=False,
                                           cwd=str(cwd) if cwd is not None else None,
                                           execution_timeout=execution_timeout)
            except PapermillExecutionError as exc:
                row.update(status="failed", error=f"{exc.ename}: {exc.evalue}")
            except Exception as exc:  # noqa: BLE001 - kernel death, bad notebook ...: report, go on
                if refused_errno(exc) is not None:  # a full disk fails every later run too
                    raise
                row.update(status="failed", error=f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}")
        row["duration_s"] = round(time.perf_counter() - t0, 2)
        row["output_notebook"] = str(out_nb)
        row["output_dir"] = str(run_out)
        results = None
        res_path = run_out / results_name
        if res_path.is_file():
            try:
                results = json.loads(res_path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                results = None
                if row["status"] == "ok":
                    row.update(status="failed", error=f"unreadable {results_name}: {exc}")
        row["results"] = results
        flat: Dict[str, Any] = {}
        if isinstance(results, Mapping):
            _flatten("", results, flat)
        row.update({f"result.{k}": v for k, v in flat.items()})
        if row["status"] == "failed":
            log.warning("notebook run %s failed: %s", name, row["error"])
        rows.append(row)
    df = pd.DataFrame(rows)
    head = ["run"] + keys + ["status", "error", "duration_s", "output_notebook", "output_dir", "results"]
    return df[head + [c for c in df.columns if c not in head]]

