"""Initialisation options, sine-cosine position embeddings, the PMSN prior, from_timm and timm pretrained weights."""

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from conftest import TINY_BACKBONE_KWARGS, tiny_config
from msn_hf import MSNConfig, MSNModel
from msn_hf.evaluation import random_like


def linear_weights(model):
    return torch.cat([m.weight.flatten() for m in model.encoder.modules() if isinstance(m, torch.nn.Linear)])


# --- initialisation -------------------------------------------------------------------------------------------


def test_msn_init_is_the_authors_recipe():
    torch.manual_seed(0)
    model = MSNModel(tiny_config(weight_init="msn"))
    weights = linear_weights(model)
    # Linear weights: truncated normal of std 0.02.
    assert abs(weights.std().item() - 0.02) < 0.001
    assert weights.abs().max() < 0.02 * 6
    # Patch convolution: Kaiming normal, fan-in, gain sqrt(2): std sqrt(2 / (3 * 8 * 8)).
    patch = model.encoder.patch_embed.proj.weight
    assert abs(patch.std().item() - math.sqrt(2 / 192)) < 0.1 * math.sqrt(2 / 192)
    assert not patch.abs().max() < 0.06  # a truncated normal of std 0.02 never gets there
    assert torch.all(model.encoder.patch_embed.proj.bias == 0)
    assert abs(model.encoder.pos_embed.std().item() - 0.02) < 0.004
    assert isinstance(model.encoder.pos_embed, torch.nn.Parameter)


def test_mae_init_is_xavier_uniform_with_the_patch_projection_as_a_flattened_linear():
    torch.manual_seed(0)
    model = MSNModel(tiny_config(weight_init="mae", projection_hidden_size=256))
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            bound = math.sqrt(6 / (module.in_features + module.out_features))
            assert module.weight.abs().max() <= bound
            # Uniform on [-bound, bound]: standard deviation bound / sqrt(3).
            assert abs(module.weight.std().item() - bound / math.sqrt(3)) < 0.1 * bound
            assert module.bias is None or torch.all(module.bias == 0)
    patch = model.encoder.patch_embed.proj.weight  # (64, 3, 8, 8): as a linear map 192 -> 64
    bound = math.sqrt(6 / (192 + 64))
    assert patch.abs().max() <= bound and patch.abs().max() > 0.95 * bound
    assert abs(patch.std().item() - bound / math.sqrt(3)) < 0.05 * bound
    assert abs(model.encoder.cls_token.std().item() - 0.02) < 0.01


# --- sine-cosine position embeddings --------------------------------------------------------------------------


def plain_sincos(grid, dim):
    """MAE's recipe written out: x (column) then y (row) coordinates, each as [sin, cos] of dim/4 frequencies."""
    rows = [[0.0] * dim]  # the class token
    quarter = dim // 4
    for i in range(grid):
        for j in range(grid):
            row = []
            for coordinate in (j, i):
                row += [math.sin(coordinate / 10000 ** (f / quarter)) for f in range(quarter)]
                row += [math.cos(coordinate / 10000 ** (f / quarter)) for f in range(quarter)]
            rows.append(row)
    return torch.tensor(rows).unsqueeze(0)


def test_sincos_position_embeddings_are_fixed_and_follow_the_formula(tmp_path):
    model = MSNModel(tiny_config(position_embedding="sincos"))
    for encoder in (model.encoder, model.target_encoder):
        torch.testing.assert_close(encoder.pos_embed, plain_sincos(4, 64))
        assert "pos_embed" not in dict(encoder.named_parameters())
    before = model.encoder.pos_embed.clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    inputs = dict(pixel_values=torch.randn(4, 3, 32, 32), anchor_pixel_values=torch.randn(4, 3, 32, 32))
    model(**inputs).loss.backward()
    optimizer.step()
    assert torch.equal(model.encoder.pos_embed, before)
    model.save_pretrained(tmp_path)
    loaded = MSNModel.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded.target_encoder.pos_embed, plain_sincos(4, 64))
    assert "pos_embed" not in dict(loaded.encoder.named_parameters())


