"""
Image datasets for pretraining and evaluation: the Hub, `save_to_disk` folders, image folders, shards of parquet,
arrow or webdataset files (local or remote, map-style or streaming), and the built-in digits.
"""

import glob
import io
import logging
import os
import urllib.parse
from dataclasses import dataclass, field

import datasets
import numpy as np
from datasets.data_files import SPLIT_KEYWORDS
from PIL import Image

from .image_processing_msn import to_rgb
from .sources import looks_local

logger = logging.getLogger(__name__)

DIGITS_IMAGE_SIZE = 32
DIGITS_TEST_FRACTION = 0.2
DEFAULT_TEST_SIZE = 0.2
EVAL_SPLITS = ("validation", "test")
IMAGE_COLUMN_NAMES = ("image", "img", "images", "pixel_values", "picture", "jpg", "png", "jpeg", "webp")
LABEL_COLUMN_NAMES = ("label", "labels", "fine_label", "class", "target", "cls")
# `datasets` builders for shards, by file extension.
SHARD_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".tar": "webdataset"}
# The split a folder name stands for, as `datasets` reads split folders ("val" is "validation", "eval" "test", ...).
SPLIT_OF_FOLDER_NAME = {word: str(split) for split, words in SPLIT_KEYWORDS.items() for word in words}
# Which images a pretraining run trained on (see `data_record`), written next to its model.
DATA_RECORD_FILE = "msn_data.json"
# How the split of a stratified hold-out begins (see `hold_out`).
HELD_OUT = "held-out"


