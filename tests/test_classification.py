"""MSNForImageClassification: loading from a pretraining checkpoint, Auto classes, Trainer fine-tuning, pipelines."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForImageClassification, TrainingArguments
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from conftest import tiny_config
from msn_hf import MSNForImageClassification, MSNImageProcessor, MSNModel

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def tiny_processor() -> MSNImageProcessor:
    return MSNImageProcessor(size={"shortest_edge": 32}, crop_size=32, focal_crop_size=16)


def pretrained_msn() -> MSNModel:
    """A tiny MSNModel whose anchor encoder differs from its target encoder, as after pretraining."""
    model = MSNModel(tiny_config())
    with torch.no_grad():
        for parameter in model.encoder.parameters():
            parameter.add_(torch.randn_like(parameter))
        for parameter in model.target_encoder.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model


@pytest.fixture(scope="module")
def pretraining_folder(tmp_path_factory):
    """A saved MSNModel checkpoint with its image processor, as the pretraining script leaves it."""
    folder = tmp_path_factory.mktemp("msn-pretrained")
    torch.manual_seed(0)
    pretrained_msn().save_pretrained(folder)
    tiny_processor().save_pretrained(folder)
    return folder


def load_finetune_script():
    spec = importlib.util.spec_from_file_location("finetune_classification", EXAMPLES / "finetune_classification.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def finetune(pretraining_folder, output_dir, *extra):
    args = [
        "--model_name_or_path", str(pretraining_folder), "--output_dir", str(output_dir),
        "--do_train", "--do_eval", "--max_steps", "3", "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "32", "--learning_rate", "1e-2", "--max_train_samples", "48",
        "--max_test_samples", "32", "--report_to", "none", "--use_cpu", "--save_strategy", "no",
        "--dataloader_num_workers", "0", "--disable_tqdm", "true", *extra,
    ]  # fmt: skip
    return load_finetune_script().main(args)


@pytest.fixture(scope="module")
def finetuned_folder(pretraining_folder, tmp_path_factory):
    """The built-in digits fine-tuned for a few steps on the tiny checkpoint (all weights trained)."""
    output_dir = tmp_path_factory.mktemp("msn-finetuned")
    metrics = finetune(pretraining_folder, output_dir)
    return output_dir, metrics


def test_from_pretrained_takes_target_encoder_without_warnings(pretraining_folder):
    with CaptureLogger(logging.get_logger("transformers")) as logs, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = MSNForImageClassification.from_pretrained(pretraining_folder, num_labels=3)
    weights = load_file(pretraining_folder / "model.safetensors")
    for name, tensor in model.vit.state_dict().items():
        torch.testing.assert_close(tensor, weights[f"target_encoder.{name}"], rtol=0, atol=0)
    assert not torch.equal(model.vit.blocks[0].attn.qkv.weight, weights["encoder.blocks.0.attn.qkv.weight"])
    # Only the new classifier may be reported; the pretraining-only weights must not be.
    assert "classifier.weight" in logs.out  # the load report was captured: the new classifier is announced
    for pretraining_only in ("UNEXPECTED", "target_encoder", "projection_head", "prototypes"):
        assert pretraining_only not in logs.out
    assert not [str(warning.message) for warning in caught if "msn" in str(warning.filename)]
    assert model.classifier.out_features == 3 and model.config.num_labels == 3


def test_auto_class_in_process_and_auto_map(pretraining_folder):
    config = json.loads((pretraining_folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageClassification"] == "modeling_msn.MSNForImageClassification"
    model = AutoModelForImageClassification.from_pretrained(pretraining_folder, num_labels=4)
    assert isinstance(model, MSNForImageClassification)
    weights = load_file(pretraining_folder / "model.safetensors")
    torch.testing.assert_close(model.vit.pos_embed, weights["target_encoder.pos_embed"], rtol=0, atol=0)


@pytest.mark.parametrize("pooling", ["cls", "cls_mean"])
def test_forward_logits_loss_and_hidden_states(pooling):
    model = MSNForImageClassification(tiny_config(num_labels=5, classifier_pooling=pooling)).eval()
    pixel_values, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 4, 2])
    output = model(pixel_values, labels=labels, output_hidden_states=True)
    assert isinstance(output, ImageClassifierOutput)
    assert output.logits.shape == (4, 5)
    torch.testing.assert_close(output.loss, torch.nn.functional.cross_entropy(output.logits, labels))
    assert len(output.hidden_states) == 1 + len(model.vit.blocks)
    assert model.classifier.in_features == model.vit.embed_dim * (2 if pooling == "cls_mean" else 1)
    as_tuple = model(pixel_values, labels=labels, return_dict=False)
    torch.testing.assert_close(as_tuple[1], output.logits)


def test_problem_types_choose_the_loss():
    model = MSNForImageClassification(tiny_config(num_labels=3, problem_type="multi_label_classification"))
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    output = model(torch.randn(2, 3, 32, 32), labels=targets)
    torch.testing.assert_close(
        output.loss, torch.nn.functional.binary_cross_entropy_with_logits(output.logits, targets)
    )


def test_bad_pixel_values_name_the_argument():
    model = MSNForImageClassification(tiny_config(num_labels=2))
    with pytest.raises(ValueError, match="pixel_values.*\\(2, 1, 32, 32\\)"):
        model(torch.randn(2, 1, 32, 32))


def test_a_classifier_folder_is_refused_as_a_pretraining_model(tmp_path):
    # Its one encoder is saved as vit.*: an MSNModel would find none of its weights and start at random.
    folder = tmp_path / "classifier"
    MSNForImageClassification(tiny_config(num_labels=3)).save_pretrained(folder)
    for load in (MSNModel.from_pretrained, AutoModel.from_pretrained):
        with pytest.raises(ValueError, match=r"that of an MSNForImageClassification .*AutoModelForImageClassification"):
            load(folder)
    assert isinstance(AutoModelForImageClassification.from_pretrained(folder), MSNForImageClassification)
    MSNModel(tiny_config()).save_pretrained(tmp_path / "msn")
    assert isinstance(AutoModel.from_pretrained(tmp_path / "msn"), MSNModel)


def test_finetune_script_trains_and_saves_a_classifier(pretraining_folder, finetuned_folder):
    output_dir, metrics = finetuned_folder
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and metrics["train_loss"] > 0
    model = MSNForImageClassification.from_pretrained(output_dir)
    assert model.config.id2label[3] == "3" and model.config.num_labels == 10
    pretrained = load_file(pretraining_folder / "model.safetensors")
    # Full fine-tuning moves the encoder.
    assert not torch.equal(model.vit.patch_embed.proj.weight, pretrained["target_encoder.patch_embed.proj.weight"])
    assert (output_dir / "preprocessor_config.json").exists()
    config = json.loads((output_dir / "config.json").read_text())
    assert "AutoModel" not in config["auto_map"]  # MSNModel cannot load a classifier's weights


def test_finetune_script_freeze_encoder_trains_only_the_classifier(pretraining_folder, tmp_path, monkeypatch):
    token = "hf_NotARealTokenButSecret0123"
    monkeypatch.delenv("HF_TOKEN", raising=False)  # the script hands the token to the Hub client there
    finetune(pretraining_folder, tmp_path, "--freeze_encoder", "--do_eval", "false", "--hub_token", token)
    model = MSNForImageClassification.from_pretrained(tmp_path)
    pretrained = load_file(pretraining_folder / "model.safetensors")
    for name, tensor in model.vit.state_dict().items():
        torch.testing.assert_close(tensor, pretrained[f"target_encoder.{name}"], rtol=0, atol=0)
    assert model.classifier.weight.abs().sum() > 0
    # The Trainer pickles its arguments into training_args.bin, which `push_to_hub` uploads: not the token.
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert "training_args.bin" in {path.name for path in written}
    assert [str(path) for path in written if token.encode() in path.read_bytes()] == []
    assert os.environ["HF_TOKEN"] == token


def test_finetune_card_links_a_hub_id_as_base_model_and_names_a_local_folder_in_its_text(
    pretraining_folder, finetuned_folder, tmp_path
):
    output_dir, _ = finetuned_folder
    card = (output_dir / "README.md").read_text()
    metadata, text = card.split("---\n")[1:3]
    # The Hub links `base_model` to a model there: a local folder has none to link to.
    assert "base_model" not in metadata, metadata
    assert "https://huggingface.co//" not in text
    assert f"fine-tuned version of the local folder `{pretraining_folder.resolve()}` on" in text
    assert "trained from scratch" not in text
    trainer = load_finetune_script().ClassifierTrainer(
        model=MSNForImageClassification(tiny_config(num_labels=3)), base_model="someone/msn-vit",
        args=TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True),
    )  # fmt: skip
    trainer.create_model_card(tasks="image-classification")
    card = (tmp_path / "README.md").read_text()
    assert "\nbase_model: someone/msn-vit\n" in card
    assert "fine-tuned version of [someone/msn-vit](https://huggingface.co/someone/msn-vit)" in card


REMOTE_SCRIPT = """
import sys
sys.modules["msn_hf"] = None  # the code must come from the folders
import json, numpy as np, torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification, pipeline

