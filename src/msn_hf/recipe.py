"""
Pretraining recipes: what model, views and schedule a run gets when the user does not choose them.

- `imagenet_recipe()`: the authors' ViT-S/16 recipe (224 px views, 10 focal views at 96 px, 1,024 prototypes), i.e.
  msn_hf's defaults, unchanged.
- `auto_recipe(...)`: a rule from what is known before training (image side, grey or colour, dataset size, global
  batch, planned steps) to a model, views and schedule that learn in that budget. At 224 px with a long run it
  keeps the paper's geometry. Shorter runs get cheaper steps: the token grid, then the encoder's depth, then its
  width grow with the images the run sees (`target_grid`, `GROWTH`), one quantity at a time and each in small
  steps, so that neighbouring run lengths get neighbouring models (a run 10 % longer never costs more than one
  such step more per image, `step_cost`). The view side snaps to a multiple of a patch so that any image side
  gets the target grid (`view_geometry`). Focal views scale with the image, blur with the view side, no colour
  jitter on grey data, about one prototype per batch image, a faster EMA and MAE-style initialisation with fixed
  sine-cosine position embeddings (the sweeps that chose these rules are in benchmarks/RESULTS.md).
- `continue_recipe(...)`: continued pretraining from weights (a Transformers ViT, an msn_hf folder, timm weights):
  the backbone's own patch and resolution, the auto rule's views for the data, a lower learning rate, a short
  warmup and a slow EMA start, so that the target does not forget where it started.
- `fit_views(...)`: a recipe moved to another view side or patch (`--backbone_kwargs '{"img_size": ...}'`).

A recipe is a plain dict `{"name", "backbone", "backbone_kwargs", "config", "processor", "training"}` that
`save_recipe` writes as JSON and `load_recipe` reads back (JSON or YAML), so that a run can be reproduced from
the recipe file it wrote.
"""

import json
import math
import os
from collections.abc import Iterable

from .configuration_msn import MSNConfig
from .files import write_text_atomically

# `plan`: what a run of a time budget planned (budget, steps, seconds per step), for the record only.
RECIPE_KEYS = ("name", "backbone", "backbone_kwargs", "config", "processor", "training", "plan")
RECIPE_FILE = "msn_recipe.json"

# The ViT-S/16 release (MSN_REFERENCE.md): these are also the defaults of MSNConfig, MSNImageProcessor and the
# pretraining script, so the ImageNet recipe changes nothing.
IMAGENET_TRAINING = dict(num_train_epochs=800, per_device_train_batch_size=64, num_warmup_epochs=15)

