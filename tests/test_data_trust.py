"""
Data the user does not control: unreadable files at evaluation time, string label columns, a non-image column
named as the image column, test folders whose classes are numbered on their own, and 16/32-bit images.
"""

import io
import json
import logging
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from accelerate import Accelerator
from PIL import Image

from conftest import TINY_MODEL_ARGS, tiny_config
from msn_hf import MSNImageProcessor, MSNModel, evaluation
from msn_hf import pretraining as pt
from msn_hf.cli import run
from msn_hf.data import (
    DataArguments,
    ImageDataset,
    data_record,
    decode_image,
    has_labels,
    load_image_dataset,
    match_labels,
    seen_in_pretraining,
    separate_unlabelled,
)
from msn_hf.evaluation import evaluate_lowshot, extract_features, load_evaluation_datasets
from msn_hf.modelcard import write_model_card
from msn_hf.recipe import describe_images

# Visually distinct classes: a classifier on raw pixels separates them perfectly when labels match.
COLOURS = {"cat": (220, 30, 30), "dog": (30, 200, 40), "fox": (40, 60, 230), "wolf": (230, 230, 40),
           "train": (120, 120, 120), "test": (30, 30, 30), **{str(i): (20 * i, 255 - 20 * i, 90) for i in range(12)}}
CORRUPT_BYTES = b"\x89PNG\r\n\x1a\n not an image at all"


def tiny_processor() -> MSNImageProcessor:
    return MSNImageProcessor(size={"shortest_edge": 32}, crop_size=32, focal_crop_size=16)


def image_folder(root, classes, per_class=6, corrupt=None, seed=0):
    """An imagefolder of 32 px noisy solid-colour PNGs, one sub-folder per class, plus `corrupt[name]` garbage files."""
    rng = np.random.default_rng(seed)
    for name in classes:
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(COLOURS[name]) + rng.integers(-20, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{name}_{i}.png")
        for i in range((corrupt or {}).get(name, 0)):
            (folder / f"{name}_corrupt_{i}.png").write_bytes(CORRUPT_BYTES)
    return root


def warnings_of(caplog, logger_name):
    return [record.getMessage() for record in caplog.records
            if record.levelno == logging.WARNING and record.name == logger_name]  # fmt: skip


# --- unreadable images are skipped at evaluation time (issue 6) ---------------------------------------------------


def test_extract_features_skips_unreadable_files_and_counts_distinct_files_once(tmp_path, caplog):
    folder = image_folder(tmp_path / "images", ["cat", "dog", "fox"], corrupt={"cat": 2, "fox": 1})
    data = load_image_dataset(train_dir=str(folder))
    assert len(data.dataset) == 21
    with caplog.at_level(logging.WARNING, logger="msn_hf.evaluation"):
        features, labels = extract_features(None, data, tiny_processor(), batch_size=4, progress=False)
    assert features.shape[0] == len(labels) == 18
    messages = warnings_of(caplog, "msn_hf.evaluation")
    assert len(messages) == 1, messages  # one summary per extraction, not one per batch
    assert "3 unreadable" in messages[0] and "cat_corrupt_0.png" in messages[0]

    # The same files seen twice are still three files.
    caplog.clear()
    twice = ImageDataset(datasets.concatenate_datasets([data.dataset, data.dataset]), data.image_column, "label")
    with caplog.at_level(logging.WARNING, logger="msn_hf.evaluation"):
        features, _ = extract_features(None, twice, tiny_processor(), batch_size=8, progress=False)
    assert features.shape[0] == 36
    messages = warnings_of(caplog, "msn_hf.evaluation")
    assert len(messages) == 1 and "3 unreadable" in messages[0], messages


def test_evaluate_lowshot_completes_on_a_folder_with_unreadable_files(tmp_path):
    folder = image_folder(tmp_path / "images", ["cat", "dog", "fox"], per_class=8, corrupt={"dog": 2, "fox": 2})
    train, test = load_evaluation_datasets(train_dir=str(folder), test_size=0.25)
    results = evaluate_lowshot(
        MSNModel(tiny_config()), train, test, tiny_processor(), shots=(1,), label_fraction=None, seeds=(0,),
        knn_k=3, baselines=("pixels",), progress=False,
    )  # fmt: skip
    settings = results["settings"]
    assert settings["num_train"] + settings["num_test"] == 24  # the 4 unreadable files are not counted
    assert results["encoders"]["pixels"]["knn"] == 1.0


def test_pretraining_with_unreadable_labelled_files_writes_its_evaluation(tmp_path):
    folder = image_folder(tmp_path / "images", ["cat", "dog"], per_class=10, corrupt={"cat": 2, "dog": 1})
    out = tmp_path / "run"
    pt.main([*TINY_MODEL_ARGS, "--train_dir", str(folder), "--max_train_steps", "2",
             "--per_device_train_batch_size", "8", "--output_dir", str(out)])  # fmt: skip
    evaluation = json.loads((out / "eval_results.json").read_text())
    assert evaluation["settings"]["num_train"] + evaluation["settings"]["num_test"] == 20  # the readable ones
    assert "eval" in json.loads((out / "train_results.json").read_text())


# --- string labels and non-image columns (issue 7) ----------------------------------------------------------------


def test_string_labels_from_a_metadata_csv_are_encoded_as_class_labels(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    names = ["fox", "cat", "dog", "cat", "fox", "dog"] * 3
    lines = ["file_name,label"]
    for i, name in enumerate(names):
        Image.new("RGB", (32, 32), COLOURS[name]).save(folder / f"{i}.png")
        lines.append(f"{i}.png,{name}")
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    assert isinstance(datasets.load_dataset("imagefolder", data_dir=str(folder), split="train").features["label"],
                      datasets.Value)  # fmt: skip  # what `datasets` makes of it: strings

    data = load_image_dataset(train_dir=str(folder))
    assert data.label_names == ["cat", "dog", "fox"] and data.num_labels == 3  # sorted names, as ClassLabel does
    assert [data.label_names[i] for i in data.dataset["label"]] == names
    assert has_labels(data)
    # Truncation keeps the ids of the whole split, so that a truncated run numbers classes as a full one does.
    first = load_image_dataset(train_dir=str(folder), max_samples=1)
    (row,) = first.dataset.cast_column("image", datasets.Image(decode=False))
    assert first.label_names == ["cat", "dog", "fox"]
    assert first.label_names[row["label"]] == names[int(Path(row["image"]["path"]).stem)]
    # A hand-made ImageDataset with string labels does not crash `has_labels` either.
    raw = datasets.Dataset.from_dict({"image": [{"bytes": None, "path": str(folder / "0.png")}], "label": ["fox"]},
                                     features=datasets.Features(image=datasets.Image(), label=datasets.Value("string")))  # fmt: skip
    assert has_labels(ImageDataset(raw, "image", "label"))

    train, test = load_evaluation_datasets(train_dir=str(folder), test_size=0.5)
    results = evaluate_lowshot(
        MSNModel(tiny_config()), train, test, tiny_processor(), shots=(1,), label_fraction=None, seeds=(0,),
        knn_k=1, baselines=("pixels",), progress=False,
    )  # fmt: skip
    assert results["settings"]["num_labels"] == 3 and results["encoders"]["pixels"]["knn"] == 1.0


def test_a_non_image_column_given_as_the_image_column_is_a_one_line_error(tmp_path):
    features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=["a", "b"]))
    images = [Image.new("RGB", (8, 8), (i, i, i)) for i in range(4)]
    datasets.Dataset.from_dict({"image": images, "label": [0, 1, 0, 1]}, features=features).save_to_disk(
        str(tmp_path / "data")
    )
    with pytest.raises(ValueError) as error:
        load_image_dataset(dataset_name=str(tmp_path / "data"), image_column_name="label")
    message = str(error.value)
    assert "\n" not in message
    assert "--image_column_name 'label'" in message and "ClassLabel" in message and "['image']" in message
    with pytest.raises(ValueError, match="--image_column_name 'label'"):
        load_evaluation_datasets(dataset_name=str(tmp_path / "data"), image_column_name="label")


