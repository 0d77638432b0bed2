"""Issue 13: no silent protocol mistakes, no stale runs, leakage found from the features themselves.

Each test names the case of docs/reliability.md ("Trust") it guards and fails without the fix.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from featcache.cli import app
from featcache.data.sources import open_source
from featcache.errors import RunError, SourceError
from featcache.evaluation.features import LabeledFeatures, labeled_features
from featcache.evaluation.leakage import duplicate_groups, find_duplicates
from featcache.evaluation.metrics import compute_metrics, score_parts
from featcache.evaluation.protocol import Protocol
from featcache.evaluation.runner import fit_head
from featcache.extraction.extract import extract
from featcache.options import OptionError
from featcache.recipes import ExecutionPlan
from featcache.reporting.compare import _fmt, collect_runs, ensemble_rows
from featcache.store.entries import MANIFEST
from featcache.store.hashing import bytes_hash
from featcache.store.runs import read_metrics, read_predictions
from featcache.store.verify import verify_entry

from . import conftest
from .conftest import flip_one_feature_bit
from .fakes import FakeEntry

runner = CliRunner()


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def clinic(small_folder: Path, tmp_path: Path) -> Path:
    """A stranger's CSV: other column names, odd ids (a comma, a quote), a patient column named `case_id`."""
    rows = []
    for k, image in enumerate(sorted(small_folder.rglob("*.jpg"))):
        rows.append([f'pt {k // 2}, "visit" {k}', image.relative_to(small_folder).as_posix(), image.parent.name,
                     f"C{k // 2:03d}"])
    return _write_csv(small_folder / "clinic.csv", ["Photo ID", "File", "Diagnosis", "case_id"], rows)


def _cli(*args: str):
    return runner.invoke(app, list(args))


# --- 2. groups are never silently missing -------------------------------------------------------

@pytest.mark.parametrize("column", ["case_id", "CASE_ID", "Patient", "subject_id", "participant", "Lesion",
                                    "study_id"])
def test_group_columns_are_recognised_under_many_names_in_any_case(tmp_path, small_folder, column):
    image = next(small_folder.rglob("*.jpg"))
    csv_path = _write_csv(tmp_path / "x.csv", ["path", "label", column],
                          [[str(image), "a", "g1"], [str(image), "b", "g1"]])
    source = open_source(csv_path)
    assert source.group_column == column and source.has_groups


def test_group_col_names_any_column_and_refuses_a_missing_one(clinic, small_folder):
    source = open_source(clinic, image_col="File", label_col="Diagnosis", group_col="Photo ID")
    assert source.group_column == "Photo ID"
    with pytest.raises(SourceError, match="no column 'patient_no'.*case_id"):
        open_source(clinic, group_col="patient_no")
    with pytest.raises(SourceError, match="only a CSV manifest has"):
        open_source(small_folder / "melanoma", group_col="case_id")


def test_an_unrecognised_patient_column_is_named_as_a_suspect(tmp_path, small_folder):
    images = sorted(small_folder.rglob("*.jpg"))
    rows = [[str(p), p.parent.name, f"M-{k // 3}", str(40 + k % 2), str(300 + k % 4)] for k, p in enumerate(images)]
    source = open_source(_write_csv(tmp_path / "moles.csv", ["path", "label", "mole_ref", "age", "width"], rows))
    assert source.group_column is None and source.suspect_group_columns == ["mole_ref"]


@pytest.mark.slow
def test_cv_without_groups_says_so_in_the_protocol_metrics_and_compare(clinic, small_folder, tmp_path, lite0):
    cache = tmp_path / "cache"
    nogroup = _write_csv(small_folder / "plain.csv", ["path", "label"],
                         [[p.relative_to(small_folder).as_posix(), p.parent.name]
                          for p in sorted(small_folder.rglob("*.jpg"))])
    extract(open_source(nogroup), lite0, cache_root=cache, plan=ExecutionPlan(workers=0))
    out = _cli("fit", "--data", str(nogroup), "--cache", str(cache), "--head", "logreg", "--cv", "3")
    assert out.exit_code == 0, out.output
    assert "NOT grouped" in out.output and "UNGROUPED" in out.output
    (run,) = [r for r in (cache).glob("*/*/runs/logreg-*")]
    metrics = read_metrics(run)
    assert metrics["grouping"]["grouped"] is False and "UNGROUPED (no group column)" in metrics["protocol"]
    out = _cli("fit", "--data", str(nogroup), "--cache", str(cache), "--head", "logreg", "--cv", "3", "--no-groups")
    assert out.exit_code == 0 and "NOT grouped" not in out.output and "UNGROUPED (--no-groups)" in out.output
    out = _cli("compare", "--cache", str(cache))
    assert out.exit_code == 0 and "UNGROUPED" in out.output


