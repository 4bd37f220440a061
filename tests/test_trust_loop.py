"""
The end of a user's run and its folder: a finished run is never retrained by accident, `--overwrite_output_dir`
leaves nothing stale, a refused run creates nothing, Ctrl-C and SIGTERM stop at a checkpoint, the Hub is checked
before the first step, the test images of `msn-evaluate` were not pretrained on, and tokens stay out of every file.
Each test guards one promise of the README.
"""

import fnmatch
import json
import os
import signal
import threading
import time
from pathlib import Path

import datasets
import huggingface_hub
import pytest
import torch

import conftest
from conftest import RUN_ARGS, STREAM_ARGS, TINY_MODEL_ARGS, labelled_dataset
from msn_hf import MSNModel, checkpointing, cli, evaluation, run_outputs
from msn_hf import pretraining as pt
from msn_hf.data import data_source, resolve_shards
from msn_hf.modelcard import CARD_FACTS_FILE

TINY_RUN = [*TINY_MODEL_ARGS, "--per_device_train_batch_size", "16", "--max_train_samples", "32", "--skip_evaluation"]
DATA_RECORD = "msn_data.json"  # which images a run pretrained on
# What the issue tracker found left behind by --overwrite_output_dir.
STALE_NAMES = ["eval_results.json", "lowshot_results.json", "loss_curve.png", "README.md", "msn_card.json",
               "train_results.json", "msn_recipe.json", "neighbours.png", "lowshot.png", "prototypes.png",
               "metrics.jsonl", "model.safetensors", "config.json", DATA_RECORD]  # fmt: skip


def snapshot(folder: Path) -> dict:
    """Every entry under `folder`: its bytes (None for a folder) and modification time."""
    return {
        path: (path.read_bytes() if path.is_file() else None, path.stat().st_mtime_ns)
        for path in [folder, *folder.rglob("*")]
    }


def error_lines(stderr: str, tool: str = "msn-") -> list[str]:
    """The lines a console script printed about itself (progress bars and log records aside)."""
    return [line for line in stderr.splitlines() if line.startswith(tool)]


def assert_written_by_a_run(out: Path, users: set[str] = frozenset()) -> None:
    """Every entry a run left in `out` is named by `run_outputs.RUN_FILES`, the list --overwrite_output_dir removes."""
    unlisted = [p.name for p in out.iterdir() if p.name not in users
                and not any(fnmatch.fnmatch(p.name, pattern) for pattern in run_outputs.RUN_FILES)]  # fmt: skip
    assert unlisted == []


# --- 1. a finished run is not retrained by `--resume_from_checkpoint latest` -------------------------------------


