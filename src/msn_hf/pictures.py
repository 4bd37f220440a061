"""
Pictures of what a pretraining run learnt, as PNG files for the model card: the nearest training images of a few
evaluation images under the model's features (next to the same under raw pixels), low-shot accuracy against labels
per class for the model and its baselines, and how the data spreads over the prototypes.

Pure functions of arrays and results: no model, no dataset loading. They draw on `matplotlib.figure.Figure`, whose
`savefig` renders PNG with the Agg canvas, so they neither need a display nor switch pyplot's global backend. Every
figure has a fixed size (inches x `DPI`, stated in each docstring): no tight bounding box, so the size of a file
does not depend on its contents.

Use at the end of a run (`extract_features` and `evaluate_lowshot` are in `msn_hf.evaluation`; `train`, `test`
are `ImageDataset`s, whose items are `(PIL image, label)`):

```python
>>> from msn_hf.pictures import nearest_neighbours, plot_lowshot, plot_neighbours, plot_prototypes, prototype_usage
>>> train_x, _ = extract_features(model, train, processor)          # (num_train, dim)
>>> query_x, _ = extract_features(model, queries, processor)        # (num_queries, dim): e.g. 8 test images
>>> pixel_train_x, _ = extract_features(None, train, processor)     # raw pixels, for the second panel
>>> pixel_query_x, _ = extract_features(None, queries, processor)
>>> rows = nearest_neighbours(train_x, query_x, k=5)                # (num_queries, 5) indices into train
>>> pixel_rows = nearest_neighbours(pixel_train_x, pixel_query_x, k=5)
>>> plot_neighbours([queries[i][0] for i in range(len(queries))],
...                 [[train[j][0] for j in row] for row in rows], "out/neighbours.png",
...                 pixel_neighbour_images=[[train[j][0] for j in row] for row in pixel_rows])
>>> plot_lowshot(results, "out/lowshot.png")                         # results of evaluate_lowshot(...)
>>> counts = prototype_usage(target_probs, model.config.num_prototypes)  # MSNModelOutput.target_probs, stacked
>>> used = plot_prototypes(counts, "out/prototypes.png")             # prototypes with a share > 0, for the card
```
"""

import os
from collections.abc import Mapping, Sequence

import numpy as np

from .files import atomic_file

# The file names a run and `msn-evaluate` write, linked from the model card.
NEIGHBOURS_FILE = "neighbours.png"
LOWSHOT_FILE = "lowshot.png"
PROTOTYPES_FILE = "prototypes.png"
# Resolution of every figure, dots per inch.
DPI = 100
# Side of one image cell of `plot_neighbours`, inches; and the height of its header (panel titles), inches.
CELL_INCHES = 1.0
HEADER_INCHES = 0.6
# Size of the `plot_lowshot` and `plot_prototypes` figures, inches.
CHART_INCHES = (6.0, 4.0)
# How `plot_lowshot` names the encoders of `evaluate_lowshot` results (others keep their own name).
ENCODER_LABELS = {"msn": "MSN", "random": "random init", "pixels": "raw pixels"}


# ------------------------------------------------------------------------------------------------------ numbers
def nearest_neighbours(train_features, query_features, k: int) -> np.ndarray:
    """
    Indices of the `k` training vectors most similar to each query by cosine similarity, most similar first.

    Args:
        train_features: `(num_train, dim)` array.
        query_features: `(num_queries, dim)` array.
        k: neighbours per query, 1 <= k <= num_train.

    Returns:
        `(num_queries, k)` int64 array of row indices into `train_features`; ties go to the lower index.
    """
    train = _as_matrix("train_features", train_features)
    query = _as_matrix("query_features", query_features)
    if train.shape[1] != query.shape[1]:
        raise ValueError(
            f"nearest_neighbours: `query_features` must have as many columns as `train_features` ({train.shape[1]}),"
            f" got {query.shape[1]}."
        )
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= len(train):
        raise ValueError(f"nearest_neighbours: `k` must be an integer in [1, {len(train)}], got {k!r}.")
    # Unit rows, so that a dot product is the cosine; a zero row stays zero (similarity 0 to everything).
    train = train / np.maximum(np.linalg.norm(train, axis=1, keepdims=True), 1e-12)
    query = query / np.maximum(np.linalg.norm(query, axis=1, keepdims=True), 1e-12)
    similarity = query @ train.T
    # A stable sort of the negated similarities: descending, equal similarities in index order.
    return np.argsort(-similarity, axis=1, kind="stable")[:, :k].astype(np.int64)


