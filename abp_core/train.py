"""Training on Lightning: a task (LightningModule), a data module, and a resumable run directory.

>>> from abp_core.config import Config
>>> from abp_core.train import run_training
>>> cfg = Config.from_dict({"data": {"dataset": "qm7b", "targets": ["homo_PBE0"], "split": "paper",
...                                  "split_seed": 23887},
...                         "model": {"readout": "abp", "backbone_hparams": {"hidden_channels": 64}},
...                         "trainer": {"max_epochs": 300}})
>>> result = run_training(cfg)          # runs/qm7b/<target>/schnet-abp/seed23887-<hash>/
>>> result.metrics["metrics"]["test_best"]["Highest occupied molecular orbital (PBE0)"]["mae"]

Protocol (paper defaults, all configurable): Adam with lr 1e-4, L1 loss on targets standardised with
the training split's mean/std, early stopping on the validation loss (patience 10), optional
ReduceLROnPlateau. With the OWA readout the orbital loss (``beta * sum_i (l_i - w_i)^2`` per
molecule) is added to the target loss; both parts are logged.

**Test metrics come from the best validation checkpoint** (``test_best``). The paper's code reported
the final weights after early stopping; those numbers are written too (``test_last``).
All metrics (MAE, RMSE, max error, R^2, per target) are in physical units (inverse-standardised).

Run directory (deterministic): ``<output_dir>/<dataset>/<target>/<backbone>-<readout>/seed<k>-<hash>``
where ``k`` is the split seed and ``hash`` is :meth:`Config.fingerprint` of the resolved config
(targets by their dataset names). It holds ``config.yaml``, ``last.ckpt`` (every epoch and, with
``trainer.checkpoint_every_n_steps``, every N steps), ``best.ckpt``, ``history.csv`` (per epoch:
losses, validation MAE, learning rate, epoch time), ``predictions_{val,test}.csv`` (long format) and,
once finished, ``metrics.json`` + ``metrics.csv``.

Running the same config again resumes from ``last.ckpt`` (model, optimizer, scheduler, early-stopping
and checkpoint state, RNG state, and the position inside the epoch), and a finished run (``metrics.json``
with the same fingerprint) is not redone. Shuffling is a pure function of ``(seed, epoch)``
(DistributedSampler semantics, also on one process), so a resumed run sees exactly the batches of an
uninterrupted one. If ``last.ckpt`` is unreadable (truncated copy, crash on a file system without atomic
rename), it is renamed to ``last.ckpt.corrupt`` and the run resumes from ``last-previous.ckpt``; one log
line says which file and why. On SIGTERM or SIGUSR1 (cluster preemption, time limit) a mid-epoch
``last.ckpt`` is written at the next batch boundary and :class:`TrainingPreempted` (exit status 143/138)
is raised; see :mod:`abp_core.preemption`. Every file goes through :mod:`abp_core.files` (atomic; a full
disk raises :class:`~abp_core.files.StorageError` and keeps the previous files).

A non-finite loss stops training with :class:`NonFiniteLossError`; no checkpoint is written after it,
and if ``last.ckpt`` holds the very weights that produced it, the previous ``last.ckpt`` is put back.
"""
from __future__ import annotations

import contextlib
import csv
import gc
import json
import logging
import math
import os
import platform
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DistributedSampler
from torch_geometric.loader import DataLoader as PygDataLoader
from torchmetrics import MeanMetric, Metric

from . import __version__
from .allocator import freed_memory_kept
from .config import Config, ConfigError
from .files import StorageError, atomic_open, remove_stale_temporaries, set_aside, write_text
from .models import build_model
from .preemption import PreemptionCheckpoint, TrainingPreempted, forward_sigusr1

__all__ = [
    "AtomisticTask",
    "AtomisticDataModule",
    "FlatParameters",
    "LossTerm",
    "RegressionErrors",
    "EpochSampler",
    "ResumableDataLoader",
    "NonFiniteLossError",
    "CheckpointError",
    "TrainingPreempted",
    "RunConflictError",
    "RunResult",
    "run_training",
    "run_experiment",
    "run_directory",
    "regression_metrics",
    "evaluate",
    "load_task",
]

log = logging.getLogger("abp_core.train")


class _DropAdverts(logging.Filter):
    """Lightning 2.6 advertises a cloud logger at every Trainer creation; keep the console for real news."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in str(record.getMessage())


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropAdverts())

LAST = "last.ckpt"
LAST_PREVIOUS = "last-previous.ckpt"
BEST = "best.ckpt"


class NonFiniteLossError(RuntimeError):
    """Training stopped because a loss became NaN or infinite."""


class RunConflictError(RuntimeError):
    """A run directory holds results of a different configuration."""


class CheckpointError(ValueError):
    """A file that is not a readable checkpoint written by this package's trainer."""


# ================================================================================================
# Metrics
# ================================================================================================
def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray, names: Sequence[str]) -> Dict[str, Dict[str, float]]:
    """MAE, RMSE, max absolute error and R^2 per target column (float64), plus ``n``."""
    y_true = np.asarray(y_true, dtype=np.float64).reshape(len(y_true), -1)
    y_pred = np.asarray(y_pred, dtype=np.float64).reshape(len(y_pred), -1)
    out = {}
    for t, name in enumerate(names):
        err = y_pred[:, t] - y_true[:, t]
        ss_tot = float(np.sum((y_true[:, t] - y_true[:, t].mean()) ** 2))
        out[name] = {
            "mae": float(np.mean(np.abs(err))),
            "rmse": float(np.sqrt(np.mean(err ** 2))),
            "max_error": float(np.max(np.abs(err))),
            "r2": float(1.0 - np.sum(err ** 2) / ss_tot) if ss_tot > 0 else float("nan"),
            "n": int(len(err)),
        }
    return out


