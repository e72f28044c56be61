"""The one table of methods agrees with the config's type and says what each method runs."""

from __future__ import annotations

import typing

import pytest

from grait.config import JobConfig, Method
from grait.methods import METHOD_NAMES, METHODS, method_spec


def test_the_config_literal_lists_exactly_the_table():
    assert set(typing.get_args(Method)) == set(METHOD_NAMES)


def test_stages_follow_what_a_method_needs():
    assert METHODS["van"].stages == ("training", "evaluation")
    assert METHODS["rtuning"].stages == ("knowledge_query", "training", "evaluation")
    assert "gradient_features" not in METHODS["random-idk"].stages
    assert "selection" in METHODS["random-idk"].stages
    for name in ("grait", "grait-noweight", "stratified-random"):
        assert METHODS[name].uses_features
        assert {"warmup", "gradient_features", "selection"} <= set(METHODS[name].stages)
    assert METHODS["grait"].weighted and not METHODS["grait-noweight"].weighted


def test_unknown_method_names_the_choices():
    with pytest.raises(ValueError, match="stratified-random"):
        method_spec("best")
    with pytest.raises(ValueError):
        JobConfig.model_validate({"train": {"path": "x.jsonl"}, "method": "best"})
