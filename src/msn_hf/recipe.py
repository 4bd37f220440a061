"""
Pretraining recipes: what model, views and schedule a run gets when the user does not choose them.

- `imagenet_recipe()`: the authors' ViT-S/16 recipe (224 px views, 10 focal views at 96 px, 1,024 prototypes), i.e.
  msn_hf's defaults, unchanged.
- `auto_recipe(...)`: a rule from what is known before training (image side, grey or colour, dataset size, global
  batch, planned steps) to a model, views and schedule that learn in that budget. At 224 px with a long run it
  keeps the paper's geometry; small images and short runs get a grid near 8 x 8 to 14 x 14 tokens, focal views
  scaled with the image, blur scaled with the view side, no colour jitter on grey data, about one prototype per
  batch image, a faster EMA and MAE-style initialisation with fixed sine-cosine position embeddings (the sweeps
  that chose these rules are in benchmarks/RESULTS.md).

A recipe is a plain dict `{"name", "backbone", "backbone_kwargs", "config", "processor", "training"}` that
`save_recipe` writes as JSON and `load_recipe` reads back (JSON or YAML), so that a run can be reproduced from
the recipe file it wrote.
"""

import json
import math
import os
import tempfile
from collections.abc import Iterable

RECIPE_KEYS = ("name", "backbone", "backbone_kwargs", "config", "processor", "training")
RECIPE_FILE = "msn_recipe.json"

# The ViT-S/16 release (MSN_REFERENCE.md): these are also the defaults of MSNConfig, MSNImageProcessor and the
# pretraining script, so the ImageNet recipe changes nothing.
IMAGENET_TRAINING = dict(num_train_epochs=800, per_device_train_batch_size=64, num_warmup_epochs=15)

# Widths of the encoders the auto rule picks from, smallest first: (images seen during the run up to which it is
# used, backbone_kwargs, projection hidden / output sizes).
_MODEL_SIZES = (
    (200_000, dict(embed_dim=128, depth=4, num_heads=4), (512, 128)),
    (5_000_000, dict(embed_dim=192, depth=12, num_heads=3), (1024, 256)),
    (math.inf, dict(embed_dim=384, depth=12, num_heads=6), (2048, 256)),
)
# Largest token grid of a view, by images seen during the run: the paper's 14 x 14 for long runs; coarser for
# short ones, where a step must be cheap (a 4 x 4 grid trains ~4x more steps than 8 x 8 in the same time, which
# won on the digits: benchmarks/RESULTS.md).
_GRID_BY_RUN = ((100_000, 4), (200_000, 8), (math.inf, 14))
# The paper's geometry at 224 px.
_PAPER_SIDE, _PAPER_FOCAL_SIDE, _PAPER_BLUR = 224, 96, (0.1, 2.0)


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


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"auto_recipe: `{name}` must be a positive integer, got {value!r}.")


