"""Shared machinery for the dataset loaders: data root, downloads, checksums, validation, caching.

Data root convention
--------------------
Every loader keeps its raw files under ``<root>/<dataset>/`` in the layout of the official release
(for example ``<root>/qm7b/23887/train.npy`` or ``<root>/qm8/qm8.sdf``). ``<root>`` is, in order:

1. the explicit ``root`` argument,
2. the environment variable ``ABP_DATA_DIR``,
3. ``platformdirs.user_cache_dir("abp")``.

Processed caches (``*.pt``) go to ``<root>/<dataset>/processed/`` unless a ``cache_dir`` argument or the
environment variable ``ABP_CACHE_DIR`` says otherwise (then ``<cache_dir>/<dataset>/``). When the data
root is read-only (for example a shared folder), the cache falls back to
``<user_cache_dir("abp")>/processed/<dataset>/`` and says so in the log.

Validation
----------
Every molecule goes through :func:`validate_molecule` (atomic numbers in 1..86, finite coordinates in Å,
no pair closer than 0.5 Å, at least one plausibly bonded pair, finite targets). Problems raise a
:class:`DatasetError` subclass (all are ``ValueError``) that names the molecule; loaders that
legitimately skip entries do so through :class:`SkipLog`, which logs the count and examples.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import urllib.error
import urllib.request
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch_geometric.data import Data, InMemoryDataset

from ..files import atomic_open

logger = logging.getLogger("abp_core.data")

#: 1 Bohr in Å (CODATA 2018).
BOHR_TO_ANGSTROM = 0.529177210903
#: 1 Hartree in eV (CODATA 2018).
HARTREE_TO_EV = 27.211386245988
#: Atomic numbers every loader accepts (H..Rn).
SUPPORTED_Z = frozenset(range(1, 87))
#: No two atoms of a molecule may be closer than this (Å).
MIN_PAIR_DISTANCE = 0.5
#: A molecule must hold at least one pair with d / (r_cov,i + r_cov,j) below this ratio. Real molecules
#: in Å have a smallest ratio of about 0.75-1.2 (H2: 1.19); the same molecules read from Bohr as Å
#: have >= 1.46 (N2), so anything above 1.4 means "no atom has a bonded neighbour": wrong unit.
MAX_BOND_RATIO = 1.4

ENV_DATA_DIR = "ABP_DATA_DIR"
ENV_CACHE_DIR = "ABP_CACHE_DIR"


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------
class DatasetError(ValueError):
    """Base class of every data problem raised by the loaders."""


class ChecksumError(DatasetError):
    """A file's sha256 (or size) differs from the published value."""


class UnknownElementError(DatasetError):
    """An element symbol or atomic number the loaders do not support."""


class MissingTargetError(DatasetError):
    """A target value is missing, NaN or infinite."""


class UnitError(DatasetError):
    """Coordinates that cannot be in Å (overlapping atoms, or Bohr read as Å)."""


class TooFewAtomsError(DatasetError):
    """A molecule with fewer atoms than the dataset allows (for example one atom)."""


class DataFormatError(DatasetError):
    """A raw file that does not have the official format."""


class DataNotFoundError(FileNotFoundError):
    """A raw file is missing and could not be downloaded; the message says where to put it."""


# --------------------------------------------------------------------------------------------------
# Data root / cache directory
# --------------------------------------------------------------------------------------------------
def data_root(root: str | os.PathLike | None = None) -> Path:
    """The data root: explicit ``root``, else ``$ABP_DATA_DIR``, else ``user_cache_dir("abp")``."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get(ENV_DATA_DIR)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("abp"))


def _writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


def cache_dir_for(name: str, root: Path, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """Where the processed cache of dataset ``name`` lives (see the module docstring).

    Returns ``None`` when no writable location exists (the dataset is then kept in memory only).
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser() / name
    env = os.environ.get(ENV_CACHE_DIR)
    if env:
        return Path(env).expanduser() / name
    default = root / name / "processed"
    if _writable_dir(default):
        return default
    import platformdirs

    fallback = Path(platformdirs.user_cache_dir("abp")) / "processed" / name
    if _writable_dir(fallback):
        logger.info("%s: data root %s is not writable; caching processed data in %s", name, root, fallback)
        return fallback
    logger.warning("%s: no writable cache directory (tried %s and %s); processing in memory only",
                   name, default, fallback)
    return None


