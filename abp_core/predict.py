"""Predictions and per-atom attributions for new molecules, from a shipped model or a trained checkpoint.

>>> from abp_core.predict import predict_file, explain_molecules
>>> res = predict_file("qm9-homo-abp", smiles=["CC(=O)C", "c1ccncc1"], out="preds.csv")
>>> res = predict_file("runs/.../best.ckpt", "molecules.sdf", out="preds.csv")
>>> res.predictions          # one row per molecule: name, status, targets in physical units, message
>>> res.atom_weights         # long format: molecule, name, atom_index, element, weight
>>> ex = explain_molecules("qm9-homo-abp", smiles=["c1ccncc1"], out_dir="explained", orbitals=True)

The model is a shipped model's name (:mod:`abp_core.pretrained`, e.g. ``qm9-homo-abp``) or a checkpoint
written by the trainer; either carries the config (model), the standardiser, the target names/units and
the elements seen in training. Molecules come from SMILES (a list, or a ``.smi``/``.csv`` file: 3D
structures by RDKit ETKDG + MMFF94, optionally GFN2-xTB, see :mod:`abp_core.conformers`; the geometry
used is written next to the predictions as ``<out>_geometries.sdf``) or from 3D files: RDKit
(``.sdf``/``.mol``; hydrogens kept) or ASE (``.xyz``/``.extxyz``, multi-frame; each frame parsed on its own
so that one broken frame does not lose the others). Coordinates must be in Å.

A molecule is not predicted -- but reported by name with a warning, a ``status`` and a ``message`` -- when
it is an invalid SMILES (``invalid_smiles``), cannot be embedded in 3D (``embedding_failed``) or optimised
(``optimization_failed``), is charged (``charged``) or a radical (``radical``: from the SMILES, or an odd
electron count for a 3D file) while the model was trained on neutral closed-shell molecules, is far larger
than the training molecules (``too_large``: more than :data:`SIZE_FACTOR` times their largest heavy-atom
count, known for shipped models), cannot be read (``unreadable``), has no 3D coordinates (``no_3d``: no
conformer, a 2D SDF record, or all z equal with hydrogens at depiction distances -- a planar molecule such
as water in the xy-plane is accepted), lacks explicit hydrogens (``implicit_hydrogens``), holds an element
the model never saw in training (``unknown_element``) or has overlapping atoms (``bad_geometry``). All other
molecules are predicted (``status == "ok"``); one larger than every training molecule but within the limit
is predicted with a note in its ``message``.

Per-atom values: without ``method`` the readout's own weights (WA, OWA, ABP only); with ``method`` any
attribution of :func:`abp_core.explain.attribute` (``"rollout"``, ``"gradient"``, ...), for every readout.
"""
from __future__ import annotations

import io
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch

__all__ = ["MoleculeFileError", "MethodError", "Molecule", "PredictionResult", "PredictionWarning", "ExplanationResult",
           "read_molecules", "read_smiles_file", "load_molecules", "predict", "predict_file", "explain_molecules",
           "SIZE_FACTOR", "SMILES_SUFFIXES"]

#: A molecule with more than SIZE_FACTOR x the largest heavy-atom count of the training set is not predicted.
SIZE_FACTOR = 2.0
#: Files read as SMILES (one per line, optional name after whitespace; or a CSV with a ``smiles`` column).
SMILES_SUFFIXES = (".smi", ".smiles", ".csv")


class PredictionWarning(UserWarning):
    """A molecule that could not be predicted (see its ``status``)."""


class MoleculeFileError(ValueError):
    """A molecule file that cannot be used at all (unsupported format)."""


class MethodError(ValueError):
    """An attribution method that does not exist or that the model's readout does not support."""