@pytest.mark.slow
def test_the_case_id_column_groups_the_folds(clinic, tmp_path, lite0):
    source = open_source(clinic)
    entry = extract(source, lite0, cache_root=tmp_path / "cache", plan=ExecutionPlan(workers=0)).entry
    data = labeled_features(source, entry, "gap")
    assert data.grouping["grouped"] and data.grouping["column"] == "case_id"
    run = fit_head(data, entry, "logreg", "gap", Protocol(cv=3), source.name)
    oof = read_predictions(run)
    fold_of_case: dict[str, set] = {}
    for group, fold in zip(oof.groups, oof.folds, strict=True):
        fold_of_case.setdefault(group, set()).add(int(fold))
    assert len(fold_of_case) == 6 and all(len(f) == 1 for f in fold_of_case.values())
    assert "grouped stratified CV" in read_metrics(run)["protocol"]


# --- 1. run identity covers everything that sets a run's numbers --------------------------------

@pytest.mark.slow
def test_a_run_is_redone_when_labels_groups_or_an_image_change_and_only_then(clinic, small_folder, tmp_path, lite0):
    cache = tmp_path / "cache"

    def fit(csv_path: Path, classes: str | None = None) -> Path:
        source = open_source(csv_path)
        entry = extract(source, lite0, cache_root=cache, plan=ExecutionPlan(workers=0)).entry
        data = labeled_features(source, entry, "gap", classes=classes)
        return fit_head(data, entry, "logreg", "gap", Protocol(cv=2), source.name)

    first = fit(clinic)
    assert fit(clinic) == first  # identical: reused
    assert fit(clinic, classes="nevus,melanoma") == first  # same rows, same numbers: same run
    rows = list(csv.reader(open(clinic, newline="")))
    rows[1][2] = "nevus" if rows[1][2] == "melanoma" else "melanoma"  # one label changed
    relabelled = fit(_write_csv(clinic, rows[0], rows[1:]))
    assert relabelled != first
    rows[1][2] = rows[2][2]
    rows[1][3] = "C999"  # one group changed back the label, moved an image to another case
    regrouped = fit(_write_csv(clinic, rows[0], rows[1:]))
    assert regrouped not in (first, relabelled)
    image = small_folder / rows[3][1]
    Image.open(image).convert("RGB").rotate(90).save(image)  # an image replaced (and re-extracted)
    assert fit(clinic) not in (first, relabelled, regrouped)


# --- 3. leakage audit ---------------------------------------------------------------------------

@pytest.fixture
def with_copies(tmp_path: Path) -> Path:
    """40 real images plus a byte-identical copy and a re-saved (JPEG quality 85) copy of one nevus."""
    root = tmp_path / "copies"
    for label in ("melanoma", "nevus"):
        (root / label).mkdir(parents=True)
        for src in sorted((conftest.DEMO / "images" / label).glob("*.jpg"))[:20]:
            shutil.copy(src, root / label / src.name)
    original = sorted((root / "nevus").glob("*.jpg"))[0]
    shutil.copy(original, root / "nevus" / "copy_exact.jpg")
    Image.open(original).convert("RGB").save(root / "nevus" / "copy_resaved.jpg", quality=85)
    return root


@pytest.mark.slow
def test_the_audit_finds_identical_and_near_identical_images(with_copies, tmp_path, lite0):
    source = open_source(with_copies)
    entry = extract(source, lite0, cache_root=tmp_path, plan=ExecutionPlan(workers=0)).entry
    data = labeled_features(source, entry, "gap", groups="none")
    pairs = find_duplicates(data.X, data.sha256, 0.91)
    named = {(data.ids[a], data.ids[b]) for a, b in zip(pairs.first, pairs.second, strict=True)}
    original = sorted(i for i in data.ids if i.startswith("nevus/ISIC"))[0]
    copies = {"nevus/copy_exact.jpg", "nevus/copy_resaved.jpg"}
    assert pairs.n_exact == 1 and {frozenset(p) for p in named} == {
        frozenset({original, c}) for c in copies} | {frozenset(copies)}
    groups = duplicate_groups(len(data.ids), pairs)
    trio = [data.ids.index(i) for i in (original, *copies)]
    assert len(set(groups[trio])) == 1 and len(set(groups.tolist())) == len(data.ids) - 2 == 40


