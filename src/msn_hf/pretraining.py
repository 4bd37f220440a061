"""
MSN pretraining with Accelerate: one process or many, CPU or GPU, map-style or streaming data, resumable, with the
original schedules.

`examples/pretrain_msn.py` and the `msn-pretrain` console script run `main()`. This module holds the command line
(`PretrainingArguments`, `parse_args`), the choice of model and views, and the loop, which reads as the `no_trainer`
examples of Transformers: `setup_run`, `build_train_data`, `prepare_output_dir`, `resume`, then `training_step`,
`log_step` and `save_checkpoint` per step (a stop at a checkpoint on Ctrl-C or SIGTERM), and `finish` (export
first, evaluation after). The recipe it shares with `MSNTrainer`
lives in `training.py`, the checkpoint store in `checkpointing.py`, the run's outputs in `run_outputs.py`.
"""

import copy
import dataclasses
import itertools
import json
import logging
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import datasets
import timm
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, broadcast_object_list, send_to_device, set_seed
from datasets.distributed import split_dataset_by_node
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader
from tqdm.auto import tqdm
from transformers import AutoConfig, HfArgumentParser

from .budget import (
    GROWTH_MARGIN,
    MAX_GROWTH,
    MIN_PLANNED_STEPS,
    BudgetKeeper,
    BudgetPlan,
    describe_geometry,
    estimate_line,
    format_duration,
    geometry_key,
    parse_duration,
    plan_steps,
    recipe_cost,
    saved_plan,
    time_steps,
)
from .checkpointing import (
    StopSignals,
    TrainingInterrupted,
    TrainingState,
    checkpoint_step,
    find_latest_checkpoint,
    resume,
    save_checkpoint,
    stop_at_checkpoint,
)
from .configuration_msn import MSNConfig
from .convert import classifier_folder_error, model_folder_kind, msn_model_from_vit
from .data import (
    DATA_RECORD_FILE,
    DataArguments,
    ImageDataset,
    data_record,
    decode_image,
    hold_out,
    keep_rows,
    load_image_dataset,
    load_labelled_split,
    load_test_dir,
    match_labels,
    separate_unlabelled,
    without_credentials,
)
from .files import folder_relation, write_text_atomically
from .image_processing_msn import MSNImageProcessor
from .modelcard import headline, write_model_card
from .modeling_msn import MSNModel
from .recipe import (
    CONTINUE_TRAINING,
    IMAGENET_TRAINING,
    RECIPE_FILE,
    WARMUP_SHARE,
    auto_recipe,
    backbone_geometry,
    config_fields,
    continue_recipe,
    describe_images,
    fit_views,
    imagenet_recipe,
    load_recipe,
    parse_overrides,
    save_recipe,
)
from .run_outputs import (
    METRICS_FILE,
    UploadError,
    card_run_info,
    check_hub_access,
    export_final,
    finished_step,
    plot_loss_curve,
    push_to_hub,
    read_metrics,
    remove_run_files,
    run_files,
    write_train_results,
)
from .sources import check_model_source, looks_local
from .training import (
    IndexedDataset,
    MSNSchedules,
    MSNViewsCollator,
    SkippedBatches,
    adamw,
    apply_schedules,
    average_window_gradients,
    batch_decisions,
    check_recipe_arguments,
    clipped_parameters,
    kept_image_bytes,
    seed_batch,
    window_decision,
)

logger = get_logger(__name__)

RECIPE_SAMPLE_SIZE = 32
# Arguments that never reach a tracker, a log, a file or a checkpoint.
SECRET_ARGUMENTS = ("hub_token",)
# The flags that set a run's length: one typed replaces all those of a `--recipe_file`.
RUN_LENGTHS = {"num_train_epochs", "max_train_steps", "max_train_time"}

# The built-in digits (1,437 training images of 32 px, grey, upscaled from 8 x 8) train for 70 epochs of 64 images
# (1,540 steps, benchmarks/RESULTS.md); the auto rule picks their model and views from that run length.
DIGITS_TRAINING_DEFAULTS = dict(num_train_epochs=70, per_device_train_batch_size=64)
# The learning rates of a run from scratch (the paper's); the continue recipe starts lower (`CONTINUE_TRAINING`).
FROM_SCRATCH_TRAINING = dict(learning_rate=1e-3, warmup_start_learning_rate=2e-4)
# The recipe of `build_model_and_processor` without one: MSNConfig's and MSNImageProcessor's defaults.
NO_RECIPE = dict(name="none", backbone=None, backbone_kwargs={}, config={}, processor={}, training={})
# The optimisation settings a recipe file carries (its `training` section) and a run writes into its own.
RECIPE_TRAINING_FIELDS = (
    "learning_rate", "warmup_start_learning_rate", "final_learning_rate", "weight_decay", "final_weight_decay",
    "schedule_stretch", "max_grad_norm", "num_train_epochs", "max_train_steps", "per_device_train_batch_size",
    "gradient_accumulation_steps", "num_warmup_steps", "num_warmup_epochs", "seed", "max_train_time",
)  # fmt: skip


