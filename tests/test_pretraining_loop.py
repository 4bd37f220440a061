"""
The pretraining loop at scale: what one step does to the weights, schedules and clipping, collective skip decisions,
gradient accumulation, shards and streaming across processes, atomic checkpoints, and bad input.
"""

import io
import json
import os
import signal
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from accelerate import Accelerator
from PIL import Image

from conftest import (
    RUN_ARGS,
    STREAM_ARGS,
    labelled_dataset,
    launch,
    logged_rows,
    random_images,
    step_setup,
    tiny_config,
    tiny_views,
    train_in_process,
)
from msn_hf import MSNImageProcessor, MSNModel, checkpointing
from msn_hf import pretraining as pt
from msn_hf.data import DataArguments, decode_image
from msn_hf.evaluation import load_evaluation_datasets


@pytest.fixture(scope="module")
def webdataset_shards(tmp_path_factory) -> Path:
    """Two webdataset .tar shards of 32 PNG images with a `cls` label each."""
    import tarfile

    folder = tmp_path_factory.mktemp("webdataset")
    images = random_images(64, seed=1)
    for shard in range(2):
        with tarfile.open(folder / f"shard-{shard}.tar", "w") as tar:
            for i in range(32):
                key = f"s{shard}_{i:03d}"
                buffer = io.BytesIO()
                images[32 * shard + i].save(buffer, "PNG")
                for extension, payload in (("png", buffer.getvalue()), ("cls", str(i % 4).encode())):
                    info = tarfile.TarInfo(f"{key}.{extension}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return folder


# --- one step ------------------------------------------------------------------------------------------------------


def test_each_step_moves_the_anchor_and_updates_the_target_with_the_scheduled_momentum():
    accelerator, model, optimizer, schedules = step_setup()
    state = checkpointing.TrainingState()
    initial_anchor = model.encoder.blocks[0].attn.qkv.weight.detach().clone()
    for step in range(3):
        old_target = [p.detach().clone() for p in model.target_encoder.parameters()]
        pt.training_step(accelerator, model, optimizer, tiny_views(8, seed=step), state, schedules, max_grad_norm=3.0)
        assert state.completed_steps == step + 1
        for group in optimizer.param_groups:
            assert group["lr"] == pytest.approx(schedules.lr(step))
            assert group["weight_decay"] == pytest.approx(schedules.wd(step) if group["name"] == "decay" else 0.0)
        momentum = schedules.ema_momentum(step)
        for old, target, anchor in zip(old_target, model.target_encoder.parameters(), model.encoder.parameters()):
            torch.testing.assert_close(target, momentum * old + (1 - momentum) * anchor)
    assert not torch.equal(model.encoder.blocks[0].attn.qkv.weight, initial_anchor)


def test_the_loop_steps_with_torchs_fused_adamw(tmp_path, monkeypatch, adamw_implementations):
    # One kernel over all parameters (Transformers' default optimiser), not torch's CPU default of a Python loop.
    train_in_process(monkeypatch, [*RUN_ARGS, "--max_train_samples", "32", "--per_device_train_batch_size", "8",
                                   "--max_train_steps", "2", "--output_dir", tmp_path / "run"], tmp_path / "log")
    assert adamw_implementations and set(adamw_implementations) == {"_fused_adam"}


def gradients_at_step(max_grad_norm: float) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    accelerator, model, optimizer, schedules = step_setup()
    grads = {}
    names = {id(p): n for n, p in model.named_parameters()}

    def record(optimizer, args, kwargs):
        for group in optimizer.param_groups:
            grads.update({names[id(p)]: p.grad.clone() for p in group["params"] if p.grad is not None})

    optimizer.optimizer.register_step_pre_hook(record)
    torch.manual_seed(1)
    pt.training_step(accelerator, model, optimizer, tiny_views(8), checkpointing.TrainingState(), schedules, max_grad_norm)
    return grads


def test_only_encoder_and_projection_head_gradients_are_clipped():
    clipped, unclipped = gradients_at_step(1e-3), gradients_at_step(0.0)
    head = [n for n in unclipped if n.startswith(("encoder.", "projection_head."))]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(clipped[n]) for n in head]))
    assert norm == pytest.approx(1e-3, rel=1e-3)
    assert torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(unclipped[n]) for n in head])) > 1e-2
    torch.testing.assert_close(clipped["prototypes"], unclipped["prototypes"])
    assert unclipped["prototypes"].abs().sum() > 0