@pytest.mark.slow
def test_fit_reports_leaking_folds_and_near_duplicate_groups_remove_them(with_copies, tmp_path, lite0):
    cache = tmp_path / "cache"
    extract(open_source(with_copies), lite0, cache_root=cache, plan=ExecutionPlan(workers=0))
    common = ("fit", "--data", str(with_copies), "--cache", str(cache), "--head", "knn", "--cv", "3")
    out = _cli(*common)
    assert out.exit_code == 0, out.output
    assert "1 identical and 2 near-identical image pairs" in out.output and "--groups near-duplicates" in out.output
    leaky = [r for r in cache.glob("*/*/runs/knn-*")]
    assert read_metrics(leaky[0])["leakage"]["held_out_with_duplicate_in_train"] > 0
    out = _cli(*common, "--groups", "near-duplicates")
    assert out.exit_code == 0, out.output
    (grouped,) = [r for r in cache.glob("*/*/runs/knn-*") if r not in leaky]
    metrics = read_metrics(grouped)
    assert metrics["leakage"]["held_out_with_duplicate_in_train"] == 0
    assert "groups: near-duplicates, 40 groups of 42 images" in metrics["protocol"]


# --- 4. every option checked where it enters ----------------------------------------------------

@pytest.mark.parametrize("args, valid", [
    (["fit", "--split", "offical"], "cv"),
    (["fit", "--class-weight", "balance"], "balanced"),
    (["fit", "--use-views", "al"], "first"),
    (["fit", "--calibrate", "platt"], "isotonic"),
    (["fit", "--groups", "lesion"], "near-duplicates"),
    (["fit", "--resize", "squash"], "pad"),
    (["fit", "--views", "3"], "8"),
    (["compare", "--metric", "aurocc"], "balanced_accuracy"),
    (["extract", "--precision", "bf61"], "bf16"),
    (["extract", "--dtype", "float8"], "float16"),
    (["extract", "--device", "cdua"], "cuda:N"),
])
def test_a_wrong_option_value_exits_2_listing_the_valid_ones(args, valid, small_folder):
    data = [] if args[0] == "compare" else ["--data", str(small_folder)]
    out = _cli(*args, *data)
    assert out.exit_code == 2 and valid in out.output and "Traceback" not in out.output, out.output


def test_the_python_api_checks_the_same_values():
    with pytest.raises(OptionError, match="--split 'offical'.*official"):
        Protocol(split="offical")
    with pytest.raises(OptionError, match="--class-weight 'balance'"):
        Protocol(class_weight="balance")


@pytest.mark.slow
def test_unknown_class_names_are_named(clinic, tmp_path, lite0):
    source = open_source(clinic)
    entry = extract(source, lite0, cache_root=tmp_path, plan=ExecutionPlan(workers=0)).entry
    with pytest.raises(RunError, match="'melanom' not among the labels .*melanoma, nevus"):
        labeled_features(source, entry, "gap", classes="melanom,nevus")


# --- 5. statistics that match the protocol ------------------------------------------------------

def _toy(n: int = 120, seed: int = 0, groups: bool = False) -> LabeledFeatures:
    rng = np.random.default_rng(seed)
    y = np.array(["a", "b", "c"])[np.arange(n) % 3]
    X = rng.normal(size=(n, 6)) + (np.arange(n) % 3)[:, None] * 0.6
    g = np.array([f"g{k // 4}" for k in range(n)]) if groups else None
    return LabeledFeatures(X, y, g, None, [f"i{k}" for k in range(n)], ["a", "b", "c"])


@pytest.mark.slow
def test_seeds_are_all_pooled_with_their_spread(tmp_path):
    data = _toy()
    run = fit_head(data, FakeEntry(tmp_path), "mlp", "gap", Protocol(cv=3, seeds=3), "toy")
    metrics, oof = read_metrics(run), read_predictions(run)
    per_seed = [compute_metrics(oof.labels[oof.seeds == s], oof.proba[oof.seeds == s], oof.classes)
                for s in range(3)]
    values = [p["balanced_accuracy"] for p in per_seed]
    assert len(set(values)) > 1  # the seeds differ, so seed 0 alone would be another number
    assert metrics["pooled"]["balanced_accuracy"] == pytest.approx(np.mean(values))
    assert metrics["pooled"]["seeds"]["balanced_accuracy"]["values"] == pytest.approx(values)
    assert "x3 seeds" in metrics["protocol"]


