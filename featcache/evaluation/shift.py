"""When a model meets other images: how far they are from its training images, and a label-free correction.

The shift audit needs no test label: a domain classifier tells the training features from the test
features (its cross-validated AUROC, with a bootstrap interval: 0.5 = indistinguishable); an
out-of-distribution score per image (the distance to the nearest training images, each dimension scaled by
its training spread) whose threshold is the
95th percentile of held-out training images' own scores; and the test class prevalence estimated by EM
from the model's probabilities (Saerens et al. 2002), beside the true one when the test set has labels.

The alignment (``--test-align``) maps the test features onto the training features' statistics, from the
test batch itself, before the head's own scaler: ``moments`` matches each dimension's mean and standard
deviation, ``coral`` also the covariance (shrunk towards its diagonal; Sun et al. 2016).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn import metrics as skm
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from featcache.errors import RunError
from featcache.options import BY_NAME

MIN_ALIGN_IMAGES = 30  # below this a batch's statistics are too noisy to align with
DOMAIN_WARN_AUROC = 0.8  # a domain classifier this good: the test images look different to the features
OOD_QUANTILE = 0.95  # so about 5 % of unshifted test images lie beyond the threshold
OOD_WARN_FRACTION = 0.2  # four times the share an unshifted test set would have beyond the threshold
CORAL_NEAR_MOMENTS = 0.9  # a side shrunk this far: coral is all but moments, and the run says so
SAMPLE = 2000  # rows per side for the domain classifier and the OOD reference (enough; bounded cost)
# --test-align auto (docs/results.md, `align-auto`): moments is chosen only when it brings the test images this much
# closer to their nearest training image (mean cosine, standardised features)
AUTO_MIN_CLOSER = 0.03


def _rows(X: np.ndarray) -> np.ndarray:
    """Features as 2-D rows: the views of a multi-view entry count as rows of the same image."""
    return X.reshape(-1, X.shape[-1]) if X.ndim == 3 else X


def _sample(X: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return X if len(X) <= n else X[rng.choice(len(X), n, replace=False)]


# --- alignment ----------------------------------------------------------------------------------

def align(test: np.ndarray, train: np.ndarray, method: str, shrinkage: float | tuple[float, float] | None = None,
          domain: np.ndarray | None = None) -> np.ndarray:
    """``test`` features mapped onto ``train``'s statistics (``method``: none, moments or coral); the
    shape, views included, is kept. The test side's statistics are ``domain``'s (other images of the same
    clinic) when given, else ``test``'s own. Aligning a set to itself changes nothing.

    ``coral``'s covariances are shrunk towards their diagonal by ``shrinkage`` (one for both sides, or the test
    side's and the training side's), or by each side's Ledoit-Wolf estimate when None (:func:`coral_shrinkage`):
    a batch of fewer images than dimensions cannot estimate its covariance, and a fixed small shrinkage then
    whitened the test features with noise (docs/results.md, `coral-guard`); the estimate goes towards 1, coral
    towards moments, as the batch gets smaller."""
    if method == "none":
        return test
    method = BY_NAME["test_align"].checked(method)  # the one check of the option's values
    if method == "auto":  # a caller's bug: auto is a choice between methods, made before aligning
        raise ValueError("align(): resolve --test-align auto with choose_alignment() first")
    rows = _rows(test).astype(np.float64)
    src, ref = (rows if domain is None else _rows(domain).astype(np.float64)), _rows(train).astype(np.float64)
    if len(src) < MIN_ALIGN_IMAGES:
        raise RunError(f"--test-align {method}: {len(src)} feature rows are too few to estimate their statistics "
                       f"(at least {MIN_ALIGN_IMAGES}); predict a larger batch, or pass --align-from with images "
                       "of the same clinic")
    mu_s, mu_r = src.mean(axis=0), ref.mean(axis=0)
    if method == "moments":
        sd_s, sd_r = src.std(axis=0), ref.std(axis=0)
        out = (rows - mu_s) / np.where(sd_s > 0, sd_s, 1.0) * sd_r + mu_r
    else:
        alpha_s, alpha_r = ((coral_shrinkage(src), coral_shrinkage(ref)) if shrinkage is None else
                            shrinkage if isinstance(shrinkage, tuple) else (shrinkage, shrinkage))
        whiten = _matrix_power(_shrunk_cov(src - mu_s, alpha_s), -0.5)
        colour = _matrix_power(_shrunk_cov(ref - mu_r, alpha_r), 0.5)
        out = (rows - mu_s) @ whiten @ colour + mu_r
    return out.reshape(test.shape).astype(test.dtype)


@dataclass(frozen=True)
class AlignmentChoice:
    """What ``--test-align auto`` chose for a test batch, why (one sentence) and the numbers behind it (for
    metrics.json: each is recomputable from the training and test features, :func:`nearest_similarity`)."""

    method: str
    reason: str
    evidence: dict = field(default_factory=dict)
    decided: bool = True  # False: too few images to decide, so nothing was aligned (a warning, not a note)

    def record(self) -> dict:
        return {"chosen": self.method, "reason": self.reason, **self.evidence}


def nearest_similarity(train: np.ndarray, test: np.ndarray, seed: int = 0) -> float:
    """The mean cosine similarity of each test image to its nearest training image, on the features standardised
    by the training side's mean and spread (an image: the mean of its views; at most :data:`SAMPLE` training
    images, drawn with ``seed``)."""
    train_images, test_images = (X.mean(axis=1) if X.ndim == 3 else X for X in (train, test))
    reference = _sample(train_images, SAMPLE, np.random.default_rng(seed)).astype(np.float64)
    mean, spread = reference.mean(axis=0), reference.std(axis=0)
    spread = np.where(spread > 0, spread, 1.0)

    def unit(X: np.ndarray) -> np.ndarray:
        Z = (X.astype(np.float64) - mean) / spread
        return Z / np.maximum(np.linalg.norm(Z, axis=1, keepdims=True), 1e-12)

    return float(np.mean((unit(test_images) @ unit(reference).T).max(axis=1)))


def choose_alignment(train: np.ndarray, test: np.ndarray, *, domain: np.ndarray | None = None) -> AlignmentChoice:
    """``--test-align auto``: ``moments`` or ``none`` for this test batch, from evidence without its labels.

    ``moments`` is chosen when it brings the test images at least :data:`AUTO_MIN_CLOSER` closer to their nearest
    training image (:func:`nearest_similarity`, before and after): a shift of the features' statistics that the
    alignment removes, as a scanner's or a clinic's is. Otherwise ``none``: the images differ in what they show
    (another body site, another class mix), not in how they were taken, and aligning their statistics would move
    the classes. Measured on HAM10000 -> ISIC 2018, HAM10000 -> ISIC UDA-1 and HAM10000's torso -> its other sites
    (docs/results.md, `align-auto`), with its misses. Not told apart: a device shift together with a large change
    in the class mix (moments then loses, and auto may choose it). ``coral`` is never chosen: on the 15 runs of
    docs/best-ham.toml it lost to moments on every one. ``domain``: other images of the test batch's clinic,
    whose statistics align it (``--align-from``); the closeness is then measured on them."""
    source = test if domain is None else domain
    rows = len(_rows(source))
    if rows < MIN_ALIGN_IMAGES:
        return AlignmentChoice("none", f"{rows} feature rows are too few to estimate their statistics (at least "
                               f"{MIN_ALIGN_IMAGES}), so nothing was aligned; predict a larger batch, or pass "
                               "--align-from with images of the same clinic", {"test_rows": rows}, decided=False)
    before, after = nearest_similarity(train, source), nearest_similarity(train, align(source, train, "moments"))
    closer = after - before
    evidence = {"nearest_similarity": {"none": before, "moments": after}, "closer": closer,
                "min_closer": AUTO_MIN_CLOSER}
    if closer < AUTO_MIN_CLOSER:
        return AlignmentChoice("none", f"moments would bring the test images only {closer:+.3f} closer to their "
                               f"nearest training image (mean cosine, {before:.3f} to {after:.3f}; it must be "
                               f"{AUTO_MIN_CLOSER:.2f}): their features' statistics are not what sets them apart",
                               evidence)
    return AlignmentChoice("moments", f"moments brings the test images {closer:+.3f} closer to their nearest "
                           f"training image (mean cosine, {before:.3f} to {after:.3f}; at least {AUTO_MIN_CLOSER:.2f})",
                           evidence)


def coral_shrinkage(rows: np.ndarray) -> float:
    """How far coral shrinks a side's covariance towards its diagonal: the Ledoit-Wolf estimate (Ledoit & Wolf
    2004; scikit-learn's) on the standardised rows, where shrinking towards the identity is shrinking the
    covariance towards its diagonal. Near 0 for many images in few dimensions, near 1 for few in many."""
    from sklearn.covariance import ledoit_wolf_shrinkage

    rows = _rows(rows).astype(np.float64)
    spread = rows.std(axis=0)
    standard = (rows - rows.mean(axis=0)) / np.where(spread > 0, spread, 1.0)
    return float(ledoit_wolf_shrinkage(standard, assume_centered=True))


def _shrunk_cov(centred: np.ndarray, shrinkage: float) -> np.ndarray:
    cov = centred.T @ centred / max(len(centred) - 1, 1)
    return (1 - shrinkage) * cov + shrinkage * np.diag(np.diag(cov)) + 1e-6 * np.eye(len(cov))


def _matrix_power(matrix: np.ndarray, power: float) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.clip(values, 1e-12, None) ** power) @ vectors.T


# --- the audit ----------------------------------------------------------------------------------

def domain_auroc(train: np.ndarray, test: np.ndarray, seed: int = 0, draws: int = 200) -> tuple[float, list[float]]:
    """Cross-validated AUROC of a logistic regression telling ``train`` rows from ``test`` rows, and its
    bootstrap 95 % interval (0.5: the features cannot tell the two apart)."""
    rng = np.random.default_rng(seed)
    a, b = _sample(_rows(train), SAMPLE, rng), _sample(_rows(test), SAMPLE, rng)
    X = np.concatenate([a, b]).astype(np.float32)
    y = np.r_[np.zeros(len(a)), np.ones(len(b))]
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=500))
    score = cross_val_predict(model, X, y, cv=folds, method="predict_proba")[:, 1]
    value = float(skm.roc_auc_score(y, score))
    boots = []
    for _ in range(draws):
        pick = rng.integers(0, len(y), len(y))
        if len(np.unique(y[pick])) == 2:
            boots.append(skm.roc_auc_score(y[pick], score[pick]))
    return value, [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))]


def ood_scores(reference: np.ndarray, X: np.ndarray, k: int = 5) -> np.ndarray:
    """Per row: the mean Euclidean distance to its ``k`` nearest reference rows, each dimension scaled by
    the reference's spread (so no single dimension's unit decides)."""
    center, spread = reference.mean(axis=0), reference.std(axis=0) + 1e-6
    R = ((reference - center) / spread).astype(np.float32)
    Z = ((X - center) / spread).astype(np.float32)
    squared = (Z ** 2).sum(axis=1)[:, None] - 2 * Z @ R.T + (R ** 2).sum(axis=1)[None, :]
    k = min(k, squared.shape[1])
    nearest = np.partition(np.maximum(squared, 0), k - 1, axis=1)[:, :k]
    return np.sqrt(nearest).mean(axis=1)


def heldout_ood_scores(train: np.ndarray, seed: int = 0) -> np.ndarray:
    """The OOD scores of held-out training images, sorted: each of 5 folds of (a sample of) ``train`` scored
    against the other four. What an image like the training images scores."""
    rng = np.random.default_rng(seed)
    X = _sample(_rows(train), SAMPLE, rng)
    folds = np.arange(len(X)) % 5
    rng.shuffle(folds)
    return np.sort(np.concatenate([ood_scores(X[folds != f], X[folds == f]) for f in range(5)]))


def ood_threshold(train: np.ndarray, seed: int = 0) -> float:
    """The OOD score that held-out training images exceed in 5 % of cases (the threshold an unshifted test set
    would be held to)."""
    return float(np.quantile(heldout_ood_scores(train, seed), OOD_QUANTILE))


def ood_per_image(train: np.ndarray, new: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Each new image's OOD score (:func:`ood_scores` against the training images, one row per image: the mean
    of its views) and its percentile among held-out training images' scores: 97 means farther from the training
    images than 97 % of held-out training images are."""
    train_images, new_images = (X.mean(axis=1) if X.ndim == 3 else X for X in (train, new))
    heldout = heldout_ood_scores(train_images, seed)
    scores = ood_scores(_sample(train_images, SAMPLE, np.random.default_rng(seed)), new_images)
    return scores, 100.0 * np.searchsorted(heldout, scores, side="right") / len(heldout)


