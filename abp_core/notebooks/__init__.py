"""Support for the notebooks in ``notebooks/``, one module per concern:

* :mod:`.params` -- typed parameters and smoke mode (:func:`parameters`, :func:`smoke_mode`);
* :mod:`.outputs` -- output folders, run directories and ``results.json`` (:func:`write_results`);
* :mod:`.datasets` -- dataset status in plain words (:func:`load_dataset`, :func:`resolve_data_root`);
* :mod:`.experiments` -- the paper-experiment driver (:func:`run_paper_experiment`);
* :mod:`.grid` -- papermill over a grid of parameter values (:func:`run_grid`);
* :mod:`.cli` -- ``abp notebooks list`` / ``abp notebooks run`` (:func:`register`).

A notebook imports the package as a whole::

    import abp_core.notebooks as nb
    P = nb.parameters(globals(), smoke_overrides={"epochs": 1, "n_molecules": 300})

and every name below is available as ``nb.<name>``.
"""
from __future__ import annotations

from .cli import register
from .datasets import DATASET_LABELS, DataStatus, load_dataset, resolve_data_root
from .experiments import SMOKE_CONFIG, Arm, ExperimentReport, arms, paper_reference, run_paper_experiment
from .grid import list_notebooks, notebook_dir, notebook_parameters, parse_grid_values, run_grid
from .outputs import prepare_output_dir, quiet_training_logs, runs_directory, write_results
from .params import (SMOKE_ENV, NotebookParameters, ParameterError, coerce_parameter, parameters, set_threads,
                         smoke_mode)

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
    "DATASET_LABELS",
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
