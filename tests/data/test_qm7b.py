"""QM7b from the paper's release (real files in the shared data folder)."""
from __future__ import annotations

import os
import shutil
from collections import Counter

import numpy as np
import pytest
import torch

from abp_core.data import ChecksumError, DataNotFoundError, get_dataset
from abp_core.data.common import BOHR_TO_ANGSTROM, sha256sum
from abp_core.data.qm7b import PARTS, SEEDS, SHA256, QM7b, load_part, paper_split


@pytest.fixture(scope="module")
def qm7b_ds(shared_root, tmp_path_factory):
    return QM7b(root=shared_root, cache_dir=tmp_path_factory.mktemp("qm7b_cache"))


def _key(formula, z, pos_bohr):
    return (str(formula), np.asarray(z, dtype=np.int64).tobytes(), np.asarray(pos_bohr, dtype=np.float64).tobytes())


def test_embedded_hashes_match_the_published_sha256sums(shared_root):
    published = {}
    for line in (shared_root / "qm7b" / "SHA256SUMS").read_text().split("\n"):
        if line.strip():
            digest, name = line.split()
            seed, part = name.removeprefix("./").removesuffix(".npy").split("/")
            published[(int(seed), part)] = digest
    assert published == SHA256
    assert set(SHA256) == {(s, p) for s in SEEDS for p in PARTS}


def test_loads_7211_molecules_in_angstrom(qm7b_ds, shared_root):
    ds = qm7b_ds
    assert len(ds) == 7211
    assert len(ds.target_names) == len(ds.target_units) == 14
    assert ds.target_units[ds.target_index("homo_PBE0")] == "Ha"
    assert ds.target_units[12] == ds.target_units[13] == "Å^3"
    raw = load_part(shared_root / "qm7b", 23887, "train", allow_download=False)
    for i in (0, 100, 5767):
        d = ds[i]
        assert d.name == raw[i][0]
        assert d.z.tolist() == [int(v) for v in raw[i][1]]
        assert torch.allclose(d.pos.double(), torch.tensor(raw[i][2] * BOHR_TO_ANGSTROM), atol=1e-5)
        assert torch.allclose(d.y[0].double(), torch.tensor(np.asarray(raw[i][3], dtype=float)), rtol=1e-6)
    sizes = ds.slices["z"].diff()
    assert int(sizes.min()) == 4 and int(sizes.max()) == 23
    assert set(ds._data.z.unique().tolist()) == {1, 6, 7, 8, 16, 17}


def test_seed_23887_split_sizes(shared_root):
    train, val, test = paper_split(23887, shared_root, allow_download=False)
    assert (len(train), len(val), len(test)) == (5768, 721, 722)
    assert train.tolist() == list(range(5768))  # the dataset is ordered like seed 23887's files
    assert len(set(train) | set(val) | set(test)) == 7211


@pytest.fixture(scope="module")
def canonical_rows(shared_root):
    """The raw rows behind dataset rows 0..7210 (seed 23887 train, validate, test; Bohr, float64)."""
    return np.concatenate([load_part(shared_root / "qm7b", 23887, p, allow_download=False) for p in PARTS])


