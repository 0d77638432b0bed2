"""A head is added in one place: registered with its builder, grid and facts, it is parsed, fit, named, listed,
checked at the doors and refused for export as declared, with no other module touched."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from featcache.deploy.head_graph import refusal
from featcache.evaluation.features import LabeledFeatures
from featcache.evaluation.head_registry import HEAD_REGISTRY, HeadSpec, grid_of, head_names, parse_heads, register_head
from featcache.evaluation.protocol import Protocol
from featcache.evaluation.runner import fit_head
from featcache.option_checks import CHECKS
from featcache.options import BY_NAME, OptionError
from featcache.recipes import FitPlan
from featcache.reporting.compare import select_rows
from featcache.store.runs import read_metrics

from .fakes import FakeEntry

TOY = "toy-probe"


@pytest.fixture
def toy_head():
    spec = register_head(HeadSpec(
        TOY, lambda cw, seed, _: LogisticRegression(C=0.05, max_iter=500, class_weight=cw, random_state=seed),
        {"head__C": [0.05, 0.5]}, onnx_refusal="a toy for the tests"))
    yield spec
    del HEAD_REGISTRY[TOY]


def _data(n: int = 60) -> LabeledFeatures:
    rng = np.random.default_rng(0)
    y = np.array(["mel", "nv"])[np.arange(n) % 2]
    X = (rng.normal(size=(n, 6)) + (y == "mel")[:, None]).astype(np.float32)
    return LabeledFeatures(X, y, None, None, [f"i{k}" for k in range(n)], ["mel", "nv"])


def test_a_registered_head_is_fit_named_listed_and_refused_for_export_as_declared(toy_head, tmp_path):
    assert parse_heads(f"logreg,{TOY}") == ["logreg", TOY]
    assert TOY not in head_names("all") and TOY in head_names()  # in no head set it was not given
    assert BY_NAME["heads"].checked((TOY,), checks=CHECKS) == (TOY,)  # every door's check knows it
    assert grid_of(TOY) == {"head__C": [0.05, 0.5]}
    run = fit_head(_data(), FakeEntry(tmp_path / "cache" / "toy" / "test-ffffffffffffffff"), TOY, "gap", Protocol(cv=3),
                   "toy", plan=FitPlan(jobs=1))
    config = read_metrics(run)["config"]
    assert config["head"] == TOY and config["estimator"]["head__C"] == 0.05  # named by what built it
    assert run.name.startswith(f"{TOY}-gap-")
    assert [r.head for r in select_rows(tmp_path / "cache", "balanced_accuracy")] == [TOY]
    assert refusal({**config, "backbone": "efficientnet_lite0"}) == \
        f"the {TOY} head does not export to ONNX: a toy for the tests"


def test_an_unknown_head_and_a_second_registration_are_refused():
    with pytest.raises(OptionError, match="toy-typo: unknown; choose from logreg, svm-linear"):
        BY_NAME["heads"].checked(("toy-typo",), checks=CHECKS)
    with pytest.raises(ValueError, match="'logreg' is registered already"):
        register_head(HeadSpec("logreg", lambda cw, seed, _: None))
