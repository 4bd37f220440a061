"""
The data both commands evaluate on, and the sample the auto recipe reads: unlabelled rows (label -1) are no class,
a `--test_dir` that cannot give labels is refused before training, and the recipe's sample spans the whole set.
"""

import logging

import datasets
import numpy as np
import pytest
from accelerate import Accelerator
from PIL import Image

from conftest import TINY_MODEL_ARGS, labelled_dataset, random_images, tiny_config
from msn_hf import MSNImageProcessor, MSNModel
from msn_hf import pretraining as pt
from msn_hf.data import DataArguments, ImageDataset, decode_image
from msn_hf.evaluation import evaluate_lowshot, load_evaluation_datasets
from msn_hf.recipe import describe_images

LABELLED = 8  # the first rows of `semi_supervised`'s train split, classes 0..3 twice


def ids(data: ImageDataset) -> list[str]:
    return list(data.dataset["id"])


def without_labels(dataset: datasets.Dataset, start: int = 0) -> datasets.Dataset:
    """`dataset` with every row from `start` on labelled -1 (no label), as a semi-supervised set's extra images."""
    return dataset.map(
        lambda label, i: {"label": label if i < start else -1}, input_columns="label", with_indices=True
    )


def semi_supervised(path, unlabelled: int = 4, test_split: bool = True, labelled: int = LABELLED) -> str:
    """A `save_to_disk` set: `labelled` labelled training rows then `unlabelled` rows labelled -1, and (with
    `test_split`) a labelled test split of 8 rows."""
    splits = {"train": without_labels(labelled_dataset(labelled + unlabelled), start=labelled)}
    if test_split:
        splits["test"] = labelled_dataset(8, seed=1).map(lambda i: {"id": f"test{i}"}, input_columns="id")
    datasets.DatasetDict(splits).save_to_disk(str(path))
    return str(path)


def build_train_data(data_args: DataArguments, **args) -> pt.TrainData:
    arguments = pt.PretrainingArguments(**{"per_device_train_batch_size": 4, **args})
    return pt.build_train_data(data_args, arguments, Accelerator(cpu=True))


# --- unlabelled rows are no class -----------------------------------------------------------------------------------


def test_msn_evaluate_leaves_unlabelled_training_rows_out_and_logs_how_many(tmp_path, caplog):
    path = semi_supervised(tmp_path / "data")
    with caplog.at_level(logging.INFO, logger="msn_hf"):
        train, test = load_evaluation_datasets(dataset_name=path)
    assert ids(train) == [f"row{i:03d}" for i in range(LABELLED)], "the rows labelled -1 reach the classifiers"
    assert min(train.dataset["label"]) == 0 and len(test.dataset) == 8
    assert any("4 of the 12 images" in message and "label < 0" in message for message in caplog.messages)


@pytest.mark.parametrize("streamed", [False, True])
def test_evaluate_lowshot_never_takes_label_minus_one_for_a_class(streamed):
    # A library caller's sets, unfiltered: 8 labelled training rows of 4 classes plus 4 unlabelled; 6 of 8 test rows.
    rows = without_labels(labelled_dataset(12), start=LABELLED)
    train = ImageDataset(rows.to_iterable_dataset() if streamed else rows, "image", "label", "train")
    test = ImageDataset(without_labels(labelled_dataset(8, seed=1), start=6), "image", "label", "test")
    results = evaluate_lowshot(
        MSNModel(tiny_config()), train, test, MSNImageProcessor(size=32, crop_size=32, focal_crop_size=16),
        shots=(1,), label_fraction=None, seeds=(0,), knn_k=3, baselines=(), progress=False,
    )  # fmt: skip
    settings = results["settings"]
    assert (settings["num_labels"], settings["num_train"], settings["num_test"]) == (4, 8, 6)


def test_a_training_split_without_any_labelled_row_is_an_error_naming_it(tmp_path):
    path = semi_supervised(tmp_path / "data", unlabelled=8, labelled=0)
    with pytest.raises(ValueError, match=r"training split 'train' must hold labelled images .* got 8 images, none"):
        load_evaluation_datasets(dataset_name=path)


def test_msn_pretrain_evaluates_on_the_labelled_rows_msn_evaluate_uses_and_pretrains_on_all(tmp_path):
    # With a labelled test split: the evaluation's training side is the labelled rows; pretraining reads all 12.
    path = semi_supervised(tmp_path / "with-test")
    train_data = build_train_data(DataArguments(dataset_name=path))
    assert train_data.evaluation is not None, train_data.no_evaluation_reason
    assert len(train_data.dataset) == 12
    train, test = train_data.evaluation
    evaluate_train, evaluate_test = load_evaluation_datasets(dataset_name=path)
    assert ids(train) == ids(evaluate_train) == [f"row{i:03d}" for i in range(LABELLED)]
    assert ids(test) == ids(evaluate_test)

    # Without one: both commands hold out the same labelled rows, and pretraining reads every other row.
    path = semi_supervised(tmp_path / "no-test", test_split=False)
    train_data = build_train_data(DataArguments(dataset_name=path, test_size=0.5))
    assert train_data.evaluation is not None, train_data.no_evaluation_reason
    train, test = train_data.evaluation
    evaluate_train, evaluate_test = load_evaluation_datasets(dataset_name=path, test_size=0.5)
    assert sorted(ids(test)) == sorted(ids(evaluate_test)) and len(ids(test)) == 4
    assert sorted(ids(train)) == sorted(ids(evaluate_train))
    pretrained = {train_data.dataset[i]["id"] for i in range(len(train_data.dataset))}
    assert pretrained == {f"row{i:03d}" for i in range(12)} - set(ids(test))

    # No labelled row at all is no evaluation (with the reason), not an error: pretraining needs no labels.
    path = semi_supervised(tmp_path / "none", unlabelled=8, labelled=0)
    train_data = build_train_data(DataArguments(dataset_name=path))
    assert train_data.evaluation is None and "no labels" in train_data.no_evaluation_reason