def em_prevalence(proba: np.ndarray, train_prior: np.ndarray, steps: int = 200, tol: float = 1e-8) -> np.ndarray:
    """The class prevalence of a test set from a model's probabilities alone (EM: Saerens et al. 2002)."""
    prior = train_prior.astype(np.float64)
    current = prior.copy()
    for _ in range(steps):
        adjusted = proba * (current / prior)
        adjusted /= np.maximum(adjusted.sum(axis=1, keepdims=True), 1e-12)
        updated = adjusted.mean(axis=0)
        if np.abs(updated - current).max() < tol:
            current = updated
            break
        current = updated
    return current


def bbse_prevalence(proba: np.ndarray, heldout_proba: np.ndarray, heldout_labels: np.ndarray,
                    prior: np.ndarray) -> np.ndarray:
    """The class prevalence of a test set by black-box shift estimation (Lipton et al. 2018): the model's
    confusion matrix on held-out training images, ``C[i, j] = P(predicted i, true j)``, and the test set's
    predicted-class shares ``m`` give the weights ``w`` of ``C w = m``; the prevalence is ``w * prior``
    (clipped at 0, summing to 1). It needs no calibrated probabilities, only a confusion matrix that can be
    inverted."""
    k = len(prior)
    predicted = heldout_proba.argmax(axis=1)
    confusion = np.zeros((k, k))
    np.add.at(confusion, (predicted, heldout_labels), 1.0)
    confusion /= max(len(heldout_labels), 1)
    shares = np.bincount(proba.argmax(axis=1), minlength=k) / max(len(proba), 1)
    weights = np.linalg.lstsq(confusion, shares, rcond=None)[0]
    estimate = np.clip(weights * prior, 0.0, None)
    return estimate / estimate.sum() if estimate.sum() > 0 else prior.copy()


