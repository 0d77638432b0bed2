"""The audit workflow: what can be wrong with a dataset, read from the out-of-fold probabilities of heads fit as
``fit`` fits them (suspected label errors, identical and near-identical images, outliers), and its page."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from featcache.option_checks import CHECKS
from featcache.options import OptionError, checked_options
from featcache.progress import Reporter
from featcache.workflow.common import cache_root, open_data, reporter_for
from featcache.workflow.fit import fit_data
from featcache.workflow.results import Run


def audit_data(reporter: Reporter | None, options: dict[str, Any], heads: tuple[str, ...],
               out: str | Path | None) -> Path:
    """Audit the data of the checked audit ``options`` with ``heads`` (checked); the folder written to ``out``
    (default: ``<cache>/audit-<dataset>``)."""
    import numpy as np

    from featcache.evaluation.dataset_audit import audit_dataset, lone_class_rows, scored_part, write_audit
    from featcache.evaluation.features import label_counts, labeled_features
    from featcache.reporting.audit_page import write_audit_page
    from featcache.store.fusion import FusedEntry, trained_entry
    from featcache.store.model_files import load_model

    o = options
    reporter = reporter_for(o["quiet"], reporter)
    selection = {k: o[k] for k in ("images", "image_col", "label_col", "group_col", "backbone", "pool", "preprocess",
                                   "engine", "resampler", "precision", "views", "resize", "cv", "groups", "split",
                                   "cache")}
    source = open_data(o["data"], o["images"], o["image_col"], o["label_col"], o["group_col"], reporter,
                   groups=o["groups"])
    # a class too small to cross-validate (one image: often a typo) is what an audit is for: it is listed, and
    # the models are fit on the other classes
    counts = label_counts(source, None, ",".join(o["classes"] or ()))
    lone = {label for label, n in counts.items() if n < o["cv"]} if o["split"] == "cv" else set()
    classes = [c for c in (o["classes"] or sorted(counts)) if c not in lone]
    if len(classes) < 2:
        raise OptionError(f"audit: {len(classes)} class(es) have {o['cv']} or more images; an audit needs two")
    asked = {"data": o["data"], "heads": heads, "quiet": o["quiet"], **selection,
             "classes": classes if lone or o["classes"] else None}
    runs = [Run(path) for path in fit_data(reporter, checked_options("fit", asked, checks=CHECKS))]
    saved = load_model(runs[0].path)
    entry = trained_entry(runs[0].path, saved)  # the features the heads saw (a fused run: every backbone's)
    data = labeled_features(source, entry, None if isinstance(entry, FusedEntry) else saved["pool"],
                            classes=",".join(classes), groups=o["groups"])
    first = [run.oof[run.oof["seed"] == 0].set_index("id") for run in runs]
    scored = np.isin(data.ids, first[0].index)  # a single split scores its held-out part only
    data = scored_part(data, scored) if not scored.all() else data
    first = [f.loc[data.ids] for f in first]
    oof = np.mean([f.filter(like="p_").to_numpy() for f in first], axis=0)  # the same folds for every head
    lone_rows = lone_class_rows([r.id for r in source.records if r.label in lone],
                                [r.label for r in source.records if r.label in lone], counts, o["cv"])
    found = audit_dataset(data, oof, first[0]["fold"].to_numpy(), lone_rows)
    folder = Path(out) if out else cache_root(o["cache"]) / f"audit-{source.name}"
    files = write_audit(found, folder)
    files["html"] = write_audit_page(found, source, folder / "audit.html")
    warning = found.weak_warning()
    if warning:
        reporter.warn(warning)
    reporter.result(f"{found.sentence()} -> {folder}")
    return folder
