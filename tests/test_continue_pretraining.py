"""
Continued pretraining from released weights in one flag: `--model_name_or_path` of a Transformers ViT / ViTMSN or
an msn_hf folder (or `--backbone_pretrained`) runs the `continue` recipe, starts exactly at the source, keeps it
(the target does not forget the start) and names it on the card. Tiny random models saved in `tmp_path`, offline.
"""

import json

import pytest
import timm
import torch
from huggingface_hub import ModelCard
from safetensors.torch import save_file

from conftest import TINY_BACKBONE_KWARGS, tiny_config
from msn_hf import MSNImageProcessor, MSNModel
from msn_hf import pretraining as pt
from msn_hf.modelcard import write_model_card
from msn_hf.recipe import CONTINUE_TRAINING, RECIPE_FILE, auto_recipe, continue_recipe
from test_continue_from_vit import IMAGE, pixels, randomize_, saved_vit, source_tokens

# Small heads for the 64-wide source ViTs, given: `continue_recipe` called without `new_heads_width`, as here, leaves
# the import MSNConfig's 2,048-wide head.
SMALL_HEAD = "projection_hidden_size=64,projection_output_size=32,num_prototypes=16"
RUN = ["--max_train_samples", "64", "--per_device_train_batch_size", "16", "--skip_evaluation", "--logging_steps", "1"]


# --- the recipe -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("native, patch, image, grey", [(224, 16, 32, True), (32, 8, 96, False), (518, 14, 500, False)])
def test_continue_keeps_the_backbone_and_takes_the_views_of_the_auto_rule(native, patch, image, grey):
    run = dict(num_images=5000, global_batch=64, planned_steps=1000)
    recipe, auto = continue_recipe(native, patch, image, grey, **run), auto_recipe(image, grey, **run)
    assert set(recipe) == set(auto) and recipe["name"] == "continue"
    config, views = recipe["config"], recipe["processor"]
    assert config["image_size"] == views["crop_size"] == native
    focal = config["focal_image_size"]
    assert focal == views["focal_crop_size"] and focal % patch == 0 and 0 < focal < native
    auto_ratio = auto["config"]["focal_image_size"] / auto["config"]["image_size"]
    assert abs(focal / native - auto_ratio) <= patch / native / 2 + 1e-9  # the auto ratio, to the nearest patch
    assert views["num_focal_views"] == auto["processor"]["num_focal_views"]
    blur_per_pixel = [sigma / native for sigma in views["blur_sigma"]]
    assert blur_per_pixel == pytest.approx([s / auto["config"]["image_size"] for s in auto["processor"]["blur_sigma"]], rel=1e-2)
    assert views.get("color_jitter_probability", 0.8) == auto["processor"].get("color_jitter_probability", 0.8)
    # Slower than from scratch everywhere: a quarter of the learning rates, a shorter warmup, a slower EMA.
    training = recipe["training"]
    assert training["learning_rate"] == pt.FROM_SCRATCH_TRAINING["learning_rate"] / 4
    assert training["warmup_start_learning_rate"] == pt.FROM_SCRATCH_TRAINING["warmup_start_learning_rate"] / 4
    assert 1 <= training["num_warmup_steps"] < auto["training"]["num_warmup_steps"]
    assert config["ema_momentum"] > auto["config"]["ema_momentum"]
    with pytest.raises(ValueError, match="`native_size` must be a multiple of `patch_size` 16"):
        continue_recipe(100, 16, image, grey, **run)


def test_weights_make_continue_the_default_and_typed_learning_rates_still_win(tmp_path):
    MSNModel(tiny_config()).save_pretrained(tmp_path / "msn")
    for weights in (["--model_name_or_path", str(tmp_path / "msn")], ["--backbone_pretrained", "some/timm-weights"]):
        args, _ = pt.parse_args(weights)
        assert args.recipe_name == "continue"
        assert (args.learning_rate, args.warmup_start_learning_rate) == tuple(CONTINUE_TRAINING.values())
        assert args.num_warmup_epochs is None  # the recipe's warmup, a fraction of the planned steps
        assert pt.parse_args([*weights, "--learning-rate", "0.002"])[0].learning_rate == 0.002
    assert pt.parse_args(["--model_name_or_path", str(tmp_path / "msn"), "--recipe", "continue"])[0].recipe_name == "continue"
    assert pt.parse_args([])[0].learning_rate == pt.FROM_SCRATCH_TRAINING["learning_rate"]
    with pytest.raises(ValueError, match="--recipe must be 'continue' only with weights to start from"):
        pt.parse_args(["--recipe", "continue"])
    with pytest.raises(ValueError, match="--model_name_or_path must be given without --recipe auto/imagenet"):
        pt.parse_args(["--model_name_or_path", str(tmp_path / "msn"), "--recipe", "auto"])


