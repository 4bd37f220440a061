"""MSNTrainer: the recipe of `msn-pretrain` behind the Trainer API, proven equal to the Accelerate loop."""

import json
import math
import os
import runpy
import sys
from pathlib import Path

import pytest
import torch
from accelerate.utils import set_seed

from conftest import tiny_config
from msn_hf import MSNImageProcessor, MSNModel
from msn_hf import pretraining as pt
from msn_hf.data import load_digits_dataset, load_image_dataset
from msn_hf.recipe import auto_recipe
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
    dataset = load_image_dataset(max_samples=NUM_SAMPLES).dataset  # the rows `--max_train_samples` gives the loop
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
    # The Trainer runs the folder's model and views as they are, at its default learning rates: the loop is told the
    # same, over the choices of its continue recipe (a lower learning rate, a slow EMA, the auto rule's views).
    views = MSNImageProcessor.from_pretrained(initial_folder)
    kept_views = ",".join(f"{name}={json.dumps(getattr(views, name))}"
                          for name in ("num_focal_views", "blur_sigma", "color_jitter_probability"))  # fmt: skip
    pt.main([
        "--model_name_or_path", str(initial_folder), "--max_train_samples", str(NUM_SAMPLES),
        "--per_device_train_batch_size", str(BATCH_SIZE), "--num_warmup_steps", "2", "--max_train_steps", str(steps),
        "--seed", str(seed), "--logging_steps", "1", "--skip_evaluation", "--output_dir", str(loop_dir),
        "--learning_rate", "1e-3", "--warmup_start_learning_rate", "2e-4", "--config_overrides", "ema_momentum=0.9",
        "--processor_overrides", kept_views,
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


def test_the_trainer_steps_with_torchs_fused_adamw_like_the_loop(initial_folder, tmp_path, adamw_implementations):
    make_trainer(initial_folder, tmp_path / "trainer", max_steps=2).train()
    assert adamw_implementations and set(adamw_implementations) == {"_fused_adam"}


def test_the_trainer_keeps_decoded_images_for_its_views_collator_without_workers_only(initial_folder, tmp_path):
    def first_image(trainer):
        dataset = trainer.train_dataset
        return dataset[0]["image"], dataset[0] is dataset[0]

    image, kept = first_image(make_trainer(initial_folder, tmp_path / "default", max_steps=1))
    assert isinstance(image, torch.Tensor) and image.shape == (3, 32, 32) and kept
    image, kept = first_image(make_trainer(initial_folder, tmp_path / "workers", 1, dataloader_num_workers=1))
    assert isinstance(image, dict) and not kept
    # A collator of the user's own is given the rows as they are.
    trainer = make_trainer(initial_folder, tmp_path / "own", max_steps=1)
    own = MSNTrainer(trainer.model, trainer.args, load_digits_dataset("train").select(range(NUM_SAMPLES)),
                     trainer.processing_class, data_collator=lambda rows: rows)  # fmt: skip
    image, kept = first_image(own)
    assert isinstance(image, dict) and not kept


def test_prototypes_norms_and_biases_get_no_weight_decay_and_no_clipping(initial_folder, tmp_path):
    trainer = make_trainer(initial_folder, tmp_path, max_steps=10, max_grad_norm=1.0)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    model, optimizer = trainer.model, trainer.optimizer
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["name"]: {names[id(p)] for p in g["params"]} for g in optimizer.param_groups}
    assert {"prototypes", "encoder.blocks.0.attn.qkv.bias", "encoder.norm.weight", "projection_head.bn1.weight",
            "projection_head.fc1.bias"} <= groups["no_decay"]  # fmt: skip
    assert "encoder.blocks.0.attn.qkv.weight" in groups["decay"] and "projection_head.fc1.weight" in groups["decay"]
    assert not any(n.startswith("target_") for n in groups["decay"] | groups["no_decay"])
    for _ in range(3):
        trainer.lr_scheduler.step()
    decay, no_decay = (next(g for g in optimizer.param_groups if g["name"] == n) for n in ("decay", "no_decay"))
    assert decay["weight_decay"] == pytest.approx(trainer.lr_scheduler.schedules.wd(3)) and decay["weight_decay"] > 0.04
    assert no_decay["weight_decay"] == 0.0

    for param in model.parameters():
        param.grad = torch.full_like(param, 10.0) if param.requires_grad else None
    norm = trainer._clip_grad_norm(model)
    clipped = [*model.encoder.parameters(), *model.projection_head.parameters()]
    assert norm == pytest.approx(10.0 * math.sqrt(sum(p.numel() for p in clipped)))
    assert torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in clipped])) == pytest.approx(1.0, rel=1e-5)
    assert torch.equal(model.prototypes.grad, torch.full_like(model.prototypes, 10.0))


