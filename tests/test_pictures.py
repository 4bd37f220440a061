"""Pictures of what a run learnt: PNG files of fixed sizes, nearest neighbours, prototype usage, input checks."""

import numpy as np
import pytest
import torch
from PIL import Image

from msn_hf.pictures import (
    CELL_INCHES,
    CHART_INCHES,
    DPI,
    HEADER_INCHES,
    nearest_neighbours,
    plot_lowshot,
    plot_neighbours,
    plot_prototypes,
    prototype_usage,
)


def png_size(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()  # a truncated file fails here
        return image.size


def lowshot_results(encoders=("msn", "random", "pixels"), fraction=True):
    """The shape of evaluate_lowshot's results, with made-up accuracies."""
    rng = np.random.default_rng(0)
    settings = {
        "shots": [1, 2, 5, 10],
        "label_fraction": 0.01 if fraction else None,
        "num_train": 1437,
        "num_labels": 10,
    }
    names = ["1-shot", "2-shot", "5-shot", "10-shot"] + (["1%"] if fraction else [])
    results = {"settings": settings, "encoders": {}}
    for encoder in encoders:
        logistic = {}
        for name in names:
            runs = rng.uniform(0.2, 0.9, 3).tolist()
            logistic[name] = {"mean": float(np.mean(runs)), "std": float(np.std(runs)), "runs": runs}
        results["encoders"][encoder] = {"num_features": 8, "logistic": logistic, "knn": 0.8, "seconds": 1.0}
    return results


# --- nearest neighbours ------------------------------------------------------------------------------------------


def brute_force_neighbours(train, query, k):
    """Cosine similarity one pair at a time, neighbours by descending similarity then ascending index."""
    rows = []
    for q in query:
        similarities = []
        for index, t in enumerate(train):
            norm = float(np.sqrt((q * q).sum()) * np.sqrt((t * t).sum()))
            similarities.append((-(float((q * t).sum()) / norm), index))
        rows.append([index for _, index in sorted(similarities)[:k]])
    return np.array(rows)


def test_nearest_neighbours_match_a_brute_force_search():
    rng = np.random.default_rng(1)
    train, query = rng.normal(size=(40, 6)), rng.normal(size=(7, 6))
    indices = nearest_neighbours(train, query, k=5)
    assert indices.shape == (7, 5) and indices.dtype == np.int64
    np.testing.assert_array_equal(indices, brute_force_neighbours(train, query, 5))
    # Cosine, not Euclidean: a scaled copy of a query is its nearest neighbour whatever its length.
    train[13] = 50.0 * query[2]
    assert nearest_neighbours(train, query, 1)[2, 0] == 13
    # Torch tensors are accepted.
    np.testing.assert_array_equal(
        nearest_neighbours(torch.tensor(train), torch.tensor(query), 5), brute_force_neighbours(train, query, 5)
    )


def test_nearest_neighbours_break_ties_by_index():
    train = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [1.0, 0.0]])
    np.testing.assert_array_equal(nearest_neighbours(train, [[3.0, 0.0]], 4), [[0, 2, 3, 1]])


@pytest.mark.parametrize(
    "train, query, k, match",
    [
        (
            np.ones((4, 3)),
            np.ones((2, 2)),
            1,
            r"`query_features` must have as many columns as `train_features` \(3\), got 2",
        ),
        (np.ones((4, 3)), np.ones((2, 3)), 5, r"`k` must be an integer in \[1, 4\], got 5"),
        (np.ones((4, 3)), np.ones((2, 3)), 0, r"`k` must be an integer in \[1, 4\], got 0"),
        (np.ones(4), np.ones((2, 3)), 1, r"`train_features` must be a non-empty \(num_vectors, dim\) numeric array"),
    ],
)
def test_nearest_neighbours_rejects_bad_input(train, query, k, match):
    with pytest.raises(ValueError, match=match):
        nearest_neighbours(train, query, k)


# --- prototype usage ---------------------------------------------------------------------------------------------


def test_prototype_usage_counts_hard_assignments():
    probs = np.array([[0.7, 0.2, 0.1, 0.0], [0.1, 0.8, 0.1, 0.0], [0.6, 0.3, 0.1, 0.0], [0.2, 0.1, 0.1, 0.6]])
    np.testing.assert_array_equal(prototype_usage(probs, 4), [2, 1, 0, 1])
    np.testing.assert_array_equal(prototype_usage(torch.tensor(probs, requires_grad=True), 4), [2, 1, 0, 1])
    counts = prototype_usage(np.array([5, 5, 0, 5]), 8)
    assert counts.dtype == np.int64 and counts.tolist() == [1, 0, 0, 0, 0, 3, 0, 0]


