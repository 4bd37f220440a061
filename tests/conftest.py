"""Shared fixtures: tiny ViTs that run in milliseconds on a CPU, and an offline Hub."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

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


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))
