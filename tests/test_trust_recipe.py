"""
The recipe both loops run, held to the same rules: argument checks, batch seeds, unreadable data, the mean over a
short accumulation window, Sinkhorn's global batch, and no host sync on the hot path but the step's decision.
"""

import copy
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader
from transformers import TrainerCallback

from conftest import RUN_ARGS, TINY_MODEL_ARGS, one_process_reference, step_setup, tiny_config, tiny_views
from msn_hf import MSNImageProcessor, MSNModel, checkpointing, training
from msn_hf import pretraining as pt
from msn_hf.data import load_digits_dataset
from msn_hf.trainer_msn import MSNTrainer, MSNTrainingArguments
from msn_hf.training import MSNViewsCollator

# --- the same refusals in both loops --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flag, value, expected",
    [
        ("max_grad_norm", -1.0, ">= 0"),
        ("max_grad_norm", float("nan"), ">= 0"),
        ("schedule_stretch", 0.5, ">= 1"),
        ("learning_rate", -1e-3, ">= 0"),
        ("warmup_start_learning_rate", -1.0, ">= 0"),
        ("final_weight_decay", -0.1, ">= 0"),
        ("max_nonfinite_steps", 0, "a positive number"),
    ],
)
def test_both_loops_refuse_the_same_nonsense_with_the_same_line(tmp_path, flag, value, expected):
    with pytest.raises(ValueError) as accelerate_loop:
        pt.PretrainingArguments(**{flag: value})
    with pytest.raises(ValueError) as trainer:
        MSNTrainingArguments(output_dir=str(tmp_path), **{flag: value})
    message = str(accelerate_loop.value)
    assert message.startswith(f"--{flag} must be {expected}") and message.endswith(f"got {value!r}.")
    assert str(trainer.value) == message and "\n" not in message
    # The command line goes through the same check.
    with pytest.raises(ValueError, match=f"^--{flag} must be"):
        pt.parse_args([f"--{flag}", str(value)])
    assert not any(tmp_path.iterdir())  # refused before anything was created


def test_the_edges_of_the_rules_are_accepted_by_both_loops(tmp_path):
    edges = dict(max_grad_norm=0.0, schedule_stretch=1.0, warmup_start_learning_rate=0.0, final_learning_rate=0.0)
    assert pt.PretrainingArguments(**edges).max_grad_norm == 0.0
    assert MSNTrainingArguments(output_dir=str(tmp_path), **edges).schedule_stretch == 1.0


@pytest.mark.parametrize("flag, value", [("num_warmup_steps", -5), ("num_warmup_epochs", -1.0),
                                         ("num_warmup_epochs", float("nan"))])  # fmt: skip
def test_a_warmup_below_zero_or_not_a_number_is_refused_naming_the_flag(flag, value):
    # -5 steps started at half the peak with no warmup; NaN failed after the output folder was made.
    with pytest.raises(ValueError, match=rf"^--{flag} must be >= 0, got {value!r}\.$"):
        pt.PretrainingArguments(**{flag: value})
    with pytest.raises(ValueError, match=f"^--{flag} must be >= 0"):
        pt.parse_args([f"--{flag}", str(value)])