def test_bootstrap_resamples_groups_when_there_are_groups():
    rng = np.random.default_rng(0)
    y = np.array(["a", "b"])[np.arange(400) % 2]
    # predictions right or wrong group by group (groups of 10): images of a group are not independent
    right = np.repeat(rng.random(40) < 0.7, 10)
    proba = np.where(right[:, None], np.eye(2)[np.arange(400) % 2], np.eye(2)[1 - np.arange(400) % 2]) * 0.8 + 0.1
    groups = np.array([f"g{k // 10}" for k in range(400)])
    plain = score_parts([(y, proba, None)], ["a", "b"])["ci95"]["balanced_accuracy"]
    grouped = score_parts([(y, proba, groups)], ["a", "b"])["ci95"]["balanced_accuracy"]
    assert grouped[1] - grouped[0] > 2 * (plain[1] - plain[0])


def test_an_official_split_shows_its_counts_and_no_fake_spread(tmp_path):
    data = _toy(90)
    data.splits = np.array(["train"] * 60 + ["val"] * 10 + ["test"] * 20)
    run = fit_head(data, FakeEntry(tmp_path), "logreg", "gap", Protocol(split="official"), "toy")
    metrics = read_metrics(run)
    assert metrics["split_counts"] == {"train": 60, "val": 10, "test": 20}
    assert metrics["protocol"] == "official split (train 60 / val 10 unused / test 20)"
    assert len(read_predictions(run).ids) == 20
    cell = _fmt({"mean": 0.5, "std": 0.0, "n_folds": metrics["n_folds"]})
    assert cell == "0.500 (one split)" and metrics["pooled"]["ci95"]["balanced_accuracy"][0] < 0.5 + 1e-9


@pytest.mark.slow
def test_every_run_has_per_class_auroc_and_compare_sorts_by_one(clinic, tmp_path, lite0):
    scores = compute_metrics(np.array(["a", "b", "c", "a"]), np.eye(3)[[0, 1, 2, 1]] * 0.7 + 0.1, ["a", "b", "c"])
    assert {"auroc:a", "auroc:b", "auroc:c"} <= set(scores)
    cache = tmp_path / "cache"
    extract(open_source(clinic), lite0, cache_root=cache, plan=ExecutionPlan(workers=0))
    assert _cli("fit", "--data", str(clinic), "--cache", str(cache), "--head", "logreg", "--cv", "3").exit_code == 0
    out = _cli("compare", "--cache", str(cache), "--metric", "auroc:melanoma")
    assert out.exit_code == 0 and "auroc:melanoma" in out.output, out.output
    out = _cli("compare", "--cache", str(cache), "--metric", "auroc:melanomma")
    assert out.exit_code != 0 and "melanoma, nevus" in out.output


# --- 6. files a person or program can trust -----------------------------------------------------

def test_ids_with_commas_and_quotes_survive_the_prediction_files_and_ensembles(tmp_path):
    data = _toy(60)
    data.ids = [f'img {k}, "left"\nview' for k in range(60)]
    entry_dir = tmp_path / "cache" / "toy" / "bb-0"
    entry_dir.mkdir(parents=True)
    runs = [fit_head(data, FakeEntry(entry_dir), head, "gap", Protocol(cv=3), "toy") for head in ("logreg", "knn")]
    assert sorted(read_predictions(runs[0]).ids) == sorted(data.ids)
    [row] = ensemble_rows(collect_runs(tmp_path / "cache"), "top2")
    assert row.n_images == 60


@pytest.mark.slow
def test_verify_catches_a_finite_bit_flip_through_the_feature_checksums(small_folder, tmp_path, lite0):
    entry = extract(open_source(small_folder), lite0, cache_root=tmp_path,
                    plan=ExecutionPlan(workers=0, shard_size=6)).entry
    assert verify_entry(entry.path, check_files=False).ok
    shard = flip_one_feature_bit(entry)
    report = verify_entry(entry.path, check_files=False)
    assert not report.ok and any("checksum" in f.what and f.where == shard.name for f in report.findings)


@pytest.mark.slow
def test_a_lost_manifest_is_rebuilt_and_nothing_is_extracted_or_counted_twice(small_folder, tmp_path, lite0):
    source = open_source(small_folder)
    entry = extract(source, lite0, cache_root=tmp_path, plan=ExecutionPlan(workers=0, shard_size=5)).entry
    manifest = json.loads((entry.path / MANIFEST).read_text())
    (entry.path / MANIFEST).unlink()
    report = verify_entry(entry.path)
    assert any(f.where == MANIFEST and "missing" in f.what for f in report.findings)
    repaired = verify_entry(entry.path, repair=True)
    assert "rebuilt manifest.json from the shards" in repaired.repaired
    rebuilt = json.loads((entry.path / MANIFEST).read_text())
    for key in ("fingerprint", "fingerprint_inputs", "pools", "dims", "dtype", "views", "n_images", "shards"):
        assert rebuilt[key] == manifest[key], key
    (entry.path / MANIFEST).unlink()
    again = extract(source, lite0, cache_root=tmp_path, plan=ExecutionPlan(workers=0, shard_size=5))
    assert again.extracted == 0 and again.skipped == 12
    assert json.loads((entry.path / MANIFEST).read_text())["n_images"] == 12
    assert again.entry.shard_paths() == entry.shard_paths()  # no shard written again