def test_a_mistyped_local_dataset_folder_is_a_one_line_error_naming_the_flag(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    # A model msn-evaluate can load, so that what it refuses can only be the data.
    MSNModel(tiny_config()).save_pretrained(tmp_path / "model")
    tiny_processor().save_pretrained(tmp_path / "model")
    tools = (("msn-pretrain", pt.main, ["--output_dir", "run"]),
             ("msn-evaluate", evaluation.main, ["--model_name_or_path", "model"]))  # fmt: skip
    for prog, main, extra in tools:
        for value in ("./no-such-ds", "data/cifar/saved"):  # `namespace/name/more` cannot be a Hub id either
            status = run(main, prog, ["--dataset_name", value, *extra])
            stderr = capfd.readouterr().err
            assert status == 2, (prog, value, stderr[-2000:])
            assert stderr.splitlines()[-1].startswith(f"{prog}: error: --dataset_name {value!r} ")
            assert f"there is no folder at {tmp_path / value}" in stderr, stderr
            assert "Traceback" not in stderr and "Couldn't reach" not in stderr
    assert not (tmp_path / "run").exists()
    # The library's own loader says the same, and a `namespace/name` with no such folder is still read as a Hub id.
    with pytest.raises(ValueError, match=r"^--dataset_name '\./no-such-ds' .*no folder at"):
        load_image_dataset(dataset_name="./no-such-ds")
    with pytest.raises(Exception) as error:  # offline in the tests: the Hub cannot be reached
        load_image_dataset(dataset_name="someone/no-such-ds")
    assert "--dataset_name" not in str(error.value), error.value


# --- a separate test folder is matched to the training classes by name (issue 12) ---------------------------------


def folder_of(path: str) -> str:
    return path.replace("\\", "/").split("/")[-2]


def test_test_folder_labels_are_matched_to_training_classes_by_name(tmp_path):
    train_dir = image_folder(tmp_path / "train", ["cat", "dog", "fox"])
    test_dir = image_folder(tmp_path / "test", ["cat", "fox"], per_class=4, seed=1)
    assert datasets.load_dataset("imagefolder", data_dir=str(test_dir), split="train").features["label"].names == [
        "cat", "fox"]  # fmt: skip  # imagefolder numbers the test folder on its own: fox would be 1, i.e. "dog"

    train, test = load_evaluation_datasets(train_dir=str(train_dir), test_dir=str(test_dir))
    assert test.label_names == train.label_names == ["cat", "dog", "fox"]
    rows = test.dataset.cast_column("image", datasets.Image(decode=False))
    assert [test.label_names[row["label"]] for row in rows] == [folder_of(row["image"]["path"]) for row in rows]
    assert sorted(set(test.dataset["label"])) == [0, 2]

    results = evaluate_lowshot(
        MSNModel(tiny_config()), train, test, tiny_processor(), shots=(1, 2), label_fraction=None, seeds=(0, 1),
        knn_k=3, baselines=("pixels",), progress=False,
    )  # fmt: skip
    pixels = results["encoders"]["pixels"]
    assert pixels["knn"] == 1.0  # with the folder's own ids, every fox would count as a wrong "dog": 0.5
    assert all(setting["mean"] == 1.0 for setting in pixels["logistic"].values())


def test_a_shot_count_above_a_class_size_is_stated_in_the_results_and_the_card(tmp_path):
    train = load_image_dataset(train_dir=str(image_folder(tmp_path / "train", ["cat", "dog", "fox"], per_class=3)))
    test = load_image_dataset(train_dir=str(image_folder(tmp_path / "test", ["cat", "fox"], per_class=2, seed=1)))
    test = match_labels(train, test)
    evaluate = lambda shots: evaluate_lowshot(  # noqa: E731
        MSNModel(tiny_config()), train, test, tiny_processor(), shots=shots, label_fraction=None, seeds=(0,),
        knn_k=None, baselines=(), progress=False,
    )  # fmt: skip
    assert "shots_note" not in evaluate((1, 3))["settings"]
    results = evaluate((1, 2, 5))
    note = results["settings"]["shots_note"]
    assert "5-shot" in note and "2-shot" not in note and "3 training images" in note
    model, processor = MSNModel(tiny_config()), tiny_processor()
    assert note in write_model_card(tmp_path, model, processor, {"dataset": "images"}, results).read_text()


def test_pretraining_matches_the_test_folder_to_the_training_classes(tmp_path):
    train_dir = image_folder(tmp_path / "train", ["cat", "dog", "fox"])
    test_dir = image_folder(tmp_path / "test", ["dog", "fox"], per_class=3, seed=1)
    data_args = DataArguments(train_dir=str(train_dir), test_dir=str(test_dir))
    train_data = pt.build_train_data(data_args, pt.PretrainingArguments(per_device_train_batch_size=8),
                                     Accelerator(cpu=True))  # fmt: skip
    train, test = train_data.evaluation
    assert test.label_names == train.label_names == ["cat", "dog", "fox"]
    rows = test.dataset.cast_column("image", datasets.Image(decode=False))
    assert [test.label_names[row["label"]] for row in rows] == [folder_of(row["image"]["path"]) for row in rows]


def test_a_test_class_unknown_in_training_is_named(tmp_path):
    train_dir = image_folder(tmp_path / "train", ["cat", "dog"], per_class=2)
    test_dir = image_folder(tmp_path / "test", ["cat", "wolf"], per_class=2)
    with pytest.raises(ValueError, match="wolf"):
        load_evaluation_datasets(train_dir=str(train_dir), test_dir=str(test_dir))
    with pytest.raises(ValueError, match="wolf"):
        pt.build_train_data(DataArguments(train_dir=str(train_dir), test_dir=str(test_dir)),
                            pt.PretrainingArguments(per_device_train_batch_size=2), Accelerator(cpu=True))  # fmt: skip
    # Matching the same classes changes nothing.
    train = load_image_dataset(train_dir=str(train_dir))
    assert match_labels(train, train).dataset["label"] == train.dataset["label"]


@pytest.mark.parametrize("split_named_class", ["train", "test"])
def test_a_class_folder_named_like_a_split_is_a_class(tmp_path, split_named_class):
    # PASCAL VOC and COCO have a "train" class; `datasets` reads a top-level "train" folder as the train split.
    root = image_folder(tmp_path / "images", ["cat", "dog", split_named_class], per_class=2)
    data = load_image_dataset(train_dir=str(root))
    assert data.label_names == sorted(["cat", "dog", split_named_class])
    rows = data.dataset.cast_column("image", datasets.Image(decode=False))
    assert sorted(folder_of(row["image"]["path"]) for row in rows) == sorted(["cat", "dog", split_named_class] * 2)
    assert [data.label_names[row["label"]] for row in rows] == [folder_of(row["image"]["path"]) for row in rows]


@pytest.mark.parametrize("split_folder", [None, "train"])
def test_images_in_folders_inside_class_folders_take_the_class_of_the_top_folder(tmp_path, split_folder):
    # torchvision's ImageFolder reads cat/0/x.png as a cat; `imagefolder` alone read it as a "0", and with images at
    # two depths (dog/x.png beside cat/0/y.png) read no label at all.
    root = tmp_path / "images"
    classes = root / split_folder if split_folder else root
    image_folder(classes / "cat", ["0", "1"], per_class=2)  # cat/0/, cat/1/: two places cats were shot
    image_folder(classes / "dog", ["2"], per_class=2, seed=1)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(classes / "dog" / "loose.png")
    data = load_image_dataset(train_dir=str(root))
    assert data.label_names == ["cat", "dog"]
    rows = data.dataset.cast_column("image", datasets.Image(decode=False))
    top = [Path(row["image"]["path"]).relative_to(classes).parts[0] for row in rows]
    assert [data.label_names[row["label"]] for row in rows] == top and sorted(top) == ["cat"] * 4 + ["dog"] * 3


def test_a_folder_of_split_folders_still_gives_its_train_split(tmp_path):
    image_folder(tmp_path / "images" / "train", ["cat", "dog"], per_class=3)
    image_folder(tmp_path / "images" / "test", ["cat", "dog"], per_class=2, seed=1)
    data = load_image_dataset(train_dir=str(tmp_path / "images"))
    assert data.label_names == ["cat", "dog"] and len(data.dataset) == 6
    paths = data.dataset.cast_column("image", datasets.Image(decode=False))["image"]
    assert all("/train/" in record["path"].replace("\\", "/") for record in paths)


def test_a_folder_of_split_folders_gives_the_splits_asked_for(tmp_path):
    root = tmp_path / "images"
    image_folder(root / "train", ["cat", "dog"], per_class=5)
    image_folder(root / "test", ["cat", "dog"], per_class=2, seed=1)
    assert len(load_image_dataset(train_dir=str(root), split="test").dataset) == 4
    # Evaluated on the folder's test split, not on a hold-out of its train split.
    train, test = load_evaluation_datasets(train_dir=str(root))
    assert (len(train.dataset), test.split, len(test.dataset)) == (10, "test", 4)
    train_data = pt.build_train_data(DataArguments(train_dir=str(root)),
                                     pt.PretrainingArguments(per_device_train_batch_size=2), Accelerator(cpu=True))  # fmt: skip
    assert len(train_data.dataset) == 10 and train_data.evaluation[1].split == "test"
    with pytest.raises(ValueError, match=r"`split` 'validation' is not a split of the folder .*: its splits are \['test', 'train'\]"):
        load_image_dataset(train_dir=str(root), split="validation")


def test_a_test_dir_of_split_folders_gives_its_test_split_not_its_train_split(tmp_path):
    root = tmp_path / "images"
    image_folder(root / "train", ["cat", "dog"], per_class=5)
    image_folder(root / "val", ["cat", "dog"], per_class=2, seed=1)
    image_folder(tmp_path / "other", ["cat", "dog"], per_class=3, seed=2)
    _, test = load_evaluation_datasets(train_dir=str(tmp_path / "other"), test_dir=str(root))
    paths = test.dataset.cast_column("image", datasets.Image(decode=False))["image"]
    assert len(paths) == 4 and all("/val/" in record["path"].replace("\\", "/") for record in paths)
    assert test.split == f"test_dir {root / 'val'}"
    image_folder(root / "test", ["cat", "dog"], per_class=1, seed=3)  # a test split comes before a validation one
    _, test = load_evaluation_datasets(train_dir=str(tmp_path / "other"), test_dir=str(root))
    assert len(test.dataset) == 2
    only_train = tmp_path / "only_train"
    image_folder(only_train / "train", ["cat", "dog"], per_class=2)
    with pytest.raises(ValueError, match=r"--test_dir .*only_train.* holds split folders \['train'\] and no test"):
        load_evaluation_datasets(train_dir=str(tmp_path / "other"), test_dir=str(only_train))


def test_a_test_dir_that_holds_the_training_images_is_refused_by_both_commands(tmp_path):
    root = tmp_path / "images"
    image_folder(root / "train", ["cat", "dog"], per_class=4)
    image_folder(root / "test", ["cat", "dog"], per_class=2, seed=1)
    train_dir = root / "train"
    for test_dir in (train_dir, train_dir / "cat" / "..", root / "train" / "cat"):
        with pytest.raises(ValueError, match=r"--test_dir .* the training images of --train_dir"):
            load_evaluation_datasets(train_dir=str(train_dir), test_dir=str(test_dir))
        with pytest.raises(ValueError, match=r"--test_dir .* the training images of --train_dir"):
            pt.build_train_data(DataArguments(train_dir=str(train_dir), test_dir=str(test_dir)),
                                pt.PretrainingArguments(per_device_train_batch_size=2), Accelerator(cpu=True))  # fmt: skip
    # Other images beside them are fine, whether named as the root's test split or as its own folder.
    for train, test in ((train_dir, root), (root, root / "test"), (train_dir, root / "test")):
        assert len(load_evaluation_datasets(train_dir=str(train), test_dir=str(test))[1].dataset) == 4


def test_a_label_column_named_so_is_preferred_to_another_class_label_column(tmp_path):
    image = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    for label_feature in (datasets.Value("int64"), datasets.ClassLabel(names=["a", "b", "c"])):
        features = datasets.Features(
            image=datasets.Image(), source=datasets.ClassLabel(names=["web", "phone"]), label=label_feature
        )
        saved = datasets.Dataset.from_dict(
            {"image": [image] * 6, "source": [0, 1] * 3, "label": [0, 1, 2] * 2}, features=features
        )
        assert load_image_dataset(dataset_name=_save(saved, tmp_path / str(label_feature))).label_column == "label"
    # CIFAR-100 names its labels fine_label and coarse_label, fine first.
    features = datasets.Features(
        img=datasets.Image(), coarse_label=datasets.ClassLabel(num_classes=2), fine_label=datasets.ClassLabel(num_classes=3)
    )
    saved = datasets.Dataset.from_dict(
        {"img": [image] * 6, "coarse_label": [0, 1] * 3, "fine_label": [0, 1, 2] * 2}, features=features
    )
    assert load_image_dataset(dataset_name=_save(saved, tmp_path / "cifar")).label_column == "fine_label"


def _save(dataset: datasets.Dataset, path) -> str:
    dataset.save_to_disk(str(path))
    return str(path)


def test_an_empty_label_name_marks_an_image_without_a_label(tmp_path):
    images = [Image.fromarray(np.full((8, 8, 3), 20 * i, np.uint8)) for i in range(8)]
    labels = ["cat", "", "dog", "cat", None, "dog", "", "cat"]
    saved = datasets.Dataset.from_dict({"image": images, "label": labels})
    data = load_image_dataset(dataset_name=_save(saved, tmp_path / "saved"))
    assert data.label_names == ["cat", "dog"]
    labelled, unlabelled = separate_unlabelled(data)
    assert len(labelled.dataset) == 5 and len(unlabelled.dataset) == 3


def test_a_test_dir_is_read_as_an_image_folder_whatever_the_training_columns_are_named(tmp_path):
    image = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    saved = datasets.Dataset.from_dict(
        {"img": [image] * 4, "category": ["cat", "dog"] * 2},
        features=datasets.Features(img=datasets.Image(), category=datasets.Value("string")),
    )
    test_dir = image_folder(tmp_path / "test", ["cat", "dog"], per_class=2)
    train, test = load_evaluation_datasets(dataset_name=_save(saved, tmp_path / "saved"), test_dir=str(test_dir),
                                           image_column_name="img", label_column_name="category")  # fmt: skip
    assert (train.image_column, test.image_column, len(test.dataset)) == ("img", "image", 4)
    assert test.label_names == ["cat", "dog"]


def test_fewer_images_asked_for_are_drawn_from_every_class_and_named_so(tmp_path):
    # An image folder lists its classes one after the other: its first rows are its first classes.
    names = [str(i) for i in range(10)]
    folder = image_folder(tmp_path / "images", names, per_class=10)
    data = load_image_dataset(train_dir=str(folder), max_samples=30)
    assert len(data.dataset) == 30 and len(set(data.dataset["label"])) >= 8  # the first 30 rows hold 3 classes
    assert data.split == "30 random rows of train"
    assert load_image_dataset(train_dir=str(folder), max_samples=30).dataset["label"] == data.dataset["label"]

    test_dir = image_folder(tmp_path / "test", ["0", "1"], per_class=10, seed=1)
    _, test = load_evaluation_datasets(train_dir=str(folder), test_dir=str(test_dir), max_test_samples=10)
    assert len(test.dataset) == 10 and len(set(test.dataset["label"])) == 2  # the first 10 rows are all of class 0
    assert test.split == f"10 random rows of test_dir {test_dir}"
    stream = load_image_dataset(train_dir=str(folder), max_samples=30, streaming=True)
    assert stream.split == "train[:30]"  # a stream has no length to draw from: its first rows


def saved_dataset(path, labels: list, feature) -> str:
    features = datasets.Features(image=datasets.Image(), label=feature)
    images = [Image.fromarray(np.full((8, 8, 3), 10 * i, np.uint8)) for i in range(len(labels))]
    datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).save_to_disk(str(path))
    return str(path)


