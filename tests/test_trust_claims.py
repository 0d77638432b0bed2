"""Issue 47: trust claims that hold. Few patients behind a class are named (item 2); of several group columns, the
coarsest groups the images (item 3); nothing is said of what the user did not ask (item 7)."""

from __future__ import annotations

import numpy as np

from featcache.data.sources import open_source
from featcache.errors import RunError
from featcache.evaluation.features import LabeledFeatures
from featcache.evaluation.fitting import report_protocol
from featcache.evaluation.protocol import Protocol
from featcache.evaluation.runner import fit_head
from featcache.progress import Reporter
from featcache.recipes import FitPlan
from featcache.store.runs import read_metrics, read_model_card

from .fakes import FakeEntry


class _Collect(Reporter):
    def __init__(self) -> None:
        super().__init__(quiet=True)
        self.warnings: list[str] = []

    def warn(self, message: str) -> None:
        self.warnings.append(message)


def _clinic(rng: np.random.Generator) -> LabeledFeatures:
    """The clinical set's shape: herpes 16 photos of 5 cases, eczema 60 photos of 30 patients."""
    y = np.array(["herpes"] * 16 + ["eczema"] * 60)
    groups = np.array([f"h{k % 5}" for k in range(16)] + [f"e{k % 30}" for k in range(60)])
    X = (rng.normal(size=(76, 6)) + 1.5 * (y == "herpes")[:, None]).astype(np.float32)
    return LabeledFeatures(X, y, groups, None, [f"i{k}" for k in range(76)], ["eczema", "herpes"],
                           grouping={"grouped": True, "by": "column 'case'", "mode": "auto", "column": "case"})


def test_a_class_with_few_patients_is_named_with_its_counts_and_in_the_model_card(tmp_path):
    data = _clinic(np.random.default_rng(0))
    reporter = _Collect()
    report_protocol(data, Protocol(cv=5), reporter)
    (few,) = [w for w in reporter.warnings if w.startswith("few groups")]
    assert "herpes: 16 images of 5 groups" in few and "eczema" not in few and "5 grouped folds" in few
    run = fit_head(data, FakeEntry(tmp_path / "c" / "d" / "e-ffffffffffffffff"), "logreg", "gap", Protocol(cv=5),
                   "clinic", plan=FitPlan(jobs=1))
    assert read_metrics(run)["groups_per_class"] == {"eczema": 30, "herpes": 5}
    card = read_model_card(run)
    assert "Groups per class: eczema 30, herpes 5. **herpes: fewer than 10 groups**" in card
    ungrouped = LabeledFeatures(data.X, data.y, None, None, data.ids, data.classes)
    quiet = _Collect()
    report_protocol(ungrouped, Protocol(cv=5), quiet)
    assert not [w for w in quiet.warnings if w.startswith("few groups")]  # its warning is that it is ungrouped


def _table(tmp_path, rows: list[tuple[str, str, str]]):  # noqa: ANN202 - the CSV path
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    lines = ["file,diagnosis,lesion_id,patient_id"]
    for k, (label, lesion, patient) in enumerate(rows):
        Image.new("RGB", (8, 8), (k, 0, 0)).save(folder / f"p{k}.png")
        lines.append(f"images/p{k}.png,{label},{lesion},{patient}")
    (tmp_path / "pad.csv").write_text("\n".join(lines) + "\n")
    return tmp_path / "pad.csv"


def test_of_a_lesion_and_a_patient_column_the_patient_groups_the_images_and_it_is_said(tmp_path):
    # one patient's two lesions (PAD-UFES-20's layout): grouping by lesion would put them on both sides
    table = _table(tmp_path, [("mel", "L1", "P1"), ("mel", "L1", "P1"), ("nv", "L2", "P1"), ("nv", "L3", "P2")])
    source = open_source(str(table))
    assert source.group_column == "patient_id" and [r.group for r in source.records] == ["P1", "P1", "P1", "P2"]
    assert any("grouped by 'patient_id' (2 groups), whose groups contain those of 'lesion_id'" in n
               for n in source.notes)
    assert open_source(str(table), group_col="lesion_id").group_column == "lesion_id"  # --group-col decides
    crossing = _table(tmp_path, [("mel", "L1", "P1"), ("mel", "L1", "P2"), ("nv", "L2", "P1"), ("nv", "L3", "P3")])
    source = open_source(str(crossing))
    assert source.group_column == "lesion_id"  # 3 groups against 3: the first of the fewest
    assert any("cross" in n and "can sit on both sides" in n for n in source.notes)


def test_prompts_without_a_zero_shot_head_are_refused_at_every_door(tmp_path):
    """Item 7: an option that would change nothing is refused, before any work, in each door's spelling."""
    import pytest
    from typer.testing import CliRunner

    import featcache as fc
    from featcache.cli import app
    from featcache.evaluation.fitting import fit_many
    from featcache.evaluation.protocol import RunRecipe
    from featcache.options import OptionError

    prompts = tmp_path / "prompts.json"
    prompts.write_text("not json")  # never read: refused before
    with pytest.raises(OptionError, match=rf"^prompts='{prompts}' gives the zero-shot head's prompts, and no zero-shot "
                                          r"head is fit \(heads=\('logreg',\)\)"):
        fc.fit(tmp_path, heads=["logreg"], prompts=prompts, cache=tmp_path / "cache")
    out = CliRunner().invoke(app, ["fit", "--data", str(tmp_path), "--head", "logreg,knn", "--prompt-template",
                                   "a photo of {}", "--cache", str(tmp_path / "cache")])
    assert out.exit_code == 2 and "--prompt-template a photo of {} writes the zero-shot head's prompts" in \
        " ".join(out.output.split())
    assert not (tmp_path / "cache").exists()
    with pytest.raises(RunError, match="prompts='x.json' gives the zero-shot head's prompts"):  # the stage itself
        fit_many(None, None, RunRecipe(("logreg",), Protocol(prompts="x.json")))


def test_predict_reports_the_images_of_this_call_only(small_folder, tmp_path):
    """Item 7: images that failed in an earlier call (into the same entry) are not this call's."""
    import shutil

    import featcache as fc

    fc.extract(small_folder, cache=tmp_path / "cache", workers=0, quiet=True)
    (run,) = fc.fit(small_folder, heads=["logreg"], cv=3, cache=tmp_path / "cache", quiet=True)
    good = sorted(small_folder.rglob("*.jpg"))[0]
    for clinic, bad in (("a", ["x.jpg", "y.jpg"]), ("b", ["z.jpg"])):
        folder = tmp_path / clinic / "photos"  # the same folder name: the same entry of new images
        folder.mkdir(parents=True)
        shutil.copy(good, folder / "ok.jpg")
        for name in bad:
            (folder / name).write_bytes(b"not an image")
    first = run.predict(str(tmp_path / "a" / "photos"), cache=tmp_path / "cache", neighbours=0)
    assert (first["failed"] != "").sum() == 2
    reporter = _Collect()
    second = run.predict(str(tmp_path / "b" / "photos"), cache=tmp_path / "cache", neighbours=0, reporter=reporter)
    assert len(second) == 2 and (second["failed"] != "").sum() == 1
    said = " ".join(w for w in reporter.warnings if w.startswith("no prediction for"))
    assert "z.jpg" in said and "x.jpg" not in said and "y.jpg" not in said
