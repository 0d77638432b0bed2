"""Classifier heads: scikit-learn estimators, always inside ``Pipeline([StandardScaler(), head])``.

The scaler is part of the pipeline, so in cross-validation it is fit on training folds only.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.kernel_approximation import Nystroem
from sklearn.linear_model import RidgeClassifier, SGDClassifier
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import LabelEncoder
from sklearn.svm import SVC
from sklearn.utils.class_weight import compute_sample_weight

from featcache.errors import RunError
from featcache.store.model_files import side_files

# Part of every run's name: bump it whenever a change to this module changes any head's numbers
# (a default, a solver, a seed), so that no run made by the old code is served as the new one's.
HEADS_VERSION = 2
# k-NN compares every held-out row with every training row, so its time grows with the square of the rows
# (benchmarks/heads_scale.py: 4.9 s at 10k rows, 255 s at 100k). Past this many training rows it is
# trained on a stratified, seeded sample of them: about 2 minutes per fold at 1M rows on 2 cores.
KNN_MAX_TRAIN = 50_000
# svm-linear at scale. Its averaged SGD makes 15 passes over its rows (SVMHead); past this many rows per fit the
# same number of updates needs fewer passes: ceil(15 x this / rows), at least 2 (3 at a million images' calibration
# folds). And each of its 3 calibration maps then learns from at most this many of the held-out rows (a seeded
# sample): their copy beside the training rows' took a million images' final fit to 16.3 GB.
SGD_EPOCHS = 15
SGD_FULL_EPOCHS_ROWS = 100_000
# The MLP checks its validation loss once per epoch; past this many training rows, once per this many rows, so
# that early stopping can stop within an epoch of a million rows (its patience counts these checks).
MLP_PASS_ROWS = 100_000
CALIBRATIONS = ("sigmoid", "isotonic", "temperature")

@dataclass(frozen=True, eq=False)
class ZeroShotText:
    """The zero-shot head's classes in text: each class's prompts and their embedding by the backbone's text
    tower (the mean of the prompts' unit embeddings, made unit length again), and the model's logit scale."""

    classes: tuple[str, ...]
    prompts: tuple[tuple[str, ...], ...]
    embeddings: np.ndarray  # (classes, dim)
    logit_scale: float

    def identity(self) -> dict:
        """What names a zero-shot run: the prompts and a hash of what the text tower made of them."""
        import hashlib

        digest = hashlib.sha256(np.ascontiguousarray(self.embeddings, dtype=np.float32).tobytes()).hexdigest()
        return {"prompts": {c: list(p) for c, p in zip(self.classes, self.prompts, strict=True)},
                "text_sha256": digest, "logit_scale": round(self.logit_scale, 6)}


class ZeroShotHead(ClassifierMixin, BaseEstimator):
    """Classes from their names alone, no training: the cosine between an image's embedding and each class's
    prompt embedding, times the model's logit scale, through a softmax (a SigLIP model's bias is the same for
    every class, so it changes no probability). ``fit`` only checks that every class has text; the scores are
    the baseline a probe trained on the same features must beat."""

    def __init__(self, text_embeddings: np.ndarray | None = None, class_names: tuple[str, ...] | None = None,
                 logit_scale: float = 100.0):
        self.text_embeddings, self.class_names, self.logit_scale = text_embeddings, class_names, logit_scale

    def fit(self, X: np.ndarray, y: np.ndarray) -> ZeroShotHead:
        if self.text_embeddings is None or self.class_names is None:
            raise RunError("the zero-shot head has no class prompts: fit it through featcache's fit, which reads "
                           "them with the backbone's text tower")
        names = [str(c) for c in self.class_names]
        unknown = sorted(set(map(str, np.unique(y))) - set(names))
        if unknown:
            raise RunError(f"zero-shot: no prompt for class {', '.join(map(repr, unknown))}")
        if np.shape(X)[1] != np.shape(self.text_embeddings)[1]:
            raise RunError(f"zero-shot: the image features have {np.shape(X)[1]} dimensions and the text embeddings "
                           f"{np.shape(self.text_embeddings)[1]}: fit it on the backbone's `embed` pooling")
        order = np.argsort(names, kind="stable")
        self.classes_ = np.array(names, dtype=object)[order]
        self.weights_ = np.asarray(self.text_embeddings, dtype=np.float64)[order]
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        unit = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
        logits = self.logit_scale * unit @ self.weights_.T
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return exp / exp.sum(axis=1, keepdims=True)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(axis=1)]


class TorchMLPClassifier(ClassifierMixin, BaseEstimator):
    """A one-hidden-layer MLP with dropout, class-weighted loss and early stopping.

    Early stopping watches the loss on a stratified inner validation split of the training data;
    the weights of the best epoch are kept. On HAM10000 features the best epoch comes early (about
    the 5th to 10th), so batches of 512 at lr 2e-3 with patience 10 cost 12 s of CPU per 5 folds
    where 256 at 1e-3 with patience 15 cost 20 s, at the same balanced accuracy (0.551 / 0.552) on
    10k x 384; on the full 1280-d standardized features it loses 0.012 (0.548 +- 0.007 against
    0.560 +- 0.004 over three seeds, lesion-grouped 5-fold HAM10000) in 2.9x less time.
    Deterministic for a given ``seed``; uses CUDA if present.
    """

    def __init__(self, hidden: int = 256, dropout: float = 0.3, lr: float = 2e-3,
                 weight_decay: float = 1e-4, max_epochs: int = 200, patience: int = 10,
                 batch_size: int = 512, val_fraction: float = 0.15,
                 class_weight: str | None = "balanced", seed: int = 0, device: str = "auto"):
        self.hidden, self.dropout, self.lr, self.weight_decay = hidden, dropout, lr, weight_decay
        self.max_epochs, self.patience, self.batch_size = max_epochs, patience, batch_size
        self.val_fraction, self.class_weight, self.seed, self.device = (
            val_fraction, class_weight, seed, device)

    def _device(self):
        import torch  # imported here: fold workers of the other heads start 2 s sooner without it

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def fit(self, X: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None) -> TorchMLPClassifier:
        """``groups``: rows that belong together (the views of one image) stay on one side of the
        early-stopping split, so the validation loss is not measured on copies of training rows."""
        import torch

        self._encoder = LabelEncoder().fit(y)
        self.classes_ = self._encoder.classes_
        target = self._encoder.transform(y)
        X = np.asarray(X, dtype=np.float32)
        counts = np.bincount(target, minlength=len(self.classes_))
        train_idx, val_idx = _validation_split(target, groups, self.val_fraction, self.seed,
                                               counts.min() >= 2)
        device = self._device()
        generator = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)
        n_classes = len(self.classes_)
        self.model_ = _mlp(X.shape[1], self.hidden, n_classes, self.dropout).to(device)
        weight = None
        if self.class_weight == "balanced":
            weight = torch.tensor(len(target) / (n_classes * np.maximum(counts, 1)), dtype=torch.float32)
            weight = weight.to(device)
        loss_fn = torch.nn.CrossEntropyLoss(weight=weight)
        optimiser = torch.optim.AdamW(self.model_.parameters(), lr=self.lr,
                                      weight_decay=self.weight_decay)
        Xt = torch.from_numpy(X).to(device)
        yt = torch.from_numpy(target).long().to(device)
        tr, va = torch.from_numpy(train_idx).to(device), torch.from_numpy(val_idx).to(device)
        best, best_state, waited = np.inf, None, 0
        self.loss_curve_, self.val_loss_curve_ = [], []
        shuffled, cursor = None, 0
        for _epoch in range(self.max_epochs):  # an epoch, or past MLP_PASS_ROWS rows a pass of that many
            self.model_.train()
            if len(tr) <= MLP_PASS_ROWS:
                order = tr[torch.randperm(len(tr), generator=generator).to(device)]
            else:
                if shuffled is None or cursor >= len(shuffled):
                    shuffled, cursor = tr[torch.randperm(len(tr), generator=generator).to(device)], 0
                order, cursor = shuffled[cursor:cursor + MLP_PASS_ROWS], cursor + MLP_PASS_ROWS
            total = 0.0
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                optimiser.zero_grad(set_to_none=True)
                loss = loss_fn(self.model_(Xt[idx]), yt[idx])
                loss.backward()
                optimiser.step()
                total += loss.item() * len(idx)
            self.loss_curve_.append(total / len(order))
            self.model_.eval()
            with torch.no_grad():
                val = float(loss_fn(self.model_(Xt[va]), yt[va]))
            self.val_loss_curve_.append(val)
            if val < best - 1e-4:
                best, waited = val, 0
                best_state = {k: v.detach().clone() for k, v in self.model_.state_dict().items()}
            else:
                waited += 1
                if waited >= self.patience:
                    break
        if best_state is not None:
            self.model_.load_state_dict(best_state)
        self.model_.cpu().eval()
        self.n_epochs_ = len(self.loss_curve_)
        return self

    def __getstate__(self) -> dict:
        """Saved in a run folder, the network becomes ``mlp-<k>.safetensors`` (weights) and ``mlp-<k>.json``
        (settings) beside the skops file, which keeps only their name (see featcache.store.model_files)."""
        state = super().__getstate__()
        side = side_files()
        if side is None or not side.writing or "model_" not in state:
            return state
        from safetensors.torch import save_file

        first, last = self.model_[0], self.model_[-1]
        name = side.new_name("mlp", "")
        save_file({k: v.contiguous() for k, v in self.model_.state_dict().items()},
                  str(side.folder / f"{name}.safetensors"))
        settings = {"in_features": first.in_features, "hidden": first.out_features, "n_classes": last.out_features,
                    "dropout": self.model_[2].p, "activation": "gelu", "layers": "linear-gelu-dropout-linear"}
        (side.folder / f"{name}.json").write_text(json.dumps(settings, indent=2))
        return {**state, "model_": name}

    def __setstate__(self, state: dict) -> None:
        side = side_files()
        if side is not None and not side.writing and isinstance(state.get("model_"), str):
            from safetensors.torch import load_file

            name = state["model_"]
            settings = json.loads(side.path(f"{name}.json").read_text())
            model = _mlp(settings["in_features"], settings["hidden"], settings["n_classes"], settings["dropout"])
            model.load_state_dict(load_file(str(side.path(f"{name}.safetensors"))))
            state = {**state, "model_": model.eval()}
        super().__setstate__(state)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            logits = self.model_(torch.as_tensor(np.asarray(X, dtype=np.float32)))
        return torch.softmax(logits, dim=1).numpy()

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(axis=1)]


def _mlp(in_features: int, hidden: int, n_classes: int, dropout: float):
    import torch

    return torch.nn.Sequential(torch.nn.Linear(in_features, hidden), torch.nn.GELU(), torch.nn.Dropout(dropout),
                               torch.nn.Linear(hidden, n_classes))


def _validation_split(target: np.ndarray, groups: np.ndarray | None, fraction: float, seed: int,
                      stratified: bool) -> tuple[np.ndarray, np.ndarray]:
    classes = len(np.unique(target))

    def room(n: int) -> bool:  # a stratified split needs every class on both sides (it failed on 17 rows of 7)
        held = int(np.ceil(fraction * n))
        return held >= classes and n - held >= classes

    if groups is None:
        return train_test_split(np.arange(len(target)), test_size=fraction, random_state=seed,
                                stratify=target if stratified and room(len(target)) else None)
    names, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    label_of_group = target[first]
    stratify = label_of_group if np.bincount(label_of_group).min() >= 2 and room(len(names)) else None
    _, val_groups = train_test_split(np.arange(len(names)), test_size=fraction, random_state=seed,
                                     stratify=stratify)
    is_val = np.isin(inverse, val_groups)
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def _calibration_setup(X: np.ndarray, y: np.ndarray, groups: np.ndarray | None, class_weight: str | None,
                       seed: int) -> tuple[np.ndarray | None, int | list]:
    """Sample weights and the folds (up to 3, stratified) a calibrator learns on.

    The calibrator gets the class balancing as sample weights: calibrated on unweighted rows it
    would learn the skewed prior back and hand most rows to the majority class. Without ``groups``
    the folds are scikit-learn's unshuffled StratifiedKFold (an int); with them, rows of one group
    (the views of one image) share a fold. Kept exactly so: saved runs are named by their
    parameters, and a change here would serve old runs under the new behaviour's name.
    """
    weights = compute_sample_weight("balanced", y) if class_weight == "balanced" else None
    k = max(2, min(3, int(np.unique(y, return_counts=True)[1].min())))
    if groups is None:
        return weights, k
    return weights, list(StratifiedGroupKFold(k, shuffle=True, random_state=seed).split(X, y, groups))


def _sampled_calibration(folds: int | list, X: np.ndarray, y: np.ndarray, most: int,
                         seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The calibration folds (scikit-learn's unshuffled StratifiedKFold for an int, as CalibratedClassifierCV
    makes them), each held-out part cut to a seeded sample of ``most`` rows: the SGD still trains on every row of
    its part, the calibration map learns from fewer."""
    if isinstance(folds, int):
        folds = list(StratifiedKFold(folds).split(X, y))
    rng = np.random.default_rng(seed)
    return [(train, test if len(test) <= most else np.sort(rng.choice(test, size=most, replace=False)))
            for train, test in folds]


