"""`msn-convert` on what users get wrong: the folder `from-original` writes is complete, and a misspelt `--config`
field, a file that is not a checkpoint or an output folder over the source is refused in one line, exit status 2,
with nothing written."""

import json

import pytest
import safetensors.torch
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from transformers import AutoImageProcessor

from msn_hf import MSNConfig, MSNImageProcessor, convert
from msn_hf.cli import run
from test_convert import IMAGE, TINY_HEAD, NotATensor, original_checkpoint, saved_msn_model, saved_vit_msn

EXPECTED_CHECKPOINT = "a PyTorch checkpoint of the authors' MSN code"


@pytest.fixture
def checkpoint_file(tmp_path):
    """A tiny checkpoint of the authors' release (ViT with 2 heads, 64 wide, 32 px, patch 8)."""
    path = tmp_path / "msn.pth.tar"
    torch.save(original_checkpoint()[0], path)
    return path


def msn_convert(capsys, *args) -> tuple[int, str]:
    """`msn-convert` in this process: its exit status and what it wrote to stderr."""
    capsys.readouterr()
    status = run(convert.main, "msn-convert", list(map(str, args)))
    return status, capsys.readouterr().err


def assert_one_line_error(status: int, stderr: str, *texts: str) -> None:
    assert status == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("msn-convert: error: "), stderr
    missing = [text for text in texts if text not in stderr]
    assert not missing, f"{missing} not in the error line:\n{stderr}"


def folder_contents(folder) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


# ---------------------------------------------------------------------------------------------------- from-original


def test_from_original_saves_the_processor_of_the_converted_model(checkpoint_file, tmp_path):
    convert.from_original(checkpoint_file, tmp_path / "msn", num_heads=2)

    config = MSNConfig.from_pretrained(tmp_path / "msn")
    processor = AutoImageProcessor.from_pretrained(tmp_path / "msn")  # as msn-evaluate and the card's snippets load it
    assert type(processor) is MSNImageProcessor
    # The views of the converted model, sized as every conversion sizes them; the authors' ImageNet normalisation.
    views = (processor.crop_size.height, processor.focal_crop_size.height)
    assert views == (config.image_size, config.focal_image_size)
    assert processor.size.shortest_edge == round(IMAGE * 256 / 224)
    assert (list(processor.image_mean), list(processor.image_std)) == (
        list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD)
    )
    pixel_values = processor(images=[torch.rand(3, 50, 40)], return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, IMAGE, IMAGE)


def test_from_original_and_from_vit_msn_size_the_views_alike(checkpoint_file, tmp_path):
    convert.from_original(checkpoint_file, tmp_path / "msn", num_heads=2)
    convert.to_vit_msn(tmp_path / "msn", tmp_path / "vit", verify=False)
    convert.from_vit_msn(tmp_path / "vit", tmp_path / "back", verify=False, **TINY_HEAD)

    def view_sizes(folder):
        settings = json.loads((folder / "preprocessor_config.json").read_text())
        return {key: settings[key] for key in ("size", "crop_size", "focal_crop_size")}

    assert view_sizes(tmp_path / "msn") == view_sizes(tmp_path / "back")


# ---------------------------------------------------------------------------------------------------- --config


@pytest.mark.parametrize("command", ["from-original", "from-vit-msn"])
def test_config_with_an_unknown_field_is_refused(command, checkpoint_file, tmp_path, capsys):
    if command == "from-original":
        source = ["--checkpoint", checkpoint_file, "--num_heads", "2"]
    else:
        saved_vit_msn(tmp_path / "vit")
        source = ["--model", tmp_path / "vit", "--no_verify"]
    config = json.dumps({**TINY_HEAD, "num_prototypess": 64})
    status, stderr = msn_convert(capsys, command, *source, "--output", tmp_path / "out", "--config", config)

    # The refusal msn-pretrain gives for `--config_overrides num_prototypess=64`.
    refusal = "--config has unknown MSNConfig fields: ['num_prototypess']"
    assert_one_line_error(status, stderr, refusal, "num_prototypes'")
    assert not (tmp_path / "out").exists()


def test_backbone_kwargs_in_config_reach_the_inferred_backbone(checkpoint_file, tmp_path, capsys):
    config = json.dumps({"backbone_kwargs": {"drop_path_rate": 0.1}})
    args = ["from-original", "--checkpoint", checkpoint_file, "--num_heads", "2", "--config", config]
    status, stderr = msn_convert(capsys, *args, "--output", tmp_path / "msn")

    assert status == 0, stderr
    backbone_kwargs = MSNConfig.from_pretrained(tmp_path / "msn").backbone_kwargs
    assert backbone_kwargs["drop_path_rate"] == 0.1 and backbone_kwargs["embed_dim"] == 64  # merged, not replaced

    # Given twice, the two could disagree: refused rather than one silently winning.
    twice = ["--backbone_kwargs", '{"drop_path_rate": 0.2}']
    status, stderr = msn_convert(capsys, *args, *twice, "--output", tmp_path / "two")
    assert_one_line_error(status, stderr, "backbone_kwargs", "--backbone_kwargs", "--config")
    assert not (tmp_path / "two").exists()