@dataclass
class PretrainingArguments:
    """The model, the optimisation (defaults: the original ViT-S/16 recipe) and the outputs of an MSN run."""

    _argument_group_name = "model, optimisation and outputs"

    # model
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Weights to continue pretraining from (folder or Hub id): an msn_hf MSNModel (everything, heads "
            "and prototypes included), or a Transformers ViTModel / ViTMSNModel, imported as both encoders with a "
            "new projection head and prototypes. Default recipe: 'continue'."
        },
    )
    backbone: str | None = field(
        default=None, metadata={"help": "timm ViT name (default: vit_small_patch16_224, or a small ViT for digits)."}
    )
    backbone_kwargs: str | None = field(
        default=None, metadata={"help": 'JSON arguments of timm.create_model, e.g. \'{"img_size": 32, "patch_size": 4}\'.'}
    )
    config_overrides: str | None = field(
        default=None, metadata={"help": "Comma-separated MSNConfig fields, e.g. mask_ratio=0.3,temperature=0.1."}
    )
    recipe: Literal["auto", "imagenet", "continue"] | None = field(
        default=None,
        metadata={
            "help": "Built-in recipe of model, views and warmup: 'auto' (from the data and the run; the default "
            "without --backbone, weights or --recipe_file), 'imagenet' (the ViT-S/16 release) or 'continue' (the "
            "default with --model_name_or_path or --backbone_pretrained: the weights' patch and resolution, the "
            "auto rule's views, a quarter of the learning rate, a 2 %% warmup, EMA from 0.999)."
        },
    )
    recipe_file: str | None = field(
        default=None,
        metadata={"help": "JSON or YAML recipe (backbone, config, processor, training), e.g. a run's msn_recipe.json."},
    )
    processor_overrides: str | None = field(
        default=None, metadata={"help": "Comma-separated MSNImageProcessor settings, e.g. blur_sigma=[0.1,1.0]."}
    )
    backbone_pretrained: str | None = field(
        default=None,
        metadata={"help": "timm weights to start from: a local file, or a Hub id (downloaded). Default recipe: 'continue'."},
    )
    num_anchor_views: int | None = field(default=None, metadata={"help": "Random anchor views per image."})
    num_focal_views: int | None = field(default=None, metadata={"help": "Focal anchor views per image."})
    # optimisation
    learning_rate: float | None = field(
        default=None, metadata={"help": "Peak learning rate after warmup; unset: 1e-3, or 2.5e-4 under the 'continue' recipe."}
    )
    warmup_start_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of the first step; unset: 2e-4, or 5e-5 under the 'continue' recipe."}
    )
    final_learning_rate: float = field(default=1e-6, metadata={"help": "End of the cosine learning-rate schedule."})
    weight_decay: float = field(default=0.04, metadata={"help": "Start of the cosine weight-decay schedule."})
    final_weight_decay: float = field(default=0.4, metadata={"help": "End of the cosine weight-decay schedule."})
    schedule_stretch: float = field(default=1.25, metadata={"help": "Schedules span stretch x the real steps."})
    max_grad_norm: float = field(default=3.0, metadata={"help": "Clipping of encoder and head gradients (0: none)."})
    num_train_epochs: int | None = field(default=None, metadata={"help": "Passes over map-style data."})
    max_train_steps: int | None = field(default=None, metadata={"help": "Optimiser steps; overrides the epochs."})
    max_train_time: str | None = field(
        default=None,
        metadata={
            "help": "Wall-clock budget of training from its first step (90s, 15m, 2h, 1d or seconds): a few steps are "
            "timed and the run is sized to fit (with the auto recipe, its model too); overrides the epochs."
        },
    )
    per_device_train_batch_size: int | None = field(default=None, metadata={"help": "Images per process and step."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimiser step."})
    num_warmup_steps: int | None = field(default=None, metadata={"help": "Overrides --num_warmup_epochs."})
    num_warmup_epochs: float | None = field(
        default=None,
        metadata={"help": "Warmup length; without epochs (streaming) the same fraction of --num_train_epochs."},
    )
    max_nonfinite_steps: int = field(default=5, metadata={"help": "Stop after this many bad steps in a row."})
    max_skipped_batches: int = field(
        default=100,
        metadata={"help": "Stop when this many batches in a row (or a whole epoch) have no readable image on a process."},
    )
    seed: int = field(default=42, metadata={"help": "Seed of the initialisation, the data order and the views."})
    mixed_precision: Literal["no", "fp16", "bf16"] | None = field(
        default=None, metadata={"help": "Default: the Accelerate config."}
    )
    dataloader_num_workers: int = field(
        default=0, metadata={"help": "Processes decoding images and drawing views; the views do not depend on it."}
    )
    views_on_device: bool = field(
        default=False,
        metadata={
            "help": "Workers only decode and resize to a square uint8 canvas (MSNImageProcessor.make_canvas); the views "
            "are drawn in the training process on its device, with the same per-batch seeds."
        },
    )
    # outputs
    output_dir: str = field(default="outputs/msn", metadata={"help": "Where the model, checkpoints and logs go."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start again in an --output_dir that holds a run: the files a run writes are removed first."},
    )
    checkpointing_steps: str | None = field(
        default=None, metadata={"help": "Save the training state every N steps, or 'epoch'."}
    )
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "A checkpoint folder, or 'latest' in --output_dir."}
    )
    checkpoints_total_limit: int | None = field(
        default=2, metadata={"help": "Complete checkpoints kept (the newest always is); 0 or none: all."}
    )
    logging_steps: int = field(default=10, metadata={"help": "Write metrics every N steps."})
    report_to: str = field(default="none", metadata={"help": "Accelerate trackers: tensorboard, wandb, all, none."})
    skip_evaluation: bool = field(default=False, metadata={"help": "No low-shot evaluation at the end."})
    max_eval_samples: int = field(
        default=50_000, metadata={"help": "Skip the final evaluation (logged) above this many labelled images."}
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the final folder to the Hub."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Repository of --push_to_hub."})
    hub_token: str | None = field(default=None, metadata={"help": "Token of --push_to_hub."})
    hub_private_repo: bool = field(default=False, metadata={"help": "Create the repository private."})

    def __post_init__(self):
        def fail(flag: str, expected: str, value) -> None:
            raise ValueError(f"--{flag} must be {expected}, got {value!r}.")

        for name in ("logging_steps", "gradient_accumulation_steps"):
            if getattr(self, name) <= 0:
                fail(name, "a positive number of steps", getattr(self, name))
        check_recipe_arguments(self)
        for name in ("max_train_steps", "per_device_train_batch_size", "num_train_epochs"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                fail(name, "a positive integer", getattr(self, name))
        for name in ("num_warmup_steps", "num_warmup_epochs", "num_anchor_views", "num_focal_views"):  # None: the recipe's
            if getattr(self, name) is not None and not getattr(self, name) >= 0:  # NaN too
                fail(name, ">= 0", getattr(self, name))
        parse_duration(self.max_train_time, "--max_train_time")
        if self.max_train_time is not None and self.max_train_steps is not None:
            fail("max_train_time", "given without --max_train_steps (one run length)", self.max_train_time)
        if self.checkpointing_steps is not None and self.checkpointing_steps != "epoch":
            if not self.checkpointing_steps.isdigit() or int(self.checkpointing_steps) <= 0:
                fail("checkpointing_steps", "a positive number of steps or 'epoch'", self.checkpointing_steps)
        if self.dataloader_num_workers < 0:
            fail("dataloader_num_workers", ">= 0", self.dataloader_num_workers)
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 0:
            fail("checkpoints_total_limit", ">= 0", self.checkpoints_total_limit)
        if self.push_to_hub and not self.hub_model_id:
            fail("hub_model_id", "a repository name with --push_to_hub", self.hub_model_id)
        if isinstance(self.backbone_kwargs, str):
            try:
                self.backbone_kwargs = json.loads(self.backbone_kwargs)
            except json.JSONDecodeError as error:
                fail("backbone_kwargs", f"a JSON object ({error})", self.backbone_kwargs)
        if self.backbone_kwargs is not None and not isinstance(self.backbone_kwargs, dict):
            fail("backbone_kwargs", "a JSON object", self.backbone_kwargs)
        if self.recipe is not None and self.recipe_file is not None:
            fail("recipe", "unset when --recipe_file is given", self.recipe)
        if self.model_name_or_path and (self.recipe not in (None, "continue") or self.recipe_file or self.backbone_pretrained):
            fail(
                "model_name_or_path",
                "given without --recipe auto/imagenet, --recipe_file or --backbone_pretrained (its weights are the model)",
                self.model_name_or_path,
            )
        if self.model_name_or_path and folder_relation(self.output_dir, self.model_name_or_path) == "is":
            fail("output_dir", "another folder than --model_name_or_path (the run writes its model over the weights "
                 "it starts from)", self.output_dir)  # fmt: skip
        for flag in ("backbone", "backbone_kwargs"):
            if self.model_name_or_path and getattr(self, flag):
                fail(flag, "unset with --model_name_or_path (the weights fix the backbone)", getattr(self, flag))
        weights = Path(self.backbone_pretrained or "").expanduser()
        if self.backbone_pretrained and looks_local(self.backbone_pretrained) and not weights.is_file():
            fail("backbone_pretrained", f"a weights file or a Hub id; nothing is at {weights.absolute()}",
                 self.backbone_pretrained)  # fmt: skip
        if self.recipe == "continue" and not (self.model_name_or_path or self.backbone_pretrained):
            fail("recipe", "'continue' only with weights to start from (--model_name_or_path or --backbone_pretrained)", self.recipe)
        # Unset learning rates are the recipe's: a quarter of the from-scratch ones when continuing from weights.
        for name, value in (CONTINUE_TRAINING if self.recipe_name == "continue" else FROM_SCRATCH_TRAINING).items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    @property
    def recipe_name(self) -> str | None:
        """
        The built-in recipe in force: `--recipe`; else none with `--recipe_file`; else 'continue' with weights to
        start from (`--model_name_or_path`, `--backbone_pretrained`); else none with `--backbone`; else 'auto'.
        """
        if self.recipe is not None:
            return self.recipe
        if self.recipe_file:
            return None
        if self.model_name_or_path or self.backbone_pretrained:
            return "continue"
        return None if self.backbone else "auto"


def parse_args(argv: list[str] | None = None) -> tuple[PretrainingArguments, DataArguments]:
    """The command line of `msn-pretrain`, with the defaults of the data filled in (digits or ImageNet recipe)."""
    # No abbreviated flags: a recipe file's values give way to the flags typed in full, which must be recognisable.
    parser = HfArgumentParser(
        (PretrainingArguments, DataArguments),
        allow_abbrev=False,
        description="Pretrain a Vision Transformer with Masked Siamese Networks.",
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    args, data_args = parser.parse_args_into_dataclasses(args=argv)
    # The flags typed, as `--learning_rate`, `--learning-rate` or `--learning-rate=...` (HfArgumentParser takes all).
    typed = {item[2:].split("=", 1)[0].replace("-", "_") for item in argv if item.startswith("--")}
    training = {}
    if args.recipe_file is not None:
        # The file's optimisation settings, below the flags given on the command line.
        given = set(typed)
        if given & RUN_LENGTHS:  # a run length typed replaces the file's, whichever flag each names it by
            given |= RUN_LENGTHS
        training = load_recipe(args.recipe_file)["training"]
        unknown = sorted(set(training) - set(RECIPE_TRAINING_FIELDS))
        if unknown:
            raise ValueError(
                f"--recipe_file {args.recipe_file!r}: `training` has unknown keys {unknown}; expected some of "
                f"{list(RECIPE_TRAINING_FIELDS)}."
            )
        for name, value in training.items():
            if name not in given:
                setattr(args, name, value)
        args.__post_init__()
    if data_args.streaming and args.max_train_steps is None and args.max_train_time is None:
        raise ValueError(
            "--streaming needs --max_train_steps or --max_train_time (an iterable dataset has no length), got none."
        )
    # A new run on the user's data with no length at all gets its duration estimated before its first step.
    args.length_defaulted = not data_args.uses_builtin_data and all(
        getattr(args, name) is None for name in ("num_train_epochs", "max_train_steps", "max_train_time")
    )
    if data_args.uses_builtin_data:
        defaults = dict(DIGITS_TRAINING_DEFAULTS, num_warmup_epochs=1)
    else:
        defaults = dict(IMAGENET_TRAINING)
    if args.recipe_name in ("auto", "continue"):
        del defaults["num_warmup_epochs"]  # these recipes set the warmup from the planned steps
    for name, value in defaults.items():
        if getattr(args, name) is None and name not in training:  # a recipe file's None stays None
            setattr(args, name, value)
    # A recipe's warmup in epochs (built in or from a file), not one typed: it must leave a short run its cosine; a
    # typed one keeps its length under a time budget (see `build_schedules`).
    args.warmup_defaulted = "num_warmup_epochs" not in typed and args.num_warmup_steps is None
    args.warmup_typed = bool(typed & {"num_warmup_steps", "num_warmup_epochs"})
    return args, data_args


# --- data ----------------------------------------------------------------------------------------------------------


@dataclass
class TrainData:
    """
    The pretraining rows, ready for a DataLoader, and what the final evaluation needs.

    Attributes:
        dataset: an [`IndexedDataset`] (map-style) or this process's part of a shuffled `datasets.IterableDataset`.
        image_column: the column the collator decodes.
        evaluation: labelled (train, test) sets for the final low-shot evaluation, or None.
        no_evaluation_reason: why there is no evaluation, when there is none.
        sample: up to 32 undecoded images, the same on every process, from which the auto recipe reads the image
            size and colour mode (see `_recipe_sample`).
    """

    dataset: torch.utils.data.Dataset | datasets.IterableDataset
    image_column: str
    evaluation: tuple[ImageDataset, ImageDataset] | None = None
    no_evaluation_reason: str | None = None
    sample: list = field(default_factory=list)

    @property
    def streaming(self) -> bool:
        return isinstance(self.dataset, datasets.IterableDataset)


def _evaluation_sets(
    data: ImageDataset, data_args: DataArguments, max_eval_samples: int
) -> tuple[ImageDataset, tuple[ImageDataset, ImageDataset] | None, str | None]:
    """
    The labelled sets of the final evaluation, those `msn-evaluate` loads from the same flags: the labelled rows of
    `data` (rows labelled < 0 are pretrained on, not evaluated on) and `--test_dir`, the labelled evaluation split,
    or else a stratified `--test_size` of the labelled rows held out of `data` BEFORE pretraining, so that no test
    image is pretrained on; nothing is held out of data too large to evaluate. A `--test_dir` that gives no labels
    is a ValueError here, before the first step. Returns the data to pretrain on, the (train, test) sets or None,
    and the reason when None.
    """
    if data.label_column is None:
        return data, None, "the training data has no labels"
    labelled, unlabelled = separate_unlabelled(data)
    if not len(labelled.dataset):
        return data, None, "the training data has no labels (every label is < 0)"
    common = dict(image_column_name=data_args.image_column_name, label_column_name=data_args.label_column_name,
                  cache_dir=data_args.cache_dir)  # fmt: skip
    test = None
    if data_args.test_dir is not None:
        test = load_test_dir(data_args.test_dir, data_args.train_dir, data_args.train_split)
    else:
        test = load_labelled_split(data_args.dataset_name, data_args.dataset_config_name, data_args.eval_split,
                                   data_args.train_split, train_dir=data_args.train_dir,
                                   train_files=data_args.train_files, **common)  # fmt: skip
    if test is not None:
        test = match_labels(labelled, test)  # loaded on its own, it numbers its classes on its own
    if test is None:
        if len(labelled.dataset) > max_eval_samples:
            return data, None, f"{len(labelled.dataset)} labelled images exceed --max_eval_samples {max_eval_samples}"
        logger.info(f"No labelled evaluation split: holding out {data_args.test_size:.0%} of the labelled images before pretraining.")
        try:
            labelled, test = hold_out(labelled, data_args.test_size)
        except ValueError as error:  # e.g. a class with a single image cannot be stratified
            return data, None, f"no stratified hold-out of {data_args.test_size:.0%} is possible ({error})"
        data = labelled
        if len(unlabelled.dataset):  # only labelled images are held out: the unlabelled ones are pretrained on too
            rows = datasets.concatenate_datasets([labelled.dataset, unlabelled.dataset])
            data = ImageDataset(rows, labelled.image_column, labelled.label_column, labelled.split)
    return data, (labelled, keep_rows(test, data_args.max_test_samples)), None


def _recipe_sample(rows: datasets.Dataset | datasets.IterableDataset, image_column: str) -> list:
    """
    Up to `RECIPE_SAMPLE_SIZE` undecoded images, the same on every process and for every seed, from which the auto
    recipe reads the image size and colour mode: rows evenly spaced over a map-style dataset, whose first rows can
    be one class (an image folder lists its classes one after the other, and a first class of grey images would
    make a colour set look grey); the first rows of a stream, which has no length to spread over.
    """
    if not isinstance(rows, datasets.IterableDataset):
        count = min(RECIPE_SAMPLE_SIZE, len(rows))
        rows = rows.select([i * len(rows) // count for i in range(count)])
    return [row[image_column] for row in rows.take(RECIPE_SAMPLE_SIZE)]


def build_train_data(data_args: DataArguments, args: PretrainingArguments, accelerator: Accelerator) -> TrainData:
    """
    Load the pretraining rows (images stay undecoded: the collator decodes, so that an unreadable file is skipped
    rather than raised inside `datasets`). Map-style rows are indexed; a stream is read in shard order (by default,
    which resumes exactly) or, with `--shuffle_buffer_size N`, shuffled with a fixed seed (shard order and an N-row
    buffer, reseeded per epoch by `set_epoch`), and split across processes with `split_dataset_by_node`, so that
    each process reads and decodes only its own rows.
    """
    data = load_image_dataset(
        dataset_name=data_args.dataset_name,
        dataset_config_name=data_args.dataset_config_name,
        train_dir=data_args.train_dir,
        train_files=data_args.train_files,
        split=data_args.train_split,
        image_column_name=data_args.image_column_name,
        label_column_name=data_args.label_column_name,
        max_samples=data_args.max_train_samples,
        streaming=data_args.streaming,
        cache_dir=data_args.cache_dir,
    )
    evaluation, reason = None, "--skip_evaluation"
    if data_args.streaming:
        reason = "a streaming dataset has no held-out part to evaluate on"
    elif not args.skip_evaluation:
        data, evaluation, reason = _evaluation_sets(data, data_args, args.max_eval_samples)
    rows = data.dataset.cast_column(data.image_column, datasets.Image(decode=False))
    sample = _recipe_sample(rows, data.image_column)
    if data_args.streaming:
        if data_args.shuffle_buffer_size:
            rows = rows.shuffle(seed=args.seed, buffer_size=data_args.shuffle_buffer_size)
        rows = split_dataset_by_node(rows, rank=accelerator.process_index, world_size=accelerator.num_processes)
        return TrainData(rows, data.image_column, None, reason, sample)
    global_batch = args.per_device_train_batch_size * accelerator.num_processes
    if len(rows) < global_batch:
        raise ValueError(
            f"--per_device_train_batch_size {args.per_device_train_batch_size} x {accelerator.num_processes} "
            f"process(es) must not exceed the {len(rows)} training images (a batch is never partial), got a global "
            f"batch of {global_batch}."
        )
    dataset = IndexedDataset(rows.with_format(None), data.image_column, kept_image_bytes(args.dataloader_num_workers))
    return TrainData(dataset, data.image_column, evaluation, reason, sample)


def build_dataloader(train_data: TrainData, collator: MSNViewsCollator, args: PretrainingArguments) -> DataLoader:
    """
    A DataLoader of full batches. A stream gets a `StatefulDataLoader`, whose `state_dict` (the rows consumed, in
    every worker) is saved with each checkpoint; map-style rows are shuffled by the sampler Accelerate prepares.
    """
    if train_data.streaming and args.dataloader_num_workers > 0:
        # PyTorch batches an iterable dataset inside each worker, so each worker ends a pass on its own remainder.
        logger.warning(
            f"--dataloader_num_workers {args.dataloader_num_workers} on a stream: each worker drops the last partial "
            f"batch of its rows (up to {args.per_device_train_batch_size - 1}) in every pass; with --shuffle_buffer_size "
            "0 (the default) these are the same rows every pass. Give --shuffle_buffer_size N to vary them, or shards "
            "of a multiple of the batch."
        )
    loader_class = StatefulDataLoader if train_data.streaming else DataLoader
    return loader_class(
        train_data.dataset,
        batch_size=args.per_device_train_batch_size,
        shuffle=not train_data.streaming,
        drop_last=True,
        collate_fn=collator,
        num_workers=args.dataloader_num_workers,
    )


# --- model ---------------------------------------------------------------------------------------------------------


def choose_recipe(
    args: PretrainingArguments, data_args: DataArguments, train_data: "TrainData", num_processes: int = 1
) -> dict:
    """
    The recipe of the run: `--recipe_file`, the ImageNet recipe, the auto rule or the continue rule (from the
    weights' patch and resolution, `starting_backbone`) applied to a sample of the training images and to the
    planned run, or (with `--backbone` alone) no recipe: MSNConfig's defaults.
    """
    if args.recipe_file is not None:
        return load_recipe(args.recipe_file)
    name = args.recipe_name
    if name == "imagenet":
        return imagenet_recipe()
    if name is None:
        return dict(NO_RECIPE, backbone=MSNConfig.backbone)
    rows = train_data.dataset
    image_size, grey = describe_images(image for image in map(decode_image, train_data.sample) if image is not None)
    global_batch = args.per_device_train_batch_size * num_processes * args.gradient_accumulation_steps
    num_images = len(rows) if not train_data.streaming else args.max_train_steps * global_batch
    planned_steps = args.max_train_steps or args.num_train_epochs * max(1, num_images // global_batch)
    if name == "continue":
        native_size, patch_size, width = starting_backbone(args)
        return continue_recipe(
            native_size, patch_size, image_size, grey, num_images, global_batch, planned_steps, new_heads_width=width
        )
    return auto_recipe(image_size, grey, num_images, global_batch, planned_steps)


def starting_geometry(args: PretrainingArguments) -> tuple[int, int]:
    """`(native side, patch side)` in pixels of the weights a run starts from (see `starting_backbone`)."""
    return starting_backbone(args)[:2]


def starting_backbone(args: PretrainingArguments) -> tuple[int, int, int | None]:
    """
    `(native side, patch side, new heads width)` of the weights a run starts from, read from configs alone: the
    views of an msn_hf folder, the `image_size` and `patch_size` of a Transformers ViT, or the timm backbone of
    `--backbone_pretrained` (its default resolution unless `--backbone_kwargs` give `img_size`). The width is that of
    weights without MSN heads (timm weights, a Transformers ViT), which get new heads and prototypes sized by the
    auto rule (`continue_recipe`); None for an msn_hf folder, whose own are kept.
    """
    source = args.model_name_or_path
    if not source:
        return backbone_geometry(args.backbone or MSNConfig.backbone, args.backbone_kwargs or {})
    if _weights_kind(source) == "msn":
        config = MSNConfig.from_pretrained(source)
        return config.image_size, backbone_geometry(config.backbone, {"img_size": config.image_size, **config.backbone_kwargs})[1], None
    config = AutoConfig.from_pretrained(source)
    side, patch = config.image_size, config.patch_size
    return (side if isinstance(side, int) else side[0]), (patch if isinstance(patch, int) else patch[0]), int(config.hidden_size)


def _weights_kind(source: str) -> str:
    """`model_folder_kind` of `--model_name_or_path`, refusing a fine-tuned classifier folder in one line."""
    kind = model_folder_kind(source)
    if kind == "msn_classifier":
        raise classifier_folder_error(source)
    return kind


def parse_model_overrides(args: PretrainingArguments) -> tuple[dict, dict]:
    """
    `--config_overrides` and `--processor_overrides` as dicts, checked against MSNConfig / MSNImageProcessor, and
    against `--backbone_kwargs`: `img_size` there and `image_size` here both set the view side, so they must agree.
    """
    overrides = parse_overrides(args.config_overrides, config_fields(), "--config_overrides", "MSNConfig fields")
    img_size = (args.backbone_kwargs or {}).get("img_size")
    if img_size is not None and "image_size" in overrides and overrides["image_size"] != img_size:
        raise ValueError(
            f"--config_overrides image_size={overrides['image_size']} must equal --backbone_kwargs img_size "
            f"{img_size} (both set the side of the views), got two sides; give one of them."
        )
    return (
        overrides,
        parse_overrides(
            args.processor_overrides,
            MSNImageProcessor.valid_kwargs.__annotations__,
            "--processor_overrides",
            "MSNImageProcessor settings",
        ),
    )


def build_model_and_processor(
    args: PretrainingArguments, data_args: DataArguments, recipe: dict | None = None
) -> tuple[MSNModel, MSNImageProcessor]:
    """
    The model and its views processor of a run, from `recipe` (see `choose_recipe`; None: MSNConfig's and
    MSNImageProcessor's defaults) under the command line's overrides, which win.

    - `--model_name_or_path`: an msn_hf `MSNModel` folder is loaded whole (heads and prototypes included; the
      processor it holds is the base of the views); a Transformers `ViTModel` / `ViTMSNModel` is imported as both
      encoders with a new head and prototypes (`msn_model_from_vit`; its normalisation is kept); a fine-tuned
      `MSNForImageClassification` folder is refused (`classifier_folder_error`).
    - otherwise a new model: `--backbone` (or the recipe's), `--backbone_kwargs` merged into the recipe's,
      `--backbone_pretrained`. An `img_size` in `--backbone_kwargs` (or `image_size` in `--config_overrides`) is the
      side of the views, and a patch that does not divide the recipe's side snaps it down to a multiple; the focal
      side, the evaluation resize and the blur follow (`fit_views`).

    The views are the recipe's processor settings at the config's crop sizes, then `--processor_overrides`,
    `--num_anchor_views` and `--num_focal_views`.
    """
    overrides, processor_overrides = parse_model_overrides(args)
    has_recipe, recipe = recipe is not None, recipe or NO_RECIPE
    source_processor = None
    if args.model_name_or_path:
        source = args.model_name_or_path
        kind = _weights_kind(source)
        config_kwargs = {**recipe["config"], **overrides}
        if kind == "msn":
            model = MSNModel.from_pretrained(source, **config_kwargs)
            try:
                source_processor = MSNImageProcessor.from_pretrained(source).to_dict()
            except OSError:
                pass
        else:
            model, source_processor = msn_model_from_vit(source, **config_kwargs)
    else:
        backbone = args.backbone or recipe.get("backbone") or MSNConfig.backbone
        given_kwargs = args.backbone_kwargs or {}
        # Given kwargs complete the recipe's: `{"depth": 2}` changes the depth only.
        backbone_kwargs = {**recipe["backbone_kwargs"], **given_kwargs}
        patch = backbone_kwargs.get("patch_size") or backbone_geometry(backbone, backbone_kwargs)[1]
        patch = patch if isinstance(patch, int) else patch[0]
        side = given_kwargs.get("img_size", overrides.get("image_size"))
        if side is None:
            side = recipe["config"].get("image_size", MSNConfig.image_size)
            side = max(patch, side - side % patch)  # a patch that no longer divides the recipe's side
        elif not isinstance(side, int) or side % patch:
            raise ValueError(
                f"--backbone_kwargs img_size (or --config_overrides image_size) must be a multiple of the patch size "
                f"{patch}, got {side!r}."
            )
        recipe = fit_views(recipe, side, patch, overrides.get("focal_image_size"))
        backbone_kwargs = {**recipe["backbone_kwargs"], **given_kwargs}  # the recipe's `img_size` moved with the views
        config_kwargs = {**recipe["config"], **overrides}
        if args.backbone_pretrained is not None:
            config_kwargs["backbone_pretrained"] = args.backbone_pretrained
        model = MSNModel(MSNConfig(backbone=backbone, backbone_kwargs=backbone_kwargs, **config_kwargs))
    config = model.config
    valid = MSNImageProcessor.valid_kwargs.__annotations__
    settings = {k: v for k, v in (source_processor or {}).items() if k in valid}
    if source_processor is None or has_recipe:  # a folder's own processor is kept as it is without a recipe
        settings.update(recipe["processor"], crop_size=config.image_size, focal_crop_size=config.focal_image_size)
        settings.setdefault("size", {"shortest_edge": round(config.image_size * 256 / 224)})
    if config.backbone_pretrained is not None:
        # Released timm weights were trained on inputs normalised as their pretrained_cfg states (0.5 for the augreg
        # ViTs), which is what timm users feed them.
        normalisation = timm.data.resolve_model_data_config(model.get_encoder())
        settings.update(image_mean=list(normalisation["mean"]), image_std=list(normalisation["std"]))
    view_flags = {name: getattr(args, name) for name in ("num_anchor_views", "num_focal_views") if getattr(args, name) is not None}
    return model, MSNImageProcessor(**{**settings, **processor_overrides, **view_flags})


def effective_recipe(name: str, args: PretrainingArguments, model: MSNModel, processor: MSNImageProcessor) -> dict:
    """What the run used, as a recipe file that reproduces it (`--recipe_file`) on the same data: a budget run by its
    budget, which the same model and views then fill on the machine at hand."""
    config = model.config
    processor_settings = processor.to_dict()
    used = dict(
        name=name,
        backbone=config.backbone,
        backbone_kwargs=config.backbone_kwargs,
        config={k: getattr(config, k) for k in MSNConfig.__annotations__ if k not in ("backbone", "backbone_kwargs")},
        processor={k: v for k, v in processor_settings.items() if k in MSNImageProcessor.valid_kwargs.__annotations__},
        training={k: getattr(args, k) for k in RECIPE_TRAINING_FIELDS},
    )
    if args.max_train_time is not None:  # the planner's step count is the length its model was chosen for, not the run's
        used["training"].update(max_train_steps=None, num_train_epochs=None)
    return used


def recipe_summary(recipe: dict, used: dict, args: PretrainingArguments) -> str:
    """
    One line of what the run uses (`used`: see `effective_recipe`): the backbone, then the config fields and view
    settings that the recipe or the command line chose, with the values in force, and the warmup.
    """
    config_overrides, processor_overrides = parse_model_overrides(args)
    view_flags = [name for name in ("num_anchor_views", "num_focal_views") if getattr(args, name) is not None]
    config = {k: used["config"][k] for k in dict.fromkeys([*recipe["config"], *config_overrides]) if k in used["config"]}
    views = {
        k: used["processor"][k]
        for k in dict.fromkeys([*recipe["processor"], *processor_overrides, *view_flags])
        if k in used["processor"]
    }
    training = used["training"]
    warmup = (
        f"{training['num_warmup_steps']} steps" if training["num_warmup_steps"] is not None
        else f"{training['num_warmup_epochs']} epochs"
    )
    source = args.model_name_or_path or args.backbone_pretrained
    return (
        f"Recipe {used['name']!r}{f' from {source}' if source else ''}: {used['backbone']} {used['backbone_kwargs']}, "
        f"config {config}, views {views}, learning rate {training['learning_rate']:g}, warmup {warmup}"
    )


# --- run length ----------------------------------------------------------------------------------------------------


def measure_seconds_per_step(
    args: PretrainingArguments,
    data_args: DataArguments,
    train_data: TrainData,
    accelerator: Accelerator,
    recipe: dict | None,
) -> float:
    """
    Seconds per optimiser step of a new model of `recipe` (see `build_model_and_processor`) on this machine: warm-up
    steps, then timed ones (`budget.time_steps`) of `training_step` on real batches of the run's data, through its
    collator, DataLoader, processes and precision (rows read and decoded, none kept in memory); the slowest
    process's figure, the same on every process. Leaves nothing behind: the Accelerator lets go of the model,
    optimiser and DataLoader, and the seed is set again, so that the run starts as it would have without the timing.
    """
    rows = train_data.dataset
    if isinstance(rows, IndexedDataset) and rows.cache_bytes:
        # Every candidate is timed on rows read and decoded as in a first epoch: images the first candidate's steps
        # left in memory would make the later ones look faster, and a large data set's later epochs read mostly rows
        # that are not kept.
        train_data = dataclasses.replace(train_data, dataset=IndexedDataset(rows.dataset))
    model, processor = build_model_and_processor(args, data_args, recipe)
    if accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    collator = MSNViewsCollator(processor, train_data.image_column, seed=args.seed, views_on_device=args.views_on_device)
    dataloader = build_dataloader(train_data, collator, args)
    optimizer = adamw(model, accelerator.device, lr=args.learning_rate, weight_decay=args.weight_decay)
    if train_data.streaming:
        model, optimizer = accelerator.prepare(model, optimizer)
    else:
        model, optimizer, dataloader = accelerator.prepare(model, optimizer, dataloader)
    schedules = MSNSchedules(total_steps=1_000, warmup_steps=10)  # any: their values do not change a step's time
    state = TrainingState()

    def endless_batches():
        while True:
            before = state.batches_in_epoch
            yield from epoch_batches(
                accelerator, dataloader, collator, train_data.streaming, state, args.seed, skipped_batches
            )
            if state.batches_in_epoch == before:
                raise ValueError("--max_train_time: a pass over the data gave no batch to time.")
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0

    batches = endless_batches()
    skipped_batches = SkippedBatches(args.max_skipped_batches)

    def step() -> None:
        for _ in range(args.gradient_accumulation_steps):
            training_step(accelerator, model, optimizer, next(batches), state, schedules, args.max_grad_norm)

    try:
        return time_steps(accelerator, step)
    finally:
        batches.close()
        if hasattr(dataloader, "end"):  # an iteration left unfinished stays registered with Accelerate's state
            dataloader.end()
        accelerator.free_memory()
        set_seed(args.seed)


def plan_run_length(
    args: PretrainingArguments, data_args: DataArguments, train_data: TrainData, accelerator: Accelerator
) -> BudgetPlan | None:
    """
    The length of the run, settled before its model is built. With `--max_train_time`: the plan saved with the
    checkpoint a resumed run starts from (nothing is timed again), or a new plan: the longest run whose steps fit the
    budget with its own model at `GROWTH_MARGIN` times its pace (`budget.plan_steps`), each candidate geometry of the
    recipe (the auto rule's model grows with the run) timed by `measure_seconds_per_step`; that run length becomes
    `--max_train_steps`, from which the recipe builds the model, and the plan runs the model for as many steps as fill
    the budget at its timed pace. Without any length flag, a new run on the user's data has its duration estimated and
    printed. Returns the budget plan, or None.
    """
    saved = saved_plan(args.resume_from_checkpoint, args.output_dir)
    if saved is not None and saved.budget_seconds is not None and args.max_train_steps is None:
        if args.max_train_time is not None and parse_duration(args.max_train_time) != saved.budget_seconds:
            logger.warning(
                f"--max_train_time {args.max_train_time}: the resumed run keeps its plan's budget, "
                f"{format_duration(saved.budget_seconds)}."
            )
        args.max_train_steps = saved.model_steps or saved.planned_steps
        return saved
    if saved is not None and args.max_train_time is not None:
        raise ValueError(
            f"--max_train_time must not be added when resuming a run of fixed length "
            f"({args.resume_from_checkpoint!r}), got {args.max_train_time!r}."
        )
    # The sample decoded once: the auto rule reads it for every candidate length.
    decoded = [image for image in map(decode_image, train_data.sample) if image is not None]
    described = dataclasses.replace(train_data, sample=decoded)
    num_processes = accelerator.num_processes
    global_batch = args.per_device_train_batch_size * num_processes * args.gradient_accumulation_steps

    def recipe_for(steps: int | None) -> dict | None:
        candidate = copy.copy(args)
        candidate.max_train_steps = steps
        return choose_recipe(candidate, data_args, described, num_processes)

    timings = {}

    def measure(steps: int | None) -> float:
        timings[steps] = measure_seconds_per_step(args, data_args, train_data, accelerator, recipe_for(steps))
        return timings[steps]

    if args.max_train_time is None:
        if getattr(args, "length_defaulted", False) and not args.resume_from_checkpoint and not train_data.streaming:
            steps = args.num_train_epochs * max(1, len(train_data.dataset) // global_batch)
            accelerator.print(estimate_line(steps, measure(None), global_batch, args.num_train_epochs))
        return None
    budget_seconds = parse_duration(args.max_train_time)
    # The model is the one of the longest run that fits even at GROWTH_MARGIN times its timed pace: a few timed steps
    # can read fast, and a bigger model bought on them would then see fewer images than the rule asks for it.
    steps, seconds, _ = plan_steps(
        budget_seconds / GROWTH_MARGIN,
        measure,
        lambda n: geometry_key(recipe_for(n)),
        lambda n: recipe_cost(recipe_for(n)),
    )
    # That model trains for the whole budget at its timed pace rather than stop short of it. At equal time, more steps
    # of a cheaper model won every comparison measured (benchmarks/RESULTS.md).
    planned = math.floor(budget_seconds / seconds)
    if planned < MIN_PLANNED_STEPS:
        raise ValueError(
            f"--max_train_time {args.max_train_time} fits {planned} steps of {seconds:.3g} s on this machine; the "
            f"schedules need at least {MIN_PLANNED_STEPS}: give a longer budget, got {args.max_train_time!r}."
        )
    args.max_train_steps = steps  # the recipe's model is the one of this run length
    # Timings by the run length whose geometry was timed.
    return BudgetPlan(planned, planned, budget_seconds=budget_seconds, seconds_per_step=seconds,
                      timings={str(key): value for key, value in timings.items()}, max_steps=MAX_GROWTH * planned,
                      model_steps=steps)  # fmt: skip


# --- the loop ------------------------------------------------------------------------------------------------------


def _resumes(args: PretrainingArguments) -> bool:
    """Whether the run continues a checkpoint: a folder given, or `latest` when `--output_dir` holds a complete one."""
    if args.resume_from_checkpoint == "latest":
        return find_latest_checkpoint(args.output_dir) is not None
    return args.resume_from_checkpoint is not None


def setup_run(args: PretrainingArguments) -> Accelerator:
    """
    The Accelerator, logging and seed of a run, and the check that `--output_dir` holds no other run, unless the run
    resumes it (see `_resumes`) or replaces it (`--overwrite_output_dir`). A refused folder is left as it was, and
    nothing is created here: `prepare_output_dir` does that once every input has been checked.
    """
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_dir=str(output_dir),
        # Every process loads its own batches: map-style ones through a sharded sampler, streamed ones from its own
        # part of the stream. Dispatching from the main process would decode every process's images there.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, dispatch_batches=False),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    datasets.utils.logging.set_verbosity_warning() if accelerator.is_main_process else datasets.disable_progress_bars()
    set_seed(args.seed)
    # The main process looks and every process learns its verdict, so that all stop on a bad folder; a process that
    # looked itself could look after the main one has begun the run's files, and refuse a new run.
    refusal = broadcast_object_list([_output_dir_refusal(args) if accelerator.is_main_process else None])[0]
    if refusal:
        raise ValueError(refusal)
    return accelerator


def _output_dir_refusal(args: PretrainingArguments) -> str | None:
    """Why `--output_dir` cannot take this run (it holds another one, or a finished one that the resume would train
    again over), or None."""
    output_dir = Path(args.output_dir)
    previous = [path.name for path in run_files(output_dir)]
    latest, finished = find_latest_checkpoint(output_dir), finished_step(output_dir)
    # A model exported after the latest checkpoint would be trained again and replaced by resuming it. A job script
    # that relaunches with `latest` must not do that; a checkpoint named by its path is a choice, made knowingly.
    retrained = finished is not None and latest is not None and checkpoint_step(latest) < finished
    if retrained and args.resume_from_checkpoint == "latest" and not args.overwrite_output_dir:
        return (
            f"--output_dir {str(output_dir)!r} holds a run that finished at step {finished} (its model exported), after "
            f"{latest.name}, which --resume_from_checkpoint latest would resume: that would train again over the "
            f"finished model. Evaluate it (msn-evaluate --model_name_or_path {output_dir}), continue from its weights "
            f"in a new run (--model_name_or_path {output_dir} --output_dir OTHER), resume {latest.name} by its path "
            "to train again from it, or pass --overwrite_output_dir to train anew."
        )
    # `latest` in the folder of a run stopped before its first checkpoint starts it again, as a job script relaunched
    # after an early pre-emption expects; a finished run (its model exported) is never retrained by it.
    starts_again = args.resume_from_checkpoint == "latest" and not any(output_dir.glob("model*.safetensors"))
    if previous and not _resumes(args) and not starts_again and not args.overwrite_output_dir:
        # What tells a run apart first (its checkpoints, model and metrics), then a few of its other files.
        telling = [n for n in previous if n.startswith("checkpoint-") or n in ("model.safetensors", METRICS_FILE)]
        others = [n for n in previous if n not in telling]
        found = ", ".join(telling + others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        if retrained:
            advice = f"it finished at step {finished}, after its last checkpoint {latest.name}: pass"
        elif latest is not None:
            advice = f"pass --resume_from_checkpoint latest to continue it from {latest.name}, or"
        else:
            advice = "it has no complete checkpoint for --resume_from_checkpoint latest to continue: pass"
        return (
            f"--output_dir {str(output_dir)!r} already holds a run ({found}); {advice} --overwrite_output_dir to "
            "start again (the files a run writes are removed, others kept), or choose another --output_dir."
        )
    return None


def prepare_output_dir(
    args: PretrainingArguments, data_args: DataArguments, accelerator: Accelerator, train_data: "TrainData"
) -> str | None:
    """
    Once every input has been checked (data, model, batches): the Hub access of `--push_to_hub` checked, the files
    of an earlier run removed (`--overwrite_output_dir`, unless the run resumes), `--output_dir` created, and which
    images the run trains on recorded in it (`DATA_RECORD_FILE`, which `msn-evaluate` reads). Returns the full Hub
    repository id of `--push_to_hub`, or None without it.
    """
    output_dir = Path(args.output_dir)
    repo_id = None
    if args.push_to_hub:
        # The main process asks the Hub; every process learns the answer, so that all stop alike on a refusal.
        answer = [None, None]
        if accelerator.is_main_process:
            try:
                answer[0] = check_hub_access(args.hub_model_id, args.hub_token, args.hub_private_repo)
            except ValueError as error:
                answer[1] = str(error)
        repo_id, refusal = broadcast_object_list(answer)
        if refusal:
            raise ValueError(refusal)
    if accelerator.is_main_process:
        if args.overwrite_output_dir and not _resumes(args):
            remove_run_files(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        test = train_data.evaluation[1] if train_data.evaluation else None
        write_text_atomically(output_dir / DATA_RECORD_FILE, json.dumps(data_record(data_args, test), indent=2))
    accelerator.wait_for_everyone()
    return repo_id


def build_schedules(args: PretrainingArguments, config: MSNConfig, steps_per_epoch: int | None) -> MSNSchedules:
    """
    The schedules of the run, in optimiser steps. Without epochs (a stream), the warmup is the same fraction of the
    run as `--num_warmup_epochs` of `--num_train_epochs`. A warmup the recipe chose in epochs (the paper's 15, not
    typed) is at most `WARMUP_SHARE` of the run, so that a short run still has its cosine; a typed one stands, also
    when a time budget lays the schedules over another total (`keep_warmup`).
    """
    total_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    if args.num_warmup_steps is not None:
        warmup_steps = args.num_warmup_steps
    elif steps_per_epoch is not None:
        warmup_steps = round(args.num_warmup_epochs * steps_per_epoch)
    else:
        warmup_steps = round(total_steps * args.num_warmup_epochs / args.num_train_epochs)
    if getattr(args, "warmup_defaulted", False):
        warmup_steps = min(warmup_steps, max(1, round(WARMUP_SHARE * total_steps)))
    return MSNSchedules(
        total_steps=total_steps,
        warmup_steps=min(warmup_steps, total_steps),
        learning_rate=args.learning_rate,
        warmup_start_learning_rate=args.warmup_start_learning_rate,
        final_learning_rate=args.final_learning_rate,
        weight_decay=args.weight_decay,
        final_weight_decay=args.final_weight_decay,
        momentum=config.ema_momentum,
        final_momentum=config.ema_momentum_end,
        stretch=args.schedule_stretch,
        keep_warmup=getattr(args, "warmup_typed", False),
    )


def epoch_batches(
    accelerator: Accelerator,
    dataloader,
    collator: MSNViewsCollator,
    streaming: bool,
    state: TrainingState,
    seed: int,
    skipped_batches: SkippedBatches,
):
    """
    The batches left in `state.epoch`, on the device, counted in `state`. A batch in which any process has no
    readable image is skipped by every process (Sinkhorn and me-max all-reduce), and the epoch ends on every process
    when one runs out of batches. Skipped batches that fill a whole epoch, or `skipped_batches.max_skipped_batches`
    in a row, stop the run (`ValueError`). Before each batch, torch's generators are seeded by its position in the
    run and the process, so masks repeat exactly after a resume.
    """
    collator.epoch = state.epoch
    batches = dataloader
    if streaming:
        dataloader.dataset.set_epoch(state.epoch)
    else:
        dataloader.set_epoch(state.epoch)
        if state.batches_in_epoch:
            batches = accelerator.skip_first_batches(dataloader, state.batches_in_epoch)
    # A stream's parts differ in length between processes: the first process to run out ends the epoch for all,
    # so that every process meets the same collectives.
    for batch in itertools.chain(batches, [None]):
        any_ran_out, skipped, any_unusable = batch_decisions(accelerator, batch)
        if any_ran_out:
            return
        state.batches_in_epoch += 1
        state.skipped_images += skipped
        state.skipped_batches_in_a_row = skipped_batches.count(
            state.skipped_batches_in_a_row, any_unusable, None if streaming else len(dataloader), state.skipped_images
        )
        if any_unusable:
            logger.warning("A batch without any readable image on some process: skipped on every process.")
            continue
        seed_batch(seed, state.epoch, state.batches_in_epoch, accelerator.process_index)
        batch = send_to_device(batch, accelerator.device) if streaming else batch
        yield collator.render_views(batch, accelerator.device)


def training_step(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict,
    state: TrainingState,
    schedules: MSNSchedules,
    max_grad_norm: float,
):
    """
    One micro-batch: the schedules of step `state.completed_steps` into the optimiser, forward, backward and, at
    the end of an accumulation window, the mean over its micro-batches (`average_window_gradients`: a short last
    window of an epoch counts its real number), clipping, the optimiser step and the EMA update of the target.

    A window with a non-finite loss, or a non-finite gradient norm, takes no step (every process alike) and counts in
    `state.consecutive_nonfinite`. A step that the fp16 grad scaler skips (it then lowers its scale) takes no EMA
    update and is not counted. `state.completed_steps` grows by one when the step was taken. Returns the output.

    The host reads the device once per window, for that decision (`window_decision`): the loss's finiteness is kept
    on the device until then (`state.window_nonfinite`), and its gradients are computed in any case (a non-finite
    loss gives non-finite gradients, which no step applies).
    """
    unwrapped = accelerator.unwrap_model(model)
    apply_schedules(optimizer, schedules, state.completed_steps)
    # The micro-batches of this window before this one, by Accelerate's own count (reset at the end of the data).
    earlier_micro_batches = accelerator.step % accelerator.gradient_accumulation_steps
    with accelerator.accumulate(model):
        output = model(**batch)
        state.window_nonfinite = ~torch.isfinite(output.loss.detach()) | state.window_nonfinite
        accelerator.backward(output.loss)  # divides the loss by gradient_accumulation_steps
        if accelerator.sync_gradients:
            average_window_gradients(
                unwrapped.parameters(), accelerator.gradient_accumulation_steps, earlier_micro_batches + 1
            )
            grad_norm = accelerator.clip_grad_norm_(clipped_parameters(unwrapped), max_grad_norm or math.inf)
            loss_nonfinite, grad_nonfinite = window_decision(accelerator, state.window_nonfinite, grad_norm)
            state.window_nonfinite = False
            # With fp16, the grad scaler itself skips a step with non-finite gradients, and lowers its scale.
            skip = loss_nonfinite or (grad_nonfinite and accelerator.scaler is None)
            scaler_skipped = False
            if not skip or accelerator.scaler is not None:
                if skip:
                    # The scaler has unscaled this window's gradients: its step must come, with nothing to apply.
                    optimizer.zero_grad(set_to_none=True)
                optimizer.step()
                scaler_skipped = accelerator.optimizer_step_was_skipped
            if skip:
                state.consecutive_nonfinite += 1
                logger.warning(
                    f"Non-finite loss or gradient at step {state.completed_steps}: step skipped "
                    f"({state.consecutive_nonfinite} in a row)."
                )
            elif scaler_skipped:
                logger.info(f"The fp16 grad scaler skipped step {state.completed_steps} (gradient overflow).")
            else:
                unwrapped.update_target_encoder(schedules.ema_momentum(state.completed_steps))
                state.completed_steps += 1
                state.consecutive_nonfinite = 0
        optimizer.zero_grad(set_to_none=True)
    return output


def tracker_config(args: PretrainingArguments, data_args: DataArguments) -> dict[str, str]:
    """The run's flags as the trackers record them: secrets left out, credentials in shard URLs hidden."""
    shown = {**vars(data_args), "train_files": [without_credentials(p) for p in data_args.train_files], **vars(args)}
    return {name: str(value) for name, value in shown.items() if name not in SECRET_ARGUMENTS}


class MetricsLog:
    """`metrics.jsonl` (main process) and the trackers: one record every `--logging_steps` optimiser steps."""

    def __init__(self, accelerator: Accelerator, path: Path, completed_steps: int, report: bool):
        self.accelerator, self.path, self.report = accelerator, path, report
        self.history = []
        if accelerator.is_main_process and path.exists():
            # A resumed run drops what the interrupted one logged after its checkpoint.
            self.history = [m for m in read_metrics(path) if m["step"] <= completed_steps]
            write_text_atomically(path, "".join(json.dumps(m) + "\n" for m in self.history))
        self.images, self.start = 0, time.perf_counter()

    def log_step(self, output, state: TrainingState, schedules: MSNSchedules) -> dict:
        accelerator = self.accelerator
        targets = output.target_probs.detach()
        step = state.completed_steps - 1
        record = dict(
            step=state.completed_steps,
            epoch=state.epoch,
            loss=accelerator.reduce(output.loss.detach(), "mean").item(),
            prediction_loss=accelerator.reduce(output.prediction_loss.detach(), "mean").item(),
            me_max_loss=output.me_max_loss.item(),
            distinct_target_prototypes=int(targets.argmax(dim=-1).unique().numel()),
            mean_max_target_prob=accelerator.reduce(targets.max(dim=-1).values.mean(), "mean").item(),
            lr=schedules.lr(step),
            weight_decay=schedules.wd(step),
            momentum=schedules.ema_momentum(step),
            images_per_second=self.images / max(time.perf_counter() - self.start, 1e-9),
            skipped_images=state.skipped_images,
            planned_steps=schedules.total_steps,
        )
        if state.plan and state.plan["budget_seconds"] is not None:  # how much of the first plan has run
            record["plan_completed"] = state.completed_steps / state.plan["planned_steps"]
        self.images, self.start = 0, time.perf_counter()
        if accelerator.is_main_process:
            self.history.append(record)
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if self.report:
            accelerator.log({k: v for k, v in record.items() if k != "step"}, step=state.completed_steps)
        return record


def train(args: PretrainingArguments, data_args: DataArguments) -> dict:
    """Run MSN pretraining (see `PretrainingArguments` and `DataArguments`); returns the final metrics."""
    # User errors surface before `prepare_output_dir` creates the output folder.
    parse_model_overrides(args)
    if args.model_name_or_path:
        check_model_source(args.model_name_or_path)
        _weights_kind(args.model_name_or_path)
    accelerator = setup_run(args)
    output_dir = Path(args.output_dir)
    train_data = build_train_data(data_args, args, accelerator)
    plan = plan_run_length(args, data_args, train_data, accelerator)
    recipe = choose_recipe(args, data_args, train_data, accelerator.num_processes)
    if args.num_warmup_steps is None and args.num_warmup_epochs is None:
        args.num_warmup_steps = recipe["training"].get("num_warmup_steps")
    model, processor = build_model_and_processor(args, data_args, recipe)
    repo_id = prepare_output_dir(args, data_args, accelerator, train_data)
    used = effective_recipe(recipe["name"], args, model, processor)
    if plan is not None:
        used["plan"] = plan.planning_record()
    accelerator.print(f"{recipe_summary(recipe, used, args)}; written to {output_dir / RECIPE_FILE}")
    if accelerator.is_main_process:
        save_recipe(used, output_dir / RECIPE_FILE)
    if accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    collator = MSNViewsCollator(
        processor, train_data.image_column, seed=args.seed, views_on_device=args.views_on_device
    )
    dataloader = build_dataloader(train_data, collator, args)
    optimizer = adamw(model, accelerator.device, lr=args.learning_rate, weight_decay=args.weight_decay)
    if train_data.streaming:  # each process already reads its own part of the stream
        model, optimizer = accelerator.prepare(model, optimizer)
        steps_per_epoch = None
    else:
        model, optimizer, dataloader = accelerator.prepare(model, optimizer, dataloader)
        # Accelerate also ends an accumulation window at the end of the data: a short last window is a step.
        steps_per_epoch = math.ceil(len(dataloader) / args.gradient_accumulation_steps)
    unwrapped = accelerator.unwrap_model(model)
    schedules = build_schedules(args, unwrapped.config, steps_per_epoch)
    layout = dict(num_processes=accelerator.num_processes, per_device_train_batch_size=args.per_device_train_batch_size,
                  gradient_accumulation_steps=args.gradient_accumulation_steps)  # fmt: skip
    state = resume(args.resume_from_checkpoint, accelerator, dataloader, output_dir, layout)
    if args.report_to != "none":  # after a refused resume has had its say: the trackers write into --output_dir
        accelerator.init_trackers("msn_pretraining", config=tracker_config(args, data_args))
    keeper = BudgetKeeper(accelerator, schedules, plan, state)  # lays the plan's length over the schedules
    global_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    if plan is not None:
        num_images = None if train_data.streaming else len(train_data.dataset)
        accelerator.print(plan.describe(state.completed_steps, global_batch, num_images, describe_geometry(unwrapped)))
    metrics = MetricsLog(accelerator, output_dir / METRICS_FILE, state.completed_steps, args.report_to != "none")
    progress = tqdm(total=schedules.total_steps, initial=state.completed_steps, disable=not accelerator.is_local_main_process)

    # Ctrl-C or SIGTERM: the step in progress ends, every process writes the checkpoint of the same step, and the
    # run stops (TrainingInterrupted). The handlers are those of the loop only.
    last_checkpoint = None
    skipped_batches = SkippedBatches(args.max_skipped_batches)
    with StopSignals() as stop:
        model.train()
        keeper.start_clock()
        state.start_clock()
        while state.completed_steps < schedules.total_steps:
            resumed_mid_epoch, epoch_done = state.batches_in_epoch > 0, True
            batches = epoch_batches(
                accelerator, dataloader, collator, train_data.streaming, state, args.seed, skipped_batches
            )
            for batch in batches:
                steps_before = state.completed_steps
                output = training_step(accelerator, model, optimizer, batch, state, schedules, args.max_grad_norm)
                metrics.images += batch["pixel_values"].shape[0] * accelerator.num_processes
                if state.consecutive_nonfinite >= args.max_nonfinite_steps:
                    raise RuntimeError(
                        f"{state.consecutive_nonfinite} non-finite losses in a row at step {state.completed_steps}: "
                        f"stopping. Last good checkpoint: {find_latest_checkpoint(output_dir) or 'none'}. Lower "
                        "--learning_rate or check the data."
                    )
                if state.completed_steps == steps_before:
                    continue
                progress.update(1)
                if keeper.after_step(state):  # the pace moved the plan's end
                    progress.total = schedules.total_steps
                if state.completed_steps % args.logging_steps == 0 or state.completed_steps == schedules.total_steps:
                    record = metrics.log_step(output, state, schedules)
                    progress.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}",
                                         img_s=f"{record['images_per_second']:.0f}")  # fmt: skip
                if args.checkpointing_steps not in (None, "epoch") and state.completed_steps % int(args.checkpointing_steps) == 0:
                    last_checkpoint = save_checkpoint(accelerator, output_dir, state, dataloader, args.checkpoints_total_limit)
                if signum := stop.requested(accelerator):
                    stop_at_checkpoint(accelerator, output_dir, state, dataloader, args.checkpoints_total_limit, signum,
                                       last_checkpoint)  # fmt: skip
                if state.completed_steps >= schedules.total_steps:
                    epoch_done = not train_data.streaming and state.batches_in_epoch == len(dataloader)
                    break
            if epoch_done:
                if state.batches_in_epoch == 0 and not resumed_mid_epoch:
                    raise ValueError(
                        f"--per_device_train_batch_size {args.per_device_train_batch_size} must not exceed the images "
                        f"of each process, but a pass over the data gave no full batch."
                    )
                state.epoch, state.batches_in_epoch = state.epoch + 1, 0
                if args.checkpointing_steps == "epoch":
                    last_checkpoint = save_checkpoint(accelerator, output_dir, state, dataloader, args.checkpoints_total_limit)
        # A signal after the last step lets the export finish; the run then stops with its model saved.
        progress.close()
        keeper.finish(state)
        state.stop_clock()
        test = train_data.evaluation[1] if train_data.evaluation else None
        run_info = card_run_info(
            args, data_args, accelerator, state, state.elapsed_seconds, recipe["name"], test, repo_id
        )
        results = export_run(args, accelerator, unwrapped, processor, state, metrics.history, run_info)
        if signum := stop.requested(accelerator):
            accelerator.end_training()
            message = f"stopped after the last step with the model saved in {output_dir}; its evaluation did not run"
            accelerator.print(f"\n{signal.Signals(signum).name}: {message} (msn-evaluate --model_name_or_path "
                              f"{output_dir}).", file=sys.stderr, flush=True)  # fmt: skip
            raise TrainingInterrupted(message, signum)
    return finish(args, accelerator, unwrapped, processor, train_data, state, results, run_info)


def export_run(
    args: PretrainingArguments,
    accelerator: Accelerator,
    model: MSNModel,
    processor: MSNImageProcessor,
    state: TrainingState,
    history: list[dict],
    run_info: dict,
) -> dict:
    """
    Export the final model at once (main process) with what the run did (`train_results.json`, which tells a
    finished run: see `finished_step`), its loss curve and its card (`run_info`: see `card_run_info`); returns
    those results. Every process returns once the export is complete.
    """
    output_dir = Path(args.output_dir)
    if state.skipped_images:
        logger.warning(f"{state.skipped_images} unreadable images were skipped.")
    results = dict(completed_steps=state.completed_steps, skipped_images=state.skipped_images)
    if state.plan:
        results.update(BudgetPlan.from_dict(state.plan).results(state.completed_steps))
    if history:
        results["final_loss"] = history[-1]["loss"]
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model.eval()
        export_final(model, processor, output_dir)
        write_train_results(output_dir, results)
        if history:
            plot_loss_curve(history, output_dir / "loss_curve.png")
        write_model_card(output_dir, model, processor, run_info)
    accelerator.wait_for_everyone()
    return results


def finish(
    args: PretrainingArguments,
    accelerator: Accelerator,
    model: MSNModel,
    processor: MSNImageProcessor,
    train_data: TrainData,
    state: TrainingState,
    results: dict,
    run_info: dict,
) -> dict:
    """
    Evaluate the exported model (main process): after the last barrier, so that a long evaluation cannot time out
    the other processes, which are done, and a failed one cannot lose the model. The card and `train_results.json`
    are rewritten with the results; a summary line ends the run. A failed upload (`--push_to_hub`) comes after the
    summary, as an `UploadError` that says where the model is and the command that uploads it.
    """
    output_dir = Path(args.output_dir)
    accelerator.end_training()
    if not accelerator.is_main_process:
        return results
    evaluation = run_final_evaluation(args, train_data, model, processor, output_dir)
    if evaluation:
        results["eval"] = evaluation
        write_model_card(output_dir, model, processor, run_info, evaluation)
        write_train_results(output_dir, results)
    upload_failure = None
    if args.push_to_hub:
        try:
            push_to_hub(output_dir, args.hub_model_id, args.hub_token, args.hub_private_repo)
        except UploadError as error:  # the run's folder is complete: the summary still comes, then the failure
            upload_failure = error
    print(f"\nmsn-pretrain: model, processor and card in {output_dir} ({state.completed_steps} steps).")
    if state.plan:
        global_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
        print(f"  {BudgetPlan.from_dict(state.plan).summary(state.completed_steps, global_batch)}")
    else:
        print(f"  Trained {state.completed_steps} steps in {format_duration(state.training_seconds)}.")
    if evaluation:
        print(f"  {headline(evaluation)} (all settings in {output_dir / 'README.md'}).")
        for name in evaluation.get("pictures", {}).get("files", []):
            print(f"  Picture: {output_dir / name}")
    print(f"  Next: msn-evaluate --model_name_or_path {output_dir}")
    if upload_failure is not None:
        raise upload_failure
    return results


def run_final_evaluation(
    args: PretrainingArguments, train_data: TrainData, model: MSNModel, processor: MSNImageProcessor, output_dir: Path
) -> dict:
    """
    Low-shot evaluation of the target encoder (and the random and pixel baselines) on the held-out labelled images;
    writes `eval_results.json` and the pictures of what was learnt.
    """
    from .evaluation import RESULTS_FILE, evaluate_lowshot

    if train_data.evaluation is None:
        logger.info(f"Low-shot evaluation skipped: {train_data.no_evaluation_reason}.")
        return {}
    train, test = train_data.evaluation
    size = len(train.dataset) + len(test.dataset)
    if size > args.max_eval_samples:
        logger.info(
            f"Low-shot evaluation skipped: {size} labelled images exceed --max_eval_samples {args.max_eval_samples}; "
            f"run `msn-evaluate --model_name_or_path {output_dir}` on a subset or raise the limit."
        )
        return {}
    return evaluate_lowshot(
        model, train, test, processor, output_file=str(output_dir / RESULTS_FILE), pictures_dir=output_dir
    )


def main(argv: list[str] | None = None) -> dict:
    return train(*parse_args(argv))


if __name__ == "__main__":
    from .cli import pretrain

    pretrain()
