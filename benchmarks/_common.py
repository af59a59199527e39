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

#: The package name an older copy of abp_core is imported under (``--baseline DIR`` of epoch.py and attention.py).
BASELINE = "abp_core_baseline"


def load_baseline(folder: str) -> None:
    """Import ``folder/abp_core`` (an older copy of the package, e.g. ``git archive <rev> abp_core | tar -x -C
    folder``) as the package ``abp_core_baseline``, next to the current one (its imports are relative; its native
    kernels are built from its own ``csrc``)."""
    import importlib.util

    init = Path(folder).expanduser().resolve() / "abp_core" / "__init__.py"
    if not init.is_file():
        raise SystemExit(f"--baseline {folder}: no abp_core/__init__.py there")
    spec = importlib.util.spec_from_file_location(BASELINE, init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[BASELINE] = module
    spec.loader.exec_module(module)


def interleaved(fns: Dict[str, Callable[[], None]], repeats: int, warmup: int = 1,
                device: torch.device = torch.device("cpu")) -> Dict[str, List[float]]:
    """Wall-clock seconds of each callable, run alternately ``repeats`` times after ``warmup`` rounds
    (on a GPU ``device`` each call is timed to the end of its queued work)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - t0)
    return times


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu`` (every script's ``--device`` default)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_device_argument(parser) -> None:
    """``--device`` on a benchmark script's parser (default :func:`default_device`)."""
    parser.add_argument("--device", default=default_device(),
                        help="device to run on, e.g. cpu, cuda, cuda:1 (default: cuda when available, else cpu)")


def resolve_device(name: str) -> torch.device:
    """``--device``'s value as a :class:`torch.device`; a clear error when it does not exist here."""
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise SystemExit(f"--device: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine (torch {torch.__version__})")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device {name}: the benchmarks run on cpu or cuda")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work (timings of asynchronous CUDA calls); a no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def matmul_peak(n: int = 2048, repeats: int = 5, device: torch.device = torch.device("cpu")) -> Dict[str, float]:
    """This device's dense-matmul GFLOP/s (fp32 and bf16, ``n x n @ n x n``, best of ``repeats``)."""
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        a @ b
        best = min(_timed(lambda: a @ b, device) for _ in range(repeats))
        out[name] = 2 * n ** 3 / best / 1e9
    return out


def _timed(fn, device: torch.device = torch.device("cpu")) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def _status_kib(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1))


def measure_step_memory(setup: Callable[[], Callable[[], None]], warmup: bool = True,
                        device: torch.device = torch.device("cpu")) -> Dict[str, float]:
    """Peak extra resident memory (MiB) of one call of the step built by ``setup`` (see module doc);
    on a GPU ``device`` the peak extra device memory of the caching allocator instead.

    ``warmup=False`` measures the first step (for steps that take many seconds; one-time set-up
    costs are a few MiB, negligible against the GiB measured then)."""
    import gc

    step = setup()
    if device.type == "cuda":
        if warmup:
            step()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return {"peak_mib": (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20,
                "method": "cuda max_memory_allocated"}
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


def machine_line(threads: int, device: torch.device = torch.device("cpu")) -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    gpu = f", device {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ", device cpu"
    return (f"torch {torch.__version__}, {threads} threads, {os.cpu_count()} CPUs, "
            f"load average {load:.2f} at start{gpu}")


def fmt_table(headers: List[str], rows: List[List[str]]) -> str:
    """A GitHub-markdown table (also readable in a terminal)."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(str(c).rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])
