"""abp_core.threedmol / abp_core.jupyter_static: how notebook views get 3Dmol.js (no browser here;
tests/test_jupyterlab.py renders them in a real JupyterLab)."""
from __future__ import annotations

import json
import re

import pytest

from abp_core import jupyter_static, threedmol, viz

ETHANOL_Z = [6, 6, 8, 1, 1, 1, 1, 1, 1]
ETHANOL_POS = [[-1.19, -0.38, 0.0], [0.0, 0.55, 0.0], [1.19, -0.25, 0.0], [-2.10, 0.23, 0.0], [-1.17, -1.02, 0.88],
               [-1.17, -1.02, -0.88], [0.03, 1.20, 0.88], [0.03, 1.20, -0.88], [1.96, 0.34, 0.0]]
ETHANOL_W = [0.05, 0.20, 0.45, 0.02, 0.02, 0.02, 0.06, 0.06, 0.12]


@pytest.fixture
def fake_js(tmp_path, monkeypatch):
    js = tmp_path / "3Dmol-min.js"
    js.write_text('window.$3Dmol = {marker: "LOCAL-COPY"}; var s = "</script>";\n')
    monkeypatch.setenv("ABP_3DMOL_JS", str(js))
    monkeypatch.delenv(threedmol.MODE_ENV, raising=False)
    return js


def test_notebook_view_loads_from_the_jupyter_server_first(fake_js):
    view = viz.side_by_side(ETHANOL_Z, ETHANOL_POS, {"a": ETHANOL_W, "b": ETHANOL_W[::-1]})
    html = view._make_html()
    # py3Dmol's own loader (straight to the CDN) is gone; ours tries the page, the server route, the CDN
    assert "loadScriptAsync('" not in html.split("$3Dmolpromise = window.abp3Dmol.load(")[1].split(";")[0]
    assert html.count("$3Dmolpromise = window.abp3Dmol.load(" + json.dumps(viz.DEFAULT_JS_URL) + ");") == 1
    assert threedmol.SERVER_ROUTE in html and "jupyter-config-data" in html
    assert html.index("jupyter") < html.index('tries.push(["cdn"')               # server before CDN
    # a view that cannot run its scripts says how to trust the notebook, not "failed to load"
    assert "failed to load" not in html and "Trust Notebook" in html
    # the note and the error are tied to this view's id
    assert f'"3dmolviewer_{view.uniqueid}"' in html
    assert "LOCAL-COPY" not in html                                                 # not embedded by default
    # a standalone page is unchanged: py3Dmol's loader, no notebook machinery
    page = viz.standalone_html(view)
    assert re.findall(r"loadScriptAsync\('([^']*)'\)", page) == [viz.DEFAULT_JS_URL] and "abp3Dmol" not in page


def test_inline_mode_embeds_the_local_copy(fake_js, monkeypatch):
    monkeypatch.setenv(threedmol.MODE_ENV, "inline")
    html = viz.attention_view(ETHANOL_Z, ETHANOL_POS, ETHANOL_W)._make_html()
    assert 'window.$3Dmol = {marker: "LOCAL-COPY"}; var s = "<\\/script>";' in html
    assert html.index("LOCAL-COPY") < html.index("window.abp3Dmol.load(")
    monkeypatch.setenv(threedmol.MODE_ENV, "sometimes")
    with pytest.raises(ValueError, match="ABP_3DMOL must be one of"):
        viz.attention_view(ETHANOL_Z, ETHANOL_POS, ETHANOL_W)._make_html()


def test_without_a_local_copy_the_cdn_note_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(threedmol, "local_3dmol_js", lambda: None)
    html = viz.attention_view(ETHANOL_Z, ETHANOL_POS, ETHANOL_W)._make_html()
    assert "came from the internet" in html and "make install" in html
    with pytest.raises(ValueError, match="not a py3Dmol view"):
        threedmol.notebook_html("<div>hello</div>", "1", viz.DEFAULT_JS_URL)


def test_local_copy_search_order(fake_js, monkeypatch, tmp_path):
    assert threedmol.local_3dmol_js() == fake_js.resolve() == viz.local_3dmol_js()
    monkeypatch.setenv("ABP_3DMOL_JS", str(tmp_path / "missing.js"))
    found = threedmol.local_3dmol_js()
    assert found is None or found.name == "3Dmol-min.js" and found != fake_js


def test_server_extension_is_enabled_by_a_config_file(tmp_path):
    path = jupyter_static.enable(tmp_path)
    assert path == tmp_path / "etc" / "jupyter" / "jupyter_server_config.d" / "abp_core.json"
    config = json.loads(path.read_text())
    assert config == {"ServerApp": {"jpserver_extensions": {"abp_core.jupyter_static": True}}}
    # the file pip installs (pyproject data-files) says the same
    shipped = json.loads((threedmol._REPO_ROOT / "jupyter-config" / "jupyter_server_config.d" / "abp_core.json")
                         .read_text())
    assert shipped == config
    assert jupyter_static._jupyter_server_extension_points() == [{"module": "abp_core.jupyter_static"}]
