"""A Jupyter server extension that serves abp's local 3Dmol.js, so that 3D views render offline.

It adds one route, ``<base_url>abp/static/3Dmol-min.js`` (:data:`abp_core.threedmol.SERVER_ROUTE`),
serving :func:`abp_core.threedmol.local_3dmol_js` (the copy the install step fetched). Notebook views
(:func:`abp_core.threedmol.notebook_html`) load it from there: in a live kernel and in a saved
notebook opened later alike, in JupyterLab, Notebook 7 and the classic Notebook, with no internet.

Enabled by a config file ``<prefix>/etc/jupyter/jupyter_server_config.d/abp_core.json``: a non-editable
``pip install`` puts it there (``jupyter-config/`` in the repository, pyproject's data-files); for an
editable install (``make install``, Binder's ``postBuild``, ``conda env create``) run
``python -m abp_core.jupyter_static`` (:func:`enable`), which writes it into ``sys.prefix``. The file is public JavaScript, so the route needs no login,
like the server's own ``/static/`` files.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Optional, Union

from .threedmol import SERVER_ROUTE, local_3dmol_js

__all__ = ["enable", "CONFIG_NAME", "_jupyter_server_extension_points", "_load_jupyter_server_extension"]

#: The config file that enables this extension, under ``<prefix>/etc/jupyter/jupyter_server_config.d/``.
CONFIG_NAME = "abp_core.json"
_CONFIG = {"ServerApp": {"jpserver_extensions": {"abp_core.jupyter_static": True}}}


def _jupyter_server_extension_points():
    return [{"module": "abp_core.jupyter_static"}]


def _load_jupyter_server_extension(serverapp) -> None:
    from jupyter_server.utils import url_path_join
    from tornado import web

    js = local_3dmol_js()
    if js is None:
        serverapp.log.warning("abp: no local 3Dmol.js (run `make install` or `bash scripts/fetch_3dmol.sh`); "
                              "3D views will load it from the internet")
        return

    class ThreeDmolHandler(web.StaticFileHandler):
        """Serves exactly one file, whatever its name on disk (``$ABP_3DMOL_JS`` may name any file)."""

        def parse_url_path(self, url_path: str) -> str:
            return js.name

        def set_extra_headers(self, path: str) -> None:
            self.set_header("Content-Type", "text/javascript; charset=utf-8")

    route = url_path_join(serverapp.web_app.settings["base_url"], SERVER_ROUTE)
    serverapp.web_app.add_handlers(".*$", [(re.escape(route) + "()", ThreeDmolHandler, {"path": str(Path(js).parent)})])
    serverapp.log.info("abp: serving 3Dmol.js %s at %s", js, route)


def enable(prefix: Optional[Union[str, os.PathLike]] = None) -> Path:
    """Write the config file that enables the extension for the Jupyter servers of ``prefix`` (default:
    this Python's ``sys.prefix``), atomically; returns its path. (``jupyter server extension enable``
    refuses an extension that no config file names yet, hence this.)"""
    folder = Path(prefix or sys.prefix) / "etc" / "jupyter" / "jupyter_server_config.d"
    folder.mkdir(parents=True, exist_ok=True)
    from .files import write_text

    return write_text(folder / CONFIG_NAME, json.dumps(_CONFIG, indent=2) + "\n")


if __name__ == "__main__":
    print(f"abp: Jupyter server extension abp_core.jupyter_static enabled ({enable()}); "
          f"3Dmol.js: {local_3dmol_js() or 'no local copy (bash scripts/fetch_3dmol.sh)'}")