def _patch_size(side: int, max_grid: int) -> int:
    """The smallest patch (at least 4 px) dividing `side` whose grid has at most `max_grid` tokens per row."""
    candidates = [p for p in range(4, side + 1) if side % p == 0 and side // p <= max_grid]
    if not candidates:
        return side
    return candidates[0]


def auto_recipe(image_size: int, grey: bool, num_images: int, global_batch: int, planned_steps: int) -> dict:
    """
    The recipe the `auto` rule picks for a run (a pure function of its arguments).

    Args:
        image_size: side of the images (their shortest side; the views are square crops of that side).
        grey: whether the images are grey-scale (colour jitter then only changes brightness: off).
        num_images: training images.
        global_batch: images per optimiser step over all processes.
        planned_steps: optimiser steps of the run.

    Rules (constants chosen by the sweeps in benchmarks/RESULTS.md):
        - view side: `image_size` rounded down to a multiple of 4 (at most 224);
        - patch size: the smallest divisor of the side, at least 4 px, whose grid is at most 14 x 14 (the paper's),
          8 x 8 for runs that see fewer than 200,000 images, 4 x 4 below 100,000;
        - focal side: 96 / 224 of the view side as a multiple of the patch, at least two patches; focal views:
          10 for runs of the paper's scale, fewer for short runs so that focal tokens cost about as much as the
          anchor view's;
        - blur sigma: (0.1, 2.0) x side / 224; colour jitter off for grey data;
        - encoder width and depth, projection head: by images seen (a 4-block, 128-wide ViT below 200,000, ViT-Ti
          below 5 million, ViT-S/16 above);
        - prototypes: the power of two nearest to the global batch, between 16 and 1,024;
        - EMA momentum start: 0.996, or `1 - 5 / planned_steps` when lower (a time constant of a fifth of the run);
        - warmup: 5 % of the planned steps (the paper: 15 of 800 epochs, 1.9 %, of a far longer run);
        - initialisation: the authors' (`weight_init="msn"`, learned position embeddings) for runs of the paper's
          scale on grids of 12 x 12 tokens or more, else MAE-style with fixed sine-cosine position embeddings
          (learned positions start as noise and need many steps per position).
    """
    for name, value in (
        ("image_size", image_size), ("num_images", num_images), ("global_batch", global_batch),
        ("planned_steps", planned_steps),
    ):
        _check_positive_int(name, value)
    if image_size < 16:
        raise ValueError(f"auto_recipe: `image_size` must be at least 16 px, got {image_size}.")
    side = min(_PAPER_SIDE, image_size - image_size % 4)
    images_seen = planned_steps * global_batch
    max_grid = next(grid for limit, grid in _GRID_BY_RUN if images_seen < limit)
    patch = _patch_size(side, max_grid)
    grid = side // patch

    focal_patches = max(2, round(grid * _PAPER_FOCAL_SIDE / _PAPER_SIDE))
    focal_side = focal_patches * patch
    paper_scale = images_seen >= _MODEL_SIZES[1][0]
    # Short runs: as many focal views as make their tokens cost about the anchor view's (at least 2).
    num_focal = 10 if paper_scale else max(2, min(10, round(grid**2 / focal_patches**2)))

    sizes = next((kwargs, head) for limit, kwargs, head in _MODEL_SIZES if images_seen < limit)
    backbone_kwargs, (hidden, output) = sizes
    num_prototypes = int(min(1024, max(16, 2 ** round(math.log2(global_batch)))))
    scale = side / _PAPER_SIDE
    blur = (round(_PAPER_BLUR[0] * scale, 4), round(_PAPER_BLUR[1] * scale, 4))

    config = dict(
        image_size=side,
        focal_image_size=focal_side,
        projection_hidden_size=hidden,
        projection_output_size=output,
        num_prototypes=num_prototypes,
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
        training=dict(num_warmup_steps=max(1, round(0.05 * planned_steps))),
    )


def _ema_start(planned_steps: int) -> float:
    """
    EMA momentum at step 0: the paper's 0.996 (a time constant 1 / (1 - m) of 250 steps), or, for shorter runs, a
    time constant of a fifth of the run, so that the target follows the anchor within the run: `1 - 5 / steps`.
    """
    return round(min(0.996, max(0.9, 1.0 - 5.0 / planned_steps)), 4)


# Runs of the README table: minutes on a CPU (the digits' size), an hour or so, and a long multi-GPU run.
TABLE_RUNS = (
    ("minutes: batch 64, 500 steps", 64, 500),
    ("short: batch 64, 2,000 steps", 64, 2_000),
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

    from .data import to_rgb

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
    valid = set(valid_keys)
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(f"{flag_name} has unknown {what}: {unknown}; expected some of {sorted(valid)}.")
    return overrides


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

            recipe = yaml.safe_load(handle)
        else:
            recipe = json.load(handle)
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


def save_recipe(recipe: dict, path: str | os.PathLike) -> None:
    """Write `recipe` as JSON, through a temporary file renamed into place."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as out:
            json.dump(recipe, out, indent=2, sort_keys=True, default=list)
            out.write("\n")
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


__all__ = ["auto_recipe", "describe_images", "imagenet_recipe", "load_recipe", "parse_overrides", "recipe_table", "save_recipe"]