class RegressionErrors(Metric):
    """Per-target sums of absolute/squared errors, max error and count; synchronised across processes."""

    full_state_update = False

    def __init__(self, num_targets: int):
        super().__init__()
        self.add_state("abs_sum", default=torch.zeros(num_targets, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sq_sum", default=torch.zeros(num_targets, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("max_abs", default=torch.zeros(num_targets, dtype=torch.float64), dist_reduce_fx="max")
        self.add_state("count", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        err = (pred.double() - target.double()).abs()
        self.abs_sum += err.sum(0)
        self.sq_sum += err.pow(2).sum(0)
        self.max_abs = torch.maximum(self.max_abs, err.max(0).values)
        self.count += err.shape[0]

    def compute(self) -> Dict[str, torch.Tensor]:
        n = self.count.clamp(min=1)
        return {"mae": self.abs_sum / n, "rmse": (self.sq_sum / n).sqrt(), "max_error": self.max_abs}


# ================================================================================================
# Task
# ================================================================================================
@dataclass
class LossTerm:
    """One declarative part of the objective: ``weight * fn(task, batch, pred, atom_weights)``.

    ``fn`` returns a scalar tensor, or ``None`` when the term does not apply to the batch. Each term
    is logged as ``<stage>_<name>``; their weighted sum is the optimised loss.
    """

    name: str
    fn: Callable[..., Optional[torch.Tensor]]
    weight: float = 1.0


class _TargetLoss:
    """L1/MSE between predictions and standardised targets (a class, so that tasks pickle for ddp_spawn)."""

    def __init__(self, kind: str):
        self.kind = kind

    def __call__(self, task: "AtomisticTask", batch, pred, weights):
        loss = F.l1_loss if self.kind == "l1" else F.mse_loss
        return loss(pred, task.standardize(batch.y.to(pred.dtype)))


def _orbital_loss(task: "AtomisticTask", batch, pred, weights):
    return task.model.auxiliary_loss(batch, weights)


class FlatParameters:
    """A module's trainable parameters as views of one flat tensor, so that the optimizer steps one tensor.

    Why: a PyTorch optimizer's step costs a fixed amount per parameter tensor on top of its arithmetic (its
    Python bookkeeping, a step counter and a kernel call each). SchNet has 34 tensors and ABP adds 31; at the
    quickstart's configuration ``benchmarks/epoch.py`` prints fused Adam's step in both layouts, gathering
    included (one CPU thread, 2026-12-02: 770 vs 543 us for ABP's model, 430 vs 291 us for sum's; see
    ``benchmarks/README.md``). The update of each element is the same arithmetic either way, so the weights after
    a step are bitwise the same (``tests/test_train.py``).

    Autograd still fills each parameter's own ``.grad``. :meth:`gather_grads`, called by the task's
    ``on_before_optimizer_step`` (after the backward of every accumulated batch and before Lightning clips the
    gradients), copies them into ``flat.grad`` (one buffer, reused every step) and clears them. A parameter that
    got no gradient while others did is stepped with a zero gradient (PyTorch's optimizers would skip it); one
    warning names it. With no gradient at all ``flat.grad`` stays ``None`` and the optimizer skips the step, as
    before.

    A module among ``blocks`` with a ``use_parameter_block(block)`` method (ABP's readout) whose parameters lie
    side by side in :attr:`flat` is offered its slice of it as one leaf tensor, a *parameter block*; if it accepts,
    its training steps give that block one gradient in the flat layout (one autograd input instead of the readout's
    31 tensors: ~0.9 ms less per quickstart step, ``benchmarks/README.md``, sixth pass), and :meth:`gather_grads`
    copies it with one copy. Gradients that reach the module's parameters the ordinary way (its module path) are
    added too.

    Args:
        params: the parameters, all of one dtype and device. Their ``.data`` becomes a view of :attr:`flat`; if
            anything later replaces a parameter's ``.data`` (``module.to(...)``, ``load_state_dict(...,
            assign=True)``), :meth:`gather_grads` raises instead of stepping a stale copy.
        blocks: modules to offer a parameter block (those without the method, or whose parameters are not all
            among ``params`` side by side, are left alone).
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], blocks: Sequence[torch.nn.Module] = ()):
        self.params = list(params)
        if not self.params:
            raise ValueError("FlatParameters needs at least one parameter")
        if len({(p.dtype, p.device) for p in self.params}) != 1:
            raise ValueError("FlatParameters needs parameters of one dtype and device")
        self.numels = [p.numel() for p in self.params]
        first = self.params[0]
        flat = torch.empty(sum(self.numels), dtype=first.dtype, device=first.device)
        with torch.no_grad():
            for p, view in zip(self.params, flat.split(self.numels)):
                view.copy_(p.reshape(-1))
                p.data = view.view_as(p)
        self.flat = torch.nn.Parameter(flat)
        self._pointers = [p.data_ptr() for p in self.params]
        self._grad: Optional[torch.Tensor] = None  # the gradient buffer and its per-parameter views
        self._grad_views: List[torch.Tensor] = []
        self._warned = False
        # (first index, last index + 1, first element, last element + 1, block leaf, module) per accepted block
        self._blocks: List[Tuple[int, int, int, int, torch.Tensor, torch.nn.Module]] = []
        index = {id(p): i for i, p in enumerate(self.params)}
        starts = [0]
        for n in self.numels:
            starts.append(starts[-1] + n)
        for module in blocks:
            own = list(module.parameters())
            ids = [index.get(id(p)) for p in own]
            if not hasattr(module, "use_parameter_block") or not own or None in ids:
                continue
            i0, i1 = ids[0], ids[0] + len(ids)
            if ids != list(range(i0, i1)):
                continue
            block = self.flat.detach()[starts[i0]:starts[i1]].requires_grad_()
            if module.use_parameter_block(block):
                self._blocks.append((i0, i1, starts[i0], starts[i1], block, module))

    @property
    def parameter_blocks(self) -> Dict[torch.nn.Module, torch.Tensor]:
        """The accepted parameter blocks by module (their gradients arrive in ``block.grad``)."""
        return {module: block for *_, block, module in self._blocks}

    @staticmethod
    def applies(params: Sequence[torch.nn.Parameter], trainer=None) -> bool:
        """Whether the flat layout can serve these parameters under this trainer: one dtype and device, one
        process (DDP keeps its own gradient buckets), and no gradient scaler (``16-mixed`` unscales the
        optimizer's gradients before ``on_before_optimizer_step``)."""
        if len(params) < 2 or len({(p.dtype, p.device) for p in params}) != 1:
            return False
        if trainer is None:
            return True
        return trainer.world_size == 1 and getattr(trainer.precision_plugin, "scaler", None) is None

    def gather_grads(self) -> None:
        """Move the parameters' gradients into ``flat.grad`` (see the class docstring)."""
        if [p.data_ptr() for p in self.params] != self._pointers:
            raise RuntimeError("a parameter's storage was replaced after the optimizer was set up (module.to(), "
                               "load_state_dict(assign=True)?): the optimizer would update a stale copy")
        grads = [p.grad for p in self.params]
        filled = [b for b in self._blocks if b[4].grad is not None]  # blocks whose gradient came as one tensor
        covered = set()
        for i0, i1, *_ in filled:
            covered.update(range(i0, i1))
        present = [i for i, g in enumerate(grads) if g is not None and i not in covered]
        missing = [i for i, g in enumerate(grads) if g is None and i not in covered]
        if not present and not filled:
            self.flat.grad = None
            return
        if missing and not self._warned:
            warnings.warn(f"{len(missing)} parameter tensor(s) (shapes {[tuple(self.params[i].shape) for i in missing[:5]]}) "
                          f"got no gradient; the flat optimizer steps them with a zero gradient")
            self._warned = True
        if self._grad is None:  # one buffer for every step: a fresh one would be page-faulted in each time
            self._grad = torch.empty_like(self.flat, requires_grad=False)
            self._grad_views = [v.view_as(p) for v, p in zip(self._grad.split(self.numels), self.params)]
        # one dispatch for all the copies, into the buffer's views (no torch.cat allocating a new one)
        if present:
            torch._foreach_copy_([self._grad_views[i] for i in present], [grads[i] for i in present])
        for i in missing:
            self._grad_views[i].zero_()
        for i0, i1, e0, e1, block, _ in filled:
            self._grad[e0:e1].copy_(block.grad)
            block.grad = None
            for i in range(i0, i1):
                if grads[i] is not None:  # this step also reached the parameter itself (its module path)
                    self._grad_views[i].add_(grads[i])
        self.flat.grad = self._grad
        for p, g in zip(self.params, grads):
            if g is not None:  # (a block's parameters have none: setting each would cost ~0.5 us a tensor)
                p.grad = None

    def release(self) -> None:
        """Give every parameter its own storage again (after training: an ordinary module for the user)."""
        for *_, module in self._blocks:
            module.use_parameter_block(None)
        self._blocks = []
        with torch.no_grad():
            for p in self.params:
                p.data = p.data.clone()
        self._pointers = [p.data_ptr() for p in self.params]
        self._grad, self._grad_views, self.flat.grad = None, [], None

    @staticmethod
    def convert_optimizer_states(states: List[Dict[str, Any]], params: Sequence[torch.nn.Parameter],
                                 flat: bool) -> None:
        """Convert a checkpoint's optimizer state dicts, in place, to the flat layout (``flat=True``) or to the
        per-parameter one; those already in it are left as they are."""
        numels, shapes = [p.numel() for p in params], [p.shape for p in params]
        for k, state in enumerate(states):
            tensors = sum(len(g["params"]) for g in state.get("param_groups", []))
            if len(params) < 2 or tensors == (1 if flat else len(params)):
                continue
            states[k] = (_optimizer_state_flattened(state, numels) if flat
                         else _optimizer_state_split(state, numels, shapes))


def _optimizer_state_flattened(state_dict: Dict[str, Any], numels: Sequence[int]) -> Dict[str, Any]:
    groups = state_dict["param_groups"]
    if len(groups) != 1 or len(groups[0]["params"]) != len(numels):
        raise CheckpointError(f"the checkpoint's optimizer holds {sum(len(g['params']) for g in groups)} parameter "
                              f"tensors in {len(groups)} group(s); this model has {len(numels)} in one")
    entries = [state_dict["state"].get(i) for i in groups[0]["params"]]
    group = dict(groups[0], params=[0])
    if all(e is None for e in entries):
        return {"state": {}, "param_groups": [group]}
    if any(e is None for e in entries):
        raise CheckpointError("the checkpoint's optimizer has state for some parameters only; it cannot be "
                              "converted to the flat layout")
    flat = {}
    for key, value in entries[0].items():
        if key == "step" or not isinstance(value, torch.Tensor):  # one count for all (a skipped tensor: refuse)
            if key == "step" and any(not torch.equal(torch.as_tensor(e[key]), torch.as_tensor(value)) for e in entries):
                raise CheckpointError("the checkpoint's optimizer stepped its parameters different numbers of "
                                      "times; it cannot be converted to the flat layout")
            flat[key] = value
        else:
            flat[key] = torch.cat([e[key].reshape(-1) for e in entries])
    return {"state": {0: flat}, "param_groups": [group]}


def _optimizer_state_split(state_dict: Dict[str, Any], numels: Sequence[int], shapes) -> Dict[str, Any]:
    groups = state_dict["param_groups"]
    if len(groups) != 1 or len(groups[0]["params"]) != 1:
        raise CheckpointError("the checkpoint's optimizer is not in the flat layout (one tensor, one group)")
    group = dict(groups[0], params=list(range(len(numels))))
    flat = state_dict["state"].get(groups[0]["params"][0])
    if flat is None:
        return {"state": {}, "param_groups": [group]}
    state: Dict[int, Dict[str, Any]] = {i: {} for i in range(len(numels))}
    for key, value in flat.items():
        if key != "step" and isinstance(value, torch.Tensor):
            if value.numel() != sum(numels):
                raise CheckpointError(f"the checkpoint's flat optimizer state {key!r} has {value.numel()} "
                                      f"elements; this model has {sum(numels)} parameters")
            for i, (part, shape) in enumerate(zip(value.split(list(numels)), shapes)):
                state[i][key] = part.reshape(shape).clone()
        else:
            for i in state:
                state[i][key] = value.clone() if isinstance(value, torch.Tensor) else value
    return {"state": state, "param_groups": [group]}


class AtomisticTask(L.LightningModule):
    """Regression of molecular targets with a backbone + readout model on standardised targets.

    Everything needed to rebuild the model and use it on new molecules lives in the hyperparameters
    (saved in every checkpoint): the config, target names/indices/units, the standardiser's mean/std
    and the set of elements seen in training. ``AtomisticTask.load_from_checkpoint(path)`` restores it.

    Args:
        config: :class:`Config` as a dict (``Config.to_dict()``).
        target_names / target_units / target_indices: the trained targets.
        target_mean / target_std: standardiser fitted on the training split (physical units).
        train_elements: atomic numbers present in the training split.
    """

    def __init__(self, config: Dict[str, Any], target_names: Sequence[str], target_units: Sequence[str],
                 target_mean: Sequence[float], target_std: Sequence[float],
                 train_elements: Sequence[int] = (), target_indices: Optional[Sequence[int]] = None):
        super().__init__()
        self.save_hyperparameters()
        self.cfg = Config.from_dict(config)
        m, t = self.cfg.model, self.cfg.trainer
        num_targets = len(target_names)
        if not (len(target_units) == len(target_mean) == len(target_std) == num_targets):
            raise ValueError("target_names, target_units, target_mean and target_std must have equal lengths")
        self.model = build_model(m.backbone, m.readout, num_targets=num_targets,
                                 readout_kwargs=m.readout_kwargs(), **m.backbone_hparams)
        self.register_buffer("target_mean", torch.tensor(list(target_mean), dtype=torch.float32))
        self.register_buffer("target_std", torch.tensor(list(target_std), dtype=torch.float32))
        self.target_names = list(target_names)
        self.is_owa = m.readout == "owa"
        self.loss_terms: List[LossTerm] = [LossTerm("loss", _TargetLoss(t.loss))]
        if self.is_owa:
            self.loss_terms.append(LossTerm("orbital_loss", _orbital_loss))
        self.val_errors = RegressionErrors(num_targets)
        # epoch means of every loss term (+ the total), weighted by molecules; synchronised under DDP
        term_names = [term.name for term in self.loss_terms] + (["total_loss"] if len(self.loss_terms) > 1 else [])
        self.train_means = torch.nn.ModuleDict({k: MeanMetric() for k in term_names})
        self.val_means = torch.nn.ModuleDict({k: MeanMetric() for k in term_names})
        for metric in self.train_means.values():
            metric.persistent(True)  # part of mid-epoch checkpoints: the epoch means survive a resume
        self.last_epoch_summary: Dict[str, float] = {}
        self._flat: Optional[FlatParameters] = None  # set by configure_optimizers

    # ---- standardisation ---------------------------------------------------------------------
    def standardize(self, y: torch.Tensor) -> torch.Tensor:
        return (y - self.target_mean.to(y.dtype)) / self.target_std.to(y.dtype)

    def unstandardize(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.target_std.to(y.dtype) + self.target_mean.to(y.dtype)

    # ---- forward -----------------------------------------------------------------------------
    def forward(self, batch, return_atom_weights: bool = False):
        """Standardised predictions (and per-atom readout weights if asked)."""
        return self.model(batch, return_atom_weights=return_atom_weights)

    @torch.no_grad()
    def predict_physical(self, batch, return_atom_weights: bool = False):
        """Predictions in physical units ``[num_molecules, num_targets]`` (and atom weights or None)."""
        if return_atom_weights:
            pred, weights = self.model(batch, return_atom_weights=True)
            return self.unstandardize(pred.float()), weights
        return self.unstandardize(self.model(batch).float())

    def _losses(self, batch) -> Tuple[torch.Tensor, Dict[str, torch.Tensor], torch.Tensor]:
        if self.is_owa:
            pred, weights = self.model(batch, return_atom_weights=True)
        else:
            pred, weights = self.model(batch), None
        pred = pred.float()
        if weights is not None:
            weights = weights.float()
        parts: Dict[str, torch.Tensor] = {}
        total = pred.new_zeros(())
        for term in self.loss_terms:
            value = term.fn(self, batch, pred, weights)
            if value is None:
                continue
            parts[term.name] = value
            total = total + term.weight * value
        return total, parts, pred

    # ---- Lightning hooks ---------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        total, parts, pred = self._losses(batch)
        bad = not bool(torch.isfinite(total))
        if self.trainer.strategy.reduce_boolean_decision(bad, all=False):
            self._non_finite("training", batch, pred, parts)
        n = batch.num_graphs
        for name, value in parts.items():
            self.log(f"train_{name}", value, batch_size=n, prog_bar=(name == "loss"), on_step=True, on_epoch=False)
            self.train_means[name].update(value.detach(), weight=n)
        if "total_loss" in self.train_means:
            self.log("train_total_loss", total, batch_size=n, on_step=True, on_epoch=False)
            self.train_means["total_loss"].update(total.detach(), weight=n)
        return total

    def validation_step(self, batch, batch_idx):
        total, parts, pred = self._losses(batch)
        n = batch.num_graphs
        for name, value in parts.items():
            self.val_means[name].update(value, weight=n)
        if "total_loss" in self.val_means:
            self.val_means["total_loss"].update(total, weight=n)
        self.val_errors.update(self.unstandardize(pred), batch.y.float())

    @staticmethod
    def _epoch_means(means: torch.nn.ModuleDict) -> Dict[str, float]:
        out = {}
        for name, metric in means.items():
            out[name] = float(metric.compute()) if metric.update_called else float("nan")
            metric.reset()
        return out

    def on_validation_epoch_end(self):
        val = self._epoch_means(self.val_means)
        errors = {k: v.reshape(-1) for k, v in self.val_errors.compute().items()}  # torchmetrics squeezes T=1
        self.val_errors.reset()
        if self.trainer.sanity_checking:
            return
        for name, value in val.items():
            self.log(f"val_{name}", torch.tensor(value), prog_bar=(name == "loss"), sync_dist=True)
        summary = {f"train_{k}": v for k, v in self._epoch_means(self.train_means).items()}
        summary.update({f"val_{k}": v for k, v in val.items()})
        for t, name in enumerate(self.target_names):
            self.log(f"val_mae/{_slug(name)}", errors["mae"][t].float(), sync_dist=True,
                     prog_bar=len(self.target_names) == 1)
            summary[f"val_mae[{name}]"] = float(errors["mae"][t])
        self.last_epoch_summary = summary
        if not all(math.isfinite(v) for v in val.values()):
            self._non_finite("validation", None, None, {k: torch.tensor(v) for k, v in val.items()})

    def _trainable(self) -> List[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self):
        t = self.cfg.trainer
        params = self._trainable()
        # One tensor for the optimizer where possible (FlatParameters), and one fused kernel for all of it
        # instead of ~10 small ops per tensor: both are fixed costs per step (benchmarks/epoch.py).
        flat = FlatParameters.applies(params, self._trainer)
        self._flat = FlatParameters(params, blocks=[self.model.readout]) if flat else None
        if self._flat is not None:
            params = [self._flat.flat]
        fused = {"fused": True} if all(p.dtype in (torch.float32, torch.float64) and p.device.type in ("cpu", "cuda")
                                       for p in params) else {}
        if t.optimizer == "adam":
            opt = torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay, **fused)
        elif t.optimizer == "adamw":
            opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, **fused)
        else:
            opt = torch.optim.SGD(params, lr=t.lr, weight_decay=t.weight_decay)
        if t.scheduler == "plateau":
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=t.scheduler_factor,
                                                               patience=t.scheduler_patience, min_lr=t.min_lr)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "val_loss",
                                                       "interval": "epoch", "frequency": 1}}
        return opt

    def on_before_optimizer_step(self, optimizer):
        if self._flat is not None:
            self._flat.gather_grads()

    def on_fit_end(self):
        if self._flat is not None:
            self._flat.release()

    def on_load_checkpoint(self, checkpoint):
        # Resuming (this runs before configure_optimizers): the checkpoint's optimizer state in the layout that
        # configure_optimizers will choose, whichever layout wrote it (FlatParameters).
        states = checkpoint.get("optimizer_states")
        if self._trainer is not None and states:
            params = self._trainable()
            FlatParameters.convert_optimizer_states(states, params, FlatParameters.applies(params, self._trainer))

    def on_save_checkpoint(self, checkpoint):
        checkpoint["abp_version"] = __version__

    # ---- NaN handling ------------------------------------------------------------------------
    def _non_finite(self, stage: str, batch, pred, parts) -> None:
        epoch, step = int(self.current_epoch), int(self.global_step)
        values = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in parts.items())
        causes = []
        if batch is not None and not bool(torch.isfinite(batch.y).all()):
            bad = batch.idx[~torch.isfinite(batch.y).all(1)].tolist() if hasattr(batch, "idx") else []
            causes.append(f"non-finite targets in the batch (molecule idx {bad[:10]})")
        params_ok = all(bool(torch.isfinite(p).all()) for p in self.parameters())
        if not params_ok:
            causes.append("the weights themselves are no longer finite")
        elif pred is not None and not bool(torch.isfinite(pred).all()):
            causes.append("finite weights give non-finite predictions (diverged: lr too high?)")
        diverged = not causes or not params_ok or (pred is not None and not bool(torch.isfinite(pred).all()))
        kept = self._keep_good_checkpoint(diverged)
        raise NonFiniteLossError(
            f"non-finite {stage} loss at epoch {epoch}, global step {step} ({values}); "
            f"{'; '.join(causes) or 'cause unknown'}. Training stopped. {kept} "
            f"Try a lower trainer.lr, trainer.gradient_clip, or trainer.precision=32-true.")

    def _keep_good_checkpoint(self, diverged: bool) -> str:
        trainer = self._trainer
        run_dir = Path(trainer.default_root_dir) if trainer is not None else None
        if run_dir is None or not (run_dir / LAST).exists():
            return "No checkpoint had been written yet."
        msg = ""
        try:
            saved_step = int(torch.load(run_dir / LAST, map_location="cpu", weights_only=True).get("global_step", -1))
        except Exception:  # noqa: BLE001
            saved_step = -1
        if trainer.is_global_zero and diverged and saved_step == int(self.global_step):
            # last.ckpt holds exactly the weights that produced the non-finite loss: restore the previous one
            prev = run_dir / LAST_PREVIOUS
            os.replace(run_dir / LAST, run_dir / "last-nonfinite.ckpt")
            if not prev.exists():
                return ("last.ckpt held the weights that produced it and no earlier checkpoint exists: it was "
                        "moved to last-nonfinite.ckpt, so a re-run starts from scratch.")
            os.replace(prev, run_dir / LAST)
            msg = ("last.ckpt held the weights that produced it (kept as last-nonfinite.ckpt); "
                   "the previous checkpoint was restored as last.ckpt. ")
        try:
            ck = torch.load(run_dir / LAST, map_location="cpu", weights_only=True)
            where = f"epoch {ck.get('epoch')}, global step {ck.get('global_step')}"
        except Exception:  # noqa: BLE001
            where = "unreadable"
        best = run_dir / BEST
        return (f"{msg}The last good checkpoint is kept: {run_dir / LAST} ({where})"
                + (f"; best validation checkpoint: {best}." if best.exists() else "."))