def test_test_folders_named_by_integer_labels_are_matched_by_number(tmp_path):
    # Training labels are integers without names; the test folders are named by them. `imagefolder` numbers the
    # folders in string order ("0", "1", "10", "11", "2", ...), so its ids would put folder "2" in class 4.
    train = saved_dataset(tmp_path / "train", [i % 12 for i in range(24)], datasets.Value("int64"))
    test_dir = image_folder(tmp_path / "test", [str(i) for i in range(12)], per_class=1)
    _, test = load_evaluation_datasets(dataset_name=train, test_dir=str(test_dir))
    rows = test.dataset.cast_column("image", datasets.Image(decode=False))
    assert [row["label"] for row in rows] == [int(folder_of(row["image"]["path"])) for row in rows]


def test_test_class_names_that_unnamed_training_labels_cannot_match_are_an_error(tmp_path):
    train = saved_dataset(tmp_path / "train", [0, 1, 0, 1], datasets.Value("int64"))
    test_dir = image_folder(tmp_path / "test", ["cat", "dog"], per_class=1)
    with pytest.raises(ValueError, match=r"test set's classes are named \['cat', 'dog'\].*training labels are integers"):
        load_evaluation_datasets(dataset_name=train, test_dir=str(test_dir))


def test_an_evaluation_split_that_is_asked_for_must_exist_with_labels(tmp_path):
    labelled = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=["a", "b"]))
    image = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    split = lambda n, labels: datasets.Dataset.from_dict({"image": [image] * n, "label": labels}, features=labelled)  # noqa: E731
    path = str(tmp_path / "saved")
    datasets.DatasetDict(train=split(20, [0, 1] * 10), validation=split(6, [0, 1] * 3),
                         test=split(4, [-1] * 4)).save_to_disk(path)  # fmt: skip
    _, test = load_evaluation_datasets(dataset_name=path, test_split="validation")
    assert test.split == "validation" and len(test.dataset) == 6
    with pytest.raises(ValueError, match=r"--eval_split 'valdation' must be a split of .* with labels, got no such split"):
        load_evaluation_datasets(dataset_name=path, test_split="valdation")
    with pytest.raises(ValueError, match=r"--eval_split 'test' must be a split of .* with labels, got one without"):
        load_evaluation_datasets(dataset_name=path, test_split="test")
    # Not asked for: the first labelled split of validation and test.
    assert load_evaluation_datasets(dataset_name=path)[1].split == "validation"


