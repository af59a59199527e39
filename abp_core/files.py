"""Atomic file writes: every file the package writes (checkpoints, results, caches, notebooks) goes through here.

A write goes to a temporary file in the target's own folder (so that the final step is a rename on one
file system), is flushed and ``fsync``-ed, and then renamed over the target with :func:`os.replace`;
the folder is ``fsync``-ed too, so that the rename survives a power cut. Readers therefore see either
the previous file or the new one, never half of one. On any failure (an exception, a full disk) the
temporary file is removed and the previous file is left untouched.

The file system refusing the write -- ``ENOSPC`` (disk full), ``EDQUOT`` (quota exceeded) or ``EROFS``
(read-only) -- becomes one :class:`StorageError` that names the file, its folder and the free space,
also when the writer (e.g. ``torch.save``) reports it as its own ``RuntimeError``.

Temporary files are named ``.<name>.tmp-<host>-<pid>-<random><suffix>`` (the target's suffix is kept,
because some writers choose the format by it). A process killed with SIGKILL cannot remove its own;
:func:`remove_stale_temporaries` removes those of dead processes of this host.

Usage::

    from abp_core.files import atomic_open, write_text
    write_text("out/metrics.json", json.dumps(metrics))
    with atomic_open("out/model.pt") as f:      # binary; atomic_open(path, "w") for text
        torch.save(state, f)
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator, List, Optional, Union

__all__ = ["StorageError", "atomic_open", "atomic_path", "write_bytes", "write_text", "set_aside",
           "remove_stale_temporaries", "describe_free_space", "refused_errno"]

PathLike = Union[str, os.PathLike]

#: errno of a file system that refuses to store the file -> what to tell the user
REFUSED = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the file system is read-only",
}


class StorageError(OSError):
    """The file system refused a write (disk full, quota exceeded, read-only); the previous file is untouched.

    An :class:`OSError` with the original ``errno``, so ``except OSError`` still catches it. Attributes:
    ``path`` (the file), ``folder``, ``free_bytes`` / ``total_bytes`` (``None`` if unknown) and
    ``previous_kept`` (whether a previous version of the file exists and was left as it was) and
    ``written_bytes`` (how far the new file got before the failure, ``None`` if unknown).
    """

    def __init__(self, path: PathLike, err: int, free_bytes: Optional[int] = None,
                 total_bytes: Optional[int] = None, previous_kept: bool = False,
                 written_bytes: Optional[int] = None):
        super().__init__(err, os.strerror(err), str(path))
        self.path = Path(path)
        self.folder = self.path.parent
        self.free_bytes, self.total_bytes, self.previous_kept = free_bytes, total_bytes, previous_kept
        self.written_bytes = written_bytes
        reason = REFUSED.get(err, os.strerror(err))
        space = describe_free_space(free_bytes, total_bytes)
        if written_bytes:
            space += f"; the new file had reached {_size(written_bytes)} when the write failed"
        kept = (f"the previous {self.path.name} is untouched" if previous_kept
                else f"there was no previous {self.path.name}")
        self.message = (f"cannot write {self.path}: {reason} ({errno.errorcode.get(err, err)}) in folder "
                        f"{self.folder} ({space}). Nothing was written and no temporary file is left; {kept}. "
                        f"Free some space there (or write somewhere else) and run the same command again.")

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):  # picklable across processes (DDP, worker pools)
        return type(self), (self.path, self.errno, self.free_bytes, self.total_bytes, self.previous_kept,
                            self.written_bytes)


def describe_free_space(free_bytes: Optional[int], total_bytes: Optional[int]) -> str:
    """``"1.9 MB free of 2.0 MB"`` (or ``"free space unknown"``)."""
    if free_bytes is None:
        return "free space unknown"
    text = f"{_size(free_bytes)} free"
    return text + (f" of {_size(total_bytes)}" if total_bytes else "")


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def refused_errno(exc: BaseException) -> Optional[int]:
    """The ENOSPC/EDQUOT/EROFS behind ``exc`` (else ``None``), also when a writer wrapped it (torch raises
    RuntimeError). For code that catches write errors inside :func:`atomic_path` and must let these through."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in REFUSED:
            return int(exc.errno)
        exc = exc.__cause__ or exc.__context__
    return None


