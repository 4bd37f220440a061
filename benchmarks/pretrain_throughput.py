"""
`msn-pretrain` (examples/pretrain_msn.py) end to end for a fixed number of steps, once per setting, and its training
throughput: the mean `images_per_second` of `metrics.jsonl` after the first logged window (start-up excluded).

Settings: `--dataloader_num_workers` 0, 1, 2 with the views drawn in the workers, and each with `--views_on_device`
(workers only decode and make canvases; views drawn in the training process on its device). Extra arguments after
`--` go to every run, e.g. a dataset or a bigger model; by default the built-in digits preset.

    python benchmarks/pretrain_throughput.py --steps 40
    python benchmarks/pretrain_throughput.py --steps 60 --workers 0 4 8 -- --dataset_name DIR --backbone vit_small_patch16_224
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from msn_hf.run_outputs import METRICS_FILE, read_metrics

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "pretrain_msn.py"


def run(steps: int, workers: int, on_device: bool, logging_steps: int, extra: list[str]) -> float:
    with tempfile.TemporaryDirectory() as output_dir:
        command = [
            sys.executable, str(SCRIPT), "--output_dir", output_dir, "--max_train_steps", str(steps),
            "--dataloader_num_workers", str(workers), "--logging_steps", str(logging_steps), "--skip_evaluation",
            *(["--views_on_device"] if on_device else []), *extra,
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(result.stderr[-3000:])
        records = read_metrics(Path(output_dir) / METRICS_FILE)
    return statistics.mean(r["images_per_second"] for r in records[1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--logging_steps", type=int, default=10)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=1, help="repeat every setting, interleaved")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: arguments for every run")
    args = parser.parse_args()
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    settings = [(workers, on_device) for workers in args.workers for on_device in (False, True)]
    results = {setting: [] for setting in settings}
    for _ in range(args.rounds):
        for workers, on_device in settings:
            results[(workers, on_device)].append(run(args.steps, workers, on_device, args.logging_steps, extra))
            print(f"workers={workers} views_on_device={on_device}: {results[(workers, on_device)][-1]:.1f}",
                  file=sys.stderr)  # fmt: skip
    print(f"{args.steps} steps, extra arguments: {' '.join(extra) or '(digits preset)'}")
    print("| dataloader workers | views drawn in | images/s per round |")
    print("|---:|---|---|")
    for workers, on_device in settings:
        where = "training process (device)" if on_device else ("workers" if workers else "main process")
        speeds = ", ".join(f"{v:.0f}" for v in results[(workers, on_device)])
        print(f"| {workers} | {where} | {speeds} |")


if __name__ == "__main__":
    main()
