"""
Wall-clock budgets: a run sized to the time it is given (`msn-pretrain --max_train_time 15m`,
`MSNTrainingArguments(max_train_time="10m")`).

- `parse_duration`: `90s`, `15m`, `2h`, `1d` or plain seconds.
- `time_steps`: seconds per optimiser step on this machine, after warm-up steps, the slowest process's figure on
  every process.
- `plan_steps`: the longest run N such that N x the seconds per step of its own geometry fits the budget (the auto
  rule's model grows with N): a bisection over log N, the timings memoised per geometry, at most four geometries
  timed and the others predicted from a compute proxy (`recipe.step_cost`). The run then keeps the model of those N
  steps for the whole budget (the next model up does not fit, and stopping early would waste the rest).
- `BudgetPlan`: how long a run is and how far it has come; saved with every checkpoint, so that a resumed run
  continues its plan without timing anything again, on the budget that is left.
- `BudgetKeeper`: the clock of the Accelerate loop. Every few steps it projects the end (elapsed + remaining steps x
  recent seconds per step, slowest process); a run that would overshoot shrinks its planned total so that its
  schedules still finish, at the budget; a run faster than timed grows it, up to `MAX_GROWTH` times its plan.
- `MSNTimeBudgetCallback`: the clock of `MSNTrainer`: it stops training before a step would end past the budget.
"""

import copy
import datetime
import json
import math
import re
import statistics
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .checkpointing import TRAINING_STATE_FILE, find_latest_checkpoint
from .modeling_msn import MSNModel
from .recipe import step_cost
from .training import MSNSchedules, adamw, batch_decisions

logger = get_logger(__name__)

DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)\s*([smhd]?)$")
# Steps timed per candidate: the first steps of a new model pay for allocations and lazy initialisation.
WARMUP_STEPS, TIMED_STEPS = 2, 3
# Geometries timed at most while planning, so that planning stays short beside the run.
MAX_TIMINGS = 4
# A budget buys a run length's model only if that run fits at this many times the model's timed pace: the pace of
# the same model timed at the start of different runs varied by up to ~25 % against the pace it then ran at on 2 CPU
# cores (benchmarks/RESULTS.md), and near a growth anchor a timing that reads fast buys a model whose run then sees
# fewer images than the rule asks for it.
GROWTH_MARGIN = 1.25
# Fewer steps than this leave no room for a warmup and a cosine: such a budget is refused.
MIN_PLANNED_STEPS = 10
# Steps seen after the first (which pays for a new model's first pass) before a run's pace is judged.
MIN_PACE_STEPS = 3
# A plan laid again fits steps this much slower than the recent ones, so that a pace drifting slowly up does not
# shrink it again at every check.
SHRINK_MARGIN = 1.05
# A plan grows only when it would leave this share of the time still to go unused: the cosine is not laid again for
# every small wobble of a busy machine's pace, yet the time that `SHRINK_MARGIN` set aside comes back as the run nears
# its end (a fixed share of the whole budget would leave that much of it unused).
GROW_SLACK = 0.1
# A plan grows to at most this many times its first steps, and never past the longest run of its geometry.
MAX_GROWTH = 2
# An unbounded run estimated to last longer than this is told which flag bounds it.
LONG_RUN_SECONDS = 3600.0


def parse_duration(value: str | float | None, name: str = "--max_train_time") -> float | None:
    """
    Seconds in a duration: `90s`, `15m`, `2h`, `1d` (a number and one unit, decimals allowed: `1.5h`) or plain
    seconds (`600`, or a number). None stays None. Raises a ValueError naming `name` for anything else or a
    duration that is not positive.
    """
    if value is None:
        return None
    expected = "a positive duration such as 90s, 15m, 2h, 1d or plain seconds"
    if isinstance(value, bool):
        raise ValueError(f"{name} must be {expected}, got {value!r}.")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value).strip().lower())
        if match is None:
            raise ValueError(f"{name} must be {expected}, got {value!r}.")
        seconds = float(match.group(1)) * DURATION_UNITS[match.group(2)]
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{name} must be {expected}, got {value!r}.")
    return seconds


