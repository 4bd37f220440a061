"""Options that restore the authors' behaviour where msn_hf differs by default (see docs/algorithm.md)."""

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from msn_hf import MSNConfig, MSNModel
from msn_hf.modeling_msn import random_keep_indices


def test_per_batch_masking_keeps_the_same_patches_for_every_image():
    shared = random_keep_indices(5, 16, 0.5, torch.device("cpu"), shared=True)
    assert shared.shape == (5, 8) and all(torch.equal(row, shared[0]) for row in shared)
    own = random_keep_indices(5, 16, 0.5, torch.device("cpu"))
    assert not all(torch.equal(row, own[0]) for row in own)

    model = MSNModel(tiny_config(mask_sampling="per_batch", mask_ratio=0.5)).train()
    kept = []
    model.encoder.blocks[0].register_forward_pre_hook(lambda module, args: kept.append(args[0].shape))
    pixel_values = torch.randn(4, 3, 32, 32)
    assert torch.isfinite(model(pixel_values, anchor_pixel_values=pixel_values).loss)
    assert kept[0] == (4, 1 + 8, 64)
    with pytest.raises(ValueError, match="mask_sampling"):
        MSNConfig(mask_sampling="per_image")


def test_position_embeddings_of_focal_views_resample_without_antialiasing_on_request():
    model = MSNModel(tiny_config(pos_embed_antialias=False))
    encoder = model.encoder
    tokens = torch.randn(2, 2, 2, 64)  # a 16 px focal view: a 2 x 2 grid, from the 4 x 4 grid of 32 px
    out = model._add_position_embeddings(encoder, tokens)
    grid = encoder.pos_embed[:, 1:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
    resampled = F.interpolate(grid, size=(2, 2), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    expected_patches = tokens.flatten(1, 2) + resampled.reshape(1, 4, 64)
    torch.testing.assert_close(out[:, 1:], expected_patches, atol=1e-6, rtol=0)
    torch.testing.assert_close(out[:, 0], (encoder.cls_token + encoder.pos_embed[:, :1]).expand(2, 1, 64)[:, 0])

    model.config.pos_embed_antialias = True  # timm's antialiased resampling differs when downsampling
    assert not torch.allclose(model._add_position_embeddings(encoder, tokens), out, atol=1e-4)
    full = torch.randn(2, 4, 4, 64)  # at the native grid both are timm's own step
    torch.testing.assert_close(model._add_position_embeddings(encoder, full), encoder._pos_embed(full))