class SVMHead(ClassifierMixin, BaseEstimator):
    """A support vector machine with class-balanced, calibrated probabilities.

    ``kernel="linear"``: hinge loss with L2 penalty ``alpha``, trained by averaged SGD (liblinear
    took 52-324 s per HAM10000 fold of 8k x 1280, SGD 18 s, at a better balanced accuracy).
    ``kernel="rbf"``: a least-squares SVM (squared loss on one-vs-rest targets, ridge penalty
    1/``C``; Suykens & Vandewalle 1999) on the RBF kernel approximated by ``n_components``
    Nystroem landmarks (exact when there are no more training rows than that). Its solve is one
    small linear system, so 1,024 landmarks cost 0.8 s per fold of 8k x 384 where the hinge-loss
    LinearSVC on 512 landmarks took 9.5 s, and it scored 0.582 against 0.551 balanced accuracy
    on that HAM10000 fold (see docs/benchmarks.md).
    ``kernel="rbf-exact"``: libsvm's hinge-loss SVC, for when the exact kernel machine is wanted.
    ``gamma`` multiplies 1/n_features, which is scikit-learn's "scale" on standardized features.

    Probabilities come from calibration (``calibration``: sigmoid, isotonic or temperature) on 3
    internal folds. Class balancing is passed as sample weights to both the SVM *and* the
    calibrator: calibrating unweighted would undo the balancing and hand every row to the
    majority class.
    """

    def __init__(self, kernel: str = "linear", C: float = 1.0, alpha: float = 1e-3, gamma: float = 1.0,
                 n_components: int = 1024, class_weight: str | None = "balanced", seed: int = 0,
                 calibration: str = "sigmoid"):
        self.kernel, self.C, self.alpha, self.gamma, self.n_components = kernel, C, alpha, gamma, n_components
        self.class_weight, self.seed, self.calibration = class_weight, seed, calibration

    def _svm(self, n_features: int, rows: int):
        if self.kernel == "linear":
            # 15 epochs: 0.586 balanced accuracy on a HAM10000 fold, 30 epochs 0.588 in twice the time
            return SGDClassifier(loss="hinge", alpha=self.alpha, average=True, max_iter=sgd_epochs(rows), tol=None,
                                 random_state=self.seed)
        if self.kernel == "rbf":
            return RidgeClassifier(alpha=1.0 / self.C)
        if self.kernel == "rbf-exact":
            return SVC(C=self.C, kernel="rbf", gamma=self.gamma / n_features, random_state=self.seed)
        raise RunError(f"SVMHead kernel={self.kernel!r}: use linear, rbf or rbf-exact")

    def _features(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float32)
        return self.kernel_map_.transform(X) if self.kernel_map_ is not None else X

    def fit(self, X: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None) -> SVMHead:
        """``groups``: rows that belong together (the views of one image) share a calibration fold."""
        X = np.asarray(X, dtype=np.float32)
        self._encoder = LabelEncoder().fit(y)
        self.classes_ = self._encoder.classes_
        self.kernel_map_ = None
        if self.kernel == "rbf":  # unsupervised, and fit on this (training) data only
            self.kernel_map_ = Nystroem(gamma=self.gamma / X.shape[1], random_state=self.seed,
                                        n_components=min(self.n_components, len(X))).fit(X)
        weights, folds = _calibration_setup(X, y, groups, self.class_weight, self.seed)
        n_folds = folds if isinstance(folds, int) else len(folds)
        rows = len(X) * (n_folds - 1) // n_folds
        if self.kernel == "linear" and rows > SGD_FULL_EPOCHS_ROWS:
            folds = _sampled_calibration(folds, X, y, SGD_FULL_EPOCHS_ROWS, self.seed)
        self.model_ = CalibratedClassifierCV(self._svm(X.shape[1], rows), method=self.calibration, cv=folds)
        self.model_.fit(self._features(X), y, sample_weight=weights)
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return self.model_.predict_proba(self._features(X))

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(axis=1)]