@dataclass
class Molecule:
    """One input structure: ``z`` (atomic numbers), ``pos`` [n, 3] in Å, and a ``status``."""

    name: str
    z: Optional[np.ndarray] = None
    pos: Optional[np.ndarray] = None
    status: str = "ok"
    message: str = ""
    smiles: str = ""  #: input SMILES (molecules made by abp_core.conformers.from_smiles)
    geometry: str = ""  #: how the coordinates were made, e.g. "ETKDGv3+MMFF94" ("" = read from a file)
    rdkit: Any = field(default=None, repr=False, compare=False)  #: RDKit molecule with the conformer, if any


@dataclass
class PredictionResult:
    predictions: pd.DataFrame
    atom_weights: Optional[pd.DataFrame]
    messages: List[str] = field(default_factory=list)
    out: Optional[Path] = None
    weights_path: Optional[Path] = None
    views: List[Path] = field(default_factory=list)
    geometries_path: Optional[Path] = None  #: SDF of the geometries made from SMILES (None if none were)


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------
_FLAT_MESSAGE = ("2D coordinates (all z equal, and hydrogens drawn at depiction distances or absent); "
                 "embed a 3D conformer first")


def _looks_2d(z: np.ndarray, pos: np.ndarray) -> bool:
    """All atoms in one z-plane *and* not a plausible planar molecule.

    Planar molecules (water, benzene) legitimately have z = 0 in a 3D file oriented by symmetry; a 2D
    depiction gives itself away by its hydrogens, drawn as far from their neighbour as any bond (RDKit:
    1.5 Å, real X-H bonds are below 1.25 Å). Without hydrogens a non-linear planar structure is taken as 2D.
    """
    if len(z) < 3 or not np.allclose(pos[:, 2], pos[0, 2], atol=1e-4):
        return False
    centred = pos - pos.mean(0)
    if np.linalg.matrix_rank(centred, tol=1e-3) <= 1:  # linear molecules are 3D-valid in any orientation
        return False
    h = np.flatnonzero(z == 1)
    if len(h) == 0:
        return True
    d = np.linalg.norm(pos[h, None, :] - pos[None, :, :], axis=-1)
    d[np.arange(len(h)), h] = np.inf
    return bool((d.min(1) > 1.25).any())

def _symbol(z: int) -> str:
    from ase.data import chemical_symbols

    return chemical_symbols[int(z)] if 0 < int(z) < len(chemical_symbols) else f"Z{z}"


