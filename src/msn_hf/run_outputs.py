"""
What a finished run leaves: the exported model and processor, the loss plot, the facts its model card states,
and the upload to the Hub.
"""

import os
import shutil
from pathlib import Path

from accelerate import Accelerator
from huggingface_hub import HfApi

from .checkpointing import TrainingState
from .data import DataArguments
from .files import move_files_into
from .image_processing_msn import MSNImageProcessor
from .modeling_msn import MSNModel
from .recipe import RECIPE_FILE
from .sources import source_name


def plot_loss_curve(metrics: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("loss", "loss"), ("prediction_loss", "cross-entropy"), ("me_max_loss", "me-max")):
        ax.plot(steps, [m[key] for m in metrics], label=label)
    ax.set_xlabel("optimisation step")
    ax.set_ylabel("loss")
    ax.set_title("MSN pretraining")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def card_run_info(
    args,
    data_args: DataArguments,
    accelerator: Accelerator,
    state: TrainingState,
    seconds: float,
    recipe_name: str | None,
) -> dict:
    """The facts of this run (`args`: its `PretrainingArguments`) that its model card states (see `msn_hf.modelcard.write_model_card`)."""
    hub_dataset = data_args.dataset_name if data_args.dataset_name and not os.path.isdir(data_args.dataset_name) else None
    return dict(
        dataset=data_args.source_name,
        dataset_id=hub_dataset,
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
        repo_id=args.hub_model_id,
        base_model=source_name(args.model_name_or_path or args.backbone_pretrained),
    )


def push_to_hub(output_dir: Path, repo_id: str, token: str | None = None, private: bool = False) -> None:
    """Upload the final folder of a run (no checkpoints, no temporary folders) to the Hub repository `repo_id`."""
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    api.upload_folder(
        repo_id=repo_id,
        folder_path=str(output_dir),
        commit_message="MSN pretraining",
        ignore_patterns=["checkpoint-*", "*.tmp", "runs/*", ".final/*"],
    )


def export_final(model: MSNModel, processor: MSNImageProcessor, output_dir: Path) -> None:
    """`save_pretrained` of model and processor into a temporary folder, then each file moved into `output_dir`."""
    staging = output_dir / ".final"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    processor.save_pretrained(staging)
    move_files_into(staging, output_dir)

