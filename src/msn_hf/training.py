"""
The MSN training recipe that both loops run (the Accelerate loop of `pretraining.py` and `MSNTrainer` of
`trainer_msn.py`): the checks of their arguments, the per-step schedules, the AdamW optimiser and its parameter
groups, the parameters that are clipped, the views collator and the indexed dataset that seeds it, the per-batch
seed, the decisions every process takes alike about a batch and about a step, the mean over an accumulation window,
and the stop for data without a readable image. Written once, so that the two loops run the same recipe by
construction.
"""

import hashlib
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image

from .collectives import host_sum
from .data import decode_image
from .image_processing_msn import MSNImageProcessor
from .modeling_msn import MSNModel

INDEX_KEY = "__index__"
# The bytes of decoded images an [`IndexedDataset`] keeps per process when the loops have no DataLoader workers: all
# of a small data set (the built-in digits take 4.4 MB, 60,000 images of 28 px 141 MB), the first rows read of a
# larger one.
DECODED_IMAGE_CACHE_BYTES = 512 * 2**20


@dataclass
class MSNSchedules:
    """
    The three per-step schedules of the original recipe, laid over `stretch * total_steps` steps so that training
    stops at `1 / stretch` of each: learning rate (linear warmup then cosine), weight decay (cosine, rising) and
    EMA momentum (linear). `keep_warmup`: the warmup was typed, so that it keeps its length when a time budget lays
    the schedules over another total (see `budget.relay_schedules`); a recipe's warmup follows the total.
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
    keep_warmup: bool = False

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


def check_recipe_arguments(args) -> None:
    """
    The rules both loops' arguments follow (`PretrainingArguments` and `MSNTrainingArguments` call this from
    `__post_init__`), so that a value one loop refuses the other refuses too, with the same line:
    `ValueError("--<flag> must be <expected>, got <value>.")`. NaN is refused wherever a bound is.
    """

    def fail(name: str, expected: str) -> None:
        raise ValueError(f"--{name} must be {expected}, got {getattr(args, name)!r}.")

    for name in ("learning_rate", "warmup_start_learning_rate", "final_learning_rate", "weight_decay",
                 "final_weight_decay"):  # fmt: skip
        # None: not given, the recipe of the run chooses (e.g. the continue recipe's lower learning rate).
        if getattr(args, name) is not None and not getattr(args, name) >= 0:
            fail(name, ">= 0")
    # A negative norm would flip every clipped gradient (`clip_grad_norm_` scales by max_norm / norm): ascent.
    if not args.max_grad_norm >= 0:
        fail("max_grad_norm", ">= 0 (0: no clipping)")
    # The schedules are laid over `stretch * steps`: below 1, training would run past their end.
    if not args.schedule_stretch >= 1:
        fail("schedule_stretch", ">= 1")
    for name in ("max_nonfinite_steps", "max_skipped_batches"):
        if getattr(args, name) <= 0:
            fail(name, "a positive number of steps" if name == "max_nonfinite_steps" else "a positive number of batches")


def parameter_groups(model: MSNModel) -> list[dict]:
    """AdamW groups: weight decay on matrices only; none on biases, norms, other 1-D tensors and the prototypes."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith(".bias") or name == "prototypes" else decay).append(param)
    return [{"params": decay, "name": "decay"}, {"params": no_decay, "name": "no_decay", "weight_decay": 0.0}]


# Devices on which torch (>= 2.4) has a fused AdamW kernel.
_FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def adamw(model: MSNModel, device: torch.device, **hyperparameters) -> torch.optim.AdamW:
    """
    AdamW over `parameter_groups(model)` for a run on `device`, with torch's fused kernel there when it has one: one
    kernel over all parameters instead of torch's default on the CPU, a Python loop over them (3.5x faster for the
    digits model, 4x for ViT-S: `benchmarks/optimizer_step.py`). Transformers' `Trainer` defaults to the same kernel
    (`optim="adamw_torch_fused"`). `hyperparameters` go to `torch.optim.AdamW`.
    """
    fused = True if torch.device(device).type in _FUSED_ADAMW_DEVICES else None
    return torch.optim.AdamW(parameter_groups(model), fused=fused, **hyperparameters)


def apply_schedules(optimizer: torch.optim.Optimizer, schedules: MSNSchedules, step: int) -> None:
    for group in optimizer.param_groups:
        group["lr"] = schedules.lr(step)
        if group.get("name") == "decay":
            group["weight_decay"] = schedules.wd(step)


def clipped_parameters(model: MSNModel) -> list[torch.nn.Parameter]:
    """The parameters whose gradients are clipped: the anchor encoder and projection head, not the prototypes."""
    return [*model.encoder.parameters(), *model.projection_head.parameters()]


