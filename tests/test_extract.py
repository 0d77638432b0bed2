"""Extraction: exact features, bad input, resume after SIGKILL, no stale cache hits, the lock."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from featcache.backbones import weights as W
from featcache.backbones.models import load_backbone
from featcache.data.sources import open_source
from featcache.errors import EntryLocked, FeatcacheError, WeightsUnavailable
from featcache.extraction.extract import extract
from featcache.recipes import ExecutionPlan, FeatureRecipe
from featcache.store.entries import CacheEntry, EntryLock

from .conftest import shared


@pytest.mark.slow
def test_features_equal_plain_timm_forward(tmp_path, lite0):
    """Cached features == timm's own model + timm's own eval transform, to fp16 precision."""
    source = open_source(shared("ham70"))
    source.records = source.records[::10]  # 7 real 600x450 images, one per class
    result = extract(source, lite0, cache_root=tmp_path, plan=ExecutionPlan(workers=0))
    cached = result.entry.read("gap", [r.id for r in source.records])

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    model.load_state_dict(lite0.model.net.state_dict())
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    with torch.inference_mode():
        batch = torch.stack([transform(Image.open(r.path).convert("RGB")) for r in source.records])
        expected = model.forward_head(model.forward_features(batch), pre_logits=True).numpy()
    assert result.entry.manifest["dtype"] == "float16"
    np.testing.assert_allclose(cached, expected, rtol=2e-3, atol=2e-3)


@pytest.mark.slow
def test_bad_inputs_are_listed_and_the_run_continues(small_folder, lite0, tmp_path):
    bad = small_folder / "nevus"
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "notes.jpg").write_text("not an image")
    good = next(bad.glob("ISIC*.jpg")).read_bytes()
    (bad / "truncated.jpg").write_bytes(good[: len(good) // 3])
    Image.new("RGBA", (40, 30), (10, 200, 10, 128)).save(bad / "alpha ü space.png")
    Image.fromarray(np.full((20, 20), 40000, np.uint16)).save(bad / "sixteen.png")
    Image.new("RGB", (1, 1)).save(bad / "one.png")
    result = extract(open_source(small_folder), lite0, cache_root=tmp_path, plan=ExecutionPlan(workers=1, shard_size=4))
    assert set(result.failed) == {"nevus/empty.jpg", "nevus/notes.jpg", "nevus/truncated.jpg"}
    assert "empty file" in result.failed["nevus/empty.jpg"]
    assert result.extracted == 15 and "nevus/alpha ü space.png" in result.entry.ids
    manifest_failed = result.entry.manifest["failed"]
    assert set(manifest_failed) == set(result.failed)
    # A rerun extracts nothing: failures are remembered until the file changes.
    again = extract(open_source(small_folder), lite0, cache_root=tmp_path, plan=ExecutionPlan(workers=0))
    assert (again.extracted, again.skipped) == (0, 18)
    shutil.copy(next(small_folder.glob("melanoma/*.jpg")), bad / "empty.jpg")
    fixed = extract(open_source(small_folder), lite0, cache_root=tmp_path, plan=ExecutionPlan(workers=0))
    assert fixed.extracted == 1 and "nevus/empty.jpg" in fixed.entry.ids


@pytest.mark.slow
def test_changed_image_is_reextracted_never_served_stale(small_folder, lite0, tmp_path):
    source = open_source(small_folder)
    first = extract(source, lite0, cache_root=tmp_path, plan=ExecutionPlan(workers=0))
    target = source.records[0]
    before = first.entry.read("gap", [target.id])
    Image.open(target.path).rotate(90).save(target.path, format="JPEG")
    second = extract(open_source(small_folder), lite0, cache_root=tmp_path, plan=ExecutionPlan(workers=0))
    assert second.extracted == 1 and second.entry.path == first.entry.path
    assert not np.allclose(second.entry.read("gap", [target.id]), before)


@pytest.mark.slow
def test_weights_file_or_input_size_change_makes_a_new_entry(small_folder, lite0, tmp_path):
    source = open_source(small_folder)
    base = extract(source, lite0, cache_root=tmp_path, plan=ExecutionPlan(workers=0)).entry.path
    resized = extract(source, lite0, cache_root=tmp_path, recipe=FeatureRecipe(input_size=192),
                      plan=ExecutionPlan(workers=0))
    assert resized.entry.path != base and resized.extracted == 12
    state = {k: v.clone() for k, v in lite0.model.net.state_dict().items()}
    state["conv_head.weight"] *= 1.01
    weights_file = tmp_path / "lite0-finetuned.pth"
    torch.save(state, weights_file)
    other = extract(source, "efficientnet_lite0", cache_root=tmp_path, recipe=FeatureRecipe(weights=str(weights_file)),
                    plan=ExecutionPlan(workers=0))
    assert other.entry.path not in (base, resized.entry.path) and other.extracted == 12
    assert "lite0-finetuned.pth" in other.entry.manifest["provenance"]["weights_origin"]


def test_published_hash_mismatch_and_offline_message(tmp_path, monkeypatch):
    fake = tmp_path / "resnet18-f37072fd.pth"
    torch.save({"x": torch.zeros(1)}, fake)
    with pytest.raises(WeightsUnavailable, match="does not match the published f37072fd"):
        load_backbone("resnet18", weights=str(fake))
    monkeypatch.setattr(W, "host_resolves", lambda host, timeout=3.0: False)
    with pytest.raises(WeightsUnavailable) as info:
        load_backbone("resnet50")
    message = str(info.value)
    assert "\n" not in message and "resnet50-0676ba61.pth" in message and "FEATCACHE_WEIGHTS_DIR" in message


def test_second_writer_is_refused_with_the_holder(tmp_path):
    entry = tmp_path / "entry"
    code = ("import sys, time; from pathlib import Path; from featcache.store.entries import EntryLock\n"
            "with EntryLock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(30)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(entry)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(EntryLocked, match=f"pid {holder.pid}"):
            with EntryLock(entry):
                pass
    finally:
        holder.kill()
        holder.wait()
    with EntryLock(entry):  # the holder was SIGKILLed: the lock is free again
        pass


def _extract_cmd(data: Path, cache: Path, precision: str = "auto") -> list[str]:
    return [sys.executable, "-m", "featcache.cli", "extract", "--data", str(data), "--cache", str(cache),
            "--backbone", "efficientnet_lite0", "--shard-size", "8", "--batch-size", "4", "--workers", "1", "-q",
            "--precision", precision]


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["auto", "int8"])
def test_sigkill_then_rerun_gives_exactly_the_uninterrupted_features(tmp_path, precision):
    data = shared("ham70")
    reference = tmp_path / "reference"
    subprocess.run(_extract_cmd(data, reference, precision), check=True, timeout=600)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_extract_cmd(data, killed, precision))
    deadline = time.time() + 300
    while time.time() < deadline and len(list(killed.glob("*/*/shard-*.h5"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = len(list(killed.glob("*/*/shard-*.h5")))
    assert 3 <= committed < 9, "the kill should land part-way"
    (entry_dir,) = list(killed.glob("*/*/"))
    done_before = len(CacheEntry(entry_dir).ids)
    rerun = subprocess.run(_extract_cmd(data, killed, precision), check=True, capture_output=True, text=True,
                           timeout=600)
    assert f"{70 - done_before} extracted" in rerun.stdout.replace("\n", " ")
    assert not list(entry_dir.glob(".*.tmp-*")), "no temporary file survives"
    a, b = CacheEntry(entry_dir), CacheEntry(next(reference.glob("*/*/")))
    assert a.fingerprint == b.fingerprint and sorted(a.ids) == sorted(b.ids)
    np.testing.assert_array_equal(a.read("gap", b.ids), b.read("gap", b.ids))


@pytest.mark.slow
def test_reader_chunks_and_memmaps_agree(small_folder, lite0, tmp_path):
    entry = extract(open_source(small_folder), lite0, cache_root=tmp_path,
                    plan=ExecutionPlan(workers=0, shard_size=5)).entry
    whole = entry.read("gap")
    chunks = np.concatenate([x for _, x in entry.iter_chunks("gap", chunk_rows=4)])
    mapped = np.concatenate(entry.memmaps("gap")).astype("float32")
    assert len(entry.shard_paths()) >= 2  # shards close on batch boundaries
    np.testing.assert_array_equal(whole, chunks)
    np.testing.assert_array_equal(whole, mapped)


def test_resampler_torch_is_its_own_entry_and_test_data_follows_it(small_folder, tmp_path):
    from featcache.extraction.extract import extract_like

    source = open_source(small_folder)
    # 192 px: the sample's 341x256 photos are really resampled (at 224 the resize would be the identity)
    recipe, plan = FeatureRecipe(engine="torch", input_size=192, dtype="float32"), ExecutionPlan(workers=0)
    pil = extract(source, "squeezenet1_1", recipe, plan, tmp_path).entry
    fast = extract(source, "squeezenet1_1", recipe.but(resampler="torch"), plan, tmp_path).entry
    assert fast.fingerprint != pil.fingerprint
    assert fast.manifest["fingerprint_inputs"]["preprocess"]["resampler"] == "torch"
    a, b = pil.read("gap"), fast.read("gap", pil.ids)
    cosine = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    assert cosine.min() > 0.99 and not np.array_equal(a, b)  # nearly the same pixels, not the same
    test_folder = tmp_path / "test"
    shutil.copytree(small_folder / "nevus", test_folder / "nevus")
    like = extract_like(open_source(test_folder), fast, tmp_path).entry  # as predict and --test-data do
    # the same resampler and input size (the input size was dropped here before: test features at 224 px)
    assert like.manifest["fingerprint_inputs"] == fast.manifest["fingerprint_inputs"]
    with pytest.raises(FeatcacheError, match="--resampler 'cv2': not a valid value; choose one of pil, torch"):
        FeatureRecipe(resampler="cv2")


def test_the_accelerator_driver_runs_on_the_cpu_with_bf16_autocast(small_folder, tmp_path):
    """The accelerator path (the loader's pinning, the copy to the device, autocast at the entry's precision) is the
    path every forward takes; on the CPU, bf16 autocast runs it here as it runs on a GPU."""
    from dataclasses import replace

    from featcache.extraction.device import Accelerator
    from featcache.extraction.extract import _local_batches, name_entry

    source = open_source(small_folder)
    model = load_backbone("squeezenet1_1")
    plan = ExecutionPlan(workers=0, batch_size=4)
    named = name_entry(source, model, tmp_path, FeatureRecipe(engine="torch"), plan)
    assert named.accelerator == Accelerator(torch.device("cpu"), "fp32") and not named.accelerator.pin_memory
    assert Accelerator(torch.device("cuda"), "bf16").pin_memory  # what a GPU's loader pins

    def features(entry) -> np.ndarray:
        rows = [(item["index"], feats["gap"][k]) for items, feats in _local_batches(source.records, model, entry, plan,
                                                                                    tmp_path)
                for k, item in enumerate(items)]
        return np.stack([f for _, f in sorted(rows, key=lambda r: r[0])])

    fp32 = features(named)
    bf16 = features(replace(named, precision="bf16"))
    assert fp32.shape == bf16.shape == (12, 512)
    cosine = (fp32 * bf16).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(bf16, axis=1)
    assert cosine.min() > 0.99 and not np.array_equal(fp32, bf16)  # autocast ran: close, not the same
