"""Faults survived, nothing lost: full disks, corrupt checkpoints, preemption signals.

Disk full is injected two ways: by patching the file object :mod:`abp_core.files` writes through (a
write fails with ENOSPC/EDQUOT/EROFS after a byte budget, as the kernel would), and, when the tests run
as root with ``mount`` available, on a real 1 MB tmpfs (skipped otherwise). Every test checks the
message, that no temporary file is left, and that what was written before is intact.
"""
from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from abp_core import files
from abp_core.files import StorageError, atomic_open, atomic_path, remove_stale_temporaries, set_aside, write_text

REPO_ROOT = Path(__file__).resolve().parents[1]


def leftovers(folder: Path):
    """Temporary files of abp_core.files in ``folder`` (recursively)."""
    return sorted(p.name for p in Path(folder).rglob(".*.tmp-*"))


class FullDisk:
    """Patches the ``open`` of abp_core.files: writes fail with ``err`` once ``budget`` bytes are written."""

    def __init__(self, monkeypatch, budget: int = 0, err: int = errno.ENOSPC, only: str = ""):
        self.budget, self.err, self.only = budget, err, only
        monkeypatch.setattr(files, "open", self._open, raising=False)

    def _open(self, path, mode="r", **kwargs):
        fh = open(path, mode, **kwargs)  # the builtin
        if self.only not in Path(path).name:
            return fh
        disk = self

        class Limited(io.RawIOBase):
            def writable(self):
                return True

            def write(self, b):
                if disk.budget < len(b):
                    raise OSError(disk.err, os.strerror(disk.err))
                disk.budget -= len(b)
                return fh.write(b)

            def fileno(self):
                return fh.fileno()

            def close(self):
                fh.close()
                super().close()

        raw = Limited()
        return io.TextIOWrapper(io.BufferedWriter(raw), **kwargs) if "b" not in mode else io.BufferedWriter(raw)


# ---- the atomic writer -------------------------------------------------------------------------------
def test_atomic_write_replaces_whole_files_and_leaves_nothing_behind(tmp_path):
    target = tmp_path / "sub" / "metrics.json"
    write_text(target, '{"a": 1}')
    write_text(target, '{"a": 2}')
    assert json.loads(target.read_text()) == {"a": 2}
    with atomic_open(tmp_path / "x.pt") as fh:
        torch.save({"w": torch.arange(5)}, fh)
    assert torch.equal(torch.load(tmp_path / "x.pt", weights_only=True)["w"], torch.arange(5))
    with pytest.raises(RuntimeError, match="writer broke"):
        with atomic_open(target, "w") as fh:
            fh.write('{"a": 3')
            raise RuntimeError("writer broke")
    assert json.loads(target.read_text()) == {"a": 2} and leftovers(tmp_path) == []


@pytest.mark.parametrize("err, words", [(errno.ENOSPC, "no space left"), (errno.EDQUOT, "quota exceeded"),
                                        (errno.EROFS, "read-only")])
def test_refused_write_is_one_clear_error_and_keeps_the_previous_file(tmp_path, monkeypatch, err, words):
    target = tmp_path / "best.ckpt"
    torch.save({"epoch": 3}, target)
    before = target.read_bytes()
    FullDisk(monkeypatch, budget=4096, err=err)
    with pytest.raises(StorageError) as info:
        with atomic_open(target) as fh:  # torch reports the failed write as its own RuntimeError
            torch.save({"w": torch.zeros(100_000)}, fh)
    e = info.value
    assert isinstance(e, OSError) and e.errno == err and e.path == target and e.folder == tmp_path
    msg = str(e)
    assert words in msg and str(target) in msg and f"folder {tmp_path}" in msg and " free of " in msg
    assert "the previous best.ckpt is untouched" in msg and "reached" in msg
    assert target.read_bytes() == before and leftovers(tmp_path) == []
    import pickle

    assert str(pickle.loads(pickle.dumps(e))) == msg  # crosses process boundaries (DDP, worker pools)


def test_other_write_errors_are_not_called_a_full_disk(tmp_path, monkeypatch):
    FullDisk(monkeypatch, budget=0, err=errno.EIO)
    with pytest.raises(OSError) as info:
        write_text(tmp_path / "a.txt", "x" * 10_000)
    assert not isinstance(info.value, StorageError) and info.value.errno == errno.EIO
    assert leftovers(tmp_path) == [] and not (tmp_path / "a.txt").exists()


def test_keep_previous_rotates_only_after_a_complete_write(tmp_path, monkeypatch):
    last, prev = tmp_path / "last.ckpt", tmp_path / "last-previous.ckpt"
    write_text(last, "one")
    with atomic_open(last, "w", keep_previous=prev) as fh:
        fh.write("two")
    assert (last.read_text(), prev.read_text()) == ("two", "one")
    FullDisk(monkeypatch, budget=0)
    with pytest.raises(StorageError):
        with atomic_open(last, "w", keep_previous=prev) as fh:
            fh.write("three" * 10_000)
    assert (last.read_text(), prev.read_text()) == ("two", "one") and leftovers(tmp_path) == []


def test_set_aside_never_overwrites(tmp_path):
    for k in range(3):
        write_text(tmp_path / "last.ckpt", f"bad {k}")
        set_aside(tmp_path / "last.ckpt")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["last.ckpt.corrupt", "last.ckpt.corrupt-2", "last.ckpt.corrupt-3"]
    assert (tmp_path / "last.ckpt.corrupt").read_text() == "bad 0"


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    host = files._HOST
    stale = tmp_path / f".last.ckpt.tmp-{host}-{dead}-abcd1234.ckpt"
    mine = tmp_path / f".last.ckpt.tmp-{host}-{os.getpid()}-abcd1234.ckpt"
    foreign = tmp_path / f".last.ckpt.tmp-otherhost-{dead}-abcd1234.ckpt"
    for p in (stale, mine, foreign):
        p.write_text("partial")
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert mine.exists() and foreign.exists()


# ---- a real full file system ---------------------------------------------------------------------------
@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 1 MB tmpfs (root + mount only)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a real tmpfs needs root and mount")
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_real_full_tmpfs(tiny_tmpfs):
    target = tiny_tmpfs / "model.pt"
    with atomic_open(target) as fh:
        torch.save({"w": torch.ones(50_000)}, fh)  # 200 kB: fits
    with pytest.raises(StorageError, match=r"no space left on the device \(ENOSPC\) in folder .*free of 1\.0 MB"):
        with atomic_open(target) as fh:
            torch.save({"w": torch.zeros(400_000)}, fh)  # 1.6 MB: does not
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.ones(50_000))
    assert leftovers(tiny_tmpfs) == []
    with atomic_path(tiny_tmpfs / "again.pt") as tmp:  # the space came back: nothing keeps the disk full
        torch.save({"w": torch.ones(150_000)}, tmp)
