"""
The command line says what the run does: flags typed either way win over a recipe file, a broken recipe file or a
fine-tuned classifier folder is refused in one line before anything is created, `--backbone_kwargs` reach the
views, the printed recipe is the one used, and a stream resumes exactly with the default flags.
"""

import io
import json
import re

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_MODEL_ARGS, logged_rows, tiny_config, train_in_process
from msn_hf import MSNForImageClassification, MSNModel
from msn_hf import pretraining as pt
from msn_hf.recipe import RECIPE_FILE, auto_recipe, imagenet_recipe, save_recipe

TINY_RUN = [*TINY_MODEL_ARGS, "--per_device_train_batch_size", "16", "--max_train_samples", "64", "--skip_evaluation"]


# --- flags typed with dashes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "typed",
    [["--learning-rate", "0.01"], ["--learning-rate=0.01"], ["--learning_rate=0.01"], ["--learning_rate", "0.01"]],
)
def test_a_flag_typed_with_dashes_or_an_equals_sign_wins_over_the_recipe_file(tmp_path, typed):
    save_recipe(dict(imagenet_recipe(), training=dict(learning_rate=5e-4, max_train_steps=7)), tmp_path / "r.json")
    args, _ = pt.parse_args(["--recipe_file", str(tmp_path / "r.json"), *typed])
    assert (args.learning_rate, args.max_train_steps) == (0.01, 7)


@pytest.mark.parametrize(
    "typed, steps, epochs, time",
    [(["--num_train_epochs", "2"], None, 2, None), (["--max_train_time", "90s"], None, None, "90s"),
     (["--max_train_steps", "5"], 5, None, None)],
)  # fmt: skip
def test_a_run_length_typed_replaces_the_recipe_files(tmp_path, typed, steps, epochs, time):
    # The file's 74 steps won over typed epochs: the run lasted 74 steps instead of 2 epochs.
    save_recipe(dict(imagenet_recipe(), training=dict(max_train_steps=74, num_train_epochs=9)), tmp_path / "r.json")
    args, _ = pt.parse_args(["--recipe_file", str(tmp_path / "r.json"), *typed])
    assert (args.max_train_steps, args.max_train_time) == (steps, time)
    assert epochs is None or args.num_train_epochs == epochs


def test_the_recipes_warmup_is_at_most_a_twentieth_of_a_short_run_and_a_typed_one_stands(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    config = tiny_config()
    # The ImageNet recipe's 15 warmup epochs, on a run of 5 epochs of 4 steps: it was all warmup, no cosine.
    args, _ = pt.parse_args(["--train_dir", str(folder), "--recipe", "imagenet", "--num_train_epochs", "5"])
    assert pt.build_schedules(args, config, steps_per_epoch=4).warmup_steps == 1  # 5 % of 20 steps
    args, _ = pt.parse_args(["--train_dir", str(folder), "--recipe", "imagenet"])  # the paper's 800 epochs: 15 stay
    assert pt.build_schedules(args, config, steps_per_epoch=4).warmup_steps == 60
    args, _ = pt.parse_args(["--train_dir", str(folder), "--recipe", "imagenet", "--num_train_epochs", "5",
                             "--num_warmup_epochs", "2"])  # fmt: skip
    assert pt.build_schedules(args, config, steps_per_epoch=4).warmup_steps == 8  # typed: it stands
    # A recipe file's warmup is a recipe's: the saved recipe of the short run gives the same warmup again.
    save_recipe(dict(imagenet_recipe(), training=dict(num_warmup_epochs=15, num_train_epochs=5)), tmp_path / "r.json")
    args, _ = pt.parse_args(["--train_dir", str(folder), "--recipe_file", str(tmp_path / "r.json")])
    assert pt.build_schedules(args, config, steps_per_epoch=4).warmup_steps == 1


# --- a broken recipe file ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, text, where",
    [
        ("r.yaml", "training:\n  learning_rate: 0.001: 2\n", "line 2"),
        ("r.yaml", "training:\n  seed: [1, 2\n", "line 2"),
        ("r.json", '{"training":\n {,}}', "line 2"),
    ],
)
def test_a_recipe_file_that_does_not_parse_is_one_line_naming_flag_file_and_line(tmp_path, name, text, where):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError) as error:
        pt.parse_args(["--recipe_file", str(tmp_path / name)])
    message = str(error.value)
    assert message.startswith("--recipe_file") and str(tmp_path / name) in message and where in message
    assert "\n" not in message


