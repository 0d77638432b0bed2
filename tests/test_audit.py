"""featcache audit: suspected label errors, duplicates and outliers from the cached features."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_predict

from featcache.evaluation.dataset_audit import audit_dataset, write_audit
from featcache.evaluation.features import LabeledFeatures


def test_confident_learning_ranks_flipped_labels_first(tmp_path):
    pytest.importorskip("cleanlab", reason="pip install 'featcache[audit]'")
    rng = np.random.default_rng(0)
    n, classes = 1200, np.array(["bcc", "mel", "nv"])
    truth = classes[np.arange(n) % 3]
    X = rng.normal(size=(n, 16)) + np.eye(3)[np.arange(n) % 3].repeat(16 // 3 + 1, axis=1)[:, :16] * 2.5
    given = truth.copy()
    flipped = rng.choice(n, n // 20, replace=False)  # 5 % of the labels flipped at random
    given[flipped] = [rng.choice([c for c in classes if c != t]) for t in truth[flipped]]
    folds = np.arange(n) % 5
    oof = cross_val_predict(LogisticRegression(max_iter=500), X, given, cv=5, method="predict_proba")
    data = LabeledFeatures(X.astype(np.float32), given, None, None, [f"img {k}, odd" for k in range(n)],
                           list(classes))
    found = audit_dataset(data, oof, folds)
    top = {row["id"] for row in found.label_issues[:2 * len(flipped)]}
    hits = sum(f"img {k}, odd" in top for k in flipped)
    assert hits / len(flipped) >= 0.6
    first = found.label_issues[0]
    assert first["given"] != first["suggested"] and first["score"] < 0.5
    files = write_audit(found, tmp_path / "audit")
    with open(files["label_issues"], newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["id", "given", "suggested", "score", "reason"] and rows[0]["id"] == first["id"]
    assert len(found.outliers) == 12  # the farthest 1 %
    # how far the flags can be trusted: the models' own accuracy and cleanlab's estimate beside the count flagged
    from sklearn.metrics import balanced_accuracy_score

    assert found.model_balanced_accuracy == balanced_accuracy_score(given, np.asarray(classes)[oof.argmax(1)])
    assert 0.5 * len(flipped) <= found.estimated_wrong <= 2 * len(flipped)
    assert f"cleanlab estimates {found.estimated_wrong} wrong labels" in found.sentence()
    assert found.weak_warning() is None and found.outliers[0]["percentile"] >= 99


@pytest.mark.slow
def test_the_audit_command_writes_its_files_and_page(small_folder, tmp_path):
    pytest.importorskip("cleanlab", reason="pip install 'featcache[audit]'")
    from typer.testing import CliRunner

    from featcache.cli import app

    runner = CliRunner()
    assert runner.invoke(app, ["extract", "--data", str(small_folder), "--cache", str(tmp_path), "--engine",
                               "torch", "--pool", "gap,penult", "-q"]).exit_code == 0
    out = runner.invoke(app, ["audit", "--data", str(small_folder), "--cache", str(tmp_path), "--cv", "3",
                              "--pool", "penult", "--out", str(tmp_path / "audit"), "-q"])
    assert out.exit_code == 0, out.output
    # the audit's heads were fit on the pooling asked for, not the entry's first
    assert sorted(p.name.split("-")[:2] for p in tmp_path.glob("*/*/runs/*")) == [["logreg", "penult"],
                                                                                  ["mlp", "penult"]]
    assert {p.name for p in (tmp_path / "audit").iterdir()} == {"label_issues.csv", "duplicates.csv", "outliers.csv",
                                                               "audit.html"}
    page = (tmp_path / "audit" / "audit.html").read_text()
    assert "Suspected label errors" in page and "data:image/jpeg;base64," in page


@pytest.mark.slow
def test_the_audit_of_fused_backbones_reads_every_backbone_s_pooling(small_folder, tmp_path):
    pytest.importorskip("cleanlab", reason="pip install 'featcache[audit]'")
    import featcache as fc

    fc.extract(data=str(small_folder), backbone="efficientnet_lite0,squeezenet1_1", pools="gap,penult",
               engine="torch", cache=str(tmp_path), quiet=True)
    folder = fc.audit(str(small_folder), backbone="efficientnet_lite0+squeezenet1_1", pool="penult+gap", cv=3,
                      cache=str(tmp_path), out=tmp_path / "audit", quiet=True)
    assert sorted(p.name.split("-")[:2] for p in tmp_path.glob("*/*/runs/*")) == [["logreg", "penult_gap"],
                                                                                  ["mlp", "penult_gap"]]
    with open(folder / "outliers.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) >= 1  # read from the fused features (320 + 512 columns)
