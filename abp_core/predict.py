"""Predictions (and per-atom readout weights) for new molecules from a trained checkpoint.

>>> from abp_core.predict import predict_file
>>> res = predict_file("runs/.../best.ckpt", "molecules.sdf", out="preds.csv")
>>> res.predictions          # one row per molecule: name, status, targets in physical units
>>> res.atom_weights         # long format: molecule, name, atom_index, element, weight

The checkpoint rebuilds itself: it carries the config (model), the standardiser, the target
names/units and the elements seen in training. Molecules are read with RDKit (``.sdf``/``.mol``;
hydrogens kept) or ASE (``.xyz``/``.extxyz``, multi-frame; each frame parsed on its own so that one
broken frame does not lose the others). Coordinates must be in Å.

A molecule is not predicted -- but reported by name with a warning and a ``status`` -- when it
cannot be read (``unreadable``), has no 3D coordinates (``no_3d``: no conformer, a 2D SDF record, or
all z equal with hydrogens at depiction distances -- a planar molecule such as water in the xy-plane
is accepted), lacks explicit hydrogens (``implicit_hydrogens``), holds an element the model never saw
in training (``unknown_element``) or has overlapping atoms (``bad_geometry``). All other molecules
are predicted (``status == "ok"``).
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

__all__ = ["MoleculeFileError", "Molecule", "PredictionResult", "PredictionWarning", "read_molecules", "predict", "predict_file"]


class PredictionWarning(UserWarning):
    """A molecule that could not be predicted (see its ``status``)."""


class MoleculeFileError(ValueError):
    """A molecule file that cannot be used at all (unsupported format)."""


@dataclass
class Molecule:
    """One input structure: ``z`` (atomic numbers), ``pos`` [n, 3] in Å, and a ``status``."""

    name: str
    z: Optional[np.ndarray] = None
    pos: Optional[np.ndarray] = None
    status: str = "ok"
    message: str = ""


@dataclass
class PredictionResult:
    predictions: pd.DataFrame
    atom_weights: Optional[pd.DataFrame]
    messages: List[str] = field(default_factory=list)
    out: Optional[Path] = None
    weights_path: Optional[Path] = None
    views: List[Path] = field(default_factory=list)


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


def read_molecules(path: Union[str, Path]) -> List[Molecule]:
    """Molecules of an ``.sdf``/``.mol`` (RDKit) or ``.xyz``/``.extxyz`` (ASE) file, with a status each."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"molecule file {str(path)!r} not found")
    suffix = path.suffix.lower()
    if suffix in (".sdf", ".mol", ".sd"):
        return _read_sdf(path)
    if suffix in (".xyz", ".extxyz"):
        return _read_xyz(path)
    raise MoleculeFileError(f"{path}: unsupported molecule format {suffix!r}; use .sdf/.mol or .xyz/.extxyz")


def _check(mol: Molecule, known: Sequence[int]) -> Molecule:
    if mol.status != "ok":
        return mol
    if known:
        unseen = sorted({int(v) for v in mol.z} - set(int(k) for k in known))
        if unseen:
            mol.status = "unknown_element"
            mol.message = (f"element(s) {', '.join(_symbol(v) for v in unseen)} never seen in training "
                           f"(trained on {', '.join(_symbol(v) for v in known)})")
            return mol
    try:
        from .data.common import check_geometry

        check_geometry(mol.z, mol.pos, mol.name)
    except ValueError as exc:
        mol.status, mol.message = "bad_geometry", str(exc)
    return mol


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