# How the auto rule's model grows with the images a run sees (planned steps x global batch): phases of one quantity
# each, `(quantity, first value, last value, step, images seen at the first value, at the last value)`, the value
# interpolated linearly in log(images seen) between its two anchors and rounded down to a step. The phases follow
# one another, so two changes are always at least a factor 2 ** (1 / 4) ~ 1.19 (grid 4 -> 8), 2.5 ** (1 / 6) ~ 1.16
# (grid 8 -> 14), 3 ** (1 / 8) ~ 1.15 (depth), 1.33 ** (1 / 2) ~ 1.15 or 2 ** (1 / 6) ~ 1.12 (width) apart in run
# length. Anchors: at equal time, more steps of the cheapest model won every comparison measured on 2 CPU cores
# (benchmarks/RESULTS.md): a 4 x 4 grid over an 8 x 8 one in 3-minute digits runs, 3,300 steps of a 4 x 4 grid (211,000
# images seen, 8 minutes) over the 2,000 steps of a 5 x 5 grid that a 10-minute budget bought when the grid grew from
# 100,000 images (84.2 against 76.1 % at 5 shots), and the same on issue 17's held-out grey-scale set at 192,000. So
# the grid starts growing at 400,000 images seen; the paper's ViT-S/16 (14 x 14 tokens, 384 wide, 12 deep) is the
# model of runs of its scale. The grid grows first: at 4 x 4, a 224 px view has 56 px patches.
GROWTH = (
    ("grid", 4, 8, 1, 400_000, 800_000),
    ("grid", 8, 14, 1, 800_000, 2_000_000),
    ("depth", 4, 12, 1, 2_000_000, 6_000_000),
    ("embed_dim", 128, 192, 32, 6_000_000, 8_000_000),
    ("embed_dim", 192, 384, 32, 8_000_000, 16_000_000),
)
# From this many images seen a run is of the paper's scale: 10 focal views, and the authors' initialisation with
# learned positions on grids of 12 x 12 or more. After the last growth step (16 million), not with it, so that the
# two changes do not add up in one step of run length.
_PAPER_SCALE_IMAGES = 20_000_000
# Projection head (hidden, output sizes) by encoder width, up to (excluding) a width: the 128-wide digits model's,
# ViT-Ti's, ViT-S's (the paper's).
_PROJECTION_BY_WIDTH = ((192, (512, 128)), (384, (1024, 256)), (math.inf, (2048, 256)))
# Smallest patch side in pixels: below 4 px a token sees too little of the image to be worth its cost.
_MIN_PATCH = 4
# The paper's geometry at 224 px.
_PAPER_SIDE, _PAPER_FOCAL_SIDE, _PAPER_BLUR = 224, 96, (0.1, 2.0)
# Continued pretraining (`continue_recipe`): a quarter of the from-scratch peak and warmup-start learning rates
# (1e-3 and 2e-4, `PretrainingArguments`), a 2 % warmup and an EMA that starts slow, so that the start is kept.
CONTINUE_TRAINING = dict(learning_rate=2.5e-4, warmup_start_learning_rate=5e-5)
_CONTINUE_WARMUP = 0.02
# A from-scratch warmup: 5 % of the planned steps (the auto recipe's; the most a recipe's warmup in epochs may take).
WARMUP_SHARE = 0.05
_CONTINUE_EMA_START = 0.999


def imagenet_recipe() -> dict:
    """The authors' ViT-S/16 recipe: msn_hf's defaults, nothing overridden."""
    return dict(
        name="imagenet",
        backbone="vit_small_patch16_224",
        backbone_kwargs={},
        config={},
        processor={},
        training=dict(IMAGENET_TRAINING),
    )


def _check_positive_int(name: str, value, function: str = "auto_recipe") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{function}: `{name}` must be a positive integer, got {value!r}.")


def _grown(quantity: str, images_seen: float) -> int:
    """The value of a `GROWTH` quantity after a run of `images_seen` images (its first value before any phase)."""
    phases = [phase for phase in GROWTH if phase[0] == quantity]
    value = phases[0][1]
    for _, first, last, step, start, end in phases:
        if images_seen >= start:
            progress = min(1.0, math.log(images_seen / start) / math.log(end / start))
            # The epsilon keeps an anchor's own value at the anchor despite rounding in the logarithms.
            value = first + step * math.floor((last - first) / step * progress + 1e-9)
    return value


def target_grid(images_seen: int) -> int:
    """
    Tokens per row (and column) of the anchor view that the auto rule aims at for a run of `images_seen` images
    (planned steps x global batch): 4 up to 400,000, one more at each factor 2 ** (1 / 4) up to 8 at 800,000, one
    more at each factor 2.5 ** (1 / 6) up to the paper's 14 at 2 million. Small images may get fewer
    (`view_geometry`).
    """
    _check_positive_int("images_seen", images_seen, "target_grid")
    return _grown("grid", images_seen)