@pytest.mark.parametrize(
    "assignments, match",
    [
        (np.ones((3, 5)), r"`assignments` probabilities must have 4 columns \(`num_prototypes`\), got shape \(3, 5\)"),
        (np.array([0, 4]), r"`assignments` indices must lie in \[0, 4\), got values from 0 to 4"),
        (np.array([0.5, 1.0]), r"`assignments` must be \(num_images, num_prototypes\) probabilities or"),
    ],
)
def test_prototype_usage_rejects_bad_input(assignments, match):
    with pytest.raises(ValueError, match=match):
        prototype_usage(assignments, 4)
    with pytest.raises(ValueError, match=r"`num_prototypes` must be a positive integer, got 0"):
        prototype_usage(np.array([0]), 0)


# --- pictures ----------------------------------------------------------------------------------------------------


def test_plot_prototypes_writes_a_png_and_returns_the_number_used(tmp_path):
    counts = np.array([0, 7, 0, 3, 1, 0, 0, 9])
    assert plot_prototypes(counts, tmp_path / "sub" / "prototypes.png") == 4
    assert png_size(tmp_path / "sub" / "prototypes.png") == (CHART_INCHES[0] * DPI, CHART_INCHES[1] * DPI)
    assert plot_prototypes(torch.ones(3), tmp_path / "all.png") == 3
    for bad in (np.zeros(4), np.array([1, -1]), np.ones((2, 2)), np.array([])):
        with pytest.raises(ValueError, match="`assignment_counts` must be a \\(num_prototypes,\\) array"):
            plot_prototypes(bad, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


@pytest.mark.parametrize("encoders, fraction", [(("msn", "random", "pixels"), True), (("msn",), False)])
def test_plot_lowshot_writes_a_png_of_the_chart_size(tmp_path, encoders, fraction):
    path = plot_lowshot(lowshot_results(encoders, fraction), tmp_path / "lowshot.png")
    assert path == str(tmp_path / "lowshot.png")
    assert png_size(path) == (CHART_INCHES[0] * DPI, CHART_INCHES[1] * DPI)


@pytest.mark.parametrize("results", [{}, {"encoders": {}}, {"encoders": {"msn": {"knn": 0.5}}}, [1, 2]])
def test_plot_lowshot_rejects_what_is_not_evaluate_lowshot_results(tmp_path, results):
    with pytest.raises(ValueError, match="`results` must be evaluate_lowshot's"):
        plot_lowshot(results, tmp_path / "x.png")


def test_plot_neighbours_grid_sizes(tmp_path):
    rng = np.random.default_rng(0)
    queries = [Image.new("L", (8, 8), 30 * i) for i in range(3)]
    colour = [[rng.random((10, 12, 3)) for _ in range(4)] for _ in range(3)]  # floats, another side
    grey = [[rng.integers(0, 256, (8, 8, 1), dtype=np.uint8) for _ in range(4)] for _ in range(3)]
    one = plot_neighbours(queries, colour, tmp_path / "one.png")
    two = plot_neighbours(queries, colour, tmp_path / "two.png", title="MSN features", pixel_neighbour_images=grey)
    height = (3 * CELL_INCHES + HEADER_INCHES) * DPI
    assert png_size(one) == (round(1 * 5 * CELL_INCHES * DPI), round(height))
    assert png_size(two) == (round(2 * 5 * CELL_INCHES * DPI), round(height))


@pytest.mark.parametrize(
    "rows, pixel_rows, match",
    [
        ([[np.zeros((4, 4))]] * 2, None, r"`neighbour_images` must hold 3 rows \(one per query image\)"),
        ([[np.zeros((4, 4))], [np.zeros((4, 4))] * 2, [np.zeros((4, 4))]], None, r"got row lengths \[1, 2, 1\]"),
        ([[np.zeros((4, 4))]] * 3, [[np.zeros((4, 4))] * 2] * 3, r"`pixel_neighbour_images` rows must hold 1 images"),
        ([[np.zeros((4, 4, 2))]] * 3, None, r"image 1 of row 0 must be a PIL image or an \(H, W\)"),
    ],
)
def test_plot_neighbours_rejects_bad_input(tmp_path, rows, pixel_rows, match):
    queries = [np.zeros((4, 4))] * 3
    with pytest.raises(ValueError, match=match):
        plot_neighbours(queries, rows, tmp_path / "x.png", pixel_neighbour_images=pixel_rows)
