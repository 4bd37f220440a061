"""
The command line says what the run does: flags typed either way win over a recipe file, a broken recipe file or a
fine-tuned classifier folder is refused in one line before anything is created, `--backbone_kwargs` reach the
views, the printed recipe is the one used, and a stream resumes exactly with the default flags.
"""

import json

import pytest

from conftest import TINY_MODEL_ARGS, tiny_config
from msn_hf import MSNForImageClassification, MSNModel
from msn_hf import pretraining as pt
from msn_hf.recipe import imagenet_recipe, save_recipe

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