def load_task(checkpoint: Union[str, Path], map_location: str = "cpu") -> AtomisticTask:
    """An :class:`AtomisticTask` (eval mode) rebuilt from a checkpoint written by the trainer."""
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} not found")
    try:
        task = AtomisticTask.load_from_checkpoint(str(path), map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt/foreign files get one clear message
        msg = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"{path} is not a readable abp checkpoint ({type(exc).__name__}: {msg})") from exc
    task.eval()
    return task


def _read_training_checkpoint(path: Path) -> Tuple[Optional[Dict[str, Any]], str]:
    """``(checkpoint, "")`` if ``path`` loads completely as a training checkpoint, else ``(None, reason)``."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated, corrupt or foreign: the reason goes into the log line
        return None, f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
    missing = [k for k in ("state_dict", "loops", "optimizer_states", "epoch", "global_step")
               if not isinstance(ck, dict) or k not in ck]
    if missing:
        return None, f"not a training checkpoint (no {', '.join(missing)})"
    return ck, ""


def _resume_checkpoint(run_dir: Path, rank0: bool = True) -> Tuple[Optional[Path], Optional[Dict[str, Any]], str]:
    """The newest readable checkpoint of ``run_dir`` to resume from: ``(path, checkpoint, why)``.

    ``last.ckpt`` is tried first, then ``last-previous.ckpt`` (the one before it). An unreadable file is
    renamed aside to ``<name>.corrupt`` (by rank 0; never deleted) and the next one is tried. ``(None,
    None, "")`` for a fresh run. Raises :class:`CheckpointError` when checkpoints exist or existed (set
    aside now or earlier) but none is readable: training from zero must be asked for, not happen by surprise.
    """
    problems: List[str] = []
    for name in (LAST, LAST_PREVIOUS):
        path = run_dir / name
        if not path.exists():
            if name == LAST and (run_dir / LAST_PREVIOUS).exists():
                problems.append("last.ckpt is missing (interrupted between two checkpoint renames)")
            continue
        ck, reason = _read_training_checkpoint(path)
        if ck is not None:
            why = "; ".join(problems) if problems else "the newest checkpoint"
            return path, ck, why
        aside = set_aside(path) if rank0 else path
        problems.append(f"{name} is unreadable ({reason}) and was kept as {aside.name}")
    earlier = sorted(p.name for n in (LAST, LAST_PREVIOUS) for p in run_dir.glob(f"{n}.corrupt*"))
    if not problems and not earlier:
        return None, None, ""
    best = run_dir / BEST
    raise CheckpointError(
        f"no readable checkpoint is left in {run_dir} to resume from: "
        + ("; ".join(problems) if problems else "only unreadable ones, set aside earlier")
        + (f" (set aside: {', '.join(earlier)})" if earlier else "")
        + f". To start this run over from epoch 0, move the run directory away "
        f"(e.g. mv {run_dir} {run_dir}.old) and run the same command again"
        + (f"; {best.name} there keeps the best weights so far" if best.exists() else "") + ".")


def _finished_metrics(path: Path, rank0: bool = True) -> Optional[Dict[str, Any]]:
    """Contents of a run's ``metrics.json``, or ``None`` if absent; an unreadable one is set aside (redone)."""
    if not path.exists():
        return None
    try:
        done = json.loads(path.read_text())
        if isinstance(done, dict):
            return done
        reason = f"a JSON {type(done).__name__}, not an object"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        reason = f"{type(exc).__name__}: {exc}"
    aside = set_aside(path) if rank0 else path
    log.warning("%s is unreadable (%s); kept as %s, the evaluation is redone", path, reason, aside.name)
    return None