@pytest.mark.parametrize("flag", ["num_anchor_views", "num_focal_views"])
def test_a_number_of_views_below_zero_is_refused_before_the_output_folder_is_made(flag, tmp_path):
    # It was set on the processor after the processor's own checks: the run wrote its recipe and data record, then
    # failed at the first batch, and the corrected command was refused for a folder that "already holds a run".
    with pytest.raises(ValueError, match=rf"^--{flag} must be >= 0, got -1\.$"):
        pt.main([f"--{flag}", "-1", "--output_dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("epochs", [0, -1])
def test_the_trainer_refuses_a_run_of_no_epochs(tmp_path, epochs):
    # 0 raised ZeroDivisionError in the schedules; -1 returned after no step.
    with pytest.raises(ValueError, match=rf"^`num_train_epochs` must be > 0 without `max_steps` or `max_train_time`, got {epochs}\.$"):
        MSNTrainingArguments(output_dir=str(tmp_path), num_train_epochs=epochs)
    assert MSNTrainingArguments(output_dir=str(tmp_path), num_train_epochs=epochs, max_steps=3).max_steps == 3


# --- one random stream per batch and process ------------------------------------------------------------------------


def test_batch_seeds_are_distinct_for_every_epoch_batch_and_process():
    grid = [(epoch, batch, rank) for epoch in range(3) for batch in range(1, 41) for rank in range(8)]
    seeds = [training.batch_seed(42, *place) for place in grid]
    assert len(set(seeds)) == len(grid)
    assert all(0 <= seed < 2**63 for seed in seeds)
    assert len({training.batch_seed(run_seed, 0, 1, 0) for run_seed in range(100)}) == 100
    # What the masks draw: rank 1 at batch b does not replay rank 0 at batch b + 1.
    training.seed_batch(42, 0, 1, process_index=1)
    rank_1 = torch.rand(16)
    training.seed_batch(42, 0, 2, process_index=0)
    assert not torch.equal(rank_1, torch.rand(16))
    training.seed_batch(42, 0, 1, process_index=1)
    assert torch.equal(rank_1, torch.rand(16))  # and a batch's place gives back its stream (resume)


# Runs `msn-pretrain`, recording every mask drawn (the patch indices each anchor view keeps) to keep_<rank>.pt.
MASKS_LAUNCHER = """
import os, sys
from pathlib import Path
import torch
from msn_hf import modeling_msn
from msn_hf import pretraining as pt

kept, draw = [], modeling_msn.random_keep_indices

def recording_draw(*args, **kwargs):
    keep = draw(*args, **kwargs)
    kept.append(keep.clone())
    return keep

modeling_msn.random_keep_indices = recording_draw
pt.main(sys.argv[1:])
torch.save(kept, Path(os.environ["MSN_TEST_LOG"]) / f"keep_{os.environ.get('RANK', '0')}.pt")
"""


def run_two_processes(tmp_path: Path, launcher: str, args: list) -> subprocess.CompletedProcess:
    """`launcher` under torchrun with 2 CPU processes joined by gloo; its logs go to tmp_path / "log"."""
    script, log = tmp_path / "launch.py", tmp_path / "log"
    script.write_text(launcher)
    log.mkdir(exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "ACCELERATE_USE_CPU": "true", "MSN_TEST_LOG": str(log)}  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
               *map(str, args)]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def test_two_processes_draw_different_masks_at_the_same_step_and_at_consecutive_batches(tmp_path):
    args = [*RUN_ARGS, "--per_device_train_batch_size", "8", "--max_train_samples", "64", "--max_train_steps", "3",
            "--output_dir", tmp_path / "run"]  # fmt: skip
    result = run_two_processes(tmp_path, MASKS_LAUNCHER, args)
    assert result.returncode == 0, result.stderr[-3000:]
    rank_0, rank_1 = (torch.load(tmp_path / "log" / f"keep_{rank}.pt") for rank in (0, 1))
    assert len(rank_0) == len(rank_1) and len(rank_0) % 3 == 0
    per_step = len(rank_0) // 3  # one draw per resolution of anchor views, the same number every step
    steps_0, steps_1 = ([draws[i * per_step : (i + 1) * per_step] for i in range(3)] for draws in (rank_0, rank_1))

    def same(a: list, b: list) -> bool:
        return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))

    for step in range(3):
        assert not same(steps_0[step], steps_1[step]), f"rank 0 and rank 1 drew the same masks at step {step}"
    for step in range(2):
        assert not same(steps_1[step], steps_0[step + 1]), f"rank 1 at step {step} replays rank 0 at step {step + 1}"
        assert not same(steps_0[step], steps_0[step + 1])


# --- Sinkhorn and me-max over the real global batch -----------------------------------------------------------------

# Rows of each process: a process that skipped unreadable images has fewer.
UNEQUAL_ROWS = (slice(0, 5), slice(5, 8))


