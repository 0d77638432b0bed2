"""Issue 35: the field's foundation models as backbones (transformers ``hf:``, ``open_clip:``) and a zero-shot head.

No weights of the real models exist here, so every check runs on tiny random models that the libraries build
and save themselves: featcache must give exactly what the library's own preprocessing and forward give.
"""

from __future__ import annotations

import json
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import featcache as fc
from featcache.cli import app
from featcache.store.entries import CacheEntry

transformers = pytest.importorskip("transformers")
open_clip = pytest.importorskip("open_clip")

TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
WORDS = ["[UNK]", "[PAD]", "[EOS]", "a", "skin", "image", "of", "melanoma", "nevus", "dermoscopy", "photo", "mole"]
# odd sizes on purpose: after the resize the margins of the centre crop are odd (64 x 78 -> 32 x 39: 7 pixels),
# where transformers' crop corner (truncated) and torchvision's (rounded) fall a pixel apart
SIZES = [(64, 78), (45, 39), (100, 60), (33, 71), (50, 50), (80, 64)]


def _tokenizer(folder: Path) -> None:
    """A word-level tokenizer of :data:`WORDS`, saved as transformers saves any tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]",
                            eos_token="[EOS]").save_pretrained(folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random CLIP, SigLIP and DINOv2 (transformers) and a tiny open_clip CLIP, each saved by its library."""
    from transformers import (
        BitImageProcessor,
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        Dinov2Config,
        Dinov2Model,
        SiglipConfig,
        SiglipImageProcessor,
        SiglipModel,
    )

    root = tmp_path_factory.mktemp("models")
    vision = dict(TOWER, image_size=32, patch_size=8)
    text = dict(TOWER, vocab_size=len(WORDS), max_position_embeddings=16, eos_token_id=2, pad_token_id=1,
                bos_token_id=2)
    torch.manual_seed(0)
    made = {
        "clip": (CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=16)),
                 CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})),
        "siglip": (SiglipModel(SiglipConfig(vision_config=vision, text_config=text)),
                   SiglipImageProcessor(size={"height": 32, "width": 32})),
        "dinov2": (Dinov2Model(Dinov2Config(**vision)),
                   BitImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32},
                                     image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])),
    }
    folders = {}
    for name, (model, processor) in made.items():
        folders[name] = root / name
        model.eval().save_pretrained(folders[name])
        processor.save_pretrained(folders[name])
        if name != "dinov2":
            _tokenizer(folders[name])
    # open_clip: a model config of its own, the model built by open_clip and saved as open_clip saves for the hub
    config = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8,
                                              "head_width": 16},
              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
    (root / "tiny-featcache.json").write_text(json.dumps(config))
    open_clip.add_model_config(root / "tiny-featcache.json")
    from open_clip.push_to_hf_hub import save_for_hf

    model = open_clip.create_model("tiny-featcache").eval()
    folders["open_clip"] = root / "open_clip"
    # its text side uses open_clip's own CLIP tokenizer (shipped with open_clip): nothing of it to save
    save_for_hf(model, types.SimpleNamespace(save_pretrained=lambda _: None), config, folders["open_clip"],
                safe_serialization=True)
    return folders


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(1)
    for k, (w, h) in enumerate(SIZES):
        label = ("melanoma", "nevus")[k % 2]
        (root / label).mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / label / f"img{k}.png")
    return root


def _library_forward(kind: str, folder: Path, photos: list[Image.Image]) -> dict[str, np.ndarray]:
    """What the library itself gives: its own processor, its own forward (each pooling as the model offers it)."""
    from transformers import AutoImageProcessor, AutoModel

    model = AutoModel.from_pretrained(folder).eval()
    x = AutoImageProcessor.from_pretrained(folder)(images=photos, return_tensors="pt").pixel_values
    with torch.inference_mode():
        if kind == "dinov2":
            out = model(pixel_values=x)
            return {"cls": out.pooler_output.numpy(), "mean": out.last_hidden_state[:, 1:].mean(1).numpy()}
        embedding = model.get_image_features(pixel_values=x)
        embedding = getattr(embedding, "pooler_output", embedding)  # transformers 5 returns the output object
        tokens = model.vision_model(pixel_values=x).last_hidden_state
        found = {"embed": embedding.numpy(), "mean": (tokens[:, 1:] if kind == "clip" else tokens).mean(1).numpy()}
        if kind == "clip":
            found["cls"] = model.vision_model(pixel_values=x).pooler_output.numpy()
        return found


