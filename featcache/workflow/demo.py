"""The demo workflow: melanoma vs nevus on the 200 CC0 ISIC images shipped in the package, extracted once and
fit with the fast heads and two baselines under 5-fold stratified CV."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from featcache.progress import Reporter
from featcache.recipes import FeatureRecipe

DEMO_BACKBONE = "efficientnet_lite0"
DEMO_HEADS = ("logreg", "svm-linear", "knn", "mlp", "majority", "stratified")


def demo_data_dir() -> Path:
    return Path(str(resources.files("featcache") / "data" / "isic_cc0_demo200"))


def run_demo(cache_root: Path, reporter: Reporter, heads: tuple[str, ...] = DEMO_HEADS) -> list[Path]:
    """The demo's runs, extracting and fitting what the cache does not hold yet."""
    from featcache.data.sources import open_source
    from featcache.evaluation.fitting import fit_many
    from featcache.evaluation.protocol import Protocol, RunRecipe
    from featcache.extraction.extract import extract

    source = open_source(demo_data_dir())
    reporter.info(f"featcache demo: {len(source.records)} ISIC images (CC0), melanoma vs nevus, "
                  f"backbone {DEMO_BACKBONE} (ImageNet weights, offline)")
    result = extract(source, DEMO_BACKBONE, FeatureRecipe(), cache_root=cache_root, reporter=reporter)
    if result.extracted == 0:
        reporter.info(f"features reused from the cache ({result.skipped} images): {result.entry.path}")
    else:
        reporter.info(result.summary())
    return fit_many(source, result.entry, RunRecipe(heads, Protocol(cv=5)), reporter=reporter)