def test_two_accumulated_micro_batches_give_the_update_of_the_doubled_batch():
    # A loss that is a mean over rows: no Sinkhorn or me-max (both batch-level), no BatchNorm (its statistics are
    # those of each micro-batch), no random masks.
    config = dict(sinkhorn_iterations=0, me_max_weight=0.0, projection_batch_norm=False, mask_ratio=0.0)
    views = tiny_views(8)
    halves = [{k: v[i * 4 : (i + 1) * 4] for k, v in views.items()} for i in range(2)]
    torch.manual_seed(0)
    accelerator, doubled, optimizer, schedules = step_setup(**config)
    state = checkpointing.TrainingState()
    pt.training_step(accelerator, doubled, optimizer, views, state, schedules, max_grad_norm=3.0)
    torch.manual_seed(0)
    accelerator, accumulated, optimizer, schedules = step_setup(gradient_accumulation_steps=2, **config)
    state = checkpointing.TrainingState()
    pt.training_step(accelerator, accumulated, optimizer, halves[0], state, schedules, max_grad_norm=3.0)
    assert state.completed_steps == 0
    pt.training_step(accelerator, accumulated, optimizer, halves[1], state, schedules, max_grad_norm=3.0)
    assert state.completed_steps == 1
    for (name, expected), actual in zip(doubled.state_dict().items(), accumulated.state_dict().values()):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-6, msg=name)


def test_a_non_finite_gradient_norm_skips_the_step_and_the_ema():
    accelerator, model, optimizer, schedules = step_setup()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    hook = model.encoder.blocks[0].attn.qkv.weight.register_hook(lambda grad: grad * float("inf"))
    state = checkpointing.TrainingState()
    output = pt.training_step(accelerator, model, optimizer, tiny_views(8), state, schedules, max_grad_norm=3.0)
    hook.remove()
    assert torch.isfinite(output.loss)
    assert state.completed_steps == 0 and state.consecutive_nonfinite == 1
    for key, value in before.items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0, msg=key)
    pt.training_step(accelerator, model, optimizer, tiny_views(8), state, schedules, max_grad_norm=3.0)
    assert state.completed_steps == 1 and state.consecutive_nonfinite == 0


def test_a_step_the_grad_scaler_skipped_takes_no_ema_update_and_is_not_counted(monkeypatch):
    accelerator, model, optimizer, schedules = step_setup()
    target = [p.detach().clone() for p in model.target_encoder.parameters()]
    monkeypatch.setattr(Accelerator, "optimizer_step_was_skipped", property(lambda self: True))
    state = checkpointing.TrainingState()
    pt.training_step(accelerator, model, optimizer, tiny_views(8), state, schedules, max_grad_norm=3.0)
    assert state.completed_steps == 0 and state.consecutive_nonfinite == 0
    for old, new in zip(target, model.target_encoder.parameters()):
        assert torch.equal(old, new)


# --- data and bad input --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--checkpointing_steps", "0"], "--checkpointing_steps"),
        (["--checkpointing_steps", "-3"], "--checkpointing_steps"),
        (["--logging_steps", "0"], "--logging_steps"),
        (["--backbone_kwargs", "{oops"], "--backbone_kwargs"),
        (["--streaming"], "--streaming"),
        (["--train_dir", "a", "--dataset_name", "b"], "--dataset_name, --train_dir"),
    ],
)
def test_bad_flags_are_refused_by_name(argv, flag):
    with pytest.raises(ValueError, match=flag):
        pt.parse_args(argv)


def test_abbreviated_flags_are_refused():
    # A recipe file gives way to the flags typed on the command line, so every flag must be read by its full name.
    with pytest.raises(ValueError, match="--learning"):
        pt.parse_args(["--learning", "0.1"])
    assert pt.parse_args(["--learning_rate", "0.1"])[0].learning_rate == 0.1


