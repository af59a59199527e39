"""QMugs: ~665k conformers of ~2M-drug-like ChEMBL molecules (Isert et al., Sci. Data 9, 273 (2022)).

Official release: ETH Research Collection, https://doi.org/10.3929/ethz-b-000482129, files served from
``https://libdrive.ethz.ch/index.php/s/X5vOBNSITAG5vzM`` (:data:`SUMMARY_FILE`, :data:`STRUCTURES_FILE`;
no checksums are published, so formats are verified instead). Layout under ``<root>/qmugs/``:

* ``summary.csv`` -- one row per conformer; columns ``chembl_id``, ``conf_id`` (``conf_00``..``conf_02``),
  ``smiles``, ``atoms`` ... and the scalar properties with ``_`` for ``:`` (``GFN2_HOMO_ENERGY``,
  ``DFT_TOTAL_ENERGY``, ...).
* ``structures/<chembl_id>/<conf_id>.sdf`` (or the unextracted ``structures.tar.gz``, streamed) -- the
  GFN2-xTB-optimised geometry (Å) the DFT single point was run on, with every property as an SDF tag:
  ``GFN2:TOTAL_ENERGY``, ``GFN2:HOMO_ENERGY``, ``GFN2:LUMO_ENERGY``, ``DFT:TOTAL_ENERGY``,
  ``DFT:HOMO_ENERGY``, ``DFT:LUMO_ENERGY`` (all Hartree), vector properties as ``a|b|c``.

Targets: GFN2-xTB and DFT (ωB97X-D/def2-SVP) HOMO, LUMO and total energy, in Hartree as released
(the paper's Table 1 prints the QMugs HOMO/LUMO MAE as "meV"). A tag missing from the SDF is taken from
the matching ``summary.csv`` column when present.

Dataset order (``idx``): the row of ``summary.csv``; ``name`` is ``<chembl_id>/<conf_id>``.

Policy (a 665k-entry set where one bad file must not abort hours of processing): conformers whose SDF is
missing or unreadable, with a missing target, or with fewer than 2 atoms are skipped and the counts
logged. Unknown elements, coordinates not in Å and an atom count that contradicts ``summary.csv`` raise.
"""
from __future__ import annotations

import logging
import math
import tarfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd

from .common import (DataFormatError, DataNotFoundError, MissingTargetError, MolecularDataset, RemoteFile,
                     SkipLog, StorageBuilder, TooFewAtomsError, check_atomic_numbers, ensure_file,
                     to_float_or_nan, validate_molecule)
from .splits import check_paper_lengths, paper_torch_split

logger = logging.getLogger(__name__)

_BASE = "https://libdrive.ethz.ch/index.php/s/X5vOBNSITAG5vzM/download?path=%2F&files="
SUMMARY_FILE = RemoteFile("summary.csv", _BASE + "summary.csv", sha256=None,
                          note="QMugs, ETH Research Collection doi:10.3929/ethz-b-000482129")
STRUCTURES_FILE = RemoteFile("structures.tar.gz", _BASE + "structures.tar.gz", sha256=None,
                             note="QMugs structures; may also be extracted to <root>/qmugs/structures/")

TARGET_TAGS = ["GFN2:HOMO_ENERGY", "GFN2:LUMO_ENERGY", "GFN2:TOTAL_ENERGY",
               "DFT:HOMO_ENERGY", "DFT:LUMO_ENERGY", "DFT:TOTAL_ENERGY"]
TARGET_NAMES = list(TARGET_TAGS)
TARGET_UNITS = ["Ha"] * len(TARGET_NAMES)
TARGET_ALIASES = {
    **{t.replace(":", "_"): t for t in TARGET_TAGS},
    "gfn2_homo": "GFN2:HOMO_ENERGY", "gfn2_lumo": "GFN2:LUMO_ENERGY", "gfn2_total_energy": "GFN2:TOTAL_ENERGY",
    "dft_homo": "DFT:HOMO_ENERGY", "dft_lumo": "DFT:LUMO_ENERGY", "dft_total_energy": "DFT:TOTAL_ENERGY",
}