def test_the_evaluation_split_is_never_the_training_split(tmp_path):
    labelled = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=["a", "b"]))
    image = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    split = lambda n: datasets.Dataset.from_dict({"image": [image] * n, "label": [0, 1] * (n // 2)}, features=labelled)  # noqa: E731
    path = str(tmp_path / "saved")
    datasets.DatasetDict(train=split(20), validation=split(6), test=split(4)).save_to_disk(path)
    # Looked for: the first labelled split of validation and test that is not the training split.
    assert load_evaluation_datasets(dataset_name=path, train_split="validation")[1].split == "test"
    train_data = pt.build_train_data(DataArguments(dataset_name=path, train_split="validation"),
                                     pt.PretrainingArguments(per_device_train_batch_size=2), Accelerator(cpu=True))  # fmt: skip
    assert train_data.evaluation[1].split == "test"
    with pytest.raises(ValueError, match=r"--eval_split 'test' must not be .*--train_split 'test'"):
        load_evaluation_datasets(dataset_name=path, train_split="test", test_split="test")
    # The built-in digits' "all" holds their test split: nothing left to look for, a hold-out of "all" instead.
    _, test = load_evaluation_datasets(train_split="all", max_train_samples=200)
    assert test.split.startswith("held-out") and "of all" in test.split
    with pytest.raises(ValueError, match=r"--eval_split 'test' must not be .*--train_split 'all'"):
        load_evaluation_datasets(train_split="all", test_split="test")


def test_a_test_folder_the_model_was_pretrained_on_is_seen_whatever_the_training_folder(tmp_path):
    pretrained_on = image_folder(tmp_path / "images" / "train", ["cat", "dog"], per_class=2)
    other = image_folder(tmp_path / "images" / "test", ["cat", "dog"], per_class=2, seed=1)
    record = data_record(DataArguments(train_dir=str(pretrained_on)), None)
    for test_dir in (pretrained_on, pretrained_on / "cat"):  # the folder itself, or one inside it
        flags = DataArguments(train_dir=str(other), test_dir=str(test_dir))
        test = ImageDataset(datasets.Dataset.from_dict({"image": []}), "image", split=f"test_dir {test_dir}")
        assert "--test_dir" in seen_in_pretraining(record, flags, test), test_dir
    # The folder that holds both splits is tested on its test split.
    flags = DataArguments(train_dir=str(other), test_dir=str(tmp_path / "images"))
    assert seen_in_pretraining(record, flags, ImageDataset(datasets.Dataset.from_dict({"image": []}), "image")) is None
    flags = DataArguments(train_dir=str(pretrained_on), test_dir=str(other))
    assert seen_in_pretraining(record, flags, ImageDataset(datasets.Dataset.from_dict({"image": []}), "image")) is None
    # Pretrained on a folder of split folders: its train folder's images only.
    record = data_record(DataArguments(train_dir=str(tmp_path / "images")), None)
    for test_dir, seen in ((other, False), (pretrained_on, True)):
        flags = DataArguments(train_dir=str(tmp_path / "images"), test_dir=str(test_dir))
        assert bool(seen_in_pretraining(record, flags, ImageDataset(datasets.Dataset.from_dict({"image": []}), "image"))) is seen


# --- 16 and 32-bit images are scaled to 8 bits, not clipped (issue 14) -----------------------------------------------

SIDE = 32
RAMP = np.tile(np.linspace(0, 255, SIDE).round().astype(np.uint8), (SIDE, 1))  # a horizontal grey ramp


def ramp_in(mode: str) -> tuple[bytes, np.ndarray]:
    """The ramp as the encoded file of an image of `mode` (PNG or TIFF) and the 8-bit grey image it should decode to."""
    ramp16 = np.tile(np.linspace(0, 65535, SIDE).round().astype(np.uint16), (SIDE, 1))
    expected = RAMP
    if mode == "I;16":
        image = Image.fromarray(ramp16)
    elif mode == "I;16B":
        image = Image.frombytes("I;16B", (SIDE, SIDE), ramp16.astype(">u2").tobytes())
    elif mode == "I":  # 16-bit data widened to 32 bits (`convert("I")`): the 16-bit scale, like I;16
        image = Image.fromarray(ramp16.astype(np.int32))
    elif mode == "I 8-bit":  # 8-bit data in 32 bits (`datasets` stores numpy's default int64 so): the 8-bit scale
        image = Image.fromarray(RAMP.astype(np.int32))
    elif mode == "I wide":  # values no fixed bit depth explains: the image's own range
        image = Image.fromarray((ramp16.astype(np.int32) * 100 - 3_000_000).astype(np.int32))
    elif mode == "F":  # [0, 1] floats
        image = Image.fromarray((ramp16 / 65535).astype(np.float32))
    elif mode == "F wide":  # floats outside [0, 1]: the image's own range
        image = Image.fromarray((ramp16 / 65535 * 8 - 2).astype(np.float32))
    elif mode == "1":
        image = Image.fromarray(RAMP).convert("1", dither=Image.Dither.NONE)
        expected = np.where(RAMP >= 128, 255, 0).astype(np.uint8)
    else:
        image = Image.fromarray(RAMP).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, "PNG" if mode in ("1", "L", "LA", "P", "RGB", "RGBA", "I;16") else "TIFF")
    opened = Image.open(io.BytesIO(buffer.getvalue()))
    assert opened.mode == mode.split()[0]  # the test exercises the mode it names
    return buffer.getvalue(), expected


MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "YCbCr", "I;16", "I;16B", "I", "I 8-bit", "I wide", "F", "F wide"]


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_decodes_to_its_8_bit_grey_ramp_in_decoding_collator_and_recipe(mode):
    data, expected = ramp_in(mode)
    record = {"bytes": data, "path": None}
    decoded = np.asarray(decode_image(record), dtype=np.int16)
    assert decoded.shape == (SIDE, SIDE, 3)
    assert np.abs(decoded - expected[..., None]).max() <= 2, decoded.mean()  # a 16-bit ramp is not ~255 (white)
    assert abs(decoded.mean() - expected.mean()) < 1

    # Pretraining decodes with the collator: its canvas is the same ramp.
    collator = pt.MSNViewsCollator(MSNImageProcessor(size=SIDE, crop_size=SIDE), "image", views_on_device=True)
    canvas = collator([{"image": record}])["canvas"][0].numpy().astype(np.int16)
    assert np.abs(canvas - expected[None]).max() <= 2

    # The auto recipe sees a grey image of the same size, whether it reads the file or the decoded image.
    opened = Image.open(io.BytesIO(data))
    assert describe_images([opened]) == describe_images([decode_image(record)]) == (SIDE, True)

    # The image processor given the file's image, as a library user would, reads the same 8 bits.
    processor = MSNImageProcessor(size=SIDE, crop_size=SIDE, do_normalize=False)
    from_file = processor(Image.open(io.BytesIO(data)), return_tensors="pt")["pixel_values"][0]
    assert np.abs(from_file.numpy() * 255 - expected[None]).max() <= 2.5, from_file.mean()


def test_integer_pixels_stored_by_datasets_decode_as_the_same_8_bit_image_whatever_their_numpy_type():
    # Pixels read from a CSV or built with numpy default to int64, which `datasets` stores as a 32-bit image.
    features = datasets.Features({"image": datasets.Image()})
    stored = {
        dtype: datasets.Dataset.from_dict({"image": [RAMP.astype(dtype)]}, features=features).cast_column(
            "image", datasets.Image(decode=False)
        )[0]["image"]
        for dtype in (np.uint8, np.int32, np.int64)
    }
    for dtype, record in stored.items():
        np.testing.assert_array_equal(np.asarray(decode_image(record))[..., 0], RAMP, err_msg=str(dtype))
    # The processor reads the array and its PIL image alike.
    processor = MSNImageProcessor(size=SIDE, crop_size=SIDE)
    from_array = processor(RAMP.astype(np.int64), return_tensors="pt")["pixel_values"]
    from_image = processor(Image.fromarray(RAMP.astype(np.int32)), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(from_image, from_array)


def test_the_transparent_grey_of_a_16_bit_png_is_composited_on_white_as_an_8_bit_one_is():
    pixels = RAMP.copy()
    pixels[:, : SIDE // 4] = 0
    decoded = {}
    for bits, array in ((8, pixels), (16, pixels.astype(np.uint16) * 257)):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, "PNG", transparency=0)
        decoded[bits] = np.asarray(decode_image({"bytes": buffer.getvalue(), "path": None}), dtype=np.int16)
    assert (decoded[8][:, : SIDE // 4] == 255).all()
    assert np.abs(decoded[16] - decoded[8]).max() <= 1


def test_an_image_is_decoded_upright_as_its_exif_orientation_says():
    # Cameras store the pixels as shot and the way to turn them in EXIF: orientation 6 is "turn 90 degrees clockwise".
    pixels = np.random.default_rng(0).integers(0, 256, (40, 80, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", exif=exif)
    record = {"bytes": buffer.getvalue(), "path": None}
    as_stored = np.asarray(Image.open(io.BytesIO(record["bytes"])).convert("RGB"))  # 40 high, 80 wide
    upright = np.ascontiguousarray(np.rot90(as_stored, k=-1))  # clockwise: 80 high, 40 wide
    for image in (decode_image(record), decode_image(Image.open(io.BytesIO(record["bytes"])))):
        np.testing.assert_array_equal(np.asarray(image), upright)

    processor = MSNImageProcessor(size=40, crop_size=40)
    from_file = processor(Image.open(io.BytesIO(record["bytes"])), return_tensors="pt")["pixel_values"]
    assert torch.equal(from_file, processor(upright, return_tensors="pt")["pixel_values"])


def test_the_transparent_colour_of_an_rgb_png_is_composited_on_white():
    # PNG's tRNS chunk marks one RGB colour transparent, as it marks a grey level or a palette entry.
    pixels = np.zeros((SIDE, SIDE, 3), dtype=np.uint8)
    pixels[:, : SIDE // 2] = (200, 30, 30)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG", transparency=(0, 0, 0))
    assert Image.open(io.BytesIO(buffer.getvalue())).mode == "RGB"
    expected = np.where(pixels.any(axis=-1, keepdims=True), pixels, 255)
    decoded = decode_image({"bytes": buffer.getvalue(), "path": None})
    np.testing.assert_array_equal(np.asarray(decoded), expected)
    processor = MSNImageProcessor(size=SIDE, crop_size=SIDE, do_normalize=False)
    from_file = processor(Image.open(io.BytesIO(buffer.getvalue())), return_tensors="pt")["pixel_values"][0]
    assert np.abs(from_file.permute(1, 2, 0).numpy() * 255 - expected).max() < 0.5


def test_describe_images_tells_colour_from_grey_in_every_mode():
    colour = Image.fromarray(np.dstack([RAMP, RAMP[::-1], np.full_like(RAMP, 90)]))
    for mode in ("RGB", "RGBA", "P", "CMYK"):
        assert describe_images([colour.convert(mode)]) == (SIDE, False), mode
    assert describe_images([Image.fromarray(RAMP).convert("P")]) == (SIDE, True)


def test_raw_pixel_features_of_every_mode_match_the_8_bit_ramp():
    """Evaluation reads the same 8 bits: raw-pixel features of each mode equal those of its expected grey image."""
    features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=["ramp"]))
    records, references = [], []
    for mode in MODES:
        data, expected = ramp_in(mode)
        records.append({"bytes": data, "path": None})
        buffer = io.BytesIO()
        Image.fromarray(expected).convert("RGB").save(buffer, "PNG")
        references.append({"bytes": buffer.getvalue(), "path": None})
    labels = [0] * len(MODES)
    modes = ImageDataset(datasets.Dataset.from_dict({"image": records, "label": labels}, features=features), "image", "label")
    reference = ImageDataset(datasets.Dataset.from_dict({"image": references, "label": labels}, features=features),
                             "image", "label")  # fmt: skip
    got, _ = extract_features(None, modes, tiny_processor(), batch_size=5, progress=False)
    want, _ = extract_features(None, reference, tiny_processor(), batch_size=5, progress=False)
    scale = 1 / (255 * 0.229)  # one 8-bit level after ImageNet normalisation, at most
    for mode, row, reference_row in zip(MODES, got, want):
        np.testing.assert_allclose(row, reference_row, atol=3 * scale, err_msg=mode)
