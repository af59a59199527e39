"""Benchmark: ABP forward + backward time and peak memory against molecule size (10 to 1,000 atoms).

A *fixed small batch* of 8 molecules, all of the same size n, width 256, 16 heads, 2 encoder
blocks, k = 1, 1 decoder block, no input/output projection. Variants: our ABP with SABs (the
paper), our ABP with ISABs (``num_induced_points=16``: memory linear in n), and PyG's
``SetTransformerAggregation`` for reference. Time: median of interleaved runs; memory: peak extra
resident memory of one step in a fresh process (see ``_common.py``). The SAB's attention is
O(n^2) in time; with flash attention its memory is O(n) too, so the ISAB's advantage shows in time
at large n. One summary line at the end: growth exponents of time and memory between the two
largest sizes (1 = linear, 2 = quadratic).

    .venv/bin/python benchmarks/scaling.py            # n = 10 ... 1000 (~2-3 min)
    .venv/bin/python benchmarks/scaling.py --quick    # n = 10, 40 at width 64 (~15 s)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import (add_device_argument, fmt_table, interleaved, machine_line, matmul_peak,  # noqa: E402
                     measure_step_memory, median, resolve_device, run_child)
from readout import build as build_sab, executed_gflop, make_step  # noqa: E402

IMPLS = ("ours SAB", "ours ISAB", "pyg SAB")
INDUCED = 16


def build(impl: str, channels: int, heads: int):
    from abp_core.readouts import AttentionPooling

    if impl == "ours SAB":
        return build_sab("ours", channels, heads)
    if impl == "pyg SAB":
        return build_sab("pyg", channels, heads)
    torch.manual_seed(0)
    return AttentionPooling(channels, heads=heads, num_encoder_blocks=2, num_seeds=1, num_decoder_blocks=1,
                            input_projection=False, output_projection=False, num_induced_points=INDUCED)


def inputs(n: int, molecules: int, channels: int):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n * molecules, channels, generator=g)
    return x, torch.arange(molecules).repeat_interleave(n)


def gflop(impl: str, n: int, molecules: int, c: int, heads: int) -> float:
    sizes = [n] * molecules
    if impl != "ours ISAB":
        return executed_gflop("pyg" if impl.startswith("pyg") else "ours", sizes, c, heads)
    rows, m, k = n * molecules, INDUCED, 1
    # per ISAB: MAB(I, X) on packed keys (scores + pooling: 2 H m C per atom, V per molecule: m C^2,
    # feed-forward m 2C^2 per molecule), MAB(X, H): q + out + lin (3 C^2 per atom), k/v on m rows
    # per molecule (2 m C^2), attention 2 n m C per molecule
    isab = rows * (2 * heads * m * c + 3 * c * c + 2 * m * c) + molecules * (5 * m * c * c)
    pma = c * c * rows + 2 * k * heads * c * rows + k * c * c * molecules
    macs = 2 * isab + pma + 2 * k * c * c * molecules + 5 * k * c * c * molecules
    return 3 * 2 * macs / 1e9


def child(args) -> None:
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    x, batch = (t.to(device) for t in inputs(args.child_n, args.molecules, args.channels))
    model = build(args.child_impl, args.channels, args.heads).to(device)
    print(json.dumps(measure_step_memory(lambda: make_step(model, x, batch, False)[0], device=device)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sizes", type=int, nargs="+", default=None)
    ap.add_argument("--molecules", type=int, default=8, help="molecules per batch (fixed; default 8)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--no-memory", action="store_true")
    add_device_argument(ap)
    ap.add_argument("--child-impl", help=argparse.SUPPRESS)
    ap.add_argument("--child-n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--channels", type=int, default=None)
    ap.add_argument("--heads", type=int, default=None)
    args = ap.parse_args(argv)
    args.channels = args.channels or (64 if args.quick else 256)
    args.heads = args.heads or (4 if args.quick else 16)
    if args.child_impl:
        child(args)
        return 0
    sizes = args.sizes or ([10, 40] if args.quick else [10, 30, 100, 300, 1000])
    repeats = args.repeats or (2 if args.quick else 3)
    torch.set_num_threads(args.threads)
    print(f"# ABP fwd+bwd vs molecule size: fixed batch of {args.molecules} equal-size molecules, width "
          f"{args.channels}, {args.heads} heads, 2 encoder blocks (SAB or ISAB with {INDUCED} induced points)")
    device = resolve_device(args.device)
    print(f"# {machine_line(args.threads, device)}")
    peak = matmul_peak(1024 if args.quick else 2048, device=device)
    print(f"# matmul peak (2048^2): fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s")
    rows, res = [], {}
    for n in sizes:
        x, batch = (t.to(device) for t in inputs(n, args.molecules, args.channels))
        steps = {impl: make_step(build(impl, args.channels, args.heads).to(device), x, batch, False)[0]
                 for impl in IMPLS}
        times = interleaved(steps, repeats, device=device)
        for impl in IMPLS:
            mem = float("nan")
            if not args.no_memory:
                mem = run_child(Path(__file__), ["--child-impl", impl, "--child-n", str(n), "--molecules",
                                                 str(args.molecules), "--channels", str(args.channels), "--heads",
                                                 str(args.heads), "--threads", str(args.threads), "--device",
                                                 args.device])["peak_mib"]
            t = median(times[impl])
            gf = gflop(impl, n, args.molecules, args.channels, args.heads)
            res[impl, n] = (t, mem)
            rows.append([n, impl, f"{t * 1e3:.1f}", f"{mem:.1f}", f"{1e3 * t / n:.3f}", f"{mem / n:.3f}",
                         f"{gf:.2f}", f"{gf / t:.0f}"])
    print(fmt_table(["atoms/mol", "impl", "median ms", "peak MiB", "ms per atom/mol", "MiB per atom/mol",
                     "GFLOP", "GFLOP/s"], rows))
    import math

    mid, hi = sizes[-2], sizes[-1]
    parts = []
    for impl in IMPLS:  # growth exponents between the two largest sizes: 1 = linear, 2 = quadratic
        (t0, m0), (t1, m1) = res[impl, mid], res[impl, hi]
        parts.append(f"{impl} n {mid}->{hi}: time ~n^{math.log(t1 / t0) / math.log(hi / mid):.2f}, "
                     f"memory ~n^{math.log(m1 / m0) / math.log(hi / mid):.2f}")
    sab, isab = res["ours SAB", hi], res["ours ISAB", hi]
    parts.append(f"at n={hi} ISAB/SAB time {isab[0] / sab[0]:.2f}, memory {isab[1] / sab[1]:.2f}")
    print("SUMMARY scaling: " + "; ".join(parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