class CalibratedHead(ClassifierMixin, BaseEstimator):
    """``estimator`` with its probabilities recalibrated (``method``: sigmoid, isotonic, temperature).

    The estimator itself is fit once on all rows, exactly as it would be uncalibrated (so its
    decisions change only as much as the calibration map changes them); the map is learned on
    out-of-fold probabilities from 3 internal folds (``ensemble=False`` in scikit-learn's terms).
    ``class_weight="balanced"`` weights the calibration rows by inverse class frequency, the
    balance the head was trained with: the probabilities are then calibrated for a class-balanced
    population and the balanced decisions are kept; with ``"none"`` they are calibrated for the
    training prevalence. ``temperature`` rescales all logits by one number and never changes the
    predicted class of a row (averaged over views, the rescaled probabilities may still tip one).
    """

    def __init__(self, estimator, method: str = "sigmoid", class_weight: str | None = "balanced", seed: int = 0):
        self.estimator, self.method, self.class_weight, self.seed = estimator, method, class_weight, seed

    def fit(self, X: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None) -> CalibratedHead:
        """``groups``: rows that belong together (the views of one image) share a calibration fold."""
        from sklearn.base import clone

        if self.method not in CALIBRATIONS:
            raise RunError(f"--calibrate {self.method!r}: use {', '.join(CALIBRATIONS)}")
        weights, folds = _calibration_setup(X, y, groups, self.class_weight, self.seed)
        # Wrapped in a one-step Pipeline, whose fit takes no sample_weight by name: scikit-learn then
        # gives the weights to the calibrator only, and the head keeps its own class_weight (passed
        # to both, the balancing would be applied twice).
        base = Pipeline([("head", clone(self.estimator))])
        params = {"head__groups": groups} if groups is not None and _accepts_groups(self.estimator) else {}
        self.model_ = CalibratedClassifierCV(base, method=self.method, cv=folds, ensemble=False)
        with warnings.catch_warnings():  # scikit-learn warns about exactly the routing we want here
            warnings.filterwarnings("ignore", "Since Pipeline does not appear to accept sample_weight")
            self.model_.fit(X, y, sample_weight=weights, **params)
        self.classes_ = self.model_.classes_
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return self.model_.predict_proba(X)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(axis=1)]


