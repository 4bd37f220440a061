"""What an evaluation states and where it writes: the label-fraction setting and its real number of labels, the
model card of the evaluated folder, the data set a card names, and the flags msn-evaluate accepts."""

import json
import logging
import math
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import matplotlib.axes
import numpy as np
import pytest
import torch

from conftest import labelled_dataset, tiny_config
from msn_hf import MSNImageProcessor, MSNModel
from msn_hf import pretraining as pt
from msn_hf.checkpointing import TrainingState
from msn_hf.cli import run
from msn_hf.data import ImageDataset, load_digits_dataset
from msn_hf.evaluation import (
    evaluate_lowshot,
    main,
    parse_args,
    results_file_for,
    sample_fraction,
    sample_per_class,
)
from msn_hf.modelcard import write_model_card
from msn_hf.pictures import plot_lowshot
from msn_hf.run_outputs import card_run_info


def tiny_processor() -> MSNImageProcessor:
    return MSNImageProcessor(size={"shortest_edge": 32}, crop_size=32, focal_crop_size=16)


def msn_run_folder(folder):
    """A tiny model folder as msn-pretrain leaves it before its evaluation: weights, processor, card and its facts."""
    model, processor = MSNModel(tiny_config()), tiny_processor()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    write_model_card(folder, model, processor, dict(dataset="scikit-learn digits (built in)", steps=2))
    return folder


# Small enough for seconds on a CPU: 60 training and 30 test digits, one setting, one seed, the pixel baseline.
QUICK_EVALUATION = ["--max_train_samples", "60", "--max_test_samples", "30", "--shots", "1", "--seeds", "0",
                    "--knn_k", "0", "--label_fraction", "0", "--no_progress", "--device", "cpu"]  # fmt: skip


# --- the label-fraction setting ----------------------------------------------------------------------------------
def plain_fraction_counts(class_sizes: list[int], fraction: float) -> tuple[list[int], list[int], int]:
    """
    The largest-remainder split of round(fraction * N) labels among classes of `class_sizes`, in exact fractions:
    (counts every class surely gets, the classes tied for the last extra labels, how many of those get one).
    """
    total, num_images = round(fraction * sum(class_sizes)), sum(class_sizes)
    shares = [Fraction(total * size, num_images) for size in class_sizes]
    counts = [math.floor(share) for share in shares]
    remainders = [share - count for share, count in zip(shares, counts)]
    left = total - sum(counts)
    if left == 0:
        return counts, [], 0
    cut = sorted(remainders, reverse=True)[left - 1]  # the smallest remainder that still gets a label
    for i, remainder in enumerate(remainders):
        counts[i] += remainder > cut
    tied = [i for i, remainder in enumerate(remainders) if remainder == cut]
    return counts, tied, total - sum(counts)


def assert_counts_match_a_plain_derivation(labels: np.ndarray, fraction: float, indices: np.ndarray) -> None:
    class_sizes = np.bincount(labels).tolist()
    counts, tied, drawn = plain_fraction_counts(class_sizes, fraction)
    got = np.bincount(labels[indices], minlength=len(class_sizes))
    assert len(set(indices.tolist())) == len(indices) == round(fraction * len(labels))
    assert sum(got[i] - counts[i] for i in tied) == drawn
    assert all(got[i] == counts[i] for i in range(len(counts)) if i not in tied)
    assert all(got[i] - counts[i] in (0, 1) for i in tied)


def test_one_percent_of_the_digits_is_14_labels_and_not_the_1_shot_sample():
    labels = np.asarray(load_digits_dataset("train")["label"])
    assert len(labels) == 1437
    for seed in (0, 1, 2):
        indices = sample_fraction(labels, 0.01, seed)
        assert_counts_match_a_plain_derivation(labels, 0.01, indices)
        assert not np.array_equal(indices, sample_per_class(labels, 1, seed))


@pytest.mark.parametrize(
    "class_sizes, fraction",
    [([10, 10, 10, 3], 0.2), ([100, 100, 5], 0.1), ([143, 144, 145, 141, 146], 0.01), ([7, 1, 1, 1], 0.5),
     ([30] * 5, 1.0)],
)  # fmt: skip
def test_fraction_counts_match_a_plain_largest_remainder_derivation(class_sizes, fraction):
    labels = np.repeat(np.arange(len(class_sizes)), class_sizes)
    for seed in range(4):
        assert_counts_match_a_plain_derivation(labels, fraction, sample_fraction(labels, fraction, seed))


def test_a_fraction_of_no_image_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"`fraction` must give at least one of the 20 images, got 0.01"):
        sample_fraction(np.repeat(np.arange(2), 10), 0.01, seed=0)