@pytest.mark.parametrize("flag, value", [("--backbone", "vit_small_patch16_224"), ("--backbone_kwargs", '{"depth": 2}')])
def test_a_backbone_flag_beside_weights_is_refused_not_ignored(tmp_path, flag, value):
    MSNModel(tiny_config()).save_pretrained(tmp_path / "msn")
    with pytest.raises(ValueError, match=f"{flag} must be unset with --model_name_or_path"):
        pt.parse_args(["--model_name_or_path", str(tmp_path / "msn"), flag, value])
    assert pt.parse_args([flag, value])[0].model_name_or_path is None  # alone, the flag stays a from-scratch choice


@pytest.mark.parametrize("start", ["vit", "timm", "msn"])
def test_new_heads_follow_the_auto_rule_and_a_folders_own_heads_are_kept(tmp_path, start):
    # A start without MSN heads (a Transformers ViT, timm weights) gets new ones, sized as the auto rule sizes them
    # for its width and batch: not MSNConfig's 2,048 / 256 / 1,024, made for a paper-scale batch.
    from accelerate import Accelerator

    if start == "vit":
        saved_vit(tmp_path / "vit", "vit")
        flags = ["--model_name_or_path", str(tmp_path / "vit")]
    elif start == "timm":
        vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, **TINY_BACKBONE_KWARGS)
        save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, tmp_path / "vit.safetensors")
        flags = ["--backbone", "vit_tiny_patch16_224", "--backbone_kwargs", json.dumps(TINY_BACKBONE_KWARGS),
                 "--backbone_pretrained", str(tmp_path / "vit.safetensors")]  # fmt: skip
    else:
        start_model = MSNModel(tiny_config(num_prototypes=24))
        start_model.save_pretrained(tmp_path / "msn")
        flags = ["--model_name_or_path", str(tmp_path / "msn")]
    args, data_args = pt.parse_args([*flags, *RUN, "--max_train_steps", "10"])
    train_data = pt.build_train_data(data_args, args, Accelerator(cpu=True))
    model, _ = pt.build_model_and_processor(args, data_args, pt.choose_recipe(args, data_args, train_data))
    head = (model.config.projection_hidden_size, model.config.projection_output_size, model.config.num_prototypes)
    if start == "msn":
        assert model.config.num_prototypes == 24 and model.prototypes.shape[0] == 24  # the folder's own
        return
    # The auto rule at a global batch of 16 for an encoder under 192 wide (this one is 64).
    scratch = auto_recipe(32, True, 64, 16, 10)["config"]
    assert head == (scratch["projection_hidden_size"], scratch["projection_output_size"], scratch["num_prototypes"])
    assert head == (512, 128, 16) and model.prototypes.shape[0] == 16


def test_timm_weights_are_fed_images_normalised_as_timm_states_for_them(tmp_path):
    # timm's augreg ViTs were trained on [-1, 1] inputs (mean and std 0.5), not ImageNet's mean and std.
    from accelerate import Accelerator

    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, **TINY_BACKBONE_KWARGS)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, tmp_path / "vit.safetensors")
    timm_mean = list(timm.data.resolve_model_data_config(vit)["mean"])
    flags = ["--backbone", "vit_tiny_patch16_224", "--backbone_kwargs", json.dumps(TINY_BACKBONE_KWARGS),
             "--backbone_pretrained", str(tmp_path / "vit.safetensors"), *RUN, "--max_train_steps", "10"]  # fmt: skip
    for extra, mean in (([], timm_mean), (["--processor_overrides", "image_mean=[0.4,0.4,0.4]"], [0.4] * 3)):
        args, data_args = pt.parse_args([*flags, *extra])
        train_data = pt.build_train_data(data_args, args, Accelerator(cpu=True))
        _, processor = pt.build_model_and_processor(args, data_args, pt.choose_recipe(args, data_args, train_data))
        assert list(processor.image_mean) == mean and timm_mean == [0.5] * 3


# --- continued pretraining, end to end ------------------------------------------------------------------------


