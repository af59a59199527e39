"""The notebooks in a real JupyterLab, offline, in headless Chromium driven by Playwright.

One JupyterLab server (this venv, a free local port, throwaway config/data/runtime/settings folders,
the abp server extension that serves the local 3Dmol.js) and Debian's Chromium, in which no host but
127.0.0.1 resolves. Three checks, from the page itself:

1. the smoke-mode quickstart executed by papermill and trusted as ``make run`` does shows its 3D views:
   WebGL canvases with coloured (non-background) pixels, no "failed to load" text, no CDN note, and
   every request of the page stays on this machine;
2. the same notebook run in the page (Run All in a live kernel) renders its views too;
3. the molecule picker of ``08_attention_vs_orbitals`` draws another molecule when its value changes.

The notebooks run with ``smoke=True`` and 100 molecules. To stay under a minute on a 2-core machine whose
other core is busy (every kernel imports torch and Lightning; every 3D view is drawn by software WebGL):

* papermill runs in its own kernel from the start, while the server and the browser start;
* the saved notebook is opened in a fresh page and with no kernel, so its views must load 3Dmol.js and draw
  from the saved outputs alone; it is checked while the picker redraws;
* the two live notebooks run one after the other in ONE fresh page and ONE live kernel: Run All of the
  quickstart; then, as a user who closes it and opens ``08`` on its still running kernel, Run All of ``08``,
  which imports nothing again and reuses the quickstart's smoke runs (smoke mode keeps one runs folder per
  kernel). nbval runs ``08`` in a kernel of its own.

The server, its kernels, papermill and the browser are stopped whatever happens, and the test checks that
none of them is left.
"""
from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from abp_core import threedmol

REPO = Path(__file__).resolve().parents[1]
SETUP = REPO / "scripts" / "browser_deps.sh"
SMOKE = {"smoke": True, "n_molecules": 100, "png": False}
QUICKSTART, PICKER = "00_quickstart", "08_attention_vs_orbitals"
TOKEN = "abp-test-token"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync",
                 "--use-angle=swiftshader", "--enable-unsafe-swiftshader",          # software WebGL for 3Dmol.js
                 # WebGL 1, which 3Dmol.js also draws with: in software its WebGL 2 path (an offscreen context
                 # shared by all views) costs ~3 s of CPU per 4-panel view against ~1 s, and the test draws five
                 "--disable-webgl2",
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]      # only this machine resolves

# JS: the current notebook has run: kernel idle, every code cell executed, none pending; or the first error.
RUN_STATE = """() => {
  const w = window.jupyterapp.shell.currentWidget;
  if (!w || !w.content || !w.sessionContext || !w.sessionContext.session) { return null; }
  const cells = w.content.widgets.filter(c => c.model.type === 'code');
  for (const c of cells) {
    for (let i = 0; i < c.model.outputs.length; i++) {
      const o = c.model.outputs.get(i).toJSON();
      if (o.output_type === 'error') { return 'error: ' + o.ename + ': ' + o.evalue; }
    }
  }
  const kernel = w.sessionContext.session.kernel;
  if (!kernel || kernel.status !== 'idle') { return null; }
  const done = cells.every(c => c.model.executionCount !== null && !c.node.classList.contains('jp-mod-pending'));
  return done ? 'done' : null;
}"""
KERNEL_IDLE = """() => { const w = window.jupyterapp.shell.currentWidget;
  const s = w && w.sessionContext && w.sessionContext.session;
  return !!(s && s.kernel && s.kernel.status === 'idle'); }"""
VIEWERS = "div[id^='3dmolviewer_']"


def _find_chromium():
    for cand in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


