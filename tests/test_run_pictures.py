"""
What a run shows: the pictures of what was learnt (neighbours, low-shot curves, prototype usage), written by every
run with labels and by `msn-evaluate`, embedded in a card that is ready to push, with the pixel baseline first.
"""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from conftest import TINY_MODEL_ARGS, tiny_config
from msn_hf import MSNModel, pictures
from msn_hf import evaluation as ev
from msn_hf import pretraining as pt

CLASSES = ("circle", "square", "stripes")


def shapes_folder(root, per_class: int = 12, side: int = 40):
    """An imagefolder of three visually distinct classes, slightly varied per image."""
    rng = np.random.default_rng(0)
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            canvas = np.full((side, side, 3), 30 + rng.integers(0, 20), dtype=np.uint8)
            y, x = np.mgrid[:side, :side]
            if name == "circle":
                canvas[(y - side / 2) ** 2 + (x - side / 2) ** 2 < (side / 3) ** 2] = (220, 60, 60)
            elif name == "square":
                canvas[side // 4 : 3 * side // 4, side // 4 : 3 * side // 4] = (60, 200, 60)
            else:
                canvas[(x // 4) % 2 == 0] = (60, 60, 220)
            Image.fromarray(canvas).save(root / name / f"{i}.png")
    return root


def png_size(path):
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return image.format, image.size


def test_prototype_assignments_are_the_target_branch_probabilities():
    model = MSNModel(tiny_config()).eval()
    pixel_values = torch.randn(5, 3, 32, 32)
    probs = model.prototype_assignments(pixel_values)
    # plain re-derivation: target class token -> target head -> cosine with the prototypes / temperature -> softmax
    with torch.no_grad():
        tokens = model.target_encoder.forward_features(pixel_values)[:, 0]
        embedding = model.target_projection_head(tokens)
        logits = F.normalize(embedding, dim=-1) @ F.normalize(model.prototypes, dim=-1).t() / model.config.temperature
    torch.testing.assert_close(probs, logits.softmax(dim=-1), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(probs.sum(dim=-1), torch.ones(5))


@pytest.mark.slow
def test_a_run_with_labels_draws_the_pictures_and_a_card_ready_to_push(tmp_path):
    data = shapes_folder(tmp_path / "parts-line")
    out = tmp_path / "run"
    pt.main([*TINY_MODEL_ARGS, "--train_dir", str(data), "--per_device_train_batch_size", "8",
             "--max_train_steps", "2", "--output_dir", str(out)])  # fmt: skip

    results = json.loads((out / ev.RESULTS_FILE).read_text())
    assert set(results["encoders"]) == {"msn", "random", "pixels"}  # the honest comparison, by default
    queries = min(ev.NEIGHBOUR_QUERIES, len(CLASSES))
    neighbours = min(ev.NEIGHBOURS, results["settings"]["num_train"])
    cell, header = int(pictures.CELL_INCHES * pictures.DPI), int(pictures.HEADER_INCHES * pictures.DPI)
    chart = tuple(int(side * pictures.DPI) for side in pictures.CHART_INCHES)
    expected = {
        pictures.NEIGHBOURS_FILE: (2 * (neighbours + 1) * cell, queries * cell + header),  # model and pixel panels
        pictures.LOWSHOT_FILE: chart,
        pictures.PROTOTYPES_FILE: chart,
    }
    for name, size in expected.items():
        assert png_size(out / name) == ("PNG", size), name
    usage = results["pictures"]["prototypes"]
    assert usage["num_prototypes"] == 16 and 1 <= usage["used"] <= 16

    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    for name in expected:
        assert f"]({name})" in card, name
    assert f"**{usage['used']} of the 16 prototypes**" in card
    assert "| raw pixels |" in card and "| random init" in card
    # named by its name, not its path; the snippets work as written; the classifier has this data's classes
    assert "# MSN " in card and "pretrained on parts-line" in card and str(tmp_path) not in card.split("## Usage")[0]
    assert meta["model-index"][0]["results"][0]["dataset"]["name"] == "parts-line"
    assert "path/to/this/folder" not in card and f'model="{out}"' in card
    assert f"num_labels={len(CLASSES)}," in card
    assert meta["license"]
    # 1 % of 29 images is fewer than one per class: no "1%" column that would repeat the 1-shot one
    assert "1%" not in results["encoders"]["msn"]["logistic"] and "fewer than one" in card


def test_the_label_fraction_is_kept_where_it_is_at_least_one_image_per_class():
    labels = np.repeat(np.arange(3), 100)  # 1 % = 1 image per class
    assert ev._usable_label_fraction(0.01, labels) == (0.01, None)
    fraction, note = ev._usable_label_fraction(0.01, labels[::2])  # 0.5 per class
    assert fraction is None and "0.50 per class" in note


@pytest.mark.slow
def test_msn_evaluate_writes_the_results_file_of_msn_pretrain_and_the_pictures(tmp_path):
    data = shapes_folder(tmp_path / "shapes", per_class=8)
    model_dir = tmp_path / "model"
    pt.main([*TINY_MODEL_ARGS, "--train_dir", str(data), "--per_device_train_batch_size", "8",
             "--max_train_steps", "1", "--skip_evaluation", "--output_dir", str(model_dir)])  # fmt: skip
    assert not (model_dir / ev.RESULTS_FILE).exists()
    results = ev.main(["--model_name_or_path", str(model_dir), "--train_dir", str(data), "--shots", "1", "2",
                       "--seeds", "0", "--no_progress", "--allow_seen_images"])  # fmt: skip
    assert set(results["encoders"]) == {"msn", "random", "pixels"}
    assert json.loads((model_dir / ev.RESULTS_FILE).read_text())["encoders"].keys() == results["encoders"].keys()
    assert not (model_dir / "lowshot_results.json").exists()
    for name in (pictures.NEIGHBOURS_FILE, pictures.LOWSHOT_FILE, pictures.PROTOTYPES_FILE):
        assert png_size(model_dir / name)[0] == "PNG", name
        assert f"]({name})" in (model_dir / "README.md").read_text()


def test_the_training_clock_spans_every_part_of_a_resumed_run():
    import time

    from msn_hf.checkpointing import TrainingState

    first = TrainingState()
    first.start_clock()
    time.sleep(0.05)
    saved = json.loads(first.to_json())  # what a checkpoint holds
    assert saved["training_seconds"] >= 0.05 and "clock" not in saved
    resumed = TrainingState(**saved)
    resumed.start_clock()
    time.sleep(0.05)
    resumed.stop_clock()
    assert resumed.training_seconds >= saved["training_seconds"] + 0.05
    assert resumed.elapsed_seconds == resumed.training_seconds  # stopped: no longer counting


@pytest.mark.slow
def test_the_card_states_the_wall_time_of_the_whole_resumed_run(tmp_path):
    out = tmp_path / "run"
    common = [*TINY_MODEL_ARGS, "--per_device_train_batch_size", "16", "--max_train_samples", "64",
              "--skip_evaluation", "--checkpointing_steps", "2", "--output_dir", str(out)]  # fmt: skip
    pt.main([*common, "--max_train_steps", "2"])
    first_part = json.loads((out / "checkpoint-2" / "training_state.json").read_text())["training_seconds"]
    pt.main([*common, "--max_train_steps", "4", "--resume_from_checkpoint", "latest"])
    facts = json.loads((out / "msn_card.json").read_text())
    final = json.loads((out / "checkpoint-4" / "training_state.json").read_text())["training_seconds"]
    assert facts["wall_time_seconds"] >= first_part > 0
    assert facts["wall_time_seconds"] == pytest.approx(final, abs=1.0)
