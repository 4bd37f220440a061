"""
Label efficiency under a fixed wall-clock budget: pretrain with `msn-pretrain`, then evaluate the target encoder
against a random encoder of the same shape and raw pixels (`msn_hf.evaluation`, the authors' protocol).

Data sets, both offline:
- `digits`: scikit-learn's digits, built into msn_hf (32 px grey, 10 classes, held-out test split);
- `shapes`: generated here: 10 classes of shapes and textures (disc, square, triangle, cross, ring, and
  horizontal, vertical, diagonal stripes, checkerboard, dots) at random position, size, colours and noise, 32 px
  RGB, written as image folders (train / test).

The number of steps that fits the budget is measured first (a short timed run of the same recipe), then the run is
laid over that many steps (so that its schedules end where the run does) and timed.

    python benchmarks/label_efficiency.py --datasets digits shapes --budget_seconds 180
    python benchmarks/label_efficiency.py --datasets digits --variant patch8="--backbone_kwargs {...}" ...

Each `--variant NAME=FLAGS` adds a run with extra `msn-pretrain` flags (a sweep); the default is one run with the
auto recipe. Results: a markdown table on stdout and JSON in `--output_dir`.
"""

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "pretrain_msn.py"
SHAPES = ("disc", "square", "triangle", "cross", "ring", "hstripes", "vstripes", "dstripes", "checker", "dots")


def draw_shape(kind: str, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """One image of class `kind`: random background and foreground colours, position, scale and pixel noise."""
    background, foreground = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    while np.abs(background.astype(int) - foreground).sum() < 150:
        foreground = rng.integers(0, 256, 3)
    image = Image.new("RGB", (size, size), tuple(int(c) for c in background))
    draw = ImageDraw.Draw(image)
    fill = tuple(int(c) for c in foreground)
    radius = rng.uniform(0.22, 0.4) * size
    cx, cy = rng.uniform(radius, size - radius, 2)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    period = int(rng.integers(4, 8))
    offset = int(rng.integers(0, period))
    if kind == "disc":
        draw.ellipse(box, fill=fill)
    elif kind == "square":
        angle = rng.uniform(0, math.pi / 2)
        corners = [(cx + radius * math.cos(angle + k * math.pi / 2), cy + radius * math.sin(angle + k * math.pi / 2))
                   for k in range(4)]  # fmt: skip
        draw.polygon(corners, fill=fill)
    elif kind == "triangle":
        angle = rng.uniform(0, 2 * math.pi)
        corners = [(cx + radius * math.cos(angle + k * 2 * math.pi / 3), cy + radius * math.sin(angle + k * 2 * math.pi / 3))
                   for k in range(3)]  # fmt: skip
        draw.polygon(corners, fill=fill)
    elif kind == "cross":
        width = max(2, radius / 3)
        draw.rectangle((cx - radius, cy - width, cx + radius, cy + width), fill=fill)
        draw.rectangle((cx - width, cy - radius, cx + width, cy + radius), fill=fill)
    elif kind == "ring":
        draw.ellipse(box, outline=fill, width=max(2, int(radius / 3)))
    elif kind in ("hstripes", "vstripes", "dstripes", "checker"):
        ys, xs = np.mgrid[0:size, 0:size]
        coordinate = {"hstripes": ys, "vstripes": xs, "dstripes": xs + ys, "checker": None}[kind]
        if kind == "checker":
            mask = ((xs + offset) // period + (ys + offset) // period) % 2 == 0
        else:
            mask = (coordinate + offset) % period < period / 2
        pixels = np.where(mask[..., None], foreground, background).astype(np.uint8)
        image = Image.fromarray(pixels)
    elif kind == "dots":
        for y in range(offset, size, period + 2):
            for x in range(offset, size, period + 2):
                draw.ellipse((x - 1.2, y - 1.2, x + 1.2, y + 1.2), fill=fill)
    pixels = np.asarray(image).astype(np.int16) + rng.normal(0, 12, (size, size, 3)).astype(np.int16)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def make_shapes(folder: Path, train_per_class: int = 200, test_per_class: int = 50, seed: int = 0) -> Path:
    """Write the `shapes` image folders `folder/train/<class>/*.png` and `folder/test/<class>/*.png` (once)."""
    if (folder / "done").exists():
        return folder
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for kind in SHAPES:
            (folder / split / kind).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                draw_shape(kind, rng).save(folder / split / kind / f"{i}.png")
    (folder / "done").write_text("ok")
    return folder


def pretrain(data_flags: list[str], extra: list[str], output_dir: Path, max_steps: int | None, env=None) -> float:
    """Run msn-pretrain; returns its wall time in seconds."""
    command = [sys.executable, str(SCRIPT), *data_flags, *extra, "--output_dir", str(output_dir), "--overwrite_output_dir"]
    if max_steps is not None:
        command += ["--max_train_steps", str(max_steps)]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-4000:]}")
    return time.perf_counter() - start