def _saved_config(path: Path) -> Optional[Config]:
    """A run's saved ``config.yaml``, or ``None`` if absent; an unreadable one is set aside and rewritten."""
    if not path.exists():
        return None
    try:
        return Config.load(path)
    except Exception as exc:  # noqa: BLE001 - truncated/garbled YAML; the run's fingerprint is in its path
        aside = set_aside(path)
        log.warning("%s is unreadable (%s); kept as %s and written again", path, exc, aside.name)
        return None


# ================================================================================================
# Data
# ================================================================================================
class EpochSampler(DistributedSampler):
    """DistributedSampler whose order is a function of ``(seed, epoch)`` only, usable on one process too.

    ``skip_once(n)`` drops the first ``n`` indices of the next iteration (mid-epoch resume).
    """

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self._skip = 0

    def skip_once(self, n: int) -> None:
        self._skip = int(n)

    def __iter__(self):
        indices = list(super().__iter__())
        skip, self._skip = self._skip, 0
        return iter(indices[skip:])


class ResumableDataLoader(PygDataLoader):
    """PyG DataLoader with Lightning's ``state_dict``/``load_state_dict``: resumes mid-epoch exactly.

    The state is ``(epoch, batches yielded this epoch)``; on resume in the same epoch the sampler
    skips the batches already consumed (its order only depends on seed and epoch).
    """

    def __init__(self, dataset, batch_size: int, sampler: EpochSampler, **kwargs):
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
        self._batches = 0
        self._resume: Optional[Dict[str, int]] = None

    def __iter__(self):
        skip = 0
        if self._resume is not None:
            if int(self._resume.get("epoch", -1)) == int(self.sampler.epoch):
                skip = int(self._resume.get("batches", 0))
            self._resume = None
        if skip >= len(self):
            skip = 0
        self.sampler.skip_once(skip * self.batch_size)
        self._batches = skip
        for batch in super().__iter__():
            self._batches += 1
            yield batch

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": int(self.sampler.epoch), "batches": int(self._batches)}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self._resume = dict(state)