def test_train_files_must_match_files_of_a_known_kind(tmp_path):
    from msn_hf.data import resolve_shards

    with pytest.raises(ValueError, match="--train_files .*matches no file"):
        resolve_shards([str(tmp_path / "*.parquet")])
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(ValueError, match=r"--train_files .*\['.csv'\]"):
        resolve_shards([str(tmp_path / "*.csv")])
    (tmp_path / "b.parquet").write_text("x")
    (tmp_path / "c.tar").write_text("x")
    with pytest.raises(ValueError, match="one extension"):
        resolve_shards([str(tmp_path / "b.parquet"), str(tmp_path / "c.tar")])
    assert resolve_shards([str(tmp_path / "*.parquet")]) == ("parquet", [str(tmp_path / "b.parquet")])


def test_a_dataset_smaller_than_one_global_batch_stops_before_training(tmp_path):
    labelled_dataset(12).save_to_disk(str(tmp_path / "data"))
    with pytest.raises(ValueError, match="--per_device_train_batch_size 16"):
        pt.main([*RUN_ARGS, "--dataset_name", str(tmp_path / "data"), "--per_device_train_batch_size", "16",
                 "--max_train_steps", "2", "--output_dir", str(tmp_path / "run")])  # fmt: skip
    assert not list((tmp_path / "run").glob("checkpoint-*"))
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_decompression_bombs_are_skipped_and_alpha_is_composited_like_the_processor(monkeypatch):
    buffer = io.BytesIO()
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:16, :, 3] = 255  # top half opaque red, bottom half transparent
    Image.fromarray(rgba, "RGBA").save(buffer, "PNG")
    record = {"bytes": buffer.getvalue(), "path": None}
    decoded = np.asarray(decode_image(record))
    assert (decoded[:16] == [200, 0, 0]).all() and (decoded[16:] == 255).all()
    processor = MSNImageProcessor(size=32, crop_size=32)
    from_collator = processor(decode_image(record), return_tensors="pt")["pixel_values"]
    from_processor = processor(Image.open(io.BytesIO(record["bytes"])), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(from_collator, from_processor)

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 32 x 32 is then over twice the limit: a "bomb"
    assert decode_image(record) is None


def test_held_out_images_are_removed_before_pretraining_and_unlabelled_splits_are_not_used(tmp_path):
    dataset = datasets.DatasetDict(train=labelled_dataset(80), test=labelled_dataset(20, seed=5).cast_column(
        "label", datasets.Value("int64")).map(lambda row: {"label": -1}))  # fmt: skip
    dataset.save_to_disk(str(tmp_path / "data"))
    data_args = DataArguments(dataset_name=str(tmp_path / "data"), test_size=0.25)
    args = pt.PretrainingArguments(per_device_train_batch_size=8, seed=3)
    train_data = pt.build_train_data(data_args, args, Accelerator(cpu=True))
    pretrained_ids = {train_data.dataset[i]["id"] for i in range(len(train_data.dataset))}
    train, test = train_data.evaluation
    test_ids = set(test.dataset["id"])
    assert len(test_ids) == 20 and len(pretrained_ids) == 60
    assert not pretrained_ids & test_ids
    assert test_ids <= {f"row{i:03d}" for i in range(80)}  # held out of train, not the label -1 test split
    assert set(train.dataset["id"]) == pretrained_ids
    # `msn-evaluate` on the same flags holds out the same images.
    _, evaluate_test = load_evaluation_datasets(dataset_name=str(tmp_path / "data"), test_size=0.25)
    assert set(evaluate_test.dataset["id"]) == test_ids
    # Nothing is held out of data too large to evaluate.
    args.max_eval_samples = 50
    train_data = pt.build_train_data(data_args, args, Accelerator(cpu=True))
    assert train_data.evaluation is None and len(train_data.dataset) == 80
    assert "exceed --max_eval_samples 50" in train_data.no_evaluation_reason


# --- runs ----------------------------------------------------------------------------------------------------------


def test_checkpoints_rotate_keep_the_newest_and_overwrite_removes_the_old_run(tmp_path):
    out = tmp_path / "run"
    stale = out / "checkpoint-50"
    stale.mkdir(parents=True)
    (stale / checkpointing.TRAINING_STATE_FILE).write_text(json.dumps({"completed_steps": 50}))
    common = [*RUN_ARGS, "--per_device_train_batch_size", "16", "--max_train_samples", "32",
              "--output_dir", str(out)]  # fmt: skip
    with pytest.raises(ValueError, match="--overwrite_output_dir"):
        pt.main([*common, "--max_train_steps", "1"])
    pt.main([*common, "--max_train_steps", "3", "--checkpointing_steps", "1", "--checkpoints_total_limit", "2",
             "--overwrite_output_dir"])  # fmt: skip
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert checkpointing.find_latest_checkpoint(out) == out / "checkpoint-3"

    epochs = tmp_path / "epochs"  # 32 images, batch 16: 2 steps per epoch
    pt.main([*common[:-1], str(epochs), "--max_train_steps", "4", "--checkpointing_steps", "epoch",
             "--checkpoints_total_limit", "1"])  # fmt: skip
    assert [p.name for p in epochs.glob("checkpoint-*")] == ["checkpoint-4"]
    state = json.loads((epochs / "checkpoint-4" / checkpointing.TRAINING_STATE_FILE).read_text())
    assert (state["epoch"], state["batches_in_epoch"], state["completed_steps"]) == (2, 0, 4)


def test_a_run_resumed_from_an_earlier_checkpoint_keeps_its_own_and_sets_the_later_ones_aside(tmp_path):
    # Retrying from checkpoint 1 of a 4-step run: the retry's checkpoints are the newest, whatever their step numbers.
    out = tmp_path / "run"
    common = [*RUN_ARGS, "--per_device_train_batch_size", "16", "--max_train_samples", "32", "--output_dir", str(out),
              "--checkpointing_steps", "1"]  # fmt: skip
    pt.main([*common, "--max_train_steps", "4", "--checkpoints_total_limit", "0"])
    first_run = {step: (out / f"checkpoint-{step}" / "model.safetensors").read_bytes() for step in (3, 4)}

    pt.main([*common, "--max_train_steps", "2", "--checkpoints_total_limit", "2",
             "--resume_from_checkpoint", str(out / "checkpoint-1")])  # fmt: skip
    assert sorted(p.name for p in out.glob("checkpoint-*") if checkpointing.CHECKPOINT_PATTERN.match(p.name)) == [
        "checkpoint-1", "checkpoint-2"]  # fmt: skip
    assert checkpointing.find_latest_checkpoint(out) == out / "checkpoint-2"
    # Set aside, not removed: the first run's later checkpoints are still there, under names no resume takes.
    for step, weights in first_run.items():
        (aside,) = out.glob(f"checkpoint-{step}.abandoned-*")
        assert (aside / "model.safetensors").read_bytes() == weights


def test_dataloader_workers_draw_the_same_views_and_bf16_trains(tmp_path):
    common = [*RUN_ARGS, "--per_device_train_batch_size", "8", "--max_train_samples", "32",
              "--max_train_steps", "3", "--seed", "5"]  # fmt: skip
    for workers in (0, 2):
        pt.main([*common, "--dataloader_num_workers", str(workers), "--output_dir", str(tmp_path / f"w{workers}")])
    straight, workers = MSNModel.from_pretrained(tmp_path / "w0"), MSNModel.from_pretrained(tmp_path / "w2")
    for (key, value), other in zip(straight.state_dict().items(), workers.state_dict().values()):
        torch.testing.assert_close(other, value, rtol=0, atol=0, msg=key)

    from accelerate.state import AcceleratorState

    # A process holds one precision: the runs above set it to fp32, and the tests after this one expect it again.
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        pt.main([*common, "--mixed_precision", "bf16", "--output_dir", str(tmp_path / "bf16")])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    metrics = [json.loads(line) for line in (tmp_path / "bf16" / pt.METRICS_FILE).read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(np.isfinite(m["loss"]) for m in metrics)
    trained = MSNModel.from_pretrained(tmp_path / "bf16").encoder.blocks[0].attn.qkv.weight
    assert not torch.equal(trained, MSNModel.from_pretrained(tmp_path / "w0").encoder.blocks[0].attn.qkv.weight)


def test_a_stream_resumes_without_repeating_or_missing_a_row(tmp_path, parquet_shards, monkeypatch):
    common = [*RUN_ARGS, "--train_files", str(parquet_shards / "*.parquet"), "--streaming",
              "--shuffle_buffer_size", "0", "--per_device_train_batch_size", "8", "--max_train_steps", "16",
              "--seed", "2"]  # fmt: skip
    straight_log, split_log = tmp_path / "straight_log", tmp_path / "split_log"
    train_in_process(monkeypatch, [*common, "--output_dir", tmp_path / "straight"], straight_log)
    train_in_process(monkeypatch, [*common, "--output_dir", tmp_path / "split", "--checkpointing_steps", "5",
                                   "--checkpoints_total_limit", "0"], split_log)  # fmt: skip
    (split_log / "rows_0.txt").unlink()
    for path in (tmp_path / "split").iterdir():
        if path.name != "checkpoint-5":
            path.unlink() if path.is_file() else __import__("shutil").rmtree(path)
    train_in_process(monkeypatch, [*common, "--output_dir", tmp_path / "split", "--resume_from_checkpoint", "latest"],
                     split_log)  # fmt: skip
    straight = logged_rows(straight_log, 0)
    # 96 rows = 12 batches per pass: 16 steps reach into the second pass, and the resume (after 5) crosses it too.
    assert len(straight) == 16 * 8 and len(set(straight[:96])) == 96
    assert logged_rows(split_log, 0) == straight[5 * 8 :]
    resumed, uninterrupted = MSNModel.from_pretrained(tmp_path / "split"), MSNModel.from_pretrained(tmp_path / "straight")
    for (key, value), other in zip(uninterrupted.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(other, value, rtol=0, atol=0, msg=key)


def test_a_stream_read_by_workers_tells_that_each_drops_its_last_partial_batch(caplog):
    # PyTorch batches an iterable dataset inside each worker: every worker drops its own last partial batch of a
    # pass, and with the default --shuffle_buffer_size 0 the same rows every pass (2 rows of every 10-row shard in an
    # audit), which nobody was told.
    Accelerator(cpu=True)
    stream = datasets.Dataset.from_dict({"image": list(range(40))}).to_iterable_dataset(num_shards=4)
    for workers, told in ((2, True), (0, False)):
        args, _ = pt.parse_args(["--streaming", "--max_train_steps", "5", "--dataloader_num_workers", str(workers),
                                 "--per_device_train_batch_size", "8"])  # fmt: skip
        caplog.clear()
        with caplog.at_level("WARNING"):
            pt.build_dataloader(pt.TrainData(stream, "image"), collator=None, args=args)
        assert ("each worker drops the last partial batch of its rows (up to 7)" in caplog.text) is told
        assert ("--shuffle_buffer_size" in caplog.text) is told


@pytest.mark.parametrize("kind", ["parquet", "webdataset"])
def test_two_processes_stream_disjoint_halves_of_the_shards(
    kind, tmp_path, uninterrupted_two_process_stream, webdataset_shards
):
    if kind == "parquet":
        run = uninterrupted_two_process_stream
    else:
        run = tmp_path
        result = launch(tmp_path, [*RUN_ARGS, *STREAM_ARGS, "--train_files", webdataset_shards / "*.tar",
                                   "--output_dir", tmp_path / "run"], processes=2)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "run" / "model.safetensors").is_file()
    ranks = [logged_rows(run / "log", rank) for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 4 * 8  # 4 steps of 8 rows on each process, each row decoded once
    assert not set(ranks[0]) & set(ranks[1]) and len(set(ranks[0] + ranks[1])) == 64


def test_a_two_process_run_killed_while_saving_a_checkpoint_resumes_to_the_same_weights(
    tmp_path, parquet_shards, uninterrupted_two_process_stream
):
    out = tmp_path / "run"
    args = [*RUN_ARGS, *STREAM_ARGS, "--train_files", str(parquet_shards / "*.parquet"),
            "--checkpointing_steps", "1", "--output_dir", out]  # fmt: skip
    process = launch(tmp_path, args, processes=2, env={"MSN_SLOW_SAVE": "checkpoint-2.tmp"}, wait=False)
    deadline = time.time() + 180
    # Rank 1 has written its part of checkpoint-2.tmp and still sits in save_state; rank 0 is done with its part and
    # must wait for rank 1 before it renames the folder. Kill both there.
    while not (tmp_path / "log" / "slow_save_written").exists() and time.time() < deadline:
        assert process.poll() is None, "the run ended before its second checkpoint"
        time.sleep(0.2)
    time.sleep(2)
    # torchrun starts each worker in a session of its own: kill the workers as well as the launcher's group.
    for pid_file in (tmp_path / "log").glob("pid_*"):
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert (out / "checkpoint-2.tmp").is_dir()
    assert checkpointing.find_latest_checkpoint(out) == out / "checkpoint-1"
    result = launch(tmp_path, [*args, "--resume_from_checkpoint", "latest"], processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resuming from" in result.stdout + result.stderr
    expected = MSNModel.from_pretrained(uninterrupted_two_process_stream / "run").state_dict()
    for key, value in MSNModel.from_pretrained(out).state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)
    # A stream's positions belong to its processes: one process cannot take over two processes' checkpoint.
    with pytest.raises(ValueError, match=r"--resume_from_checkpoint .* was written by 2 processes: .* got 1"):
        pt.main([*map(str, args), "--resume_from_checkpoint", "latest"])


def test_every_process_skips_a_batch_that_one_process_cannot_use(tmp_path):
    out = tmp_path / "run"
    args = [*RUN_ARGS, "--per_device_train_batch_size", "8", "--max_train_samples", "64",
            "--max_train_steps", "3", "--output_dir", out]  # fmt: skip
    result = launch(tmp_path, args, processes=2, env={"MSN_EMPTY_BATCH": "1", "MSN_NAN_FORWARD": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "without any readable image on some process" in result.stderr
    assert "Non-finite loss or gradient at step" in result.stderr
    # Batch 1: rank 1 has no image, nobody runs forward. Batch 2: NaN on rank 1, nobody steps. Then 3 steps.
    forwards = [len((tmp_path / "log" / f"forwards_{rank}.txt").read_text().split()) for rank in (0, 1)]
    assert forwards == [4, 4]
    assert json.loads((out / "train_results.json").read_text())["completed_steps"] == 3


def test_an_evaluation_above_max_eval_samples_is_skipped_with_a_reason(tmp_path, caplog):
    data = pt.ImageDataset(labelled_dataset(12), "image", "label")
    train_data = pt.TrainData(dataset=None, image_column="image", evaluation=(data, data))
    args = pt.PretrainingArguments(max_eval_samples=20)
    Accelerator(cpu=True)  # the run's logger needs Accelerate's state
    model, processor = MSNModel(tiny_config()), MSNImageProcessor(size=32, crop_size=32)
    with caplog.at_level("INFO"):
        assert pt.run_final_evaluation(args, train_data, model, processor, tmp_path) == {}
    assert "24 labelled images exceed --max_eval_samples 20" in caplog.text
    assert not (tmp_path / "eval_results.json").exists()
    args.max_eval_samples = 24
    results = pt.run_final_evaluation(args, train_data, model, processor, tmp_path)
    assert results["settings"]["num_test"] == 12 and (tmp_path / "eval_results.json").is_file()


def test_stream_parts_of_unequal_length_end_each_epoch_together(tmp_path):
    # Two shards of 40 and 24 rows: one per process, 5 and 3 batches of 8. The epoch ends after 3 batches on both,
    # or the shorter process would reach the epoch's checkpoint barrier while the other is still training.
    data = labelled_dataset(64)
    data.select(range(40)).to_parquet(str(tmp_path / "a.parquet"))
    data.select(range(40, 64)).to_parquet(str(tmp_path / "b.parquet"))
    out = tmp_path / "run"
    args = [*RUN_ARGS, *STREAM_ARGS[:-4], "--max_train_steps", "7", "--train_files", tmp_path / "*.parquet",
            "--checkpointing_steps", "epoch", "--checkpoints_total_limit", "0", "--output_dir", out]  # fmt: skip
    result = launch(tmp_path, args, processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    state = json.loads((out / "checkpoint-6" / checkpointing.TRAINING_STATE_FILE).read_text())
    assert (state["epoch"], state["batches_in_epoch"]) == (2, 0)