# --- a fine-tuned classifier folder -----------------------------------------------------------------------------


def test_a_classifier_folder_is_refused_naming_its_class_before_anything_is_created(tmp_path):
    folder = tmp_path / "classifier"
    MSNForImageClassification(tiny_config(num_labels=3)).save_pretrained(folder)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"MSNForImageClassification folder .*msn-convert to-vit-msn") as error:
        pt.main(["--model_name_or_path", str(folder), "--output_dir", str(out), *TINY_RUN[-5:], "--max_train_steps", "1"])
    assert "\n" not in str(error.value)
    assert not out.exists()
    args, data_args = pt.parse_args(["--model_name_or_path", str(folder)])
    with pytest.raises(ValueError, match="MSNForImageClassification"):
        pt.build_model_and_processor(args, data_args)


def test_the_folder_of_the_starting_weights_is_refused_as_the_output_folder(tmp_path):
    # With --overwrite_output_dir the run removed the weights it was about to start from.
    folder = tmp_path / "msn"
    MSNModel(tiny_config()).save_pretrained(folder)
    weights = (folder / "model.safetensors").read_bytes()
    for output_dir in (folder, tmp_path / "." / "msn"):
        with pytest.raises(ValueError, match=r"--output_dir must be another folder than --model_name_or_path"):
            pt.main(["--model_name_or_path", str(folder), "--output_dir", str(output_dir), "--overwrite_output_dir",
                     *TINY_RUN[-5:], "--max_train_steps", "1"])  # fmt: skip
    assert (folder / "model.safetensors").read_bytes() == weights


# --- --backbone_kwargs reach the views --------------------------------------------------------------------------


def built(argv: list[str], recipe: dict | None = None):
    args, data_args = pt.parse_args(argv)
    return pt.build_model_and_processor(args, data_args, recipe or pt.choose_recipe(args, data_args, None))


def assert_views_fit(model, processor):
    """Crops at the config's sides, both multiples of the backbone's patch, and the model runs on the views."""
    config, patch = model.config, model.encoder.patch_embed.patch_size[0]
    assert (processor.crop_size["height"], processor.focal_crop_size["height"]) == (config.image_size, config.focal_image_size)
    assert config.image_size % patch == 0 and config.focal_image_size % patch == 0
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8)) for i in range(2)]
    views = processor(images, return_views=True, seed=0, return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model.train()(**views).loss)


def test_img_size_and_patch_size_of_backbone_kwargs_set_the_views():
    # The flag's own help example, without a recipe: MSNConfig's 224 / 96 px views become 32 px and 96 / 224 of it.
    model, processor = built(["--backbone", "vit_tiny_patch16_224", "--backbone_kwargs", '{"img_size": 32, "patch_size": 4, "depth": 1}'])
    assert model.config.image_size == 32 and model.encoder.patch_embed.patch_size == (4, 4)
    assert model.config.focal_image_size == 4 * round(32 * 96 / 224 / 4)
    assert processor.size["shortest_edge"] == round(32 * 256 / 224)
    assert_views_fit(model, processor)


def test_a_partial_backbone_kwargs_merges_into_the_auto_recipe():
    recipe = auto_recipe(32, False, 1000, 16, 100)
    model, processor = built(["--backbone_kwargs", '{"depth": 2}'], recipe)
    assert model.config.backbone_kwargs == {**recipe["backbone_kwargs"], "depth": 2}
    assert model.config.image_size == recipe["config"]["image_size"] and len(model.encoder.blocks) == 2
    assert model.config.focal_image_size == recipe["config"]["focal_image_size"]


