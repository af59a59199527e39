"""QM8 (21,786 molecules, 16 electronic-spectra targets) from MoleculeNet's ``gdb8.tar.gz``.

Raw files under ``<root>/qm8/``: ``qm8.sdf`` (3D structures, Å) and ``qm8.sdf.csv`` (targets), both
extracted from ``https://deepchemdata.s3-us-west-1.amazonaws.com/datasets/gdb8.tar.gz``; their sizes
and sha256 are in :data:`RAW_FILES` (the archive's own checksum is not published, the extracted files
are verified instead).

``qm8.sdf.csv`` has a header ``gdb9_index,E1-CC2,E2-CC2,f1-CC2,f2-CC2,E1-PBE0,E2-PBE0,f1-PBE0,f2-PBE0,
E1-PBE0,E2-PBE0,f1-PBE0,f2-PBE0,E1-CAM,E2-CAM,f1-CAM,f2-CAM``: the PBE0 block appears twice (def2SVP, then
def2TZVP), so columns are read by position, never by name. Row *i* of the CSV belongs to record *i* of
the SDF (same count is required; when records are titled ``gdb_<n>`` and some titles equal the CSV's
``gdb9_index`` while others do not, the files are misaligned and rejected).

Targets (paper naming): ``E1/E2/f1/f2`` at RI-CC2/def2TZVP (``-CC2``), LR-TDPBE0/def2SVP
(``-PBE0/def2SVP``), LR-TDPBE0/def2TZVP (``-PBE0/def2TZVP``) and LR-TD-CAM-B3LYP/def2TZVP (``-CAM``).
Excitation energies ``E*`` in Hartree (as released), oscillator strengths ``f*`` dimensionless.

Policy: records RDKit cannot read are skipped and logged with a count (the SDF is parsed with
``removeHs=False, sanitize=False``: only Z and the 3D coordinates are needed, so valence quirks that make
RDKit's sanitiser reject a few GDB structures do not lose them). Everything else that is wrong
(non-finite target, one-atom molecule, unknown element, coordinates not in Å) is an error.
"""
from __future__ import annotations

import logging
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd

from ..files import atomic_open
from .common import (DataFormatError, DataNotFoundError, MolecularDataset, RemoteFile, SkipLog,
                     StorageBuilder, check_atomic_numbers, ensure_file, validate_molecule)
from .splits import check_paper_lengths, paper_torch_split

logger = logging.getLogger(__name__)

ARCHIVE = RemoteFile("gdb8.tar.gz", "https://deepchemdata.s3-us-west-1.amazonaws.com/datasets/gdb8.tar.gz",
                     sha256=None, note="MoleculeNet bucket; extract qm8.sdf and qm8.sdf.csv from it")
RAW_FILES: dict[str, RemoteFile] = {
    "sdf": RemoteFile("qm8.sdf", None, "ba2e8b2edc40f667a3503d3e36889205e136c2d734074c499581501e72055a60",
                      37_154_522, note=f"inside {ARCHIVE.url}"),
    "csv": RemoteFile("qm8.sdf.csv", None, "0ab870056309d984dac7fba0c2e2ffde5c82d1de2106ee7973ec88ee9fb07620",
                      9_259_243, note=f"inside {ARCHIVE.url}"),
}
NUM_MOLECULES = 21_786

_LEVELS = ("CC2", "PBE0/def2SVP", "PBE0/def2TZVP", "CAM")
TARGET_NAMES = [f"{q}-{lvl}" for lvl in _LEVELS for q in ("E1", "E2", "f1", "f2")]
TARGET_UNITS = ["Ha" if n.startswith("E") else "dimensionless" for n in TARGET_NAMES]
#: the CSV's own column names (pandas' de-duplicated spelling for the second PBE0 block)
TARGET_ALIASES = {**{f"{q}-PBE0": f"{q}-PBE0/def2SVP" for q in ("E1", "E2", "f1", "f2")},
                  **{f"{q}-PBE0.1": f"{q}-PBE0/def2TZVP" for q in ("E1", "E2", "f1", "f2")}}
_TITLE = re.compile(r"^gdb_(\d+)$")


def fetch_raw(folder: Path, *, allow_download: bool = True, progress: bool = True) -> tuple[Path, Path]:
    """``qm8.sdf`` and ``qm8.sdf.csv`` under ``folder``, verified; downloads and extracts the archive if needed."""
    sdf, csv = folder / RAW_FILES["sdf"].relpath, folder / RAW_FILES["csv"].relpath
    if not (sdf.is_file() and csv.is_file()):
        try:
            archive = ensure_file(ARCHIVE, folder, allow_download=allow_download, progress=progress)
        except DataNotFoundError as exc:
            lines = [str(exc), "  ...or place the two files extracted from it:"]
            for rf in RAW_FILES.values():
                lines.append(f"    {folder / rf.relpath}  (sha256 {rf.sha256}, {rf.size} bytes)")
            raise DataNotFoundError("\n".join(lines)) from exc
        _extract(archive, folder)
    for rf in RAW_FILES.values():
        ensure_file(rf, folder, allow_download=False)
    return sdf, csv


