"""Dataset loaders for ABP: PyG ``InMemoryDataset`` subclasses with one uniform API.

Every ``Data`` object holds ``z`` (long [n]), ``pos`` (float32 [n, 3], Å), ``y`` (float32
[1, num_targets]), ``idx`` (long scalar: the molecule's row in the full dataset) and ``name`` (plus
dataset-specific extras such as ``smiles``, ``mulliken``, ``force`` or ``homo_coeff``). Every dataset
exposes ``target_names``, ``target_units`` and ``target_index(name_or_int)``.

Data root: ``root`` argument, else ``$ABP_DATA_DIR``, else ``platformdirs.user_cache_dir("abp")``;
raw files in ``<root>/<dataset>/`` (official layout), processed caches in
``<root>/<dataset>/processed/`` (or ``$ABP_CACHE_DIR/<dataset>/``). See :mod:`abp_core.data.common`.

>>> from abp_core.data import get_dataset
>>> ds = get_dataset("qm9", max_molecules=2000)          # embedded, no download
>>> ds.target_names[ds.target_index("homo")], ds.target_units[2]
('homo', 'eV')
"""
from __future__ import annotations

from typing import Any

from .common import (BOHR_TO_ANGSTROM, HARTREE_TO_EV, SUPPORTED_Z, ChecksumError, DataFormatError,
                     DataNotFoundError, DatasetError, MissingTargetError, MolData, MolecularDataset,
                     SelectTargets, TooFewAtomsError, UnitError, UnknownElementError, data_root, download,
                     sha256sum, verify_sha256)
from . import md17, oe62, qm7b, qm8, qm9, qmugs
from .md17 import MD17
from .oe62 import OE62
from .qm7b import QM7b
from .qm8 import QM8
from .qm9 import QM9
from .qmugs import QMugs
from .splits import Standardizer, random_split

DATASETS: dict[str, type[MolecularDataset]] = {
    "qm9": QM9,
    "qm7b": QM7b,
    "qm8": QM8,
    "md17": MD17,
    "oe62": OE62,
    "qmugs": QMugs,
}


def get_dataset(name: str, root: Any = None, **kwargs: Any) -> MolecularDataset:
    """Instantiate a dataset by registry name ('qm9', 'qm7b', 'qm8', 'md17', 'oe62', 'qmugs').

    ``kwargs`` go to the class (e.g. ``max_molecules=`` for QM9/QMugs, ``molecule=`` for MD17,
    ``source=``/``levels=`` for OE62, and ``transform=``, ``cache_dir=``, ``force_reload=``,
    ``download=`` for all).
    """
    key = str(name).strip().lower()
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; available: {sorted(DATASETS)}")
    return DATASETS[key](root, **kwargs)


#: The seeds (or split numbers) of the paper's splits, per dataset (each dataset module's ``PAPER_SEEDS``).
PAPER_SEEDS: dict[str, tuple[int, ...]] = {
    "qm7b": qm7b.PAPER_SEEDS, "qm9": qm9.PAPER_SEEDS, "qm8": qm8.PAPER_SEEDS, "qmugs": qmugs.PAPER_SEEDS,
    "md17": md17.PAPER_SEEDS, "oe62": oe62.PAPER_SEEDS,
}


def paper_split(dataset: str, seed: int, *, root: Any = None, n: int | None = None, n_train: int | None = None,
                n_test: int | None = None):
    """The paper's split ``seed`` of ``dataset`` without loading it: each dataset module's ``paper_split``.

    QM7b and OE62 read their released split files under ``root``; MD17 needs ``n_train`` and ``n_test``
    (the official files' sizes); QM9, QM8 and QMugs need ``n``, the number of molecules. A loaded dataset
    has the same as a method: ``ds.paper_split(seed)``.
    """
    key = str(dataset).strip().lower()
    if key in ("qm7b", "oe62"):
        return (qm7b if key == "qm7b" else oe62).paper_split(seed, root)
    if key == "md17":
        if n_train is None or n_test is None:
            raise ValueError("md17 needs n_train and n_test (or use MD17(...).paper_split())")
        return md17.paper_split(n_train, n_test, seed)
    if key in ("qm9", "qm8", "qmugs"):
        if n is None:
            raise ValueError(f"{key} needs n, the number of molecules")
        return {"qm9": qm9, "qm8": qm8, "qmugs": qmugs}[key].paper_split(seed, n)
    raise ValueError(f"unknown dataset {dataset!r}; available: {sorted(DATASETS)}")


__all__ = [
    "DATASETS", "get_dataset", "MolecularDataset", "MolData", "SelectTargets",
    "QM9", "QM7b", "QM8", "MD17", "OE62", "QMugs",
    "random_split", "paper_split", "PAPER_SEEDS", "Standardizer",
    "data_root", "download", "sha256sum", "verify_sha256",
    "DatasetError", "ChecksumError", "DataFormatError", "DataNotFoundError", "MissingTargetError",
    "TooFewAtomsError", "UnitError", "UnknownElementError",
    "BOHR_TO_ANGSTROM", "HARTREE_TO_EV", "SUPPORTED_Z",
]
