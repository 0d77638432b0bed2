"""``MODEL_CARD.md``: what a run is, what it was trained and scored on, how well, for whom, and what it is not for.

Laid out as a Hugging Face model card (YAML metadata, then the sections a reader looks for), with the items of
the TRIPOD+AI and CLAIM reporting guidelines that a frozen-feature classifier can answer from its own run
folder: data source and eligibility, outcome (the labels), sample size per class, the validation protocol and
its grouping, performance with intervals, calibration, subgroups (or that there were none, skin type named),
the shift audit of an external test set, prediction-set coverage, and known limitations. Every number in it
is a number of the run's metrics.json.
"""

from __future__ import annotations

import json

from featcache.data.sources import in_reading_order
from featcache.evaluation.audit import FEW_GROUPS

SKIN_TONE_WORDS = ("fitzpatrick", "skin_type", "skintype", "skin_tone", "skintone", "ita", "monk")


def _ci(value: float | None, ci: list | None) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def _metrics_table(block: dict) -> list[str]:
    ci = block.get("ci95", {})
    rows = ["| metric | value [95% CI] |", "|---|---|"]
    for name in ("balanced_accuracy", "macro_f1", "auroc", "accuracy"):
        if block.get(name) is not None:
            rows.append(f"| {name} | {_ci(block[name], ci.get(name))} |")
    for name in ("ece", "brier", "log_loss_balanced"):
        if block.get(name) is not None:
            rows.append(f"| {name} (calibration) | {block[name]:.3f} |")
    return rows


def _prevalence_lines(shift: dict) -> list[str]:
    """The test set's class prevalence estimated without its labels (EM, BBSE) beside the training one."""
    if "prevalence_estimate_ci" not in shift:
        return []
    lines = ["- Class prevalence of the test set, estimated without its labels"
             + (f" (from the --test-align {shift['prevalence_from']} probabilities)"
                if shift.get("prevalence_from", "none") != "none" else "") + ":", "",
             "| class | training | EM [95% CI] | BBSE [95% CI] |" + (" true |" if "prevalence_true" in shift else ""),
             "|---|---|---|---|" + ("---|" if "prevalence_true" in shift else "")]
    for c, train in shift["prevalence_train"].items():
        em, bbse = shift["prevalence_estimate"], shift.get("prevalence_bbse") or {}
        lines.append(f"| {c} | {train:.3f} | {_ci(em[c], shift['prevalence_estimate_ci'][c])} | "
                     f"{_ci(bbse.get(c), (shift.get('prevalence_bbse_ci') or {}).get(c))} |"
                     + (f" {shift['prevalence_true'][c]:.3f} |" if "prevalence_true" in shift else ""))
    if shift.get("prevalence_degenerate"):
        lines += ["", f"- Not to be trusted: {shift['prevalence_degenerate']}."]
    return ["", *lines]


def _head_lines(config: dict) -> list[str]:
    """What the model is: a trained head on frozen features, or zero-shot from the class prompts."""
    text = config.get("zero_shot")
    if config["head"] == "zero-shot" and text:
        prompts = "; ".join(f"{c}: " + " | ".join(f"\"{p}\"" for p in ps) for c, ps in text["prompts"].items())
        return [f"- A frozen {config['backbone']} backbone, zero-shot: each image goes to the class whose prompts' "
                "text embedding is closest to its image embedding (softmax of the cosines times the model's logit "
                f"scale, {text['logit_scale']:g}). Nothing was learnt from the training images: they only score it.",
                f"- Prompts: {prompts}."]
    return [f"- A frozen {config['backbone']} backbone (pooling `{config['pool']}`, its features cached by featcache) "
            f"and a light `{config['head']}` head inside a pipeline whose standardisation was fit on training rows "
            "only."]


