"""
The checkpoint store of the Accelerate loop: where a run stands (`TrainingState`), checkpoints written atomically
on every process, the latest complete one, resuming from it, and stopping at one on SIGINT or SIGTERM
(`StopSignals`, `stop_at_checkpoint`).
"""

import json
import os
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from accelerate import Accelerator
from accelerate.logging import get_logger
from torchdata.stateful_dataloader import StatefulDataLoader

from .collectives import host_sum
from .files import give_default_permissions

logger = get_logger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINING_STATE_FILE = "training_state.json"
DATALOADER_STATE_FILE = "dataloader_state_{rank}.json"
# Ctrl-C, and the signal a cluster sends before it pre-empts a job.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass
class TrainingState:
    """
    Where the run stands; saved with every checkpoint as `training_state.json`.

    Attributes:
        completed_steps: optimiser steps taken (the position in the schedules).
        epoch: the pass over the data in progress.
        batches_in_epoch: batches of `epoch` consumed, skipped ones included (map-style resume skips them).
        skipped_images: unreadable images so far, all processes.
        skipped_batches_in_a_row: batches without a readable image in a row just before this point: a checkpoint at
            the end of an epoch can follow some, and a resumed run goes on counting them (`training.SkippedBatches`).
        consecutive_nonfinite: steps skipped in a row for a non-finite loss or gradient norm.
        window_nonfinite: a micro-batch of the current accumulation window had a non-finite loss (a flag on the
            device while the window is open, read with the step's decision).
        plan: the run's length and clock (`budget.BudgetPlan.to_dict()`): a budget run resumes its plan.
        training_seconds: wall time spent training, over every part of a resumed run (see `start_clock`).
        layout: the processes and batches of the run (`num_processes`, `per_device_train_batch_size`,
            `gradient_accumulation_steps`): `batches_in_epoch` and the schedules count batches of this layout, so a
            resume must run the same one (`resume`). None in checkpoints written before it was recorded.
    """

    completed_steps: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    skipped_images: int = 0
    skipped_batches_in_a_row: int = 0
    consecutive_nonfinite: int = 0
    window_nonfinite: bool = False
    plan: dict | None = None
    training_seconds: float = 0.0
    layout: dict | None = None
    # `(perf_counter at start_clock, training_seconds then)`: not saved, a resumed run starts its own clock.
    clock: tuple[float, float] | None = field(default=None, repr=False)

    def start_clock(self) -> None:
        """Count the time from now on top of the `training_seconds` of the parts before (a resumed run)."""
        self.clock = (time.perf_counter(), self.training_seconds)

    def stop_clock(self) -> None:
        """Training ends: `training_seconds` holds all of it."""
        self.training_seconds, self.clock = self.elapsed_seconds, None

    @property
    def elapsed_seconds(self) -> float:
        """Wall time spent training, this part and the parts before it."""
        if self.clock is None:
            return self.training_seconds
        started, before = self.clock
        return before + time.perf_counter() - started

    def to_json(self) -> str:
        saved = {k: v for k, v in vars(self).items() if k not in ("window_nonfinite", "clock")}
        return json.dumps({**saved, "training_seconds": self.elapsed_seconds})


