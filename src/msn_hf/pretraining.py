"""
MSN pretraining with Accelerate: one process or many, CPU or GPU, map-style or streaming data, resumable, with the
original schedules.

`examples/pretrain_msn.py` and the `msn-pretrain` console script run `main()`. This module holds the command line
(`PretrainingArguments`, `parse_args`), the choice of model and views, and the loop, which reads as the `no_trainer`
examples of Transformers: `setup_run`, `build_train_data`, `resume`, then `training_step`, `log_step` and
`save_checkpoint` per step, and `finish` (export first, evaluation after). The recipe it shares with `MSNTrainer`
lives in `training.py`, the checkpoint store in `checkpointing.py`, the run's outputs in `run_outputs.py`.
"""

import copy
import dataclasses
import itertools
import json
import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import datasets
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, send_to_device, set_seed
from datasets.distributed import split_dataset_by_node
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader
from tqdm.auto import tqdm
from transformers import HfArgumentParser

from .budget import (
    MAX_GROWTH,
    MIN_PLANNED_STEPS,
    BudgetKeeper,
    BudgetPlan,
    describe_geometry,
    estimate_line,
    format_duration,
    geometry_key,
    longest_with_geometry,
    parse_duration,
    plan_steps,
    recipe_cost,
    saved_plan,
    time_steps,
)
from .checkpointing import (
    TrainingState,
    find_latest_checkpoint,
    resume,
    save_checkpoint,
)
from .configuration_msn import MSNConfig
from .data import (
    DataArguments,
    ImageDataset,
    decode_image,
    has_labels,
    hold_out,
    load_image_dataset,
    load_labelled_split,
    match_labels,
)
from .image_processing_msn import MSNImageProcessor
from .modelcard import headline, write_model_card
from .modeling_msn import MSNModel
from .recipe import (
    IMAGENET_TRAINING,
    RECIPE_FILE,
    auto_recipe,
    describe_images,
    imagenet_recipe,
    load_recipe,
    parse_overrides,
    save_recipe,
)
from .run_outputs import card_run_info, export_final, plot_loss_curve, push_to_hub
from .sources import check_model_source
from .training import (
    IndexedDataset,
    MSNSchedules,
    MSNViewsCollator,
    all_processes,
    apply_schedules,
    batch_decisions,
    clipped_parameters,
    parameter_groups,
    seed_batch,
)

logger = get_logger(__name__)

METRICS_FILE = "metrics.jsonl"
RECIPE_SAMPLE_SIZE = 32

# The built-in digits (1,437 training images of 32 px, grey, upscaled from 8 x 8) train for 70 epochs of 64 images
# (1,540 steps, benchmarks/RESULTS.md); the auto rule picks their model and views from that run length.
DIGITS_TRAINING_DEFAULTS = dict(num_train_epochs=70, per_device_train_batch_size=64)
# The optimisation settings a recipe file carries (its `training` section) and a run writes into its own.
RECIPE_TRAINING_FIELDS = (
    "learning_rate", "warmup_start_learning_rate", "final_learning_rate", "weight_decay", "final_weight_decay",
    "schedule_stretch", "max_grad_norm", "num_train_epochs", "max_train_steps", "per_device_train_batch_size",
    "gradient_accumulation_steps", "num_warmup_steps", "num_warmup_epochs", "seed",
)  # fmt: skip


