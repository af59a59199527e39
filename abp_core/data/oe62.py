"""OE62: 61,489 organic molecules from crystal structures, orbital energies at several levels of theory.

Two sources, selected with ``source=``:

``"json"`` (default) -- the original release ``df_62k.json`` (Stuke et al., Sci. Data 7, 58 (2020)),
    TUM mediaTUM record 1507656; file URL :data:`JSON_FILE` (the whole record is also served as a zip at
    ``https://dataserv.ub.tum.de/s/m1507656/download``). No sha256 is published in a form we could pin,
    so the format is verified instead. Read with ``pd.read_json(path, orient="split")``. Per row:
    ``refcode_csd``, ``canonical_smiles``, ``xyz_pbe_relaxed`` (an XYZ file as a string, Å) and orbital
    energies in eV per level of theory (:data:`LEVELS`): ``energies_occ_<level>`` ascending, the HOMO is
    the LAST entry; ``energies_unocc_<level>`` (virtual levels below vacuum) ascending, the LUMO is the
    FIRST entry (GW at the CBS limit: ``cbs_occ_gw`` / ``cbs_unocc_gw``). Targets are
    ``homo_<level>``, ``lumo_<level>`` for each requested level (default only ``pbe0_vac_tier2``, the
    level every molecule has). ``idx`` is the row of ``df_62k.json``; ``name`` the CSD refcode.

``"db"`` -- Chen et al.'s ASE database ``dataset_OE62_all.db`` (61,480 rows, the OWA paper's data, the
    one the ABP paper's OE62 comparison and its splits use). Rows carry ``HOMO`` and ``LUMO`` (eV) and a
    per-atom ``coeff`` array (HOMO orbital coefficients) in ``row.data`` (schnetpack ``AtomsData``
    layout; key-value pairs are accepted for the scalars). Exposed as ``y = [HOMO, LUMO]`` and
    ``homo_coeff`` [n]. ``idx`` is the 0-based row (ASE id - 1), the index space of :func:`paper_split`.
    The file lives on the MPCDF GitLab of Chen et al. (no stable direct URL): place it at
    ``<root>/oe62/dataset_OE62_all.db``.

The paper's 5 splits (32,000 / 19,480 / 10,000 rows of the db) come from the paper repository's
``SchNet_OE62/splits/`` (commit c70d0c4); :func:`paper_split` verifies their embedded sha256 before
loading them (``allow_pickle=False``) from ``<root>/oe62_splits/``.

Policy: a molecule lacking a requested level (the GW and TZVP/QZVP levels only cover subsets), or with
an empty level list, is skipped and the count logged (``missing="error"`` raises instead); one-atom
entries are skipped and logged. Unknown elements and coordinates that are not in Å raise.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .common import (DataFormatError, MissingTargetError, MolecularDataset, RemoteFile,
                     SkipLog, StorageBuilder, TooFewAtomsError, data_root, ensure_file, symbols_to_z,
                     validate_molecule)

logger = logging.getLogger(__name__)

JSON_FILE = RemoteFile("df_62k.json", "https://dataserv.ub.tum.de/s/m1507656/download?path=%2F&files=df_62k.json",
                       sha256=None, note="OE62, TUM mediaTUM record 1507656 (https://mediatum.ub.tum.de/1507656)")
DB_FILE = RemoteFile("dataset_OE62_all.db", None, sha256=None,
                     note="Chen et al.'s OWA dataset (ASE db), from their MPCDF GitLab repository")
NUM_JSON_ROWS = 61_489
NUM_DB_ROWS = 61_480

#: level -> (occupied column, unoccupied column)
LEVELS: dict[str, tuple[str, str]] = {
    "pbe": ("energies_occ_pbe", "energies_unocc_pbe"),
    "pbe0_vac_tier2": ("energies_occ_pbe0_vac_tier2", "energies_unocc_pbe0_vac_tier2"),
    "pbe0_vac_tzvp": ("energies_occ_pbe0_vac_tzvp", "energies_unocc_pbe0_vac_tzvp"),
    "pbe0_vac_qzvp": ("energies_occ_pbe0_vac_qzvp", "energies_unocc_pbe0_vac_qzvp"),
    "pbe0_water": ("energies_occ_pbe0_water", "energies_unocc_pbe0_water"),
    "gw_cbs": ("cbs_occ_gw", "cbs_unocc_gw"),
    "gw_tzvp": ("energies_occ_gw_tzvp", "energies_unocc_gw_tzvp"),
    "gw_qzvp": ("energies_occ_gw_qzvp", "energies_unocc_gw_qzvp"),
}
DEFAULT_LEVELS = ("pbe0_vac_tier2",)

SPLIT_COMMIT = "c70d0c4a5c16bd9f747b16f00bef8880671bb824"
SPLIT_URL = ("https://raw.githubusercontent.com/davidbuterez/attention-based-pooling-for-quantum-properties/"
             f"{SPLIT_COMMIT}/SchNet_OE62/splits/split_32000_19480_10000_{{i}}.npz")
SPLIT_SHA256 = {
    0: "23a94caeef06fedc6c6f93046c1bbd2ee52f4d8ac068c7b6c3cf74eab554d22b",
    1: "68c59bcdfbdab568185ad4c85d3a0cd18081fd1d5752dd152cf81834012fad1d",
    2: "ecb98e0a10c8d07201d2c44f609cef28d4403e675971aebe858bbd55691501d5",
    3: "92595a0db8d3fddf6aeb64568a05c68d04c6a6f11285b560efc8c53baba80f78",
    4: "923b47fd16e3bc24a2db7a094ab175a602ed723cedcf0eb0ef9ac067d33718c8",
}
SPLIT_SIZES = (32_000, 19_480, 10_000)
#: The paper's OE62 splits (the released index files 0..4).
PAPER_SEEDS: tuple[int, ...] = tuple(SPLIT_SHA256)


def split_file(i: int) -> RemoteFile:
    if i not in SPLIT_SHA256:
        raise ValueError(f"OE62: the paper released splits 0..4, not {i!r}")
    return RemoteFile(f"split_32000_19480_10000_{i}.npz", SPLIT_URL.format(i=i), SPLIT_SHA256[i])


def paper_split(i: int, root=None, *, allow_download: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train_idx, val_idx, test_idx) of the paper's OE62 split ``i`` (rows of Chen et al.'s db)."""
    folder = data_root(root) / "oe62_splits"
    path = ensure_file(split_file(i), folder, allow_download=allow_download)
    with np.load(path, allow_pickle=False) as f:
        try:
            out = tuple(np.asarray(f[k], dtype=np.int64).reshape(-1) for k in ("train_idx", "val_idx", "test_idx"))
        except KeyError as exc:
            raise DataFormatError(f"{path}: missing key {exc} (has {f.files})") from exc
    if tuple(len(a) for a in out) != SPLIT_SIZES:
        raise DataFormatError(f"{path}: split sizes {[len(a) for a in out]}, expected {SPLIT_SIZES}")
    return out  # type: ignore[return-value]


