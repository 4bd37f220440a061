"""PyTorch MSN model: Masked Siamese Networks pretraining of timm Vision Transformers."""

import contextlib
import math
import os
from dataclasses import dataclass
from functools import partial

import timm
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.utils import ModelOutput

from .configuration_msn import MSNConfig
from .loss_msn import MSNLoss


@dataclass
class MSNModelOutput(ModelOutput):
    """
    Output of [`MSNModel`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when anchor or focal views are given):
            `prediction_loss + me_max_weight * me_max_loss (+ entropy_weight * entropy)`.
        prediction_loss (`torch.FloatTensor` of shape `()`, *optional*):
            Cross-entropy between the target assignments and the anchor assignments.
        me_max_loss (`torch.FloatTensor` of shape `()`, *optional*):
            KL divergence of the mean anchor assignment p_bar from the prior over prototypes (`config.target_prior`);
            for the uniform prior the mean-entropy maximisation penalty `sum(p_bar * log p_bar) + log K`.
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, 1 + num_patches, hidden_size)`):
            Target encoder tokens of `pixel_values` after the final norm (class token first).
        pooler_output (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
            Target encoder class token after the final norm: the embedding for downstream use.
        anchor_probs (`torch.FloatTensor` of shape `((num_anchor_views + num_focal_views) * batch_size, num_prototypes)`, *optional*):
            Prototype assignments of every anchor row, view-major: `[anchor_1; ...; anchor_R; focal_1; ...; focal_F]`.
        target_probs (`torch.FloatTensor` of shape `(batch_size, num_prototypes)`, *optional*):
            Sharpened, Sinkhorn-balanced target assignments (no gradient).
        hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states=True`):
            Target encoder tokens after the embeddings and after each block, each of shape
            `(batch_size, 1 + num_patches, hidden_size)`.
    """

    loss: torch.FloatTensor | None = None
    prediction_loss: torch.FloatTensor | None = None
    me_max_loss: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    anchor_probs: torch.FloatTensor | None = None
    target_probs: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