class IndexedDataset(torch.utils.data.Dataset):
    """
    A map-style dataset whose rows carry their index, so that the views of a row can be seeded by it.

    With `cache_bytes`, it decodes the images of `image_column` itself and keeps the rows it has read, each image an
    RGB `uint8` tensor `(3, H, W)` (None when unreadable), until their images take `cache_bytes`: later epochs then
    neither read nor decode those rows (6-8 % of a step of a small model on small images, on a CPU). Their views
    are the same as those of the images decoded again. Worth it in the training process only: DataLoader workers
    start again every epoch, with an empty cache.
    """

    def __init__(self, dataset: datasets.Dataset, image_column: str | None = None, cache_bytes: int = 0):
        if cache_bytes and image_column is None:
            raise ValueError(f"IndexedDataset: `cache_bytes` {cache_bytes} needs the `image_column` to decode.")
        self.dataset = dataset
        self.image_column = image_column
        self.cache_bytes = cache_bytes
        self.cached_bytes = 0
        self.cache: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        if index in self.cache:
            return self.cache[index]
        row = {**self.dataset[index], INDEX_KEY: index}
        if self.cached_bytes < self.cache_bytes:
            image = _image_tensor(decode_image(row[self.image_column]))
            row[self.image_column] = image
            size = 0 if image is None else image.numel()
            if self.cached_bytes + size <= self.cache_bytes:
                self.cache[index] = row
                self.cached_bytes += size
        return row


def kept_image_bytes(dataloader_num_workers: int) -> int:
    """The `cache_bytes` of a loop's [`IndexedDataset`]: `DECODED_IMAGE_CACHE_BYTES` in the training process, none
    with DataLoader workers (they start again every epoch, with an empty cache)."""
    return DECODED_IMAGE_CACHE_BYTES if dataloader_num_workers == 0 else 0


def _image_tensor(image: Image.Image | None) -> torch.Tensor | None:
    """An RGB PIL image as a `uint8` tensor `(3, H, W)` in channels-last memory, the layout the views are cut from."""
    return None if image is None else torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


def _decoded_image(value) -> torch.Tensor | Image.Image | None:
    """A row's image as the processor takes it: what an [`IndexedDataset`] decoded (a tensor, or None when
    unreadable) as it is, anything else decoded by `decode_image` (None when unreadable)."""
    return value if value is None or isinstance(value, torch.Tensor) else decode_image(value)


def _row_key(row: dict, image_column: str):
    """What identifies a row: its index in a map-style dataset, else its file path or a hash of its bytes."""
    if INDEX_KEY in row:
        return row[INDEX_KEY]
    value = row[image_column]
    if isinstance(value, dict) and value.get("path") and value.get("bytes") is None:
        return value["path"]
    if isinstance(value, dict) and value.get("bytes") is not None:
        return hashlib.blake2b(value["bytes"], digest_size=16).hexdigest()
    return None