def parse_xyz(text: str, mol_id: Any) -> tuple[list[str], np.ndarray]:
    """Symbols and [n, 3] coordinates of an XYZ file given as a string."""
    lines = str(text).strip("\n").splitlines()
    try:
        n = int(lines[0].split()[0])
    except (IndexError, ValueError) as exc:
        raise DataFormatError(f"molecule {mol_id}: XYZ string does not start with an atom count") from exc
    if len(lines) < n + 2:
        raise DataFormatError(f"molecule {mol_id}: XYZ string has {len(lines) - 2} atom lines for {n} atoms")
    symbols, pos = [], np.empty((n, 3), dtype=np.float64)
    for k, line in enumerate(lines[2:2 + n]):
        parts = line.split()
        try:
            symbols.append(parts[0])
            pos[k] = [float(v) for v in parts[1:4]]
        except (IndexError, ValueError) as exc:
            raise DataFormatError(f"molecule {mol_id}: bad XYZ atom line {line!r}") from exc
    return symbols, pos


def _level_value(value: Any, take_last: bool) -> float:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return math.nan
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        return math.nan
    return float(arr[-1] if take_last else arr[0])


def _scalar(row: Any, key: str) -> float:
    data = getattr(row, "data", None) or {}
    if key in data:
        return float(np.asarray(data[key], dtype=np.float64).reshape(-1)[0])
    kvp = getattr(row, "key_value_pairs", None) or {}
    if key in kvp:
        return float(kvp[key])
    return math.nan


