"""
What a run leaves in its `--output_dir` (`RUN_FILES`): the exported model and processor, the loss plot, the facts
its model card states, and the upload to the Hub, checked before the first step (`check_hub_access`).
"""

import fnmatch
import json
import logging
import os
import shlex
import shutil
from pathlib import Path

import huggingface_hub.constants
from accelerate import Accelerator
from huggingface_hub import HfApi
from huggingface_hub.errors import LocalTokenNotFoundError, OfflineModeIsEnabled

from .checkpointing import TrainingState
from .data import DATA_RECORD_FILE, DataArguments, ImageDataset
from .files import atomic_file, move_files_into, write_text_atomically
from .image_processing_msn import MSNImageProcessor
from .modelcard import CARD_FACTS_FILE, LOSS_CURVE_FILE
from .modeling_msn import MSNModel
from .recipe import RECIPE_FILE
from .sources import first_line, source_name

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TRAIN_RESULTS_FILE = "train_results.json"
# Every entry a run writes into its --output_dir (names and glob patterns), and nothing else: --overwrite_output_dir
# removes exactly these, so that no result of an earlier run reaches the new card or the Hub, and a file the user put
# there stays. A new output adds its name here (tests/test_trust_loop.py checks that a run writes nothing else).
RUN_FILES = (
    "checkpoint-*",  # checkpoints, complete or `.tmp`
    METRICS_FILE, TRAIN_RESULTS_FILE, "eval_results.json", "lowshot_results.json",  # pretraining, msn-evaluate
    "README.md", CARD_FACTS_FILE, RECIPE_FILE, DATA_RECORD_FILE, LOSS_CURVE_FILE,
    "neighbours.png", "lowshot.png", "prototypes.png",  # the pictures of what was learnt
    "config.json", "preprocessor_config.json", "model.safetensors", "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    # the code `save_pretrained` copies next to the weights (the files shipped with a checkpoint)
    "configuration_msn.py", "modeling_msn.py", "loss_msn.py", "image_processing_msn.py", "views_msn.py",
    "msn_pretraining",  # the trackers' logs (Accelerate names the folder after the project)
    ".final", ".*.tmp",  # an interrupted export or atomic write
)  # fmt: skip


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """
    The records of a `METRICS_FILE`, one JSON object a line. A last line cut short (the run died while appending
    it, on a full disk or by a kill) is left out with a warning; any other line that does not read is a ValueError
    naming the file and the line.
    """
    lines = Path(path).read_text().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number == len(lines):
                logger.warning(f"{path}: its last line was cut short (line {number}), left out: {line[:60]!r}")
                break
            raise ValueError(
                f"{path} line {number}: expected a JSON record of the run, got {line[:60]!r} ({error})."
            ) from None
    return records


def plot_loss_curve(metrics: list[dict], path: Path) -> None:
    """
    The logged losses against the step: the total and the cross-entropy on one panel, me-max on its own below it
    (it is near 0 while the cross-entropy is near log K: on one axis it would be a flat line).
    """
    from matplotlib.figure import Figure

    steps = [m["step"] for m in metrics]
    figure = Figure(figsize=(6, 5))
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=(2, 1))
    top.plot(steps, [m["loss"] for m in metrics], label="total", linewidth=2.5, alpha=0.6)
    top.plot(steps, [m["prediction_loss"] for m in metrics], label="cross-entropy", linestyle="--")
    top.set_ylabel("loss")
    top.set_title("MSN pretraining")
    top.legend()
    bottom.plot(steps, [m["me_max_loss"] for m in metrics], color="tab:green", label="me-max")
    bottom.set_ylabel("me-max")
    bottom.set_xlabel("optimisation step")
    bottom.legend()
    figure.tight_layout()
    with atomic_file(path) as temporary:
        figure.savefig(temporary, dpi=100, format="png")


def write_train_results(output_dir: str | os.PathLike, results: dict) -> Path:
    """`train_results.json` in `output_dir`: what the run did (steps, skipped images, plan, final loss, evaluation)."""
    return write_text_atomically(Path(output_dir) / TRAIN_RESULTS_FILE, json.dumps(results, indent=2))