# --------------------------------------------------------------------------------------------------
# Checksums and downloads
# --------------------------------------------------------------------------------------------------
def sha256sum(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_sha256(path: str | os.PathLike, expected: str, size: int | None = None) -> None:
    """Raise :class:`ChecksumError` naming ``path`` unless its sha256 (and size, if given) match.

    The file is only read as bytes: nothing is parsed or unpickled.
    """
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"{path}: file not found (expected sha256 {expected})")
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        raise ChecksumError(
            f"{path}: size {actual_size} B differs from the published {size} B "
            f"(truncated or wrong file; expected sha256 {expected}). Refusing to use it."
        )
    actual = sha256sum(path)
    if actual.lower() != expected.lower():
        raise ChecksumError(
            f"{path}: sha256 {actual} differs from the published {expected} "
            f"({actual_size} B; tampered, truncated or wrong file). Refusing to use it."
        )


@dataclass(frozen=True)
class RemoteFile:
    """A raw file of a dataset: where it goes under ``<root>/<dataset>/``, its URL and checksum.

    ``sha256=None`` means no published checksum is known; the loader then checks size (if known)
    and the file's format instead.
    """

    relpath: str
    url: str | None
    sha256: str | None = None
    size: int | None = None
    note: str = ""


def _missing_file_message(url: str | None, path: Path, sha256: str | None, size: int | None,
                          reason: str, note: str = "") -> str:
    lines = [f"{reason}", f"  Download it yourself and place it at: {path}"]
    if url:
        lines.insert(1, f"  URL: {url}")
    lines.append(f"  expected sha256: {sha256 if sha256 else 'not published (format is checked instead)'}")
    if size is not None:
        lines.append(f"  expected size: {size} bytes")
    if note:
        lines.append(f"  note: {note}")
    lines.append(f"  (or set {ENV_DATA_DIR} / pass root= to a folder that already holds it)")
    return "\n".join(lines)


def download(url: str, path: str | os.PathLike, sha256: str | None = None, size: int | None = None, *,
             progress: bool = True, timeout: float = 60.0, note: str = "") -> Path:
    """Download ``url`` to ``path`` atomically, with a tqdm progress bar and checksum verification.

    The bytes go to a temporary file beside ``path``; the size and sha256 (when given) are checked and
    only then is the file moved into place (:func:`abp_core.files.atomic_open`), so ``path`` is never
    left half written. Without network the :class:`DataNotFoundError` names the URL, the expected path and the
    sha256, so the file can be placed by hand.
    """
    from tqdm.auto import tqdm

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        response = urllib.request.urlopen(url, timeout=timeout)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise DataNotFoundError(_missing_file_message(
            url, path, sha256, size, f"Could not download {path.name} ({exc}).", note)) from exc

    total = size
    header = getattr(response, "headers", None)
    if total is None and header is not None and header.get("Content-Length"):
        try:
            total = int(header.get("Content-Length"))
        except ValueError:
            total = None
    h = hashlib.sha256()
    written = 0
    # the checks run inside the atomic write: a failed one removes the temporary file, path stays absent
    with atomic_open(path) as out, tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                                        desc=path.name, disable=not progress) as bar:
        with response:
            while True:
                try:
                    chunk = response.read(1 << 20)
                except OSError as exc:
                    raise DataNotFoundError(_missing_file_message(
                        url, path, sha256, size,
                        f"Download of {path.name} broke off after {written} bytes ({exc}).", note)) from exc
                if not chunk:
                    break
                out.write(chunk)
                h.update(chunk)
                written += len(chunk)
                bar.update(len(chunk))
        if size is not None and written != size:
            raise ChecksumError(f"{path}: downloaded {written} B from {url} but expected {size} B "
                                f"(truncated download). Nothing was written to {path}.")
        if sha256 is not None and h.hexdigest().lower() != sha256.lower():
            raise ChecksumError(f"{path}: sha256 of the download from {url} is {h.hexdigest()}, "
                                f"expected {sha256}. Nothing was written to {path}.")
    logger.info("downloaded %s (%d B) to %s", url, written, path)
    return path