def random_views(batch_size: int, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return dict(
        pixel_values=torch.randn(batch_size, 3, 32, 32, generator=generator),
        anchor_pixel_values=torch.randn(batch_size, 1, 3, 32, 32, generator=generator),
        focal_pixel_values=torch.randn(batch_size, 2, 3, 16, 16, generator=generator),
    )


def _unequal_batches_check(inputs: dict, reference: dict) -> None:
    torch.set_num_threads(1)  # forked workers must not reuse the parent's OpenMP pool
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    torch.manual_seed(0)
    model = MSNModel(tiny_config(mask_ratio=0.0, projection_batch_norm=False)).train()
    rows = UNEQUAL_ROWS[rank]
    output = model(**{name: value[rows] for name, value in inputs.items()})
    output.loss.backward()
    torch.testing.assert_close(output.target_probs, reference["target_probs"][rows], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output.me_max_loss, reference["me_max_loss"], rtol=1e-5, atol=1e-6)
    # What DDP does: the mean over processes of the losses and of the gradients.
    loss = output.loss.detach().clone()
    torch.distributed.all_reduce(loss)
    torch.testing.assert_close(loss / 2, reference["loss"], rtol=1e-5, atol=1e-6)
    for name, param in model.named_parameters():
        if param.grad is not None:
            grad = param.grad.clone()
            torch.distributed.all_reduce(grad)
            torch.testing.assert_close(grad / 2, reference["grads"][name], rtol=1e-4, atol=1e-6, msg=name)


def test_two_processes_with_unequal_batches_match_one_process_on_the_concatenated_batch():
    from accelerate import debug_launcher

    inputs = random_views(8)
    reference = one_process_reference(inputs)
    debug_launcher(_unequal_batches_check, args=(inputs, reference), num_processes=2)


# --- data without a readable image ----------------------------------------------------------------------------------


def garbage_folder(tmp_path: Path, count: int = 32) -> Path:
    """A folder of `count` .png files that are not images."""
    folder = tmp_path / "garbage"
    folder.mkdir()
    for i in range(count):
        (folder / f"{i:03d}.png").write_bytes(b"not a png " + bytes([i]))
    return folder


@pytest.fixture
def epochs_guard(monkeypatch):
    """Fails a run that starts a 6th epoch: data that never gives a usable batch must stop the loop, not spin."""
    calls, epoch_batches = {"epochs": 0}, pt.epoch_batches

    def guarded(*args, **kwargs):
        calls["epochs"] += 1
        assert calls["epochs"] <= 5, "epochs of skipped batches start again and again: the loop never ends"
        return epoch_batches(*args, **kwargs)

    monkeypatch.setattr(pt, "epoch_batches", guarded)


def test_the_accelerate_loop_stops_on_a_folder_without_a_readable_image(tmp_path, epochs_guard):
    out = tmp_path / "run"
    args = [*RUN_ARGS, "--train_dir", garbage_folder(tmp_path), "--per_device_train_batch_size", "8",
            "--max_train_steps", "3", "--output_dir", out]  # fmt: skip
    with pytest.raises(ValueError, match=r"readable image at least once in 4 batches in a row \(a whole epoch\)"):
        pt.main(list(map(str, args)))
    assert not (out / "model.safetensors").exists()


def test_the_accelerate_loop_stops_on_a_stream_after_max_skipped_batches(tmp_path, epochs_guard):
    import datasets

    rows = datasets.Dataset.from_dict(
        {"image": [{"bytes": b"not an image", "path": None}] * 64}, features=datasets.Features({"image": datasets.Image()})
    )
    rows.to_parquet(str(tmp_path / "train.parquet"))
    out = tmp_path / "run"
    args = [*RUN_ARGS, "--train_files", tmp_path / "train.parquet", "--streaming", "--max_train_steps", "3",
            "--per_device_train_batch_size", "8", "--max_skipped_batches", "3", "--output_dir", out]  # fmt: skip
    with pytest.raises(ValueError, match=r"at least once in 3 batches in a row \(--max_skipped_batches\)"):
        pt.main(list(map(str, args)))
    assert not (out / "model.safetensors").exists()


class StoppedAfterTheCheckpoint(Exception):
    """The run is cut off as a crash would: after a checkpoint, before its next batch."""


def scripted_batches(unusable_calls: set[int], cut_at: int | None = None):
    """Called once per batch: whether call n is to have no readable image; call `cut_at` cuts the run off."""
    calls = itertools.count(1)

    def unusable() -> bool:
        n = next(calls)
        if n == cut_at:
            raise StoppedAfterTheCheckpoint
        return n in unusable_calls

    return unusable


def test_a_resumed_run_keeps_counting_the_batches_skipped_in_a_row_before_its_checkpoint(tmp_path, monkeypatch):
    # 64 images in batches of 8: 8 batches an epoch. The last two of epoch 0 give no readable image, the epoch's
    # checkpoint is written after them, and the run is cut off at the first batch of epoch 1. Resumed, that batch
    # gives no readable image either: three in a row, the limit, as in a run that was never cut off.
    out = tmp_path / "run"
    args = [*RUN_ARGS, "--max_train_samples", "64", "--per_device_train_batch_size", "8", "--max_train_steps", "30",
            "--checkpointing_steps", "epoch", "--max_skipped_batches", "3", "--output_dir", out]  # fmt: skip
    decide = pt.batch_decisions

    def decisions(unusable_calls: set[int], cut_at: int | None = None):
        unusable = scripted_batches(unusable_calls, cut_at)

        def scripted(accelerator, batch):
            made_unusable = unusable()
            ran_out, skipped, any_unusable = decide(accelerator, batch)
            return ran_out, skipped, any_unusable or made_unusable

        return scripted

    # Calls 1-8 are epoch 0's batches, call 9 finds it ended, call 10 is epoch 1's first batch.
    stop = r"at least once in 3 batches in a row \(--max_skipped_batches\), got 3"
    monkeypatch.setattr(pt, "batch_decisions", decisions({7, 8, 10}))
    with pytest.raises(ValueError, match=stop):  # the run never cut off
        pt.main(list(map(str, [*args[:-1], tmp_path / "whole"])))

    monkeypatch.setattr(pt, "batch_decisions", decisions({7, 8}, cut_at=10))
    with pytest.raises(StoppedAfterTheCheckpoint):
        pt.main(list(map(str, args)))
    assert [p.name for p in checkpointing.complete_checkpoints(out)] == ["checkpoint-6"]

    monkeypatch.setattr(pt, "batch_decisions", decisions({1}))
    with pytest.raises(ValueError, match=stop):
        pt.main(list(map(str, [*args, "--resume_from_checkpoint", "latest"])))
    assert not (out / "model.safetensors").exists()


def tiny_trainer(output_dir: Path, train_dataset, model: MSNModel | None = None, callbacks: list | None = None,
                 **overrides) -> MSNTrainer:  # fmt: skip
    values = dict(output_dir=str(output_dir), max_steps=10, per_device_train_batch_size=8, warmup_steps=1,
                  logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True)  # fmt: skip
    processor = MSNImageProcessor(size={"shortest_edge": 32}, crop_size=32, focal_crop_size=16, num_focal_views=2)
    model = model if model is not None else MSNModel(tiny_config())
    return MSNTrainer(model, MSNTrainingArguments(**{**values, **overrides}), train_dataset, processor, callbacks=callbacks)


def test_the_trainer_stops_on_a_folder_without_a_readable_image(tmp_path):
    from msn_hf.data import load_image_dataset

    trainer = tiny_trainer(tmp_path / "run", load_image_dataset(train_dir=str(garbage_folder(tmp_path))))
    with pytest.raises(ValueError, match=r"readable image at least once in 4 batches in a row \(a whole epoch\)"):
        trainer.train()
    assert trainer.state.global_step < 10
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_the_trainer_counts_windows_without_a_readable_image_toward_its_nonfinite_stop(tmp_path, monkeypatch):
    # Windows 2 and 4 have no readable image, window 3 a NaN loss: three windows in a row take no step.
    trainer = tiny_trainer(tmp_path, load_digits_dataset("train").select(range(64)), max_nonfinite_steps=3)
    collate, calls = MSNViewsCollator.__call__, {"collate": 0, "forward": 0}

    def unreadable_batches_2_and_4(self, rows):
        calls["collate"] += 1
        return {"num_skipped": len(rows)} if calls["collate"] in (2, 4) else collate(self, rows)

    forward = trainer.model.forward

    def second_forward_nan(**kwargs):
        output = forward(**kwargs)
        calls["forward"] += 1
        if calls["forward"] == 2:
            output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(MSNViewsCollator, "__call__", unreadable_batches_2_and_4)
    monkeypatch.setattr(trainer.model, "forward", second_forward_nan)
    with pytest.raises(RuntimeError, match="3 non-finite losses in a row, 2 of them with no readable image at step 3"):
        trainer.train()
    assert calls["forward"] == 2  # windows 1 and 3 (Accelerate's DataLoader collates one batch ahead)
    assert trainer.lr_scheduler.last_epoch == 1  # only window 1 took a step


class CutOffAtTheFirstSave(TrainerCallback):
    """The run is cut off as a crash would: as soon as the Trainer has written its first checkpoint."""

    def on_save(self, args, state, control, **kwargs):
        raise StoppedAfterTheCheckpoint


@pytest.mark.parametrize(
    "limits, error, message",
    [
        (dict(max_skipped_batches=3), ValueError, r"3 batches in a row \(--max_skipped_batches\), got 3 batches without "
         r"one \(24 unreadable images skipped\)"),
        (dict(max_skipped_batches=10, max_nonfinite_steps=3), RuntimeError,
         "3 non-finite losses in a row, 3 of them with no readable image at step 5"),
        # Transformers then rebuilds the callbacks it saved state for.
        (dict(max_skipped_batches=3, restore_callback_states_from_checkpoint=True), ValueError,
         r"got 3 batches without one \(24 unreadable images skipped\)"),
    ],
)  # fmt: skip
def test_a_resumed_trainer_keeps_counting_the_batches_skipped_before_its_checkpoint(tmp_path, monkeypatch, limits,
                                                                                    error, message):  # fmt: skip
    # Batches 4 and 5 have no readable image and the checkpoint of step 5 follows them; the run is cut off as soon as
    # the Trainer has written it. Resumed, batch 6 has none either: three in a row and 24 images, as in a run that was
    # never cut off.
    data = load_digits_dataset("train").select(range(64))
    collate = MSNViewsCollator.__call__

    def scripted(unusable_calls: set[int]):
        unusable = scripted_batches(unusable_calls)
        return lambda self, rows: {"num_skipped": len(rows)} if unusable() else collate(self, rows)

    options = dict(save_strategy="steps", save_steps=5, **limits)
    monkeypatch.setattr(MSNViewsCollator, "__call__", scripted({4, 5, 6}))
    with pytest.raises(error, match=message):  # the run never cut off
        tiny_trainer(tmp_path / "whole", data, **options).train()

    monkeypatch.setattr(MSNViewsCollator, "__call__", scripted({4, 5}))
    with pytest.raises(StoppedAfterTheCheckpoint):
        tiny_trainer(tmp_path, data, callbacks=[CutOffAtTheFirstSave()], **options).train()
    assert (tmp_path / "checkpoint-5" / "trainer_state.json").is_file()

    # The resumed run skips the first 5 batches without collating them: call 1 is batch 6.
    monkeypatch.setattr(MSNViewsCollator, "__call__", scripted({1}))
    with pytest.raises(error, match=message):
        tiny_trainer(tmp_path, data, **options).train(resume_from_checkpoint=True)


# --- a short last accumulation window: the mean of its micro-batches ------------------------------------------------


def recording_steps(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> list[dict]:
    """Before each optimiser step: the gradients it applies and the weights they were computed at."""
    names, steps = {id(p): n for n, p in model.named_parameters()}, []

    def record(optimizer, args, kwargs):
        grads = {names[id(p)]: p.grad.clone() for g in optimizer.param_groups for p in g["params"] if p.grad is not None}
        steps.append(dict(grads=grads, weights=copy.deepcopy(model.state_dict())))

    optimizer.register_step_pre_hook(record)
    return steps


def assert_gradients_of_one_batch(step: dict, config: dict, batch: dict) -> None:
    """The gradients `step` applied are those of `batch` alone, recomputed from the weights they were taken at."""
    direct = MSNModel(tiny_config(**config)).train()
    direct.load_state_dict(step["weights"])
    direct(**batch).loss.backward()
    expected = {name: p.grad for name, p in direct.named_parameters() if p.grad is not None}
    assert expected.keys() == step["grads"].keys()
    for name, grad in step["grads"].items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)


# No random masks: the recomputation must see the very same forward.
NO_MASKS = dict(mask_ratio=0.0)


def test_the_accelerate_loop_takes_the_mean_over_a_short_last_window():
    accelerator, model, optimizer, schedules = step_setup(gradient_accumulation_steps=2, **NO_MASKS)
    views = tiny_views(12)
    # 3 batches of 4 with 2 micro-batches per window: the epoch's last window holds one micro-batch.
    loader = accelerator.prepare(DataLoader([{k: v[i] for k, v in views.items()} for i in range(12)], batch_size=4))
    steps, batches, state = recording_steps(optimizer.optimizer, model), [], checkpointing.TrainingState()
    for batch in loader:
        batches.append(batch)
        pt.training_step(accelerator, model, optimizer, batch, state, schedules, max_grad_norm=0.0)
    assert state.completed_steps == 2 and len(steps) == 2
    assert_gradients_of_one_batch(steps[1], NO_MASKS, batches[2])


def test_the_trainer_takes_the_mean_over_a_short_last_window(tmp_path, monkeypatch):
    model = MSNModel(tiny_config(**NO_MASKS))
    # 48 images in batches of 16, 2 per window: windows of 2 and 1 micro-batches.
    trainer = tiny_trainer(tmp_path, load_digits_dataset("train").select(range(48)), model=model, max_steps=2,
                           per_device_train_batch_size=16, gradient_accumulation_steps=2, max_grad_norm=0.0)  # fmt: skip
    trainer.create_optimizer()
    steps, batches = recording_steps(trainer.optimizer, model), []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda **inputs: (batches.append(inputs), forward(**inputs))[1])
    trainer.train()
    assert len(steps) == 2 and len(batches) == 3
    assert_gradients_of_one_batch(steps[1], NO_MASKS, batches[2])


