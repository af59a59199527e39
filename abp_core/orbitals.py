"""Per-atom frontier-orbital coefficients (HOMO/LUMO "orbital weights").

Orbital weighted average (OWA) pooling (paper section 2.3; Chen et al.) pulls the readout weights
``w_i`` of a molecule towards the fraction ``l_i`` of an orbital (usually the HOMO) that sits on atom
``i``. This module computes those fractions itself:

* :func:`orbital_coefficients` / :func:`compute_orbitals` -- one molecule, with GFN2-xTB through
  ``tblite`` (default, a few ms for a QM9 molecule) or with DFT through PySCF
  (``method="pyscf-<basis>"``, optional extra ``pip install abp[dft]``).
* :func:`label_orbitals` -- a whole dataset, in parallel, cached on disk in chunks and resumable.
* :class:`OrbitalLabels` -- the labels (CSR layout: concatenated per-atom arrays plus ``ptr``).
* :class:`AttachOrbitalLabels` -- a PyG transform that puts ``homo_coeff``/``lumo_coeff``/
  ``homo_xtb``/``lumo_xtb`` on each ``Data`` using its ``idx``.

Definition of the per-atom share
--------------------------------
For a molecular orbital with AO coefficients ``c`` and AO overlap matrix ``S`` the Mulliken share of
atom ``A`` is ``q_A = sum_{mu on A} c_mu (S c)_mu``. Because ``c^T S c = 1`` the shares sum to 1.
Mulliken shares can be slightly negative (an atom whose basis functions overlap "destructively"
with the rest of the orbital). We **clip negative shares to 0 and renormalise** so that the result
is a proper distribution over atoms (non-negative, sums to 1), as OWA pooling assumes. The total
clipped weight is reported in :attr:`OrbitalResult.clipped` (it is usually < 1e-3).

Which orbital is the HOMO
-------------------------
Orbitals are sorted by energy and counted by aufbau: with ``n_alpha = (N_el + uhf) / 2`` electrons
of the majority spin the HOMO is orbital ``n_alpha - 1`` and the LUMO is orbital ``n_alpha``. This
does not depend on the (fractional, Fermi-smeared) occupations that xTB uses at its finite
electronic temperature. For an odd number of electrons (``uhf = 1`` by default) the "HOMO" is the
singly occupied orbital (SOMO) and the "LUMO" the lowest orbital above it. ``"homo-1"``,
``"lumo+2"`` etc. count further down/up in energy.

Degenerate orbitals (e.g. the t2 HOMO of methane, the e1g HOMO of benzene) are an arbitrary
rotation within their subspace, so a single one of them is not a property of the molecule: the
shares would change under a rotation or a permutation of the atoms. We therefore **average the
shares over all orbitals on the same side of the occupied/virtual boundary whose energy lies within
``degeneracy_tol_ev`` (default 1e-3 eV) of the requested one**; the number of orbitals averaged is
:attr:`OrbitalResult.degeneracy`.

Units: positions in Angstrom at the API (converted to Bohr for tblite), energies returned in eV.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .files import atomic_open, remove_stale_temporaries, set_aside, write_text

if TYPE_CHECKING:  # pragma: no cover
    from torch_geometric.transforms import BaseTransform

__all__ = [
    "OrbitalResult",
    "OrbitalCalculationError",
    "OrbitalCacheMismatchError",
    "OrbitalCacheCorruptError",
    "OrbitalLabelWarning",
    "OrbitalCacheWarning",
    "OrbitalLabels",
    "AttachOrbitalLabels",
    "orbital_coefficients",
    "compute_orbitals",
    "label_orbitals",
    "mulliken_shares",
]

BOHR_PER_ANGSTROM = 1.0 / 0.529177210903  # CODATA 2018
HARTREE_TO_EV = 27.211386245988
KELVIN_TO_HARTREE = 3.166808578545117e-6

_XTB_METHODS = {"gfn2-xtb": "GFN2-xTB", "gfn1-xtb": "GFN1-xTB", "ipea1-xtb": "IPEA1-xTB"}
_XTB_MAX_Z = 86  # GFN1/GFN2/IPEA1 are parametrised for H..Rn
_CACHE_FORMAT_VERSION = 1
_ORBITAL_RE = re.compile(r"^\s*(homo|lumo)\s*(?:([+-])\s*(\d+))?\s*$", re.IGNORECASE)

# Options that :func:`compute_orbitals` accepts besides z/pos/orbitals/method (label_orbitals
# forwards them, records them in the cache and refuses a cache made with different ones).
_CALC_OPTIONS = (
    "charge",
    "uhf",
    "multiplicity",
    "max_iter",
    "accuracy",
    "electronic_temperature",
    "degeneracy_tol_ev",
    "min_distance",
    "functional",
)


class OrbitalCalculationError(ValueError):
    """The electronic-structure calculation failed (e.g. SCF not converged) for a molecule."""


class OrbitalCacheMismatchError(ValueError):
    """An orbital-label cache on disk was made for other molecules or other settings."""


class OrbitalCacheCorruptError(ValueError):
    """An orbital-label file that cannot be read (truncated, damaged, or not written by this package)."""


class OrbitalLabelWarning(UserWarning):
    """Some molecules could not be labelled (see ``OrbitalLabels.failed`` / ``.errors``)."""


class OrbitalCacheWarning(UserWarning):
    """An unreadable orbital-label cache or cache chunk was set aside (``<name>.corrupt``) and is recomputed."""


#: what reading a damaged .npz raises: truncated (no central directory), bad CRC, missing or bad members
_UNREADABLE = (zipfile.BadZipFile, EOFError, OSError, KeyError, ValueError)


@dataclass(frozen=True)
class OrbitalResult:
    """Per-atom shares of one molecular orbital.

    Attributes:
        coefficients: float64 ``[n_atoms]``, non-negative, sums to 1 (Mulliken shares, negatives
            clipped to 0 and renormalised).
        energy_ev: orbital energy in eV (for ``method="gfn2-xtb"`` the xTB eigenvalue).
        method: normalised method name, e.g. ``"gfn2-xtb"`` or ``"pyscf-sto-3g"``.
        orbital: normalised orbital name, e.g. ``"homo"``, ``"homo-1"``, ``"lumo+1"``.
        orbital_index: 0-based index of the orbital in the energy-sorted list.
        degeneracy: number of (near-)degenerate orbitals averaged over (1 if none).
        clipped: total negative Mulliken share that was clipped away (before renormalising).
    """

    coefficients: np.ndarray
    energy_ev: float
    method: str
    orbital: str
    orbital_index: int = -1
    degeneracy: int = 1
    clipped: float = 0.0


# --------------------------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------------------------


def _to_numpy(x: Any) -> np.ndarray:
    """numpy view of an array-like or a torch tensor (without importing torch)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _formula(z: np.ndarray) -> str:
    """Hill formula, for error messages."""
    try:
        from ase.data import chemical_symbols
    except Exception:  # pragma: no cover - ase is a core dependency
        chemical_symbols = None
    counts: dict[str, int] = {}
    for zi in np.asarray(z).ravel().tolist():
        if chemical_symbols is not None and 0 < zi < len(chemical_symbols):
            sym = chemical_symbols[zi]
        else:
            sym = f"Z{zi}"
        counts[sym] = counts.get(sym, 0) + 1
    order = [s for s in ("C", "H") if s in counts] if "C" in counts else []
    order += sorted(s for s in counts if s not in order)
    return "".join(f"{s}{counts[s] if counts[s] > 1 else ''}" for s in order) or "<empty>"


