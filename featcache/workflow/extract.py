"""The extract workflow: a source's features once, answered without the backbone when every image is cached
(the warm path), on an exported engine without PyTorch when one serves (the lean path), else by the backbone;
several backbones from one decode of each image."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from featcache.options import OptionError
from featcache.progress import Reporter
from featcache.recipes import ExecutionPlan, FeatureRecipe
from featcache.workflow.common import cache_root, open_data, ray_cluster, reporter_for

if TYPE_CHECKING:
    from featcache.data.sources import ImageSource
    from featcache.extraction.result import ExtractResult


def extract_data(reporter: Reporter | None, o: dict[str, Any]) -> ExtractResult | list[ExtractResult]:
    from featcache.extraction.warm import engine_key, recipe_key, record_recipe, warm_result

    reporter = reporter_for(o["quiet"], reporter)
    source = open_data(o["data"], o["images"], o["image_col"], o["label_col"], o["group_col"], reporter,
                       labels_required=False)
    root = cache_root(o["cache"])
    recipe, plan = FeatureRecipe.from_options(o), ExecutionPlan.from_options(o)
    if "," in o["backbone"]:
        return _extract_several(source, root, reporter, o["backbone"], recipe, plan, o["ray"])
    key = lean_key = None
    if not o["ray"]:  # on a cluster the full path runs, always
        key = recipe_key(source, o["backbone"], recipe, plan)
        result = warm_result(source, root, key)  # every image cached: no backbone, no PyTorch
        if result is not None:
            reporter.result(result.summary())
            return result
        from featcache.extraction.lean import lean_extract

        lean_key = engine_key(o["backbone"], recipe, plan)
        result = lean_extract(source, root, lean_key, plan, reporter)  # an exported engine: no PyTorch either
        if result is not None:
            record_recipe(root, key, result, lean_key)
            reporter.result(result.summary())
            return result
    from featcache.extraction.extract import extract as run_extract

    plan = plan.but(cluster=ray_cluster(o["ray"], reporter, o["ray_actors"]))
    result = run_extract(source, o["backbone"], recipe, plan, root, reporter)
    record_recipe(root, key, result, lean_key)
    for note in result.notes[len(source.notes):]:
        reporter.info(note)
    reporter.result(result.summary())
    return result


def _extract_several(source: ImageSource, root: Path, reporter: Reporter, backbones: str, recipe: FeatureRecipe,
                     plan: ExecutionPlan, ray: str | None) -> list[ExtractResult]:
    """``backbone="a,b,c"``: every image decoded once for all of them, an entry each (as its single
    extraction makes it); answered from the recipes when every backbone has every image."""
    from featcache.extraction.warm import recipe_key, record_recipe, split_backbones, warm_result

    names = split_backbones(backbones)
    if ray:
        raise OptionError(f"backbone {backbones} with ray: one decode for several backbones runs on this machine; "
                          "drop ray, or extract one backbone at a time on the cluster")
    keys = [recipe_key(source, name, recipe, plan) for name in names]
    warm = [warm_result(source, root, key) for key in keys]
    if all(result is not None for result in warm):
        results = warm
    else:
        from featcache.extraction.multi import extract_many

        results = extract_many(source, names, root, recipe, plan, reporter)
        for key, result in zip(keys, results, strict=True):
            record_recipe(root, key, result)
    for result in results:
        reporter.result(result.summary())
    return results
