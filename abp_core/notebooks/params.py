"""Notebook parameters: typed values from the parameters cell, and smoke mode.

Every notebook starts with a papermill ``parameters`` cell of *annotated* assignments, followed by::

    import abp_core.notebooks as nb
    P = nb.parameters(globals(), smoke_overrides={"epochs": 1, "n_molecules": 300})

:func:`parameters` checks every annotated parameter against its annotation (``epochs: int = 12``),
converts what can be converted safely (``"3"`` -> 3 for an ``int``, ``"sum,abp"`` -> ``["sum", "abp"]``
for a ``list[str]``; the rules of :mod:`abp_core.coercion`, shared with the config) and raises
:class:`ParameterError` naming the parameter otherwise (``papermill ... -p epochs abc`` ->
``notebook parameter 'epochs' must be an integer, got 'abc' (str)``). It then applies smoke mode
(:func:`smoke_mode`: the ``smoke`` parameter, or ``ABP_SMOKE=1`` in the environment, which is how nbval
runs the notebooks in CI) and, in smoke mode, the notebook's tiny settings and one torch thread
(:func:`set_threads`). Use ``Optional[str]`` rather than ``str | None`` in parameter annotations:
papermill's parameter inspection does not read the ``|`` form.
"""
from __future__ import annotations

import os
import re
from typing import Any, Dict, List, Mapping, Optional, Union

from ..coercion import FALSE_WORDS, TRUE_WORDS, Rules, coerce, split_top_level

__all__ = ["SMOKE_ENV", "ParameterError", "NotebookParameters", "smoke_mode", "set_threads", "coerce_parameter",
           "parameters"]

#: Environment variable that turns smoke mode on in every notebook (``ABP_SMOKE=1``); CI sets it.
SMOKE_ENV = "ABP_SMOKE"


class ParameterError(ValueError):
    """A notebook parameter of the wrong type or value; the message names the parameter."""


