"""QM7b with 3D coordinates (7,211 molecules, 14 targets), from the paper's own release.

Source: github.com/davidbuterez/attention-based-pooling-for-quantum-properties (MIT), commit
c70d0c4a5c16bd9f747b16f00bef8880671bb824, ``data/QM7/QM7b_train_val_test_splits/<seed>/<part>.npy`` for
the paper's five split seeds. Layout under the data root: ``<root>/qm7b/<seed>/{train,validate,test}.npy``.

Security: the files are NumPy *object* arrays, i.e. pickles, and unpickling runs code. Every file's
sha256 is compared with the published value in :data:`SHA256` BEFORE ``np.load(allow_pickle=True)``
sees it; anything else is refused with a :class:`~abp_core.data.common.ChecksumError` naming the file.

Rows are ``[formula, Z (int16[n]), pos (float64[n, 3], Bohr), targets (object[14]), names (object[14])]``.
Positions are converted Bohr -> Å (x 0.529177210903). Targets stay as released: energies in Hartree
(the paper's Table 1 reports their MAE in milli-Hartree, printed as "meV"), polarisabilities in Å^3,
the absorption intensity in arbitrary units.

Dataset order (``idx``): seed 23887's ``train``, then ``validate``, then ``test`` rows, in file order.
The same molecule is recognised in the other seeds' files by (formula, Z, exact coordinates).
The release holds 7 structures that occur 2-3 times with identical targets (8 surplus rows; one of them
sits in both train and validate of every seed); these are kept as released, and matched across seeds
as interchangeable copies, so each seed's split is reproduced as a multiset of molecules.

Policy: curated data, so invalid molecules raise (no skips).
"""
from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
import numpy as np

from .common import (BOHR_TO_ANGSTROM, DataFormatError, MolecularDataset, RemoteFile, StorageBuilder,
                     data_root, ensure_file, validate_molecule)

logger = logging.getLogger(__name__)

COMMIT = "c70d0c4a5c16bd9f747b16f00bef8880671bb824"
URL_PATTERN = ("https://raw.githubusercontent.com/davidbuterez/attention-based-pooling-for-quantum-properties/"
               f"{COMMIT}/data/QM7/QM7b_train_val_test_splits/{{seed}}/{{part}}.npy")
SEEDS = (23887, 386333, 514094, 572909, 598587)
#: The paper's QM7b split seeds (the released split files), as every dataset module names them.
PAPER_SEEDS = SEEDS
PARTS = ("train", "validate", "test")
SPLIT_SIZES = (5768, 721, 722)
NUM_MOLECULES = 7211
CANONICAL_SEED = 23887

#: Published sha256 of every released file (from the release's SHA256SUMS).
SHA256: dict[tuple[int, str], str] = {
    (23887, "test"): "ac9550db7b3b43660fbdacbed40a9d61fad38d83fd9a7457941d38c4055360f2",
    (23887, "train"): "ba15f6e000758aa3c38671c2c7cda9413fa2025d0b48698a6f1c3e50d7ea7bd5",
    (23887, "validate"): "6e1c83b06e2251d0c61b7ecc420b14ee82099268433ad626666cecb56c24757f",
    (386333, "test"): "8ca61ab065e485422eb120c3d97048832caf1bf2158ce518cf7038d4901bcca3",
    (386333, "train"): "4e4b8630db0b47a0f31da9fe2d876a73567f0493add56bf1808f14399158a4c7",
    (386333, "validate"): "82beee45cfc0501e16a7de3255e21cd65405e08127336cbd20fd625fc698a57c",
    (514094, "test"): "4175df2e0a27df6901588e9acec9e4b77885447c91e892e0925b3ec4586ea6f7",
    (514094, "train"): "61d2c5affdd7b23de492775d63038d6a23f15a24d200b217ba6484d786fe7ec8",
    (514094, "validate"): "a18b38979b6057d1ba2926bd1717e429ff6c6dfb5c86c352a80b1f63e0654e63",
    (572909, "test"): "9c60b67f77b6e07f0421afab9a8594e3ef9357ee7bad41e513a964cb590ecc23",
    (572909, "train"): "dd7faf41e175a2f76cae4c0fd4d7817143c31f6e2490530d7bb3b77a5467c652",
    (572909, "validate"): "36ebe511d3c022d6895720c5f8eb4ee95ea0e14298d1ca5b5c4d10e7f47fa067",
    (598587, "test"): "bc53bdb945cc081e9f32a47b08ec1029853a4cd52c34fe8821130a691d5c325e",
    (598587, "train"): "8db297225aeca5eab2e0b2c2a28cb8da102a9daa0ffb15f67ac07bea32d52609",
    (598587, "validate"): "80e1e52ca3f6e07d915e707e99fdab3d8f17ef010e303b68f9852ca0d34f67f6",
}

