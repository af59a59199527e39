"""Time of ``abp_core.explain.attribute`` per method, and of ``faithfulness``, on one batch of QM9 molecules.

    .venv/bin/python benchmarks/explain.py                       # 128 molecules, SchNet 64/3, 5 repeats
    .venv/bin/python benchmarks/explain.py --device cuda --threads 0

Models: the quickstart's size (SchNet 64 channels, 3 interactions; ABP 4 heads, 2 encoder SABs), freshly
initialised: the cost of an attribution does not depend on the weights. Methods of one readout are timed
interleaved (see ``_common.interleaved``), median of ``--repeats``; the ratio is to one plain forward pass
(backbone + readout + head) of the same batch, measured in the same rounds. The backbone runs once per
call in every method (without gradients), so each row includes it.
"""
from __future__ import annotations

import argparse
import platform

import torch

from _common import interleaved, median  # noqa: E402  (sets sys.path to the repository)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--molecules", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--readouts", default="sum,wa,abp")
    p.add_argument("--n-random", type=int, default=20, help="random orders of faithfulness()")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="16 molecules, 1 repeat, 3 random orders (a smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.molecules, args.repeats, args.n_random = 16, 1, 3
    if args.threads:
        torch.set_num_threads(args.threads)
    from torch_geometric.data import Batch

    from abp_core.data import get_dataset
    from abp_core.explain import attribute, faithfulness, supported_methods
    from abp_core.models import build_model

    device = torch.device(args.device)
    data = get_dataset("qm9", max_molecules=args.molecules)
    batch = Batch.from_data_list([data[i] for i in range(args.molecules)]).to(device)
    print(f"abp explain benchmark: {args.molecules} QM9 molecules ({batch.num_nodes} atoms), device {device}, "
          f"{torch.get_num_threads()} thread(s), torch {torch.__version__}, {platform.processor() or platform.machine()}")
    print(f"{'readout':8} {'method':22} {'median ms':>10} {'x forward':>10}")
    summary = []
    for ro in args.readouts.split(","):
        torch.manual_seed(0)
        model = build_model("schnet", ro, hidden_channels=64, num_filters=64, num_interactions=3,
                            readout_kwargs=dict(heads=4) if ro == "abp" else None).to(device).eval()

        def forward():
            with torch.no_grad():
                model(batch)
            if device.type == "cuda":
                torch.cuda.synchronize()

        fns = {"forward": forward}
        for m in supported_methods(model):
            fns[m] = (lambda m=m: attribute(model, batch, m))
        a = attribute(model, batch, supported_methods(model)[0])
        fns[f"faithfulness ({args.n_random} orders)"] = lambda: faithfulness(model, batch, a, n_random=args.n_random)
        times = interleaved(fns, args.repeats)
        base = median(times["forward"])
        for name, ts in times.items():
            print(f"{ro:8} {name:22} {median(ts) * 1e3:10.1f} {median(ts) / base:10.1f}", flush=True)
        slowest = max((n for n in times if n != "forward"), key=lambda n: median(times[n]))
        summary.append(f"{ro}: slowest {slowest} {median(times[slowest]) / base:.1f}x forward")
    print("SUMMARY " + "; ".join(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