def _extract(archive: Path, folder: Path) -> None:
    wanted = {rf.relpath for rf in RAW_FILES.values()}
    try:
        with tarfile.open(archive) as tar:
            for member in tar:
                base = Path(member.name).name
                if member.isfile() and base in wanted:
                    src = tar.extractfile(member)
                    with atomic_open(folder / base) as out:
                        shutil.copyfileobj(src, out)
                    wanted.discard(base)
    except tarfile.TarError as exc:
        raise DataFormatError(f"{archive}: not a readable tar archive ({exc})") from exc
    if wanted:
        raise DataFormatError(f"{archive}: does not contain {sorted(wanted)}")


def read_targets(csv: Path) -> tuple[np.ndarray, np.ndarray]:
    """(gdb9_index [n], targets float64 [n, 16]) by column position; bad cells become NaN."""
    df = pd.read_csv(csv, header=0)
    if df.shape[1] != 17 or str(df.columns[0]).strip().lower() != "gdb9_index":
        raise DataFormatError(f"{csv}: expected 17 columns starting with gdb9_index, got {list(df.columns)}")
    index = pd.to_numeric(df.iloc[:, 0], errors="coerce").to_numpy()
    if np.isnan(index).any():
        raise DataFormatError(f"{csv}: non-numeric gdb9_index in row {int(np.flatnonzero(np.isnan(index))[0])}")
    y = df.iloc[:, 1:].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    return index.astype(np.int64), y


class QM8(MolecularDataset):
    """QM8 (see the module docstring for files, targets, units and skip policy)."""

    name = "qm8"
    PROCESS_VERSION = 1

    def paper_split(self, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(train, val, test) row indices of the paper's split ``seed`` of this dataset (:func:`paper_split`)."""
        return paper_split(seed, len(self))

    def _raw_paths_for_fingerprint(self) -> list[Path]:
        paths = [self.raw_folder / rf.relpath for rf in RAW_FILES.values()]
        return [p for p in paths if p.exists()]

    def _build(self):
        from rdkit import Chem, rdBase

        sdf, csv = fetch_raw(self.raw_folder, allow_download=self.allow_download, progress=self.progress)
        gdb_index, y_all = read_targets(csv)
        skips = SkipLog("qm8")
        builder = StorageBuilder(string_fields=("name",))
        block = rdBase.BlockLogs()  # RDKit's own messages for unreadable records: we log a count instead
        try:
            supplier = Chem.SDMolSupplier(str(sdf), removeHs=False, sanitize=False)
            n_records = 0
            titled, mismatched = 0, []
            for i, mol in enumerate(supplier):
                n_records += 1
                if i >= len(gdb_index):
                    continue
                mol_id = f"gdb_{gdb_index[i]} (record {i})"
                if mol is None:
                    skips.add("unreadable by RDKit", mol_id)
                    continue
                title = mol.GetProp("_Name").strip() if mol.HasProp("_Name") else ""
                m = _TITLE.match(title)
                if m:
                    titled += 1
                    if int(m.group(1)) != gdb_index[i]:
                        mismatched.append(f"record {i} is {title} but CSV row {i} is gdb_{gdb_index[i]}")
                if mol.GetNumConformers() == 0:
                    raise DataFormatError(f"{sdf}: record {i} ({mol_id}) has no coordinates")
                z = np.array([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int64)
                check_atomic_numbers(z, mol_id)
                pos = mol.GetConformer().GetPositions()
                yi = validate_molecule(mol_id, z, pos, y_all[i], TARGET_NAMES)
                builder.add(z=z, pos=pos, y=yi, idx=i, name=f"gdb_{gdb_index[i]}")
        finally:
            del block
        if n_records != len(gdb_index):
            raise DataFormatError(f"qm8: {sdf.name} holds {n_records} records but {csv.name} {len(gdb_index)} rows")
        if mismatched and len(mismatched) < titled:  # some titles agree, others not: rows are misaligned
            raise DataFormatError(f"qm8: {sdf.name} and {csv.name} are misaligned ({len(mismatched)} of "
                                  f"{titled} titled records disagree), e.g. {mismatched[0]}")
        if mismatched:
            logger.info("qm8: SDF titles gdb_<n> use a numbering other than gdb9_index; rows matched by position")
        skips.report(len(builder))
        data, slices = builder.build(len(TARGET_NAMES))
        meta = {"target_names": TARGET_NAMES, "target_units": TARGET_UNITS, "target_aliases": TARGET_ALIASES,
                "source": "MoleculeNet gdb8.tar.gz", "skipped": skips.as_dict()}
        return data, slices, meta


#: The split seeds of the paper's QM8 runs (its code: ``torch.utils.data.random_split`` with
#: ``torch.Generator().manual_seed(seed)``; no split files were published).
PAPER_SEEDS: tuple[int, ...] = (291305, 259598, 999783, 490681, 159938)


def paper_lengths(n: int) -> list[int]:
    """The split lengths the paper's code passes to ``random_split`` for QM8 of ``n`` molecules
    (17,428 / 2,179 / 2,179 for all 21,786 molecules);
    ValueError if they do not add up to ``n`` (the paper's code would fail too)."""
    return check_paper_lengths("qm8", [int(n * 0.8), int(n * 0.1) + 1, int(n * 0.1) + 1], n)


def paper_split(seed: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) indices of the paper's QM8 split ``seed`` of ``range(n)``,
    exactly as its code draws them."""
    return paper_torch_split("qm8", PAPER_SEEDS, paper_lengths(n), seed)
