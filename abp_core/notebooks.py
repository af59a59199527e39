"""Support for the notebooks in ``notebooks/``: parameters, smoke mode, the experiment driver, batch runs.

Every notebook starts with a papermill ``parameters`` cell of *annotated* assignments, followed by::

    import abp_core.notebooks as nb
    P = nb.parameters(globals(), smoke_overrides={"epochs": 1, "n_molecules": 300})

:func:`parameters` checks every annotated parameter against its annotation (``epochs: int = 12``),
converts what can be converted safely (``"3"`` -> 3 for an ``int``, ``"sum,abp"`` -> ``["sum", "abp"]``
for a ``list[str]``) and raises :class:`ParameterError` naming the parameter otherwise
(``papermill ... -p epochs abc`` -> ``notebook parameter 'epochs' must be an integer, got 'abc' (str)``).
It then applies smoke mode (:func:`smoke_mode`: the ``smoke`` parameter, or ``ABP_SMOKE=1`` in the
environment, which is how nbval runs the notebooks in CI) and, in smoke mode, the notebook's tiny
settings and one torch thread (:func:`set_threads`). Use ``Optional[str]`` rather than
``str | None`` in parameter annotations: papermill's parameter inspection does not read the ``|`` form.

The paper's experiments (``01_qm7b`` ... ``07_qm7b_wa_vs_abp``) all go through
:func:`run_paper_experiment`: data check (a missing dataset is reported in plain words, never as a
traceback), typed config (:mod:`abp_core.config`), trainer (:func:`abp_core.train.run_experiment`),
statistics (:mod:`abp_core.stats`) and the paper's reference tables, plus a ``results.json``.

Batch runs: :func:`run_grid` executes a notebook with papermill over the Cartesian product of
parameter values (one output notebook and one output directory per combination) and collects each
run's ``results.json``; a failed combination is reported with its parameters and does not stop the
others. On the command line (see :func:`register`)::

    abp notebooks list
    abp notebooks run 00_quickstart -p epochs=3,6 -p readouts=[sum,abp],[sum,wa,abp] --out outputs/grid
"""
from __future__ import annotations

import atexit
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from .stats import format_mean_std

__all__ = [
    "SMOKE_ENV",
    "ParameterError",
    "NotebookParameters",
    "smoke_mode",
    "set_threads",
    "coerce_parameter",
    "parameters",
    "resolve_data_root",
    "prepare_output_dir",
    "runs_directory",
    "quiet_training_logs",
    "DataStatus",
    "load_dataset",
    "write_results",
    "Arm",
    "arms",
    "ExperimentReport",
    "paper_reference",
    "run_paper_experiment",
    "SMOKE_CONFIG",
    "notebook_dir",
    "list_notebooks",
    "notebook_parameters",
    "parse_grid_values",
    "run_grid",
    "register",
]

log = logging.getLogger(__name__)

#: Environment variable that turns smoke mode on in every notebook (``ABP_SMOKE=1``); CI sets it.
SMOKE_ENV = "ABP_SMOKE"
_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f", ""}
_REPO_ROOT = Path(__file__).resolve().parents[1]


# ================================================================================================
# Parameters
# ================================================================================================
class ParameterError(ValueError):
    """A notebook parameter of the wrong type or value; the message names the parameter."""


