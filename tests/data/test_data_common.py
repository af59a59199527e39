"""abp_core.data.common: data root, downloads, checksums, validation, storage, caching, registry."""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from abp_core.data import DATASETS, get_dataset
from abp_core.data import common
from abp_core.data.common import (BOHR_TO_ANGSTROM, ChecksumError, DataNotFoundError, MissingTargetError,
                                  MolData, RemoteFile, StorageBuilder, TooFewAtomsError, UnitError,
                                  UnknownElementError, check_geometry, data_root, download, ensure_file,
                                  symbols_to_z, validate_molecule, verify_sha256)

# --- a real molecule: the first molecule of QM7b's seed-23887 train file (C6H13N), in Å --------------
C6H13N_Z = np.array([6, 6, 7, 6, 6, 6, 6, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1])


# ---------------------------------------------------------------------------------------------------
# data root
# ---------------------------------------------------------------------------------------------------
def test_data_root_precedence(monkeypatch, tmp_path):
    import platformdirs

    monkeypatch.setenv("ABP_DATA_DIR", str(tmp_path / "env"))
    assert data_root(tmp_path / "explicit") == tmp_path / "explicit"
    assert data_root() == tmp_path / "env"
    monkeypatch.delenv("ABP_DATA_DIR")
    assert data_root() == Path(platformdirs.user_cache_dir("abp"))


def test_cache_dir_env_and_readonly_fallback(monkeypatch, tmp_path):
    monkeypatch.setenv("ABP_CACHE_DIR", str(tmp_path / "cache"))
    assert common.cache_dir_for("qm8", tmp_path / "root") == tmp_path / "cache" / "qm8"
    monkeypatch.delenv("ABP_CACHE_DIR")
    assert common.cache_dir_for("qm8", tmp_path / "root") == tmp_path / "root" / "qm8" / "processed"
    # a root that cannot hold directories (it is a file) -> the user cache dir
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    monkeypatch.setattr("platformdirs.user_cache_dir", lambda app: str(tmp_path / "usercache" / app))
    assert common.cache_dir_for("qm8", blocker) == tmp_path / "usercache" / "abp" / "processed" / "qm8"


# ---------------------------------------------------------------------------------------------------
# checksums and downloads
# ---------------------------------------------------------------------------------------------------
def test_verify_sha256_accepts_right_and_names_file_on_wrong(tmp_path):
    f = tmp_path / "blob.bin"
    f.write_bytes(b"abc" * 1000)
    good = hashlib.sha256(f.read_bytes()).hexdigest()
    verify_sha256(f, good)
    verify_sha256(f, good.upper(), size=3000)
    with pytest.raises(ChecksumError, match=r"blob\.bin.*sha256"):
        verify_sha256(f, "0" * 64)
    with pytest.raises(ChecksumError, match=r"blob\.bin.*size 3000 B differs from the published 3001"):
        verify_sha256(f, good, size=3001)
    with pytest.raises(DataNotFoundError, match="missing.bin"):
        verify_sha256(tmp_path / "missing.bin", good)


def test_download_writes_atomically_and_verifies(tmp_path, fake_server):
    served, requested = fake_server
    payload = bytes(range(256)) * 5000
    url = "https://example.org/files/blob.bin"
    served[url] = payload
    target = tmp_path / "sub" / "blob.bin"
    out = download(url, target, hashlib.sha256(payload).hexdigest(), size=len(payload), progress=False)
    assert out == target and target.read_bytes() == payload
    assert requested == [url]
    assert [p.name for p in target.parent.iterdir()] == ["blob.bin"]  # no temporary left behind