# ---------------------------------------------------------------------------------------------------- bad checkpoints


def truncated_checkpoint(path):
    """The first half of a real checkpoint, as an interrupted download leaves it."""
    torch.save(original_checkpoint()[0], path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    "write, came",
    [
        (truncated_checkpoint, "a truncated or damaged zip checkpoint"),
        (lambda path: path.write_text("hello\n"), "not a zip/pickle checkpoint: a text file"),
        (lambda path: path.write_text("<!DOCTYPE html><html><body>Access denied</body></html>"), "an HTML page"),
        (lambda path: path.write_bytes(b""), "an empty file"),
        (lambda path: torch.save(torch.zeros(3), path), "holds a Tensor"),
        (lambda path: safetensors.torch.save_file({"w": torch.zeros(3)}, path), "a safetensors file"),
    ],
    ids=["truncated", "text", "html", "empty", "tensor", "safetensors"],
)
def test_a_file_that_is_not_a_checkpoint_is_named_in_one_line(write, came, tmp_path, capsys):
    write(tmp_path / "msn.pth.tar")
    args = ["from-original", "--checkpoint", tmp_path / "msn.pth.tar", "--output", tmp_path / "out"]
    status, stderr = msn_convert(capsys, *args)

    assert_one_line_error(status, stderr, "--checkpoint", EXPECTED_CHECKPOINT, str(tmp_path / "msn.pth.tar"), came)
    assert "arbitrary code" not in stderr  # only a real checkpoint with code in it is described so
    assert ("damaged" in stderr) == (write is truncated_checkpoint)
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_that_needs_code_is_refused_in_one_line(tmp_path, capsys):
    torch.save({**original_checkpoint()[0], "opt": NotATensor()}, tmp_path / "msn.pth.tar")
    args = ["from-original", "--checkpoint", tmp_path / "msn.pth.tar", "--output", tmp_path / "out"]
    status, stderr = msn_convert(capsys, *args, "--num_heads", "2")
    assert_one_line_error(status, stderr, "--checkpoint", "test_convert.NotATensor", "could run arbitrary code")


def test_a_missing_checkpoint_is_named_in_one_line(tmp_path, capsys):
    args = ["from-original", "--checkpoint", tmp_path / "no.pth.tar", "--output", tmp_path / "out"]
    status, stderr = msn_convert(capsys, *args)
    assert_one_line_error(status, stderr, "--checkpoint", EXPECTED_CHECKPOINT, "no such file")


@pytest.mark.parametrize("command", ["from-vit-msn", "to-vit-msn", "to-timm"])
@pytest.mark.parametrize("model", ["missing/folder/", "nobody/no-such-model"])
def test_a_model_that_is_neither_a_folder_here_nor_a_hub_id_is_named_in_one_line(command, model, tmp_path, capsys):
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    status, stderr = msn_convert(capsys, command, "--model", model, "--output", tmp_path / "out")
    monkeypatch.undo()
    assert_one_line_error(status, stderr, "--model", repr(model))
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ output over source


@pytest.mark.parametrize("command", ["to-vit-msn", "to-timm"])
@pytest.mark.parametrize("where", ["same", "same through a link", "parent", "inside"])
def test_an_output_folder_over_the_source_is_refused_even_with_overwrite(command, where, tmp_path, capsys):
    source = tmp_path / "runs" / "run"
    saved_msn_model(source)
    (tmp_path / "alias").symlink_to(source)
    output = {
        "same": source, "same through a link": tmp_path / "alias", "parent": source.parent, "inside": source / "vit"
    }[where]
    before = folder_contents(tmp_path / "runs")

    status, stderr = msn_convert(capsys, command, "--model", source, "--output", output, "--overwrite")
    assert_one_line_error(status, stderr, "--output", "--model", str(source.resolve()))
    assert folder_contents(tmp_path / "runs") == before


def test_from_original_output_over_its_checkpoint_is_refused(checkpoint_file, tmp_path, capsys):
    before = checkpoint_file.read_bytes()
    for output in (checkpoint_file, checkpoint_file.parent):
        args = ["from-original", "--checkpoint", checkpoint_file, "--num_heads", "2", "--overwrite"]
        status, stderr = msn_convert(capsys, *args, "--output", output)
        assert_one_line_error(status, stderr, "--output", "--checkpoint")
        assert checkpoint_file.read_bytes() == before


def test_from_vit_msn_output_over_its_source_is_refused(tmp_path, capsys):
    saved_vit_msn(tmp_path / "vit")
    before = folder_contents(tmp_path / "vit")
    args = ["from-vit-msn", "--model", tmp_path / "vit", "--output", tmp_path / "vit", "--overwrite", "--no_verify"]
    status, stderr = msn_convert(capsys, *args, "--config", json.dumps(TINY_HEAD))
    assert_one_line_error(status, stderr, "--output", "--model")
    assert folder_contents(tmp_path / "vit") == before
