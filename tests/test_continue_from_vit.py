"""
Continuing MSN pretraining from a saved model: `model_folder_kind`, `msn_model_from_vit` (a Transformers ViT or
ViTMSN as both MSN encoders) and `classifier_folder_error`, on tiny random models saved in `tmp_path` (no network).
"""

import json

import pytest
import safetensors.torch
import torch
from torch import nn
from transformers import (
    ViTConfig,
    ViTForImageClassification,
    ViTForMaskedImageModeling,
    ViTImageProcessor,
    ViTModel,
    ViTMSNConfig,
    ViTMSNForImageClassification,
    ViTMSNModel,
)

from conftest import tiny_config
from msn_hf import MSNForImageClassification, MSNImageProcessor, MSNModel, convert

IMAGE = 32
TINY_VIT = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=IMAGE, patch_size=8
)
TINY_HEAD = dict(projection_hidden_size=48, projection_output_size=32, num_prototypes=16)
# Transformers class, its config class and extra config fields, per source folder the import accepts.
SOURCES = {
    "vit_msn": (ViTMSNModel, ViTMSNConfig, {}),
    "vit_msn_classifier": (ViTMSNForImageClassification, ViTMSNConfig, {"num_labels": 3}),
    "vit": (ViTModel, ViTConfig, {}),  # with its pooler (`add_pooling_layer=True` by default)
    "vit_no_qkv_bias": (ViTModel, ViTConfig, {"qkv_bias": False}),
    "vit_classifier": (ViTForImageClassification, ViTConfig, {"num_labels": 3}),
    "vit_masked_image_modeling": (ViTForMaskedImageModeling, ViTConfig, {}),
}


def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Noise in every float tensor: with the default init (zero biases, unit norms) a swapped tensor goes unseen."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in module.parameters():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.2)
    return module


def saved_vit(path, source: str = "vit", **config_overrides) -> nn.Module:
    """A tiny random Transformers model of kind `source` (see `SOURCES`) saved to `path`, in eval mode."""
    model_class, config_class, extra = SOURCES[source]
    model = randomize_(model_class(config_class(**{**TINY_VIT, **extra, **config_overrides})), seed=3).eval()
    model.save_pretrained(path)
    return model