def encoder_tokens(encoder, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return encoder.eval().forward_features(images)


@pytest.mark.parametrize("source", ["vit_msn", "vit"])
def test_continued_pretraining_starts_at_a_transformers_vit_and_names_it(tmp_path, source):
    folder = tmp_path / source
    reference = saved_vit(folder, source)
    argv = ["--model_name_or_path", str(folder), "--config_overrides", SMALL_HEAD, *RUN]

    # Step 0: both encoders are the source's encoder.
    args, data_args = pt.parse_args(argv)
    recipe = continue_recipe(*pt.starting_geometry(args), IMAGE, True, 64, 16, 2)
    model, processor = pt.build_model_and_processor(args, data_args, recipe)
    images = pixels()
    expected = source_tokens(reference, images)
    for encoder in (model.encoder, model.target_encoder):
        torch.testing.assert_close(encoder_tokens(encoder, images), expected, atol=1e-4, rtol=0)
    assert processor.crop_size["height"] == model.config.image_size == IMAGE and model.config.ema_momentum == 0.999

    # A few steps of the continue recipe, and the card names the start.
    out = tmp_path / "run"
    pt.main([*argv, "--max_train_steps", "2", "--output_dir", str(out)])
    used = json.loads((out / RECIPE_FILE).read_text())
    assert used["name"] == "continue" and used["config"]["ema_momentum"] == 0.999
    assert used["training"]["learning_rate"] == CONTINUE_TRAINING["learning_rate"]
    assert f"| started from | `{folder.resolve()}` |" in (out / "README.md").read_text()
    assert json.loads((out / "msn_card.json").read_text())["base_model"] == str(folder.resolve())


def test_continued_pretraining_from_an_msn_folder_and_from_timm_weights(tmp_path):
    torch.manual_seed(0)
    start = randomize_(MSNModel(tiny_config()), seed=5)
    start.save_pretrained(tmp_path / "msn")
    args, data_args = pt.parse_args(["--model_name_or_path", str(tmp_path / "msn")])
    model, _ = pt.build_model_and_processor(args, data_args, continue_recipe(*pt.starting_geometry(args), 32, True, 64, 16, 2))
    # Everything, heads and prototypes included, is the folder's; only the EMA start is the recipe's.
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in start.state_dict().items())
    assert model.config.ema_momentum == 0.999

    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, **TINY_BACKBONE_KWARGS)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, tmp_path / "vit.safetensors")
    flags = ["--backbone", "vit_tiny_patch16_224", "--backbone_kwargs", json.dumps(TINY_BACKBONE_KWARGS),
             "--backbone_pretrained", str(tmp_path / "vit.safetensors"), "--config_overrides", SMALL_HEAD]  # fmt: skip
    args, data_args = pt.parse_args(flags)
    assert args.recipe_name == "continue" and pt.starting_geometry(args) == (32, 8)
    model, processor = pt.build_model_and_processor(args, data_args, continue_recipe(32, 8, 32, True, 64, 16, 2))
    images = pixels()
    for encoder in (model.encoder, model.target_encoder):
        torch.testing.assert_close(encoder_tokens(encoder, images), encoder_tokens(vit, images), atol=1e-5, rtol=0)
    assert processor.crop_size["height"] == 32


def test_the_target_keeps_the_start_under_the_continue_recipe(tmp_path):
    """
    What 8 steps do to the class token of random images, against the source's (step 0): under the continue recipe
    the target's stays at a cosine similarity above 0.99999, moves less than 5 % as far as the anchor's (the slow
    EMA start), and the anchor's moves less than half as far as under the from-scratch learning rates and EMA start,
    which take the target more than ten times as far from the start.
    """
    folder = tmp_path / "vit"
    reference = saved_vit(folder, "vit")
    steps = 8
    argv = ["--model_name_or_path", str(folder), *RUN, "--max_train_steps", str(steps)]
    pt.main([*argv, "--config_overrides", SMALL_HEAD, "--output_dir", str(tmp_path / "continue")])
    scratch = auto_recipe(IMAGE, True, 64, 16, steps)  # what a run of this length gets from scratch
    pt.main([
        *argv, "--config_overrides", f"{SMALL_HEAD},ema_momentum={scratch['config']['ema_momentum']}",
        "--learning_rate", str(pt.FROM_SCRATCH_TRAINING["learning_rate"]),
        "--warmup_start_learning_rate", str(pt.FROM_SCRATCH_TRAINING["warmup_start_learning_rate"]),
        "--num_warmup_steps", str(scratch["training"]["num_warmup_steps"]), "--output_dir", str(tmp_path / "scratch"),
    ])  # fmt: skip
    images = pixels(8, seed=4)
    start = source_tokens(reference, images)[:, 0]

    def class_tokens(run: str) -> tuple[torch.Tensor, torch.Tensor]:
        model = MSNModel.from_pretrained(tmp_path / run).eval()
        with torch.no_grad():
            return model(pixel_values=images).pooler_output, model.encoder.forward_features(images)[:, 0]

    (target, anchor), (scratch_target, scratch_anchor) = class_tokens("continue"), class_tokens("scratch")
    kept = torch.nn.functional.cosine_similarity(target, start).min().item()
    moved = torch.nn.functional.cosine_similarity(scratch_target, start).min().item()
    assert kept > 0.99999 and 1 - moved > 10 * (1 - kept), (kept, moved)
    distance = lambda features: (features - start).norm(dim=-1)  # noqa: E731
    assert (distance(target) < 0.05 * distance(anchor)).all()
    assert (distance(anchor) < 0.5 * distance(scratch_anchor)).all()


def test_a_hub_base_model_is_in_the_card_metadata_and_a_local_one_in_the_table_only(tmp_path):
    model, processor = MSNModel(tiny_config()), MSNImageProcessor(crop_size=32, focal_crop_size=16)
    for base_model, in_metadata in (("facebook/vit-msn-small", True), (str(tmp_path / "local-vit"), False)):
        card = ModelCard.load(write_model_card(tmp_path, model, processor, {"base_model": base_model}))
        assert card.data.base_model == (base_model if in_metadata else None)
        assert f"| started from | `{base_model}` |" in card.text