def prevalence_estimates(proba: np.ndarray, prior: np.ndarray, classes: list[str],
                         heldout: tuple[np.ndarray, np.ndarray] | None = None, seed: int = 0,
                         draws: int = 200) -> dict:
    """The test set's class prevalence without its labels, by EM and (with the model's out-of-fold
    ``heldout`` probabilities and labels) BBSE, each with a 95 % interval from resampling the test images;
    ``prevalence_degenerate`` says why an estimate should not be trusted (None when nothing is wrong)."""
    rng = np.random.default_rng(seed)
    label_index = None if heldout is None else np.searchsorted(classes, heldout[1])
    methods = {"estimate": lambda p: em_prevalence(p, prior)}
    if heldout is not None:
        methods["bbse"] = lambda p: bbse_prevalence(p, heldout[0], label_index, prior)
    out: dict = {}
    picks = [rng.integers(0, len(proba), len(proba)) for _ in range(draws)]
    for name, estimate in methods.items():
        value = estimate(proba)
        boots = np.array([estimate(proba[pick]) for pick in picks])
        low, high = np.percentile(boots, [2.5, 97.5], axis=0)
        key = "prevalence_estimate" if name == "estimate" else "prevalence_bbse"
        out[key] = dict(zip(classes, value.tolist(), strict=True))
        out[key + "_ci"] = {c: [float(a), float(b)] for c, a, b in zip(classes, low, high, strict=True)}
    out["prevalence_degenerate"] = _degenerate(out, classes)
    return out


