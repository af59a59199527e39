"""Benchmark: label N QM9 molecules with per-atom GFN2-xTB HOMO shares (abp_core.orbitals).

Reads geometries straight from qm9pack's embedded CSV (without importing qm9pack), runs
``label_orbitals`` with a fresh cache in a temporary directory and prints molecules/second and wall
time, then the time to reload the finished cache.

    python benchmarks/label_orbitals.py            # 10,000 molecules, all cores
    python benchmarks/label_orbitals.py -n 2000 --workers 2 --orbitals homo lumo
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from abp_core.orbitals import OrbitalLabelWarning, label_orbitals  # noqa: E402

SYMBOL_TO_Z = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}


def qm9_csv() -> Path:
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("qm9pack is not installed (pip install qm9pack==1.0.3)")
    return Path(spec.submodule_search_locations[0]) / "data" / "qm9_part1.csv"


def load_qm9(n: int) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray]:
    import pandas as pd

    df = pd.read_csv(qm9_csv(), nrows=n, usecols=["Elements", "XYZ_Ang", "HOMO_au"])
    mols = []
    for elements, xyz in zip(df["Elements"], df["XYZ_Ang"]):
        rows = ast.literal_eval(xyz)  # not strict JSON: numbers like "0." occur
        if rows and len(rows[0]) == 4:  # [element, x, y, z]
            symbols = [r[0] for r in rows]
            pos = np.array([r[1:] for r in rows], dtype=np.float64)
        else:  # [x, y, z] with the symbols in "Elements"
            symbols = ast.literal_eval(elements)
            pos = np.array(rows, dtype=np.float64)
        z = np.array([SYMBOL_TO_Z[s] for s in symbols], dtype=np.int64)
        mols.append((z, pos))
    return mols, df["HOMO_au"].to_numpy() * 27.211386245988


def main(argv=None) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import add_device_argument, resolve_device

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--num-molecules", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=None, help="default: all cores")
    ap.add_argument("--chunk-size", type=int, default=500)
    ap.add_argument("--orbitals", nargs="+", default=["homo"])
    add_device_argument(ap)
    ap.add_argument("--check-args", action="store_true", help=argparse.SUPPRESS)  # tests: parse and stop
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    if device.type != "cpu":  # the same command on a GPU machine: the same (CPU) measurement
        print(f"# --device {args.device}: GFN2-xTB (tblite) runs on the CPU; this benchmark does not use the GPU")
    if args.check_args:
        return

    t0 = time.perf_counter()
    mols, homo_dft_ev = load_qm9(args.num_molecules)
    t_read = time.perf_counter() - t0
    n_atoms = sum(len(z) for z, _ in mols)
    print(f"read {len(mols)} QM9 molecules ({n_atoms} atoms) in {t_read:.1f} s; "
          f"cores available: {len(os.sched_getaffinity(0))}; load: {os.getloadavg()[0]:.2f}")

    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "qm9_orbitals.npz"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", OrbitalLabelWarning)
            t0 = time.perf_counter()
            labels = label_orbitals(
                mols, cache, orbitals=tuple(args.orbitals), num_workers=args.workers,
                chunk_size=args.chunk_size,
            )
            wall = time.perf_counter() - t0
        t0 = time.perf_counter()
        label_orbitals(mols, cache, orbitals=tuple(args.orbitals), num_workers=args.workers,
                       chunk_size=args.chunk_size, progress=False)
        reload = time.perf_counter() - t0
        size_mb = cache.stat().st_size / 1e6

    print(f"labelled {len(labels)} molecules ({', '.join(labels.orbitals)}) with {labels.method} "
          f"on {args.workers or len(os.sched_getaffinity(0))} worker(s)")
    print(f"wall time: {wall:.1f} s   throughput: {len(labels) / wall:.1f} molecules/s   "
          f"({1000 * wall / len(labels):.2f} ms/molecule wall)")
    print(f"failed: {len(labels.failed)}" + (f"  first: {labels.errors[0]}" if len(labels.failed) else ""))
    for w in caught:
        print(f"warning: {w.message}")
    print(f"cache: {size_mb:.1f} MB; reloading the finished cache (incl. fingerprint check) took {reload:.2f} s")
    ok = np.isfinite(labels.homo_energy_ev) if "homo" in labels.orbitals else None
    if ok is not None and ok.any():
        r = np.corrcoef(labels.homo_energy_ev[ok], homo_dft_ev[ok])[0, 1]
        top = np.maximum.reduceat(np.nan_to_num(labels.homo_coeff), labels.ptr[:-1])
        print(f"xTB vs QM9 B3LYP HOMO energy: Pearson r = {r:.3f}; mean largest per-atom HOMO "
              f"share = {top[ok].mean():.3f}")


if __name__ == "__main__":
    main()