# --- a test folder that cannot give labels is refused before training -----------------------------------------------


def image_folder(root, classes: list[str], per_class: int = 4):
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i, image in enumerate(random_images(per_class, seed=k)):
            image.save(root / name / f"{i}.png")
    return root


def test_msn_pretrain_refuses_a_test_dir_of_one_class_before_training_or_writing_anything(tmp_path, monkeypatch):
    train_dir = image_folder(tmp_path / "train", ["cat", "dog"])
    test_dir = image_folder(tmp_path / "test", ["dog"], per_class=3)
    steps, training_step = [], pt.training_step
    monkeypatch.setattr(pt, "training_step", lambda *args, **kwargs: steps.append(1) or training_step(*args, **kwargs))
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"--test_dir must hold one folder per class with at least 2 classes, got 1"):
        pt.main([*TINY_MODEL_ARGS, "--train_dir", str(train_dir), "--test_dir", str(test_dir), "--max_train_steps", "1",
                 "--per_device_train_batch_size", "4", "--output_dir", str(out)])  # fmt: skip
    assert not steps and not out.exists()


def test_msn_evaluate_refuses_a_test_dir_of_one_class(tmp_path):
    train_dir = image_folder(tmp_path / "train", ["cat", "dog"])
    test_dir = image_folder(tmp_path / "test", ["dog"], per_class=3)
    with pytest.raises(ValueError, match=r"--test_dir must hold one folder per class .* got 1 \['dog'\]"):
        load_evaluation_datasets(train_dir=str(train_dir), test_dir=str(test_dir))
    with pytest.raises(ValueError, match="--test_dir must be a folder"):  # not "--train_dir", which was not given
        load_evaluation_datasets(train_dir=str(train_dir), test_dir=str(tmp_path / "missing"))


def test_evaluation_is_still_skipped_with_a_reason_without_labels_or_a_test_set(tmp_path):
    folder = tmp_path / "images"  # images without class folders: no labels
    folder.mkdir()
    for i, image in enumerate(random_images(8)):
        image.save(folder / f"{i}.png")
    train_data = build_train_data(DataArguments(train_dir=str(folder)))
    assert train_data.evaluation is None and train_data.no_evaluation_reason == "the training data has no labels"


# --- the auto recipe reads a sample of the whole set ----------------------------------------------------------------


def grey_then_colour(path, grey: int, colour: int) -> str:
    """A `save_to_disk` set sorted by class, as an image folder is: `grey` grey images, then `colour` colour ones."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).convert("RGB") for _ in range(grey)]
    images += [Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(colour)]
    features = datasets.Features({"image": datasets.Image()})
    datasets.Dataset.from_dict({"image": images}, features=features).save_to_disk(str(path))
    return str(path)


def test_the_auto_recipe_judges_a_mostly_colour_set_colour_when_its_grey_class_comes_first(tmp_path):
    grey = pt.RECIPE_SAMPLE_SIZE + 8  # more grey images than the sample: its first rows are all grey
    path = grey_then_colour(tmp_path / "data", grey, colour=3 * grey)
    samples = []
    for seed in (1, 2):
        args = dict(seed=seed, skip_evaluation=True, max_train_steps=10)
        data_args = DataArguments(dataset_name=path)
        train_data = build_train_data(data_args, **args)
        recipe = pt.choose_recipe(
            pt.PretrainingArguments(per_device_train_batch_size=4, **args), data_args, train_data
        )
        # The grey recipe switches colour jitter off.
        assert recipe["name"] == "auto" and recipe["processor"].get("color_jitter_probability") != 0.0
        assert len(train_data.sample) == pt.RECIPE_SAMPLE_SIZE
        samples.append([image["bytes"] for image in train_data.sample])
    assert samples[0] == samples[1]  # the same sample whatever the seed
    # Spread over the set: a quarter of it is grey, and so is a quarter of the sample.
    greys = [describe_images([decode_image(image)])[1] for image in train_data.sample]
    assert sum(greys) == pt.RECIPE_SAMPLE_SIZE // 4

    # A stream has no length to spread over: its first rows, as they come.
    stream = build_train_data(DataArguments(dataset_name=path, streaming=True), skip_evaluation=True)
    first = datasets.load_from_disk(path).cast_column("image", datasets.Image(decode=False))
    assert [image["bytes"] for image in stream.sample] == [
        image["bytes"] for image in first.select(range(pt.RECIPE_SAMPLE_SIZE))["image"]]  # fmt: skip
