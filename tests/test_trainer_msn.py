"""MSNTrainer: the recipe of `msn-pretrain` behind the Trainer API, proven equal to the Accelerate loop."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.utils import set_seed

from conftest import tiny_config
from msn_hf import MSNImageProcessor, MSNModel
from msn_hf import pretraining as pt
from msn_hf.data import load_digits_dataset
from msn_hf.trainer_msn import MSNTrainer, MSNTrainingArguments

ROOT = Path(__file__).resolve().parents[1]
NUM_SAMPLES, BATCH_SIZE = 64, 16  # 4 steps per epoch


def tiny_processor(**overrides):
    values = dict(size={"shortest_edge": 32}, crop_size=32, focal_crop_size=16, num_focal_views=2)
    return MSNImageProcessor(**{**values, **overrides})


@pytest.fixture
def initial_folder(tmp_path):
    """One initial model and processor that both loops start from."""
    set_seed(0)
    folder = tmp_path / "initial"
    MSNModel(tiny_config(ema_momentum=0.9)).save_pretrained(folder)
    tiny_processor().save_pretrained(folder)
    return folder


def make_trainer(folder, output_dir, max_steps, seed=3, model=None, **overrides):
    model = model if model is not None else MSNModel.from_pretrained(folder)
    values = dict(
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=BATCH_SIZE, warmup_steps=2,
        seed=seed, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
    )
    args = MSNTrainingArguments(**{**values, **overrides})
    dataset = load_digits_dataset("train").select(range(NUM_SAMPLES))
    return MSNTrainer(model, args, dataset, MSNImageProcessor.from_pretrained(folder))


def trainer_schedule_log(trainer):
    return [
        (entry["step"], entry["learning_rate"], entry["weight_decay"], entry["momentum"])
        for entry in trainer.state.log_history if "loss" in entry
    ]


def assert_same_weights(model_a, model_b, atol):
    state_b = model_b.state_dict()
    for key, value in model_a.state_dict().items():
        torch.testing.assert_close(value, state_b[key], rtol=0, atol=atol, msg=key)


def test_trainer_and_accelerate_loop_run_the_same_steps(initial_folder, tmp_path):
    steps, seed = 6, 3  # crosses an epoch boundary: views, data order and mask seeds of epoch 1 are compared too
    loop_dir = tmp_path / "loop"
    pt.main([
        "--model_name_or_path", str(initial_folder), "--max_train_samples", str(NUM_SAMPLES),
        "--per_device_train_batch_size", str(BATCH_SIZE), "--num_warmup_steps", "2", "--max_train_steps", str(steps),
        "--seed", str(seed), "--logging_steps", "1", "--skip_evaluation", "--output_dir", str(loop_dir),
    ])  # fmt: skip
    loop_log = [json.loads(line) for line in (loop_dir / pt.METRICS_FILE).read_text().splitlines()]
    loop_schedule = [(m["step"], m["lr"], m["weight_decay"], m["momentum"]) for m in loop_log]

    trainer = make_trainer(initial_folder, tmp_path / "trainer", steps, seed=seed)
    trainer.train()
    trainer_schedule = trainer_schedule_log(trainer)

    assert [row[0] for row in trainer_schedule] == list(range(1, steps + 1))
    for ours, theirs in zip(trainer_schedule, loop_schedule, strict=True):
        assert ours == pytest.approx(theirs, rel=1e-12), (ours, theirs)
    # The first step uses step index 0 of every schedule.
    schedules = trainer.lr_scheduler.schedules
    assert trainer_schedule[0][1:] == pytest.approx((schedules.lr(0), schedules.wd(0), schedules.ema_momentum(0)))
    assert trainer_schedule[0][3] == pytest.approx(0.9)

    loop_model = MSNModel.from_pretrained(loop_dir)
    initial = MSNModel.from_pretrained(initial_folder)
    # Training moved every part that is compared, so equality below is not that of two untouched copies.
    for name in ("encoder.blocks.0.attn.qkv.weight", "target_encoder.blocks.0.attn.qkv.weight", "prototypes"):
        assert not torch.allclose(loop_model.get_parameter(name), initial.get_parameter(name)), name
    assert_same_weights(trainer.model, loop_model, atol=1e-5)