TARGET_NAMES = [
    "First excitation energy (ZINDO)",
    "Electron affinity (ZINDO/s)",
    "Excitation energy at maximal absorption (ZINDO)",
    "Atomization energy (DFT/PBE0)",
    "Highest occupied molecular orbital (GW)",
    "Highest occupied molecular orbital (PBE0)",
    "Highest occupied molecular orbital (ZINDO/s)",
    "Maximal absorption intensity (ZINDO)",
    "Ionization potential (ZINDO/s)",
    "Lowest unoccupied molecular orbital (GW)",
    "Lowest unoccupied molecular orbital (PBE0)",
    "Lowest unoccupied molecular orbital (ZINDO/s)",
    "Polarizability (self-consistent screening)",
    "Polarizability (DFT/PBE0)",
]
TARGET_UNITS = ["Ha", "Ha", "Ha", "Ha", "Ha", "Ha", "Ha", "arbitrary", "Ha", "Ha", "Ha", "Ha", "Å^3", "Å^3"]
#: short aliases accepted by ``target_index``
TARGET_ALIASES = {
    "E1_ZINDO": TARGET_NAMES[0], "EA_ZINDO": TARGET_NAMES[1], "Emax_ZINDO": TARGET_NAMES[2],
    "E_atomization_PBE0": TARGET_NAMES[3], "homo_GW": TARGET_NAMES[4], "homo_PBE0": TARGET_NAMES[5],
    "homo_ZINDO": TARGET_NAMES[6], "Imax_ZINDO": TARGET_NAMES[7], "IP_ZINDO": TARGET_NAMES[8],
    "lumo_GW": TARGET_NAMES[9], "lumo_PBE0": TARGET_NAMES[10], "lumo_ZINDO": TARGET_NAMES[11],
    "alpha_SCS": TARGET_NAMES[12], "alpha_PBE0": TARGET_NAMES[13],
}


def remote_file(seed: int, part: str) -> RemoteFile:
    if (seed, part) not in SHA256:
        raise ValueError(f"QM7b: no released file for seed {seed!r}, part {part!r}; seeds are {SEEDS}")
    return RemoteFile(f"{seed}/{part}.npy", URL_PATTERN.format(seed=seed, part=part), SHA256[(seed, part)])


def load_part(folder: Path, seed: int, part: str, *, allow_download: bool = True,
              progress: bool = True) -> np.ndarray:
    """One released file, verified against its published sha256 before it is unpickled."""
    path = ensure_file(remote_file(seed, part), folder, allow_download=allow_download, progress=progress)
    # ensure_file() has just verified the sha256 of exactly these bytes: only now may they be unpickled.
    rows = np.load(path, allow_pickle=True)
    if rows.dtype != object or rows.ndim != 2 or rows.shape[1] != 5:
        raise DataFormatError(f"{path}: expected an object array of shape [n, 5], got {rows.dtype} {rows.shape}")
    return rows


def _key(row: np.ndarray) -> tuple[str, bytes, bytes]:
    return (str(row[0]), np.asarray(row[1], dtype=np.int64).tobytes(), np.asarray(row[2], dtype=np.float64).tobytes())