class NotebookParameters(dict):
    """The validated parameters of a notebook: a dict with attribute access (``P.epochs``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"no notebook parameter {name!r}; parameters: {sorted(self)}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __repr__(self) -> str:
        return "NotebookParameters(" + ", ".join(f"{k}={v!r}" for k, v in self.items()) + ")"

    def describe(self) -> str:
        """One line per parameter, for printing at the top of a run."""
        width = max((len(k) for k in self), default=0)
        return "\n".join(f"  {k:<{width}} = {v!r}" for k, v in self.items())


def _env_flag(name: str, text: str) -> bool:
    t = text.strip().lower()
    if t in TRUE_WORDS:
        return True
    if t in FALSE_WORDS:
        return False
    raise ParameterError(f"environment variable {name} must be 1 or 0 (true/false), got {text!r}")


def smoke_mode(smoke: Any = False, env: Optional[Mapping[str, str]] = None) -> bool:
    """True when the notebook should run in smoke mode: ``smoke`` is true or ``$ABP_SMOKE`` is set to 1.

    ``smoke`` must be a boolean (strings ``"true"``/``"false"``/``"1"``/``"0"`` are accepted, as papermill
    or a shell may pass them); ``ABP_SMOKE`` accepts 1/0, true/false, yes/no, on/off. ``env`` defaults
    to ``os.environ``. ``ABP_SMOKE=0`` does not switch off an explicit ``smoke=True``.
    """
    value = coerce_parameter("smoke", smoke, bool)
    environ = os.environ if env is None else env
    flag = environ.get(SMOKE_ENV)
    return bool(value or (flag is not None and _env_flag(SMOKE_ENV, flag)))


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(value).__name__})"


_ANNOTATION_NAMES = {"int": int, "float": float, "bool": bool, "str": str, "Any": Any, "dict": dict,
                     "list": list, "None": type(None), "NoneType": type(None)}


def _parse_annotation(text: str) -> Any:
    """A type from an annotation string (``"Optional[list[int]]"``, ``"str | None"``); Any if unknown."""
    t = text.strip().strip("'\"").replace("typing.", "")
    if not t or t == "None":
        return Any
    if "|" in t and "[" not in t.split("|", 1)[0]:
        parts = [p.strip() for p in split_top_level(t, "|")]
        if len(parts) > 1:
            return Union[tuple(_parse_annotation(p) if p != "None" else type(None) for p in parts)]
    m = re.fullmatch(r"(\w+)\[(.*)\]", t)
    if m:
        outer, inner = m.group(1), m.group(2)
        args = [_parse_annotation(a) if a.strip() != "None" else type(None) for a in split_top_level(inner, ",")]
        if outer == "Optional":
            return Optional[args[0]]
        if outer == "Union":
            return Union[tuple(args)]
        if outer in ("list", "List", "Sequence", "tuple", "Tuple"):
            return List[args[0]]
        if outer in ("dict", "Dict", "Mapping"):
            return Dict[str, Any]
        return Any
    return _ANNOTATION_NAMES.get(t, Any)


#: Notebook parameters may arrive as text (papermill's ``-p``, a shell): unambiguous strings are converted.
_RULES = Rules(ParameterError, text=True, label=lambda name: f"notebook parameter {name!r}", describe=_describe,
               float_phrase="a number", bool_phrase="a boolean (True/False)", none_word="None", list_items=True)


def coerce_parameter(name: str, value: Any, annotation: Any) -> Any:
    """``value`` checked against ``annotation`` (a type or an annotation string), converted if safe.

    Supported: ``bool``, ``int``, ``float``, ``str``, ``Optional[...]``/``X | None``, ``list[X]``,
    ``dict`` and ``Any``. Strings are converted where unambiguous (``"3"`` for an int, ``"1e-4"`` for
    a float, ``"true"`` for a bool, ``"a,b"`` or ``"[a, b]"`` for a list, ``"None"`` for an optional);
    the rules are :mod:`abp_core.coercion`'s, shared with the config.

    Raises:
        ParameterError: naming the parameter, the expected type and the value received.
    """
    hint = _parse_annotation(annotation) if isinstance(annotation, str) else annotation
    return coerce(value, hint, name, _RULES)


def parameters(namespace: Mapping[str, Any], smoke_overrides: Optional[Mapping[str, Any]] = None,
               *, env: Optional[Mapping[str, str]] = None) -> NotebookParameters:
    """Validate a notebook's parameters (its annotated globals) and apply smoke mode.

    Args:
        namespace: the notebook's ``globals()``; every name in its ``__annotations__`` (the annotated
            assignments of the parameters cell) is a parameter.
        smoke_overrides: the notebook's smoke budget, applied in smoke mode only. For a numeric
            parameter the value is a cap (``epochs: 1`` -> ``min(epochs, 1)``; ``None`` counts as
            unlimited), for a list parameter an int is the number of items kept (the first ones:
            ``seeds: 1``), and any other value replaces the parameter. So explicit choices survive
            within the budget: ``-p smoke True -p seeds "[386333]"`` runs split 386333, once.
        env: environment for :func:`smoke_mode` (default ``os.environ``).

    Returns:
        :class:`NotebookParameters` in the order of the parameters cell, ``smoke`` resolved.

    Raises:
        ParameterError: a parameter of the wrong type, or a smoke override for an unknown parameter.
    """
    annotations = dict(namespace.get("__annotations__") or {})
    if not annotations:
        raise ParameterError("the notebook declares no parameters: the parameters cell must use annotated "
                             "assignments such as `epochs: int = 10`")
    values = NotebookParameters()
    for pname, ann in annotations.items():
        if pname not in namespace:
            raise ParameterError(f"notebook parameter {pname!r} is declared but has no value")
        values[pname] = coerce_parameter(pname, namespace[pname], ann)
    if "smoke" in values:
        values["smoke"] = smoke_mode(values["smoke"], env=env)
    if values.get("smoke") and smoke_overrides:
        for pname, value in smoke_overrides.items():
            if pname not in annotations:
                raise ParameterError(f"smoke override for unknown notebook parameter {pname!r}; "
                                     f"parameters: {list(annotations)}")
            values[pname] = _smoke_value(pname, values[pname], value, annotations[pname])
    if values.get("smoke"):
        set_threads(1)
    return values


def _smoke_value(name: str, current: Any, budget: Any, annotation: Any) -> Any:
    """``current`` limited by a smoke budget (see :func:`parameters`)."""
    if isinstance(current, list) and isinstance(budget, int) and not isinstance(budget, bool):
        if budget < 1:
            raise ParameterError(f"smoke budget for {name!r} must keep at least one item, got {budget}")
        return current[:budget]
    budget = coerce_parameter(name, budget, annotation)
    numeric = (int, float)
    if isinstance(budget, numeric) and not isinstance(budget, bool):
        if current is None:
            return budget
        if isinstance(current, numeric) and not isinstance(current, bool):
            return type(budget)(min(current, budget))
    return budget


def set_threads(num_threads: Optional[int]) -> None:
    """Set torch's CPU threads (``None``: leave torch's default).

    Small models (the quickstart's, smoke mode's) gain little from several threads, and on a busy
    machine (CI, shared cores) several threads per process are many times slower: training the
    quickstart's SchNet took 0.6 s per 1000 molecules with one thread and 20 s with two while other
    jobs used the cores. Smoke mode therefore always runs with one thread.
    """
    if num_threads is None:
        return
    if int(num_threads) < 1:
        raise ParameterError(f"notebook parameter 'threads' must be >= 1 (or None), got {num_threads}")
    try:
        import torch
    except ImportError:  # pragma: no cover
        return
    torch.set_num_threads(int(num_threads))