class OE62(MolecularDataset):
    """OE62 from ``df_62k.json`` or from Chen et al.'s ASE db (see the module docstring).

    Args:
        source: ``"json"`` or ``"db"``.
        levels: levels of theory for ``source="json"`` (names in :data:`LEVELS`, or ``"all"``).
        missing: ``"skip"`` (logged) or ``"error"`` for molecules lacking a requested level.
    """

    name = "oe62"
    PROCESS_VERSION = 1

    def __init__(self, root=None, transform=None, *, source: str = "json",
                 levels: Sequence[str] | str = DEFAULT_LEVELS, missing: str = "skip", **kwargs: Any):
        if source not in ("json", "db"):
            raise ValueError(f"OE62 source must be 'json' or 'db', got {source!r}")
        if missing not in ("skip", "error"):
            raise ValueError(f"missing must be 'skip' or 'error', got {missing!r}")
        if isinstance(levels, str):
            levels = tuple(LEVELS) if levels == "all" else (levels,)
        unknown = [lvl for lvl in levels if lvl not in LEVELS]
        if unknown:
            raise ValueError(f"OE62: unknown level(s) {unknown}; available: {list(LEVELS)}")
        self.source = source
        self.levels = tuple(levels)
        self.missing = missing
        super().__init__(root, transform, **kwargs)

    def _cache_params(self) -> dict[str, Any]:
        return {"source": self.source, "levels": list(self.levels) if self.source == "json" else None,
                "missing": self.missing}

    def _raw_paths_for_fingerprint(self) -> list[Path]:
        path = self.raw_folder / (JSON_FILE if self.source == "json" else DB_FILE).relpath
        return [path] if path.exists() else []

    def _build(self):
        return self._build_json() if self.source == "json" else self._build_db()

    # ---- df_62k.json ------------------------------------------------------------------------------
    def _build_json(self):
        import pandas as pd

        path = ensure_file(JSON_FILE, self.raw_folder, allow_download=self.allow_download, progress=self.progress)
        try:
            df = pd.read_json(path, orient="split")
        except ValueError as exc:
            raise DataFormatError(f"{path}: not a pandas 'split' JSON table ({exc})") from exc
        needed = ["refcode_csd", "xyz_pbe_relaxed"] + [c for lvl in self.levels for c in LEVELS[lvl]]
        absent = [c for c in needed if c not in df.columns]
        if absent:
            raise DataFormatError(f"{path}: missing columns {absent}; has {list(df.columns)}")
        target_names = [f"{kind}_{lvl}" for lvl in self.levels for kind in ("homo", "lumo")]
        skips = SkipLog("oe62")
        builder = StorageBuilder(string_fields=("name", "smiles"))
        has_smiles = "canonical_smiles" in df.columns
        from tqdm.auto import tqdm

        columns = {c: df[c].tolist() for c in needed + (["canonical_smiles"] if has_smiles else [])}
        for i in tqdm(range(len(df)), desc="oe62", disable=not self.progress):
            rec = {c: values[i] for c, values in columns.items()}
            mol_id = f"{rec['refcode_csd']} (row {i})"
            symbols, pos = parse_xyz(rec["xyz_pbe_relaxed"], mol_id)
            z = symbols_to_z(symbols, mol_id)
            y = []
            for lvl in self.levels:
                occ, unocc = LEVELS[lvl]
                y += [_level_value(rec[occ], take_last=True), _level_value(rec[unocc], take_last=False)]
            try:
                yi = validate_molecule(mol_id, z, pos, np.asarray(y), target_names)
            except TooFewAtomsError:
                skips.add("with fewer than 2 atoms", mol_id)
                continue
            except MissingTargetError as exc:
                if self.missing == "error":
                    raise
                bad = [n for n, v in zip(target_names, y) if not np.isfinite(v)]
                skips.add("lacking a requested level", mol_id, ",".join(bad))
                continue
            builder.add(z=z, pos=pos, y=yi, idx=i, name=str(rec["refcode_csd"]),
                        smiles=str(rec["canonical_smiles"]) if has_smiles else "")
        skips.report(len(builder))
        data, slices = builder.build(len(target_names))
        meta = {"target_names": target_names, "target_units": ["eV"] * len(target_names),
                "target_aliases": {}, "source": "df_62k.json", "levels": list(self.levels),
                "skipped": skips.as_dict(), "num_rows": len(df)}
        return data, slices, meta

    # ---- Chen et al.'s ASE db ----------------------------------------------------------------------
    def _build_db(self):
        import ase.db

        path = ensure_file(DB_FILE, self.raw_folder, allow_download=False)
        target_names = ["HOMO", "LUMO"]
        skips = SkipLog("oe62-db")
        builder = StorageBuilder(atom_fields={"homo_coeff": (torch.float32, ())}, string_fields=("name",))
        try:
            db = ase.db.connect(str(path), type="db")
            rows = list(db.select(sort="id"))
        except Exception as exc:  # sqlite errors, wrong file type ...
            raise DataFormatError(f"{path}: not a readable ASE database ({exc})") from exc
        ids = [r.id for r in rows]
        if ids != list(range(1, len(ids) + 1)):
            logger.warning("oe62-db: ids are not 1..%d; idx follows the row order", len(ids))
        for i, row in enumerate(rows):
            kvp = row.key_value_pairs or {}
            label = kvp.get("refcode_csd") or kvp.get("refcode") or f"row{row.id}"
            mol_id = f"{label} (db id {row.id})"
            z = np.asarray(row.numbers, dtype=np.int64)
            pos = np.asarray(row.positions, dtype=np.float64)
            y = [_scalar(row, "HOMO"), _scalar(row, "LUMO")]
            data = row.data or {}
            if "coeff" not in data:
                raise DataFormatError(f"{path}: molecule {mol_id} has no 'coeff' array in its data")
            coeff = np.asarray(data["coeff"], dtype=np.float64).reshape(-1)
            try:
                yi = validate_molecule(mol_id, z, pos, np.asarray(y), target_names)
            except TooFewAtomsError:
                skips.add("with fewer than 2 atoms", mol_id)
                continue
            if coeff.shape[0] != z.shape[0] or not np.isfinite(coeff).all():
                raise DataFormatError(f"{path}: molecule {mol_id}: coeff has {coeff.shape[0]} finite="
                                      f"{bool(np.isfinite(coeff).all())} values for {z.shape[0]} atoms")
            builder.add(z=z, pos=pos, y=yi, idx=i, homo_coeff=coeff, name=str(label))
        skips.report(len(builder))
        out, slices = builder.build(2)
        meta = {"target_names": target_names, "target_units": ["eV", "eV"],
                "target_aliases": {"homo": "HOMO", "lumo": "LUMO"}, "source": DB_FILE.relpath,
                "skipped": skips.as_dict(), "num_rows": len(rows)}
        return out, slices, meta

    def paper_split(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The paper's split ``i`` (0..4) as row indices; only meaningful for ``source="db"``."""
        if self.source != "db":
            raise ValueError("the paper's OE62 splits index rows of Chen et al.'s db: use OE62(source='db')")
        train, val, test = paper_split(i, self.data_root, allow_download=self.allow_download)
        if self.skipped or len(self) != self.meta["num_rows"]:
            raise DataFormatError("oe62-db: molecules were skipped, so row indices no longer line up "
                                  "with the paper's split files")
        top = max(train.max(), val.max(), test.max())
        if top >= len(self):
            raise DataFormatError(f"paper split {i} indexes row {top} but the db has {len(self)} rows")
        return train, val, test