class MSNProjectionHead(nn.Module):
    """
    The MSN projection head on the class token: `fc1 -> bn1 -> GELU -> fc2 -> bn2 -> GELU -> fc3`.

    Input `(batch_size, in_features)`, output `(batch_size, config.projection_output_size)`. BatchNorm layers
    become identities when `config.projection_batch_norm` is False.
    """

    def __init__(self, config: MSNConfig, in_features: int):
        super().__init__()
        hidden, out = config.projection_hidden_size, config.projection_output_size
        norm = nn.BatchNorm1d if config.projection_batch_norm else (lambda _: nn.Identity())
        self.fc1 = nn.Linear(in_features, hidden)
        self.bn1 = norm(hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.bn2 = norm(hidden)
        self.fc3 = nn.Linear(hidden, out)
        self.act = nn.GELU()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden = self.act(self.bn1(self.fc1(features)))
        hidden = self.act(self.bn2(self.fc2(hidden)))
        return self.fc3(hidden)


def sincos_position_embedding(grid_height: int, grid_width: int, dim: int, num_prefix_tokens: int = 1) -> torch.Tensor:
    """
    Fixed 2-D sine-cosine position embeddings (as MAE), shape `(1, num_prefix_tokens + grid_height * grid_width, dim)`.

    The patch at row i, column j (row-major order) gets `[sin(j w), cos(j w), sin(i w), cos(i w)]` with the
    `dim / 4` frequencies `w_f = 10000^(-f / (dim / 4))`; prefix tokens (class token) get zeros.
    """
    if dim % 4:
        raise ValueError(f"sine-cosine position embeddings need a width divisible by 4, got {dim}.")
    frequencies = 10000.0 ** -(torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, columns = torch.meshgrid(
        torch.arange(grid_height, dtype=torch.float64), torch.arange(grid_width, dtype=torch.float64), indexing="ij"
    )
    parts = []
    for coordinate in (columns.reshape(-1), rows.reshape(-1)):
        angles = coordinate[:, None] * frequencies[None, :]
        parts += [angles.sin(), angles.cos()]
    patches = torch.cat(parts, dim=1)
    prefix = torch.zeros(num_prefix_tokens, dim, dtype=torch.float64)
    return torch.cat([prefix, patches]).unsqueeze(0).float()


def _load_pretrained_backbone(config: MSNConfig) -> timm.models.VisionTransformer:
    """The timm ViT of `config` with the weights of `config.backbone_pretrained` (a local file, else a Hub id)."""
    source = config.backbone_pretrained
    overlay = dict(file=source) if os.path.isfile(source) else dict(hf_hub_id=source)
    kwargs = {**config.timm_kwargs(), "pretrained": True, "pretrained_cfg_overlay": overlay}
    try:
        return timm.create_model(config.backbone, **kwargs)
    except (OSError, RuntimeError, ValueError) as error:
        # A state dict of another architecture lists every mismatched tensor: the first two lines tell the story.
        said = " ".join(line.strip() for line in str(error).strip().splitlines()[:2])
        raise ValueError(
            f"MSNConfig: `backbone_pretrained` must be a weights file of {config.backbone!r} with `backbone_kwargs` "
            f"{config.backbone_kwargs} or a Hub id of one, got {source!r} (are those the weights' architecture?); "
            f"timm said: {said}"
        ) from error


def create_backbone(config: MSNConfig) -> timm.models.VisionTransformer:
    """
    The timm Vision Transformer of `config.backbone`, accepting any multiple of its patch size: randomly
    initialised, or holding `config.backbone_pretrained` weights (marked so that `post_init` keeps them). With
    `config.position_embedding="sincos"`, `pos_embed` is a buffer (never trained, resampled for other
    resolutions by timm like a learned one).
    """
    # Under `from_pretrained` modules are built on the meta device and the checkpoint supplies every weight.
    pretrained = config.backbone_pretrained is not None and not torch.empty(0).is_meta
    backbone = _load_pretrained_backbone(config) if pretrained else timm.create_model(config.backbone, **config.timm_kwargs())
    if config.position_embedding == "sincos" and isinstance(backbone.pos_embed, nn.Parameter):
        position_embedding = backbone.pos_embed.detach().clone()
        del backbone.pos_embed
        backbone.register_buffer("pos_embed", position_embedding)
    if pretrained:
        for tensor in (*backbone.parameters(), *backbone.buffers()):
            tensor._is_hf_initialized = True
    return backbone


def random_keep_indices(
    batch_size: int,
    num_patches: int,
    mask_ratio: float,
    device: torch.device,
    generator: torch.Generator | None = None,
    shared: bool = False,
) -> torch.LongTensor:
    """
    Random subsets of `int(num_patches * (1 - mask_ratio))` patch indices, shape `(batch_size, num_kept)`: one per
    sample, or with `shared=True` one subset repeated for the whole batch (the authors' masking).
    """
    num_keep = max(1, int(num_patches * (1.0 - mask_ratio)))
    noise = torch.rand(1 if shared else batch_size, num_patches, device=device, generator=generator)
    return noise.argsort(dim=1)[:, :num_keep].expand(batch_size, -1)


def bf16_autocast_on_cpu(device: torch.device) -> bool:
    """Whether work on `device` runs under bfloat16 autocast on a CPU, where oneDNN's fused kernels can be slow."""
    return device.type == "cpu" and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def attention_kernels(device: torch.device) -> contextlib.AbstractContextManager:
    """
    The scaled-dot-product-attention kernels the blocks may run on `device`, as a context manager.

    Under bfloat16 autocast on a CPU only the plain kernel (product, softmax, product) is allowed: torch's fused
    CPU kernel takes several times longer for bf16 than for fp32, most of it in the backward pass, and made a bf16
    step slower than an fp32 one (`benchmarks/step_kernels.py`). Elsewhere torch chooses.
    """
    if bf16_autocast_on_cpu(device):
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


def embed_patches(patch_embed: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """
    `patch_embed(pixel_values)` for timm's `PatchEmbed` with channels-last output: `(batch_size, 3, H, W)` ->
    `(batch_size, H / patch_h, W / patch_w, hidden_size)`.

    A convolution whose stride equals its kernel is a linear map of the non-overlapping patches. Under bfloat16
    autocast on a CPU it runs here as that matrix product, with the convolution's own weights: oneDNN's bf16
    convolution took 4.6x as long as the product, forward and backward, on the model's shapes, 9 % of the digits'
    training step (`benchmarks/step_kernels.py`). In fp32 the whole step gained nothing, so the module runs, as on
    other devices, for other embeddings and for inputs that need timm's padding or size checks.
    """
    if type(patch_embed) is not timm.layers.PatchEmbed or not bf16_autocast_on_cpu(pixel_values.device):
        return patch_embed(pixel_values)
    proj = patch_embed.proj
    (patch_h, patch_w), (height, width) = proj.kernel_size, pixel_values.shape[-2:]
    plain = (
        patch_embed.output_fmt == timm.layers.Format.NHWC
        and not patch_embed.flatten
        and not patch_embed.strict_img_size
        and proj.stride == (patch_h, patch_w)
        and proj.padding == (0, 0)
        and proj.dilation == (1, 1)
        and proj.groups == 1
        and height % patch_h == 0
        and width % patch_w == 0
    )
    if not plain:
        return patch_embed(pixel_values)
    batch_size, channels = pixel_values.shape[:2]
    grid_h, grid_w = height // patch_h, width // patch_w
    # Each patch flattened as (channel, row, column), the layout of the convolution's `(out, in, kh, kw)` weight.
    patches = pixel_values.reshape(batch_size, channels, grid_h, patch_h, grid_w, patch_w)
    patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(batch_size, grid_h, grid_w, channels * patch_h * patch_w)
    return patch_embed.norm(F.linear(patches, proj.weight.flatten(1), proj.bias))


def class_token_block(block: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """
    The class-token row of `block(tokens)`, `(batch_size, 1, hidden_size)`, without computing the other rows.

    In the last block only the class token reaches the projection head, so its query, attention output, output
    projection and MLP are computed for that one row (keys and values still for all tokens): the same maths as the
    full block, about a twelfth of a ViT's token work less. Blocks other than timm's standard pre-norm `Block` with
    its plain `Attention` run whole.
    """
    attn = getattr(block, "attn", None)
    if (
        type(block) is not timm.models.vision_transformer.Block
        or type(attn) is not timm.layers.Attention
        or attn.gate is not None
    ):
        return block(tokens)[:, :1]
    batch_size, num_tokens, _ = tokens.shape
    heads, head_dim, width = attn.num_heads, attn.head_dim, attn.attn_dim
    normed = block.norm1(tokens)
    weight, bias = attn.qkv.weight, attn.qkv.bias
    query = F.linear(normed[:, :1], weight[:width], None if bias is None else bias[:width])
    key_value = F.linear(normed, weight[width:], None if bias is None else bias[width:])
    query = attn.q_norm(query.view(batch_size, 1, heads, head_dim).transpose(1, 2))
    key, value = key_value.view(batch_size, num_tokens, 2, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    key = attn.k_norm(key)
    dropout = attn.attn_drop.p if attn.training else 0.0
    mixed = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout)
    mixed = attn.proj_drop(attn.proj(attn.norm(mixed.transpose(1, 2).reshape(batch_size, 1, width))))
    cls = tokens[:, :1] + block.drop_path1(block.ls1(mixed))
    return cls + block.drop_path2(block.ls2(block.mlp(block.norm2(cls))))


def run_block(block: nn.Module, tokens: torch.Tensor, class_token_only: bool = False) -> torch.Tensor:
    """
    `block(tokens)`, or with `class_token_only` its class-token row (`class_token_block`), under the attention
    kernels of `attention_kernels`. Activation checkpointing calls this again to recompute the block, so the
    recomputation runs the kernels of the forward pass.
    """
    with attention_kernels(tokens.device):
        return class_token_block(block, tokens) if class_token_only else block(tokens)


class MSNPreTrainedModel(PreTrainedModel):
    """
    Weight initialisation, loading and saving conventions shared by the MSN models. Attention runs in timm, which
    uses PyTorch's `scaled_dot_product_attention` (its kernels as `attention_kernels` allows): there is no
    `attn_implementation` to choose.
    """

    config_class = MSNConfig
    config: MSNConfig
    # No base model to add or strip: the encoders are timm modules, and the classifier's `vit` takes its weights
    # from the pretraining checkpoint's `target_encoder` through the conversion mapping registered below.
    base_model_prefix = ""
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """
        `config.weight_init="msn"`, the authors' recipe: Linear weights truncated normal (std `initializer_range`),
        the patch convolution Kaiming normal (fan-in, gain sqrt(2)); `"mae"`: Linear weights and the patch
        projection (as a flattened `(out, in * kh * kw)` linear map) Xavier uniform. Both: zero biases, unit
        norms, class / register tokens and learned position embeddings truncated normal (`"mae"`: normal) of std
        `initializer_range`, sine-cosine position embeddings by formula, prototypes uniform(+-1/sqrt(dim)).
        """
        std = self.config.initializer_range
        mae = self.config.weight_init == "mae"
        if isinstance(module, nn.Linear):
            if mae:
                init.xavier_uniform_(module.weight)
            else:
                init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            if mae:
                fan_out, fan_in = module.weight.shape[0], module.weight[0].numel()
                bound = math.sqrt(6.0 / (fan_in + fan_out))
                init.uniform_(module.weight, -bound, bound)
            else:
                init.kaiming_normal_(module.weight, mode="fan_in")
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.BatchNorm1d)):
            if module.weight is not None:
                init.ones_(module.weight)
                init.zeros_(module.bias)
            if getattr(module, "running_mean", None) is not None:
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)
        elif isinstance(module, timm.layers.LayerScale):
            init.constant_(module.gamma, module.init_values)
        elif isinstance(module, timm.models.VisionTransformer):
            token_init = init.normal_ if mae else init.trunc_normal_
            for name in ("cls_token", "reg_token"):
                if getattr(module, name, None) is not None:
                    token_init(getattr(module, name), std=std)
            if module.pos_embed is not None:
                if self.config.position_embedding == "sincos":
                    grid_height, grid_width = module.patch_embed.grid_size
                    num_prefix = module.pos_embed.shape[1] - grid_height * grid_width
                    values = sincos_position_embedding(grid_height, grid_width, module.pos_embed.shape[-1], num_prefix)
                    init.copy_(module.pos_embed, values.to(module.pos_embed.device, module.pos_embed.dtype))
                else:
                    token_init(module.pos_embed, std=std)
        elif isinstance(module, MSNModel):
            bound = 1.0 / math.sqrt(self.config.projection_output_size)
            init.uniform_(module.prototypes, -bound, bound)
            if module.mask_token is not None:
                init.trunc_normal_(module.mask_token, std=std)

    def initialize_weights(self) -> None:
        """`_init_weights` on every module not loaded from a checkpoint, then `_after_weights_set`."""
        super().initialize_weights()
        # Runs in `post_init` and again at the end of `from_pretrained`, which recreates every loaded parameter.
        self._after_weights_set()

    def _after_weights_set(self) -> None:
        """Re-establish what loading parameters loses (their `requires_grad`)."""

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None, every_n_layers: int = 1):
        """Checkpoint every `every_n_layers`-th block of the trained encoder with `gradient_checkpointing_func`."""
        if every_n_layers < 1:
            raise ValueError(f"`every_n_layers` must be >= 1, got {every_n_layers!r}.")
        if not enable:
            return super()._set_gradient_checkpointing(enable=False)
        checkpoint_func = gradient_checkpointing_func or torch.utils.checkpoint.checkpoint
        checkpointed = {id(block) for block in list(self.get_encoder().blocks)[::every_n_layers]}

        def checkpoint_some_blocks(block, *args, **kwargs):
            # `_encode` passes every block wrapped (`partial(run_block, block, ...)`): match the block itself.
            if id(block.args[0]) in checkpointed:
                return checkpoint_func(block, *args, **kwargs)
            return block(*args, **kwargs)

        return super()._set_gradient_checkpointing(True, checkpoint_some_blocks)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """
        Save as `PreTrainedModel.save_pretrained`, without `backbone_pretrained` in the saved config (the weights are
        saved). Folders saved with their code (`register_for_auto_class`) also
        map `AutoModelForImageClassification`, since the copied `modeling_msn.py` holds the classifier, which
        takes its encoder from a pretraining checkpoint. A classifier's folder drops `AutoModel`: `MSNModel` cannot
        load its weights (`vit.*`).
        """
        if self._auto_class is not None:
            module = type(self).__module__.rsplit(".", 1)[-1]
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            auto_map["AutoModelForImageClassification"] = f"{module}.MSNForImageClassification"
            if isinstance(self, MSNForImageClassification):
                auto_map.pop("AutoModel", None)
            self.config.auto_map = auto_map
        if isinstance(self, MSNForImageClassification):
            # Keep the classifier's own names (`vit.*`): without this, Transformers would save them back under the
            # pretraining checkpoint's name (`target_encoder.*`), as the conversion mapping is reversible.
            kwargs.setdefault("save_original_format", False)
        # The saved weights replace the timm weights training started from: a saved config that still named them
        # would load (or download) them again whenever a model is built from it.
        started_from, self.config.backbone_pretrained = self.config.backbone_pretrained, None
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self.config.backbone_pretrained = started_from

    def _check_pixel_values(self, name: str, pixel_values: torch.Tensor, ranks: tuple[int, ...]) -> None:
        """Raise a `ValueError` naming `name` unless it is `[..., 3, H, W]` of an allowed rank with H, W multiples of the patch size."""
        layouts = {4: "[B, 3, H, W]", 5: "[B, V, 3, H, W]"}
        expected = " or ".join(layouts[rank] for rank in ranks)
        if not isinstance(pixel_values, torch.Tensor):
            raise ValueError(
                f"`{name}` must be a torch tensor of dtype {self.dtype} (the image processor's output with "
                f"`return_tensors=\"pt\"`), got {type(pixel_values).__module__}.{type(pixel_values).__name__}."
            )
        autocast = torch.is_autocast_enabled(pixel_values.device.type)
        if not pixel_values.is_floating_point() or (pixel_values.dtype != self.dtype and not autocast):
            raise ValueError(
                f"`{name}` must have the model's dtype {self.dtype} (normalised pixels, as the image processor "
                f"returns them), got {pixel_values.dtype}."
            )
        shape = tuple(pixel_values.shape)
        if pixel_values.ndim not in ranks or shape[-3] != 3:
            raise ValueError(f"`{name}` must have shape {expected} (3 RGB channels), got {shape}.")
        patch_h, patch_w = self._patch_size()
        if shape[-2] % patch_h or shape[-1] % patch_w:
            raise ValueError(
                f"`{name}` height and width must be multiples of the patch size {(patch_h, patch_w)}, got {shape}."
            )

    def _add_position_embeddings(self, encoder: timm.models.VisionTransformer, tokens: torch.Tensor) -> torch.Tensor:
        """
        Prefix tokens and position embeddings for patch tokens `(batch_size, grid_h, grid_w, hidden_size)`: timm's
        own step, or, with `config.pos_embed_antialias=False` at another grid size, the embeddings resampled bicubic
        without antialiasing (the authors' resampling). Returns `(batch_size, prefix + grid_h * grid_w, hidden_size)`.
        """
        grid = tuple(tokens.shape[1:3])
        if self.config.pos_embed_antialias or encoder.no_embed_class or grid == tuple(encoder.patch_embed.grid_size):
            return encoder._pos_embed(tokens)
        pos_embed = timm.layers.resample_abs_pos_embed(
            encoder.pos_embed, new_size=grid, old_size=encoder.patch_embed.grid_size,
            num_prefix_tokens=encoder.num_prefix_tokens, antialias=False,
        )  # fmt: skip
        prefix = [encoder.cls_token.expand(tokens.shape[0], -1, -1)]
        if encoder.reg_token is not None:
            prefix.append(encoder.reg_token.expand(tokens.shape[0], -1, -1))
        tokens = torch.cat([*prefix, tokens.flatten(1, 2)], dim=1)
        return encoder.pos_drop(tokens + pos_embed)

    def _patch_size(self) -> tuple[int, int]:
        return tuple(self.get_encoder().patch_embed.patch_size)

    def _encode(
        self,
        encoder: timm.models.VisionTransformer,
        pixel_values: torch.Tensor,
        mask_ratio: float = 0.0,
        output_hidden_states: bool = False,
        class_token_only: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """
        Run a timm ViT on `pixel_values` `(batch_size, 3, H, W)`, masking a random `mask_ratio` of patch tokens.

        With `mask_strategy="drop"` masked tokens are removed after the position embeddings (the class token is
        always kept), so the blocks process `1 + int(num_patches * (1 - mask_ratio))` tokens; with `"mask_token"`
        they are replaced by the learned mask token before the position embeddings.

        Returns the tokens after the final norm `(batch_size, num_tokens, hidden_size)` and, if requested, the
        tokens after the embeddings and after every block. With `class_token_only`, only the class token
        `(batch_size, 1, hidden_size)`, its last block computed for that row alone (`class_token_block`).
        """
        tokens = embed_patches(encoder.patch_embed, pixel_values)  # (batch_size, grid_h, grid_w, hidden_size)
        batch_size, grid_h, grid_w, hidden_size = tokens.shape
        num_patches = grid_h * grid_w
        keep = None
        if mask_ratio > 0:
            shared = self.config.mask_sampling == "per_batch"
            keep = random_keep_indices(batch_size, num_patches, mask_ratio, tokens.device, shared=shared)
        if keep is not None and self.config.mask_strategy == "mask_token":
            masked = torch.ones(batch_size, num_patches, dtype=torch.bool, device=tokens.device)
            masked.scatter_(1, keep, False)
            flat = torch.where(masked.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens.reshape(batch_size, num_patches, hidden_size))
            tokens = flat.view(batch_size, grid_h, grid_w, hidden_size)
            keep = None
        tokens = self._add_position_embeddings(encoder, tokens)
        if keep is not None:
            prefix = encoder.num_prefix_tokens
            kept = tokens[:, prefix:].gather(1, keep.unsqueeze(-1).expand(-1, -1, hidden_size))
            tokens = torch.cat([tokens[:, :prefix], kept], dim=1)
        tokens = encoder.norm_pre(tokens)

        hidden_states = (tokens,) if output_hidden_states else None
        num_blocks = len(encoder.blocks)
        for index, block in enumerate(encoder.blocks):
            block = partial(run_block, block, class_token_only=class_token_only and index == num_blocks - 1)
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                tokens = self._gradient_checkpointing_func(block, tokens)
            else:
                tokens = block(tokens)
            if output_hidden_states:
                hidden_states += (tokens,)
        return encoder.norm(tokens), hidden_states


class MSNModel(MSNPreTrainedModel):
    """
    Masked Siamese Networks: an anchor ViT trained to match, through shared prototypes, the assignments that an
    EMA target ViT gives to an unmasked view of the same image.

    Attributes (also the checkpoint's key prefixes): `encoder` and `projection_head` (trained), `target_encoder`
    and `target_projection_head` (EMA copies, no gradient), `prototypes` `(num_prototypes, projection_output_size)`
    (trained, never averaged) and, for `mask_strategy="mask_token"`, `mask_token`.
    """

    def __init__(self, config: MSNConfig):
        if "MSNForImageClassification" in (config.architectures or []):
            # `from_pretrained` (`AutoModel`, `pipeline("image-feature-extraction")`) on a classifier's folder would
            # find none of this model's weights there and start every one at random, with a load report only.
            raise ValueError(
                "MSNModel: `config` must be a pretraining model's, got that of an MSNForImageClassification (its "
                "`architectures`), a fine-tuned classifier whose one encoder is saved as vit.*: load its folder with "
                "MSNForImageClassification or AutoModelForImageClassification (its pooled output is the features)."
            )
        super().__init__(config)
        self.encoder = create_backbone(config)
        self.target_encoder = create_backbone(config)
        hidden_size = self.encoder.embed_dim
        self.projection_head = MSNProjectionHead(config, hidden_size)
        self.target_projection_head = MSNProjectionHead(config, hidden_size)
        self.prototypes = nn.Parameter(torch.empty(config.num_prototypes, config.projection_output_size))
        self.mask_token = nn.Parameter(torch.empty(1, 1, hidden_size)) if config.mask_strategy == "mask_token" else None
        self.criterion = MSNLoss(
            temperature=config.temperature,
            target_sharpen_temperature=config.target_sharpen_temperature,
            sinkhorn_iterations=config.sinkhorn_iterations,
            me_max_weight=config.me_max_weight,
            entropy_weight=config.entropy_weight,
            label_smoothing=config.label_smoothing,
            target_prior=config.target_prior,
            power_law_exponent=config.power_law_exponent,
        )
        self.gradient_checkpointing = False
        self.post_init()
        # After post_init, so that the target starts as an exact copy of the initialised anchor branch.
        self.copy_anchor_to_target()

    def get_encoder(self) -> timm.models.VisionTransformer:
        return self.encoder

    @classmethod
    def from_timm(cls, vit_module: timm.models.VisionTransformer, **config_kwargs) -> "MSNModel":
        """
        An `MSNModel` whose anchor and target encoders start as copies of an existing timm ViT (its classifier,
        if any, dropped). The backbone name and `backbone_kwargs` (width, depth, heads, patch and image size, MLP
        ratio, qkv bias, register tokens) are read from the module unless given in `config_kwargs`; its position
        embeddings are kept as they are, whatever `position_embedding` says.
        """
        if not isinstance(vit_module, timm.models.VisionTransformer) or getattr(vit_module, "cls_token", None) is None:
            raise ValueError(
                "`vit_module` must be a timm VisionTransformer with a class token, got "
                f"{type(vit_module).__name__}."
            )
        block = vit_module.blocks[0]
        backbone_kwargs = dict(
            img_size=tuple(vit_module.patch_embed.img_size),
            patch_size=tuple(vit_module.patch_embed.patch_size),
            embed_dim=vit_module.embed_dim,
            depth=len(vit_module.blocks),
            num_heads=block.attn.num_heads,
            mlp_ratio=block.mlp.fc1.out_features / vit_module.embed_dim,
            qkv_bias=block.attn.qkv.bias is not None,
            reg_tokens=vit_module.num_reg_tokens,
            no_embed_class=vit_module.no_embed_class,
        )
        config_kwargs.setdefault("backbone", (vit_module.pretrained_cfg or {}).get("architecture") or "vit_small_patch16_224")
        config_kwargs.setdefault("backbone_kwargs", backbone_kwargs)
        config_kwargs.setdefault("image_size", backbone_kwargs["img_size"][0])
        config_kwargs["backbone_pretrained"] = None
        model = cls(MSNConfig(**config_kwargs))
        weights = {k: v for k, v in vit_module.state_dict().items() if not k.startswith("head.")}
        expected = model.encoder.state_dict()
        mismatched = sorted(
            set(weights) ^ set(expected) | {k for k in set(weights) & set(expected) if weights[k].shape != expected[k].shape}
        )
        if mismatched:
            raise ValueError(
                f"`vit_module` does not match the encoder of backbone {model.config.backbone!r} with "
                f"{model.config.backbone_kwargs}: differing weights {mismatched[:8]}; pass `backbone` and "
                "`backbone_kwargs` that rebuild it."
            )
        with torch.no_grad():
            model.encoder.load_state_dict(weights)
        model.copy_anchor_to_target()
        return model

    def _target_and_anchor_parameters(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        target = [*self.target_encoder.parameters(), *self.target_projection_head.parameters()]
        anchor = [*self.encoder.parameters(), *self.projection_head.parameters()]
        return target, anchor

    @torch.no_grad()
    def copy_anchor_to_target(self) -> None:
        """Set the target encoder and head to the anchor's parameters and freeze them."""
        target, anchor = self._target_and_anchor_parameters()
        torch._foreach_copy_(target, anchor)
        self.freeze_target()

    def freeze_target(self) -> None:
        """Exclude the target branch from gradient descent (`from_pretrained` recreates parameters as trainable)."""
        self.target_encoder.requires_grad_(False)
        self.target_projection_head.requires_grad_(False)

    def _after_weights_set(self) -> None:
        self.freeze_target()

    @torch.no_grad()
    def update_target_encoder(self, momentum: float) -> None:
        """
        EMA step of the target branch after an optimiser step: `target = momentum * target + (1 - momentum) * anchor`
        for every parameter of the encoder and projection head (not the prototypes, not BatchNorm statistics).
        """
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"`momentum` must be in [0, 1], got {momentum!r}.")
        target, anchor = self._target_and_anchor_parameters()
        torch._foreach_lerp_(target, anchor, 1.0 - momentum)

    @torch.no_grad()
    def prototype_assignments(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """
        The target branch's assignment of unmasked images to the prototypes, `p(z_target)` of [`MSNLoss`] before
        sharpening and Sinkhorn: which prototypes the data uses (a collapse shows as a few prototypes taking all).

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`): evaluation-preprocessed.

        Returns:
            `torch.FloatTensor` of shape `(batch_size, num_prototypes)`, rows summing to 1.
        """
        self._check_pixel_values("pixel_values", pixel_values, ranks=(4,))
        tokens, _ = self._encode(self.target_encoder, pixel_values)
        embeddings = self.target_projection_head(tokens[:, 0]).float()
        return self.criterion.log_probs(embeddings, self.prototypes.float()).exp()

    def _embed_views(self, views: torch.Tensor, mask_ratio: float) -> torch.Tensor:
        """Projection-head outputs of one resolution group of anchor views `(V, B, 3, H, W)` -> `(V * B, out)`."""
        tokens, _ = self._encode(self.encoder, views.flatten(0, 1), mask_ratio=mask_ratio, class_token_only=True)
        return self.projection_head(tokens[:, 0])

    def forward(
        self,
        pixel_values: torch.Tensor,
        anchor_pixel_values: torch.Tensor | None = None,
        focal_pixel_values: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> MSNModelOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`):
                Unmasked target views. Alone, they give the target encoder's embeddings and no loss.
            anchor_pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)` or `(batch_size, num_anchor_views, 3, height, width)`, *optional*):
                Random anchor views, masked with `config.mask_ratio`.
            focal_pixel_values (`torch.FloatTensor` of shape `(batch_size, num_focal_views, 3, focal_height, focal_width)`, *optional*):
                Small focal anchor views, masked only if `config.mask_focal_views`.
            output_hidden_states (`bool`, *optional*):
                Return the target encoder's tokens after the embeddings and after every block.
            return_dict (`bool`, *optional*):
                Return an [`MSNModelOutput`] rather than a tuple.
        """
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        self._check_pixel_values("pixel_values", pixel_values, ranks=(4,))
        batch_size = pixel_values.shape[0]
        anchor_groups = []
        for name, views, ranks, mask_ratio in (
            ("anchor_pixel_values", anchor_pixel_values, (4, 5), self.config.mask_ratio),
            ("focal_pixel_values", focal_pixel_values, (5,), self.config.mask_ratio * self.config.mask_focal_views),
        ):
            if views is None:
                continue
            self._check_pixel_values(name, views, ranks)
            if views.shape[0] != batch_size:
                raise ValueError(
                    f"`{name}` must have the batch size of `pixel_values` ({batch_size}), got {tuple(views.shape)}."
                )
            views = views if views.ndim == 5 else views.unsqueeze(1)
            anchor_groups.append((views.transpose(0, 1), mask_ratio))

        with torch.no_grad():
            target_tokens, hidden_states = self._encode(
                self.target_encoder, pixel_values, output_hidden_states=output_hidden_states
            )
        pooled = target_tokens[:, 0]

        loss = prediction_loss = me_max_loss = anchor_probs = target_probs = None
        if anchor_groups:
            with torch.no_grad():
                target_embeddings = self.target_projection_head(pooled)
            # One head call per resolution group, so BatchNorm statistics are per group as in the original.
            anchor_embeddings = torch.cat([self._embed_views(views, ratio) for views, ratio in anchor_groups])
            losses = self.criterion(anchor_embeddings, target_embeddings, self.prototypes)
            loss, prediction_loss, me_max_loss = losses.loss, losses.prediction_loss, losses.me_max_loss
            anchor_probs, target_probs = losses.anchor_probs, losses.target_probs

        output = MSNModelOutput(
            loss=loss,
            prediction_loss=prediction_loss,
            me_max_loss=me_max_loss,
            last_hidden_state=target_tokens,
            pooler_output=pooled,
            anchor_probs=anchor_probs,
            target_probs=target_probs,
            hidden_states=hidden_states,
        )
        return output if return_dict else output.to_tuple()


class MSNForImageClassification(MSNPreTrainedModel):
    """
    A timm ViT (`vit`) with a linear classifier on the class token (or on the class token concatenated with the
    mean patch token, `config.classifier_pooling="cls_mean"`).

    `from_pretrained` on an [`MSNModel`] checkpoint takes the TARGET encoder as `vit` and ignores the
    pretraining-only weights (anchor encoder, heads, prototypes).
    """

    _keys_to_ignore_on_load_unexpected = [
        r"^encoder\.",
        r"^projection_head\.",
        r"^target_projection_head\.",
        r"^prototypes$",
        r"^mask_token$",
    ]

    def __init__(self, config: MSNConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.vit = create_backbone(config)
        features = self.vit.embed_dim * (2 if config.classifier_pooling == "cls_mean" else 1)
        self.classifier = nn.Linear(features, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.gradient_checkpointing = False
        self.post_init()

    def get_encoder(self) -> timm.models.VisionTransformer:
        return self.vit

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> ImageClassifierOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`): images.
            labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
                Class indices (or float targets for regression / multi-label, following `config.problem_type`).
            output_hidden_states (`bool`, *optional*): return the tokens after the embeddings and every block.
            return_dict (`bool`, *optional*): return an [`ImageClassifierOutput`] rather than a tuple.

        Returns: logits of shape `(batch_size, num_labels)` and, with `labels`, the loss.
        """
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        self._check_pixel_values("pixel_values", pixel_values, ranks=(4,))
        tokens, hidden_states = self._encode(self.vit, pixel_values, output_hidden_states=output_hidden_states)
        features = tokens[:, 0]
        if self.config.classifier_pooling == "cls_mean":
            features = torch.cat([features, tokens[:, self.vit.num_prefix_tokens :].mean(dim=1)], dim=-1)
        logits = self.classifier(features)
        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config)
        output = ImageClassifierOutput(loss=loss, logits=logits, hidden_states=hidden_states)
        return output if return_dict else output.to_tuple()


# An MSNModel checkpoint stores the encoder a classifier starts from as `target_encoder`; the classifier calls it `vit`.
# Registered under the class name, as Transformers requires for code outside the library; `overwrite` because this
# module also runs as a checkpoint's remote code next to an imported msn_hf.
register_checkpoint_conversion_mapping(
    "MSNForImageClassification", [WeightRenaming(r"^target_encoder\.", "vit.")], overwrite=True
)

__all__ = ["MSNModel", "MSNForImageClassification", "MSNPreTrainedModel", "MSNModelOutput", "MSNProjectionHead"]
