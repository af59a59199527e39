"""Shared helpers of the benchmark scripts: interleaved timing, peak memory, matmul peak, FLOPs.

Timing: implementations are run alternately (A, B, A, B, ...) after a warm-up, and the
median of each is reported together with the ratio of the medians, so that load from
other processes on a shared machine hits both sides alike.

Peak memory (CPU): each measurement runs in a *fresh subprocess* started with
``MALLOC_MMAP_THRESHOLD_=65536``. A fixed threshold switches off glibc's adaptive one,
so every block of 64 KiB or more (every sizeable tensor) is its own ``mmap`` and goes
back to the OS when freed: the resident set then follows the live tensors. The child
sets up, runs one warm-up step (lazy initialisations, thread pools), drops gradients,
resets the kernel's high-water mark (``echo 5 > /proc/self/clear_refs``), records its
resident set, runs one measured step and reports ``VmHWM - VmRSS_before``: the peak
*extra* memory of one step (activations, gradients, workspaces), excluding the model
and the inputs that exist before the step. Without ``clear_refs`` (non-Linux) it falls
back to ``ru_maxrss`` growth without a warm-up.
"""
from __future__ import annotations

import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def interleaved(fns: Dict[str, Callable[[], None]], repeats: int, warmup: int = 1) -> Dict[str, List[float]]:
    """Wall-clock seconds of each callable, run alternately ``repeats`` times after ``warmup`` rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def matmul_peak(n: int = 2048, repeats: int = 5) -> Dict[str, float]:
    """This machine's dense-matmul GFLOP/s (fp32 and bf16, ``n x n @ n x n``, best of ``repeats``)."""
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        a @ b
        best = min(_timed(lambda: a @ b) for _ in range(repeats))
        out[name] = 2 * n ** 3 / best / 1e9
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _status_kib(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1))


def measure_step_memory(setup: Callable[[], Callable[[], None]], warmup: bool = True) -> Dict[str, float]:
    """Peak extra resident memory (MiB) of one call of the step built by ``setup`` (see module doc).

    ``warmup=False`` measures the first step (for steps that take many seconds; one-time set-up
    costs are a few MiB, negligible against the GiB measured then)."""
    import gc

    step = setup()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        resettable = True
    except OSError:
        resettable = False
    if resettable:
        if warmup:
            step()
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_kib("VmRSS")
        step()
        peak = _status_kib("VmHWM")
        method = "VmHWM-reset"
    else:  # pragma: no cover - non-Linux
        gc.collect()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        step()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        method = "ru_maxrss"
    return {"peak_mib": (peak - before) / 1024, "method": method}


def run_child(script: Path, args: List[str], timeout: float = 600) -> Dict:
    """Run ``script`` with ``args`` in a fresh interpreter (memory env set); parse its last stdout line as JSON."""
    env = dict(os.environ, **MEMORY_ENV)
    env.setdefault("PYTHONPATH", str(ROOT))
    proc = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine_line(threads: int) -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"torch {torch.__version__}, {threads} threads, {os.cpu_count()} CPUs, "
            f"load average {load:.2f} at start")


def fmt_table(headers: List[str], rows: List[List[str]]) -> str:
    """A GitHub-markdown table (also readable in a terminal)."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(str(c).rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])