def _storage_error(path: Path, err: int, previous_kept: bool, written: Optional[int]) -> StorageError:
    free = total = None
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        usage = shutil.disk_usage(folder)
        free, total = int(usage.free), int(usage.total)
    except OSError:
        pass
    return StorageError(path, err, free, total, previous_kept, written)


_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname()) or "host"
_TEMP = re.compile(r"^\..+\.tmp-(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-[A-Za-z0-9_]+")


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # not supported everywhere (some network file systems); the data itself is synced
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: PathLike, keep_previous: Optional[PathLike] = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; after the block it is synced and renamed to ``path``.

    For writers that want a file name (a compiler's ``-o``, plotly, papermill). The writer must close
    the file before the block ends. On any exception the temporary file is removed, ``path`` is left as
    it was, and ENOSPC/EDQUOT/EROFS are raised as :class:`StorageError`.

    ``keep_previous``: once the new file is complete, the file it replaces is renamed to this path
    (e.g. ``last.ckpt`` -> ``last-previous.ckpt``) instead of being overwritten.
    """
    path = Path(path)
    previous_kept = path.exists()
    tmp: Optional[str] = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{_HOST}-{os.getpid()}-", suffix=path.suffix,
                                   dir=path.parent)
        os.close(fd)
        yield Path(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
        os.replace(tmp, path)
        tmp = None
        _fsync_folder(path.parent)
    except BaseException as exc:
        written = None
        if tmp is not None:
            try:
                written = os.stat(tmp).st_size
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        err = refused_errno(exc)
        if err is not None:
            raise _storage_error(path, err, previous_kept, written) from exc
        raise


@contextmanager
def atomic_open(path: PathLike, mode: str = "wb", encoding: Optional[str] = None,
                newline: Optional[str] = None, keep_previous: Optional[PathLike] = None) -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; it replaces ``path`` when the block ends.

    ``mode`` is ``"wb"`` or ``"w"`` (text, ``encoding`` default UTF-8). Flushed and ``fsync``-ed before
    the rename. See :func:`atomic_path` for failures.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    if mode == "w" and encoding is None:
        encoding = "utf-8"
    with atomic_path(path, keep_previous=keep_previous) as tmp:
        with open(tmp, mode, encoding=encoding, newline=newline) as fh:
            yield fh
            fh.flush()


def write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_open(path, "wb") as fh:
        fh.write(data)
    return Path(path)


def write_text(path: PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; returns the path."""
    with atomic_open(path, "w", encoding=encoding) as fh:
        fh.write(text)
    return Path(path)


def set_aside(path: PathLike, label: str = "corrupt") -> Path:
    """Rename an unreadable file (or folder) to ``<name>.<label>`` (``.<label>-2``, ... if taken); never delete.

    Returns the new path. The data stays there for inspection or recovery by hand.
    """
    path = Path(path)
    target = path.with_name(f"{path.name}.{label}")
    k = 2
    while target.exists():
        target = path.with_name(f"{path.name}.{label}-{k}")
        k += 1
    os.replace(path, target)
    return target


def remove_stale_temporaries(folder: PathLike) -> List[Path]:
    """Remove temporary files of :func:`atomic_path` left in ``folder`` by dead processes of this host.

    Such files exist only after a SIGKILL or power cut during a write; files of live processes and of
    other hosts (a shared file system) are left alone. Returns the removed paths.
    """
    removed: List[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP.match(entry.name)
        if m is None or m["host"] != _HOST or not entry.is_file(follow_symlinks=False):
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or _alive(pid):
            continue
        try:
            os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