def steps_in_budget(data_flags, extra, work: Path, budget_seconds: float, probe_steps: int = 30) -> int:
    """Steps that fit the budget, from the time of a probe run of `probe_steps` (start-up cost removed)."""
    short = pretrain(data_flags, [*extra, "--skip_evaluation"], work / "probe-short", 3)
    long = pretrain(data_flags, [*extra, "--skip_evaluation"], work / "probe-long", probe_steps)
    per_step = max(1e-3, (long - short) / (probe_steps - 3))
    startup = max(0.0, short - 3 * per_step)
    return max(10, int((budget_seconds - startup) / per_step))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["digits", "shapes"], choices=["digits", "shapes"])
    parser.add_argument("--budget_seconds", type=float, default=180.0, help="Pretraining wall-clock budget per run.")
    parser.add_argument("--variant", action="append", default=[], help="NAME=FLAGS: a run with extra flags.")
    parser.add_argument("--max_train_steps", type=int, help="Skip the timing probe and run this many steps.")
    parser.add_argument("--output_dir", default="outputs/label_efficiency")
    args = parser.parse_args(argv)
    output = Path(args.output_dir)
    variants = [tuple(v.split("=", 1)) for v in args.variant] or [("auto", "")]
    data = {"digits": []}
    if "shapes" in args.datasets:
        shapes = make_shapes(output / "shapes-data")
        data["shapes"] = ["--train_dir", str(shapes / "train"), "--test_dir", str(shapes / "test"),
                          "--per_device_train_batch_size", "64", "--num_train_epochs", "20"]  # fmt: skip
    results = {}
    for dataset in args.datasets:
        for name, flags in variants:
            work = output / dataset / name
            extra = shlex.split(flags)
            steps = args.max_train_steps or steps_in_budget(data[dataset], extra, work, args.budget_seconds)
            seconds = pretrain(data[dataset], [*extra, "--skip_evaluation"], work / "run", steps)
            evaluate = [sys.executable, "-m", "msn_hf.evaluation", "--model_name_or_path", str(work / "run"),
                        "--baselines", "random", "pixels", "--no_progress",
                        "--output_file", str(work / "eval.json")]  # fmt: skip
            if dataset == "shapes":
                evaluate += ["--train_dir", str(output / "shapes-data" / "train"),
                             "--test_dir", str(output / "shapes-data" / "test")]  # fmt: skip
            subprocess.run(evaluate, check=True, capture_output=True, text=True)
            evaluation = json.loads((work / "eval.json").read_text())
            results[f"{dataset}/{name}"] = dict(steps=steps, pretrain_seconds=round(seconds, 1), flags=flags,
                                                encoders=evaluation["encoders"], settings=evaluation["settings"])  # fmt: skip
            print(f"{dataset}/{name}: {steps} steps in {seconds:.0f} s", flush=True)
    (output / "results.json").write_text(json.dumps(results, indent=2))
    print(format_results(results))
    return results


def format_results(results: dict) -> str:
    header = "| data / run | steps | pretrain s | encoder | 1-shot | 5-shot | 10-shot | kNN-20 |"
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for key, run in results.items():
        for encoder, values in run["encoders"].items():
            shots = [values["logistic"].get(f"{k}-shot", {}).get("mean") for k in (1, 5, 10)]
            cells = [f"{100 * v:.1f}" if v is not None else "-" for v in shots]
            lines.append(f"| {key} | {run['steps']} | {run['pretrain_seconds']} | {encoder} | " + " | ".join(cells)
                         + f" | {100 * values.get('knn', float('nan')):.1f} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
