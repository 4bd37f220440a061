"""Transformers 5 loading conventions: prefix, conversion mapping, frozen target, checkpointing options, dtypes."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import modeling_utils

from conftest import tiny_config
from msn_hf import MSNForImageClassification, MSNModel


def test_base_model_prefix_names_a_module_or_nothing_and_from_pretrained_is_not_overridden():
    for cls in (MSNModel, MSNForImageClassification):
        model = cls(tiny_config(num_labels=3))
        assert model.base_model_prefix == "" or hasattr(model, model.base_model_prefix)
        assert "from_pretrained" not in vars(cls)
    assert not getattr(MSNModel, "_supports_sdpa", False)  # timm chooses the attention kernel


def test_loaded_target_is_frozen_and_the_classifier_keeps_its_own_key_names(tmp_path):
    MSNModel(tiny_config()).save_pretrained(tmp_path / "pretrained")
    loaded = MSNModel.from_pretrained(tmp_path / "pretrained")
    assert not any(p.requires_grad for p in loaded.target_encoder.parameters())
    assert not any(p.requires_grad for p in loaded.target_projection_head.parameters())
    assert all(p.requires_grad for p in loaded.encoder.parameters()) and loaded.prototypes.requires_grad

    classifier = MSNForImageClassification.from_pretrained(tmp_path / "pretrained", num_labels=3)
    torch.testing.assert_close(classifier.vit.pos_embed, loaded.target_encoder.pos_embed, rtol=0, atol=0)
    classifier.save_pretrained(tmp_path / "classifier")
    keys = set(load_file(tmp_path / "classifier" / "model.safetensors"))
    assert keys and all(key.startswith(("vit.", "classifier.")) for key in keys)
    reloaded = MSNForImageClassification.from_pretrained(tmp_path / "classifier")
    for key, value in classifier.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_activation_checkpointing_options_are_honoured(monkeypatch):
    calls = []
    checkpoint = modeling_utils.checkpoint

    def recording_checkpoint(function, *args, **kwargs):
        calls.append(kwargs)
        return checkpoint(function, *args, **kwargs)

    monkeypatch.setattr(modeling_utils, "checkpoint", recording_checkpoint)
    model = MSNModel(tiny_config(backbone_kwargs=dict(embed_dim=64, depth=4, num_heads=2, patch_size=8)))
    model.train().activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": False, "preserve_rng_state": False}, every_n_layers=2
    )
    pixel_values = torch.randn(2, 3, 32, 32)
    model(pixel_values, anchor_pixel_values=pixel_values)
    assert len(calls) == 2  # blocks 0 and 2 of the 4 anchor blocks; the target encoder runs without gradients
    assert all(kwargs == {"use_reentrant": False, "preserve_rng_state": False} for kwargs in calls)
    calls.clear()
    model.activation_checkpointing_enable(every_n_layers=1)
    model(pixel_values, anchor_pixel_values=pixel_values)
    assert len(calls) == 4  # the last block too, which the anchor computes for its class token only
    with pytest.raises(ValueError, match="every_n_layers"):
        model.activation_checkpointing_enable(every_n_layers=0)
    model.activation_checkpointing_disable()
    calls.clear()
    model(pixel_values, anchor_pixel_values=pixel_values)
    assert not calls and not model.gradient_checkpointing


@pytest.mark.parametrize(
    "bad, expected",
    [
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "got torch.uint8"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.float64), "got torch.float64"),
        (np.zeros((1, 3, 32, 32), dtype=np.float32), "got numpy.ndarray"),
    ],
)
def test_pixel_values_of_another_dtype_name_the_expected_one(bad, expected):
    model = MSNModel(tiny_config())
    with pytest.raises(ValueError, match=rf"`pixel_values`.*torch.float32.*{expected}"):
        model(bad)
    with pytest.raises(ValueError, match=rf"`anchor_pixel_values`.*{expected}"):
        model(torch.zeros(1, 3, 32, 32), anchor_pixel_values=bad)


def test_pipelines_without_remote_code_neither_prompt_nor_differ(tmp_path, monkeypatch):
    import builtins

    from PIL import Image
    from transformers import pipeline

    from msn_hf import MSNImageProcessor

    prompts = []
    monkeypatch.setattr(builtins, "input", lambda *args: prompts.append(args) or "n")
    model = MSNModel(tiny_config()).eval()
    processor = MSNImageProcessor(size={"shortest_edge": 36}, crop_size=32)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    embedding = pipeline("image-feature-extraction", model=str(tmp_path), pool=True)(image)
    expected = model(processor(image, return_tensors="pt")["pixel_values"]).pooler_output
    torch.testing.assert_close(torch.tensor(embedding), expected, atol=1e-5, rtol=0)
    assert not prompts