def model_card(result: dict, source: str | None = None, n_groups: int | None = None) -> str:
    """The card of a run from its ``metrics.json`` content (``result``); ``source``: where its training images
    came from; ``n_groups``: how many groups (patients, lesions) they form."""
    config = result["config"]
    pooled, classes = result["pooled"], config["classes"]
    protocol = config.get("protocol", {})
    per_class = pooled.get("per_class", {})
    test = result.get("test")
    subgroups = result.get("subgroups") or {}
    tone = [c for c in subgroups if any(w == c.lower() or w in c.lower().split("_")
                                                          for w in SKIN_TONE_WORDS)]
    front = {"library_name": "featcache", "pipeline_tag": "image-classification", "tags": ["dermatology",
             "frozen-features", config["backbone"]], "datasets": [config["dataset"]],
             "metrics": ["balanced_accuracy", "auroc"],
             "model-index": [{"name": f"{config['backbone']}/{config['pool']}/{config['head']}", "results": [
                 {"task": {"type": "image-classification"}, "dataset": {"name": config["dataset"]},
                  "metrics": [{"type": "balanced_accuracy", "value": round(pooled["balanced_accuracy"], 4)}]}]}]}
    lines = ["---", *[f"{k}: {json.dumps(v)}" for k, v in front.items()], "---", "",
             f"# Model card: {config['head']} on {config['backbone']} / {config['pool']} features", "",
             "## Model details", "",
             *_head_lines(config),
             f"- Classes: {', '.join(classes)}.",
             f"- Made by featcache {result.get('featcache', '?')}; feature fingerprint "
             f"`{config['feature_fingerprint']}` (backbone, weights SHA-256, preprocessing and engine).", "",
             "## Intended use", "",
             "- Research: comparing frozen-feature classifiers on dermatology images of the kind it was trained on, "
             "and a second opinion a clinician checks (its similar training cases are written with each prediction).",
             "", "## Out-of-scope use", "",
             "- Diagnosis without a clinician, or any decision about a patient on its output alone.",
             "- Images unlike the training images (another modality, device, clinic or population) unless it has "
             "been scored on such images (see the shift audit below); classes it was not trained on.", "",
             "## Training data", "",
             f"- Source: `{source or config['dataset']}`; {result['n_images']} labelled images"
             + (f" in {n_groups} groups" if n_groups else "") + f" ({result['grouping'].get('by', 'no groups')}).",
             "- Images per class: " + ", ".join(f"{c} {v['support']}" for c, v in per_class.items()) + ".",
             *_groups_line(result),
             *( [f"- Labels: {config['labels']}."] if config.get("labels") else []),
             *( [f"- Notes on the data: {'; '.join(result['notes'][:5])}."] if result.get("notes") else []), "",
             "## Evaluation", "",
             f"- Protocol: {result['protocol']}; {result.get('n_scored', result['n_images'])} images scored out of "
             "fold, intervals by bootstrap" + (" of whole groups." if result["grouping"].get("grouped") else "."),
             *_leakage(result), "", *_metrics_table(pooled), ""]
    if result.get("without_training_copies"):
        w = result["without_training_copies"]
        lines += [f"Without the {w['n_left_out']} held-out images that have a copy in training: balanced accuracy "
                  f"{_ci(w['balanced_accuracy'], w.get('ci95', {}).get('balanced_accuracy'))}.", ""]
    lines += _test_lines(config, test) if test else []
    lines += ["## Subgroups", ""]
    if subgroups:
        for column, groups in subgroups.items():
            lines += [f"### {column}", "", "| subgroup | images | balanced_accuracy [95% CI] |", "|---|---|---|"]
            for value, scores in in_reading_order(groups):
                ba = scores.get("balanced_accuracy") or {}
                lines.append(f"| {value} | {scores.get('n', '–')} | {_ci(ba.get('pooled'), ba.get('ci'))} |")
            lines.append("")
    else:
        lines += ["- No subgroup results: the run was fit without `--subgroups`.", ""]
    if not tone:
        lines += ["- **Not assessed across skin types**: no skin-tone column (Fitzpatrick type, ITA) was among its "
                  "subgroups, so how the model does on darker skin is unknown.", ""]
    conformal = result.get("conformal")
    if conformal:
        lines += ["## Prediction sets", "", f"- Level {conformal['level']:g} ({conformal['mode']}): out-of-fold "
                  f"coverage {conformal['coverage']:.3f}, mean set size {conformal['mean_set_size']:.2f} of "
                  f"{len(classes)} classes"
                  + (f"; on the test set coverage {test['conformal']['coverage']:.3f}, mean size "
                     f"{test['conformal']['mean_set_size']:.2f}" if test and test.get("conformal") else "") + ".",
                  *([f"- The test set's sets are shift-weighted (each training image weighted by how much it resembles "
                     f"the test images; {w['effective_calibration_images']:.0f} of {w['calibration_images']} "
                     f"calibration images in effect, domain AUROC {w['domain_auroc']:.2f}); unweighted they would "
                     f"cover {test['conformal']['unweighted']['coverage']:.3f} with mean size "
                     f"{test['conformal']['unweighted']['mean_set_size']:.2f}."]
                    if test and (w := (test.get("conformal") or {}).get("weights")) else []), ""]
    lines += ["## Known limitations", "",
              "- The backbone is frozen: its features were learned on other images (ImageNet, or the model's own "
              "pre-training data), not on these classes.",
              *( ["- Cross-validation was **not grouped**: images of one patient or lesion may be on both sides of a "
                  "split, so the scores may be optimistic."] if not result["grouping"].get("grouped")
                 and protocol.get("split", "cv") == "cv" else []),
              "- The scores describe images like the training images; read any other clinic's results as their own.",
              "", "## How to use", "", "```bash", "featcache predict --run RUN_FOLDER NEW_IMAGES/", "```", ""]
    return "\n".join(lines)


