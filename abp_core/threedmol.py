"""Where the 3D views get 3Dmol.js from: a local copy first, the CDN only as the last resort.

The library (npm package ``3dmol``, the version py3Dmol loads, BSD-3-Clause) is fetched by the install
step (``make install`` runs ``scripts/fetch_3dmol.sh``: npm) into the package data folder
``abp_core/static/3dmol/``. :func:`local_3dmol_js` finds it (or ``$ABP_3DMOL_JS``, or the npm
working copy ``.cache/3dmol/...``).

In a notebook, a view's output is small and loads 3Dmol.js at display time, trying in turn
(:func:`notebook_html`):

1. the copy already loaded in the page (one load per page, however many views);
2. the Jupyter server the page came from: the server extension :mod:`abp_core.jupyter_static` serves
   the local copy at ``<base_url>abp/static/3Dmol-min.js`` -- so a live kernel and a saved (papermill)
   notebook opened later render offline alike;
3. 3Dmol.js embedded in the output itself, when ``$ABP_3DMOL`` is ``inline`` (for front-ends without a
   Jupyter server, e.g. VS Code, or to hand a notebook to someone; ~540 kB per view);
4. py3Dmol's CDN URL, with a visible note under the view saying why and how to get the local copy.

If nothing loads, the view says so (no silent blank box). Saved outputs run scripts only in a
*trusted* notebook: ``make run`` trusts the notebooks it writes (``jupyter trust``), and an
untrusted view says how to trust it instead of py3Dmol's "failed to load" box.
"""
from __future__ import annotations

import html as _html
import json
import os
import re
from pathlib import Path
from typing import List, Optional

__all__ = ["VERSION", "PACKAGE_JS", "SERVER_ROUTE", "MODE_ENV", "local_3dmol_js", "notebook_mode", "notebook_html"]

#: The 3Dmol.js version fetched by ``scripts/fetch_3dmol.sh``: the one py3Dmol 2.5.5 loads from its CDN.
VERSION = "2.5.5"
_PACKAGE_DIR = Path(__file__).resolve().parent
_REPO_ROOT = _PACKAGE_DIR.parent
#: The local copy shipped as package data (fetched at install time; git-ignored).
PACKAGE_JS = _PACKAGE_DIR / "static" / "3dmol" / "3Dmol-min.js"
#: npm's working copy (``scripts/fetch_3dmol.sh`` installs there first), relative to the repository.
NPM_JS_RELATIVE = Path(".cache/3dmol/node_modules/3dmol/build/3Dmol-min.js")
#: Where :mod:`abp_core.jupyter_static` serves the local copy, relative to the Jupyter server's base URL.
SERVER_ROUTE = "abp/static/3Dmol-min.js"
#: ``ABP_3DMOL=inline`` embeds the library in every notebook view (default ``auto``: page, server, CDN).
MODE_ENV = "ABP_3DMOL"
_MODES = ("auto", "inline")

_WARN_RE = re.compile(r'(<p id="3dmolwarning_[^"]*"[^>]*>).*?(</p>)', re.DOTALL)
_PROMISE_RE = re.compile(r"\$3Dmolpromise = loadScriptAsync\('([^']*)'\);")
_UNTRUSTED_TEXT = ("This 3D view needs JavaScript, which Jupyter runs only in trusted notebooks: trust this one "
                   "(JupyterLab: command palette, &quot;Trust Notebook&quot;; or <code>jupyter trust "
                   "NOTEBOOK.ipynb</code>) and reopen it.")


def local_3dmol_js() -> Optional[Path]:
    """The local 3Dmol.js: ``$ABP_3DMOL_JS``, else the package data copy, else npm's copy in
    ``.cache/3dmol/`` of the repository or the current directory; None if there is none."""
    env = os.environ.get("ABP_3DMOL_JS")
    candidates = ([Path(env)] if env else []) + [PACKAGE_JS, _REPO_ROOT / NPM_JS_RELATIVE, Path.cwd() / NPM_JS_RELATIVE]
    for p in candidates:
        if p.is_file() and p.stat().st_size > 0:
            return p.resolve()
    return None