def _load_dataset(data_cfg):
    """``abp_core.data.get_dataset`` for the config; bad loader options become a ConfigError."""
    from .data import get_dataset

    try:
        return get_dataset(data_cfg.dataset, root=data_cfg.root, **dict(data_cfg.dataset_kwargs))
    except TypeError as exc:
        raise ConfigError(f"data.dataset_kwargs: {exc}") from None


class _Compose:
    def __init__(self, transforms):
        self.transforms = [t for t in transforms if t is not None]

    def __call__(self, data):
        for t in self.transforms:
            data = t(data)
        return data

    def __repr__(self):
        return f"Compose({self.transforms})"


def _targets_matrix(dataset) -> torch.Tensor:
    if hasattr(dataset, "targets") and callable(dataset.targets):
        return dataset.targets()
    if getattr(dataset, "_indices", None) is None and getattr(dataset, "_data", None) is not None \
            and getattr(dataset._data, "y", None) is not None:
        return dataset._data.y
    return torch.cat([dataset.get(i).y.reshape(1, -1) if hasattr(dataset, "get") else dataset[i].y.reshape(1, -1)
                      for i in range(len(dataset))])


def _elements(dataset, rows: np.ndarray) -> List[int]:
    data, slices = getattr(dataset, "_data", None), getattr(dataset, "slices", None)
    if getattr(dataset, "_indices", None) is None and data is not None and slices is not None and "z" in slices:
        ptr = slices["z"]
        counts = ptr[1:] - ptr[:-1]
        mol = torch.repeat_interleave(torch.arange(len(counts)), counts)
        mask = torch.zeros(len(counts), dtype=torch.bool)
        mask[torch.as_tensor(rows, dtype=torch.long)] = True
        return sorted(int(v) for v in data.z[mask[mol]].unique())
    zs = set()
    for i in rows:
        zs.update(int(v) for v in dataset[int(i)].z.unique())
    return sorted(zs)


def _resolve_targets(dataset, targets) -> Tuple[List[int], List[str], List[str]]:
    names = list(getattr(dataset, "target_names", []))
    units = list(getattr(dataset, "target_units", [""] * len(names)))
    if not names:
        raise ConfigError("data.dataset: the dataset exposes no target_names")
    cols = []
    for i, tgt in enumerate(targets):
        if isinstance(tgt, str) and tgt.strip().lstrip("-").isdigit():
            tgt = int(tgt)
        if isinstance(tgt, int) and not 0 <= tgt < len(names):
            raise ConfigError(f"data.targets[{i}]: target index {tgt} is out of range for "
                              f"{getattr(dataset, 'name', 'the dataset')} ({len(names)} targets: 0..{len(names) - 1})")
        try:
            col = dataset.target_index(tgt) if hasattr(dataset, "target_index") else (
                tgt if isinstance(tgt, int) else names.index(tgt))
        except (ValueError, KeyError, IndexError):
            raise ConfigError(f"data.targets[{i}]: unknown target {tgt!r}; available: {names}") from None
        if col in cols:
            raise ConfigError(f"data.targets[{i}]: target {names[col]!r} is listed twice")
        cols.append(int(col))
    return cols, [names[c] for c in cols], [units[c] for c in cols]


_SUBSET_SEED = 0