def complete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders, oldest first; temporary folders of interrupted saves never match."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name)) and p.is_dir()]
    return [path for _, path in sorted(found) if (path / TRAINING_STATE_FILE).exists()]


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the most steps, or None."""
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def checkpoint_step(checkpoint: str | os.PathLike) -> int:
    """The step after which the complete checkpoint `checkpoint` was written."""
    return int(json.loads((Path(checkpoint) / TRAINING_STATE_FILE).read_text())["completed_steps"])


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: Path,
    state: TrainingState,
    dataloader,
    total_limit: int | None,
) -> Path:
    """
    Accelerate's state, the position in the run and, for a stream, each process's DataLoader state, written to
    `checkpoint-N.tmp` and renamed to `checkpoint-N` by the main process once EVERY process has finished writing.
    Then the oldest complete checkpoints beyond `total_limit` are removed; the newest is always kept.

    Accelerate's automatic checkpoint naming is not used: it deletes the oldest checkpoint before writing the new one
    (with `total_limit=1`, the only complete one) and writes in place, so a crash mid-save leaves a partial folder
    that looks complete.
    """
    final = output_dir / f"checkpoint-{state.completed_steps}"
    temporary = output_dir / f"checkpoint-{state.completed_steps}.tmp"
    if accelerator.is_main_process and temporary.exists():
        shutil.rmtree(temporary)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    if isinstance(dataloader, StatefulDataLoader):
        path = temporary / DATALOADER_STATE_FILE.format(rank=accelerator.process_index)
        path.write_text(json.dumps(dataloader.state_dict()))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (temporary / TRAINING_STATE_FILE).write_text(state.to_json())
        give_default_permissions(temporary)  # safetensors writes the weights owner-only
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
        if total_limit:
            for path in complete_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(path, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resume(
    resume_from_checkpoint: str | None, accelerator: Accelerator, dataloader, output_dir: Path, layout: dict
) -> TrainingState:
    """
    The state of `resume_from_checkpoint` (`--resume_from_checkpoint`: a folder, or `latest` in `output_dir`) loaded into the model,
    optimiser, RNGs and, for a stream, this process's DataLoader; a fresh state when there is nothing to resume.
    `layout` is this run's (see `TrainingState.layout`); a checkpoint of another one is refused before anything moves.
    """
    if not resume_from_checkpoint:
        return TrainingState(layout=layout)
    if resume_from_checkpoint == "latest":
        checkpoint = find_latest_checkpoint(output_dir)
        if checkpoint is None:
            accelerator.print(f"No checkpoint in {output_dir}: starting from scratch.")
            return TrainingState(layout=layout)
    else:
        checkpoint = Path(resume_from_checkpoint)
    if not (checkpoint / TRAINING_STATE_FILE).exists():
        raise ValueError(
            f"--resume_from_checkpoint must be a complete checkpoint folder or 'latest', got {str(checkpoint)!r} "
            f"(no {TRAINING_STATE_FILE})."
        )
    state = TrainingState(**json.loads((checkpoint / TRAINING_STATE_FILE).read_text()))
    _check_layout(checkpoint, state.layout, layout)
    state.layout = layout
    accelerator.print(f"Resuming from {checkpoint}")
    if accelerator.is_main_process:
        set_aside_later_checkpoints(output_dir, state.completed_steps, accelerator)
    accelerator.wait_for_everyone()
    if isinstance(dataloader, StatefulDataLoader):
        # Checked by every process alike, so that all of them stop rather than some wait for the others.
        saved = len(list(checkpoint.glob(DATALOADER_STATE_FILE.format(rank="*"))))
        if saved != accelerator.num_processes:
            raise ValueError(
                f"--resume_from_checkpoint {str(checkpoint)!r} holds the stream positions of {saved} process(es): "
                f"resume a stream with the number of processes that saved it, got {accelerator.num_processes}."
            )
    accelerator.load_state(str(checkpoint))
    if isinstance(dataloader, StatefulDataLoader):
        path = checkpoint / DATALOADER_STATE_FILE.format(rank=accelerator.process_index)
        if not path.exists():
            raise ValueError(
                f"--resume_from_checkpoint {str(checkpoint)!r} has no stream position for process "
                f"{accelerator.process_index}: resume a stream with the number of processes that saved it."
            )
        dataloader.load_state_dict(json.loads(path.read_text()))
    return state


def _check_layout(checkpoint: Path, saved: dict | None, layout: dict) -> None:
    # Map-style data resumes by skipping `batches_in_epoch` batches of this process: with other processes or batches
    # that skips other images (some trained twice, some never), and the schedules would change length mid-run.
    if saved is None:
        return
    if saved["num_processes"] != layout["num_processes"]:
        raise ValueError(
            f"--resume_from_checkpoint {str(checkpoint)!r} was written by {saved['num_processes']} processes: resume "
            f"it with as many (its place in the data counts their batches), got {layout['num_processes']}."
        )
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        if saved[name] != layout[name]:
            raise ValueError(
                f"--{name} must be {saved[name]} to resume {str(checkpoint)!r} (its place in the data and its "
                f"schedules count batches of that size), got {layout[name]}."
            )


def set_aside_later_checkpoints(output_dir: Path, step: int, accelerator: Accelerator) -> None:
    """
    Rename the complete checkpoints of `output_dir` past `step` to `checkpoint-N.abandoned-<time>`, when a run goes on
    from `step`: they belong to the run that went on from there before, and ranked by step they would pass for the
    newest, so that `--checkpoints_total_limit` removed the new run's checkpoints and `latest` resumed the old run.
    Renamed, not removed: they may be what the user wants to compare against.
    """
    later = [path for path in complete_checkpoints(output_dir) if int(CHECKPOINT_PATTERN.match(path.name)[1]) > step]
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for path in later:
        aside = path.with_name(f"{path.name}.abandoned-{stamp}")
        os.replace(path, aside)
        accelerator.print(f"{path.name} is past the resumed step {step}: set aside as {aside.name}.")


class TrainingInterrupted(KeyboardInterrupt):
    """
    A run stopped by SIGINT or SIGTERM once its checkpoint was written. A `KeyboardInterrupt`, as a Ctrl-C is, so
    that code catching one catches it; `exit_code` is the shell's for the signal (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum, self.exit_code = signum, 128 + signum