def test_sincos_embeddings_are_interpolated_for_focal_views_like_learned_ones():
    torch.manual_seed(0)
    fixed = MSNModel(tiny_config(position_embedding="sincos"))
    learned = MSNModel(tiny_config())
    learned.load_state_dict(fixed.state_dict())
    assert isinstance(learned.encoder.pos_embed, torch.nn.Parameter)
    focal = torch.randn(2, 3, 16, 16)  # a 2 x 2 grid: the 4 x 4 table is resampled
    torch.testing.assert_close(fixed._encode(fixed.encoder, focal)[0], learned._encode(learned.encoder, focal)[0])


# --- PMSN -----------------------------------------------------------------------------------------------------


def plain_pmsn_penalty(anchor_embeddings, prototypes, temperature, exponent):
    """KL(p_bar || q) with q_k = k^-tau / sum_j j^-tau matched to p_bar's entries sorted from largest to smallest."""
    logits = F.normalize(anchor_embeddings, dim=1) @ F.normalize(prototypes, dim=1).t() / temperature
    probs = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
    probs = probs / probs.sum(dim=1, keepdim=True)
    p_bar = probs.mean(dim=0)
    ranked = sorted(p_bar.tolist(), reverse=True)
    weights = [k ** -exponent for k in range(1, len(ranked) + 1)]
    prior = [w / sum(weights) for w in weights]
    return sum(p * math.log(p / q) for p, q in zip(ranked, prior))


@pytest.mark.parametrize("exponent", [0.25, 1.0])
def test_power_law_prior_matches_a_plain_rederivation(exponent):
    torch.manual_seed(0)
    criterion = MSNModel(tiny_config(target_prior="power_law", power_law_exponent=exponent)).criterion
    anchors, targets, prototypes = torch.randn(12, 32), torch.randn(4, 32), torch.randn(16, 32)
    output = criterion(anchors, targets, prototypes)
    expected = plain_pmsn_penalty(anchors, prototypes, 0.1, exponent)
    assert output.me_max_loss.item() == pytest.approx(expected, rel=1e-4, abs=1e-6)
    torch.testing.assert_close(output.loss, output.prediction_loss + output.me_max_loss)
    uniform = MSNModel(tiny_config()).criterion(anchors, targets, prototypes)
    torch.testing.assert_close(output.prediction_loss, uniform.prediction_loss)
    assert output.me_max_loss.item() != pytest.approx(uniform.me_max_loss.item(), rel=1e-3)


def test_power_law_penalty_is_zero_when_usage_follows_the_prior_in_any_order():
    criterion = MSNModel(tiny_config(target_prior="power_law", power_law_exponent=0.5)).criterion
    prior = criterion.log_prior(16).exp()
    ranks = torch.arange(1, 17, dtype=torch.float)
    torch.testing.assert_close(prior, ranks**-0.5 / (ranks**-0.5).sum())
    # One-hot anchors (tiny temperature) whose prototype counts follow the prior, in a shuffled prototype order.
    criterion.temperature = 1e-3
    counts = (prior * 1000).round().long()
    permutation = torch.randperm(16)
    prototypes = torch.eye(16)[permutation]
    rows = torch.cat([torch.eye(16)[permutation[k]].expand(int(counts[k]), 16) for k in range(16)])
    usage = counts.float() / counts.sum()  # the prior up to rounding
    expected = (usage * (usage / prior).log()).sum()
    output = criterion(rows, rows, prototypes)
    torch.testing.assert_close(output.me_max_loss, expected, rtol=1e-3, atol=1e-4)
    assert output.me_max_loss < 1e-3


def _two_process_prior_check(anchors, prototypes, expected):
    torch.set_num_threads(1)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    criterion = MSNModel(tiny_config(target_prior="power_law")).criterion
    rows = slice(rank * 4, (rank + 1) * 4)
    # Each process has 2 views x 4 images of the global 2 x 8: its rows of each view block.
    local = torch.cat([anchors[:8][rows], anchors[8:][rows]])
    output = criterion(local, torch.randn(4, 32), prototypes)
    torch.testing.assert_close(output.me_max_loss, expected, rtol=1e-5, atol=1e-6)


def test_power_law_penalty_is_all_reduced_across_processes():
    from accelerate import debug_launcher

    torch.manual_seed(0)
    anchors, prototypes = torch.randn(16, 32), torch.randn(16, 32)
    expected = MSNModel(tiny_config(target_prior="power_law")).criterion(anchors, torch.randn(8, 32), prototypes)
    debug_launcher(_two_process_prior_check, args=(anchors, prototypes, expected.me_max_loss.detach()), num_processes=2)