# --- no host sync on the hot path but the step's decision -----------------------------------------------------------

HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__")
# Not counted: torch itself (AdamW reads its step counters, kept on the CPU on purpose, with `.item()`), and the
# views, which are drawn on the CPU (their device path is checked on the meta device below).
NOT_COUNTED = (f"{os.sep}torch{os.sep}", "views_msn.py", "image_processing_msn.py", f"msn_hf{os.sep}data.py")


class HostReads:
    """Counts, while `on`, the reads of a tensor's value by the host (each one waits for the device's queue)."""

    def __init__(self, monkeypatch):
        self.on, self.reads = False, []
        for name in HOST_READS:
            monkeypatch.setattr(torch.Tensor, name, self._counted(getattr(torch.Tensor, name), name))

    def _counted(self, read, name):
        def counted(tensor, *args, **kwargs):
            caller = sys._getframe(1).f_code
            if self.on and not any(part in caller.co_filename for part in NOT_COUNTED):
                self.reads.append(f"{name} in {caller.co_name} ({caller.co_filename})")
            return read(tensor, *args, **kwargs)

        return counted


def test_one_step_of_the_accelerate_loop_reads_the_device_once(tmp_path, monkeypatch):
    host_reads, training_step, calls = HostReads(monkeypatch), pt.training_step, {"n": 0}

    def counted_step(*args, **kwargs):
        # From the start of step 2 to the start of step 3: a whole step, its batch decision and the loop's own work.
        calls["n"] += 1
        host_reads.on = calls["n"] == 2
        return training_step(*args, **kwargs)

    monkeypatch.setattr(pt, "training_step", counted_step)
    # Logging only at the end (step 3), so that the counted step is not a logging step.
    pt.main([*TINY_MODEL_ARGS[:-2], "--logging_steps", "100", "--skip_evaluation", "--per_device_train_batch_size", "8",
             "--max_train_samples", "64", "--max_train_steps", "3", "--output_dir", str(tmp_path)])  # fmt: skip
    assert calls["n"] == 3
    assert len(host_reads.reads) <= 1, host_reads.reads