@pytest.fixture(scope="module")
def chromium():
    chromium, js = _find_chromium(), threedmol.local_3dmol_js()
    log = ""
    if chromium is None or js is None:
        proc = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, timeout=1200)
        log = (proc.stdout + proc.stderr)[-1500:]
        chromium, js = _find_chromium(), threedmol.local_3dmol_js()
    if chromium is None:
        pytest.skip(f"headless Chromium cannot be installed on this machine (needs root and apt-get):\n{log}")
    if js is None:
        pytest.fail(f"no local 3Dmol.js after scripts/browser_deps.sh (npm install 3dmol failed?):\n{log}")
    return chromium


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(procs):
    """Stop processes and everything they started (kernels run in sessions of their own): TERM, then KILL."""
    family = []
    for proc in procs:
        try:
            p = psutil.Process(proc.pid)
            family += p.children(recursive=True) + [p]
        except psutil.NoSuchProcess:
            pass
    for p in family:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(family, timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    return family


def _saturated_pixels(png: bytes) -> int:
    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int64)
    return int(((image.max(-1) - image.min(-1)) > 40).sum())      # coloured: not white, grey or black


def _check_views(page, expected_min: int, scope: str = "body", timeout: float = 30.0):
    """Every 3D view in ``scope`` (a notebook panel) has a WebGL canvas with coloured pixels; returns the
    viewer ids."""
    deadline = time.monotonic() + timeout
    while True:
        ids = page.eval_on_selector_all(f"{scope} {VIEWERS}",
                                        "els => els.filter(e => e.querySelector('canvas')).map(e => e.id)")
        pixels = {}
        for vid in ids:
            viewer = page.locator(f"[id='{vid}']")
            viewer.scroll_into_view_if_needed()
            pixels[vid] = _saturated_pixels(viewer.screenshot())
        if len(ids) >= expected_min and all(n > 500 for n in pixels.values()):
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"3D views not drawn: {len(ids)} viewers with a canvas (want >= {expected_min}), "
                                 f"coloured pixels {pixels}; page text: {page.inner_text('body')[-1500:]}")
        time.sleep(0.5)
    body = page.inner_text("body")
    assert "failed to load" not in body
    notes = page.eval_on_selector_all(".abp-3dmol-note, .abp-3dmol-error", "els => els.map(e => e.textContent)")
    assert notes == [], f"3Dmol.js did not come from the Jupyter server: {notes}"
    assert page.evaluate("window.abp3Dmol && window.abp3Dmol.source") == "jupyter"
    return ids


def _mark(what: str, t0: float) -> None:
    print(f"[{time.monotonic() - t0:5.1f} s] {what}", file=sys.stderr)


def _open(page, base: str, workspace: str, path: str):
    page.goto(f"{base}/lab/workspaces/{workspace}/tree/{path}?token={TOKEN}")
    page.wait_for_function("window.jupyterapp && window.jupyterapp.shell.currentWidget "
                           "&& document.querySelector('.jp-Notebook .jp-Cell')", timeout=60_000)
    return _panel(page, path)


def _open_on_kernel_of_current(page, path: str):
    """Close the current notebook (its kernel keeps running, as JupyterLab does by default) and open ``path``
    in the same page on that kernel (Kernel > Change Kernel > its session, done with the command it runs).
    The closed notebook's connection is gone first because JupyterLab lets only one connection per kernel
    handle comms, and the picker's widgets need them."""
    page.evaluate("""(path) => { const w = window.jupyterapp.shell.currentWidget;
      const id = w.sessionContext.session.kernel.id;
      w.dispose();
      window.jupyterapp.commands.execute('docmanager:open', {path, factory: 'Notebook', kernel: {id}}); }""", path)
    page.wait_for_function("""(path) => { const w = window.jupyterapp.shell.currentWidget;
      return !!(w && w.context && w.context.path === path && w.node.querySelector('.jp-Cell')); }""", arg=path,
                           timeout=60_000)
    return _panel(page, path)


