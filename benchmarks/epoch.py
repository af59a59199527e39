"""Benchmark: one training epoch (train + validation) with the package's own trainer, sum vs WA vs ABP.

What a user feels is the epoch, not the readout alone: this runs :func:`abp_core.train.run_training`
(Lightning trainer, the package's data loader, checkpoints, logging) unchanged, with the same data,
split, seed and backbone, only the readout differing, and reads each epoch's time from the trainer's
own ``history.csv`` (``epoch_time_s``: from the start of the training epoch to the end of its
validation). Two configurations:

* ``quickstart``: the quickstart's (``abp_core.quickstart.train_readouts``): the first 4,000 QM9
  molecules, SchNet 64 hidden / 64 filters / 3 interactions, cutoff 5 A, batch 32, ABP with 4 heads;
* ``paper``: paper-like: SchNet 128 / 128 / 6, cutoff 10 A, batch 128, ABP at its defaults (8 heads),
  on a fixed random subset of QM9 (``--paper-molecules``, default 4,000, so that the script runs in
  about 10 minutes on one core; the per-step costs do not depend on the number of molecules).

Timing: in each round every readout trains one fresh run of ``--epochs-per-run`` epochs (interleaved:
sum, WA, ABP, ABP, WA, sum, ...), so that load from other processes hits all alike; the first epoch of
the first round is a warm-up and not counted. The table shows the median epoch time per readout and
its ratio to sum's, with the train steps per epoch, and the same for the process's CPU time per epoch
(with one thread the contention-robust cross-check: other processes' load inflates wall times, not it),
and a paired CPU ratio: the median over epochs of each epoch's CPU time over the sum epoch of the same round
and index, which a host whose speed drifts between rounds (a shared VM) distorts less than the ratio of
medians, with its quartiles (the noise band: how far single epochs scatter) and the median's distribution-free 95 %
confidence interval (the median is shown below a goal when the interval's upper end is). Odd rounds run the
variants in reverse order (A B, B A, ...), so that a drift over the run does not favour the variant that runs
first.

Inside the epochs: a callback splits each epoch's CPU time by Lightning's hooks (training_step, backward, optimizer
step, between steps, validation) and times the readout's own forward and backward. The phase between steps (the
loader's collation and Lightning's logging) is the same work whatever the readout, so it is a probe of the host's
speed in that very epoch: the **host-normalised ratio** divides each epoch's CPU time by it before pairing. On a
shared host whose speed drifts by 20-30 % between runs seconds apart, that ratio's quartiles are several times
narrower than the plain paired ratio's, and it is the figure the goals are judged by. The table beside it gives
what each phase adds over sum's, as a share of sum's epoch.

``--precision`` sets the trainer's precision for the epochs (default ``32-true``; e.g. ``bf16-mixed``, which
Lightning runs under autocast). The step profile and its floors time float32 steps, so they run only at
``32-true``.

``--baseline DIR`` adds sum and ABP with an older copy of the package (``DIR/abp_core``, imported as
``abp_core_baseline``) to the same interleaved rounds: the before/after comparison of a change, side by side.

Profile (``--no-profile`` to skip): where ABP's extra time goes. On batches from the same data loader, each
phase of a training step is timed on its own (process CPU time on CPU, wall time on a GPU; median over steps,
interleaved between the readouts; on the CPU with sub-normals flushed and freed memory kept, as the trainer
runs): backbone forward, readout forward, head + loss, backward through head and readout
(``torch.autograd.grad`` to the atom features and the head's and readout's parameters), backward through the
backbone, optimiser step. A line gives the trainer's training loader alone (CPU time of one pass per batch,
the same for every readout; against the baseline's when given). Another splits ABP's readout in a hot loop
(forward + backward per batch, alternating) into its two native calls alone and the same through the module and
autograd: the difference is the Python, ctypes and autograd work around the native calls, and the line gives the
epoch ratio the step profile predicts with and without it (the latter a bound: an autograd node in Python has a
fixed cost of its own). Then ``torch.profiler``'s top operators of
ABP's readout (forward + backward) by self time, and the readout's wall time not spent inside any operator
(Python, autograd bookkeeping).

    .venv/bin/python benchmarks/epoch.py --threads 1            # default run (~10 min on one core)
    .venv/bin/python benchmarks/epoch.py --quick                # CI smoke run (tiny model, seconds)
    .venv/bin/python benchmarks/epoch.py --configs quickstart   # one configuration
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import (BASELINE, add_device_argument, fmt_table, load_baseline, machine_line, median,  # noqa: E402
                     resolve_device, synchronize)
from abp_core.config import PRECISIONS  # noqa: E402

READOUTS = ("sum", "wa", "abp")
HOMO = "homo"


def configs(args) -> Dict[str, dict]:
    """name -> (dataset kind, molecules, SchNet hyperparameters, batch size, ABP options)."""
    if args.quick:
        return {"quick": dict(first=300, subset=None, hidden=16, interactions=1, cutoff=5.0, batch=32, abp={"heads": 1})}
    out = {
        "quickstart": dict(first=4000, subset=None, hidden=64, interactions=3, cutoff=5.0, batch=32, abp={"heads": 4}),
        "paper": dict(first=None, subset=args.paper_molecules, hidden=128, interactions=6, cutoff=10.0, batch=128,
                      abp={}),
    }
    return {k: v for k, v in out.items() if k in args.configs}


def variants(args) -> List[tuple]:
    """``(label, readout, package)`` of every compared variant: the readouts with this package, and sum and ABP
    with the baseline package if one is given."""
    out = [(ro, ro, "abp_core") for ro in args.readouts]
    if args.baseline:
        out += [(f"{ro}@baseline", ro, BASELINE) for ro in ("sum", "abp") if ro in args.readouts]
    return out


def make_config(spec: dict, readout: str, max_epochs: int, output_dir: str, device: torch.device,
                package: str = "abp_core", precision: str = "32-true"):
    import importlib

    Config = importlib.import_module(f"{package}.config").Config
    return Config.from_dict({
        "data": {"dataset": "qm9", "targets": [HOMO], "split": "random", "split_seed": 0, "subset": spec["subset"],
                 "dataset_kwargs": {"max_molecules": spec["first"]} if spec["first"] else {}},
        "model": {"backbone": "schnet", "readout": readout,
                  "backbone_hparams": {"hidden_channels": spec["hidden"], "num_filters": spec["hidden"],
                                       "num_interactions": spec["interactions"], "cutoff": spec["cutoff"]},
                  "readout_hparams": {"abp": spec["abp"]}},
        "trainer": {"max_epochs": max_epochs, "batch_size": spec["batch"], "lr": 5e-4, "seed": 0, "patience": None,
                    "output_dir": output_dir, "progress_bar": False, "num_workers": 0,
                    "accelerator": "gpu" if device.type == "cuda" else "cpu", "devices": 1, "precision": precision},
    })


def quartiles(values: List[float]) -> tuple:
    """First and third quartiles (linear interpolation): the spread of the paired ratios, i.e. the noise band."""
    import numpy as np

    q1, q3 = np.percentile(np.asarray(values, dtype=float), [25, 75])
    return float(q1), float(q3)


def median_interval(values: List[float], confidence: float = 0.95) -> tuple:
    """Distribution-free confidence interval of the median (order statistics, ``scipy.stats.quantile_test``): a
    goal on the paired ratio is shown beyond the noise when the interval's upper end is below it. Needs enough
    values: below 6 the 95 % interval is not defined (``nan``), at 6 to 8 it spans all of them."""
    from scipy.stats import quantile_test

    ci = quantile_test([float(v) for v in values], p=0.5).confidence_interval(confidence)
    return float(ci.low), float(ci.high)


def interval_text(values: List[float]) -> str:
    """:func:`median_interval` as printed: ``"low-high"``, or why there is none."""
    low, high = median_interval(values)
    return f"{low:.3f}-{high:.3f}" if low == low else "n/a (< 6 epochs)"


def host_normalized(run: dict, base: dict) -> List[float]:
    """Paired epoch ratios with the host's speed divided out: each epoch's CPU time over its own between-steps time
    (:data:`PROBE`: the loader and Lightning's logging, which no readout changes, spread over the whole epoch), this
    variant's over sum's of the same round and index. A shared host whose speed drifts by 20-30 % between runs
    seconds apart moves both terms of a quotient alike. Empty if a probe is 0 (no time measured)."""
    if not _probed(run, base):
        return []
    return [(a / pa[PROBE]) / (b / pb[PROBE])
            for a, pa, b, pb in zip(run["cpu"], run["phases"], base["cpu"], base["phases"])]


def _probed(run: dict, base: dict) -> bool:
    """Whether every epoch of both variants has probe time to divide by."""
    probes = [e[PROBE] for e in run["phases"]] + [e[PROBE] for e in base["phases"]]
    return bool(probes) and min(probes) > 0


def phase_shares(run: dict, base: dict, key: str, phase: str) -> List[float]:
    """Per epoch pair, ``phase``'s time (``key``: ``"phases"`` or ``"parts"``) in this variant minus in sum, each
    over its epoch's :data:`PROBE` time, as a share of sum's epoch over the same: what the phase adds to the
    host-normalised ratio (:func:`host_normalized`)."""
    if not _probed(run, base):
        return []
    return [(ra[phase] / pa[PROBE] - rb[phase] / pb[PROBE]) / (b / pb[PROBE])
            for b, ra, rb, pa, pb in zip(base["cpu"], run[key], base[key], run["phases"], base["phases"])]


def model_share(base: dict) -> float:
    """Median share of sum's epoch CPU time spent in its training steps' forward, backward and optimizer step
    (:data:`TRAINER_PHASES`): what scales the step profile's per-step difference to an epoch ratio with ratios
    measured in the same epochs (absolute step times from the profile and the epochs come from different minutes
    of a host whose speed drifts). Includes Lightning's own work inside ``training_step`` (logging, metrics)."""
    steps = TRAINER_PHASES[:3]
    return median([sum(e[p] for p in steps) / c for e, c in zip(base["phases"], base["cpu"])])


def load_dataset(spec: dict, cache: dict):
    from abp_core.data import get_dataset

    key = spec["first"]
    if key not in cache:
        cache[key] = get_dataset("qm9", max_molecules=key) if key else get_dataset("qm9")
    return cache[key]


#: Where the CPU time of a training epoch goes inside the trainer (:func:`_cpu_clock`), in the order they add up to it.
TRAINER_PHASES = ("forward (training_step)", "backward", "optimizer step", "between steps (loader, logging)",
                  "validation")
#: The readout's own share of those (its forward in training and validation steps; its backward with the head's).
READOUT_PARTS = ("readout forward", "head + readout backward")
#: The host-speed probe: the phase no readout changes (the loader's collation and Lightning's per-step logging).
PROBE = "between steps (loader, logging)"


def _cpu_clock():
    """Lightning callback recording the process's CPU time per epoch (train start to validation end), next
    to the trainer's wall-clock ``epoch_time_s``: with one thread it equals the wall time on an idle
    machine and leaves out the time spent waiting for a CPU; it still grows when another process shares
    the core (SMT siblings) or, in a VM, when the host takes the virtual CPU away (steal).

    Per epoch it also splits that time into :data:`TRAINER_PHASES` by Lightning's hooks (``training_step`` with
    the zeroing of gradients, from ``on_train_batch_start`` to ``on_before_backward``; the backward; the optimizer
    step with ``on_before_optimizer_step``, up to ``on_train_batch_end``; everything between two steps; the
    validation loop), and times the readout's forward (module hooks) and its backward with the head's (from
    ``on_before_backward`` until the gradient of the readout's input is computed). ``phases`` and ``parts`` hold
    one dict of seconds per epoch."""
    from lightning.pytorch.callbacks import Callback

    clk = time.process_time

    class CpuClock(Callback):
        def __init__(self):
            self.times: List[float] = []
            self.phases: List[Dict[str, float]] = []
            self.parts: List[Dict[str, float]] = []
            self._t0 = self._mark = self._fwd = None
            self._phase = None
            self._handles = []

        def _switch(self, phase):  # charge the time since the last mark to the running phase
            now = clk()
            if self._phase is not None and self.phases:
                self.phases[-1][self._phase] += now - self._mark
            self._phase, self._mark = phase, now

        def on_fit_start(self, trainer, pl_module):
            readout = pl_module.model.readout

            def before(module, args):
                self._fwd = clk()

            def after(module, args, out):
                if self._t0 is None or trainer.sanity_checking:
                    return
                self.parts[-1]["readout forward"] += clk() - self._fwd
                x = args[0] if args else None
                if isinstance(x, torch.Tensor) and x.requires_grad:
                    x.register_hook(self._input_grad)

            self._handles = [readout.register_forward_pre_hook(before), readout.register_forward_hook(after)]

        def _input_grad(self, grad):
            self.parts[-1]["head + readout backward"] += clk() - self._mark  # the mark: on_before_backward

        def on_fit_end(self, trainer, pl_module):
            for h in self._handles:
                h.remove()

        def on_train_epoch_start(self, trainer, pl_module):
            self._t0 = clk()
            self.phases.append(dict.fromkeys(TRAINER_PHASES, 0.0))
            self.parts.append(dict.fromkeys(READOUT_PARTS, 0.0))
            self._phase, self._mark = PROBE, self._t0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self._switch("forward (training_step)")

        def on_before_backward(self, trainer, pl_module, loss):
            self._switch("backward")

        def on_after_backward(self, trainer, pl_module):
            self._switch("optimizer step")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self._switch(PROBE)

        def on_validation_epoch_start(self, trainer, pl_module):
            if not trainer.sanity_checking:
                self._switch("validation")

        def on_validation_end(self, trainer, pl_module):
            if self._t0 is not None and not trainer.sanity_checking:
                self._switch(None)
                self.times.append(clk() - self._t0)

    return CpuClock()


def epoch_times(spec: dict, dataset, args, device) -> Dict[str, Dict[str, List[float]]]:
    """Epoch wall and CPU times (s) per variant from interleaved fresh runs of the real trainer, and each epoch's
    CPU time by trainer phase and the readout's part of it (:func:`_cpu_clock`)."""
    import csv
    import importlib
    import logging
    import warnings

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")  # start-up chatter, the same for every readout
    times: Dict[str, Dict[str, list]] = {v[0]: {"wall": [], "cpu": [], "phases": [], "parts": []}
                                         for v in variants(args)}
    root = Path(tempfile.mkdtemp(prefix="abp-epoch-bench-"))
    steps = {}
    try:
        for rnd in range(args.rounds):
            # A B B A: odd rounds run the variants in reverse, so that a host speeding up or slowing down over
            # the run does not favour whichever variant always comes first in a round
            for label, ro, package in (variants(args) if rnd % 2 == 0 else variants(args)[::-1]):
                out = root / f"{label}-{rnd}"
                clock = _cpu_clock()
                run_training = importlib.import_module(f"{package}.train").run_training
                res = run_training(make_config(spec, ro, args.epochs_per_run, str(out), device, package,
                                               args.precision),
                                   dataset=dataset, callbacks=[clock])
                with open(Path(res.run_dir) / "history.csv") as f:
                    rows = list(csv.DictReader(f))
                first = 1 if rnd == 0 else 0  # the very first epoch: warm-up
                times[label]["wall"].extend(float(r["epoch_time_s"]) for r in rows[first:])
                times[label]["cpu"].extend(clock.times[first:])
                times[label]["phases"].extend(clock.phases[first:])
                times[label]["parts"].extend(clock.parts[first:])
                steps[label] = int(rows[0]["global_step"])
                shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return times, steps[args.readouts[0]]


# ------------------------------------------------------------------------------------------------
# Profile of one training step, phase by phase
# ------------------------------------------------------------------------------------------------
PHASES = ("backbone forward", "readout forward", "head + loss", "backward: head + readout", "backward: backbone",
          "optimizer step")


def phase_profile(spec: dict, dataset, args, device, num_batches: int):
    """Median seconds per phase of a training step for each variant (same batches, interleaved)."""
    import importlib

    tasks, opts, tops, flush = {}, {}, {}, {}
    batches = None
    for ro, readout, package in variants(args):
        train = importlib.import_module(f"{package}.train")
        AtomisticDataModule, AtomisticTask = train.AtomisticDataModule, train.AtomisticTask
        cfg = make_config(spec, readout, 1, tempfile.gettempdir(), device, package)
        dm = AtomisticDataModule(cfg, dataset=dataset)
        dm.setup()
        if batches is None:
            batches = [b.to(device) for _, b in zip(range(num_batches), dm.train_dataloader())]
        torch.manual_seed(0)
        task = AtomisticTask(cfg.to_dict(), dm.target_names, dm.target_units, dm.target_mean, dm.target_std,
                             dm.train_elements, dm.target_indices).to(device)
        task.train()
        tasks[ro] = task
        # the trainer's sub-normal setting for the package (a baseline from before it has none: left as it is)
        flush[ro] = getattr(train, "denormals_flushed", None)
        opt = task.configure_optimizers()
        opts[ro] = opt["optimizer"] if isinstance(opt, dict) else opt
        # the head's and readout's parameters, the readout's block standing for its own when the flat layout gave
        # it one (none in a baseline from before blocks); looked up once, outside the timed phases
        blocks = getattr(task._flat, "parameter_blocks", {})
        pool = task.model.readout
        tops[ro] = ([blocks[pool]] if pool in blocks else list(pool.parameters())) + list(task.model.head.parameters())
    res = {v[0]: {p: [] for p in PHASES} for v in variants(args)}
    clock = time.process_time if device.type == "cpu" else time.perf_counter  # CPU: robust to other load

    def run(ro, batch, mark):  # one training step, marking the phases' ends
        task, opt, model = tasks[ro], opts[ro], tasks[ro].model
        opt.zero_grad(set_to_none=True)
        mark()
        h, vec = model.atom_features(batch)
        mark()
        pooled = model.readout(h, vec, dim_size=batch.num_graphs)
        mark()
        loss = torch.nn.functional.l1_loss(model.head(pooled).float(), task.standardize(batch.y.float()))
        mark()
        top = tops[ro]
        gh, *grads = torch.autograd.grad(loss, [h, *top])  # head and readout, parameter gradients included
        for p, g in zip(top, grads):
            p.grad = g
        mark()
        h.backward(gh)
        mark()
        task.on_before_optimizer_step(opt)  # what Lightning calls between the backward and the step
        opt.step()
        mark()

    def step(ro, batch, record):
        marks = []

        def mark():
            synchronize(device)
            marks.append(clock())

        with flush[ro](device.type == "cpu") if flush[ro] else contextlib.nullcontext():
            run(ro, batch, mark)
        if record:
            for name, a, b in zip(PHASES, marks, marks[1:]):
                res[ro][name].append(b - a)

    for i, batch in enumerate(batches):
        for ro, _, _ in variants(args):
            step(ro, batch, record=i > 0)
    return {ro: {p: median(v) for p, v in phases.items()} for ro, phases in res.items()}, batches, tasks


def loader_times(spec: dict, dataset, args, device, passes: int = 5) -> Dict[str, float]:
    """Median seconds of CPU time per batch of one pass over the trainer's training loader (the same for every
    readout), for this package and the baseline's if one is given: passes interleaved, after one warm-up pass."""
    import importlib

    packages = ["abp_core"] + ([BASELINE] if args.baseline else [])
    loaders = {}
    for package in packages:
        train = importlib.import_module(f"{package}.train")
        dm = train.AtomisticDataModule(make_config(spec, "sum", 1, tempfile.gettempdir(), device, package),
                                       dataset=dataset)
        dm.setup()
        loaders[package] = dm.train_dataloader()
    res: Dict[str, List[float]] = {p: [] for p in packages}
    for i in range(passes + 1):
        for package in (packages if i % 2 == 0 else packages[::-1]):
            t0 = time.process_time()
            n = sum(1 for _ in loaders[package])
            if i > 0:
                res[package].append((time.process_time() - t0) / n)
    return {p: median(v) for p, v in res.items()}


def _minor_page_faults() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _reset_peak_resident() -> bool:
    """Reset this process's ``VmHWM`` (Linux ``/proc/self/clear_refs``); ``False`` where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_resident_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def allocator_effect(tasks: dict, batches, rounds: int = 3) -> Dict[str, Dict[str, dict]]:
    """What keeping freed memory (:func:`abp_core.allocator.freed_memory_kept`, as the trainer does on the CPU)
    changes in forward + backward steps (no optimiser step) of the ``sum`` and ``abp`` tasks: per readout and mode
    (``released``: glibc's default, ``kept``) the median CPU ms and minor page faults per step and the peak
    resident MiB over the steps (``VmHWM`` after resetting it; ``nan`` where the kernel does not allow that). The
    modes alternate in ``rounds`` blocks of ten steps, the first four a warm-up, because the setting is
    process-wide and leaving it hands the kept memory back. Sub-normals are flushed, as in training."""
    from abp_core.allocator import freed_memory_kept
    from abp_core.train import denormals_flushed

    out = {ro: {mode: {"ms": [], "faults": [], "peak": []} for mode in ("released", "kept")} for ro in ("sum", "abp")}
    with denormals_flushed(True):
        for r in range(rounds):
            for ro in ("sum", "abp"):
                task = tasks[ro]
                for mode in ("released", "kept") if r % 2 == 0 else ("kept", "released"):
                    with freed_memory_kept(mode == "kept"):
                        can_reset = False
                        for i in range(10):
                            batch = batches[i % len(batches)]  # --quick profiles three
                            if i == 4:
                                can_reset = _reset_peak_resident()
                            t0, f0 = time.process_time(), _minor_page_faults()
                            h, vec = task.model.atom_features(batch)
                            pred = task.model.head(task.model.readout(h, vec, dim_size=batch.num_graphs))
                            torch.nn.functional.l1_loss(pred.float(), task.standardize(batch.y.float())).backward()
                            task.zero_grad(set_to_none=True)
                            if i >= 4:
                                out[ro][mode]["ms"].append((time.process_time() - t0) * 1e3)
                                out[ro][mode]["faults"].append(_minor_page_faults() - f0)
                        out[ro][mode]["peak"].append(_peak_resident_mib() if can_reset else float("nan"))
    return {ro: {mode: {k: median(v) for k, v in d.items()} for mode, d in modes.items()} for ro, modes in out.items()}


def analytic_gflop(spec: dict, batches, heads: int) -> Dict[str, float]:
    """Executed matmul + attention GFLOP of one training step (forward + backward = 3x forward, 2 FLOP per
    multiply-add), mean over ``batches``: SchNet's fast path (filter network per undirected pair, three
    atom-wise linear layers per interaction) and ABP at the trainer's defaults (input projection, 2 SABs
    with q|k|v recomputed in the backward only above ``native_readout.KEEP_QKV_BYTES`` (the default
    ``recompute=None``), PMA with k = 1 on the packed keys, one decoder over one seed
    without q/k, output projection)."""
    from abp_core.graph import radius_graph, undirected_pairs
    from abp_core.native_readout import KEEP_QKV_BYTES

    h, t = spec["hidden"], spec["interactions"]
    out = {"backbone": 0.0, "abp": 0.0}
    for b in batches:
        n, m = b.num_nodes, b.num_graphs
        pairs = undirected_pairs(radius_graph(b.pos, spec["cutoff"], b.batch, 32), n)[0].numel()
        out["backbone"] += 3 * 2 * t * (pairs * (50 * h + h * h) + n * 3 * h * h) / 1e9
        sq = float((torch.bincount(b.batch).double() ** 2).sum())
        fwd = (n * h * h + 2 * (5 * h * h * n + 2 * h * sq) + n * h * h + 2 * heads * h * n + 3 * m * h * h
               + 3 * m * h * h + m * h * h)
        recompute = n * 3 * h * 4 > KEEP_QKV_BYTES
        out["abp"] += (3 * 2 * fwd + (2 * 2 * 3 * h * h * n if recompute else 0)) / 1e9
    return {k: v / len(batches) for k, v in out.items()}


def matmul_floor(spec: dict, batches, device, repeats: int = 5) -> float:
    """Median seconds per training step of ABP's atom-wise matmuls alone, at the profiled batches' shapes, as
    ``torch.mm`` runs them on random data: the input projection, two SABs' ``q|k|v``, output and feed-forward
    layers and the PMA key projection, forward and both backward products (no recomputation; attention,
    element-wise passes and the molecule-level layers left out). No exact float32 implementation of the readout
    on this device can be faster, so ``floor - sum's readout`` bounds ABP's extra cost per step from below."""
    h = spec["hidden"]
    clock = time.process_time if device.type == "cpu" else time.perf_counter
    times = []
    for b in batches:
        n = b.num_nodes
        x, g = torch.randn(n, h, device=device), torch.randn(n, 3 * h, device=device)
        w, w3 = torch.randn(h, h, device=device), torch.randn(3 * h, h, device=device)

        def step():
            for _ in range(6):  # input, 2 x (output, feed-forward), PMA keys: forward, input and weight gradients
                torch.mm(x, w.t()), torch.mm(x, w), torch.mm(x.t(), x)
            for _ in range(2):  # the two SABs' q|k|v
                torch.mm(x, w3.t()), torch.mm(g, w3), torch.mm(g.t(), x)

        step()
        for _ in range(repeats):
            synchronize(device)
            t0 = clock()
            step()
            synchronize(device)
            times.append(clock() - t0)
    return median(times)


def optimizer_layouts(task, device, repeats: int = 40) -> Dict[str, float]:
    """Median seconds of one fused Adam step over ``task``'s parameters (copies, random gradients) in two
    layouts, interleaved: one optimizer entry per parameter tensor, and the trainer's flat layout
    (``abp_core.train.FlatParameters``: one tensor; the time includes gathering the gradients into it)."""
    from abp_core.train import FlatParameters

    clock = time.process_time if device.type == "cpu" else time.perf_counter
    fused = {"fused": True} if device.type in ("cpu", "cuda") else {}
    per = [torch.nn.Parameter(p.detach().clone()) for p in task.parameters()]
    flat = FlatParameters([torch.nn.Parameter(p.detach().clone()) for p in per])
    opts = {"per-parameter": torch.optim.Adam(per, lr=1e-4, **fused),
            "flat": torch.optim.Adam([flat.flat], lr=1e-4, **fused)}
    grads = [torch.randn_like(p) for p in per]
    times: Dict[str, List[float]] = {k: [] for k in opts}
    for i in range(repeats + 1):
        for name, opt in opts.items():
            for p, q, g in zip(per, flat.params, grads):
                (p if name == "per-parameter" else q).grad = g.clone()
            synchronize(device)
            t0 = clock()
            if name == "flat":
                flat.gather_grads()
            opt.step()
            synchronize(device)
            if i:  # the first step allocates the optimizer's state
                times[name].append(clock() - t0)
    return {k: median(v) for k, v in times.items()}


def native_split(task, batches, device, repeats: int = 5):
    """Median seconds per batch of ABP's readout forward + backward in a hot loop, measured two ways, alternating:
    ``(native, module)``. ``native``: its two native calls alone (csrc's ``abp_readout_forward`` and
    ``abp_readout_backward``, on arguments prepared beforehand). ``module``: the module call and autograd's
    backward (``readout(x, batch).backward(g)``), which adds the Python, ctypes and autograd work around the same
    calls. ``None`` unless the readout runs as one native call each way here (CPU, float32, q|k|v kept)."""
    from abp_core import kernels, native_readout
    from abp_core.allocator import freed_memory_kept
    from abp_core.readouts import set_attention_path

    readout = task.model.readout
    if device.type != "cpu" or not kernels.available() or not kernels.has_blas():
        return None
    lib, cases = kernels._lib(), []
    for b in batches:
        x = task.model.atom_features(b)[0].detach().requires_grad_()
        path = set_attention_path(x, readout.hidden_channels, readout.heads, readout.pma._dropout())
        ps = native_readout.parameters(readout, x, path)
        if ps is None or readout.recomputes(x.size(0)):
            return None
        starts, sizes, _ = kernels.batch_table(b.batch.long(), b.num_graphs)
        plan = native_readout._WholePlan(lib, readout, starts, sizes)
        out, (dims, ws, wb, table) = native_readout._whole_forward(plan, x.detach(), ps)
        grads = [torch.empty_like(p) for p in ps]
        gtable = native_readout._int64s([g.data_ptr() for g in grads])
        # the pointer arrays' addresses, taken beforehand (the arrays stay alive in `keep`)
        keep = (dims, table, gtable)
        dims, table, gtable = (native_readout._address(a) for a in keep)
        cases.append((x, b.batch, b.num_graphs, dims, table, gtable, starts, sizes, ws, wb, out, torch.ones_like(out),
                      torch.empty_like(x), grads, keep))

    def native():
        for x, _, _, dims, table, gtable, starts, sizes, ws, wb, out, g, gx, _, _ in cases:
            lib.abp_readout_forward(dims, table, x.data_ptr(), starts.data_ptr(), sizes.data_ptr(), ws.data_ptr(),
                                    wb.data_ptr(), out.data_ptr())
            lib.abp_readout_backward(dims, table, gtable, x.data_ptr(), starts.data_ptr(), sizes.data_ptr(),
                                     ws.data_ptr(), wb.data_ptr(), out.data_ptr(), g.data_ptr(), gx.data_ptr())

    block = readout.__dict__.get("_parameter_block", (None,))[0]  # the trainer's flat layout, when it set one

    def module():
        for x, vec, m, *_, g, _, _, _ in cases:
            x.grad = None
            if block is not None:  # as after a training step's gather_grads: the gradient is taken, not added to
                block.grad = None
            readout(x, vec, dim_size=m).backward(g)

    times = {"native": [], "module": []}
    gc.collect()
    gc.disable()  # a full collection here walks the benchmark's own leftovers (in training: ~0.4 % of an epoch)
    try:
        # freed memory kept, as the trainer runs: otherwise every fresh workspace is page-faulted in (~0.8 ms a batch)
        with freed_memory_kept():
            for i in range(repeats + 1):
                for name, run in (("native", native), ("module", module)):
                    t0 = time.process_time()
                    run()
                    if i:  # the first pass warms both up
                        times[name].append((time.process_time() - t0) / len(cases))
    finally:
        gc.enable()
    for p in [*readout.parameters(), *([block] if block is not None else [])]:  # what the module passes left
        p.grad = None
    return median(times["native"]), median(times["module"])


def operator_profile(task, batches, device, top: int = 12):
    """``torch.profiler`` table of the readout's forward + backward (top operators by self time), and
    its wall time under the profiler spent outside any operator (both include the profiler's own overhead)."""
    from torch.profiler import ProfilerActivity, profile

    readout = task.model.readout
    feats = [(task.model.atom_features(b)[0].detach().requires_grad_(), b.batch, b.num_graphs) for b in batches]

    def run():
        for x, vec, m in feats:
            readout(x, vec, dim_size=m).sum().backward()
        synchronize(device)

    run()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        run()
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    self_total = sum(e.self_cpu_time_total for e in events) / 1e6
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    table = [[e.key[:60], f"{e.count // len(feats)}", f"{e.self_cpu_time_total / len(feats):.0f}",
              f"{100 * e.self_cpu_time_total / 1e6 / self_total:.0f} %"] for e in rows]
    return table, wall / len(feats), self_total / len(feats)


def print_trainer_phases(name: str, times: dict, steps: int, args) -> None:
    """The epochs' CPU time by trainer phase (ms per train step, medians over the epochs), what each phase adds
    over sum's as a share of sum's epoch after dividing out the host's speed, and the host-normalised ratio."""
    labels = [v[0] for v in variants(args)]
    # each variant against the sum of its own package (the label's suffix: "" or "@baseline"), as in the epoch table
    others = [(label, times["sum" + label[len(ro):]]) for label, ro, _ in variants(args) if ro != "sum"]
    rows = []
    for key, phase in [("phases", p) for p in TRAINER_PHASES] + [("parts", p) for p in READOUT_PARTS]:
        cells = [f"{median([e[phase] for e in times[ro][key]]) / steps * 1e3:.2f}" for ro in labels]
        shares = [phase_shares(times[ro], base, key, phase) for ro, base in others]
        rows.append([phase if key == "phases" else f"  of which {phase}", *cells,
                     *(f"{median(v) * 100:+.1f} %" if v else "n/a" for v in shares)])
    total = [f"{median(times[ro]['cpu']) / steps * 1e3:.2f}" for ro in labels]
    normed = [host_normalized(times[ro], base) for ro, base in others]
    rows.append(["= epoch", *total, *(f"{(median(v) - 1) * 100:+.1f} %" if v else "n/a" for v in normed)])
    print(f"\n### {name}: inside the trainer's epochs, phase by phase (CPU ms per train step, median over the "
          f"epochs; the last columns: what the phase adds over sum's, % of sum's epoch, each epoch divided by its "
          f"own between-steps time, which no readout changes)")
    print(fmt_table(["phase", *labels, *(f"{ro} - sum" for ro, _ in others)], rows))
    share = model_share(times["sum"])
    print(f"# sum's training steps (forward, backward, optimizer) are {share:.0%} of its epoch's CPU time "
          f"(median over {len(times['sum']['cpu'])} epochs); the rest is the loader, logging and validation")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model and data (CI smoke run, seconds)")
    ap.add_argument("--configs", nargs="+", default=["quickstart", "paper"], choices=["quickstart", "paper"])
    ap.add_argument("--readouts", nargs="+", default=list(READOUTS), choices=list(READOUTS))
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds of fresh runs (default 3; quick 1)")
    ap.add_argument("--epochs-per-run", type=int, default=None, help="epochs per run (default 2; quick 2)")
    ap.add_argument("--paper-molecules", type=int, default=4000,
                    help="QM9 molecules (fixed random subset) of the paper-like configuration (default 4000)")
    ap.add_argument("--profile-batches", type=int, default=None, help="training steps profiled (default 20)")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--precision", default="32-true", choices=PRECISIONS,
                    help="the trainer's precision for the epochs (default 32-true); the step profile and its floors "
                         "time float32 steps, so with any other precision they are skipped")
    ap.add_argument("--baseline", metavar="DIR",
                    help="also time sum and ABP with an older copy of the package in DIR/abp_core (e.g. "
                         "`git archive <rev> abp_core | tar -x -C DIR`), interleaved with the current one")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    add_device_argument(ap)
    args = ap.parse_args(argv)
    if "sum" not in args.readouts:
        ap.error("--readouts must include sum (the ratios are to sum)")
    device = resolve_device(args.device)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.epochs_per_run = args.epochs_per_run or 2
    if args.rounds == 1 and args.epochs_per_run < 2:
        ap.error("one round needs at least 2 epochs per run (the first epoch is a warm-up)")
    profile_batches = args.profile_batches or (3 if args.quick else 20)
    if args.baseline:
        load_baseline(args.baseline)
    torch.set_num_threads(args.threads)
    print("# One training epoch (train + validation) with abp_core.train.run_training: sum vs WA vs ABP")
    print(f"# {machine_line(args.threads, device)}")
    if args.precision != "32-true":
        args.no_profile = True
        print(f"# trainer precision {args.precision}: the step profile and its floors (float32 steps) are skipped")
    cache: dict = {}
    summary = []
    for name, spec in configs(args).items():
        t0 = time.perf_counter()
        dataset = load_dataset(spec, cache)
        times, steps = epoch_times(spec, dataset, args, device)
        rows = []
        for ro, readout, package in variants(args):
            suffix = ro[len(readout):]  # "" or "@baseline": each variant's ratio is to the sum of its own package
            base = {k: median(times["sum" + suffix][k]) for k in ("wall", "cpu")}
            wall, cpu = times[ro]["wall"], times[ro]["cpu"]
            t, c = median(wall), median(cpu)
            # each epoch over the sum epoch of the same round and index (run seconds apart): robust to the
            # machine's speed drifting between rounds (a shared host), where the ratio of medians is not
            ratios = [a / b for a, b in zip(cpu, times["sum" + suffix]["cpu"])]
            paired, (q1, q3), ci = median(ratios), quartiles(ratios), interval_text(ratios)
            rows.append([name, ro, f"{t:.2f}", f"{min(wall):.2f}", f"{max(wall):.2f}", len(wall),
                         f"{t / steps * 1e3:.1f}", f"{t / base['wall']:.3f}x", f"{c:.2f}",
                         f"{c / base['cpu']:.3f}x", f"{paired:.3f}x", f"{q1:.3f}-{q3:.3f}", ci])
            if readout != "sum":
                hn = host_normalized(times[ro], times["sum" + suffix])
                host = ""
                if hn:
                    (h1, h3) = quartiles(hn)
                    host = (f", host-normalised {median(hn):.3f}x, quartiles {h1:.3f}-{h3:.3f}, "
                            f"95 % CI {interval_text(hn)}")
                summary.append(f"{name} {ro} {t / base['wall']:.3f}x (CPU time {c / base['cpu']:.3f}x, "
                               f"paired {paired:.3f}x, quartiles {q1:.3f}-{q3:.3f}, 95 % CI of the median {ci}{host})")
        if args.baseline:
            for ro in ("sum", "abp"):
                if ro in args.readouts:
                    now, was = (median(times[k]["wall"]) for k in (ro, f"{ro}@baseline"))
                    cnow, cwas = (median(times[k]["cpu"]) for k in (ro, f"{ro}@baseline"))
                    summary.append(f"{name} {ro} epoch now / baseline {now / was:.3f}x (CPU time {cnow / cwas:.3f}x)")
        mols = spec["first"] or spec["subset"]
        print(f"\n## {name}: QM9 {'first' if spec['first'] else 'random subset of'} {mols} molecules (80/10/10), "
              f"SchNet {spec['hidden']}/{spec['hidden']}/{spec['interactions']}, cutoff {spec['cutoff']:g} A, "
              f"batch {spec['batch']}, ABP {spec['abp'] or 'defaults'}, precision {args.precision}; "
              f"{steps} train steps per epoch; {args.rounds} round(s) x {args.epochs_per_run} epochs "
              f"({time.perf_counter() - t0:.0f} s)")
        print(fmt_table(["config", "readout", "median epoch s", "min s", "max s", "epochs", "ms / train step",
                         "vs sum", "median CPU s", "CPU vs sum", "CPU vs sum, paired", "paired: quartiles",
                         "paired: 95 % CI of median"], rows))
        print_trainer_phases(name, times, steps, args)
        if args.no_profile or "abp" not in args.readouts:
            continue
        # glibc's allocator keeps freed memory for the whole profile, as the trainer does during `fit` (the
        # setting is process-wide: a baseline's steps run with it too)
        from abp_core.allocator import freed_memory_kept

        with freed_memory_kept(device.type == "cpu"):
            phases, batches, tasks = phase_profile(spec, dataset, args, device, profile_batches)
        labels = [v[0] for v in variants(args)]
        diffs = [s for s in ("", "@baseline") if f"abp{s}" in phases and f"sum{s}" in phases]
        for ro in labels:
            phases[ro]["= model step"] = sum(phases[ro].values())
        prow = []
        for p in PHASES + ("= model step",):
            cells = [f"{phases[ro][p] * 1e3:.2f}" for ro in labels]
            prow.append([p, *cells, *(f"{(phases['abp' + s][p] - phases['sum' + s][p]) * 1e3:+.2f}" for s in diffs)])
        print(f"\n### {name}: one training step phase by phase (ms of {'CPU' if device.type == 'cpu' else 'wall'} "
              f"time, median of {len(batches) - 1} steps, interleaved)")
        print(fmt_table(["phase", *labels, *(f"abp{s} - sum{s}" for s in diffs)], prow))
        gf = analytic_gflop(spec, batches, spec["abp"].get("heads", 8))
        t_bb = phases["sum"]["backbone forward"] + phases["sum"]["backward: backbone"]
        t_ro = phases["abp"]["readout forward"] + phases["abp"]["backward: head + readout"]
        print(f"# analytic GFLOP per training step (fwd+bwd): backbone {gf['backbone']:.3f} "
              f"({gf['backbone'] / t_bb:.0f} GFLOP/s), ABP readout {gf['abp']:.3f} ({gf['abp'] / t_ro:.0f} GFLOP/s): "
              f"ABP's arithmetic is {gf['abp'] / gf['backbone']:.0%} of the backbone's")
        floor = matmul_floor(spec, batches, device)
        # readout + head backward of sum: what ABP's readout replaces, plus the (shared) head
        sum_ro = phases["sum"]["readout forward"] + phases["sum"]["backward: head + readout"]
        # a per-step difference from the profile as a share of sum's epoch: relative to sum's model step in the
        # same profile, times the model step's share of sum's epoch measured in the epochs (ratios only: the
        # profile and the epochs ran minutes apart on a host whose speed drifts)
        share = model_share(times["sum"])
        per_step = phases["sum"]["= model step"] / share
        bound = max(floor - sum_ro, 0.0)
        print(f"# ABP's atom-wise matmuls alone (torch.mm at the same shapes): {floor * 1e3:.2f} ms per step; ABP's "
              f"readout (forward, backward with the head's) {t_ro * 1e3:.2f} ms, sum's {sum_ro * 1e3:.2f} ms; so any exact "
              f"float32 ABP costs at least {bound * 1e3:.2f} ms per step more than sum here: an epoch ratio of at least "
              f"{1 + bound / per_step:.3f}x (sum's model step {phases['sum']['= model step'] * 1e3:.2f} ms is "
              f"{share:.0%} of its epoch)")
        split = native_split(tasks["abp"], batches, device)
        if split is not None:
            native, module = split
            extra = phases["abp"]["= model step"] - phases["sum"]["= model step"]
            # without that work: the step's difference less the work (when the host drift makes it come out
            # negative, nothing is taken off); not clamped at 1, so that it is never above the prediction with it
            # (a small model's difference can come out below zero)
            without = 1 + (extra - max(module - native, 0.0)) / per_step
            print(f"# ABP's readout forward + backward in a hot loop, alternating: its two native calls alone "
                  f"{native * 1e3:.2f} ms per batch, through the module and autograd {module * 1e3:.2f} ms: the work "
                  f"around the native calls is {(module - native) * 1e3:.2f} ms; the step profile's ABP - sum "
                  f"{extra * 1e3:+.2f} ms per step predicts an epoch ratio of about {1 + extra / per_step:.3f}x, "
                  f"{without:.3f}x without that work")
        passes = 5
        loading = loader_times(spec, dataset, args, device, passes)
        now = loading["abp_core"]
        was = (f", baseline {loading[BASELINE] * 1e3:.2f} ms (now / baseline {now / loading[BASELINE]:.3f}x)"
               if BASELINE in loading else "")
        print(f"# data loading (the trainer's training loader, CPU time of one pass per batch, median of {passes} "
              f"passes): {now * 1e3:.2f} ms{was}; {now / per_step:.0%} of sum's epoch per train step, the same for "
              f"every readout")
        for ro in ("sum", "abp"):
            layouts, tensors = optimizer_layouts(tasks[ro], device), len(list(tasks[ro].parameters()))
            print(f"# fused Adam step of the {ro} model's {tensors} parameter tensors: one entry per tensor "
                  f"{layouts['per-parameter'] * 1e6:.0f} us, the trainer's flat layout (gradients gathered, one tensor) "
                  f"{layouts['flat'] * 1e6:.0f} us: {(layouts['per-parameter'] - layouts['flat']) / tensors * 1e6:.1f} us "
                  f"per tensor saved")
        if device.type == "cpu":
            effect = allocator_effect(tasks, batches)
            for ro, modes in effect.items():
                rel, kep = modes["released"], modes["kept"]
                print(f"# freed memory kept (glibc, as the trainer runs on the CPU), {ro}, forward + backward per "
                      f"step: {rel['faults']:.0f} -> {kep['faults']:.0f} page faults, "
                      f"{rel['ms']:.2f} -> {kep['ms']:.2f} ms CPU ({kep['ms'] / rel['ms']:.3f}x), "
                      f"peak resident {rel['peak']:.0f} -> {kep['peak']:.0f} MiB")
        table, wall, inside = operator_profile(tasks["abp"], batches, device)
        print(f"\n### {name}: ABP readout forward + backward per batch under torch.profiler: {wall * 1e3:.2f} ms "
              f"wall, {inside * 1e3:.2f} ms inside operators (self time; Python inside an autograd.Function "
              f"counts as its self time); outside any operator: {max(wall - inside, 0) * 1e3:.2f} ms")
        print(fmt_table(["operator", "calls / batch", "self us / batch", "share"], table))
    print("\nSUMMARY epoch: " + "; ".join(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