def predict(checkpoint, molecules: Union[str, Path, Sequence[Molecule]], batch_size: int = 64,
            device: Optional[str] = None) -> PredictionResult:
    """Predict molecules with a checkpoint (path or loaded :class:`~abp_core.train.AtomisticTask`).

    Returns predictions in physical units (one column ``"<target> [<unit>]"`` per target, NaN for
    molecules that were not predicted) and, for weighted readouts (WA, OWA, ABP), each atom's weight.
    """
    from torch_geometric.data import Batch, Data

    from .train import AtomisticTask, load_task

    task = checkpoint if isinstance(checkpoint, AtomisticTask) else load_task(checkpoint)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    task = task.to(device).eval()
    hp = task.hparams
    names, units = list(hp["target_names"]), list(hp["target_units"])
    known = list(hp.get("train_elements") or [])
    mols = read_molecules(molecules) if isinstance(molecules, (str, Path)) else list(molecules)
    mols = [_check(m, known) for m in mols]
    messages = []
    for m in mols:
        if m.status != "ok":
            msg = f"molecule {m.name!r} not predicted ({m.status}): {m.message}"
            messages.append(msg)
            warnings.warn(msg, PredictionWarning, stacklevel=2)
    ok = [i for i, m in enumerate(mols) if m.status == "ok"]
    preds = np.full((len(mols), len(names)), np.nan)
    weight_rows: List[Dict[str, Any]] = []
    weighted = bool(getattr(task.model.readout, "weighted", False))
    with torch.no_grad():
        for start in range(0, len(ok), batch_size):
            chunk = ok[start:start + batch_size]
            data = [Data(z=torch.as_tensor(mols[i].z, dtype=torch.long),
                         pos=torch.as_tensor(mols[i].pos, dtype=torch.float32)) for i in chunk]
            batch = Batch.from_data_list(data).to(device)
            pred, w = task.predict_physical(batch, return_atom_weights=True)
            preds[chunk] = pred.double().cpu().numpy()
            if w is not None:
                w = w.double().cpu().numpy()
                vec = batch.batch.cpu().numpy()
                for j, i in enumerate(chunk):
                    wi = w[vec == j]
                    for a, (zz, ww) in enumerate(zip(mols[i].z, wi)):
                        weight_rows.append({"molecule": i, "name": mols[i].name, "atom_index": a,
                                            "element": _symbol(zz), "weight": float(ww)})
    table = pd.DataFrame({
        "molecule": range(len(mols)),
        "name": [m.name for m in mols],
        "status": [m.status for m in mols],
        "formula": [_formula(m.z) for m in mols],
        "n_atoms": [len(m.z) if m.z is not None else 0 for m in mols],
    })
    for t, (name, unit) in enumerate(zip(names, units)):
        table[f"{name} [{unit}]" if unit else name] = preds[:, t]
    table["message"] = [m.message for m in mols]
    weights = pd.DataFrame(weight_rows, columns=["molecule", "name", "atom_index", "element", "weight"]) \
        if weighted else None
    if not weighted:
        messages.append(f"readout {task.cfg.model.readout!r} has no per-atom weights (only WA, OWA and ABP do)")
    res = PredictionResult(table, weights, messages)
    res._mols = mols  # kept for views
    return res


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:60] or "molecule"


def predict_file(checkpoint, molecules: Union[str, Path], out: Union[str, Path] = "predictions.csv",
                 views: Optional[Union[str, Path]] = None, batch_size: int = 64,
                 weights_out: Optional[Union[str, Path]] = None) -> PredictionResult:
    """:func:`predict` and write ``out`` (+ ``<out>_atom_weights.csv`` and HTML views if asked)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PredictionWarning)  # reported through res.messages
        res = predict(checkpoint, molecules, batch_size=batch_size)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    res.predictions.to_csv(out, index=False)
    res.out = out
    if res.atom_weights is not None:
        wpath = Path(weights_out) if weights_out else out.with_name(out.stem + "_atom_weights.csv")
        res.atom_weights.to_csv(wpath, index=False)
        res.weights_path = wpath
    if views is not None:
        if res.atom_weights is None:
            res.messages.append("--views skipped: the readout has no per-atom weights")
            return res
        try:
            from .viz import attention_view_html
        except ImportError:
            res.messages.append("--views skipped: abp_core.viz.attention_view_html is not available "
                                "in this installation")
            return res
        vdir = Path(views)
        vdir.mkdir(parents=True, exist_ok=True)
        for i, mol in enumerate(res._mols):
            if mol.status != "ok":
                continue
            w = res.atom_weights[res.atom_weights["molecule"] == i]["weight"].to_numpy()
            html = attention_view_html(mol.z, mol.pos, w, mol.name)
            path = vdir / f"{i:05d}_{_slug(mol.name)}.html"
            path.write_text(html)
            res.views.append(path)
        res.messages.append(f"{len(res.views)} attention view(s) written to {vdir}")
    return res