class NotebookParameters(dict):
    """The validated parameters of a notebook: a dict with attribute access (``P.epochs``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"no notebook parameter {name!r}; parameters: {sorted(self)}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __repr__(self) -> str:
        return "NotebookParameters(" + ", ".join(f"{k}={v!r}" for k, v in self.items()) + ")"

    def describe(self) -> str:
        """One line per parameter, for printing at the top of a run."""
        width = max((len(k) for k in self), default=0)
        return "\n".join(f"  {k:<{width}} = {v!r}" for k, v in self.items())


def _env_flag(name: str, text: str) -> bool:
    t = text.strip().lower()
    if t in _TRUE:
        return True
    if t in _FALSE:
        return False
    raise ParameterError(f"environment variable {name} must be 1 or 0 (true/false), got {text!r}")


def smoke_mode(smoke: Any = False, env: Optional[Mapping[str, str]] = None) -> bool:
    """True when the notebook should run in smoke mode: ``smoke`` is true or ``$ABP_SMOKE`` is set to 1.

    ``smoke`` must be a boolean (strings ``"true"``/``"false"``/``"1"``/``"0"`` are accepted, as papermill
    or a shell may pass them); ``ABP_SMOKE`` accepts 1/0, true/false, yes/no, on/off. ``env`` defaults
    to ``os.environ``. ``ABP_SMOKE=0`` does not switch off an explicit ``smoke=True``.
    """
    value = coerce_parameter("smoke", smoke, bool)
    environ = os.environ if env is None else env
    flag = environ.get(SMOKE_ENV)
    return bool(value or (flag is not None and _env_flag(SMOKE_ENV, flag)))


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(value).__name__})"


def _type_phrase(hint: Any) -> str:
    if hint is bool:
        return "a boolean (True/False)"
    if hint is int:
        return "an integer"
    if hint is float:
        return "a number"
    if hint is str:
        return "a string"
    origin = typing.get_origin(hint)
    if origin in (list, List, tuple, Sequence):
        args = typing.get_args(hint)
        return f"a list of {_type_phrase(args[0]).split(' ', 1)[1]}s" if args else "a list"
    if origin in (dict, Dict) or hint is dict:
        return "a mapping"
    if hint is list:
        return "a list"
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return " or ".join(_type_phrase(a) for a in args) + (" or None" if type(None) in typing.get_args(hint) else "")
    return getattr(hint, "__name__", str(hint))


_ANNOTATION_NAMES = {"int": int, "float": float, "bool": bool, "str": str, "Any": Any, "dict": dict,
                     "list": list, "None": type(None), "NoneType": type(None)}


def _parse_annotation(text: str) -> Any:
    """A type from an annotation string (``"Optional[list[int]]"``, ``"str | None"``); Any if unknown."""
    t = text.strip().strip("'\"").replace("typing.", "")
    if not t or t == "None":
        return Any
    if "|" in t and "[" not in t.split("|", 1)[0]:
        parts = [p.strip() for p in _split_top(t, "|")]
        if len(parts) > 1:
            return Union[tuple(_parse_annotation(p) if p != "None" else type(None) for p in parts)]
    m = re.fullmatch(r"(\w+)\[(.*)\]", t)
    if m:
        outer, inner = m.group(1), m.group(2)
        args = [_parse_annotation(a) if a.strip() != "None" else type(None) for a in _split_top(inner, ",")]
        if outer == "Optional":
            return Optional[args[0]]
        if outer == "Union":
            return Union[tuple(args)]
        if outer in ("list", "List", "Sequence", "tuple", "Tuple"):
            return List[args[0]]
        if outer in ("dict", "Dict", "Mapping"):
            return Dict[str, Any]
        return Any
    return _ANNOTATION_NAMES.get(t, Any)


def _split_top(text: str, sep: str) -> List[str]:
    """Split at ``sep`` outside brackets and quotes."""
    out, depth, quote, cur = [], 0, None, []
    for ch in text:
        if quote:
            cur.append(ch)
            if ch == quote:
                quote = None
            continue
        if ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == sep and depth == 0:
            out.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    out.append("".join(cur))
    return out


def _parse_text_value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def coerce_parameter(name: str, value: Any, annotation: Any) -> Any:
    """``value`` checked against ``annotation`` (a type or an annotation string), converted if safe.

    Supported: ``bool``, ``int``, ``float``, ``str``, ``Optional[...]``/``X | None``, ``list[X]``,
    ``dict`` and ``Any``. Strings are converted where unambiguous (``"3"`` for an int, ``"1e-4"`` for
    a float, ``"true"`` for a bool, ``"a,b"`` or ``"[a, b]"`` for a list, ``"None"`` for an optional).

    Raises:
        ParameterError: naming the parameter, the expected type and the value received.
    """
    hint = _parse_annotation(annotation) if isinstance(annotation, str) else annotation
    if hint is Any or hint is None:
        return value
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
            if type(None) in args:
                return None
            raise ParameterError(f"notebook parameter {name!r} must be {_type_phrase(hint)}, got None")
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce_parameter(name, value, arg)
            except ParameterError:
                continue
        raise ParameterError(f"notebook parameter {name!r} must be {_type_phrase(hint)}, got {_describe(value)}")

    def fail() -> ParameterError:
        return ParameterError(f"notebook parameter {name!r} must be {_type_phrase(hint)}, got {_describe(value)}")

    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in (_TRUE | _FALSE) - {""}:
            return value.strip().lower() in _TRUE
        raise fail()
    if hint is int:
        if isinstance(value, bool):
            raise fail()
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise fail() from None
        if hasattr(value, "__index__"):
            return int(value.__index__())
        raise fail()
    if hint is float:
        if isinstance(value, bool):
            raise fail()
        if isinstance(value, (int, float)):
            out = float(value)
        elif isinstance(value, str):
            try:
                out = float(value.strip())
            except ValueError:
                raise fail() from None
        elif hasattr(value, "__float__"):
            out = float(value)
        else:
            raise fail()
        if math.isnan(out):
            raise ParameterError(f"notebook parameter {name!r} must be a number, got NaN")
        return out
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # papermill turns "-p tag 2024" into an int
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        raise fail()
    if hint is type(None):
        if value is None:
            return None
        raise fail()
    if origin in (list, List) or hint is list:
        (item,) = typing.get_args(hint) or (Any,)
        items = value
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                items = _parse_text_value(text)
                if not isinstance(items, list):
                    raise fail()
            else:
                items = [v.strip() for v in _split_top(text, ",") if v.strip()]
                if item is not str:
                    items = [_parse_text_value(v) for v in items]
        elif isinstance(value, tuple):
            items = list(value)
        elif not isinstance(value, list):
            try:  # a single value of the item type becomes a one-element list
                return [coerce_parameter(name, value, item)]
            except ParameterError:
                raise fail() from None
        return [coerce_parameter(f"{name}[{i}]", v, item) for i, v in enumerate(items)]
    if origin in (dict, Dict) or hint is dict:
        if isinstance(value, str):
            parsed = _parse_text_value(value)
            if isinstance(parsed, dict):
                return parsed
        if isinstance(value, Mapping):
            return dict(value)
        raise fail()
    if isinstance(hint, type):
        if isinstance(value, hint):
            return value
        raise fail()
    return value


def parameters(namespace: Mapping[str, Any], smoke_overrides: Optional[Mapping[str, Any]] = None,
               *, env: Optional[Mapping[str, str]] = None) -> NotebookParameters:
    """Validate a notebook's parameters (its annotated globals) and apply smoke mode.

    Args:
        namespace: the notebook's ``globals()``; every name in its ``__annotations__`` (the annotated
            assignments of the parameters cell) is a parameter.
        smoke_overrides: the notebook's smoke budget, applied in smoke mode only. For a numeric
            parameter the value is a cap (``epochs: 1`` -> ``min(epochs, 1)``; ``None`` counts as
            unlimited), for a list parameter an int is the number of items kept (the first ones:
            ``seeds: 1``), and any other value replaces the parameter. So explicit choices survive
            within the budget: ``-p smoke True -p seeds "[386333]"`` runs split 386333, once.
        env: environment for :func:`smoke_mode` (default ``os.environ``).

    Returns:
        :class:`NotebookParameters` in the order of the parameters cell, ``smoke`` resolved.

    Raises:
        ParameterError: a parameter of the wrong type, or a smoke override for an unknown parameter.
    """
    annotations = dict(namespace.get("__annotations__") or {})
    if not annotations:
        raise ParameterError("the notebook declares no parameters: the parameters cell must use annotated "
                             "assignments such as `epochs: int = 10`")
    values = NotebookParameters()
    for pname, ann in annotations.items():
        if pname not in namespace:
            raise ParameterError(f"notebook parameter {pname!r} is declared but has no value")
        values[pname] = coerce_parameter(pname, namespace[pname], ann)
    if "smoke" in values:
        values["smoke"] = smoke_mode(values["smoke"], env=env)
    if values.get("smoke") and smoke_overrides:
        for pname, value in smoke_overrides.items():
            if pname not in annotations:
                raise ParameterError(f"smoke override for unknown notebook parameter {pname!r}; "
                                     f"parameters: {list(annotations)}")
            values[pname] = _smoke_value(pname, values[pname], value, annotations[pname])
    if values.get("smoke"):
        set_threads(1)
    return values


def _smoke_value(name: str, current: Any, budget: Any, annotation: Any) -> Any:
    """``current`` limited by a smoke budget (see :func:`parameters`)."""
    if isinstance(current, list) and isinstance(budget, int) and not isinstance(budget, bool):
        if budget < 1:
            raise ParameterError(f"smoke budget for {name!r} must keep at least one item, got {budget}")
        return current[:budget]
    budget = coerce_parameter(name, budget, annotation)
    numeric = (int, float)
    if isinstance(budget, numeric) and not isinstance(budget, bool):
        if current is None:
            return budget
        if isinstance(current, numeric) and not isinstance(current, bool):
            return type(budget)(min(current, budget))
    return budget


def set_threads(num_threads: Optional[int]) -> None:
    """Set torch's CPU threads (``None``: leave torch's default).

    Small models (the quickstart's, smoke mode's) gain little from several threads, and on a busy
    machine (CI, shared cores) several threads per process are many times slower: training the
    quickstart's SchNet took 0.6 s per 1000 molecules with one thread and 20 s with two while other
    jobs used the cores. Smoke mode therefore always runs with one thread.
    """
    if num_threads is None:
        return
    if int(num_threads) < 1:
        raise ParameterError(f"notebook parameter 'threads' must be >= 1 (or None), got {num_threads}")
    try:
        import torch
    except ImportError:  # pragma: no cover
        return
    torch.set_num_threads(int(num_threads))


# ================================================================================================
# Paths, logs, results
# ================================================================================================
def resolve_data_root(data_root: Optional[str] = None) -> Optional[Path]:
    """The data root for the loaders: ``data_root``, else ``$ABP_DATA_DIR``, else None (user cache).

    A relative path is taken relative to the current directory if it exists there, else relative to
    the repository root or the parent directory (nbval starts kernels inside ``notebooks/``, papermill
    and JupyterLab wherever they were started), so ``ABP_DATA_DIR=../shared/data`` works from both.
    """
    raw = data_root if data_root not in (None, "") else os.environ.get("ABP_DATA_DIR")
    if not raw:
        return None
    path = Path(raw).expanduser()
    if path.is_absolute():
        return path
    for base in (Path.cwd(), _REPO_ROOT, Path.cwd().parent):
        if (base / path).exists():
            return (base / path).resolve()
    return (Path.cwd() / path).resolve()


def prepare_output_dir(output_dir: Union[str, os.PathLike]) -> Path:
    """``output_dir`` as an absolute path, created if needed."""
    path = Path(output_dir).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


_TEMP_DIRS: List[Path] = []


def _cleanup_temp_dirs() -> None:
    for d in _TEMP_DIRS:
        shutil.rmtree(d, ignore_errors=True)


atexit.register(_cleanup_temp_dirs)


def runs_directory(output_dir: Union[str, os.PathLike], smoke: bool, runs_dir: Optional[str] = None) -> Path:
    """Where the trainer puts its run directories.

    Normal mode: ``runs_dir`` or ``<output_dir>/runs`` (finished runs are reused, interrupted ones
    resume). Smoke mode: a fresh temporary directory, removed when the kernel exits, so that a smoke
    run never reuses (or leaves behind) checkpoints.
    """
    if smoke:
        path = Path(tempfile.mkdtemp(prefix="abp-smoke-runs-"))
        _TEMP_DIRS.append(path)
        return path
    path = Path(runs_dir).expanduser().resolve() if runs_dir else Path(output_dir).expanduser().resolve() / "runs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def quiet_training_logs() -> None:
    """Silence Lightning's per-run banners (GPU/TPU availability, tips) and known deprecation noise."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda",
                 "lightning.fabric.utilities.seed", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def _jsonable(obj: Any) -> Any:
    """Plain JSON types (NaN/inf -> None) from numpy/pandas/paths/dataclasses."""
    try:
        import numpy as np
        import pandas as pd
    except ImportError:  # pragma: no cover
        np = pd = None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v) for v in obj]
    if pd is not None and isinstance(obj, pd.DataFrame):
        return [_jsonable(r) for r in obj.to_dict(orient="records")]
    if pd is not None and isinstance(obj, pd.Series):
        return _jsonable(obj.to_dict())
    if np is not None and isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if np is not None and isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    return str(obj)


