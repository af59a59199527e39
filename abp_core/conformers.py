"""3D structures from SMILES: RDKit ETKDG, then MMFF94, optionally then GFN2-xTB (tblite).

>>> from abp_core.conformers import from_smiles
>>> mols = from_smiles(["CC(=O)C", "c1ccncc1"], optimize="mmff")      # or optimize="xtb"
>>> mols[0].z, mols[0].pos, mols[0].status, mols[0].geometry          # Å, "ok", "ETKDGv3+MMFF94"

Each SMILES becomes one :class:`abp_core.predict.Molecule` (all hydrogens explicit). The steps:

1. parse (``Chem.MolFromSmiles``, sanitised) -- failure: status ``invalid_smiles``;
2. refuse what a model trained on QM9 has never seen, before any geometry work: a net formal charge
   (``charged``), unpaired electrons (``radical``; RDKit's count of radical electrons) and, when the caller
   gives ``max_heavy_atoms``, molecules with more heavy atoms than that (``too_large``);
3. add hydrogens and embed one conformer with ETKDGv3 (seeded, so the same SMILES gives the same
   geometry; one retry from random coordinates) -- failure: ``embedding_failed``;
4. MMFF94 minimisation (up to 2,000 iterations). Without MMFF parameters for an atom the ETKDG geometry is
   kept and the message says so; non-convergence is noted, not an error;
5. ``optimize="xtb"``: GFN2-xTB minimisation with tblite through ASE (LBFGS to ``fmax`` 0.05 eV/Å, at most
   300 steps), closer to QM9's B3LYP geometries than MMFF -- an SCF failure: ``optimization_failed``.

The geometry is a single low-energy conformer, not a Boltzmann ensemble; for floppy molecules the
prediction depends on which one.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np

__all__ = ["OPTIMIZERS", "DEFAULT_SEED", "from_smiles", "embed", "xtb_optimize", "to_sdf_block"]

#: Values of ``optimize``: ``"mmff"`` (ETKDG + MMFF94, default), ``"xtb"`` (+ GFN2-xTB), ``"none"`` (ETKDG only).
OPTIMIZERS = ("mmff", "xtb", "none")
#: Seed of ETKDG's random start (fixed: reproducible geometries).
DEFAULT_SEED = 0xABD
XTB_FMAX = 0.05
XTB_STEPS = 300


def _molecule(name, **kw):
    from .predict import Molecule

    return Molecule(name, **kw)


def embed(mol, seed: int = DEFAULT_SEED):
    """Add hydrogens to an RDKit molecule and embed one ETKDGv3 conformer; returns ``(molh, ok)``."""
    from rdkit import Chem
    from rdkit.Chem import AllChem

    molh = Chem.AddHs(mol)
    params = AllChem.ETKDGv3()
    params.randomSeed = int(seed)
    if AllChem.EmbedMolecule(molh, params) == 0:
        return molh, True
    params.useRandomCoords = True  # the usual rescue for rings and cages that defeat the distance-geometry start
    params.maxIterations = 2000
    return molh, AllChem.EmbedMolecule(molh, params) == 0


def xtb_optimize(z: np.ndarray, pos: np.ndarray, fmax: float = XTB_FMAX, steps: int = XTB_STEPS,
                 charge: int = 0) -> tuple[np.ndarray, bool, int]:
    """GFN2-xTB (tblite) minimisation with ASE's LBFGS; returns ``(positions Å, converged, steps)``.

    Raises ``RuntimeError`` when tblite fails (e.g. the SCF does not converge).
    """
    from ase import Atoms
    from ase.optimize import LBFGS
    from tblite.ase import TBLite

    from .orbitals import _openmp_threads

    atoms = Atoms(numbers=np.asarray(z, dtype=int), positions=np.asarray(pos, dtype=float))
    atoms.calc = TBLite(method="GFN2-xTB", charge=charge, verbosity=0)
    opt = LBFGS(atoms, logfile=None)
    with _openmp_threads(1):  # small molecules gain nothing from threads, and threads spin on a busy machine
        try:
            converged = bool(opt.run(fmax=fmax, steps=steps))
        except Exception as exc:  # noqa: BLE001 - tblite raises its own types; one message for all
            raise RuntimeError(f"GFN2-xTB failed: {' '.join(str(exc).split())[:200]}") from exc
    return atoms.get_positions().astype(np.float64), converged, int(opt.get_number_of_steps())


def from_smiles(smiles: Sequence[str], names: Optional[Sequence[str]] = None, optimize: str = "mmff",
                max_heavy_atoms: Optional[int] = None, seed: int = DEFAULT_SEED) -> List:
    """One :class:`~abp_core.predict.Molecule` per SMILES, with 3D coordinates or a failure status.

    Args:
        smiles: SMILES strings.
        names: a name per SMILES (default: the SMILES itself).
        optimize: ``"mmff"``, ``"xtb"`` or ``"none"`` (see :data:`OPTIMIZERS`).
        max_heavy_atoms: refuse molecules with more heavy atoms than this (status ``too_large``).
        seed: ETKDG seed.

    Every molecule carries ``smiles``, ``geometry`` (how its coordinates were made) and, if it has them,
    ``rdkit`` (the RDKit molecule with hydrogens and the final conformer, for writing SDF).
    """
    from rdkit import Chem, RDLogger
    from rdkit.Chem import AllChem, Descriptors

    if optimize not in OPTIMIZERS:
        raise ValueError(f"optimize must be one of {list(OPTIMIZERS)}, got {optimize!r}")
    smiles = [str(s) for s in smiles]
    names = [str(n) for n in names] if names is not None else list(smiles)
    if len(names) != len(smiles):
        raise ValueError(f"{len(names)} names for {len(smiles)} SMILES")
    out = []
    RDLogger.DisableLog("rdApp.*")
    try:
        for smi, name in zip(smiles, names):
            m = _one(smi, name, optimize, max_heavy_atoms, seed, Chem, AllChem, Descriptors)
            m.smiles = smi
            out.append(m)
    finally:
        RDLogger.EnableLog("rdApp.*")
    return out


def _one(smi, name, optimize, max_heavy_atoms, seed, Chem, AllChem, Descriptors):
    if not smi.strip():
        return _molecule(name, status="invalid_smiles", message="empty SMILES")
    mol = Chem.MolFromSmiles(smi.strip())
    if mol is None:
        return _molecule(name, status="invalid_smiles", message=f"RDKit cannot parse {smi!r} as a SMILES")
    if mol.GetNumAtoms() == 0:
        return _molecule(name, status="invalid_smiles", message="no atoms")
    charge = Chem.GetFormalCharge(mol)
    if charge != 0:
        return _molecule(name, status="charged", message=f"net charge {charge:+d}; the model was trained on "
                                                          f"neutral molecules only")
    radicals = Descriptors.NumRadicalElectrons(mol)
    if radicals:
        return _molecule(name, status="radical", message=f"{radicals} unpaired electron(s); the model was trained on "
                                                          f"closed-shell molecules only")
    heavy = mol.GetNumHeavyAtoms()
    if max_heavy_atoms is not None and heavy > max_heavy_atoms:
        return _molecule(name, status="too_large",
                         message=f"{heavy} heavy atoms, far more than the model's training molecules "
                                 f"(limit {max_heavy_atoms}); a prediction this far outside them means nothing")
    molh, ok = embed(mol, seed)
    z = np.array([a.GetAtomicNum() for a in molh.GetAtoms()], dtype=np.int64)
    if not ok:
        return _molecule(name, z=z, status="embedding_failed",
                         message="RDKit ETKDG could not embed a 3D conformer (also not from random coordinates)")
    notes, geometry = [], "ETKDGv3"
    if optimize in ("mmff", "xtb"):
        if AllChem.MMFFHasAllMoleculeParams(molh):
            if AllChem.MMFFOptimizeMolecule(molh, maxIters=2000) != 0:
                notes.append("MMFF94 did not converge in 2000 iterations")
            geometry += "+MMFF94"
        else:
            notes.append("no MMFF94 parameters for some atom: ETKDG geometry kept")
    pos = np.array(molh.GetConformer().GetPositions(), dtype=np.float64)
    if optimize == "xtb":
        try:
            pos, converged, steps = xtb_optimize(z, pos)
        except RuntimeError as exc:
            return _molecule(name, z=z, pos=pos, status="optimization_failed", message=str(exc))
        geometry += "+GFN2-xTB"
        if not converged:
            notes.append(f"GFN2-xTB not converged to fmax {XTB_FMAX} eV/Å in {steps} steps")
        conf = molh.GetConformer()
        for i, p in enumerate(pos):
            conf.SetAtomPosition(i, p.tolist())
    m = _molecule(name, z=z, pos=pos, message="; ".join(notes))
    m.geometry = geometry
    m.rdkit = molh
    return m


def to_sdf_block(mol) -> str:
    """An SDF record (V2000, explicit H) of a :class:`~abp_core.predict.Molecule` with coordinates.

    Uses the RDKit molecule of :func:`from_smiles` when there is one (bonds included), else writes the
    atoms only, from ``z``/``pos``. Properties: ``status``, ``smiles`` and ``geometry`` where known.
    """
    from rdkit import Chem

    rd = getattr(mol, "rdkit", None)
    if rd is None:
        rw = Chem.RWMol()
        for zz in mol.z:
            rw.AddAtom(Chem.Atom(int(zz)))
        conf = Chem.Conformer(len(mol.z))
        for i, p in enumerate(mol.pos):
            conf.SetAtomPosition(i, [float(v) for v in p])
        rw.AddConformer(conf, assignId=True)
        rd = rw.GetMol()
    rd = Chem.Mol(rd)
    rd.SetProp("_Name", str(mol.name))
    rd.SetProp("status", str(mol.status))
    for key in ("smiles", "geometry"):
        value = getattr(mol, key, None)
        if value:
            rd.SetProp(key, str(value))
    return Chem.MolToMolBlock(rd) + "".join(f">  <{k}>\n{rd.GetProp(k)}\n\n" for k in ("status", "smiles", "geometry")
                                            if rd.HasProp(k)) + "$$$$\n"
