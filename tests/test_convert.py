"""Conversions to and from ViTMSN, timm and the original release, checked numerically on tiny random models."""

import json
import runpy
import sys
from collections import OrderedDict

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from PIL import Image
from torch import nn
from transformers import AutoImageProcessor, AutoModel, ViTMSNConfig, ViTMSNModel

from conftest import TINY_BACKBONE_KWARGS, tiny_config
from msn_hf import MSNForImageClassification, MSNImageProcessor, MSNModel, convert

TINY_HEAD = dict(projection_hidden_size=48, projection_output_size=32, num_prototypes=16)
IMAGE = 32


def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Fill every float parameter and buffer with noise, so that a swapped or dropped tensor changes the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if tensor.is_floating_point():
                noise = torch.randn(tensor.shape, generator=generator) * 0.2
                tensor.copy_(noise.abs() + 0.5 if name.endswith("running_var") else noise)
    return module


def pixels(batch=2, size=IMAGE, seed=1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def saved_msn_model(path, **config_overrides) -> MSNModel:
    """A tiny MSNModel with random weights (anchor and target differ) saved to `path`."""
    model = randomize_(MSNModel(tiny_config(**config_overrides)), seed=0).eval()
    model.save_pretrained(path)
    return model


def target_tokens(model: MSNModel, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(pixel_values=images).last_hidden_state


def plain_timm_vit(seed: int) -> nn.Module:
    """The original encoder: a plain timm ViT (fixed input size, no dynamic position embedding) with random weights."""
    vit = timm.create_model("vit_base_patch16_224", num_classes=0, **TINY_BACKBONE_KWARGS)
    return randomize_(vit, seed)


def original_head(batch_norm: bool, seed: int) -> nn.Sequential:
    """The original `fc` head: fc1 -> bn1 -> gelu1 -> fc2 -> bn2 -> gelu2 -> fc3 (BatchNorm optional)."""
    hidden, out = TINY_HEAD["projection_hidden_size"], TINY_HEAD["projection_output_size"]
    layers = [("fc1", nn.Linear(64, hidden)), ("bn1", nn.BatchNorm1d(hidden)), ("gelu1", nn.GELU())]
    layers += [("fc2", nn.Linear(hidden, hidden)), ("bn2", nn.BatchNorm1d(hidden)), ("gelu2", nn.GELU())]
    layers += [("fc3", nn.Linear(hidden, out))]
    if not batch_norm:
        layers = [(name, layer) for name, layer in layers if not name.startswith("bn")]
    return randomize_(nn.Sequential(OrderedDict(layers)), seed).eval()


def original_forward(vit: nn.Module, head: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The original encoder forward: tokens after the final norm, and the head on the class token."""
    with torch.no_grad():
        tokens = vit.eval().forward_features(images)
        return tokens, head(tokens[:, 0])


def original_checkpoint(batch_norm: bool = True) -> tuple[dict, dict]:
    """A checkpoint laid out like the authors' release, and the plain modules it was made from."""
    modules = {}
    checkpoint = {}
    for entry, seed in (("encoder", 10), ("target_encoder", 20)):
        vit, head = plain_timm_vit(seed), original_head(batch_norm, seed + 1)
        modules[entry] = (vit, head)
        state = {f"module.{key}": value for key, value in vit.state_dict().items()}
        state.update({f"module.fc.{key}": value for key, value in head.state_dict().items()})
        checkpoint[entry] = state
    vit, head = modules["encoder"]
    optimizer = torch.optim.AdamW([*vit.parameters(), *head.parameters()])
    head(vit.forward_features(pixels())[:, 0]).sum().backward()
    optimizer.step()
    checkpoint.update(
        prototypes=torch.randn(TINY_HEAD["num_prototypes"], TINY_HEAD["projection_output_size"]),
        opt=optimizer.state_dict(), epoch=3, loss=4.2, batch_size=64, world_size=16, lr=1e-3, temperature=0.2,
    )
    return checkpoint, modules


def edit_weights(model_dir, drop: str, add: dict[str, tuple[int, ...]]) -> None:
    """Corrupt a saved folder: remove the tensor `drop`, add (or replace by) zero tensors of the shapes in `add`."""
    weights = safetensors.torch.load_file(model_dir / "model.safetensors")
    del weights[drop]
    weights.update({key: torch.zeros(shape) for key, shape in add.items()})
    safetensors.torch.save_file(weights, model_dir / "model.safetensors")


def assert_mentions(error: pytest.ExceptionInfo, *texts: str) -> None:
    missing = [text for text in texts if text not in str(error.value)]
    assert not missing, f"{missing} not in the error message:\n{error.value}"


# ---------------------------------------------------------------------------------------------------- to ViTMSN


def test_to_vit_msn_matches_target_encoder_and_loads_without_remote_code(tmp_path):
    model = saved_msn_model(tmp_path / "msn")
    convert.to_vit_msn(tmp_path / "msn", tmp_path / "vit", verify=False)  # the test does the comparison itself

    assert not list((tmp_path / "vit").glob("*.py"))
    images = pixels()
    expected = target_tokens(model, images)
    for loader in (ViTMSNModel, AutoModel):
        exported = loader.from_pretrained(tmp_path / "vit").eval()
        assert type(exported) is ViTMSNModel
        with torch.no_grad():
            actual = exported(pixel_values=images).last_hidden_state
        torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)
    # The target encoder was exported, not the anchor (they differ in this model).
    assert not torch.allclose(model.encoder.forward_features(images), expected, atol=1e-2)

    processor = AutoImageProcessor.from_pretrained(tmp_path / "vit")
    assert processor(images=[torch.rand(3, 50, 40)], return_tensors="pt")["pixel_values"].shape == (1, 3, IMAGE, IMAGE)


def test_fused_qkv_splits_into_query_key_value_rows(tmp_path):
    model = saved_msn_model(tmp_path / "msn")
    convert.to_vit_msn(tmp_path / "msn", tmp_path / "vit")
    weights = safetensors.torch.load_file(tmp_path / "vit" / "model.safetensors")
    qkv = model.target_encoder.blocks[1].attn.qkv
    width = qkv.in_features
    for index, part in enumerate(("query", "key", "value")):
        rows = slice(index * width, (index + 1) * width)
        torch.testing.assert_close(weights[f"encoder.layer.1.attention.attention.{part}.weight"], qkv.weight[rows], rtol=0, atol=0)
        torch.testing.assert_close(weights[f"encoder.layer.1.attention.attention.{part}.bias"], qkv.bias[rows], rtol=0, atol=0)


@pytest.mark.parametrize(
    "backbone_kwargs, named",
    [
        (dict(reg_tokens=2), "register tokens"),
        (dict(qk_norm=True), "qk_norm"),
        (dict(init_values=0.1), "layer scale"),
        (dict(no_embed_class=True), "no_embed_class"),
        (dict(pre_norm=True), "pre_norm"),
    ],
)
def test_to_vit_msn_names_what_vit_msn_cannot_express(tmp_path, backbone_kwargs, named):
    saved_msn_model(tmp_path / "msn", backbone_kwargs={**TINY_BACKBONE_KWARGS, **backbone_kwargs})
    with pytest.raises(ValueError, match=named):
        convert.to_vit_msn(tmp_path / "msn", tmp_path / "vit")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["msn"]


# ---------------------------------------------------------------------------------------------------- to timm


def test_to_timm_checkpoint_gives_identical_features(tmp_path):
    model = saved_msn_model(tmp_path / "msn")
    convert.main(["to-timm", "--model", str(tmp_path / "msn"), "--output", str(tmp_path / "timm")])

    hub_config = json.loads((tmp_path / "timm" / "config.json").read_text())
    assert hub_config["architecture"] == model.config.backbone and hub_config["num_classes"] == 0
    weights = safetensors.torch.load_file(tmp_path / "timm" / "model.safetensors")
    assert set(weights) == set(model.target_encoder.state_dict())

    images = pixels()
    expected = target_tokens(model, images)
    by_name = timm.create_model(
        hub_config["architecture"],
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(tmp_path / "timm" / "model.safetensors")),
        num_classes=0,
        **hub_config["model_args"],
    )
    by_folder = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True)
    for loaded in (by_name, by_folder):
        with torch.no_grad():
            torch.testing.assert_close(loaded.eval().forward_features(images), expected)
    assert tuple(by_folder.pretrained_cfg["input_size"]) == (3, IMAGE, IMAGE)


