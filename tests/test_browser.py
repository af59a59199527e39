"""Exported 3D attention views render a molecule in a real headless Chromium, offline.

Needs Debian's Chromium and a local 3Dmol.js: ``bash scripts/browser_deps.sh`` (idempotent; ``make
test`` runs it first). If either is missing the fixture runs that script itself; the tests skip
only when Chromium cannot be installed on this machine (no root/apt-get), and fail when 3Dmol.js
cannot be had. Chromium runs with ``--host-resolver-rules=MAP * ~NOTFOUND`` so no host name
resolves: a page that needed the network could not render, and its net log shows what the page
asked for. 3Dmol.js needs WebGL: headless Chromium provides it in software (SwiftShader).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image  # ships with rdkit and matplotlib, both dependencies

from abp_core import viz

REPO = Path(__file__).resolve().parents[1]
SETUP = REPO / "scripts" / "browser_deps.sh"

ETHANOL_Z = [6, 6, 8, 1, 1, 1, 1, 1, 1]
ETHANOL_POS = [[-1.1879, -0.3829, 0.0], [0.0, 0.5526, 0.0], [1.1867, -0.2472, 0.0], [-2.0960, 0.2303, 0.0],
               [-1.1730, -1.0243, 0.8838], [-1.1730, -1.0243, -0.8838], [0.0271, 1.1960, 0.8811],
               [0.0271, 1.1960, -0.8811], [1.9641, 0.3380, 0.0]]
ETHANOL_W = np.array([0.05, 0.20, 0.45, 0.02, 0.02, 0.02, 0.06, 0.06, 0.12])     # O2 largest
ETHANOL_HOMO = np.array([0.08, 0.12, 0.60, 0.01, 0.03, 0.03, 0.05, 0.05, 0.03])

VIRIDIS_TOP = (253, 231, 37)
MARGIN = 8  # body margin of the exported page, px


def _find_chromium():
    for cand in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                 shutil.which("chromium-browser")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


@pytest.fixture(scope="module")
def browser():
    """(chromium executable, local 3Dmol.js); runs scripts/browser_deps.sh if either is missing."""
    chromium, js = _find_chromium(), viz.local_3dmol_js()
    log = ""
    if chromium is None or js is None:
        proc = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, timeout=1200)
        log = (proc.stdout + proc.stderr)[-1500:]
        chromium, js = _find_chromium(), viz.local_3dmol_js()
    if chromium is None:
        pytest.skip("headless Chromium is not installed and scripts/browser_deps.sh could not install it "
                    f"on this machine (needs root and apt-get). Set-up output:\n{log}")
    if js is None:
        pytest.fail(f"3Dmol.js missing after scripts/browser_deps.sh (npm install 3dmol failed?):\n{log}")
    return chromium, js


def _render(chromium: str, page: Path, tmp_path: Path, size):
    """Screenshot of ``page`` (RGB array) and the http(s)/ws URLs the page itself requested."""
    png, netlog = tmp_path / f"{page.stem}.png", tmp_path / f"{page.stem}.netlog.json"
    args = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--use-angle=swiftshader", "--enable-unsafe-swiftshader",   # software WebGL for 3Dmol.js
            "--host-resolver-rules=MAP * ~NOTFOUND",                    # no host resolves: offline
            "--hide-scrollbars", f"--user-data-dir={tmp_path / ('profile-' + page.stem)}",
            f"--log-net-log={netlog}", f"--window-size={size[0]},{size[1]}", "--virtual-time-budget=8000",
            f"--screenshot={png}", page.as_uri()]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0 and png.is_file(), f"chromium failed ({proc.returncode}):\n{proc.stderr[-2000:]}"
    image = np.asarray(Image.open(png).convert("RGB")).astype(np.int64)
    assert image.shape[:2] == (size[1], size[0])
    return image, _page_requests(netlog)


def _page_requests(netlog: Path):
    """URLs of network requests made on behalf of the page (not Chromium's own background ones)."""
    text = netlog.read_text()
    data = json.JSONDecoder().raw_decode(text)[0]
    names = {v: k for k, v in data["constants"]["logEventTypes"].items()}
    urls = []
    for ev in data.get("events", []):
        params = ev.get("params") or {}
        if names.get(ev["type"]) == "URL_REQUEST_START_JOB" and params.get("initiator") != "not an origin":
            urls.append(params.get("url", ""))
    return [u for u in urls if re.match(r"^(https?|wss?)://", u)]


def _near(image, rgb, tol=40.0):
    return np.sqrt(((image - np.asarray(rgb)) ** 2).sum(-1)) < tol


def _saturated(image):
    return (image.max(-1) - image.min(-1)) > 40          # coloured: not white, grey or black


def _share_near_scale(pixels, cmap, tol=15.0):
    """Fraction of ``pixels`` [k, 3] that are a colour of the scale ``cmap`` under some shading:
    within ``tol`` of ``s * colour`` for a scale colour and a brightness factor s in [0.25, 1.5]
    (3Dmol.js lights the spheres, so a sphere of colour c shows c darkened or brightened)."""
    scale = np.array([viz._to_rgb(c) for c in viz.weight_colors(np.linspace(0, 1, 256), cmap)])
    s = np.clip(pixels @ scale.T / (scale * scale).sum(1), 0.25, 1.5)           # best factor [k, 256]
    d = np.sqrt(((pixels[:, None, :] - s[..., None] * scale[None]) ** 2).sum(-1)).min(1)
    return float((d < tol).mean())


def _script_urls(page: str):
    return re.findall(r'<script[^>]*\bsrc="([^"]*)"', page) + re.findall(r"loadScriptAsync\('([^']*)'\)", page)


def test_attention_view_renders_offline_with_local_3dmol(browser, tmp_path):
    chromium, js = browser
    width, height = 420, 360
    view = viz.attention_view(ETHANOL_Z, ETHANOL_POS, ETHANOL_W, title="ethanol", width=width, height=height)
    page = viz.save_html(view, tmp_path / "ethanol.html", js_url=js)
    html = page.read_text()
    assert _script_urls(html) == [js.as_uri(), js.as_uri()]        # <script src> and py3Dmol's loader
    assert not re.search(r"https?://", html), "the page names a remote URL"

    image, requests = _render(chromium, page, tmp_path, (width + 2 * MARGIN, height + 120))
    assert requests == [], f"the page requested remote resources: {requests}"
    mol = image[:MARGIN + height, :MARGIN + width]                   # the viewer (colour bar excluded)
    coloured = mol[_saturated(mol)]
    assert (mol.min(-1) < 235).sum() > 2000, "blank screenshot: no molecule drawn"
    assert len(coloured) > 1500, f"only {len(coloured)} coloured pixels"
    # the pixels are the colour scale's (shaded) colours, not some other palette
    # (measured: viridis 0.90; plasma, which shares viridis' purple end, 0.49; reds 0.0)
    assert _share_near_scale(coloured, "viridis") > 0.8
    assert _share_near_scale(coloured, "plasma") < 0.7 and _share_near_scale(coloured, "reds") < 0.1
    # the oxygen (largest weight) is drawn in the top colour, right of the molecule's centre
    top = _near(mol, VIRIDIS_TOP)
    assert top.sum() > 150, f"{top.sum()} pixels of the top colour"
    ys, xs = np.nonzero(_saturated(mol))
    assert np.nonzero(top)[1].mean() > xs.mean() + 20
    # the C1 carbon (0.20) has its own mid-scale colour
    c1 = viz._to_rgb(view.abp.colors["ethanol"][1])
    assert _near(mol, c1, 30).sum() > 40


def test_side_by_side_inline_js_shares_the_scale(browser, tmp_path):
    chromium, _ = browser
    panel, height = 360, 340
    view = viz.side_by_side(ETHANOL_Z, ETHANOL_POS, {"ABP attention": ETHANOL_W, "GFN2-xTB HOMO": ETHANOL_HOMO},
                            panel_width=panel, height=height)
    page = viz.save_html(view, tmp_path / "side_by_side.html", inline_js=True)
    html = page.read_text()
    assert re.findall(r'<script[^>]*\bsrc=', html) == [] and re.findall(r"loadScriptAsync\('([^']*)'\)", html) == [""]

    image, requests = _render(chromium, page, tmp_path, (2 * panel + 2 * MARGIN, height + 140))
    assert requests == []
    top_px = MARGIN + 40                                             # below the panel titles
    left = image[top_px:MARGIN + height, MARGIN:MARGIN + panel]
    right = image[top_px:MARGIN + height, MARGIN + panel:MARGIN + 2 * panel]
    for half in (left, right):
        assert _saturated(half).sum() > 800
    # one scale 0..0.60: only the HOMO panel reaches the top colour; attention's O (0.45) is green
    assert _near(right, VIRIDIS_TOP).sum() > 150 and _near(left, VIRIDIS_TOP).sum() < 20
    o_attention = viz._to_rgb(view.abp.colors["ABP attention"][2])
    assert _near(left, o_attention, 30).sum() > 150 and _near(right, o_attention, 30).sum() < 20


def test_cdn_page_needs_the_network(browser, tmp_path):
    """Control: the default page (3Dmol.js from py3Dmol's CDN) shows nothing offline, and the net
    log catches its request, so the checks above are not vacuous."""
    chromium, _ = browser
    page = viz.save_html(viz.attention_view(ETHANOL_Z, ETHANOL_POS, ETHANOL_W), tmp_path / "cdn.html")
    image, requests = _render(chromium, page, tmp_path, (436, 480))
    assert requests and all("3dmol" in u.lower() for u in requests), requests
    mol = image[:MARGIN + 360, :MARGIN + 420]
    assert _saturated(mol).sum() < 50 and _near(mol, VIRIDIS_TOP).sum() == 0


def _notebook_page(view, path: Path) -> Path:
    """The view's notebook output (what ``show()`` publishes) in a bare page: a front-end with no Jupyter
    server, as VS Code shows notebook outputs."""
    path.write_text("<!DOCTYPE html>\n<html><body style=\"margin:8px\">\n" + view._make_html() + "</body></html>\n")
    return path


def test_notebook_output_inline_renders_without_a_server(browser, tmp_path, monkeypatch):
    chromium, _ = browser
    monkeypatch.setenv("ABP_3DMOL", "inline")
    view = viz.attention_view(ETHANOL_Z, ETHANOL_POS, ETHANOL_W, width=420, height=360)
    page = _notebook_page(view, tmp_path / "inline.html")
    image, requests = _render(chromium, page, tmp_path, (436, 480))
    assert requests == [], requests
    mol = image[:MARGIN + 360, :MARGIN + 420]
    assert _saturated(mol).sum() > 1500 and _near(mol, VIRIDIS_TOP).sum() > 150


def test_notebook_output_offline_without_a_local_source_says_so(browser, tmp_path, monkeypatch):
    """No Jupyter server and no internet: the view explains itself instead of staying blank."""
    chromium, _ = browser
    monkeypatch.delenv("ABP_3DMOL", raising=False)
    view = viz.attention_view(ETHANOL_Z, ETHANOL_POS, ETHANOL_W, width=420, height=360)
    page = _notebook_page(view, tmp_path / "offline.html")
    dom = tmp_path / "offline.dom.html"
    args = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={tmp_path / 'profile-dom'}",
            "--virtual-time-budget=8000", "--dump-dom", page.as_uri()]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=180)
    dom.write_text(proc.stdout)
    assert 'class="abp-3dmol-error"' in proc.stdout and "could not be loaded" in proc.stdout, proc.stdout[-2000:]
    assert "make lab" in proc.stdout