def read_summary(path: Path, max_molecules: int | None = None) -> pd.DataFrame:
    df = pd.read_csv(path, nrows=max_molecules, dtype={"chembl_id": str, "conf_id": str})
    missing = [c for c in ("chembl_id", "conf_id") if c not in df.columns]
    if missing:
        raise DataFormatError(f"{path}: missing columns {missing}; has {list(df.columns)[:20]}")
    return df


def _mol_from_sdf_text(text: str):
    from rdkit import Chem

    supplier = Chem.SDMolSupplier()
    supplier.SetData(text, removeHs=False, sanitize=False)
    try:
        return next(iter(supplier))
    except StopIteration:
        return None


def _iter_directory(folder: Path, wanted: list[tuple[str, str]]) -> Iterator[tuple[tuple[str, str], str | None]]:
    for key in wanted:
        path = folder / key[0] / f"{key[1]}.sdf"
        yield key, (path.read_text() if path.is_file() else None)


def _iter_tar(archive: Path, wanted: set[tuple[str, str]]) -> Iterator[tuple[tuple[str, str], str]]:
    try:
        with tarfile.open(archive, mode="r|*") as tar:  # streamed: the archive is never extracted
            for member in tar:
                parts = Path(member.name).parts
                if not member.isfile() or len(parts) < 2 or not parts[-1].endswith(".sdf"):
                    continue
                key = (parts[-2], parts[-1][:-4])
                if key in wanted:
                    yield key, tar.extractfile(member).read().decode()
    except tarfile.TarError as exc:
        raise DataFormatError(f"{archive}: not a readable tar archive ({exc})") from exc


