"""Pretraining: schedules, parameter groups, the Accelerate loop end to end, resume, Hub push, bad data, Trainer."""

import json
import math
import os
import runpy
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_MODEL_ARGS, labelled_dataset, tiny_config
from msn_hf import MSNImageProcessor, MSNModel, checkpointing, run_outputs, training
from msn_hf import pretraining as pt

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "pretrain_msn.py"
TINY_ARGS = [*TINY_MODEL_ARGS, "--per_device_train_batch_size", "16", "--max_train_samples", "64"]


def run_script(monkeypatch, capfd, *args) -> subprocess.CompletedProcess:
    """`python examples/pretrain_msn.py ARGS` run in this process (a process of its own costs seconds of imports):
    its exit status and what it wrote."""
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *map(str, args)])
    with pytest.raises(SystemExit) as exit:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    stdout, stderr = capfd.readouterr()
    return subprocess.CompletedProcess(sys.argv, exit.value.code, stdout, stderr)


# --- schedules and optimiser ---------------------------------------------------------------------------------------


def test_schedules_follow_the_original_recipe():
    s = training.MSNSchedules(total_steps=1000, warmup_steps=100)
    span = 1250.0
    assert s.lr(0) == pytest.approx(2e-4)
    assert s.lr(50) == pytest.approx(2e-4 + 0.5 * (1e-3 - 2e-4))
    assert s.lr(100) == pytest.approx(1e-3)
    for step in (300, 999):
        progress = (step - 100) / (span - 100)
        assert s.lr(step) == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5 * (1 + math.cos(math.pi * progress)))
    assert s.lr(1250) == pytest.approx(1e-6)
    assert s.wd(0) == pytest.approx(0.04) and s.wd(1250) == pytest.approx(0.4)
    assert s.wd(625) == pytest.approx(0.22)
    # Training stops at 80 % of every schedule: momentum ends near 0.9992, not 1.
    assert s.ema_momentum(0) == pytest.approx(0.996)
    assert s.ema_momentum(1000) == pytest.approx(0.996 + 0.004 * 0.8)
    assert all(s.ema_momentum(i) <= s.ema_momentum(i + 1) for i in range(0, 1000, 50))


def test_parameter_groups_exclude_biases_norms_prototypes_and_the_target():
    model = MSNModel(tiny_config())
    decay, no_decay = training.parameter_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    decay_names = {names[id(p)] for p in decay["params"]}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "encoder.blocks.0.attn.qkv.weight" in decay_names and "projection_head.fc1.weight" in decay_names
    assert {"prototypes", "encoder.blocks.0.attn.qkv.bias", "encoder.norm.weight"} <= no_decay_names
    assert "projection_head.bn1.weight" in no_decay_names
    assert not any(n.startswith("target_") for n in decay_names | no_decay_names)
    assert all(model.get_parameter(n).ndim > 1 for n in decay_names)
    assert no_decay["weight_decay"] == 0.0

    optimizer = torch.optim.AdamW([decay, no_decay])
    training.apply_schedules(optimizer, training.MSNSchedules(total_steps=10, warmup_steps=2), step=5)
    assert optimizer.param_groups[0]["weight_decay"] > 0.04 and optimizer.param_groups[1]["weight_decay"] == 0.0


def test_find_latest_checkpoint_ignores_incomplete_saves(tmp_path):
    for name in ("checkpoint-2", "checkpoint-10", "checkpoint-12.tmp", "checkpoint-11"):
        (tmp_path / name).mkdir()
    for name in ("checkpoint-2", "checkpoint-10", "checkpoint-12.tmp"):
        (tmp_path / name / checkpointing.TRAINING_STATE_FILE).write_text("{}")
    assert checkpointing.find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    assert checkpointing.find_latest_checkpoint(tmp_path / "missing") is None


# --- decoded images kept in memory ----------------------------------------------------------------------------------


def undecoded_rows(count: int, corrupt: tuple[int, ...] = ()):
    """`labelled_dataset(count)` as the loop reads it (images undecoded), rows in `corrupt` holding bytes that are
    not an image."""
    import datasets

    rows = labelled_dataset(count).cast_column("image", datasets.Image(decode=False))
    return rows.map(lambda row, i: {"image": {"bytes": b"not an image", "path": None}} if i in corrupt else row,
                    with_indices=True)  # fmt: skip