def _degenerate(found: dict, classes: list[str]) -> str | None:
    """Why the EM estimate is not to be trusted: one class takes (almost) everything, its interval spans half the
    range, or BBSE disagrees with it by more than 0.2 on a class. EM trusts the probabilities' calibration, which
    a shift breaks; BBSE trusts only the held-out confusion matrix."""
    em, ci = found["prevalence_estimate"], found["prevalence_estimate_ci"]
    top = max(classes, key=lambda c: em[c])
    if em[top] >= 0.98:
        return (f"EM gives {top} {em[top]:.3f} of the test set: a degenerate estimate (the probabilities it trusts "
                "are miscalibrated here)")
    wide = [c for c in classes if ci[c][1] - ci[c][0] > 0.5]
    if wide:
        return f"EM's interval for {wide[0]} spans {ci[wide[0]][0]:.2f} to {ci[wide[0]][1]:.2f}: too wide to use"
    bbse = found.get("prevalence_bbse")
    if bbse:
        apart = max(classes, key=lambda c: abs(em[c] - bbse[c]))
        if abs(em[apart] - bbse[apart]) > 0.2:
            return (f"EM ({em[apart]:.2f}) and BBSE ({bbse[apart]:.2f}) disagree on {apart} by more than 0.2: "
                    "read neither as the test set's prevalence")
    return None


