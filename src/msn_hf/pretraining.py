"""
MSN pretraining with Accelerate: one process or many, CPU or GPU, resumable, with the original schedules.

`examples/pretrain_msn.py` and the `msn-pretrain` console script run `main()`; the pieces (schedules, parameter
groups, data collation, checkpoints) are importable and tested on their own.
"""

import argparse
import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, set_seed
from huggingface_hub import HfApi, ModelCard, ModelCardData
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .configuration_msn import MSNConfig
from .data import ImageDataset, decode_image, load_image_dataset
from .image_processing_msn import MSNImageProcessor
from .modeling_msn import MSNModel

logger = get_logger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINING_STATE_FILE = "training_state.json"
METRICS_FILE = "metrics.jsonl"
INDEX_KEY = "__index__"

# The built-in digits are 32 px grey images upscaled from 8 x 8: a small ViT with 8 px patches (2 x 2 of the
# original pixels, and fast enough for ~500 steps in three minutes on two CPU cores), views scaled from 224 / 96 to
# 32 / 16 (blur sigma too), as many prototypes as images in a batch (Sinkhorn spreads a batch over all prototypes),
# and no colour jitter: it only changes the brightness of grey digits, and with it the anchor assignments of such a
# short run stay uniform (cross-entropy stuck at log K; see benchmarks/RESULTS.md).
DIGITS_DEFAULTS = dict(
    backbone="vit_tiny_patch16_224",
    backbone_kwargs=dict(img_size=32, patch_size=8, embed_dim=128, depth=4, num_heads=4),
    config=dict(
        image_size=32,
        focal_image_size=16,
        projection_hidden_size=512,
        projection_output_size=128,
        num_prototypes=64,
        ema_momentum=0.99,
    ),
    processor=dict(
        size={"shortest_edge": 32},
        crop_size=32,
        focal_crop_size=16,
        num_focal_views=2,
        blur_sigma=(0.02, 0.3),
        color_jitter_probability=0.0,
    ),
    training=dict(num_train_epochs=22, per_device_train_batch_size=64, num_warmup_epochs=1),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Pretrain a Vision Transformer with Masked Siamese Networks.")
    data = parser.add_argument_group("data (none given: the built-in scikit-learn digits, offline)")
    data.add_argument("--dataset_name", help="A Hub dataset id, or a folder written by `Dataset.save_to_disk`.")
    data.add_argument("--dataset_config_name")
    data.add_argument("--train_dir", help="A folder of images (the `imagefolder` layout).")
    data.add_argument("--train_split", default="train")
    data.add_argument("--eval_split", default="test", help="Labelled split for the final low-shot evaluation.")
    data.add_argument("--image_column_name", help="Detected from the features when omitted.")
    data.add_argument("--label_column_name", help="Detected from the features when omitted.")
    data.add_argument("--max_train_samples", type=int)
    data.add_argument("--streaming", action="store_true", help="Iterate without downloading (needs --max_train_steps).")
    data.add_argument("--dataloader_num_workers", type=int, default=0)

    model = parser.add_argument_group("model")
    model.add_argument("--model_name_or_path", help="Continue from an MSN checkpoint folder or Hub id.")
    model.add_argument("--backbone", help="timm ViT name (default: vit_small_patch16_224, or a small ViT for digits).")
    model.add_argument("--backbone_kwargs", type=json.loads, help='JSON, e.g. \'{"img_size": 32, "patch_size": 4}\'.')
    model.add_argument("--config_overrides", help="Comma-separated MSNConfig fields, e.g. mask_ratio=0.3,temperature=0.1.")
    model.add_argument("--num_anchor_views", type=int)
    model.add_argument("--num_focal_views", type=int)

    optim = parser.add_argument_group("optimisation (defaults: the original ViT-S/16 recipe)")
    optim.add_argument("--learning_rate", type=float, default=1e-3, help="Peak learning rate after warmup.")
    optim.add_argument("--warmup_start_learning_rate", type=float, default=2e-4)
    optim.add_argument("--final_learning_rate", type=float, default=1e-6)
    optim.add_argument("--weight_decay", type=float, default=0.04, help="Start of the cosine weight-decay schedule.")
    optim.add_argument("--final_weight_decay", type=float, default=0.4)
    optim.add_argument("--schedule_stretch", type=float, default=1.25, help="Schedules span stretch x the real steps.")
    optim.add_argument("--max_grad_norm", type=float, default=3.0, help="Clipping of encoder and head gradients.")
    optim.add_argument("--num_train_epochs", type=int, default=None)
    optim.add_argument("--max_train_steps", type=int, help="Overrides the epochs.")
    optim.add_argument("--per_device_train_batch_size", type=int, default=None)
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1)
    optim.add_argument("--num_warmup_steps", type=int, help="Overrides --num_warmup_epochs.")
    optim.add_argument("--num_warmup_epochs", type=float, default=None)
    optim.add_argument("--max_nonfinite_steps", type=int, default=5, help="Stop after this many bad steps in a row.")
    optim.add_argument("--seed", type=int, default=42)
    optim.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], help="Default: the Accelerate config.")

    run = parser.add_argument_group("outputs")
    run.add_argument("--output_dir", default="outputs/msn")
    run.add_argument("--overwrite_output_dir", action="store_true")
    run.add_argument("--checkpointing_steps", help="Save the training state every N steps, or 'epoch'.")
    run.add_argument("--resume_from_checkpoint", help="A checkpoint folder, or 'latest' in --output_dir.")
    run.add_argument("--checkpoints_total_limit", type=int, default=2)
    run.add_argument("--logging_steps", type=int, default=10)
    run.add_argument("--report_to", default="none", help="Accelerate trackers: tensorboard, wandb, all, none.")
    run.add_argument("--skip_evaluation", action="store_true", help="No low-shot evaluation at the end.")
    run.add_argument("--push_to_hub", action="store_true")
    run.add_argument("--hub_model_id")
    run.add_argument("--hub_token")
    run.add_argument("--hub_private_repo", action="store_true")
    args = parser.parse_args(argv)

    if args.dataset_name and args.train_dir:
        parser.error("give either --dataset_name or --train_dir, not both")
    if args.streaming and args.max_train_steps is None:
        parser.error("--streaming needs --max_train_steps (an iterable dataset has no length)")
    if args.checkpointing_steps not in (None, "epoch") and not str(args.checkpointing_steps).isdigit():
        parser.error(f"--checkpointing_steps must be a number of steps or 'epoch', got {args.checkpointing_steps!r}")
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id")
    args.use_builtin_data = args.dataset_name is None and args.train_dir is None
    defaults = DIGITS_DEFAULTS["training"] if args.use_builtin_data else dict(
        num_train_epochs=800, per_device_train_batch_size=64, num_warmup_epochs=15
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


# --- schedules ---------------------------------------------------------------------------------------------------


@dataclass
class MSNSchedules:
    """
    The three per-step schedules of the original recipe, laid over `stretch * total_steps` steps so that training
    stops at `1 / stretch` of each: learning rate (linear warmup then cosine), weight decay (cosine, rising) and
    EMA momentum (linear).
    """

    total_steps: int
    warmup_steps: int
    learning_rate: float = 1e-3
    warmup_start_learning_rate: float = 2e-4
    final_learning_rate: float = 1e-6
    weight_decay: float = 0.04
    final_weight_decay: float = 0.4
    momentum: float = 0.996
    final_momentum: float = 1.0
    stretch: float = 1.25

    @property
    def span(self) -> float:
        return self.stretch * self.total_steps

    def lr(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_start_learning_rate + (self.learning_rate - self.warmup_start_learning_rate) * (
                step / self.warmup_steps
            )
        progress = (step - self.warmup_steps) / max(1.0, self.span - self.warmup_steps)
        return self.final_learning_rate + (self.learning_rate - self.final_learning_rate) * 0.5 * (
            1.0 + math.cos(math.pi * progress)
        )

    def wd(self, step: int) -> float:
        return self.final_weight_decay + (self.weight_decay - self.final_weight_decay) * 0.5 * (
            1.0 + math.cos(math.pi * step / self.span)
        )

    def ema_momentum(self, step: int) -> float:
        return self.momentum + (self.final_momentum - self.momentum) * step / self.span


def parameter_groups(model: MSNModel) -> list[dict]:
    """AdamW groups: weight decay on matrices only; none on biases, norms, other 1-D tensors and the prototypes."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith(".bias") or name == "prototypes" else decay).append(param)
    return [{"params": decay, "name": "decay"}, {"params": no_decay, "name": "no_decay", "weight_decay": 0.0}]


def apply_schedules(optimizer: torch.optim.Optimizer, schedules: MSNSchedules, step: int) -> None:
    for group in optimizer.param_groups:
        group["lr"] = schedules.lr(step)
        if group.get("name") == "decay":
            group["weight_decay"] = schedules.wd(step)


# --- data ----------------------------------------------------------------------------------------------------------


class IndexedDataset(torch.utils.data.Dataset):
    """A map-style dataset whose rows carry their index, so that the views of a row can be seeded by it."""

    def __init__(self, dataset: datasets.Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return {**self.dataset[index], INDEX_KEY: index}


class MSNViewsCollator:
    """
    Collate dataset rows into MSN views: decodes each image (unreadable ones are skipped and counted) and runs the
    image processor's view mode on the batch. Picklable, so it runs inside DataLoader workers.

    Rows from an [`IndexedDataset`] get views drawn from a generator seeded by `(seed, epoch, row indices)`: the
    same batch gets the same views whichever process, worker or resumed run draws it. Other rows use torch's
    global generator.
    """

    def __init__(self, image_processor: MSNImageProcessor, image_column: str, seed: int = 0):
        self.image_processor = image_processor
        self.image_column = image_column
        self.seed = seed
        self.epoch = 0

    def _generator(self, rows: list[dict]) -> torch.Generator | None:
        if not all(INDEX_KEY in row for row in rows):
            return None
        key = repr((self.seed, self.epoch, [row[INDEX_KEY] for row in rows])).encode()
        seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
        return torch.Generator().manual_seed(seed)

    def __call__(self, rows: list[dict]) -> dict:
        images = [decode_image(row[self.image_column]) for row in rows]
        valid = [image for image in images if image is not None]
        batch = {"num_skipped": torch.tensor(len(images) - len(valid))}
        if valid:
            views = self.image_processor(valid, return_views=True, generator=self._generator(rows), return_tensors="pt")
            batch.update(views)
        return batch


def build_train_data(args) -> ImageDataset:
    data = load_image_dataset(
        dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name,
        train_dir=args.train_dir,
        split=args.train_split,
        image_column_name=args.image_column_name,
        label_column_name=args.label_column_name,
        max_samples=args.max_train_samples,
        streaming=args.streaming,
    )
    # Decoding happens in the collator, so that a corrupt file is skipped rather than raising inside `datasets`.
    data.dataset = data.dataset.cast_column(data.image_column, datasets.Image(decode=False))
    if not args.streaming:
        data.dataset = IndexedDataset(data.dataset.with_format(None))
    return data


# --- model ---------------------------------------------------------------------------------------------------------


def parse_config_overrides(text: str | None) -> dict:
    """`"mask_ratio=0.3,mask_strategy=drop"` -> `{"mask_ratio": 0.3, "mask_strategy": "drop"}` (JSON values)."""
    overrides = {}
    for item in filter(None, (text or "").split(",")):
        if "=" not in item:
            raise ValueError(f"--config_overrides items must be key=value, got {item!r}.")
        key, value = (part.strip() for part in item.split("=", 1))
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    unknown = set(overrides) - set(MSNConfig().to_dict())
    if unknown:
        raise ValueError(f"--config_overrides has unknown MSNConfig fields: {sorted(unknown)}.")
    return overrides


def build_model_and_processor(args) -> tuple[MSNModel, MSNImageProcessor]:
    overrides = parse_config_overrides(args.config_overrides)
    digits = args.use_builtin_data and args.backbone is None and args.model_name_or_path is None
    processor_kwargs = dict(DIGITS_DEFAULTS["processor"]) if args.use_builtin_data else {}
    if args.model_name_or_path:
        model = MSNModel.from_pretrained(args.model_name_or_path, **overrides)
        try:
            processor = MSNImageProcessor.from_pretrained(args.model_name_or_path)
        except OSError:
            processor = None
    else:
        config_kwargs = dict(DIGITS_DEFAULTS["config"]) if digits else {}
        config_kwargs.update(overrides)
        backbone = args.backbone or (DIGITS_DEFAULTS["backbone"] if digits else MSNConfig.backbone)
        backbone_kwargs = args.backbone_kwargs or (DIGITS_DEFAULTS["backbone_kwargs"] if digits else {})
        model = MSNModel(MSNConfig(backbone=backbone, backbone_kwargs=backbone_kwargs, **config_kwargs))
        processor = None
    if processor is None:
        config = model.config
        processor_kwargs.setdefault("crop_size", config.image_size)
        processor_kwargs.setdefault("focal_crop_size", config.focal_image_size)
        processor_kwargs.setdefault("size", {"shortest_edge": round(config.image_size * 256 / 224)})
        processor = MSNImageProcessor(**processor_kwargs)
    for name in ("num_anchor_views", "num_focal_views"):
        if getattr(args, name) is not None:
            setattr(processor, name, getattr(args, name))
    return model, processor


# --- checkpoints ---------------------------------------------------------------------------------------------------


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the most steps; temporary folders of interrupted saves never match."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name)) and p.is_dir()]
    found = [(step, path) for step, path in found if (path / TRAINING_STATE_FILE).exists()]
    return max(found)[1] if found else None


def save_checkpoint(accelerator: Accelerator, output_dir: Path, state: dict, total_limit: int | None) -> Path:
    """Accelerate state plus the schedule position, written to `checkpoint-N.tmp` and renamed when complete."""
    final = output_dir / f"checkpoint-{state['completed_steps']}"
    temporary = output_dir / f"checkpoint-{state['completed_steps']}.tmp"
    if accelerator.is_main_process and temporary.exists():
        shutil.rmtree(temporary)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    if accelerator.is_main_process:
        (temporary / TRAINING_STATE_FILE).write_text(json.dumps(state))
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
        if total_limit:
            old = sorted(
                (int(m.group(1)), p) for p in output_dir.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))
            )
            for _, path in old[:-total_limit]:
                shutil.rmtree(path, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# --- outputs -------------------------------------------------------------------------------------------------------


def plot_loss_curve(metrics: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("loss", "loss"), ("prediction_loss", "cross-entropy"), ("me_max_loss", "me-max")):
        ax.plot(steps, [m[key] for m in metrics], label=label)
    ax.set_xlabel("optimisation step")
    ax.set_ylabel("loss")
    ax.set_title("MSN pretraining")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_model_card(args, output_dir: Path, model: MSNModel, results: dict) -> None:
    dataset = args.dataset_name or args.train_dir or "scikit-learn digits (built in)"
    card_data = ModelCardData(
        library_name="transformers",
        tags=["msn", "masked-siamese-networks", "self-supervised", "vision", "image-feature-extraction", "timm"],
        datasets=[args.dataset_name] if args.dataset_name and not os.path.isdir(args.dataset_name) else None,
        pipeline_tag="image-feature-extraction",
    )
    hyperparameters = {k: v for k, v in sorted(vars(args).items()) if k not in ("hub_token",)}
    content = f"""---
{card_data.to_yaml()}
---

# MSN pretrained {model.config.backbone}

A Vision Transformer pretrained with Masked Siamese Networks (Assran et al., ECCV 2022) with `msn_hf`.
The weights hold the anchor and target encoders, both projection heads and the
prototypes; the target encoder is the one to use downstream.

```python
from transformers import AutoModel
model = AutoModel.from_pretrained("{args.hub_model_id or output_dir}", trust_remote_code=True)
embeddings = model(pixel_values).pooler_output
```

## Training data

{dataset}

## Training arguments

```json
{json.dumps(hyperparameters, indent=2, default=str)}
```

## Results

```json
{json.dumps(results, indent=2, default=str)}
```
"""
    ModelCard(content).save(output_dir / "README.md")


def push_to_hub(args, output_dir: Path) -> None:
    api = HfApi(token=args.hub_token)
    repo_id = api.create_repo(args.hub_model_id, private=args.hub_private_repo, exist_ok=True).repo_id
    api.upload_folder(
        repo_id=repo_id,
        folder_path=str(output_dir),
        commit_message="MSN pretraining",
        ignore_patterns=["checkpoint-*", "*.tmp", "runs/*", ".final/*"],
    )


def export_final(model: MSNModel, processor: MSNImageProcessor, output_dir: Path) -> None:
    """`save_pretrained` of model and processor into a temporary folder, then each file moved into `output_dir`."""
    staging = output_dir / ".final"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    processor.save_pretrained(staging)
    for path in staging.iterdir():
        os.replace(path, output_dir / path.name)
    staging.rmdir()


# --- training ------------------------------------------------------------------------------------------------------


def train(args: argparse.Namespace) -> dict:
    """Run MSN pretraining as described by `args` (see `parse_args`); returns the final metrics."""
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_dir=str(output_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    datasets.utils.logging.set_verbosity_warning() if accelerator.is_main_process else datasets.disable_progress_bars()
    set_seed(args.seed)
    if accelerator.is_main_process:
        if args.resume_from_checkpoint is None and output_dir.exists() and any(
            p.name.startswith("checkpoint-") for p in output_dir.iterdir()
        ) and not args.overwrite_output_dir:
            raise ValueError(
                f"--output_dir {str(output_dir)!r} already holds checkpoints: pass --resume_from_checkpoint latest "
                "to continue, or --overwrite_output_dir to start again."
            )
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()

    model, processor = build_model_and_processor(args)
    if accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    train_data = build_train_data(args)
    collator = MSNViewsCollator(processor, train_data.image_column, seed=args.seed)
    dataloader = DataLoader(
        train_data.dataset,
        batch_size=args.per_device_train_batch_size,
        shuffle=not args.streaming,
        drop_last=True,
        collate_fn=collator,
        num_workers=args.dataloader_num_workers,
    )
    optimizer = torch.optim.AdamW(parameter_groups(model), lr=args.learning_rate, weight_decay=args.weight_decay)
    model, optimizer, dataloader = accelerator.prepare(model, optimizer, dataloader)
    unwrapped = accelerator.unwrap_model(model)

    if args.streaming:
        steps_per_epoch = args.max_train_steps
    else:
        steps_per_epoch = max(1, len(dataloader) // args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    num_epochs = math.ceil(max_steps / steps_per_epoch)
    warmup_steps = args.num_warmup_steps
    if warmup_steps is None:
        warmup_steps = round(args.num_warmup_epochs * steps_per_epoch)
    schedules = MSNSchedules(
        total_steps=max_steps,
        warmup_steps=min(warmup_steps, max_steps),
        learning_rate=args.learning_rate,
        warmup_start_learning_rate=args.warmup_start_learning_rate,
        final_learning_rate=args.final_learning_rate,
        weight_decay=args.weight_decay,
        final_weight_decay=args.final_weight_decay,
        momentum=unwrapped.config.ema_momentum,
        final_momentum=unwrapped.config.ema_momentum_end,
        stretch=args.schedule_stretch,
    )
    if args.report_to != "none":
        accelerator.init_trackers("msn_pretraining", config={k: str(v) for k, v in vars(args).items()})

    completed_steps, start_epoch, skip_batches, skipped_images = 0, 0, 0, 0
    checkpoint = None
    if args.resume_from_checkpoint:
        checkpoint = (
            find_latest_checkpoint(output_dir)
            if args.resume_from_checkpoint == "latest"
            else Path(args.resume_from_checkpoint)
        )
    if checkpoint is not None:
        if not (checkpoint / TRAINING_STATE_FILE).exists():
            raise ValueError(f"--resume_from_checkpoint {str(checkpoint)!r} is not a complete checkpoint folder.")
        accelerator.print(f"Resuming from {checkpoint}")
        accelerator.load_state(str(checkpoint))
        state = json.loads((checkpoint / TRAINING_STATE_FILE).read_text())
        completed_steps, start_epoch = state["completed_steps"], state["epoch"]
        skip_batches, skipped_images = state["batches_in_epoch"], state.get("skipped_images", 0)
    elif args.resume_from_checkpoint == "latest":
        accelerator.print(f"No checkpoint in {output_dir}: starting from scratch.")

    metrics_path = output_dir / METRICS_FILE
    metrics_history = []
    if accelerator.is_main_process and metrics_path.exists():
        kept = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
        metrics_history = [m for m in kept if m["step"] <= completed_steps]
        metrics_path.write_text("".join(json.dumps(m) + "\n" for m in metrics_history))

    def checkpoint_state(epoch: int, batches_in_epoch: int) -> dict:
        return dict(
            completed_steps=completed_steps,
            epoch=epoch,
            batches_in_epoch=batches_in_epoch,
            skipped_images=skipped_images,
        )

    progress = tqdm(total=max_steps, initial=completed_steps, disable=not accelerator.is_local_main_process)
    consecutive_nonfinite = 0
    window = dict(images=0, start=time.perf_counter())
    model.train()
    for epoch in range(start_epoch, num_epochs):
        dataloader.set_epoch(epoch)
        collator.epoch = epoch
        active = dataloader
        batches_in_epoch = 0
        if epoch == start_epoch and skip_batches:
            active = accelerator.skip_first_batches(dataloader, skip_batches)
            batches_in_epoch = skip_batches
        for batch in active:
            batches_in_epoch += 1
            skipped_images += int(accelerator.reduce(batch.pop("num_skipped").to(accelerator.device), "sum"))
            if "pixel_values" not in batch:
                logger.warning("A batch had no readable image: skipped.")
                continue
            # Masks (and any other global draw) depend only on the batch's place in the run, as the views do, so
            # that a resumed run repeats the uninterrupted one exactly.
            set_seed(args.seed + 1_000_003 * epoch + batches_in_epoch, device_specific=True)
            apply_schedules(optimizer, schedules, completed_steps)
            with accelerator.accumulate(model):
                output = model(**batch)
                loss = output.loss
                # Every process must take the same decision, or DDP's gradient all-reduce would hang.
                finite = accelerator.reduce((~torch.isfinite(loss.detach())).float(), "sum").item() == 0
                if finite:
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and args.max_grad_norm:
                        accelerator.clip_grad_norm_(
                            [*unwrapped.encoder.parameters(), *unwrapped.projection_head.parameters()],
                            args.max_grad_norm,
                        )
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if not finite:
                consecutive_nonfinite += 1
                logger.warning(f"Non-finite loss at step {completed_steps}: step skipped ({consecutive_nonfinite} in a row).")
                if consecutive_nonfinite >= args.max_nonfinite_steps:
                    last = find_latest_checkpoint(output_dir)
                    raise RuntimeError(
                        f"{consecutive_nonfinite} non-finite losses in a row at step {completed_steps}: stopping. "
                        f"Last good checkpoint: {last or 'none'}. Lower --learning_rate or check the data."
                    )
                continue
            consecutive_nonfinite = 0
            window["images"] += batch["pixel_values"].shape[0] * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            unwrapped.update_target_encoder(schedules.ema_momentum(completed_steps))
            completed_steps += 1
            progress.update(1)

            if completed_steps % args.logging_steps == 0 or completed_steps == max_steps:
                targets = output.target_probs.detach()
                elapsed = time.perf_counter() - window["start"]
                record = dict(
                    step=completed_steps,
                    epoch=epoch,
                    loss=accelerator.reduce(loss.detach(), "mean").item(),
                    prediction_loss=accelerator.reduce(output.prediction_loss.detach(), "mean").item(),
                    me_max_loss=output.me_max_loss.item(),
                    distinct_target_prototypes=int(targets.argmax(dim=-1).unique().numel()),
                    mean_max_target_prob=accelerator.reduce(targets.max(dim=-1).values.mean(), "mean").item(),
                    lr=schedules.lr(completed_steps - 1),
                    weight_decay=schedules.wd(completed_steps - 1),
                    momentum=schedules.ema_momentum(completed_steps - 1),
                    images_per_second=window["images"] / max(elapsed, 1e-9),
                    skipped_images=skipped_images,
                )
                window.update(images=0, start=time.perf_counter())
                if accelerator.is_main_process:
                    metrics_history.append(record)
                    with metrics_path.open("a") as f:
                        f.write(json.dumps(record) + "\n")
                    progress.set_postfix(
                        loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}", m=f"{record['momentum']:.4f}",
                        img_s=f"{record['images_per_second']:.0f}",
                    )
                if args.report_to != "none":
                    accelerator.log({k: v for k, v in record.items() if k != "step"}, step=completed_steps)

            if args.checkpointing_steps not in (None, "epoch") and completed_steps % int(args.checkpointing_steps) == 0:
                save_checkpoint(accelerator, output_dir, checkpoint_state(epoch, batches_in_epoch),
                                args.checkpoints_total_limit)
            if completed_steps >= max_steps:
                break
        if args.checkpointing_steps == "epoch":
            save_checkpoint(accelerator, output_dir, checkpoint_state(epoch + 1, 0), args.checkpoints_total_limit)
        if completed_steps >= max_steps:
            break
    progress.close()
    if skipped_images:
        logger.warning(f"{skipped_images} unreadable images were skipped.")

    accelerator.wait_for_everyone()
    results = dict(completed_steps=completed_steps, skipped_images=skipped_images)
    if metrics_history:
        results["final_loss"] = metrics_history[-1]["loss"]
    if accelerator.is_main_process:
        unwrapped.eval()
        if not args.skip_evaluation:
            results.update(run_lowshot_evaluation(args, unwrapped, processor, output_dir))
        export_final(unwrapped, processor, output_dir)
        if metrics_history:
            plot_loss_curve(metrics_history, output_dir / "loss_curve.png")
        write_model_card(args, output_dir, unwrapped, results)
        (output_dir / "train_results.json").write_text(json.dumps(results, indent=2))
        if args.push_to_hub:
            push_to_hub(args, output_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


def run_lowshot_evaluation(args, model: MSNModel, processor: MSNImageProcessor, output_dir: Path) -> dict:
    """Low-shot evaluation of the target encoder when the data has labels; writes `eval_results.json`."""
    from .evaluation import evaluate_lowshot, load_evaluation_datasets

    if args.streaming:
        logger.info("Streaming dataset: low-shot evaluation skipped.")
        return {}
    try:
        train, test = load_evaluation_datasets(
            args.dataset_name,
            args.dataset_config_name,
            args.train_dir,
            train_split=args.train_split,
            test_split=args.eval_split,
            image_column_name=args.image_column_name,
            label_column_name=args.label_column_name,
        )
    except ValueError as error:  # no labels
        logger.info(f"Low-shot evaluation skipped: {error}")
        return {}
    results = evaluate_lowshot(model, train, test, processor, output_file=str(output_dir / "eval_results.json"))
    return {"eval": results}


def main(argv: list[str] | None = None) -> dict:
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
