"""Benchmark: end-to-end throughput of ``abp predict`` from SMILES to CSV, with and without the xTB geometry.

Molecules: QM9 test-split SMILES (paper split 844249; every k-th test molecule of qm9pack's first part, so
sizes span QM9's range), written to a ``.smi`` file. Each mode runs :func:`abp_core.predict.predict_file` on that file -- SMILES parsing, RDKit
ETKDG + MMFF94 (``mmff``) or also a GFN2-xTB minimisation with tblite (``xtb``), the model, the CSV and the
geometry SDF -- in this process, interleaved (mmff, xtb, mmff, xtb, ...) after a warm-up, so both see the
same machine load. The table gives molecules per second (median over repeats) and the share of the time
spent making geometries (measured in the same rounds with :func:`abp_core.conformers.from_smiles` alone).
One ``abp predict`` subprocess per mode adds the command's start-up (imports, model loading). The last column
is the MAE against the QM9 (B3LYP) labels of the same molecules: how much the geometry made from SMILES costs
compared with the card's test MAE on QM9's own DFT geometries.

    python benchmarks/predict.py                       # 64 molecules, 3 repeats, qm9-homo-abp, CPU
    python benchmarks/predict.py -n 256 --device cuda  # on a GPU, if there is one (not measured here)
    python benchmarks/predict.py --quick               # 6 molecules, 1 repeat, no subprocess (tests)
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, interleaved, median  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

MODES = ("mmff", "xtb")


def qm9_test_molecules(n: int, card) -> tuple[list[str], "np.ndarray"]:
    """``n`` SMILES of the model's QM9 test split (paper split 844249) among qm9pack's first CSV part, spread
    over it, and their QM9 labels of the model's target (eV)."""
    import numpy as np
    import pandas as pd

    from abp_core.data import paper_split
    from abp_core.data.qm9 import HARTREE_TO_EV, NUM_MOLECULES, PART_FILES, qm9pack_data_dir

    column = {"homo": "HOMO_au", "lumo": "LUMO_au"}[card["target"]["name"]] if card else "HOMO_au"
    df = pd.read_csv(qm9pack_data_dir() / PART_FILES[0], usecols=["SMILES", column])
    seed = int(card["split"]["seed"]) if card else 844249
    test = np.sort(np.asarray(paper_split("qm9", seed, n=NUM_MOLECULES)[2]))
    test = test[test < len(df)]
    rows = test[:: max(1, len(test) // n)][:n]
    return df["SMILES"].iloc[rows].tolist(), df[column].iloc[rows].to_numpy() * HARTREE_TO_EV


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=64, help="molecules (default 64)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="qm9-homo-abp", help="shipped model or checkpoint (default qm9-homo-abp)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="torch device of the model (default cuda when available, else cpu; xTB runs on the CPU)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1; tblite always uses 1)")
    ap.add_argument("--no-subprocess", action="store_true", help="skip the `abp predict` command runs")
    ap.add_argument("--quick", action="store_true", help="6 molecules, 1 repeat, no subprocess")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.repeats, args.no_subprocess = 6, 1, True
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args) -> int:
    from abp_core.conformers import from_smiles
    from abp_core.predict import predict_file
    from abp_core.pretrained import resolve

    task = resolve(args.model)  # loaded once for the in-process runs (the subprocess pays it itself)
    card = getattr(task, "card", None)
    smiles, labels = qm9_test_molecules(args.n, card)
    with tempfile.TemporaryDirectory(prefix="abp-bench-predict-") as tmp:
        smi = Path(tmp) / "qm9.smi"
        smi.write_text("".join(f"{s} qm9-{i}\n" for i, s in enumerate(smiles)))
        results = {}

        def run(mode):
            def fn():
                res = predict_file(task, smi, out=Path(tmp) / f"{mode}.csv", optimize=mode, device=args.device)
                results[mode] = res
            return fn

        def geometry(mode):
            return lambda: from_smiles(smiles, optimize=mode)

        fns = {**{m: run(m) for m in MODES}, **{f"{m} geometry": geometry(m) for m in MODES}}
        times = interleaved(fns, repeats=args.repeats, warmup=1 if not args.quick else 0)
        ok = {m: int((results[m].predictions["status"] == "ok").sum()) for m in MODES}
        cli = {}
        if not args.no_subprocess:
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            for mode in MODES:
                t0 = time.perf_counter()
                proc = subprocess.run([sys.executable, "-m", "abp_core.cli", "predict", args.model, str(smi),
                                       "--optimize", mode, "--out", str(Path(tmp) / f"cli-{mode}.csv")],
                                      capture_output=True, text=True, env=env, cwd=ROOT)
                cli[mode] = time.perf_counter() - t0
                if proc.returncode != 0:
                    print(proc.stderr)
                    return 1
        load = os.getloadavg()[0]
        print(f"# abp predict from SMILES: {len(smiles)} QM9 molecules, model {args.model}, device {args.device}, "
              f"{args.threads} torch thread(s), {args.repeats} interleaved repeat(s), load average {load:.2f}")
        print("| geometry | predicted | median s | molecules/s | geometry share | `abp predict` command s (mol/s) "
              "| MAE vs QM9 label, meV |")
        print("|---|---|---|---|---|---|---|")
        rate = {}
        for mode in MODES:
            t, g = median(times[mode]), median(times[f"{mode} geometry"])
            rate[mode] = len(smiles) / t
            command = f"{cli[mode]:.2f} ({len(smiles) / cli[mode]:.1f})" if mode in cli else "-"
            label = "ETKDG + MMFF94" if mode == "mmff" else "ETKDG + MMFF94 + GFN2-xTB"
            pred = results[mode].predictions.filter(like=" [eV]").iloc[:, 0].to_numpy()
            mae = float(np.nanmean(np.abs(pred - labels))) * 1000
            print(f"| {label} | {ok[mode]}/{len(smiles)} | {t:.3f} | {rate[mode]:.1f} | {min(g / t, 1.0):.0%} | "
                  f"{command} | {mae:.0f} |")
        if card:
            print(f"(card: test MAE {card['metrics']['test']['mae_meV']:.0f} meV on QM9's DFT geometries, "
                  f"{card['metrics']['test']['n']:,} molecules)")
        print(f"SUMMARY predict: {rate['mmff']:.1f} molecules/s with MMFF geometries, {rate['xtb']:.1f} with GFN2-xTB "
              f"geometries ({rate['mmff'] / rate['xtb']:.1f}x slower), device {args.device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
