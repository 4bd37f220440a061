"""Recipes: the auto rule, the ImageNet recipe, command-line overrides and recipe files."""

import json
from pathlib import Path

import pytest

from msn_hf import MSNConfig, MSNImageProcessor
from msn_hf.recipe import auto_recipe, imagenet_recipe, load_recipe, parse_overrides, recipe_table, save_recipe

README = Path(__file__).resolve().parents[1] / "README.md"


def build(recipe):
    """The config and processor a recipe describes (MSNConfig validates by building the backbone on meta)."""
    config = MSNConfig(backbone=recipe["backbone"], backbone_kwargs=recipe["backbone_kwargs"], **recipe["config"])
    return config, MSNImageProcessor(**recipe["processor"])


def test_imagenet_recipe_overrides_nothing():
    recipe = imagenet_recipe()
    config, processor = build(recipe)
    assert config.to_dict() == MSNConfig().to_dict()
    assert processor.to_dict() == MSNImageProcessor().to_dict()
    assert recipe["training"] == dict(num_train_epochs=800, per_device_train_batch_size=64, num_warmup_epochs=15)


def test_auto_keeps_the_paper_geometry_for_a_paper_scale_run():
    recipe = auto_recipe(image_size=224, grey=False, num_images=1_281_167, global_batch=1024, planned_steps=1_000_000)
    config, processor = build(recipe)
    assert recipe["backbone"] == "vit_small_patch16_224"
    assert recipe["backbone_kwargs"] == dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6)
    assert (config.image_size, config.focal_image_size, config.num_prototypes) == (224, 96, 1024)
    assert (config.weight_init, config.position_embedding, config.ema_momentum) == ("msn", "learned", 0.996)
    assert processor.num_focal_views == 10 and tuple(processor.blur_sigma) == (0.1, 2.0)
    assert processor.color_jitter_probability == MSNImageProcessor().color_jitter_probability


@pytest.mark.parametrize("size", [16, 28, 32, 33, 48, 64, 96, 100, 128, 224, 500])
@pytest.mark.parametrize("steps", [50, 500, 20_000])
def test_auto_recipes_are_consistent_at_any_size(size, steps):
    recipe = auto_recipe(size, grey=size < 40, num_images=10_000, global_batch=128, planned_steps=steps)
    config, processor = build(recipe)
    patch = recipe["backbone_kwargs"]["patch_size"]
    side = config.image_size
    assert side <= min(size, 224) and side % patch == 0 and config.focal_image_size % patch == 0
    assert 2 <= side // patch <= 14 and config.focal_image_size // patch >= 2
    assert config.focal_image_size < side or side // patch == 2
    # Blur relative to the view side: 0.1-2.0 px at 224 px.
    assert processor.blur_sigma[1] == pytest.approx(2.0 * side / 224, rel=1e-3)
    assert (processor.color_jitter_probability == 0.0) == (size < 40)
    assert config.num_prototypes == 128
    assert 0.9 <= config.ema_momentum <= 0.996 and recipe["training"]["num_warmup_steps"] == round(0.05 * steps)
    assert processor.crop_size["height"] == side and processor.size["shortest_edge"] >= side


def test_auto_scales_prototypes_with_the_batch_and_the_ema_with_the_run():
    small = auto_recipe(32, True, 1437, global_batch=64, planned_steps=500)
    large = auto_recipe(32, True, 1437, global_batch=4096, planned_steps=100_000)
    assert small["config"]["num_prototypes"] == 64 and large["config"]["num_prototypes"] == 1024
    assert small["config"]["ema_momentum"] == pytest.approx(1 - 5 / 500) and large["config"]["ema_momentum"] == 0.996
    assert (small["config"]["weight_init"], small["config"]["position_embedding"]) == ("mae", "sincos")


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(image_size=8), "image_size"),
        (dict(image_size=32.0), "image_size"),
        (dict(global_batch=0), "global_batch"),
        (dict(planned_steps=-1), "planned_steps"),
        (dict(num_images=True), "num_images"),
    ],
)
def test_auto_rejects_bad_inputs_naming_them(kwargs, field):
    arguments = {**dict(image_size=32, grey=True, num_images=100, global_batch=8, planned_steps=10), **kwargs}
    with pytest.raises(ValueError, match=f"`{field}`"):
        auto_recipe(**arguments)


def test_readme_table_is_what_auto_picks():
    assert recipe_table() in README.read_text(), "regenerate the README table with msn_hf.recipe.recipe_table()"


# --- overrides ---------------------------------------------------------------------------------------------------


def test_parse_overrides_values_and_errors():
    keys = ("mask_ratio", "blur_sigma", "mask_strategy", "size", "flag")
    parsed = parse_overrides(
        'mask_ratio=0.3, blur_sigma=[0.1,2.0],mask_strategy=drop,size={"shortest_edge": 32},flag=true', keys, "--x"
    )
    assert parsed == dict(
        mask_ratio=0.3, blur_sigma=[0.1, 2.0], mask_strategy="drop", size={"shortest_edge": 32}, flag=True
    )
    assert parse_overrides(None, keys, "--x") == {} and parse_overrides("", keys, "--x") == {}
    with pytest.raises(ValueError, match=r"--processor_overrides items must be key=value, got 'blur'"):
        parse_overrides("blur", keys, "--processor_overrides")
    with pytest.raises(ValueError, match=r"--config_overrides has unknown keys \['nope'\]"):
        parse_overrides("nope=1", keys, "--config_overrides")


# --- recipe files ------------------------------------------------------------------------------------------------


def test_recipe_files_round_trip_in_json_and_yaml(tmp_path):
    recipe = auto_recipe(32, True, 1437, 64, 484)
    save_recipe(recipe, tmp_path / "recipe.json")
    assert [p.name for p in tmp_path.iterdir()] == ["recipe.json"]  # no temporary file left
    loaded = load_recipe(tmp_path / "recipe.json")
    assert build(loaded)[0].to_dict() == build(recipe)[0].to_dict()
    assert build(loaded)[1].to_dict() == build(recipe)[1].to_dict()
    assert loaded["training"] == recipe["training"]

    (tmp_path / "recipe.yaml").write_text(
        "config:\n  mask_ratio: 0.3\nprocessor:\n  blur_sigma: [0.1, 1.0]\ntraining:\n  learning_rate: 0.0005\n"
    )
    loaded = load_recipe(tmp_path / "recipe.yaml")
    assert loaded["config"] == {"mask_ratio": 0.3} and loaded["processor"] == {"blur_sigma": [0.1, 1.0]}
    assert loaded["training"] == {"learning_rate": 0.0005} and loaded["backbone_kwargs"] == {}


def test_bad_recipe_files_raise_value_error(tmp_path):
    with pytest.raises(ValueError, match="`recipe_file` must be an existing"):
        load_recipe(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text(json.dumps({"optimiser": {}}))
    with pytest.raises(ValueError, match=r"unknown sections \['optimiser'\]"):
        load_recipe(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_recipe(tmp_path / "list.json")
    (tmp_path / "section.json").write_text(json.dumps({"config": [1]}))
    with pytest.raises(ValueError, match="section `config` must be a mapping"):
        load_recipe(tmp_path / "section.json")
