"""Issue 26: a warm `extract` (every image cached) answers without loading a backbone or PyTorch, and
never serves an entry that no longer matches."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from featcache import api
from featcache.option_checks import CHECKS
from featcache.workflow.extract import extract_data

pytestmark = pytest.mark.slow  # real extractions

PROBE = """
import json, sys
import featcache.api as api
entry = api.extract({data!r}, cache={cache!r}, workers=0, quiet=True{extra})
print(json.dumps({{"torch": "torch" in sys.modules, "entry": str(entry.path), "ids": len(entry.ids)}}))
"""


def _extract_in_a_fresh_process(data: Path, cache: Path, extra: str = "") -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE.format(data=str(data), cache=str(cache), extra=extra)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_warm_extract_imports_no_torch_and_names_the_same_entry(small_folder, tmp_path):
    cache = tmp_path / "cache"
    first = _extract_in_a_fresh_process(small_folder, cache)
    assert first["torch"] and first["ids"] == 12
    warm = _extract_in_a_fresh_process(small_folder, cache)
    assert not warm["torch"] and warm["entry"] == first["entry"] and warm["ids"] == 12
    # another option that names another entry: the full path, a new entry
    other = _extract_in_a_fresh_process(small_folder, cache, ", dtype='float32'")
    assert other["torch"] and other["entry"] != first["entry"]


def test_a_changed_image_or_a_stale_recipe_takes_the_full_path(small_folder, tmp_path, photo):
    cache = tmp_path / "cache"
    api.extract(str(small_folder), cache=str(cache), workers=0, quiet=True)
    changed = next((small_folder / "nevus").glob("*.jpg"))
    photo.rotate(90).save(changed)  # new content: must be extracted again
    result = extract_data(None, _options(small_folder, cache))
    assert result.extracted == 1 and result.skipped == 11
    # a recipe pointing at an entry whose manifest says another fingerprint is not followed
    (recipe,) = [p for p in (cache / ".warm").glob("*.json") if isinstance(json.loads(p.read_text())["entry"], str)]
    recorded = json.loads(recipe.read_text())
    recipe.write_text(json.dumps({**recorded, "fingerprint": "0" * 16}))
    again = extract_data(None, _options(small_folder, cache))
    assert again.entry.fingerprint == recorded["fingerprint"] and again.skipped == 12
    assert json.loads(recipe.read_text())["fingerprint"] == recorded["fingerprint"]  # written again


def test_a_replaced_weights_file_changes_the_recipe(small_folder, tmp_path):
    from featcache.data.sources import open_source
    from featcache.extraction.warm import recipe_key
    from featcache.recipes import ExecutionPlan, FeatureRecipe

    weights = tmp_path / "w.pth"
    weights.write_bytes(b"one")
    source = open_source(small_folder)
    recipe = FeatureRecipe(weights=str(weights))
    before = recipe_key(source, "resnet18", recipe, ExecutionPlan())
    weights.write_bytes(b"two!")
    assert recipe_key(source, "resnet18", recipe, ExecutionPlan()) != before
    assert recipe_key(source, "resnet18", recipe, ExecutionPlan(rehash=True)) is None
    assert recipe_key(source, "resnet18", recipe.but(preprocess=("dataset-norm",)), ExecutionPlan()) is None


def _options(data: Path, cache: Path) -> dict:
    from featcache.options import options_for

    values = {o.name: o.checked(None, command="extract", checks=CHECKS)
              for o in options_for("extract") if not o.required}
    return {**values, "data": str(data), "cache": str(cache), "workers": 0, "quiet": True}
