"""One routine that checks a value against a type hint and converts it: for the config and the notebooks.

:func:`coerce` takes ``value``, a type hint (``bool``, ``int``, ``float``, ``str``, ``Optional[X]`` /
``Union`` / ``X | None``, ``list[X]``, ``dict``, ``Any`` or a class) and a name, and returns the value
converted to the hint, or raises the caller's error class with the message
``"<label> must be <type phrase>, got <value>"``. The caller's :class:`Rules` say where values come from:

* typed sources (``text=False``, the config: YAML/JSON values are already typed): only lossless
  conversions -- an integral float for an int (``2.0`` -> 2), an int or a numeric string for a float
  (YAML 1.1, and so PyYAML, reads ``1e-4`` as a string), a tuple for a list;
* text sources (``text=True``, notebook parameters from papermill's command line or a shell): on top,
  every unambiguous string (``"3"`` -> 3, ``"true"`` -> True, ``"a,b"`` or ``"[a, b]"`` -> a list,
  ``"None"`` -> None for an optional, YAML for a mapping), 0/1 for a bool, a number or a path for a
  string, and a single value for a one-item list.

NaN is never a valid float. Bools are never ints (``True`` is not the integer 1 here).
"""
from __future__ import annotations

import copy
import math
import os
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Sequence, Union

__all__ = ["Rules", "coerce", "type_phrase", "split_top_level", "parse_yaml_text", "TRUE_WORDS", "FALSE_WORDS"]

#: Words read as True / False (lower case) for a bool from text.
TRUE_WORDS = frozenset({"1", "true", "yes", "on", "y", "t"})
FALSE_WORDS = frozenset({"0", "false", "no", "off", "n", "f", ""})
_NONE = type(None)


@dataclass(frozen=True)
class Rules:
    """How values are read and how errors are worded (see the module docstring).

    Attributes:
        error: exception class raised (a ``ValueError`` subclass, e.g. ``ConfigError``).
        text: accept text forms and loose conversions (notebook parameters), or not (config).
        label: the value's name as it appears in a message (``name -> "notebook parameter 'name'"``).
        describe: the received value in a message (default ``repr``).
        float_phrase / bool_phrase / none_word: how a float, a bool and None are named.
        list_items: name a list's items (``"a list of integers"``) or not (``"a list"``).
    """

    error: type
    text: bool = False
    label: Callable[[str], str] = str
    describe: Callable[[Any], str] = repr
    float_phrase: str = "a float"
    bool_phrase: str = "a boolean (true/false)"
    none_word: str = "null"
    list_items: bool = False

    def fail(self, name: str, hint: Any, value: Any) -> Exception:
        return self.error(f"{self.label(name)} must be {type_phrase(hint, self)}, got {self.describe(value)}")


def type_phrase(hint: Any, rules: Rules) -> str:
    """``hint`` in words: ``"an integer"``, ``"a float or null"``, ``"a list of strings"`` ..."""
    if hint is bool:
        return rules.bool_phrase
    if hint is int:
        return "an integer"
    if hint is float:
        return rules.float_phrase
    if hint is str:
        return "a string"
    origin = typing.get_origin(hint)
    if origin in (list, List, tuple, Sequence) or hint is list:
        args = typing.get_args(hint)
        if rules.list_items and args:
            return f"a list of {type_phrase(args[0], rules).split(' ', 1)[1]}s"
        return "a list"
    if origin in (dict, Dict) or hint is dict:
        return "a mapping"
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        names = " or ".join(type_phrase(a, rules) for a in args if a is not _NONE)
        return names + (f" or {rules.none_word}" if _NONE in args else "")
    return getattr(hint, "__name__", str(hint))


def split_top_level(text: str, sep: str) -> List[str]:
    """Split ``text`` at ``sep`` outside brackets and quotes (``"[a,b],c"`` -> ``["[a,b]", "c"]``)."""
    out, depth, quote, cur = [], 0, None, []
    for ch in text:
        if quote:
            cur.append(ch)
            if ch == quote:
                quote = None
            continue
        if ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == sep and depth == 0:
            out.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    out.append("".join(cur))
    return out


