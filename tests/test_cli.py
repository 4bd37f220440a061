"""The console scripts behave like tools: exit 0 on success, 2 with one line on a user error, tracebacks on --debug."""

import configparser
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_BACKBONE_KWARGS, tiny_config
from msn_hf import MSNImageProcessor, MSNModel
from msn_hf.cli import run
from msn_hf.sources import check_model_source

ROOT = Path(__file__).resolve().parents[1]


def entry_points() -> dict[str, str]:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    lines = filter(None, parser["options.entry_points"]["console_scripts"].splitlines())
    return dict(tuple(part.strip() for part in line.split("=")) for line in lines)


def run_tool(name: str, *args, cwd=None) -> subprocess.CompletedProcess:
    """Run the console script `name` as its installed wrapper does, in a process of its own: `sys.exit(function())`
    with these arguments."""
    module, function = entry_points()[name].split(":")
    code = f"import sys; sys.argv[0] = {name!r}; from {module} import {function}; sys.exit({function}())"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


@pytest.fixture
def call_tool(capfd, monkeypatch):
    """The console script `name` called in this process (each launch of a process costs seconds of imports): its
    exit status and what it wrote to stdout and stderr, as `run_tool` returns them."""

    def call(name: str, *args, cwd=None) -> subprocess.CompletedProcess:
        module, function = entry_points()[name].split(":")
        tool = getattr(importlib.import_module(module), function)
        with monkeypatch.context() as patch:
            patch.setattr(sys, "argv", [name, *map(str, args)])
            if cwd is not None:
                patch.chdir(cwd)
            capfd.readouterr()
            with pytest.raises(SystemExit) as exit:
                tool()
        stdout, stderr = capfd.readouterr()
        return subprocess.CompletedProcess(sys.argv, exit.value.code, stdout, stderr)

    return call


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "model"
    MSNModel(tiny_config()).save_pretrained(folder)
    MSNImageProcessor(size={"shortest_edge": 36}, crop_size=32, focal_crop_size=16).save_pretrained(folder)
    return folder


def test_every_console_script_has_a_tool_wrapper():
    assert set(entry_points()) == {"msn-pretrain", "msn-evaluate", "msn-convert"}
    assert all(target.startswith("msn_hf.cli:") for target in entry_points().values())


def test_pretrain_exits_0_then_refuses_the_finished_folder_with_2(tmp_path, call_tool):
    out = tmp_path / "run"
    args = ["--backbone", "vit_tiny_patch16_224", "--backbone_kwargs", json.dumps(TINY_BACKBONE_KWARGS),
            "--config_overrides", "image_size=32,focal_image_size=16,num_prototypes=16", "--num_focal_views", "1",
            "--per_device_train_batch_size", "16", "--max_train_samples", "32", "--max_train_steps", "1",
            "--skip_evaluation", "--output_dir", out]  # fmt: skip
    result = call_tool("msn-pretrain", *args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"Next: msn-evaluate --model_name_or_path {out}" in result.stdout

    again = call_tool("msn-pretrain", *args)
    assert again.returncode == 2
    error_lines = [line for line in again.stderr.splitlines() if "error" in line]
    assert error_lines == [error_lines[0]] and "already holds a run" in error_lines[0]
    assert "Traceback" not in again.stderr


def test_debug_flag_lets_the_error_through(capsys):
    def main(argv):
        assert argv == ["--x", "1"]  # --debug is not passed on
        raise ValueError("--x must be 2, got 1.")

    assert run(main, "msn-tool", ["--x", "1"]) == 2
    assert capsys.readouterr().err.startswith("msn-tool: error: --x must be 2, got 1.")
    with pytest.raises(ValueError, match="--x must be 2"):
        run(main, "msn-tool", ["--x", "1", "--debug"])
    assert run(lambda argv: {"a dict": 1}, "msn-tool", []) == 0  # what main returns is not an exit status


def test_pretrain_user_errors_exit_2_with_one_line(tmp_path):
    result = run_tool("msn-pretrain", "--config_overrides", "masking=0.3", "--output_dir", tmp_path / "run")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "msn-pretrain: error: --config_overrides has unknown MSNConfig fields: ['masking']" in result.stderr
    assert not (tmp_path / "run").exists()


def test_mistyped_model_path_is_named_with_how_it_was_read(tmp_path, call_tool):
    for tool, extra in (("msn-evaluate", []), ("msn-pretrain", ["--output_dir", tmp_path / "run"])):
        result = call_tool(tool, "--model_name_or_path", "outputs/msn-digit", *extra, cwd=tmp_path)
        assert result.returncode == 2, (tool, result.stderr[-2000:])
        assert "'outputs/msn-digit'" in result.stderr and "read as a Hub model id" in result.stderr
        assert "Traceback" not in result.stderr and "couldn't connect" not in result.stderr
    assert not (tmp_path / "run").exists()  # msn-pretrain left no empty output folder


def test_model_source_check_says_how_the_value_was_read(model_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    check_model_source(str(model_folder))  # a saved model: fine
    (tmp_path / "empty").mkdir()
    for value, expected in (("./outputs/msn-digit", "read as a local folder, but there is no folder at"),
                            ("empty", "read as a local folder, but it holds no config.json"),
                            ("someone/msn-model", "read as a Hub model id, which could not be loaded")):  # fmt: skip
        with pytest.raises(ValueError, match=expected) as error:
            check_model_source(value)
        assert repr(value) in str(error.value)


def test_evaluate_exits_0_and_updates_the_card(model_folder, tmp_path, call_tool):
    from msn_hf.modelcard import write_model_card

    write_model_card(model_folder, MSNModel.from_pretrained(model_folder), MSNImageProcessor.from_pretrained(model_folder),
                     dict(dataset="digits", steps=0))  # fmt: skip
    result = call_tool("msn-evaluate", "--model_name_or_path", model_folder, "--max_train_samples", "200",
                      "--max_test_samples", "60", "--shots", "1", "--seeds", "0", "--no_progress")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Model card updated" in result.stdout
    assert "| MSN (this model) |" in (model_folder / "README.md").read_text()


def test_convert_exits_0_with_a_success_line_and_no_config_dump(model_folder, tmp_path, call_tool, capfd):
    result = call_tool("msn-convert", "to-vit-msn", "--model", model_folder, "--output", tmp_path / "vit")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == f"msn-convert to-vit-msn: wrote {tmp_path / 'vit'}"
    assert "hidden_size" not in result.stdout + result.stderr  # no config printed
    from msn_hf.convert import main

    again = ["to-vit-msn", "--model", str(model_folder), "--output", str(tmp_path / "vit")]
    assert run(main, "msn-convert", again) == 2
    assert "--overwrite" in capfd.readouterr().err