def test_outputs_are_never_overwritten_silently(tmp_path):
    saved_msn_model(tmp_path / "msn")
    (tmp_path / "out").mkdir()  # an empty folder may be filled
    convert.to_timm(tmp_path / "msn", tmp_path / "out")
    (tmp_path / "out" / "keep.txt").write_text("user data")

    with pytest.raises(FileExistsError, match="--overwrite"):
        convert.to_timm(tmp_path / "msn", tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "user data"

    convert.to_timm(tmp_path / "msn", tmp_path / "out", overwrite=True)
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["msn", "out"]  # no staging folder left behind


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    saved_msn_model(tmp_path / "msn")

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(convert.safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        convert.to_timm(tmp_path / "msn", tmp_path / "new" / "out")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["msn"]  # not even the new parent folder


def test_source_with_bad_keys_is_reported_and_nothing_written(tmp_path):
    saved_msn_model(tmp_path / "msn")
    edit_weights(tmp_path / "msn", drop="target_encoder.norm.bias", add={"target_encoder.extra": (1,), "prototypes": (3, 3)})
    with pytest.raises(ValueError) as error:
        convert.to_vit_msn(tmp_path / "msn", tmp_path / "vit")
    assert_mentions(error, "target_encoder.norm.bias", "target_encoder.extra", "prototypes: (3, 3)")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["msn"]


# ---------------------------------------------------------------------------------------------------- from the original


@pytest.mark.parametrize("batch_norm", [True, False])
def test_from_original_reproduces_the_original_forward(tmp_path, batch_norm):
    checkpoint, modules = original_checkpoint(batch_norm)
    torch.save(checkpoint, tmp_path / "msn.pth.tar")
    convert.from_original(tmp_path / "msn.pth.tar", tmp_path / "msn", num_heads=2)
    model = MSNModel.from_pretrained(tmp_path / "msn").eval()

    config = model.config
    assert (config.projection_batch_norm, config.temperature, config.image_size) == (batch_norm, 0.2, IMAGE)
    assert (config.num_prototypes, config.projection_output_size) == tuple(checkpoint["prototypes"].shape)
    assert config.projection_hidden_size == TINY_HEAD["projection_hidden_size"]
    torch.testing.assert_close(model.prototypes, checkpoint["prototypes"], rtol=0, atol=0)

    images = pixels()
    target_vit, target_head = modules["target_encoder"]
    expected_tokens, expected_embedding = original_forward(target_vit, target_head, images)
    tokens = target_tokens(model, images)
    torch.testing.assert_close(tokens, expected_tokens, atol=1e-5, rtol=0)
    with torch.no_grad():  # eval mode: the heads run on the converted BatchNorm running statistics
        torch.testing.assert_close(model.target_projection_head(tokens[:, 0]), expected_embedding, atol=1e-5, rtol=0)
        anchor_vit, anchor_head = modules["encoder"]
        expected_tokens, expected_embedding = original_forward(anchor_vit, anchor_head, images)
        anchor_tokens = model.encoder.forward_features(images)
        torch.testing.assert_close(anchor_tokens, expected_tokens, atol=1e-5, rtol=0)
        torch.testing.assert_close(model.projection_head(anchor_tokens[:, 0]), expected_embedding, atol=1e-5, rtol=0)


def test_pretraining_continues_from_an_original_checkpoint(tmp_path):
    checkpoint, _ = original_checkpoint()
    torch.save(checkpoint, tmp_path / "msn.pth.tar")
    convert.main([
        "from-original", "--checkpoint", str(tmp_path / "msn.pth.tar"), "--output", str(tmp_path / "msn"),
        "--num_heads", "2", "--config", '{"mask_ratio": 0.3, "focal_image_size": 16}',
    ])
    model = MSNModel.from_pretrained(tmp_path / "msn").train()
    assert model.config.mask_ratio == 0.3
    target_before = model.target_encoder.pos_embed.clone()

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    output = model(pixels(4), anchor_pixel_values=pixels(4, seed=2), focal_pixel_values=pixels(4 * 2, 16).view(4, 2, 3, 16, 16))
    output.loss.backward()
    assert torch.isfinite(output.loss)
    assert model.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0 and model.prototypes.grad is not None
    assert not any(p.requires_grad for p in model.target_encoder.parameters())
    optimizer.step()
    model.update_target_encoder(0.5)
    assert not torch.equal(model.target_encoder.pos_embed, target_before)


class NotATensor:
    """Something only an unrestricted unpickler could rebuild."""


def test_from_original_reports_bad_keys_and_refuses_pickled_code(tmp_path):
    checkpoint, _ = original_checkpoint()
    del checkpoint["target_encoder"]["module.norm.weight"]
    checkpoint["encoder"]["module.blocks.0.attn.extra"] = torch.zeros(2)
    checkpoint["encoder"]["module.pos_embed"] = torch.zeros(1, 5, 64)
    torch.save(checkpoint, tmp_path / "bad.pth.tar")
    with pytest.raises(ValueError) as error:
        convert.from_original(tmp_path / "bad.pth.tar", tmp_path / "out", num_heads=2)
    assert_mentions(
        error, "missing keys (1): target_encoder.norm.weight", "encoder.blocks.0.attn.extra", "encoder.pos_embed: (1, 5, 64)"
    )

    torch.save({**original_checkpoint()[0], "opt": NotATensor()}, tmp_path / "pickled.pth.tar")
    with pytest.raises(ValueError, match="arbitrary code"):
        convert.from_original(tmp_path / "pickled.pth.tar", tmp_path / "out", num_heads=2)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bad.pth.tar", "pickled.pth.tar"]


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("vit_small_patch16_224", {}),
        ("vit_base_patch16_224", {}),
        ("vit_large_patch16_224", {}),
        ("vit_base_patch16_224", {"patch_size": 4}),
        ("vit_large_patch16_224", {"patch_size": 7}),
    ],
)
def test_release_backbones_are_inferred_from_shapes(name, kwargs):
    with torch.device("meta"):
        reference = timm.create_model(name, num_classes=0, **kwargs)
        architecture = convert.architecture_from_timm_state_dict(reference.state_dict())
        config = convert.msn_config_for(architecture)
        rebuilt = timm.create_model(config.backbone, **config.timm_kwargs())
    assert (config.backbone, config.backbone_kwargs, config.image_size) == (name, kwargs, 224)
    assert architecture.num_heads == reference.blocks[0].attn.num_heads == rebuilt.blocks[0].attn.num_heads
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    assert config.focal_image_size % architecture.patch_size == 0


