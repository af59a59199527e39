"""Accuracy check of the fast paths: short QM9 HOMO training runs, stock path vs ours, same seeds.

Each variant trains SchNet + ABP (the train_step configuration) from the same initial weights,
on the same split and in the same batch order, with a plain PyTorch loop (Adam, L1 loss on the
standardised HOMO energy), and reports the test MAE (eV) per seed. The fast path is accepted if
its mean test MAE lies within the noise of the fp32 stock path: the difference of the means is
at most two standard errors, ``2 sqrt(s_stock^2 / n + s_ours^2 / n)`` over the ``n`` seeds.

Why seeds and not one run: even the exact fp32 fast path differs from the stock path by float
round-off (different summation orders), and training amplifies any such difference
exponentially (parameters differ by ~1e-7 after 10 steps, ~1e-3 after 50): after a few hundred
steps two runs are as different as two seeds, so only the spread over seeds says what "the
same" means.

    .venv/bin/python benchmarks/fast_path_accuracy.py                 # ~5 min: 2,000 molecules, 3 seeds
    .venv/bin/python benchmarks/fast_path_accuracy.py --seeds 0 1     # 2 seeds
    .venv/bin/python benchmarks/fast_path_accuracy.py --quick         # smoke run (~15 s)
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import add_device_argument, fmt_table, machine_line, resolve_device, synchronize  # noqa: E402
from train_step import HOMO, build  # noqa: E402

VARIANTS = {"stock fp32": ("stock", False), "ours fp32": ("ours", False), "ours bf16": ("ours", True)}


def load(num_molecules: int, seed: int = 0):
    from abp_core.data import get_dataset

    ds = get_dataset("qm9")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds), generator=g)[:num_molecules].tolist()
    mols = [ds[i] for i in idx]
    n_test = n_val = num_molecules // 10
    return mols[n_test + n_val:], mols[n_val:n_val + n_test], mols[:n_val]


def run(variant: str, seed: int, train, test, epochs: int, batch_size: int, lr: float, quick: bool,
        device: torch.device = torch.device("cpu")) -> dict:
    from torch_geometric.loader import DataLoader

    kind, bf16 = VARIANTS[variant]
    model = build("schnet", kind, quick, seed=seed).to(device)
    y = torch.cat([m.y[:, HOMO] for m in train])
    mean, std = y.mean(), y.std()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loader = DataLoader(train, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    ctx = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    t0 = time.perf_counter()
    model.train()
    for _ in range(epochs):
        for batch in loader:
            batch = batch.to(device)
            opt.zero_grad(set_to_none=True)
            with ctx():
                pred = model(batch)[:, 0]
            loss = (pred.float() - (batch.y[:, HOMO] - mean.to(device)) / std.to(device)).abs().mean()
            loss.backward()
            opt.step()
    synchronize(device)
    train_s = time.perf_counter() - t0
    model.eval()
    errs = []
    with torch.no_grad(), ctx():
        for batch in DataLoader(test, batch_size=256):
            batch = batch.to(device)
            errs.append((model(batch)[:, 0].float() * std + mean.to(device) - batch.y[:, HOMO]).abs())
    return {"mae": torch.cat(errs).mean().item(), "train_s": train_s}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model and data (smoke test)")
    ap.add_argument("--molecules", type=int, default=None, help="QM9 molecules (80/10/10 split; default 2000)")
    ap.add_argument("--epochs", type=int, default=None, help="default 2")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads (default 1: this measures accuracy, not speed, and one thread is "
                         "immune to the slow-down of a busy shared machine)")
    add_device_argument(ap)
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    args.molecules = args.molecules or (200 if args.quick else 2000)
    args.epochs = args.epochs or (1 if args.quick else 2)
    torch.set_num_threads(args.threads)
    train, _, test = load(args.molecules)
    print(f"# QM9 HOMO, SchNet + ABP, {len(train)} train / {len(test)} test molecules, {args.epochs} epochs, "
          f"batch {args.batch_size}, seeds {args.seeds}")
    print(f"# {machine_line(args.threads, device)}")
    res = {v: {} for v in args.variants}
    for seed in args.seeds:
        for v in args.variants:
            res[v][seed] = run(v, seed, train, test, args.epochs, args.batch_size, args.lr, args.quick, device)
    rows, verdicts = [], []
    n = len(args.seeds)

    def spread(xs):
        return statistics.stdev(xs) if len(xs) > 1 else 0.0

    stock = [res["stock fp32"][s]["mae"] for s in args.seeds] if "stock fp32" in res else None
    for v in args.variants:
        maes = [res[v][s]["mae"] for s in args.seeds]
        mean = statistics.mean(maes)
        verdict = ""
        if stock and v != "stock fp32":
            diff = mean - statistics.mean(stock)
            band = 2 * (spread(stock) ** 2 / n + spread(maes) ** 2 / n) ** 0.5
            ok = abs(diff) <= band
            verdict = f"{'within' if ok else 'OUTSIDE'} noise ({diff:+.4f} eV, 2 SE = {band:.4f})"
            verdicts.append(f"{v} {'within' if ok else 'OUTSIDE'} noise ({diff:+.4f} eV, 2 SE {band:.4f})")
        rows.append([v, *(f"{m:.4f}" for m in maes), f"{mean:.4f}", f"{spread(maes):.4f}",
                     f"{statistics.mean(res[v][s]['train_s'] for s in args.seeds):.0f}", verdict])
    print(fmt_table(["variant", *(f"test MAE seed {s} (eV)" for s in args.seeds), "mean", "std", "train s/seed",
                     "vs stock fp32"], rows))
    print("SUMMARY fast_path_accuracy: " + "; ".join(
        [f"stock fp32 {statistics.mean(stock):.4f} eV" if stock else ""] + verdicts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
