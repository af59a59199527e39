"""Smoke tests: every benchmark script runs end to end in its --quick mode and prints its summary line.

The scripts' ``main`` functions run in this process (no interpreter start-up per script); the
fresh-process peak-memory measurement is exercised once, by the readout benchmark.
"""
import importlib
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    yield lambda name: importlib.import_module(name)
    sys.path.remove(str(BENCH))


@pytest.mark.parametrize("script,args", [
    ("readout", ["--quick", "--dists", "qm9"]),  # with the fresh-process memory measurement
    ("scaling", ["--quick", "--no-memory"]),
    ("attention", ["--quick"]),
    ("train_step", ["--quick", "--no-memory", "--no-bf16"]),
    ("train_step", ["--quick", "--no-memory", "--no-bf16", "--backbones", "schnet", "--flush-denormal"]),
    ("fast_path_accuracy", ["--quick", "--seeds", "0", "--variants", "stock fp32", "ours fp32"]),
    ("predict", ["--quick"]),  # abp predict from SMILES with a shipped model, MMFF and xTB geometries
    ("explain", ["--quick", "--readouts", "sum,abp"]),  # every attribution method and faithfulness
])
def test_benchmark_quick(bench, script, args, capsys):
    # one thread: tiny problems on a busy shared machine are otherwise dominated by thread hand-offs
    import torch

    from abp_core import kernels

    if script == "attention" and not kernels.available():
        pytest.skip(f"native kernels unavailable: {kernels.unavailable_reason()}")

    threads = torch.get_num_threads()
    try:
        assert bench(script).main(args + ["--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert (torch.tensor([1e-40]) * 1.0).item() != 0.0  # sub-normals not flushed: FP state restored
    out = capsys.readouterr().out
    summary = [line for line in out.splitlines() if line.startswith("SUMMARY")]
    assert len(summary) == 1 and out.rstrip().endswith(summary[0]), out
    assert "NOT IDENTICAL" not in out and "| NO (" not in out and "OUTSIDE" not in out, out
