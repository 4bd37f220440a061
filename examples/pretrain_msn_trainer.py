#!/usr/bin/env python
"""
MSN pretraining with the Transformers `Trainer` (`MSNTrainer`) on the built-in digits, offline: the recipe of
`msn-pretrain` (parameter groups, schedules, clipping, EMA, views) behind the `Trainer` API, then a low-shot
evaluation against baselines and a model card with the results.

    python examples/pretrain_msn_trainer.py --output_dir outputs/msn-digits-trainer
    python examples/pretrain_msn_trainer.py --output_dir outputs/msn-digits-trainer --save_steps 100 --resume
"""

import argparse
import json
import time

from msn_hf import MSNConfig, MSNImageProcessor, MSNModel
from msn_hf.data import ImageDataset, load_digits_dataset, load_image_dataset
from msn_hf.evaluation import evaluate_lowshot
from msn_hf.modelcard import headline, write_model_card
from msn_hf.recipe import auto_recipe
from msn_hf.run_outputs import plot_loss_curve
from msn_hf.trainer_msn import MSNTrainer, MSNTrainingArguments


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/msn-digits-trainer")
    parser.add_argument("--max_steps", type=int, default=500, help="About 22 epochs of the digits at batch 64.")
    parser.add_argument("--per_device_train_batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--warmup_steps", type=float, default=22, help="Steps (one epoch), or a fraction below 1.")
    parser.add_argument("--max_train_samples", type=int, help="Pretrain on N training images only.")
    parser.add_argument("--backbone_kwargs", type=json.loads, help="JSON timm kwargs merged into the recipe's.")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--logging_steps", type=int, default=10)
    parser.add_argument("--save_steps", type=int, help="Checkpoint every N steps (default: no checkpoints).")
    parser.add_argument("--resume", action="store_true", help="Continue from the last checkpoint in --output_dir.")
    parser.add_argument("--eval_seeds", type=int, nargs="+", default=[0, 1, 2])
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    train = load_digits_dataset("train")
    pretraining_images = load_image_dataset(max_samples=args.max_train_samples).dataset
    training_args = MSNTrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.per_device_train_batch_size,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps,
        seed=args.seed,
        logging_steps=args.logging_steps,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        report_to="none",
    )
    # The auto recipe of THIS run: its images, global batch and number of steps.
    recipe = auto_recipe(
        image_size=32,
        grey=True,
        num_images=len(pretraining_images),
        global_batch=args.per_device_train_batch_size * training_args.world_size,
        planned_steps=args.max_steps,
    )
    config = MSNConfig(
        backbone=recipe["backbone"],
        backbone_kwargs={**recipe["backbone_kwargs"], **(args.backbone_kwargs or {})},
        **recipe["config"],
    )
    model = MSNModel(config)
    processor = MSNImageProcessor(**recipe["processor"])
    trainer = MSNTrainer(model=model, args=training_args, train_dataset=pretraining_images, image_processor=processor)
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    wall_time = time.perf_counter() - start
    trainer.save_model()  # model, its code and the image processor (main process only)
    if not trainer.is_world_process_zero():
        return {}  # one evaluation, plot and card per run, not one per process

    model.eval()
    results = evaluate_lowshot(
        model,
        ImageDataset(train, "image", "label"),
        ImageDataset(load_digits_dataset("test"), "image", "label"),
        processor,
        seeds=args.eval_seeds,
        baselines=("random", "pixels"),
        output_file=f"{args.output_dir}/eval_results.json",
    )
    history = [entry for entry in trainer.state.log_history if "prediction_loss" in entry]
    if history:
        plot_loss_curve(history, trainer.args.output_dir + "/loss_curve.png")
    run_info = dict(
        dataset="scikit-learn digits (built in)",
        steps=trainer.state.global_step,
        batch_size=training_args.per_device_train_batch_size * training_args.world_size,
        learning_rate_schedule=(
            f"{training_args.warmup_start_learning_rate:g} -> {training_args.learning_rate:g} (warmup), cosine to "
            f"{training_args.final_learning_rate:g}, over {training_args.schedule_stretch:g} x the steps"
        ),
        precision="bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "fp32",
        wall_time_seconds=wall_time,
        trainer="MSNTrainer (examples/pretrain_msn_trainer.py)",
    )
    card = write_model_card(args.output_dir, model, processor, run_info, results)
    print(f"\nModel and card in {args.output_dir} ({card.name}); {headline(results)}.")
    print(f"Next: msn-evaluate --model_name_or_path {args.output_dir} --baselines random pixels")
    return results


if __name__ == "__main__":
    main()
