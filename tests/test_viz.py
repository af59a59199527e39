"""abp_core.viz: 3D attention views (py3Dmol), standalone HTML export and plotly figures."""
from __future__ import annotations

import json
import logging
import re
import sys

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import py3Dmol
import pytest
import torch

from abp_core import viz

# Ethanol, hand-written geometry (Angstrom) and made-up weights: O largest, then C1, then the OH hydrogen.
ETHANOL_Z = [6, 6, 8, 1, 1, 1, 1, 1, 1]
ETHANOL_POS = [[-1.1879, -0.3829, 0.0], [0.0, 0.5526, 0.0], [1.1867, -0.2472, 0.0], [-2.0960, 0.2303, 0.0],
               [-1.1730, -1.0243, 0.8838], [-1.1730, -1.0243, -0.8838], [0.0271, 1.1960, 0.8811],
               [0.0271, 1.1960, -0.8811], [1.9641, 0.3380, 0.0]]
ETHANOL_W = np.array([0.05, 0.20, 0.45, 0.02, 0.02, 0.02, 0.06, 0.06, 0.12])
ETHANOL_HOMO = np.array([0.08, 0.12, 0.60, 0.01, 0.03, 0.03, 0.05, 0.05, 0.03])

VIRIDIS_BOTTOM, VIRIDIS_TOP = "#440154", "#fde725"


@pytest.fixture(scope="module")
def paracetamol():
    """A real 20-atom molecule (paracetamol, C8H9NO2) with an RDKit ETKDG conformer."""
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.AddHs(Chem.MolFromSmiles("CC(=O)Nc1ccc(O)cc1"))
    assert AllChem.EmbedMolecule(mol, randomSeed=7) == 0
    z = np.array([a.GetAtomicNum() for a in mol.GetAtoms()])
    pos = mol.GetConformer().GetPositions()
    assert z.size == 20
    rng = np.random.default_rng(0)
    return z, pos, rng.dirichlet(np.full(20, 0.5)), rng.dirichlet(np.full(20, 0.5))


def _html(view) -> str:
    return view._make_html()


def _styles(html: str) -> dict:
    """{(viewer, atom index): (colour, sphere radius)} from the setStyle calls in a view's HTML."""
    out = {}
    for m in re.finditer(r'(viewer\w*?(?:\[\d+\]\[\d+\])?)\.setStyle\(\{"index": (\d+)\},(\{.*?\}\})\);', html):
        style = json.loads(m.group(3))
        assert style["stick"]["color"] == style["sphere"]["color"]
        key = re.sub(r"_\d+", "", m.group(1))
        out[(key, int(m.group(2)))] = (style["sphere"]["color"], style["sphere"]["radius"])
    return out


# ----------------------------------------------------------------------------------------------
# colours
# ----------------------------------------------------------------------------------------------
def test_weight_colors_span_the_scale():
    cols = viz.weight_colors([0.0, 0.5, 1.0], "viridis")
    assert cols[0] == VIRIDIS_BOTTOM and cols[-1] == VIRIDIS_TOP
    assert viz.weight_colors([0.0, 1.0], "viridis_r") == [VIRIDIS_TOP, VIRIDIS_BOTTOM]
    # out-of-range values take the end colours; explicit two-colour scale interpolates linearly
    assert viz.weight_colors([-1.0, 2.0], "viridis", vmin=0, vmax=1) == [VIRIDIS_BOTTOM, VIRIDIS_TOP]
    assert viz.weight_colors([0.0, 0.5, 1.0], ["#000000", "#ffffff"]) == ["#000000", "#808080", "#ffffff"]
    with pytest.raises(ValueError):
        viz.weight_colors([0.1, 0.2], "no-such-scale")
    with pytest.raises(ValueError):
        viz.weight_colors([0.1, 0.2], vmin=0.5, vmax=0.5)


