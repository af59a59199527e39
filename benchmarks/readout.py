"""Benchmark: ABP readout (ours) vs PyG's SetTransformerAggregation, forward + backward.

Both in the same configuration (width 256, 16 heads, 2 encoder SABs, k = 1 seed, 1 decoder
SAB, no input/output projection), the same weights and the same inputs: a batch of 128
molecules with uniformly drawn sizes, QM9-like (9-29 atoms) and QMugs-like (40-228 atoms).
One step = forward, ``sum()`` of the output, backward (parameter and input gradients).

Four implementations: PyG, ours with ``recompute=True``, ours with ``recompute=False`` (the default
below 16 MiB of q|k|v per SAB), and ours with the
native kernels switched off (PyTorch's flash attention per block: what ``abp_core.kernels``
replaces). Prints, per size distribution: median step time of each (interleaved runs), the
speed-up (ratio of medians, and of minima: PyG's large allocations make its timings noisy),
peak extra memory of one step (fresh subprocess per measurement, see ``_common.py``),
executed GFLOP (analytic count of matmuls and attention) and achieved GFLOP/s next to this
machine's 2048^2 matmul peak, and whether outputs and gradients agree (fp32 ``allclose``).
Ends with one summary line.

    .venv/bin/python benchmarks/readout.py            # full run (~2-3 min)
    .venv/bin/python benchmarks/readout.py --quick    # CI-size smoke run (~20 s)
    .venv/bin/python benchmarks/readout.py --bf16     # also bf16 autocast rows (not exact)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import (add_device_argument, fmt_table, interleaved, machine_line, matmul_peak,  # noqa: E402
                     measure_step_memory, median, resolve_device, run_child)

DISTRIBUTIONS = {"qm9": (9, 29), "qmugs": (40, 228)}
IMPLS = ("pyg", "ours", "ours-fast", "ours-flash")
LABELS = {"pyg": "PyG", "ours": "ours (recompute=True)", "ours-fast": "ours (recompute=False)",
          "ours-flash": "ours, PyTorch flash attention"}


class WithoutNativeKernels(torch.nn.Module):
    """Our readout with the native kernels switched off: PyTorch's CPU flash attention per block of
    equal-size molecules and PyTorch element-wise ops (what the native kernel replaces)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, batch):
        from abp_core import kernels
        with kernels.disabled():
            return self.inner(x, batch)


def copy_set_transformer_weights(ours, ref) -> None:
    """Load PyG ``SetTransformerAggregation`` weights into an equally configured ``AttentionPooling``."""
    def copy_mab(dst, src):
        dst.in_proj_weight.data.copy_(src.attn.in_proj_weight)
        dst.in_proj_bias.data.copy_(src.attn.in_proj_bias)
        dst.out_proj.load_state_dict(src.attn.out_proj.state_dict())
        dst.lin.load_state_dict(src.lin.state_dict())
        if src.layer_norm1 is not None:
            dst.norm1.load_state_dict(src.layer_norm1.state_dict())
            dst.norm2.load_state_dict(src.layer_norm2.state_dict())

    for d, s in zip(ours.encoders, ref.encoders):
        copy_mab(d, s.mab)
    for d, s in zip(ours.decoders, ref.decoders):
        copy_mab(d, s.mab)
    copy_mab(ours.pma, ref.pma.mab)
    ours.pma_lin.load_state_dict(ref.pma.lin.state_dict())
    ours.seeds.data.copy_(ref.pma.seed)


def build(impl: str, channels: int, heads: int, seed: int = 0):
    from torch_geometric.nn.aggr import SetTransformerAggregation

    from abp_core.readouts import AttentionPooling

    torch.manual_seed(seed)
    ref = SetTransformerAggregation(channels, num_seed_points=1, num_encoder_blocks=2, num_decoder_blocks=1,
                                    heads=heads, concat=False, layer_norm=False)
    if impl == "pyg":
        return ref
    ours = AttentionPooling(channels, heads=heads, num_encoder_blocks=2, num_seeds=1, num_decoder_blocks=1,
                            input_projection=False, output_projection=False, recompute=impl != "ours-fast")
    copy_set_transformer_weights(ours, ref)
    return WithoutNativeKernels(ours) if impl == "ours-flash" else ours