@dataclass
class PretrainingArguments:
    """The model, the optimisation (defaults: the original ViT-S/16 recipe) and the outputs of an MSN run."""

    _argument_group_name = "model, optimisation and outputs"

    # model
    model_name_or_path: str | None = field(default=None, metadata={"help": "Continue from an MSN folder or Hub id."})
    backbone: str | None = field(
        default=None, metadata={"help": "timm ViT name (default: vit_small_patch16_224, or a small ViT for digits)."}
    )
    backbone_kwargs: str | None = field(
        default=None, metadata={"help": 'JSON arguments of timm.create_model, e.g. \'{"img_size": 32, "patch_size": 4}\'.'}
    )
    config_overrides: str | None = field(
        default=None, metadata={"help": "Comma-separated MSNConfig fields, e.g. mask_ratio=0.3,temperature=0.1."}
    )
    recipe: Literal["auto", "imagenet"] | None = field(
        default=None,
        metadata={
            "help": "Built-in recipe of model, views and warmup: 'auto' (from the data and the run; the default "
            "without --backbone, --model_name_or_path or --recipe_file) or 'imagenet' (the ViT-S/16 release)."
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
        default=None, metadata={"help": "timm weights to start from: a local file, or a Hub id (downloaded)."}
    )
    num_anchor_views: int | None = field(default=None, metadata={"help": "Random anchor views per image."})
    num_focal_views: int | None = field(default=None, metadata={"help": "Focal anchor views per image."})
    # optimisation
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate after warmup."})
    warmup_start_learning_rate: float = field(default=2e-4, metadata={"help": "Learning rate of the first step."})
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
        metadata={"help": "Start again in an --output_dir that holds a run: its checkpoints and metrics are removed."},
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

        for name in ("logging_steps", "gradient_accumulation_steps", "max_nonfinite_steps"):
            if getattr(self, name) <= 0:
                fail(name, "a positive number of steps", getattr(self, name))
        for name in ("max_train_steps", "per_device_train_batch_size", "num_train_epochs"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                fail(name, "a positive integer", getattr(self, name))
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
        if self.model_name_or_path and (self.recipe or self.recipe_file or self.backbone_pretrained):
            fail("model_name_or_path", "given without --recipe, --recipe_file or --backbone_pretrained", self.model_name_or_path)

    @property
    def recipe_name(self) -> str | None:
        """The built-in recipe in force: `--recipe`, else 'auto' unless the user chose a model or a recipe file."""
        if self.recipe is not None:
            return self.recipe
        if self.backbone or self.model_name_or_path or self.recipe_file:
            return None
        return "auto"


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
    training = {}
    if args.recipe_file is not None:
        # The file's optimisation settings, below the flags given on the command line.
        given = {item[2:].split("=", 1)[0] for item in argv if item.startswith("--")}
        if "max_train_time" in given:  # the budget typed replaces the file's run length
            given |= {"max_train_steps", "num_train_epochs"}
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
    if args.recipe_name == "auto":
        del defaults["num_warmup_epochs"]  # the auto recipe sets the warmup from the planned steps
    for name, value in defaults.items():
        if getattr(args, name) is None and name not in training:  # a recipe file's None stays None
            setattr(args, name, value)
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
        sample: up to 32 undecoded images, the same on every process (the first rows, before any shuffle or split),
            from which the auto recipe reads the image size and colour mode.
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
    The labelled test set of the final evaluation: `--test_dir`, the labelled evaluation split, or else a stratified
    `--test_size` held out of `data` BEFORE pretraining (the split `msn-evaluate` makes of the same flags), so that
    no test image is pretrained on; nothing is held out of data too large to evaluate. Returns the data to pretrain
    on, the (train, test) sets or None, and the reason when None.
    """
    if data.label_column is None or not has_labels(data):
        return data, None, "the training data has no labels"
    common = dict(image_column_name=data_args.image_column_name, label_column_name=data_args.label_column_name,
                  cache_dir=data_args.cache_dir)  # fmt: skip
    test = None
    if data_args.test_dir is not None:
        test = load_image_dataset(train_dir=data_args.test_dir, **common)
    elif not (data_args.train_dir or data_args.train_files):
        test = load_labelled_split(data_args.dataset_name, data_args.dataset_config_name, data_args.eval_split, **common)
    if test is not None:
        test = match_labels(data, test)  # loaded on its own, it numbers its classes on its own
    if test is None:
        if len(data.dataset) > max_eval_samples:
            return data, None, f"{len(data.dataset)} labelled images exceed --max_eval_samples {max_eval_samples}"
        logger.info(f"No labelled evaluation split: holding out {data_args.test_size:.0%} of the images before pretraining.")
        try:
            data, test = hold_out(data, data_args.test_size)
        except ValueError as error:  # e.g. a class with a single image cannot be stratified
            return data, None, f"no stratified hold-out of {data_args.test_size:.0%} is possible ({error})"
    if data_args.max_test_samples is not None:
        test.dataset = test.dataset.select(range(min(data_args.max_test_samples, len(test.dataset))))
    return data, (data, test), None


def build_train_data(data_args: DataArguments, args: PretrainingArguments, accelerator: Accelerator) -> TrainData:
    """
    Load the pretraining rows (images stay undecoded: the collator decodes, so that an unreadable file is skipped
    rather than raised inside `datasets`). Map-style rows are indexed; a stream is shuffled with a fixed seed
    (shard order and a `--shuffle_buffer_size` buffer, reseeded per epoch by `set_epoch`) and split across processes
    with `split_dataset_by_node`, so that each process reads and decodes only its own rows.
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
    sample = [row[data.image_column] for row in rows.take(RECIPE_SAMPLE_SIZE)]
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
    return TrainData(IndexedDataset(rows.with_format(None)), data.image_column, evaluation, reason, sample)


def build_dataloader(train_data: TrainData, collator: MSNViewsCollator, args: PretrainingArguments) -> DataLoader:
    """
    A DataLoader of full batches. A stream gets a `StatefulDataLoader`, whose `state_dict` (the rows consumed, in
    every worker) is saved with each checkpoint; map-style rows are shuffled by the sampler Accelerate prepares.
    """
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
    The recipe of a new model: `--recipe_file`, the ImageNet recipe, the auto rule applied to a sample of the
    training images and to the planned run, or (with `--backbone` alone) no recipe: MSNConfig's defaults.
    """
    if args.recipe_file is not None:
        return load_recipe(args.recipe_file)
    name = args.recipe_name
    if name == "imagenet":
        return imagenet_recipe()
    if name is None:
        return dict(name="none", backbone=MSNConfig.backbone, backbone_kwargs={}, config={}, processor={}, training={})
    rows = train_data.dataset
    image_size, grey = describe_images(image for image in map(decode_image, train_data.sample) if image is not None)
    global_batch = args.per_device_train_batch_size * num_processes * args.gradient_accumulation_steps
    num_images = len(rows) if not train_data.streaming else args.max_train_steps * global_batch
    planned_steps = args.max_train_steps or args.num_train_epochs * max(1, num_images // global_batch)
    return auto_recipe(image_size, grey, num_images, global_batch, planned_steps)


def parse_model_overrides(args: PretrainingArguments) -> tuple[dict, dict]:
    """`--config_overrides` and `--processor_overrides` as dicts, checked against MSNConfig / MSNImageProcessor."""
    config_keys = [name for name in MSNConfig.__annotations__ if not name.startswith("_")]
    return (
        parse_overrides(args.config_overrides, config_keys, "--config_overrides", "MSNConfig fields"),
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
    A new model and its views processor from `recipe` (see `choose_recipe`; None: MSNConfig's defaults), under the
    command line's
`--backbone`, `--backbone_kwargs`, `--config_overrides`, `--backbone_pretrained` and `--processor_overrides`;
    or the model (and processor) of `--model_name_or_path`. Crop sizes follow the config unless overridden.
    """
    overrides, processor_overrides = parse_model_overrides(args)
    processor = None
    if args.model_name_or_path:
        model = MSNModel.from_pretrained(args.model_name_or_path, **overrides)
        try:
            processor = MSNImageProcessor.from_pretrained(args.model_name_or_path, **processor_overrides)
        except OSError:
            pass
        processor_kwargs = {}
    else:
        recipe = recipe or dict(backbone_kwargs={}, config={}, processor={})  # MSNConfig's defaults
        config_kwargs = {**recipe["config"], **overrides}
        if args.backbone_pretrained is not None:
            config_kwargs["backbone_pretrained"] = args.backbone_pretrained
        backbone = args.backbone or recipe.get("backbone") or MSNConfig.backbone
        backbone_kwargs = args.backbone_kwargs if args.backbone_kwargs is not None else recipe["backbone_kwargs"]
        model = MSNModel(MSNConfig(backbone=backbone, backbone_kwargs=backbone_kwargs, **config_kwargs))
        processor_kwargs = dict(recipe["processor"])
    if processor is None:
        config = model.config
        processor_kwargs.update(crop_size=config.image_size, focal_crop_size=config.focal_image_size)
        processor_kwargs.setdefault("size", {"shortest_edge": round(config.image_size * 256 / 224)})
        processor = MSNImageProcessor(**{**processor_kwargs, **processor_overrides})
    for name in ("num_anchor_views", "num_focal_views"):
        if getattr(args, name) is not None:
            setattr(processor, name, getattr(args, name))
    return model, processor


def effective_recipe(name: str, args: PretrainingArguments, model: MSNModel, processor: MSNImageProcessor) -> dict:
    """What the run used, as a recipe file that reproduces it (`--recipe_file`) on the same data."""
    config = model.config
    processor_settings = processor.to_dict()
    return dict(
        name=name,
        backbone=config.backbone,
        backbone_kwargs=config.backbone_kwargs,
        config={k: getattr(config, k) for k in MSNConfig.__annotations__ if k not in ("backbone", "backbone_kwargs")},
        processor={k: v for k, v in processor_settings.items() if k in MSNImageProcessor.valid_kwargs.__annotations__},
        training={k: getattr(args, k) for k in RECIPE_TRAINING_FIELDS},
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
    collator, DataLoader, processes and precision; the slowest process's figure, the same on every process. Leaves
    nothing behind: the Accelerator lets go of the model, optimiser and DataLoader, and the seed is set again, so
    that the run starts as it would have without the timing.
    """
    model, processor = build_model_and_processor(args, data_args, recipe)
    if accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    collator = MSNViewsCollator(processor, train_data.image_column, seed=args.seed, views_on_device=args.views_on_device)
    dataloader = build_dataloader(train_data, collator, args)
    optimizer = torch.optim.AdamW(parameter_groups(model), lr=args.learning_rate, weight_decay=args.weight_decay)
    if train_data.streaming:
        model, optimizer = accelerator.prepare(model, optimizer)
    else:
        model, optimizer, dataloader = accelerator.prepare(model, optimizer, dataloader)
    schedules = MSNSchedules(total_steps=1_000, warmup_steps=10)  # any: their values do not change a step's time
    state = TrainingState()

    def endless_batches():
        while True:
            before = state.batches_in_epoch
            yield from epoch_batches(accelerator, dataloader, collator, train_data.streaming, state, args.seed)
            if state.batches_in_epoch == before:
                raise ValueError("--max_train_time: a pass over the data gave no batch to time.")
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0

    batches = endless_batches()

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
    budget (`budget.plan_steps`), each candidate geometry of the recipe (the auto rule's model grows with the run)
    timed by `measure_seconds_per_step`. The plan's steps become `--max_train_steps`. Without any length flag, a new
    run on the user's data has its duration estimated and printed. Returns the budget plan, or None.
    """
    saved = saved_plan(args.resume_from_checkpoint, args.output_dir)
    if saved is not None and saved.budget_seconds is not None and args.max_train_steps is None:
        if args.max_train_time is not None and parse_duration(args.max_train_time) != saved.budget_seconds:
            logger.warning(
                f"--max_train_time {args.max_train_time}: the resumed run keeps its plan's budget, "
                f"{format_duration(saved.budget_seconds)}."
            )
        args.max_train_steps = saved.planned_steps
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
        return None if args.model_name_or_path else choose_recipe(candidate, data_args, described, num_processes)

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
    steps, seconds, _ = plan_steps(
        budget_seconds, measure, lambda n: geometry_key(recipe_for(n)), lambda n: recipe_cost(recipe_for(n))
    )
    if steps < MIN_PLANNED_STEPS:
        raise ValueError(
            f"--max_train_time {args.max_train_time} fits {steps} steps of {seconds:.3g} s on this machine; the "
            f"schedules need at least {MIN_PLANNED_STEPS}: give a longer budget, got {args.max_train_time!r}."
        )
    args.max_train_steps = steps
    # The plan may grow (steps faster than timed) as long as the auto rule would pick the same model.
    most = longest_with_geometry(steps, lambda n: geometry_key(recipe_for(n)), MAX_GROWTH * steps)
    # Timings by the run length whose geometry was timed.
    return BudgetPlan(steps, steps, budget_seconds=budget_seconds, seconds_per_step=seconds,
                      timings={str(key): value for key, value in timings.items()}, max_steps=most)  # fmt: skip


# --- the loop ------------------------------------------------------------------------------------------------------


def setup_run(args: PretrainingArguments) -> Accelerator:
    """The Accelerator, logging and seed of a run, and an `--output_dir` that holds no other run."""
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
    # Every process checks, so that all of them stop on a bad folder rather than wait for the main one.
    previous = [p for p in output_dir.glob("*") if p.name.startswith("checkpoint-") or p.name == METRICS_FILE]
    finished = (output_dir / "model.safetensors").exists()
    if (previous or finished) and args.resume_from_checkpoint is None and not args.overwrite_output_dir:
        raise ValueError(
            f"--output_dir {str(output_dir)!r} already holds a run: pass --resume_from_checkpoint latest to continue "
            "it, or --overwrite_output_dir to start again."
        )
    if accelerator.is_main_process:
        if args.overwrite_output_dir and args.resume_from_checkpoint is None:
            for path in previous:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    return accelerator


def build_schedules(args: PretrainingArguments, config: MSNConfig, steps_per_epoch: int | None) -> MSNSchedules:
    """
    The schedules of the run, in optimiser steps. Without epochs (a stream), the warmup is the same fraction of the
    run as `--num_warmup_epochs` of `--num_train_epochs`.
    """
    total_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    if args.num_warmup_steps is not None:
        warmup_steps = args.num_warmup_steps
    elif steps_per_epoch is not None:
        warmup_steps = round(args.num_warmup_epochs * steps_per_epoch)
    else:
        warmup_steps = round(total_steps * args.num_warmup_epochs / args.num_train_epochs)
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
    )


def epoch_batches(
    accelerator: Accelerator,
    dataloader,
    collator: MSNViewsCollator,
    streaming: bool,
    state: TrainingState,
    seed: int,
):
    """
    The batches left in `state.epoch`, on the device, counted in `state`. A batch in which any process has no
    readable image is skipped by every process (Sinkhorn and me-max all-reduce), and the epoch ends on every process
    when one runs out of batches. Before each batch, torch's
    generators are seeded by its position in the run, so masks repeat exactly after a resume.
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
        if any_unusable:
            logger.warning("A batch without any readable image on some process: skipped on every process.")
            continue
        seed_batch(seed, state.epoch, state.batches_in_epoch)
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
    the end of an accumulation window, clipping, the optimiser step and the EMA update of the target.

    A window with a non-finite loss, or a non-finite gradient norm, takes no step (every process alike) and counts in
    `state.consecutive_nonfinite`. A step that the fp16 grad scaler skips (it then lowers its scale) takes no EMA
    update and is not counted. `state.completed_steps` grows by one when the step was taken. Returns the output.
    """
    unwrapped = accelerator.unwrap_model(model)
    apply_schedules(optimizer, schedules, state.completed_steps)
    with accelerator.accumulate(model):
        output = model(**batch)
        if all_processes(accelerator, torch.isfinite(output.loss.detach())):
            accelerator.backward(output.loss)
        else:
            state.window_nonfinite = True
        if accelerator.sync_gradients:
            finite, state.window_nonfinite = not state.window_nonfinite, False
            scaler_skipped = False
            if finite:
                grad_norm = accelerator.clip_grad_norm_(clipped_parameters(unwrapped), max_grad_norm or math.inf)
                finite = all_processes(accelerator, torch.isfinite(grad_norm))
                if finite or accelerator.scaler is not None:
                    # The grad scaler itself skips a step with non-finite gradients, and lowers its scale.
                    optimizer.step()
                    scaler_skipped = accelerator.optimizer_step_was_skipped
            if finite and not scaler_skipped:
                unwrapped.update_target_encoder(schedules.ema_momentum(state.completed_steps))
                state.completed_steps += 1
                state.consecutive_nonfinite = 0
            elif scaler_skipped:
                logger.info(f"The fp16 grad scaler skipped step {state.completed_steps} (gradient overflow).")
            else:
                state.consecutive_nonfinite += 1
                logger.warning(
                    f"Non-finite loss or gradient at step {state.completed_steps}: step skipped "
                    f"({state.consecutive_nonfinite} in a row)."
                )
        optimizer.zero_grad(set_to_none=True)
    return output


class MetricsLog:
    """`metrics.jsonl` (main process) and the trackers: one record every `--logging_steps` optimiser steps."""

    def __init__(self, accelerator: Accelerator, path: Path, completed_steps: int, report: bool):
        self.accelerator, self.path, self.report = accelerator, path, report
        self.history = []
        if accelerator.is_main_process and path.exists():
            # A resumed run drops what the interrupted one logged after its checkpoint.
            kept = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            self.history = [m for m in kept if m["step"] <= completed_steps]
            path.write_text("".join(json.dumps(m) + "\n" for m in self.history))
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
    # User errors surface before `setup_run` creates the output folder.
    parse_model_overrides(args)
    if args.model_name_or_path:
        check_model_source(args.model_name_or_path)
    accelerator = setup_run(args)
    start = time.perf_counter()
    output_dir = Path(args.output_dir)
    train_data = build_train_data(data_args, args, accelerator)
    plan = plan_run_length(args, data_args, train_data, accelerator)
    recipe = None
    if not args.model_name_or_path:
        recipe = choose_recipe(args, data_args, train_data, accelerator.num_processes)
        if args.num_warmup_steps is None and args.num_warmup_epochs is None:
            args.num_warmup_steps = recipe["training"].get("num_warmup_steps")
    model, processor = build_model_and_processor(args, data_args, recipe)
    if recipe is not None:
        used = effective_recipe(recipe["name"], args, model, processor)
        accelerator.print(
            f"Recipe {used['name']!r}: {used['backbone']} {used['backbone_kwargs']}, config {recipe['config']}, "
            f"views {recipe['processor']}, warmup {args.num_warmup_steps or args.num_warmup_epochs}"
            f"{' steps' if args.num_warmup_steps else ' epochs'}; written to {output_dir / RECIPE_FILE}"
        )
        if plan is not None:
            used["plan"] = plan.planning_record()
        if accelerator.is_main_process:
            save_recipe(used, output_dir / RECIPE_FILE)
    if accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    collator = MSNViewsCollator(
        processor, train_data.image_column, seed=args.seed, views_on_device=args.views_on_device
    )
    dataloader = build_dataloader(train_data, collator, args)
    optimizer = torch.optim.AdamW(parameter_groups(model), lr=args.learning_rate, weight_decay=args.weight_decay)
    if train_data.streaming:  # each process already reads its own part of the stream
        model, optimizer = accelerator.prepare(model, optimizer)
        steps_per_epoch = None
    else:
        model, optimizer, dataloader = accelerator.prepare(model, optimizer, dataloader)
        # Accelerate also ends an accumulation window at the end of the data: a short last window is a step.
        steps_per_epoch = math.ceil(len(dataloader) / args.gradient_accumulation_steps)
    unwrapped = accelerator.unwrap_model(model)
    # A budget's warmup is a fraction of its planned steps, not epochs that could outlast it.
    schedules = build_schedules(args, unwrapped.config, None if plan is not None else steps_per_epoch)
    if args.report_to != "none":
        accelerator.init_trackers("msn_pretraining", config={k: str(v) for k, v in {**vars(data_args), **vars(args)}.items()})
    state = resume(args.resume_from_checkpoint, accelerator, dataloader, output_dir)
    keeper = BudgetKeeper(accelerator, schedules, plan, state)  # lays the plan's length over the schedules
    global_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    if plan is not None:
        num_images = None if train_data.streaming else len(train_data.dataset)
        accelerator.print(plan.describe(state.completed_steps, global_batch, num_images, describe_geometry(unwrapped)))
    metrics = MetricsLog(accelerator, output_dir / METRICS_FILE, state.completed_steps, args.report_to != "none")
    progress = tqdm(total=schedules.total_steps, initial=state.completed_steps, disable=not accelerator.is_local_main_process)

    model.train()
    keeper.start_clock()
    while state.completed_steps < schedules.total_steps:
        resumed_mid_epoch, epoch_done = state.batches_in_epoch > 0, True
        for batch in epoch_batches(accelerator, dataloader, collator, train_data.streaming, state, args.seed):
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
                save_checkpoint(accelerator, output_dir, state, dataloader, args.checkpoints_total_limit)
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
                save_checkpoint(accelerator, output_dir, state, dataloader, args.checkpoints_total_limit)
    progress.close()
    keeper.finish(state)
    run_info = card_run_info(
        args, data_args, accelerator, state, time.perf_counter() - start, recipe["name"] if recipe else None
    )
    return finish(args, data_args, accelerator, unwrapped, processor, train_data, state, metrics.history, run_info)


def finish(
    args: PretrainingArguments,
    data_args: DataArguments,
    accelerator: Accelerator,
    model: MSNModel,
    processor: MSNImageProcessor,
    train_data: TrainData,
    state: TrainingState,
    history: list[dict],
    run_info: dict,
) -> dict:
    """
    Export the final model at once (main process), then evaluate it: after the last barrier, so that a long
    evaluation cannot time out the other processes, which are done, and a failed one cannot lose the model.
    The model card (`run_info`: see `card_run_info`) is written with the export and rewritten with the results; a
    summary line ends the run.
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
        if history:
            plot_loss_curve(history, output_dir / "loss_curve.png")
        write_model_card(output_dir, model, processor, run_info)
        (output_dir / "train_results.json").write_text(json.dumps(results, indent=2))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if not accelerator.is_main_process:
        return results
    evaluation = run_final_evaluation(args, train_data, model, processor, output_dir)
    if evaluation:
        results["eval"] = evaluation
        write_model_card(output_dir, model, processor, run_info, evaluation)
        (output_dir / "train_results.json").write_text(json.dumps(results, indent=2))
    if args.push_to_hub:
        push_to_hub(output_dir, args.hub_model_id, args.hub_token, args.hub_private_repo)
    print(f"\nmsn-pretrain: model, processor and card in {output_dir} ({state.completed_steps} steps).")
    if state.plan:
        global_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
        print(f"  {BudgetPlan.from_dict(state.plan).summary(state.completed_steps, global_batch)}")
    if evaluation:
        print(f"  {headline(evaluation)} (all settings in {output_dir / 'README.md'}).")
    print(f"  Next: msn-evaluate --model_name_or_path {output_dir} --baselines random pixels")
    return results


def run_final_evaluation(
    args: PretrainingArguments, train_data: TrainData, model: MSNModel, processor: MSNImageProcessor, output_dir: Path
) -> dict:
    """Low-shot evaluation of the target encoder on the held-out labelled images; writes `eval_results.json`."""
    from .evaluation import evaluate_lowshot

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
    return evaluate_lowshot(model, train, test, processor, output_file=str(output_dir / "eval_results.json"))


def main(argv: list[str] | None = None) -> dict:
    return train(*parse_args(argv))


if __name__ == "__main__":
    from .cli import pretrain

    pretrain()