# ----------------------------------------------------------------------------------------------
# attention_view
# ----------------------------------------------------------------------------------------------
def test_attention_view_ethanol_colours_follow_weights():
    view = viz.attention_view(ETHANOL_Z, ETHANOL_POS, ETHANOL_W, title="ethanol", vmin=ETHANOL_W.min())
    assert isinstance(view, py3Dmol.view) and isinstance(view, viz.MoleculeView)
    html = _html(view)
    assert '"xyz"' in html and "C      0.000000     0.552600" in html  # the XYZ model, bonds left to 3Dmol
    styles = _styles(html)
    assert len(styles) == 9
    colours = [styles[("viewer", i)][0] for i in range(9)]
    radii = np.array([styles[("viewer", i)][1] for i in range(9)])
    assert colours[int(np.argmax(ETHANOL_W))] == VIRIDIS_TOP          # max weight -> top of the scale
    assert colours[int(np.argmin(ETHANOL_W))] == VIRIDIS_BOTTOM       # min weight (vmin) -> bottom
    assert colours == view.abp.colors["ethanol"]
    assert np.argmax(radii) == np.argmax(ETHANOL_W) and radii.min() == pytest.approx(0.22)
    # radius grows with the weight
    assert np.all(np.diff(radii[np.argsort(ETHANOL_W, kind="stable")]) >= 0)
    # labels: element + atom index + value, and the legend with title and range
    assert html.count(".addLabel(") == 9 and '"O2 0.45"' in html
    assert "abp-colorbar" in html and ">0.45<" in html and ">ethanol<" in html


def test_attention_view_default_range_and_labels_option():
    w = ETHANOL_W.copy()
    w[3] = 0.0
    view = viz.attention_view(ETHANOL_Z, ETHANOL_POS, torch.tensor(w), labels=2)
    styles = _styles(_html(view))
    assert styles[("viewer", 2)][0] == VIRIDIS_TOP and styles[("viewer", 3)][0] == VIRIDIS_BOTTOM
    html = _html(view)
    assert html.count(".addLabel(") == 2 and '"O2 0.45"' in html and '"C1 0.20"' in html
    assert _html(viz.attention_view(ETHANOL_Z, ETHANOL_POS, w, labels=False)).count(".addLabel(") == 0


def test_attention_view_twenty_atoms(paracetamol):
    z, pos, w, _ = paracetamol
    view = viz.attention_view(torch.tensor(z), torch.tensor(pos), w, cmap="plasma")
    styles = _styles(_html(view))
    assert len(styles) == 20
    top = viz.weight_colors([0.0, 1.0], "plasma")[1]
    assert styles[("viewer", int(np.argmax(w)))][0] == top
    assert sum(c == top for c, _ in styles.values()) == 1


@pytest.mark.parametrize("bad, match", [
    (ETHANOL_W[:-1], "one value per atom"),
    (np.r_[ETHANOL_W[:-1], -0.1], "non-negative"),
    (np.r_[ETHANOL_W[:-1], np.nan], "NaN"),
    (np.r_[ETHANOL_W[:-1], np.inf], "NaN or infinite"),
])
def test_attention_view_rejects_bad_weights(bad, match):
    with pytest.raises(ValueError, match=match):
        viz.attention_view(ETHANOL_Z, ETHANOL_POS, bad)
    with pytest.raises(ValueError):
        viz.side_by_side(ETHANOL_Z, ETHANOL_POS, {"a": ETHANOL_W, "b": bad})


def test_attention_view_rejects_bad_molecules():
    with pytest.raises(ValueError, match="pos must have shape"):
        viz.attention_view(ETHANOL_Z, np.zeros((9, 2)), ETHANOL_W)
    with pytest.raises(ValueError, match="atomic numbers"):
        viz.attention_view([0] + ETHANOL_Z[1:], ETHANOL_POS, ETHANOL_W)
    with pytest.raises(ValueError, match="NaN"):
        viz.attention_view(ETHANOL_Z, np.full((9, 3), np.nan), ETHANOL_W)
    with pytest.raises(ValueError, match="vmax"):
        viz.attention_view(ETHANOL_Z, ETHANOL_POS, ETHANOL_W, vmin=0.5, vmax=0.1)