class AtomisticDataModule(L.LightningDataModule):
    """Dataset, split, target selection, standardiser (fitted on train only) and loaders.

    Args:
        config: the run's :class:`Config` (uses ``data`` and ``trainer.batch_size/num_workers/...``).
        dataset: use this dataset object instead of loading ``config.data.dataset`` (it must expose
            ``target_names`` and ``y`` of shape [1, num_targets] per molecule).
        transform: extra per-molecule transform applied after target selection (and orbital labels).

    After :meth:`setup`: ``train_set/val_set/test_set``, ``split_indices`` (dataset rows),
    ``target_indices/target_names/target_units``, ``target_mean/target_std`` and ``train_elements``.
    """

    def __init__(self, config: Config, dataset=None, transform: Optional[Callable] = None):
        super().__init__()
        self.cfg = config
        self._dataset = dataset
        self.extra_transform = transform
        self._ready = False

    # ---- setup ---------------------------------------------------------------------------------
    def prepare_data(self):
        if self._dataset is None:
            _load_dataset(self.cfg.data)  # downloads/processes once (rank 0)

    def setup(self, stage: Optional[str] = None):
        if self._ready:
            return
        d = self.cfg.data
        ds = self._dataset if self._dataset is not None else _load_dataset(d)
        self.dataset = ds
        cols, names, units = _resolve_targets(ds, d.targets)
        self.target_indices, self.target_names, self.target_units = cols, names, units
        train, val, test = self._split(ds)
        self.split_indices = {"train": train, "val": val, "test": test}
        y = _targets_matrix(ds)[:, cols].double()
        y_train = y[torch.as_tensor(train, dtype=torch.long)]
        if not bool(torch.isfinite(y_train).all()):
            raise ValueError("training targets contain NaN/inf; the dataset should have refused them")
        from .data.splits import Standardizer

        self.standardizer = Standardizer().fit(y_train)  # training rows only; population std, constant -> 1
        self.target_mean = self.standardizer.mean.tolist()
        self.target_std = self.standardizer.std.tolist()
        self.train_elements = _elements(ds, train)
        from .data.common import SelectTargets

        # a caller's own transform follows, which might edit a tensor in place: then every tensor is copied
        transforms = [SelectTargets(ds, cols, copy_tensors=self.extra_transform is not None)]
        if d.orbital_labels:
            from .orbitals import AttachOrbitalLabels

            if not Path(d.orbital_labels).exists():
                raise ConfigError(f"data.orbital_labels: {d.orbital_labels!r} not found")
            transforms.append(AttachOrbitalLabels(d.orbital_labels))
        transforms.append(self.extra_transform)
        base_transform = getattr(ds, "transform", None)
        full = _Compose([base_transform] + transforms)
        self.train_set = self._subset(ds, train, full)
        self.val_set = self._subset(ds, val, full)
        self.test_set = self._subset(ds, test, full)
        if self.cfg.model.readout == "owa":
            from .readouts import OrbitalWeightedAveragePooling

            import inspect

            default = inspect.signature(OrbitalWeightedAveragePooling.__init__).parameters["coefficient_key"].default
            key = self.cfg.model.readout_kwargs().get("coefficient_key", default)
            if getattr(self.train_set[0], key, None) is None:
                raise ConfigError(f"model.readout: 'owa' needs per-atom '{key}' on every molecule; set "
                                  f"data.orbital_labels to saved abp_core.orbitals labels for this dataset")
        self._ready = True

    @staticmethod
    def _subset(ds, rows, transform):
        sub = ds.index_select(torch.as_tensor(rows, dtype=torch.long)) if hasattr(ds, "index_select") \
            else torch.utils.data.Subset(ds, list(rows))
        if hasattr(sub, "index_select"):
            sub.transform = transform
            return sub
        return _TransformedSubset(sub, transform)

    def _split(self, ds) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        d = self.cfg.data
        n = len(ds)
        if d.split == "paper":
            try:
                if hasattr(ds, "paper_split"):
                    parts = ds.paper_split(d.split_seed)
                else:
                    from .data import paper_split

                    parts = paper_split(d.dataset, d.split_seed, root=d.root, n=n)
            except (ValueError, KeyError) as exc:
                raise ConfigError(f"data.split_seed: {exc}") from None
            parts = [np.asarray(p, dtype=np.int64) for p in parts]
            if d.subset is not None:
                total = sum(len(p) for p in parts)
                rng = np.random.Generator(np.random.PCG64(d.split_seed))
                parts = [rng.permutation(p)[:max(1, int(round(d.subset * len(p) / total)))] for p in parts]
            return parts[0], parts[1], parts[2]
        from .data.splits import random_split

        if d.subset is not None:
            if d.subset > n:
                raise ConfigError(f"data.subset: {d.subset} molecules requested, the dataset has {n}")
            # the subset is the same for every split seed (like the full dataset); only the split varies
            pick = np.sort(np.random.Generator(np.random.PCG64(_SUBSET_SEED)).permutation(n)[:d.subset])
            a, b, c = random_split(len(pick), d.split_seed, tuple(d.split_fractions))
            parts = (pick[a], pick[b], pick[c])
        else:
            parts = random_split(n, d.split_seed, tuple(d.split_fractions))
        if min(len(p) for p in parts) == 0:
            raise ConfigError(f"data.subset/split_fractions leave an empty split (sizes {[len(p) for p in parts]})")
        return tuple(np.asarray(p, dtype=np.int64) for p in parts)

    # ---- loaders -------------------------------------------------------------------------------
    def _world(self) -> Tuple[int, int]:
        trainer = self._trainer if hasattr(self, "_trainer") else None
        trainer = trainer or getattr(self, "trainer", None)
        if trainer is None:
            return 1, 0
        return int(trainer.world_size), int(trainer.global_rank)

    def _loader_kwargs(self) -> Dict[str, Any]:
        t = self.cfg.trainer
        pin = t.pin_memory
        if pin is None:
            pin = torch.cuda.is_available() and t.accelerator in ("auto", "gpu", "cuda")
        kw = {"num_workers": t.num_workers, "pin_memory": bool(pin)}
        if t.num_workers > 0:
            kw["persistent_workers"] = True
        return kw

    def train_dataloader(self):
        world, rank = self._world()
        sampler = EpochSampler(self.train_set, num_replicas=world, rank=rank, shuffle=True, seed=self.cfg.seed)
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            sampler.set_epoch(int(trainer.current_epoch))
        return ResumableDataLoader(self.train_set, batch_size=self.cfg.trainer.batch_size, sampler=sampler,
                                   **self._loader_kwargs())

    def _eval_loader(self, dataset, distributed: bool = True):
        world, rank = self._world() if distributed else (1, 0)
        bs = self.cfg.trainer.eval_batch_size or self.cfg.trainer.batch_size
        sampler = EpochSampler(dataset, num_replicas=world, rank=rank, shuffle=False, seed=self.cfg.seed)
        return PygDataLoader(dataset, batch_size=bs, sampler=sampler, **self._loader_kwargs())

    def val_dataloader(self):
        return self._eval_loader(self.val_set)

    def test_dataloader(self):
        return self._eval_loader(self.test_set)


class _TransformedSubset(torch.utils.data.Dataset):
    def __init__(self, subset, transform):
        self.subset, self.transform = subset, transform

    def __len__(self):
        return len(self.subset)

    def __getitem__(self, i):
        return self.transform(self.subset[i])


# ================================================================================================
# Callbacks / plugins
# ================================================================================================
class _RotatingCheckpointIO(TorchCheckpointIO):
    """Atomic writes (:mod:`abp_core.files`); the previous ``last.ckpt`` is kept as ``last-previous.ckpt``.

    A full disk raises :class:`~abp_core.files.StorageError` and leaves every earlier checkpoint as it was.
    """

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = Path(path)
        keep = path.with_name(LAST_PREVIOUS) if path.name == LAST else None
        with atomic_open(path, keep_previous=keep) as fh:
            torch.save(checkpoint, fh)


class _History(Callback):
    """Per-epoch history (CSV), kept in the checkpoint so that a resumed run continues it."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.rows: List[Dict[str, Any]] = []
        self._t0 = None

    @property
    def state_key(self) -> str:
        return "abp_history"

    def state_dict(self):
        elapsed = time.perf_counter() - self._t0 if self._t0 is not None else 0.0
        return {"rows": list(self.rows), "epoch_elapsed_s": float(elapsed)}

    def load_state_dict(self, state):
        self.rows = list(state.get("rows", []))
        self._resume_elapsed = float(state.get("epoch_elapsed_s", 0.0))

    def on_train_start(self, trainer, pl_module):
        # resumed mid-epoch: on_train_epoch_start is not called again; count the time already spent
        if getattr(self, "_resume_elapsed", None) is not None:
            self._t0 = time.perf_counter() - self._resume_elapsed
            self._resume_elapsed = None

    def on_train_epoch_start(self, trainer, pl_module):
        self._t0 = time.perf_counter()

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        s = dict(pl_module.last_epoch_summary)
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")
        row = {"epoch": int(trainer.current_epoch), "global_step": int(trainer.global_step),
               "train_loss": s.pop("train_loss", float("nan")), "val_loss": s.pop("val_loss", float("nan"))}
        row.update(s)
        row["lr"] = lr
        row["epoch_time_s"] = time.perf_counter() - self._t0 if self._t0 is not None else float("nan")
        self.rows = [r for r in self.rows if r["epoch"] != row["epoch"]] + [row]
        if trainer.is_global_zero:
            _write_csv(self.path, self.rows)


class _RNGState(Callback):
    """Saves/restores the Python, NumPy and torch RNG states with every checkpoint."""

    @property
    def state_key(self) -> str:
        return "abp_rng"

    def state_dict(self):
        import random

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        # plain types only, so that checkpoints load with torch.load(weights_only=True)
        return {"python": random.getstate(), "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
                "torch": torch.get_rng_state()}

    def load_state_dict(self, state):
        import random

        py = state["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state["torch"])


def _write_csv(path: Path, rows: List[Dict[str, Any]]) -> None:
    keys: List[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with atomic_open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


# ================================================================================================
# Running
# ================================================================================================
def _slug(text: str, maxlen: int = 60) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "-", str(text)).strip("-").lower()
    return s[:maxlen].rstrip("-") or "target"


def run_directory(config: Config, target_names: Optional[Sequence[str]] = None) -> Path:
    """``<output_dir>/<dataset>[-kwargs]/<target>/<backbone>-<readout>/seed<split_seed>-<fingerprint>``.

    ``target_names``: the dataset's names of the configured targets (as resolved by the data module);
    the fingerprint is then computed with the targets given by these names, so that a target given by
    index, alias or name maps to the same run directory.
    """
    if target_names is not None:
        config = _resolved(config, target_names)
    d, m = config.data, config.model
    dataset = d.dataset + "".join(f"-{_slug(v, 20)}" for _, v in sorted(d.dataset_kwargs.items()))
    names = list(target_names) if target_names is not None else [str(t) for t in d.targets]
    target = "+".join(_slug(n, 40) for n in names)
    if len(target) > 80:
        target = target[:70] + "-" + str(abs(hash(target)) % 10 ** 8)
    return (Path(config.trainer.output_dir) / dataset / target / f"{m.backbone}-{m.readout}"
            / f"seed{d.split_seed}-{config.fingerprint()}")


def _versions() -> Dict[str, str]:
    import torch_geometric

    out = {"abp": __version__, "torch": torch.__version__, "torch_geometric": torch_geometric.__version__,
           "lightning": L.__version__, "numpy": np.__version__, "python": platform.python_version(),
           "platform": platform.platform()}
    try:
        import subprocess

        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
        if rev.returncode == 0:
            out["abp_git"] = rev.stdout.strip()
    except Exception:  # noqa: BLE001
        pass
    return out


@torch.no_grad()
def evaluate(task: AtomisticTask, dataset, batch_size: int = 256, device: Optional[str] = None) -> Dict[str, np.ndarray]:
    """Predictions in physical units on ``dataset`` (one process, no shuffling): ``idx``, ``y_true``, ``y_pred``.

    On the CPU freed memory is kept for reuse meanwhile (:func:`abp_core.allocator.freed_memory_kept`, as during
    training: the same numbers, fewer page faults)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    task = task.to(device).eval()
    loader = PygDataLoader(dataset, batch_size=batch_size, shuffle=False)
    idx, ys, ps = [], [], []
    with freed_memory_kept(torch.device(device).type == "cpu"):
        for batch in loader:
            batch = batch.to(device)
            ps.append(task.predict_physical(batch).double().cpu())
            ys.append(batch.y.double().cpu())
            idx.append(batch.idx.reshape(-1).cpu() if hasattr(batch, "idx") else torch.full((batch.num_graphs,), -1))
    return {"idx": torch.cat(idx).numpy(), "y_true": torch.cat(ys).numpy(), "y_pred": torch.cat(ps).numpy()}


