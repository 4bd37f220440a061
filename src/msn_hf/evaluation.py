"""
Low-shot evaluation of frozen encoders, following the MSN protocol: frozen target-encoder class-token features,
multinomial logistic regression on a few labelled images per class and on a fraction of the labels, and a
cosine k-nearest-neighbour classifier on all labels. Baselines (a randomly initialised encoder of the same shape,
raw pixels) run in the same call so that every number in a table shares its data and sampling.

Library use (e.g. at the end of pretraining):

```python
>>> from msn_hf.data import load_digits_dataset, ImageDataset
>>> from msn_hf.evaluation import evaluate_lowshot
>>> train = ImageDataset(load_digits_dataset("train"), "image", "label")
>>> test = ImageDataset(load_digits_dataset("test"), "image", "label")
>>> results = evaluate_lowshot("outputs/msn-digits", train, test, output_file="eval_results.json")
```

Command line: `msn-evaluate --model_name_or_path outputs/msn-digits --baselines random pixels`.
"""

import copy
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm
from transformers import HfArgumentParser

from .data import (
    DATA_RECORD_FILE,
    DEFAULT_TEST_SIZE,
    DataArguments,
    ImageDataset,
    decode_image,
    hold_out,
    keep_rows,
    labelled_rows,
    load_image_dataset,
    load_labelled_split,
    load_test_dir,
    match_labels,
    seen_in_pretraining,
)
from .files import write_text_atomically
from .modelcard import format_table, update_model_card
from .pictures import (
    LOWSHOT_FILE,
    NEIGHBOURS_FILE,
    PROTOTYPES_FILE,
    nearest_neighbours,
    plot_lowshot,
    plot_neighbours,
    plot_prototypes,
    prototype_usage,
)
from .run_outputs import TRAIN_RESULTS_FILE, write_train_results
from .sources import check_model_source

logger = logging.getLogger(__name__)

DEFAULT_SHOTS = (1, 2, 5, 10)
DEFAULT_LABEL_FRACTION = 0.01
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_KNN_K = 20
# cyanure's `lambd` of the authors' logistic evaluation (their `--lambd`), which they divide by the number of
# labelled images before fitting; `PROTOCOLS` states what each protocol does with it.
DEFAULT_L2_REG = 0.0025
# How each protocol regularises, written into the results. cyanure minimises
#   (1/n) sum_i CE(W x_i, y_i) + (lambda / 2) ||W||^2,
# scikit-learn (lbfgs) C sum_i CE(W x_i + b, y_i) + (1/2) ||W||^2; multiplying cyanure's objective by n / lambda
# gives scikit-learn's with C = 1 / (n lambda).
PROTOCOLS = {
    "msn": (
        "the authors' protocol: each feature vector centred (its own mean removed) and L2-normalised; multinomial "
        "logistic regression without intercept minimising mean cross-entropy + (l2_reg / n) / 2 * ||W||^2 (cyanure "
        "lambd = l2_reg / n for n labelled images), i.e. scikit-learn C = 1 / l2_reg"
    ),
    "standardized": (
        "features standardised with the mean and scale of all training images; multinomial logistic regression "
        "with intercept minimising mean cross-entropy + l2_reg / 2 * ||W||^2, i.e. scikit-learn C = 1 / (l2_reg * n)"
    ),
}
DEFAULT_PROTOCOL = "msn"
BASELINES = ("random", "pixels")
# `--baselines none`: the model alone (argparse cannot take a list flag given without values).
NO_BASELINES = "none"
# The results file of `msn-pretrain`'s final evaluation and of `msn-evaluate`.
RESULTS_FILE = "eval_results.json"
# Raw-pixel features are average-pooled to at most this side, so that 224 px images stay affordable.
PIXEL_FEATURE_SIZE = 32
MODEL_ENCODER_NAME = "msn"
# The neighbours picture: query images (one per class) and neighbours of each.
NEIGHBOUR_QUERIES = 8
NEIGHBOURS = 6
# Unreadable files named in the warning of one feature extraction (all are counted).
SKIPPED_FILES_SHOWN = 3


# ----------------------------------------------------------------------------------------------------- features
def load_feature_model(model_name_or_path: str, trust_remote_code: bool = False, **kwargs) -> torch.nn.Module:
    """
    The frozen encoder stored at `model_name_or_path`: an `MSNModel` folder (features: target-encoder class
    token), an `MSNForImageClassification` folder (its pooled features, the classifier removed), or any other
    `AutoModel` checkpoint with a `pooler_output` or a class token (e.g. a `ViTMSNModel`).
    """
    from transformers import AutoConfig, AutoModel

    from .modeling_msn import MSNForImageClassification

    config = AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code, **kwargs)
    if config.model_type == "msn" and "MSNForImageClassification" in (config.architectures or []):
        model = MSNForImageClassification.from_pretrained(model_name_or_path, **kwargs)
        # Its logits then are the features the classifier was trained on (class token, or with the patch mean).
        model.classifier = torch.nn.Identity()
        return model
    return AutoModel.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code, **kwargs)