class XGBHead(ClassifierMixin, BaseEstimator):
    """XGBoost (hist, multi-class softprob) with class-balanced sample weights and any labels.

    Defaults (40 trees of depth 3, eta 0.4, half the columns per tree, 32 bins): on HAM10000
    features (10k x 384, lesion-grouped 5-fold) 16 s of CPU for 0.454 pooled balanced accuracy,
    where 100 trees of depth 4 at eta 0.2 with 64 bins took 52 s for 0.402 (60 trees at eta 0.3:
    20 s, 0.452).
    """

    def __init__(self, max_depth: int = 3, learning_rate: float = 0.4, n_estimators: int = 40,
                 colsample_bytree: float = 0.5, max_bin: int = 32,
                 class_weight: str | None = "balanced", seed: int = 0, n_jobs: int | None = None):
        self.max_depth, self.learning_rate, self.n_estimators = max_depth, learning_rate, n_estimators
        self.colsample_bytree, self.max_bin = colsample_bytree, max_bin
        self.class_weight, self.seed, self.n_jobs = class_weight, seed, n_jobs

    def fit(self, X: np.ndarray, y: np.ndarray) -> XGBHead:
        from xgboost import XGBClassifier

        self._encoder = LabelEncoder().fit(y)
        self.classes_ = self._encoder.classes_
        target = self._encoder.transform(y)
        weights = compute_sample_weight("balanced", target) if self.class_weight == "balanced" else None
        self.model_ = XGBClassifier(
            tree_method="hist", objective="multi:softprob" if len(self.classes_) > 2 else "binary:logistic",
            max_depth=self.max_depth, learning_rate=self.learning_rate,
            n_estimators=self.n_estimators, colsample_bytree=self.colsample_bytree, max_bin=self.max_bin,
            random_state=self.seed, n_jobs=self.n_jobs)
        self.model_.fit(X, target, sample_weight=weights)
        return self

    def __getstate__(self) -> dict:
        """Saved in a run folder, the booster becomes ``xgboost-<k>.json`` (XGBoost's own format) beside
        the skops file, which keeps only its name (see featcache.store.model_files)."""
        state = super().__getstate__()
        side = side_files()
        if side is None or not side.writing or "model_" not in state:
            return state
        name = side.new_name("xgboost", ".json")
        self.model_.save_model(str(side.folder / name))
        return {**state, "model_": name}

    def __setstate__(self, state: dict) -> None:
        side = side_files()
        if side is not None and not side.writing and isinstance(state.get("model_"), str):
            from xgboost import XGBClassifier

            model = XGBClassifier()
            model.load_model(str(side.path(state["model_"])))
            state = {**state, "model_": model}
        super().__setstate__(state)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return self.model_.predict_proba(X)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(axis=1)]