def test_rows_read_again_are_not_decoded_again_until_the_cache_is_full(decodes):
    one_image = 3 * 32 * 32
    dataset = training.IndexedDataset(undecoded_rows(12), "image", cache_bytes=5 * one_image)
    collator = training.MSNViewsCollator(MSNImageProcessor(size=32, crop_size=32, focal_crop_size=16), "image")
    for epoch in range(3):
        rows = [dataset[i] for i in range(12)]
        assert collator(rows)["num_skipped"] == 0
        assert [(row["id"], row["label"], row[training.INDEX_KEY]) for row in rows] == [
            (f"row{i:03d}", i % 4, i) for i in range(12)
        ]
        # The first epoch decodes all 12; later ones only the 7 that did not fit in the 5 images' bytes.
        assert len(decodes) == 12 + 7 * epoch


def test_views_of_images_from_memory_equal_those_of_images_decoded_again():
    processor = MSNImageProcessor(size=32, crop_size=32, focal_crop_size=16, num_focal_views=2)
    cached = training.IndexedDataset(undecoded_rows(8), "image", cache_bytes=2**20)
    plain = training.IndexedDataset(undecoded_rows(8))
    for views_on_device in (False, True):
        collator = training.MSNViewsCollator(processor, "image", seed=3, views_on_device=views_on_device)
        for _ in range(2):  # the first reading fills the cache, the second is served from it
            from_memory = collator([cached[i] for i in range(8)])
        decoded = collator([plain[i] for i in range(8)])
        assert isinstance(cached[0]["image"], torch.Tensor) and isinstance(plain[0]["image"], dict)
        assert from_memory.keys() == decoded.keys()
        for key, value in decoded.items():
            assert torch.equal(from_memory[key], value) if isinstance(value, torch.Tensor) else from_memory[key] == value


def test_an_unreadable_image_in_memory_is_skipped_and_counted_every_epoch(decodes):
    dataset = training.IndexedDataset(undecoded_rows(6, corrupt=(2,)), "image", cache_bytes=2**20)
    collator = training.MSNViewsCollator(MSNImageProcessor(size=32, crop_size=32, focal_crop_size=16), "image")
    for _ in range(2):
        batch = collator([dataset[i] for i in range(6)])
        assert batch["num_skipped"] == 1 and batch["pixel_values"].shape[0] == 5
    assert len(decodes) == 6


def test_the_loop_decodes_each_image_once_without_dataloader_workers_and_every_epoch_with_them(tmp_path, decodes):
    from accelerate import Accelerator

    for workers, kept in ((0, True), (1, False)):
        args, data_args = pt.parse_args([*TINY_ARGS, "--dataloader_num_workers", str(workers),
                                         "--output_dir", str(tmp_path / "run")])  # fmt: skip
        train_data = pt.build_train_data(data_args, args, Accelerator(cpu=True))
        decodes.clear()
        for _ in range(2):
            [train_data.dataset[i] for i in range(len(train_data.dataset))]
        assert len(decodes) == (len(train_data.dataset) if kept else 0)
    # The run itself: three epochs of 64 images (4 steps each) decode each image once.
    decodes.clear()
    pt.main([*TINY_ARGS, "--max_train_steps", "12", "--skip_evaluation", "--output_dir", str(tmp_path / "run")])
    assert len(decodes) == 64
    assert json.loads((tmp_path / "run" / "train_results.json").read_text())["completed_steps"] == 12


# --- the loop ------------------------------------------------------------------------------------------------------


def test_script_end_to_end_on_builtin_digits(tmp_path, monkeypatch, capfd):
    out = tmp_path / "run"
    result = run_script(monkeypatch, capfd, *TINY_ARGS, "--max_train_steps", 3, "--output_dir", out,
                        "--checkpointing_steps", 2)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "README.md", "loss_curve.png",
                 "metrics.jsonl", "eval_results.json", "train_results.json", "modeling_msn.py"):
        assert (out / name).is_file(), name
    assert (out / "checkpoint-2" / checkpointing.TRAINING_STATE_FILE).is_file()
    assert not list(out.glob("*.tmp")) and not (out / ".final").exists()

    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for key in ("loss", "prediction_loss", "me_max_loss", "distinct_target_prototypes", "mean_max_target_prob",
                "lr", "momentum", "images_per_second"):
        assert all(math.isfinite(m[key]) for m in metrics), key
    assert 1 <= metrics[-1]["distinct_target_prototypes"] <= 16

    model = MSNModel.from_pretrained(out)
    processor = MSNImageProcessor.from_pretrained(out)
    assert processor.crop_size["height"] == 32 and model.config.image_size == 32
    pixel_values = processor(Image.new("RGB", (40, 40), "white"), return_tensors="pt")["pixel_values"]
    assert model(pixel_values).pooler_output.shape == (1, 64)
    evaluation = json.loads((out / "eval_results.json").read_text())
    assert {"msn", "random"} <= set(evaluation["encoders"])
    card = (out / "README.md").read_text()
    assert "library_name: transformers" in card and "model-index" in card and "| MSN (this model) |" in card
    assert "ViT 2x64, patch 8" in card and "| optimiser steps | 3 |" in card