def _open_without_kernel(page, path: str):
    """In a page that is loading JupyterLab: open ``path`` with no kernel (File > Open, then No Kernel)."""
    page.wait_for_function("() => !!(window.jupyterapp && window.jupyterapp.commands.hasCommand('docmanager:open'))",
                           timeout=60_000)
    page.evaluate("""(path) => { window.jupyterapp.commands.execute('docmanager:open', {path, factory: 'Notebook',
      kernelPreference: {shouldStart: false, canStart: false, autoStartDefault: false}}); }""", path)
    page.wait_for_function("""(path) => { const w = window.jupyterapp.shell.currentWidget;
      return !!(w && w.context && w.context.path === path && w.node.querySelector('.jp-Cell')); }""", arg=path,
                           timeout=60_000)
    return _panel(page, path)


def _panel(page, path: str) -> str:
    """CSS selector of the current notebook panel (the one showing ``path``)."""
    wid = page.evaluate("(path) => { const w = window.jupyterapp.shell.currentWidget;"
                        " return w.context.path === path ? w.id : null; }", path)
    assert wid, f"{path} is not the current notebook"
    return f"[id='{wid}']"


def _run_all(page):
    page.wait_for_function(KERNEL_IDLE, timeout=60_000, polling=250)
    # not awaited: the command's promise settles only when the last cell has run
    page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")


def _wait_run(page, timeout_ms: int = 120_000):
    handle = page.wait_for_function(RUN_STATE, timeout=timeout_ms, polling=250)
    state = handle.json_value()
    assert state == "done", f"the notebook failed in the page: {state}"