def make_inputs(dist: str, batch_size: int, channels: int, seed: int = 0):
    lo, hi = DISTRIBUTIONS[dist]
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(lo, hi + 1, (batch_size,), generator=g)
    batch = torch.repeat_interleave(torch.arange(batch_size), sizes)
    x = torch.randn(int(sizes.sum()), channels, generator=g)
    return x, batch, sizes.tolist()


def make_step(model, x, batch, bf16: bool):
    x = x.clone().requires_grad_(True)

    def step():
        x.grad = None
        for p in model.parameters():
            p.grad = None
        ctx = torch.autocast(x.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with ctx:
            out = model(x, batch)
        out.float().sum().backward()
    return step, x


def executed_gflop(impl: str, sizes, c: int, heads: int, k: int = 1, n_enc: int = 2, n_dec: int = 1) -> float:
    """Analytic FLOPs of one forward + backward (3x forward) of matmuls and attention, as executed."""
    m = len(sizes)
    if impl == "pyg":  # dense padded batch
        n_max = max(sizes)
        rows, sq = m * n_max, m * n_max ** 2
        pma = c * c * rows + 2 * c * c * rows + k * c * c * m + 2 * k * n_max * c * m
    else:  # packed atoms; PMA keys/values projected per molecule (see AttentionPooling)
        rows, sq = sum(sizes), sum(n * n for n in sizes)
        pma = c * c * rows + 2 * k * heads * c * rows + k * c * c * m
    macs = n_enc * (5 * c * c * rows + 2 * c * sq) + pma + 2 * k * c * c * m + n_dec * (5 * k * c * c * m + 2 * k * k * c * m)
    # ours (recompute=True) recomputes q|k|v of each SAB in the backward (3 C^2 per atom)
    recompute = n_enc * 3 * c * c * rows if impl in ("ours", "ours-flash") else 0
    return (3 * 2 * macs + 2 * recompute) / 1e9


def agreement(models, x, batch, sizes, fp64_molecules: int = 32):
    """Does each of ours compute the same function as PyG's? fp32 outputs ``allclose`` on the whole
    batch; outputs and input gradients in float64 on the first ``fp64_molecules`` molecules agree to
    1e-10 (relative). Returns ``{impl: (same, text)}``.

    fp32 *gradients* are not compared directly: both implementations' fp32 input gradients
    differ from the float64 ones by ~1e-3 (relative) at QMugs sizes (cancellation in the
    backward pass), so equality there is a property of fp32, not of the implementation.
    """
    outs = {impl: models[impl](x, batch).detach() for impl in IMPLS}
    n = sum(sizes[:fp64_molecules])
    res = {}
    for impl in IMPLS:
        m = models[impl].double()
        xi = x[:n].double().requires_grad_(True)
        out = m(xi, batch[:n])
        out.sum().backward()
        res[impl] = (out.detach(), xi.grad)
        for p in m.parameters():
            p.grad = None
        m.float()
    checks = {}
    for impl in IMPLS[1:]:
        out_diff = (outs[impl] - outs["pyg"]).abs().max().item()
        same32 = bool(torch.allclose(outs[impl], outs["pyg"], rtol=1e-5, atol=1e-5))
        rel = [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(res[impl], res["pyg"])]
        checks[impl] = (same32 and max(rel) < 1e-10, f"{out_diff:.1e}; {rel[0]:.0e}, {rel[1]:.0e}")
    return checks


def child(args) -> None:
    """Memory measurement of one implementation in this (fresh) process; prints JSON."""
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    x, batch, _ = make_inputs(args.child_dist, args.batch_size, args.channels)
    x, batch = x.to(device), batch.to(device)
    model = build(args.child_impl, args.channels, args.heads).to(device)

    def setup():
        return make_step(model, x, batch, args.child_bf16)[0]
    print(json.dumps(measure_step_memory(setup, device=device)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny CI-size run (~20 s)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per implementation (default 5)")
    ap.add_argument("--batch-size", type=int, default=None, help="molecules per batch (default 128)")
    ap.add_argument("--channels", type=int, default=256)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--dists", nargs="+", default=list(DISTRIBUTIONS), choices=list(DISTRIBUTIONS))
    ap.add_argument("--bf16", action="store_true", help="also time bf16 autocast (not exact; reported separately)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    add_device_argument(ap)
    ap.add_argument("--child-impl", help=argparse.SUPPRESS, choices=IMPLS)
    ap.add_argument("--child-dist", help=argparse.SUPPRESS)
    ap.add_argument("--child-bf16", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.batch_size = args.batch_size or 16
        args.repeats = args.repeats or 2
        args.channels, args.heads = 64, 4
    args.batch_size = args.batch_size or 128
    args.repeats = args.repeats or 5
    if args.child_impl:
        child(args)
        return 0

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    print(f"# ABP readout forward+backward: ours vs PyG SetTransformerAggregation "
          f"(batch {args.batch_size}, width {args.channels}, {args.heads} heads, 2 SAB + PMA(k=1) + 1 SAB)")
    print(f"# {machine_line(args.threads, device)}" + ("; the native kernels are CPU-only: on a GPU all three of "
                                                       "ours run the padded path" if device.type != "cpu" else ""))
    peak = matmul_peak(1024 if args.quick else 2048, device=device)
    print(f"# matmul peak (2048^2): fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s")
    rows, summary = [], []
    variants = [("fp32", False)] + ([("bf16", True)] if args.bf16 else [])
    for dist in args.dists:
        x, batch, sizes = make_inputs(dist, args.batch_size, args.channels)
        x, batch = x.to(device), batch.to(device)
        models = {impl: build(impl, args.channels, args.heads).to(device) for impl in IMPLS}
        checks = agreement(models, x, batch, sizes)
        for vname, bf16 in variants:
            steps = {impl: make_step(models[impl], x, batch, bf16)[0] for impl in IMPLS}
            times = interleaved(steps, args.repeats, device=device)
            mem = {}
            if not args.no_memory:
                for impl in (IMPLS[:2] if args.quick else IMPLS):
                    extra = ["--child-impl", impl, "--child-dist", dist, "--batch-size", str(args.batch_size),
                             "--channels", str(args.channels), "--heads", str(args.heads),
                             "--threads", str(args.threads), "--device", args.device] + \
                        (["--child-bf16"] if bf16 else [])
                    mem[impl] = run_child(Path(__file__), extra)["peak_mib"]
            t = {impl: median(times[impl]) for impl in IMPLS}
            gf = {impl: executed_gflop(impl, sizes, args.channels, args.heads) for impl in IMPLS}
            for impl in IMPLS:
                ours = impl != "pyg"
                rows.append([dist, vname, LABELS[impl], f"{min(sizes)}-{max(sizes)}", sum(sizes),
                             f"{t[impl] * 1e3:.0f}", f"{min(times[impl]) * 1e3:.0f}",
                             f"{mem[impl]:.0f}" if impl in mem else "-", f"{gf[impl]:.1f}",
                             f"{gf[impl] / t[impl]:.0f}", f"{t['pyg'] / t[impl]:.2f}x" if ours else "",
                             f"{min(times['pyg']) / min(times[impl]):.2f}x" if ours else "",
                             (f"{mem[impl] / mem['pyg']:.2f}" if impl in mem else "-") if ours else "",
                             ("yes" if checks[impl][0] else "NO") + f" ({checks[impl][1]})"
                             if ours and vname == "fp32" else ""])
                if ours:
                    summary.append(f"{dist}/{vname}/{LABELS[impl]} {t['pyg'] / t[impl]:.2f}x time "
                                   f"({min(times['pyg']) / min(times[impl]):.2f}x of minima)" +
                                   (f", {mem[impl] / mem['pyg']:.2f} memory" if impl in mem else "") +
                                   ((", identical" if checks[impl][0] else ", NOT IDENTICAL") if vname == "fp32"
                                    else ""))
    print(fmt_table(["sizes", "dtype", "impl", "atoms/mol", "atoms", "median ms", "min ms", "peak MiB",
                     "GFLOP", "GFLOP/s", "speed-up", "speed-up (min)", "mem / PyG", "same numbers (fp32 out diff; fp64 out, grad rel diff)"], rows))
    print(f"# peak MiB: extra resident memory of one step in a fresh process (see benchmarks/_common.py); "
          f"GFLOP/s: executed analytic FLOPs / median time; matmul peak fp32 {peak['fp32']:.0f} GFLOP/s")
    print("SUMMARY readout: " + "; ".join(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