def ensure_file(remote: RemoteFile, folder: Path, *, allow_download: bool = True,
                progress: bool = True) -> Path:
    """Return ``folder / remote.relpath``, downloading it if missing, verified against its checksum."""
    path = folder / remote.relpath
    if path.is_file():
        if remote.sha256 is not None:
            verify_sha256(path, remote.sha256, remote.size)
        elif remote.size is not None and path.stat().st_size != remote.size:
            raise ChecksumError(f"{path}: size {path.stat().st_size} B differs from the published "
                                f"{remote.size} B (truncated or wrong file)")
        return path
    if remote.url is None or not allow_download:
        raise DataNotFoundError(_missing_file_message(
            remote.url, path, remote.sha256, remote.size, f"Missing raw file {path.name}.", remote.note))
    return download(remote.url, path, remote.sha256, remote.size, progress=progress, note=remote.note)


def file_fingerprint(paths: Iterable[Path]) -> list[list[Any]]:
    """Cheap identity of raw files for cache keys: name, size and mtime (ns)."""
    out = []
    for p in paths:
        st = Path(p).stat()
        out.append([Path(p).name, st.st_size, st.st_mtime_ns])
    return out


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------
def _ase_tables():
    from ase.data import atomic_numbers, chemical_symbols, covalent_radii

    return atomic_numbers, chemical_symbols, covalent_radii


def symbols_to_z(symbols: Sequence[str], mol_id: Any) -> np.ndarray:
    """Atomic numbers of element symbols (case-insensitive); unknown symbols name the molecule."""
    atomic_numbers, _, _ = _ase_tables()
    out = np.empty(len(symbols), dtype=np.int64)
    for i, s in enumerate(symbols):
        key = str(s).strip()
        key = key[:1].upper() + key[1:].lower()
        z = atomic_numbers.get(key)
        if z is None or z not in SUPPORTED_Z:
            raise UnknownElementError(f"molecule {mol_id}: unknown or unsupported element {s!r} "
                                      f"(atom {i}); supported are Z = 1..86")
        out[i] = z
    return out


def check_atomic_numbers(z: np.ndarray, mol_id: Any) -> None:
    z = np.asarray(z)
    bad = [int(v) for v in z.reshape(-1) if int(v) not in SUPPORTED_Z]
    if bad:
        raise UnknownElementError(f"molecule {mol_id}: unsupported atomic number(s) {sorted(set(bad))}; "
                                  f"supported are Z = 1..86")


def check_atom_count(z: np.ndarray, mol_id: Any, min_atoms: int = 2) -> None:
    n = int(np.asarray(z).shape[0])
    if n < min_atoms:
        raise TooFewAtomsError(f"molecule {mol_id}: {n} atom(s); this dataset needs at least {min_atoms}")


def check_geometry(z: np.ndarray, pos: np.ndarray, mol_id: Any) -> None:
    """Coordinates must be finite, [n, 3], in Å: no pair < 0.5 Å, and at least one bonded-looking pair.

    "Bonded-looking": d_ij / (r_cov,i + r_cov,j) <= 1.4 (Cordero covalent radii). Coordinates in Bohr
    read as Å stretch every bond by 1.89 and fail this test (see :data:`MAX_BOND_RATIO`).
    """
    z = np.asarray(z)
    pos = np.asarray(pos, dtype=np.float64)
    if pos.ndim != 2 or pos.shape[1] != 3 or pos.shape[0] != z.shape[0]:
        raise DataFormatError(f"molecule {mol_id}: positions have shape {tuple(pos.shape)}, "
                              f"expected ({z.shape[0]}, 3)")
    if not np.isfinite(pos).all():
        raise UnitError(f"molecule {mol_id}: non-finite coordinates")
    n = pos.shape[0]
    if n < 2:
        return
    iu, ju = np.triu_indices(n, k=1)
    d = np.linalg.norm(pos[iu] - pos[ju], axis=1)
    k = int(np.argmin(d))
    if d[k] < MIN_PAIR_DISTANCE:
        raise UnitError(
            f"molecule {mol_id}: atoms {iu[k]} and {ju[k]} are {d[k]:.3f} Å apart (< {MIN_PAIR_DISTANCE} Å): "
            f"overlapping atoms, or coordinates not in Å")
    _, _, covalent_radii = _ase_tables()
    r = covalent_radii[z.astype(np.int64)]
    ratio = d / (r[iu] + r[ju])
    m = int(np.argmin(ratio))
    if ratio[m] > MAX_BOND_RATIO:
        raise UnitError(
            f"molecule {mol_id}: no bonded-looking atom pair (shortest relative distance "
            f"{ratio[m]:.2f} x covalent radii, shortest distance {d.min():.3f}); are the coordinates "
            f"in Bohr rather than Å?")