def _read_sdf(path: Path) -> List[Molecule]:
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")
    try:
        supplier = Chem.SDMolSupplier(str(path), removeHs=False, sanitize=False, strictParsing=False)
        out = []
        for i in range(len(supplier)):
            mol = supplier[i]
            name = f"{path.stem}:{i}"
            if mol is None:
                out.append(Molecule(name, status="unreadable", message="RDKit could not parse this record"))
                continue
            if mol.HasProp("_Name") and mol.GetProp("_Name").strip():
                name = mol.GetProp("_Name").strip()
            z = np.array([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int64)
            if len(z) == 0:
                out.append(Molecule(name, status="unreadable", message="no atoms"))
                continue
            if mol.GetNumConformers() == 0:
                out.append(Molecule(name, z, None, "no_3d", "no coordinates"))
                continue
            conf = mol.GetConformer()
            pos = np.array(conf.GetPositions(), dtype=np.float64).reshape(-1, 3)
            if not conf.Is3D():
                out.append(Molecule(name, z, pos, "no_3d", "a 2D SDF record; embed a 3D conformer first"))
                continue
            implicit = 0
            try:
                copy = Chem.Mol(mol)
                Chem.SanitizeMol(copy)
                implicit = sum(a.GetNumImplicitHs() for a in copy.GetAtoms())
            except Exception:  # noqa: BLE001 - unusual valences: keep the explicit atoms as given
                implicit = 0
            if implicit:
                out.append(Molecule(name, z, pos, "implicit_hydrogens",
                                    f"{implicit} implicit hydrogen(s); the model needs explicit H with "
                                    f"3D positions (RDKit: Chem.AddHs(mol, addCoords=True))"))
                continue
            if _looks_2d(z, pos):
                out.append(Molecule(name, z, pos, "no_3d", _FLAT_MESSAGE))
                continue
            out.append(Molecule(name, z, pos))
        return out
    finally:
        RDLogger.EnableLog("rdApp.*")


def _xyz_frames(text: str):
    lines = text.splitlines()
    i, k = 0, 0
    while i < len(lines):
        if not lines[i].strip():
            i += 1
            continue
        head = lines[i].strip()
        try:
            n = int(head.split()[0])
        except ValueError:
            yield k, None, f"line {i + 1}: expected an atom count, got {head[:40]!r}"
            return
        block = lines[i:i + n + 2]
        yield k, "\n".join(block) + "\n", (block[1] if len(block) > 1 else "")
        i += n + 2
        k += 1


def _read_xyz(path: Path) -> List[Molecule]:
    import ase.io
    from ase.data import atomic_numbers

    out = []
    for k, block, comment in _xyz_frames(path.read_text()):
        name = f"{path.stem}:{k}"
        if block is None:
            out.append(Molecule(name, status="unreadable", message=comment))
            break
        if comment.strip() and "=" not in comment:
            name = comment.strip()
        try:
            lines = block.splitlines()
            n = int(lines[0].split()[0])
            if len(lines) != n + 2:
                raise ValueError(f"expected {n} atom lines, found {len(lines) - 2}")
            # unknown element symbols make ASE fail; report them by name instead
            symbols = [ln.split()[0] for ln in lines[2:]]
            unknown = sorted({s for s in symbols if s.capitalize() not in atomic_numbers})
            if unknown:
                raise ValueError(f"unknown element symbol(s) {unknown}")
            atoms = ase.io.read(io.StringIO(block), format="extxyz")
            name = str(atoms.info.get("name", name))
        except Exception as exc:  # noqa: BLE001 - a broken frame must not lose the others
            out.append(Molecule(name, status="unreadable", message=f"{type(exc).__name__}: {exc}"))
            continue
        z = atoms.get_atomic_numbers().astype(np.int64)
        pos = atoms.get_positions().astype(np.float64)
        if _looks_2d(z, pos):
            out.append(Molecule(name, z, pos, "no_3d", _FLAT_MESSAGE))
            continue
        out.append(Molecule(name, z, pos))
    return out


def read_smiles_file(path: Union[str, Path]) -> tuple[List[str], List[str]]:
    """SMILES and names of a ``.smi`` file (``SMILES [name]`` per line; ``#`` comments, blank lines skipped)
    or a ``.csv`` file (a ``smiles`` column, any case; names from a ``name``/``id`` column if there is one,
    else ``<file>:<row>``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SMILES file {str(path)!r} not found")
    if path.suffix.lower() == ".csv":
        try:
            df = pd.read_csv(path, dtype=str, keep_default_na=False)
        except Exception as exc:  # noqa: BLE001 - pandas' parser errors vary
            raise MoleculeFileError(f"{path}: not a readable CSV ({type(exc).__name__}: {exc})") from None
        cols = {c.lower().strip(): c for c in df.columns}
        if "smiles" not in cols:
            raise MoleculeFileError(f"{path}: no 'smiles' column (columns: {', '.join(map(str, df.columns))})")
        smiles = df[cols["smiles"]].astype(str).tolist()
        name_col = next((cols[k] for k in ("name", "id", "molecule", "title") if k in cols), None)
        names = [str(n).strip() or f"{path.stem}:{i}" for i, n in enumerate(df[name_col])] if name_col else \
            [f"{path.stem}:{i}" for i in range(len(smiles))]
        return smiles, names
    smiles, names = [], []
    for k, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        parts = text.split(None, 1)
        smiles.append(parts[0])
        names.append(parts[1].strip() if len(parts) > 1 else parts[0])
    return smiles, names


def read_molecules(path: Union[str, Path], optimize: str = "mmff",
                   max_heavy_atoms: Optional[int] = None) -> List[Molecule]:
    """Molecules of an ``.sdf``/``.mol`` (RDKit), ``.xyz``/``.extxyz`` (ASE) or ``.smi``/``.csv`` (SMILES,
    embedded with ``optimize``, see :func:`abp_core.conformers.from_smiles`) file, with a status each."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"molecule file {str(path)!r} not found")
    suffix = path.suffix.lower()
    if suffix in (".sdf", ".mol", ".sd"):
        return _read_sdf(path)
    if suffix in (".xyz", ".extxyz"):
        return _read_xyz(path)
    if suffix in SMILES_SUFFIXES:
        from .conformers import from_smiles

        smiles, names = read_smiles_file(path)
        return from_smiles(smiles, names, optimize=optimize, max_heavy_atoms=max_heavy_atoms)
    raise MoleculeFileError(f"{path}: unsupported molecule format {suffix!r}; use .sdf/.mol, .xyz/.extxyz "
                            f"or SMILES in .smi/.csv")


def load_molecules(molecules: Union[None, str, Path, Sequence[Molecule]] = None,
                   smiles: Optional[Sequence[str]] = None, optimize: str = "mmff",
                   max_heavy_atoms: Optional[int] = None) -> List[Molecule]:
    """Molecules from a file or a list of :class:`Molecule`, followed by those of a list of SMILES."""
    if molecules is None and not smiles:
        raise MoleculeFileError("no molecules given: pass a molecule file and/or SMILES")
    mols: List[Molecule] = []
    if molecules is not None:
        mols += read_molecules(molecules, optimize, max_heavy_atoms) if isinstance(molecules, (str, Path)) \
            else list(molecules)
    if smiles:
        from .conformers import from_smiles

        mols += from_smiles(list(smiles), optimize=optimize, max_heavy_atoms=max_heavy_atoms)
    return mols


def _check(mol: Molecule, known: Sequence[int], size: Optional[Dict[str, int]] = None) -> Molecule:
    if mol.status != "ok":
        return mol
    if known:
        unseen = sorted({int(v) for v in mol.z} - set(int(k) for k in known))
        if unseen:
            mol.status = "unknown_element"
            mol.message = (f"element(s) {', '.join(_symbol(v) for v in unseen)} never seen in training "
                           f"(trained on {', '.join(_symbol(v) for v in known)})")
            return mol
    if int(np.sum(mol.z)) % 2:  # a neutral molecule with an odd electron count has an unpaired electron
        mol.status = "radical"
        mol.message = (f"{int(np.sum(mol.z))} electrons as a neutral molecule: a radical (or an ion given "
                       f"without its charge); the model was trained on neutral closed-shell molecules only")
        return mol
    if size:
        heavy = int(np.sum(np.asarray(mol.z) > 1))
        if heavy > size["limit"]:
            mol.status = "too_large"
            mol.message = (f"{heavy} heavy atoms, far more than the model's training molecules (at most "
                           f"{size['train_max']}; limit {size['limit']}); a prediction this far outside them "
                           f"means nothing")
            return mol
        if heavy > size["train_max"]:
            note = (f"{heavy} heavy atoms, more than any training molecule ({size['train_max']}): "
                    f"an extrapolation")
            mol.message = f"{mol.message}; {note}" if mol.message else note
    try:
        from .data.common import check_geometry

        check_geometry(mol.z, mol.pos, mol.name)
    except ValueError as exc:
        mol.status, mol.message = "bad_geometry", str(exc)
    return mol


def _size_limits(task) -> Optional[Dict[str, int]]:
    """Largest training heavy-atom count and the refusal limit, for models whose card records them."""
    info = getattr(task, "card", None) or {}
    train_max = info.get("data", {}).get("max_heavy_atoms")
    if not train_max:
        return None
    return {"train_max": int(train_max), "limit": int(math.floor(SIZE_FACTOR * int(train_max)))}


# ------------------------------------------------------------------------------------------------
# Predicting
# ------------------------------------------------------------------------------------------------
def _formula(z: Optional[np.ndarray]) -> str:
    if z is None:
        return ""
    from collections import Counter

    counts = Counter(_symbol(v) for v in z)
    order = sorted(counts, key=lambda s: (s != "C", s != "H", s))
    return "".join(f"{s}{counts[s] if counts[s] > 1 else ''}" for s in order)


def _attribution_fn(task, method: Optional[str]):
    """``fn(batch) -> per-atom values`` (or None): the readout's weights, or ``explain.attribute(method)``."""
    if method is None:
        if not bool(getattr(task.model.readout, "weighted", False)):
            return None
        return lambda batch: task.model.atom_weights(batch)
    try:
        from .explain import attribute, supported_methods
    except ImportError:  # the explain module is not part of this installation: the readout's weights only
        if method != "weights":
            raise MethodError(f"method {method!r} needs abp_core.explain, which this installation lacks") from None
        return _attribution_fn(task, None)
    allowed = supported_methods(task.model)
    if method not in allowed:
        raise MethodError(f"method {method!r} is not available for the {task.cfg.model.readout} readout; "
                         f"choose one of {allowed}")
    return lambda batch: attribute(task.model, batch, method=method)


def predict(checkpoint, molecules: Union[None, str, Path, Sequence[Molecule]] = None, batch_size: int = 64,
            device: Optional[str] = None, *, smiles: Optional[Sequence[str]] = None, optimize: str = "mmff",
            method: Optional[str] = None) -> PredictionResult:
    """Predict molecules with a shipped model's name, a checkpoint path or a loaded task.

    ``molecules``: a file (``.sdf``/``.xyz``/``.smi``/``.csv``) or a list of :class:`Molecule`; ``smiles``:
    SMILES strings (embedded with ``optimize``: ``"mmff"``, ``"xtb"`` or ``"none"``). Returns predictions in
    physical units (one column ``"<target> [<unit>]"`` per target, NaN for molecules that were not
    predicted) and per-atom values: the readout's weights (WA, OWA, ABP) or, with ``method``, the
    attribution of :func:`abp_core.explain.attribute` (column ``weight``, plus ``method``).
    """
    from torch_geometric.data import Batch, Data

    from .pretrained import resolve

    task = resolve(checkpoint)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    task = task.to(device).eval()
    hp = task.hparams
    names, units = list(hp["target_names"]), list(hp["target_units"])
    known = list(hp.get("train_elements") or [])
    size = _size_limits(task)
    attribution = _attribution_fn(task, method)  # checked before any molecule is embedded
    mols = load_molecules(molecules, smiles, optimize, size["limit"] if size else None)
    mols = [_check(m, known, size) for m in mols]
    messages = []
    for m in mols:
        if m.status != "ok":
            msg = f"molecule {m.name!r} not predicted ({m.status}): {m.message}"
            messages.append(msg)
            warnings.warn(msg, PredictionWarning, stacklevel=2)
    ok = [i for i, m in enumerate(mols) if m.status == "ok"]
    preds = np.full((len(mols), len(names)), np.nan)
    weight_rows: List[Dict[str, Any]] = []
    for start in range(0, len(ok), batch_size):
        chunk = ok[start:start + batch_size]
        data = [Data(z=torch.as_tensor(mols[i].z, dtype=torch.long),
                     pos=torch.as_tensor(mols[i].pos, dtype=torch.float32)) for i in chunk]
        batch = Batch.from_data_list(data).to(device)
        with torch.no_grad():
            pred = task.predict_physical(batch)
        preds[chunk] = pred.double().cpu().numpy()
        if attribution is None:
            continue
        w = attribution(batch).detach().double().cpu().numpy()
        vec = batch.batch.cpu().numpy()
        for j, i in enumerate(chunk):
            wi = w[vec == j]
            for a, (zz, ww) in enumerate(zip(mols[i].z, wi)):
                row = {"molecule": i, "name": mols[i].name, "atom_index": a, "element": _symbol(zz), "weight": float(ww)}
                if method is not None:
                    row["method"] = method
                weight_rows.append(row)
    table = pd.DataFrame({
        "molecule": range(len(mols)),
        "name": [m.name for m in mols],
        "status": [m.status for m in mols],
        "formula": [_formula(m.z) for m in mols],
        "n_atoms": [len(m.z) if m.z is not None else 0 for m in mols],
    })
    if any(m.smiles for m in mols):
        table["smiles"] = [m.smiles for m in mols]
        table["geometry"] = [m.geometry for m in mols]
    for t, (name, unit) in enumerate(zip(names, units)):
        table[f"{name} [{unit}]" if unit else name] = preds[:, t]
    table["message"] = [m.message for m in mols]
    columns = ["molecule", "name", "atom_index", "element", "weight"] + (["method"] if method is not None else [])
    weights = pd.DataFrame(weight_rows, columns=columns) if attribution is not None else None
    if attribution is None:
        messages.append(f"readout {task.cfg.model.readout!r} has no per-atom weights (only WA, OWA and ABP do); "
                        f"pass a method (e.g. 'gradient') for an attribution")
    res = PredictionResult(table, weights, messages)
    res._mols = mols  # kept for views and geometries
    res.task = task
    return res


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:60] or "molecule"