def test_download_with_wrong_checksum_leaves_nothing(tmp_path, fake_server):
    served, _ = fake_server
    served["https://example.org/x.bin"] = b"corrupted bytes"
    target = tmp_path / "x.bin"
    with pytest.raises(ChecksumError, match=r"x\.bin.*expected " + "a" * 64):
        download("https://example.org/x.bin", target, "a" * 64, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_truncated_download_is_refused(tmp_path, fake_server):
    served, _ = fake_server
    served["https://example.org/t.bin"] = b"only part of it"
    target = tmp_path / "t.bin"
    with pytest.raises(ChecksumError, match="truncated"):
        download("https://example.org/t.bin", target, None, size=10_000, progress=False)
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_no_network_error_names_url_path_and_sha(tmp_path, no_network):
    remote = RemoteFile("sub/data.npz", "https://example.org/data.npz", "b" * 64, 1234)
    with pytest.raises(DataNotFoundError) as err:
        ensure_file(remote, tmp_path, progress=False)
    msg = str(err.value)
    assert "https://example.org/data.npz" in msg
    assert str(tmp_path / "sub" / "data.npz") in msg
    assert "b" * 64 in msg and "1234" in msg
    assert no_network == ["https://example.org/data.npz"]
    assert not (tmp_path / "sub" / "data.npz").exists()


def test_ensure_file_checks_an_existing_file(tmp_path, no_network):
    f = tmp_path / "a.txt"
    f.write_text("hello")
    sha = hashlib.sha256(b"hello").hexdigest()
    assert ensure_file(RemoteFile("a.txt", "https://x/a.txt", sha, 5), tmp_path) == f
    with pytest.raises(ChecksumError, match="a.txt"):
        ensure_file(RemoteFile("a.txt", "https://x/a.txt", "c" * 64), tmp_path)
    assert no_network == []  # present files are never re-downloaded


# ---------------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------------
def _methane():
    pos = np.array([[0.0, 0.0, 0.0], [0.629, 0.629, 0.629], [-0.629, -0.629, 0.629],
                    [-0.629, 0.629, -0.629], [0.629, -0.629, -0.629]])
    return np.array([6, 1, 1, 1, 1]), pos


def test_valid_molecule_passes():
    z, pos = _methane()
    y = validate_molecule("methane", z, pos, [1.0, 2.0], ["a", "b"])
    assert y.tolist() == [1.0, 2.0]


def test_unknown_element_symbol_names_molecule_and_element():
    with pytest.raises(UnknownElementError, match=r"molecule mol-7.*'Xq'"):
        symbols_to_z(["C", "Xq", "H"], "mol-7")
    assert symbols_to_z(["c", "CL", "Br"], "m").tolist() == [6, 17, 35]


@pytest.mark.parametrize("bad_z", [0, 87, 118])
def test_unsupported_atomic_number(bad_z):
    z, pos = _methane()
    z[1] = bad_z
    with pytest.raises(UnknownElementError, match=rf"molecule m1.*{bad_z}"):
        validate_molecule("m1", z, pos, [0.0], ["t"])


@pytest.mark.parametrize("value", [np.nan, np.inf, None])
def test_missing_or_nonfinite_target_names_target(value):
    z, pos = _methane()
    with pytest.raises(MissingTargetError, match=r"molecule m2.*\['lumo'\]"):
        validate_molecule("m2", z, pos, np.array([1.0, value], dtype=object), ["homo", "lumo"])


def test_one_atom_molecule_is_rejected():
    with pytest.raises(TooFewAtomsError, match="molecule lonely: 1 atom"):
        validate_molecule("lonely", np.array([10]), np.zeros((1, 3)), [1.0], ["t"])


def test_bohr_coordinates_read_as_angstrom_are_rejected(shared_root):
    from abp_core.data.qm7b import load_part

    rows = load_part(shared_root / "qm7b", 23887, "train", allow_download=False)  # sha256-verified first
    bohr_rejected = 0
    for row in rows[:200]:
        z, pos_bohr = np.asarray(row[1], dtype=np.int64), np.asarray(row[2], dtype=np.float64)
        check_geometry(z, pos_bohr * BOHR_TO_ANGSTROM, row[0])  # the real geometry in Å passes
        with pytest.raises(UnitError, match="Bohr"):
            check_geometry(z, pos_bohr, row[0])  # the same numbers taken as Å are refused
        bohr_rejected += 1
    assert bohr_rejected == 200


def test_short_molecules_in_bohr_are_rejected_too():
    n2 = np.array([[0, 0, 0], [0, 0, 1.098]])
    check_geometry(np.array([7, 7]), n2, "N2")
    with pytest.raises(UnitError):
        check_geometry(np.array([7, 7]), n2 / BOHR_TO_ANGSTROM, "N2 in Bohr")
    h2 = np.array([[0, 0, 0], [0, 0, 0.741]])
    check_geometry(np.array([1, 1]), h2, "H2")
    with pytest.raises(UnitError):
        check_geometry(np.array([1, 1]), h2 / BOHR_TO_ANGSTROM, "H2 in Bohr")


def test_overlapping_atoms_are_rejected():
    z, pos = _methane()
    pos[1] = pos[0] + [0.3, 0, 0]
    with pytest.raises(UnitError, match=r"molecule squashed: atoms 0 and 1 are 0\.300 Å apart"):
        check_geometry(z, pos, "squashed")


# ---------------------------------------------------------------------------------------------------
# storage and batching
# ---------------------------------------------------------------------------------------------------
def _three_molecules():
    rng = np.random.default_rng(0)
    out = []
    for i, n in enumerate((3, 5, 2)):
        out.append(dict(z=rng.integers(1, 10, n), pos=rng.normal(size=(n, 3)), y=rng.normal(size=2),
                        idx=10 + i, q=rng.normal(size=n), name=f"m{i}"))
    return out


def test_storage_builder_equals_pyg_collate():
    from torch_geometric.data import InMemoryDataset

    mols = _three_molecules()
    builder = StorageBuilder(atom_fields={"q": (torch.float32, ())}, string_fields=("name",))
    data_list = []
    for m in mols:
        builder.add(**m)
        data_list.append(MolData(z=torch.tensor(m["z"], dtype=torch.long),
                                 pos=torch.tensor(m["pos"], dtype=torch.float32),
                                 y=torch.tensor(m["y"], dtype=torch.float32).view(1, -1),
                                 idx=torch.tensor(m["idx"]), q=torch.tensor(m["q"], dtype=torch.float32),
                                 name=m["name"]))
    ours, our_slices = builder.build(2)
    ref, ref_slices = InMemoryDataset.collate(data_list)
    assert set(ours.keys()) == set(ref.keys())
    for key in ref.keys():
        if isinstance(ref[key], torch.Tensor):
            assert torch.equal(ours[key], ref[key]), key
            assert ours[key].dtype == ref[key].dtype, key
        else:
            assert ours[key] == ref[key], key
        assert torch.equal(our_slices[key], ref_slices[key]), key


def test_idx_is_scalar_per_molecule_and_stacks_in_batches(shared_root):
    from torch_geometric.loader import DataLoader

    ds = get_dataset("qm7b", root=shared_root)
    d = ds[5]
    assert d.idx.dim() == 0 and d.idx.dtype == torch.long and int(d.idx) == 5
    assert d.z.dtype == torch.long and d.pos.dtype == torch.float32 and d.y.shape == (1, 14)
    batch = next(iter(DataLoader(ds[10:14], batch_size=4)))
    assert batch.idx.tolist() == [10, 11, 12, 13]
    assert batch.y.shape == (4, 14)


def test_select_targets_transform(shared_root):
    from abp_core.data import SelectTargets

    ds = get_dataset("qm7b", root=shared_root)
    sel = SelectTargets(ds, ["homo_PBE0", 0])
    ds_sel = get_dataset("qm7b", root=shared_root, transform=sel)
    assert ds_sel[3].y.shape == (1, 2)
    assert torch.equal(ds_sel[3].y, ds[3].y[:, [5, 0]])
    # a shallow copy: the molecule passed in keeps all its targets, and its other tensors are shared, not copied
    mol = ds[3]
    out = sel(mol)
    assert out is not mol and mol.y.shape == (1, 14) and out.y.shape == (1, 2)
    assert out.pos.data_ptr() == mol.pos.data_ptr() and out.z.data_ptr() == mol.z.data_ptr()
    # copy_tensors: every tensor copied, for transforms after it that edit in place
    deep = SelectTargets(ds, ["homo_PBE0", 0], copy_tensors=True)(mol)
    assert torch.equal(deep.y, out.y) and torch.equal(deep.pos, mol.pos) and deep.pos.data_ptr() != mol.pos.data_ptr()


# ---------------------------------------------------------------------------------------------------
# cache
# ---------------------------------------------------------------------------------------------------
def test_cache_is_written_once_and_reused(shared_root, tmp_path, monkeypatch):
    from abp_core.data.qm7b import QM7b

    first = QM7b(root=shared_root, cache_dir=tmp_path / "c")
    files = list((tmp_path / "c" / "qm7b").iterdir())
    assert [f.suffix for f in files] == [".pt"] and files[0] == first.processed_path

    def boom(self):
        raise AssertionError("processed again although a cache exists")

    monkeypatch.setattr(QM7b, "_build", boom)
    second = QM7b(root=shared_root, cache_dir=tmp_path / "c")
    assert len(second) == len(first) and torch.equal(second[7].pos, first[7].pos)
    with pytest.raises(AssertionError, match="processed again"):
        QM7b(root=shared_root, cache_dir=tmp_path / "c", force_reload=True)


def test_corrupt_cache_is_rebuilt(shared_root, tmp_path, caplog):
    from abp_core.data.qm7b import QM7b

    first = QM7b(root=shared_root, cache_dir=tmp_path / "c")
    first.processed_path.write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="abp_core.data"):
        again = QM7b(root=shared_root, cache_dir=tmp_path / "c")
    assert len(again) == 7211
    assert "unreadable cache" in caplog.text


# ---------------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------------
def test_registry_names_and_uniform_api():
    assert set(DATASETS) == {"qm9", "qm7b", "qm8", "md17", "oe62", "qmugs"}
    for cls in DATASETS.values():
        for attr in ("target_names", "target_units", "target_index"):
            assert hasattr(cls, attr), (cls, attr)
    with pytest.raises(ValueError, match="unknown dataset 'qm10'"):
        get_dataset("qm10")


def test_get_dataset_uses_env_root(shared_root, monkeypatch):
    monkeypatch.setenv("ABP_DATA_DIR", str(shared_root))
    ds = get_dataset("QM7b")
    assert len(ds) == 7211 and ds.data_root == shared_root


def test_target_index_forms(shared_root):
    ds = get_dataset("qm7b", root=shared_root)
    assert ds.target_index(5) == 5
    assert ds.target_index(-1) == 13
    assert ds.target_index("Highest occupied molecular orbital (PBE0)") == 5
    assert ds.target_index("highest occupied molecular orbital (pbe0)") == 5
    assert ds.target_index("homo_PBE0") == 5
    with pytest.raises(ValueError, match="unknown target"):
        ds.target_index("homo")
    with pytest.raises(ValueError, match="out of range"):
        ds.target_index(14)