def format_duration(seconds: float) -> str:
    """`8s`, `4m 12s`, `1h 05m`, `2d 03h`: the two largest units."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f}s" if seconds >= 10 else f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s"


def _clock(seconds_from_now: float) -> str:
    """The local clock time `seconds_from_now` from now (with the date when it is not today)."""
    now = datetime.datetime.now()
    end = now + datetime.timedelta(seconds=seconds_from_now)
    return end.strftime("%H:%M:%S" if end.date() == now.date() else "%Y-%m-%d %H:%M")


# --- measuring -----------------------------------------------------------------------------------------------------


def synchronize(accelerator: Accelerator) -> None:
    """Wait for the device's queued work, so that host clocks measure it (a no-op on the CPU)."""
    if accelerator.device.type != "cpu":
        torch.accelerator.synchronize(accelerator.device)


def time_steps(
    accelerator: Accelerator, step: Callable[[], None], warmup_steps: int = WARMUP_STEPS, timed_steps: int = TIMED_STEPS
) -> float:
    """
    Seconds per call of `step` (one optimiser step: its micro-batches, their loading included) after `warmup_steps`
    untimed calls: the median of `timed_steps` calls (one stall of a busy machine is not the pace), the slowest
    process's figure, the same on every process. Every process must call it alike (it holds collectives).
    """
    for _ in range(warmup_steps):
        step()
    synchronize(accelerator)
    accelerator.wait_for_everyone()
    durations = []
    for _ in range(timed_steps):
        start = time.perf_counter()
        step()
        synchronize(accelerator)
        durations.append(time.perf_counter() - start)
    seconds = statistics.median(durations)
    return accelerator.reduce(torch.tensor([seconds], device=accelerator.device), "max").item()


def time_model_steps(
    accelerator: Accelerator,
    model: MSNModel,
    batches: Iterable[dict],
    seed: int,
    gradient_accumulation_steps: int = 1,
    prepare: Callable[[dict], dict] = lambda batch: batch,
) -> float:
    """
    Seconds per optimiser step of `model` as it is (`time_steps`), on a copy: plain MSN steps (forward, backward,
    AdamW step, EMA update) through `accelerator` (its processes and precision) on `batches` (a DataLoader of views,
    passed again when it runs out; `prepare` puts a batch on the device). Batches without a readable image on some
    process are skipped by all. Leaves nothing behind: the model is untouched, the Accelerator lets go of the copy,
    and torch's generators are seeded with `seed` again.
    """
    timed = copy.deepcopy(model)
    optimizer = adamw(timed, accelerator.device)
    timed, optimizer = accelerator.prepare(timed, optimizer)
    target = accelerator.unwrap_model(timed)

    def endless():
        while True:
            for batch in batches:
                batch = dict(batch)
                if not batch_decisions(accelerator, batch)[2]:
                    yield prepare(batch)

    views = endless()

    def step() -> None:
        for _ in range(gradient_accumulation_steps):
            accelerator.backward(timed(**next(views)).loss / gradient_accumulation_steps)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        target.update_target_encoder(target.config.ema_momentum)

    try:
        return time_steps(accelerator, step)
    finally:
        views.close()
        accelerator.free_memory()
        set_seed(seed)


def geometry_key(recipe: dict | None) -> str | None:
    """What of a recipe costs time (model, views, prototypes), as text: recipes that differ only in their EMA start
    or their warmup share it, and so one timing. None (a model given as it is) stays None."""
    if recipe is None:
        return None
    config = {key: value for key, value in recipe["config"].items() if key != "ema_momentum"}
    return json.dumps([recipe["backbone"], recipe["backbone_kwargs"], config, recipe["processor"]], sort_keys=True,
                      default=list)  # fmt: skip


def recipe_cost(recipe: dict | None) -> float:
    """
    The compute proxy of one step of `recipe` (`recipe.step_cost`), to predict the seconds of an untimed geometry;
    1 for a recipe that leaves the model to its defaults or to a folder: its geometry does not grow with the run, so
    there is nothing to predict.
    """
    try:
        return step_cost(recipe)
    except (KeyError, TypeError):
        return 1.0


def describe_geometry(model: MSNModel) -> str:
    """`4 x 4 tokens of 8 px, 128 wide x 4 deep`: the anchor view's token grid and the encoder's width and depth."""
    patch = model.encoder.patch_embed.patch_size
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    grid = model.config.image_size // patch
    return f"{grid} x {grid} tokens of {patch} px, {model.encoder.embed_dim} wide x {len(model.encoder.blocks)} deep"