def pixels(batch=2, seed=1):
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def source_tokens(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Encoder tokens after the final norm `(batch, 1 + num_patches, hidden)` of a Transformers ViT or task model."""
    with torch.no_grad():
        return getattr(model, "vit", model)(pixel_values=images).last_hidden_state


def msn_outputs(model: MSNModel, images: torch.Tensor):
    with torch.no_grad():
        return model.eval()(pixel_values=images)


# ---------------------------------------------------------------------------------------------------- kinds


@pytest.mark.parametrize(
    "source, kind",
    [
        ("vit_msn", "vit_msn"),
        ("vit_msn_classifier", "vit_msn"),
        ("vit", "vit"),
        ("vit_classifier", "vit"),
        ("vit_masked_image_modeling", "vit"),
    ],
)
def test_model_folder_kind_of_transformers_vits(tmp_path, source, kind):
    saved_vit(tmp_path / source, source)
    assert convert.model_folder_kind(tmp_path / source) == kind
    assert convert.model_folder_kind(str(tmp_path / source)) == kind


def test_model_folder_kind_of_msn_folders_and_their_errors(tmp_path):
    MSNModel(tiny_config()).save_pretrained(tmp_path / "msn")
    MSNForImageClassification(tiny_config(num_labels=3)).save_pretrained(tmp_path / "classifier")
    assert convert.model_folder_kind(tmp_path / "msn") == "msn"
    assert convert.model_folder_kind(tmp_path / "classifier") == "msn_classifier"

    # A config without `architectures` is the base model of its type.
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_text(json.dumps({"model_type": "msn"}))
    assert convert.model_folder_kind(tmp_path / "bare") == "msn"

    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(ValueError) as error:
        convert.model_folder_kind(tmp_path / "bert")
    message = str(error.value)
    assert "\n" not in message
    for expected in (str(tmp_path / "bert"), "'bert'", "BertModel", "ViTModel", "ViTMSNModel", "MSNModel"):
        assert expected in message, (expected, message)

    (tmp_path / "seg").mkdir()
    unknown_task = {"model_type": "vit", "architectures": ["ViTForSomething"]}
    (tmp_path / "seg" / "config.json").write_text(json.dumps(unknown_task))
    with pytest.raises(ValueError, match="ViTForSomething"):
        convert.model_folder_kind(tmp_path / "seg")

    # A path that is not a folder is never sent to the Hub as an id.
    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        convert.model_folder_kind(tmp_path / "no-such-folder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        convert.model_folder_kind(tmp_path / "empty")


def test_classifier_folder_error_says_what_to_pass_instead(tmp_path):
    MSNForImageClassification(tiny_config(num_labels=3)).save_pretrained(tmp_path / "classifier")
    error = convert.classifier_folder_error(tmp_path / "classifier")
    assert isinstance(error, ValueError)
    message = str(error)
    assert "\n" not in message
    for expected in (str(tmp_path / "classifier"), "MSNForImageClassification", "MSNModel", "msn-convert to-vit-msn"):
        assert expected in message, (expected, message)
    with pytest.raises(ValueError) as raised:
        convert.msn_model_from_vit(tmp_path / "classifier")
    assert str(raised.value) == message

    MSNModel(tiny_config()).save_pretrained(tmp_path / "msn")
    with pytest.raises(ValueError, match="MSNModel.from_pretrained"):
        convert.msn_model_from_vit(tmp_path / "msn")


def test_the_advice_of_classifier_folder_error_works(tmp_path):
    """A fine-tuned classifier exported with `to-vit-msn` imports with exactly its fine-tuned encoder."""
    classifier = randomize_(MSNForImageClassification(tiny_config(num_labels=3)), seed=4).eval()
    classifier.save_pretrained(tmp_path / "classifier")
    convert.to_vit_msn(tmp_path / "classifier", tmp_path / "exported")
    assert convert.model_folder_kind(tmp_path / "exported") == "vit_msn"
    model, _ = convert.msn_model_from_vit(tmp_path / "exported", **TINY_HEAD)
    expected = classifier.vit.state_dict()
    for encoder in (model.encoder, model.target_encoder):
        assert all(torch.equal(encoder.state_dict()[key], expected[key]) for key in expected)


# ---------------------------------------------------------------------------------------------------- import


@pytest.mark.parametrize("source", list(SOURCES))
def test_both_encoders_start_as_the_source_vit(tmp_path, source):
    reference = saved_vit(tmp_path / "vit", source)
    model, _ = convert.msn_model_from_vit(tmp_path / "vit", **TINY_HEAD)
    assert (model.config.image_size, model.config.backbone_kwargs["patch_size"]) == (IMAGE, 8)

    images = pixels()
    expected = source_tokens(reference, images)
    outputs = msn_outputs(model, images)
    # Class token after the final norm, then every token: q/k/v fusion, transposes and norms all show here.
    torch.testing.assert_close(outputs.pooler_output, expected[:, 0], atol=1e-4, rtol=0)
    torch.testing.assert_close(outputs.last_hidden_state, expected, atol=1e-4, rtol=0)

    anchor, target = model.encoder.state_dict(), model.target_encoder.state_dict()
    assert set(anchor) == set(target) and all(torch.equal(anchor[key], target[key]) for key in anchor)
    assert not any(parameter.requires_grad for parameter in model.target_encoder.parameters())
    assert all(parameter.requires_grad for parameter in model.encoder.parameters())


def test_verify_compares_with_the_source_loaded_by_transformers(tmp_path):
    saved_vit(tmp_path / "vit", "vit")
    convert.msn_model_from_vit(tmp_path / "vit", verify=True, **TINY_HEAD)


def test_heads_and_prototypes_are_fresh(tmp_path):
    saved_vit(tmp_path / "vit")
    torch.manual_seed(0)
    first, _ = convert.msn_model_from_vit(tmp_path / "vit", **TINY_HEAD)
    torch.manual_seed(1)
    second, _ = convert.msn_model_from_vit(tmp_path / "vit", **TINY_HEAD)
    assert first.prototypes.shape == (16, 32) and first.projection_head.fc1.out_features == 48

    for name in ("prototypes", "projection_head.fc1.weight", "projection_head.fc3.weight"):
        tensor = first.get_parameter(name)
        assert tensor.abs().sum() > 0, name
        assert not torch.equal(tensor, second.get_parameter(name)), name
    # The encoders come from the source whatever the seed; the target head starts as the anchor head.
    assert all(torch.equal(a, b) for a, b in zip(first.encoder.parameters(), second.encoder.parameters()))
    heads = zip(first.projection_head.state_dict().values(), first.target_projection_head.state_dict().values())
    assert all(torch.equal(anchor, target) for anchor, target in heads)


def test_imported_model_saves_and_reloads(tmp_path):
    saved_vit(tmp_path / "vit", "vit_classifier")
    model, _ = convert.msn_model_from_vit(tmp_path / "vit", mask_ratio=0.3, **TINY_HEAD)
    model.save_pretrained(tmp_path / "msn")
    reloaded = MSNModel.from_pretrained(tmp_path / "msn")
    assert reloaded.config.mask_ratio == 0.3 and reloaded.config.num_prototypes == 16
    original = model.state_dict()
    assert set(reloaded.state_dict()) == set(original)
    assert all(torch.equal(tensor, original[key]) for key, tensor in reloaded.state_dict().items())
    images = pixels()
    expected = msn_outputs(model, images).last_hidden_state
    torch.testing.assert_close(msn_outputs(reloaded, images).last_hidden_state, expected)


def test_processor_kwargs_follow_the_source_normalisation(tmp_path):
    saved_vit(tmp_path / "plain")
    _, kwargs = convert.msn_model_from_vit(tmp_path / "plain", **TINY_HEAD)
    # No preprocessor_config.json: a default ViTImageProcessor's mean and std.
    assert kwargs["image_mean"] == list(ViTImageProcessor().image_mean)
    assert kwargs["image_std"] == list(ViTImageProcessor().image_std)
    assert (kwargs["crop_size"], kwargs["focal_crop_size"]) == (IMAGE, 16)

    saved_vit(tmp_path / "with_processor")
    source_processor = ViTImageProcessor(image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6])
    source_processor.save_pretrained(tmp_path / "with_processor")
    model, kwargs = convert.msn_model_from_vit(tmp_path / "with_processor", **TINY_HEAD)
    assert (kwargs["image_mean"], kwargs["image_std"]) == ([0.1, 0.2, 0.3], [0.4, 0.5, 0.6])
    processor = MSNImageProcessor(**kwargs)
    assert (processor.crop_size.height, processor.focal_crop_size.height) == (model.config.image_size, 16)
    assert list(processor.image_mean) == [0.1, 0.2, 0.3]


def test_from_vit_msn_command_accepts_a_vit_model_and_saves_its_processor(tmp_path):
    reference = saved_vit(tmp_path / "vit", "vit")
    convert.from_vit_msn(tmp_path / "vit", tmp_path / "msn", **TINY_HEAD)
    model = MSNModel.from_pretrained(tmp_path / "msn")
    images = pixels()
    expected = source_tokens(reference, images)
    torch.testing.assert_close(msn_outputs(model, images).last_hidden_state, expected, atol=1e-4, rtol=0)
    assert list(MSNImageProcessor.from_pretrained(tmp_path / "msn").image_mean) == list(ViTImageProcessor().image_mean)


# ---------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "config_overrides, named",
    [
        ({"hidden_act": "relu"}, "hidden_act"),
        ({"layer_norm_eps": 1e-5}, "layer_norm_eps"),
        ({"num_channels": 1}, r"num_channels=1.*3 channels"),
    ],
)
def test_unsupported_vits_are_refused(tmp_path, config_overrides, named):
    saved_vit(tmp_path / "vit", "vit", **config_overrides)
    with pytest.raises(ValueError, match=named):
        convert.msn_model_from_vit(tmp_path / "vit", **TINY_HEAD)


def test_a_source_dropout_that_is_not_carried_over_is_said(tmp_path, caplog):
    saved_vit(tmp_path / "vit", "vit", hidden_dropout_prob=0.1)
    with caplog.at_level("WARNING"):
        convert.msn_model_from_vit(tmp_path / "vit", **TINY_HEAD)
    (warning,) = [r.getMessage() for r in caplog.records if "dropout" in r.getMessage()]
    assert "'hidden_dropout_prob': 0.1" in warning and "not carried over" in warning
    caplog.clear()
    saved_vit(tmp_path / "plain", "vit")
    with caplog.at_level("WARNING"):
        convert.msn_model_from_vit(tmp_path / "plain", **TINY_HEAD)
    assert not [r for r in caplog.records if "dropout" in r.getMessage()]


@pytest.mark.parametrize(
    "overrides, named",
    [
        ({"image_size": 64}, "`image_size` must be the native resolution 32"),
        ({"position_embedding": "sincos"}, "`position_embedding` must be 'learned'"),
        ({"backbone_pretrained": "some/weights"}, "`backbone_pretrained` must be None"),
    ],
)
def test_overrides_the_weights_fix_are_refused(tmp_path, overrides, named):
    saved_vit(tmp_path / "vit")
    with pytest.raises(ValueError, match=named):
        convert.msn_model_from_vit(tmp_path / "vit", **overrides)


def test_backbone_kwargs_overrides_merge_into_the_inferred_ones(tmp_path):
    saved_vit(tmp_path / "vit")
    model, _ = convert.msn_model_from_vit(tmp_path / "vit", backbone_kwargs={"drop_path_rate": 0.1})
    assert model.config.backbone_kwargs["drop_path_rate"] == 0.1 and model.config.backbone_kwargs["embed_dim"] == 64


def test_bad_weights_are_listed(tmp_path):
    saved_vit(tmp_path / "vit", "vit")
    weights = safetensors.torch.load_file(tmp_path / "vit" / "model.safetensors")
    del weights["encoder.layer.1.output.dense.bias"]
    weights["encoder.layer.0.extra.weight"] = torch.zeros(1)
    safetensors.torch.save_file(weights, tmp_path / "vit" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError) as error:
        convert.msn_model_from_vit(tmp_path / "vit")
    for expected in ("blocks.1.mlp.fc2.bias", "encoder.layer.0.extra.weight", str(tmp_path / "vit")):
        assert expected in str(error.value)


def test_imported_model_trains_on_the_views_of_its_processor(tmp_path):
    """What `msn-pretrain --model_name_or_path` does with a ViT: views from the returned kwargs, a loss, gradients."""
    saved_vit(tmp_path / "vit", "vit_msn")
    model, processor_kwargs = convert.msn_model_from_vit(tmp_path / "vit", **TINY_HEAD)
    processor = MSNImageProcessor(**processor_kwargs, num_anchor_views=1, num_focal_views=2)
    images = [torch.randint(0, 256, (3, 48, 40), dtype=torch.uint8) for _ in range(4)]
    views = processor(images, return_views=True, seed=0, return_tensors="pt")
    assert views["anchor_pixel_values"].shape[-1] == IMAGE and views["focal_pixel_values"].shape[-1] == 16
    loss = model.train()(**views).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert model.encoder.blocks[0].attn.qkv.weight.grad is not None and model.prototypes.grad is not None
    assert all(parameter.grad is None for parameter in model.target_encoder.parameters())
