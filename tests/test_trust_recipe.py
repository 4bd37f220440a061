"""
The recipe both loops run, held to the same rules: argument checks, batch seeds, unreadable data, the mean over a
short accumulation window, Sinkhorn's global batch, and no host sync on the hot path but the step's decision.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY_MODEL_ARGS, tiny_config
from msn_hf import MSNModel, training
from msn_hf import pretraining as pt
from msn_hf.trainer_msn import MSNTrainingArguments

RUN_ARGS = [*TINY_MODEL_ARGS, "--skip_evaluation"]

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
    torch.manual_seed(0)
    model = MSNModel(tiny_config(mask_ratio=0.0, projection_batch_norm=False)).train()
    output = model(**inputs)
    output.loss.backward()
    reference = dict(
        loss=output.loss.detach(),
        me_max_loss=output.me_max_loss.detach(),
        target_probs=output.target_probs,
        grads={name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None},
    )
    debug_launcher(_unequal_batches_check, args=(inputs, reference), num_processes=2)