def _accepts_groups(estimator) -> bool:
    import inspect

    return "groups" in inspect.signature(estimator.fit).parameters


class ViewEnsemble(ClassifierMixin, BaseEstimator):
    """A classifier on images with several cached views each (``X`` of shape ``(n, views, dim)``).

    ``train_views="all"`` trains ``estimator`` on every view of every training image (augmentation
    at no extraction cost), ``"first"`` on the original view only. ``test_views="all"`` averages
    the predicted probabilities over the views (test-time augmentation), ``"first"`` uses the
    original. A pipeline's ``head`` that takes ``groups`` is told which rows are views of one image.
    """

    def __init__(self, estimator, train_views: str = "all", test_views: str = "all"):
        self.estimator, self.train_views, self.test_views = estimator, train_views, test_views

    @staticmethod
    def _select(X: np.ndarray, which: str) -> np.ndarray:
        X = np.asarray(X)
        if X.ndim != 3:
            raise RunError(f"ViewEnsemble needs features of shape (images, views, dim), got {X.shape}")
        if which not in ("all", "first"):
            raise RunError(f"views {which!r}: use all or first")
        return X if which == "all" else X[:, :1]

    def fit(self, X: np.ndarray, y: np.ndarray) -> ViewEnsemble:
        from sklearn.base import clone

        chosen = self._select(X, self.train_views)
        n, views = chosen.shape[:2]
        rows = chosen.reshape(n * views, -1)
        self.estimator_ = clone(self.estimator)
        params = {}
        head = self.estimator_.steps[-1][1] if isinstance(self.estimator_, Pipeline) else self.estimator_
        if views > 1 and _accepts_groups(head):
            key = f"{self.estimator_.steps[-1][0]}__groups" if isinstance(self.estimator_, Pipeline) else "groups"
            params[key] = np.repeat(np.arange(n), views)
        self.estimator_.fit(rows, np.repeat(np.asarray(y), views), **params)
        self.classes_ = self.estimator_.classes_
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        chosen = self._select(X, self.test_views)
        return np.mean([self.estimator_.predict_proba(chosen[:, v]) for v in range(chosen.shape[1])], axis=0)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(axis=1)]

    @property
    def named_steps(self):  # the wrapped pipeline's steps, so callers can reach the head
        return self.estimator_.named_steps if hasattr(self, "estimator_") else self.estimator.named_steps