def test_latest_on_a_finished_run_without_checkpoint_is_refused_and_changes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    pt.main([*TINY_RUN, "--max_train_steps", "1", "--output_dir", str(out)])
    capsys.readouterr()
    before = snapshot(out)
    status = cli.run(pt.main, "msn-pretrain", [*TINY_RUN, "--max_train_steps", "2", "--output_dir", str(out),
                                               "--resume_from_checkpoint", "latest"])  # fmt: skip
    assert status == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "already holds a run" in lines[0]
    assert "model.safetensors" in lines[0] and "--overwrite_output_dir" in lines[0]
    assert "pass --resume_from_checkpoint latest" not in lines[0]  # there is no checkpoint to resume
    assert snapshot(out) == before

    # With a checkpoint, the refusal advises resuming it.
    checkpointed = tmp_path / "checkpointed"
    pt.main([*TINY_RUN, "--max_train_steps", "1", "--checkpointing_steps", "1", "--output_dir", str(checkpointed)])
    with pytest.raises(ValueError, match="pass --resume_from_checkpoint latest to continue it from checkpoint-1"):
        pt.main([*TINY_RUN, "--max_train_steps", "2", "--output_dir", str(checkpointed)])

    # `latest` on a new folder starts from scratch, as job scripts that pass it on every launch expect; so it does in
    # the folder of a run pre-empted before its first checkpoint was complete.
    fresh, early = tmp_path / "fresh", tmp_path / "early"
    (early / "checkpoint-2.tmp").mkdir(parents=True)
    (early / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    for folder in (fresh, early):
        results = pt.main([*TINY_RUN, "--max_train_steps", "1", "--output_dir", str(folder),
                           "--resume_from_checkpoint", "latest"])  # fmt: skip
        assert results["completed_steps"] == 1 and (folder / "model.safetensors").is_file()


def test_latest_on_a_run_finished_after_its_last_checkpoint_is_refused_and_changes_nothing(tmp_path, capsys):
    # A job script relaunched after its run finished: resuming checkpoint-2 would train steps 3-4 again over the model.
    out = tmp_path / "run"
    flags = [*TINY_RUN, "--max_train_steps", "4", "--checkpointing_steps", "2", "--checkpoints_total_limit", "1"]
    pt.main([*flags, "--output_dir", str(out)])
    (out / "checkpoint-4").rename(out / "checkpoint-2")  # as if the run had been stopped after its second step
    (out / "checkpoint-2" / checkpointing.TRAINING_STATE_FILE).write_text(
        (out / "checkpoint-2" / checkpointing.TRAINING_STATE_FILE).read_text().replace('"completed_steps": 4', '"completed_steps": 2')
    )  # fmt: skip
    capsys.readouterr()
    before = snapshot(out)
    status = cli.run(pt.main, "msn-pretrain", [*flags, "--output_dir", str(out), "--resume_from_checkpoint", "latest"])
    assert status == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "finished at step 4" in lines[0] and "checkpoint-2" in lines[0], lines
    assert "pass --resume_from_checkpoint latest" not in lines[0]
    assert snapshot(out) == before
    # Without --resume_from_checkpoint, the refusal does not advise resuming it either.
    with pytest.raises(ValueError, match="finished at step 4") as refusal:
        pt.main([*flags, "--output_dir", str(out)])
    assert "pass --resume_from_checkpoint latest" not in str(refusal.value)


def test_latest_on_a_run_whose_last_checkpoint_is_its_last_step_exports_the_same_model_again(tmp_path):
    out = tmp_path / "run"
    flags = [*TINY_RUN, "--max_train_steps", "2", "--checkpointing_steps", "2", "--output_dir", str(out)]
    pt.main(flags)
    weights = (out / "model.safetensors").read_bytes()
    assert pt.main([*flags, "--resume_from_checkpoint", "latest"])["completed_steps"] == 2
    assert (out / "model.safetensors").read_bytes() == weights


# --- 3. --overwrite_output_dir removes every file a run writes, and only those -------------------------------------


def test_overwrite_removes_every_file_a_run_wrote_before_the_new_run_writes_and_keeps_the_users(tmp_path, monkeypatch):
    out = tmp_path / "run"
    (out / "checkpoint-9").mkdir(parents=True)
    (out / "checkpoint-9" / checkpointing.TRAINING_STATE_FILE).write_text(json.dumps({"completed_steps": 9}))
    for name in STALE_NAMES:
        (out / name).write_bytes(b"stale")
    (out / "notes.txt").write_text("mine")
    at_first_step = {}
    real_training_step = pt.training_step

    def first_step_looks(*args, **kwargs):
        if not at_first_step:
            at_first_step.update({p.name: p.read_bytes() if p.is_file() else None for p in out.iterdir()})
        return real_training_step(*args, **kwargs)

    monkeypatch.setattr(pt, "training_step", first_step_looks)
    pt.main([*TINY_RUN, "--max_train_steps", "1", "--overwrite_output_dir", "--output_dir", str(out)])
    assert at_first_step["notes.txt"] == b"mine"
    assert "checkpoint-9" not in at_first_step
    assert {name for name, content in at_first_step.items() if content == b"stale"} == set()
    # This run evaluates nothing: the old results are gone rather than carried into the new card.
    for name in ["eval_results.json", "lowshot_results.json", "neighbours.png", "lowshot.png", "prototypes.png"]:
        assert not (out / name).exists(), name
    assert b"stale" not in (out / "README.md").read_bytes()
    assert (out / "notes.txt").read_text() == "mine"
    assert_written_by_a_run(out, users={"notes.txt"})


# --- 10. a refused run creates nothing ------------------------------------------------------------------------------


def test_a_missing_train_dir_is_named_and_no_output_folder_is_created(tmp_path, capsys):
    out = tmp_path / "new" / "run"
    missing = tmp_path / "imgaes"
    status = cli.run(pt.main, "msn-pretrain", [*TINY_RUN, "--max_train_steps", "1", "--train_dir", str(missing),
                                               "--output_dir", str(out)])  # fmt: skip
    assert status == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "--train_dir" in lines[0] and str(missing) in lines[0] and "does not exist" in lines[0]
    assert not (tmp_path / "new").exists()

    labelled_dataset(12).save_to_disk(str(tmp_path / "data"))  # fewer images than one batch of 16
    with pytest.raises(ValueError, match="--per_device_train_batch_size 16"):
        pt.main([*TINY_RUN, "--dataset_name", str(tmp_path / "data"), "--max_train_steps", "1",
                 "--output_dir", str(out)])  # fmt: skip
    assert not (tmp_path / "new").exists()


# --- 5. Ctrl-C and SIGTERM stop at a checkpoint ---------------------------------------------------------------------


@pytest.fixture
def sigterm_raises():
    """SIGTERM raises in this test process rather than killing pytest, should the run not handle it."""

    def fallback(signum, frame):
        raise RuntimeError("SIGTERM reached the test's own handler: the run did not handle it")

    previous = signal.signal(signal.SIGTERM, fallback)
    yield fallback
    signal.signal(signal.SIGTERM, previous)


def test_sigterm_finishes_the_step_writes_a_checkpoint_and_exits_143(tmp_path, monkeypatch, capsys, sigterm_raises):
    out = tmp_path / "run"
    handlers = {"before": (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))}
    real_training_step = pt.training_step
    steps = []

    def signalled_during_the_second_step(*args, **kwargs):
        steps.append(1)
        handlers.setdefault("during", (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)))
        if len(steps) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-step: the step is finished first
        return real_training_step(*args, **kwargs)

    monkeypatch.setattr(pt, "training_step", signalled_during_the_second_step)
    status = cli.run(pt.main, "msn-pretrain", [*TINY_RUN, "--max_train_steps", "5", "--output_dir", str(out)])
    captured = capsys.readouterr()
    assert status == 143
    assert len(steps) == 2
    assert "stopped at step 2: resume with --resume_from_checkpoint latest" in captured.out + captured.err
    assert "Traceback" not in captured.err
    assert checkpointing.find_latest_checkpoint(out) == out / "checkpoint-2"
    assert not (out / "model.safetensors").exists()
    # Installed for the loop only, and the caller's handlers are back afterwards.
    assert handlers["during"] != handlers["before"]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers["before"]

    # A run that fails in the loop gives the handlers back as well.
    def failing_step(*args, **kwargs):
        raise RuntimeError("a crash in the loop")

    monkeypatch.setattr(pt, "training_step", failing_step)
    with pytest.raises(RuntimeError, match="a crash in the loop"):
        pt.main([*TINY_RUN, "--max_train_steps", "5", "--output_dir", str(tmp_path / "crash")])
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers["before"]


