"""Benchmark: one optimiser step (forward, loss, backward, Adam) of SchNet + ABP and DimeNet++ + ABP.

Ours (fast backbone path, our ABP, optionally bf16 autocast and/or ``torch.compile``) against
the stock path: PyG's SchNet / DimeNet++ forward (with our radius graph and triplets, as pyg-lib
and torch-sparse are unavailable) + PyG's ``SetTransformerAggregation`` + the same MLP head, fp32.
Both get the same weights and the same batch of real QM9 molecules (seeded random sample of the
embedded dataset), loss = MAE on the HOMO energy.

Configurations: SchNet 128 hidden, 128 filters, 6 interactions, cutoff 10 A; DimeNet++ at the paper's
defaults (256 hidden, 6 blocks, cutoff 5 A); ABP with the backbone's width, 2 SABs, k = 1, 1 decoder
SAB, no input/output projection (as PyG's aggregation), 8 heads (SchNet) / 16 heads (DimeNet++).

Prints molecules/second (median of interleaved steps), speed-up, peak extra memory of one step
(fresh subprocess, see ``_common.py``), executed GFLOP/s against the matmul peak, and the agreement
with the stock path (fp32: allclose predictions and gradients; bf16: relative L2 error of the predictions
at most 1e-1 -- bf16 keeps ~3 significant digits, and six interactions accumulate that to a few per cent;
whether that matters for accuracy is what ``fast_path_accuracy.py`` checks). One summary line.

    .venv/bin/python benchmarks/train_step.py               # default run (~4 min; DimeNet++ steps are slow)
    .venv/bin/python benchmarks/train_step.py --quick       # CI smoke run (tiny models)
    .venv/bin/python benchmarks/train_step.py --compile     # also torch.compile variants (slow to compile)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import (add_device_argument, fmt_table, interleaved, machine_line, matmul_peak,  # noqa: E402
                     measure_step_memory, median, resolve_device, run_child)
from readout import copy_set_transformer_weights, executed_gflop as abp_gflop  # noqa: E402

HOMO = 2  # QM9 target column (eV)


def config(backbone: str, quick: bool) -> dict:
    if backbone == "schnet":
        bb = dict(hidden_channels=32, num_filters=32, num_interactions=2) if quick else \
            dict(hidden_channels=128, num_filters=128, num_interactions=6)
        return dict(backbone=bb, width=bb["hidden_channels"], heads=4 if quick else 8)
    bb = dict(hidden_channels=32, num_blocks=2, int_emb_size=16, basis_emb_size=4, out_emb_channels=32,
              num_spherical=3, num_radial=3) if quick else dict()
    return dict(backbone=bb, width=bb.get("hidden_channels", 256), heads=4 if quick else 16)


def load_batch(num_molecules: int, seed: int = 0):
    from torch_geometric.data import Batch

    from abp_core.data import get_dataset

    ds = get_dataset("qm9")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds), generator=g)[:num_molecules].tolist()
    return Batch.from_data_list([ds[i] for i in idx])


def build(backbone: str, variant: str, quick: bool, seed: int = 0):
    """``stock`` or ``ours`` model with identical weights (seeded)."""
    from torch_geometric.nn.aggr import SetTransformerAggregation

    from abp_core.models import BACKBONES, AtomisticModel, MLPHead
    from abp_core.readouts import AttentionPooling

    cfg = config(backbone, quick)
    fast = variant != "stock"
    torch.manual_seed(seed)
    extra = dict(checkpoint=False) if variant == "ours-nockpt" else {}
    net = BACKBONES[backbone](**cfg["backbone"], fast=fast, **extra)
    ref = SetTransformerAggregation(cfg["width"], num_seed_points=1, num_encoder_blocks=2, num_decoder_blocks=1,
                                    heads=cfg["heads"], concat=False)
    head = MLPHead(cfg["width"], 1)
    if not fast:
        return AtomisticModel(net, ref, head)
    pool = AttentionPooling(cfg["width"], heads=cfg["heads"], num_encoder_blocks=2, num_seeds=1, num_decoder_blocks=1,
                            input_projection=False, output_projection=False)
    copy_set_transformer_weights(pool, ref)
    model = AtomisticModel(net, pool, head)
    if "compile" in variant:
        model.backbone.compile_interactions()
    return model


VARIANTS = {  # name -> (model kind, bf16 autocast)
    "stock fp32": ("stock", False),
    "ours fp32": ("ours", False),
    "ours bf16": ("ours", True),
    "ours fp32 no-ckpt": ("ours-nockpt", False),  # DimeNet++ without activation checkpointing
    "ours compile fp32": ("ours-compile", False),
    "ours compile bf16": ("ours-compile", True),
}


def make_step(model, batch, bf16: bool):
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    target = batch.y[:, HOMO]

    def step():
        opt.zero_grad(set_to_none=True)
        ctx = torch.autocast(batch.pos.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with ctx:
            pred = model(batch)[:, 0]
        loss = (pred.float() - target).abs().mean()
        loss.backward()
        opt.step()
    return step


def agreement(models, batch, bf16_variants):
    """fp32: predictions and loss gradients of ``ours`` vs ``stock`` (allclose); bf16: relative error."""
    target = batch.y[:, HOMO]
    res = {}
    for name in ("stock", "ours"):
        m = models[name]
        m.zero_grad()
        pred = m(batch)[:, 0]
        (pred - target).abs().mean().backward()
        grads = torch.cat([p.grad.flatten() for p in m.backbone.parameters()])
        res[name] = (pred.detach(), grads)
        m.zero_grad()
    pred_diff = ((res["ours"][0] - res["stock"][0]).abs().max() / res["stock"][0].abs().max()).item()
    grad_diff = ((res["ours"][1] - res["stock"][1]).abs().max() / res["stock"][1].abs().max()).item()
    same = pred_diff < 1e-5 and grad_diff < 1e-3
    out = {"fp32": (same, f"pred {pred_diff:.0e}, grad {grad_diff:.0e}")}
    if bf16_variants:  # stated tolerance: relative L2 error of the predictions <= 1e-1
        with torch.no_grad(), torch.autocast(batch.pos.device.type, dtype=torch.bfloat16):
            pred16 = models["ours"](batch)[:, 0].float()
        err = ((pred16 - res["stock"][0]).norm() / res["stock"][0].norm()).item()
        out["bf16"] = (err < 1e-1, f"pred rel L2 err {err:.1e}, tol 1e-1")
    return out


def backbone_gflop(backbone: str, batch, quick: bool, fast: bool, checkpoint: bool = True) -> float:
    """Executed analytic GFLOP of the backbone's matmuls: forward + backward = 3x forward, plus one more
    forward of the blocks for DimeNet++'s fast path with activation checkpointing."""
    from abp_core.graph import radius_graph, triplets, undirected_pairs

    cfg = config(backbone, quick)["backbone"]
    n = batch.num_nodes
    if backbone == "schnet":
        h, f, t = cfg["hidden_channels"], cfg["num_filters"], cfg["num_interactions"]
        ei = radius_graph(batch.pos, 10.0, batch.batch, 32)
        rows = undirected_pairs(ei, n)[0].numel() if fast else ei.size(1)
        macs = t * (rows * (50 * f + f * f) + n * (h * f + f * h + h * h))
        return 3 * 2 * macs / 1e9
    h = cfg.get("hidden_channels", 256)
    ie, be, oe = cfg.get("int_emb_size", 64), cfg.get("basis_emb_size", 8), cfg.get("out_emb_channels", 256)
    blocks = cfg.get("num_blocks", 6)
    ei = radius_graph(batch.pos, 5.0, batch.batch, 32)
    e = ei.size(1)
    tr = triplets(ei, n)[2].numel()
    ns, nr = cfg.get("num_spherical", 7), cfg.get("num_radial", 6)
    inter = e * (2 * h * h + nr * be + be * h + h * ie + ie * h + 7 * h * h) + tr * (ns * nr * be + be * ie)
    outb = e * nr * h + n * (h * oe + 3 * oe * oe + oe * h)
    emb = e * (nr * h + 3 * h * h)
    passes = 4 if fast and checkpoint else 3
    return passes * 2 * (blocks * inter + (blocks + 1) * outb + emb) / 1e9


