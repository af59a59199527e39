"""Output folders of the notebooks: where results, run directories and ``results.json`` go.

* :func:`prepare_output_dir` -- an absolute, existing output folder;
* :func:`runs_directory` -- the trainer's run directories (``<output_dir>/runs``, reused and resumed;
  in smoke mode one temporary folder per kernel, removed when the kernel exits);
* :func:`write_results` -- ``results.json``, JSON-safe and written atomically; :func:`abp_core.notebooks.run_grid`
  collects them;
* :func:`quiet_training_logs` -- Lightning's banners off, so notebook outputs show results.
"""
from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, List, Mapping, Optional, Union

from ..files import write_text

__all__ = ["prepare_output_dir", "runs_directory", "quiet_training_logs", "write_results"]


def prepare_output_dir(output_dir: Union[str, os.PathLike]) -> Path:
    """``output_dir`` as an absolute path, created if needed."""
    path = Path(output_dir).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


_TEMP_DIRS: List[Path] = []  # smoke mode's runs folder of this process (the last one), removed at exit


def _cleanup_temp_dirs() -> None:
    for d in _TEMP_DIRS:
        shutil.rmtree(d, ignore_errors=True)


atexit.register(_cleanup_temp_dirs)


def runs_directory(output_dir: Union[str, os.PathLike], smoke: bool, runs_dir: Optional[str] = None) -> Path:
    """Where the trainer puts its run directories.

    Normal mode: ``runs_dir`` or ``<output_dir>/runs`` (finished runs are reused, interrupted ones
    resume). Smoke mode: one temporary directory per process (kernel), removed when it exits, so that a
    smoke run never reuses checkpoints of another session or leaves any behind; within one kernel, smoke
    runs with the same configuration (the quickstart and then ``08``, or a notebook run twice) are trained
    once, as ``runs_dir`` does in normal mode.
    """
    if smoke:
        if not (_TEMP_DIRS and _TEMP_DIRS[-1].is_dir()):
            _TEMP_DIRS.append(Path(tempfile.mkdtemp(prefix="abp-smoke-runs-")))
        return _TEMP_DIRS[-1]
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
    return write_text(prepare_output_dir(output_dir) / name, json.dumps(_jsonable(dict(results)), indent=2))

