"""Rules between options, declared once: every door checks them (the API's keywords, the command line through
the API, a study's keys) before any work, and the fit stage itself for callers in Python; each spells the options
its own way (:func:`cli_spelling`, :func:`keyword_spelling`, a study's ``[table] key = value``).

Kept free of heavy imports, as :mod:`featcache.options` is."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from featcache.options import BY_NAME, OPTIONS, Alignment, ConformalShift, Grouping, Option


@dataclass(frozen=True)
class Rule:
    """Options of ``commands`` that may not be given together so. ``broken`` reads the checked values by option
    name; ``text`` names an option as ``{name}`` (the option) or ``{name=}`` (it with its value), which each door
    writes its way (:func:`cli_spelling`, :func:`keyword_spelling`, a study's ``[table] key = value``)."""

    commands: tuple[str, ...]
    broken: Callable[[Mapping[str, Any]], bool]
    text: str

    def message(self, values: Mapping[str, Any], spell: Callable[[Option, Any, bool], str]) -> str:
        return re.sub(r"\{(\w+)(=?)\}", lambda m: spell(BY_NAME[m.group(1)], values.get(m.group(1)),
                                                     bool(m.group(2))), self.text)


# the zero-shot head's name (featcache.evaluation.head_registry.ZERO_SHOT), which the rules about its prompts read
ZERO_SHOT_HEAD = "zero-shot"


def _weighted(values: Mapping[str, Any]) -> bool:
    return values.get("conformal_shift") == ConformalShift.weighted.value


_CONTRADICTS_GROUP_COL = "{groups=} contradicts {group_col}; give one"
RULES: tuple[Rule, ...] = (
    Rule(("fit", "audit"), lambda v: v["groups"] == Grouping.near_duplicates.value and bool(v["group_col"]),
         _CONTRADICTS_GROUP_COL),
    Rule(("fit", "audit"), lambda v: v["groups"] == Grouping.none.value and bool(v["group_col"]),
         _CONTRADICTS_GROUP_COL),
    Rule(("fit",), lambda v: v["test_align"] != Alignment.none.value and not v["test_data"],
         "{test_align=} aligns a held-out set's features, and no {test_data} is given: add the other clinic's "
         "images, or drop {test_align}"),
    Rule(("fit",), lambda v: _weighted(v) and v["conformal"] is None,
         "{conformal_shift=} weighs prediction sets: give their coverage with {conformal} (e.g. 0.9)"),
    Rule(("fit",), lambda v: _weighted(v) and not v["test_data"],
         "{conformal_shift=} calibrates the sets of a test set from elsewhere, and no {test_data} is given: add "
         "the other clinic's images, or drop {conformal_shift}"),
    Rule(("fit",), lambda v: _weighted(v) and bool(v["conformal_by"]),
         "{conformal_shift=} and {conformal_by=} are two ways to calibrate for another clinic: give one "
         "({conformal_by} when the clinic is a column of the training data, {conformal_shift=} when it is not)"),
    Rule(("fit",), lambda v: bool(v["conformal_by"]) and v["conformal"] is None,
         "{conformal_by=} calibrates prediction sets by group: give the coverage with {conformal} (e.g. 0.9)"),
    Rule(("fit",), lambda v: bool(v["prompts"]) and ZERO_SHOT_HEAD not in (v["heads"] or ()),
         "{prompts=} gives the zero-shot head's prompts, and no zero-shot head is fit ({heads=}), so it would change "
         "nothing: add zero-shot to {heads}, or drop {prompts}"),
    Rule(("fit",), lambda v: v["prompt_template"] != BY_NAME["prompt_template"].default
         and ZERO_SHOT_HEAD not in (v["heads"] or ()),
         "{prompt_template=} writes the zero-shot head's prompts, and no zero-shot head is fit ({heads=}), so it "
         "would change nothing: add zero-shot to {heads}, or drop {prompt_template}"),
)


def broken_rules(command: str, values: Mapping[str, Any]) -> list[Rule]:
    """The rules of ``command`` that the checked ``values`` break (an option a door does not have counts as
    not given)."""
    given = {option.name: values.get(option.name, option.default_for(command)) for option in OPTIONS}
    return [rule for rule in RULES if command in rule.commands and rule.broken(given)]


def cli_spelling(option: Option, value: Any, with_value: bool) -> str:
    """``--test-align moments`` (``--no-groups`` for its alias's value), or the bare flag."""
    if not with_value:
        return option.cli_flag
    if option.alias and value == option.alias[1]:
        return option.alias[0]
    if option.kind is bool:
        return option.cli_flag if value else f"--no-{option.cli_flag[2:]}"
    return f"{option.cli_flag} {','.join(value) if isinstance(value, tuple) else value}"


def keyword_spelling(option: Option, value: Any, with_value: bool) -> str:
    """``test_align='moments'`` (``no_groups=True`` for its alias's value), or the bare keyword."""
    if not with_value:
        return option.name
    if option.alias and value == option.alias[1]:
        return f"{option.alias[0][2:].replace('-', '_')}=True"
    return f"{option.name}={value!r}"