class StopSignals:
    """
    While active (a context manager around the training loop), the first SIGINT or SIGTERM is recorded instead of
    acted on, and the handlers in place before are put back at once: a second Ctrl-C interrupts at once. The loop
    asks `requested` once per optimiser step, and stops there (see `stop_at_checkpoint`). On leaving, the handlers
    in place before are restored, so that library use leaves none behind. Outside the main thread, where Python
    cannot set handlers, it does nothing.

    DataLoader workers forked during the loop inherit the handler, so that a Ctrl-C sent to the whole process group
    does not end them before the step and its checkpoint are done.
    """

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._record) for signum in STOP_SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        self._restore()

    def _record(self, signum: int, frame) -> None:
        self.signum = self.signum or signum
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            # None: a handler set outside Python, which Python cannot put back; the default is the nearest.
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous = {}

    def requested(self, accelerator: Accelerator) -> int:
        """
        The stop signal any process received (0: none), the same on every process: signals reach processes at
        different times, and all of them must stop after the same step. One reduce on the host per call, no read from the accelerator.
        """
        # The largest signal number received: a sum of one-hot flags per signal, reduced on the host.
        received = host_sum(accelerator, [float(self.signum == signum) for signum in STOP_SIGNALS])
        return max((signum for signum, count in zip(STOP_SIGNALS, received) if count > 0), default=0)


def stop_at_checkpoint(
    accelerator: Accelerator,
    output_dir: Path,
    state: TrainingState,
    dataloader,
    total_limit: int | None,
    signum: int,
    last_checkpoint: Path | None = None,
) -> NoReturn:
    """
    End a run that `StopSignals` asked to stop, on every process: write the checkpoint of `state` (unless
    `last_checkpoint` is that of this step already), end the trackers, say on the main process where the run stopped
    and how to resume it, and raise `TrainingInterrupted`.
    """
    checkpoint = output_dir / f"checkpoint-{state.completed_steps}"
    if last_checkpoint != checkpoint:
        checkpoint = save_checkpoint(accelerator, output_dir, state, dataloader, total_limit)
    accelerator.end_training()
    message = f"stopped at step {state.completed_steps}: resume with --resume_from_checkpoint latest"
    if accelerator.is_main_process:
        print(f"\n{signal.Signals(signum).name}: {message} (checkpoint: {checkpoint}).", file=sys.stderr, flush=True)
    raise TrainingInterrupted(message, signum)