# ---------------------------------------------------------------------------------------------------- from ViTMSN


def saved_vit_msn(path, **config_overrides) -> ViTMSNModel:
    values = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=192, image_size=IMAGE, patch_size=8)
    model = randomize_(ViTMSNModel(ViTMSNConfig(**{**values, **config_overrides})), seed=3).eval()
    model.save_pretrained(path)
    return model


def test_from_vit_msn_gives_an_msn_model_with_the_same_features(tmp_path):
    source = saved_vit_msn(tmp_path / "vit")  # MLP ratio 3, to exercise a non-default backbone argument
    convert.from_vit_msn(tmp_path / "vit", tmp_path / "msn", verify=False, **TINY_HEAD)
    model = MSNModel.from_pretrained(tmp_path / "msn")
    assert model.config.backbone_kwargs["mlp_ratio"] == 3.0 and model.config.num_prototypes == 16

    images = pixels()
    with torch.no_grad():
        expected = source(pixel_values=images).last_hidden_state
    torch.testing.assert_close(target_tokens(model, images), expected, atol=1e-4, rtol=0)
    for anchor, target in zip(model.encoder.parameters(), model.target_encoder.parameters()):
        assert torch.equal(anchor, target)

    classifier = MSNForImageClassification.from_pretrained(tmp_path / "msn", num_labels=3)
    assert classifier(images).logits.shape == (2, 3)


