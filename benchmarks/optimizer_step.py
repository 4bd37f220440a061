"""
One AdamW step of the pretraining loop's optimiser (`training.adamw`: torch's fused kernel on the CPU) against torch's
CPU default (one Python loop over the parameters) and its `foreach` implementation, on the models the auto rule
picks: the digits model of a 10-minute budget (128 wide, 4 deep) and ViT-S/16 (the paper's). The same parameter
groups, random gradients; the implementations take turns step by step, so that load from other processes hits all
alike. Figures: the median milliseconds of a step and its ratio to the CPU default.

    python benchmarks/optimizer_step.py [--steps 30] [--threads 2]
"""

import argparse
import statistics
import time

import torch

from msn_hf import MSNConfig, MSNModel
from msn_hf.recipe import auto_recipe, imagenet_recipe
from msn_hf.training import adamw, parameter_groups

IMPLEMENTATIONS = {
    "single tensor (torch's CPU default)": dict(foreach=False),
    "foreach": dict(foreach=True),
}


def model_of(recipe: dict) -> MSNModel:
    return MSNModel(MSNConfig(backbone=recipe["backbone"], backbone_kwargs=recipe["backbone_kwargs"], **recipe["config"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipes = {
        "digits, 10-minute budget": auto_recipe(32, True, num_images=1437, global_batch=64, planned_steps=3300),
        "ViT-S/16 (the paper's)": imagenet_recipe(),
    }
    print(f"torch {torch.__version__}, {args.threads} threads, {args.steps} steps each\n")
    print("| model | parameters | implementation | ms / step | vs torch's CPU default |")
    print("|---|---:|---|---:|---:|")
    for label, recipe in recipes.items():
        model = model_of(recipe)
        for param in model.parameters():
            param.grad = torch.randn_like(param) if param.requires_grad else None
        optimizers = {"fused (`training.adamw`)": adamw(model, torch.device("cpu"), lr=1e-4)}
        optimizers.update({name: torch.optim.AdamW(parameter_groups(model), lr=1e-4, **kwargs)
                           for name, kwargs in IMPLEMENTATIONS.items()})  # fmt: skip
        seconds = {name: [] for name in optimizers}
        for _ in range(args.steps + 2):
            for name, optimizer in optimizers.items():
                start = time.perf_counter()
                optimizer.step()
                seconds[name].append(time.perf_counter() - start)
        medians = {name: statistics.median(values[2:]) for name, values in seconds.items()}
        baseline = medians["single tensor (torch's CPU default)"]
        count = sum(p.numel() for p in model.parameters() if p.requires_grad)
        for name, median in medians.items():
            print(f"| {label} | {count:,} | {name} | {median * 1e3:.2f} | {baseline / median:.2f}x |")


if __name__ == "__main__":
    main()
