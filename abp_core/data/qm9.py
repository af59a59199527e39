"""QM9 (130,831 molecules) from the embedded PyPI package ``qm9pack`` -- no download.

``qm9pack`` 1.0.3 ships ``qm9pack/data/qm9_part{1,2,3}.csv`` (plus ``qm9_polarizability.csv``), written
by QM9's first author: B3LYP/6-31G(2df,p) geometries in Å, Mulliken charges, and every scalar property.
The 3,054 molecules that failed QM9's consistency check are already left out; rows are ordered by the
QM9 index (1..133,885), i.e. the same order as PyG's ``QM9`` dataset, so the paper's QM9 splits
(:func:`paper_split`) apply to this dataset unchanged.

``import qm9pack`` fails on modern setuptools (it imports ``pkg_resources``), so the CSVs are located
with :func:`importlib.util.find_spec` without importing the package.

Targets (``y`` columns) and units -- HOMO, LUMO and gap are converted from Hartree to eV here, every
other energy stays in Hartree as released:

====  ==========  ===============  =================================================
 #    name        unit             source column
====  ==========  ===============  =================================================
 0    mu          D                Dipole_debye
 1    alpha       Bohr^3           Polarizability_bohr3 (isotropic)
 2    homo        eV               HOMO_au x 27.211386245988
 3    lumo        eV               LUMO_au x 27.211386245988
 4    gap         eV               HOMO_LUMO_gap_au x 27.211386245988
 5    r2          Bohr^2           R2_bohr2
 6    zpve        Ha               ZPVE_au
 7    U0          Ha               InternalEnergy_0K_au
 8    U           Ha               InternalEnergy_298K_au
 9    H           Ha               Enthalphy_298K_au
 10   G           Ha               GibbsFreeEnergy_298K_au
 11   Cv          cal/(mol K)      Heatcapacity_Cv_cal_mol_K
 12   A, B, C     GHz              RotA_GHz, RotB_GHz, RotC_GHz  (12, 13, 14)
 15   alpha_xx..  Bohr^3           A_xx, A_xy, A_yy, A_xz, A_yz, A_zz (qm9_polarizability.csv, 15..20)
====  ==========  ===============  =================================================

Columns 0-11 are in the order of PyG's QM9 targets (and the paper's ``TARGET_ID_TO_PROPERTY``).

Each ``Data``: ``z``, ``pos`` (Å), ``y`` [1, 21], ``idx`` (row 0..130,830), ``name``
(``dsgdb9nsd_000001``), ``smiles`` and ``mulliken`` (per-atom Mulliken charges, e).

Policy: QM9 is curated, so any invalid molecule (unknown element, non-finite target, one atom, bad
geometry) is an error, not a skip.
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .common import (HARTREE_TO_EV, DataFormatError, DataNotFoundError, MolecularDataset,
                     StorageBuilder, symbols_to_z, validate_molecule)
from .splits import check_paper_lengths, paper_torch_split

logger = logging.getLogger(__name__)

NUM_MOLECULES = 130_831
PART_FILES = ("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv")
POLARIZABILITY_FILE = "qm9_polarizability.csv"

#: (name, source column, unit, factor applied to the source value)
TARGETS: tuple[tuple[str, str, str, float], ...] = (
    ("mu", "Dipole_debye", "D", 1.0),
    ("alpha", "Polarizability_bohr3", "Bohr^3", 1.0),
    ("homo", "HOMO_au", "eV", HARTREE_TO_EV),
    ("lumo", "LUMO_au", "eV", HARTREE_TO_EV),
    ("gap", "HOMO_LUMO_gap_au", "eV", HARTREE_TO_EV),
    ("r2", "R2_bohr2", "Bohr^2", 1.0),
    ("zpve", "ZPVE_au", "Ha", 1.0),
    ("U0", "InternalEnergy_0K_au", "Ha", 1.0),
    ("U", "InternalEnergy_298K_au", "Ha", 1.0),
    ("H", "Enthalphy_298K_au", "Ha", 1.0),
    ("G", "GibbsFreeEnergy_298K_au", "Ha", 1.0),
    ("Cv", "Heatcapacity_Cv_cal_mol_K", "cal/(mol K)", 1.0),
    ("A", "RotA_GHz", "GHz", 1.0),
    ("B", "RotB_GHz", "GHz", 1.0),
    ("C", "RotC_GHz", "GHz", 1.0),
    ("alpha_xx", "A_xx", "Bohr^3", 1.0),
    ("alpha_xy", "A_xy", "Bohr^3", 1.0),
    ("alpha_yy", "A_yy", "Bohr^3", 1.0),
    ("alpha_xz", "A_xz", "Bohr^3", 1.0),
    ("alpha_yz", "A_yz", "Bohr^3", 1.0),
    ("alpha_zz", "A_zz", "Bohr^3", 1.0),
)
TARGET_NAMES = [t[0] for t in TARGETS]
TARGET_UNITS = [t[2] for t in TARGETS]
TARGET_ALIASES = {t[1]: t[0] for t in TARGETS}
_MAIN_COLUMNS = ["XYZ_file", "Index", "SMILES", "N_atoms", "Elements", "XYZ_Ang", "Mulliken_pop"] + \
    [t[1] for t in TARGETS if not t[1].startswith("A_")]
_POL_COLUMNS = ["XYZ_file"] + [t[1] for t in TARGETS if t[1].startswith("A_")]


def qm9pack_data_dir() -> Path:
    """Folder holding qm9pack's CSVs, found without importing the (broken) package."""
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        raise DataNotFoundError("QM9 is embedded through the PyPI package qm9pack: pip install qm9pack==1.0.3")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    missing = [f for f in PART_FILES + (POLARIZABILITY_FILE,) if not (folder / f).is_file()]
    if missing:
        raise DataNotFoundError(f"qm9pack is installed but {missing} are missing from {folder}; "
                                f"reinstall with pip install --force-reinstall qm9pack==1.0.3")
    return folder