def view_geometry(image_size: int, grid: int) -> tuple[int, int]:
    """
    `(view side, patch size)` in pixels for images of side `image_size` and a target of `grid` tokens per row.

    The view is at most 224 px (the paper's) and the patch at least 4 px, so the grid is `min(grid,
    min(image_size, 224) // 4)`; the patch is the largest that fits that many times, and the view side is grid x
    patch: the image side snapped down to a multiple of the patch (150 px with a target of 12 gives 144 px views
    of 12 px patches; at most `grid - 1` pixels of the image side are lost to the snap).
    """
    _check_positive_int("image_size", image_size, "view_geometry")
    _check_positive_int("grid", grid, "view_geometry")
    if image_size < _MIN_PATCH:
        raise ValueError(f"view_geometry: `image_size` must be at least {_MIN_PATCH} px, got {image_size}.")
    limit = min(image_size, _PAPER_SIDE)
    grid = min(grid, limit // _MIN_PATCH)
    patch = limit // grid
    return grid * patch, patch


def _num_heads(embed_dim: int) -> int:
    """Attention heads: 64 channels each as in ViT-Ti and ViT-S where the width allows, else 32 (the 128-wide model)."""
    return embed_dim // 64 if embed_dim >= 192 and embed_dim % 64 == 0 else embed_dim // 32


def step_cost(recipe: dict, global_batch: int = 1) -> float:
    """
    A proxy for the compute of one optimiser step of `recipe`: multiply-adds of the encoder's blocks over all views
    of `global_batch` images, `depth x sum over views of t x (12 w^2 + 2 t w)` for a width w and t tokens per view
    (class token included): 12 w^2 per token for the QKV and output projections and a 4x MLP, 2 t w for the
    attention scores and their weighted sum. Views: the anchor and the target at the view side, and the focal views.
    Masking, the backward pass, the heads and the patch embedding scale or add a little to this, alike for all
    recipes; the proxy is for comparing recipes, not for predicting seconds.
    """
    backbone, processor = recipe["backbone_kwargs"], recipe["processor"]
    width, depth, patch = backbone["embed_dim"], backbone["depth"], backbone["patch_size"]
    view_tokens = (recipe["config"]["image_size"] // patch) ** 2 + 1
    focal_tokens = (recipe["config"]["focal_image_size"] // patch) ** 2 + 1
    views = [view_tokens] * 2 + [focal_tokens] * processor["num_focal_views"]
    return float(global_batch * depth * sum(t * (12 * width**2 + 2 * t * width) for t in views))


def auto_recipe(image_size: int, grey: bool, num_images: int, global_batch: int, planned_steps: int) -> dict:
    """
    The recipe the `auto` rule picks for a run (a pure function of its arguments).

    Args:
        image_size: side of the images (their shortest side; the views are square crops of that side).
        grey: whether the images are grey-scale (colour jitter then only changes brightness: off).
        num_images: training images.
        global_batch: images per optimiser step over all processes.
        planned_steps: optimiser steps of the run.

    Rules (constants chosen by the sweeps in benchmarks/RESULTS.md; "images seen" is `planned_steps x global_batch`):
        - token grid: `target_grid(images seen)`, 4 x 4 up to 400,000 images seen, growing one token at a time
          to 8 x 8 at 800,000 and the paper's 14 x 14 at 2 million;
        - view side and patch: `view_geometry(image_size, grid)`: the view (crop) side is the image side, at most
          224 px, snapped down to a multiple of the largest patch (at least 4 px) giving that grid;
        - encoder: 128 wide, 4 deep up to 2 million images seen; then one block more at each factor 3 ** (1 / 8)
          to 12 blocks at 6 million; then 32 channels wider at each step to ViT-Ti's 192 at 8 million and ViT-S's
          384 at 16 million (`GROWTH`); heads of 64 channels where the width allows, else 32; projection head by
          width (512 / 128 below 192 wide, 1,024 / 256 below 384, the paper's 2,048 / 256);
        - focal side: 96 / 224 of the view side as a multiple of the patch, at least two patches; focal views:
          10 for runs of the paper's scale (20 million images seen and more), fewer for shorter runs so that focal
          tokens cost about as much as the anchor view's;
        - blur sigma: (0.1, 2.0) x side / 224; colour jitter off for grey data;
        - prototypes: the power of two nearest to the global batch, between 16 and 1,024;
        - EMA momentum start: 0.996, or `1 - 5 / planned_steps` when lower (a time constant of a fifth of the run);
        - warmup: 5 % of the planned steps (the paper: 15 of 800 epochs, 1.9 %, of a far longer run);
        - initialisation: the authors' (`weight_init="msn"`, learned position embeddings) for runs of the paper's
          scale on grids of 12 x 12 tokens or more, else MAE-style with fixed sine-cosine position embeddings
          (learned positions start as noise and need many steps per position).

    Because one quantity changes at a time, in steps at least a factor 1.12 of run length apart, the per-step
    cost (`step_cost`) of a run 10 % longer is at most one step more: at most (160 / 128) ** 2 ~ 1.56x (the first
    widening; 4 x 4 -> 5 x 5 tokens is 26 / 17 ~ 1.53x tokens per view).
    """
    for name, value in (
        ("image_size", image_size), ("num_images", num_images), ("global_batch", global_batch),
        ("planned_steps", planned_steps),
    ):
        _check_positive_int(name, value)
    if image_size < 16:
        raise ValueError(f"auto_recipe: `image_size` must be at least 16 px, got {image_size}.")
    images_seen = planned_steps * global_batch
    side, patch = view_geometry(image_size, target_grid(images_seen))
    grid = side // patch

    focal_patches = max(2, round(grid * _PAPER_FOCAL_SIDE / _PAPER_SIDE))
    focal_side = focal_patches * patch
    paper_scale = images_seen >= _PAPER_SCALE_IMAGES
    # Short runs: as many focal views as make their tokens cost about the anchor view's (at least 2). At equal time
    # this won on the digits; twice as many won on colour shapes and photo crops (benchmarks/RESULTS.md): no count
    # held on all three sets.
    num_focal = 10 if paper_scale else max(2, min(10, round(grid**2 / focal_patches**2)))

    embed_dim, depth = _grown("embed_dim", images_seen), _grown("depth", images_seen)
    backbone_kwargs = dict(embed_dim=embed_dim, depth=depth, num_heads=_num_heads(embed_dim))
    scale = side / _PAPER_SIDE
    blur = (round(_PAPER_BLUR[0] * scale, 4), round(_PAPER_BLUR[1] * scale, 4))

    config = dict(
        image_size=side,
        focal_image_size=focal_side,
        **new_heads(embed_dim, global_batch),
        ema_momentum=_ema_start(planned_steps),
    )
    if not (paper_scale and grid >= 12):
        config.update(weight_init="mae", position_embedding="sincos")
    processor = dict(
        size={"shortest_edge": side if side < _PAPER_SIDE else round(side * 256 / 224)},
        crop_size=side,
        focal_crop_size=focal_side,
        num_focal_views=num_focal,
        blur_sigma=blur,
    )
    if grey:
        processor["color_jitter_probability"] = 0.0
    return dict(
        name="auto",
        backbone="vit_small_patch16_224" if backbone_kwargs["embed_dim"] == 384 else "vit_tiny_patch16_224",
        backbone_kwargs=dict(img_size=side, patch_size=patch, **backbone_kwargs),
        config=config,
        processor=processor,
        training=dict(num_warmup_steps=max(1, round(WARMUP_SHARE * planned_steps))),
    )


def new_heads(embed_dim: int, global_batch: int) -> dict:
    """
    `MSNConfig` sizes of new projection heads and prototypes for an encoder `embed_dim` wide trained on
    `global_batch` images a step: the head by width (512 / 128 below 192 wide, 1,024 / 256 below 384, the paper's
    2,048 / 256), and the power of two nearest to the batch as the number of prototypes, between 16 and 1,024.
    """
    hidden, output = next(head for limit, head in _PROJECTION_BY_WIDTH if embed_dim < limit)
    num_prototypes = int(min(1024, max(16, 2 ** round(math.log2(global_batch)))))
    return dict(projection_hidden_size=hidden, projection_output_size=output, num_prototypes=num_prototypes)


def continue_recipe(
    native_size: int, patch_size: int, image_size: int, grey: bool, num_images: int, global_batch: int,
    planned_steps: int, new_heads_width: int | None = None,
) -> dict:
    """
    The recipe of continued pretraining from weights (`--recipe continue`, the default of `--model_name_or_path` and
    `--backbone_pretrained`): the same dict as `auto_recipe`, for a backbone that already learnt something.

    Args:
        native_size: side the starting backbone was trained at (its position embeddings), in pixels.
        patch_size: its patch side, in pixels.
        image_size, grey, num_images, global_batch, planned_steps: the data and the run, as for `auto_recipe`.
        new_heads_width: the width of a start without MSN heads (a Transformers ViT, timm weights), which gets new
            ones; None for an msn_hf folder, whose heads and prototypes are kept.

    Rules:
        - the backbone keeps its patch and native resolution: the target and anchor views are `native_size` px
          (the model is the source's; `backbone` is None and `backbone_kwargs` empty);
        - new heads and prototypes are sized as the auto rule sizes them for that width and batch (`new_heads`),
          not as MSNConfig's defaults, which are the paper's for a batch of 1,024;
        - the views follow `auto_recipe` for the data: its focal / view side ratio (at least one patch, as a
          multiple of the patch), its number of focal views, its blur relative to the view side, no colour jitter
          on grey data;
        - optimisation (`CONTINUE_TRAINING`): a quarter of the from-scratch peak and warmup-start learning rates, a
          warmup of 2 % of the planned steps, and an EMA momentum starting at 0.999 (a time constant of 1,000
          steps), so that neither the anchor's first, largest steps nor a fast-moving target undo the start.
    """
    _check_positive_int("native_size", native_size, "continue_recipe")
    _check_positive_int("patch_size", patch_size, "continue_recipe")
    if native_size % patch_size:
        raise ValueError(
            f"continue_recipe: `native_size` must be a multiple of `patch_size` {patch_size}, got {native_size}."
        )
    auto = auto_recipe(image_size, grey, num_images, global_batch, planned_steps)
    side, focal, processor = auto["config"]["image_size"], auto["config"]["focal_image_size"], auto["processor"]
    focal_side = max(1, round(native_size / patch_size * focal / side)) * patch_size
    scale = native_size / side
    views = dict(
        size={"shortest_edge": native_size if native_size < _PAPER_SIDE else round(native_size * 256 / 224)},
        crop_size=native_size,
        focal_crop_size=focal_side,
        num_focal_views=processor["num_focal_views"],
        blur_sigma=tuple(round(sigma * scale, 4) for sigma in processor["blur_sigma"]),
    )
    if grey:
        views["color_jitter_probability"] = 0.0
    return dict(
        name="continue",
        backbone=None,
        backbone_kwargs={},
        config=dict(
            image_size=native_size,
            focal_image_size=focal_side,
            **(new_heads(new_heads_width, global_batch) if new_heads_width is not None else {}),
            ema_momentum=_CONTINUE_EMA_START,
        ),
        processor=views,
        training=dict(CONTINUE_TRAINING, num_warmup_steps=max(1, round(_CONTINUE_WARMUP * planned_steps))),
    )


def backbone_geometry(backbone: str, backbone_kwargs: dict) -> tuple[int, int, int]:
    """
    `(image side, patch side, width)` of the timm ViT `backbone` built with `backbone_kwargs` (sides in pixels, its
    own default resolution unless `img_size` is given), read from a model built on the meta device (no weight is
    allocated).
    """
    import timm
    import torch

    with torch.device("meta"):
        vit = timm.create_model(backbone, pretrained=False, num_classes=0, **backbone_kwargs)
    return int(vit.patch_embed.img_size[0]), int(vit.patch_embed.patch_size[0]), int(vit.embed_dim)


def fit_views(recipe: dict, image_size: int, patch_size: int, focal_image_size: int | None = None) -> dict:
    """
    `recipe` with views of `image_size` px for a backbone of `patch_size` px patches: its config's `image_size` and
    `focal_image_size` (the recipe's focal / view ratio, as a multiple of the patch, unless `focal_image_size` is
    given), its processor's evaluation resize and blur scaled alike, and its `backbone_kwargs["img_size"]`, when it
    sets one. The recipe's sides default to MSNConfig's (224 and 96 px); the processor's crop sizes are left to
    follow the config (`build_model_and_processor` sets them). Returns a new dict; `recipe` is not changed.
    """
    config, processor = dict(recipe["config"]), dict(recipe["processor"])
    side, focal = config.get("image_size", _PAPER_SIDE), config.get("focal_image_size", _PAPER_FOCAL_SIDE)
    if focal_image_size is None and (image_size != side or focal % patch_size):
        focal_image_size = max(1, round(image_size / patch_size * focal / side)) * patch_size
    scale = image_size / side
    if image_size != side:
        if isinstance(processor.get("size"), dict) and "shortest_edge" in processor["size"]:
            processor["size"] = {"shortest_edge": round(processor["size"]["shortest_edge"] * scale)}
        if "blur_sigma" in processor:
            processor["blur_sigma"] = tuple(round(sigma * scale, 4) for sigma in processor["blur_sigma"])
    config.update(image_size=image_size, focal_image_size=focal_image_size or focal)
    backbone_kwargs = dict(recipe["backbone_kwargs"])
    if "img_size" in backbone_kwargs:
        backbone_kwargs["img_size"] = image_size
    return dict(recipe, backbone_kwargs=backbone_kwargs, config=config, processor=processor)


def _ema_start(planned_steps: int) -> float:
    """
    EMA momentum at step 0: the paper's 0.996 (a time constant 1 / (1 - m) of 250 steps), or, for shorter runs, a
    time constant of a fifth of the run, so that the target follows the anchor within the run: `1 - 5 / steps`.
    """
    return round(min(0.996, max(0.9, 1.0 - 5.0 / planned_steps)), 4)


# Runs of the README table: minutes on a CPU (the digits' size), an hour or so, and a long multi-GPU run.
TABLE_RUNS = (
    ("minutes: batch 64, 500 steps", 64, 500),
    ("an hour: batch 64, 10,000 steps", 64, 10_000),
    ("long: batch 1,024, 300,000 steps", 1024, 300_000),
)


def recipe_table(image_sizes: Iterable[int] = (28, 32, 64, 96, 224), grey_sizes: Iterable[int] = (28,),
                 num_images: int = 50_000, runs=TABLE_RUNS) -> str:
    """A markdown table of what `auto_recipe` picks at each image size, for each of `runs` (for the README)."""
    header = ("run", "image px", "grey", "patch", "tokens", "focal px x views", "blur sigma", "colour jitter",
              "encoder", "prototypes", "EMA start", "init / positions")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    grey_sizes = set(grey_sizes)
    for run, global_batch, planned_steps in runs:
        for size in image_sizes:
            recipe = auto_recipe(size, size in grey_sizes, num_images, global_batch, planned_steps)
            config, processor, backbone = recipe["config"], recipe["processor"], recipe["backbone_kwargs"]
            grid = config["image_size"] // backbone["patch_size"]
            cells = (
                run,
                str(size),
                "yes" if size in grey_sizes else "no",
                str(backbone["patch_size"]),
                f"{grid} x {grid}",
                f"{config['focal_image_size']} x {processor['num_focal_views']}",
                f"{processor['blur_sigma'][0]:g}-{processor['blur_sigma'][1]:g}",
                "off" if processor.get("color_jitter_probability") == 0.0 else "on",
                f"{backbone['embed_dim']} wide, {backbone['depth']} deep",
                str(config["num_prototypes"]),
                f"{config['ema_momentum']:g}",
                f"{config.get('weight_init', 'msn')} / {config.get('position_embedding', 'learned')}",
            )
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe_images(images: Iterable) -> tuple[int, bool]:
    """
    `(image_size, grey)` of a sample of PIL images: the median shortest side, and whether every image is grey-scale
    (a grey band only, with or without alpha, as in modes 1, L, LA, I, I;16, I;16B and F, or equal channels once
    converted to RGB as training decodes it, e.g. a grey palette).
    """
    import numpy as np

    from .image_processing_msn import to_rgb

    sides, grey = [], True
    for image in images:
        sides.append(min(image.size))
        if grey and set(image.getbands()) - {"A", "a"} not in ({"1"}, {"L"}, {"I"}, {"F"}):
            # The same conversion as `decode_image`, so that a file and its decoded image are described alike.
            pixels = np.asarray(to_rgb(image), dtype=np.int16)
            grey = bool((pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all())
    if not sides:
        raise ValueError("describe_images: `images` must hold at least one readable image, got none.")
    return int(np.median(sides)), grey


# --- command-line overrides ------------------------------------------------------------------------------------


def parse_overrides(text: str | None, valid_keys: Iterable[str], flag_name: str, what: str = "keys") -> dict:
    """
    `"mask_ratio=0.3,mask_strategy=drop"` -> `{"mask_ratio": 0.3, "mask_strategy": "drop"}`: values are JSON
    where they parse as JSON (numbers, booleans, lists such as `[0.1,2.0]`), else strings. Commas inside brackets
    or braces do not split items. Raises a ValueError naming `flag_name` for an item without `=` or a key outside
    `valid_keys` (`what` names them in the message).
    """
    overrides = {}
    for item in _split_items(text or ""):
        if "=" not in item:
            raise ValueError(f"{flag_name} items must be key=value, got {item!r}.")
        key, value = (part.strip() for part in item.split("=", 1))
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return check_known_keys(overrides, valid_keys, flag_name, what)


def config_fields() -> list[str]:
    """The `MSNConfig` fields a user may set: `--config_overrides` and `msn-convert --config` check against these."""
    return [name for name in MSNConfig.__annotations__ if not name.startswith("_")]


def check_known_keys(values: dict, valid_keys: Iterable[str], flag_name: str, what: str = "keys") -> dict:
    """`values` as they are, or a ValueError naming `flag_name` and the keys outside `valid_keys` (misspelt)."""
    valid = set(valid_keys)
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ValueError(f"{flag_name} has unknown {what}: {unknown}; expected some of {sorted(valid)}.")
    return values


def _split_items(text: str) -> list[str]:
    items, depth, current = [], 0, []
    for char in text:
        depth += (char in "[{") - (char in "]}")
        if char == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    items.append("".join(current))
    return [item.strip() for item in items if item.strip()]


# --- recipe files ----------------------------------------------------------------------------------------------


def load_recipe(path: str | os.PathLike) -> dict:
    """A recipe from a JSON or YAML file (`.yaml` / `.yml`); missing sections are empty, unknown ones an error."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"`recipe_file` must be an existing JSON or YAML file, got {path!r}.")
    with open(path) as handle:
        if path.endswith((".yaml", ".yml")):
            import yaml

            try:
                recipe = yaml.safe_load(handle)
            except yaml.YAMLError as error:
                raise ValueError(f"--recipe_file {path!r} is not valid YAML: {_yaml_error_line(error)}.") from None
        else:
            try:
                recipe = json.load(handle)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"--recipe_file {path!r} is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}."
                ) from None
    if not isinstance(recipe, dict):
        raise ValueError(f"`recipe_file` {path!r} must hold a mapping, got {type(recipe).__name__}.")
    unknown = sorted(set(recipe) - set(RECIPE_KEYS))
    if unknown:
        raise ValueError(f"`recipe_file` {path!r} has unknown sections {unknown}; expected some of {list(RECIPE_KEYS)}.")
    for section in ("backbone_kwargs", "config", "processor", "training"):
        value = recipe.setdefault(section, {})
        if not isinstance(value, dict):
            raise ValueError(f"`recipe_file` {path!r}: section `{section}` must be a mapping, got {value!r}.")
    recipe.setdefault("name", os.path.basename(path))
    return recipe


def _yaml_error_line(error) -> str:
    """A YAML error in one line: the problem and where it is (1-based), and where the construct it is in began."""
    mark = getattr(error, "problem_mark", None)
    if mark is None:
        return " ".join(str(error).split())
    text = f"{error.problem} at line {mark.line + 1}, column {mark.column + 1}"
    context_mark = getattr(error, "context_mark", None)
    if error.context and context_mark is not None:
        text += f" ({error.context} from line {context_mark.line + 1})"
    return text


def save_recipe(recipe: dict, path: str | os.PathLike) -> None:
    """Write `recipe` as JSON, through a temporary file renamed into place."""
    write_text_atomically(path, json.dumps(recipe, indent=2, sort_keys=True, default=list) + "\n")


__all__ = [
    "auto_recipe", "backbone_geometry", "continue_recipe", "describe_images", "fit_views", "imagenet_recipe",
    "check_known_keys", "load_recipe", "new_heads", "parse_overrides", "recipe_table", "save_recipe", "GROWTH", "step_cost",
    "target_grid", "view_geometry", "CONTINUE_TRAINING", "WARMUP_SHARE",
]