# --- input errors are messages, not tracebacks ---------------------------------------------------

@pytest.mark.slow
def test_predict_with_one_corrupt_image_predicts_the_rest(small_folder, tmp_path, lite0):
    cache = tmp_path / "cache"
    extract(open_source(small_folder), lite0, cache_root=cache, plan=ExecutionPlan(workers=0))
    assert _cli("fit", "--data", str(small_folder), "--cache", str(cache), "--head", "logreg", "--cv", "3",
                "--no-groups").exit_code == 0
    (run,) = cache.glob("*/*/runs/logreg-*")
    new = tmp_path / "new"
    new.mkdir()
    Image.new("RGB", (64, 48), (180, 120, 90)).save(new / "fine.jpg")
    (new / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = _cli("predict", "--run", str(run), str(new), "--out", str(tmp_path / "p.csv"), "--cache", str(cache))
    assert out.exit_code == 0 and "Traceback" not in out.output, out.output
    rows = {Path(r["id"]).name: r for r in csv.DictReader(open(tmp_path / "p.csv", newline=""))}
    assert rows["broken.jpg"]["predicted"].startswith("FAILED") and rows["fine.jpg"]["p_nevus"]


@pytest.mark.slow
def test_a_stranger_csv_fits_with_named_columns_and_too_few_images_for_knn_is_one_line(tmp_path, small_folder, lite0):
    rows = [[str(p), p.parent.name, f"P{k // 2}"] for k, p in enumerate(sorted(small_folder.rglob("*.jpg")))]
    befunde = _write_csv(tmp_path / "befunde.csv", ["Bild", "Befund", "PatientNr"], rows)
    cache = str(tmp_path / "cache")
    columns = ("--image-col", "bild", "--label-col", "BEFUND")
    assert _cli("extract", "--data", str(befunde), "--cache", cache, *columns, "-q").exit_code == 0
    out = _cli("fit", "--data", str(befunde), "--cache", cache, *columns, "--group-col", "patientnr",
               "--head", "logreg", "--cv", "3")
    assert out.exit_code == 0 and "groups: column 'PatientNr' (6 groups of 12 images)" in out.output, out.output
    out = _cli("fit", "--data", str(befunde), "--cache", cache, *columns, "--head", "knn", "--cv", "3")
    assert out.exit_code == 2 and "knn: 11 neighbours, but a training part has only 8 rows" in out.output


@pytest.mark.slow
def test_fit_on_a_shard_holding_inf_points_to_verify(small_folder, tmp_path, lite0):
    cache = tmp_path / "cache"
    entry = extract(open_source(small_folder), lite0, cache_root=cache, plan=ExecutionPlan(workers=0)).entry
    shard = entry.shard_paths()[0]
    with h5py.File(shard, "a") as h5:
        data = h5["features/gap"][()]
        data[3, 5] = np.inf  # as a backbone that overflowed would have written it: its checksum matches
        h5["features/gap"][...] = data
        h5.attrs["features_sha256"] = json.dumps({"gap": bytes_hash(data)}, sort_keys=True)
    out = _cli("fit", "--data", str(small_folder), "--cache", str(cache), "--head", "logreg", "--cv", "3")
    assert out.exit_code == 2 and "NaN/Inf" in out.output and "featcache verify --repair" in out.output


def test_compare_that_cannot_write_asks_for_out(tmp_path):
    data = _toy(60)
    entry_dir = tmp_path / "cache" / "toy" / "bb-0"
    entry_dir.mkdir(parents=True)
    fit_head(data, FakeEntry(entry_dir), "logreg", "gap", Protocol(cv=3), "toy")
    blocked = tmp_path / "not_a_folder"
    blocked.write_text("a file where the output folder should be")
    out = _cli("compare", "--cache", str(tmp_path / "cache"), "--out", str(blocked / "sub"))
    assert out.exit_code == 2 and "pass --out DIR" in out.output and "Traceback" not in out.output


# --- 7. tests that cannot quietly skip ----------------------------------------------------------

def test_missing_shared_data_fails_under_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="absent"):
        conftest.shared("no_such_data_set")
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception):
        conftest.shared("no_such_data_set")