def _read_rows(folder: Path, max_molecules: int | None) -> pd.DataFrame:
    frames, remaining = [], max_molecules
    for fname in PART_FILES:
        if remaining is not None and remaining <= 0:
            break
        df = pd.read_csv(folder / fname, usecols=_MAIN_COLUMNS, nrows=remaining,
                         dtype={"XYZ_file": str, "SMILES": str, "Elements": str, "XYZ_Ang": str,
                                "Mulliken_pop": str})
        frames.append(df)
        if remaining is not None:
            remaining -= len(df)
    df = pd.concat(frames, ignore_index=True)
    pol_cols = _POL_COLUMNS[1:]
    # the polarizability table is in the same row order; read only what is needed, all of it if not
    pol = pd.read_csv(folder / POLARIZABILITY_FILE, usecols=_POL_COLUMNS, nrows=max_molecules)
    merged = df.merge(pol, on="XYZ_file", how="left", validate="one_to_one")
    if max_molecules is not None and merged[pol_cols].isna().any().any():
        pol = pd.read_csv(folder / POLARIZABILITY_FILE, usecols=_POL_COLUMNS)
        merged = df.merge(pol, on="XYZ_file", how="left", validate="one_to_one")
    if len(merged) != len(df):
        raise DataFormatError("qm9pack: polarizability rows do not match the main table")
    return merged


def _flat_numbers(series: pd.Series, what: str) -> np.ndarray:
    text = series.str.cat(sep=",").replace("[", "").replace("]", "")
    try:
        return np.array(text.split(","), dtype=np.float64)
    except ValueError as exc:
        raise DataFormatError(f"qm9pack: unparseable {what} ({exc})") from exc