def test_a_patch_that_does_not_divide_the_recipe_side_moves_the_views_to_a_multiple():
    recipe = auto_recipe(32, False, 1000, 16, 100)  # 32 px views of 8 px patches, 16 px focal views
    model, processor = built(["--backbone_kwargs", '{"patch_size": 6, "depth": 1}'], recipe)
    side = model.config.image_size
    assert side % 6 == 0 and 32 - 6 < side <= 32 and model.config.backbone_kwargs["img_size"] == side
    assert abs(model.config.focal_image_size / side - 16 / 32) <= 6 / side  # the recipe's ratio, to a patch
    assert processor.size["shortest_edge"] == side and processor.blur_sigma[1] < recipe["processor"]["blur_sigma"][1]
    assert_views_fit(model, processor)


def test_img_size_and_a_different_image_size_override_are_refused_before_anything_is_created(tmp_path):
    argv = ["--backbone", "vit_tiny_patch16_224", "--backbone_kwargs", '{"img_size": 32, "patch_size": 4}',
            "--config_overrides", "image_size=64"]  # fmt: skip
    with pytest.raises(ValueError, match=r"--config_overrides image_size=64 must equal --backbone_kwargs img_size 32"):
        pt.main([*argv, *TINY_RUN[-5:], "--max_train_steps", "1", "--output_dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()
    model, _ = built([*argv[:4], "--config_overrides", "image_size=32"])  # the same side twice is fine
    assert model.config.image_size == 32


# --- the printed recipe is the one used -------------------------------------------------------------------------


def test_the_printed_and_saved_recipe_are_what_the_run_uses(tmp_path, capsys):
    out = tmp_path / "run"
    pt.main([
        "--max_train_samples", "64", "--per_device_train_batch_size", "16", "--max_train_steps", "1",
        "--skip_evaluation", "--num_focal_views", "3", "--config_overrides", "mask_ratio=0.3",
        "--processor_overrides", "blur_sigma=[0.1,1.0]", "--num_warmup_steps", "2", "--output_dir", str(out),
    ])  # fmt: skip
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("Recipe 'auto'"))
    saved = json.loads((out / RECIPE_FILE).read_text())
    config = json.loads((out / "config.json").read_text())
    processor = json.loads((out / "preprocessor_config.json").read_text())
    assert saved["config"] == {k: config[k] for k in saved["config"]}
    assert {k: saved["processor"][k] for k in ("num_focal_views", "blur_sigma", "crop_size", "focal_crop_size")} == {
        k: processor[k] for k in ("num_focal_views", "blur_sigma", "crop_size", "focal_crop_size")
    }
    assert processor["num_focal_views"] == 3 and saved["training"]["num_warmup_steps"] == 2
    for key in ("mask_ratio", "image_size", "focal_image_size", "ema_momentum"):
        assert f"'{key}': {config[key]!r}" in line, key
    assert f"'num_focal_views': {processor['num_focal_views']}" in line
    assert re.search(r"'blur_sigma': [\[(]0\.1, 1\.0[\])]", line) and "warmup 2 steps" in line


# --- a stream resumes exactly with the default flags ------------------------------------------------------------


@pytest.fixture(scope="module")
def many_row_shards(tmp_path_factory):
    """Four parquet shards of 2,600 tiny 8 px images each, rows r00000 ... r10399: more rows than the old default
    shuffle buffer (10,000) held, so that a buffer at the default would sit full at a checkpoint."""
    folder = tmp_path_factory.mktemp("many_rows")
    rng = np.random.default_rng(0)
    for shard in range(4):
        images = []
        for _ in range(2600):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buffer, "PNG")
            images.append({"bytes": buffer.getvalue(), "path": None})
        ids = [f"r{2600 * shard + i:05d}" for i in range(2600)]
        features = datasets.Features({"image": datasets.Image(), "id": datasets.Value("string")})
        datasets.Dataset.from_dict({"image": images, "id": ids}, features=features).to_parquet(
            str(folder / f"train-{shard}.parquet")
        )
    return folder