def test_msn_to_vit_msn_to_msn_round_trip_is_exact(tmp_path, monkeypatch):
    model = saved_msn_model(tmp_path / "msn")
    convert.main(["to-vit-msn", "--model", str(tmp_path / "msn"), "--output", str(tmp_path / "vit")])
    argv = ["msn-convert", "from-vit-msn", "--model", str(tmp_path / "vit"), "--output", str(tmp_path / "back")]
    monkeypatch.setattr(sys, "argv", [*argv, "--config", json.dumps(TINY_HEAD)])
    monkeypatch.delitem(sys.modules, "msn_hf.convert")  # as `python -m msn_hf.convert` finds it: not yet imported
    with pytest.raises(SystemExit) as exit_status:
        runpy.run_module("msn_hf.convert", run_name="__main__")
    assert exit_status.value.code == 0
    back = MSNModel.from_pretrained(tmp_path / "back")

    original = model.target_encoder.state_dict()
    for encoder in (back.target_encoder, back.encoder):
        restored = encoder.state_dict()
        assert set(restored) == set(original)
        assert all(torch.equal(restored[key], original[key]) for key in original)


def test_the_round_trip_through_vit_msn_keeps_the_evaluation_preprocessing(tmp_path):
    # from-vit-msn resized the shorter side to 37 px (the 256 / 224 rule) where the folder's processor said 32, and
    # dropped its bicubic filter: the same image gave other features after the round trip.
    saved_msn_model(tmp_path / "msn")
    MSNImageProcessor(size={"shortest_edge": 32}, crop_size=32, focal_crop_size=16, resample=3).save_pretrained(
        tmp_path / "msn"
    )  # fmt: skip
    convert.main(["to-vit-msn", "--model", str(tmp_path / "msn"), "--output", str(tmp_path / "vit")])
    convert.main(["from-vit-msn", "--model", str(tmp_path / "vit"), "--output", str(tmp_path / "back"),
                  "--config", json.dumps(TINY_HEAD)])  # fmt: skip
    before, after = (MSNImageProcessor.from_pretrained(tmp_path / name) for name in ("msn", "back"))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 60, 3), dtype=np.uint8))
    assert torch.equal(before(image, return_tensors="pt")["pixel_values"], after(image, return_tensors="pt")["pixel_values"])
    assert (after.size.shortest_edge, after.crop_size.height, after.resample) == (32, 32, 3)