def final_state(out):
    return MSNModel.from_pretrained(out).state_dict()


def test_resume_continues_exactly(tmp_path):
    common = [*TINY_ARGS, "--skip_evaluation", "--seed", "3"]
    pt.main([*common, "--max_train_steps", "6", "--output_dir", str(tmp_path / "straight")])
    pt.main([*common, "--max_train_steps", "6", "--output_dir", str(tmp_path / "split"), "--checkpointing_steps", "3"])
    # Interrupted after 3 steps: throw away everything but checkpoint-3, then resume from it.
    split = tmp_path / "split"
    for path in split.iterdir():
        if path.name != "checkpoint-3":
            path.unlink() if path.is_file() else shutil.rmtree(path)
    pt.main([*common, "--max_train_steps", "6", "--output_dir", str(split), "--resume_from_checkpoint", "latest"])
    straight, resumed = final_state(tmp_path / "straight"), final_state(split)
    for key, value in straight.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=0, msg=key)
    steps = [json.loads(line)["step"] for line in (split / "metrics.jsonl").read_text().splitlines()]
    assert steps == [4, 5, 6]


def test_views_on_device_train_end_to_end_and_resume_exactly(tmp_path, monkeypatch):
    rendered = []
    render = training.MSNViewsCollator.render_views

    def spy(self, batch, device):
        canvas = batch.get("canvas")
        rendered.append(None if canvas is None else (canvas.dtype, tuple(canvas.shape)))
        return render(self, batch, device)

    monkeypatch.setattr(training.MSNViewsCollator, "render_views", spy)
    common = [*TINY_ARGS, "--skip_evaluation", "--seed", "3", "--views_on_device", "--max_train_steps", "4"]
    pt.main([*common, "--output_dir", str(tmp_path / "straight")])
    # Workers made square uint8 canvases; the views were drawn afterwards, in this process.
    assert len(rendered) == 4
    assert all(dtype == torch.uint8 and shape[:2] == (16, 3) and shape[2] == shape[3] for dtype, shape in rendered)
    metrics = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and all(math.isfinite(m["loss"]) for m in metrics)
    assert all(m["images_per_second"] > 0 for m in metrics)

    split = tmp_path / "split"
    pt.main([*common, "--output_dir", str(split), "--checkpointing_steps", "2"])
    for path in split.iterdir():
        if path.name != "checkpoint-2":
            path.unlink() if path.is_file() else shutil.rmtree(path)
    pt.main([*common, "--output_dir", str(split), "--resume_from_checkpoint", "latest"])
    straight, resumed = final_state(tmp_path / "straight"), final_state(split)
    for key, value in straight.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=0, msg=key)
    # Not the CPU views: the canvas changes what the views see.
    pt.main([*TINY_ARGS, "--skip_evaluation", "--seed", "3", "--max_train_steps", "4", "--output_dir", str(tmp_path / "c")])
    cpu_views = final_state(tmp_path / "c")
    assert not torch.equal(cpu_views["encoder.cls_token"], straight["encoder.cls_token"])


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    args = [*TINY_ARGS, "--skip_evaluation", "--max_train_steps", 40, "--checkpointing_steps", 2, "--output_dir", out]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while checkpointing.find_latest_checkpoint(out) is None and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    last = checkpointing.find_latest_checkpoint(out)
    assert last is not None, "the run was killed before any checkpoint"
    done = json.loads((last / checkpointing.TRAINING_STATE_FILE).read_text())["completed_steps"]
    assert done < 40
    pt.main([*map(str, args), "--resume_from_checkpoint", "latest"])
    assert f"Resuming from {last}" in capsys.readouterr().out
    assert json.loads((out / "train_results.json").read_text())["completed_steps"] == 40
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 40


