"""MD17 CCSD / CCSD(T) (sGDML): aspirin (CCSD), benzene, malonaldehyde, ethanol, toluene (CCSD(T)).

Official files: ``http://www.quantum-machine.org/gdml/data/npz/<name>.zip`` with ``<name>`` one of
``aspirin_ccsd``, ``benzene_ccsd_t``, ``malonaldehyde_ccsd_t``, ``ethanol_ccsd_t``, ``toluene_ccsd_t``
(the URL PyG's ``MD17`` uses too). Each zip holds ``<name>-train.npz`` and ``<name>-test.npz`` with keys
``z`` [n], ``R`` [m, n, 3] (Å), ``E`` [m] or [m, 1] (kcal/mol) and ``F`` [m, n, 3] (kcal/mol/Å).
Layout under the data root: ``<root>/md17/<name>.zip`` or the two extracted ``.npz`` files.

Checksums: sGDML publishes none, so :data:`SHA256` is ``None`` for every zip (fill it in if you
pin a copy). Instead every file is opened with ``allow_pickle=False`` (a pickle payload is refused),
its keys, dtypes and shapes are checked, and every geometry goes through the usual validation.

Dataset order (``idx``): the official train file's conformations, then the official test file's.
``y`` is the total energy [1, 1] in kcal/mol; ``force`` [n, 3] in kcal/mol/Å is kept per atom.

Paper split (:meth:`MD17.paper_split`): train = the official train file; the official test file is
split in half with ``torch.utils.data.random_split(..., generator=torch.Generator().manual_seed(42))``
-- first half validation, second half test (for toluene's 501 test conformations: 250 / 251).

Policy: curated data, every invalid conformation raises.
"""
from __future__ import annotations

import logging
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..files import atomic_open
from .common import (DataFormatError, DataNotFoundError, MolecularDataset, RemoteFile, StorageBuilder,
                     ensure_file, validate_molecule)
from .splits import torch_random_split

logger = logging.getLogger(__name__)

BASE_URL = "http://www.quantum-machine.org/gdml/data/npz"
#: short name -> sGDML file stem
MOLECULES = {
    "aspirin": "aspirin_ccsd",
    "benzene": "benzene_ccsd_t",
    "malonaldehyde": "malonaldehyde_ccsd_t",
    "ethanol": "ethanol_ccsd_t",
    "toluene": "toluene_ccsd_t",
}
LEVEL_OF_THEORY = {"aspirin": "CCSD", "benzene": "CCSD(T)", "malonaldehyde": "CCSD(T)",
                   "ethanol": "CCSD(T)", "toluene": "CCSD(T)"}
#: sha256 of the official zips: not published by sGDML -> None (size/format are verified instead).
SHA256: dict[str, str | None] = {stem: None for stem in MOLECULES.values()}
PAPER_SEED = 42
#: The paper's MD17 split seeds (one: the halving of the official test file).
PAPER_SEEDS: tuple[int, ...] = (PAPER_SEED,)
TARGET_NAMES = ["energy"]
TARGET_UNITS = ["kcal/mol"]


def resolve_molecule(molecule: str) -> str:
    """Short name ('aspirin') from 'aspirin', 'aspirin_ccsd', 'aspirin CCSD', 'benzene CCSD(T)' ..."""
    key = molecule.strip().lower().split()[0]
    for short, stem in MOLECULES.items():
        if key in (short, stem):
            return short
    raise ValueError(f"MD17: unknown molecule {molecule!r}; available: {sorted(MOLECULES)}")


def remote_zip(short: str) -> RemoteFile:
    stem = MOLECULES[short]
    return RemoteFile(f"{stem}.zip", f"{BASE_URL}/{stem}.zip", SHA256.get(stem),
                      note=f"contains {stem}-train.npz and {stem}-test.npz")