def prototype_usage(assignments, num_prototypes: int) -> np.ndarray:
    """
    How many images each prototype is assigned: the count of hard assignments per prototype.

    Args:
        assignments: either `(num_images, num_prototypes)` probabilities (e.g. `MSNModelOutput.target_probs` of the
            last batches, concatenated), each image counted for its most probable prototype; or `(num_images,)`
            integer prototype indices.
        num_prototypes: prototypes of the model (`config.num_prototypes`), so that unused ones count 0.

    Returns:
        `(num_prototypes,)` int64 counts summing to `num_images`.
    """
    if isinstance(num_prototypes, bool) or not isinstance(num_prototypes, (int, np.integer)) or num_prototypes <= 0:
        raise ValueError(f"prototype_usage: `num_prototypes` must be a positive integer, got {num_prototypes!r}.")
    values = _to_numpy(assignments)
    if values.ndim == 2:
        if values.shape[1] != num_prototypes:
            raise ValueError(
                f"prototype_usage: `assignments` probabilities must have {num_prototypes} columns (`num_prototypes`),"
                f" got shape {values.shape}."
            )
        indices = values.argmax(axis=1)
    elif values.ndim == 1 and (values.size == 0 or np.issubdtype(values.dtype, np.integer)):
        indices = values.astype(np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= num_prototypes):
            raise ValueError(
                f"prototype_usage: `assignments` indices must lie in [0, {num_prototypes}), got values from "
                f"{indices.min()} to {indices.max()}."
            )
    else:
        raise ValueError(
            "prototype_usage: `assignments` must be (num_images, num_prototypes) probabilities or (num_images,) "
            f"integer indices, got shape {values.shape} of {values.dtype}."
        )
    return np.bincount(indices, minlength=num_prototypes).astype(np.int64)


# ----------------------------------------------------------------------------------------------------- pictures
def plot_neighbours(
    query_images: Sequence,
    neighbour_images: Sequence[Sequence],
    path: str | os.PathLike,
    title: str = "Nearest training images under the model's features",
    pixel_neighbour_images: Sequence[Sequence] | None = None,
    pixel_title: str = "under raw pixels",
) -> str:
    """
    A grid of images: one row per query (an evaluation image, first column, framed) followed by its nearest
    training images, nearest first; with `pixel_neighbour_images`, a second panel to the right with the same
    queries and their nearest training images under raw pixels.

    Args:
        query_images: `Q` images: PIL images or arrays `(H, W)`, `(H, W, 1)`, `(H, W, 3)` or `(H, W, 4)`, uint8 in
            [0, 255] or floats in [0, 1]; sides may differ.
        neighbour_images: `Q` sequences of `k` images each (e.g. `nearest_neighbours` rows mapped to images).
        path: the PNG file to write (its folder is created).
        title, pixel_title: titles of the two panels.
        pixel_neighbour_images: `Q` sequences of `k` images under raw pixels, or None for one panel.

    Returns:
        `path`, as a string. The figure is `panels x (k + 1) x CELL_INCHES` wide and `Q x CELL_INCHES +
        HEADER_INCHES` high, at `DPI`.
    """
    num_queries, k = _check_rows("neighbour_images", query_images, neighbour_images)
    panels = [(title, neighbour_images)]
    if pixel_neighbour_images is not None:
        if _check_rows("pixel_neighbour_images", query_images, pixel_neighbour_images)[1] != k:
            raise ValueError(
                f"plot_neighbours: `pixel_neighbour_images` rows must hold {k} images like `neighbour_images`, "
                f"got {len(pixel_neighbour_images[0])}."
            )
        panels.append((pixel_title, pixel_neighbour_images))
    figure = _figure((len(panels) * (k + 1) * CELL_INCHES, num_queries * CELL_INCHES + HEADER_INCHES))
    header = HEADER_INCHES / (num_queries * CELL_INCHES + HEADER_INCHES)
    for panel, (panel_title, rows) in enumerate(panels):
        left, width = panel / len(panels), 1 / len(panels)
        grid = figure.add_gridspec(
            num_queries, k + 1, left=left + 0.01, right=left + width - 0.01, top=1 - header, bottom=0.01,
            wspace=0.05, hspace=0.05,
        )  # fmt: skip
        figure.text(left + width / 2, 1 - header / 2, panel_title, ha="center", va="center", fontsize=9)
        for row in range(num_queries):
            for column, image in enumerate([query_images[row], *rows[row]]):
                axes = figure.add_subplot(grid[row, column])
                pixels = _to_image(image, f"image {column} of row {row}")
                axes.imshow(pixels, cmap="gray" if pixels.ndim == 2 else None, vmin=0, vmax=1)
                axes.set_xticks([])
                axes.set_yticks([])
                # The query is framed so that it reads apart from its neighbours.
                for spine in axes.spines.values():
                    spine.set_visible(column == 0)
                    spine.set_color("tab:red")
                    spine.set_linewidth(2)
    return _save(figure, path)