def paper_split(seed: int, root=None, *, allow_download: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train_idx, val_idx, test_idx) of the released split ``seed`` in this module's dataset order.

    Sizes 5,768 / 721 / 722. Identical duplicate rows (see the module docstring) are matched in order.
    """
    if seed not in SEEDS:
        raise ValueError(f"QM7b: the paper released seeds {SEEDS}, not {seed!r}")
    folder = data_root(root) / "qm7b"
    canonical = defaultdict(list)
    pos = 0
    for part in PARTS:
        for row in load_part(folder, CANONICAL_SEED, part, allow_download=allow_download):
            canonical[_key(row)].append(pos)
            pos += 1
    used: dict[tuple, int] = defaultdict(int)
    out = []
    for part in PARTS:
        idx = []
        for row in load_part(folder, seed, part, allow_download=allow_download):
            k = _key(row)
            copies = canonical.get(k)
            if not copies or used[k] >= len(copies):
                raise DataFormatError(f"QM7b seed {seed} {part}: molecule {row[0]} is not in the dataset "
                                      f"(seed {CANONICAL_SEED}) or occurs more often than there")
            idx.append(copies[used[k]])
            used[k] += 1
        out.append(np.asarray(idx, dtype=np.int64))
    if tuple(len(a) for a in out) != SPLIT_SIZES:
        raise DataFormatError(f"QM7b seed {seed}: split sizes {[len(a) for a in out]}, expected {SPLIT_SIZES}")
    return out[0], out[1], out[2]


class QM7b(MolecularDataset):
    """QM7b (7,211 molecules, coordinates in Å, 14 targets; see the module docstring)."""

    name = "qm7b"
    PROCESS_VERSION = 1

    def _raw_paths_for_fingerprint(self) -> list[Path]:
        paths = [self.raw_folder / remote_file(CANONICAL_SEED, p).relpath for p in PARTS]
        return [p for p in paths if p.exists()]

    def _build(self):
        builder = StorageBuilder(string_fields=("name",))
        seen: dict[tuple, int] = {}
        duplicates = 0
        for part in PARTS:
            rows = load_part(self.raw_folder, CANONICAL_SEED, part, allow_download=self.allow_download,
                             progress=self.progress)
            for j, row in enumerate(rows):
                i = len(builder)
                formula = str(row[0])
                mol_id = f"{formula} (row {i}: seed {CANONICAL_SEED} {part}[{j}])"
                names = [str(s) for s in row[4]]
                if names != TARGET_NAMES:
                    raise DataFormatError(f"QM7b {mol_id}: target names {names} differ from {TARGET_NAMES}")
                z = np.asarray(row[1], dtype=np.int64)
                pos = np.asarray(row[2], dtype=np.float64) * BOHR_TO_ANGSTROM
                y = validate_molecule(mol_id, z, pos, np.asarray(row[3], dtype=object), TARGET_NAMES)
                duplicates += _key(row) in seen
                seen.setdefault(_key(row), i)
                builder.add(z=z, pos=pos, y=y, idx=i, name=formula)
        if len(builder) != NUM_MOLECULES:
            raise DataFormatError(f"QM7b: {len(builder)} molecules, expected {NUM_MOLECULES}")
        if duplicates:
            logger.info("qm7b: %d rows repeat an earlier molecule exactly (as released; kept)", duplicates)
        data, slices = builder.build(len(TARGET_NAMES))
        meta = {"target_names": TARGET_NAMES, "target_units": TARGET_UNITS, "target_aliases": TARGET_ALIASES,
                "source": f"paper release {COMMIT[:7]}, seed {CANONICAL_SEED} order", "skipped": {},
                "duplicate_rows": duplicates}
        return data, slices, meta

    def paper_split(self, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The released split ``seed`` as row indices of this dataset."""
        return paper_split(seed, self.data_root, allow_download=self.allow_download)
