"""Fixtures for the dataset-loader tests.

Small datasets are written IN THE OFFICIAL FILE FORMATS into pytest tmp folders (RDKit ETKDG
geometries, plausible property values) and loaded through the real code paths. Nothing is downloaded:
where a download path is exercised, ``urllib.request.urlopen`` is replaced by an in-memory server.
"""
from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from abp_data_fixtures import FakeResponse

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = Path(os.environ.get("ABP_TEST_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test caches processed data in its own tmp folder, never in the user's cache."""
    monkeypatch.setenv("ABP_CACHE_DIR", str(tmp_path / "abp_cache"))


@pytest.fixture(scope="session")
def shared_root() -> Path:
    if not (SHARED_DATA / "qm7b").is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA}")
    return SHARED_DATA


# ---------------------------------------------------------------------------------------------------
# QM9: the real embedded dataset, processed once per session
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def qm9_session(tmp_path_factory):
    """(dataset, root, cache_dir, seconds for the first load) -- the full QM9, processed once."""
    from abp_core.data import QM9

    root = tmp_path_factory.mktemp("qm9_root")
    cache = tmp_path_factory.mktemp("qm9_cache")
    t0 = time.perf_counter()
    ds = QM9(root=root, cache_dir=cache)
    return ds, root, cache, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------
# network and registry patches
# ---------------------------------------------------------------------------------------------------
@pytest.fixture
def fake_server(monkeypatch):
    """Serve ``{url: bytes}`` through ``urllib.request.urlopen``; any other URL fails like no network."""
    served: dict[str, bytes] = {}
    requested: list[str] = []

    def urlopen(url, *args, **kwargs):
        url = getattr(url, "full_url", url)
        requested.append(url)
        if url in served:
            return FakeResponse(served[url])
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return served, requested


@pytest.fixture
def no_network(monkeypatch):
    calls: list[str] = []

    def urlopen(url, *args, **kwargs):
        calls.append(getattr(url, "full_url", url))
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return calls


@pytest.fixture
def patch_qm8_registry(monkeypatch):
    """Point abp_core.data.qm8's checksum registry at a fixture's files."""
    from abp_core.data import qm8
    from abp_core.data.common import RemoteFile

    def apply(info: dict) -> None:
        monkeypatch.setitem(qm8.RAW_FILES, "sdf", RemoteFile("qm8.sdf", None, info["sdf_sha"], info["sdf_size"]))
        monkeypatch.setitem(qm8.RAW_FILES, "csv", RemoteFile("qm8.sdf.csv", None, info["csv_sha"], info["csv_size"]))

    return apply