def test_from_vit_msn_rejects_bad_sources_and_writes_nothing(tmp_path):
    saved_vit_msn(tmp_path / "vit")
    extra = "encoder.layer.0.attention.extra.weight"
    edit_weights(tmp_path / "vit", drop="encoder.layer.0.attention.attention.key.bias", add={extra: (1,)})
    with pytest.raises(ValueError) as error:
        convert.from_vit_msn(tmp_path / "vit", tmp_path / "msn", **TINY_HEAD)
    # The incomplete q/k/v triple is reported under its own names, as is the unknown key.
    assert_mentions(error, "blocks.0.attn.qkv.bias", "encoder.layer.0.attention.attention.query.bias", extra)

    saved_vit_msn(tmp_path / "relu", hidden_act="relu")
    with pytest.raises(ValueError, match="hidden_act"):
        convert.from_vit_msn(tmp_path / "relu", tmp_path / "msn", **TINY_HEAD)
    with pytest.raises(ValueError, match="'vit_msn'"):
        convert.to_timm(tmp_path / "relu", tmp_path / "msn")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["relu", "vit"]


def test_state_dict_conversions_are_inverse():
    vit = plain_timm_vit(seed=5)
    state = vit.state_dict()
    restored = convert.convert_vit_msn_to_timm_state_dict(convert.convert_timm_to_vit_msn_state_dict(state))
    assert set(restored) == set(state) and all(torch.equal(restored[key], state[key]) for key in state)
    with pytest.raises(ValueError, match="reg_token"):
        convert.convert_timm_to_vit_msn_state_dict({**state, "reg_token": torch.zeros(1, 1, 64)})