def parse_yaml_text(text: str) -> Any:
    """``text`` read as YAML (``"3"`` -> 3, ``"[a, b]"`` -> list), or the text itself if it is not YAML."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def coerce(value: Any, hint: Any, name: str, rules: Rules) -> Any:
    """``value`` checked against ``hint`` and converted as ``rules`` allow; else ``rules.error``.

    List items are named ``name[i]`` in messages. A hint this routine does not know is checked with
    ``isinstance`` when it is a class; any other hint is accepted as is from text sources and raises
    ``TypeError`` (a programming error) for typed ones.
    """
    if hint is Any or hint is None:
        return value
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None or (rules.text and isinstance(value, str) and value.strip().lower() in ("none", "null")):
            if _NONE in args:
                return None
            raise rules.error(f"{rules.label(name)} must be {type_phrase(hint, rules)}, got None")
        for arg in args:
            if arg is _NONE:
                continue
            try:
                return coerce(value, arg, name, rules)
            except rules.error:
                continue
        raise rules.fail(name, hint, value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if rules.text:
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            if isinstance(value, str) and value.strip().lower() in (TRUE_WORDS | FALSE_WORDS) - {""}:
                return value.strip().lower() in TRUE_WORDS
        raise rules.fail(name, hint, value)
    if hint is int:
        if isinstance(value, bool):
            raise rules.fail(name, hint, value)
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            if rules.text:
                try:
                    return int(value.strip())
                except ValueError:
                    pass
            raise rules.fail(name, hint, value)
        if hasattr(value, "__index__"):  # numpy integers
            return int(value.__index__())
        raise rules.fail(name, hint, value)
    if hint is float:
        if isinstance(value, bool):
            raise rules.fail(name, hint, value)
        if isinstance(value, str):
            try:
                out = float(value.strip())
            except ValueError:
                raise rules.fail(name, hint, value) from None
        elif isinstance(value, (int, float)) or hasattr(value, "__float__"):
            out = float(value)
        else:
            raise rules.fail(name, hint, value)
        if math.isnan(out):
            raise rules.error(f"{rules.label(name)} must be {rules.float_phrase}, got NaN")
        return out
    if hint is str:
        if isinstance(value, str):
            return value
        if rules.text:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)  # papermill turns "-p tag 2024" into an int
            if isinstance(value, os.PathLike):
                return os.fspath(value)
        raise rules.fail(name, hint, value)
    if hint is _NONE:
        if value is None:
            return None
        raise rules.fail(name, hint, value)
    if origin in (list, List) or hint is list:
        (item,) = typing.get_args(hint) or (Any,)
        items = value
        if rules.text and isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                items = parse_yaml_text(text)
                if not isinstance(items, list):
                    raise rules.fail(name, hint, value)
            else:
                items = [v.strip() for v in split_top_level(text, ",") if v.strip()]
                if item is not str:
                    items = [parse_yaml_text(v) for v in items]
        elif isinstance(value, tuple):
            items = list(value)
        elif not isinstance(value, list):
            if rules.text:  # a single value of the item type becomes a one-item list
                try:
                    return [coerce(value, item, name, rules)]
                except rules.error:
                    pass
            raise rules.fail(name, hint, value)
        return [coerce(v, item, f"{name}[{i}]", rules) for i, v in enumerate(items)]
    if origin in (dict, Dict) or hint is dict:
        mapping = parse_yaml_text(value) if rules.text and isinstance(value, str) else value
        if not isinstance(mapping, Mapping):
            raise rules.fail(name, hint, value)
        bad = [k for k in mapping if not isinstance(k, str)]
        if bad:
            raise rules.error(f"{rules.label(name)} keys must be strings, got {bad[0]!r}")
        return copy.deepcopy(dict(mapping))
    if isinstance(hint, type):
        if isinstance(value, hint):
            return value
        raise rules.fail(name, hint, value)
    if rules.text:
        return value
    raise TypeError(f"unsupported type hint {hint!r} for {name}")