def finished_step(output_dir: str | os.PathLike) -> int | None:
    """The step after which the run in `output_dir` exported its model (its `train_results.json`), or None when the
    folder holds no exported model with its results."""
    output_dir = Path(output_dir)
    if not any(output_dir.glob("model*.safetensors")):
        return None
    try:
        return int(json.loads((output_dir / TRAIN_RESULTS_FILE).read_text())["completed_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run_files(output_dir: str | os.PathLike) -> list[Path]:
    """The entries of `output_dir` that a run writes (see `RUN_FILES`), sorted; none when it does not exist."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if any(fnmatch.fnmatch(p.name, pattern) for pattern in RUN_FILES))


def remove_run_files(output_dir: str | os.PathLike) -> None:
    """Remove what a run wrote into `output_dir` (see `RUN_FILES`); whatever else is there stays."""
    for path in run_files(output_dir):
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def card_run_info(
    args,
    data_args: DataArguments,
    accelerator: Accelerator,
    state: TrainingState,
    seconds: float,
    recipe_name: str | None,
    test: ImageDataset | None = None,
    repo_id: str | None = None,
) -> dict:
    """
    The facts of this run (`args`: its `PretrainingArguments`) that its model card states (see
    `msn_hf.modelcard.write_model_card`); `test`: the labelled images of its final evaluation, whose split it names;
    `repo_id`: the full Hub id of `--hub_model_id` (see `check_hub_access`).
    """
    return dict(
        dataset=data_args.source_name,
        dataset_id=data_args.hub_dataset_id,
        eval_dataset=data_args.test_dir if test is not None else None,
        eval_dataset_id=data_args.eval_hub_dataset_id if test is not None else None,
        eval_split=test.split if test is not None else None,
        steps=state.completed_steps,
        batch_size=args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps,
        learning_rate_schedule=(
            f"{args.warmup_start_learning_rate:g} -> {args.learning_rate:g} (warmup), cosine to "
            f"{args.final_learning_rate:g}, over {args.schedule_stretch:g} x the steps"
        ),
        precision=accelerator.mixed_precision if accelerator.mixed_precision != "no" else "fp32",
        wall_time_seconds=seconds,
        hardware=f"{accelerator.num_processes} x {accelerator.device.type}",
        trainer="msn-pretrain" + (f", recipe {recipe_name!r} ({RECIPE_FILE} reproduces it)" if recipe_name else ""),
        repo_id=repo_id or args.hub_model_id,
        base_model=source_name(args.model_name_or_path or args.backbone_pretrained),
    )


class UploadError(RuntimeError):
    """The upload at the end of a run failed, after the run's folder was written whole; the console scripts exit 1."""

    exit_code = 1


# What an upload leaves out of a run's folder: the training state, and the temporary files of an interrupted write.
UPLOAD_IGNORE_PATTERNS = ["checkpoint-*", "*.tmp", "runs/*", ".final/*"]


def check_hub_access(repo_id: str, token: str | None = None, private: bool = False) -> str:
    """
    Check, before a run trains, that `--push_to_hub` can upload at its end: the Hub is reachable, the token (`token`,
    else the one saved by `hf auth login`) is valid, and the repository `repo_id` exists or can be created (it is
    created, as the upload would). Returns the full repository id (`user/name`); raises a one-line ValueError naming
    the flag to change otherwise. The token appears in no message.
    """
    offline = ValueError(
        "--push_to_hub needs the Hub, but it is offline (HF_HUB_OFFLINE=1): unset HF_HUB_OFFLINE, or train without "
        "--push_to_hub and upload the folder afterwards with `hf upload`."
    )
    api = HfApi(token=token)
    try:
        user = api.whoami()["name"]
    except OfflineModeIsEnabled as error:
        raise offline from error
    except LocalTokenNotFoundError as error:
        if huggingface_hub.constants.HF_HUB_OFFLINE:  # the first thing to change: a token would not be used
            raise offline from error
        raise ValueError(
            "--push_to_hub needs a Hub token with write access, got no token: pass --hub_token, or log in with "
            "`hf auth login`."
        ) from error
    except Exception as error:  # an invalid token (401), no network: the run could not upload at its end either
        raise ValueError(
            f"--push_to_hub could not check --hub_token with the Hub ({first_line(error)}): pass a valid token with "
            "write access, or train without --push_to_hub and upload the folder afterwards with `hf upload`."
        ) from error
    try:
        return api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    except Exception as error:
        raise ValueError(
            f"--hub_model_id {repo_id!r} cannot be created or written by {user!r} ({first_line(error)}): choose a "
            "repository in a namespace this token can write to."
        ) from error


def _upload_command(repo_id: str, output_dir: str | os.PathLike) -> str:
    """The `hf upload` command that uploads a run's folder as `push_to_hub` does, for after a failed upload."""
    excluded = " ".join(f"--exclude {shlex.quote(pattern)}" for pattern in UPLOAD_IGNORE_PATTERNS)
    return f"hf upload {repo_id} {shlex.quote(str(output_dir))} . {excluded}"


def push_to_hub(output_dir: Path, repo_id: str, token: str | None = None, private: bool = False) -> None:
    """
    Upload the final folder of a run (no checkpoints, no temporary folders) to the Hub repository `repo_id`, created
    if needed (`check_hub_access` has created it at the start of a run). A failure raises an `UploadError` that says
    where the folder is and the `hf upload` command that uploads it later.
    """
    api = HfApi(token=token)
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(output_dir),
            commit_message="MSN pretraining",
            ignore_patterns=UPLOAD_IGNORE_PATTERNS,
        )
    except Exception as error:
        raise UploadError(
            f"the upload to {repo_id} failed ({first_line(error)}); the model is saved in {output_dir}: upload it "
            f"with `{_upload_command(repo_id, output_dir)}`"
        ) from error


def export_final(model: MSNModel, processor: MSNImageProcessor, output_dir: Path) -> None:
    """`save_pretrained` of model and processor into a temporary folder, then each file moved into `output_dir`."""
    staging = output_dir / ".final"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    processor.save_pretrained(staging)
    move_files_into(staging, output_dir)