@pytest.mark.parametrize("kind", ["clip", "siglip", "dinov2"])
def test_an_hf_folder_gives_the_library_s_own_features(kind, models, images, tmp_path):
    pools = {"clip": ["embed", "cls", "mean"], "siglip": ["embed", "mean"], "dinov2": ["cls", "mean"]}[kind]
    entry = fc.extract(images, backbone=f"hf:{models[kind]}", pools=pools, dtype="float32", cache=tmp_path / "c",
                       quiet=True)
    ids = CacheEntry(entry.path).ids
    expected = _library_forward(kind, models[kind], [Image.open(images / i).convert("RGB") for i in ids])
    assert set(expected) == set(pools)
    for pool in pools:
        np.testing.assert_allclose(CacheEntry(entry.path).read(pool, ids), expected[pool], atol=1e-4, rtol=0)
    preprocess = entry.manifest["fingerprint_inputs"]["preprocess"]
    # the processor's own geometry and resizer: transformers' default processors resize tensors with torchvision
    assert preprocess["resampler"] == "torch" and preprocess["crop_corner"] == "floor"
    assert preprocess.get("resize_mode", "crop") == ("full" if kind == "siglip" else "crop")
    assert entry.manifest["provenance"]["weights_origin"].startswith(f"dir:{models[kind]} sha256:")


def test_an_open_clip_folder_gives_encode_image_on_open_clip_s_transform(models, images, tmp_path):
    entry = fc.extract(images, backbone=f"open_clip:{models['open_clip']}", pools=["embed", "mean"],
                       dtype="float32", cache=tmp_path / "c", quiet=True)
    model, _, transform = open_clip.create_model_and_transforms(f"local-dir:{models['open_clip']}")
    ids = CacheEntry(entry.path).ids
    with torch.inference_mode():
        expected = model.eval().encode_image(torch.stack([transform(Image.open(images / i)) for i in ids])).numpy()
    np.testing.assert_allclose(CacheEntry(entry.path).read("embed", ids), expected, atol=1e-4, rtol=0)