def notebook_mode() -> str:
    """``$ABP_3DMOL``: ``auto`` (default: page, Jupyter server, CDN) or ``inline``."""
    mode = os.environ.get(MODE_ENV, "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"environment variable {MODE_ENV} must be one of {list(_MODES)}, got {mode!r}")
    return mode


# The loader shared by every view of a page. It is defined once (window.abp3Dmol) and returns ONE promise
# per page; a failed attempt is forgotten so that a later view tries again.
_LOADER_JS = r"""
window.abp3Dmol = window.abp3Dmol || (function () {
  var api = {source: null, error: null};
  function jupyterBase() {
    var el = document.getElementById("jupyter-config-data");            // JupyterLab, Notebook 7
    if (el) { try { var b = JSON.parse(el.textContent).baseUrl; if (b) { return b; } } catch (e) {} }
    var body = document.body ? document.body.getAttribute("data-base-url") : null;   // classic Notebook
    return body || null;
  }
  function addScript(url) {
    return new Promise(function (resolve, reject) {
      // 3Dmol.js is a UMD bundle: with CommonJS-looking globals present it does not register with an
      // AMD loader (require.js in the classic Notebook) and still defines window.$3Dmol.
      var hadExports = typeof window.exports !== "undefined", hadModule = typeof window.module !== "undefined";
      var savedExports = window.exports, savedModule = window.module;
      if (!hadExports) { window.exports = {}; }
      if (!hadModule) { window.module = {}; }
      function restore() {
        if (hadExports) { window.exports = savedExports; } else { try { delete window.exports; } catch (e) { window.exports = undefined; } }
        if (hadModule) { window.module = savedModule; } else { try { delete window.module; } catch (e) { window.module = undefined; } }
      }
      var tag = document.createElement("script");
      tag.src = url;
      tag.async = true;
      tag.onload = function () { restore(); (typeof $3Dmol !== "undefined") ? resolve() : reject(new Error(url + " defined no $3Dmol")); };
      tag.onerror = function () { restore(); reject(new Error("could not load " + url)); };
      document.head.appendChild(tag);
    });
  }
  api.load = function (cdnUrl) {
    if (typeof $3Dmol !== "undefined") { api.source = api.source || "page"; return Promise.resolve(); }
    var tries = [];
    var base = jupyterBase();
    if (base) { tries.push(["jupyter", base.replace(/\/?$/, "/") + "__ROUTE__?v=__VERSION__"]); }
    if (cdnUrl) { tries.push(["cdn", cdnUrl]); }
    var failures = [];
    function next(i) {
      if (i >= tries.length) {
        api.error = failures.join("; ") || "no source to try";
        return Promise.reject(new Error(api.error));
      }
      return addScript(tries[i][1]).then(function () { api.source = tries[i][0]; },
                                         function (err) { failures.push(err.message); return next(i + 1); });
    }
    return next(0);
  };
  api.note = function (viewerId, text, isError) {
    var box = document.getElementById(viewerId);
    if (!box || !box.parentNode) { return; }
    var p = document.createElement("p");
    p.className = isError ? "abp-3dmol-error" : "abp-3dmol-note";
    p.style.cssText = isError ? "background:#ffe9c2;color:#222;padding:4px 6px;margin:4px 0;font-size:12px"
                              : "color:#666;font-size:11px;margin:2px 0";
    p.textContent = text;
    box.parentNode.insertBefore(p, box.nextSibling);
  };
  return api;
})();
"""

_STATUS_JS = r"""
(function () {
  var id = "3dmolviewer___UID__";
  $3Dmolpromise.then(function () {
    if (window.abp3Dmol.source === "cdn") {
      window.abp3Dmol.note(id, "3Dmol.js came from the internet (" + __CDN__ + "): __WHY__");
    }
  }, function (err) {
    window.$3Dmolpromise = undefined;   // let the next view try again
    window.abp3Dmol.note(id, "3D view unavailable: 3Dmol.js could not be loaded (" + err.message + "). __HOW__", true);
  });
})();
"""

_WHY_NO_LOCAL = ("this kernel has no local copy. Run `make install` (it fetches 3Dmol.js with npm) or set "
                 "$ABP_3DMOL_JS, and start JupyterLab with `make lab`.")
_WHY_NO_SERVER = ("this Jupyter server does not serve abp's local copy (server extension abp_core.jupyter_static: "
                  "`make lab`, or `jupyter server extension enable --sys-prefix abp_core.jupyter_static`); "
                  "or set ABP_3DMOL=inline.")
_HOW = ("Offline, start JupyterLab with `make lab` (its server serves the local copy), or set ABP_3DMOL=inline "
        "before running the notebook to embed 3Dmol.js in the outputs.")


def _js_string(text: str) -> str:
    return json.dumps(text).replace("</", "<\\/")


def notebook_html(fragment: str, uniqueid: str, cdn_url: str, mode: Optional[str] = None) -> str:
    """A py3Dmol view's HTML (``fragment``, from ``py3Dmol.view._make_html``) made to load 3Dmol.js as the
    module docstring says, for display in a notebook. ``uniqueid`` is the view's id; ``cdn_url`` the
    last resort (py3Dmol's URL, or an explicit ``js_url``). ``mode``: see :func:`notebook_mode` (``inline``
    without a local copy behaves as ``auto``)."""
    mode = mode or notebook_mode()
    local = local_3dmol_js()
    if not _PROMISE_RE.search(fragment):
        raise ValueError("not a py3Dmol view's HTML (no 3Dmol.js loader found)")
    parts: List[str] = []
    if mode == "inline" and local is not None:
        # CommonJS-looking locals keep the UMD bundle away from an AMD loader; it sets window.$3Dmol itself.
        code = local.read_text(encoding="utf-8").replace("</script", "<\\/script")
        parts.append("<script>if (typeof $3Dmol === 'undefined') { (function () { var exports = {}, module = {};\n"
                     + code + "\n})(); }</script>\n")
    parts.append("<script>" + _LOADER_JS.replace("__ROUTE__", SERVER_ROUTE).replace("__VERSION__", VERSION)
                 + "</script>\n")
    body = _PROMISE_RE.sub(lambda m: "$3Dmolpromise = window.abp3Dmol.load(%s);" % _js_string(cdn_url), fragment,
                           count=1)
    body = _WARN_RE.sub(lambda m: m.group(1) + _UNTRUSTED_TEXT + m.group(2), body, count=1)
    why = _WHY_NO_LOCAL if local is None else _WHY_NO_SERVER
    status = (_STATUS_JS.replace("__UID__", uniqueid).replace("__CDN__", _js_string(cdn_url))
              .replace("__WHY__", why.replace('"', "'")).replace("__HOW__", _HOW.replace('"', "'")))
    parts.append(body)
    parts.append("<script>" + status + "</script>\n")
    return "".join(parts)


def describe_source() -> str:
    """One line for logs and the README: which 3Dmol.js the notebooks will use on this machine."""
    local = local_3dmol_js()
    if local is None:
        return "3Dmol.js: no local copy (views fall back to the CDN); `make install` fetches one"
    return f"3Dmol.js: local copy {_html.escape(str(local))} (served by the Jupyter server extension abp_core.jupyter_static)"