# ----------------------------------------------------------------------------------------------
# side_by_side
# ----------------------------------------------------------------------------------------------
def test_side_by_side_shares_one_scale():
    panels = {"ABP attention": ETHANOL_W, "GFN2-xTB HOMO": ETHANOL_HOMO}
    view = viz.side_by_side(ETHANOL_Z, ETHANOL_POS, panels)
    html = _html(view)
    assert "createViewerGrid" in html and "rows: 1, cols: 2" in html and "control_all: true" in html
    assert html.count(".addModel(") == 2
    styles = _styles(html)
    left = [styles[("viewergrid[0][0]", i)][0] for i in range(9)]
    right = [styles[("viewergrid[0][1]", i)][0] for i in range(9)]
    # one scale 0..0.60: the HOMO maximum is the top colour, the attention maximum (0.45) is not
    assert view.abp.ranges == {"ABP attention": (0.0, 0.6), "GFN2-xTB HOMO": (0.0, 0.6)}
    assert right[2] == VIRIDIS_TOP and left[2] != VIRIDIS_TOP
    assert left[2] == viz.weight_colors([0.45], vmin=0, vmax=0.6)[0]
    # equal values get equal colours across panels (C0 0.05 vs H6 0.05)
    assert left[0] == right[6]
    # titles and ONE colour bar with the shared range
    assert ">ABP attention<" in html and ">GFN2-xTB HOMO<" in html
    assert html.count('class="abp-colorbar"') == 1 and ">0.6<" in html and "shared scale" in html


def test_side_by_side_independent_scales(paracetamol):
    z, pos, w, c = paracetamol
    view = viz.side_by_side(z, pos, {"attention": w, "HOMO": c, "WA": w / 2}, shared_scale=False,
                            linked=False, labels=3)
    html = _html(view)
    assert "rows: 1, cols: 3" in html and "control_all: false" in html
    styles = _styles(html)
    for col, vals in enumerate((w, c, w / 2)):
        assert styles[(f"viewergrid[0][{col}]", int(np.argmax(vals)))][0] == VIRIDIS_TOP
    assert html.count('class="abp-colorbar"') == 3 and html.count(".addLabel(") == 9
    with pytest.raises(ValueError):
        viz.side_by_side(z, pos, {})


# ----------------------------------------------------------------------------------------------
# standalone HTML
# ----------------------------------------------------------------------------------------------
def _script_urls(page: str):
    srcs = re.findall(r'<script[^>]*\bsrc="([^"]*)"', page)
    loaders = re.findall(r"loadScriptAsync\('([^']*)'\)", page)
    return srcs, loaders


def test_html_default_uses_py3dmol_cdn():
    page = viz.attention_view_html(ETHANOL_Z, ETHANOL_POS, ETHANOL_W, title="ethanol")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "<title>ethanol</title>" in page and page.count("3dmolviewer_") >= 1
    srcs, loaders = _script_urls(page)
    assert srcs == [] and loaders == [viz.DEFAULT_JS_URL]
    assert viz.DEFAULT_JS_URL.startswith("https://") and "3dmol" in viz.DEFAULT_JS_URL


def test_html_with_local_js_url_is_standalone(tmp_path):
    js = tmp_path / "lib" / "3Dmol-min.js"
    js.parent.mkdir()
    js.write_text("window.$3Dmol = {};\n")
    view = viz.side_by_side(ETHANOL_Z, ETHANOL_POS, {"attention": ETHANOL_W, "HOMO": ETHANOL_HOMO})
    out = viz.save_html(view, tmp_path / "out" / "ethanol.html", js_url=js)
    page = out.read_text()
    srcs, loaders = _script_urls(page)
    assert srcs == [js.resolve().as_uri()] and loaders == [js.resolve().as_uri()]
    assert not re.search(r"https?://", page)            # no remote URL at all
    assert page.index(js.resolve().as_uri()) < page.index("createViewerGrid")  # loaded before use
    # a relative URL stays relative; re-exporting a page swaps the library, never duplicates it
    again = viz.standalone_html(page, js_url="3Dmol-min.js")
    assert _script_urls(again) == (["3Dmol-min.js"], ["3Dmol-min.js"]) and again.count("<!-- abp:3dmol-js -->") == 1