def _write_geometries(mols: Sequence[Molecule], path: Path) -> Optional[Path]:
    """SDF of every molecule whose coordinates were made here (from SMILES); None if there is none."""
    from .conformers import to_sdf_block
    from .files import write_text

    made = [m for m in mols if m.geometry and m.pos is not None]
    if not made:
        return None
    return write_text(path, "".join(to_sdf_block(m) for m in made))


def _write_csv(df: pd.DataFrame, path: Path) -> Path:
    from .files import write_text

    return write_text(path, df.to_csv(index=False))


def _save_view(view, path: Path, messages: List[str]) -> Path:
    """A standalone HTML page; 3Dmol.js embedded (offline) when a local copy exists."""
    from .viz import local_3dmol_js, save_html

    if local_3dmol_js() is not None:
        return save_html(view, path, inline_js=True)
    note = ("views load 3Dmol.js from its CDN (no local copy: `bash scripts/browser_deps.sh` or $ABP_3DMOL_JS "
            "makes them work offline)")
    if note not in messages:
        messages.append(note)
    return save_html(view, path)


def predict_file(checkpoint, molecules: Union[None, str, Path] = None, out: Union[str, Path] = "predictions.csv",
                 views: Optional[Union[str, Path]] = None, batch_size: int = 64,
                 weights_out: Optional[Union[str, Path]] = None, *, smiles: Optional[Sequence[str]] = None,
                 optimize: str = "mmff", method: Optional[str] = None,
                 geometries_out: Optional[Union[str, Path]] = None, device: Optional[str] = None) -> PredictionResult:
    """:func:`predict` and write ``out`` (+ ``<out>_atom_weights.csv``, ``<out>_geometries.sdf`` for molecules
    embedded from SMILES, and HTML views if asked)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PredictionWarning)  # reported through res.messages
        res = predict(checkpoint, molecules, batch_size=batch_size, device=device, smiles=smiles, optimize=optimize,
                      method=method)
    out = Path(out)
    res.out = _write_csv(res.predictions, out)
    res.geometries_path = _write_geometries(res._mols, Path(geometries_out) if geometries_out
                                            else out.with_name(out.stem + "_geometries.sdf"))
    if res.atom_weights is not None:
        wpath = Path(weights_out) if weights_out else out.with_name(out.stem + "_atom_weights.csv")
        res.weights_path = _write_csv(res.atom_weights, wpath)
    if views is not None:
        if res.atom_weights is None:
            res.messages.append("--views skipped: the readout has no per-atom weights (pass --method for an "
                                "attribution)")
            return res
        try:
            from .viz import attention_view
        except ImportError:
            res.messages.append("--views skipped: abp_core.viz.attention_view is not available "
                                "in this installation")
            return res
        vdir = Path(views)
        vdir.mkdir(parents=True, exist_ok=True)
        label = f"{method} attribution" if method else "readout weight"
        for i, mol in enumerate(res._mols):
            if mol.status != "ok":
                continue
            w = res.atom_weights[res.atom_weights["molecule"] == i]["weight"].to_numpy()
            view = attention_view(mol.z, mol.pos, w, title=mol.name, value_label=label)
            res.views.append(_save_view(view, vdir / f"{i:05d}_{_slug(mol.name)}.html", res.messages))
        res.messages.append(f"{len(res.views)} view(s) written to {vdir}")
    return res


# ------------------------------------------------------------------------------------------------
# Explaining: attributions beside xTB orbital shares of the same geometry, one HTML page per molecule
# ------------------------------------------------------------------------------------------------
@dataclass
class ExplanationResult:
    """Outcome of :func:`explain_molecules`.

    ``attributions``: one row per atom of every predicted molecule: ``molecule, name, atom_index, element,
    attribution, method`` and, with orbitals, ``homo_share`` and ``lumo_share`` (GFN2-xTB Mulliken shares,
    summing to 1 per molecule; NaN where xTB failed). ``orbital_energies``: per molecule, the xTB HOMO/LUMO
    energies in eV.
    """

    predictions: pd.DataFrame
    attributions: pd.DataFrame
    method: str
    orbital: Optional[str]
    messages: List[str] = field(default_factory=list)
    views: List[Path] = field(default_factory=list)
    files: Dict[str, Path] = field(default_factory=dict)
    molecules: List[Molecule] = field(default_factory=list, repr=False)

    @property
    def predicted(self) -> List[int]:
        """Indices of the molecules that were predicted (``status == "ok"``)."""
        return [i for i, m in enumerate(self.molecules) if m.status == "ok"]

    def view(self, i: int, **kwargs):
        """3D view of molecule ``i``: attribution | xTB share of the model's orbital on ONE colour scale
        (:func:`abp_core.viz.side_by_side`), or the attribution alone without orbital shares."""
        from .viz import attention_view, side_by_side

        mol = self.molecules[i]
        if mol.status != "ok":
            raise ValueError(f"molecule {i} ({mol.name!r}) was not predicted ({mol.status}): {mol.message}")
        rows = self.attributions[self.attributions["molecule"] == i]
        a = rows["attribution"].to_numpy()
        title = f"{mol.name} ({mol.smiles})" if mol.smiles and mol.smiles != mol.name else mol.name
        share = rows[f"{self.orbital}_share"].to_numpy() if self.orbital else None
        if share is not None and np.isfinite(share).all():
            return side_by_side(mol.z, mol.pos, {f"{self.method} attribution": a,
                                                 f"GFN2-xTB {self.orbital.upper()} share": share},
                                shared_scale=True, title=title, value_label="per-atom share (sums to 1)", **kwargs)
        return attention_view(mol.z, mol.pos, a, title=title, value_label=f"{self.method} attribution", **kwargs)

    def records(self) -> pd.DataFrame:
        """Per-atom ``molecule, atom, element, weight`` (the attribution) and ``coefficient`` (the xTB share of
        the model's orbital), as :func:`abp_core.viz.scatter_attention_vs_coefficients` takes them."""
        if not self.orbital:
            raise ValueError("no orbital shares: explain with orbitals=True a model of the HOMO or LUMO energy")
        df = self.attributions.rename(columns={"atom_index": "atom", "attribution": "weight",
                                               f"{self.orbital}_share": "coefficient"})
        df = df[np.isfinite(df["coefficient"].to_numpy())]
        df["molecule"] = df["name"]
        return df[["molecule", "atom", "element", "weight", "coefficient"]].reset_index(drop=True)


def _model_orbital(target_names: Sequence[str]) -> Optional[str]:
    """``"homo"``/``"lumo"`` if the model's (first) target is that orbital's energy, else None."""
    name = str(target_names[0]).lower()
    for orb in ("homo", "lumo"):
        if orb in name or ("highest occupied" if orb == "homo" else "lowest unoccupied") in name:
            return orb
    return None


def explain_molecules(model, molecules: Union[None, str, Path, Sequence[Molecule]] = None, *,
                      smiles: Optional[Sequence[str]] = None, out_dir: Optional[Union[str, Path]] = None,
                      method: Optional[str] = None, orbitals: bool = False, optimize: str = "mmff",
                      views: bool = True, batch_size: int = 64) -> ExplanationResult:
    """Predictions, per-atom attributions and (with ``orbitals``) GFN2-xTB HOMO/LUMO shares of the same geometry.

    ``method`` defaults to :func:`abp_core.explain.default_method` of the model's readout (the readout's
    weights if the explain module is missing). With ``out_dir``: ``predictions.csv``, ``attributions.csv``,
    ``geometries.sdf`` (molecules from SMILES) and, with ``views``, ``views/<i>_<name>.html``: one standalone
    page per molecule, attribution | orbital share of the orbital the model predicts, on one colour scale.
    """
    from .pretrained import resolve

    task = resolve(model)
    if method is None:
        try:
            from .explain import default_method

            method = default_method(task.cfg.model.readout)
        except ImportError:
            method = "weights"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PredictionWarning)
        res = predict(task, molecules, batch_size=batch_size, smiles=smiles, optimize=optimize, method=method)
    mols = res._mols
    if res.atom_weights is None:  # only without abp_core.explain, for a readout that has no weights
        raise MethodError(f"no per-atom attribution for the {task.cfg.model.readout} readout without abp_core.explain")
    att = res.atom_weights.rename(columns={"weight": "attribution"})
    att["method"] = method
    orbital = _model_orbital(task.hparams["target_names"]) if orbitals else None
    messages = list(res.messages)
    if orbitals:
        from .orbitals import compute_orbitals

        homo, lumo = np.full(len(att), np.nan), np.full(len(att), np.nan)
        energies = {"xtb_homo_eV": np.full(len(mols), np.nan), "xtb_lumo_eV": np.full(len(mols), np.nan)}
        for i, mol in enumerate(mols):
            if mol.status != "ok":
                continue
            rows = np.flatnonzero(att["molecule"].to_numpy() == i)
            try:
                orb = compute_orbitals(mol.z, mol.pos, ("homo", "lumo"), name=mol.name)
            except ValueError as exc:  # OrbitalCalculationError is a ValueError: report, keep the others
                messages.append(f"molecule {mol.name!r}: no xTB orbital shares ({exc})")
                continue
            homo[rows], lumo[rows] = orb["homo"].coefficients, orb["lumo"].coefficients
            energies["xtb_homo_eV"][i], energies["xtb_lumo_eV"][i] = orb["homo"].energy_ev, orb["lumo"].energy_ev
        att["homo_share"], att["lumo_share"] = homo, lumo
        for key, values in energies.items():
            res.predictions[key] = values
    result = ExplanationResult(res.predictions, att, method, orbital, messages, molecules=mols)
    if out_dir is None:
        return result
    out_dir = Path(out_dir)
    result.files["predictions"] = _write_csv(res.predictions, out_dir / "predictions.csv")
    result.files["attributions"] = _write_csv(att, out_dir / "attributions.csv")
    geo = _write_geometries(mols, out_dir / "geometries.sdf")
    if geo is not None:
        result.files["geometries"] = geo
    if views:
        result.views = _explanation_views(result, out_dir / "views")
    return result


def _explanation_views(result: ExplanationResult, folder: Path) -> List[Path]:
    return [_save_view(result.view(i), folder / f"{i:05d}_{_slug(result.molecules[i].name)}.html", result.messages)
            for i in result.predicted]