# --- planning ------------------------------------------------------------------------------------------------------


def plan_steps(
    budget_seconds: float,
    seconds_per_step: Callable[[int], float],
    geometry: Callable[[int], Hashable] = lambda steps: None,
    cost: Callable[[int], float] | None = None,
    max_timings: int = MAX_TIMINGS,
) -> tuple[int, float, dict]:
    """
    The longest run that fits `budget_seconds`: the largest N with `N x s(N) <= budget_seconds`, where s(N) is the
    seconds per step of `geometry(N)`, the model and views a run of N steps gets (any hashable naming them; constant
    for a model given by the user).

    `seconds_per_step(N)` measures the geometry of N steps. It is called once per geometry and for at most
    `max_timings` geometries: the first `max_timings - 1` the search meets, then the answer's if it was not timed
    (and the search is run again). Any other geometry's seconds are predicted from the timed one nearest in
    `cost(N)` (a compute proxy, `recipe.step_cost`), in proportion to the costs. The search is a bisection over
    log N between 1 and `budget / s(1) + 1`, which cannot fit when seconds per step grow with N, as they do when the
    geometry grows with the run.

    Returns `(N, s(N), {geometry: measured seconds per step})`; N is 0 when not even one step fits.
    """
    measured, costs = {}, {}
    cost = cost or (lambda steps: 1.0)

    def seconds(steps: int, may_measure: bool) -> float:
        key = geometry(steps)
        if key not in measured and (may_measure or not measured):
            measured[key], costs[key] = float(seconds_per_step(steps)), cost(steps)
        if key in measured:
            return measured[key]
        wanted = cost(steps)
        nearest = min(measured, key=lambda known: abs(math.log(costs[known] / wanted)))
        return measured[nearest] * wanted / costs[nearest]

    first = seconds(1, True)
    if first > budget_seconds:
        return 0, first, measured
    upper = math.floor(budget_seconds / first) + 1

    def bisect(timings_allowed: int) -> int:
        fits, too_long = 1, upper
        while too_long - fits > 1:
            middle = min(max(round(math.sqrt(fits * too_long)), fits + 1), too_long - 1)
            if middle * seconds(middle, len(measured) < timings_allowed) <= budget_seconds:
                fits = middle
            else:
                too_long = middle
        return fits

    steps = bisect(max_timings - 1)
    if geometry(steps) not in measured and len(measured) < max_timings:
        seconds(steps, True)
        steps = bisect(len(measured))  # predictions only, now nearer the answer
    return steps, seconds(steps, False), measured