def _normalise_method(method: str) -> tuple[str, str]:
    """Return (normalised name, kind) with kind 'xtb' or 'pyscf'."""
    if not isinstance(method, str):
        raise ValueError(f"method must be a string, got {method!r}")
    m = method.strip().lower()
    if m in _XTB_METHODS:
        return m, "xtb"
    if m.startswith("pyscf-") and len(m) > len("pyscf-"):
        return m, "pyscf"
    raise ValueError(
        f"unknown method {method!r}: use 'gfn2-xtb', 'gfn1-xtb', 'ipea1-xtb' or "
        "'pyscf-<basis>' (e.g. 'pyscf-sto-3g', 'pyscf-6-31g*')"
    )


def _parse_orbital(orbital: str) -> tuple[str, str, int]:
    """'homo-1' -> ('homo-1', 'homo', -1); 'lumo' -> ('lumo', 'lumo', 0)."""
    if not isinstance(orbital, str):
        raise ValueError(f"orbital must be a string like 'homo', 'lumo', 'homo-1', got {orbital!r}")
    match = _ORBITAL_RE.match(orbital)
    if match is None:
        raise ValueError(
            f"unknown orbital {orbital!r}: use 'homo', 'lumo', 'homo-<k>' or 'lumo+<k>'"
        )
    base, sign, k = match.group(1).lower(), match.group(2), match.group(3)
    offset = 0 if k is None else int(k) * (1 if sign == "+" else -1)
    name = base if offset == 0 else f"{base}{offset:+d}"
    return name, base, offset


def _validate_molecule(
    z: Any, pos: Any, *, max_z: int | None, min_distance: float, name: str | None
) -> tuple[np.ndarray, np.ndarray]:
    label = f" ({name})" if name else ""
    z = _to_numpy(z)
    pos = _to_numpy(pos)
    if z.ndim != 1:
        raise ValueError(f"z must be a 1-D array of atomic numbers, got shape {z.shape}{label}")
    if z.size == 0:
        raise ValueError(f"molecule has zero atoms{label}")
    if z.dtype.kind not in "iu":
        if z.dtype.kind == "f" and np.all(np.isfinite(z)) and np.all(z == np.round(z)):
            z = z.astype(np.int64)
        else:
            raise ValueError(f"z must hold integer atomic numbers, got dtype {z.dtype}{label}")
    z = z.astype(np.int64)
    if pos.shape != (z.size, 3):
        raise ValueError(
            f"pos must have shape (n_atoms, 3) = ({z.size}, 3) to match z, got {pos.shape}{label}"
        )
    if pos.dtype.kind not in "fiu":
        raise ValueError(f"pos must be numeric, got dtype {pos.dtype}{label}")
    pos = pos.astype(np.float64)
    if not np.all(np.isfinite(pos)):
        bad = np.unique(np.nonzero(~np.isfinite(pos))[0]).tolist()
        raise ValueError(f"pos has NaN/inf coordinates for atoms {bad}{label}")
    if np.any(z < 1):
        raise ValueError(f"atomic numbers must be >= 1, got {sorted(set(z[z < 1].tolist()))}{label}")
    if max_z is not None and np.any(z > max_z):
        bad = sorted(set(z[z > max_z].tolist()))
        raise ValueError(
            f"element(s) Z={bad} are not supported: xTB (GFN1/GFN2) is parametrised for "
            f"Z = 1..{max_z} only{label}"
        )
    if z.size > 1 and min_distance > 0:
        from scipy.spatial import cKDTree

        pairs = cKDTree(pos).query_pairs(r=min_distance, output_type="ndarray")
        if len(pairs):
            i, j = (int(v) for v in pairs[0])
            d = float(np.linalg.norm(pos[i] - pos[j]))
            raise ValueError(
                f"atoms {i} and {j} overlap ({d:.3f} Angstrom apart, minimum {min_distance} "
                f"Angstrom; {len(pairs)} such pair(s)){label}: are the positions in Angstrom?"
            )
    return z, pos


def _resolve_uhf(
    z: np.ndarray, charge: float, uhf: int | None, multiplicity: int | None, label: str
) -> tuple[int, int]:
    """Return (integer charge, number of unpaired electrons)."""
    if charge != int(charge):
        raise ValueError(f"charge must be an integer, got {charge}{label}")
    charge = int(charge)
    n_el = int(z.sum()) - charge
    if n_el < 0:
        raise ValueError(f"charge {charge} leaves a negative number of electrons{label}")
    if multiplicity is not None:
        if multiplicity < 1:
            raise ValueError(f"multiplicity must be >= 1, got {multiplicity}{label}")
        from_mult = int(multiplicity) - 1
        if uhf is not None and int(uhf) != from_mult:
            raise ValueError(f"uhf={uhf} contradicts multiplicity={multiplicity}{label}")
        uhf = from_mult
    if uhf is None:
        uhf = n_el % 2
    uhf = int(uhf)
    if uhf < 0 or uhf > n_el or (n_el - uhf) % 2:
        raise ValueError(
            f"{n_el} electrons (charge {charge}) cannot have {uhf} unpaired electron(s){label}"
        )
    return charge, uhf


# --------------------------------------------------------------------------------------------
# core: Mulliken shares + orbital selection
# --------------------------------------------------------------------------------------------


def mulliken_shares(
    c: np.ndarray, overlap: np.ndarray, ao_atom: np.ndarray, n_atoms: int
) -> tuple[np.ndarray, float]:
    """Per-atom Mulliken shares of orbital(s) ``c``; negatives clipped to 0 and renormalised.

    Args:
        c: AO coefficients ``[n_ao]`` of one orbital or ``[n_ao, k]`` of k orbitals (the shares of
            the k orbitals are averaged before clipping).
        overlap: AO overlap matrix ``[n_ao, n_ao]``.
        ao_atom: atom index of every AO ``[n_ao]``.
        n_atoms: number of atoms.

    Returns:
        (shares float64 ``[n_atoms]`` summing to 1, total negative share that was clipped).
    """
    c = np.asarray(c, dtype=np.float64)
    if c.ndim == 1:
        c = c[:, None]
    per_ao = (c * (overlap @ c)).mean(axis=1)
    raw = np.bincount(np.asarray(ao_atom), weights=per_ao, minlength=n_atoms)
    if raw.shape[0] != n_atoms or not np.all(np.isfinite(raw)):
        raise OrbitalCalculationError("orbital shares are not finite or have the wrong size")
    total = raw.sum()
    if abs(total - 1.0) > 1e-4:
        raise OrbitalCalculationError(
            f"orbital is not normalised (Mulliken shares sum to {total:.6f}, expected 1)"
        )
    clipped = float(-raw[raw < 0].sum()) if np.any(raw < 0) else 0.0
    shares = np.clip(raw, 0.0, None)
    shares /= shares.sum()
    return shares, clipped


