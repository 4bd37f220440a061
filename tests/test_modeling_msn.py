"""MSNModel: forward, masking, loss against a plain re-derivation, EMA, gradients, serialisation, distributed."""

import math
import os
import subprocess
import sys
import textwrap
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig, AutoModel

from conftest import TINY_BACKBONE_KWARGS, one_process_reference, tiny_config
from msn_hf import MSNConfig, MSNModel, MSNModelOutput
from msn_hf.modeling_msn import embed_patches


def views(batch_size=4, num_anchor=1, num_focal=2, size=32, focal_size=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return dict(
        pixel_values=torch.randn(batch_size, 3, size, size, generator=generator),
        anchor_pixel_values=torch.randn(batch_size, num_anchor, 3, size, size, generator=generator),
        focal_pixel_values=torch.randn(batch_size, num_focal, 3, focal_size, focal_size, generator=generator),
    )


# --- a plain re-derivation of the authors' formulation, independent of msn_hf's code paths -------------------


def reference_head(head, features):
    hidden = F.gelu(head.bn1(head.fc1(features)))
    hidden = F.gelu(head.bn2(head.fc2(hidden)))
    return head.fc3(hidden)


def reference_sinkhorn(q, iterations):
    q = q.t().clone()
    k, b = q.shape
    q = q / q.sum()
    for _ in range(iterations):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / b
    return (q * b).t()


def reference_loss(model, pixel_values, anchor_pixel_values, focal_pixel_values):
    """The original MSN loss with masking off, from timm's own forward and the paper's formulas."""
    config = model.config
    batch_size = pixel_values.shape[0]
    with torch.no_grad():
        target_cls = model.target_encoder.forward_features(pixel_values)[:, 0]
        target_z = reference_head(model.target_projection_head, target_cls)
    anchors = anchor_pixel_values.transpose(0, 1).reshape(-1, *anchor_pixel_values.shape[2:])
    focals = focal_pixel_values.transpose(0, 1).reshape(-1, *focal_pixel_values.shape[2:])
    anchor_z = torch.cat(
        [
            reference_head(model.projection_head, model.encoder.forward_features(anchors)[:, 0]),
            reference_head(model.projection_head, model.encoder.forward_features(focals)[:, 0]),
        ]
    )
    prototypes = F.normalize(model.prototypes, dim=1)

    def snn(z):
        return torch.softmax(F.normalize(z, dim=1) @ prototypes.t() / config.temperature, dim=1)

    probs = snn(anchor_z)
    with torch.no_grad():
        targets = snn(target_z) ** (1.0 / config.target_sharpen_temperature)
        targets = targets / targets.sum(dim=1, keepdim=True)
        targets = reference_sinkhorn(targets, config.sinkhorn_iterations)
        targets = torch.cat([targets] * (anchor_z.shape[0] // batch_size))
    cross_entropy = torch.mean(torch.sum(torch.log(probs ** (-targets)), dim=1))
    avg_probs = probs.mean(dim=0)
    me_max = -torch.sum(torch.log(avg_probs ** (-avg_probs))) + math.log(float(len(avg_probs)))
    return cross_entropy + config.me_max_weight * me_max, cross_entropy, me_max


@pytest.mark.parametrize("batch_norm", [True, False])
def test_loss_matches_plain_rederivation(batch_norm):
    model = MSNModel(tiny_config(mask_ratio=0.0, projection_batch_norm=batch_norm)).train()
    # A target that differs from the anchor, as after some EMA steps.
    with torch.no_grad():
        for param in model.target_encoder.parameters():
            param.add_(0.01 * torch.randn_like(param))
    inputs = views(num_anchor=2, num_focal=3)
    torch.manual_seed(1)
    output = model(**inputs)
    expected, expected_ce, expected_me_max = reference_loss(model, **inputs)
    torch.testing.assert_close(output.loss, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(output.prediction_loss, expected_ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(output.me_max_loss, expected_me_max, rtol=1e-4, atol=1e-5)
    assert output.anchor_probs.shape == (4 * (2 + 3), 16)
    assert output.target_probs.shape == (4, 16)


def test_label_smoothing_and_entropy_term_follow_their_formulas():
    config = tiny_config(label_smoothing=0.1, entropy_weight=0.5, sinkhorn_iterations=0)
    loss_fn = MSNModel(config).criterion
    anchors, targets, prototypes = torch.randn(8, 32), torch.randn(4, 32), torch.randn(16, 32)
    out = loss_fn(anchors, targets, prototypes)

    def smoothed(z):
        p = torch.softmax(F.normalize(z, dim=1) @ F.normalize(prototypes, dim=1).t() / 0.1, dim=1)
        return 0.9 * p + 0.1 / 16

    p = smoothed(anchors)
    t = smoothed(targets) ** 4
    t = torch.cat([t / t.sum(dim=1, keepdim=True)] * 2)
    ce = -(t * p.log()).sum(dim=1).mean()
    p_bar = p.mean(dim=0)
    me_max = (p_bar * p_bar.log()).sum() + math.log(16)
    entropy = -(p * p.log()).sum(dim=1).mean()
    torch.testing.assert_close(out.loss, ce + me_max + 0.5 * entropy, rtol=1e-5, atol=1e-6)


def test_sinkhorn_balances_prototypes_and_samples():
    from msn_hf import sinkhorn_knopp

    probs = torch.softmax(torch.randn(12, 6) * 3, dim=1)
    balanced = sinkhorn_knopp(probs, num_iterations=200)
    torch.testing.assert_close(balanced.sum(dim=1), torch.ones(12))
    torch.testing.assert_close(balanced.sum(dim=0), torch.full((6,), 12 / 6), rtol=1e-4, atol=1e-4)
    three = sinkhorn_knopp(probs, num_iterations=3)
    torch.testing.assert_close(three, reference_sinkhorn(probs, 3))
    torch.testing.assert_close(three.sum(dim=1), torch.ones(12))


def test_me_max_is_zero_at_uniform_usage_and_positive_otherwise():
    loss_fn = MSNModel(tiny_config()).criterion
    prototypes = torch.randn(1, 32).repeat(16, 1)  # identical prototypes: every assignment is uniform
    out = loss_fn(torch.randn(8, 32), torch.randn(4, 32), prototypes)
    assert out.me_max_loss.abs().item() < 1e-6
    collapsed = loss_fn(torch.ones(8, 32), torch.ones(4, 32), torch.randn(16, 32))
    assert collapsed.me_max_loss.item() > 0.1


def test_loss_is_finite_for_extreme_logits_and_under_bf16_autocast():
    # temperature 1e-4 makes the logits up to 1e4: exp() of them overflows unless taken through log-softmax.
    loss_fn = MSNModel(tiny_config(temperature=1e-4, target_sharpen_temperature=1e-3)).criterion
    anchors, targets, prototypes = torch.randn(8, 32), torch.randn(4, 32), torch.randn(16, 32)
    reference = loss_fn(anchors, targets, prototypes)
    assert torch.isfinite(reference.loss) and reference.loss > 100  # far from uniform: the logits are really large
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = loss_fn(anchors.bfloat16(), targets.bfloat16(), prototypes.bfloat16())
    assert autocast.loss.dtype == torch.float32
    # bf16 inputs carry ~3 significant digits; the loss computed from them must not drift further than that.
    rounded = loss_fn(anchors.bfloat16().float(), targets.bfloat16().float(), prototypes.bfloat16().float())
    torch.testing.assert_close(autocast.loss, rounded.loss)
    torch.testing.assert_close(autocast.loss, reference.loss, rtol=2e-2, atol=0)

    model = MSNModel(tiny_config()).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(**views())
    assert output.loss.dtype == torch.float32
    assert torch.isfinite(output.loss)
    output.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def kernels_run(model, inputs, bf16):
    """Names of the operators one training forward and backward of `model` ran on the CPU."""
    context = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile, context:
        model(**inputs).loss.backward()
    return {event.key for event in profile.key_averages()}


def test_bf16_on_the_cpu_runs_the_plain_attention_kernel_and_fp32_keeps_torchs_choice():
    # torch's fused (flash) CPU kernel takes several times longer for bf16 than the plain product-softmax-product at
    # these sequence lengths, which made bf16 slower than fp32 (benchmarks/step_kernels.py).
    model = MSNModel(tiny_config()).train()
    flash = "aten::_scaled_dot_product_flash_attention_for_cpu"
    fp32 = kernels_run(model, views(), bf16=False)
    bf16 = kernels_run(model, views(), bf16=True)
    assert flash in fp32
    assert "aten::_scaled_dot_product_attention_math" in bf16 and flash not in bf16
    # Outside the forward, torch chooses again.
    assert flash in kernels_run(model, views(), bf16=False)
    eval_model = MSNModel(tiny_config()).eval()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            eval_model(pixel_values=views()["pixel_values"])
    assert flash not in {event.key for event in profile.key_averages()}


def test_under_bf16_on_the_cpu_the_patch_embedding_is_a_matrix_product_and_fp32_keeps_the_convolution():
    # oneDNN's bf16 patch convolution took 4.6x the time of the same map as a matrix product, forward and backward,
    # on the model's shapes; in fp32 the step gained nothing (benchmarks/step_kernels.py).
    model = MSNModel(tiny_config()).train()
    bf16 = kernels_run(model, views(), bf16=True)
    assert not {kernel for kernel in bf16 if "convolution" in kernel}
    assert "aten::convolution_backward" in kernels_run(model, views(), bf16=False)


@pytest.mark.parametrize(
    "backbone_kwargs, size",
    [
        (dict(TINY_BACKBONE_KWARGS), 32),
        (dict(TINY_BACKBONE_KWARGS), 48),
        ({**TINY_BACKBONE_KWARGS, "dynamic_img_pad": True}, 36),
    ],
)
def test_embed_patches_under_bf16_equals_timms_patch_embedding_in_value_and_gradient(backbone_kwargs, size):
    encoder = MSNModel(tiny_config(backbone_kwargs=backbone_kwargs)).encoder
    pixel_values = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    results = []
    for embed in (encoder.patch_embed, partial(embed_patches, encoder.patch_embed)):
        encoder.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tokens = embed(pixel_values)
        (tokens.float() * torch.linspace(-1, 1, tokens.numel()).view_as(tokens)).sum().backward()
        proj = encoder.patch_embed.proj
        results.append((tokens.float(), proj.weight.grad.clone(), proj.bias.grad.clone()))
    for timm_result, msn_result in zip(*results):
        # bf16 rounds the inputs and products of both paths alike: a wrong patch layout is off by O(1).
        torch.testing.assert_close(msn_result, timm_result, rtol=2e-2, atol=2e-2)


def test_activation_checkpointing_under_bf16_recomputes_with_the_forward_kernels():
    # A recomputation on other kernels saves other tensors, which non-reentrant checkpointing refuses.
    gradients = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = MSNModel(tiny_config()).train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(**views()).loss.backward()
        gradients.append(model.encoder.blocks[0].attn.qkv.weight.grad)
    torch.testing.assert_close(gradients[1], gradients[0])


def count_block_tokens(model, **inputs):
    counts = []
    handle = model.encoder.blocks[0].register_forward_pre_hook(lambda _, args: counts.append(args[0].shape[1]))
    try:
        model(**inputs)
    finally:
        handle.remove()
    return counts


def test_token_dropping_reduces_tokens_and_flops():
    inputs = views(num_focal=2)
    dense = MSNModel(tiny_config(mask_ratio=0.0))
    masked = MSNModel(tiny_config(mask_ratio=0.5))
    # Anchor views: 16 patches + class token; 0.5 keeps 8. Focal views (4 patches) are not masked by default.
    assert count_block_tokens(dense, **inputs) == [17, 5]
    assert count_block_tokens(masked, **inputs) == [9, 5]
    assert count_block_tokens(MSNModel(tiny_config(mask_ratio=0.5, mask_focal_views=True)), **inputs) == [9, 3]

    def anchor_flops(model):
        with FlopCounterMode(display=False) as counter:
            model._encode(model.encoder, inputs["pixel_values"], mask_ratio=model.config.mask_ratio)
        return counter.get_total_flops()

    assert anchor_flops(masked) < 0.6 * anchor_flops(dense)
    mask_token = MSNModel(tiny_config(mask_ratio=0.5, mask_strategy="mask_token"))
    assert count_block_tokens(mask_token, **inputs) == [17, 5]
    assert anchor_flops(mask_token) >= anchor_flops(dense)


def test_dropped_tokens_are_a_per_sample_subset_of_the_unmasked_tokens():
    model = MSNModel(tiny_config(mask_ratio=0.5)).eval()
    captured = []
    handle = model.encoder.norm_pre.register_forward_hook(lambda *args: captured.append(args[2]))
    pixel_values = torch.randn(3, 3, 32, 32)
    model._encode(model.encoder, pixel_values, mask_ratio=0.0)
    model._encode(model.encoder, pixel_values, mask_ratio=0.5)
    handle.remove()
    full, kept = captured
    torch.testing.assert_close(kept[:, 0], full[:, 0])  # class token always kept
    subsets = []
    for sample in range(3):
        distances = torch.cdist(kept[sample, 1:], full[sample, 1:])
        assert distances.min(dim=1).values.max() < 1e-5
        subsets.append(frozenset(distances.argmin(dim=1).tolist()))
    assert len(set(subsets)) > 1  # each sample draws its own subset


def test_mask_token_strategy_replaces_patches_and_trains_the_token():
    model = MSNModel(tiny_config(mask_ratio=0.5, mask_strategy="mask_token")).train()
    assert model.mask_token.shape == (1, 1, 64)
    output = model(**views())
    output.loss.backward()
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0
    assert "mask_token" in model.state_dict()
    assert "mask_token" not in MSNModel(tiny_config()).state_dict()


def test_encode_without_masking_equals_timm_forward_at_any_resolution():
    model = MSNModel(tiny_config()).eval()
    for size in (32, 16, 48):
        pixel_values = torch.randn(2, 3, size, size)
        tokens, _ = model._encode(model.target_encoder, pixel_values)
        torch.testing.assert_close(tokens, model.target_encoder.forward_features(pixel_values))


def test_pixel_values_alone_return_target_embeddings_and_no_loss():
    model = MSNModel(tiny_config()).eval()
    pixel_values = torch.randn(2, 3, 32, 32)
    output = model(pixel_values, output_hidden_states=True)
    assert isinstance(output, MSNModelOutput)
    assert output.loss is None and output.anchor_probs is None
    assert output.last_hidden_state.shape == (2, 17, 64)
    torch.testing.assert_close(output.pooler_output, output.last_hidden_state[:, 0])
    torch.testing.assert_close(output.pooler_output, model.target_encoder.forward_features(pixel_values)[:, 0])
    assert len(output.hidden_states) == 1 + 2
    as_tuple = model(pixel_values, return_dict=False)
    torch.testing.assert_close(as_tuple[0], output.last_hidden_state)


def test_gradients_reach_anchor_head_and_prototypes_never_target():
    model = MSNModel(tiny_config()).train()
    model(**views()).loss.backward()
    for name, module in (("encoder", model.encoder), ("projection_head", model.projection_head)):
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads), name
        assert sum(g.abs().sum() for g in grads) > 0, name
    assert model.prototypes.grad is not None and model.prototypes.grad.abs().sum() > 0
    for module in (model.target_encoder, model.target_projection_head):
        assert all(p.grad is None and not p.requires_grad for p in module.parameters())
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"encoder", "projection_head", "prototypes"}


def test_ema_update_arithmetic():
    model = MSNModel(tiny_config()).train()
    model(**views())  # fill BatchNorm running statistics of both heads
    with torch.no_grad():
        for param in [*model.encoder.parameters(), *model.projection_head.parameters(), model.prototypes]:
            param.add_(torch.randn_like(param))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.update_target_encoder(0.9)
    after = model.state_dict()
    for key, value in after.items():
        if key.startswith(("target_encoder.", "target_projection_head.")) and not any(
            s in key for s in ("running_", "num_batches")
        ):
            anchor_key = key.replace("target_encoder.", "encoder.").replace("target_projection_head.", "projection_head.")
            torch.testing.assert_close(value, 0.9 * before[key] + 0.1 * before[anchor_key])
        else:  # anchor, prototypes and the target's own BatchNorm statistics are untouched
            torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    with pytest.raises(ValueError, match="momentum"):
        model.update_target_encoder(1.5)


def test_target_starts_as_a_copy_of_the_anchor():
    model = MSNModel(tiny_config())
    for (name, anchor), target in zip(model.encoder.named_parameters(), model.target_encoder.parameters()):
        assert torch.equal(anchor, target), name
    assert not torch.equal(model.encoder.blocks[0].attn.qkv.weight, MSNModel(tiny_config()).encoder.blocks[0].attn.qkv.weight)


def test_init_weights_covers_every_parameter_and_buffer():
    model = MSNModel(tiny_config(mask_strategy="mask_token"))
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.fill_(float("nan") if tensor.is_floating_point() else 7)
    for module in model.modules():
        module._is_hf_initialized = False
    model.apply(model._init_weights)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        assert torch.isfinite(tensor.float()).all(), name
    assert (model.projection_head.bn1.num_batches_tracked == 0).all()
    bound = 1 / math.sqrt(32)
    assert model.prototypes.abs().max() <= bound and model.prototypes.std() > bound / 4
    assert model.encoder.cls_token.std() < 0.05 and model.encoder.cls_token.std() > 0.005


def test_save_and_load_round_trip_is_exact(tmp_path):
    model = MSNModel(tiny_config()).train()
    model(**views())  # BatchNorm statistics
    with torch.no_grad():
        for param in model.encoder.parameters():
            param.add_(torch.randn_like(param))
    model.update_target_encoder(0.5)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = MSNModel.from_pretrained(tmp_path)
    expected = model.state_dict()
    assert set(loaded.state_dict()) == set(expected)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert not any(p.requires_grad for p in loaded.target_encoder.parameters())
    assert not any(p.requires_grad for p in loaded.target_projection_head.parameters())
    assert all(p.requires_grad for p in loaded.encoder.parameters())
    auto = AutoModel.from_pretrained(tmp_path)
    assert isinstance(auto, MSNModel) and isinstance(AutoConfig.from_pretrained(tmp_path), MSNConfig)


def test_gradient_checkpointing_gives_the_same_gradients():
    inputs = views()
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = MSNModel(tiny_config(mask_ratio=0.0)).train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert model.gradient_checkpointing
        model(**inputs).loss.backward()
        grads.append(model.encoder.blocks[0].attn.qkv.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_remote_code_load_without_msn_hf(tmp_path):
    model = MSNModel(tiny_config()).eval()
    model.save_pretrained(tmp_path / "model")
    pixel_values = torch.randn(2, 3, 32, 32)
    torch.save(pixel_values, tmp_path / "x.pt")
    torch.save(model(pixel_values).pooler_output, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["msn_hf"] = None  # make `import msn_hf` fail: only the code shipped in the folder may be used
        import torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert not any(p.requires_grad for p in model.target_encoder.parameters())
        out = model(torch.load({str(tmp_path / "x.pt")!r})).pooler_output
        torch.testing.assert_close(out, torch.load({str(tmp_path / "expected.pt")!r}))
        print("REMOTE_OK")
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert "REMOTE_OK" in result.stdout, result.stderr[-3000:]


def _two_process_check(inputs, reference):
    # Forked children must not reuse the parent's OpenMP pool (it deadlocks); one thread each is plenty here.
    torch.set_num_threads(1)
    # debug_launcher's workers set up the gloo group (RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT).
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    assert torch.distributed.get_world_size() == 2
    torch.manual_seed(0)
    model = MSNModel(tiny_config(mask_ratio=0.0, projection_batch_norm=False)).train()
    rows = slice(rank * 4, (rank + 1) * 4)
    output = model(**{name: value[rows] for name, value in inputs.items()})
    output.loss.backward()
    loss = output.loss.detach().clone()
    torch.distributed.all_reduce(loss)
    torch.testing.assert_close(loss / 2, reference["loss"], rtol=1e-5, atol=1e-6)
    # What DDP does: average the per-process gradients.
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        grad = param.grad.clone()
        torch.distributed.all_reduce(grad)
        torch.testing.assert_close(grad / 2, reference["grads"][name], rtol=1e-4, atol=1e-6)
    target = output.target_probs.clone()
    gathered = [torch.empty_like(target) for _ in range(2)]
    torch.distributed.all_gather(gathered, target)
    torch.testing.assert_close(torch.cat(gathered), reference["target_probs"], rtol=1e-5, atol=1e-6)


def test_two_processes_match_one_process_on_the_concatenated_batch():
    from accelerate import debug_launcher

    inputs = views(batch_size=8, num_anchor=1, num_focal=2)
    reference = one_process_reference(inputs)
    debug_launcher(_two_process_check, args=(inputs, reference), num_processes=2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(pixel_values=torch.randn(3, 32, 32)), r"`pixel_values` must have shape \[B, 3, H, W\].*\(3, 32, 32\)"),
        (dict(pixel_values=torch.randn(2, 1, 32, 32)), r"`pixel_values` .*3 RGB channels.*\(2, 1, 32, 32\)"),
        (dict(pixel_values=torch.randn(2, 3, 30, 32)), r"`pixel_values` .*multiples of the patch size \(8, 8\).*\(2, 3, 30, 32\)"),
        (
            dict(pixel_values=torch.randn(2, 3, 32, 32), anchor_pixel_values=torch.randn(3, 3, 32, 32)),
            r"`anchor_pixel_values` must have the batch size of `pixel_values` \(2\), got \(3, 3, 32, 32\)",
        ),
        (
            dict(pixel_values=torch.randn(2, 3, 32, 32), anchor_pixel_values=torch.randn(2, 1, 1, 3, 32, 32)),
            r"`anchor_pixel_values` must have shape \[B, 3, H, W\] or \[B, V, 3, H, W\]",
        ),
        (
            dict(pixel_values=torch.randn(2, 3, 32, 32), focal_pixel_values=torch.randn(2, 3, 16, 16)),
            r"`focal_pixel_values` must have shape \[B, V, 3, H, W\].*\(2, 3, 16, 16\)",
        ),
        (
            dict(pixel_values=torch.randn(2, 3, 32, 32), focal_pixel_values=torch.randn(2, 4, 3, 12, 12)),
            r"`focal_pixel_values` .*multiples of the patch size",
        ),
    ],
)
def test_bad_inputs_raise_clear_errors(kwargs, message):
    model = MSNModel(tiny_config())
    with pytest.raises(ValueError, match=message):
        model(**kwargs)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(mask_ratio=1.0), "mask_ratio"),
        (dict(mask_ratio=-0.1), "mask_ratio"),
        (dict(temperature=0.0), "temperature"),
        (dict(target_sharpen_temperature=-1.0), "target_sharpen_temperature"),
        (dict(num_prototypes=0), "num_prototypes"),
        (dict(image_size=-32), "image_size"),
        (dict(projection_output_size=0), "projection_output_size"),
        (dict(mask_strategy="zeros"), "mask_strategy"),
        (dict(backbone="resnet18"), "backbone"),
        (dict(backbone="not_a_model"), "backbone"),
        (dict(backbone_kwargs=dict(class_token=False, global_pool="avg")), "backbone"),
        (dict(ema_momentum=1.5), "ema_momentum"),
        (dict(label_smoothing=1.0), "label_smoothing"),
        # Not finite: a NaN or infinite loss from the first step.
        (dict(temperature=float("nan")), "temperature"),
        (dict(target_sharpen_temperature=float("inf")), "target_sharpen_temperature"),
        (dict(initializer_range=float("inf")), "initializer_range"),
        (dict(me_max_weight=float("nan")), "me_max_weight"),
        (dict(entropy_weight=float("inf")), "entropy_weight"),
        (dict(power_law_exponent=float("nan")), "power_law_exponent"),
        # Strings are not flags ("false" is truthy), and flags are not numbers.
        (dict(projection_batch_norm="false"), "projection_batch_norm"),
        (dict(mask_focal_views="no"), "mask_focal_views"),
        (dict(me_max_weight=True), "me_max_weight"),
        (dict(sinkhorn_iterations=True), "sinkhorn_iterations"),
        # Sides the model cannot take: not multiples of its patch (8).
        (dict(image_size=36, backbone_kwargs=dict(embed_dim=64, depth=2, num_heads=2, patch_size=8)), "image_size"),
        (dict(focal_image_size=12), "focal_image_size"),
        # The processor gives every image as RGB, grey ones included.
        (dict(backbone_kwargs=dict(embed_dim=64, depth=2, num_heads=2, patch_size=8, in_chans=1)), "backbone_kwargs"),
    ],
)
def test_invalid_config_values_raise_value_error_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        tiny_config(**overrides)


