"""Writers for small dataset fixtures in the official file formats (used by tests/data)."""
from __future__ import annotations

import hashlib
import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------
def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def embed(smiles: str, seed: int = 7):
    """An RDKit molecule with explicit H and one ETKDG conformer (Å)."""
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    params = AllChem.ETKDGv3()
    params.randomSeed = seed
    if AllChem.EmbedMolecule(mol, params) != 0:
        raise RuntimeError(f"could not embed {smiles}")
    return mol


class FakeResponse(io.BytesIO):
    def __init__(self, payload: bytes, length: int | None = None):
        super().__init__(payload)
        self.headers = {"Content-Length": str(len(payload) if length is None else length)}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


# ---------------------------------------------------------------------------------------------------
# QM8 fixture: qm8.sdf + qm8.sdf.csv (+ gdb8.tar.gz)
# ---------------------------------------------------------------------------------------------------
QM8_HEADER = ("gdb9_index,E1-CC2,E2-CC2,f1-CC2,f2-CC2,E1-PBE0,E2-PBE0,f1-PBE0,f2-PBE0,"
              "E1-PBE0,E2-PBE0,f1-PBE0,f2-PBE0,E1-CAM,E2-CAM,f1-CAM,f2-CAM")
QM8_SMILES = {1: "C", 3: "O", 21: "CC#N", 57: "OCC=O", 132: "C1CC1O"}


def qm8_rows(n_targets: int = 16) -> dict[int, list[float]]:
    rng = np.random.default_rng(0)
    out = {}
    for k, idx in enumerate(QM8_SMILES):
        e = np.sort(rng.uniform(0.2, 0.4, 2))
        f = rng.uniform(0.0, 0.2, 2)
        block = [e[0], e[1], f[0], f[1]]
        # four blocks that all differ, so a column mix-up cannot go unnoticed
        out[idx] = [v + 0.01 * b * (i < 2) + 0.001 * k for b in range(4) for i, v in enumerate(block)]
    return out


def write_qm8(folder: Path, *, rows=None, smiles=None, scale: float = 1.0, extra_block: str | None = None,
              drop_csv_rows: int = 0) -> dict:
    """Write qm8.sdf / qm8.sdf.csv; returns info incl. sha256 and sizes."""
    from rdkit import Chem

    folder.mkdir(parents=True, exist_ok=True)
    smiles = dict(QM8_SMILES if smiles is None else smiles)
    rows = qm8_rows() if rows is None else rows
    sdf = folder / "qm8.sdf"
    with Chem.SDWriter(str(sdf)) as w:
        for idx, smi in smiles.items():
            mol = embed(smi, seed=idx)
            if scale != 1.0:
                conf = mol.GetConformer()
                for a in range(mol.GetNumAtoms()):
                    p = conf.GetAtomPosition(a)
                    conf.SetAtomPosition(a, (p.x * scale, p.y * scale, p.z * scale))
            mol.SetProp("_Name", f"gdb_{idx}")
            w.write(mol)
    if extra_block is not None:
        with open(sdf, "a") as f:
            f.write(extra_block)
    csv = folder / "qm8.sdf.csv"
    lines = [QM8_HEADER]
    for idx in list(rows)[: len(rows) - drop_csv_rows]:
        lines.append(",".join([str(idx)] + [("nan" if v is None else repr(float(v))) for v in rows[idx]]))
    csv.write_text("\n".join(lines) + "\n")
    return {"sdf": sdf, "csv": csv, "rows": rows, "smiles": smiles,
            "sdf_sha": sha256_of(sdf), "csv_sha": sha256_of(csv),
            "sdf_size": sdf.stat().st_size, "csv_size": csv.stat().st_size}


UNREADABLE_SDF_RECORD = """gdb_999
     RDKit          3D

  2  1  0  0  0  0  0  0  0  0999 V2000
    0.0000    0.0000    0.0000 Xx  0  0  0  0  0  0  0  0  0  0  0  0
    1.5000    0.0000    0.0000 C   0  0  0  0  0  0  0  0  0  0  0  0
  1  2  1  0
M  END
$$$$
"""


