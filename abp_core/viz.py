"""Views of what a readout attends to, next to orbital coefficients (py3Dmol and plotly).

The notebooks call these functions and hold no plotting logic themselves.

3D molecule views (py3Dmol / 3Dmol.js)
--------------------------------------
* :func:`attention_view` -- one molecule, ball-and-stick, every atom coloured by its weight on a
  colour scale (plotly's named colour scales, computed in Python: no matplotlib), sphere radius
  growing with the weight, optional labels ``"O2 0.41"`` (element, atom index, value).
* :func:`side_by_side` -- the same molecule in several linked panels (py3Dmol's grid viewer: rotate
  one, all follow), e.g. ABP attention | WA weights | GFN2-xTB HOMO shares, on ONE shared colour
  scale by default, with panel titles and a colour bar (HTML) around the grid.
* Both return a :class:`MoleculeView`, a :class:`py3Dmol.view` that also draws its title and
  legend: it renders in JupyterLab like any py3Dmol view and exports with :func:`save_html`. In a
  notebook it loads 3Dmol.js from the Jupyter server's local copy, offline (:mod:`abp_core.threedmol`;
  the CDN only as the last resort, with a note under the view).
* :func:`attention_view_html` / :func:`standalone_html` / :func:`save_html` -- a standalone HTML
  page. By default 3Dmol.js comes from py3Dmol's CDN URL (the page then needs internet). With
  ``js_url`` (a URL, a relative path, or a local file path that becomes a ``file://`` URL) it is
  loaded from there instead, and with ``inline_js=True`` the library itself is embedded, so the
  page works fully offline. A local copy: ``bash scripts/browser_deps.sh`` puts 3Dmol.js (npm
  package ``3dmol``, the version py3Dmol uses) in ``.cache/3dmol/``; :func:`local_3dmol_js`
  finds it (or the file named by ``$ABP_3DMOL_JS``).

Values on the atoms must be finite and non-negative (readout weights, orbital shares); the colour
scale runs from ``vmin`` (default 0) to ``vmax`` (default: the largest value shown).

Plotly figures
--------------
* :func:`atom_records` -- per-atom table (molecule, atom, element, coefficient, weight) from
  batched tensors; :func:`scatter_attention_vs_coefficients` plots it (one trace per element,
  hover: molecule id and atom index, plus the y = x line).
* :func:`learning_curves` (train/val loss against epoch, per readout) and :func:`mae_bar_chart`.
* :func:`save_figure` -- standalone HTML (plotly.js inline by default) and a PNG when kaleido is
  installed (otherwise the PNG is skipped with a logged note).
"""
from __future__ import annotations

import html as _html
import inspect
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import plotly.colors as pcolors
import plotly.graph_objects as go
import py3Dmol

from . import threedmol

__all__ = [
    "MoleculeView",
    "ViewInfo",
    "attention_view",
    "side_by_side",
    "attention_view_html",
    "standalone_html",
    "save_html",
    "local_3dmol_js",
    "DEFAULT_JS_URL",
    "weight_colors",
    "xyz_block",
    "atom_records",
    "scatter_attention_vs_coefficients",
    "learning_curves",
    "mae_bar_chart",
    "save_figure",
    "html_to_png",
    "find_chromium",
]

log = logging.getLogger(__name__)

#: The 3Dmol.js URL py3Dmol loads by default (its CDN, pinned to py3Dmol's version).
DEFAULT_JS_URL: str = inspect.signature(py3Dmol.view.__init__).parameters["js"].default
#: Where npm puts its copy of 3Dmol.js (``scripts/fetch_3dmol.sh``), relative to the repository.
LOCAL_JS_RELATIVE = threedmol.NPM_JS_RELATIVE

_REPO_ROOT = Path(__file__).resolve().parents[1]
_MARK_BEGIN, _MARK_END = "<!-- abp:3dmol-js -->", "<!-- /abp:3dmol-js -->"
_LOADER_RE = re.compile(r"loadScriptAsync\('([^']*)'\)")
_MAX_Z = 118

# Jmol-like element colours, darkened where they would vanish on white (H, C).
_ELEMENT_COLORS = {
    "H": "#8c8c8c", "C": "#303030", "N": "#2f55e0", "O": "#e0261b", "F": "#3fae2a", "Si": "#b08a5a",
    "P": "#ff8000", "S": "#c9a400", "Cl": "#1aa36b", "Br": "#a62929", "I": "#940094", "B": "#ff7f9f",
    "Li": "#cc80ff", "Na": "#ab5cf2", "Mg": "#8aff00", "Se": "#ffa100",
}


def _symbols() -> List[str]:
    from ase.data import chemical_symbols  # a dependency of the package; cheap to import

    return list(chemical_symbols)


# ----------------------------------------------------------------------------------------------
# input checks
# ----------------------------------------------------------------------------------------------
def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _check_molecule(z: Any, pos: Any) -> Tuple[np.ndarray, np.ndarray]:
    z_arr = _numpy(z)
    if z_arr.ndim != 1 or z_arr.size == 0:
        raise ValueError(f"z must be a non-empty 1-D array of atomic numbers, got shape {z_arr.shape}")
    if not np.issubdtype(z_arr.dtype, np.integer):
        if np.issubdtype(z_arr.dtype, np.floating) and np.all(z_arr == np.round(z_arr)):
            z_arr = z_arr.astype(np.int64)
        else:
            raise ValueError(f"z must hold integer atomic numbers, got dtype {z_arr.dtype}")
    if np.any((z_arr < 1) | (z_arr > _MAX_Z)):
        raise ValueError(f"atomic numbers must lie in 1..{_MAX_Z}, got {sorted(set(z_arr.tolist()))}")
    pos_arr = _numpy(pos).astype(np.float64)
    if pos_arr.shape != (z_arr.size, 3):
        raise ValueError(f"pos must have shape [{z_arr.size}, 3], got {pos_arr.shape}")
    if not np.all(np.isfinite(pos_arr)):
        raise ValueError("pos contains NaN or infinite coordinates")
    return z_arr.astype(np.int64), pos_arr