def write_results(output_dir: Union[str, os.PathLike], results: Mapping[str, Any],
                  name: str = "results.json") -> Path:
    """Write ``results`` (made JSON-safe: NaN -> null, numpy -> Python) atomically to ``output_dir/name``.

    Every notebook writes its ``results.json`` this way; :func:`run_grid` collects them.
    """
    out = prepare_output_dir(output_dir) / name
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(_jsonable(dict(results)), indent=2))
    os.replace(tmp, out)
    return out


# ================================================================================================
# Data
# ================================================================================================
_DATASET_LABELS = {"qm7b": "QM7b", "qm8": "QM8", "qm9": "QM9", "qmugs": "QMugs", "md17": "MD17", "oe62": "OE62"}


@dataclass
class DataStatus:
    """Outcome of :func:`load_dataset`: the dataset, or why it is not available."""

    name: str
    kwargs: Dict[str, Any]
    dataset: Any = None
    message: str = ""

    @property
    def available(self) -> bool:
        return self.dataset is not None


def load_dataset(name: str, root: Optional[Union[str, Path]] = None, *, download: bool = True,
                 **kwargs: Any) -> DataStatus:
    """Load a dataset, or explain in plain words why it is not here (never raises for missing data).

    ``download=False`` never touches the network (smoke mode, tests): a missing raw file gives a
    message saying which file to put where. Format/checksum problems of files that ARE present are
    reported the same way (the message starts with "could not load").
    """
    from .data import DataNotFoundError, DatasetError, get_dataset

    label = _DATASET_LABELS.get(name.lower(), name)
    what = label + (f" ({', '.join(f'{k}={v}' for k, v in kwargs.items())})" if kwargs else "")
    try:
        ds = get_dataset(name, root=root, download=download, progress=False, **kwargs)
    except DataNotFoundError as exc:
        how = ("downloading is switched off (smoke mode or download=False)" if not download
               else "it could not be downloaded")
        return DataStatus(name, dict(kwargs), None,
                          f"{what}: data not present on this machine, and {how}.\n{exc}")
    except (DatasetError, OSError) as exc:
        return DataStatus(name, dict(kwargs), None, f"{what}: could not load the data: {exc}")
    return DataStatus(name, dict(kwargs), ds, "")