def tar_gz_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, payload in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------
# MD17 fixture: <stem>.zip holding <stem>-train.npz / <stem>-test.npz (sGDML layout)
# ---------------------------------------------------------------------------------------------------
def md17_arrays(n_frames: int, seed: int, smiles: str = "CCO", scale: float = 1.0, z_override=None):
    mol = embed(smiles, seed=3)
    z = np.array([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.uint8)
    base = mol.GetConformer().GetPositions()
    rng = np.random.default_rng(seed)
    R = (base[None] + rng.normal(0, 0.03, (n_frames,) + base.shape)) * scale
    E = (-97000.0 + rng.normal(0, 2.0, (n_frames, 1)))
    F = rng.normal(0, 20.0, R.shape)
    if z_override is not None:
        z = np.asarray(z_override)
    return {"z": z, "R": R, "E": E, "F": F}


def write_md17_zip(folder: Path, stem: str = "ethanol_ccsd_t", n_train: int = 6, n_test: int = 5, *,
                   pickled: bool = False, **kw) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    zpath = folder / f"{stem}.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for part, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
            arrays = md17_arrays(n, seed, **kw)
            extra = {"name": np.array(stem), "theory": np.array("CCSD(T)/cc-pVDZ"), "type": np.array("d"),
                     "md5": np.array(hashlib.md5(arrays["R"].tobytes()).hexdigest()),
                     "r_unit": np.array("Ang"), "e_unit": np.array("kcal/mol")}
            if pickled:
                extra["payload"] = np.array([{"evil": True}], dtype=object)
            buf = io.BytesIO()
            np.savez(buf, **arrays, **extra)
            zf.writestr(f"{stem}-{part}.npz", buf.getvalue())
    return zpath


# ---------------------------------------------------------------------------------------------------
# OE62 fixtures: df_62k.json (pandas split JSON) and Chen et al.'s ASE db
# ---------------------------------------------------------------------------------------------------
def xyz_string(mol, scale: float = 1.0, symbols=None) -> str:
    pos = mol.GetConformer().GetPositions() * scale
    syms = symbols or [a.GetSymbol() for a in mol.GetAtoms()]
    lines = [str(len(syms)), ""] + [f"{s} {x:.6f} {y:.6f} {z:.6f}" for s, (x, y, z) in zip(syms, pos)]
    return "\n".join(lines) + "\n"


OE62_LEVEL_COLUMNS = [
    ("energies_occ_pbe", "energies_unocc_pbe"),
    ("energies_occ_pbe0_vac_tier2", "energies_unocc_pbe0_vac_tier2"),
    ("energies_occ_pbe0_vac_tzvp", "energies_unocc_pbe0_vac_tzvp"),
    ("energies_occ_pbe0_vac_qzvp", "energies_unocc_pbe0_vac_qzvp"),
    ("energies_occ_pbe0_water", "energies_unocc_pbe0_water"),
    ("cbs_occ_gw", "cbs_unocc_gw"),
    ("energies_occ_gw_tzvp", "energies_unocc_gw_tzvp"),
    ("energies_occ_gw_qzvp", "energies_unocc_gw_qzvp"),
]


def oe62_row(refcode: str, smiles: str, seed: int, *, full: bool = True, xyz: str | None = None,
             drop_tier2: bool = False, empty_unocc: bool = False) -> dict:
    mol = embed(smiles, seed=seed)
    rng = np.random.default_rng(seed)
    row = {"refcode_csd": refcode, "canonical_smiles": smiles, "number_of_atoms": mol.GetNumAtoms(),
           "xyz_pbe_relaxed": xyz if xyz is not None else xyz_string(mol),
           "total_energy_pbe": float(rng.normal(-10000, 100))}
    for k, (occ, unocc) in enumerate(OE62_LEVEL_COLUMNS):
        covered = full or k in (0, 1, 4)
        if not covered or (drop_tier2 and k == 1):
            row[occ], row[unocc] = None, None
            continue
        occ_levels = sorted(rng.uniform(-25, -5.5, 6).tolist())    # ascending, HOMO last
        unocc_levels = sorted(rng.uniform(-3.0, -0.1, 3).tolist())  # ascending, LUMO first
        row[occ], row[unocc] = occ_levels, ([] if empty_unocc and k == 1 else unocc_levels)
    return row


def write_oe62_json(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "df_62k.json"
    pd.DataFrame(rows).to_json(path, orient="split")
    return path


def write_oe62_db(folder: Path, molecules: list[tuple[str, int]], *, drop_coeff_at: int | None = None) -> Path:
    import ase
    import ase.db

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "dataset_OE62_all.db"
    rng = np.random.default_rng(5)
    with ase.db.connect(str(path)) as db:
        for k, (smi, seed) in enumerate(molecules):
            mol = embed(smi, seed=seed)
            atoms = ase.Atoms(numbers=[a.GetAtomicNum() for a in mol.GetAtoms()],
                              positions=mol.GetConformer().GetPositions())
            w = rng.random(len(atoms))
            data = {"HOMO": np.array([-6.0 - k]), "HOMO_au": np.array([(-6.0 - k) / 27.211386245988]),
                    "LUMO": np.array([-1.0 - 0.1 * k]), "GAP": np.array([5.0 + 0.9 * k]),
                    "IP": np.array([7.0]), "IP_au": np.array([0.25]), "coeff": w / w.sum()}
            if drop_coeff_at == k:
                del data["coeff"]
            db.write(atoms, data=data)
    return path


# ---------------------------------------------------------------------------------------------------
# QMugs fixture: summary.csv + structures/<chembl>/<conf>.sdf (or structures.tar.gz)
# ---------------------------------------------------------------------------------------------------
QMUGS_MOLS = [("CHEMBL1000", "CC(=O)Nc1ccc(O)cc1"), ("CHEMBL25", "CC(=O)Oc1ccccc1C(=O)O")]


def qmugs_values(k: int) -> dict[str, float]:
    return {"GFN2:TOTAL_ENERGY": -40.1 - k, "GFN2:ATOMIC_ENERGY": -38.0 - k, "GFN2:FORMATION_ENERGY": -2.1,
            "GFN2:HOMO_ENERGY": -0.40 - 0.01 * k, "GFN2:LUMO_ENERGY": -0.30 + 0.01 * k,
            "GFN2:HOMO_LUMO_GAP": 0.10 + 0.02 * k,
            "DFT:TOTAL_ENERGY": -514.9 - k, "DFT:HOMO_ENERGY": -0.27 - 0.01 * k,
            "DFT:LUMO_ENERGY": 0.03 + 0.01 * k, "DFT:HOMO_LUMO_GAP": 0.30 + 0.02 * k}


def write_qmugs(folder: Path, *, n_conf: int = 2, drop_tag: tuple[int, str] | None = None,
                missing_structure: int | None = None, wrong_atoms: int | None = None,
                as_tar: bool = False) -> dict:
    """QMugs layout; conformer rows in (molecule, conf) order; returns the expected values per row."""
    from rdkit import Chem

    folder.mkdir(parents=True, exist_ok=True)
    rows, expected, sdf_texts = [], [], {}
    k = 0
    for chembl, smi in QMUGS_MOLS:
        for c in range(n_conf):
            conf_id = f"conf_{c:02d}"
            mol = embed(smi, seed=11 + c)
            vals = qmugs_values(k)
            mol.SetProp("_Name", chembl)
            mol.SetProp("CHEMBL_ID", chembl)
            mol.SetProp("CONF_ID", conf_id)
            for tag, v in vals.items():
                if drop_tag == (k, tag):
                    continue
                mol.SetProp(tag, f"{v:.10f}")
            mol.SetProp("GFN2:DIPOLE", "0.1|0.2|0.3|0.374")
            mol.SetProp("DFT:MULLIKEN_CHARGES", "|".join("0.0" for _ in range(mol.GetNumAtoms())))
            sio = io.StringIO()
            with Chem.SDWriter(sio) as w:
                w.write(mol)
            if missing_structure != k:
                sdf_texts[f"structures/{chembl}/{conf_id}.sdf"] = sio.getvalue()
            row = {"chembl_id": chembl, "conf_id": conf_id, "smiles": smi, "mw": 151.2,
                   "atoms": mol.GetNumAtoms() + (1 if wrong_atoms == k else 0),
                   "heavy_atoms": mol.GetNumHeavyAtoms(), "significant_negative_wavenumbers": False,
                   "nonunique_smiles": False}
            row.update({t.replace(":", "_"): v for t, v in vals.items()})
            rows.append(row)
            expected.append((chembl, conf_id, vals, mol.GetNumAtoms()))
            k += 1
    pd.DataFrame(rows).to_csv(folder / "summary.csv", index=False)
    if as_tar:
        (folder / "structures.tar.gz").write_bytes(tar_gz_bytes({n: t.encode() for n, t in sdf_texts.items()}))
    else:
        for name, text in sdf_texts.items():
            p = folder / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)
    return {"expected": expected}

