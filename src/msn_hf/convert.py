"""
Conversions between msn_hf checkpoints and the other places an MSN model lives.

- `to_vit_msn`: the target encoder of an msn_hf folder as a Transformers `ViTMSNModel` folder, or a fine-tuned
  `MSNForImageClassification` folder as a `ViTMSNForImageClassification` folder.
- `to_timm`: the target encoder as a timm checkpoint (`model.safetensors` + `config.json`).
- `from_original`: a `.pth.tar` checkpoint of the authors' release as a full msn_hf folder.
- `from_vit_msn`: a Transformers `ViTMSNModel` or `ViTModel` folder (e.g. facebook/vit-msn-small) as an msn_hf folder.
- `msn_model_from_vit`, `model_folder_kind`, `classifier_folder_error`: continuing pretraining from a saved model
  (`msn-pretrain --model_name_or_path`), in memory.

Every conversion validates the whole source first (missing, unexpected and mis-shaped keys are reported together),
writes into a temporary sibling of the output folder, checks the result numerically where two implementations are
involved, and only then renames the folder into place: a failed conversion leaves nothing behind.

Command line: `msn-convert {to-vit-msn,to-timm,from-original,from-vit-msn} ...` or `python -m msn_hf.convert ...`.
"""

import argparse
import json
import math
import os
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import Mlp, PatchEmbed
from timm.models.vision_transformer import Attention, Block
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
from transformers.image_utils import PILImageResampling
from transformers.utils import logging

from .configuration_msn import MSNConfig
from .files import atomic_folder, check_output_dir, folder_relation
from .image_processing_msn import MSNImageProcessor
from .modeling_msn import MSNForImageClassification, MSNModel
from .recipe import check_known_keys, config_fields
from .sources import check_model_source

logger = logging.get_logger(__name__)

# Stock timm ViTs: (embed_dim, depth, num_heads, patch_size). The original release used S/16, B/16, L/16 and B/4,
# L/7 (base and large with another patch size); checkpoints hold no head count, so it comes from this table.
TIMM_VITS = {
    "vit_tiny_patch16_224": (192, 12, 3, 16),
    "vit_small_patch16_224": (384, 12, 6, 16),
    "vit_base_patch16_224": (768, 12, 12, 16),
    "vit_large_patch16_224": (1024, 24, 16, 16),
    "vit_huge_patch14_224": (1280, 32, 16, 14),
}
_ARCHITECTURE_FIELDS = ("embed_dim", "depth", "num_heads", "patch_size")
_HEADS_BY_WIDTH = {dims[0]: dims[2] for dims in TIMM_VITS.values()}
_DEFAULT_HEAD_DIM = 64
# The original pretrains 224 px views with 96 px focal views; other sizes keep that ratio.
_FOCAL_RATIO = 96 / 224
# The original evaluates on a 224 px centre crop of images resized to 256 px; other sizes keep that ratio.
_RESIZE_RATIO = 256 / 224
# Tolerance of the numerical self-check run after each cross-library conversion (float32, one random image).
_VERIFY_TOLERANCE = 1e-3
# The LayerNorm epsilon of every timm ViT block and final norm (not configurable through `backbone_kwargs`).
_TIMM_LAYER_NORM_EPS = 1e-6