class QMugs(MolecularDataset):
    """QMugs conformers (see the module docstring).

    Args:
        max_molecules: only the first N rows of ``summary.csv`` (cached separately).
    """

    name = "qmugs"
    PROCESS_VERSION = 1

    def __init__(self, root=None, transform=None, *, max_molecules: int | None = None, **kwargs: Any):
        if max_molecules is not None and max_molecules < 1:
            raise ValueError(f"max_molecules must be >= 1, got {max_molecules}")
        self.max_molecules = max_molecules
        super().__init__(root, transform, **kwargs)

    def paper_split(self, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(train, val, test) row indices of the paper's split ``seed`` of this dataset (:func:`paper_split`)."""
        return paper_split(seed, len(self))

    def _cache_params(self) -> dict[str, Any]:
        return {"max_molecules": self.max_molecules}

    def _raw_paths_for_fingerprint(self) -> list[Path]:
        paths = [self.raw_folder / SUMMARY_FILE.relpath, self.raw_folder / STRUCTURES_FILE.relpath,
                 self.raw_folder / "structures"]
        return [p for p in paths if p.exists()]

    def _structures(self, wanted: list[tuple[str, str]]):
        folder = self.raw_folder / "structures"
        if folder.is_dir():
            return _iter_directory(folder, wanted)
        archive = ensure_file(STRUCTURES_FILE, self.raw_folder, allow_download=self.allow_download,
                              progress=self.progress)
        return _iter_tar(archive, set(wanted))

    def _build(self):
        summary_path = ensure_file(SUMMARY_FILE, self.raw_folder, allow_download=self.allow_download,
                                   progress=self.progress)
        df = read_summary(summary_path, self.max_molecules)
        keys = list(zip(df["chembl_id"].astype(str), df["conf_id"].astype(str)))
        if len(set(keys)) != len(keys):
            raise DataFormatError(f"{summary_path}: repeated (chembl_id, conf_id) rows")
        row_of = {k: i for i, k in enumerate(keys)}
        csv_targets = {t: df[t.replace(":", "_")].to_numpy(np.float64) if t.replace(":", "_") in df.columns else None
                       for t in TARGET_TAGS}
        atoms_col = df["atoms"].to_numpy() if "atoms" in df.columns else None
        smiles = df["smiles"].astype(str).tolist() if "smiles" in df.columns else [""] * len(df)

        skips = SkipLog("qmugs")
        records: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        found: set[tuple[str, str]] = set()
        from rdkit import rdBase
        from tqdm.auto import tqdm

        block = rdBase.BlockLogs()
        try:
            for key, text in tqdm(self._structures(keys), total=len(keys), desc="qmugs",
                                  disable=not self.progress):
                i = row_of[key]
                found.add(key)
                mol_id = f"{key[0]}/{key[1]} (row {i})"
                if text is None:
                    skips.add("without a structure file", mol_id)
                    continue
                mol = _mol_from_sdf_text(text)
                if mol is None or mol.GetNumConformers() == 0:
                    skips.add("unreadable by RDKit", mol_id)
                    continue
                z = np.array([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int64)
                if atoms_col is not None and int(atoms_col[i]) != len(z):
                    raise DataFormatError(f"qmugs: molecule {mol_id}: SDF has {len(z)} atoms, summary.csv "
                                          f"says {int(atoms_col[i])}")
                check_atomic_numbers(z, mol_id)
                y = []
                for t in TARGET_TAGS:
                    v = to_float_or_nan(mol.GetProp(t)) if mol.HasProp(t) else math.nan
                    if not math.isfinite(v) and csv_targets[t] is not None:
                        v = float(csv_targets[t][i])
                    y.append(v)
                pos = mol.GetConformer().GetPositions()
                try:
                    yi = validate_molecule(mol_id, z, pos, np.asarray(y), TARGET_NAMES)
                except TooFewAtomsError:
                    skips.add("with fewer than 2 atoms", mol_id)
                    continue
                except MissingTargetError:
                    bad = [n for n, v in zip(TARGET_NAMES, y) if not math.isfinite(v)]
                    skips.add("with a missing target", mol_id, ",".join(bad))
                    continue
                records[i] = (z, pos, yi)
        finally:
            del block
        for key in keys:
            if key not in found:
                skips.add("without a structure file", f"{key[0]}/{key[1]} (row {row_of[key]})")
        builder = StorageBuilder(string_fields=("name", "smiles"))
        for i in sorted(records):
            z, pos, yi = records[i]
            builder.add(z=z, pos=pos, y=yi, idx=i, name=f"{keys[i][0]}/{keys[i][1]}", smiles=smiles[i])
        skips.report(len(builder))
        if len(builder) == 0:
            raise DataNotFoundError(f"qmugs: none of the {len(keys)} conformers in {summary_path} could be read")
        data, slices = builder.build(len(TARGET_NAMES))
        meta = {"target_names": TARGET_NAMES, "target_units": TARGET_UNITS, "target_aliases": TARGET_ALIASES,
                "source": "QMugs summary.csv + structures", "skipped": skips.as_dict(), "num_rows": len(df)}
        return data, slices, meta


#: The split seeds of the paper's QMugs runs (its code: ``torch.utils.data.random_split`` with
#: ``torch.Generator().manual_seed(seed)``; no split files were published).
PAPER_SEEDS: tuple[int, ...] = (242566, 710365, 828444, 170963, 744683)


def paper_lengths(n: int) -> list[int]:
    """The split lengths the paper's code passes to ``random_split`` for QMugs of ``n`` molecules
    (80 % / 10 % / 10 % + 1);
    ValueError if they do not add up to ``n`` (the paper's code would fail too)."""
    return check_paper_lengths("qmugs", [int(n * 0.8), int(n * 0.1), int(n * 0.1) + 1], n)


def paper_split(seed: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) indices of the paper's QMugs split ``seed`` of ``range(n)``,
    exactly as its code draws them."""
    return paper_torch_split("qmugs", PAPER_SEEDS, paper_lengths(n), seed)
