"""abp_core.coercion: the one conversion routine behind the config and the notebook parameters."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Union

import numpy as np
import pytest

import abp_core.notebooks as nb
from abp_core import coercion, config
from abp_core.coercion import Rules, coerce, split_top_level


class Oops(ValueError):
    pass


TYPED = Rules(Oops)
TEXT = Rules(Oops, text=True, label=lambda n: f"param {n!r}", float_phrase="a number", none_word="None",
             list_items=True)


def test_both_callers_use_the_shared_routine(monkeypatch):
    calls = []
    real = coercion.coerce

    def spy(value, hint, name, rules):
        calls.append((name, rules.error))
        return real(value, hint, name, rules)

    monkeypatch.setattr(config, "coerce", spy)
    monkeypatch.setattr(nb.params, "coerce", spy)
    config.Config.from_dict({"trainer": {"max_epochs": 3}})
    nb.coerce_parameter("epochs", "3", int)
    assert ("trainer.max_epochs", config.ConfigError) in calls
    assert ("epochs", nb.ParameterError) in calls


@pytest.mark.parametrize("hint,value,typed,text", [
    (int, "3", Oops, 3),            # text only from text sources
    (int, 2.0, 2, 2),
    (int, np.int64(4), 4, 4),
    (bool, "yes", Oops, True),
    (bool, 1, Oops, True),
    (float, "1e-4", 1e-4, 1e-4),     # YAML 1.1 reads 1e-4 as a string: accepted from both
    (str, 2024, Oops, "2024"),
    (List[int], (1, 2), [1, 2], [1, 2]),
    (List[int], "1,2", Oops, [1, 2]),
    (List[str], "a", Oops, ["a"]),
    (Optional[int], "None", Oops, None),
    (Dict[str, Any], "{a: 1}", Oops, {"a": 1}),
    (Union[int, str], "x", "x", "x"),
])
def test_typed_and_text_rules(hint, value, typed, text):
    for rules, expected in ((TYPED, typed), (TEXT, text)):
        if expected is Oops:
            with pytest.raises(Oops):
                coerce(value, hint, "v", rules)
        else:
            assert coerce(value, hint, "v", rules) == expected


def test_messages_follow_the_rules():
    with pytest.raises(Oops, match=r"^v must be an integer or null, got 'x'$"):
        coerce("x", Optional[int], "v", TYPED)
    with pytest.raises(Oops, match=r"^param 'v' must be an integer or None, got 'x'$"):
        coerce("x", Optional[int], "v", TEXT)
    with pytest.raises(Oops, match=r"^param 'v\[1\]' must be an integer, got 'b'$"):
        coerce(["1", "b"], List[int], "v", TEXT)
    with pytest.raises(Oops, match=r"^v must be a float, got NaN$"):
        coerce(float("nan"), float, "v", TYPED)
    with pytest.raises(Oops, match=r"^param 'v' must be a list of integers"):
        coerce({"a": 1}, List[int], "v", TEXT)
    with pytest.raises(Oops, match=r"^v keys must be strings, got 1$"):
        coerce({1: 2}, Dict[str, Any], "v", TYPED)
    with pytest.raises(Oops):
        coerce(True, int, "v", TEXT)  # a bool is never an integer


def test_split_top_level_keeps_brackets_and_quotes():
    assert split_top_level("[a,b],'c,d',e", ",") == ["[a,b]", "'c,d'", "e"]