def check_targets(y: np.ndarray, mol_id: Any, target_names: Sequence[str]) -> np.ndarray:
    """Targets as float64 [T]; NaN, inf or None raise :class:`MissingTargetError` naming them."""
    try:
        arr = np.asarray(y, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise MissingTargetError(f"molecule {mol_id}: targets are not numeric ({exc})") from exc
    if arr.shape[0] != len(target_names):
        raise DataFormatError(f"molecule {mol_id}: {arr.shape[0]} target values, expected {len(target_names)}")
    bad = ~np.isfinite(arr)
    if bad.any():
        names = [target_names[i] for i in np.flatnonzero(bad)]
        raise MissingTargetError(f"molecule {mol_id}: missing or non-finite target(s) {names}")
    return arr


def validate_molecule(mol_id: Any, z: np.ndarray, pos: np.ndarray, y: np.ndarray | None,
                      target_names: Sequence[str], *, min_atoms: int = 2) -> np.ndarray | None:
    """All checks in order: atom count, elements, geometry, targets. Returns y as float64 [T]."""
    check_atom_count(z, mol_id, min_atoms)
    check_atomic_numbers(z, mol_id)
    check_geometry(z, pos, mol_id)
    if y is None:
        return None
    return check_targets(y, mol_id, target_names)


class SkipLog:
    """Collects molecules a loader skips on purpose and logs how many (never silently)."""

    def __init__(self, dataset: str):
        self.dataset = dataset
        self.reasons: "OrderedDict[str, list[str]]" = OrderedDict()

    def add(self, reason: str, mol_id: Any, detail: str = "") -> None:
        self.reasons.setdefault(reason, []).append(str(mol_id) if not detail else f"{mol_id} ({detail})")

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.reasons.values())

    def report(self, kept: int) -> None:
        if not self.count:
            return
        parts = ", ".join(f"{len(v)} {k}" for k, v in self.reasons.items())
        examples = "; ".join(f"{k}: {', '.join(v[:3])}" for k, v in self.reasons.items())
        logger.warning("%s: skipped %d molecule(s) (%s), kept %d. Examples: %s",
                       self.dataset, self.count, parts, kept, examples)

    def as_dict(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in self.reasons.items()}


# --------------------------------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------------------------------
class MolData(Data):
    """A PyG ``Data`` whose ``idx`` is a scalar per molecule (stacked to [batch] by the DataLoader)."""

    def __cat_dim__(self, key: str, value: Any, *args, **kwargs):
        if key == "idx":
            return None
        return super().__cat_dim__(key, value, *args, **kwargs)


class StorageBuilder:
    """Accumulates molecules and builds PyG's collated (data, slices) directly.

    Equivalent to ``InMemoryDataset.collate([MolData(...), ...])`` (tested), without creating one
    ``Data`` object per molecule, which keeps QM9-sized processing fast.
    """

    def __init__(self, atom_fields: Mapping[str, tuple[torch.dtype, tuple[int, ...]]] | None = None,
                 string_fields: Sequence[str] = ("name",)):
        self.atom_fields = dict(atom_fields or {})
        self.string_fields = list(string_fields)
        self._z: list[np.ndarray] = []
        self._pos: list[np.ndarray] = []
        self._y: list[np.ndarray] = []
        self._idx: list[int] = []
        self._atom: dict[str, list[np.ndarray]] = {k: [] for k in self.atom_fields}
        self._str: dict[str, list[str]] = {k: [] for k in self.string_fields}

    def __len__(self) -> int:
        return len(self._idx)

    def add(self, *, z: np.ndarray, pos: np.ndarray, y: np.ndarray, idx: int, **extra: Any) -> None:
        n = int(np.asarray(z).shape[0])
        self._z.append(np.asarray(z, dtype=np.int64).reshape(n))
        self._pos.append(np.asarray(pos, dtype=np.float32).reshape(n, 3))
        self._y.append(np.asarray(y, dtype=np.float32).reshape(-1))
        self._idx.append(int(idx))
        for k, (_, shape) in self.atom_fields.items():
            v = extra.pop(k)
            self._atom[k].append(np.asarray(v, dtype=np.float32).reshape((n,) + tuple(shape)))
        for k in self.string_fields:
            self._str[k].append(str(extra.pop(k)))
        if extra:
            raise TypeError(f"unexpected fields {sorted(extra)}")

    def build(self, num_targets: int) -> tuple[MolData, dict[str, torch.Tensor]]:
        n_mol = len(self._idx)
        if n_mol == 0:
            raise DatasetError("no molecules left to store")
        counts = torch.tensor([a.shape[0] for a in self._z], dtype=torch.long)
        ptr = torch.zeros(n_mol + 1, dtype=torch.long)
        ptr[1:] = torch.cumsum(counts, 0)
        graph_ptr = torch.arange(n_mol + 1, dtype=torch.long)
        data = MolData()
        data.z = torch.from_numpy(np.concatenate(self._z))
        data.pos = torch.from_numpy(np.concatenate(self._pos))
        data.y = torch.from_numpy(np.stack(self._y).astype(np.float32).reshape(n_mol, num_targets))
        data.idx = torch.tensor(self._idx, dtype=torch.long)
        slices = {"z": ptr, "pos": ptr.clone(), "y": graph_ptr, "idx": graph_ptr.clone()}
        for k, (dtype, _) in self.atom_fields.items():
            data[k] = torch.from_numpy(np.concatenate(self._atom[k])).to(dtype)
            slices[k] = ptr.clone()
        for k in self.string_fields:
            data[k] = list(self._str[k])
            slices[k] = graph_ptr.clone()
        return data, slices