def test_a_changed_weights_file_makes_a_new_entry_and_a_wrong_checksum_is_refused(models, images, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    first = fc.extract(images, backbone=f"hf:{models['dinov2']}", cache=tmp_path / "c", quiet=True)
    copy = tmp_path / "dinov2-tuned"
    shutil.copytree(models["dinov2"], copy)
    weights = load_file(copy / "model.safetensors")
    name = next(k for k in weights if k.endswith("layernorm.weight"))
    weights[name] = weights[name] * 1.01
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    second = fc.extract(images, backbone=f"hf:{models['dinov2']}", weights=str(copy), cache=tmp_path / "c",
                        quiet=True)
    assert second.fingerprint != first.fingerprint and second.path != first.path
    from featcache.extraction.extract import backbone_of

    # predict and explain load an entry's backbone again: from the folder given at extraction, checked
    assert backbone_of(CacheEntry(second.path)).weights_sha256 == second.manifest["fingerprint_inputs"][
        "weights_sha256"]
    (copy / "SHA256SUMS").write_text(f"{'0' * 64}  model.safetensors\n")
    with pytest.raises(Exception, match="does not match SHA256SUMS"):
        fc.extract(images, backbone=f"hf:{copy}", cache=tmp_path / "c", quiet=True)


def test_zero_shot_is_the_model_s_own_image_text_softmax_under_the_fit_protocol(models, images, tmp_path):
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    from featcache.store.runs import read_predictions

    cache = tmp_path / "c"
    fc.extract(images, backbone=f"hf:{models['clip']}", cache=cache, dtype="float32", quiet=True)
    zero, logreg = fc.fit(images, backbone=f"hf:{models['clip']}", heads=["zero-shot", "logreg"], cv=2, cache=cache,
                          no_groups=True, quiet=True, prompt_template="a dermoscopy image of {}")
    oof = read_predictions(zero.path)
    photos = [Image.open(images / i).convert("RGB") for i in oof.ids]
    model = AutoModel.from_pretrained(models["clip"]).eval()
    tokens = AutoTokenizer.from_pretrained(models["clip"])(
        ["a dermoscopy image of melanoma", "a dermoscopy image of nevus"], padding=True, return_tensors="pt")
    pixels = AutoImageProcessor.from_pretrained(models["clip"])(images=photos, return_tensors="pt").pixel_values
    with torch.inference_mode():
        logits = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                       pixel_values=pixels).logits_per_image
    # CLIP's own zero-shot probabilities, image by image, out of fold (nothing was learnt, so every fold agrees)
    np.testing.assert_allclose(oof.proba, logits.softmax(dim=1).numpy(), atol=1e-4)
    assert zero.metrics["config"]["zero_shot"]["prompts"] == {"melanoma": ["a dermoscopy image of melanoma"],
                                                              "nevus": ["a dermoscopy image of nevus"]}
    assert "balanced_accuracy" in zero.metrics["pooled"] and logreg.path != zero.path
    card = (zero.path / "MODEL_CARD.md").read_text()
    assert '"a dermoscopy image of melanoma"' in card and "Nothing was learnt" in card
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"melanoma": ["a melanoma", "a dermoscopy image of melanoma"]}))
    other = fc.fit(images, backbone=f"hf:{models['clip']}", heads=["zero-shot"], cv=2, cache=cache, no_groups=True,
                   quiet=True, prompts=str(prompts))[0]
    assert other.path != zero.path  # other prompts, another run
    assert other.metrics["config"]["zero_shot"]["prompts"]["melanoma"] == ["a melanoma",
                                                                           "a dermoscopy image of melanoma"]
    rows = fc.compare(cache=cache).rows
    # the model's own preprocessing (transformers' torch resizer) is no variant to label the runs with
    assert {r.head for r in rows} == {"logreg", "zero-shot"}
    prompts.write_text(json.dumps({"melanomaa": "a melanoma"}))
    with pytest.raises(Exception, match="names class 'melanomaa'"):
        fc.fit(images, backbone=f"hf:{models['clip']}", heads=["zero-shot"], cv=2, cache=cache, no_groups=True,
               quiet=True, prompts=str(prompts))
    with pytest.raises(Exception, match="fit it without pca"):  # the Python spelling of --pca
        fc.fit(images, backbone=f"hf:{models['clip']}", heads=["zero-shot"], cv=2, cache=cache, no_groups=True,
               quiet=True, pca=2)


def test_zero_shot_on_open_clip_and_what_it_refuses(models, images, tmp_path):
    cache = tmp_path / "c"
    fc.extract(images, backbone=f"open_clip:{models['open_clip']}", pools=["embed", "mean"], cache=cache, quiet=True)
    run = fc.fit(images, backbone=f"open_clip:{models['open_clip']}", heads=["zero-shot"], cv=2, cache=cache,
                 no_groups=True, quiet=True)[0]
    assert 0 <= run.metrics["pooled"]["balanced_accuracy"] <= 1
    with pytest.raises(Exception, match="fit it on the 'embed' pooling"):
        fc.fit(images, backbone=f"open_clip:{models['open_clip']}", pool="mean", heads=["zero-shot"], cv=2,
               cache=cache, no_groups=True, quiet=True)
    fc.extract(images, backbone=f"hf:{models['dinov2']}", cache=cache, quiet=True)
    with pytest.raises(Exception, match="has no text tower"):
        fc.fit(images, backbone=f"hf:{models['dinov2']}", heads=["zero-shot"], pool="cls", cv=2, cache=cache,
               no_groups=True, quiet=True)
    no_vocabulary = tmp_path / "clip-without-tokenizer"
    no_vocabulary.mkdir()
    for file in ("config.json", "model.safetensors", "preprocessor_config.json"):
        (no_vocabulary / file).write_bytes((models["clip"] / file).read_bytes())
    fc.extract(images, backbone=f"hf:{no_vocabulary}", cache=cache, quiet=True)
    with pytest.raises(Exception, match="no tokenizer files"):  # never an empty tokenizer's meaningless scores
        fc.fit(images, backbone=f"hf:{no_vocabulary}", heads=["zero-shot"], cv=2, cache=cache, no_groups=True,
               quiet=True)


