"""
A user's own run: nothing lost, nothing silently computed other than asked. Each test guards one promise of the
README (resume, refusals, clear errors, files others can read, secrets kept out of files).
"""

import os
import stat
from pathlib import Path

import pytest

from conftest import TINY_MODEL_ARGS, tiny_config
from msn_hf import MSNModel, convert
from msn_hf import pretraining as pt
from msn_hf.files import atomic_folder, write_text_atomically

TINY_RUN = [*TINY_MODEL_ARGS, "--per_device_train_batch_size", "16", "--max_train_samples", "64", "--skip_evaluation"]


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield 0o022
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- files others can read ------------------------------------------------------------------------------------------


def test_atomic_writes_follow_the_umask(tmp_path):
    for mask in (0o022, 0o002, 0o077):
        previous = os.umask(mask)
        try:
            path = write_text_atomically(tmp_path / f"file-{mask:o}.json", "{}")
        finally:
            os.umask(previous)
        assert mode(path) == 0o666 & ~mask
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left


def test_a_folder_written_over_a_link_replaces_the_link_and_leaves_its_target(tmp_path):
    target = tmp_path / "kept"
    target.mkdir()
    (target / "old.txt").write_text("old")
    link = tmp_path / "export"
    link.symlink_to(target, target_is_directory=True)
    with atomic_folder(link, overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
    assert not link.is_symlink() and [p.name for p in link.iterdir()] == ["new.txt"]
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "kept"]  # nothing set aside is left


def test_a_run_and_a_conversion_write_files_colleagues_can_read(tmp_path, umask_022):
    out = tmp_path / "run"
    pt.main([*TINY_RUN, "--max_train_steps", "1", "--checkpointing_steps", "1", "--output_dir", str(out)])
    checkpoint = out / "checkpoint-1"
    assert mode(checkpoint) == 0o755 and {p.name: mode(p) for p in checkpoint.iterdir() if mode(p) != 0o644} == {}
    written = {path.name: mode(path) for path in out.iterdir() if path.is_file()}
    assert {"model.safetensors", "msn_recipe.json", "README.md", "config.json"} <= set(written) or {
        "model.safetensors", "README.md", "config.json"} <= set(written)  # fmt: skip
    assert {name: m for name, m in written.items() if m != 0o644} == {}

    MSNModel(tiny_config()).save_pretrained(tmp_path / "msn")
    convert.to_timm(tmp_path / "msn", tmp_path / "timm")
    assert mode(tmp_path / "timm") == 0o755
    assert {p.name: mode(p) for p in (tmp_path / "timm").iterdir() if mode(p) != 0o644} == {}