pretrained, finetuned, out = sys.argv[1:4]
model = AutoModelForImageClassification.from_pretrained(pretrained, trust_remote_code=True, num_labels=3)
weights = load_file(pretrained + "/model.safetensors")
same = all(torch.equal(t, weights["target_encoder." + n]) for n, t in model.vit.state_dict().items())
image = Image.fromarray((np.random.default_rng(0).random((40, 36, 3)) * 255).astype("uint8"))
extractor = pipeline("image-feature-extraction", model=pretrained, trust_remote_code=True)
classifier = pipeline("image-classification", model=finetuned, trust_remote_code=True)
json.dump({
    "classifier_class": type(model).__name__, "target_encoder_loaded": same,
    "features": extractor(image, return_tensors=True, pool=True).tolist(),
    "predictions": classifier(image, top_k=3), "pipeline_model": type(classifier.model).__name__,
}, open(out, "w"))
"""


def test_remote_code_auto_class_and_pipelines(pretraining_folder, finetuned_folder, tmp_path):
    output_dir, _ = finetuned_folder
    script, result = tmp_path / "remote.py", tmp_path / "result.json"
    script.write_text(textwrap.dedent(REMOTE_SCRIPT))
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    completed = subprocess.run(
        [sys.executable, str(script), str(pretraining_folder), str(output_dir), str(result)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    remote = json.loads(result.read_text())
    assert remote["classifier_class"] == "MSNForImageClassification" and remote["target_encoder_loaded"]
    assert remote["pipeline_model"] == "MSNForImageClassification"
    assert len(remote["predictions"]) == 3 and {p["label"] for p in remote["predictions"]} <= set("0123456789")

    # The feature pipeline returns the target encoder's class token of the processor's evaluation preprocessing.
    import numpy as np
    from PIL import Image

    image = Image.fromarray((np.random.default_rng(0).random((40, 36, 3)) * 255).astype("uint8"))
    model = MSNModel.from_pretrained(pretraining_folder).eval()
    with torch.no_grad():
        expected = model(**tiny_processor()(image, return_tensors="pt")).pooler_output
    torch.testing.assert_close(torch.tensor(remote["features"]), expected, rtol=1e-4, atol=1e-5)