def test_every_dataset_row_is_its_canonical_raw_row(qm7b_ds, canonical_rows):
    ds = qm7b_ds
    assert [str(r[0]) for r in canonical_rows] == [ds[i].name for i in range(0, 7211, 1)]
    z = np.concatenate([np.asarray(r[1], dtype=np.int64) for r in canonical_rows])
    pos = np.concatenate([np.asarray(r[2], dtype=np.float64) for r in canonical_rows]) * BOHR_TO_ANGSTROM
    y = np.stack([np.asarray(r[3], dtype=np.float64) for r in canonical_rows])
    assert np.array_equal(ds._data.z.numpy(), z)
    assert np.allclose(ds._data.pos.numpy(), pos, atol=1e-5)
    assert np.allclose(ds._data.y.numpy(), y, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("seed", SEEDS)
def test_every_seed_reproduces_the_released_molecules(qm7b_ds, canonical_rows, shared_root, seed):
    split = qm7b_ds.paper_split(seed)
    assert [len(s) for s in split] == [5768, 721, 722]
    assert len(np.unique(np.concatenate(split))) == 7211  # disjoint and complete
    for part, idx in zip(PARTS, split):
        released = load_part(shared_root / "qm7b", seed, part, allow_download=False)
        want = Counter(_key(r[0], r[1], r[2]) for r in released)
        got = Counter(_key(canonical_rows[i][0], canonical_rows[i][1], canonical_rows[i][2]) for i in idx)
        assert got == want, (seed, part)
        # and the targets the dataset serves for those rows are the released ones
        released_y = np.stack([np.asarray(r[3], dtype=float) for r in released])
        served_y = qm7b_ds.targets(idx).double().numpy()
        assert np.allclose(np.sort(served_y, axis=0), np.sort(released_y, axis=0), rtol=1e-6, atol=1e-9)


def test_split_seeds_differ(shared_root):
    a = paper_split(23887, shared_root, allow_download=False)[2]
    b = paper_split(386333, shared_root, allow_download=False)[2]
    assert set(a.tolist()) != set(b.tolist())
    with pytest.raises(ValueError, match="seeds"):
        paper_split(42, shared_root)


class Evil:
    """Unpickling this creates a marker directory: proof that a file was (or was not) unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _copy_release(shared_root, dest):
    shutil.copytree(shared_root / "qm7b", dest / "qm7b")
    for p in (dest / "qm7b").rglob("*"):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)


def test_tampered_pickle_is_refused_before_unpickling(shared_root, tmp_path, monkeypatch):
    root = tmp_path / "root"
    _copy_release(shared_root, root)
    target = root / "qm7b" / "23887" / "validate.npy"
    marker = tmp_path / "UNPICKLED"
    evil = np.empty(1, dtype=object)
    evil[0] = Evil(marker)
    np.save(target, evil, allow_pickle=True)
    # the file is a working exploit: loading it directly runs the payload
    probe = tmp_path / "probe.npy"
    np.save(probe, np.array([Evil(tmp_path / "PROBE")], dtype=object), allow_pickle=True)
    np.load(probe, allow_pickle=True)
    assert (tmp_path / "PROBE").is_dir()

    real_load = np.load
    loaded = []

    def spy(path, *a, **kw):
        loaded.append(str(path))
        return real_load(path, *a, **kw)

    monkeypatch.setattr(np, "load", spy)
    with pytest.raises(ChecksumError) as err:
        QM7b(root=root, cache_dir=tmp_path / "cache", download=False)
    assert str(target) in str(err.value)
    assert not marker.exists()
    assert str(target) not in loaded  # the tampered file was never handed to np.load


def test_flipped_byte_is_refused_and_names_the_file(shared_root, tmp_path):
    root = tmp_path / "root"
    _copy_release(shared_root, root)
    target = root / "qm7b" / "572909" / "test.npy"
    blob = bytearray(target.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    target.write_bytes(bytes(blob))
    with pytest.raises(ChecksumError, match=str(target)):
        paper_split(572909, root, allow_download=False)
    assert sha256sum(target) != SHA256[(572909, "test")]


def test_truncated_file_is_refused(shared_root, tmp_path):
    root = tmp_path / "root"
    _copy_release(shared_root, root)
    target = root / "qm7b" / "23887" / "train.npy"
    target.write_bytes(target.read_bytes()[:100_000])
    with pytest.raises(ChecksumError, match=r"23887/train\.npy"):
        QM7b(root=root, cache_dir=tmp_path / "cache", download=False)


def test_missing_files_without_network_name_url_path_and_sha(tmp_path, no_network):
    with pytest.raises(DataNotFoundError) as err:
        get_dataset("qm7b", root=tmp_path, progress=False)
    msg = str(err.value)
    assert "raw.githubusercontent.com/davidbuterez/attention-based-pooling-for-quantum-properties" in msg
    assert "23887/train.npy" in msg
    assert str(tmp_path / "qm7b" / "23887" / "train.npy") in msg
    assert SHA256[(23887, "train")] in msg
    assert len(no_network) == 1