# ================================================================================================
# The paper's experiments
# ================================================================================================
#: Config settings applied in smoke mode on top of a notebook's own (tiny model, few molecules).
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

    from . import stats

    label = _DATASET_LABELS.get(dataset.lower(), dataset)
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

        label = _DATASET_LABELS.get(self.dataset, self.dataset)
        lines = [f"== {label}: {self.status}" + (" (smoke mode: tiny data, 1 epoch; numbers are NOT "
                                                  "comparable with the paper)" if self.smoke else "")]
        for msg in self.messages:
            lines.append(msg)
        with pd.option_context("display.width", 200, "display.max_columns", 30, "display.max_colwidth", 48):
            if self.has_results:
                from . import stats

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
            self.summary.to_csv(out / "summary.csv", index=False)
            if self.beside_paper is not None:
                self.beside_paper.to_csv(out / "beside_paper.csv", index=False)
            from .viz import save_figure

            save_figure(fig, out / "mae", png=png)
        fig.show()

    def figure(self):
        """Bar chart of our MAE per task and readout (None without results)."""
        if not self.has_results:
            return None
        from .viz import mae_bar_chart

        df = self.summary.copy()
        df["task"] = df["task"].astype(str).str.slice(0, 40)
        many = df["task"].nunique() > 1
        return mae_bar_chart(df, x="task" if many else "readout", color="readout" if many else None,
                             title=f"{_DATASET_LABELS.get(self.dataset, self.dataset)}: test MAE "
                                   f"(mean ± std over splits)")