@dataclass
class DataArguments:
    """
    Where the images come from; shared by `msn-pretrain`, `msn-evaluate` and `examples/finetune_classification.py`.
    With no source given, the built-in scikit-learn digits (offline).
    """

    _argument_group_name = "data (none given: the built-in scikit-learn digits, offline)"

    dataset_name: str | None = field(
        default=None, metadata={"help": "A Hub dataset id, or a folder written by `Dataset.save_to_disk`."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the Hub dataset."})
    train_dir: str | None = field(default=None, metadata={"help": "A folder of images (the `imagefolder` layout)."})
    train_files: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Shards by glob, local or remote (hf://, s3://, ...): .parquet, .arrow, or .tar (webdataset: "
            "an image plus an optional cls/json label per key). Repeatable.",
            "action": "extend",
        },
    )
    test_dir: str | None = field(default=None, metadata={"help": "A folder of labelled evaluation images."})
    train_split: str = field(default="train", metadata={"help": "Split used for (pre)training."})
    eval_split: str | None = field(
        default=None,
        metadata={
            "help": "Labelled split for evaluation; default: 'validation', then 'test', whichever has labels. "
            "Without one, a stratified --test_size of the training images is held out (before pretraining).",
            "aliases": ["--test_split"],
        },
    )
    test_size: float = field(default=DEFAULT_TEST_SIZE, metadata={"help": "Held-out fraction without an eval split."})
    image_column_name: str | None = field(default=None, metadata={"help": "Detected from the features when omitted."})
    label_column_name: str | None = field(default=None, metadata={"help": "Detected from the features when omitted."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training data."})
    max_test_samples: int | None = field(default=None, metadata={"help": "Truncate the evaluation data."})
    streaming: bool = field(
        default=False, metadata={"help": "Iterate over the data without downloading it first (needs a step count)."}
    )
    shuffle_buffer_size: int = field(
        default=0,
        metadata={
            "help": "Streaming: rows mixed in a shuffle buffer. 0 (default): none; rows come shard by shard, in the "
            "order of the data (recent `datasets` reorder the shards every pass after the first), and a resumed run "
            "continues exactly. N > 0: rows mixed N at a time, but a resume loses the rows that sat in the buffer "
            "at the checkpoint (up to N per process). Use N when the shards are sorted (e.g. by class)."
        },
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Cache folder of Hub datasets."})

    def __post_init__(self):
        sources = [name for name in ("dataset_name", "train_dir", "train_files") if getattr(self, name)]
        if len(sources) > 1:
            raise ValueError(f"Give one data source, got {', '.join('--' + name for name in sources)}.")
        if self.shuffle_buffer_size < 0:
            raise ValueError(f"--shuffle_buffer_size must be >= 0, got {self.shuffle_buffer_size}.")
        if not 0 < self.test_size < 1:
            raise ValueError(f"--test_size must be in (0, 1), got {self.test_size}.")
        check_dataset_name(self.dataset_name)

    @property
    def uses_builtin_data(self) -> bool:
        return not (self.dataset_name or self.train_dir or self.train_files)

    @property
    def hub_dataset_id(self) -> str | None:
        """The Hub id of the data (`--dataset_name` that is not a local folder), for a card's metadata; else None."""
        return self.dataset_name if self.dataset_name and not os.path.isdir(self.dataset_name) else None

    @property
    def eval_hub_dataset_id(self) -> str | None:
        """The Hub id of the labelled evaluation data: None for `--test_dir` images, else `hub_dataset_id`."""
        return None if self.test_dir else self.hub_dataset_id

    @property
    def source_name(self) -> str:
        """How the data is named on a model card."""
        if self.train_files:
            return ", ".join(map(without_credentials, self.train_files))
        return self.dataset_name or self.train_dir or "scikit-learn digits (built in)"


def check_dataset_name(value: str | None) -> None:
    """
    Raise a `ValueError` naming `--dataset_name` when `value` can only be a local path (see [`looks_local`]) and is
    no folder here: `datasets` would look it up on the Hub and fail with a connection error that names no flag.
    """
    if value is None or os.path.isdir(value) or not looks_local(value):
        return
    expected = "a folder written by `Dataset.save_to_disk` or a Hub dataset id ('name' or 'namespace/name')"
    if os.path.exists(value):
        raise ValueError(f"--dataset_name {value!r} is a file; expected {expected}.")
    raise ValueError(
        f"--dataset_name {value!r} is not a Hub id, so it was read as a local folder, but there is no folder at "
        f"{os.path.abspath(value)}; expected {expected}."
    )


@dataclass
class ImageDataset:
    """
    A dataset with the name of its image column and, when it has one, of its label column. `split` names its rows
    within their source, as a model card states it: a split (`"test"`), rows drawn from it (`"64 random rows of
    train"`), a hold-out (`"held-out 20 % of train (seed 0)"`) or a folder (`"test_dir ./images/test"`); None when
    unknown.
    """

    dataset: datasets.Dataset | datasets.IterableDataset
    image_column: str
    label_column: str | None = None
    split: str | None = None

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


def find_column(
    features: datasets.Features, explicit: str | None, feature_type: type, names: tuple, what: str,
    names_first: bool = False,
) -> str | None:
    """
    The `what` column: `explicit` (which must exist), else a column of `feature_type` with one of the usual `names`,
    else the first column of `feature_type` or the first of `names`, whichever `names_first` says. Labels go by
    name first: a data set may carry metadata as a `ClassLabel` before its `label` column (a "source" column, or
    CIFAR-100's `coarse_label`, for which `fine_label` is among the names).
    """
    if explicit is not None:
        if explicit not in features:
            raise ValueError(f"`{what}_column_name` {explicit!r} is not a column; columns: {list(features)}.")
        return explicit
    typed = [name for name, feature in features.items() if isinstance(feature, feature_type)]
    named = [name for name in names if name in features]
    both = [name for name in named if name in typed]
    return next(iter(both + (named + typed if names_first else typed + named)), None)


def _is_image_like(feature, strings: bool = False) -> bool:
    """Whether a column can be read as images: an Image feature, bytes, a `{"bytes", "path"}` struct, or (`strings`)
    file paths, which is what `datasets.Image` casts from."""
    if isinstance(feature, datasets.Image):
        return True
    if isinstance(feature, dict):
        return bool({"bytes", "path"} & set(feature))
    dtypes = ("binary", "large_binary") + (("string", "large_string") if strings else ())
    return isinstance(feature, datasets.Value) and feature.dtype in dtypes


def _is_string(feature) -> bool:
    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def check_image_column(features: datasets.Features, image_column: str, explicit: bool = True) -> None:
    """
    Raise a one-line ValueError, naming the column, its type and the image columns there are, when `image_column`
    cannot hold images (e.g. `--image_column_name label` on an integer column); `datasets` would raise a pyarrow
    error on first use instead.
    """
    feature = features[image_column]
    if _is_image_like(feature, strings=True):
        return
    others = [name for name, other in features.items() if name != image_column and _is_image_like(other)]
    what = f"--image_column_name {image_column!r}" if explicit else f"The detected image column {image_column!r}"
    raise ValueError(
        f"{what} must hold images (an Image feature, bytes, {{bytes, path}} records or file paths), got "
        f"{feature}; image columns: {others}."
    )


def class_names(values: list) -> list[str]:
    """The class names of the unique values of a column of names, sorted as `ClassLabel` / `class_encode_column`
    order them; None and "" mark an image without a label (see [`_names_a_class`])."""
    return sorted(name for name in values if _names_a_class(name))


def resolve_shards(patterns: list[str]) -> tuple[str, list[str]]:
    """
    The `datasets` builder and the files of `--train_files` globs. Local globs must match files; remote ones
    (`hf://`, `s3://`, ...) are passed on to `datasets`, which resolves them. All shards must share one extension.
    """
    files = []
    for pattern in patterns:
        if "://" in pattern:
            files.append(pattern)
            continue
        matched = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matched:
            raise ValueError(f"--train_files {pattern!r} matches no file.")
        files.extend(matched)
    # A URL's extension is its path's: a signed URL ends in its query.
    extensions = {os.path.splitext(urllib.parse.urlsplit(path).path)[1].lower() for path in files}
    unknown = extensions - set(SHARD_BUILDERS)
    if unknown:
        raise ValueError(
            f"--train_files must be shards with an extension among {sorted(SHARD_BUILDERS)}, got {sorted(unknown)}."
        )
    if len(extensions) > 1:
        raise ValueError(f"--train_files must all have one extension, got {sorted(extensions)}.")
    return SHARD_BUILDERS[extensions.pop()], files


def without_credentials(path: str) -> str:
    """
    A `--train_files` entry as a card, a record or a tracker may show it: in a URL, the user part before `@` (a
    password or token) and the values of the query (signatures, tokens) become `***`. A local path is returned as is.
    """
    if "://" not in path:
        return path
    parts = urllib.parse.urlsplit(path)
    netloc = f"***@{parts.netloc.rsplit('@', 1)[1]}" if "@" in parts.netloc else parts.netloc
    query = "&".join(f"{key}=***" for key, _ in urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def split_folders(folder: str) -> dict[str, str] | None:
    """
    `{sub-folder path: split}` of a folder of split folders, the splits `datasets` reads from their names (`train/`
    and `training/` are "train", `val/` and `dev/` "validation", `eval/` and `testing/` "test":
    `datasets.data_files.SPLIT_KEYWORDS`); None for a folder of class folders, one train split, which is any folder
    with a sub-folder not named like a split. A class may be named like a split: PASCAL VOC and COCO have a "train"
    class, which `datasets` alone would read as the folder's only split.
    """
    subfolders = [entry for entry in os.scandir(folder) if entry.is_dir()]
    if not subfolders or any(entry.name.lower() not in SPLIT_OF_FOLDER_NAME for entry in subfolders):
        return None
    return {entry.path: SPLIT_OF_FOLDER_NAME[entry.name.lower()] for entry in subfolders}


def nested_class_folders(roots: list[str]) -> bool:
    """Whether a class folder of one of the folders `roots` holds folders of its own (`cat/indoor/`). `imagefolder`
    would name the class of each image by the folder right above it ("indoor"), and give no labels at all when images
    lie at different depths; torchvision's `ImageFolder` names it by the class folder, as [`label_by_top_folder`]."""
    for root in roots:
        for entry in os.scandir(root):
            if entry.is_dir() and not entry.name.startswith("."):
                if any(child.is_dir() and not child.name.startswith(".") for child in os.scandir(entry.path)):
                    return True
    return False


def label_by_top_folder(dataset: datasets.Dataset | datasets.IterableDataset, roots: list[str]):
    """
    `dataset` of an image folder with a `label` column of class names: the folder under one of `roots` that holds each
    image, however deep (None for an image in a root itself). The `image` column is read undecoded for its path only.
    """
    roots = [os.path.realpath(root) for root in roots]

    def class_folder(path: str) -> str | None:
        path = os.path.realpath(path)
        for root in roots:
            if os.path.commonpath([root, path]) == root:
                parts = os.path.relpath(path, root).split(os.sep)
                return parts[0] if len(parts) > 1 else None
        return None

    paths = dataset.cast_column("image", datasets.Image(decode=False))
    labelled = paths.map(
        lambda images: {"label": [class_folder(image["path"]) for image in images]},
        input_columns="image", batched=True, features=datasets.Features(paths.features, label=datasets.Value("string")),
    )  # fmt: skip
    return labelled.cast_column("image", datasets.Image())


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
    train_files: list[str] | None = None,
) -> ImageDataset:
    """
    Load images from a Hub id or a `Dataset.save_to_disk` folder (`dataset_name`), an image folder (`train_dir`),
    shards (`train_files` globs, see [`resolve_shards`]) or, with none, the built-in digits. Image and label
    columns are detected from the features when not given; an image column that cannot hold images is a ValueError
    (see [`check_image_column`]), and a label column of class names becomes a `ClassLabel` (see [`class_names`]).
    """
    if sum(map(bool, (dataset_name, train_dir, train_files))) > 1:
        raise ValueError("Give one of `dataset_name`, `train_dir` and `train_files`, not several.")
    if train_files:
        if split != "train":
            raise ValueError(f"`train_files` hold the 'train' split only, got `split` {split!r}.")
        builder, files = resolve_shards(train_files)
        dataset = datasets.load_dataset(
            builder, data_files={"train": files}, split="train", streaming=streaming, cache_dir=cache_dir
        )
    elif train_dir is not None:
        if not os.path.exists(train_dir):
            raise ValueError(f"--train_dir {train_dir!r} does not exist (looked at {os.path.abspath(train_dir)}).")
        if not os.path.isdir(train_dir):
            raise ValueError(f"--train_dir must be a folder of images, got the file {train_dir!r}.")
        folders = split_folders(train_dir)
        splits = sorted(set(folders.values())) if folders else ["train"]
        if any(name not in splits for name, _ in _split_parts(split)):
            raise ValueError(
                f"`split` {split!r} is not a split of the folder {train_dir!r}: its splits are {splits} (a folder of "
                "class folders is one train split; sub-folders named train/, validation/, test/ are splits)."
            )
        # Every file of a folder of class folders is the train split, whatever the class folders are named.
        data_files = None if folders else {"train": "**"}
        class_roots = list(folders) if folders else [train_dir]
        nested = nested_class_folders(class_roots)
        dataset = datasets.load_dataset(
            "imagefolder", data_dir=train_dir, data_files=data_files, split=split, streaming=streaming,
            drop_labels=True if nested else None,
        )  # fmt: skip
        if nested:
            dataset = label_by_top_folder(dataset, class_roots)
    elif dataset_name is not None and os.path.isdir(dataset_name):
        dataset = datasets.load_from_disk(dataset_name)
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise ValueError(f"`split` {split!r} is not in {dataset_name!r}; splits: {list(dataset)}.")
            dataset = dataset[split]
        if streaming:
            dataset = dataset.to_iterable_dataset()
    elif dataset_name is not None:
        check_dataset_name(dataset_name)
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
    image_column = find_column(features, image_column_name, datasets.Image, IMAGE_COLUMN_NAMES, "image")
    if image_column is None:
        raise ValueError(f"No image column found; pass `image_column_name`. Columns: {list(features)}.")
    check_image_column(features, image_column, explicit=image_column_name is not None)
    label_column = find_column(features, label_column_name, datasets.ClassLabel, LABEL_COLUMN_NAMES, "label",
                               names_first=True)  # fmt: skip
    if len(features) > 2 and (image_column_name is None or label_column_name is None):  # a choice was made
        logger.info(f"Columns: images from {image_column!r}, labels from {label_column!r} (of {list(features)}).")
    # A column of class names (e.g. read from a CSV) becomes a ClassLabel, so that everything downstream sees ids and
    # names. The names come from the whole split, before truncation, so that a truncated run numbers classes as a
    # full one does; and only the kept rows are rewritten. A stream cannot be listed without a pass: it keeps names.
    if label_column is not None and _is_string(features[label_column]) and not streaming:
        values = dataset.unique(label_column)
        if "" in values:  # no class of that name: no label, as None is
            dataset = dataset.map(lambda labels: {label_column: [label or None for label in labels]},
                                  input_columns=label_column, batched=True)  # fmt: skip
        dataset = dataset.cast_column(label_column, datasets.ClassLabel(names=class_names(values)))
    return keep_rows(ImageDataset(dataset, image_column, label_column, split), max_samples)


# Fixed, not the run's seed: `msn-pretrain` and `msn-evaluate` given the same flags must read the same images.
ROWS_SEED = 0


def keep_rows(data: ImageDataset, count: int | None) -> ImageDataset:
    """
    `data` cut to `count` rows (`--max_train_samples`, `--max_test_samples`), named so (see [`split_name`]): rows
    drawn at random over the whole split with a fixed seed, in their order, since the first rows of an image folder
    are its first classes; a stream's first rows, since it has no length to draw from.
    """
    dataset = data.dataset
    streaming = isinstance(dataset, datasets.IterableDataset)
    if count is None or (not streaming and count >= len(dataset)):
        return data
    if streaming:
        dataset = dataset.take(count)
    else:
        dataset = dataset.select(np.sort(np.random.default_rng(ROWS_SEED).choice(len(dataset), count, replace=False)))
    return ImageDataset(dataset, data.image_column, data.label_column, split_name(data.split, count, streaming))


def split_name(split: str, count: int | None = None, streaming: bool = False) -> str:
    """How `split` cut to `count` rows by [`keep_rows`] is named: `"64 random rows of train"`, or for a stream
    `"train[:64]"` (datasets' slice syntax for its first rows)."""
    if count is None:
        return split
    return f"{split}[:{count}]" if streaming else f"{count} random rows of {split}"


def decode_image(value) -> Image.Image | None:
    """
    An upright RGB PIL image (see [`to_rgb`]) from a decoded image or an undecoded `{"bytes", "path"}` record; `None`
    when the image cannot be read (corrupt or missing file, or a decompression bomb), so that callers can skip it
    instead of crashing mid-epoch.
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
        return to_rgb(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        logger.debug("Unreadable image skipped: %s", error)
        return None


def _names_a_class(label) -> bool:
    """Whether one label value names a class: an id >= 0 or a non-empty name (< 0, None and "" mark no label)."""
    if isinstance(label, (int, float, np.number)):
        return bool(label >= 0)
    return label not in (None, "")


def _is_labelled(labels) -> np.ndarray:
    """Which of `labels` name a class (see `_names_a_class`), as a boolean array."""
    labels = np.asarray(labels)
    if labels.dtype.kind in "iuf":  # ids, as a ClassLabel column holds them: no loop over a large split
        return labels >= 0
    return np.fromiter(map(_names_a_class, labels.tolist()), dtype=bool, count=len(labels))


def separate_unlabelled(data: ImageDataset) -> tuple[ImageDataset, ImageDataset]:
    """
    `(labelled, unlabelled)` rows of the map-style `data`, in their order and under its split name. A label < 0
    marks an image without one (a semi-supervised set's extra images, ImageNet's test split): evaluation leaves it
    out, so that no classifier takes "-1" for one more class. How many are left out is logged.
    """
    labelled = _is_labelled(data.dataset[data.label_column])
    if not labelled.all():
        logger.info(
            f"{int((~labelled).sum())} of the {len(labelled)} images of {data.split or 'the data'!r} have no label "
            "(label < 0): left out of the evaluation."
        )

    def rows(mask: np.ndarray) -> ImageDataset:
        if mask.all():  # as it is: a `select` of every row would add an index mapping that every read goes through
            return data
        return ImageDataset(data.dataset.select(np.flatnonzero(mask)), data.image_column, data.label_column, data.split)

    return rows(labelled), rows(~labelled)


def labelled_rows(data: ImageDataset, role: str) -> ImageDataset:
    """The labelled rows of `data`, the `role` ("training", "test") set of an evaluation; none is a ValueError."""
    if data.label_column is None:
        return data  # `extract_features` names the missing column
    if isinstance(data.dataset, datasets.IterableDataset):
        # A stream has no count without a pass: its unlabelled rows are dropped as they come.
        rows = data.dataset.filter(lambda labels: _is_labelled(labels).tolist(), input_columns=data.label_column,
                                   batched=True)  # fmt: skip
        return ImageDataset(rows, data.image_column, data.label_column, data.split)
    labelled, _ = separate_unlabelled(data)
    if not len(labelled.dataset):
        raise ValueError(
            f"The {role} split {data.split!r} must hold labelled images for evaluation (labels >= 0), got "
            f"{len(data.dataset)} images, none labelled."
        )
    return labelled


def test_images_folder(test_dir: str) -> str:
    """
    The folder that holds the test images of `--test_dir`: the folder itself when it is a folder of class folders;
    its test split's folder, else its validation split's, when it is a folder of split folders (see
    [`split_folders`]). A folder of split folders with neither is a ValueError: its train split is no test set.
    """
    folders = split_folders(test_dir)
    if not folders:
        return test_dir
    by_split = {split: path for path, split in sorted(folders.items(), reverse=True)}
    for split in ("test", "validation"):
        if split in by_split:
            return by_split[split]
    raise ValueError(
        f"--test_dir {test_dir!r} holds split folders {sorted(by_split)} and no test/ or validation/ one to test on; "
        "give the folder of the test images."
    )


def load_test_dir(test_dir: str, train_dir: str | None = None, train_split: str = "train") -> ImageDataset:
    """
    The image folder `test_dir` (see [`test_images_folder`]) as a labelled test set, its labelled rows named
    `"test_dir <folder>"`. The labels are the names of its class folders, which `imagefolder` reads from two classes
    on (it drops them for one): a folder that gives none is a ValueError here, when the data are loaded, rather than
    when the evaluation needs them (at the end of a pretraining run). So is a folder that is, holds or lies in the
    training images of the image folder `train_dir` (its `train_split`): the classifiers would be scored on the
    images they were fitted on.
    """
    if not os.path.isdir(test_dir):
        raise ValueError(f"--test_dir must be a folder of class folders, got {test_dir!r}, which is not a folder.")
    folder = test_images_folder(test_dir)
    if train_dir is not None and folder_holds_images_of(folder, train_dir, train_split):
        raise ValueError(
            f"--test_dir {test_dir!r} must hold other images than the training images of --train_dir {train_dir!r}, "
            "got a folder that is, holds or lies in theirs: the classifiers would be scored on the images they are "
            "fitted on."
        )
    test = load_image_dataset(train_dir=folder)
    test.split = f"test_dir {folder}"
    if test.label_column is None:
        folders = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
        shown = f"{folders[:5]}{' ...' if len(folders) > 5 else ''}"
        raise ValueError(
            f"--test_dir must hold one folder per class with at least 2 classes, got {len(folders)} {shown} in "
            f"{folder!r}, from which no label could be read (the labels are the names of the folders that hold "
            "the images)."
        )
    return labelled_rows(test, "test")


def has_labels(data: ImageDataset) -> bool:
    """Whether a split has real labels: a label column and, when it can be read without streaming, no label < 0
    (ImageNet's test split, for one, labels every image -1)."""
    if data.label_column is None:
        return False
    if isinstance(data.dataset, datasets.IterableDataset):
        return True
    labelled = _is_labelled(data.dataset[data.label_column])
    return labelled.size > 0 and bool(labelled.all())


def match_labels(train: ImageDataset, test: ImageDataset) -> ImageDataset:
    """
    `test` with its class ids renumbered to those of `train`, matched by class name. A set loaded on its own numbers
    the classes it holds: an image folder of [cat, fox] gives fox the id 1, which a training folder of [cat, dog, fox]
    gives dog. Labels < 0 (no label) are kept. Training labels without names are matched by number to test classes
    named by numbers (folders `0/ 1/ ... 10/`, which the folder numbers "0", "1", "10", ...); other test class names
    are then a ValueError. `test` is returned as it is when both have the same class names, or when the test labels
    have none (integer labels are then taken to share their ids). A test class that is not a training class is a
    ValueError naming it.
    """
    train_names, test_names = train.label_names, test.label_names
    if test_names is None or train.label_column is None or train_names == test_names:
        return test
    if train_names is None:
        if not all(name.isdecimal() for name in test_names):
            raise ValueError(
                f"The test set's classes are named {test_names}, but the training labels are integers without names: "
                "name the test classes by the training labels (folders 0/, 1/, ...) or give the training classes names."
            )
        new_ids, names = np.array([int(name) for name in test_names], dtype=np.int64), None
    else:
        unknown = [name for name in test_names if name not in train_names]
        if unknown:
            raise ValueError(
                f"The test set's classes must be training classes (labels are matched by name), got {unknown} "
                f"outside the training classes {train_names}."
            )
        index = {name: i for i, name in enumerate(train_names)}
        new_ids, names = np.array([index[name] for name in test_names], dtype=np.int64), train_names
    column = test.label_column
    features = test.dataset.features.copy()
    features[column] = datasets.ClassLabel(names=names) if names else datasets.Value("int64")

    def renumber(labels: list) -> dict:
        labels = np.asarray(labels, dtype=np.int64)
        return {column: np.where(labels >= 0, new_ids[np.clip(labels, 0, None)], labels).tolist()}

    dataset = test.dataset.map(renumber, input_columns=column, batched=True, features=features)
    return ImageDataset(dataset, test.image_column, column, test.split)


def splits_overlap(split: str, other: str) -> bool:
    """
    Whether two split expressions of `datasets` may share rows: the same expression, `"all"` on either side, or a
    split named on both sides and whole on one (`"train+test"` and `"test"`; `"train[:80%]"` and `"train[80%:]"`
    are taken to be apart).
    """
    if split == other:
        return True
    parts, other_parts = _split_parts(split), _split_parts(other)
    if "all" in {name for name, _ in parts + other_parts}:
        return True
    return any(name == other_name and not (sliced and other_sliced)
               for name, sliced in parts for other_name, other_sliced in other_parts)  # fmt: skip


def _split_parts(split: str) -> list[tuple[str, bool]]:
    """`(name, sliced)` of each split of a `+` expression: `"train[:10%]+test"` -> `[("train", True), ("test", False)]`.
    """
    return [(part.split("[")[0].strip(), "[" in part) for part in split.split("+")]


def load_labelled_split(
    dataset_name: str | None, dataset_config_name: str | None, split: str | None, train_split: str, **kwargs
) -> ImageDataset | None:
    """
    The labelled evaluation split of a Hub dataset, a `save_to_disk` folder, an image folder of split folders, shards
    (`kwargs` `train_dir`, `train_files`, as for [`load_image_dataset`]) or the built-in digits: `split`, or else
    the first of 'validation' and 'test' that exists with real labels (see [`has_labels`]) and is apart from the
    training split `train_split` (see [`splits_overlap`]). `None` when there is none; a `split` asked for that does
    not exist, has no labels or overlaps the training split is a ValueError (`--eval_split`), not a fallback.
    """

    def missing(got: str) -> None:
        if split:
            given = dataset_name or kwargs.get("train_dir") or kwargs.get("train_files")
            source = repr(given) if given else "the built-in digits"
            raise ValueError(f"--eval_split {split!r} must be a split of {source} with labels, got {got}.")

    if split and splits_overlap(split, train_split):
        raise ValueError(
            f"--eval_split {split!r} must not be (or share images with) the training split, got --train_split "
            f"{train_split!r}: the classifiers would be scored on the images they were trained on."
        )
    for name in [split] if split else [name for name in EVAL_SPLITS if not splits_overlap(name, train_split)]:
        if dataset_name is not None and os.path.isdir(dataset_name):
            saved = datasets.load_from_disk(dataset_name)  # memory-mapped: cheap to open twice
            if not isinstance(saved, datasets.DatasetDict) or name not in saved:
                splits = list(saved) if isinstance(saved, datasets.DatasetDict) else "none, one dataset"
                missing(f"no such split (splits: {splits})")
                continue
        try:
            data = load_image_dataset(dataset_name, dataset_config_name, split=name, **kwargs)
        except (ValueError, KeyError) as error:
            missing(f"one that could not be loaded ({error})")
            logger.debug("No split %r: %s", name, error)
            continue
        if has_labels(data):
            return data
        missing("one without labels (or with labels < 0)")
        logger.info("Split %r has no labels (or labels < 0): not used for evaluation.", name)
    return None


def hold_out(data: ImageDataset, test_size: float = DEFAULT_TEST_SIZE, seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
    """
    A stratified (train, held-out) split of a labelled map-style dataset that has no evaluation split; the held-out
    part's `split` names the fraction, the split it came from and the seed, which determine its images.
    """
    if not 0 < test_size < 1:
        raise ValueError(f"`test_size` must be in (0, 1), got {test_size!r}.")
    dataset = data.dataset
    if not hasattr(dataset, "train_test_split"):
        raise ValueError("Holding out a test part needs a map-style dataset, got a streaming one; give a test split.")
    if data.num_labels is None:
        # Stratification needs a ClassLabel column.
        dataset = dataset.class_encode_column(data.label_column)
    splits = dataset.train_test_split(test_size=test_size, stratify_by_column=data.label_column, seed=seed)
    source = data.split or "the images"
    held_out = f"{HELD_OUT} {test_size * 100:g} % of {source} (seed {seed})"
    return (
        ImageDataset(splits["train"], data.image_column, data.label_column, f"{source} less the {held_out}"),
        ImageDataset(splits["test"], data.image_column, data.label_column, held_out),
    )


# --- which images a model was pretrained on ------------------------------------------------------------------------


def data_source(data_args: DataArguments) -> dict:
    """
    The flags that name a data source and its training split, local paths made absolute, so that two command lines
    (`msn-pretrain`'s and `msn-evaluate`'s, from different folders) compare equal when they read the same images.
    """

    def absolute(path: str | None) -> str | None:
        return os.path.abspath(path) if path and "://" not in path and os.path.exists(path) else path

    return dict(
        dataset_name=absolute(data_args.dataset_name),
        dataset_config_name=data_args.dataset_config_name,
        train_dir=absolute(data_args.train_dir),
        train_files=sorted(without_credentials(p) if "://" in p else os.path.abspath(p) for p in data_args.train_files),
        train_split=data_args.train_split,
    )


def data_record(data_args: DataArguments, test: ImageDataset | None) -> dict:
    """
    What a pretraining run trained on, for its `DATA_RECORD_FILE`: the data source (`data_source`), the rows of the
    training split it read (`split`, e.g. `"train[:64]"`), the part of them it held out for its evaluation
    (`held_out`, None when it trained on all of them) and its evaluation split (`eval_split`, `test`'s; None
    without evaluation).
    """
    held_out = test.split if test is not None and (test.split or "").startswith(HELD_OUT) else None
    return dict(
        source=data_source(data_args),
        split=split_name(data_args.train_split, data_args.max_train_samples, data_args.streaming),
        streaming=data_args.streaming,
        held_out=held_out,
        eval_split=test.split if test is not None else None,
    )


def seen_in_pretraining(record: dict | None, data_args: DataArguments, test: ImageDataset) -> str | None:
    """
    Why the test images `test` (loaded from the flags `data_args`) include images that the run of `record` (its
    `data_record`) pretrained on, in words; None when the flags give images it did not pretrain on: another data
    source, a split apart from the one it pretrained on (see [`splits_overlap`]), another folder, or the very
    hold-out the run made.
    """
    if record is None:
        return None
    trained_on = record["split"] + (f" less the {record['held_out']}" if record["held_out"] else "")
    if data_args.test_dir is not None:  # whatever the training images of the evaluation are
        if folder_holds_images_of(test_images_folder(data_args.test_dir), record["source"]["train_dir"]):
            return f"--test_dir holds images of the folder it pretrained on ({trained_on})"
        return None
    source, pretrained_source = data_source(data_args), dict(record["source"])
    pretrained_split = pretrained_source.pop("train_split")
    same_source = {**source, "train_split": None} == {**pretrained_source, "train_split": None}
    if not same_source or test.split == record["held_out"]:
        return None
    # A hold-out other than the run's own is drawn from the evaluation's training split; a split is its own.
    tested = data_args.train_split if (test.split or "").startswith(HELD_OUT) else test.split
    if tested and splits_overlap(tested, pretrained_split):
        return f"the test images ({test.split}) overlap the images it pretrained on ({trained_on})"
    return None


def folder_holds_images_of(folder: str, train_dir: str | None, split: str = "train") -> bool:
    """Whether `folder` is, holds or lies in the `split` images of the image folder `train_dir`: the folder, or its
    `split` folders when it is a folder of split folders (see [`split_folders`])."""
    if not train_dir:
        return False
    folder, train_dir = os.path.realpath(folder), os.path.realpath(train_dir)
    splits = split_folders(train_dir) if os.path.isdir(train_dir) else None
    names = {name for name, _ in _split_parts(split)}
    image_folders = [path for path, name in splits.items() if name in names] if splits else [train_dir]
    return any(os.path.commonpath([image_folder, folder]) in (image_folder, folder) for image_folder in image_folders)