def test_notebooks_in_jupyterlab_offline(chromium, tmp_path):
    pytest.importorskip("playwright")  # a dev dependency (pyproject [dev]); installed by `make install`
    from playwright.sync_api import sync_playwright

    root = tmp_path / "root"
    root.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for var in ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "JUPYTERLAB_SETTINGS_DIR",
                "JUPYTERLAB_WORKSPACES_DIR", "IPYTHONDIR"):
        (tmp_path / var).mkdir()
        env[var] = str(tmp_path / var)
    env.pop("ABP_3DMOL", None)
    # no "would you like news?" pop-up over the notebook
    settings = tmp_path / "JUPYTERLAB_SETTINGS_DIR" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false", "checkForUpdates": false}')
    # no "is the build up to date?" check on every page load (it runs yarn): nothing here rebuilds JupyterLab
    (tmp_path / "JUPYTER_CONFIG_DIR" / "labconfig").mkdir()
    (tmp_path / "JUPYTER_CONFIG_DIR" / "labconfig" / "page_config.json").write_text(
        '{"buildCheck": false, "buildAvailable": false}')

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    procs = []
    t0 = time.monotonic()
    try:
        # 1a. papermill executes the quickstart (as `make run` does) while the server and the browser start
        executed = root / f"{QUICKSTART}_executed.ipynb"
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "papermill", str(REPO / "notebooks" / f"{QUICKSTART}.ipynb"), str(executed),
             "-p", "smoke", "True", "-p", "n_molecules", "100", "-p", "png", "False",
             "-p", "output_dir", str(tmp_path / "papermill"), "--cwd", str(root)],
            env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True))
        server_log = open(tmp_path / "jupyterlab.log", "w")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ip=127.0.0.1", f"--port={port}",
             "--ServerApp.port_retries=0", f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={root}",
             "--LabApp.expose_app_in_browser=True", "--LabApp.extension_manager=readonly",
             "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
            env=env, cwd=root, stdout=server_log, stderr=subprocess.STDOUT, start_new_session=True))

        # the notebooks as a user would have them: parameters injected (papermill --prepare-only), not executed
        import nbformat
        import papermill
        from nbformat.sign import NotebookNotary

        for name in (QUICKSTART, PICKER):
            papermill.execute_notebook(str(REPO / "notebooks" / f"{name}.ipynb"), str(root / f"{name}.ipynb"),
                                       parameters=dict(SMOKE, output_dir=str(tmp_path / "live" / name)),
                                       prepare_only=True, progress_bar=False)

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
            try:
                _mark("browser up", t0)
                while True:
                    try:
                        urllib.request.urlopen(f"{base}/api/status?token={TOKEN}", timeout=2)
                        break
                    except OSError:
                        assert procs[1].poll() is None, (tmp_path / "jupyterlab.log").read_text()[-3000:]
                        assert time.monotonic() - t0 < 60, "JupyterLab did not start in 60 s"
                        time.sleep(0.2)
                with urllib.request.urlopen(f"{base}/{threedmol.SERVER_ROUTE}") as r:   # the extension serves 3Dmol.js
                    assert r.headers["Content-Type"].startswith("text/javascript") and b"$3Dmol" in r.read()
                _mark("server up", t0)

                context = browser.new_context(viewport={"width": 1400, "height": 1000})
                requests = []
                context.on("request", lambda r: requests.append(r.url))
                context.on("websocket", lambda ws: requests.append(ws.url))

                # 2. Run All of the quickstart in a live kernel, in a fresh page, renders its views
                live = context.new_page()
                quickstart = _open(live, base, "live", f"{QUICKSTART}.ipynb")
                _run_all(live)
                _mark("live: run all", t0)
                _wait_run(live)
                _mark("live: ran", t0)
                _check_views(live, 1, quickstart)
                _mark("live: checked", t0)

                # 3a. 08 in the same page, on the same kernel: Run All
                picker = _open_on_kernel_of_current(live, f"{PICKER}.ipynb")
                _run_all(live)
                _mark("picker: run all", t0)

                # 1b. the papermill output, trusted as `make run` trusts it (`jupyter trust` signs with this notary
                #     in the server's data dir); a fresh page starts loading JupyterLab meanwhile
                out, _ = procs[0].communicate(timeout=120)
                _mark("papermill done", t0)
                assert procs[0].returncode == 0, f"papermill failed:\n{out[-3000:]}"
                NotebookNotary(data_dir=str(tmp_path / "JUPYTER_DATA_DIR")).sign(
                    nbformat.read(str(executed), as_version=4))
                saved = context.new_page()
                saved.goto(f"{base}/lab/workspaces/saved?token={TOKEN}", wait_until="commit")

                # 3b. the picker redraws when its value changes (choose, then check the saved page meanwhile;
                #     a page renders while it is in front)
                live.bring_to_front()
                _wait_run(live)
                _mark("picker: ran", t0)
                select = live.locator(f"{picker} .widget-dropdown select").first
                select.wait_for(timeout=20_000)
                picker_box = live.locator(f"{picker} .jp-OutputArea-output .widget-vbox").first
                before = _check_views(live, 1, picker)
                title_before = picker_box.locator(".abp-view").first.inner_text()
                assert select.evaluate("s => s.options.length") >= 2
                select.select_option(index=1)
                _mark("picker: chosen", t0)

                # 1c. the saved notebook, opened without a kernel: its views draw from the saved outputs alone
                saved.bring_to_front()
                saved_panel = _open_without_kernel(saved, executed.name)
                _mark("saved: open", t0)
                ids = _check_views(saved, 1, saved_panel)
                _mark("saved: checked", t0)
                assert all(vid.startswith("3dmolviewer_") for vid in ids)

                live.bring_to_front()
                live.wait_for_function(
                    "([scope, old]) => { const v = document.querySelectorAll(scope + \" div[id^='3dmolviewer_']\");"
                    " return Array.from(v).some(e => !old.includes(e.id) && e.querySelector('canvas')); }",
                    arg=[picker, before], timeout=30_000)
                after = _check_views(live, 1, picker)
                _mark("picker: redrawn", t0)
                assert set(after) - set(before), "no new 3D view after choosing another molecule"
                assert picker_box.locator(".abp-view").first.inner_text() != title_before

                remote = [u for u in requests
                          if not u.startswith((base, f"ws://127.0.0.1:{port}", "data:", "blob:", "about:"))]
                assert remote == [], f"the page requested resources off this machine: {remote[:10]}"
            finally:
                browser.close()
    finally:
        stopped = _stop(procs)
        assert not [p for p in stopped if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], "stray processes"