def _prediction_rows(res, split, weights, names, units):
    rows = []
    for i in range(len(res["idx"])):
        for t, name in enumerate(names):
            rows.append({"split": split, "weights": weights, "idx": int(res["idx"][i]), "target": name,
                         "unit": units[t], "y_true": float(res["y_true"][i, t]), "y_pred": float(res["y_pred"][i, t])})
    return rows


@dataclass
class RunResult:
    """Outcome of :func:`run_training`."""

    run_dir: Path
    metrics: Dict[str, Any] = field(default_factory=dict)
    skipped: bool = False
    resumed_from: Optional[Dict[str, int]] = None
    is_global_zero: bool = True

    @property
    def test_mae(self) -> Dict[str, float]:
        return {k: v["mae"] for k, v in self.metrics.get("metrics", {}).get("test_best", {}).items()}


def _build_trainer(cfg: Config, run_dir: Path, callbacks: Sequence[Callback], history: _History) -> L.Trainer:
    t = cfg.trainer
    # best.ckpt: lowest validation loss; last.ckpt: every epoch (Lightning's save_last only writes when
    # another checkpoint was written at the same step, i.e. when the best improved) and every N steps.
    ckpts: List[Callback] = [
        ModelCheckpoint(dirpath=run_dir, filename="best", monitor="val_loss", mode="min", save_top_k=1,
                        save_last=False, enable_version_counter=False, auto_insert_metric_name=False),
        ModelCheckpoint(dirpath=run_dir, filename="last", monitor=None, save_top_k=1, every_n_epochs=1,
                        enable_version_counter=False, auto_insert_metric_name=False),
    ]
    if t.checkpoint_every_n_steps:
        ckpts.append(ModelCheckpoint(dirpath=run_dir, filename="last", monitor=None, save_top_k=1,
                                     every_n_train_steps=t.checkpoint_every_n_steps, enable_version_counter=False,
                                     auto_insert_metric_name=False))
    cbs: List[Callback] = [history, _RNGState()]
    if t.patience is not None:
        cbs.append(EarlyStopping(monitor="val_loss", mode="min", patience=t.patience, min_delta=t.min_delta,
                                 check_finite=True))
    strategy: Any = t.strategy
    if t.strategy in ("ddp", "ddp_spawn", "ddp_notebook"):
        from lightning.pytorch.strategies import DDPStrategy

        start = {"ddp": "popen", "ddp_spawn": "spawn", "ddp_notebook": "fork"}[t.strategy]
        cpu = t.accelerator == "cpu" or (t.accelerator == "auto" and not torch.cuda.is_available())
        strategy = DDPStrategy(start_method=start, process_group_backend="gloo" if cpu else None)
    return L.Trainer(
        default_root_dir=str(run_dir),
        max_epochs=t.max_epochs,
        max_steps=t.max_steps,
        accelerator=t.accelerator,
        devices=t.devices,
        strategy=strategy,
        precision=t.precision,
        gradient_clip_val=t.gradient_clip,
        deterministic=True if t.deterministic else None,
        callbacks=cbs + list(callbacks) + ckpts,
        plugins=[_RotatingCheckpointIO()],
        logger=False,
        enable_progress_bar=t.progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        log_every_n_steps=1,
    )


@contextlib.contextmanager
def _long_lived_objects_frozen():
    """Freeze the objects that exist now into the garbage collector's permanent generation for the block.

    Why: after importing torch and Lightning a process holds ~450,000 tracked objects, and each of Python's full
    (generation 2) collections walks all of them: ~0.3 s of one core, triggered by the loop's allocations about
    once per 200 quickstart training steps with ABP, i.e. ~3 % of a 10 s run. Frozen objects are not walked (they
    are not freed either until :func:`gc.unfreeze`, which runs on exit). Nothing happens if the caller already
    froze objects (their choice is kept).
    """
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@contextlib.contextmanager
def denormals_flushed(on: bool):
    """Flush sub-normal floats to zero on this process's CPU threads for the block (:func:`kernels.flush_denormals`),
    then restore the previous state. ``on=False`` changes nothing.

    Why the trainer does it on the CPU: SchNet's backward meets sub-normal floats (cutoff edges, small gradients),
    and on x86 each costs a microcode assist. With ABP's gradients its backward ran ~8-12 ms per paper-like step
    slower than with a sum-like gradient, and flushing removed the difference; both readouts' epochs ran ~10 %
    faster (``benchmarks/README.md``, seventh pass of ``epoch.py``). Values below 1.2e-38 become zero, below
    float32's rounding of any sum they enter.
    """
    if not on:
        yield
        return
    from . import kernels

    before = kernels.flush_denormals(True)
    try:
        yield
    finally:
        kernels.flush_denormals(bool(before))


def _on_the_cpu(setting: Optional[bool], trainer) -> bool:
    """A CPU-only trainer setting (``flush_denormals``, ``keep_freed_memory``), its default (``None``) resolved:
    on when the trainer runs on the CPU."""
    if setting is not None:
        return setting
    from lightning.pytorch.accelerators import CPUAccelerator

    return isinstance(trainer.accelerator, CPUAccelerator)


def _rank() -> int:
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        if os.environ.get(key):
            try:
                return int(os.environ[key])
            except ValueError:
                pass
    return 0


def _resolved(cfg: Config, target_names: Sequence[str]) -> Config:
    return cfg.with_overrides(**{"data.targets": list(target_names)})