def test_ema_runs_once_per_optimiser_step_and_not_after_a_skipped_step(initial_folder, tmp_path, monkeypatch):
    trainer = make_trainer(initial_folder, tmp_path, max_steps=3, gradient_accumulation_steps=2)
    momenta = []
    update = trainer.model.update_target_encoder
    monkeypatch.setattr(trainer.model, "update_target_encoder", lambda m: (momenta.append(m), update(m)))
    skipped = {"step": 1}  # the AMP grad scaler rejects the second optimiser step
    accelerator_class = type(trainer.accelerator)
    monkeypatch.setattr(
        accelerator_class, "optimizer_step_was_skipped",
        property(lambda self: trainer.state.global_step == skipped["step"]),
    )  # fmt: skip
    forwards = []
    forward = trainer.model.forward
    monkeypatch.setattr(trainer.model, "forward", lambda **kw: (forwards.append(1), forward(**kw))[1])
    trainer.train()
    assert len(forwards) == 6  # 3 steps x 2 micro-batches
    schedules = trainer.lr_scheduler.schedules
    # Step 0 updates with momentum index 0; step 1 is skipped (no EMA, no schedule advance); step 2 uses index 1.
    assert momenta == pytest.approx([schedules.ema_momentum(0), schedules.ema_momentum(1)])
    assert trainer.lr_scheduler.last_epoch == 2


def test_resume_from_checkpoint_continues_the_schedules_and_the_run(initial_folder, tmp_path):
    straight = make_trainer(initial_folder, tmp_path / "run", max_steps=6, save_strategy="steps", save_steps=3)
    straight.train()
    assert (tmp_path / "run" / "checkpoint-3").is_dir()
    resumed = make_trainer(initial_folder, tmp_path / "run", max_steps=6)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    # Steps 1-3 come back with the checkpoint's state; 4-6 were run again after the resume.
    assert [row[0] for row in trainer_schedule_log(resumed)] == [1, 2, 3, 4, 5, 6]
    assert resumed._initial_global_step == 3
    assert trainer_schedule_log(resumed) == trainer_schedule_log(straight)
    assert_same_weights(resumed.model, straight.model, atol=1e-6)