def _select_orbitals(
    *,
    energies_h: np.ndarray,
    coeffs: np.ndarray,
    overlap: np.ndarray,
    ao_atom: np.ndarray,
    n_atoms: int,
    n_alpha: int,
    orbitals: Sequence[str],
    degeneracy_tol_ev: float,
    method: str,
    label: str,
) -> dict[str, OrbitalResult]:
    order = np.argsort(energies_h, kind="stable")
    energies_ev = np.asarray(energies_h, dtype=np.float64)[order] * HARTREE_TO_EV
    coeffs = np.asarray(coeffs, dtype=np.float64)[:, order]
    n_orb = energies_ev.shape[0]
    if not np.all(np.isfinite(energies_ev)) or not np.all(np.isfinite(coeffs)):
        raise OrbitalCalculationError(f"{method} returned non-finite orbitals{label}")
    out: dict[str, OrbitalResult] = {}
    for orb in orbitals:
        name, base, offset = _parse_orbital(orb)
        index = (n_alpha - 1 if base == "homo" else n_alpha) + offset
        if not 0 <= index < n_orb:
            raise ValueError(
                f"orbital {name!r} does not exist: index {index} outside 0..{n_orb - 1} "
                f"({n_alpha} occupied of {n_orb} orbitals){label}"
            )
        occupied = index < n_alpha
        side = np.arange(n_orb) < n_alpha if occupied else np.arange(n_orb) >= n_alpha
        close = np.abs(energies_ev - energies_ev[index]) <= degeneracy_tol_ev
        group = np.nonzero(side & close)[0]
        try:
            shares, clipped = mulliken_shares(coeffs[:, group], overlap, ao_atom, n_atoms)
        except OrbitalCalculationError as exc:
            raise OrbitalCalculationError(f"{method}: {exc}{label}") from None
        out[name] = OrbitalResult(
            coefficients=shares,
            energy_ev=float(energies_ev[index]),
            method=method,
            orbital=name,
            orbital_index=int(index),
            degeneracy=int(group.size),
            clipped=clipped,
        )
    return out


_GOMP: Any = False  # not looked up yet


def _tblite_openmp():
    """ctypes handle of the OpenMP runtime that tblite uses (None if not found)."""
    global _GOMP
    if _GOMP is False:
        _GOMP = None
        try:
            import ctypes
            import glob

            import tblite

            libs_dir = os.path.join(os.path.dirname(os.path.dirname(tblite.__file__)), "tblite.libs")
            names = sorted(glob.glob(os.path.join(libs_dir, "libgomp*"))) + ["libgomp.so.1"]
            for name in names:
                try:  # RTLD_NOLOAD: only a runtime that is already loaded (by tblite)
                    lib = ctypes.CDLL(name, mode=os.RTLD_NOLOAD)
                    lib.omp_get_max_threads.restype = ctypes.c_int
                    lib.omp_set_num_threads.argtypes = [ctypes.c_int]
                    _GOMP = lib
                    break
                except (OSError, AttributeError):
                    continue
        except Exception:  # pragma: no cover - thread control is an optimisation only
            _GOMP = None
    return _GOMP


@contextmanager
def _openmp_threads(n: int | None):
    """Run tblite with ``n`` OpenMP threads (restored afterwards, for the calling thread only).

    A QM9-sized molecule takes ~1 ms on one thread; with several OpenMP threads on a busy machine
    the threads spin-wait for each other and the same calculation can take a second.
    """
    lib = _tblite_openmp() if n is not None else None
    if lib is None:
        yield
        return
    old = lib.omp_get_max_threads()
    lib.omp_set_num_threads(int(n))
    try:
        yield
    finally:
        lib.omp_set_num_threads(old)


