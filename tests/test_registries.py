"""A head is added in one place: registered with its builder, grid and facts, it is parsed, fit, named, listed,
checked at the doors and refused for export as declared, with no other module touched. A backbone family too:
registered here, its models extract, fit and say where their weights come from."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from featcache.backbones.registry import (
    FAMILIES,
    REGISTRY,
    BackboneFamily,
    BackboneSpec,
    register_backbone,
    register_family,
)
from featcache.data.images import Preprocess
from featcache.deploy.head_graph import refusal
from featcache.errors import WeightsUnavailable
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


# --- a backbone family is added in one place too: registered from this file alone ---


class _ToyFamily(BackboneFamily):
    """A tiny CNN of its own library: any ``toy:<name>``, weights from a file only (it has no download)."""

    library, prefix = "toy", "toy:"

    def spec_for(self, target: str) -> BackboneSpec:
        return BackboneSpec(f"{self.prefix}{target}", self.library, target, ("gap",), ("gap",), {"gap": 8},
                            "a toy CNN", crop_size=32)

    def build(self, spec: BackboneSpec):  # noqa: ANN201 - a torch module
        return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())

    def preprocess(self, spec: BackboneSpec, net, origin: str) -> Preprocess:  # noqa: ANN001
        return Preprocess(32, 36, "bilinear", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))

    def pool(self, spec: BackboneSpec, net, x, pools: tuple[str, ...]) -> dict:  # noqa: ANN001
        return {"gap": net(x).mean(dim=(2, 3))}

    def feature_map(self, spec: BackboneSpec, net, x):  # noqa: ANN001, ANN201
        return net(x)


@pytest.fixture
def toy_family():
    family = register_family(_ToyFamily())
    named = register_backbone(family.spec_for("tiny"))
    yield family
    del FAMILIES[family.library], REGISTRY[named.name]


def test_a_registered_backbone_family_extracts_fits_and_says_where_its_weights_come_from(toy_family, small_folder,
                                                                                         tmp_path):
    import featcache as fc
    from featcache.workflow.files import backbone_availability

    listed = {spec.name: where for spec, where, _ in backbone_availability()}
    assert listed["toy:tiny"] == "not loadable here"  # no file, no download: `featcache backbones` says so
    with pytest.raises(WeightsUnavailable, match=r"No weights for toy:tiny here \(toy has no download\)\. Pass "
                                                 r"weights=FILE, or put toy-tiny.safetensors in \$FEATCACHE_WEIGH"):
        fc.extract(small_folder, backbone="toy:tiny", cache=tmp_path / "cache", engine="torch", workers=0)
    weights = tmp_path / "toy.pth"
    torch.save(toy_family.build(None).state_dict(), weights)
    entry = fc.extract(small_folder, backbone="toy:other", weights=str(weights), cache=tmp_path / "cache",
                       engine="torch", workers=0, quiet=True)
    assert entry.read("gap").shape == (12, 8)  # any model of the family by its prefix, pooled as it says
    assert entry.manifest["provenance"]["weights_origin"].startswith(f"file:{weights.resolve()} sha256:")
    (run,) = fc.fit(small_folder, backbone="toy:other", heads=["logreg"], cv=3, cache=tmp_path / "cache",
                    quiet=True)
    assert run.config["backbone"] == "toy:other" and 0.0 <= run.metrics["pooled"]["balanced_accuracy"] <= 1.0
    with pytest.raises(ValueError, match="'toy' is registered already"):
        register_family(_ToyFamily())
