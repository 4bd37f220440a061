"""
MSN pretraining with the Transformers `Trainer`: the recipe of `msn-pretrain` (same parameter groups, schedules,
clipping, EMA and views) behind the `Trainer` API, so that callbacks, logging integrations, checkpointing and
`trainer.train(resume_from_checkpoint=True)` work as for any other model.

```python
>>> from msn_hf import MSNConfig, MSNImageProcessor, MSNModel
>>> from msn_hf.trainer_msn import MSNTrainer, MSNTrainingArguments
>>> trainer = MSNTrainer(
...     model=MSNModel(MSNConfig()),
...     args=MSNTrainingArguments(output_dir="outputs/msn", max_steps=1000),
...     train_dataset=dataset,  # a `datasets.Dataset` with an image column
...     image_processor=MSNImageProcessor(),
... )
>>> trainer.train()
```
"""

import json
import logging
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import datasets
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ExportableState, TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import is_datasets_available

from .budget import MIN_PLANNED_STEPS, MSNTimeBudgetCallback, format_duration, parse_duration, time_model_steps
from .data import IMAGE_COLUMN_NAMES, ImageDataset, find_column
from .files import give_default_permissions
from .image_processing_msn import MSNImageProcessor
from .modeling_msn import MSNModel
from .training import (
    IndexedDataset,
    MSNSchedules,
    MSNViewsCollator,
    SkippedBatches,
    apply_schedules,
    average_window_gradients,
    batch_decisions,
    check_recipe_arguments,
    clipped_parameters,
    kept_image_bytes,
    parameter_groups,
    seed_batch,
    window_decision,
)

logger = logging.getLogger(__name__)


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """
    The newest `checkpoint-N` of `output_dir` that the `Trainer` finished writing, or None. The `Trainer` writes a
    checkpoint in place with `trainer_state.json` last, so one cut short by a kill lacks it or holds a torn one;
    it is skipped (with a warning), where `get_last_checkpoint` would resume from it and fail.
    """
    if not os.path.isdir(output_dir):
        return None
    pattern, steps = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$"), {}
    for entry in os.scandir(output_dir):
        if (match := pattern.match(entry.name)) and entry.is_dir():
            steps[entry.path] = int(match.group(1))
    for path in sorted(steps, key=steps.get, reverse=True):
        try:
            with open(os.path.join(path, "trainer_state.json")) as state:
                json.load(state)
            return path
        except (OSError, ValueError):
            logger.warning(f"{path} was cut short (no complete trainer_state.json): not resumed from.")
    return None