# timm ViT names <-> Transformers ViTMSN checkpoint names ("{i}" is a block index). Names ending with a dot are
# prefixes (weight and bias follow). The fused qkv projection is handled apart: it maps onto three tensors.
_VIT_MSN_RENAMES = (
    ("cls_token", "embeddings.cls_token"),
    ("pos_embed", "embeddings.position_embeddings"),
    ("patch_embed.proj.", "embeddings.patch_embeddings.projection."),
    ("blocks.{i}.norm1.", "encoder.layer.{i}.layernorm_before."),
    ("blocks.{i}.attn.proj.", "encoder.layer.{i}.attention.output.dense."),
    ("blocks.{i}.norm2.", "encoder.layer.{i}.layernorm_after."),
    ("blocks.{i}.mlp.fc1.", "encoder.layer.{i}.intermediate.dense."),
    ("blocks.{i}.mlp.fc2.", "encoder.layer.{i}.output.dense."),
    ("norm.", "layernorm."),
)
_TIMM_QKV = re.compile(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$")
_VIT_MSN_QKV = re.compile(r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$")
_QKV_PARTS = ("query", "key", "value")
# The first bytes of what `torch.save` writes: a zip archive (the default since PyTorch 1.6), or a pickle of protocol
# 2 or more (`_use_new_zipfile_serialization=False`, older releases such as the authors').
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOL = b"\x80"
_SNIFFED_BYTES = 512
# The part of torch's weights-only error that names the class a checkpoint would need to import.
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


# --------------------------------------------------------------------------------------------------------------
# Architecture description shared by every direction
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ViTArchitecture:
    """The numbers that define a plain pre-norm ViT with a class token, whatever library holds its weights."""

    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    image_size: int
    mlp_hidden_size: int
    qkv_bias: bool = True
    in_chans: int = 3

    def __post_init__(self):
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}.")
        if self.image_size % self.patch_size:
            raise ValueError(f"image size {self.image_size} is not a multiple of the patch size {self.patch_size}.")

    @property
    def mlp_ratio(self) -> float:
        ratio = self.mlp_hidden_size / self.embed_dim
        # timm builds the MLP with int(embed_dim * mlp_ratio) units: refuse widths that do not survive the round trip.
        if int(self.embed_dim * ratio) != self.mlp_hidden_size:
            raise ValueError(f"timm cannot express an MLP of {self.mlp_hidden_size} units on width {self.embed_dim}.")
        return ratio


def default_num_heads(embed_dim: int) -> int:
    """Attention heads of the stock ViT of this width, or 64-dimensional heads for other widths."""
    if embed_dim in _HEADS_BY_WIDTH:
        return _HEADS_BY_WIDTH[embed_dim]
    if embed_dim % _DEFAULT_HEAD_DIM:
        raise ValueError(
            f"Cannot infer the number of attention heads of a {embed_dim}-wide ViT (the weights do not record it): "
            "pass `num_heads`."
        )
    # A wrong guess still loads (the weights have the same shapes) but computes something else: say so.
    logger.warning(
        f"No stock ViT is {embed_dim} wide: assuming {_DEFAULT_HEAD_DIM}-dimensional attention heads "
        f"({embed_dim // _DEFAULT_HEAD_DIM} heads). Pass `num_heads` if the model was trained with another count."
    )
    return embed_dim // _DEFAULT_HEAD_DIM


def _square(value, what: str) -> int:
    """An int from an int or a square (h, w) pair; ViTMSN and the msn_hf config only describe square sizes."""
    if isinstance(value, int):
        return value
    height, width = value
    if height != width:
        raise ValueError(f"Only square {what}s are supported, got {tuple(value)}.")
    return int(height)


def architecture_from_timm_state_dict(state_dict: dict, num_heads: int | None = None) -> ViTArchitecture:
    """
    Read a ViT's architecture off the shapes of its timm-named state dict (no `module.` prefix).

    Width from `cls_token`, depth from the block indices, patch size from `patch_embed.proj.weight`, image size from
    the `pos_embed` grid, MLP width from `blocks.0.mlp.fc1`. The head count is not in the weights: `num_heads`, else
    the stock ViT of that width, else 64-dimensional heads.
    """
    required = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight")
    missing = [key for key in required if key not in state_dict]
    if missing:
        raise ValueError(f"Not a ViT state dict with a class token: missing {missing}.")
    embed_dim = state_dict["cls_token"].shape[-1]
    out_channels, in_chans, patch_h, patch_w = state_dict["patch_embed.proj.weight"].shape
    patch_size = _square((patch_h, patch_w), "patch")
    num_patches = state_dict["pos_embed"].shape[1] - 1  # the class token has its own position
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches:
        raise ValueError(f"`pos_embed` holds {num_patches} patch positions: not a square grid.")
    depth = 1 + max(int(match.group(1)) for key in state_dict if (match := re.match(r"^blocks\.(\d+)\.", key)))
    return ViTArchitecture(
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads or default_num_heads(embed_dim),
        patch_size=patch_size,
        image_size=grid * patch_size,
        mlp_hidden_size=state_dict["blocks.0.mlp.fc1.weight"].shape[0],
        qkv_bias="blocks.0.attn.qkv.bias" in state_dict,
        in_chans=in_chans,
    )


def nearest_timm_backbone(architecture: ViTArchitecture) -> tuple[str, dict]:
    """
    The stock timm ViT name sharing most of (width, depth, heads, patch) with `architecture`, and the
    `timm.create_model` kwargs that turn it into exactly `architecture` (image size excluded: it is `image_size`
    in `MSNConfig`). ViT-B/4 becomes `("vit_base_patch16_224", {"patch_size": 4})`.
    """
    wanted = tuple(getattr(architecture, field) for field in _ARCHITECTURE_FIELDS)
    # max() keeps the first of equally good names, so ties go to the smaller model of the table.
    name = max(TIMM_VITS, key=lambda name: sum(a == b for a, b in zip(TIMM_VITS[name], wanted)))
    kwargs = {field: value for field, stock, value in zip(_ARCHITECTURE_FIELDS, TIMM_VITS[name], wanted) if stock != value}
    if architecture.mlp_ratio != 4.0:
        kwargs["mlp_ratio"] = architecture.mlp_ratio
    if not architecture.qkv_bias:
        kwargs["qkv_bias"] = False
    if architecture.in_chans != 3:
        kwargs["in_chans"] = architecture.in_chans
    return name, kwargs


def msn_config_for(architecture: ViTArchitecture, backbone_kwargs: dict | None = None, **config_kwargs) -> MSNConfig:
    """An `MSNConfig` whose backbone is `architecture` (plus `backbone_kwargs` overrides) and other fields `config_kwargs`."""
    backbone, kwargs = nearest_timm_backbone(architecture)
    kwargs.update(backbone_kwargs or {})
    patch = architecture.patch_size
    focal_image_size = max(patch, round(architecture.image_size * _FOCAL_RATIO / patch) * patch)
    values = dict(
        backbone=backbone, backbone_kwargs=kwargs, image_size=architecture.image_size, focal_image_size=focal_image_size
    )
    values.update(config_kwargs)
    return MSNConfig(**values)


def _architecture_of_vit_config(config: ViTConfig | ViTMSNConfig) -> ViTArchitecture:
    """
    The architecture of a Transformers ViT or ViTMSN config (same fields, same blocks), refusing the options a timm
    ViT block cannot reproduce.
    """
    name = type(config).__name__.removesuffix("Config")
    if config.hidden_act != "gelu":
        raise ValueError(
            f"{name} `hidden_act={config.hidden_act!r}` has no timm ViT counterpart (timm uses exact GELU)."
        )
    eps = config.layer_norm_eps
    if eps > _TIMM_LAYER_NORM_EPS and not math.isclose(eps, _TIMM_LAYER_NORM_EPS):
        raise ValueError(
            f"{name} `layer_norm_eps={eps}` is larger than timm's {_TIMM_LAYER_NORM_EPS}: the features would change."
        )
    if not math.isclose(eps, _TIMM_LAYER_NORM_EPS):
        # Transformers ViTs (google/vit-*) use 1e-12. The epsilon only matters for tokens whose variance over the
        # channels is near it; a trained ViT's activations have variances many orders above 1e-6, so timm's 1e-6
        # changes the features by about eps / (2 * variance), far below float32 training noise.
        logger.info(f"{name} `layer_norm_eps={eps}` becomes timm's {_TIMM_LAYER_NORM_EPS} (a negligible change).")
    dropouts = {name: getattr(config, name, 0.0) for name in ("hidden_dropout_prob", "attention_probs_dropout_prob")}
    if any(dropouts.values()):
        # Dropout changes nothing at inference; in training, MSN's recipe has none (timm's default).
        logger.warning(
            f"{name} dropout {dropouts} is not carried over: the MSN encoders train without dropout unless "
            "`backbone_kwargs` set timm's `proj_drop_rate` / `attn_drop_rate`."
        )
    if config.num_channels != 3:
        raise ValueError(
            f"{name} `num_channels={config.num_channels}`: MSN models take RGB images (3 channels), as their image "
            "processor gives every image, grey ones included."
        )
    if getattr(config, "head_dim", None) not in (None, config.hidden_size // config.num_attention_heads):
        raise ValueError(f"{name} `head_dim={config.head_dim}` is not hidden_size / num_attention_heads.")
    return ViTArchitecture(
        embed_dim=config.hidden_size,
        depth=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        patch_size=_square(config.patch_size, "patch"),
        image_size=_square(config.image_size, "image"),
        mlp_hidden_size=config.intermediate_size,
        qkv_bias=config.qkv_bias,
        in_chans=config.num_channels,
    )


def _vit_msn_config_for(architecture: ViTArchitecture, layer_norm_eps: float) -> ViTMSNConfig:
    config = ViTMSNConfig(
        hidden_size=architecture.embed_dim,
        num_hidden_layers=architecture.depth,
        num_attention_heads=architecture.num_heads,
        intermediate_size=architecture.mlp_hidden_size,
        image_size=architecture.image_size,
        patch_size=architecture.patch_size,
        num_channels=architecture.in_chans,
        qkv_bias=architecture.qkv_bias,
        layer_norm_eps=layer_norm_eps,
        hidden_act="gelu",
    )
    config.architectures = ["ViTMSNModel"]
    return config


def vit_msn_unsupported_features(encoder: timm.models.VisionTransformer) -> list[str]:
    """
    What in a timm ViT a Transformers ViTMSN cannot reproduce (an empty list when the conversion is exact).

    ViTMSN is a pre-norm ViT with one class token, learned absolute positions that include the class token, plain
    multi-head attention (no q/k norm, no layer scale), an exact-GELU MLP, LayerNorm everywhere with one epsilon and a
    final LayerNorm.
    """
    problems = []
    if getattr(encoder, "cls_token", None) is None:
        problems.append("no class token")
    elif getattr(encoder, "reg_token", None) is not None:
        problems.append(f"register tokens (reg_tokens={encoder.reg_token.shape[1]})")
    elif encoder.num_prefix_tokens != 1:
        problems.append(f"{encoder.num_prefix_tokens} prefix tokens")
    if getattr(encoder, "pos_embed", None) is None:
        problems.append("no learned absolute position embedding")
    if getattr(encoder, "no_embed_class", False):
        problems.append("position embedding without the class token (no_embed_class=True)")
    for name in ("norm_pre", "fc_norm"):
        if not isinstance(getattr(encoder, name, nn.Identity()), nn.Identity):
            problems.append(f"`{name}` LayerNorm (pre_norm / fc_norm)")
    if getattr(encoder, "attn_pool", None) is not None:
        problems.append("attention pooling")
    if not isinstance(encoder.norm, nn.LayerNorm):
        problems.append(f"final norm {type(encoder.norm).__name__} (final_norm=False or not a LayerNorm)")
    patch_embed = encoder.patch_embed
    if type(patch_embed) is not PatchEmbed or not isinstance(patch_embed.norm, nn.Identity):
        problems.append(f"patch embedding {type(patch_embed).__name__} with norm {type(patch_embed.norm).__name__}")
    elif patch_embed.proj.bias is None or patch_embed.proj.kernel_size != patch_embed.proj.stride:
        problems.append("patch projection without bias or with overlapping patches")
    for index, block in enumerate(encoder.blocks):
        problems.extend(f"block {index}: {problem}" for problem in _block_unsupported_features(block))
    return problems


def _block_unsupported_features(block: nn.Module) -> list[str]:
    if type(block) is not Block:
        return [f"{type(block).__name__} (only timm's pre-norm `Block` is supported)"]
    problems = []
    attn, mlp = block.attn, block.mlp
    if type(attn) is not Attention:
        problems.append(f"attention {type(attn).__name__}")
    else:
        if not all(isinstance(module, nn.Identity) for module in (attn.q_norm, attn.k_norm, attn.norm)):
            problems.append("normalisation inside attention (qk_norm / scale_attn_norm)")
        if getattr(attn, "gate", None) is not None:
            problems.append("gated attention")
        if attn.proj.bias is None:
            problems.append("attention projection without bias (proj_bias=False)")
    if not (isinstance(block.ls1, nn.Identity) and isinstance(block.ls2, nn.Identity)):
        problems.append("layer scale (init_values)")
    if type(mlp) is not Mlp or not isinstance(mlp.norm, nn.Identity) or mlp.fc1.bias is None:
        problems.append(f"MLP {type(mlp).__name__} (only timm's biased Mlp without inner norm is supported)")
    elif not (type(mlp.act) is nn.GELU and mlp.act.approximate == "none"):
        problems.append(f"activation {mlp.act} (ViTMSN uses exact GELU)")
    if not (isinstance(block.norm1, nn.LayerNorm) and isinstance(block.norm2, nn.LayerNorm)):
        problems.append(f"norm {type(block.norm1).__name__} (ViTMSN uses LayerNorm)")
    return problems


def _layer_norm_eps(encoder: nn.Module) -> float:
    """The one LayerNorm epsilon of the encoder (ViTMSN has a single `layer_norm_eps`)."""
    eps = {module.eps for module in encoder.modules() if isinstance(module, nn.LayerNorm)}
    if len(eps) != 1:
        raise ValueError(f"ViTMSN needs a single LayerNorm epsilon, the encoder uses {sorted(eps)}.")
    return eps.pop()


# --------------------------------------------------------------------------------------------------------------
# State dict conversions
# --------------------------------------------------------------------------------------------------------------


def _rename_patterns(reverse: bool) -> list[tuple[re.Pattern, str]]:
    """Regexes from one naming to the other: `{i}` captures a block index, a trailing dot keeps the suffix."""
    patterns = []
    for timm_name, hf_name in _VIT_MSN_RENAMES:
        source, target = (hf_name, timm_name) if reverse else (timm_name, hf_name)
        regex = re.escape(source).replace(re.escape("{i}"), r"(?P<i>\d+)")
        regex = f"^{regex}(?P<rest>.*)$" if source.endswith(".") else f"^{regex}$"
        patterns.append((re.compile(regex), target))
    return patterns


def _rename(key: str, patterns: list[tuple[re.Pattern, str]]) -> str | None:
    for regex, target in patterns:
        match = regex.match(key)
        if match:
            groups = match.groupdict()
            return target.replace("{i}", groups.get("i") or "") + (groups.get("rest") or "")
    return None


def convert_timm_to_vit_msn_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """
    timm ViT weights -> Transformers ViTMSN checkpoint weights. The fused `qkv` splits into `query` (first D rows),
    `key` and `value`. Raises a `ValueError` listing the timm parameters ViTMSN has no place for.
    """
    patterns = _rename_patterns(reverse=False)
    converted, unmapped = {}, []
    for key, tensor in state_dict.items():
        qkv = _TIMM_QKV.match(key)
        if qkv:
            block, kind = qkv.groups()
            for part, chunk in zip(_QKV_PARTS, tensor.chunk(3, dim=0)):
                converted[f"encoder.layer.{block}.attention.attention.{part}.{kind}"] = chunk.clone()
            continue
        new_key = _rename(key, patterns)
        if new_key is None:
            unmapped.append(key)
        else:
            converted[new_key] = tensor.clone()
    if unmapped:
        raise ValueError(f"ViTMSN has no parameter for these timm weights: {unmapped}.")
    return converted


def convert_vit_msn_to_timm_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """
    Transformers ViTMSN checkpoint weights -> timm ViT weights, `query`/`key`/`value` fused into `qkv`.

    Keys it does not know (and incomplete q/k/v triples) are kept under their own name, so that a strict load
    reports them as unexpected instead of silently dropping them.
    """
    state_dict = {key.removeprefix("vit."): tensor for key, tensor in state_dict.items()}
    patterns = _rename_patterns(reverse=True)
    converted, qkv_parts = {}, {}
    for key, tensor in state_dict.items():
        qkv = _VIT_MSN_QKV.match(key)
        if qkv:
            block, part, kind = qkv.groups()
            qkv_parts.setdefault((block, kind), {})[part] = (key, tensor)
            continue
        converted[_rename(key, patterns) or key] = tensor.clone()
    for (block, kind), parts in qkv_parts.items():
        if set(parts) == set(_QKV_PARTS):
            converted[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat([parts[part][1] for part in _QKV_PARTS])
        else:
            converted.update(dict(parts.values()))
    return converted


def _strip_prefix(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key.removeprefix(prefix): tensor for key, tensor in state_dict.items()}


def check_state_dict(module: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Raise a `ValueError` listing every missing key, unexpected key and shape mismatch of `state_dict` for `module`."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{key}: {tuple(state_dict[key].shape)} in the source, {tuple(expected[key].shape)} expected"
        for key in sorted(set(expected) & set(state_dict))
        if state_dict[key].shape != expected[key].shape
    ]
    if missing or unexpected or mismatched:
        lines = [f"{source} does not match the {type(module).__name__} it should fill:"]
        for title, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", mismatched)):
            if keys:
                lines.append(f"  {title} ({len(keys)}): " + ", ".join(keys))
        raise ValueError("\n".join(lines))


def _load_exactly(module: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    check_state_dict(module, state_dict, source)
    module.load_state_dict(state_dict, strict=True)


# --------------------------------------------------------------------------------------------------------------
# Reading sources
# --------------------------------------------------------------------------------------------------------------


def _read_config_dict(model_dir: Path, model_type: str, hint: str) -> dict:
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json.")
    config = json.loads(config_file.read_text())
    if config.get("model_type") != model_type:
        raise ValueError(
            f"{model_dir} holds a {config.get('model_type')!r} model, not {model_type!r}. {hint}".rstrip()
        )
    return config


def read_weights(model_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a Transformers-style folder: `model.safetensors`, its sharded form, or `pytorch_model.bin`."""
    model_dir = Path(model_dir)
    single, index = model_dir / "model.safetensors", model_dir / "model.safetensors.index.json"
    if single.is_file():
        return safetensors.torch.load_file(single)
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {key: tensor for shard in shards for key, tensor in safetensors.torch.load_file(model_dir / shard).items()}
    if (model_dir / "pytorch_model.bin").is_file():
        return load_tensor_file(model_dir / "pytorch_model.bin")
    raise FileNotFoundError(f"{model_dir} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin.")


def load_tensor_file(
    path: str | os.PathLike, *, argument: str | None = None, expected: str = "a PyTorch checkpoint (torch.save)"
) -> dict:
    """
    `torch.load` restricted to tensors and plain containers: a checkpoint that needs unpickling code is refused.

    A file that is not a checkpoint (a truncated download, a saved HTML error page, text) is refused by its first
    bytes or by the failed load, in one line: `argument` (the path itself when None) must be `expected`, and what the
    file is instead. Raises `FileNotFoundError` for a missing file and `ValueError` otherwise.
    """
    path = Path(path)
    # "`checkpoint_path` (--checkpoint) must be ...; /x.pth.tar is an HTML page" or "/x.bin must be ...; it is ...".
    subject = f"{argument} must be {expected}; {path}" if argument else f"{path} must be {expected}; it"
    if not path.is_file():
        raise FileNotFoundError(f"{argument or path} must be {expected}; no such file: {path}.")
    kind = _serialization_kind(path)
    if kind not in ("zip", "pickle"):
        raise ValueError(f"{subject} is {kind}.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's long multi-line advice (load with weights_only=False) is left out; the class it needs is named.
        needs = _UNSUPPORTED_GLOBAL.search(str(error))
        named = f" ({needs.group(1)})" if needs else ""
        raise ValueError(
            f"{subject} holds objects other than tensors and plain containers{named}; it is not loaded, since "
            "unpickling them could run arbitrary code."
        ) from error
    except (RuntimeError, EOFError, KeyError, ValueError) as error:
        # torch's readers fail with these on a cut or corrupted file; the details stay in the chained traceback.
        raise ValueError(f"{subject} is a truncated or damaged {kind} checkpoint (a cut download?).") from error


def _serialization_kind(path: Path) -> str:
    """
    "zip" or "pickle" for the two formats `torch.save` writes (by their first bytes), else a description of what
    the file is, for an error message ("an HTML page, not a zip/pickle checkpoint", "an empty file", ...).
    """
    with open(path, "rb") as file:
        head = file.read(_SNIFFED_BYTES)
    if head.startswith(_ZIP_MAGIC):
        return "zip"
    if head.startswith(_PICKLE_PROTOCOL):
        return "pickle"
    if not head:
        return "an empty file"
    if head[8:10] == b'{"':  # safetensors: the header's length in 8 bytes, then its JSON
        return (
            "a safetensors file, not the authors' zip/pickle checkpoint (a saved model's weights: pass its folder to "
            "from-vit-msn, or timm weights to msn-pretrain --backbone_pretrained)"
        )
    if head.lstrip().startswith(b"<"):  # what a server sends instead of the file: an HTML (or XML) error page
        return "an HTML page (an error page saved by a failed download?), not a zip/pickle checkpoint"
    try:
        first_line = head.decode("utf-8").strip().splitlines()[0][:40]
    except (UnicodeDecodeError, IndexError):
        return f"not a zip/pickle checkpoint: it starts with the bytes {head[:8]!r}"
    return f"not a zip/pickle checkpoint: a text file starting with {first_line!r}"


def is_classifier_weights(weights: dict[str, torch.Tensor]) -> bool:
    """Whether msn_hf weights are those of an `MSNForImageClassification` (`vit.*`) rather than an `MSNModel`."""
    return any(key.startswith("vit.") for key in weights) and not any(key.startswith("target_encoder.") for key in weights)


def load_msn_model(model_dir: str | os.PathLike) -> MSNModel:
    """An msn_hf `MSNModel` folder, loaded strictly: any missing, unexpected or mis-shaped weight is an error."""
    model_dir = Path(model_dir)
    _read_config_dict(model_dir, MSNConfig.model_type, "Use `from-vit-msn` for ViTMSN folders.")
    weights = read_weights(model_dir)
    if is_classifier_weights(weights):
        raise ValueError(
            f"{model_dir} is a fine-tuned MSNForImageClassification folder (an encoder `vit` and a `classifier`), not "
            "an MSNModel pretraining folder (anchor and target encoders, heads, prototypes). `to-vit-msn` exports "
            "classifier folders; this conversion needs the pretraining folder the classifier was fine-tuned from."
        )
    model = MSNModel(MSNConfig.from_pretrained(model_dir))
    _load_exactly(model, weights, f"The weights of {model_dir}")
    model.freeze_target()
    return model.eval()


def load_msn_classifier(model_dir: Path, weights: dict[str, torch.Tensor]) -> MSNForImageClassification:
    """An msn_hf `MSNForImageClassification` folder, loaded strictly."""
    model = MSNForImageClassification(MSNConfig.from_pretrained(model_dir))
    _load_exactly(model, weights, f"The weights of {model_dir}")
    return model.eval()


def _processor_view_sizes(config: MSNConfig) -> dict:
    """
    The view sizes of an `MSNImageProcessor` for `config`, as every conversion writes them: the shorter side resized
    in the authors' 256 / 224 ratio, then centre crops of `image_size` (target and random anchor views) and
    `focal_image_size` (focal views).
    """
    return dict(
        size={"shortest_edge": round(config.image_size * _RESIZE_RATIO)},
        crop_size=config.image_size,
        focal_crop_size=config.focal_image_size,
    )


def evaluation_processor_settings(model_dir: Path, config: MSNConfig) -> dict:
    """
    The evaluation preprocessing of an msn_hf folder, from its saved `MSNImageProcessor` (or the defaults it would
    have for `config`): resize the shorter side, centre crop, rescale, normalise.
    """
    if (model_dir / "preprocessor_config.json").is_file():
        processor = MSNImageProcessor.from_pretrained(model_dir)
    else:
        processor = MSNImageProcessor(**_processor_view_sizes(config))
    return dict(
        do_resize=processor.do_resize,
        size={key: value for key, value in vars(processor.size).items() if value is not None},
        resample=PILImageResampling(processor.resample),
        do_center_crop=processor.do_center_crop,
        crop_size={key: value for key, value in vars(processor.crop_size).items() if value is not None},
        do_rescale=processor.do_rescale,
        rescale_factor=processor.rescale_factor,
        do_normalize=processor.do_normalize,
        image_mean=list(processor.image_mean),
        image_std=list(processor.image_std),
    )


# --------------------------------------------------------------------------------------------------------------
# Writing outputs
# --------------------------------------------------------------------------------------------------------------


def _check_same_features(
    reference: Callable[[torch.Tensor], torch.Tensor],
    converted: Callable[[torch.Tensor], torch.Tensor],
    architecture: ViTArchitecture,
    what: str,
) -> None:
    """Compare two float32 encoders on a random image at their native size; a mismatch means a conversion bug."""
    size = architecture.image_size
    pixels = torch.randn(1, architecture.in_chans, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, actual = reference(pixels).float(), converted(pixels).float()
    if expected.shape != actual.shape or not torch.allclose(expected, actual, atol=_VERIFY_TOLERANCE, rtol=_VERIFY_TOLERANCE):
        difference = (expected - actual).abs().max().item() if expected.shape == actual.shape else "shape mismatch"
        raise RuntimeError(f"{what}: the converted encoder does not reproduce the source (max difference {difference}).")


def _msn_target_features(model: MSNModel) -> Callable[[torch.Tensor], torch.Tensor]:
    model = model.float().eval()
    return lambda pixels: model(pixel_values=pixels).last_hidden_state


# --------------------------------------------------------------------------------------------------------------
# Public conversions
# --------------------------------------------------------------------------------------------------------------


def _check_output_apart_from_source(output_dir: str | os.PathLike, source: str | os.PathLike, argument: str) -> None:
    """
    Refuse an output folder that is the source (`argument` names it), holds it or lies inside it: with `overwrite`
    the output folder is replaced whole, so the source would be lost or changed.
    """
    where = folder_relation(output_dir, source)
    if where is not None:
        raise ValueError(
            f"`output_dir` (--output) must be a folder apart from the source, got {output_dir}, which {where} "
            f"{argument} {Path(source).expanduser().resolve()}: writing it would replace the source."
        )


def to_vit_msn(
    model_dir: str | os.PathLike, output_dir: str | os.PathLike, overwrite: bool = False, verify: bool = True
) -> Path:
    """
    Export an msn_hf folder as a Transformers ViTMSN folder (config.json, model.safetensors, preprocessor_config.json)
    that loads with `from_pretrained` and the Auto classes without remote code:

    - an `MSNModel` (pretraining) folder: its target encoder as a `ViTMSNModel`;
    - an `MSNForImageClassification` (fine-tuned) folder: encoder and classifier as a
      `ViTMSNForImageClassification` with the same labels, whose logits equal the source's.

    The image processor reproduces the folder's evaluation preprocessing (resize the shorter side, centre crop, same
    filter and normalisation). Raises a `ValueError` naming what ViTMSN cannot express.
    """
    model_dir, output_dir = Path(model_dir), Path(output_dir)
    _check_output_apart_from_source(output_dir, model_dir, "`model_dir` (--model)")
    check_output_dir(output_dir, overwrite)
    _read_config_dict(model_dir, MSNConfig.model_type, "Use `from-vit-msn` for ViTMSN folders.")
    weights = read_weights(model_dir)
    classifier = load_msn_classifier(model_dir, weights) if is_classifier_weights(weights) else None
    model = classifier if classifier is not None else load_msn_model(model_dir)
    encoder = classifier.vit if classifier is not None else model.target_encoder
    problems = vit_msn_unsupported_features(encoder)
    if classifier is not None and model.config.classifier_pooling != "cls":
        problems.append(f"classifier_pooling={model.config.classifier_pooling!r} (ViTMSN classifies the class token)")
    if problems:
        raise ValueError(f"ViTMSN cannot express the model of {model_dir}: " + "; ".join(problems) + ".")
    architecture = architecture_from_timm_state_dict(encoder.state_dict(), num_heads=encoder.blocks[0].attn.num_heads)
    vit_config = _vit_msn_config_for(architecture, _layer_norm_eps(encoder))
    vit_config.dtype = str(encoder.cls_token.dtype).removeprefix("torch.")
    exported_weights = convert_timm_to_vit_msn_state_dict(encoder.state_dict())
    if classifier is not None:
        vit_config.architectures = ["ViTMSNForImageClassification"]
        for name in ("id2label", "label2id", "problem_type"):
            setattr(vit_config, name, getattr(model.config, name))
        exported_weights = {f"vit.{key}": tensor for key, tensor in exported_weights.items()}
        exported_weights.update({f"classifier.{k}": v.clone() for k, v in classifier.classifier.state_dict().items()})
    processor = ViTImageProcessor(**evaluation_processor_settings(model_dir, model.config))
    with atomic_folder(output_dir, overwrite) as staging:
        vit_config.save_pretrained(staging)
        safetensors.torch.save_file(exported_weights, staging / "model.safetensors", metadata={"format": "pt"})
        processor.save_pretrained(staging)
        if verify:
            if classifier is not None:
                exported = _load_vit_msn_exactly(staging, ViTMSNForImageClassification)
                reference, converted = _logits(classifier), _logits(exported)
            else:
                reference, converted = _msn_target_features(model), _vit_msn_features(_load_vit_msn_exactly(staging))
            _check_same_features(reference, converted, architecture, "to-vit-msn")
    kind = "fine-tuned classifier" if classifier is not None else "target encoder"
    logger.info(f"Wrote the {kind} of {model_dir} as a {vit_config.architectures[0]} to {output_dir}.")
    return output_dir


def _logits(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    model = model.float().eval()
    return lambda pixels: model(pixel_values=pixels).logits


def _load_vit_msn_exactly(model_dir: Path, model_class: type = ViTMSNModel) -> ViTMSNModel:
    """`from_pretrained`, failing (instead of re-initialising) on any missing or unexpected weight."""
    model, info = model_class.from_pretrained(model_dir, output_loading_info=True, dtype=torch.float32)
    problems = {name: keys for name, keys in info.items() if name != "error_msgs" and keys}
    if problems:
        raise ValueError(f"ViTMSNModel does not load {model_dir} exactly: {problems}.")
    return model.eval()


def _vit_msn_features(model: ViTMSNModel) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda pixels: model(pixel_values=pixels).last_hidden_state


def timm_hub_config(config: MSNConfig, num_features: int, preprocessing: dict | None = None) -> dict:
    """
    The `config.json` of a timm Hub checkpoint for the backbone of `config` (architecture, args, preprocessing).
    `preprocessing` is [`evaluation_processor_settings`]; by default that of an msn_hf folder without a processor.
    """
    model_args = {key: value for key, value in config.timm_kwargs().items() if key not in ("pretrained", "num_classes")}
    size = config.image_size
    if preprocessing is None:
        preprocessing = dict(
            resample=PILImageResampling.BILINEAR, size={"shortest_edge": round(size * _RESIZE_RATIO)},
            crop_size={"height": size, "width": size}, image_mean=list(IMAGENET_DEFAULT_MEAN),
            image_std=list(IMAGENET_DEFAULT_STD),
        )  # fmt: skip
    crop = preprocessing["crop_size"]["height"]
    return {
        "architecture": config.backbone,
        "num_classes": 0,
        "num_features": num_features,
        "global_pool": model_args.get("global_pool", "token"),
        "model_args": model_args,
        "pretrained_cfg": {
            "input_size": [model_args.get("in_chans", 3), size, size],
            "fixed_input_size": False,
            # The folder's evaluation preprocessing: resize the shorter side (e.g. 256), centre crop (e.g. 224).
            "interpolation": PILImageResampling(preprocessing["resample"]).name.lower(),
            "crop_pct": crop / (preprocessing["size"].get("shortest_edge") or preprocessing["size"]["height"]),
            "crop_mode": "center",
            "mean": list(preprocessing["image_mean"]),
            "std": list(preprocessing["image_std"]),
            "num_classes": 0,
            "pool_size": None,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
    }


def to_timm(
    model_dir: str | os.PathLike, output_dir: str | os.PathLike, overwrite: bool = False, verify: bool = True
) -> Path:
    """
    Export the target encoder of an msn_hf `MSNModel` folder as a timm checkpoint: `model.safetensors` (plain timm
    keys) and a timm Hub-style `config.json`. Load it with `timm.create_model(f"local-dir:{output_dir}",
    pretrained=True)` or `timm.create_model(architecture, pretrained=True, num_classes=0, **model_args,
    pretrained_cfg_overlay=dict(file=".../model.safetensors"))`.
    """
    output_dir = Path(output_dir)
    _check_output_apart_from_source(output_dir, model_dir, "`model_dir` (--model)")
    check_output_dir(output_dir, overwrite)
    model = load_msn_model(model_dir)
    weights = {key: tensor.clone() for key, tensor in model.target_encoder.state_dict().items()}
    preprocessing = evaluation_processor_settings(Path(model_dir), model.config)
    hub_config = timm_hub_config(model.config, model.target_encoder.num_features, preprocessing)
    with atomic_folder(output_dir, overwrite) as staging:
        safetensors.torch.save_file(weights, staging / "model.safetensors", metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(hub_config, indent=2) + "\n")
        if verify:
            exported = load_timm_export(staging).float().eval()
            architecture = architecture_from_timm_state_dict(weights, num_heads=exported.blocks[0].attn.num_heads)
            _check_same_features(_msn_target_features(model), exported.forward_features, architecture, "to-timm")
    logger.info(f"Wrote the target encoder of {model_dir} as a timm {model.config.backbone} to {output_dir}.")
    return output_dir


def load_timm_export(export_dir: str | os.PathLike) -> timm.models.VisionTransformer:
    """The timm model of a `to_timm` folder, built from its `config.json` and loaded from its `model.safetensors`."""
    export_dir = Path(export_dir)
    hub_config = json.loads((export_dir / "config.json").read_text())
    return timm.create_model(
        hub_config["architecture"],
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(export_dir / "model.safetensors")),
        num_classes=hub_config["num_classes"],
        **hub_config["model_args"],
    )


# What `from_original` reads, as its error messages describe it.
_ORIGINAL_CHECKPOINT = (
    "a PyTorch checkpoint of the authors' MSN code (a dict with encoder, target_encoder, prototypes)"
)


def _original_msn_state_dict(checkpoint: dict) -> dict[str, torch.Tensor]:
    """
    The `MSNModel` state dict of an original checkpoint: `encoder` / `target_encoder` (DistributedDataParallel
    `module.` prefix removed) split into the ViT and its `fc.*` projection head, plus the prototypes.
    """
    state = {"prototypes": checkpoint["prototypes"]}
    for entry, encoder_name, head_name in (
        ("encoder", "encoder", "projection_head"),
        ("target_encoder", "target_encoder", "target_projection_head"),
    ):
        for key, tensor in _strip_prefix(checkpoint[entry], "module.").items():
            is_head = key.startswith("fc.")
            state[f"{head_name}.{key[3:]}" if is_head else f"{encoder_name}.{key}"] = tensor
    return state


def from_original(
    checkpoint_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    num_heads: int | None = None,
    backbone_kwargs: dict | None = None,
    overwrite: bool = False,
    **config_kwargs,
) -> Path:
    """
    Convert a checkpoint of the authors' release (`.pth.tar` with `encoder`, `target_encoder`, `prototypes`) into a
    full msn_hf `MSNModel` folder: both encoders, both projection heads with their BatchNorm statistics, the
    prototypes, a config whose backbone is inferred from the weight shapes, and the `MSNImageProcessor` of its views
    (sized as by the other conversions, normalised as the authors did). `num_heads` is needed only for widths other
    than those of ViT-Ti/S/B/L/H; `backbone_kwargs` and `config_kwargs` override the inferred config.
    """
    output_dir = Path(output_dir)
    argument = "`checkpoint_path` (--checkpoint)"
    _check_output_apart_from_source(output_dir, checkpoint_path, argument)
    check_output_dir(output_dir, overwrite)
    checkpoint = load_tensor_file(checkpoint_path, argument=argument, expected=_ORIGINAL_CHECKPOINT)
    if not isinstance(checkpoint, dict):
        raise ValueError(
            f"{argument} must be {_ORIGINAL_CHECKPOINT}; {checkpoint_path} holds a {type(checkpoint).__name__}."
        )
    absent = [entry for entry in ("encoder", "target_encoder", "prototypes") if entry not in checkpoint]
    if absent:
        raise ValueError(f"{checkpoint_path} is not an MSN checkpoint: it lacks {absent} (has {sorted(checkpoint)}).")
    ignored = sorted(set(checkpoint) - {"encoder", "target_encoder", "prototypes", "temperature"})
    if ignored:
        logger.info(f"Ignoring the training state {ignored} of {checkpoint_path}.")
    state = _original_msn_state_dict(checkpoint)
    target = _strip_prefix({k: v for k, v in state.items() if k.startswith("target_encoder.")}, "target_encoder.")
    num_heads = num_heads or (backbone_kwargs or {}).get("num_heads")
    architecture = architecture_from_timm_state_dict(target, num_heads=num_heads)
    prototypes = checkpoint["prototypes"]
    if "target_projection_head.fc1.weight" not in state or prototypes.ndim != 2:
        raise ValueError(f"{checkpoint_path}: the target encoder has no `fc.fc1` head, or the prototypes are not 2-D.")
    head = dict(
        projection_hidden_size=state["target_projection_head.fc1.weight"].shape[0],
        projection_output_size=prototypes.shape[1],
        projection_batch_norm="target_projection_head.bn1.weight" in state,
        num_prototypes=prototypes.shape[0],
    )
    if isinstance(checkpoint.get("temperature"), (int, float)):
        head["temperature"] = float(checkpoint["temperature"])
    config = msn_config_for(architecture, backbone_kwargs, **{**head, **config_kwargs})
    model = MSNModel(config)
    source = f"{checkpoint_path} (keys under msn_hf names: encoder.* = checkpoint['encoder'] without `module.`)"
    _load_exactly(model, state, source)
    # The authors normalise with the ImageNet mean and std: the processor's defaults.
    processor = MSNImageProcessor(**_processor_view_sizes(config))
    with atomic_folder(output_dir, overwrite) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
    logger.info(f"Converted {checkpoint_path} ({config.backbone} {config.backbone_kwargs}) to {output_dir}.")
    return output_dir


def from_vit_msn(
    model_dir: str | os.PathLike, output_dir: str | os.PathLike, overwrite: bool = False, verify: bool = True, **config_kwargs
) -> Path:
    """
    Convert a Transformers `ViTMSNModel` folder (e.g. a local copy of facebook/vit-msn-small), or any other folder
    [`msn_model_from_vit`] reads (`ViTModel`, the image classifiers of both), into an msn_hf `MSNModel` folder: the
    ViT becomes both the anchor and the target encoder; the projection heads and prototypes are freshly initialised.
    `config_kwargs` set other `MSNConfig` fields (head sizes, mask ratio, ...). The folder also gets the
    `MSNImageProcessor` that normalises images as the source model expects.
    """
    output_dir = Path(output_dir)  # `model_dir` stays a string: it may be a Hub id
    _check_output_apart_from_source(output_dir, model_dir, "`model_dir` (--model)")
    check_output_dir(output_dir, overwrite)
    model, processor_kwargs = msn_model_from_vit(model_dir, verify=verify, **config_kwargs)
    with atomic_folder(output_dir, overwrite) as staging:
        model.save_pretrained(staging)
        MSNImageProcessor(**processor_kwargs).save_pretrained(staging)
    logger.info(f"Converted the ViT folder {model_dir} to an msn_hf folder {output_dir} (new head and prototypes).")
    return output_dir


# --------------------------------------------------------------------------------------------------------------
# Continuing pretraining from a saved model (`msn-pretrain --model_name_or_path`)
# --------------------------------------------------------------------------------------------------------------

# What `model_folder_kind` accepts: kind -> (config.json `model_type`, `architectures` entries). A config without
# `architectures` is read as the base model of its type.
MODEL_FOLDER_KINDS = {
    "msn": (MSNConfig.model_type, ("MSNModel",)),
    "msn_classifier": (MSNConfig.model_type, ("MSNForImageClassification",)),
    "vit_msn": (ViTMSNConfig.model_type, ("ViTMSNModel", "ViTMSNForImageClassification")),
    "vit": (ViTConfig.model_type, ("ViTModel", "ViTForImageClassification", "ViTForMaskedImageModeling")),
}
_TRANSFORMERS_VITS = {
    model_class.__name__: model_class
    for model_class in (
        ViTModel, ViTForImageClassification, ViTForMaskedImageModeling, ViTMSNModel, ViTMSNForImageClassification
    )
}
_VIT_BASE_MODELS = {"vit": "ViTModel", "vit_msn": "ViTMSNModel"}
# Weights of a Transformers ViT that are not part of the encoder MSN trains (after removing the `vit.` prefix of the
# task models): the pooler of `ViTModel`, the heads of the task models and the mask token of masked image modelling.
_VIT_HEAD_WEIGHTS = re.compile(r"^(pooler\.|classifier\.|decoder\.|embeddings\.mask_token$)")
# MSNConfig fields that cannot change when importing a ViT: the imported weights define them.
_IMPORT_FIXED_FIELDS = {"position_embedding": "learned", "backbone_pretrained": None}


def _read_hub_or_local_config(path_or_id: str | os.PathLike) -> dict:
    """The `config.json` of a local folder or, for anything that is not a folder here, of a Hub model id."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{path_or_id} has no config.json: not a saved model folder.")
    elif path.exists() or isinstance(path_or_id, os.PathLike) or str(path_or_id).startswith((".", "/", "~")):
        raise FileNotFoundError(
            f"{path_or_id} is not a model folder (expected a folder with config.json or a Hub model id)."
        )
    else:
        from huggingface_hub import hf_hub_download

        # Offline or unknown ids raise here; `msn-pretrain` checks the source (`check_model_source`) before.
        config_file = Path(hf_hub_download(repo_id=str(path_or_id), filename="config.json"))
    return json.loads(config_file.read_text())


def model_folder_kind(path_or_id: str | os.PathLike) -> str:
    """
    What a model folder or Hub id holds, from its `config.json` alone (no weights are read):

    - `"msn"`: an msn_hf `MSNModel` pretraining folder (`model_type` "msn", architectures `MSNModel` or none);
    - `"msn_classifier"`: a fine-tuned msn_hf `MSNForImageClassification` folder (see [`classifier_folder_error`]);
    - `"vit_msn"`: a Transformers `ViTMSNModel` or `ViTMSNForImageClassification`;
    - `"vit"`: a Transformers `ViTModel`, `ViTForImageClassification` or `ViTForMaskedImageModeling`.

    Raises a `ValueError` naming the folder, its `model_type` and `architectures`, and what is accepted.

    `msn-pretrain --model_name_or_path` dispatches on it (after checking that the folder or id exists):

    ```python
    kind = model_folder_kind(source)
    if kind == "msn_classifier":
        raise classifier_folder_error(source)
    if kind == "msn":  # continue an msn_hf run: everything, heads and prototypes included, comes from the folder
        model = MSNModel.from_pretrained(source, **config_overrides)
    else:  # "vit" / "vit_msn": the ViT starts both encoders, heads and prototypes are new
        model, processor_kwargs = msn_model_from_vit(source, **config_overrides)
        processor = MSNImageProcessor(**{**processor_kwargs, **processor_overrides})
    ```
    """
    return _kind_of_config(_read_hub_or_local_config(path_or_id), path_or_id)


def _kind_of_config(config: dict, path_or_id: str | os.PathLike) -> str:
    model_type, architectures = config.get("model_type"), config.get("architectures") or []
    for kind, (kind_type, kind_architectures) in MODEL_FOLDER_KINDS.items():
        if model_type != kind_type:
            continue
        # Several kinds share a model type ("msn"): a folder without architectures is the first, the base model.
        if not architectures or set(architectures) <= set(kind_architectures):
            return kind
    accepted = "; ".join(f"{kind_type} ({', '.join(names)})" for kind_type, names in _accepted_architectures().items())
    raise ValueError(
        f"{path_or_id} holds model_type={model_type!r} with architectures={architectures}; expected one of: {accepted}."
    )


def _accepted_architectures() -> dict[str, list[str]]:
    accepted = {}
    for kind_type, names in MODEL_FOLDER_KINDS.values():
        accepted.setdefault(kind_type, []).extend(names)
    return accepted


def classifier_folder_error(path: str | os.PathLike) -> ValueError:
    """
    The error for a fine-tuned `MSNForImageClassification` folder given where a pretraining folder (or a ViT to
    import) is needed, saying what to pass instead. Returned, not raised: `raise classifier_folder_error(path)`.
    """
    return ValueError(
        f"{path} is a fine-tuned MSNForImageClassification folder (encoder `vit` and a `classifier`), not an MSNModel "
        "pretraining folder: pass the MSNModel folder it was fine-tuned from, or, to continue pretraining from the "
        f"fine-tuned encoder, export it with `msn-convert to-vit-msn --model {path} --output DIR` and pass DIR."
    )


def _local_model_folder(path_or_id: str | os.PathLike) -> Path:
    """A local folder as is; a Hub id as its cached snapshot (configs and weights only)."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    repo_id = str(path_or_id)
    folder = Path(snapshot_download(repo_id=repo_id, allow_patterns=["*.json", "*.safetensors"]))
    if not any(folder.glob("*.safetensors")):  # older repositories only have the PyTorch pickle
        folder = Path(snapshot_download(repo_id=repo_id, allow_patterns=["*.json", "pytorch_model.bin"]))
    return folder


def vit_encoder_weights(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """
    The encoder weights of a Transformers ViT or ViTMSN checkpoint, under the names of a bare `ViTModel` /
    `ViTMSNModel` (`embeddings.*`, `encoder.layer.*`, `layernorm.*`): the `vit.` prefix of the task models is removed
    and the pooler, classifier, decoder and mask token are dropped. Unknown keys are kept, for a strict load to report.
    """
    encoder = {}
    for key, tensor in weights.items():
        key = key.removeprefix("vit.")
        if not _VIT_HEAD_WEIGHTS.match(key):
            encoder[key] = tensor
    return encoder


def _vit_processor_kwargs(folder: Path, config: MSNConfig, num_channels: int) -> dict:
    """
    `MSNImageProcessor` kwargs for `config`'s view sizes, normalising as the source ViT expects: the mean and std of
    its `preprocessor_config.json`, else those of a default `ViTImageProcessor`; its resampling filter, and its
    resize when it already resizes the shorter side and crops the model's side.
    """
    processor_file = folder / "preprocessor_config.json"
    settings = json.loads(processor_file.read_text()) if processor_file.is_file() else {}
    defaults = ViTImageProcessor()

    def per_channel(name: str) -> list[float]:
        value = settings.get(name, getattr(defaults, name))
        # Processors may store one number for all channels.
        return [float(value)] * num_channels if isinstance(value, (int, float)) else [float(v) for v in value]

    sizes = _processor_view_sizes(config)
    # A source that resizes the shorter side and crops the model's side (an msn_hf export) keeps its resize; the
    # 256 / 224 rule is for ViT processors that resize straight to the square.
    side = {"height": config.image_size, "width": config.image_size}
    if "shortest_edge" in (settings.get("size") or {}) and settings.get("do_center_crop") and settings.get("crop_size") == side:
        sizes["size"] = {"shortest_edge": settings["size"]["shortest_edge"]}
    filters = {"resample": settings["resample"]} if settings.get("resample") is not None else {}
    return dict(
        **sizes,
        **filters,
        do_normalize=bool(settings.get("do_normalize", defaults.do_normalize)),
        image_mean=per_channel("image_mean"),
        image_std=per_channel("image_std"),
    )


def _vit_source_features(folder: Path, architectures: list[str]) -> Callable[[torch.Tensor], torch.Tensor]:
    """
    The encoder tokens `(batch_size, 1 + num_patches, hidden_size)` of a Transformers ViT folder, loaded by
    Transformers itself (its own class, its own key conventions) as the reference of the import's self-check.
    """
    model_class = _TRANSFORMERS_VITS[architectures[0]]
    model, info = model_class.from_pretrained(folder, output_loading_info=True, dtype=torch.float32)
    # A folder saved without a pooler loads into a ViTModel that has one: the pooler is not compared.
    missing = [key for key in info["missing_keys"] if not _VIT_HEAD_WEIGHTS.match(key.removeprefix("vit."))]
    if missing or info["unexpected_keys"]:
        problems = missing + list(info["unexpected_keys"])
        raise ValueError(f"{model_class.__name__} does not load {folder} exactly: {problems}.")
    encoder = getattr(model, "vit", model).eval()
    return lambda pixels: encoder(pixel_values=pixels).last_hidden_state


def msn_model_from_vit(
    path_or_id: str | os.PathLike, *, verify: bool = False, **config_overrides
) -> tuple[MSNModel, dict]:
    """
    A new `MSNModel` whose anchor (`encoder`) and target (`target_encoder`) encoders both start as the encoder of a
    Transformers ViT: a `ViTModel` or `ViTMSNModel` folder or Hub id, or one of their task models
    (`ViTForImageClassification`, ... : the `vit.` encoder is taken, the classifier, pooler and decoder are dropped).
    The projection heads and prototypes are freshly initialised (the target head a copy of the anchor's), as for a
    model trained from scratch.

    The backbone keeps the source's width, depth, heads, MLP width, qkv bias, patch size and native resolution
    (`MSNConfig.image_size = config.image_size`; `focal_image_size` keeps the paper's 96 / 224 ratio).
    `config_overrides` set other `MSNConfig` fields (`num_prototypes`, `mask_ratio`, ...; `backbone_kwargs` are
    merged into the inferred timm kwargs, e.g. `{"drop_path_rate": 0.1}`). Fields the weights fix (`image_size`,
    `position_embedding`, `backbone_pretrained`) cannot be overridden.

    With `verify=True` the target encoder's tokens are compared with the source's `last_hidden_state` on a random
    image at the native size (one extra forward of each model).

    Returns the model (in eval mode, target frozen) and the `MSNImageProcessor` kwargs for it: `size`, `crop_size`,
    `focal_crop_size` from the config and `do_normalize`, `image_mean`, `image_std` from the source's
    `preprocessor_config.json` (else a default `ViTImageProcessor`'s). `msn-pretrain --model_name_or_path` builds
    `MSNImageProcessor(**{**processor_kwargs, **processor_overrides})`.

    Raises a `ValueError` for anything else (an msn_hf folder: load it with `MSNModel.from_pretrained`; a fine-tuned
    msn_hf classifier: [`classifier_folder_error`]), for options a timm ViT cannot reproduce, and listing every
    missing, unexpected or mis-shaped weight.
    """
    source_config = _read_hub_or_local_config(path_or_id)
    kind = _kind_of_config(source_config, path_or_id)
    if kind == "msn_classifier":
        raise classifier_folder_error(path_or_id)
    if kind not in ("vit", "vit_msn"):
        raise ValueError(
            f"`path_or_id` must be a Transformers ViT or ViTMSN model, got {path_or_id}, an msn_hf {kind!r} folder: "
            "load it with `MSNModel.from_pretrained` instead."
        )
    for name, value in _IMPORT_FIXED_FIELDS.items():
        if name in config_overrides and config_overrides[name] != value:
            raise ValueError(
                f"`{name}` must be {value!r} when importing a ViT (its weights are loaded), "
                f"got {config_overrides[name]!r}."
            )
    folder = _local_model_folder(path_or_id)
    vit_config = (ViTConfig if kind == "vit" else ViTMSNConfig).from_pretrained(folder)
    architecture = _architecture_of_vit_config(vit_config)
    image_size = config_overrides.get("image_size", architecture.image_size)
    if image_size != architecture.image_size:
        raise ValueError(
            f"`image_size` must be the native resolution {architecture.image_size} of {path_or_id} (its position "
            f"embeddings), got {image_size!r}; MSNModel runs other sizes as they are: set the processor's crop sizes."
        )
    overrides = dict(config_overrides)
    config = msn_config_for(architecture, overrides.pop("backbone_kwargs", None), **overrides)
    model = MSNModel(config)
    weights = vit_encoder_weights(read_weights(folder))
    source = f"The weights of {path_or_id} (under timm names, without pooler and heads)"
    _load_exactly(model.encoder, convert_vit_msn_to_timm_state_dict(weights), source)
    # The target branch starts as an exact copy of the anchor branch, as after `MSNModel.__init__`.
    model.copy_anchor_to_target()
    model.eval()
    if verify:
        reference = _vit_source_features(folder, source_config.get("architectures") or [_VIT_BASE_MODELS[kind]])
        _check_same_features(reference, _msn_target_features(model), architecture, "ViT import")
    processor_kwargs = _vit_processor_kwargs(folder, config, architecture.in_chans)
    logger.info(
        f"Imported the {kind} encoder of {path_or_id} as both MSN encoders "
        f"({config.backbone} {config.backbone_kwargs})."
    )
    return model, processor_kwargs


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------


def _json_dict(text: str) -> dict:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _config_fields(config: dict) -> dict:
    """`--config` as `MSNConfig` fields; an unknown (misspelt) field is refused as `msn-pretrain --config_overrides`
    refuses it, rather than stored in config.json next to the default it was meant to replace."""
    return check_known_keys(dict(config), config_fields(), "--config", "MSNConfig fields")


def _original_backbone_kwargs(from_flag: dict | None, from_config: dict | None) -> dict | None:
    """`from-original`'s timm kwargs, from `--backbone_kwargs` or from `backbone_kwargs` in `--config`, not both."""
    if from_flag is not None and from_config is not None:
        raise ValueError(
            f"backbone_kwargs must be given once, by --backbone_kwargs or in --config, got both: "
            f"--backbone_kwargs {json.dumps(from_flag)} and --config {json.dumps(from_config)}."
        )
    return from_config if from_config is not None else from_flag


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="msn-convert", description=__doc__.split("\n\n")[0].strip())
    commands = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_text: str, source_flag: str, source_help: str, verify: bool = True):
        command = commands.add_parser(name, help=help_text, description=help_text)
        command.add_argument(source_flag, required=True, help=source_help)
        command.add_argument("--output", required=True, help="Folder to create (written atomically).")
        command.add_argument("--overwrite", action="store_true", help="Replace an existing non-empty output folder.")
        if verify:
            command.add_argument("--no_verify", action="store_true", help="Skip the numerical check of the result.")
        return command

    add("to-vit-msn", "Export the target encoder as a Transformers ViTMSNModel folder.", "--model", "msn_hf folder.")
    add("to-timm", "Export the target encoder as a timm checkpoint folder.", "--model", "msn_hf folder.")
    original = add(
        "from-original", "Convert a checkpoint of the original MSN release.", "--checkpoint", ".pth.tar file.", verify=False
    )
    original.add_argument("--num_heads", type=int, help="Attention heads, for widths other than ViT-Ti/S/B/L/H.")
    original.add_argument("--backbone_kwargs", type=_json_dict, help="JSON overrides of the inferred timm kwargs.")
    vit_msn = add(
        "from-vit-msn", "Convert a Transformers ViTMSN or ViT folder.", "--model", "ViTMSN or ViT folder or Hub id."
    )
    for command in (original, vit_msn):
        command.add_argument("--config", type=_json_dict, default={}, help="JSON MSNConfig fields, e.g. '{\"mask_ratio\": 0.3}'.")
    return parser


def main(argv: list[str] | None = None) -> Path:
    """Entry point of `msn-convert` and `python -m msn_hf.convert`: runs one conversion and prints where it went."""
    args = _build_parser().parse_args(argv)
    output_dir = _run_command(args)
    print(f"msn-convert {args.command}: wrote {output_dir}")
    return output_dir


def _run_command(args: argparse.Namespace) -> Path:
    if args.command != "from-original":
        check_model_source(str(args.model), "--model")
    if args.command == "to-vit-msn":
        return to_vit_msn(args.model, args.output, overwrite=args.overwrite, verify=not args.no_verify)
    if args.command == "to-timm":
        return to_timm(args.model, args.output, overwrite=args.overwrite, verify=not args.no_verify)
    config = _config_fields(args.config)
    if args.command == "from-original":
        backbone_kwargs = _original_backbone_kwargs(args.backbone_kwargs, config.pop("backbone_kwargs", None))
        return from_original(
            args.checkpoint, args.output, num_heads=args.num_heads, backbone_kwargs=backbone_kwargs,
            overwrite=args.overwrite, **config,
        )
    return from_vit_msn(args.model, args.output, overwrite=args.overwrite, verify=not args.no_verify, **config)


if __name__ == "__main__":
    from .cli import convert

    convert()
