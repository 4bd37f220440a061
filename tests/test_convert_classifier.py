"""Export of fine-tuned classifiers to ViTMSN, evaluation preprocessing of the exports, folder kinds."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification, ViTMSNForImageClassification

from conftest import tiny_config
from msn_hf import MSNForImageClassification, MSNImageProcessor, MSNModel, convert

LABELS = {0: "cat", 1: "dog", 2: "bird"}


def randomize_(module, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return module


def photos(seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((50, 40), (37, 64), (36, 36))]


@pytest.fixture
def classifier_folder(tmp_path):
    config = tiny_config(num_labels=3, id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    model = randomize_(MSNForImageClassification(config), seed=0).eval()
    folder = tmp_path / "classifier"
    model.save_pretrained(folder)
    MSNImageProcessor(size={"shortest_edge": 36}, crop_size=32).save_pretrained(folder)
    return folder, model


def test_classifier_exports_to_vit_msn_with_equal_logits_and_labels(classifier_folder, tmp_path):
    folder, model = classifier_folder
    convert.to_vit_msn(folder, tmp_path / "vit", verify=False)  # compared here instead
    exported = AutoModelForImageClassification.from_pretrained(tmp_path / "vit").eval()
    assert type(exported) is ViTMSNForImageClassification
    assert exported.config.id2label == LABELS
    pixel_values = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, actual = model(pixel_values).logits, exported(pixel_values=pixel_values).logits
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)
    assert expected.std() > 0.1  # random weights: a wrong classifier or encoder would not match by chance


def test_export_reproduces_the_evaluation_preprocessing(classifier_folder, tmp_path):
    folder, _ = classifier_folder
    convert.to_vit_msn(folder, tmp_path / "vit")
    ours = MSNImageProcessor.from_pretrained(folder)
    theirs = AutoImageProcessor.from_pretrained(tmp_path / "vit")
    images = photos()
    expected = ours(images, return_tensors="pt")["pixel_values"]
    actual = theirs(images, return_tensors="pt")["pixel_values"]
    assert actual.shape == expected.shape == (3, 3, 32, 32)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)

    convert.to_timm(*_pretraining_folder(tmp_path), tmp_path / "timm")
    pretrained_cfg = json.loads((tmp_path / "timm" / "config.json").read_text())["pretrained_cfg"]
    assert pretrained_cfg["interpolation"] == "bilinear"
    assert pretrained_cfg["crop_pct"] == pytest.approx(32 / 36)


def _pretraining_folder(tmp_path):
    folder = tmp_path / "pretrained"
    MSNModel(tiny_config()).save_pretrained(folder)
    MSNImageProcessor(size={"shortest_edge": 36}, crop_size=32).save_pretrained(folder)
    return (folder,)


def test_classifier_folder_where_a_pretraining_folder_is_needed_says_what_it_is(classifier_folder, tmp_path):
    folder, _ = classifier_folder
    with pytest.raises(ValueError, match="is a fine-tuned MSNForImageClassification folder") as error:
        convert.to_timm(folder, tmp_path / "timm")
    assert "missing" not in str(error.value)
    assert not (tmp_path / "timm").exists()


def test_classifier_with_mean_pooling_is_refused_by_name(tmp_path):
    model = MSNForImageClassification(tiny_config(num_labels=3, classifier_pooling="cls_mean"))
    model.save_pretrained(tmp_path / "classifier")
    with pytest.raises(ValueError, match="classifier_pooling='cls_mean'"):
        convert.to_vit_msn(tmp_path / "classifier", tmp_path / "vit")
