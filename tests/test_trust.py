"""
A user's own run: nothing lost, nothing silently computed other than asked. Each test guards one promise of the
README (resume, refusals, clear errors, files others can read, secrets kept out of files).
"""

import contextlib
import json
import os
import resource
import signal
import stat
from pathlib import Path

import numpy as np
import pytest
from accelerate import Accelerator

from conftest import TINY_MODEL_ARGS, tiny_config
from msn_hf import MSNModel, convert
from msn_hf import pretraining as pt
from msn_hf.files import atomic_folder, write_text_atomically
from msn_hf.pictures import plot_prototypes
from msn_hf.run_outputs import plot_loss_curve, write_train_results

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


@contextlib.contextmanager
def disk_full_past(num_bytes: int):
    """Any write past `num_bytes` of a file fails (EFBIG), as a write on a full disk fails with ENOSPC."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel ends the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (num_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def losses(steps: int) -> list[dict]:
    return [dict(step=s, loss=4.0 / s, prediction_loss=3.9 / s, me_max_loss=0.1 / s) for s in range(1, steps + 1)]


OUTPUTS_WRITTEN_AGAIN = {  # each writes its file from one set of values, then again from another
    "loss_curve.png": lambda path, again: plot_loss_curve(losses(9 if again else 5), path),
    "prototypes.png": lambda path, again: plot_prototypes(np.bincount(np.arange(40) % (7 if again else 3)), path),
    "train_results.json": lambda path, again: write_train_results(path.parent, dict(completed_steps=2 if again else 1)),
}


@pytest.mark.parametrize("name", OUTPUTS_WRITTEN_AGAIN)
def test_an_output_written_again_on_a_full_disk_leaves_the_previous_one_whole(tmp_path, name):
    # msn-evaluate draws the pictures again in a model folder, and a resumed run writes its results and loss curve
    # again: written in place, a full disk or a kill left an empty or cut file under the old one's name.
    path = tmp_path / name
    OUTPUTS_WRITTEN_AGAIN[name](path, False)
    before = path.read_bytes()
    with pytest.raises(OSError), disk_full_past(8):
        OUTPUTS_WRITTEN_AGAIN[name](path, True)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary left
    OUTPUTS_WRITTEN_AGAIN[name](path, True)  # with room, the new one replaces it
    assert path.read_bytes() != before


def test_a_resumed_run_keeps_its_metrics_through_a_torn_last_line_and_a_full_disk(tmp_path):
    # A run that died of a full disk while appending a record left half a line: `latest` then failed on it (an
    # unnamed JSONDecodeError) until the user edited the file; and the resume rewrote the file in place.
    path = tmp_path / pt.METRICS_FILE
    records = [json.dumps(dict(step=s, loss=1.0 / s)) + "\n" for s in (1, 2, 3)]
    path.write_text("".join(records) + records[0][:12])
    log = pt.MetricsLog(Accelerator(cpu=True), path, completed_steps=2, report=False)
    assert [m["step"] for m in log.history] == [1, 2]
    assert path.read_text() == "".join(records[:2])
    path.write_text("".join(records))
    with pytest.raises(OSError), disk_full_past(16):
        pt.MetricsLog(Accelerator(cpu=True), path, completed_steps=1, report=False)
    assert path.read_text() == "".join(records)
    path.write_text(records[0] + records[1][:12] + "\n" + records[2])  # not a torn end: refused, naming the file
    with pytest.raises(ValueError, match=rf"{pt.METRICS_FILE}.*line 2"):
        pt.MetricsLog(Accelerator(cpu=True), path, completed_steps=3, report=False)


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