# --------------------------------------------------------------------------------------------------
# Base dataset
# --------------------------------------------------------------------------------------------------
class MolecularDataset(InMemoryDataset):
    """Base of every loader: resolves the root, caches processing on disk, exposes target metadata.

    Subclasses set ``name``, ``PROCESS_VERSION`` and implement :meth:`_cache_params`,
    :meth:`_raw_paths_for_fingerprint` and :meth:`_build` (returning ``(data, slices, meta)`` where
    ``meta`` holds at least ``target_names`` and ``target_units``).
    """

    name: ClassVar[str] = ""
    PROCESS_VERSION: ClassVar[int] = 1

    def __init__(self, root: str | os.PathLike | None = None, transform: Callable | None = None, *,
                 cache_dir: str | os.PathLike | None = None, force_reload: bool = False,
                 download: bool = True, progress: bool = True):
        self.data_root = data_root(root)
        self.raw_folder = self.data_root / self.name
        self.allow_download = download
        self.progress = progress
        self._cache_dir_arg = cache_dir
        super().__init__(root=str(self.raw_folder), transform=transform, log=False)
        self.meta: dict[str, Any] = {}
        self._load_or_process(force_reload)

    # ---- PyG hooks (download/process are deliberately not defined: we run our own pipeline) -----
    @property
    def raw_file_names(self) -> list[str]:
        return []

    @property
    def processed_file_names(self) -> list[str]:
        return []

    @property
    def raw_dir(self) -> str:
        return str(self.raw_folder)

    @property
    def processed_dir(self) -> str:
        return str(self.cache_folder) if self.cache_folder is not None else ""

    # ---- to implement ---------------------------------------------------------------------------
    def _cache_params(self) -> dict[str, Any]:
        return {}

    def _raw_paths_for_fingerprint(self) -> list[Path]:
        raise NotImplementedError

    def _build(self) -> tuple[MolData, dict[str, torch.Tensor], dict[str, Any]]:
        raise NotImplementedError

    # ---- caching --------------------------------------------------------------------------------
    @property
    def cache_folder(self) -> Path | None:
        if not hasattr(self, "_cache_folder"):
            self._cache_folder = cache_dir_for(self.name, self.data_root, self._cache_dir_arg)
        return self._cache_folder

    def _cache_key(self) -> str:
        spec = {"dataset": self.name, "version": self.PROCESS_VERSION, "params": self._cache_params(),
                "raw": file_fingerprint(self._raw_paths_for_fingerprint())}
        return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def _cache_path(self) -> Path | None:
        if self.cache_folder is None:
            return None
        return self.cache_folder / f"{self.name}_v{self.PROCESS_VERSION}_{self._cache_key()}.pt"

    def _load_or_process(self, force_reload: bool) -> None:
        path = self._cache_path()
        if path is not None and path.is_file() and not force_reload:
            try:
                data_dict, slices, meta = torch.load(path, weights_only=True)
                self._data = MolData.from_dict(data_dict)
                self._data_list = None
                self.slices = slices
                self.meta = meta
                self.processed_path = path
                return
            except Exception as exc:  # a corrupt cache is rebuilt, never trusted
                logger.warning("%s: ignoring unreadable cache %s (%s); reprocessing", self.name, path, exc)
        data, slices, meta = self._build()
        self._data = data
        self._data_list = None
        self.slices = slices
        self.meta = meta
        path = self._cache_path()  # raw files may have been downloaded by _build(): key them as they are now
        self.processed_path = path
        if path is not None:
            payload = (data.to_dict(), slices, meta)
            try:
                with atomic_open(path) as f:
                    torch.save(payload, f)
            except OSError as exc:
                logger.warning("%s: could not write cache %s (%s)", self.name, path, exc)
                self.processed_path = None

    # ---- access ---------------------------------------------------------------------------------
    def get(self, idx: int) -> MolData:
        if self.len() == 1:  # PyG returns the whole storage for a single graph; keep shapes uniform
            from torch_geometric.data.separate import separate

            return separate(cls=self._data.__class__, batch=self._data, idx=idx,
                            slice_dict=self.slices, decrement=False)
        return super().get(idx)

    @property
    def target_names(self) -> list[str]:
        return list(self.meta["target_names"])

    @property
    def target_units(self) -> list[str]:
        return list(self.meta["target_units"])

    @property
    def num_targets(self) -> int:
        return len(self.meta["target_names"])

    @property
    def skipped(self) -> dict[str, list[str]]:
        """Molecules left out on purpose during processing, by reason."""
        return dict(self.meta.get("skipped", {}))

    def target_index(self, target: int | str) -> int:
        return target_index(self.target_names, target, self.meta.get("target_aliases", {}))

    def target_unit(self, target: int | str) -> str:
        return self.target_units[self.target_index(target)]

    def targets(self, indices: Sequence[int] | np.ndarray | torch.Tensor | None = None) -> torch.Tensor:
        """The [N, T] target matrix (no transform applied), optionally for some rows only.

        Rows are positions in this dataset object (which may itself be an index_select view).
        """
        y = self._data.y
        rows = torch.as_tensor(self.indices(), dtype=torch.long) if self._indices is not None else None
        if indices is not None:
            sel = torch.as_tensor(np.asarray(indices), dtype=torch.long)
            rows = sel if rows is None else rows[sel]
        return y if rows is None else y[rows]

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({len(self)}, targets={self.num_targets})"