@dataclass
class BudgetPlan:
    """
    How long a run is and how far it has come; saved with every checkpoint (`TrainingState.plan`) so that a resumed
    run continues it.

    Attributes:
        planned_steps: optimiser steps of the first plan.
        total_steps: steps of the plan now: fewer than `planned_steps` once an overshoot shrank it, more once a run
            faster than timed grew it.
        warmup_steps: the learning-rate warmup of the plan now (None until the schedules are laid).
        budget_seconds: the training budget from the first step (`--max_train_time`); None for a run in steps or
            epochs.
        seconds_per_step: measured before training for the planned geometry; None when nothing was measured.
        training_seconds: time spent training so far, from the first step, the parts before a resume included (the
            part after the last checkpoint of an interrupted run is lost with it).
        timings: seconds per step of each geometry timed while planning.
        max_steps: the most steps the plan may grow to (`MAX_GROWTH` x `planned_steps` with a budget); None:
            `planned_steps`.
        model_steps: the run length the model was chosen for (the auto rule's model grows with it): the longest run
            that fits the budget with its own model, which the plan then keeps for the whole budget; None:
            `planned_steps`. A resumed run builds its recipe for it again.
    """

    planned_steps: int
    total_steps: int
    warmup_steps: int | None = None
    budget_seconds: float | None = None
    seconds_per_step: float | None = None
    training_seconds: float = 0.0
    timings: dict = field(default_factory=dict)
    max_steps: int | None = None
    model_steps: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "BudgetPlan":
        names = {item.name for item in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in names})

    def planning_record(self) -> dict:
        """What planning found, for `msn_recipe.json`: budget, planned steps (and how far they may grow), seconds
        per step measured."""
        return dict(budget_seconds=self.budget_seconds, planned_steps=self.planned_steps, max_steps=self.max_steps,
                    model_steps=self.model_steps, seconds_per_step=self.seconds_per_step, timings=self.timings)  # fmt: skip

    def results(self, completed_steps: int) -> dict:
        """What `train_results.json` reports of the plan: training time, and with a budget how much of it ran."""
        results = dict(training_seconds=round(self.training_seconds, 3))
        if self.budget_seconds is not None:
            results.update(
                budget_seconds=self.budget_seconds,
                planned_steps=self.planned_steps,
                max_steps=self.max_steps,
                warmup_steps=self.warmup_steps,
                seconds_per_step=self.seconds_per_step,
                plan_completed=completed_steps / self.planned_steps,
            )
        return results

    def summary(self, completed_steps: int, global_batch: int) -> str:
        """The plan as it ran, in one line: steps planned and run, training time, images/s, budget used."""
        line = (
            f"Plan as run: {completed_steps:,} steps of {self.planned_steps:,} planned, "
            f"{format_duration(self.training_seconds)} of training from the first step, "
            f"{completed_steps * global_batch / max(self.training_seconds, 1e-9):,.0f} images/s"
        )
        if self.budget_seconds is not None:
            line += f"; budget {format_duration(self.budget_seconds)}, {completed_steps / self.planned_steps:.0%} of the plan run"
        return line + "."

    def describe(self, completed_steps: int, global_batch: int, num_images: int | None, geometry: str) -> str:
        """
        The plan in one line: steps, epochs, images/s, the clock time training ends at if it starts now, geometry.
        """
        seconds = self.seconds_per_step or 0.0
        remaining = (self.total_steps - completed_steps) * seconds
        if self.budget_seconds is not None:
            remaining = min(remaining, max(0.0, self.budget_seconds - self.training_seconds))
        # Batches are never partial: an epoch is the full batches of the images.
        epochs = f" ({self.total_steps / max(1, num_images // global_batch):.1f} epochs)" if num_images else ""
        budget = f"budget {format_duration(self.budget_seconds)}" if self.budget_seconds is not None else "no budget"
        if completed_steps:
            budget += f", {format_duration(self.training_seconds)} spent by step {completed_steps:,}"
        return (
            f"Plan: {self.total_steps:,} steps{epochs} of {global_batch} images at {seconds:.3g} s/step "
            f"({global_batch / seconds if seconds else 0:,.0f} images/s), training ends about {_clock(remaining)} "
            f"({budget}); geometry {geometry}."
        )


def estimate_line(total_steps: int, seconds_per_step: float, global_batch: int, epochs: float | None) -> str:
    """The estimated duration of a run of `total_steps` steps, and above an hour the flag that bounds it."""
    seconds = total_steps * seconds_per_step
    epochs_text = f" ({epochs:g} epochs)" if epochs else ""
    line = (
        f"Estimated training time: {total_steps:,} steps{epochs_text} at {seconds_per_step:.3g} s/step "
        f"({global_batch / seconds_per_step:,.0f} images/s on this machine): about {format_duration(seconds)}, "
        f"ending about {_clock(seconds)}."
    )
    if seconds > LONG_RUN_SECONDS:
        line += " Over an hour: --max_train_time (e.g. --max_train_time 1h) bounds a run and sizes it to that time."
    return line


def saved_plan(resume_from_checkpoint: str | None, output_dir: str | Path) -> BudgetPlan | None:
    """
    The plan saved with the checkpoint that `--resume_from_checkpoint` names (a folder, or `latest` in
    `output_dir`), or None: no checkpoint, or one saved before plans were.
    """
    if not resume_from_checkpoint:
        return None
    checkpoint = find_latest_checkpoint(output_dir) if resume_from_checkpoint == "latest" else Path(resume_from_checkpoint)
    path = checkpoint / TRAINING_STATE_FILE if checkpoint is not None else None
    if path is None or not path.is_file():
        return None
    values = json.loads(path.read_text()).get("plan")
    return BudgetPlan.from_dict(values) if values else None


# --- keeping to it -------------------------------------------------------------------------------------------------