class MSNViewsCollator:
    """
    Collate rows into MSN views: decodes each image (unreadable ones are skipped and counted in `num_skipped`) and
    runs the image processor's view mode on the batch. Picklable, so it runs inside DataLoader workers.

    The views are drawn from a generator seeded by `(seed, epoch, rows)`, where a row is named by its index in an
    [`IndexedDataset`], else by its file path or the hash of its bytes (streaming): the same batch gets the same views
    whichever process, worker or resumed run draws it.

    With `views_on_device`, the collator only decodes and makes the `uint8` canvases (`canvas`, with the batch's
    `view_seed`); `render_views` then draws the views in the training process, on its device, from that seed.
    """

    def __init__(
        self, image_processor: MSNImageProcessor, image_column: str, seed: int = 0, views_on_device: bool = False
    ):
        self.image_processor = image_processor
        self.image_column = image_column
        self.seed = seed
        self.views_on_device = views_on_device
        self.epoch = 0

    def _view_seed(self, rows: list[dict]) -> int | None:
        keys = [_row_key(row, self.image_column) for row in rows]
        if any(key is None for key in keys):
            return None
        digest = hashlib.blake2b(repr((self.seed, self.epoch, keys)).encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little")

    @staticmethod
    def _generator(seed: int | None) -> torch.Generator | None:
        return None if seed is None else torch.Generator().manual_seed(seed)

    def __call__(self, rows: list[dict]) -> dict:
        images = [_decoded_image(row[self.image_column]) for row in rows]
        valid = [image for image in images if image is not None]
        batch = {"num_skipped": len(images) - len(valid)}
        if valid and self.views_on_device:
            batch.update(canvas=self.image_processor.make_canvas(valid), view_seed=self._view_seed(rows))
        elif valid:
            generator = self._generator(self._view_seed(rows))
            batch.update(self.image_processor(valid, return_views=True, generator=generator, return_tensors="pt"))
        return batch

    def render_views(self, batch: dict, device: torch.device) -> dict:
        """A canvas batch with its views drawn on `device` (a batch with views already is returned as it is)."""
        if "canvas" not in batch:
            return batch
        canvas, generator = batch.pop("canvas"), self._generator(batch.pop("view_seed"))
        views = self.image_processor(canvas, return_views=True, generator=generator, device=device, return_tensors="pt")
        return {**batch, **views}


def batch_seed(seed: int, epoch: int, batch_in_epoch: int, process_index: int) -> int:
    """
    The 63-bit seed of one batch of one process: a hash of `(seed, epoch, batch_in_epoch, process_index)`, so that
    every process and every batch draws its own stream (a sum such as `seed + batch + process` would give process r
    at batch b the stream of process 0 at batch b + r).
    """
    digest = hashlib.blake2b(repr((seed, epoch, batch_in_epoch, process_index)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def seed_batch(seed: int, epoch: int, batch_in_epoch: int, process_index: int) -> None:
    """
    Seed torch's generators (every device), Python's and NumPy's by a batch's place in the run and the process: its
    masks and dropout differ from every other process's and repeat exactly after a resume.
    """
    value = batch_seed(seed, epoch, batch_in_epoch, process_index)
    torch.manual_seed(value)
    random.seed(value)
    np.random.seed(value % 2**32)  # NumPy's legacy seed has 32 bits


def batch_decisions(accelerator: Accelerator, batch: dict | None) -> tuple[bool, int, bool]:
    """
    What every process decides alike about its next batch (`None`: it ran out), in one reduce: whether any process
    ran out, how many unreadable images all processes skipped (`num_skipped`, popped from `batch`), and whether any
    process's batch has no readable image left.

    The facts are the host's, so they are reduced on the CPU (over gloo when the accelerators use NCCL): reading a
    reduce back from an accelerator would wait for all the work queued on it, once per batch.
    """
    ran_out = batch is None
    skipped = 0 if ran_out else batch.pop("num_skipped", 0)
    unusable = not ran_out and "pixel_values" not in batch and "canvas" not in batch
    ran_out, skipped, unusable = host_sum(accelerator, [ran_out, skipped, unusable])
    return ran_out > 0, int(skipped), unusable > 0


def average_window_gradients(parameters: Iterable[torch.nn.Parameter], divided_by: int, micro_batches: int) -> None:
    """
    The gradient of an accumulation window is the mean over its micro-batches, in both loops. Each micro-batch's
    loss was divided by `divided_by` before its backward (Accelerate divides by `gradient_accumulation_steps`); a
    window of `micro_batches` != `divided_by` (the last of an epoch whose batches are not a multiple of it) has its
    summed gradients rescaled by `divided_by / micro_batches`. Call before clipping.
    """
    if micro_batches in (0, divided_by):
        return
    gradients = [p.grad for p in parameters if p.grad is not None]
    if gradients:
        torch._foreach_mul_(gradients, divided_by / micro_batches)


def window_decision(
    accelerator: Accelerator, loss_nonfinite: torch.Tensor | bool, grad_norm: torch.Tensor | float
) -> tuple[bool, bool]:
    """
    The step's decision, taken alike by every process: whether any process had a non-finite loss in the window
    (`loss_nonfinite`, gathered on the device over its micro-batches) and whether any has a non-finite gradient norm.
    One reduce and the step's only read of the device by the host.
    """
    device = accelerator.device
    if not isinstance(loss_nonfinite, torch.Tensor):
        # Filled on the device: a tensor copied from the host would wait for the device's queue.
        loss_nonfinite = torch.full((), bool(loss_nonfinite), device=device)
    if not isinstance(grad_norm, torch.Tensor):
        grad_norm = torch.full((), float(grad_norm), device=device)
    flags = torch.stack([loss_nonfinite.to(device), ~torch.isfinite(grad_norm.to(device))]).float()
    # A sum of failures: `reduce(..., "min")` sums as well on some backends.
    any_loss_nonfinite, any_grad_nonfinite = (accelerator.reduce(flags, "sum") > 0).tolist()
    return any_loss_nonfinite, any_grad_nonfinite


class SkippedBatches:
    """
    The stop for data that gives no usable batch, in both loops: counts the batches skipped in a row (some process
    had no readable image in them) and raises a `ValueError` once they fill a whole epoch, or `max_skipped_batches`
    (a stream, whose epochs have no known length, or a long run of bad data). Every process counts the same batches.
    The count is kept by the loop, with the rest of what its checkpoints save, so that a resumed run goes on counting.
    """

    def __init__(self, max_skipped_batches: int):
        self.max_skipped_batches = max_skipped_batches

    def count(self, in_a_row: int, unusable: bool, batches_per_epoch: int | None, skipped_images: int) -> int:
        """
        After each batch decision, the batches skipped in a row up to this one, from `in_a_row` before it.
        `batches_per_epoch` is None for a stream; `skipped_images` so far, all processes.
        """
        if not unusable:
            return 0
        in_a_row += 1
        window, reason = self.max_skipped_batches, "--max_skipped_batches"
        if batches_per_epoch is not None and batches_per_epoch <= window:
            window, reason = batches_per_epoch, "a whole epoch"
        if in_a_row >= window:
            raise ValueError(
                f"The training data must give every process a readable image at least once in {window} batches in a "
                f"row ({reason}), got {in_a_row} batches without one ({skipped_images} unreadable images "
                "skipped): check the data."
            )
        return in_a_row