def shift_audit(train: np.ndarray, test: np.ndarray, proba: np.ndarray, classes: list[str],
                train_labels: np.ndarray, test_labels: np.ndarray | None = None,
                heldout: tuple[np.ndarray, np.ndarray] | None = None, aligned_with: str = "none") -> dict:
    """Everything :mod:`featcache.evaluation.shift` measures, for ``metrics.json["test"]["shift"]``. ``proba``:
    the test probabilities the run reports (after its --test-align, ``aligned_with``), from which the
    prevalence is estimated; ``heldout``: the model's out-of-fold probabilities and labels, for BBSE."""
    auroc, interval = domain_auroc(train, test)
    # one row per image (the mean over its views), for the reference, the threshold and the test alike
    train_images, test_images = (X.mean(axis=1) if X.ndim == 3 else X for X in (train, test))
    threshold = ood_threshold(train_images)
    reference = _sample(train_images, SAMPLE, np.random.default_rng(0))
    per_image = ood_scores(reference, test_images)
    prior = np.array([np.mean(train_labels == c) for c in classes])
    out = {"domain_auroc": auroc, "domain_auroc_ci": interval, "ood_threshold": threshold,
           "ood_fraction": float(np.mean(per_image > threshold)),
           "prevalence_train": dict(zip(classes, prior.tolist(), strict=True)),
           **prevalence_estimates(proba, prior, classes, heldout), "prevalence_from": aligned_with}
    if test_labels is not None:
        out["prevalence_true"] = {c: float(np.mean(test_labels == c)) for c in classes}
    return out


def shift_warning(shift: dict, aligned_with: str = "none", choice: AlignmentChoice | dict | None = None
                  ) -> str | None:
    """One line when the shift is clear: what was measured, what it means, what to try (``aligned_with``: the
    alignment the run's scores used, which already corrects the features' statistics; ``choice``: what
    ``--test-align auto`` chose and why, as made or as metrics.json records it)."""
    if shift["domain_auroc"] < DOMAIN_WARN_AUROC and shift["ood_fraction"] < OOD_WARN_FRACTION:
        return None
    low, high = shift["domain_auroc_ci"]
    if choice is not None:
        reason = choice.reason if isinstance(choice, AlignmentChoice) else choice["reason"]
        advice = (f"--test-align auto chose {aligned_with}, because {reason}; read the test scores as those of "
                  "another clinic")
    elif aligned_with == "none":
        advice = "try --test-align auto (or moments), and read the test scores as those of another clinic"
    else:
        advice = (f"the test scores are after --test-align {aligned_with} (metrics.json keeps the unaligned ones "
                  "under test.unaligned); read them as those of another clinic")
    return (f"domain shift: a classifier tells the test images' features from the training images' (AUROC "
            f"{shift['domain_auroc']:.2f} [{low:.2f}, {high:.2f}]) and {shift['ood_fraction']:.0%} of test images "
            f"lie beyond the distance that 5 % of held-out training images reach; the model's threshold may no "
            f"longer fit these images (balanced accuracy can fall though AUROC holds): {advice}")