def relay_schedules(schedules: MSNSchedules, total_steps: int, completed_steps: int) -> None:
    """
    Lay `schedules` over `total_steps` instead of its total (cosine, weight decay and EMA momentum follow, being laid
    over `stretch x total_steps`). A warmup already done stays as it was; one in progress changes in proportion, but
    not below the steps already taken (the learning rate then reaches its peak at once rather than skipping it). A
    typed warmup (`schedules.keep_warmup`) keeps its length, within the new total.
    """
    if schedules.keep_warmup:
        schedules.warmup_steps = min(schedules.warmup_steps, total_steps)
    elif schedules.warmup_steps > completed_steps:
        proportional = round(schedules.warmup_steps * total_steps / schedules.total_steps)
        schedules.warmup_steps = min(max(proportional, completed_steps), total_steps)
    schedules.total_steps = total_steps


class BudgetKeeper:
    """
    The clock of a run of the Accelerate loop, from its first step: training time (resumed parts included) in
    `state.plan` after every step, and, with a budget, the overshoot check.

    Every `check_every` steps (about one second of steps, at most 1 % of the plan), every process alike takes the
    largest elapsed time and recent seconds per step (the median of the last steps: neither the first step, which
    pays for the model's first pass, nor a checkpoint's pause count as a trend; `MIN_PACE_STEPS` are needed) over all
    processes; when `elapsed + remaining steps x that` exceeds the budget, the total shrinks to the steps that fit
    (`relay_schedules`), so that the schedules end when the budget does. A plan grows the same way when it would leave
    a tenth of the time still to go unused (`GROW_SLACK`: steps faster than timed, or a shrink's margin no longer
    needed near the end), up to `plan.max_steps`. A new plan longer than its model's run (`plan.model_steps`)
    stretches the recipe's warmup in proportion.

    Args:
        accelerator: the run's Accelerator (one reduce per check).
        schedules: the run's schedules: the plan's total and warmup are laid over them, and shrunk in place.
        plan: the budget plan, or None for a run in steps or epochs (then a plan of its schedules' length).
        state: the run's `TrainingState`, as `resume` returned it (its saved plan gives the time already spent).
    """

    def __init__(self, accelerator: Accelerator, schedules: MSNSchedules, plan: BudgetPlan | None, state) -> None:
        self.accelerator, self.schedules = accelerator, schedules
        if plan is None:
            saved = BudgetPlan.from_dict(state.plan) if state.plan else None
            if saved is not None and saved.total_steps != schedules.total_steps:
                # The checkpoint's learning rate, weight decay and EMA were on the way to another end.
                logger.warning(
                    f"The resumed run is {schedules.total_steps:,} steps long, the checkpoint's {saved.total_steps:,}: "
                    f"from step {state.completed_steps:,} on, the schedules (and a recipe's warmup and EMA chosen for "
                    "the run length) are those of the new length."
                )
            plan = BudgetPlan(schedules.total_steps, schedules.total_steps, training_seconds=saved.training_seconds if saved else 0.0)
        if plan.warmup_steps is None:  # a new plan: the recipe's warmup is a fraction of the model's run length
            relay_schedules(schedules, plan.total_steps, state.completed_steps)
            plan.warmup_steps = schedules.warmup_steps
        schedules.total_steps, schedules.warmup_steps = plan.total_steps, plan.warmup_steps
        self.plan = plan
        seconds = plan.seconds_per_step or 1.0
        self.check_every = max(1, min(round(1.0 / seconds), plan.planned_steps // 100))
        self.durations = deque(maxlen=max(10, self.check_every))
        self.spent_before, self.steps_before = plan.training_seconds, state.completed_steps
        self.start = self.last = time.perf_counter()
        state.plan = plan.to_dict()

    def start_clock(self) -> None:
        """Training starts now (the first step): what came before (planning, loading, resuming) is not counted."""
        self.start = self.last = time.perf_counter()

    @property
    def elapsed(self) -> float:
        """Training seconds of the run so far, parts before a resume included."""
        return self.spent_before + time.perf_counter() - self.start

    def after_step(self, state) -> bool:
        """Count a step that was taken; returns whether the plan changed (the schedules then have a new total)."""
        now = time.perf_counter()
        if state.completed_steps > self.steps_before + 1:
            self.durations.append(now - self.last)
        self.last = now
        plan, completed = self.plan, state.completed_steps
        plan.training_seconds = self.elapsed
        paced = len(self.durations) >= MIN_PACE_STEPS
        if plan.budget_seconds is not None and paced and completed % self.check_every == 0 and completed < plan.total_steps:
            if self._check(completed):
                state.plan = plan.to_dict()
                return True
        state.plan["training_seconds"] = plan.training_seconds  # each step: the plan itself did not change
        return False

    def _check(self, completed: int) -> bool:
        measured = torch.tensor([self.elapsed, statistics.median(self.durations)], device=self.accelerator.device)
        elapsed, seconds = self.accelerator.reduce(measured, "max").tolist()
        plan = self.plan
        remaining = plan.total_steps - completed
        projected = elapsed + remaining * seconds
        overshoots = projected > plan.budget_seconds
        most = plan.max_steps or plan.planned_steps
        unused = plan.budget_seconds - projected
        if not overshoots and (plan.total_steps >= most or unused < GROW_SLACK * (plan.budget_seconds - elapsed)):
            return False
        fit = max(0, math.floor((plan.budget_seconds - elapsed) / (seconds * SHRINK_MARGIN)))
        total = min(completed + fit, most)
        if total == plan.total_steps or (overshoots and total > plan.total_steps):
            return False
        logger.info(
            f"Steps take {seconds:.3g} s (planned {plan.seconds_per_step:.3g} s) and {format_duration(elapsed)} of "
            f"{format_duration(plan.budget_seconds)} have gone: the plan {'shrinks' if overshoots else 'grows'} "
            f"from {plan.total_steps:,} to {total:,} steps, its schedules laid over them, so that it ends at the budget."
        )
        relay_schedules(self.schedules, total, completed)
        plan.total_steps, plan.warmup_steps = total, self.schedules.warmup_steps
        return True

    def finish(self, state) -> None:
        """Training ends now: the time spent goes into `state.plan`."""
        self.plan.training_seconds = self.elapsed
        state.plan = self.plan.to_dict()


class MSNTimeBudgetCallback(TrainerCallback, ExportableState):
    """
    Stops `Trainer` training at a wall-clock budget: after a step, when the next `check_every` steps would end past
    it (elapsed + their seconds at the median of the recent steps), the slowest process's figure on every process,
    so that all of them stop at the same step. The clock starts at `on_train_begin`; the time spent is saved with
    each checkpoint (`stateful_callbacks` in `trainer_state.json`), so that a resumed run has what is left.

    Args:
        budget_seconds: the training budget.
        check_every: steps between two checks (each one a reduce across processes).
    """

    def __init__(self, budget_seconds: float, check_every: int = 1):
        self.budget_seconds = float(budget_seconds)
        self.check_every = check_every
        self.spent_seconds = 0.0  # before this run's first step (a resumed run's)
        self.durations = deque(maxlen=10)
        self.start = self.last = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return self.spent_seconds + time.perf_counter() - self.start

    def state(self) -> dict:
        return {
            "args": {"budget_seconds": self.budget_seconds, "check_every": self.check_every},
            "attributes": {"spent_seconds": self.elapsed},
        }

    def on_train_begin(self, args, state, control, **kwargs):
        saved = state.stateful_callbacks.get(type(self).__name__) if state.global_step else None
        self.spent_seconds = saved["attributes"]["spent_seconds"] if isinstance(saved, dict) else 0.0
        self.durations.clear()
        self.start = self.last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.durations.append(now - self.last)
        self.last = now
        if state.global_step % self.check_every:
            return
        projected = torch.tensor([self.elapsed + self.check_every * statistics.median(self.durations)])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            projected = projected.to(args.device)
            torch.distributed.all_reduce(projected, op=torch.distributed.ReduceOp.MAX)
        if projected.item() > self.budget_seconds:
            control.should_training_stop = True
            logger.info(
                f"Time budget {format_duration(self.budget_seconds)}: training stops after step {state.global_step} "
                f"({format_duration(self.elapsed)} spent)."
            )


__all__ = [
    "BudgetKeeper", "BudgetPlan", "MSNTimeBudgetCallback", "estimate_line", "format_duration", "parse_duration",
    "plan_steps", "saved_plan", "time_model_steps", "time_steps",
]
