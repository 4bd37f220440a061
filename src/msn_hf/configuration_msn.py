"""MSN model configuration."""

import math
from dataclasses import field

import timm
import torch
from transformers import PreTrainedConfig

MASK_STRATEGIES = ("drop", "mask_token")
MASK_SAMPLINGS = ("per_sample", "per_batch")
CLASSIFIER_POOLINGS = ("cls", "cls_mean")
WEIGHT_INITS = ("msn", "mae")
POSITION_EMBEDDINGS = ("learned", "sincos")
TARGET_PRIORS = ("uniform", "power_law")


class MSNConfig(PreTrainedConfig):
    r"""
    Configuration of an [`MSNModel`]: a timm Vision Transformer pretrained with Masked Siamese Networks
    (Assran et al., ECCV 2022). The defaults reproduce the authors' ViT-S/16 recipe.

    Args:
        backbone (`str`, *optional*, defaults to `"vit_small_patch16_224"`):
            Name of a timm Vision Transformer with a patch embedding and a class token.
        backbone_kwargs (`dict`, *optional*, defaults to `{}`):
            Extra arguments for `timm.create_model` (e.g. `embed_dim`, `depth`, `num_heads`, `img_size`,
            `patch_size` for small models). `img_size` defaults to `image_size`.
        image_size (`int`, *optional*, defaults to 224):
            Side of the target and random anchor views.
        focal_image_size (`int`, *optional*, defaults to 96):
            Side of the focal anchor views.
        projection_hidden_size (`int`, *optional*, defaults to 2048):
            Width of the two hidden layers of the projection head.
        projection_output_size (`int`, *optional*, defaults to 256):
            Output width of the projection head, which is also the width of the prototypes.
        projection_batch_norm (`bool`, *optional*, defaults to `True`):
            Whether the projection head has BatchNorm after its hidden layers.
        num_prototypes (`int`, *optional*, defaults to 1024):
            Number of learnable prototypes shared by the anchor and target branches.
        mask_ratio (`float`, *optional*, defaults to 0.15):
            Fraction of patch tokens removed from the random anchor views, in `[0, 1)`.
        mask_strategy (`str`, *optional*, defaults to `"drop"`):
            `"drop"` removes masked tokens (the original, cheap); `"mask_token"` replaces them by a learned token.
        mask_focal_views (`bool`, *optional*, defaults to `False`):
            Whether the focal views are masked as well.
        mask_sampling (`str`, *optional*, defaults to `"per_sample"`):
            `"per_sample"` draws an independent random mask for every image; `"per_batch"` draws one random subset
            of patches for the whole batch, as the authors' code does (see docs/algorithm.md).
        pos_embed_antialias (`bool`, *optional*, defaults to `True`):
            Whether the position embeddings are resampled with antialiasing (timm's default) for views of another
            resolution (the focal views); the authors resample without it.
        temperature (`float`, *optional*, defaults to 0.1):
            Softmax temperature of the prototype assignments.
        target_sharpen_temperature (`float`, *optional*, defaults to 0.25):
            Sharpening temperature applied to the target assignments.
        sinkhorn_iterations (`int`, *optional*, defaults to 3):
            Sinkhorn-Knopp iterations on the sharpened targets (0 disables it).
        me_max_weight (`float`, *optional*, defaults to 1.0):
            Weight of the mean-entropy maximisation regulariser.
        entropy_weight (`float`, *optional*, defaults to 0.0):
            Weight of the mean per-sample entropy of the anchor assignments.
        label_smoothing (`float`, *optional*, defaults to 0.0):
            Smoothing of the one-hot prototype labels, in `[0, 1)`.
        ema_momentum (`float`, *optional*, defaults to 0.996):
            Start value of the target encoder's EMA momentum.
        ema_momentum_end (`float`, *optional*, defaults to 1.0):
            End value of the linear EMA momentum schedule.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the truncated normal initialisation.
        classifier_pooling (`str`, *optional*, defaults to `"cls"`):
            Features of [`MSNForImageClassification`]: `"cls"` or `"cls_mean"` (class token concatenated with
            the mean of the patch tokens).
        weight_init (`str`, *optional*, defaults to `"msn"`):
            `"msn"`: the authors' recipe (truncated normal Linears and tokens, Kaiming-normal fan-in patch
            convolution); `"mae"`: Xavier-uniform Linears and patch projection (as a flattened linear map), normal
            class token, as MAE.
        position_embedding (`str`, *optional*, defaults to `"learned"`):
            `"learned"` (the original) or `"sincos"`: fixed 2-D sine-cosine position embeddings, a non-trainable
            buffer, interpolated for focal views like learned ones.
        target_prior (`str`, *optional*, defaults to `"uniform"`):
            Prior over prototypes that the mean anchor assignment is pulled towards: `"uniform"` (me-max, MSN) or
            `"power_law"` (PMSN, Assran et al., ICLR 2023).
        power_law_exponent (`float`, *optional*, defaults to 0.25):
            Exponent tau of the power-law prior `p_k ~ k^(-tau)`.
        backbone_pretrained (`str`, *optional*):
            timm weights the encoders start from: a local file (`.safetensors`, `.pth`, `.bin`) or, only when given,
            a Hub id (downloaded). Ignored when loading an MSN checkpoint.

    Example:

    ```python
    >>> from msn_hf import MSNConfig, MSNModel

    >>> config = MSNConfig(backbone="vit_tiny_patch16_224", mask_ratio=0.6)
    >>> model = MSNModel(config)
    ```"""

    model_type = "msn"

    backbone: str = "vit_small_patch16_224"
    backbone_kwargs: dict = field(default_factory=dict)
    image_size: int = 224
    focal_image_size: int = 96
    projection_hidden_size: int = 2048
    projection_output_size: int = 256
    projection_batch_norm: bool = True
    num_prototypes: int = 1024
    mask_ratio: float = 0.15
    mask_strategy: str = "drop"
    mask_focal_views: bool = False
    mask_sampling: str = "per_sample"
    pos_embed_antialias: bool = True
    temperature: float = 0.1
    target_sharpen_temperature: float = 0.25
    sinkhorn_iterations: int = 3
    me_max_weight: float = 1.0
    entropy_weight: float = 0.0
    label_smoothing: float = 0.0
    ema_momentum: float = 0.996
    ema_momentum_end: float = 1.0
    initializer_range: float = 0.02
    classifier_pooling: str = "cls"
    weight_init: str = "msn"
    position_embedding: str = "learned"
    target_prior: str = "uniform"
    power_law_exponent: float = 0.25
    backbone_pretrained: str | None = None

    def __post_init__(self, **kwargs):
        if self.backbone_kwargs is None:
            self.backbone_kwargs = {}
        self._check_values()
        super().__post_init__(**kwargs)

    def _check_values(self):
        def fail(name, expected):
            raise ValueError(f"MSNConfig: `{name}` must be {expected}, got {getattr(self, name)!r}.")

        def number(name) -> float | None:
            # A flag is not a number, and NaN or infinity would make every loss NaN or infinite.
            value = getattr(self, name)
            is_number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            return value if is_number else None

        for name in ("image_size", "focal_image_size", "projection_hidden_size", "projection_output_size",
                     "num_prototypes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                fail(name, "a positive integer")
        for name in ("temperature", "target_sharpen_temperature", "initializer_range", "power_law_exponent"):
            if number(name) is None or number(name) <= 0:
                fail(name, "a positive finite number")
        for name in ("me_max_weight", "entropy_weight"):
            if number(name) is None or number(name) < 0:
                fail(name, "a non-negative finite number")
        if isinstance(self.sinkhorn_iterations, bool) or not isinstance(self.sinkhorn_iterations, int) or (
            self.sinkhorn_iterations < 0
        ):
            fail("sinkhorn_iterations", "a non-negative integer")
        for name in ("mask_ratio", "label_smoothing"):
            if number(name) is None or not 0 <= number(name) < 1:
                fail(name, "a number in [0, 1)")
        for name in ("ema_momentum", "ema_momentum_end"):
            if number(name) is None or not 0 <= number(name) <= 1:
                fail(name, "a number in [0, 1]")
        for name in ("projection_batch_norm", "mask_focal_views", "pos_embed_antialias"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "True or False")
        if self.mask_strategy not in MASK_STRATEGIES:
            fail("mask_strategy", f"one of {MASK_STRATEGIES}")
        if self.mask_sampling not in MASK_SAMPLINGS:
            fail("mask_sampling", f"one of {MASK_SAMPLINGS}")
        if self.classifier_pooling not in CLASSIFIER_POOLINGS:
            fail("classifier_pooling", f"one of {CLASSIFIER_POOLINGS}")
        for name, choices in (
            ("weight_init", WEIGHT_INITS), ("position_embedding", POSITION_EMBEDDINGS), ("target_prior", TARGET_PRIORS)
        ):
            if getattr(self, name) not in choices:
                fail(name, f"one of {choices}")
        if self.backbone_pretrained is not None and (
            not isinstance(self.backbone_pretrained, str) or not self.backbone_pretrained.strip()
        ):
            fail("backbone_pretrained", "None, a local weights file or a Hub id")
        if not isinstance(self.backbone_kwargs, dict):
            fail("backbone_kwargs", "a dict of timm.create_model arguments")
        self._check_backbone()

    def _check_backbone(self):
        if not isinstance(self.backbone, str) or not timm.is_model(self.backbone):
            raise ValueError(f"MSNConfig: `backbone` must be the name of a timm model, got {self.backbone!r}.")
        try:
            # The meta device builds the module tree without allocating or initialising any weight.
            with torch.device("meta"):
                model = timm.create_model(self.backbone, **self.timm_kwargs())
        except (TypeError, ValueError, AssertionError) as error:
            raise ValueError(
                f"MSNConfig: `backbone` {self.backbone!r} with `backbone_kwargs` {self.backbone_kwargs!r} must build a "
                f"timm VisionTransformer with a class token; timm said: {error}"
            ) from error
        if not (isinstance(model, timm.models.VisionTransformer) and getattr(model, "cls_token", None) is not None):
            raise ValueError(
                "MSNConfig: `backbone` must be a timm VisionTransformer with a patch embedding and a class token, "
                f"got {self.backbone!r} ({type(model).__name__}, class token: {getattr(model, 'cls_token', None) is not None})."
            )
        channels = getattr(model.patch_embed.proj, "in_channels", 3)
        if channels != 3:
            raise ValueError(
                f"MSNConfig: `backbone_kwargs` must give a backbone of RGB images (3 channels): the image processor gives "
                f"every image, grey ones included, as RGB; got {channels} (`in_chans`) from {self.backbone_kwargs!r}."
            )
        patch = model.patch_embed.patch_size[0]
        for name in ("image_size", "focal_image_size"):
            if getattr(self, name) % patch:
                raise ValueError(
                    f"MSNConfig: `{name}` must be a multiple of the backbone's patch size {patch}, got "
                    f"{getattr(self, name)!r}."
                )

    def timm_kwargs(self) -> dict:
        """Arguments for `timm.create_model(self.backbone, **kwargs)`: no classifier, any input resolution."""
        kwargs = {"img_size": self.image_size, **self.backbone_kwargs}
        kwargs.update(pretrained=False, num_classes=0, global_pool="token", dynamic_img_size=True)
        return kwargs


__all__ = ["MSNConfig"]
