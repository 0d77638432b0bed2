"""Issue 43, part 1: the stage doors take typed recipes, built from the option table, and one rule names things."""

from __future__ import annotations

from dataclasses import fields

import pytest

from featcache.data.images import Preprocess
from featcache.evaluation.protocol import Protocol
from featcache.options import BY_NAME, OptionError
from featcache.recipes import (
    EXECUTION,
    FEATURES,
    NOT_OPTIONS,
    ExecutionPlan,
    FeatureRecipe,
    named_settings,
    recipe_options,
)


@pytest.mark.parametrize(("recipe", "name"), [(FeatureRecipe, FEATURES), (ExecutionPlan, EXECUTION)])
def test_a_recipe_is_made_of_the_options_declared_to_belong_to_it(recipe, name):
    declared = {option.name for option in recipe_options(name)}
    own = {f.name for f in fields(recipe)} - set(NOT_OPTIONS[recipe])
    assert own == declared, "add the field to the recipe, or recipe= to the option"
    built = recipe()
    for option in recipe_options(name):
        assert getattr(built, option.name) == option.checked(None, command="extract", checks={
            "preprocess": lambda value: value})


def test_a_recipe_checks_its_values_as_the_options_do_and_ignores_other_options():
    with pytest.raises(OptionError, match="--dtype 'float8'"):
        FeatureRecipe(dtype="float8")
    with pytest.raises(OptionError, match="--workers -1: must be at least 0"):
        ExecutionPlan(workers=-1)
    recipe = FeatureRecipe.from_options({"views": "4", "preprocess": "hair-removal", "cv": 3, "workers": 2})
    assert recipe.views == 4 and recipe.preprocess == ("hair-removal",)
    assert ExecutionPlan.from_options({"workers": 2, "views": 4}).workers == 2
    assert recipe.but(views=2).views == 2 and recipe.views == 4  # frozen: a changed copy


def test_one_rule_leaves_out_the_settings_at_their_first_default():
    assert named_settings({"a": 1, "views": 1, "filters": [], "engine": "openvino"},
                          {"views": 1, "filters": (), "engine": "torch"}) == {"a": 1, "engine": "openvino"}
    # entries and runs named before a setting existed keep their names
    assert set(Preprocess(resize_size=256, crop_size=224, mean=(0.5,) * 3, std=(0.5,) * 3,
                          interpolation="bicubic").to_dict()) == {
        "resize_size", "crop_size", "mean", "std", "interpolation", "jpeg_draft"}
    assert "test_align" not in Protocol().config() and "conformal_mode" not in Protocol().config()
    assert Protocol(conformal=0.9).config()["conformal_mode"] == "marginal"
    assert BY_NAME["views"].recipe == FEATURES and BY_NAME["cv"].recipe is None