def test_config_defaults_are_the_original_recipe():
    config = MSNConfig()
    assert config.model_type == "msn"
    assert (config.backbone, config.image_size, config.focal_image_size) == ("vit_small_patch16_224", 224, 96)
    assert (config.projection_hidden_size, config.projection_output_size, config.num_prototypes) == (2048, 256, 1024)
    assert (config.mask_ratio, config.mask_strategy, config.temperature) == (0.15, "drop", 0.1)
    assert (config.target_sharpen_temperature, config.sinkhorn_iterations, config.me_max_weight) == (0.25, 3, 1.0)
    assert (config.ema_momentum, config.ema_momentum_end) == (0.996, 1.0)


@pytest.mark.parametrize("backbone_kwargs", [{}, dict(init_values=0.1, qk_norm=True)])
def test_class_token_only_last_block_is_the_full_blocks_class_row(backbone_kwargs):
    from msn_hf.modeling_msn import class_token_block

    config = tiny_config(mask_ratio=0.25)
    config.backbone_kwargs.update(backbone_kwargs)
    model = MSNModel(config).train()
    pixel_values = torch.randn(3, 3, 32, 32)
    results = []
    for class_token_only in (False, True):
        torch.manual_seed(1)  # the same dropped tokens
        tokens, _ = model._encode(model.encoder, pixel_values, 0.25, class_token_only=class_token_only)
        tokens[:, 0].pow(2).sum().backward()
        results.append((tokens[:, 0].detach(), [p.grad.clone() for p in model.encoder.parameters()]))
        model.zero_grad()
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-5)
    for full, cls_only in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(cls_only, full, atol=1e-4, rtol=1e-3)  # float summation order

    # Less work: the last block's MLP, projection and queries run for one row.
    def flops(**kwargs):
        with FlopCounterMode(display=False) as counter:
            model._encode(model.encoder, pixel_values, **kwargs)
        return counter.get_total_flops()

    assert flops(class_token_only=True) < 0.8 * flops()
    # Other block types run whole.
    block = torch.nn.Sequential(torch.nn.Linear(64, 64))
    tokens = torch.randn(2, 5, 64)
    torch.testing.assert_close(class_token_block(block, tokens), block(tokens)[:, :1])