def test_existing_checkpoints_are_not_overwritten_by_accident(tmp_path):
    (tmp_path / "checkpoint-3").mkdir()
    with pytest.raises(ValueError, match="--resume_from_checkpoint latest"):
        pt.main([*TINY_ARGS, "--skip_evaluation", "--max_train_steps", "1", "--output_dir", str(tmp_path)])


def test_push_to_hub_uploads_the_final_folder_without_checkpoints(tmp_path, monkeypatch):
    from huggingface_hub.utils import filter_repo_objects

    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def whoami(self):  # the check before the first step
            return {"name": "user"}

        def create_repo(self, repo_id, private=False, exist_ok=False):
            calls["create_repo"] = dict(repo_id=repo_id, private=private, exist_ok=exist_ok)
            return type("RepoUrl", (), {"repo_id": f"user/{repo_id}"})()

        def upload_folder(self, repo_id, folder_path, commit_message=None, ignore_patterns=None):
            files = [str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file()]
            calls["uploaded"] = sorted(filter_repo_objects(files, ignore_patterns=ignore_patterns))
            calls["repo_id"] = repo_id

    monkeypatch.setattr(run_outputs, "HfApi", FakeApi)
    out = tmp_path / "run"
    pt.main([*TINY_ARGS, "--skip_evaluation", "--max_train_steps", "2", "--checkpointing_steps", "1",
             "--output_dir", str(out), "--push_to_hub", "--hub_model_id", "msn-tiny", "--hub_token", "hf_x",
             "--hub_private_repo"])
    assert calls["token"] == "hf_x"
    assert calls["create_repo"] == dict(repo_id="msn-tiny", private=True, exist_ok=True)
    assert calls["repo_id"] == "user/msn-tiny"
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", "modeling_msn.py"} <= set(
        calls["uploaded"]
    )
    assert not any(name.startswith("checkpoint-") for name in calls["uploaded"])
    assert (out / "checkpoint-2").is_dir()


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    images = tmp_path / "images" / "train"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(30):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(images / f"{i}.png")
    for i in range(4):
        (images / f"corrupt_{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image at all")
    out = tmp_path / "run"
    pt.main([*TINY_ARGS, "--train_dir", str(tmp_path / "images"), "--skip_evaluation", "--max_train_steps", "4",
             "--per_device_train_batch_size", "8", "--output_dir", str(out)])
    results = json.loads((out / "train_results.json").read_text())
    assert results["completed_steps"] == 4
    assert 1 <= results["skipped_images"] <= 4 * 4  # four corrupt files, seen up to once per epoch


def test_nonfinite_losses_skip_steps_then_stop(tmp_path, monkeypatch):
    forward = MSNModel.forward
    calls = {"n": 0}

    def sometimes_nan(self, *args, **kwargs):
        output = forward(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2 or calls["n"] >= 4:
            output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(MSNModel, "forward", sometimes_nan)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match=r"3 non-finite losses in a row at step 2.*checkpoint-2"):
        pt.main([*TINY_ARGS, "--skip_evaluation", "--max_train_steps", "10", "--max_nonfinite_steps", "3",
                 "--checkpointing_steps", "1", "--output_dir", str(out)])
    # Steps 1 and 2 came from forward calls 1 and 3; call 2 was skipped; calls 4-6 stopped the run.
    assert calls["n"] == 6
    assert checkpointing.find_latest_checkpoint(out) == out / "checkpoint-2"


LATE_SECOND_PROCESS = """
import os, runpy, sys, time
import msn_hf.pretraining as pt

looked_in = pt.run_files
def look_late(folder):
    if os.environ["RANK"] == "1":
        time.sleep(5)
    return looked_in(folder)
pt.run_files = look_late
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_two_processes_train_log_once_and_checkpoint_once(tmp_path):
    out = tmp_path / "run"
    # `accelerate launch --cpu` starts one process per machine without mpirun; torchrun starts two, and
    # ACCELERATE_USE_CPU makes Accelerate join them with gloo.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    # The second process looks at --output_dir 5 s late: it found the run's first files there, and refused the run.
    late = tmp_path / "late_second_process.py"
    late.write_text(LATE_SECOND_PROCESS)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(late), str(SCRIPT),
               *TINY_ARGS, "--skip_evaluation", "--max_train_steps", "2", "--checkpointing_steps", "2",
               "--output_dir", str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert sorted(p.name for p in (out / "checkpoint-2").glob("random_states_*.pkl")) == [
        "random_states_0.pkl", "random_states_1.pkl"
    ]
    assert MSNModel.from_pretrained(out).config.num_prototypes == 16