class CosineKNN(ClassifierMixin, BaseEstimator):
    """k nearest neighbours by cosine similarity, each neighbour's vote weighted by one over its cosine distance
    (scikit-learn's ``KNeighborsClassifier(metric="cosine", weights="distance")``, tested equal to it), searched
    exactly by faiss: an inner-product index of the rows made unit length. On 10,000 held-out rows against 50,000
    training rows of 1,280 dimensions faiss took 17 s where scikit-learn's brute force took 76 s (2 cores), which
    at a million rows is the difference between minutes and half an hour per fit (docs/benchmarks.md)."""

    def __init__(self, n_neighbors: int = 11):
        self.n_neighbors = n_neighbors

    def fit(self, X: np.ndarray, y: np.ndarray) -> CosineKNN:
        if len(X) < self.n_neighbors:
            raise RunError(f"knn: {self.n_neighbors} neighbours asked for, and only {len(X)} training rows")
        self.classes_, self.labels_ = np.unique(np.asarray(y), return_inverse=True)
        self.rows_ = _unit_rows(X)  # kept in the saved model: the index is rebuilt from them when predicting
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        import faiss  # imported here: only k-NN needs it

        index = faiss.IndexFlatIP(self.rows_.shape[1])
        index.add(self.rows_)
        similarity, found = index.search(_unit_rows(X), self.n_neighbors)
        distance = np.clip(1.0 - similarity.astype(np.float64), 0.0, 2.0)
        with np.errstate(divide="ignore"):
            weight = 1.0 / distance
        exact = np.isinf(weight)  # as scikit-learn: a row with an exact copy takes the copies' votes alone
        copied = exact.any(axis=1)
        weight[copied] = exact[copied]
        votes = np.zeros((len(found), len(self.classes_)))
        np.add.at(votes, (np.repeat(np.arange(len(found)), found.shape[1]), self.labels_[found].ravel()),
                  weight.ravel())
        return votes / votes.sum(axis=1, keepdims=True)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(axis=1)]


def _unit_rows(X: np.ndarray) -> np.ndarray:
    """float32 rows scaled to unit length (a zero row stays zero: its cosine to everything is 0, as in
    scikit-learn)."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return np.ascontiguousarray(X / np.where(norms > 0, norms, 1.0))


def sgd_epochs(rows: int) -> int:
    """svm-linear's passes over ``rows`` training rows: :data:`SGD_EPOCHS`, or past :data:`SGD_FULL_EPOCHS_ROWS`
    as many as make the same number of updates (at least 2)."""
    if rows <= SGD_FULL_EPOCHS_ROWS:
        return SGD_EPOCHS
    return max(2, -(-SGD_EPOCHS * SGD_FULL_EPOCHS_ROWS // rows))