def test_one_step_of_the_trainer_reads_the_device_once(tmp_path, monkeypatch):
    from transformers import TrainerCallback

    host_reads = HostReads(monkeypatch)

    class CountStep2(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            host_reads.on = state.global_step == 1  # from the start of step 2 to the start of step 3

    trainer = tiny_trainer(tmp_path, load_digits_dataset("train").select(range(64)), max_steps=4, logging_steps=100)
    trainer.add_callback(CountStep2())
    trainer.train()
    assert trainer.state.global_step == 4
    assert len(host_reads.reads) <= 1, host_reads.reads


@pytest.mark.parametrize("probability", [0.0, 1.0])
def test_views_drawn_on_the_device_never_read_the_device_back(probability):
    # A meta tensor has no values: any read of one by the host raises, where on an accelerator it would wait.
    processor = MSNImageProcessor(
        size={"shortest_edge": 36}, crop_size=32, focal_crop_size=16, num_focal_views=2,
        color_jitter_probability=probability, grayscale_probability=probability, blur_probability=probability,
        horizontal_flip_probability=probability,
    )  # fmt: skip
    canvas = torch.zeros(4, 3, 36, 36, dtype=torch.uint8, device="meta")
    generator = torch.Generator().manual_seed(0)
    views = processor(canvas, return_views=True, generator=generator, device="meta", return_tensors="pt")
    assert views["focal_pixel_values"].shape == (4, 2, 3, 16, 16) and views["pixel_values"].is_meta