def run_training(config: Union[Config, Dict[str, Any]], *, dataset=None, transform: Optional[Callable] = None,
                 callbacks: Sequence[Callback] = (), resume: bool = True) -> RunResult:
    """Train one model as configured; resume from ``last.ckpt`` or skip if already finished.

    Args:
        config: a :class:`Config` or a dict for :meth:`Config.from_dict`.
        dataset / transform: see :class:`AtomisticDataModule`.
        callbacks: extra Lightning callbacks.
        resume: resume from ``last.ckpt`` if present (``False`` refuses to touch a started run dir).

    Returns:
        :class:`RunResult` with the run directory and the contents of ``metrics.json``.

    Raises:
        ConfigError: invalid config (including a target the dataset does not have), before training.
        NonFiniteLossError: the loss became NaN/inf.
        RunConflictError: the run directory holds another configuration's results.
    """
    t_start = time.perf_counter()
    cfg = config if isinstance(config, Config) else Config.from_dict(config)
    dm = AtomisticDataModule(cfg, dataset=dataset, transform=transform)
    dm.setup()
    cfg = _resolved(cfg, dm.target_names)
    dm.cfg = cfg
    run_dir = run_directory(cfg, dm.target_names)
    metrics_path = run_dir / "metrics.json"
    fingerprint = cfg.fingerprint()
    done = _finished_metrics(metrics_path, rank0=_rank() == 0)
    if done is not None:
        if done.get("fingerprint") != fingerprint:
            raise RunConflictError(f"{run_dir} holds results of another configuration "
                                   f"(fingerprint {done.get('fingerprint')} != {fingerprint}); not overwriting")
        log.info("run already finished: %s", run_dir)
        return RunResult(run_dir, done, skipped=True)
    last = run_dir / LAST
    if (last.exists() or (run_dir / LAST_PREVIOUS).exists()) and not resume:
        raise RunConflictError(f"{run_dir} holds an unfinished run (last.ckpt); pass resume=True to continue it")
    rank0 = _rank() == 0
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(run_dir)  # half-written files of a process killed during a write
        saved_cfg = run_dir / "config.yaml"
        old = _saved_config(saved_cfg)
        if old is not None:
            if old.fingerprint() != fingerprint:
                raise RunConflictError(f"{saved_cfg} belongs to another configuration; not overwriting")
        cfg.save(saved_cfg)

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    task = AtomisticTask(cfg.to_dict(), dm.target_names, dm.target_units, dm.target_mean, dm.target_std,
                         dm.train_elements, dm.target_indices)
    history = _History(run_dir / "history.csv")
    preemption = PreemptionCheckpoint(last)
    trainer = _build_trainer(cfg, run_dir, list(callbacks) + [preemption], history)
    resumed_from = None
    ckpt_path, ck, why = _resume_checkpoint(run_dir, rank0)
    if ckpt_path is not None:
        resumed_from = {"epoch": int(ck.get("epoch", -1)), "global_step": int(ck.get("global_step", -1))}
        if rank0:
            print(f"abp: resuming {run_dir} from {ckpt_path.name} (epoch {resumed_from['epoch']}, "
                  f"global step {resumed_from['global_step']}): {why}", file=sys.stderr, flush=True)
    del ck  # Lightning reads the file again; do not hold a second copy of the weights
    with warnings.catch_warnings(), forward_sigusr1(preemption), _long_lived_objects_frozen(), \
            denormals_flushed(_on_the_cpu(cfg.trainer.flush_denormals, trainer)), \
            freed_memory_kept(_on_the_cpu(cfg.trainer.keep_freed_memory, trainer)):
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty.*")
        try:
            trainer.fit(task, datamodule=dm, ckpt_path=str(ckpt_path) if ckpt_path is not None else None)
        except SIGTERMException:
            stop = preemption.preempted(is_global_zero=trainer.is_global_zero)
            if trainer.is_global_zero:
                print(f"abp: {stop}", file=sys.stderr, flush=True)
            raise stop from None
    if not trainer.is_global_zero:
        return RunResult(run_dir, {}, resumed_from=resumed_from, is_global_zero=False)

    # ---- evaluation on rank 0, in fp32, one process ----------------------------------------------
    # Counters and states come from the checkpoints: with ddp_spawn the main process only gets the weights.
    last_task = trainer.lightning_module
    last_state = {k: v.detach().cpu().clone() for k, v in last_task.state_dict().items()}
    last_ck = torch.load(last, map_location="cpu", weights_only=True) if last.exists() else {}
    cb_states = last_ck.get("callbacks", {})
    rows = history.rows or list(cb_states.get("abp_history", {}).get("rows", []))
    es_state = next((v for k, v in cb_states.items() if k.startswith("EarlyStopping")), {})
    best_state = next((v for k, v in cb_states.items() if k.startswith("ModelCheckpoint{'monitor': 'val_loss'")), {})
    best_path = run_dir / BEST
    names, units = dm.target_names, dm.target_units
    bs = cfg.trainer.eval_batch_size or cfg.trainer.batch_size
    final_task = AtomisticTask(**dict(last_task.hparams))
    final_task.load_state_dict(last_state)
    if best_path.exists():
        best_ck = torch.load(best_path, map_location="cpu", weights_only=True)
        best_task = load_task(best_path)
    else:  # training ended before the first validation (e.g. trainer.max_steps): report the final weights
        best_ck, best_task = {}, final_task
    results, pred_rows = {}, []
    for tag, model in (("best", best_task), ("last", final_task)):
        for split, ds in (("val", dm.val_set), ("test", dm.test_set)):
            res = evaluate(model, ds, bs)
            results[f"{split}_{tag}"] = regression_metrics(res["y_true"], res["y_pred"], names)
            if tag == "best":
                pred_rows.append((split, _prediction_rows(res, split, tag, names, units)))
    for split, pred in pred_rows:
        _write_csv(run_dir / f"predictions_{split}.csv", pred)
    train_time = float(np.nansum([r.get("epoch_time_s", float("nan")) for r in rows]))
    best_score = best_state.get("best_model_score")
    out = {
        "run_dir": str(run_dir),
        "fingerprint": fingerprint,
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        "dataset": cfg.data.dataset,
        "target_names": names,
        "target_indices": dm.target_indices,
        "target_units": units,
        "split_sizes": {k: int(len(v)) for k, v in dm.split_indices.items()},
        "train_elements": dm.train_elements,
        "standardizer": {"mean": dm.target_mean, "std": dm.target_std},
        "metrics": results,
        "protocol": ("test_best/val_best: weights of the best validation-loss checkpoint (best.ckpt), used for "
                     "reporting; test_last/val_last: final weights, which the paper's code reported"),
        "best_checkpoint": best_path.name if best_ck else None,
        "best_epoch": int(best_ck.get("epoch", -1)) if best_ck else None,
        "best_val_loss": float(best_score) if best_score is not None else None,
        "epochs_trained": len(rows),
        "global_step": max(int(trainer.global_step), int(last_ck.get("global_step", 0))),
        "stopped_early": bool(es_state.get("stopped_epoch", 0) > 0),
        "resumed_from": resumed_from,
        "num_parameters": int(sum(p.numel() for p in best_task.parameters())),
        "versions": _versions(),
        "wall_time_s": time.perf_counter() - t_start,
        "train_time_s": train_time,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    rows = []
    for key, block in results.items():
        split, tag = key.split("_")
        for t, name in enumerate(names):
            rows.append({"split": split, "weights": tag, "target": name, "unit": units[t], **block[name]})
    _write_csv(run_dir / "metrics.csv", rows)
    write_text(metrics_path, json.dumps(out, indent=2, default=float))  # written last: marks the run finished
    return RunResult(run_dir, out, resumed_from=resumed_from)


def run_experiment(config: Union[Config, Dict[str, Any]], *, targets: Optional[Sequence[Union[str, int]]] = None,
                   readouts: Optional[Sequence[str]] = None, seeds: Optional[Sequence[int]] = None,
                   backbones: Optional[Sequence[str]] = None, continue_on_error: bool = True,
                   dataset=None, transform: Optional[Callable] = None,
                   callbacks: Sequence[Callback] = ()) -> Tuple[List[RunResult], List[Tuple[Config, str]]]:
    """Run the grid targets x backbones x readouts x split seeds sequentially (finished runs are skipped).

    Every config of the grid is built (validated) before the first run starts. Returns the results and
    the failures (config, error message); with ``continue_on_error=False`` the first failure raises.
    """
    base = config if isinstance(config, Config) else Config.from_dict(config)
    grid = []
    for tgt in (targets if targets else [base.data.targets]):
        for bb in (backbones or [base.model.backbone]):
            for ro in (readouts or [base.model.readout]):
                for seed in (seeds or [base.data.split_seed]):
                    grid.append(base.with_overrides(**{
                        "data.targets": list(tgt) if isinstance(tgt, (list, tuple)) else [tgt],
                        "model.backbone": bb, "model.readout": ro, "data.split_seed": int(seed)}))
    results, failures = [], []
    for i, cfg in enumerate(grid, 1):
        label = f"[{i}/{len(grid)}] {cfg.data.dataset} {cfg.data.targets} {cfg.model.backbone}-{cfg.model.readout} " \
                f"seed {cfg.data.split_seed}"
        print(f"abp experiment {label}", file=sys.stderr, flush=True)
        try:
            res = run_training(cfg, dataset=dataset, transform=transform, callbacks=callbacks)
            if res.skipped:
                print(f"  already finished: {res.run_dir}", file=sys.stderr, flush=True)
            results.append(res)
        except (ConfigError, StorageError):  # a full disk fails every later run too
            raise
        except Exception as exc:  # noqa: BLE001 - one failed run must not end the grid
            if not continue_on_error:
                raise
            failures.append((cfg, f"{type(exc).__name__}: {exc}"))
            print(f"  FAILED: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    return results, failures