# --- existing timm ViTs and pretrained weights ----------------------------------------------------------------


def tiny_vit(**kwargs):
    return timm.create_model("vit_tiny_patch16_224", **{**TINY_BACKBONE_KWARGS, **kwargs})


def test_from_timm_copies_the_module_into_both_encoders():
    vit = tiny_vit(num_classes=10)
    model = MSNModel.from_timm(vit, projection_hidden_size=64, projection_output_size=32, num_prototypes=16)
    weights = {k: v for k, v in vit.state_dict().items() if not k.startswith("head.")}
    for encoder in (model.encoder, model.target_encoder):
        assert encoder.state_dict().keys() == weights.keys()
        for name, value in encoder.state_dict().items():
            assert torch.equal(value, weights[name]), name
    assert not any(p.requires_grad for p in model.target_encoder.parameters())
    assert model.config.image_size == 32 and model.config.num_prototypes == 16
    pixel_values = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(pixel_values).pooler_output, vit.eval().forward_features(pixel_values)[:, 0])


def test_from_timm_rejects_what_it_cannot_rebuild():
    with pytest.raises(ValueError, match="`vit_module` must be a timm VisionTransformer"):
        MSNModel.from_timm(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="`vit_module` does not match"):
        MSNModel.from_timm(tiny_vit(), backbone_kwargs=dict(TINY_BACKBONE_KWARGS, depth=3))


@pytest.mark.parametrize("file_name", ["vit.safetensors", "vit.pth"])
def test_backbone_pretrained_loads_a_local_timm_file(tmp_path, file_name):
    torch.manual_seed(1)
    vit = tiny_vit(num_classes=10)
    path = tmp_path / file_name
    state = {k: v.contiguous() for k, v in vit.state_dict().items()}
    save_file(state, path) if file_name.endswith(".safetensors") else torch.save(state, path)
    torch.manual_seed(2)
    model = MSNModel(tiny_config(backbone_pretrained=str(path), weight_init="mae"))
    for encoder in (model.encoder, model.target_encoder):
        for name, value in encoder.state_dict().items():
            assert torch.equal(value, state[name]), name
    # The rest of the model is still initialised as configured.
    assert abs(model.prototypes).max() <= 1 / math.sqrt(32)
    # A saved model loads its own weights without the file; the random baseline ignores it.
    model.save_pretrained(tmp_path / "msn")
    path.unlink()
    loaded = MSNModel.from_pretrained(tmp_path / "msn")
    assert torch.equal(loaded.encoder.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])
    baseline = random_like(loaded)
    assert not torch.equal(baseline.encoder.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])
    # The saved config no longer points at the start weights: building a model from it needs no file or download.
    assert loaded.config.backbone_pretrained is None and model.config.backbone_pretrained == str(path)
    MSNModel(MSNConfig.from_pretrained(tmp_path / "msn"))


def test_backbone_pretrained_that_cannot_be_found_raises_value_error(tmp_path):
    with pytest.raises(ValueError, match="`backbone_pretrained`"):
        MSNModel(tiny_config(backbone_pretrained=str(tmp_path / "missing.safetensors")))


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(weight_init="xavier"), "weight_init"),
        (dict(position_embedding="rope"), "position_embedding"),
        (dict(target_prior="zipf"), "target_prior"),
        (dict(power_law_exponent=0.0), "power_law_exponent"),
        (dict(backbone_pretrained=""), "backbone_pretrained"),
        (dict(backbone_pretrained=3), "backbone_pretrained"),
    ],
)
def test_new_config_fields_are_validated(overrides, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        tiny_config(**overrides)


def test_weights_of_another_architecture_are_refused_in_one_line_naming_the_backbone(tmp_path):
    # timm lists every mismatched tensor, one per line: 30 lines for a ViT-S file given to the default backbone.
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, **TINY_BACKBONE_KWARGS)
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, path)
    wider = {**TINY_BACKBONE_KWARGS, "embed_dim": 2 * TINY_BACKBONE_KWARGS["embed_dim"]}
    with pytest.raises(ValueError) as error:
        MSNModel(tiny_config(backbone_kwargs=wider, backbone_pretrained=str(path)))
    message = str(error.value)
    assert "\n" not in message and "size mismatch" in message and "`backbone_kwargs`" in message