def test_sigterm_during_the_export_lets_it_finish_then_exits_143_with_the_model_saved(
    tmp_path, monkeypatch, capsys, sigterm_raises
):
    out = tmp_path / "run"
    real_export = pt.export_final

    def signalled_export(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives as the export begins: it is finished first
        return real_export(*args, **kwargs)

    monkeypatch.setattr(pt, "export_final", signalled_export)
    status = cli.run(pt.main, "msn-pretrain", [*TINY_RUN, "--max_train_steps", "2", "--output_dir", str(out)])
    captured = capsys.readouterr()
    assert status == 143
    assert "Traceback" not in captured.err
    assert f"model saved in {out}" in captured.out + captured.err
    assert MSNModel.from_pretrained(out) is not None
    assert json.loads((out / "train_results.json").read_text())["completed_steps"] == 2
    assert not (out / ".final").exists()


# Runs `msn-pretrain` as its console script does (`cli.run`), with a probe: the MSN_PAUSE_AT_FORWARD-th forward of
# rank MSN_PAUSE_RANK touches `paused` in the log folder and waits (up to 60 s) for the test to touch `go`.
PAUSE_LAUNCHER = """
import os, signal, sys, time
from pathlib import Path
from msn_hf import cli, modeling_msn
from msn_hf import pretraining as pt

# Ctrl-C as at a terminal: a suite started as a shell's background job (`make test &`) passes SIGINT down ignored.
signal.signal(signal.SIGINT, signal.default_int_handler)

rank = int(os.environ.get("RANK", "0"))
log = Path(os.environ["MSN_TEST_LOG"])
(log / f"pid_{rank}").write_text(str(os.getpid()))
forward, calls = modeling_msn.MSNModel.forward, [0]

def paused_forward(self, *args, **kwargs):
    calls[0] += 1
    if calls[0] == int(os.environ.get("MSN_PAUSE_AT_FORWARD", "0")) and rank == int(os.environ.get("MSN_PAUSE_RANK", "0")):
        (log / "paused").touch()
        deadline = time.time() + 60
        try:
            while not (log / "go").exists() and time.time() < deadline:
                time.sleep(0.05)
        finally:  # left by "go" or by an exception (a Ctrl-C that exits at once)
            (log / "unpaused").touch()
    return forward(self, *args, **kwargs)

modeling_msn.MSNModel.forward = paused_forward
sys.exit(cli.run(pt.main, "msn-pretrain", sys.argv[1:]))
"""


def signal_when_paused(
    log: Path, rank: int, signals: list[int], gap: float = 0.5, repeat_last: int = 0
) -> threading.Thread:
    """
    A thread that, once rank `rank` pauses, sends it `signals` (`gap` seconds apart), then lets it go on. With
    `repeat_last`, the last signal is sent again up to that many times (`gap` apart) while the rank is paused: two
    signals that arrive before Python runs its handler count as one, and a test of "the second one" must not hang on
    that.
    """

    def send():
        deadline = time.time() + 120
        while not (log / "paused").exists() and time.time() < deadline:
            time.sleep(0.1)
        pid = int((log / f"pid_{rank}").read_text())
        for i, signum in enumerate([*signals, *[signals[-1]] * repeat_last]):
            if i >= len(signals) and (log / "unpaused").exists():  # the signals so far took effect
                break
            os.kill(pid, signum)
            time.sleep(gap)
        (log / "go").touch()

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def test_a_second_ctrl_c_exits_at_once_without_a_traceback(tmp_path, monkeypatch):
    monkeypatch.setattr(conftest, "LAUNCHER", PAUSE_LAUNCHER)
    out = tmp_path / "run"
    # The pause holds the 2nd step; the second Ctrl-C must not wait for it to end (it would wait 60 s).
    signal_when_paused(tmp_path / "log", rank=0, signals=[signal.SIGINT, signal.SIGINT], gap=1.0, repeat_last=5)
    start = time.time()
    result = conftest.launch(tmp_path, [*TINY_RUN, "--max_train_steps", "5", "--output_dir", out],
                             env={"MSN_PAUSE_AT_FORWARD": "2"})  # fmt: skip
    assert result.returncode == 130, result.stderr[-3000:]
    assert time.time() - start < 50
    assert "Traceback" not in result.stderr
    assert "msn-pretrain: interrupted" in result.stderr
    assert checkpointing.find_latest_checkpoint(out) is None  # it stopped at once, not after the step


def test_sigterm_to_one_process_of_two_stops_both_at_one_step_and_resumes_to_the_same_weights(
    tmp_path, monkeypatch, parquet_shards, uninterrupted_two_process_stream
):
    monkeypatch.setattr(conftest, "LAUNCHER", PAUSE_LAUNCHER)
    out = tmp_path / "run"
    args = [*RUN_ARGS, *STREAM_ARGS, "--train_files", str(parquet_shards / "*.parquet"), "--output_dir", out]
    # Only rank 1 is signalled, during its 2nd step: rank 0 must stop after the same step, or the two would wait for
    # each other in different collectives.
    signal_when_paused(tmp_path / "log", rank=1, signals=[signal.SIGTERM])
    result = conftest.launch(tmp_path, args, processes=2, env={"MSN_PAUSE_AT_FORWARD": "2", "MSN_PAUSE_RANK": "1"})
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert output.count("stopped at step 2: resume with --resume_from_checkpoint latest") == 1, output[-3000:]
    assert checkpointing.find_latest_checkpoint(out) == out / "checkpoint-2"
    assert len(list((out / "checkpoint-2").glob("dataloader_state_*.json"))) == 2  # every process wrote its part
    assert not (out / "model.safetensors").exists()

    result = conftest.launch(tmp_path, [*args, "--resume_from_checkpoint", "latest"], processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = MSNModel.from_pretrained(uninterrupted_two_process_stream / "run").state_dict()
    for key, value in MSNModel.from_pretrained(out).state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)


# --- 8. --push_to_hub is checked before the first step ---------------------------------------------------------------


class FakeHub:
    """An `HfApi` stand-in: `failures` maps a method name to the exception it raises."""

    failures: dict = {}
    calls: list = []

    def __init__(self, token=None):
        self.token = token
        FakeHub.calls.append(("init", token))

    def _call(self, name: str):
        FakeHub.calls.append((name,))
        if name in FakeHub.failures:
            raise FakeHub.failures[name]

    def whoami(self):
        self._call("whoami")
        return {"name": "user"}

    def create_repo(self, repo_id, private=False, exist_ok=False):
        self._call("create_repo")
        return type("RepoUrl", (), {"repo_id": repo_id if "/" in repo_id else f"user/{repo_id}"})()

    def upload_folder(self, repo_id, folder_path, commit_message=None, ignore_patterns=None):
        self._call("upload_folder")
        FakeHub.calls.append(("uploaded", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))


@pytest.fixture
def fake_hub(monkeypatch):
    """A reachable Hub (this test session is offline: conftest)."""
    FakeHub.failures, FakeHub.calls = {}, []
    monkeypatch.setattr(run_outputs, "HfApi", FakeHub)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return FakeHub


def hub_errors():
    """What the Hub client raises without a token, with a bad one, and in a namespace the token cannot write to."""
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    def http_error(status: int, message: str) -> HfHubHTTPError:
        response = type("Response", (), {"headers": {}, "request": None, "status_code": status})()
        return HfHubHTTPError(message, response=response)

    return {
        "no token": ({"whoami": LocalTokenNotFoundError("Token is required ... no token found.")}, "--hub_token"),
        "bad token": ({"whoami": http_error(401, "401 Client Error: Unauthorized\nBad credentials")}, "--hub_token"),
        "no rights": (
            {"create_repo": http_error(403, "403 Forbidden: You don't have the rights to create a model under 'org'")},
            "--hub_model_id",
        ),
    }


@pytest.mark.parametrize("case", ["offline", "offline with a token", "no token", "bad token", "no rights"])
def test_push_to_hub_is_checked_before_anything_is_created_or_trained(case, tmp_path, monkeypatch, capsys, fake_hub):
    token = ["--hub_token", "hf_x"] if case == "offline with a token" else []
    if case.startswith("offline"):
        # The real client, offline as this test session is (conftest).
        monkeypatch.setattr(run_outputs, "HfApi", huggingface_hub.HfApi)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        flag, reason = "--push_to_hub", "offline (HF_HUB_OFFLINE=1)"
    else:
        failures, flag = hub_errors()[case]
        fake_hub.failures = failures
        reason = {"no token": "no token", "bad token": "Unauthorized", "no rights": "403 Forbidden"}[case]
    def no_step(*args, **kwargs):
        raise AssertionError("a step was taken before the Hub was checked")

    monkeypatch.setattr(pt, "training_step", no_step)
    out = tmp_path / "run"
    status = cli.run(pt.main, "msn-pretrain", [*TINY_RUN, "--max_train_steps", "1", "--output_dir", str(out),
                                               "--push_to_hub", "--hub_model_id", "org/msn-tiny", *token])  # fmt: skip
    assert status == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and flag in lines[0] and reason in lines[0], lines
    assert not out.exists()


def test_a_failed_upload_still_prints_the_summary_the_folder_and_the_upload_command(tmp_path, capsys, fake_hub):
    fake_hub.failures = {"upload_folder": ConnectionError("Connection reset by peer")}
    out = tmp_path / "run"
    status = cli.run(pt.main, "msn-pretrain", [*TINY_RUN, "--max_train_steps", "1", "--output_dir", str(out),
                                               "--push_to_hub", "--hub_model_id", "msn-tiny"])  # fmt: skip
    captured = capsys.readouterr()
    assert status == 1
    assert f"msn-pretrain: model, processor and card in {out} (1 steps)" in captured.out
    lines = error_lines(captured.err)
    assert len(lines) == 1 and "Connection reset by peer" in lines[0]
    assert f"hf upload user/msn-tiny {out}" in lines[0]
    assert "Traceback" not in captured.err
    assert (out / "model.safetensors").is_file()
    assert [call[0] for call in fake_hub.calls].index("whoami") < [call[0] for call in fake_hub.calls].index(
        "upload_folder"
    )


# --- 21. tokens stay out of every file, tracker and log -------------------------------------------------------------


def test_the_hub_token_reaches_no_file_tracker_or_log(tmp_path, capfd, caplog, fake_hub):
    pytest.importorskip("tensorboard")
    sentinel = "hf_SENTINEL_d41d8cd98f00b204e9800998ecf8427e"
    out = tmp_path / "run"
    with caplog.at_level("DEBUG"):
        pt.main([*TINY_RUN, "--max_train_steps", "2", "--checkpointing_steps", "1", "--report_to", "tensorboard",
                 "--output_dir", str(out), "--push_to_hub", "--hub_model_id", "msn-tiny", "--hub_token", sentinel])  # fmt: skip
    assert ("init", sentinel) in fake_hub.calls  # the token was used, for the Hub only
    assert any(call[0] == "uploaded" for call in fake_hub.calls)
    files = [path for path in out.rglob("*") if path.is_file()]
    assert any("tfevents" in path.name for path in files) and (out / "checkpoint-2").is_dir()
    assert [str(path) for path in files if sentinel.encode() in path.read_bytes()] == []
    captured = capfd.readouterr()
    assert sentinel not in captured.out + captured.err + caplog.text
    assert_written_by_a_run(out)


def test_credentials_in_shard_urls_reach_no_card_record_tracker_or_message():
    # A URL may carry a password or a signed query (`https://user:token@host/...`, S3's presigned `?X-Amz-Signature=`):
    # `--train_files` was written as given into the card's data name, msn_data.json and the tracker config.
    secrets = ("hf_SENTINEL_password", "SENTINEL_signature")
    urls = ["https://ana:hf_SENTINEL_password@data.example.org/shards/train-0.parquet",
            "s3://bucket/shards/train-1.parquet?X-Amz-Signature=SENTINEL_signature&X-Amz-Expires=3600"]  # fmt: skip
    args, data_args = pt.parse_args(["--train_files", *urls, "--report_to", "tensorboard"])
    shown = json.dumps([data_args.source_name, data_source(data_args), pt.tracker_config(args, data_args)])
    assert [secret for secret in secrets if secret in shown] == []
    # What is shown still names each shard (host, bucket, file), and two command lines still compare equal.
    assert "data.example.org/shards/train-0.parquet" in shown and "bucket/shards/train-1.parquet" in shown
    assert data_source(data_args) == data_source(pt.parse_args(["--train_files", *urls])[1])
    assert resolve_shards(urls) == ("parquet", urls)  # the shards themselves are read with their credentials
    with pytest.raises(ValueError, match="--train_files") as error:
        resolve_shards([urls[1].replace(".parquet", ".zip")])
    assert "SENTINEL" not in str(error.value)


# --- 13. msn-evaluate does not score on images the model was pretrained on -----------------------------------------


@pytest.fixture(scope="module")
def train_only_data(tmp_path_factory) -> Path:
    """40 labelled images in a `save_to_disk` folder with a train split only: no evaluation split to use."""
    folder = tmp_path_factory.mktemp("train_only") / "data"
    datasets.DatasetDict(train=labelled_dataset(40)).save_to_disk(str(folder))
    return folder


EVALUATE_FAST = ["--shots", "1", "--seeds", "0", "--label_fraction", "0", "--knn_k", "0", "--no_progress"]


@pytest.mark.parametrize("how", ["--skip_evaluation", "--max_eval_samples", "--streaming"])
def test_a_run_that_held_nothing_out_is_not_scored_on_its_own_images(how, train_only_data, tmp_path, capsys):
    out = tmp_path / "run"
    flags = {"--skip_evaluation": ["--skip_evaluation"], "--max_eval_samples": ["--max_eval_samples", "10"],
             "--streaming": ["--streaming", "--shuffle_buffer_size", "0"]}[how]  # fmt: skip
    pt.main([*TINY_MODEL_ARGS, "--per_device_train_batch_size", "16", "--max_train_steps", "1", "--dataset_name",
             str(train_only_data), *flags, "--output_dir", str(out)])  # fmt: skip
    record = json.loads((out / DATA_RECORD).read_text())
    assert record["held_out"] is None and record["source"]["dataset_name"] == str(train_only_data.absolute())
    capsys.readouterr()
    evaluate = ["--model_name_or_path", str(out), "--dataset_name", str(train_only_data), *EVALUATE_FAST]
    assert cli.run(evaluation.main, "msn-evaluate", evaluate) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "pretrained on" in lines[0] and "--allow_seen_images" in lines[0], lines
    assert not (out / "lowshot_results.json").exists()
    if how == "--skip_evaluation":  # knowingly: scored, and the card says so
        evaluation.main([*evaluate, "--allow_seen_images"])
        facts = json.loads((out / CARD_FACTS_FILE).read_text())
        assert "seen in pretraining" in facts["eval_split"]
        assert "seen in pretraining" in (out / "README.md").read_text()


def test_a_run_that_held_out_images_is_scored_on_the_same_ones_and_its_card_says_which(train_only_data, tmp_path):
    out = tmp_path / "run"
    pt.main([*TINY_MODEL_ARGS, "--per_device_train_batch_size", "16", "--max_train_steps", "1", "--dataset_name",
             str(train_only_data), "--output_dir", str(out)])  # fmt: skip
    record = json.loads((out / DATA_RECORD).read_text())
    assert record["held_out"] == record["eval_split"] == "held-out 20 % of train (seed 0)"
    facts = json.loads((out / CARD_FACTS_FILE).read_text())
    assert facts["eval_split"] == "held-out 20 % of train (seed 0)"
    assert "held-out 20 % of train (seed 0)" in (out / "README.md").read_text()
    evaluate = ["--model_name_or_path", str(out), "--dataset_name", str(train_only_data), *EVALUATE_FAST]
    results = evaluation.main(evaluate)
    assert results["settings"]["num_test"] == 8  # the 20 % the run held out
    # Another hold-out of the same images would hold pretrained images.
    with pytest.raises(ValueError, match="--allow_seen_images"):
        evaluation.main([*evaluate, "--test_size", "0.5"])
    with pytest.raises(ValueError, match="--allow_seen_images"):
        evaluation.main([*evaluate, "--max_train_samples", "30"])


def test_a_separate_split_is_scored_and_named_on_the_card(tmp_path):
    # The built-in digits: pretrained on their train split, evaluated on their test split.
    out = tmp_path / "run"
    pt.main([*TINY_MODEL_ARGS, "--per_device_train_batch_size", "16", "--max_train_samples", "32",
             "--max_train_steps", "1", "--skip_evaluation", "--output_dir", str(out)])  # fmt: skip
    record = json.loads((out / DATA_RECORD).read_text())
    assert record["held_out"] is None and record["split"] == "32 random rows of train"
    evaluation.main(["--model_name_or_path", str(out), "--max_train_samples", "100", "--max_test_samples", "50",
                     *EVALUATE_FAST])  # fmt: skip
    facts = json.loads((out / CARD_FACTS_FILE).read_text())
    assert facts["eval_split"] == "50 random rows of test" and facts["eval_dataset"] == "scikit-learn digits (built in)"