def plot_lowshot(results: Mapping, path: str | os.PathLike, labels: Mapping[str, str] | None = None) -> str:
    """
    Low-shot top-1 accuracy against labelled images per class, one line per encoder (the model and each baseline),
    error bars one standard deviation over seeds; the label-fraction setting (e.g. "1%") is a separate point at
    the right, its tick stating the labels it drew and what they amount to per class on average. The legend gives
    kNN accuracies.

    Args:
        results: what `msn_hf.evaluation.evaluate_lowshot` returns: `{"settings": {...}, "encoders": {name:
            {"logistic": {"<k>-shot" or e.g. "1%": {"mean", "std", ...}}, "knn": accuracy, ...}}}`, accuracies
            in [0, 1].
        path: the PNG file to write (its folder is created).
        labels: display names by encoder name (default `ENCODER_LABELS`).

    Returns:
        `path`, as a string. The figure is `CHART_INCHES` at `DPI`.
    """
    encoders = results.get("encoders") if isinstance(results, Mapping) else None
    if (
        not isinstance(encoders, Mapping)
        or not encoders
        or not all(
            isinstance(values, Mapping) and isinstance(values.get("logistic"), Mapping) and values["logistic"]
            for values in encoders.values()
        )
    ):
        raise ValueError(
            "plot_lowshot: `results` must be evaluate_lowshot's {'settings', 'encoders': {name: {'logistic': {...}}}},"
            f" got {_describe(results)}."
        )
    settings = results.get("settings", {})
    names = list(next(iter(encoders.values()))["logistic"])
    shots = [name for name in names if name.endswith("-shot")]
    fractions = [name for name in names if name not in shots]
    # Shots at their positions, the fraction settings one slot apart at the right (a different kind of setting).
    positions = {name: i for i, name in enumerate(shots)}
    positions.update({name: len(shots) + 0.5 + i for i, name in enumerate(fractions)})
    ticks = [name.removesuffix("-shot") for name in shots] + [_fraction_tick(name, settings) for name in fractions]

    figure = _figure(CHART_INCHES)
    axes = figure.add_subplot()
    labels = {**ENCODER_LABELS, **(labels or {})}
    for index, (encoder, values) in enumerate(encoders.items()):
        color = f"C{index}"
        label = labels.get(encoder, encoder)
        if isinstance(values.get("knn"), (int, float)):
            label += f" (kNN {100 * values['knn']:.1f}%)"
        for group, style in ((shots, "-o"), (fractions, "s")):
            present = [name for name in group if name in values["logistic"]]
            if not present:
                continue
            axes.errorbar(
                # Encoders side by side around each setting, so that their error bars do not hide one another.
                [positions[name] + 0.08 * (index - (len(encoders) - 1) / 2) for name in present],
                [100 * values["logistic"][name]["mean"] for name in present],
                yerr=[100 * values["logistic"][name].get("std", 0.0) for name in present],
                fmt=style, color=color, capsize=3, label=label if group is shots or not shots else None,
            )  # fmt: skip
    axes.set_xticks([positions[name] for name in names], ticks)
    axes.set_xlabel("labelled images per class")
    axes.set_ylabel("top-1 accuracy (%)")
    axes.set_title("Low-shot linear evaluation (mean ± std over seeds)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    return _save(figure, path)


def plot_prototypes(assignment_counts, path: str | os.PathLike) -> int:
    """
    The share of the data assigned to each prototype, prototypes sorted by share (largest first); the title states
    how many are used (a share > 0) out of how many.

    Args:
        assignment_counts: `(num_prototypes,)` non-negative counts (`prototype_usage`), not all zero.
        path: the PNG file to write (its folder is created).

    Returns:
        The number of prototypes used, for the model card. The figure is `CHART_INCHES` at `DPI`.
    """
    counts = _to_numpy(assignment_counts)
    if (
        counts.ndim != 1
        or counts.size == 0
        or not np.isfinite(counts).all()
        or (counts < 0).any()
        or counts.sum() <= 0
    ):
        raise ValueError(
            "plot_prototypes: `assignment_counts` must be a (num_prototypes,) array of non-negative counts, not all "
            f"zero, got {_describe(assignment_counts)}."
        )
    shares = np.sort(counts.astype(np.float64) / counts.sum())[::-1]
    used = int((shares > 0).sum())
    figure = _figure(CHART_INCHES)
    axes = figure.add_subplot()
    axes.bar(np.arange(1, len(shares) + 1), 100 * shares, width=1.0, color="C0")
    # The share every prototype would have under a uniform assignment, the ideal of MSN's mean-entropy term.
    axes.axhline(100 / len(shares), color="C3", linestyle="--", linewidth=1, label="uniform")
    axes.set_xlabel("prototype, by share of the data")
    axes.set_ylabel("share of the data (%)")
    axes.set_title(f"Prototype usage: {used} of {len(shares)} used")
    axes.legend(fontsize=8)
    figure.tight_layout()
    _save(figure, path)
    return used


# ------------------------------------------------------------------------------------------------------ helpers
def _figure(size_inches: tuple[float, float]):
    from matplotlib.figure import Figure

    return Figure(figsize=size_inches, dpi=DPI)


def _save(figure, path: str | os.PathLike) -> str:
    path = os.fspath(path)
    # No bbox_inches="tight": the file's size is the figure's, whatever it holds.
    with atomic_file(path) as temporary:
        figure.savefig(temporary, dpi=DPI, format="png")
    return path


def _to_numpy(values) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor, possibly on a device or requiring grad
        values = values.detach().cpu().float().numpy()
    return np.asarray(values)


def _as_matrix(name: str, values) -> np.ndarray:
    matrix = _to_numpy(values)
    if matrix.ndim != 2 or 0 in matrix.shape or not np.issubdtype(matrix.dtype, np.number):
        raise ValueError(
            f"nearest_neighbours: `{name}` must be a non-empty (num_vectors, dim) numeric array, got "
            f"{_describe(values)}."
        )
    return matrix.astype(np.float64)


def _check_rows(name: str, query_images: Sequence, rows: Sequence[Sequence]) -> tuple[int, int]:
    """(Q, k) after checking that `rows` holds one non-empty sequence of equal length per query image."""
    if not isinstance(query_images, Sequence) or len(query_images) == 0:
        raise ValueError(
            f"plot_neighbours: `query_images` must be a non-empty sequence of images, got {_describe(query_images)}."
        )
    lengths = [len(row) if isinstance(row, Sequence) else None for row in rows] if isinstance(rows, Sequence) else None
    if (
        lengths is None
        or len(lengths) != len(query_images)
        or None in lengths
        or len(set(lengths)) != 1
        or lengths[0] == 0
    ):
        raise ValueError(
            f"plot_neighbours: `{name}` must hold {len(query_images)} rows (one per query image) of the same number "
            f"(>= 1) of images, got row lengths {lengths if lengths is not None else _describe(rows)}."
        )
    return len(query_images), lengths[0]


def _to_image(image, where: str) -> np.ndarray:
    """An `(H, W)` or `(H, W, 3|4)` float array in [0, 1] for `imshow`."""
    if hasattr(image, "convert") and hasattr(image, "mode"):  # PIL
        image = image.convert("L") if image.mode in ("1", "L", "I", "I;16", "F") else image.convert("RGB")
    pixels = _to_numpy(image)
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[..., 0]
    if not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] in (3, 4))) or 0 in pixels.shape:
        raise ValueError(
            f"plot_neighbours: {where} must be a PIL image or an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array, "
            f"got {_describe(image)}."
        )
    if np.issubdtype(pixels.dtype, np.integer) or pixels.dtype == bool:
        return pixels.astype(np.float64) / (1.0 if pixels.dtype == bool else 255.0)
    return np.clip(pixels.astype(np.float64), 0.0, 1.0)


def _fraction_tick(name: str, settings: Mapping) -> str:
    """
    '1%' -> '1% = 14 labels\\n~1.4 per class': the labels the setting drew (`settings["label_fraction_images"]`),
    and what they amount to per class on the axis of the shots; the name alone when the results do not say.
    """
    images, classes = settings.get("label_fraction_images"), settings.get("num_labels")
    if not images or not classes:
        return name
    return f"{name} = {images} labels\n~{images / classes:.2g} per class"


def _describe(value) -> str:
    shape = getattr(value, "shape", None)
    if shape is not None:
        return f"{type(value).__name__} of shape {tuple(shape)}"
    return f"{type(value).__name__} {value!r}"[:120]


__all__ = [
    "CELL_INCHES",
    "CHART_INCHES",
    "DPI",
    "ENCODER_LABELS",
    "HEADER_INCHES",
    "nearest_neighbours",
    "plot_lowshot",
    "plot_neighbours",
    "plot_prototypes",
    "prototype_usage",
]
