"""Benchmark: ABP's per-molecule self-attention alone: native kernel, PyTorch's CPU flash attention per
block, and the padded path (one masked attention call for the batch).

The attention of one SAB on a packed batch of 128 molecules (width 256, 16 heads, head dimension 16),
forward and backward, for QM9-like (9-29 atoms) and QMugs-like (40-228) sizes:

* ``native``: ``abp_core.kernels`` (one call for the batch, q|k|v bias added on the fly, bias gradient
  returned; CPU only);
* ``flash`` (``blocks`` on a GPU): the per-block calls of PyTorch's flash-attention kernels that the
  native kernel replaces (size-sorted batch, bias added beforehand, gradient summed afterwards) -- on a
  GPU :func:`torch.nn.functional.scaled_dot_product_attention` per block of equal-size molecules;
* ``padded``: :func:`abp_core.readouts.padded_self_attention` (ABP's CUDA path): ``[M, n_max]`` padded
  sets, one ``scaled_dot_product_attention`` call with a key mask, autograd backward.

Same inputs, interleaved runs, medians; prints achieved GFLOP/s (of the useful, unpadded FLOPs) next to
the device's matmul peak, the largest relative difference to the first row (outputs, q|k|v gradients),
and one summary line. ``set_attention_path`` in ``abp_core/readouts.py`` picks the path from these
measurements on CPU.

``--baseline DIR`` (CPU) adds ``native@baseline``: the native kernel of an older copy of the package
(``DIR/abp_core``, its kernel built from its own ``csrc``), interleaved with the current one, and prints whether
their outputs and gradients are bitwise equal: how a change to the kernel is judged (same numbers, time ratio
measured side by side).

    .venv/bin/python benchmarks/attention.py           # ~30 s
    .venv/bin/python benchmarks/attention.py --quick   # CI-size smoke run
    git archive HEAD abp_core | tar -x -C /tmp/base && .venv/bin/python benchmarks/attention.py --baseline /tmp/base
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import (BASELINE, add_device_argument, fmt_table, interleaved, load_baseline, machine_line,  # noqa: E402
                     matmul_peak, median, resolve_device)

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
    from abp_core.readouts import SetLayout, _flash_backward, _flash_forward, packed_self_attention, \
        padded_self_attention

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny CI-size run")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (default 15)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--baseline", metavar="DIR",
                    help="also time the native kernel of an older copy of the package in DIR/abp_core (e.g. "
                         "`git archive <rev> abp_core | tar -x -C DIR`), interleaved with the current one (CPU)")
    add_device_argument(ap)
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    if args.baseline and device.type != "cpu":
        ap.error("--baseline compares native kernels, which run on the CPU only")
    batch, channels, heads = (16, 64, 4) if args.quick else (128, 256, 16)
    repeats = args.repeats or (2 if args.quick else 15)
    torch.set_num_threads(args.threads)
    cpu = device.type == "cpu"
    if cpu and not kernels.available():
        print(f"SUMMARY attention: native kernel unavailable ({kernels.unavailable_reason()})")
        return 1
    impls = ("flash", "native", "padded") if cpu else ("blocks", "padded")
    old_kernel = None
    if args.baseline:
        load_baseline(args.baseline)
        old_kernel = importlib.import_module(f"{BASELINE}.kernels")
        if not old_kernel.available():
            print(f"SUMMARY attention: the baseline's native kernel is unavailable ({old_kernel.unavailable_reason()})")
            return 1
        impls = ("flash", "native", "native@baseline", "padded")
    print(f"# per-molecule self-attention of one SAB, forward + backward: {', '.join(impls)} "
          f"(batch {batch}, width {channels}, {heads} heads)")
    print(f"# {machine_line(args.threads, device)}" + ("" if cpu else "; the native kernel is CPU-only"))
    peak = matmul_peak(1024 if args.quick else 2048, device=device)
    print(f"# matmul peak (2048^2): fp32 {peak['fp32']:.0f} GFLOP/s")
    rows, summary, same = [], [], []
    for dist in DISTRIBUTIONS:
        qkv, go, bias, blocks, sizes = problem(dist, batch, channels)
        qkv, go, bias = qkv.to(device), go.to(device), bias.to(device)
        biased = qkv + bias
        vec = torch.repeat_interleave(torch.arange(batch), torch.tensor(sorted(sizes))).to(device)
        padded_layout = SetLayout(vec, batch, path="padded")  # the sorted rows, in their (packed) order
        blocks_layout = SetLayout(vec, batch)
        fns, results = {}, {}

        def autograd_pair(name, fn):
            """Forward and backward callables of an autograd attention ``fn(qkv)``; results for the check."""
            leaf = biased.detach().requires_grad_(True)
            state = {}

            def fwd():
                state["out"] = fn(leaf)

            def bwd():
                (g,) = torch.autograd.grad(state["out"], leaf, go, retain_graph=True)
                state["grad"] = g

            fwd(), bwd()
            results[name] = (state["out"].detach(), state["grad"])
            fns[f"{name} fwd"], fns[f"{name} bwd"] = fwd, bwd

        if cpu:
            table = kernels.molecule_table(blocks)
            grad = torch.empty_like(qkv)
            out, lse = kernels.attention_forward(qkv, table, heads, bias=bias)
            flash_out, lses = _flash_forward(biased, blocks, heads)
            flash_grad = _flash_backward(go, biased, flash_out, lses, blocks, heads, torch.empty_like(qkv))
            native_grad, sums = kernels.attention_backward(go, qkv, out, lse, table, heads, grad.clone(), bias=bias,
                                                           column_sums=True)
            results["flash"], results["native"] = (flash_out, flash_grad), (out, native_grad)
            staged = torch.empty_like(qkv)  # the flash path's bias pass, into a reused buffer (no page faults)
            fns["native fwd"] = lambda: kernels.attention_forward(qkv, table, heads, bias=bias)
            fns["native bwd"] = lambda: kernels.attention_backward(go, qkv, out, lse, table, heads, grad, bias=bias,
                                                                   column_sums=True)
            fns["flash fwd"] = lambda: _flash_forward(torch.add(qkv, bias, out=staged), blocks, heads)
            fns["flash bwd"] = lambda: _flash_backward(go, biased, flash_out, lses, blocks, heads, grad).sum(0)
            if old_kernel is not None:  # the baseline's kernel on the same inputs, into its own buffers
                old_table, old_grad = old_kernel.molecule_table(blocks), torch.empty_like(qkv)
                old_out, old_lse = old_kernel.attention_forward(qkv, old_table, heads, bias=bias)
                old_grad, old_sums = old_kernel.attention_backward(go, qkv, old_out, old_lse, old_table, heads,
                                                                   old_grad, bias=bias, column_sums=True)
                results["native@baseline"] = (old_out.clone(), old_grad.clone())
                same.append(f"{dist} " + str(all(torch.equal(a, b) for a, b in zip(
                    (out, lse, native_grad, sums), (old_out, old_lse, old_grad, old_sums)))))
                fns["native@baseline fwd"] = lambda: old_kernel.attention_forward(qkv, old_table, heads,
                                                                                  out=old_out, bias=bias)
                fns["native@baseline bwd"] = lambda: old_kernel.attention_backward(
                    go, qkv, old_out, old_lse, old_table, heads, old_grad, bias=bias, column_sums=True)
        else:
            autograd_pair("blocks", lambda t: packed_self_attention(t, blocks_layout, heads, force_generic=True))
        autograd_pair("padded", lambda t: padded_self_attention(t, padded_layout, heads))
        first = impls[0]
        diff = {name: max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(results[name], results[first]))
                for name in impls[1:]}
        times = interleaved(fns, repeats, device=device)
        t = {k: median(v) for k, v in times.items()}
        fwd_gflop = 4 * channels * sum(n * n for n in sizes) / 1e9  # QK^T and PV
        base = t[f"{first} fwd"] + t[f"{first} bwd"]
        for impl in impls:
            total = t[f"{impl} fwd"] + t[f"{impl} bwd"]
            rows.append([dist, impl, f"{t[f'{impl} fwd'] * 1e3:.1f}", f"{t[f'{impl} bwd'] * 1e3:.1f}",
                         f"{fwd_gflop / t[f'{impl} fwd']:.0f}", f"{2.5 * fwd_gflop / t[f'{impl} bwd']:.0f}",
                         f"{base / total:.2f}x" if impl != first else "", f"{diff[impl]:.1e}" if impl != first else ""])
        summary.append(f"{dist} " + ", ".join(
            f"{impl} {base / (t[f'{impl} fwd'] + t[f'{impl} bwd']):.2f}x" for impl in impls[1:]) + f" vs {first}")
        if old_kernel is not None:  # paired: the two kernels ran one after the other in every repeat
            now, was = ([f + b for f, b in zip(times[f"{k} fwd"], times[f"{k} bwd"])]
                        for k in ("native", "native@baseline"))
            summary.append(f"{dist} native time / native@baseline {median([a / b for a, b in zip(now, was)]):.3f}x "
                           f"(paired; forward {t['native fwd'] / t['native@baseline fwd']:.3f}x, backward "
                           f"{t['native bwd'] / t['native@baseline bwd']:.3f}x by the medians)")
    print(fmt_table(["sizes", "kernel", "fwd ms", "bwd ms", "fwd GFLOP/s", "bwd GFLOP/s",
                     f"speed-up vs {impls[0]} (fwd+bwd)", "max rel diff"], rows))
    if same:
        print("# native vs native@baseline, outputs, log-sum-exps, gradients and bias gradients bitwise equal: "
              + ", ".join(same))
    print(f"# GFLOP: 4 C sum(n^2) forward, 2.5x that backward (recomputed scores); matmul peak fp32 "
          f"{peak['fp32']:.0f} GFLOP/s" + ("; flash times include adding the bias and summing its gradient" if cpu
                                           else ""))
    print("SUMMARY attention: " + "; ".join(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