def _test_lines(config: dict, test: dict) -> list[str]:
    """The card's external test set: its scores, what --test-align auto chose, and the shift audit."""
    lines = [f"### External test set: {config.get('test_dataset') or 'held-out data'} ({test['n_images']} images"
             + (f", features aligned with --test-align {test['test_align']}" if test.get("test_align") else "")
             + ")", "", *_metrics_table(test), ""]
    choice = test.get("test_align_choice")
    if choice:
        lines += [f"--test-align auto chose **{choice['chosen']}**: {choice['reason']}.", ""]
    shift = test.get("shift") or {}
    if shift:
        low, high = shift.get("domain_auroc_ci", [None, None])
        lines += ["### Shift audit", "", f"- A classifier tells the test images' features from the training "
                  f"images' with AUROC {_ci(shift.get('domain_auroc'), [low, high] if low is not None else None)} "
                  "(0.5: no shift)" + (f"; {shift['ood_fraction']:.0%} of test images lie beyond the distance 5 % "
                                       "of held-out training images reach." if "ood_fraction" in shift else "."),
                  *_prevalence_lines(shift), ""]
    return lines


def _leakage(result: dict) -> list[str]:
    leak = result.get("leakage") or {}
    if not leak:
        return []
    search = "" if leak.get("search", "exact") == "exact" else f" (found by an {leak['search']})"
    return [f"- Leakage audit: {leak['exact_duplicate_pairs']} identical and {leak['near_duplicate_pairs']} "
            f"near-identical image pairs{search}; {leak['held_out_with_duplicate_in_train']} of {leak['held_out']} "
            "held-out images had one on their training side."]


def _groups_line(result: dict) -> list[str]:
    """The groups (patients, lesions) behind each class, those with few named for what that means."""
    counts = result.get("groups_per_class")
    if not counts:
        return []
    few = [c for c, n in counts.items() if n < FEW_GROUPS]
    return ["- Groups per class: " + ", ".join(f"{c} {n}" for c, n in counts.items()) + "."
            + (f" **{', '.join(few)}: fewer than {FEW_GROUPS} groups**, so each grouped fold held out only a few of "
               "them and their scores rest on a handful of cases." if few else "")]