def test_a_hub_id_offline_fails_in_seconds_with_one_line(images, tmp_path, monkeypatch):
    from featcache.backbones import weights as W

    monkeypatch.setattr(W, "host_resolves", lambda host, timeout=3.0: False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty cache: nothing downloaded before
    started = time.perf_counter()
    out = CliRunner().invoke(app, ["extract", "--backbone", "monet", "--data", str(images), "--cache",
                                   str(tmp_path / "c")])
    assert time.perf_counter() - started < 10
    assert out.exit_code == 2 and "Traceback" not in out.output
    message = out.output.strip()
    assert message.count("\n") <= 1 and "cannot reach huggingface.co" in message
    assert "chanwkim/monet" in message and "--weights" in message and "FEATCACHE_WEIGHTS_DIR" in message
    out = CliRunner().invoke(app, ["extract", "--backbone", "dinov3_vits16", "--data", str(images)])
    assert out.exit_code == 2 and "gated" in out.output and "DINOv3 License" in out.output


def test_engines_export_and_the_registry_say_what_these_models_are(models, images, tmp_path):
    from featcache.deploy.head_graph import refusal

    out = CliRunner().invoke(app, ["extract", "--backbone", f"hf:{models['dinov2']}", "--data", str(images),
                                   "--engine", "openvino", "--cache", str(tmp_path / "c")])
    assert out.exit_code == 2 and "runs on PyTorch only" in out.output and "--engine torch" in out.output
    assert "runs on PyTorch only" in refusal({"backbone": f"hf:{models['dinov2']}", "head": "logreg"})
    listed = CliRunner().invoke(app, ["backbones"], env={"COLUMNS": "400"}).output
    for name in ("dermlip_vitb16", "dermlip_panderm", "monet", "panderm_large", "medsiglip_448", "biomedclip",
                 "dinov3_vits16", "dinov3_vitb16", "dinov3_vitl16", "clip_vitl14", "siglip2_b16_224",
                 "derm_foundation"):
        assert name in listed
    assert "TensorFlow" in listed and "not loadable here" in listed
    out = CliRunner().invoke(app, ["extract", "--backbone", "derm_foundation", "--data", str(images)])
    assert out.exit_code == 2 and "TensorFlow" in out.output


def test_a_study_names_a_model_folder_and_a_prompts_file_beside_it(models, images, tmp_path):
    root = models["open_clip"].parent
    (root / "prompts.json").write_text(json.dumps({"melanoma": "a dermoscopy image of melanoma"}))
    study = root / "study.toml"
    study.write_text(f"""
[data]
train = "{images}"
[extract]
backbones = ["open_clip:./open_clip"]
[fit]
heads = ["zero-shot", "logreg"]
cv = 2
groups = "none"
prompts = "prompts.json"
""")
    result = fc.run_study(study, cache=tmp_path / "c", quiet=True)
    zero = next(fc.Run(r) for r in result.runs if "zero-shot" in str(r))
    assert zero.metrics["config"]["backbone"] == f"open_clip:{models['open_clip']}"
    assert zero.metrics["config"]["zero_shot"]["prompts"]["melanoma"] == ["a dermoscopy image of melanoma"]
    assert zero.metrics["config"]["zero_shot"]["prompts"]["nevus"] == ["a skin image of nevus"]
    assert "zero-shot" in result.report.read_text()