def test_html_inline_js(tmp_path):
    js = tmp_path / "3Dmol-min.js"
    js.write_text('window.$3Dmol = {}; var s = "</script>";\n')
    page = viz.attention_view_html(ETHANOL_Z, ETHANOL_POS, ETHANOL_W, js_url=js, inline_js=True)
    srcs, loaders = _script_urls(page)
    assert srcs == [] and loaders == [""]
    assert 'window.$3Dmol = {}; var s = "<\\/script>";' in page  # embedded, closing tag escaped
    assert not re.search(r"https?://", page)
    with pytest.raises(FileNotFoundError):
        viz.attention_view_html(ETHANOL_Z, ETHANOL_POS, ETHANOL_W, js_url=tmp_path / "missing.js", inline_js=True)
    with pytest.raises(ValueError, match="local file"):
        viz.attention_view_html(ETHANOL_Z, ETHANOL_POS, ETHANOL_W, js_url="https://x.org/3Dmol.js", inline_js=True)


def test_local_3dmol_js_from_environment(tmp_path, monkeypatch):
    js = tmp_path / "3Dmol-min.js"
    js.write_text("window.$3Dmol = {};\n")
    monkeypatch.setenv("ABP_3DMOL_JS", str(js))
    assert viz.local_3dmol_js() == js.resolve()
    page = viz.attention_view_html(ETHANOL_Z, ETHANOL_POS, ETHANOL_W, inline_js=True)
    assert "window.$3Dmol = {};" in page


def test_save_html_rejects_non_views(tmp_path):
    with pytest.raises(ValueError, match="no py3Dmol viewer"):
        viz.save_html("<p>hello</p>", tmp_path / "x.html")
    with pytest.raises(TypeError):
        viz.save_html(42, tmp_path / "x.html")


# ----------------------------------------------------------------------------------------------
# plotly figures
# ----------------------------------------------------------------------------------------------
@pytest.fixture()
def two_molecule_records(paracetamol):
    z, pos, w, c = paracetamol
    zz = np.r_[ETHANOL_Z, z]
    batch = np.r_[np.zeros(9, int), np.ones(20, int)]
    return viz.atom_records(torch.tensor(zz), np.r_[ETHANOL_W, w], np.r_[ETHANOL_HOMO, c], torch.tensor(batch),
                            mol_ids=["ethanol", "paracetamol"])


def test_atom_records(two_molecule_records):
    df = two_molecule_records
    assert len(df) == 29 and list(df.columns) == ["molecule", "atom", "z", "element", "coefficient", "weight"]
    assert df["atom"].tolist()[:10] == list(range(9)) + [0] and df["molecule"].iloc[9] == "paracetamol"
    assert df.loc[2, "element"] == "O"
    with pytest.raises(ValueError):
        viz.atom_records([6, 8], [0.5, -0.5], [0.5, 0.5])


