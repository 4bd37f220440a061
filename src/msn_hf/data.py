"""Image datasets for pretraining and evaluation: the Hub, `save_to_disk` folders, image folders, built-in digits."""

import io
import logging
import os
from dataclasses import dataclass

import datasets
import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

DIGITS_IMAGE_SIZE = 32
DIGITS_TEST_FRACTION = 0.2
_IMAGE_COLUMN_NAMES = ("image", "img", "images", "pixel_values", "picture")
_LABEL_COLUMN_NAMES = ("label", "labels", "fine_label", "class", "target")


@dataclass
class ImageDataset:
    """A dataset with the name of its image column and, when it has one, of its label column."""

    dataset: datasets.Dataset | datasets.IterableDataset
    image_column: str
    label_column: str | None = None

    @property
    def num_labels(self) -> int | None:
        feature = self.dataset.features.get(self.label_column) if self.label_column else None
        return feature.num_classes if isinstance(feature, datasets.ClassLabel) else None

    @property
    def label_names(self) -> list[str] | None:
        feature = self.dataset.features.get(self.label_column) if self.label_column else None
        return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def load_digits_dataset(split: str = "train", image_size: int = DIGITS_IMAGE_SIZE) -> datasets.Dataset:
    """
    scikit-learn's handwritten digits (1,797 8x8 images shipped with the package, no download) as RGB
    `image_size` x `image_size` PIL images with a `label` ClassLabel; a fixed stratified 80/20 train/test split.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test", "all"):
        raise ValueError(f"`split` for the built-in digits must be 'train', 'test' or 'all', got {split!r}.")
    digits = load_digits()
    pixels = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    indices = np.arange(len(pixels))
    if split != "all":
        train, test = train_test_split(
            indices, test_size=DIGITS_TEST_FRACTION, stratify=digits.target, random_state=0
        )
        indices = np.sort(train if split == "train" else test)
    images = [
        Image.fromarray(pixels[i]).resize((image_size, image_size), Image.Resampling.BICUBIC).convert("RGB")
        for i in indices
    ]
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(d) for d in range(10)])}
    )
    return datasets.Dataset.from_dict({"image": images, "label": digits.target[indices].tolist()}, features=features)


def _find_column(features: datasets.Features, explicit: str | None, feature_type: type, names: tuple, what: str):
    if explicit is not None:
        if explicit not in features:
            raise ValueError(f"`{what}_column_name` {explicit!r} is not a column; columns: {list(features)}.")
        return explicit
    for name, feature in features.items():
        if isinstance(feature, feature_type):
            return name
    return next((name for name in names if name in features), None)


def load_image_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_dir: str | None = None,
    split: str = "train",
    image_column_name: str | None = None,
    label_column_name: str | None = None,
    max_samples: int | None = None,
    streaming: bool = False,
    cache_dir: str | None = None,
) -> ImageDataset:
    """
    Load images from a Hub id or a `Dataset.save_to_disk` folder (`dataset_name`), an image folder (`train_dir`),
    or, with neither, the built-in digits. Image and label columns are detected from the features when not given.
    """
    if dataset_name is not None and train_dir is not None:
        raise ValueError("Give either `dataset_name` or `train_dir`, not both.")
    if train_dir is not None:
        if not os.path.isdir(train_dir):
            raise ValueError(f"`train_dir` must be a folder of images, got {train_dir!r}.")
        dataset = datasets.load_dataset("imagefolder", data_dir=train_dir, split="train", streaming=streaming)
    elif dataset_name is not None and os.path.isdir(dataset_name):
        dataset = datasets.load_from_disk(dataset_name)
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise ValueError(f"`split` {split!r} is not in {dataset_name!r}; splits: {list(dataset)}.")
            dataset = dataset[split]
        if streaming:
            dataset = dataset.to_iterable_dataset()
    elif dataset_name is not None:
        dataset = datasets.load_dataset(
            dataset_name, dataset_config_name, split=split, streaming=streaming, cache_dir=cache_dir
        )
    else:
        dataset = load_digits_dataset(split)
        if streaming:
            dataset = dataset.to_iterable_dataset()

    features = dataset.features
    if features is None:
        raise ValueError("The dataset has no declared features; pass `image_column_name`.")
    image_column = _find_column(features, image_column_name, datasets.Image, _IMAGE_COLUMN_NAMES, "image")
    if image_column is None:
        raise ValueError(f"No image column found; pass `image_column_name`. Columns: {list(features)}.")
    label_column = _find_column(features, label_column_name, datasets.ClassLabel, _LABEL_COLUMN_NAMES, "label")
    if max_samples is not None:
        dataset = dataset.take(max_samples) if streaming else dataset.select(range(min(max_samples, len(dataset))))
    return ImageDataset(dataset=dataset, image_column=image_column, label_column=label_column)


def decode_image(value) -> Image.Image | None:
    """
    An RGB PIL image from a decoded image or an undecoded `{"bytes", "path"}` record; `None` when the image
    cannot be read (corrupt or missing file), so that callers can skip it instead of crashing mid-epoch.
    """
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, dict) and value.get("bytes") is not None:
            image = Image.open(io.BytesIO(value["bytes"]))
        elif isinstance(value, dict) and value.get("path") is not None:
            image = Image.open(value["path"])
        else:
            return None
        image.load()
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as error:
        logger.debug("Unreadable image skipped: %s", error)
        return None