def test_classes_tied_for_the_last_labels_are_drawn_with_the_seed():
    labels = np.repeat(np.arange(4), 5)  # 10 % of 20 = 2 labels, a share of 0.5 for each of the 4 classes
    chosen = {seed: tuple(np.unique(labels[sample_fraction(labels, 0.1, seed)])) for seed in range(8)}
    assert all(len(classes) == 2 for classes in chosen.values())
    assert len(set(chosen.values())) > 1
    assert tuple(np.unique(labels[sample_fraction(labels, 0.1, 3)])) == chosen[3]


def test_results_card_and_picture_state_the_real_number_of_labels(tmp_path, monkeypatch):
    # 150 images of 4 classes (38, 38, 37, 37): 10 % is 15 labels, 3.75 per class.
    train = ImageDataset(labelled_dataset(150), "image", "label")
    test = ImageDataset(labelled_dataset(20, seed=1), "image", "label")
    model = MSNModel(tiny_config())
    results = evaluate_lowshot(model, train, test, tiny_processor(), shots=(1,), label_fraction=0.1, seeds=(0,),
                               knn_k=None, baselines=(), progress=False)  # fmt: skip
    assert results["settings"]["label_fraction_images"] == 15

    card = write_model_card(tmp_path, model, tiny_processor(), dict(dataset="shapes", steps=1), results).read_text()
    header = next(line for line in card.splitlines() if line.startswith("| encoder"))
    assert "| 10% (15 labels) |" in header

    ticks = []
    set_xticks = matplotlib.axes.Axes.set_xticks
    monkeypatch.setattr(matplotlib.axes.Axes, "set_xticks",
                        lambda self, positions, labels=None, **kw: ticks.append(labels) or set_xticks(self, positions, labels, **kw))  # fmt: skip
    plot_lowshot(results, tmp_path / "lowshot.png")
    (fraction_tick,) = [tick for tick in ticks[0] if tick.startswith("10%")]
    assert "15 labels" in fraction_tick and "3.8 per class" in fraction_tick


# --- the card of the evaluated folder ----------------------------------------------------------------------------
def test_msn_evaluate_updates_the_card_only_with_results_written_into_the_model_folder(tmp_path, caplog):
    folder = msn_run_folder(tmp_path / "model")
    card_before = (folder / "README.md").read_bytes()
    facts_before = (folder / "msn_card.json").read_bytes()

    elsewhere = tmp_path / "other" / "results.json"
    with caplog.at_level(logging.INFO, logger="msn_hf.evaluation"):
        main(["--model_name_or_path", str(folder), *QUICK_EVALUATION, "--baselines", "pixels", "--no_pictures",
              "--output_file", str(elsewhere)])  # fmt: skip
    assert elsewhere.is_file() and not (folder / "eval_results.json").exists()
    # The card, the facts it is rendered from, and so the pictures it embeds: all as they were.
    assert (folder / "README.md").read_bytes() == card_before
    assert (folder / "msn_card.json").read_bytes() == facts_before
    (message,) = [r.getMessage() for r in caplog.records if "card" in r.getMessage().lower()]
    assert "left as it is" in message and str(elsewhere) in message and "--output_file" in message

    main(["--model_name_or_path", str(folder), *QUICK_EVALUATION, "--baselines", "pixels", "--no_pictures"])
    assert "| MSN (this model) |" in (folder / "README.md").read_text() and (folder / "eval_results.json").is_file()


def test_msn_evaluate_into_a_run_folder_brings_its_train_results_evaluation_up_to_date(tmp_path):
    # train_results.json kept the run's own evaluation beside a card and eval_results.json stating the new one.
    folder = msn_run_folder(tmp_path / "model")
    (folder / "train_results.json").write_text(json.dumps({"completed_steps": 2, "eval": {"stale": True}}))
    results = main(["--model_name_or_path", str(folder), *QUICK_EVALUATION, "--baselines", "pixels", "--no_pictures"])
    train_results = json.loads((folder / "train_results.json").read_text())
    assert train_results["completed_steps"] == 2
    assert train_results["eval"] == json.loads((folder / "eval_results.json").read_text()) == json.loads(json.dumps(results))
    # A folder without one (a model saved by hand) gets none.
    bare = msn_run_folder(tmp_path / "bare")
    main(["--model_name_or_path", str(bare), *QUICK_EVALUATION, "--baselines", "pixels", "--no_pictures"])
    assert not (bare / "train_results.json").exists()


# --- the data set a card names -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "data_flags, name",
    [(["--dataset_name", "cifar10"], "cifar10"), ([], "scikit-learn digits (built in)")],
)
def test_the_pretraining_card_names_the_evaluation_data_by_its_name(tmp_path, data_flags, name):
    args, data_args = pt.parse_args([*data_flags, "--output_dir", str(tmp_path)])
    test = ImageDataset(labelled_dataset(4), "image", "label", split="test")
    one_process = SimpleNamespace(num_processes=1, mixed_precision="no", device=torch.device("cpu"))
    run_info = card_run_info(args, data_args, one_process, TrainingState(completed_steps=2), 60.0, None, test)
    results = {
        "encoders": {"msn": {"num_features": 64, "logistic": {"1-shot": {"mean": 0.5, "std": 0.0, "runs": [0.5]}}}},
        "settings": {"shots": [1], "seeds": [0], "knn_k": None, "num_train": 40, "num_test": 20, "num_labels": 4},
    }
    card = write_model_card(tmp_path, MSNModel(tiny_config()), tiny_processor(), run_info, results).read_text()
    line = next(line for line in card.splitlines() if line.startswith("Low-shot evaluation"))
    assert f"frozen target encoder on {name}, test (40 training" in line