def random_like(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """A freshly initialised model of the same class and configuration as `model` (the "random encoder" baseline)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = copy.deepcopy(model.config)
        if getattr(config, "backbone_pretrained", None) is not None:
            config.backbone_pretrained = None  # random means random, not the timm weights the model started from
        random_model = type(model)(config)
    if isinstance(getattr(model, "classifier", None), torch.nn.Identity):
        random_model.classifier = torch.nn.Identity()
    return random_model.to(next(model.parameters()).device)


def _embed(model: torch.nn.Module | None, pixel_values: torch.Tensor) -> torch.Tensor:
    """Features of one batch: the model's pooled output or class token, or pooled raw pixels when `model` is None."""
    if model is None:
        side = min(PIXEL_FEATURE_SIZE, pixel_values.shape[-1])
        return F.adaptive_avg_pool2d(pixel_values, side).flatten(1)
    outputs = model(pixel_values=pixel_values)
    for name in ("pooler_output", "logits"):
        value = getattr(outputs, name, None)
        if value is not None:
            return value
    return outputs.last_hidden_state[:, 0]


def _batches(
    dataset: ImageDataset, image_processor, batch_size: int, skipped: dict | None = None
) -> Iterator[tuple[torch.Tensor, list, list[int]]]:
    """
    Evaluation-preprocessed `(pixel_values, labels, rows)` batches (`rows`: the dataset rows of the kept images). The images are read undecoded and decoded here, as the
    pretraining collator does, so that an unreadable one is skipped with its label (`datasets` would raise on it
    while reading the batch); each skipped file is added to the keys of `skipped`, by path (else by row).
    """
    rows = dataset.dataset.cast_column(dataset.image_column, datasets.Image(decode=False))
    start = 0
    for batch in rows.iter(batch_size=batch_size):
        values = batch[dataset.image_column]
        images = [decode_image(value) for value in values]
        kept = [i for i, image in enumerate(images) if image is not None]
        if skipped is not None:
            for i, (value, image) in enumerate(zip(values, images)):
                if image is None:
                    skipped[(value or {}).get("path") or f"row {start + i}"] = None
        start += len(values)
        if not kept:
            continue
        labels = [batch[dataset.label_column][i] for i in kept]
        pixel_values = image_processor([images[i] for i in kept], return_tensors="pt")["pixel_values"]
        yield pixel_values, labels, [start - len(values) + i for i in kept]


def extract_features(
    model: torch.nn.Module | None,
    dataset: ImageDataset,
    image_processor,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    progress: bool = True,
    desc: str = "Extracting features",
    return_rows: bool = False,
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """
    Frozen features of a labelled dataset, batched and without gradient.

    Args:
        model: an encoder whose output has `pooler_output` (MSNModel: the target encoder's class token),
            `logits` or `last_hidden_state`; `None` gives the raw-pixel baseline (pooled to at most 32 x 32).
        dataset: images with a label column.
        image_processor: the evaluation preprocessing, called as `image_processor(images, return_tensors="pt")`.
        device: where to run the model; by default where its parameters are. The model is moved there and its
            train/eval mode is restored afterwards.

    Unreadable images are skipped with their labels; one warning per call counts the files and names the first.

    Returns:
        `(features, labels)`: float32 `(num_images, num_features)` and the label values `(num_images,)`; with
        `return_rows`, also the dataset row of each feature vector `(num_images,)` (unreadable rows have none).
    """
    if dataset.label_column is None:
        raise ValueError(
            f"`dataset` must have a label column for evaluation, got none among {list(dataset.dataset.features)}; "
            "pass `label_column_name`."
        )
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    was_training = model is not None and model.training
    if model is not None:
        device = torch.device(device) if device is not None else next(model.parameters()).device
        model.to(device).eval()
    total = len(dataset.dataset) if hasattr(dataset.dataset, "__len__") else None
    features, labels, rows = [], [], []
    skipped = {}  # the unreadable files, in the order met; a dict counts a file met twice once
    try:
        with torch.inference_mode(), tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar:
            for pixel_values, batch_labels, batch_rows in _batches(dataset, image_processor, batch_size, skipped):
                if device is not None:
                    pixel_values = pixel_values.to(device)
                features.append(_embed(model, pixel_values).float().cpu())
                labels.extend(batch_labels)
                rows.extend(batch_rows)
                bar.update(len(batch_labels))
    finally:
        if was_training:
            model.train()
    if skipped:
        # One summary per extraction: a warning per batch would bury the first files among the repeats.
        shown = list(skipped)[:SKIPPED_FILES_SHOWN]
        logger.warning(
            f"{desc}: skipped {len(skipped)} unreadable image files: {', '.join(shown)}"
            f"{', ...' if len(skipped) > len(shown) else ''}."
        )
    if not features:
        raise ValueError("`dataset` contains no readable image.")
    if return_rows:
        return torch.cat(features).numpy(), np.asarray(labels), np.asarray(rows, dtype=np.int64)
    return torch.cat(features).numpy(), np.asarray(labels)


# ---------------------------------------------------------------------------------------------------- classifiers
def sample_per_class(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """Indices of `shots` random images of every class (all of a class's images when it has fewer)."""
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        chosen.append(rng.choice(members, size=min(shots, len(members)), replace=False))
    return np.sort(np.concatenate(chosen))


def fraction_size(num_images: int, fraction: float) -> int:
    """How many labelled images the label-fraction setting draws: `fraction` of them, rounded."""
    return round(fraction * num_images)


def sample_fraction(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """
    Indices of `fraction_size(len(labels), fraction)` random images, stratified by class as evenly as the count
    allows (like ImageNet's 1 % subset): every class its share rounded down, the rest one each to the classes with
    the largest remainders, ties drawn with `seed`. A class whose share is below one may get none.
    """
    total = fraction_size(len(labels), fraction)
    if total < 1:
        raise ValueError(f"`fraction` must give at least one of the {len(labels)} images, got {fraction!r} (none).")
    rng = np.random.default_rng(seed)
    classes, sizes = np.unique(labels, return_counts=True)
    counts = _largest_remainder_counts(sizes, total, rng)
    chosen = []
    for label, count in zip(classes, counts):
        chosen.append(rng.choice(np.flatnonzero(labels == label), size=count, replace=False))
    return np.sort(np.concatenate(chosen))


def _largest_remainder_counts(sizes: np.ndarray, total: int, rng: np.random.Generator) -> np.ndarray:
    """`total` split among classes of `sizes` in proportion (Hamilton's method); equal remainders in `rng`'s order."""
    # Integer numerators of the shares total * size / N: equal remainders compare equal, as floats may not.
    floors, remainders = np.divmod(total * sizes, sizes.sum())
    random_order = rng.permutation(len(sizes))
    by_remainder = random_order[np.argsort(-remainders[random_order], kind="stable")]
    floors[by_remainder[: total - floors.sum()]] += 1
    return floors


def logistic_classifier(protocol: str, l2_reg: float, num_samples: int, max_iter: int = 1000) -> LogisticRegression:
    """The scikit-learn classifier of `protocol` (see `PROTOCOLS`) for `num_samples` labelled images."""
    if protocol == "msn":
        return LogisticRegression(C=1.0 / l2_reg, fit_intercept=False, max_iter=max_iter)
    return LogisticRegression(C=1.0 / (l2_reg * num_samples), max_iter=max_iter)


def preprocess_features(protocol: str, train_features: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Features as the protocol's classifier sees them: `"msn"` per image, `"standardized"` fitted on `train_features`."""
    if protocol == "msn":
        def normalise(features):
            centred = features - features.mean(axis=1, keepdims=True)
            return centred / np.maximum(np.linalg.norm(centred, axis=1, keepdims=True), 1e-12)

        return [normalise(features) for features in (train_features, *others)]
    scaler = StandardScaler().fit(train_features)
    return [scaler.transform(features) for features in (train_features, *others)]


def logistic_accuracy(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    l2_reg: float = DEFAULT_L2_REG,
    max_iter: int = 1000,
    protocol: str = DEFAULT_PROTOCOL,
) -> float:
    """Test accuracy of the protocol's multinomial logistic regression (lbfgs) on already preprocessed features."""
    if len(np.unique(train_labels)) < 2:
        # A single class needs no classifier (and lbfgs refuses one).
        return float(np.mean(test_labels == train_labels[0]))
    classifier = logistic_classifier(protocol, l2_reg, len(train_labels), max_iter)
    classifier.fit(train_features, train_labels)
    return float(classifier.score(test_features, test_labels))


def knn_accuracy(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    k: int = DEFAULT_KNN_K,
) -> float:
    """Test accuracy of a majority vote among the `k` nearest training images by cosine similarity."""
    classifier = KNeighborsClassifier(n_neighbors=min(k, len(train_labels)), metric="cosine", algorithm="brute")
    classifier.fit(train_features, train_labels)
    return float(classifier.score(test_features, test_labels))


def _mean_std(runs: list[float]) -> dict:
    return {"mean": float(np.mean(runs)), "std": float(np.std(runs)), "runs": runs}


def fraction_name(fraction: float) -> str:
    """The result key of a label fraction: 0.01 -> '1%'."""
    return f"{fraction * 100:g}%"


# One BLAS thread: the per-iteration products of these small fits are too short to share, and multi-threaded
# OpenBLAS on busy cores spends more time synchronising than computing (20x slower measured on 2 shared cores).
@threadpool_limits.wrap(limits=1, user_api="blas")
def evaluate_features(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    shots: Sequence[int] = DEFAULT_SHOTS,
    label_fraction: float | None = DEFAULT_LABEL_FRACTION,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    knn_k: int | None = DEFAULT_KNN_K,
    l2_reg: float = DEFAULT_L2_REG,
    protocol: str = DEFAULT_PROTOCOL,
) -> dict:
    """
    Low-shot accuracies of one set of features: `{"num_features", "logistic": {"1-shot": {"mean", "std", "runs"},
    ..., "1%": {...}}, "knn": accuracy}`; accuracies are fractions in [0, 1].

    The logistic regressions follow `protocol` (see `PROTOCOLS`); `"standardized"` scales with the statistics of
    ALL training images (no labels needed for that), so that every labelled subset sees the same feature space.
    """
    train_scaled, test_scaled = preprocess_features(protocol, train_features, test_features)
    subsets = {f"{k}-shot": (lambda seed, k=k: sample_per_class(train_labels, k, seed)) for k in shots}
    if label_fraction is not None:
        subsets[fraction_name(label_fraction)] = lambda seed: sample_fraction(train_labels, label_fraction, seed)
    logistic = {}
    for name, sample in subsets.items():
        runs = []
        for seed in seeds:
            indices = sample(seed)
            runs.append(
                logistic_accuracy(
                    train_scaled[indices], train_labels[indices], test_scaled, test_labels, l2_reg, protocol=protocol
                )
            )
        logistic[name] = _mean_std(runs)
    results = {"num_features": int(train_features.shape[1]), "logistic": logistic}
    if knn_k is not None:
        results["knn"] = knn_accuracy(train_features, train_labels, test_features, test_labels, knn_k)
    return results


# ----------------------------------------------------------------------------------------------------- evaluation
def _check_settings(shots, label_fraction, seeds, knn_k, baselines, l2_reg, protocol) -> None:
    def fail(name, expected, value):
        raise ValueError(f"`{name}` must be {expected}, got {value!r}.")

    if any(isinstance(k, bool) or not isinstance(k, int) or k <= 0 for k in shots):
        fail("shots", "a sequence of positive integers", shots)
    if label_fraction is not None and not (isinstance(label_fraction, (int, float)) and 0 < label_fraction <= 1):
        fail("label_fraction", "a number in (0, 1] or None", label_fraction)
    if not seeds or any(not isinstance(seed, int) for seed in seeds):
        fail("seeds", "a non-empty sequence of integers", seeds)
    if knn_k is not None and (isinstance(knn_k, bool) or not isinstance(knn_k, int) or knn_k <= 0):
        fail("knn_k", "a positive integer or None", knn_k)
    unknown = [name for name in baselines if name not in BASELINES]
    if isinstance(baselines, str) or unknown:
        fail("baselines", f"a sequence of names among {BASELINES}", baselines)
    if not isinstance(l2_reg, (int, float)) or l2_reg <= 0:
        fail("l2_reg", "a positive number", l2_reg)
    if protocol not in PROTOCOLS:
        fail("protocol", f"one of {tuple(PROTOCOLS)}", protocol)


def _encode_labels(train_labels: np.ndarray, test_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map label values (ints or strings) to 0..C-1 consistently across both splits."""
    values, codes = np.unique(np.concatenate([train_labels, test_labels]), return_inverse=True)
    return codes[: len(train_labels)], codes[len(train_labels) :]


def evaluate_lowshot(
    model_or_path: torch.nn.Module | str,
    train: ImageDataset,
    test: ImageDataset | None,
    image_processor=None,
    shots: Sequence[int] = DEFAULT_SHOTS,
    label_fraction: float | None = DEFAULT_LABEL_FRACTION,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    knn_k: int | None = DEFAULT_KNN_K,
    baselines: Sequence[str] = BASELINES,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    l2_reg: float = DEFAULT_L2_REG,
    output_file: str | None = None,
    progress: bool = True,
    trust_remote_code: bool = False,
    protocol: str = DEFAULT_PROTOCOL,
    pictures_dir: str | os.PathLike | None = None,
) -> dict:
    """
    Low-shot evaluation of a frozen encoder and of baselines on the same data and samples.

    Args:
        model_or_path: an `MSNModel` (or any model accepted by [`extract_features`]) or a checkpoint folder / Hub
            id for [`load_feature_model`].
        train: labelled images the classifiers are trained on (subsets of them for the low-shot settings).
        test: labelled images the accuracies are measured on; None holds out a stratified 20 % of `train`. Rows
            of either without a label (label < 0) are left out (see [`separate_unlabelled`]).
        image_processor: evaluation preprocessing (`image_processor(images, return_tensors="pt")`); by default
            the one saved with `model_or_path` when it is a path.
        shots: images per class of the few-shot logistic regressions.
        label_fraction: stratified fraction of the training labels for one more logistic regression (None: skip);
            `settings["label_fraction_images"]` states how many labels that is (see [`sample_fraction`]). It is
            left out (with `settings["label_fraction_note"]`) when it is fewer than one labelled image per class.
        seeds: one labelled subset per seed for every setting; results report mean and standard deviation.
        knn_k: neighbours of the cosine kNN classifier on all training labels (None: skip).
        baselines: among `"random"` (a randomly initialised model of the same class and configuration) and
            `"pixels"` (raw pixels after the evaluation preprocessing, pooled to at most 32 x 32).
        batch_size, device: feature extraction batches and device (default: CUDA when available for a path,
            the model's own device for a model).
        l2_reg: regularisation of the logistic regressions, cyanure's `lambd` (see `PROTOCOLS`).
        output_file: where to write the results as JSON (None: do not write).
        protocol: `"msn"` (the authors': centred, L2-normalised features, `C = 1 / l2_reg`, no intercept) or
            `"standardized"` (standardised features, `C = 1 / (l2_reg * n)`); stated in `settings`.
        pictures_dir: where to draw the pictures of what was learnt (see [`write_pictures`]); None: none.

    Returns:
        `{"settings": {...}, "encoders": {"msn": {...}, "random": {...}, "pixels": {...}}}` where every encoder
        has `num_features`, `logistic` (`"<k>-shot"` and e.g. `"1%"`: `{"mean", "std", "runs"}`) and `knn`;
        accuracies are fractions in [0, 1].
    """
    shots, seeds, baselines = tuple(shots), tuple(seeds), tuple(baselines)
    _check_settings(shots, label_fraction, seeds, knn_k, baselines, l2_reg, protocol)
    train = labelled_rows(train, "training")
    if test is None:
        train, test = hold_out(train, DEFAULT_TEST_SIZE)
    test = labelled_rows(test, "test")
    if isinstance(model_or_path, (str, os.PathLike)):
        model = load_feature_model(str(model_or_path), trust_remote_code=trust_remote_code)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if image_processor is None:
            from transformers import AutoImageProcessor

            image_processor = AutoImageProcessor.from_pretrained(
                str(model_or_path), trust_remote_code=trust_remote_code
            )
    elif isinstance(model_or_path, torch.nn.Module):
        model = model_or_path
    else:
        raise ValueError(
            f"`model_or_path` must be a torch module or a checkpoint path, got {type(model_or_path).__name__}."
        )
    if image_processor is None:
        raise ValueError("`image_processor` is required when `model_or_path` is a model, got None.")

    encoders = {MODEL_ENCODER_NAME: lambda: model}
    if "random" in baselines:
        encoders["random"] = lambda: random_like(model)
    if "pixels" in baselines:
        encoders["pixels"] = lambda: None

    results = {"encoders": {}}
    label_fraction_note = shots_note = None
    kept_features = {}  # (train, test) features and rows of the model and the pixels, for the pictures
    for name, build in encoders.items():
        start = time.perf_counter()
        encoder = build()
        features = {}
        for split, dataset in (("train", train), ("test", test)):
            features[split] = extract_features(
                encoder, dataset, image_processor, batch_size, device, progress, desc=f"{name} {split} features",
                return_rows=True,
            )  # fmt: skip
        (train_x, train_y, train_rows), (test_x, test_y, test_rows) = features["train"], features["test"]
        train_y, test_y = _encode_labels(train_y, test_y)
        if not results["encoders"]:
            shots_note = _short_classes_note(shots, train_y)
            if label_fraction is not None:
                label_fraction, label_fraction_note = _usable_label_fraction(label_fraction, train_y)
        results["encoders"][name] = evaluate_features(
            train_x, train_y, test_x, test_y, shots, label_fraction, seeds, knn_k, l2_reg, protocol
        )
        results["encoders"][name]["seconds"] = round(time.perf_counter() - start, 2)
        if name in (MODEL_ENCODER_NAME, "pixels"):
            kept_features[name] = (train_x, train_rows, test_x, test_rows, test_y)
    results["settings"] = {
        "shots": list(shots),
        "label_fraction": label_fraction,
        "label_fraction_images": None if label_fraction is None else fraction_size(len(train_y), label_fraction),
        "seeds": list(seeds),
        "knn_k": knn_k,
        "l2_reg": l2_reg,
        "protocol": protocol,
        "regularisation": PROTOCOLS[protocol],
        "num_train": int(len(train_y)),
        "num_test": int(len(test_y)),
        "num_labels": int(len(np.unique(np.concatenate([train_y, test_y])))),
    }
    if label_fraction_note is not None:
        results["settings"]["label_fraction_note"] = label_fraction_note
    if shots_note is not None:
        results["settings"]["shots_note"] = shots_note
    if pictures_dir is not None:
        results["pictures"] = write_pictures(
            pictures_dir, model, train, test, image_processor, kept_features, results, batch_size, device
        )
    if output_file is not None:
        write_text_atomically(output_file, json.dumps(results, indent=2))
    return results


def _short_classes_note(shots: tuple[int, ...], train_labels: np.ndarray) -> str | None:
    """
    What the shot counts above the smallest class's number of training images mean, in words (None when there are
    none): such a class gives all of its images, fewer than the setting's name says (see [`sample_per_class`]).
    """
    classes, sizes = np.unique(train_labels, return_counts=True)
    short = [k for k in shots if k > sizes.min()]
    if not short:
        return None
    note = (
        f"{', '.join(f'{k}-shot' for k in short)}: {int((sizes < max(short)).sum())} of the {len(classes)} classes have "
        f"fewer training images (the smallest {sizes.min()} training images), and give all they have."
    )
    logger.warning(note)
    return note


def _usable_label_fraction(label_fraction: float, train_labels: np.ndarray) -> tuple[float | None, str | None]:
    """
    `label_fraction`, or None with the reason when it is fewer than one labelled image per class on average: the
    setting would then have fewer labels than the 1-shot one, and some classes none.
    """
    per_class = label_fraction * len(train_labels) / len(np.unique(train_labels))
    if per_class >= 1:
        return label_fraction, None
    return None, (
        f"{fraction_name(label_fraction)} of {len(train_labels)} labelled images is {per_class:.2f} per class, fewer "
        "than one: left out (fewer labels than the 1-shot setting, some classes without any)."
    )


def write_pictures(
    output_dir: str | os.PathLike,
    model: torch.nn.Module,
    train: ImageDataset,
    test: ImageDataset,
    image_processor,
    features: dict,
    results: dict,
    batch_size: int = 64,
    device: str | torch.device | None = None,
) -> dict:
    """
    The pictures of what the model learnt, into `output_dir`: `neighbours.png` (a few test images, one per class,
    and their nearest training images under the model's features, beside the same under raw pixels when `features`
    has them), `lowshot.png` (accuracy against labels per class, from `results`) and, for a model with prototypes,
    `prototypes.png` (the share of the training images each prototype takes). `features` maps `"msn"` (and
    `"pixels"`) to `(train_features, train_rows, test_features, test_rows, test_labels)` of [`extract_features`].

    Returns `{"files": [names written], "prototypes": {"used", "num_prototypes"}}` (prototypes only when drawn).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = {"files": []}
    train_x, train_rows, test_x, test_rows, test_y = features[MODEL_ENCODER_NAME]
    # One query per class, in class order, so that the grid shows as many classes as it has rows.
    queries = [int(np.flatnonzero(test_y == label)[0]) for label in np.unique(test_y)][:NEIGHBOUR_QUERIES]
    k = min(NEIGHBOURS, len(train_rows))
    train_images, test_images = _undecoded_images(train), _undecoded_images(test)
    neighbours = nearest_neighbours(train_x, test_x[queries], k)
    pixel_neighbours = None
    if "pixels" in features:
        pixel_train_x, pixel_train_rows, pixel_test_x, _, _ = features["pixels"]
        # The same readable rows in the same order: the pixel features index the same images.
        pixel_neighbours = nearest_neighbours(pixel_train_x, pixel_test_x[queries], k)
        pixel_neighbours = [[train_images(pixel_train_rows[j]) for j in row] for row in pixel_neighbours]
    plot_neighbours(
        [test_images(test_rows[i]) for i in queries],
        [[train_images(train_rows[j]) for j in row] for row in neighbours],
        output_dir / NEIGHBOURS_FILE,
        pixel_neighbour_images=pixel_neighbours,
    )
    plot_lowshot(results, output_dir / LOWSHOT_FILE)
    written["files"] += [NEIGHBOURS_FILE, LOWSHOT_FILE]
    if hasattr(model, "prototype_assignments"):
        device = torch.device(device) if device is not None else next(model.parameters()).device
        counts = np.zeros(model.config.num_prototypes, dtype=np.int64)
        with torch.inference_mode():
            for pixel_values, _, _ in _batches(train, image_processor, batch_size):
                probs = model.prototype_assignments(pixel_values.to(device)).float().cpu().numpy()
                counts += prototype_usage(probs, model.config.num_prototypes)
        used = plot_prototypes(counts, output_dir / PROTOTYPES_FILE)
        written["files"].append(PROTOTYPES_FILE)
        written["prototypes"] = {"used": int(used), "num_prototypes": int(model.config.num_prototypes)}
    return written


def _undecoded_images(dataset: ImageDataset):
    """`row -> PIL image` of a dataset, decoded with `decode_image` (as the features were)."""
    rows = dataset.dataset.cast_column(dataset.image_column, datasets.Image(decode=False))
    return lambda row: decode_image(rows[int(row)][dataset.image_column])


# -------------------------------------------------------------------------------------------------------- data
def load_evaluation_datasets(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_dir: str | None = None,
    test_dir: str | None = None,
    train_split: str = "train",
    test_split: str | None = None,
    test_size: float = DEFAULT_TEST_SIZE,
    image_column_name: str | None = None,
    label_column_name: str | None = None,
    max_train_samples: int | None = None,
    max_test_samples: int | None = None,
    cache_dir: str | None = None,
    train_files: list[str] | None = None,
    seed: int = 0,
) -> tuple[ImageDataset, ImageDataset]:
    """
    Labelled train and test sets from the same sources as pretraining (Hub id or `save_to_disk` folder, image
    folder, shards, or the built-in digits with their test split). The test set is `test_dir`, `test_split`, or
    else the first labelled one of 'validation' and 'test'; without any, a stratified `test_size` of the training
    images is held out with `seed` (the split `msn-pretrain` holds out before pretraining). A test set loaded on its
    own has its class ids matched to the training classes by name (see [`match_labels`]). Rows without a label
    (label < 0) are left out before any hold-out (see [`separate_unlabelled`]); a split with none is a ValueError.
    """
    common = dict(image_column_name=image_column_name, label_column_name=label_column_name, cache_dir=cache_dir)
    # Truncated before any hold-out, as `msn-pretrain` does, so that the same flags hold out the same images.
    train = load_image_dataset(
        dataset_name, dataset_config_name, train_dir, split=train_split, train_files=train_files,
        max_samples=max_train_samples, **common,
    )  # fmt: skip
    if train.label_column is None:
        raise ValueError(
            f"Evaluation needs labels, but no label column was found among {list(train.dataset.features)}; "
            "pass `label_column_name`."
        )
    train = labelled_rows(train, "training")
    if test_dir is not None:
        test = load_test_dir(test_dir, train_dir, train_split)
    else:
        test = load_labelled_split(dataset_name, dataset_config_name, test_split, train_split, train_dir=train_dir,
                                   train_files=train_files, **common)  # fmt: skip
    if test is not None:
        test = match_labels(train, test)  # loaded on its own, it numbers its classes on its own
    if test is None:
        logger.warning("No labelled evaluation split: holding out %.0f%% of %r.", 100 * test_size, train_split)
        train, test = hold_out(train, test_size, seed=seed)
    return train, keep_rows(test, max_test_samples)


def evaluated_on(data_args: DataArguments, eval_split: str | None) -> dict:
    """
    The facts of an evaluation that a model card states in place of the run's own: the data set, its Hub id (None
    for local images, so that the card does not name the pretraining data's id for them) and its split.
    """
    return dict(eval_dataset=data_args.test_dir or data_args.source_name, eval_dataset_id=data_args.eval_hub_dataset_id,
                eval_split=eval_split)  # fmt: skip


def load_evaluation_data(data_args: DataArguments) -> tuple[ImageDataset, ImageDataset]:
    """[`load_evaluation_datasets`] of the data flags shared by the command lines."""
    return load_evaluation_datasets(
        data_args.dataset_name,
        data_args.dataset_config_name,
        data_args.train_dir,
        data_args.test_dir,
        data_args.train_split,
        data_args.eval_split,
        data_args.test_size,
        data_args.image_column_name,
        data_args.label_column_name,
        data_args.max_train_samples,
        data_args.max_test_samples,
        data_args.cache_dir,
        data_args.train_files,
    )


# ---------------------------------------------------------------------------------------------------------- CLI
@dataclass
class EvaluationArguments:
    """What to evaluate, and how."""

    _argument_group_name = "evaluation"

    model_name_or_path: str = field(metadata={"help": "MSN checkpoint folder (or ViTMSN / AutoModel), or a Hub id."})
    image_processor_name: str | None = field(default=None, metadata={"help": "Processor folder; default: the model's."})
    shots: list[int] = field(default_factory=lambda: list(DEFAULT_SHOTS), metadata={"help": "Labelled images per class."})
    label_fraction: float = field(default=DEFAULT_LABEL_FRACTION, metadata={"help": "Fraction of labels; 0 to skip."})
    seeds: list[int] = field(default_factory=lambda: list(DEFAULT_SEEDS), metadata={"help": "One draw of labels each."})
    knn_k: int = field(default=DEFAULT_KNN_K, metadata={"help": "Neighbours of the kNN classifier; 0 to skip."})
    l2_reg: float = field(default=DEFAULT_L2_REG, metadata={"help": "cyanure's lambd (see --protocol)."})
    protocol: str = field(
        default=DEFAULT_PROTOCOL,
        metadata={"help": "Logistic regression protocol (see PROTOCOLS).", "choices": tuple(PROTOCOLS)},
    )
    baselines: list[str] = field(
        default_factory=lambda: list(BASELINES),
        metadata={
            "help": f"Among {BASELINES} (default: both), or '{NO_BASELINES}' for no baseline.",
            "choices": (*BASELINES, NO_BASELINES),
        },
    )
    batch_size: int = field(default=64, metadata={"help": "Feature extraction batch size."})
    device: str | None = field(default=None, metadata={"help": "Default: CUDA when available."})
    output_file: str | None = field(
        default=None,
        metadata={
            "help": f"Default: {RESULTS_FILE} in the model folder (the file msn-pretrain writes); for a Hub id, in "
            "evaluations/<id>/."
        },
    )
    no_pictures: bool = field(
        default=False, metadata={"help": "Do not draw neighbours.png, lowshot.png and prototypes.png next to the results."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Load code shipped with the checkpoint."})
    no_progress: bool = field(default=False, metadata={"help": "No progress bars."})
    allow_seen_images: bool = field(
        default=False,
        metadata={
            "help": f"Score on test images the model was pretrained on (its {DATA_RECORD_FILE} tells); refused "
            "otherwise. The card then says so."
        },
    )

    def __post_init__(self):
        # `evaluate_lowshot` checks these too, but its messages name its keyword arguments and offer None, which a
        # flag cannot pass: here they are checked as typed, before any image is loaded.
        if any(k <= 0 for k in self.shots):
            shown = " ".join(map(str, self.shots))
            raise ValueError(f"--shots must be positive integers (labelled images per class), got {shown}.")
        if not (self.label_fraction == 0 or 0 < self.label_fraction <= 1):
            raise ValueError(
                f"--label_fraction must be a number in (0, 1], or 0 to skip it, got {self.label_fraction}."
            )
        if self.knn_k < 0:
            raise ValueError(f"--knn_k must be a positive integer, or 0 to skip the kNN classifier, got {self.knn_k}.")
        if not self.l2_reg > 0:
            raise ValueError(f"--l2_reg must be a positive number, got {self.l2_reg}.")
        if NO_BASELINES in self.baselines:
            if len(self.baselines) > 1:
                raise ValueError(
                    f"--baselines: '{NO_BASELINES}' (no baseline) goes alone, got {self.baselines}; give "
                    f"'{NO_BASELINES}' or names among {BASELINES}."
                )
            self.baselines = []


def parse_args(argv: Sequence[str] | None = None) -> tuple[EvaluationArguments, DataArguments]:
    parser = HfArgumentParser((EvaluationArguments, DataArguments), description=__doc__.split("\n\n")[0])
    args, data_args = parser.parse_args_into_dataclasses(args=argv)
    _check_map_style(data_args)
    return args, data_args


def _check_map_style(data_args: DataArguments) -> None:
    """
    Refuse the streaming flags that `DataArguments` shares with msn-pretrain: an evaluation samples labelled images
    per class and reads images by row, which needs map-style data (a Hub set is downloaded once, then read locally).
    """
    given = {"--streaming": data_args.streaming, "--shuffle_buffer_size": data_args.shuffle_buffer_size}
    for flag, value in given.items():
        if value:
            shown = flag if value is True else f"{flag} {value}"
            raise ValueError(
                f"{flag} is for streaming pretraining only: msn-evaluate needs map-style data (it samples labelled "
                f"images per class and reads them by row), got {shown}; drop it."
            )


def results_file_for(model_name_or_path: str, output_file: str | None = None) -> str:
    """
    Where `msn-evaluate` writes its results (and its pictures beside them): `output_file` when given, else
    `eval_results.json` in the model's folder, beside its card; for a Hub id, `evaluations/<id>/` under the current
    folder, which may be another model's run folder whose results would otherwise be replaced.
    """
    if output_file is not None:
        return output_file
    if os.path.isdir(model_name_or_path):
        return os.path.join(model_name_or_path, RESULTS_FILE)
    return os.path.join("evaluations", *model_name_or_path.split("/"), RESULTS_FILE)


def main(argv: Sequence[str] | None = None) -> dict:
    """`msn-evaluate`: evaluate a checkpoint (and baselines), print a table and write the results as JSON."""
    args, data_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    check_model_source(args.model_name_or_path)
    processor_file = os.path.join(args.model_name_or_path, "preprocessor_config.json")
    if args.image_processor_name is None and os.path.isdir(args.model_name_or_path) and not os.path.isfile(processor_file):
        raise ValueError(
            f"--model_name_or_path {args.model_name_or_path!r} holds no image processor (preprocessor_config.json): "
            "pass --image_processor_name with the folder or Hub id of the processor the model was trained with."
        )
    train, test = load_evaluation_data(data_args)
    eval_split = test.split
    # A run of msn-pretrain records which images it pretrained on; a Hub id or another model records none.
    record, record_file = None, os.path.join(args.model_name_or_path, DATA_RECORD_FILE)
    if os.path.isfile(record_file):
        with open(record_file) as handle:
            record = json.load(handle)
    seen = seen_in_pretraining(record, data_args, test)
    if seen and not args.allow_seen_images:
        own = record["held_out"]
        advice = f"evaluate on the run's own {own} (its --test_size and --max_train_samples) or " if own else ""
        raise ValueError(
            f"--model_name_or_path {args.model_name_or_path!r} was pretrained on some of these test images, as its "
            f"{DATA_RECORD_FILE} tells: {seen}. To score on unseen images, {advice}give another split (--eval_split, "
            "--test_dir), or pass --allow_seen_images to score on these knowingly."
        )
    if seen:
        logger.warning(f"Scoring on images the model was pretrained on (--allow_seen_images): {seen}.")
        eval_split = f"{eval_split} (includes images seen in pretraining)"
    image_processor = None
    if args.image_processor_name is not None:
        from transformers import AutoImageProcessor

        image_processor = AutoImageProcessor.from_pretrained(
            args.image_processor_name, trust_remote_code=args.trust_remote_code
        )
    output_file = results_file_for(args.model_name_or_path, args.output_file)
    os.makedirs(os.path.dirname(os.path.abspath(output_file)), exist_ok=True)
    results = evaluate_lowshot(
        args.model_name_or_path,
        train,
        test,
        image_processor,
        shots=args.shots,
        label_fraction=args.label_fraction or None,
        seeds=args.seeds,
        knn_k=args.knn_k or None,
        baselines=args.baselines,
        batch_size=args.batch_size,
        device=args.device,
        l2_reg=args.l2_reg,
        output_file=output_file,
        progress=not args.no_progress,
        trust_remote_code=args.trust_remote_code,
        protocol=args.protocol,
        pictures_dir=None if args.no_pictures else os.path.dirname(os.path.abspath(output_file)),
    )
    settings = results["settings"]
    print(
        f"\n{args.model_name_or_path}: {settings['num_train']} training / {settings['num_test']} test images, "
        f"{settings['num_labels']} classes, seeds {settings['seeds']}; top-1 accuracy (%)\n"
    )
    print(format_table(results))
    print(f"\nResults written to {output_file}")
    for name in results.get("pictures", {}).get("files", []):
        print(f"Picture: {os.path.join(os.path.dirname(os.path.abspath(output_file)), name)}")
    if os.path.isdir(args.model_name_or_path):
        _update_folder_card(args.model_name_or_path, output_file, results, evaluated_on(data_args, eval_split))
    return results


def _update_folder_card(model_dir: str, output_file: str, results: dict, evaluation_facts: dict) -> None:
    """
    Re-render the card of the evaluated folder `model_dir` (and the evaluation its `train_results.json` states), but
    only when the results were written into it: the
    card sits next to that folder's results file and embeds the pictures there, so results sent elsewhere would make
    it state numbers that neither its results file nor its pictures show. Then it is left as it is, and the log says.
    """
    if Path(output_file).resolve().parent != Path(model_dir).resolve():
        logger.info(
            f"Model card of {model_dir} left as it is: the results went to --output_file {output_file}, outside the "
            "model folder (without --output_file they go into it and update its card)."
        )
        return
    card = update_model_card(model_dir, results, evaluation_facts)
    if card is not None:
        print(f"Model card updated: {card}")
    # A run folder's record of what the run did states the evaluation its card and results file now show.
    train_results_file = Path(model_dir) / TRAIN_RESULTS_FILE
    if train_results_file.is_file():
        write_train_results(model_dir, {**json.loads(train_results_file.read_text()), "eval": results})


if __name__ == "__main__":
    from .cli import evaluate

    evaluate()