def _table_2_4_beside(summary, dataset: str, tables: Sequence[int]):
    """Our results next to the paper's Tables 2-4 (OE62 readouts; QM7b WA vs ABP)."""
    import pandas as pd

    from . import stats

    if summary is None or not len(summary):
        return None
    label = _DATASET_LABELS.get(dataset, dataset)
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

    from . import stats
    from .config import Config
    from .train import run_experiment

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


# ================================================================================================
# Batch execution
# ================================================================================================
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
    for part in _split_top(raw, ","):
        part = part.strip()
        if not part:
            continue
        value = _parse_text_value(part)
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
        try:
            papermill.execute_notebook(str(nb_path), str(out_nb), parameters=run_params, kernel_name=kernel_name,
                                       log_output=log_output, progress_bar=False,
                                       cwd=str(cwd) if cwd is not None else None,
                                       execution_timeout=execution_timeout)
        except PapermillExecutionError as exc:
            row.update(status="failed", error=f"{exc.ename}: {exc.evalue}")
        except Exception as exc:  # noqa: BLE001 - kernel death, bad notebook ...: report, go on
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


# ================================================================================================
# Command line: abp notebooks ...
# ================================================================================================
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

    import sys

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
    df.drop(columns=["results"]).to_csv(summary, index=False)
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