# --- the flags of msn-evaluate -----------------------------------------------------------------------------------
def test_baselines_none_on_the_command_line_evaluates_the_model_alone(tmp_path, capsys):
    folder = msn_run_folder(tmp_path / "model")
    args, _ = parse_args(["--model_name_or_path", str(folder), "--baselines", "none"])
    assert args.baselines == []
    with pytest.raises(ValueError, match=r"--baselines.*'none'.*\['none', 'pixels'\]"):
        parse_args(["--model_name_or_path", str(folder), "--baselines", "none", "pixels"])
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    start = help_text.rindex("--baselines")  # its entry, after the usage line
    baselines_help = help_text[start : help_text.index("--batch_size", start)]
    assert "none given: none" not in baselines_help and "'none' for no baseline" in baselines_help

    results = main(["--model_name_or_path", str(folder), *QUICK_EVALUATION, "--baselines", "none", "--no_pictures"])
    assert list(results["encoders"]) == ["msn"]


# `evaluate_lowshot`'s own messages name its keyword arguments and offer None, which the command line cannot pass.
@pytest.mark.parametrize("flags, expected", [
    (["--knn_k", "-3"], "--knn_k must be a positive integer, or 0 to skip the kNN classifier, got -3."),
    (["--label_fraction", "1.5"], "--label_fraction must be a number in (0, 1], or 0 to skip it, got 1.5."),
    (["--shots", "5", "0"], "--shots must be positive integers (labelled images per class), got 5 0."),
    (["--l2_reg", "-1"], "--l2_reg must be a positive number, got -1.0."),
])  # fmt: skip
def test_msn_evaluate_names_a_bad_setting_by_its_flag_and_the_values_the_flag_takes(tmp_path, capsys, flags, expected):
    folder = msn_run_folder(tmp_path / "model")
    argv = ["--model_name_or_path", str(folder), *QUICK_EVALUATION, "--baselines", "pixels", "--no_pictures", *flags]
    capsys.readouterr()  # what saving the folder printed
    assert run(main, "msn-evaluate", argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith(f"msn-evaluate: error: {expected} ")
    assert len(lines) == 1  # refused as the flags are read, before any image is loaded
    assert not (folder / "eval_results.json").exists()


@pytest.mark.parametrize("flags, flag", [(["--streaming"], "--streaming"),
                                         (["--shuffle_buffer_size", "100"], "--shuffle_buffer_size")])  # fmt: skip
def test_msn_evaluate_refuses_streaming_flags_in_one_line_naming_the_flag(tmp_path, capsys, flags, flag):
    folder = msn_run_folder(tmp_path / "model")
    argv = ["--model_name_or_path", str(folder), *QUICK_EVALUATION, "--baselines", "pixels", "--no_pictures", *flags]
    capsys.readouterr()  # what saving the folder printed
    assert run(main, "msn-evaluate", argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"msn-evaluate: error: {flag} ") and "map-style" in line
    assert not (folder / "eval_results.json").exists()


def test_results_of_a_hub_model_go_to_a_folder_of_their_own_not_over_the_current_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = msn_run_folder(tmp_path / "model")
    assert results_file_for(str(folder)) == str(folder / "eval_results.json")
    # A Hub id: the current folder may be another run's, whose results and pictures would be replaced.
    assert results_file_for("facebook/vit-msn-small") == str(Path("evaluations") / "facebook" / "vit-msn-small" / "eval_results.json")
    assert results_file_for(str(folder), "elsewhere/results.json") == "elsewhere/results.json"


def test_a_model_folder_without_an_image_processor_is_refused_in_one_line_before_any_image_is_loaded(
    tmp_path, capsys, monkeypatch
):
    from transformers import ViTMSNConfig, ViTMSNModel

    config = ViTMSNConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                          image_size=32, patch_size=8)  # fmt: skip
    ViTMSNModel(config).save_pretrained(tmp_path / "vit_msn")
    monkeypatch.setattr("msn_hf.evaluation.load_evaluation_data", lambda *a, **k: pytest.fail("images were loaded"))
    capsys.readouterr()
    assert run(main, "msn-evaluate", ["--model_name_or_path", str(tmp_path / "vit_msn"), *QUICK_EVALUATION]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "preprocessor_config.json" in line and "--image_processor_name" in line
