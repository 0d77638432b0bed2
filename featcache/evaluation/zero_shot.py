"""The zero-shot head's text side: each class's prompts, read by the backbone's own text tower.

A CLIP-like backbone (DermLIP, MONET, BiomedCLIP, MedSigLIP, CLIP, SigLIP …) embeds images and text in one
space, so a class can be recognised from its name alone. The prompts come from ``--prompt-template`` (``{}`` is
the class name; HAM10000/ISIC diagnosis codes are written out, since a text tower never read ``bkl``) or from a
``--prompts`` JSON file per class; a class with several prompts is embedded as their mean (prompt ensembling, as
in CLIP's own evaluation). The head itself is :class:`featcache.evaluation.heads.ZeroShotHead`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from featcache.errors import RunError
from featcache.evaluation.heads import ZeroShotText
from featcache.progress import Reporter

# HAM10000's and ISIC's diagnosis codes, as a text tower can read them
CLASS_WORDS = {
    "akiec": "actinic keratosis", "ak": "actinic keratosis", "bcc": "basal cell carcinoma",
    "bkl": "benign keratosis", "df": "dermatofibroma", "mel": "melanoma", "nv": "melanocytic nevus",
    "vasc": "vascular lesion", "scc": "squamous cell carcinoma", "sek": "seborrheic keratosis",
}
EMBED = "embed"


def read_prompts(path: str | Path | None, classes: list[str]) -> dict[str, list[str]]:
    """``--prompts``: a JSON object from class to a prompt or a list of prompts; a class it names that the data
    has not (a typo) is refused by name."""
    if not path:
        return {}
    path = Path(path).expanduser()
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RunError(f"--prompts {path}: cannot be read ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise RunError(f"--prompts {path}: not valid JSON ({exc})") from None
    if not isinstance(found, dict) or not all(isinstance(v, str) or (isinstance(v, list) and v and all(
            isinstance(p, str) and p.strip() for p in v)) for v in found.values()):
        raise RunError(f"--prompts {path}: expected an object from class to a prompt or a list of prompts, e.g. "
                       '{"mel": ["a dermoscopy image of melanoma"]}')
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise RunError(f"--prompts {path}: names class {', '.join(map(repr, unknown))}, which the data has not; its "
                       f"classes are {', '.join(classes)}")
    return {c: [v] if isinstance(v, str) else list(v) for c, v in found.items()}


def class_prompts(classes: list[str], template: str, path: str | Path | None) -> dict[str, list[str]]:
    """Every class's prompts: the file's, else the template filled with the class name (codes written out)."""
    given = read_prompts(path, classes)
    return {c: given.get(c) or [template.format(CLASS_WORDS.get(c.lower(), c.replace("_", " ")))] for c in classes}


def zero_shot_text(entry, pool: str, classes: list[str], template: str, prompts_file: str | None,  # noqa: ANN001
                   reporter: Reporter) -> ZeroShotText:
    """The classes' text embeddings from ``entry``'s backbone (loaded with its weights checked against the
    entry's), after refusing what zero-shot cannot be: fused features, another pooling than ``embed``, a backbone
    without a text tower."""
    from featcache.extraction.extract import backbone_of
    from featcache.store.fusion import FusedEntry

    if isinstance(entry, FusedEntry):
        raise RunError("--head zero-shot: fused features have no one text tower to compare with; fit zero-shot on "
                       "one backbone")
    prompts = class_prompts(classes, template, prompts_file)
    trunk = backbone_of(entry).model.net
    if not getattr(trunk, "has_text", False):
        raise RunError(f"--head zero-shot: {entry.manifest['backbone']} has no text tower; zero-shot needs a "
                       "CLIP-like backbone (dermlip_vitb16, monet, biomedclip, medsiglip_448, clip_vitl14, "
                       "siglip2_b16_224, or any such hf: / open_clip: model)")
    if pool != EMBED:
        raise RunError(f"--head zero-shot compares the image embedding with text: fit it on the {EMBED!r} pooling "
                       f"(this fit reads {pool!r}; extract {EMBED!r} where the entry lacks it)")
    embeddings = []
    for name in classes:
        unit = trunk.text_embeddings(prompts[name])
        mean = unit.mean(axis=0)
        embeddings.append(mean / max(float(np.linalg.norm(mean)), 1e-12))
    reporter.info("zero-shot prompts: " + "; ".join(f"{c}: {' | '.join(prompts[c])}" for c in classes), once=True)
    return ZeroShotText(tuple(classes), tuple(tuple(prompts[c]) for c in classes), np.stack(embeddings),
                        float(trunk.logit_scale))