def test_scatter_attention_vs_coefficients(two_molecule_records):
    fig = viz.scatter_attention_vs_coefficients(two_molecule_records)
    elements = sorted(set(two_molecule_records["element"]))
    assert len(fig.data) == len(elements) + 1                     # one trace per element + y = x
    assert [t.name for t in fig.data[:-1]] == ["H", "C", "N", "O"]
    assert sum(len(t.x) for t in fig.data[:-1]) == 29
    line = fig.data[-1]
    assert line.name == "y = x" and list(line.x) == list(line.y)
    oxygen = fig.data[3]
    assert ["ethanol", "2", "O"] in [list(map(str, row)) for row in oxygen.customdata]
    assert "molecule %{customdata[0]}" in oxygen.hovertemplate
    # the same from per-molecule dicts
    recs = [{"id": "eth", "z": ETHANOL_Z, "weights": ETHANOL_W, "coefficients": ETHANOL_HOMO}]
    fig2 = viz.scatter_attention_vs_coefficients(recs)
    assert len(fig2.data) == 4 and sum(len(t.x) for t in fig2.data[:-1]) == 9
    with pytest.raises(ValueError):
        viz.scatter_attention_vs_coefficients(pd.DataFrame({"weight": [0.1], "coefficient": [np.nan], "z": [6]}))


def test_learning_curves():
    hist = pd.DataFrame({"epoch": [0, 1, 2, 3], "train_loss": [1.0, 0.6, 0.4, 0.3],
                         "val_loss": [1.1, np.nan, 0.5, np.nan]})
    fig = viz.learning_curves({"sum": hist, "abp": hist * 0.9})
    assert isinstance(fig, go.Figure) and len(fig.data) == 4
    assert [t.name for t in fig.data] == ["sum train_loss", "sum val_loss", "abp train_loss", "abp val_loss"]
    assert len(fig.data[1].x) == 2 and fig.data[1].line.dash == "dash" and fig.data[0].line.dash == "solid"
    long = pd.concat([hist.assign(readout="wa"), hist.assign(readout="owa")])
    assert len(viz.learning_curves(long, metrics=["train_loss"], log_y=True).data) == 2
    with pytest.raises(ValueError):
        viz.learning_curves(hist, metrics=["nope"])


def test_mae_bar_chart():
    fig = viz.mae_bar_chart({"sum": 0.12, "wa": 0.10, "abp": (0.08, 0.01)})
    assert len(fig.data) == 1 and list(fig.data[0].x) == ["sum", "wa", "abp"]
    res = pd.DataFrame({"readout": ["sum", "abp", "sum", "abp"], "backbone": ["schnet"] * 2 + ["dimenet++"] * 2,
                        "mae": [0.1, 0.08, 0.09, 0.07], "std": [0.01] * 4})
    fig = viz.mae_bar_chart(res, error="std", color="backbone")
    assert len(fig.data) == 2 and list(fig.data[0].error_y.array) == [0.01, 0.01]
    with pytest.raises(ValueError):
        viz.mae_bar_chart(res, y="rmse")
    summary = pd.DataFrame({"backbone": ["schnet"] * 3, "readout": ["sum", "wa", "abp"],
                            "mae_mean": [0.1, 0.09, 0.08], "mae_std": [0.01, np.nan, 0.02]})
    fig = viz.mae_bar_chart(summary, color="backbone")          # abp_core.stats.summarize layout
    assert list(fig.data[0].y) == [0.1, 0.09, 0.08] and fig.data[0].error_y.array[2] == 0.02


def test_save_figure_html_and_png_skip(tmp_path, monkeypatch, caplog):
    fig = viz.mae_bar_chart({"sum": 0.12, "abp": 0.08})
    monkeypatch.setitem(sys.modules, "kaleido", None)  # as if kaleido were not installed
    monkeypatch.setattr(viz, "find_chromium", lambda: None)  # ... and no Chromium to fall back on
    with caplog.at_level(logging.INFO, logger="abp_core.viz"):
        out = viz.save_figure(fig, tmp_path / "figs" / "mae.png")
    assert out["png"] is None and "kaleido" in caplog.text and "no Chromium" in caplog.text
    page = out["html"].read_text()
    assert out["html"].name == "mae.html" and "<html>" in page and len(page) > 1_000_000  # plotly.js inline
    out2 = viz.save_figure(fig, tmp_path / "mae2", include_plotlyjs="directory", png=False)
    assert (tmp_path / "plotly.min.js").is_file() and out2["html"].stat().st_size < 100_000
