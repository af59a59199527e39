"""Benchmark: ABP's per-molecule self-attention alone, native kernel vs PyTorch's CPU flash attention.

The attention of one SAB on a packed, size-sorted batch of 128 molecules (width 256, 16 heads,
head dimension 16), forward and backward, for QM9-like (9-29 atoms) and QMugs-like (40-228)
sizes: ``abp_core.kernels`` (one call for the batch, q|k|v bias added on the fly, bias gradient
returned) against the per-block calls of PyTorch's flash-attention kernels that it replaces
(bias added beforehand, gradient summed afterwards, as the flash path does). Same inputs,
interleaved runs, medians; prints achieved GFLOP/s next to the machine's matmul peak, the
largest relative difference between the two (outputs, q|k|v gradients, bias gradients), and one
summary line.

    .venv/bin/python benchmarks/attention.py           # ~30 s
    .venv/bin/python benchmarks/attention.py --quick   # CI-size smoke run
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import fmt_table, interleaved, machine_line, matmul_peak, median  # noqa: E402

DISTRIBUTIONS = {"qm9": (9, 29), "qmugs": (40, 228)}


def problem(dist: str, batch_size: int, channels: int, seed: int = 0):
    from abp_core.readouts import SetLayout

    lo, hi = DISTRIBUTIONS[dist]
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(lo, hi + 1, (batch_size,), generator=g)
    layout = SetLayout(torch.repeat_interleave(torch.arange(batch_size), sizes), batch_size)
    n = int(sizes.sum())
    qkv, go, bias = torch.randn(n, 3 * channels, generator=g), torch.randn(n, channels, generator=g), \
        torch.randn(3 * channels, generator=g)
    return qkv, go, bias, layout.buckets, sizes.tolist()


def main(argv=None) -> int:
    from abp_core import kernels
    from abp_core.readouts import _flash_backward, _flash_forward

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny CI-size run")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (default 15)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args(argv)
    batch, channels, heads = (16, 64, 4) if args.quick else (128, 256, 16)
    repeats = args.repeats or (2 if args.quick else 15)
    torch.set_num_threads(args.threads)
    if not kernels.available():
        print(f"SUMMARY attention: native kernel unavailable ({kernels.unavailable_reason()})")
        return 1
    print(f"# per-molecule self-attention of one SAB, forward + backward: native kernel vs PyTorch flash "
          f"(batch {batch}, width {channels}, {heads} heads)")
    print(f"# {machine_line(args.threads)}")
    peak = matmul_peak(1024 if args.quick else 2048)
    print(f"# matmul peak (2048^2): fp32 {peak['fp32']:.0f} GFLOP/s")
    rows, summary = [], []
    for dist in DISTRIBUTIONS:
        qkv, go, bias, blocks, sizes = problem(dist, batch, channels)
        table = kernels.molecule_table(blocks)
        grad = torch.empty_like(qkv)
        out, lse = kernels.attention_forward(qkv, table, heads, bias=bias)
        biased = qkv + bias
        flash_out, lses = _flash_forward(biased, blocks, heads)
        flash_grad = _flash_backward(go, biased, flash_out, lses, blocks, heads, torch.empty_like(qkv))
        native_grad, sums = kernels.attention_backward(go, qkv, out, lse, table, heads, grad, bias=bias,
                                                       column_sums=True)
        diff = max(((a - b).abs().max() / b.abs().max()).item()
                   for a, b in ((out, flash_out), (native_grad, flash_grad), (sums, flash_grad.sum(0))))
        staged = torch.empty_like(qkv)  # the flash path's bias pass, into a reused buffer (no page faults)

        def native_fwd():
            kernels.attention_forward(qkv, table, heads, bias=bias)

        def native_bwd():
            kernels.attention_backward(go, qkv, out, lse, table, heads, grad, bias=bias, column_sums=True)

        def flash_fwd():
            _flash_forward(torch.add(qkv, bias, out=staged), blocks, heads)

        def flash_bwd():
            _flash_backward(go, biased, flash_out, lses, blocks, heads, grad).sum(0)

        times = interleaved({"native fwd": native_fwd, "flash fwd": flash_fwd, "native bwd": native_bwd,
                             "flash bwd": flash_bwd}, repeats)
        t = {k: median(v) for k, v in times.items()}
        fwd_gflop = 4 * channels * sum(n * n for n in sizes) / 1e9  # QK^T and PV
        for impl in ("flash", "native"):
            total = t[f"{impl} fwd"] + t[f"{impl} bwd"]
            rows.append([dist, impl, f"{t[f'{impl} fwd'] * 1e3:.1f}", f"{t[f'{impl} bwd'] * 1e3:.1f}",
                         f"{fwd_gflop / t[f'{impl} fwd']:.0f}", f"{2.5 * fwd_gflop / t[f'{impl} bwd']:.0f}",
                         f"{(t['flash fwd'] + t['flash bwd']) / total:.2f}x" if impl == "native" else "",
                         f"{diff:.1e}" if impl == "native" else ""])
        summary.append(f"{dist} {(t['flash fwd'] + t['flash bwd']) / (t['native fwd'] + t['native bwd']):.2f}x "
                       f"(fwd {t['flash fwd'] / t['native fwd']:.2f}x, bwd {t['flash bwd'] / t['native bwd']:.2f}x)")
    print(fmt_table(["sizes", "kernel", "fwd ms", "bwd ms", "fwd GFLOP/s", "bwd GFLOP/s", "speed-up (fwd+bwd)",
                     "max rel diff"], rows))
    print(f"# GFLOP: 4 C sum(n^2) forward, 2.5x that backward (recomputed scores); matmul peak fp32 "
          f"{peak['fp32']:.0f} GFLOP/s; flash times include adding the bias and summing its gradient")
    print("SUMMARY attention: native vs flash " + "; ".join(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
