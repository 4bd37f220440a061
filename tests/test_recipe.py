"""Recipes: the auto rule, the ImageNet recipe, command-line overrides and recipe files."""

import json
from pathlib import Path

import pytest
from PIL import Image

from msn_hf import MSNConfig, MSNImageProcessor
from msn_hf import pretraining as pt
from msn_hf.recipe import (
    RECIPE_FILE,
    auto_recipe,
    describe_images,
    imagenet_recipe,
    load_recipe,
    parse_overrides,
    recipe_table,
    save_recipe,
)

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


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
    with pytest.raises(ValueError, match=r"--config_overrides has unknown keys: \['nope'\]"):
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


# --- the pretraining command line ---------------------------------------------------------------------------------


def small_image_folder(folder, size=24, count=24):
    """Two classes of grey squares, light and dark, of `size` px."""
    for label, shade in (("light", 200), ("dark", 60)):
        (folder / label).mkdir(parents=True)
        for i in range(count // 2):
            Image.new("L", (size, size), shade + i).save(folder / label / f"{i}.png")
    return folder


def test_recipe_imagenet_reproduces_the_original_defaults(tmp_path):
    args, data_args = pt.parse_args(["--recipe", "imagenet", "--train_dir", str(tmp_path)])
    model, processor = pt.build_model_and_processor(args, data_args, pt.choose_recipe(args, data_args, None))
    assert model.config.to_dict() == MSNConfig().to_dict()
    assert processor.to_dict() == MSNImageProcessor().to_dict()
    assert (args.num_train_epochs, args.num_warmup_epochs, args.num_warmup_steps) == (800, 15, None)
    assert (args.per_device_train_batch_size, args.learning_rate, args.weight_decay) == (64, 1e-3, 0.04)


def test_overrides_reach_config_and_processor_and_are_validated(tmp_path):
    args, data_args = pt.parse_args([
        "--recipe", "imagenet", "--train_dir", str(tmp_path), "--config_overrides", "mask_ratio=0.3,target_prior=power_law",
        "--processor_overrides", "blur_sigma=[0.1,1.0],color_jitter_probability=0",
        "--backbone", "vit_tiny_patch16_224", "--backbone_kwargs", json.dumps(dict(depth=2)),
    ])  # fmt: skip
    model, processor = pt.build_model_and_processor(args, data_args, pt.choose_recipe(args, data_args, None))
    assert (model.config.mask_ratio, model.config.target_prior, len(model.encoder.blocks)) == (0.3, "power_law", 2)
    assert list(processor.blur_sigma) == [0.1, 1.0] and processor.color_jitter_probability == 0
    args.processor_overrides = "blur=1"
    with pytest.raises(ValueError, match=r"--processor_overrides has unknown MSNImageProcessor settings: \['blur'\]"):
        pt.build_model_and_processor(args, data_args, imagenet_recipe())


def test_auto_is_the_default_and_its_recipe_file_reproduces_the_run(tmp_path, capsys):
    data = small_image_folder(tmp_path / "images")
    first = tmp_path / "first"
    pt.main(["--train_dir", str(data), "--max_train_steps", "2", "--per_device_train_batch_size", "8",
             "--output_dir", str(first), "--skip_evaluation", "--learning_rate", "5e-4"])  # fmt: skip
    assert "Recipe 'auto'" in capsys.readouterr().out
    recipe = json.loads((first / RECIPE_FILE).read_text())
    config = json.loads((first / "config.json").read_text())
    processor = json.loads((first / "preprocessor_config.json").read_text())
    # 24 px grey images: the auto rule's choice, in the config and processor the run saved.
    expected = auto_recipe(24, grey=True, num_images=24, global_batch=8, planned_steps=2)
    assert config["image_size"] == 24 and config["backbone_kwargs"] == expected["backbone_kwargs"]
    assert config["position_embedding"] == "sincos" and processor["color_jitter_probability"] == 0.0
    assert recipe["training"]["learning_rate"] == 5e-4 and recipe["training"]["num_warmup_steps"] == 1
    assert RECIPE_FILE in (first / "README.md").read_text()

    second = tmp_path / "second"
    pt.main(["--train_dir", str(data), "--recipe_file", str(first / RECIPE_FILE), "--output_dir", str(second),
             "--skip_evaluation", "--logging_steps", "1"])  # fmt: skip
    for name in ("config.json", "preprocessor_config.json", RECIPE_FILE):
        assert json.loads((second / name).read_text()) == json.loads((first / name).read_text()), name
    metrics = [json.loads(line) for line in (second / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and metrics[0]["lr"] == pytest.approx(2e-4)


def test_the_recipe_file_of_a_budget_run_asks_for_the_same_budget_not_a_number_of_steps(tmp_path):
    # It recorded the run length its model was chosen for (276 steps of a run that trained 87), and no budget.
    data = small_image_folder(tmp_path / "images")
    args, _ = pt.parse_args(["--train_dir", str(data), "--max_train_time", "45s", "--per_device_train_batch_size", "8"])
    args.max_train_steps = 276  # as the planner leaves it: the length the model was chosen for
    model = pt.MSNModel(MSNConfig(backbone_kwargs=dict(embed_dim=64, depth=2, num_heads=2, patch_size=8), image_size=32,
                                  focal_image_size=16))  # fmt: skip
    save_recipe(pt.effective_recipe("auto", args, model, MSNImageProcessor()), tmp_path / "r.json")
    again, _ = pt.parse_args(["--train_dir", str(data), "--recipe_file", str(tmp_path / "r.json")])
    assert (again.max_train_time, again.max_train_steps, again.num_train_epochs) == ("45s", None, None)
    typed, _ = pt.parse_args(["--train_dir", str(data), "--recipe_file", str(tmp_path / "r.json"), "--max_train_steps", "9"])
    assert (typed.max_train_time, typed.max_train_steps) == (None, 9)


def test_recipe_file_training_settings_yield_to_explicit_flags(tmp_path):
    save_recipe(dict(imagenet_recipe(), training=dict(learning_rate=5e-4, max_train_steps=7)), tmp_path / "r.json")
    args, _ = pt.parse_args(["--recipe_file", str(tmp_path / "r.json"), "--learning_rate", "2e-3"])
    assert (args.learning_rate, args.max_train_steps, args.recipe_name) == (2e-3, 7, None)
    save_recipe(dict(imagenet_recipe(), training=dict(lr=1)), tmp_path / "bad.json")
    with pytest.raises(ValueError, match=r"`training` has unknown keys \['lr'\]"):
        pt.parse_args(["--recipe_file", str(tmp_path / "bad.json")])
    with pytest.raises(ValueError, match="--recipe must be unset when --recipe_file is given"):
        pt.parse_args(["--recipe_file", str(tmp_path / "r.json"), "--recipe", "auto"])


def test_describe_images_reads_side_and_colour_mode():
    grey_rgb = Image.merge("RGB", [Image.linear_gradient("L").resize((40, 30))] * 3)
    colour = Image.new("RGB", (64, 64), (200, 10, 10))
    assert describe_images([Image.new("L", (28, 28)), grey_rgb, Image.new("L", (32, 50))]) == (30, True)
    assert describe_images([grey_rgb, colour, colour]) == (64, False)
    with pytest.raises(ValueError, match="`images`"):
        describe_images([])