def fetch_raw(folder: Path, short: str, *, allow_download: bool = True, progress: bool = True) -> tuple[Path, Path]:
    stem = MOLECULES[short]
    train, test = folder / f"{stem}-train.npz", folder / f"{stem}-test.npz"
    if train.is_file() and test.is_file():
        return train, test
    try:
        archive = ensure_file(remote_zip(short), folder, allow_download=allow_download, progress=progress)
    except DataNotFoundError as exc:
        raise DataNotFoundError(f"{exc}\n  ...or place the extracted {train.name} and {test.name} in {folder}") from exc
    wanted = {train.name, test.name}
    try:
        with zipfile.ZipFile(archive) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise DataFormatError(f"{archive}: corrupt member {bad}")
            for info in zf.infolist():
                base = Path(info.filename).name
                if base in wanted and not info.is_dir():
                    with zf.open(info) as src, atomic_open(folder / base) as out:
                        shutil.copyfileobj(src, out)
                    wanted.discard(base)
    except zipfile.BadZipFile as exc:
        raise DataFormatError(f"{archive}: not a readable zip file ({exc}); delete it and retry") from exc
    if wanted:
        raise DataFormatError(f"{archive}: does not contain {sorted(wanted)}")
    return train, test


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """z, R, E (flattened to [m]) and F, checked; ``allow_pickle=False`` so no code can run."""
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("z", "R", "E", "F") if k not in f.files]
            if missing:
                raise DataFormatError(f"{path}: missing keys {missing} (has {f.files})")
            out = {k: np.asarray(f[k]) for k in ("z", "R", "E", "F")}
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        if isinstance(exc, DataFormatError):
            raise
        raise DataFormatError(f"{path}: not a plain sGDML npz file ({exc})") from exc
    z, R, E, F = out["z"], out["R"], out["E"], out["F"]
    m = R.shape[0] if R.ndim == 3 else -1
    if z.ndim != 1 or R.ndim != 3 or R.shape[1:] != (z.shape[0], 3) or F.shape != R.shape \
            or E.reshape(-1).shape[0] != m or not np.issubdtype(z.dtype, np.integer):
        raise DataFormatError(f"{path}: inconsistent shapes z{z.shape} R{R.shape} E{E.shape} F{F.shape}")
    out["E"] = E.reshape(-1).astype(np.float64)
    return out


class MD17(MolecularDataset):
    """One MD17 CCSD/CCSD(T) molecule (see the module docstring).

    Args:
        molecule: 'aspirin', 'benzene', 'malonaldehyde', 'ethanol' or 'toluene' (default 'aspirin').
    """

    name = "md17"
    PROCESS_VERSION = 1

    def __init__(self, root=None, transform=None, *, molecule: str = "aspirin", **kwargs: Any):
        self.molecule = resolve_molecule(molecule)
        super().__init__(root, transform, **kwargs)

    def _cache_params(self) -> dict[str, Any]:
        return {"molecule": self.molecule}

    def _cache_path(self):
        path = super()._cache_path()
        return None if path is None else path.with_name(f"{MOLECULES[self.molecule]}_{path.name}")

    def _raw_paths_for_fingerprint(self) -> list[Path]:
        stem = MOLECULES[self.molecule]
        paths = [self.raw_folder / f"{stem}-{p}.npz" for p in ("train", "test")]
        return [p for p in paths if p.exists()]

    def _build(self):
        stem = MOLECULES[self.molecule]
        train, test = fetch_raw(self.raw_folder, self.molecule, allow_download=self.allow_download,
                                progress=self.progress)
        builder = StorageBuilder(atom_fields={"force": (torch.float32, (3,))}, string_fields=("name",))
        sizes = {}
        for part, path in (("train", train), ("test", test)):
            arrays = read_npz(path)
            z = arrays["z"].astype(np.int64)
            for j in range(arrays["R"].shape[0]):
                mol_id = f"{stem}-{part}[{j}]"
                y = validate_molecule(mol_id, z, arrays["R"][j], arrays["E"][j:j + 1], TARGET_NAMES)
                if not np.isfinite(arrays["F"][j]).all():
                    raise DataFormatError(f"molecule {mol_id}: non-finite forces")
                builder.add(z=z, pos=arrays["R"][j], y=y, idx=len(builder), force=arrays["F"][j], name=mol_id)
            sizes[part] = int(arrays["R"].shape[0])
        data, slices = builder.build(1)
        meta = {"target_names": TARGET_NAMES, "target_units": TARGET_UNITS, "target_aliases": {"E": "energy"},
                "source": f"sGDML {stem}.zip", "molecule": self.molecule,
                "level_of_theory": LEVEL_OF_THEORY[self.molecule],
                "n_train": sizes["train"], "n_test": sizes["test"], "skipped": {}}
        return data, slices, meta

    def paper_split(self, seed: int = PAPER_SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(train, val, test) row indices: official train file; official test file halved with ``seed``."""
        return paper_split(self.meta["n_train"], self.meta["n_test"], seed)


def paper_split(n_train: int, n_test: int, seed: int = PAPER_SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The paper's MD17 split for a dataset ordered [official train rows, official test rows].

    Equals ``torch.utils.data.random_split(test, [n_test // 2, n_test - n_test // 2],
    generator=torch.Generator().manual_seed(seed))`` on the test file (which draws one ``randperm``).
    """
    val, test = torch_random_split(n_test, [n_test // 2, n_test - n_test // 2], seed)
    return np.arange(n_train, dtype=np.int64), val + n_train, test + n_train