def _check_weights(weights: Any, n_atoms: int, name: str = "weights") -> np.ndarray:
    w = _numpy(weights)
    if w.ndim == 2 and w.shape[1] == 1:
        w = w[:, 0]
    try:
        w = w.astype(np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be numbers, got dtype {w.dtype}") from None
    if w.ndim != 1 or w.size != n_atoms:
        raise ValueError(f"{name} must have one value per atom ({n_atoms}), got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError(f"{name} contains NaN or infinite values")
    if np.any(w < 0):
        raise ValueError(f"{name} must be non-negative (readout weights, orbital shares); "
                         f"min is {w.min():.3g}")
    return w


# ----------------------------------------------------------------------------------------------
# colour scale (plotly's colour scales, interpolated here: no matplotlib)
# ----------------------------------------------------------------------------------------------
def _to_rgb(color: Any) -> Tuple[float, float, float]:
    if isinstance(color, (tuple, list)) and len(color) == 3:
        return tuple(float(v) for v in color)
    s = str(color).strip()
    if s.startswith("#"):
        return tuple(float(v) for v in pcolors.hex_to_rgb(s))
    if s.startswith("rgb"):
        return tuple(float(v) for v in pcolors.unlabel_rgb(s)[:3])
    raise ValueError(f"cannot read colour {color!r}: use '#rrggbb' or 'rgb(r, g, b)'")


def _colorscale(cmap: Any) -> List[Tuple[float, Tuple[float, float, float]]]:
    """``[(position, (r, g, b)), ...]`` from a plotly scale name (``"viridis"``, ``"plasma_r"``,
    ...), a list of colours (evenly spaced) or a list of ``[position, colour]`` pairs."""
    if isinstance(cmap, str):
        try:
            scale = pcolors.get_colorscale(cmap)
        except Exception as err:  # plotly raises PlotlyError
            raise ValueError(f"unknown colour scale {cmap!r}: {err}") from None
    else:
        scale = list(cmap)
        if len(scale) < 2:
            raise ValueError("a colour scale needs at least two colours")
        if not all(isinstance(s, (list, tuple)) and len(s) == 2 and not isinstance(s[1], (int, float))
                   for s in scale):
            scale = [[i / (len(scale) - 1), c] for i, c in enumerate(scale)]
    out = [(float(p), _to_rgb(c)) for p, c in scale]
    if out[0][0] != 0.0 or out[-1][0] != 1.0 or any(b[0] < a[0] for a, b in zip(out, out[1:])):
        raise ValueError("colour scale positions must rise from 0 to 1")
    return out


def _hex(rgb: Sequence[float]) -> str:
    return "#%02x%02x%02x" % tuple(int(round(min(255.0, max(0.0, v)))) for v in rgb)


def _sample(scale, t: np.ndarray) -> List[str]:
    pos = np.array([p for p, _ in scale])
    rgb = np.array([c for _, c in scale])
    channels = [np.interp(t, pos, rgb[:, k]) for k in range(3)]
    return [_hex(c) for c in zip(*channels)]


def _value_range(arrays: Iterable[np.ndarray], vmin: float, vmax: Optional[float]) -> Tuple[float, float]:
    vmin = float(vmin)
    if vmax is None:
        vmax = max(float(a.max()) for a in arrays)
        if vmax <= vmin:  # e.g. all weights 0: every atom gets the bottom colour
            vmax = vmin + 1.0
    elif float(vmax) <= vmin:
        raise ValueError(f"vmax ({vmax}) must be larger than vmin ({vmin})")
    return vmin, float(vmax)


def _normalise(values: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    return np.clip((values - vmin) / (vmax - vmin), 0.0, 1.0)


def weight_colors(values: Any, cmap: Any = "viridis", vmin: float = 0.0, vmax: Optional[float] = None) -> List[str]:
    """Hex colour (``"#rrggbb"``) of each value on the colour scale ``cmap`` from ``vmin`` to
    ``vmax`` (default: the largest value). Values outside the range take the end colours."""
    v = _numpy(values).astype(np.float64).ravel()
    if not np.all(np.isfinite(v)):
        raise ValueError("values contain NaN or infinite entries")
    lo, hi = _value_range([v], vmin, vmax)
    return _sample(_colorscale(cmap), _normalise(v, lo, hi))


def _gradient_css(scale, steps: int = 16) -> str:
    t = np.linspace(0.0, 1.0, steps)
    cols = _sample(scale, t)
    return "linear-gradient(to right, " + ", ".join(f"{c} {100 * x:.1f}%" for c, x in zip(cols, t)) + ")"


# ----------------------------------------------------------------------------------------------
# molecule views
# ----------------------------------------------------------------------------------------------
def xyz_block(z: Any, pos: Any, comment: str = "") -> str:
    """XYZ text (Angstrom) of one molecule; 3Dmol.js assigns the bonds from distances."""
    z_arr, pos_arr = _check_molecule(z, pos)
    sym = _symbols()
    lines = [str(z_arr.size), comment.replace("\n", " ")]
    lines += [f"{sym[a]:<2s} {x:12.6f} {y:12.6f} {w:12.6f}" for a, (x, y, w) in zip(z_arr, pos_arr)]
    return "\n".join(lines) + "\n"


@dataclass
class ViewInfo:
    """What a :class:`MoleculeView` shows (for tests and for building legends elsewhere)."""

    title: Optional[str]
    panels: List[str]
    values: Dict[str, np.ndarray]
    colors: Dict[str, List[str]]
    radii: Dict[str, np.ndarray]
    ranges: Dict[str, Tuple[float, float]]
    cmap: Any
    shared_scale: bool
    symbols: List[str] = field(default_factory=list)


class MoleculeView(py3Dmol.view):
    """A :class:`py3Dmol.view` with an HTML header (title, panel titles) and a colour-bar legend.

    It displays in JupyterLab/Notebook like any py3Dmol view (the header and legend are part of
    its HTML), ``.write_html(path)`` works as in py3Dmol, and :func:`save_html` writes a clean
    standalone page (optionally with a local or inlined 3Dmol.js). ``.abp`` holds a
    :class:`ViewInfo` (values, per-atom colours and radii, colour ranges).
    """

    def __init__(self, *, width: int, height: int, viewergrid: Optional[Tuple[int, int]] = None,
                 js_url: Optional[str] = None, header: str = "", footer: str = "",
                 info: Optional[ViewInfo] = None):
        super().__init__(width=width, height=height, viewergrid=viewergrid, js=js_url or DEFAULT_JS_URL)
        self._abp_header, self._abp_footer = header, footer
        self._abp_js_url = js_url or DEFAULT_JS_URL
        self.abp = info

    def _page_html(self) -> str:
        """The view as py3Dmol writes it (3Dmol.js from ``js_url``, default its CDN), with header and legend:
        the fragment :func:`standalone_html` turns into a page."""
        inner = super()._make_html()
        return (f'<div class="abp-view" style="display:inline-block;font-family:sans-serif;color:#222">\n'
                f"{self._abp_header}{inner}{self._abp_footer}</div>\n")

    def _make_html(self) -> str:
        """The view for notebook display (``show()``, rich display): 3Dmol.js from the page, the Jupyter
        server's local copy, or the CDN as the last resort, with a visible note (:mod:`abp_core.threedmol`)."""
        return threedmol.notebook_html(self._page_html(), self.uniqueid, self._abp_js_url)

    def to_html(self, js_url: Optional[str] = None, inline_js: bool = False, title: Optional[str] = None) -> str:
        """Standalone HTML page of this view (see :func:`standalone_html`)."""
        return standalone_html(self, js_url=js_url, inline_js=inline_js, title=title)


def _labels_for(values: np.ndarray, labels: Union[bool, int]) -> np.ndarray:
    if labels is True:
        return np.arange(values.size)
    if labels is False or labels is None:
        return np.arange(0)
    k = int(labels)
    if k < 0:
        raise ValueError(f"labels must be True, False or a number of atoms >= 0, got {labels}")
    return np.argsort(-values, kind="stable")[:k]


def _draw(view: py3Dmol.view, xyz: str, symbols: List[str], pos: np.ndarray, values: np.ndarray,
          colors: List[str], radii: np.ndarray, *, labels: Union[bool, int], stick_radius: float,
          viewer: Optional[Tuple[int, int]], label_format: str) -> None:
    kw = {} if viewer is None else {"viewer": viewer}
    view.addModel(xyz, "xyz", **kw)
    for i, (col, rad) in enumerate(zip(colors, radii)):
        view.setStyle({"index": i}, {"stick": {"radius": stick_radius, "color": col},
                                     "sphere": {"radius": float(rad), "color": col}}, **kw)
    for i in _labels_for(values, labels):
        text = f"{symbols[i]}{i} {format(values[i], label_format)}"
        x, y, z = (float(v) for v in pos[i])
        view.addLabel(text, {"position": {"x": x, "y": y, "z": z}, "fontSize": 11, "fontColor": "black",
                             "backgroundColor": "white", "backgroundOpacity": 0.65, "borderThickness": 0,
                             "inFront": True, "alignment": "bottomLeft"}, **kw)


def _fit_zoom(pos: np.ndarray, radius: float, labels: bool) -> float:
    """Zoom factor that makes the molecule fill its viewer after 3Dmol's ``zoomTo()``.

    ``zoomTo`` fits a sphere of radius ``max(R, 5 A)`` around the atoms' centroid (R: distance of
    the farthest atom), so small molecules come out small and atoms at the rim stick out. We
    fit ``R + radius (+ room for a label)`` instead.
    """
    r = float(np.sqrt(((pos - pos.mean(0)) ** 2).sum(1).max()))
    needed = r + radius + (0.8 if labels else 0.3)
    return max(r, 5.0) / needed


def _colorbar_html(scale, vmin: float, vmax: float, label: str, width: int) -> str:
    bar_w = max(80, min(260, width - 120))
    return (f'<div class="abp-colorbar" style="display:flex;align-items:center;justify-content:center;'
            f'gap:6px;font-size:12px;margin:4px 0;width:{width}px">'
            f'<span>{_html.escape(label)}</span>'
            f'<span class="abp-vmin">{vmin:.3g}</span>'
            f'<span style="display:inline-block;width:{bar_w}px;height:12px;border:1px solid #999;'
            f'background:{_gradient_css(scale)}"></span>'
            f'<span class="abp-vmax">{vmax:.3g}</span></div>\n')


def _prepare_panels(z, pos, panels: Mapping[str, Any], cmap, vmin, vmax, shared_scale, radius_range):
    z_arr, pos_arr = _check_molecule(z, pos)
    if not isinstance(panels, Mapping) or len(panels) == 0:
        raise ValueError("panels must be a non-empty dict {title: per-atom values}")
    values = {str(k): _check_weights(v, z_arr.size, f"panel {k!r}") for k, v in panels.items()}
    if len(values) != len(panels):
        raise ValueError("panel titles must be distinct")
    scale = _colorscale(cmap)
    r0, r1 = (float(r) for r in radius_range)
    if not 0 < r0 <= r1:
        raise ValueError(f"radius_range must be 0 < min <= max, got {radius_range}")
    if shared_scale:
        rng = _value_range(values.values(), vmin, vmax)
        ranges = {k: rng for k in values}
    else:
        ranges = {k: _value_range([v], vmin, vmax) for k, v in values.items()}
    colors, radii = {}, {}
    for k, v in values.items():
        t = _normalise(v, *ranges[k])
        colors[k] = _sample(scale, t)
        radii[k] = r0 + (r1 - r0) * t
    sym = _symbols()
    symbols = [sym[a] for a in z_arr]
    return z_arr, pos_arr, values, scale, ranges, colors, radii, symbols


def attention_view(z: Any, pos: Any, weights: Any, *, title: Optional[str] = None, cmap: Any = "viridis",
                   vmin: float = 0.0, vmax: Optional[float] = None, width: int = 420, height: int = 360,
                   labels: Union[bool, int] = True, label_format: str = ".2f",
                   radius_range: Tuple[float, float] = (0.22, 0.55), stick_radius: float = 0.12,
                   value_label: str = "weight", js_url: Optional[str] = None) -> MoleculeView:
    """Ball-and-stick view of one molecule with every atom coloured (and sized) by its weight.

    Args:
        z: atomic numbers ``[n_atoms]``.
        pos: positions in Angstrom ``[n_atoms, 3]``.
        weights: non-negative per-atom values ``[n_atoms]`` (readout weights, orbital shares).
        title: shown above the molecule.
        cmap: plotly colour scale name (``"viridis"``, ``"plasma"``, ``"cividis"``, ``"blues"``,
            ``"viridis_r"``, ...), a list of colours or of ``[position, colour]`` pairs.
        vmin, vmax: ends of the colour scale (default ``0`` and the largest weight).
        width, height: size of the viewer in pixels.
        labels: ``True`` labels every atom (``"C1 0.12"``), ``False`` none, an int ``k`` the k
            atoms with the largest weights.
        label_format: format spec of the value in labels.
        radius_range: sphere radius (Angstrom) at ``vmin`` and at ``vmax``.
        stick_radius: bond radius (Angstrom).
        value_label: name of the value in the colour bar.
        js_url: 3Dmol.js URL for notebook display (default: py3Dmol's CDN).

    Raises:
        ValueError: wrong shapes, NaN/inf or negative weights, bad atomic numbers.
    """
    name = title or value_label
    z_arr, pos_arr, values, scale, ranges, colors, radii, symbols = _prepare_panels(
        z, pos, {name: weights}, cmap, vmin, vmax, True, radius_range)
    lo, hi = ranges[name]
    header = (f'<div class="abp-title" style="font-weight:bold;text-align:center;width:{width}px;'
              f'margin:2px 0">{_html.escape(title)}</div>\n') if title else ""
    footer = _colorbar_html(scale, lo, hi, value_label, width)
    info = ViewInfo(title=title, panels=[name], values=values, colors=colors, radii=radii, ranges=ranges,
                    cmap=cmap, shared_scale=True, symbols=symbols)
    view = MoleculeView(width=width, height=height, js_url=js_url, header=header, footer=footer, info=info)
    _draw(view, xyz_block(z_arr, pos_arr, title or ""), symbols, pos_arr, values[name], colors[name], radii[name],
          labels=labels, stick_radius=stick_radius, viewer=None, label_format=label_format)
    view.zoomTo()
    view.zoom(_fit_zoom(pos_arr, float(radius_range[1]), bool(labels)))
    return view


def side_by_side(z: Any, pos: Any, panels: Mapping[str, Any], shared_scale: bool = True, *,
                 title: Optional[str] = None, cmap: Any = "viridis", vmin: float = 0.0,
                 vmax: Optional[float] = None, panel_width: int = 360, height: int = 340,
                 labels: Union[bool, int] = True, label_format: str = ".2f",
                 radius_range: Tuple[float, float] = (0.22, 0.55), stick_radius: float = 0.12,
                 value_label: str = "weight / coefficient", linked: bool = True,
                 js_url: Optional[str] = None) -> MoleculeView:
    """One molecule in ``len(panels)`` linked panels, each coloured by its own per-atom values.

    ``panels`` maps a panel title to per-atom values, e.g.
    ``{"ABP attention": w_abp, "GFN2-xTB HOMO": homo_coeff}``. With ``shared_scale=True``
    (default) all panels use ONE colour scale from ``vmin`` to ``vmax`` (default: the largest
    value over all panels), so equal colours mean equal values across panels; with ``False`` each
    panel spans its own range and gets its own colour bar. Panels rotate together
    (``linked=True``). Other arguments as in :func:`attention_view` (``panel_width`` is per
    panel).
    """
    z_arr, pos_arr, values, scale, ranges, colors, radii, symbols = _prepare_panels(
        z, pos, panels, cmap, vmin, vmax, shared_scale, radius_range)
    names = list(values)
    n = len(names)
    width = panel_width * n
    head = []
    if title:
        head.append(f'<div class="abp-title" style="font-weight:bold;text-align:center;width:{width}px;'
                    f'margin:2px 0">{_html.escape(title)}</div>')
    head.append(f'<div style="display:flex;width:{width}px">' + "".join(
        f'<div class="abp-panel-title" style="width:{panel_width}px;text-align:center;font-size:13px">'
        f'{_html.escape(k)}</div>' for k in names) + "</div>")
    if shared_scale:
        lo, hi = ranges[names[0]]
        footer = _colorbar_html(scale, lo, hi, value_label + " (shared scale)", width)
    else:
        footer = (f'<div style="display:flex;width:{width}px">'
                  + "".join(_colorbar_html(scale, *ranges[k], "", panel_width) for k in names) + "</div>\n")
    info = ViewInfo(title=title, panels=names, values=values, colors=colors, radii=radii, ranges=ranges,
                    cmap=cmap, shared_scale=shared_scale, symbols=symbols)
    view = MoleculeView(width=width, height=height, viewergrid=(1, n), js_url=js_url,
                        header="\n".join(head) + "\n", footer=footer, info=info)
    if not linked:  # py3Dmol links the grid by default; rebuild its grid call unlinked
        view.startjs = view.startjs.replace("control_all: true", "control_all: false")
    xyz = xyz_block(z_arr, pos_arr, title or "")
    for c, k in enumerate(names):
        _draw(view, xyz, symbols, pos_arr, values[k], colors[k], radii[k], labels=labels,
              stick_radius=stick_radius, viewer=(0, c), label_format=label_format)
    view.zoomTo()
    view.zoom(_fit_zoom(pos_arr, float(radius_range[1]), bool(labels)))
    return view


# ----------------------------------------------------------------------------------------------
# standalone HTML
# ----------------------------------------------------------------------------------------------
def local_3dmol_js() -> Optional[Path]:
    """A local copy of 3Dmol.js: ``$ABP_3DMOL_JS``, else the package data copy ``abp_core/static/3dmol/``
    (fetched by ``make install``), else ``.cache/3dmol/...``; None if there is none
    (:func:`abp_core.threedmol.local_3dmol_js`)."""
    return threedmol.local_3dmol_js()


def _as_url(js: Union[str, os.PathLike]) -> str:
    if isinstance(js, os.PathLike):
        return Path(js).resolve().as_uri()
    s = str(js)
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", s) and not re.match(r"^[a-zA-Z]:[\\/]", s):
        return s  # has a scheme: http(s)://, file://, data:
    if os.path.isabs(s):
        return Path(s).resolve().as_uri()
    return s  # relative URL, resolved against the HTML file's location


def _read_js(js: Optional[Union[str, os.PathLike]]) -> str:
    if js is None:
        path = local_3dmol_js()
        if path is None:
            raise FileNotFoundError("inline_js=True needs a local 3Dmol.js: run `bash scripts/browser_deps.sh` "
                                    f"(puts it in {LOCAL_JS_RELATIVE}), set $ABP_3DMOL_JS, or pass js_url=<file>")
    else:
        s = str(js)
        if s.startswith("file://"):
            from urllib.parse import unquote, urlparse

            s = unquote(urlparse(s).path)
        elif re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", s):
            raise ValueError(f"inline_js=True needs a local file, not the URL {s!r}")
        path = Path(s)
    if not path.is_file():
        raise FileNotFoundError(f"3Dmol.js not found at {path}")
    return path.read_text(encoding="utf-8")


def standalone_html(view_or_html: Union[py3Dmol.view, str], *, js_url: Optional[Union[str, os.PathLike]] = None,
                    inline_js: bool = False, title: Optional[str] = None) -> str:
    """A complete HTML page showing a py3Dmol view.

    Args:
        view_or_html: a :class:`py3Dmol.view` (e.g. from :func:`attention_view`), the HTML
            fragment of one (``view._make_html()``), or a page made by this function.
        js_url: where the page loads 3Dmol.js from. Default: the view's own URL (py3Dmol's
            CDN, needs internet). A local path becomes a ``file://`` URL; a relative string
            stays relative to the HTML file.
        inline_js: embed 3Dmol.js in the page (from ``js_url`` if it is a local file, else from
            :func:`local_3dmol_js`): one self-contained, offline file (~540 kB more).
        title: the page's ``<title>`` (default: the view's title).

    With ``js_url`` or ``inline_js`` the page loads 3Dmol.js synchronously before the viewer
    script and no other script URL remains in it.
    """
    if isinstance(view_or_html, py3Dmol.view):
        body = view_or_html._page_html() if isinstance(view_or_html, MoleculeView) else view_or_html._make_html()
        info = getattr(view_or_html, "__dict__", {}).get("abp")
        title = title or (info.title if info is not None and info.title else None)
    elif isinstance(view_or_html, str):
        body = view_or_html
    else:
        raise TypeError(f"expected a py3Dmol.view or an HTML string, got {type(view_or_html).__name__}")
    is_page = re.search(r"<html[\s>]", body, re.IGNORECASE) is not None
    if "3dmolviewer_" not in body:
        raise ValueError("the HTML holds no py3Dmol viewer")
    if js_url is not None or inline_js:
        if inline_js:
            code = _read_js(js_url).replace("</script", "<\\/script")
            tag, loader = f"<script>\n{code}\n</script>", ""
        else:
            url = _as_url(js_url)
            tag, loader = f'<script src="{_html.escape(url, quote=True)}"></script>', url
        # 3Dmol.js is loaded before the viewer's script, which then never calls its own loader
        # (it only loads when $3Dmolpromise is undefined); the loader's URL is replaced as well.
        pre = f"{_MARK_BEGIN}\n{tag}\n<script>var $3Dmolpromise = Promise.resolve();</script>\n{_MARK_END}\n"
        body = re.sub(re.escape(_MARK_BEGIN) + ".*?" + re.escape(_MARK_END) + r"\n?", "", body, flags=re.DOTALL)
        body = _LOADER_RE.sub(lambda m: "loadScriptAsync('%s')" % loader.replace("'", "%27"), body)
        anchor = re.search(r'<div class="abp-view"|<div id="3dmolviewer_', body)
        body = body[:anchor.start()] + pre + body[anchor.start():]
    if is_page:
        return body
    page_title = _html.escape(title or "abp molecule view")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{page_title}</title>\n</head>\n"
            "<body style=\"margin:8px;font-family:sans-serif;background:white\">\n"
            f"{body}</body>\n</html>\n")


def attention_view_html(z: Any, pos: Any, weights: Any, title: Optional[str] = None,
                        js_url: Optional[Union[str, os.PathLike]] = None, inline_js: bool = False,
                        **view_kwargs) -> str:
    """Standalone HTML page of :func:`attention_view` (see :func:`standalone_html`)."""
    view = attention_view(z, pos, weights, title=title, **view_kwargs)
    return standalone_html(view, js_url=js_url, inline_js=inline_js, title=title)


def save_html(view_or_html: Union[py3Dmol.view, str], path: Union[str, os.PathLike],
              js_url: Optional[Union[str, os.PathLike]] = None, inline_js: bool = False,
              title: Optional[str] = None) -> Path:
    """Write :func:`standalone_html` of a view (or of its HTML) to ``path``; returns the path."""
    from .files import write_text

    return write_text(path, standalone_html(view_or_html, js_url=js_url, inline_js=inline_js, title=title))


# ----------------------------------------------------------------------------------------------
# plotly figures
# ----------------------------------------------------------------------------------------------
def atom_records(z: Any, weights: Any, coefficients: Any, batch: Any = None,
                 mol_ids: Optional[Sequence] = None) -> pd.DataFrame:
    """Per-atom table ``molecule, atom, z, element, coefficient, weight`` from batched arrays.

    ``batch`` is the sorted molecule index of each atom (default: one molecule); ``atom`` is the
    index within its molecule; ``mol_ids`` optionally names the molecules (in batch order).
    """
    z_arr = _numpy(z).astype(np.int64)
    n = z_arr.size
    w = _check_weights(weights, n, "weights")
    c = _check_weights(coefficients, n, "coefficients")
    b = np.zeros(n, dtype=np.int64) if batch is None else _numpy(batch).astype(np.int64)
    if b.shape != (n,):
        raise ValueError(f"batch must have one entry per atom ({n}), got shape {b.shape}")
    if n > 1 and np.any(b[1:] < b[:-1]):
        raise ValueError("batch must be sorted (atoms of one molecule contiguous)")
    starts = np.flatnonzero(np.r_[True, b[1:] != b[:-1]])
    seg = np.cumsum(np.r_[True, b[1:] != b[:-1]]) - 1
    atom = np.arange(n) - starts[seg]
    molecule = b
    if mol_ids is not None:
        ids = np.asarray(list(mol_ids), dtype=object)
        if ids.size != starts.size:
            raise ValueError(f"mol_ids has {ids.size} entries for {starts.size} molecules")
        molecule = ids[seg]
    sym = _symbols()
    if np.any((z_arr < 1) | (z_arr > _MAX_Z)):
        raise ValueError("atomic numbers must lie in 1..118")
    return pd.DataFrame({"molecule": molecule, "atom": atom, "z": z_arr, "element": [sym[a] for a in z_arr],
                         "coefficient": c, "weight": w})


def _records_frame(records: Any) -> pd.DataFrame:
    if isinstance(records, pd.DataFrame):
        df = records.copy()
    else:
        parts = []
        for k, rec in enumerate(records):
            mol_id = rec.get("id", rec.get("molecule", k))
            weights = rec.get("weights", rec.get("weight"))
            coeffs = rec.get("coefficients", rec.get("coefficient"))
            if weights is None or coeffs is None or "z" not in rec:
                raise ValueError("each record needs 'z', 'weights' and 'coefficients' (and optionally 'id')")
            parts.append(atom_records(rec["z"], weights, coeffs, mol_ids=[mol_id]))
        if not parts:
            raise ValueError("no records")
        df = pd.concat(parts, ignore_index=True)
    need = {"coefficient", "weight"}
    if not need <= set(df.columns):
        raise ValueError(f"records need the columns {sorted(need)} (see atom_records), got {list(df.columns)}")
    if "element" not in df.columns:
        if "z" not in df.columns:
            raise ValueError("records need an 'element' or a 'z' column")
        sym = _symbols()
        df["element"] = [sym[int(a)] for a in df["z"]]
    for col in ("molecule", "atom"):
        if col not in df.columns:
            df[col] = np.arange(len(df)) if col == "atom" else 0
    vals = df[["coefficient", "weight"]].to_numpy(dtype=float)
    if len(df) == 0:
        raise ValueError("no atoms in records")
    if not np.all(np.isfinite(vals)):
        raise ValueError("records contain NaN or infinite coefficients/weights")
    return df


def _element_order(df: pd.DataFrame) -> List[str]:
    sym = _symbols()
    index = {s: i for i, s in enumerate(sym)}
    return sorted(df["element"].astype(str).unique(), key=lambda s: index.get(s, 1000))


def scatter_attention_vs_coefficients(records: Any, *, title: Optional[str] = None,
                                      x_label: str = "orbital coefficient (share on atom)",
                                      y_label: str = "readout attention weight",
                                      marker_size: int = 6, opacity: float = 0.7) -> go.Figure:
    """Per-atom scatter: x = orbital coefficient, y = readout weight, one trace per element.

    ``records`` is a per-atom DataFrame (:func:`atom_records`; columns ``coefficient``,
    ``weight``, ``element`` or ``z``, optionally ``molecule`` and ``atom``), or an iterable of
    per-molecule dicts ``{"id", "z", "weights", "coefficients"}``. Hovering a point shows its
    molecule id and atom index. The last trace is the dashed ``y = x`` line.
    """
    df = _records_frame(records)
    fig = go.Figure()
    scatter_cls = go.Scattergl if len(df) > 20000 else go.Scatter
    fallback = iter(pcolors.qualitative.Plotly * 20)
    for el in _element_order(df):
        sub = df[df["element"].astype(str) == el]
        color = _ELEMENT_COLORS.get(el) or next(fallback)
        custom = np.column_stack([sub["molecule"].astype(str), sub["atom"].astype(int), sub["element"].astype(str)])
        fig.add_trace(scatter_cls(
            x=sub["coefficient"].to_numpy(float), y=sub["weight"].to_numpy(float), mode="markers", name=el,
            marker=dict(color=color, size=marker_size, opacity=opacity), customdata=custom,
            hovertemplate=("molecule %{customdata[0]}<br>atom %{customdata[1]} (%{customdata[2]})"
                           "<br>coefficient %{x:.3f}<br>weight %{y:.3f}<extra></extra>")))
    top = float(max(df["coefficient"].max(), df["weight"].max(), 1e-9)) * 1.02
    fig.add_trace(go.Scatter(x=[0.0, top], y=[0.0, top], mode="lines", name="y = x",
                             line=dict(color="#777", dash="dash", width=1), hoverinfo="skip"))
    fig.update_layout(title=title, xaxis_title=x_label, yaxis_title=y_label, template="plotly_white",
                      legend_title_text="element", width=620, height=520)
    lo = -0.02 * top  # a little room so points at 0 are not cut by the axes
    fig.update_xaxes(range=[lo, top], constrain="domain")
    fig.update_yaxes(range=[lo, top], scaleanchor="x", scaleratio=1, constrain="domain")
    return fig


def _history_frames(history: Any) -> Dict[str, pd.DataFrame]:
    if isinstance(history, pd.DataFrame):
        if "readout" in history.columns:
            return {str(k): g.drop(columns="readout") for k, g in history.groupby("readout", sort=False)}
        return {"": history}
    if isinstance(history, Mapping):
        out = {}
        for k, v in history.items():
            out[str(k)] = v if isinstance(v, pd.DataFrame) else pd.DataFrame(v)
        if not out:
            raise ValueError("history is empty")
        return out
    raise TypeError("history must be a DataFrame (optionally with a 'readout' column) or a dict of DataFrames")


def learning_curves(history: Any, *, metrics: Optional[Sequence[str]] = None, log_y: bool = False,
                    title: Optional[str] = None, y_label: str = "loss") -> go.Figure:
    """Loss against epoch: one trace per (readout, metric); train solid, validation dashed.

    ``history`` is a DataFrame with an ``epoch`` column (else the row number is the epoch), the
    metric columns and optionally ``readout``; or a dict ``{readout: DataFrame}``. ``metrics``
    defaults to ``train_loss``/``val_loss`` when present, else every numeric ``train*``/``val*``
    column. Rows where a metric is NaN (e.g. validation every k epochs) are skipped for it.
    """
    frames = _history_frames(history)
    palette = pcolors.qualitative.Plotly
    fig = go.Figure()
    for i, (name, df) in enumerate(frames.items()):
        if metrics is None:
            cols = [c for c in ("train_loss", "val_loss") if c in df.columns] or [
                c for c in df.columns if str(c).startswith(("train", "val")) and pd.api.types.is_numeric_dtype(df[c])]
        else:
            cols = list(metrics)
            missing = [c for c in cols if c not in df.columns]
            if missing:
                raise ValueError(f"history{' of ' + name if name else ''} lacks the columns {missing}")
        if not cols:
            raise ValueError(f"no train*/val* columns in history{' of ' + name if name else ''}: {list(df.columns)}")
        epoch = df["epoch"].to_numpy() if "epoch" in df.columns else np.arange(len(df))
        for col in cols:
            y = df[col].to_numpy(dtype=float)
            ok = np.isfinite(y)
            label = f"{name} {col}".strip()
            fig.add_trace(go.Scatter(x=epoch[ok], y=y[ok], mode="lines+markers" if ok.sum() < 30 else "lines",
                                     name=label, legendgroup=name,
                                     line=dict(color=palette[i % len(palette)],
                                               dash="dash" if str(col).startswith("val") else "solid")))
    fig.update_layout(title=title, xaxis_title="epoch", yaxis_title=y_label, template="plotly_white",
                      width=720, height=440)
    if log_y:
        fig.update_yaxes(type="log")
    return fig


def mae_bar_chart(results: Any, *, x: str = "readout", y: str = "mae", error: Optional[str] = None,
                  color: Optional[str] = None, title: Optional[str] = None, y_label: str = "test MAE") -> go.Figure:
    """Bar chart of a results table (e.g. test MAE per readout), optional error bars and groups.

    ``results`` is a DataFrame with columns ``x`` and ``y`` (and ``error``, e.g. a std or CI
    half-width, and ``color``, e.g. the backbone or target: one trace per group), or a dict
    ``{readout: mae}`` / ``{readout: (mae, error)}``. A summary from
    :func:`abp_core.stats.summarize` works as is: without a ``mae`` column, ``mae_mean`` is
    plotted with ``mae_std`` as error bars.
    """
    if isinstance(results, Mapping):
        rows = []
        for k, v in results.items():
            if isinstance(v, (tuple, list)):
                rows.append({x: k, y: float(v[0]), "error": float(v[1])})
            else:
                rows.append({x: k, y: float(v)})
        df = pd.DataFrame(rows)
        if error is None and "error" in df.columns:
            error = "error"
    elif isinstance(results, pd.DataFrame):
        df = results
    else:
        raise TypeError("results must be a DataFrame or a dict {readout: mae or (mae, error)}")
    if y not in df.columns and f"{y}_mean" in df.columns:   # abp_core.stats.summarize layout
        if error is None and f"{y}_std" in df.columns:
            error = f"{y}_std"
        y = f"{y}_mean"
    for col in [x, y] + [c for c in (error, color) if c]:
        if col not in df.columns:
            raise ValueError(f"results lack the column {col!r}: {list(df.columns)}")
    if len(df) == 0:
        raise ValueError("results are empty")
    groups = [(None, df)] if color is None else list(df.groupby(color, sort=False))
    palette = pcolors.qualitative.Plotly
    fig = go.Figure()
    for i, (g, sub) in enumerate(groups):
        fig.add_trace(go.Bar(
            x=sub[x].astype(str), y=sub[y].to_numpy(float), name=str(g) if g is not None else y,
            marker_color=palette[i % len(palette)],
            error_y=dict(type="data", array=sub[error].to_numpy(float), visible=True) if error else None))
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y_label, template="plotly_white", barmode="group",
                      showlegend=color is not None, width=640, height=420)
    return fig


def save_figure(fig: go.Figure, path: Union[str, os.PathLike], *, include_plotlyjs: Union[bool, str] = True,
                png: bool = True, scale: float = 2.0) -> Dict[str, Optional[Path]]:
    """Write ``fig`` as standalone HTML (``path`` with suffix ``.html``) and, if kaleido is
    installed and works, as PNG beside it.

    ``include_plotlyjs=True`` embeds plotly.js (~4.6 MB, offline); ``"directory"`` writes
    ``plotly.min.js`` once beside the HTML files; ``"cdn"`` links it. Returns
    ``{"html": path, "png": path or None}``; a skipped PNG is logged (INFO), never raised.
    """
    out = Path(path)
    html_path = out.with_suffix(".html")
    from .files import atomic_path

    with atomic_path(html_path) as tmp:  # "directory" puts plotly.min.js beside it, in the same folder
        fig.write_html(str(tmp), include_plotlyjs=include_plotlyjs, full_html=True)
    png_path = None
    if png:
        try:
            import kaleido  # noqa: F401
        except ImportError:
            log.info("PNG of %s skipped: kaleido is not installed (pip install kaleido)", html_path.name)
        else:
            try:
                with atomic_path(out.with_suffix(".png")) as tmp:
                    fig.write_image(str(tmp), scale=scale)
                png_path = out.with_suffix(".png")
            except Exception as err:  # kaleido present but unusable (e.g. no browser for kaleido>=1)
                log.warning("PNG of %s skipped: kaleido failed (%s)", html_path.name, err)
        if png_path is None:  # no (working) kaleido: screenshot the HTML with headless Chromium
            png_path = html_to_png(html_path, out.with_suffix(".png"),
                                   size=(int(fig.layout.width or 760), int(fig.layout.height or 520)))
    return {"html": html_path, "png": png_path}


def find_chromium() -> Optional[str]:
    """A headless-capable Chromium (``$CHROMIUM``, ``/usr/bin/chromium``, or on the PATH), else None."""
    import shutil

    for cand in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                 shutil.which("chromium-browser"), shutil.which("google-chrome")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def html_to_png(html_path: Union[str, os.PathLike], png_path: Union[str, os.PathLike],
                size: Tuple[int, int] = (900, 600), timeout: float = 120.0) -> Optional[Path]:
    """Screenshot a local HTML page with headless Chromium (software WebGL, no network).

    Returns the PNG path, or None (logged) when Chromium is missing or fails.
    """
    import subprocess
    import tempfile

    chromium = find_chromium()
    if chromium is None:
        log.info("PNG of %s skipped: no Chromium found (bash scripts/browser_deps.sh installs it)", html_path)
        return None
    from .files import atomic_path

    html_path, png_path = Path(html_path).resolve(), Path(png_path).resolve()
    try:
        with tempfile.TemporaryDirectory(prefix="abp-chromium-") as profile, atomic_path(png_path) as shot:
            args = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--host-resolver-rules=MAP * ~NOTFOUND",
                    "--hide-scrollbars", f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}",
                    "--virtual-time-budget=8000", f"--screenshot={shot}", html_path.as_uri()]
            proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
            if proc.returncode != 0 or shot.stat().st_size == 0:  # nothing is moved into place
                raise ChildProcessError(f"exited with {proc.returncode}")
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("PNG of %s skipped: Chromium failed (%s)", html_path.name, exc)
        return None
    return png_path