def _run_xtb(
    z: np.ndarray,
    pos: np.ndarray,
    *,
    method: str,
    charge: int,
    uhf: int,
    max_iter: int,
    accuracy: float,
    electronic_temperature: float,
    num_threads: int | None,
    label: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    from tblite.exceptions import TBLiteRuntimeError, TBLiteValueError
    from tblite.interface import Calculator

    what = f"{_XTB_METHODS[method]} for {_formula(z)}{label}"
    try:
        # logger swallows tblite's own printout; verbosity 0 silences the SCF table.
        calc = Calculator(
            _XTB_METHODS[method],
            z.astype(np.int32),
            pos * BOHR_PER_ANGSTROM,
            charge=float(charge),
            uhf=uhf,
            logger=lambda _msg: None,
            color=False,
        )
        calc.set("verbosity", 0)
        calc.set("save-integrals", 1)
        calc.set("max-iter", int(max_iter))
        calc.set("accuracy", float(accuracy))
        calc.set("temperature", float(electronic_temperature) * KELVIN_TO_HARTREE)
    except (TBLiteValueError, TBLiteRuntimeError) as exc:
        raise ValueError(f"tblite refused the input: {exc} ({what})") from exc
    try:
        with _openmp_threads(num_threads):
            res = calc.singlepoint()
    except TBLiteRuntimeError as exc:
        raise OrbitalCalculationError(f"{what}: SCF failed: {exc}") from exc
    energies = np.asarray(res.get("orbital-energies"), dtype=np.float64)
    occupations = np.asarray(res.get("orbital-occupations"), dtype=np.float64)
    coeffs = np.asarray(res.get("orbital-coefficients"), dtype=np.float64)
    overlap = np.asarray(res.get("overlap-matrix"), dtype=np.float64)
    if coeffs.ndim == 3:  # spin-polarised result: use the alpha (majority) channel
        energies, coeffs = energies[0], coeffs[0]
        occupations = occupations.sum(axis=0)
    elif occupations.ndim == 2:
        occupations = occupations.sum(axis=0)
    ao_atom = np.asarray(calc.get("shell-map"))[np.asarray(calc.get("orbital-map"))]
    if not np.isfinite(res.get("energy")) or not np.all(np.isfinite(occupations)):
        raise OrbitalCalculationError(f"{what}: SCF returned a non-finite energy")
    # valence electron count (xTB has no core electrons), from the (smeared) occupations
    n_valence = int(round(float(occupations.sum())))
    if (n_valence - uhf) % 2:
        raise OrbitalCalculationError(
            f"{what}: {n_valence} valence electrons inconsistent with uhf={uhf}"
        )
    n_alpha = (n_valence + uhf) // 2
    return energies, coeffs, overlap, ao_atom, n_alpha


def _import_pyscf():
    try:
        import pyscf  # noqa: F401
        from pyscf import dft, gto
    except ImportError as exc:
        raise ImportError(
            "method='pyscf-...' needs PySCF, which is an optional extra: "
            "pip install 'abp[dft]'  (or: pip install pyscf)"
        ) from exc
    return gto, dft


def _run_pyscf(
    z: np.ndarray,
    pos: np.ndarray,
    *,
    basis: str,
    functional: str,
    charge: int,
    uhf: int,
    max_iter: int,
    label: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    gto, dft = _import_pyscf()
    what = f"PySCF {functional}/{basis} for {_formula(z)}{label}"
    try:
        mol = gto.M(
            atom=[(int(zi), tuple(float(x) for x in p)) for zi, p in zip(z, pos)],
            basis=basis,
            unit="Angstrom",
            charge=charge,
            spin=uhf,
            verbose=0,
        )
    except Exception as exc:  # unknown basis / element missing from basis ...
        raise ValueError(f"PySCF could not build the molecule: {exc} ({what})") from exc
    mf = dft.RKS(mol) if uhf == 0 else dft.ROKS(mol)  # restricted: one set of orbitals
    mf.xc = functional
    mf.max_cycle = int(max_iter)
    mf.verbose = 0
    try:
        mf.kernel()
    except Exception as exc:
        raise OrbitalCalculationError(f"{what}: SCF failed: {exc}") from exc
    if not mf.converged:
        raise OrbitalCalculationError(f"{what}: SCF not converged in {max_iter} cycles")
    overlap = mol.intor("int1e_ovlp")
    ao_atom = np.zeros(mol.nao, dtype=np.int64)
    for atom, (_, _, ao0, ao1) in enumerate(mol.aoslice_by_atom()):
        ao_atom[ao0:ao1] = atom
    n_alpha = int(mol.nelec[0])
    return np.asarray(mf.mo_energy), np.asarray(mf.mo_coeff), overlap, ao_atom, n_alpha


def compute_orbitals(
    z: Any,
    pos: Any,
    orbitals: Sequence[str] | str = ("homo", "lumo"),
    method: str = "gfn2-xtb",
    *,
    charge: float = 0,
    uhf: int | None = None,
    multiplicity: int | None = None,
    max_iter: int = 250,
    accuracy: float = 1.0,
    electronic_temperature: float = 300.0,
    degeneracy_tol_ev: float = 1e-3,
    min_distance: float = 0.3,
    functional: str = "b3lyp",
    name: str | None = None,
    num_threads: int | None = 1,
) -> dict[str, OrbitalResult]:
    """Per-atom shares of several orbitals of one molecule from a single SCF.

    Args:
        z: atomic numbers ``[n_atoms]`` (numpy array, list or torch tensor).
        pos: positions in Angstrom ``[n_atoms, 3]`` (numpy array or torch tensor).
        orbitals: names like ``"homo"``, ``"lumo"``, ``"homo-1"``, ``"lumo+1"``.
        method: ``"gfn2-xtb"`` (default), ``"gfn1-xtb"``, ``"ipea1-xtb"`` (tblite), or
            ``"pyscf-<basis>"`` (restricted Kohn-Sham DFT with ``functional``; needs the
            ``abp[dft]`` extra), e.g. ``"pyscf-sto-3g"``, ``"pyscf-6-31g*"``.
        charge: total charge (integer).
        uhf: number of unpaired electrons; default 0 for an even and 1 for an odd electron count.
        multiplicity: alternative to ``uhf`` (``uhf = multiplicity - 1``).
        max_iter: maximum SCF iterations; not converging raises :class:`OrbitalCalculationError`.
        accuracy: tblite numerical accuracy (1.0 = tblite default; xTB only).
        electronic_temperature: Fermi smearing temperature in K (xTB only; tblite default 300 K).
        degeneracy_tol_ev: orbitals within this energy window are averaged (see module doc).
        min_distance: two atoms closer than this (Angstrom) are rejected as overlapping.
        functional: exchange-correlation functional for PySCF.
        name: optional molecule name used in error messages.
        num_threads: OpenMP threads for tblite (default 1: small molecules do not gain from
            more, and on a busy machine spinning threads slow them down a thousandfold);
            ``None`` leaves tblite's OpenMP setting alone. Parallelise over molecules instead
            (:func:`label_orbitals`).

    Raises:
        ValueError: bad input (shapes, NaN, zero atoms, unsupported element, overlapping atoms,
            impossible charge/spin, unknown method or orbital).
        OrbitalCalculationError: the SCF failed or did not converge (a ValueError subclass).
        ImportError: ``method="pyscf-..."`` without PySCF installed.
    """
    if isinstance(orbitals, str):
        orbitals = (orbitals,)
    orbitals = tuple(orbitals)
    if not orbitals:
        raise ValueError("orbitals must name at least one orbital")
    for orb in orbitals:
        _parse_orbital(orb)
    method_name, kind = _normalise_method(method)
    label = f" ({name})" if name else ""
    z, pos = _validate_molecule(
        z,
        pos,
        max_z=_XTB_MAX_Z if kind == "xtb" else None,
        min_distance=min_distance,
        name=name,
    )
    charge, uhf = _resolve_uhf(z, charge, uhf, multiplicity, label)
    if int(max_iter) < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    if kind == "xtb":
        energies, coeffs, overlap, ao_atom, n_alpha = _run_xtb(
            z,
            pos,
            method=method_name,
            charge=charge,
            uhf=uhf,
            max_iter=max_iter,
            accuracy=accuracy,
            electronic_temperature=electronic_temperature,
            num_threads=num_threads,
            label=label,
        )
    else:
        energies, coeffs, overlap, ao_atom, n_alpha = _run_pyscf(
            z,
            pos,
            basis=method_name[len("pyscf-") :],
            functional=functional,
            charge=charge,
            uhf=uhf,
            max_iter=max_iter,
            label=label,
        )
    return _select_orbitals(
        energies_h=energies,
        coeffs=coeffs,
        overlap=overlap,
        ao_atom=ao_atom,
        n_atoms=z.size,
        n_alpha=n_alpha,
        orbitals=orbitals,
        degeneracy_tol_ev=degeneracy_tol_ev,
        method=method_name,
        label=label,
    )


def orbital_coefficients(
    z: Any, pos: Any, orbital: str = "homo", method: str = "gfn2-xtb", **kwargs: Any
) -> OrbitalResult:
    """Per-atom shares of one orbital (``"homo"``, ``"lumo"``, ``"homo-1"``, ...) of a molecule.

    ``z``: atomic numbers, ``pos``: positions in Angstrom (numpy or torch). Other keyword
    arguments as in :func:`compute_orbitals` (``charge``, ``uhf``/``multiplicity``,
    ``max_iter``, ``functional``, ...). Returns an :class:`OrbitalResult`.
    """
    return next(iter(compute_orbitals(z, pos, (orbital,), method, **kwargs).values()))


# --------------------------------------------------------------------------------------------
# dataset labels
# --------------------------------------------------------------------------------------------


def _attr_name(orbital: str) -> str:
    """'homo' -> 'homo', 'homo-1' -> 'homo_minus_1', 'lumo+2' -> 'lumo_plus_2'."""
    return orbital.replace("-", "_minus_").replace("+", "_plus_")


class OrbitalLabels:
    """Per-atom orbital shares of a whole dataset, in CSR layout.

    Attributes:
        method: e.g. ``"gfn2-xtb"``.
        orbitals: e.g. ``("homo", "lumo")``.
        ptr: int64 ``[n_molecules + 1]``; molecule ``i`` owns atoms ``ptr[i]:ptr[i+1]``.
        z: int16 ``[n_atoms_total]`` atomic numbers (used to check that labels match data).
        idx: int64 ``[n_molecules]``: the ``idx`` of each molecule (its row in the full dataset;
            ``arange`` if the molecules had none).
        coeffs: ``{orbital: float64 [n_atoms_total]}``; NaN for failed molecules.
        energies_ev: ``{orbital: float64 [n_molecules]}``; NaN for failed molecules.
        failed: int64 positions (0-based, in the labelled sequence) of molecules that failed.
        errors: error message of each failed molecule (aligned with ``failed``).
        fingerprint: hash of the inputs (z, pos, idx).
        options: calculation options (charge, max_iter, ...).

    ``homo_coeff``, ``lumo_coeff``, ``homo_energy_ev``, ``lumo_energy_ev`` (and e.g.
    ``homo_minus_1_coeff``) are shortcuts into ``coeffs`` / ``energies_ev``.
    """

    def __init__(
        self,
        *,
        method: str,
        orbitals: Sequence[str],
        ptr: np.ndarray,
        z: np.ndarray,
        idx: np.ndarray,
        coeffs: Mapping[str, np.ndarray],
        energies_ev: Mapping[str, np.ndarray],
        failed: Sequence[int] | np.ndarray = (),
        errors: Sequence[str] = (),
        fingerprint: str = "",
        options: Mapping[str, Any] | None = None,
    ):
        self.method = method
        self.orbitals = tuple(orbitals)
        self.ptr = np.asarray(ptr, dtype=np.int64)
        self.z = np.asarray(z, dtype=np.int16)
        self.idx = np.asarray(idx, dtype=np.int64)
        self.coeffs = {k: np.asarray(v, dtype=np.float64) for k, v in coeffs.items()}
        self.energies_ev = {k: np.asarray(v, dtype=np.float64) for k, v in energies_ev.items()}
        self.failed = np.asarray(failed, dtype=np.int64).reshape(-1)
        self.errors = [str(e) for e in errors]
        self.fingerprint = fingerprint
        self.options = dict(options or {})
        n_mol, n_atoms = len(self.ptr) - 1, int(self.ptr[-1])
        if n_mol < 0 or self.z.shape != (n_atoms,) or self.idx.shape != (n_mol,):
            raise ValueError("inconsistent OrbitalLabels arrays (ptr / z / idx)")
        if len(self.failed) != len(self.errors):
            raise ValueError("failed and errors must have the same length")
        for orb in self.orbitals:
            if self.coeffs[orb].shape != (n_atoms,) or self.energies_ev[orb].shape != (n_mol,):
                raise ValueError(f"inconsistent OrbitalLabels arrays for orbital {orb!r}")
        self._failed_set = {int(i): e for i, e in zip(self.failed, self.errors)}

    # -- access ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.ptr) - 1

    @property
    def num_atoms(self) -> np.ndarray:
        return np.diff(self.ptr)

    def __getattr__(self, item: str) -> np.ndarray:
        # shortcuts homo_coeff / lumo_energy_ev / homo_minus_1_coeff ...
        if item.startswith("_") or "coeffs" not in self.__dict__:
            raise AttributeError(item)
        for orb in self.orbitals:
            base = _attr_name(orb)
            if item == f"{base}_coeff":
                return self.coeffs[orb]
            if item == f"{base}_energy_ev":
                return self.energies_ev[orb]
        raise AttributeError(
            f"{type(self).__name__} has no attribute {item!r} (orbitals: {self.orbitals})"
        )

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Molecule ``i``'s labels as a dict.

        Keys: ``z``, ``idx``, ``<orb>_coeff``, ``<orb>_energy_ev``, ``failed``, ``error``.
        """
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"molecule {i} out of range for {n} molecules")
        a, b = self.ptr[i], self.ptr[i + 1]
        out: dict[str, Any] = {"z": self.z[a:b], "idx": int(self.idx[i])}
        for orb in self.orbitals:
            base = _attr_name(orb)
            out[f"{base}_coeff"] = self.coeffs[orb][a:b]
            out[f"{base}_energy_ev"] = float(self.energies_ev[orb][i])
        out["failed"] = i in self._failed_set
        out["error"] = self._failed_set.get(i)
        return out

    def __repr__(self) -> str:
        return (
            f"OrbitalLabels(method={self.method!r}, orbitals={self.orbitals}, "
            f"molecules={len(self)}, atoms={int(self.ptr[-1])}, failed={len(self.failed)})"
        )

    # -- persistence -----------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        return {
            "format_version": _CACHE_FORMAT_VERSION,
            "method": self.method,
            "orbitals": list(self.orbitals),
            "n_molecules": len(self),
            "fingerprint": self.fingerprint,
            "options": self.options,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write to ``path`` (an ``.npz`` file, no pickle) atomically (temp file + rename)."""
        arrays: dict[str, np.ndarray] = {
            "meta": np.array(json.dumps(self.meta())),
            "ptr": self.ptr,
            "z": self.z,
            "idx": self.idx,
            "failed": self.failed,
            "errors": np.array(self.errors, dtype=str),
        }
        for k, orb in enumerate(self.orbitals):
            arrays[f"coeff_{k}"] = self.coeffs[orb]
            arrays[f"energy_{k}"] = self.energies_ev[orb]
        with atomic_open(path) as fh:
            np.savez(fh, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "OrbitalLabels":
        """Load labels written by :meth:`save` (or by :func:`label_orbitals`).

        Raises :class:`OrbitalCacheCorruptError` (naming the file) if it cannot be read.
        """
        try:
            with np.load(Path(path), allow_pickle=False) as f:
                meta = json.loads(str(f["meta"]))
                if meta.get("format_version") != _CACHE_FORMAT_VERSION:
                    raise ValueError(
                        f"{path}: orbital-label file format {meta.get('format_version')} is not "
                        f"supported (expected {_CACHE_FORMAT_VERSION}); recompute it"
                    )
                orbitals = meta["orbitals"]
                return cls(
                    method=meta["method"],
                    orbitals=orbitals,
                    ptr=f["ptr"],
                    z=f["z"],
                    idx=f["idx"],
                    coeffs={o: f[f"coeff_{k}"] for k, o in enumerate(orbitals)},
                    energies_ev={o: f[f"energy_{k}"] for k, o in enumerate(orbitals)},
                    failed=f["failed"],
                    errors=f["errors"].tolist(),
                    fingerprint=meta["fingerprint"],
                    options=meta.get("options", {}),
                )
        except FileNotFoundError:
            raise
        except _UNREADABLE as exc:
            raise OrbitalCacheCorruptError(
                f"{path} is not a readable orbital-label file ({type(exc).__name__}: {exc}); "
                f"recompute it with label_orbitals"
            ) from exc
        raise


def _extract_molecules(
    molecules: Iterable[Any],
) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray]:
    """(z int64, pos float64) numpy pairs and the idx of every molecule."""
    mols: list[tuple[np.ndarray, np.ndarray]] = []
    idx: list[int] = []
    have_idx = True
    for k, m in enumerate(molecules):
        if isinstance(m, (tuple, list)):
            if len(m) != 2:
                raise ValueError(f"molecule {k}: expected a (z, pos) pair, got {len(m)} items")
            z, pos = m
            have_idx = False
        elif hasattr(m, "z") and hasattr(m, "pos"):
            z, pos = m.z, m.pos
            mi = getattr(m, "idx", None)
            if mi is None:
                have_idx = False
            else:
                mi = _to_numpy(mi).reshape(-1)
                if mi.size != 1:
                    raise ValueError(f"molecule {k}: idx must be a scalar, got shape {mi.shape}")
                idx.append(int(mi[0]))
        else:
            raise TypeError(
                f"molecule {k}: expected an object with .z and .pos or a (z, pos) tuple, "
                f"got {type(m).__name__}"
            )
        z = _to_numpy(z).reshape(-1)
        pos = _to_numpy(pos)
        mols.append((z.astype(np.int64) if z.dtype.kind in "iu" else z, pos))
    if have_idx and mols:
        ids = np.asarray(idx, dtype=np.int64)
    else:
        ids = np.arange(len(mols), dtype=np.int64)
    if len(np.unique(ids)) != len(ids):
        raise ValueError("molecules carry duplicate idx values")
    return mols, ids


def _fingerprint(mols: Sequence[tuple[np.ndarray, np.ndarray]], idx: np.ndarray) -> str:
    """Hash of every molecule's z and pos (positions at float32 precision) and idx."""
    h = hashlib.sha256()
    h.update(np.int64(len(mols)).tobytes())
    h.update(np.ascontiguousarray(idx, dtype=np.int64).tobytes())
    for z, pos in mols:
        h.update(np.int64(np.size(z)).tobytes())
        h.update(np.ascontiguousarray(z, dtype=np.int64).tobytes())
        pos32 = np.ascontiguousarray(np.asarray(pos, dtype=np.float64), dtype=np.float32)
        h.update(pos32.tobytes())
    return h.hexdigest()[:32]


def _label_one(
    z: np.ndarray, pos: np.ndarray, orbitals: Sequence[str], method: str, options: dict, name: str
) -> dict[str, OrbitalResult]:
    return compute_orbitals(z, pos, orbitals, method, name=name, **options)


def _label_chunk(
    start: int,
    mols: Sequence[tuple[np.ndarray, np.ndarray]],
    orbitals: Sequence[str],
    method: str,
    options: dict,
) -> dict[str, np.ndarray]:
    """Label molecules ``start .. start+len(mols)``; failures are recorded, not raised."""
    counts = np.array([np.size(z) for z, _ in mols], dtype=np.int64)
    n_atoms = int(counts.sum())
    coeff = {o: np.full(n_atoms, np.nan) for o in orbitals}
    energy = {o: np.full(len(mols), np.nan) for o in orbitals}
    failed: list[int] = []
    errors: list[str] = []
    offset = 0
    for k, (z, pos) in enumerate(mols):
        n = int(counts[k])
        try:
            res = _label_one(z, pos, orbitals, method, options, f"molecule {start + k}")
            for o in orbitals:
                coeff[o][offset : offset + n] = res[o].coefficients
                energy[o][k] = res[o].energy_ev
        except Exception as exc:  # noqa: BLE001 - recorded and reported, never hidden
            failed.append(start + k)
            errors.append(f"{type(exc).__name__}: {exc}")
        offset += n
    out = {
        "start": np.int64(start),
        "stop": np.int64(start + len(mols)),
        "counts": counts,
        "failed": np.asarray(failed, dtype=np.int64),
        "errors": np.array(errors, dtype=str),
    }
    for k, o in enumerate(orbitals):
        out[f"coeff_{k}"] = coeff[o]
        out[f"energy_{k}"] = energy[o]
    return out


def _worker_init() -> None:
    # one process per core: keep tblite's OpenMP to a single thread (set before tblite loads)
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    import tblite.interface  # noqa: F401  (load once per worker, not per chunk)


def _available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _check_meta(found: Mapping[str, Any], expected: Mapping[str, Any], where: Path) -> None:
    problems = []
    for key in ("format_version", "method", "orbitals", "n_molecules", "fingerprint", "options"):
        if found.get(key) != expected.get(key):
            problems.append(f"{key}: cache has {found.get(key)!r}, requested {expected.get(key)!r}")
    if problems:
        raise OrbitalCacheMismatchError(
            f"orbital-label cache {where} was made for different molecules or settings "
            f"({'; '.join(problems)}). Use another cache_path, or delete {where} to recompute."
        )


def _partial_dir(cache_path: Path) -> Path:
    return cache_path.with_name(cache_path.name + ".partial")


def label_orbitals(
    molecules: Iterable[Any],
    cache_path: str | os.PathLike,
    orbitals: Sequence[str] = ("homo", "lumo"),
    method: str = "gfn2-xtb",
    num_workers: int | None = None,
    chunk_size: int = 500,
    *,
    progress: bool = True,
    max_chunks: int | None = None,
    mp_context: str = "spawn",
    **calc_options: Any,
) -> OrbitalLabels | None:
    """Label every molecule with per-atom orbital shares; parallel, cached and resumable.

    Args:
        molecules: a sequence of objects with ``.z`` and ``.pos`` (Angstrom), e.g. a PyG dataset,
            or of ``(z, pos)`` tuples. Label the *full* dataset: :class:`AttachOrbitalLabels`
            finds each molecule by its ``idx`` (stored when the molecules carry one).
        cache_path: ``.npz`` file for the finished labels. While running, finished chunks live
            in ``<cache_path>.partial/`` (each written atomically); an interrupted run resumes
            from them, and a finished cache is loaded without computing anything. A cache made
            for other molecules (fingerprint of z/pos/idx) or other settings is refused with
            :class:`OrbitalCacheMismatchError`. An unreadable cache or chunk (truncated copy,
            damaged disk) is renamed to ``<name>.corrupt`` and recomputed, with an
            :class:`OrbitalCacheWarning` naming it.
        orbitals: orbitals to label, e.g. ``("homo", "lumo")`` or ``("homo",)``.
        method: see :func:`compute_orbitals`.
        num_workers: processes (default: all cores available). ``<= 1`` runs in this process.
        chunk_size: molecules per chunk (unit of work, of caching and of resumption). A resumed
            run keeps the chunk size of the cache it resumes.
        progress: show a tqdm progress bar.
        max_chunks: compute at most this many new chunks, then return ``None`` if the dataset
            is not finished (for splitting a long job over several sessions; rerun to go on).
        mp_context: multiprocessing start method for the workers (``"spawn"`` is safe with
            torch/OpenMP in the parent; ``"forkserver"`` also works).
        **calc_options: forwarded to :func:`compute_orbitals` (``charge``, ``uhf``,
            ``max_iter``, ``electronic_temperature``, ``degeneracy_tol_ev``, ``min_distance``,
            ``functional``, ...), applied to every molecule and recorded in the cache.

    Molecules whose calculation fails do not stop the run: their coefficients and energies are
    NaN, their position and error message are in ``labels.failed`` / ``labels.errors``, and an
    :class:`OrbitalLabelWarning` summarises them (also each time a finished cache is loaded).
    """
    unknown = sorted(set(calc_options) - set(_CALC_OPTIONS))
    if unknown:
        raise TypeError(f"label_orbitals got unknown option(s) {unknown}; allowed: {_CALC_OPTIONS}")
    if isinstance(orbitals, str):
        orbitals = (orbitals,)
    orbitals = tuple(_parse_orbital(o)[0] for o in orbitals)
    if not orbitals or len(set(orbitals)) != len(orbitals):
        raise ValueError(f"orbitals must be non-empty and distinct, got {orbitals}")
    method, kind = _normalise_method(method)
    if kind == "pyscf":
        _import_pyscf()  # fail early with the install hint
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    options = {k: calc_options[k] for k in sorted(calc_options)}
    json.dumps(options)  # must be recordable in the cache

    cache_path = Path(cache_path)
    mols, idx = _extract_molecules(molecules)
    expected = {
        "format_version": _CACHE_FORMAT_VERSION,
        "method": method,
        "orbitals": list(orbitals),
        "n_molecules": len(mols),
        "fingerprint": _fingerprint(mols, idx),
        "options": options,
    }

    if cache_path.exists():
        try:
            labels = OrbitalLabels.load(cache_path)
        except OrbitalCacheCorruptError as exc:
            _set_aside_warning(cache_path, exc)
        else:
            _check_meta(labels.meta(), expected, cache_path)
            _warn_failed(labels)
            return labels

    partial = _partial_dir(cache_path)
    meta_file = partial / "meta.json"
    remove_stale_temporaries(cache_path.parent)
    remove_stale_temporaries(partial)
    found = None
    if meta_file.exists():
        try:
            found = json.loads(meta_file.read_text())
            if not isinstance(found, dict) or not isinstance(found.get("chunk_size"), int):
                raise ValueError("not a partial-cache description")
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            # without its description the chunks cannot be matched to these molecules: set all aside
            _set_aside_warning(partial, exc)
            found = None
    if found is not None:
        _check_meta({k: found.get(k) for k in expected}, expected, partial)
        if found["chunk_size"] != chunk_size:
            warnings.warn(
                f"resuming {partial} with its chunk_size={found['chunk_size']} "
                f"(requested {chunk_size})",
                stacklevel=2,
            )
        chunk_size = int(found["chunk_size"])
    else:
        partial.mkdir(parents=True, exist_ok=True)
        write_text(meta_file, json.dumps({**expected, "chunk_size": chunk_size}, indent=1))

    n_chunks = (len(mols) + chunk_size - 1) // chunk_size
    bounds = [(c * chunk_size, min(len(mols), (c + 1) * chunk_size)) for c in range(n_chunks)]

    def chunk_file(c: int) -> Path:
        return partial / f"chunk_{c:06d}.npz"

    done: dict[int, dict[str, np.ndarray]] = {}
    for c in range(n_chunks):
        if chunk_file(c).exists():
            try:
                with np.load(chunk_file(c), allow_pickle=False) as f:
                    data = {k: f[k] for k in f.files}
                if (int(data["start"]), int(data["stop"])) != bounds[c]:
                    raise ValueError("chunk bounds do not match")
                done[c] = data
            except _UNREADABLE as exc:  # a damaged chunk is recomputed, not trusted
                _set_aside_warning(chunk_file(c), exc)
    todo = [c for c in range(n_chunks) if c not in done]
    if max_chunks is not None:
        todo = todo[: max(0, int(max_chunks))]

    workers = _available_cores() if num_workers is None else int(num_workers)
    workers = max(1, min(workers, len(todo)))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=len(mols),
            initial=sum(b - a for c, (a, b) in enumerate(bounds) if c in done),
            desc=f"{method} orbitals",
            unit="mol",
            dynamic_ncols=True,
        )

    def finish(c: int, data: dict[str, np.ndarray]) -> None:
        with atomic_open(chunk_file(c)) as fh:
            np.savez(fh, **data)
        done[c] = data
        if bar is not None:
            bar.update(bounds[c][1] - bounds[c][0])

    try:
        if workers <= 1:
            for c in todo:
                a, b = bounds[c]
                finish(c, _label_chunk(a, mols[a:b], orbitals, method, options))
        elif todo:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor, as_completed
            from concurrent.futures.process import BrokenProcessPool

            pool = ProcessPoolExecutor(
                max_workers=workers, mp_context=mp.get_context(mp_context), initializer=_worker_init
            )
            try:
                futures = {}
                for c in todo:
                    a, b = bounds[c]
                    fut = pool.submit(_label_chunk, a, mols[a:b], orbitals, method, options)
                    futures[fut] = c
                for fut in as_completed(futures):
                    try:
                        data = fut.result()
                    except BrokenProcessPool as exc:
                        raise RuntimeError(
                            f"an orbital worker process died (crash or out of memory); the "
                            f"{len(done)} finished chunks are kept in {partial}, rerun to resume"
                        ) from exc
                    finish(futures[fut], data)
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
    finally:
        if bar is not None:
            bar.close()

    if len(done) < n_chunks:
        return None

    labels = _assemble(done, n_chunks, mols, idx, expected)
    labels.save(cache_path)
    for c in range(n_chunks):
        chunk_file(c).unlink(missing_ok=True)
    meta_file.unlink(missing_ok=True)
    try:
        partial.rmdir()
    except OSError:  # chunks set aside as unreadable stay there, for inspection
        pass
    _warn_failed(labels)
    return labels


def _set_aside_warning(path: Path, exc: BaseException) -> None:
    aside = set_aside(path)
    what = "partial cache" if path.is_dir() or aside.is_dir() else "cache file"
    warnings.warn(
        f"unreadable orbital-label {what} {path} ({type(exc).__name__}: {exc}); kept as {aside.name}, "
        f"its molecules are recomputed",
        OrbitalCacheWarning,
        stacklevel=3,
    )


def _assemble(
    done: Mapping[int, Mapping[str, np.ndarray]],
    n_chunks: int,
    mols: Sequence[tuple[np.ndarray, np.ndarray]],
    idx: np.ndarray,
    meta: Mapping[str, Any],
) -> OrbitalLabels:
    orbitals = list(meta["orbitals"])
    chunks = [done[c] for c in range(n_chunks)]
    counts = np.concatenate([ch["counts"] for ch in chunks]) if chunks else np.zeros(0, np.int64)
    expected_counts = np.array([np.size(z) for z, _ in mols], dtype=np.int64)
    if not np.array_equal(counts, expected_counts):
        raise OrbitalCacheMismatchError("cached chunks do not match the molecules' atom counts")
    ptr = np.zeros(len(mols) + 1, dtype=np.int64)
    np.cumsum(counts, out=ptr[1:])
    z = np.concatenate([np.asarray(zz).reshape(-1) for zz, _ in mols]) if mols else np.zeros(0)

    def cat(key: str) -> np.ndarray:
        return np.concatenate([ch[key] for ch in chunks]) if chunks else np.zeros(0)

    return OrbitalLabels(
        method=meta["method"],
        orbitals=orbitals,
        ptr=ptr,
        z=z,
        idx=idx,
        coeffs={o: cat(f"coeff_{k}") for k, o in enumerate(orbitals)},
        energies_ev={o: cat(f"energy_{k}") for k, o in enumerate(orbitals)},
        failed=cat("failed").astype(np.int64),
        errors=[str(e) for e in cat("errors").tolist()] if chunks else [],
        fingerprint=meta["fingerprint"],
        options=meta["options"],
    )


def _warn_failed(labels: OrbitalLabels) -> None:
    if len(labels.failed) == 0:
        return
    shown = "; ".join(f"#{i}: {e}" for i, e in list(zip(labels.failed.tolist(), labels.errors))[:3])
    more = f" (and {len(labels.failed) - 3} more)" if len(labels.failed) > 3 else ""
    warnings.warn(
        f"{len(labels.failed)} of {len(labels)} molecules could not be labelled with "
        f"{labels.method}; their coefficients are NaN (see labels.failed / labels.errors): "
        f"{shown}{more}",
        OrbitalLabelWarning,
        stacklevel=3,
    )


# --------------------------------------------------------------------------------------------
# PyG transform (class built on first access so that worker processes need not import PyG)
# --------------------------------------------------------------------------------------------


def _make_attach_class():
    import torch
    from torch_geometric.transforms import BaseTransform

    class AttachOrbitalLabels(BaseTransform):
        """Attach per-atom orbital shares and orbital energies to each ``Data`` by its ``idx``.

        Sets, for every labelled orbital (names from :func:`_attr_name`, e.g. ``homo``):
        ``data.<orb>_coeff`` float32 ``[n_atoms]`` and ``data.<orb>_<suffix>`` float32 ``[1]``
        (energy in eV; suffix ``xtb`` for xTB methods, ``dft`` for PySCF), so by default
        ``homo_coeff``, ``lumo_coeff``, ``homo_xtb``, ``lumo_xtb``.

        Args:
            labels: an :class:`OrbitalLabels` or the path of a saved one.
            allow_failed: attach NaN for molecules whose calculation failed instead of raising
                (filter them out with ``labels.failed`` instead, NaN poisons a loss).
            energy_suffix: override the energy attribute suffix.

        Raises ValueError if a Data has no ``idx``, an ``idx`` that was not labelled, or a
        different number of atoms (or different atomic numbers) than its labels.
        """

        def __init__(
            self,
            labels: "OrbitalLabels | str | os.PathLike",
            allow_failed: bool = False,
            energy_suffix: str | None = None,
        ):
            if not isinstance(labels, OrbitalLabels):
                labels = OrbitalLabels.load(labels)
            self.labels = labels
            self.allow_failed = allow_failed
            self.energy_suffix = energy_suffix or ("xtb" if labels.method.endswith("xtb") else "dft")
            ids = labels.idx
            self._identity = bool(np.array_equal(ids, np.arange(len(ids))))
            self._row = None if self._identity else {int(v): r for r, v in enumerate(ids.tolist())}

        def _row_of(self, idx: int) -> int:
            if self._identity:
                if 0 <= idx < len(self.labels):
                    return idx
            elif idx in self._row:
                return self._row[idx]
            raise ValueError(
                f"molecule idx={idx} has no orbital labels ({len(self.labels)} molecules labelled)"
            )

        def forward(self, data: Any) -> Any:
            idx_t = getattr(data, "idx", None)
            if idx_t is None:
                raise ValueError("AttachOrbitalLabels needs data.idx (the molecule's dataset row)")
            idx_np = _to_numpy(idx_t).reshape(-1)
            if idx_np.size != 1:
                raise ValueError(
                    f"AttachOrbitalLabels works on single molecules; data.idx has {idx_np.size} "
                    "entries (apply it as a dataset transform, before batching)"
                )
            idx = int(idx_np[0])
            rec = self.labels[self._row_of(idx)]
            n_atoms = int(data.num_nodes)
            if n_atoms != rec["z"].size:
                raise ValueError(
                    f"molecule idx={idx} has {n_atoms} atoms but its orbital labels have "
                    f"{rec['z'].size}: labels belong to another dataset"
                )
            z = getattr(data, "z", None)
            if z is not None and not np.array_equal(_to_numpy(z).reshape(-1), rec["z"]):
                raise ValueError(
                    f"molecule idx={idx}: atomic numbers differ from those of its orbital labels"
                )
            if rec["failed"] and not self.allow_failed:
                raise ValueError(
                    f"molecule idx={idx} has no orbital labels: its calculation failed "
                    f"({rec['error']}); drop labels.failed from the dataset or pass allow_failed=True"
                )
            for orb in self.labels.orbitals:
                base = _attr_name(orb)
                coeff = torch.as_tensor(rec[f"{base}_coeff"], dtype=torch.float32)
                setattr(data, f"{base}_coeff", coeff)
                setattr(
                    data,
                    f"{base}_{self.energy_suffix}",
                    torch.tensor([rec[f"{base}_energy_ev"]], dtype=torch.float32),
                )
            return data

        def __repr__(self) -> str:
            return f"{type(self).__name__}({self.labels!r})"

    AttachOrbitalLabels.__module__ = __name__
    AttachOrbitalLabels.__qualname__ = "AttachOrbitalLabels"  # picklable by reference
    return AttachOrbitalLabels


def __getattr__(name: str) -> Any:
    if name == "AttachOrbitalLabels":
        cls = _make_attach_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