def test_resume_true_skips_a_checkpoint_that_a_kill_left_half_written(initial_folder, tmp_path):
    # The Trainer writes a checkpoint in place, its state last: a kill mid-save left a folder that
    # `resume_from_checkpoint=True` picked as the latest, and the resume died on its missing trainer_state.json.
    straight = make_trainer(initial_folder, tmp_path / "run", max_steps=4, save_strategy="steps", save_steps=2)
    straight.train()
    cut = tmp_path / "run" / "checkpoint-4"
    for name in ("trainer_state.json", "rng_state.pth", "scheduler.pt"):
        (cut / name).unlink()
    optimizer = (cut / "optimizer.pt").read_bytes()
    (cut / "optimizer.pt").write_bytes(optimizer[: len(optimizer) // 2])
    resumed = make_trainer(initial_folder, tmp_path / "run", max_steps=4)
    resumed.train(resume_from_checkpoint=True)
    assert resumed._initial_global_step == 2
    assert trainer_schedule_log(resumed) == trainer_schedule_log(straight)
    assert_same_weights(resumed.model, straight.model, atol=1e-6)
    # A torn trainer_state.json (killed while it was written) is no more a checkpoint than a missing one.
    (cut / "trainer_state.json").write_text('{"global_step": 4, "log_hist')
    again = make_trainer(initial_folder, tmp_path / "run", max_steps=4)
    again.train(resume_from_checkpoint=True)
    assert again._initial_global_step == 2


def test_the_hub_token_reaches_no_file_the_trainer_writes(initial_folder, tmp_path):
    # The Trainer pickles its arguments into every checkpoint and export (training_args.bin), which `push_to_hub`
    # uploads: the token was in them.
    token = "hf_NotARealTokenButSecret0123"
    trainer = make_trainer(initial_folder, tmp_path / "run", max_steps=2, save_strategy="steps", save_steps=1,
                           hub_token=token)  # fmt: skip
    trainer.train()
    trainer.save_model(str(tmp_path / "run" / "final"))
    written = [path for path in (tmp_path / "run").rglob("*") if path.is_file()]
    assert sum(path.name == "training_args.bin" for path in written) == 3  # the two checkpoints and the export
    assert [str(path) for path in written if token.encode() in path.read_bytes()] == []
    assert trainer.args.hub_token == token  # kept in the process, for the uploads themselves
    saved = torch.load(tmp_path / "run" / "final" / "training_args.bin", weights_only=False)
    assert saved.hub_token is None and saved.learning_rate == trainer.args.learning_rate


def test_the_weights_the_trainer_writes_are_readable_as_its_other_files_are(initial_folder, tmp_path):
    # safetensors writes through an owner-only temporary file: colleagues could read the config but not the weights.
    trainer = make_trainer(initial_folder, tmp_path / "run", max_steps=1, save_strategy="steps", save_steps=1)
    trainer.train()
    trainer.save_model()
    for folder in (tmp_path / "run", tmp_path / "run" / "checkpoint-1"):
        config_mode = (folder / "config.json").stat().st_mode & 0o777
        assert (folder / "model.safetensors").stat().st_mode & 0o777 == config_mode == 0o666 & ~current_umask()


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_bad_arguments_are_named(initial_folder, tmp_path):
    from transformers import TrainingArguments

    with pytest.raises(ValueError, match="MSNTrainingArguments"):
        MSNTrainer(MSNModel(tiny_config()), TrainingArguments(output_dir=str(tmp_path)), load_digits_dataset("test"),
                   tiny_processor())
    with pytest.raises(ValueError, match="schedule_stretch"):
        MSNTrainingArguments(output_dir=str(tmp_path), schedule_stretch=0.5)


def test_example_script_pretrains_evaluates_and_writes_a_card(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    script = ROOT / "examples" / "pretrain_msn_trainer.py"
    # Run as `python script ...` would run it, in this process (a process of its own costs seconds of imports).
    monkeypatch.setattr(sys, "argv", [
        str(script), "--output_dir", str(out), "--max_steps", "3", "--per_device_train_batch_size", "16",
        "--max_train_samples", "64", "--warmup_steps", "1", "--logging_steps", "1", "--eval_seeds", "0",
        "--backbone_kwargs", '{"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}',
    ])  # fmt: skip
    runpy.run_path(str(script), run_name="__main__")
    stdout = capsys.readouterr().out
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "README.md", "eval_results.json",
                 "loss_curve.png", "modeling_msn.py"):
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    assert "| MSN (this model) |" in card and "| raw pixels |" in card and "model-index" in card
    assert "ViT 2x64, patch 8" in card and "MSNTrainer" in card
    assert "5-shot top-1: MSN" in stdout
    # The model is the auto recipe of this run (64 images, batch 16, 3 steps), not of another run length.
    recipe = auto_recipe(image_size=32, grey=True, num_images=64, global_batch=16, planned_steps=3)
    assert MSNModel.from_pretrained(out).config.num_prototypes == recipe["config"]["num_prototypes"]


def test_nonfinite_windows_take_no_step_then_stop_the_run(initial_folder, tmp_path, monkeypatch):
    trainer = make_trainer(initial_folder, tmp_path, max_steps=10, max_nonfinite_steps=3)
    momenta, calls = [], {"n": 0}
    update = trainer.model.update_target_encoder
    monkeypatch.setattr(trainer.model, "update_target_encoder", lambda m: (momenta.append(m), update(m)))
    forward = trainer.model.forward

    def sometimes_nan(**kwargs):
        output = forward(**kwargs)
        calls["n"] += 1
        if calls["n"] == 2 or calls["n"] >= 4:
            output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(trainer.model, "forward", sometimes_nan)
    with pytest.raises(RuntimeError, match="3 non-finite losses in a row"):
        trainer.train()
    assert calls["n"] == 6
    schedules = trainer.lr_scheduler.schedules
    # Windows 1 and 3 were steps 0 and 1 of the schedules; window 2 and windows 4-6 took no step.
    assert momenta == pytest.approx([schedules.ema_momentum(0), schedules.ema_momentum(1)])
    assert trainer.lr_scheduler.last_epoch == 2
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_a_window_with_a_skipped_batch_takes_no_step(initial_folder, tmp_path, monkeypatch):
    # With DDP the gradients of a window are all-reduced by its last micro-batch's backward: a window whose
    # micro-batch was skipped may hold gradients that were never synchronised, so it takes no step.
    from msn_hf.training import MSNViewsCollator

    trainer = make_trainer(initial_folder, tmp_path, max_steps=2, gradient_accumulation_steps=2)
    momenta = []
    update = trainer.model.update_target_encoder
    monkeypatch.setattr(trainer.model, "update_target_encoder", lambda m: (momenta.append(m), update(m)))
    collate, calls = MSNViewsCollator.__call__, {"n": 0}

    def second_batch_unreadable(self, rows):
        calls["n"] += 1
        return {"num_skipped": len(rows)} if calls["n"] == 2 else collate(self, rows)

    monkeypatch.setattr(MSNViewsCollator, "__call__", second_batch_unreadable)
    trainer.train()
    assert momenta == pytest.approx([trainer.lr_scheduler.schedules.ema_momentum(0)])
