"""abp_core/allocator.py: freed memory kept in the process (glibc), page faults avoided, settings restored."""
import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from abp_core import allocator

glibc_only = pytest.mark.skipif(allocator.glibc() is None, reason="the C library is not glibc")

# Run in a fresh process: whether glibc maps a new block or reuses a hole in its heap depends on everything the
# process allocated before (earlier tests leave holes that serve a 64 MiB block without faults).
MEASURE = r"""
import json, resource, torch
from abp_core import allocator

BLOCK = 64 << 20  # above glibc's largest mmap threshold (32 MiB): served by mmap unless told otherwise


def page_faults_of_a_fresh_block():
    # after sixteen such blocks were freed: inside a block glibc reuses a freed block's space once its per-thread
    # cache of the small chunks beside them is full, from about the tenth block on
    for _ in range(16):
        torch.empty(BLOCK // 4).fill_(1.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(BLOCK // 4).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def resident_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2 ** 20


out = {"pages": BLOCK // resource.getpagesize(), "kept before": allocator.kept()}
out["faults outside"] = page_faults_of_a_fresh_block()
out["resident before"] = resident_mib()
with allocator.freed_memory_kept():
    out["kept inside"] = allocator.kept()
    out["faults inside"] = page_faults_of_a_fresh_block()
    out["resident inside"] = resident_mib()
out["kept after"] = allocator.kept()
out["resident after"] = resident_mib()
print(json.dumps(out))
"""


@glibc_only
def test_a_freed_block_is_reused_without_page_faults_inside_and_the_memory_is_returned_after():
    run = subprocess.run([sys.executable, "-c", MEASURE], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stderr
    m = json.loads(run.stdout.strip().splitlines()[-1])
    pages, half = m["pages"], m["pages"] * resource.getpagesize() / 2 ** 20 / 2
    assert not m["kept before"] and m["kept inside"] and not m["kept after"]
    assert m["faults outside"] > pages // 2  # glibc's default: unmapped on free, fresh pages next time
    assert m["faults inside"] < pages // 100  # kept: the freed block's pages are reused
    assert m["resident inside"] - m["resident before"] >= half  # freed blocks stayed resident inside ...
    assert m["resident inside"] - m["resident after"] >= half  # ... and were handed back on exit (malloc_trim)


KEEP = [("mallopt", allocator.M_MMAP_MAX, 0), ("mallopt", allocator.M_TRIM_THRESHOLD, 2 ** 31 - 1)]
RESTORE = [("mallopt", allocator.M_MMAP_MAX, 65536), ("mallopt", allocator.M_MMAP_THRESHOLD, 128 * 1024),
           ("mallopt", allocator.M_TRIM_THRESHOLD, 128 * 1024), ("malloc_trim", 0)]


def test_nested_blocks_leave_the_settings_to_the_outermost_one(fake_glibc):
    with allocator.freed_memory_kept():
        assert fake_glibc.calls == KEEP
        with allocator.freed_memory_kept():
            pass
        assert fake_glibc.calls == KEEP and allocator.kept()
    assert fake_glibc.calls == KEEP + RESTORE and not allocator.kept()


def test_off_changes_nothing_and_an_error_inside_still_restores(fake_glibc):
    with allocator.freed_memory_kept(on=False):
        assert not allocator.kept()
    assert fake_glibc.calls == []
    with pytest.raises(RuntimeError, match="boom"):
        with allocator.freed_memory_kept():
            raise RuntimeError("boom")
    assert fake_glibc.calls == KEEP + RESTORE and not allocator.kept()


def test_without_glibc_the_block_changes_nothing(monkeypatch):
    monkeypatch.setattr(allocator, "glibc", lambda: None)
    with allocator.freed_memory_kept():
        assert not allocator.kept()