def test_a_resume_with_other_processes_or_batches_is_refused_before_it_moves_anything(tmp_path):
    # The checkpoint's place in the epoch is a count of batches of this process: with another number of processes or
    # another batch, 12 of 40 images were trained twice (2 processes resumed on 1) or 16 never (1 on 2), and the
    # schedules were laid over a new total mid-run. Streams were refused; map-style data was not.
    out = tmp_path / "run"
    pt.main([*TINY_RUN, "--max_train_steps", "3", "--checkpointing_steps", "1", "--output_dir", str(out)])
    checkpoint = out / "checkpoint-2"  # checkpoint-3 is past it: a resume would set it aside
    kept = {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()}
    resume = [*TINY_RUN, "--max_train_steps", "3", "--output_dir", str(out), "--resume_from_checkpoint", str(checkpoint)]
    with pytest.raises(ValueError, match=r"--per_device_train_batch_size .*16.* got 8"):
        pt.main([*resume, "--per_device_train_batch_size", "8"])
    with pytest.raises(ValueError, match=r"--gradient_accumulation_steps .*1.* got 2"):
        pt.main([*resume, "--gradient_accumulation_steps", "2"])
    state_file = checkpoint / "training_state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "layout": {**state["layout"], "num_processes": 2}}))
    with pytest.raises(ValueError, match=r"--resume_from_checkpoint .* 2 processes.* got 1"):
        pt.main(resume)
    assert {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()} == kept
    assert sorted(path.name for path in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]


def test_a_stream_resumes_exactly_with_the_default_flags(tmp_path, many_row_shards, monkeypatch):
    # A checkpoint after 47 steps of 128 rows: past the first half of a 10,000-row buffer, which datasets would
    # have lost at the resume.
    steps, saved_at, batch = 49, 47, 128
    # The rows are the point, not the model: the smallest geometry there is (2 x 2 tokens, one focal view) keeps the
    # 6,000 rows of views cheap.
    smallest = ["--backbone_kwargs", json.dumps(dict(embed_dim=32, depth=1, num_heads=1, img_size=16, patch_size=8)),
                "--config_overrides", "image_size=16,focal_image_size=8,projection_hidden_size=32,"
                "projection_output_size=16,num_prototypes=16", "--num_focal_views", "1"]  # fmt: skip
    common = [*TINY_MODEL_ARGS, *smallest, "--skip_evaluation", "--train_files", str(many_row_shards / "*.parquet"),
              "--streaming", "--per_device_train_batch_size", str(batch), "--seed", "2", "--logging_steps", "10"]  # fmt: skip
    straight_log, split_log = tmp_path / "straight_log", tmp_path / "split_log"
    train_in_process(monkeypatch, [*common, "--max_train_steps", steps, "--output_dir", tmp_path / "straight"],
                     straight_log)  # fmt: skip
    train_in_process(monkeypatch, [*common, "--max_train_steps", saved_at, "--checkpointing_steps", saved_at,
                                   "--output_dir", tmp_path / "split"], split_log)  # fmt: skip
    (split_log / "rows_0.txt").unlink()
    train_in_process(monkeypatch, [*common, "--max_train_steps", steps, "--output_dir", tmp_path / "split",
                                   "--resume_from_checkpoint", tmp_path / "split" / f"checkpoint-{saved_at}"],
                     split_log)  # fmt: skip
    straight = logged_rows(straight_log, 0)
    assert len(straight) == steps * batch == len(set(straight))
    assert logged_rows(split_log, 0) == straight[saved_at * batch :]  # nothing repeated, nothing skipped


def test_a_missing_local_weights_file_is_named_missing_rather_than_read_as_a_hub_id(tmp_path):
    # It was sent to timm as a Hub id, whose message was about the characters a repository id may hold.
    for path in (str(tmp_path / "missing.safetensors"), "./weights/vit.safetensors"):
        with pytest.raises(ValueError, match=r"--backbone_pretrained must be a weights file or a Hub id; nothing is at "):
            pt.parse_args(["--backbone_pretrained", path])
    args, _ = pt.parse_args(["--backbone_pretrained", "timm/vit_small_patch16_224.augreg_in21k"])
    assert args.backbone_pretrained == "timm/vit_small_patch16_224.augreg_in21k"