def child(args) -> None:
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    batch = load_batch(args.batch_size).to(device)
    kind, bf16 = VARIANTS[args.child_variant]
    model = build(args.child_backbone, kind, args.quick).to(device)
    print(json.dumps(measure_step_memory(lambda: make_step(model, batch, bf16),
                                         warmup=args.child_backbone == "schnet", device=device)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny models and batch (~20 s)")
    ap.add_argument("--backbones", nargs="+", default=["schnet", "dimenet++"], choices=["schnet", "dimenet++"])
    ap.add_argument("--batch-size", type=int, default=None, help="molecules per step (default 128)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed steps per variant after one warm-up round (default 5; DimeNet++ 1: a stock "
                         "DimeNet++ step takes ~20 s)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--compile", action="store_true", help="also time torch.compile variants (compile time reported)")
    ap.add_argument("--warm-cache", action="store_true",
                    help="with --compile: reuse torch.compile's on-disk caches (default: time a cold compile)")
    ap.add_argument("--no-bf16", action="store_true", help="skip the bf16 autocast variant")
    ap.add_argument("--flush-denormal", action="store_true",
                    help="flush sub-normal floats to zero (FTZ/DAZ) for every variant, stock included: "
                         "the speed-up without our explicit flush in the Gaussian features")
    ap.add_argument("--no-memory", action="store_true")
    add_device_argument(ap)
    ap.add_argument("--no-ckpt", action="store_true",
                    help="also DimeNet++'s fast path without activation checkpointing (slow: ~7 GB)")
    ap.add_argument("--child-backbone", help=argparse.SUPPRESS)
    ap.add_argument("--child-variant", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.batch_size = args.batch_size or (16 if args.quick else 128)
    if args.child_variant:
        child(args)
        return 0
    if args.flush_denormal:  # before the first parallel region: OpenMP workers inherit the FP state
        if not torch.set_flush_denormal(True):
            ap.error("--flush-denormal: this CPU does not support flushing denormals")
    try:
        return benchmark(args)
    finally:
        if args.flush_denormal:  # leave the calling process (e.g. pytest) as it was
            torch.set_flush_denormal(False)


def benchmark(args) -> int:
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    print(f"# Training step (forward+loss+backward+Adam) on {args.batch_size} QM9 molecules: ours vs stock"
          + (" (all variants with sub-normals flushed to zero)" if args.flush_denormal else ""))
    print(f"# {machine_line(args.threads, device)}")
    peak = matmul_peak(1024 if args.quick else 2048, device=device)
    print(f"# matmul peak (2048^2): fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s")
    batch = load_batch(args.batch_size).to(device)
    sizes = torch.bincount(batch.batch).tolist()
    names = ["stock fp32", "ours fp32"] + ([] if args.no_bf16 else ["ours bf16"])
    if args.compile:
        names += ["ours compile fp32"] + ([] if args.no_bf16 else ["ours compile bf16"])
    rows, summary = [], []
    all_names = names
    for backbone in args.backbones:
        cfg = config(backbone, args.quick)
        names = [n for n in all_names if "compile" not in n or backbone == "schnet"]
        models = {"stock": build(backbone, "stock", args.quick).to(device),
                  "ours": build(backbone, "ours", args.quick).to(device)}
        if backbone == "dimenet++" and args.no_ckpt:
            names = names[:2] + ["ours fp32 no-ckpt"] + names[2:]
            models["ours-nockpt"] = build(backbone, "ours-nockpt", args.quick).to(device)
        check = agreement(models, batch, not args.no_bf16)
        compile_s = None
        if args.compile and backbone == "schnet":
            if not args.warm_cache:  # measure a cold compile: fresh on-disk cache, no in-memory caches
                import os
                import tempfile

                from torch._functorch import config as functorch_config
                from torch._inductor import config as inductor_config

                os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="abp-inductor-")
                inductor_config.fx_graph_cache = False
                functorch_config.enable_autograd_cache = False
            models["ours-compile"] = build(backbone, "ours-compile", args.quick).to(device)
            t0 = time.perf_counter()
            for bf16 in ([False] if args.no_bf16 else [False, True]):
                make_step(models["ours-compile"], batch, bf16)()  # first call compiles
                make_step(models["ours-compile"], batch, bf16)()  # dynamic-shape recompile, if any
            compile_s = time.perf_counter() - t0
        steps = {n: make_step(models[VARIANTS[n][0]], batch, VARIANTS[n][1]) for n in names}
        repeats = args.repeats or (2 if args.quick else (5 if backbone == "schnet" else 1))
        times = interleaved(steps, repeats, device=device)
        mem = {}
        if not args.no_memory:
            for n in names:
                mem[n] = run_child(Path(__file__), ["--child-backbone", backbone, "--child-variant", n,
                                                    "--batch-size", str(args.batch_size), "--threads",
                                                    str(args.threads), "--device", args.device]
                                   + (["--quick"] if args.quick else []),
                                   timeout=1800)["peak_mib"]
        t_stock = median(times["stock fp32"])
        for n in names:
            t = median(times[n])
            fast = n != "stock fp32"
            gf = backbone_gflop(backbone, batch, args.quick, fast, "no-ckpt" not in n) + abp_gflop(
                "ours" if fast else "pyg", sizes, cfg["width"], cfg["heads"])
            agree = ""
            if fast:
                ok, txt = check["bf16" if VARIANTS[n][1] else "fp32"]
                agree = ("yes" if ok else "NO") + f" ({txt})"
            rows.append([backbone, n, f"{args.batch_size / t:.0f}", f"{t * 1e3:.0f}", f"{min(times[n]) * 1e3:.0f}",
                         f"{t_stock / t:.2f}x" if fast else "1.00x", f"{mem[n]:.0f}" if mem else "-",
                         f"{mem[n] / mem['stock fp32']:.2f}" if mem and fast else "", f"{gf:.0f}", f"{gf / t:.0f}",
                         agree])
            if fast:
                summary.append(f"{backbone} {n} {t_stock / t:.2f}x" +
                               (f" ({mem[n]:.0f} MiB)" if mem else ""))
        if mem:
            summary.append(f"{backbone} stock peak {mem['stock fp32']:.0f} MiB")
        if compile_s is not None:
            print(f"# {backbone}: torch.compile warm-up (first steps, fp32{'' if args.no_bf16 else ' + bf16'}, "
                  f"{'warm' if args.warm_cache else 'cold'} caches) took {compile_s:.0f} s")
    print(fmt_table(["backbone", "variant", "molecules/s", "median ms", "min ms", "speed-up", "peak MiB",
                     "mem vs stock", "GFLOP", "GFLOP/s", "same as stock"], rows))
    print(f"# {args.batch_size} molecules, {sum(sizes)} atoms; GFLOP: executed matmul FLOPs (analytic, fwd+bwd); "
          f"peak MiB: extra resident memory of one step (fresh process)")
    print("SUMMARY train_step: " + "; ".join(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
