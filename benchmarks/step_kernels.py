"""
One MSN training step (target forward, anchor forward and backward, AdamW, EMA) on the CPU in fp32 and under bf16
autocast, with the kernels msn_hf picks against what it ran before: the attention kernels
(`modeling_msn.attention_kernels`: the plain kernel under bf16 on a CPU, against torch's fused CPU kernel) and the
patch embedding (`modeling_msn.embed_patches`: one matrix product under bf16 on a CPU, against timm's convolution).
The models are those the auto rule picks: the digits model of a 10-minute budget (4 x 4 grid, 128 wide, 4 deep,
batch 64, 1 anchor + 4 focal views) and ViT-S/16 with the paper's views (batch 8, 1 anchor at 224 px + 10 focal at
96 px). Random views; the variants take turns step by step, so that load from other processes hits all alike.
Figures: the median milliseconds of a step and its speed relative to fp32.

    python benchmarks/step_kernels.py [--steps 15] [--threads 2]

(Named `attention_kernels.py`, without the patch-embedding variants, until the patch embedding became a product.)
"""

import argparse
import contextlib
import copy
import statistics
import time
from unittest import mock

import torch

from msn_hf import MSNConfig, MSNImageProcessor, MSNModel
from msn_hf.recipe import auto_recipe, imagenet_recipe
from msn_hf.training import adamw

# name: (bf16, torch's attention kernel, timm's patch convolution)
VARIANTS = {
    "fp32": (False, False, False),
    "bf16, torch's attention kernel, convolution (before both)": (True, True, True),
    "bf16, convolution (before)": (True, False, True),
    "bf16": (True, False, False),
}


def model_and_views(recipe: dict, batch_size: int) -> tuple[MSNModel, dict]:
    config = MSNConfig(backbone=recipe["backbone"], backbone_kwargs=recipe["backbone_kwargs"], **recipe["config"])
    processor = MSNImageProcessor(**recipe["processor"])
    size, focal = processor.crop_size["height"], processor.focal_crop_size["height"]
    views = dict(
        pixel_values=torch.randn(batch_size, 3, size, size),
        anchor_pixel_values=torch.randn(batch_size, processor.num_anchor_views, 3, size, size),
        focal_pixel_values=torch.randn(batch_size, processor.num_focal_views, 3, focal, focal),
    )
    return MSNModel(config).train(), views


def training_step(model: MSNModel, views: dict, bf16: bool, torch_attention: bool, convolution: bool):
    model = copy.deepcopy(model)
    optimizer = adamw(model, torch.device("cpu"))

    def step() -> None:
        with contextlib.ExitStack() as before:
            if torch_attention:
                before.enter_context(
                    mock.patch("msn_hf.modeling_msn.attention_kernels", lambda device: contextlib.nullcontext())
                )
            if convolution:
                before.enter_context(mock.patch("msn_hf.modeling_msn.embed_patches", lambda module, x: module(x)))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(**views).loss
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_target_encoder(0.996)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    works = {
        "digits, 10-minute budget, batch 64": (
            auto_recipe(32, True, num_images=1437, global_batch=64, planned_steps=3300), 64
        ),
        "ViT-S/16, paper views, batch 8": (imagenet_recipe(), 8),
    }
    print(f"torch {torch.__version__}, {args.threads} threads, {args.steps} steps each\n")
    print("| model | precision, kernels | ms / step | speed vs fp32 |")
    print("|---|---|---:|---:|")
    for label, (recipe, batch_size) in works.items():
        model, views = model_and_views(recipe, batch_size)
        steps = {name: training_step(model, views, *flags) for name, flags in VARIANTS.items()}
        seconds = {name: [] for name in steps}
        for _ in range(args.steps + 2):
            for name, step in steps.items():
                start = time.perf_counter()
                step()
                seconds[name].append(time.perf_counter() - start)
        medians = {name: statistics.median(values[2:]) for name, values in seconds.items()}
        baseline = medians[next(iter(VARIANTS))]
        for name, median in medians.items():
            print(f"| {label} | {name} | {median * 1e3:.1f} | {baseline / median:.2f}x |")


if __name__ == "__main__":
    main()