class QM9(MolecularDataset):
    """QM9 from ``qm9pack`` (see the module docstring for targets and units).

    Args:
        root: data root (only the processed cache lives there: ``<root>/qm9/processed``).
        max_molecules: keep only the first N molecules (reads only the rows it needs; cached
            separately), e.g. for a quick notebook run.
        transform: PyG transform applied on access.
        cache_dir, force_reload: see :class:`~abp_core.data.common.MolecularDataset`.
    """

    name = "qm9"
    PROCESS_VERSION = 1

    def __init__(self, root=None, transform=None, *, max_molecules: int | None = None, **kwargs: Any):
        if max_molecules is not None and max_molecules < 1:
            raise ValueError(f"max_molecules must be >= 1, got {max_molecules}")
        self.max_molecules = None if max_molecules is None or max_molecules >= NUM_MOLECULES else int(max_molecules)
        super().__init__(root, transform, **kwargs)

    def paper_split(self, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(train, val, test) row indices of the paper's split ``seed`` of this dataset (:func:`paper_split`)."""
        return paper_split(seed, len(self))

    def _cache_params(self) -> dict[str, Any]:
        return {"max_molecules": self.max_molecules}

    def _raw_paths_for_fingerprint(self) -> list[Path]:
        folder = qm9pack_data_dir()
        return [folder / f for f in PART_FILES + (POLARIZABILITY_FILE,)]

    def _build(self):
        df = _read_rows(qm9pack_data_dir(), self.max_molecules)
        n_mol = len(df)
        n_atoms = df["N_atoms"].to_numpy(np.int64)
        # -- per-row consistency before the vectorised parse
        n_el = df["Elements"].str.count(",").to_numpy() + 1
        n_xyz = df["XYZ_Ang"].str.count(",").to_numpy() + 1
        n_q = df["Mulliken_pop"].str.count(",").to_numpy() + 1
        for label, counts, factor in (("Elements", n_el, 1), ("XYZ_Ang", n_xyz, 3), ("Mulliken_pop", n_q, 1)):
            bad = np.flatnonzero(counts != factor * n_atoms)
            if bad.size:
                raise DataFormatError(f"qm9pack: molecule {df['XYZ_file'].iloc[bad[0]]}: {label} has "
                                      f"{counts[bad[0]]} entries for N_atoms={n_atoms[bad[0]]}")
        symbols = df["Elements"].str.cat(sep=",").replace("[", "").replace("]", "").replace("'", "")
        symbols = np.array([s.strip() for s in symbols.split(",")])
        uniq, inverse = np.unique(symbols, return_inverse=True)
        z_all = np.empty(len(symbols), dtype=np.int64)
        ptr = np.concatenate([[0], np.cumsum(n_atoms)])
        for k, sym in enumerate(uniq):
            try:
                z_all[inverse == k] = symbols_to_z([sym], "?")[0]
            except ValueError:
                first = int(np.searchsorted(ptr, np.flatnonzero(inverse == k)[0], side="right") - 1)
                symbols_to_z([sym], df["XYZ_file"].iloc[first])  # re-raise naming the molecule
        pos_all = _flat_numbers(df["XYZ_Ang"], "XYZ_Ang").reshape(-1, 3)
        q_all = _flat_numbers(df["Mulliken_pop"], "Mulliken_pop")
        y = np.stack([df[col].to_numpy(np.float64) * factor for _, col, _, factor in TARGETS], axis=1)

        names = df["XYZ_file"].str.replace(".xyz", "", regex=False).tolist()
        smiles = df["SMILES"].tolist()
        builder = StorageBuilder(atom_fields={"mulliken": (torch.float32, ())},
                                 string_fields=("name", "smiles"))
        for i in range(n_mol):
            a, b = ptr[i], ptr[i + 1]
            yi = validate_molecule(names[i], z_all[a:b], pos_all[a:b], y[i], TARGET_NAMES)
            builder.add(z=z_all[a:b], pos=pos_all[a:b], y=yi, idx=i, mulliken=q_all[a:b],
                        name=names[i], smiles=smiles[i])
        data, slices = builder.build(len(TARGET_NAMES))
        meta = {"target_names": TARGET_NAMES, "target_units": TARGET_UNITS, "target_aliases": TARGET_ALIASES,
                "source": "qm9pack 1.0.3", "skipped": {}}
        logger.info("qm9: processed %d molecules", n_mol)
        return data, slices, meta


#: The split seeds of the paper's QM9 runs (its code: ``torch.utils.data.random_split`` with
#: ``torch.Generator().manual_seed(seed)``; no split files were published).
PAPER_SEEDS: tuple[int, ...] = (844249, 787755, 420455, 700990, 791796)


def paper_lengths(n: int) -> list[int]:
    """The split lengths the paper's code passes to ``random_split`` for QM9 of ``n`` molecules
    (104,664 / 13,083 / 13,084 for all 130,831 molecules);
    ValueError if they do not add up to ``n`` (the paper's code would fail too)."""
    return check_paper_lengths("qm9", [int(n * 0.8), int(n * 0.1), int(n * 0.1) + 1], n)


def paper_split(seed: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) indices of the paper's QM9 split ``seed`` of ``range(n)``,
    exactly as its code draws them."""
    return paper_torch_split("qm9", PAPER_SEEDS, paper_lengths(n), seed)