@dataclass
class MSNTrainingArguments(TrainingArguments):
    """
    [`TrainingArguments`] with the defaults of the MSN ViT-S/16 recipe and the arguments of its schedules.

    The learning rate warms up linearly from `warmup_start_learning_rate` to `learning_rate` over `warmup_steps`
    (steps, or a fraction of the total when below 1), then follows a cosine to `final_learning_rate`; weight decay
    rises along a cosine from `weight_decay` to `final_weight_decay`; the EMA momentum of the target rises linearly
    from `config.ema_momentum` to `config.ema_momentum_end`. All three are laid over `schedule_stretch` times the
    real number of steps, so training stops at `1 / schedule_stretch` of each. `lr_scheduler_type` is ignored.
    """

    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate, reached after the warmup."})
    warmup_start_learning_rate: float = field(default=2e-4, metadata={"help": "Learning rate of the first step."})
    final_learning_rate: float = field(default=1e-6, metadata={"help": "End of the cosine learning-rate schedule."})
    weight_decay: float = field(default=0.04, metadata={"help": "Start of the cosine weight-decay schedule."})
    final_weight_decay: float = field(default=0.4, metadata={"help": "End of the cosine weight-decay schedule."})
    schedule_stretch: float = field(
        default=1.25, metadata={"help": "The schedules span this many times the real number of steps."}
    )
    warmup_steps: float = field(
        default=15 / 800, metadata={"help": "Warmup steps, or a fraction of all steps when below 1 (15 of 800 epochs)."}
    )
    max_grad_norm: float = field(
        default=3.0, metadata={"help": "Gradient clipping of the encoder and projection head (not the prototypes)."}
    )
    max_nonfinite_steps: int = field(
        default=5, metadata={"help": "Stop after this many steps in a row with a non-finite loss (each is skipped)."}
    )
    max_skipped_batches: int = field(
        default=100,
        metadata={"help": "Stop when this many batches in a row (or a whole epoch) have no readable image on a process."},
    )
    num_train_epochs: float = field(default=800, metadata={"help": "Epochs (800 for ViT-S/16)."})
    max_train_time: str | None = field(
        default=None,
        metadata={
            "help": "Wall-clock budget of training (90s, 15m, 2h, 1d or seconds): a few steps of the model are timed, "
            "`max_steps` is set to fit, and training stops at the budget (`MSNTimeBudgetCallback`)."
        },
    )
    per_device_train_batch_size: int = field(default=64, metadata={"help": "Images per device and step."})
    optim: str = field(
        default="adamw_torch_fused",
        metadata={"help": "Optimizer: AdamW in the recipe, with torch's fused kernel as in the Accelerate loop."},
    )
    dataloader_drop_last: bool = field(default=True, metadata={"help": "Sinkhorn needs full batches."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Ignored: the views collator needs the image column."}
    )
    logging_nan_inf_filter: bool = field(
        default=False,
        metadata={
            "help": "Off: the filter reads every micro-batch's loss back from the device. A window with a non-finite "
            "loss takes no step anyway (it shows in the logged mean loss)."
        },
    )

    def __getstate__(self):
        # The Trainer pickles its arguments into every checkpoint and export (training_args.bin), and `push_to_hub`
        # uploads them: the token stays in this process, for its uploads.
        return {**self.__dict__, "hub_token": None}

    def __post_init__(self):
        super().__post_init__()
        if self.data_seed is None:
            # The Accelerate loop shuffles with the run's seed: the same order for the same seed.
            self.data_seed = self.seed
        check_recipe_arguments(self)
        parse_duration(self.max_train_time, "`max_train_time`")
        if self.max_steps <= 0 and self.max_train_time is None and not self.num_train_epochs > 0:
            raise ValueError(
                f"`num_train_epochs` must be > 0 without `max_steps` or `max_train_time`, got {self.num_train_epochs}."
            )
        if self.max_train_time is not None and self.max_steps > 0:
            raise ValueError(
                f"`max_train_time` sets the run's length: give it without `max_steps`, got max_train_time="
                f"{self.max_train_time!r} and max_steps={self.max_steps}."
            )


class MSNScheduler(torch.optim.lr_scheduler.LRScheduler):
    """
    Sets every group's learning rate and the `"decay"` group's weight decay from [`MSNSchedules`] at each optimiser
    step. `last_epoch` is the index of the step the optimiser's current values are for (0 for the first step), the
    index the Accelerate loop uses; it is saved with the checkpoints, so a resumed run continues the schedules.
    `hold = True` makes the next `step()` keep the position (a step that was not taken).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, schedules: MSNSchedules, last_epoch: int = -1):
        self.schedules = schedules
        self.hold = False
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        return [self.schedules.lr(self.last_epoch)] * len(self.optimizer.param_groups)

    def step(self, epoch: int | None = None) -> None:
        if self.hold:
            self.hold = False
            return
        super().step(epoch)
        apply_schedules(self.optimizer, self.schedules, self.last_epoch)

    def state_dict(self) -> dict:
        # Plain values only: checkpoints are reloaded with `torch.load(weights_only=True)`.
        return {key: value for key, value in super().state_dict().items() if key != "schedules"}


@dataclass
class MSNRunCounts(TrainerCallback, ExportableState):
    """
    What the trainer counts across optimiser steps, saved in each checkpoint's `trainer_state.json` (the Trainer's
    `stateful_callbacks`, written with the rest of its state), so that a resumed run goes on counting where it
    stopped, as `msn-pretrain` does.

    Args:
        skipped_images: images that could not be read, since the start of the run.
        skipped_batches_in_a_row: batches without a readable image on some process, in a row.
        nonfinite_in_a_row: accumulation windows in a row that took no step (non-finite, or a skipped batch).
        unreadable_in_a_row: those of them with a skipped batch.
    """

    skipped_images: int = 0
    skipped_batches_in_a_row: int = 0
    nonfinite_in_a_row: int = 0
    unreadable_in_a_row: int = 0

    def state(self) -> dict:
        return {"args": {}, "attributes": asdict(self)}

    def on_train_begin(self, args, state, control, **kwargs):
        saved = state.stateful_callbacks.get(type(self).__name__) if state.global_step else None
        counts = saved["attributes"] if isinstance(saved, dict) else {}  # a checkpoint without them starts at 0
        for count in fields(self):
            setattr(self, count.name, counts.get(count.name, 0))


class _MSNStepHooks(TrainerCallback):
    """The trainer's own bookkeeping: epoch and batch position (views and masks), and the EMA update."""

    def __init__(self, trainer: "MSNTrainer"):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, train_dataloader=None, **kwargs):
        # The Trainer's own arithmetic for where a (resumed) run stands.
        num_batches = len(train_dataloader)
        accumulation = args.gradient_accumulation_steps
        steps_per_epoch = max(num_batches // accumulation + int(num_batches % accumulation > 0), 1)
        epoch = state.global_step // steps_per_epoch
        self.trainer._epoch = epoch
        self.trainer._batches_in_epoch = (state.global_step - epoch * steps_per_epoch) * accumulation
        self.trainer._batches_per_epoch = num_batches
        if isinstance(self.trainer.data_collator, MSNViewsCollator):
            self.trainer.data_collator.epoch = epoch

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._decide_step()

    def on_optimizer_step(self, args, state, control, **kwargs):
        trainer = self.trainer
        if trainer.accelerator.optimizer_step_was_skipped:
            return  # the AMP grad scaler found inf / NaN gradients; the Trainer does not step the scheduler then
        if not trainer._step_taken:
            trainer.lr_scheduler.hold = True  # no EMA update and the same schedule position for the next window
            return
        step = trainer.lr_scheduler.last_epoch  # not stepped yet: the index of this step's learning rate
        momentum = trainer.lr_scheduler.schedules.ema_momentum(step)
        trainer.accelerator.unwrap_model(trainer.model_wrapped).update_target_encoder(momentum)
        decay = next(g for g in trainer.optimizer.param_groups if g.get("name") == "decay")
        trainer._step_values = dict(weight_decay=decay["weight_decay"], momentum=momentum)


class MSNTrainer(Trainer):
    """
    A [`Trainer`] that pretrains an [`MSNModel`] with the recipe of `msn-pretrain`:

    - AdamW on [`parameter_groups`]: no weight decay on biases, norms, other 1-D tensors and the prototypes; the
      target branch is not optimised;
    - per-step learning rate, weight decay and EMA momentum from [`MSNSchedules`] (see [`MSNTrainingArguments`]),
      step 0 being the first optimiser step;
    - gradients of the encoder and projection head clipped to `max_grad_norm` (the prototypes are not clipped);
    - after each optimiser step, and only then (not per micro-batch, not when the AMP grad scaler skipped the
      step), the EMA update of the target encoder and head;
    - views drawn by [`MSNViewsCollator`] from `(seed, epoch, row indices)` and masks from a seed reset before each
      batch from its place in the run, so the same seed gives the same run as `msn-pretrain`, resumed or not;
    - the gradient of an accumulation window is the mean over its micro-batches, a short last window of an epoch
      included ([`average_window_gradients`]);
    - an accumulation window with a non-finite loss or gradient norm on any process takes no step (no update, no
      EMA, same schedule position); so does a window with a batch skipped because some process had no readable
      image in it. `max_nonfinite_steps` such windows in a row stop the run (`RuntimeError`), and so do skipped
      batches that fill a whole epoch or `max_skipped_batches` in a row (`ValueError`, [`SkippedBatches`]). The
      Trainer still counts such windows in `global_step`. These counts and the skipped images are saved with each
      checkpoint ([`MSNRunCounts`]), so a resumed run stops where a whole one would;
    - the host reads the device once per optimiser step, for that decision ([`window_decision`]).

    Args:
        model ([`MSNModel`]): the model to pretrain.
        args ([`MSNTrainingArguments`]): the run, with the schedules' arguments.
        train_dataset (`datasets.Dataset` or [`~msn_hf.data.ImageDataset`]): images, undecoded or decoded; rows
            that cannot be decoded are skipped and counted (`skipped_images` in the logs).
        image_processor ([`MSNImageProcessor`]): draws the views; saved with every checkpoint.
        image_column (`str`, *optional*): the image column; detected from the features when omitted.
        **kwargs: other [`Trainer`] arguments (`callbacks`, ...). `data_collator` replaces the views collator.
    """

    def __init__(
        self,
        model: MSNModel,
        args: MSNTrainingArguments,
        train_dataset: datasets.Dataset | ImageDataset,
        image_processor: MSNImageProcessor,
        image_column: str | None = None,
        **kwargs,
    ):
        if not isinstance(model, MSNModel):
            raise ValueError(f"`model` must be an MSNModel, got {type(model).__name__}.")
        if not isinstance(args, MSNTrainingArguments):
            raise ValueError(
                f"`args` must be MSNTrainingArguments (the schedules need their fields), got {type(args).__name__}."
            )
        if args.dataloader_persistent_workers:
            raise ValueError("`dataloader_persistent_workers` would keep each worker's views at the first epoch.")
        if args.remove_unused_columns:
            logger.info("MSNTrainer sets `remove_unused_columns=False`: the views collator reads the image column.")
            args.remove_unused_columns = False
        if isinstance(train_dataset, ImageDataset):
            image_column = image_column or train_dataset.image_column
            train_dataset = train_dataset.dataset
        if is_datasets_available() and isinstance(train_dataset, datasets.Dataset):
            image_column = find_column(train_dataset.features, image_column, datasets.Image, IMAGE_COLUMN_NAMES, "image")
            if image_column is None:
                raise ValueError(
                    f"`image_column` was not given and no image column was found among {train_dataset.column_names}."
                )
            # Decoding happens in the collator, so that an unreadable file is skipped rather than raising.
            train_dataset = train_dataset.cast_column(image_column, datasets.Image(decode=False)).with_format(None)
        elif image_column is None:
            raise ValueError("`image_column` is required when `train_dataset` is not a `datasets.Dataset`.")
        if torch.cuda.is_available() and args.world_size > 1:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        kwargs.setdefault("data_collator", MSNViewsCollator(image_processor, image_column, seed=args.seed))
        kwargs.setdefault("processing_class", image_processor)
        # Decoded images are kept for the views collator only: another collator is given the rows as they are.
        views = isinstance(kwargs["data_collator"], MSNViewsCollator)
        cache_bytes = kept_image_bytes(args.dataloader_num_workers) if views else 0
        train_dataset = IndexedDataset(train_dataset, image_column, cache_bytes)
        super().__init__(model=model, args=args, train_dataset=train_dataset, **kwargs)
        self.add_callback(_MSNStepHooks(self))
        self.add_callback(MSNRunCounts())
        self._epoch, self._batches_in_epoch = 0, 0
        # The window's losses' finiteness stays on the device until `_decide_step`.
        self._window_nonfinite, self._window_micro_batches, self._step_taken = False, 0, False
        # A window with a skipped micro-batch may miss its gradient all-reduce (DDP syncs on the last one only).
        self._window_skipped_batch = False
        self._batches_per_epoch = None
        self._skipped_batches = SkippedBatches(args.max_skipped_batches)
        self._grad_norm = None
        self._step_values, self._batch_losses = {}, {}
        self._budget = None
        if args.max_train_time is not None:
            self._budget = MSNTimeBudgetCallback(parse_duration(args.max_train_time, "`max_train_time`"))
            self.add_callback(self._budget)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """
        [`Trainer.train`]; `resume_from_checkpoint=True` resumes from the newest complete checkpoint
        ([`last_complete_checkpoint`]), and with `max_train_time`, `max_steps` is first set to the steps that fit the
        budget.
        """
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(
                    f"`resume_from_checkpoint=True` needs a complete checkpoint in `output_dir`, got none in "
                    f"{self.args.output_dir}."
                )
        if self._budget is not None:
            self.args.max_steps = self._steps_in_budget(resume_from_checkpoint)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    @property
    def _counts(self) -> MSNRunCounts:
        """The run's counts (skipped images, windows skipped in a row)."""
        # Looked up each time: `restore_callback_states_from_checkpoint` replaces the callback by a restored copy.
        return next(callback for callback in self.callback_handler.callbacks if isinstance(callback, MSNRunCounts))

    def _steps_in_budget(self, checkpoint: str | None) -> int:
        """The steps of the run's plan: a resumed run's as saved, or as many as fit when a few of them are timed."""
        if checkpoint:
            return TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json")).max_steps
        loader = torch.utils.data.DataLoader(
            self.train_dataset, batch_size=self._train_batch_size, shuffle=True, drop_last=True,
            collate_fn=self.data_collator, num_workers=self.args.dataloader_num_workers,
        )  # fmt: skip
        seconds = time_model_steps(self.accelerator, self.model, loader, self.args.seed,
                                   self.args.gradient_accumulation_steps, self._prepare_inputs)  # fmt: skip
        budget = self._budget.budget_seconds
        steps = int(budget // seconds)
        if steps < MIN_PLANNED_STEPS:
            raise ValueError(
                f"`max_train_time` {self.args.max_train_time} fits {steps} steps of {seconds:.3g} s on this machine; "
                f"the schedules need at least {MIN_PLANNED_STEPS}: give a longer budget, got "
                f"{self.args.max_train_time!r}."
            )
        self._budget.check_every = max(1, min(round(1.0 / seconds), steps // 100))
        logger.info(f"Time budget {format_duration(budget)}: {steps} steps at {seconds:.3g} s/step.")
        return steps

    def _msn_model(self) -> MSNModel:
        return self.accelerator.unwrap_model(self.model_wrapped)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model or self.model)
            if {"params", "model", "optimizer_dict"} & set(optimizer_kwargs) or not isinstance(optimizer_cls, type):
                raise ValueError(f"MSNTrainer needs a torch optimizer over parameter groups, got optim={self.args.optim!r}.")
            optimizer_kwargs = {**optimizer_kwargs, "weight_decay": self.args.weight_decay}
            self.optimizer = optimizer_cls(parameter_groups(model or self.model), **optimizer_kwargs)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if self.lr_scheduler is None:
            config = self.model.config
            schedules = MSNSchedules(
                total_steps=num_training_steps,
                warmup_steps=min(self.args.get_warmup_steps(num_training_steps), num_training_steps),
                learning_rate=self.args.learning_rate,
                warmup_start_learning_rate=self.args.warmup_start_learning_rate,
                final_learning_rate=self.args.final_learning_rate,
                weight_decay=self.args.weight_decay,
                final_weight_decay=self.args.final_weight_decay,
                momentum=config.ema_momentum,
                final_momentum=config.ema_momentum_end,
                stretch=self.args.schedule_stretch,
            )
            self.lr_scheduler = MSNScheduler(optimizer or self.optimizer, schedules)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def _window_gradient_norm(self, max_norm: float) -> torch.Tensor:
        """The window's mean gradient, then the encoder and projection head clipped to `max_norm`; their norm."""
        model = self._msn_model()
        if self._window_micro_batches:
            # `training_step` divided each loss by the length of the window Transformers fetched: the mean already,
            # unless a micro-batch was skipped (and then no step is taken).
            average_window_gradients(
                model.parameters(), self.current_gradient_accumulation_steps, self._window_micro_batches
            )
        self._grad_norm = self.accelerator.clip_grad_norm_(clipped_parameters(model), max_norm)
        return self._grad_norm

    def _clip_grad_norm(self, model):
        """Clip the encoder and projection head only, as the recipe does; returns their norm before clipping."""
        return self._window_gradient_norm(self.args.max_grad_norm)

    def _get_grad_norm(self, model, grad_norm=None):
        if grad_norm is None:  # `max_grad_norm=0`: no clipping, but the same norm for the step's decision
            grad_norm = self._window_gradient_norm(math.inf)
        return super()._get_grad_norm(model, grad_norm=grad_norm)

    def _decide_step(self) -> None:
        """Before the optimiser step: take it only if the window's losses and gradients are finite everywhere."""
        accelerator = self.accelerator
        skipped_batch, loss_nonfinite, grad_nonfinite = self._window_skipped_batch, False, False
        if not skipped_batch:  # every process knows of a skipped batch: no decision to share then
            loss_nonfinite, grad_nonfinite = window_decision(accelerator, self._window_nonfinite, self._grad_norm)
        # With fp16, the grad scaler skips a step with non-finite gradients itself, and lowers its scale.
        self._step_taken = not (skipped_batch or loss_nonfinite or (grad_nonfinite and accelerator.scaler is None))
        self._window_nonfinite, self._window_micro_batches, self._window_skipped_batch = False, 0, False
        self._grad_norm = None
        counts = self._counts
        if self._step_taken:
            counts.nonfinite_in_a_row, counts.unreadable_in_a_row = 0, 0
            return
        self.model.zero_grad(set_to_none=True)  # the optimiser step that follows changes nothing
        counts.nonfinite_in_a_row += 1
        counts.unreadable_in_a_row += skipped_batch
        if not skipped_batch:  # a skipped batch was reported when it was skipped
            logger.warning(
                f"Non-finite loss or gradient at step {self.state.global_step}: step skipped "
                f"({counts.nonfinite_in_a_row} in a row)."
            )
        if counts.nonfinite_in_a_row >= self.args.max_nonfinite_steps:
            unreadable = f", {counts.unreadable_in_a_row} of them with no readable image" if counts.unreadable_in_a_row else ""
            raise RuntimeError(
                f"{counts.nonfinite_in_a_row} non-finite losses in a row{unreadable} at step "
                f"{self.state.global_step}: stopping. Lower the learning rate or check the data."
            )

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        self._batches_in_epoch += 1
        inputs = dict(inputs)
        _, skipped, any_unusable = batch_decisions(self.accelerator, inputs)
        counts = self._counts
        counts.skipped_images += skipped
        counts.skipped_batches_in_a_row = self._skipped_batches.count(
            counts.skipped_batches_in_a_row, any_unusable, self._batches_per_epoch, counts.skipped_images
        )
        if any_unusable:
            logger.warning("A batch without any readable image on some process: skipped on every process.")
            self._window_skipped_batch = True
            return torch.zeros((), device=self.args.device)
        # Masks depend only on the batch's place in the run and the process, as in `msn-pretrain`.
        seed_batch(self.args.seed, self._epoch, self._batches_in_epoch, self.accelerator.process_index)
        model.train()
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        # Read by `log` only: reading them here would wait for the forward.
        self._batch_losses = dict(prediction_loss=outputs.prediction_loss.detach(), me_max_loss=outputs.me_max_loss.detach())
        # Decided with the gradient norm at the end of the window (`_decide_step`); a non-finite loss gives non-finite
        # gradients, which no step applies.
        self._window_nonfinite = ~torch.isfinite(loss.detach()) | self._window_nonfinite
        self._window_micro_batches += 1
        loss = loss / self.current_gradient_accumulation_steps
        self.accelerator.backward(loss)
        return loss.detach()

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model`, the weights then given the permissions of the other files: safetensors writes them
        through an owner-only temporary file, which colleagues on a shared server could not read."""
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            for path in Path(output_dir or self.args.output_dir).glob("*.safetensors"):
                give_default_permissions(path)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            # The two parts of the loss are those of the last batch; `loss` is the mean since the last log.
            batch_losses = {name: value.item() for name, value in self._batch_losses.items()}
            logs = {**logs, **batch_losses, **self._step_values, "skipped_images": self._counts.skipped_images}
        super().log(logs, start_time)


__all__ = [
    "MSNRunCounts", "MSNScheduler", "MSNTrainer", "MSNTrainingArguments", "last_complete_checkpoint",
]  # fmt: skip