def target_index(names: Sequence[str], target: int | str, aliases: Mapping[str, str] | None = None) -> int:
    """Position of ``target`` (int or name; names match exactly, then case-insensitively, then aliases)."""
    names = list(names)
    if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
        t = int(target)
        if -len(names) <= t < len(names):
            return t % len(names)
        raise ValueError(f"target index {t} out of range for {len(names)} targets")
    if isinstance(target, str):
        if target in names:
            return names.index(target)
        lower = [n.lower() for n in names]
        if target.lower() in lower:
            return lower.index(target.lower())
        for alias, real in (aliases or {}).items():
            if alias.lower() == target.lower():
                return names.index(real)
    raise ValueError(f"unknown target {target!r}; available: {names}")


class SelectTargets:
    """Transform keeping some target columns: ``data.y`` becomes [1, len(targets)].

    It returns a shallow copy (as PyG's transforms do): the molecule passed in keeps its ``y``, and the other
    tensors are shared with it, not copied. A deep copy (``Data.clone``) was ~40 % of the trainer's data loader's
    time per molecule, ~2.5 ms of a quickstart training step (``benchmarks/README.md``, ninth pass). With
    ``copy_tensors`` every tensor is copied: for a transform after this one that edits tensors in place, so that
    the dataset itself never changes (the trainer sets it when its caller passes a transform)."""

    def __init__(self, dataset: MolecularDataset | Sequence[str], targets: Sequence[int | str] | int | str,
                 copy_tensors: bool = False):
        names = dataset.target_names if hasattr(dataset, "target_names") else list(dataset)
        aliases = dataset.meta.get("target_aliases", {}) if hasattr(dataset, "meta") else {}
        if isinstance(targets, (int, str)):
            targets = [targets]
        self.columns = [target_index(names, t, aliases) for t in targets]
        self.names = [names[c] for c in self.columns]
        self.copy_tensors = copy_tensors

    def __call__(self, data: Data) -> Data:
        data = data.clone() if self.copy_tensors else copy.copy(data)
        data.y = data.y[:, self.columns]
        return data

    def __repr__(self) -> str:
        return f"SelectTargets({self.names})"


def to_float_or_nan(value: Any) -> float:
    """float(value), with None/'' /unparseable -> NaN (callers then decide: error or logged skip)."""
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan
