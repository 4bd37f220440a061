"""Shared fixtures: tiny ViTs that run in milliseconds on a CPU, an offline Hub, small labelled data sets, and
`msn-pretrain` launched with test probes (one process or two under torchrun)."""

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from PIL import Image  # noqa: E402

from msn_hf import MSNImageProcessor, MSNModel, training  # noqa: E402
from msn_hf.data import decode_image  # noqa: E402

TINY_BACKBONE_KWARGS = dict(embed_dim=64, depth=2, num_heads=2, img_size=32, patch_size=8)
# `msn-pretrain` flags for the same tiny model, logging every step.
TINY_MODEL_ARGS = [
    "--backbone", "vit_tiny_patch16_224",
    "--backbone_kwargs", json.dumps(TINY_BACKBONE_KWARGS),
    "--config_overrides",
    "image_size=32,focal_image_size=16,projection_hidden_size=64,projection_output_size=32,num_prototypes=16",
    "--num_focal_views", "2",
    "--logging_steps", "1",
]  # fmt: skip
# The same flags for a run that only trains: no evaluation at its end.
RUN_ARGS = [*TINY_MODEL_ARGS, "--skip_evaluation"]


def tiny_config(**overrides):
    """An MSNConfig for a 2-block, 64-wide ViT on 32 px images with patch 8 (16 patches), 16 prototypes."""
    from msn_hf import MSNConfig

    values = dict(
        backbone="vit_tiny_patch16_224",
        backbone_kwargs=dict(TINY_BACKBONE_KWARGS),
        image_size=32,
        focal_image_size=16,
        projection_hidden_size=64,
        projection_output_size=32,
        num_prototypes=16,
    )
    values.update(overrides)
    return MSNConfig(**values)


def one_process_reference(inputs: dict) -> dict:
    """Loss, me-max, target probabilities and gradients of one seeded, unmasked tiny model on the whole batch: what
    several processes, each on a part of that batch, must reproduce together."""
    from msn_hf import MSNModel

    torch.manual_seed(0)
    model = MSNModel(tiny_config(mask_ratio=0.0, projection_batch_norm=False)).train()
    output = model(**inputs)
    output.loss.backward()
    return dict(
        loss=output.loss.detach(),
        me_max_loss=output.me_max_loss.detach(),
        target_probs=output.target_probs,
        grads={name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None},
    )


@pytest.fixture
def config():
    return tiny_config()


# Under pytest-xdist the workers share the machine's cores: a worker's torch runs on its share (at most 2 threads).
THREADS = max(1, min(2, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(min(THREADS, torch.get_num_threads()))


# --- runs of msn-pretrain with probes, and the data they train on ---------------------------------------------------

# Runs `msn-pretrain` with test probes, selected by environment variables: every row a process collates is
# appended to rows_<rank>.txt; MSN_SLOW_SAVE=<folder> makes rank 1 pause after writing that folder in save_state (so
# that a test can kill the run mid-save while rank 0 is free to go on); MSN_EMPTY_BATCH / MSN_NAN_FORWARD make
# rank 1's first batch unreadable and its 2nd forward NaN. Each process writes its pid to pid_<rank>.
LAUNCHER = """
import os, sys, time
from pathlib import Path
import accelerate
from msn_hf import pretraining as pt
from msn_hf import modeling_msn, training

rank = int(os.environ.get("RANK", "0"))
log = Path(os.environ["MSN_TEST_LOG"])
(log / f"pid_{rank}").write_text(str(os.getpid()))
collate = training.MSNViewsCollator.__call__
calls = {"collate": 0, "forward": 0}

def recording_collate(self, rows):
    calls["collate"] += 1
    with open(log / f"rows_{rank}.txt", "a") as f:
        f.write("".join(f"{row.get('id', row.get('__key__'))}\\n" for row in rows))
    if os.environ.get("MSN_EMPTY_BATCH") and rank == 1 and calls["collate"] == 1:
        rows = [{**row, self.image_column: {"bytes": b"not an image", "path": None}} for row in rows]
    return collate(self, rows)

training.MSNViewsCollator.__call__ = recording_collate

forward = modeling_msn.MSNModel.forward
def probed_forward(self, *args, **kwargs):
    calls["forward"] += 1
    with open(log / f"forwards_{rank}.txt", "a") as f:
        f.write("x\\n")
    output = forward(self, *args, **kwargs)
    if os.environ.get("MSN_NAN_FORWARD") and rank == 1 and calls["forward"] == 2:
        output.loss = output.loss * float("nan")
    return output

modeling_msn.MSNModel.forward = probed_forward

if os.environ.get("MSN_SLOW_SAVE"):
    save_state = accelerate.Accelerator.save_state
    def slow_save_state(self, output_dir=None, **kwargs):
        result = save_state(self, output_dir, **kwargs)
        if Path(output_dir).name == os.environ["MSN_SLOW_SAVE"] and rank == 1:
            (log / "slow_save_written").touch()
            time.sleep(120)
        return result
    accelerate.Accelerator.save_state = slow_save_state

pt.main(sys.argv[1:])
"""


def write_launcher(tmp_path: Path) -> Path:
    path = tmp_path / "launch_msn.py"
    path.write_text(LAUNCHER)
    return path


def launch(tmp_path, args, processes=1, env=None, wait=True, log=None):
    """Run the launcher (through torchrun for 2 processes, joined by gloo on the CPU)."""
    log = log or tmp_path / "log"
    log.mkdir(exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "ACCELERATE_USE_CPU": "true", "MSN_TEST_LOG": str(log), **(env or {})}  # fmt: skip
    command = [sys.executable, str(write_launcher(tmp_path)), *map(str, args)]
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                   *command[1:]]  # fmt: skip
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def train_in_process(monkeypatch, args, log: Path) -> None:
    """`msn-pretrain` in this process (no launch of its own to pay for), each row it collates appended to
    log / rows_0.txt as under `launch`."""
    from msn_hf import pretraining

    log.mkdir(exist_ok=True)
    collate = training.MSNViewsCollator.__call__

    def recording_collate(self, rows):
        with open(log / "rows_0.txt", "a") as f:
            f.write("".join(f"{row.get('id', row.get('__key__'))}\n" for row in rows))
        return collate(self, rows)

    with monkeypatch.context() as patch:
        patch.setattr(training.MSNViewsCollator, "__call__", recording_collate)
        pretraining.main(list(map(str, args)))


def logged_rows(log: Path, rank: int) -> list[str]:
    path = log / f"rows_{rank}.txt"
    return path.read_text().split() if path.exists() else []


def random_images(count: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(count)]


def labelled_dataset(count: int, seed: int = 0) -> datasets.Dataset:
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=4), "id": datasets.Value("string")}
    )
    return datasets.Dataset.from_dict(
        {"image": random_images(count, seed), "label": [i % 4 for i in range(count)],
         "id": [f"row{i:03d}" for i in range(count)]},
        features=features,
    )  # fmt: skip


@pytest.fixture(scope="session")
def parquet_shards(tmp_path_factory) -> Path:
    """Four parquet shards of 24 labelled 32 px images each, rows named row000 ... row095."""
    folder = tmp_path_factory.mktemp("parquet")
    data = labelled_dataset(96)
    for shard in range(4):
        data.shard(num_shards=4, index=shard, contiguous=True).to_parquet(str(folder / f"train-{shard}.parquet"))
    return folder


STREAM_ARGS = ["--streaming", "--shuffle_buffer_size", "0", "--per_device_train_batch_size", "8",
               "--max_train_steps", "4", "--seed", "7"]  # fmt: skip


# The same run is the reference of tests in several files: one run for the session.
@pytest.fixture(scope="session")
def uninterrupted_two_process_stream(tmp_path_factory, parquet_shards):
    tmp_path = tmp_path_factory.mktemp("stream2")
    args = [*RUN_ARGS, *STREAM_ARGS, "--train_files", str(parquet_shards / "*.parquet"),
            "--output_dir", tmp_path / "run"]  # fmt: skip
    result = launch(tmp_path, args, processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp_path


# --- one training step on a tiny model ------------------------------------------------------------------------------


def tiny_views(batch_size: int, seed: int = 0) -> dict:
    processor = MSNImageProcessor(size=32, crop_size=32, focal_crop_size=16, num_focal_views=2)
    views = processor(random_images(batch_size, seed), return_views=True, seed=seed, return_tensors="pt")
    return dict(views)


@pytest.fixture
def decodes(monkeypatch) -> list:
    """The images `training` decodes (the loops' datasets and collators), one entry per decode."""
    calls = []

    def counted(value):
        calls.append(value)
        return decode_image(value)

    monkeypatch.setattr(training, "decode_image", counted)
    return calls


@pytest.fixture
def adamw_implementations(monkeypatch) -> list[str]:
    """The name of the AdamW implementation torch runs at each call: `_fused_adam` (one kernel over all parameters),
    `_multi_tensor_adam` (foreach) or `_single_tensor_adam` (a Python loop over the parameters)."""
    from torch.optim import adam

    calls = []

    def recorded(name, implementation):
        def run(*args, **kwargs):
            calls.append(name)
            return implementation(*args, **kwargs)

        return run

    for name in ("_fused_adam", "_multi_tensor_adam", "_single_tensor_adam"):
        monkeypatch.setattr(adam, name, recorded(name, getattr(adam, name)))
    return calls


def step_setup(gradient_accumulation_steps=1, **config):
    from accelerate.state import AcceleratorState, GradientState

    # Accelerate's state is shared by every Accelerator of a process: start from none, whatever ran before (a Trainer).
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    model = MSNModel(tiny_config(**config))
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=gradient_accumulation_steps)
    optimizer = training.adamw(model, accelerator.device, lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    schedules = training.MSNSchedules(total_steps=10, warmup_steps=2, momentum=0.9, final_momentum=1.0)
    return accelerator, model, optimizer, schedules
