"""
Label efficiency against wall-clock budget: pretrain with `msn-pretrain --max_train_time B`, then evaluate the
target encoder against a random encoder of the same shape and raw pixels (`msn-evaluate`, the authors' protocol).
It tells when MSN passes raw pixels on a kind of data, and how the time is best spent.

Data sets, all offline and of different kinds:
- `digits`: scikit-learn's digits, built into msn_hf (32 px grey, 10 classes, its held-out test split);
- `shapes`: generated here: 10 classes of shapes and textures at random position, size, colours and noise, 32 px;
- `photos`: natural-image statistics: 48 px crops of the two photographs scikit-learn ships (`china.jpg`,
  `flower.jpg`), at random position and scale, labelled by source photograph and quadrant (8 classes).

    python benchmarks/label_efficiency.py --datasets digits shapes photos --budgets 1m 3m 10m
    python benchmarks/label_efficiency.py --datasets photos --budgets 3m --variant grid4="--recipe_file r.json"
    python benchmarks/label_efficiency.py --continued shapes:photos --budgets 3m

Each `--variant NAME=FLAGS` adds a run with extra `msn-pretrain` flags (a sweep); the default is the auto recipe.
`--continued SOURCE:TARGET` pretrains on SOURCE for the first budget, then on TARGET compares continuing from it
(`--model_name_or_path`) with scratch at equal time and with the starting weights as they are.
Results: markdown tables on stdout, JSON and a plot (accuracy at 1/5/10 shots and kNN against budget) in
`--output_dir`.
"""

import argparse
import json
import math
import re
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
DATASETS = ("digits", "shapes", "photos")
SHOTS = (1, 2, 5, 10)


# --------------------------------------------------------------------------------------------------- data sets
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


def write_folders(folder: Path, classes: dict, train_per_class: int, test_per_class: int, seed: int = 0) -> Path:
    """`folder/train/<class>/*.png` and `folder/test/<class>/*.png` from `classes[name](rng) -> PIL image` (once)."""
    if (folder / "done").exists():
        return folder
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for name, draw in classes.items():
            (folder / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                draw(rng).save(folder / split / name / f"{i}.png")
    (folder / "done").write_text("ok")
    return folder


def photo_crops(size: int = 48) -> dict:
    """8 classes: a quadrant of one of scikit-learn's two photographs; each image a random square crop of it."""
    from sklearn.datasets import load_sample_images

    classes = {}
    for photo, name in zip(load_sample_images().images, ("china", "flower")):
        height, width = photo.shape[:2]
        for row in range(2):
            for col in range(2):
                top, left = row * height // 2, col * width // 2

                def crop(rng, photo=photo, top=top, left=left, height=height, width=width):
                    side = int(rng.integers(size, min(height, width) // 2))
                    y = top + int(rng.integers(0, height // 2 - side + 1))
                    x = left + int(rng.integers(0, width // 2 - side + 1))
                    return Image.fromarray(photo[y : y + side, x : x + side]).resize((size, size), Image.BICUBIC)

                classes[f"{name}-{'tb'[row]}{'lr'[col]}"] = crop
    return classes


def data_flags(dataset: str, output: Path) -> list[str]:
    if dataset == "digits":
        return []
    if dataset == "shapes":
        classes = {kind: (lambda rng, kind=kind: draw_shape(kind, rng)) for kind in SHAPES}
        folder = write_folders(output / "data-shapes", classes, train_per_class=200, test_per_class=50)
    else:
        folder = write_folders(output / "data-photos", photo_crops(), train_per_class=200, test_per_class=50)
    return ["--train_dir", str(folder / "train"), "--test_dir", str(folder / "test")]


# ------------------------------------------------------------------------------------------------------ runs
def run(command: list[str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-4000:]}")
    return time.perf_counter() - start


def pretrain(flags: list[str], extra: list[str], output_dir: Path, budget: str, seed: int) -> dict:
    """`msn-pretrain --max_train_time budget`, no evaluation; returns what its train_results.json says."""
    seconds = run([sys.executable, str(SCRIPT), *flags, *extra, "--max_train_time", budget, "--seed", str(seed),
                   "--skip_evaluation", "--output_dir", str(output_dir), "--overwrite_output_dir"])  # fmt: skip
    results = json.loads((output_dir / "train_results.json").read_text())
    return dict(steps=results.get("completed_steps"), process_seconds=round(seconds, 1))


def seed_run(flags: list[str], extra: list[str], folder: Path, budget: str, seed: int) -> dict:
    """One pretraining seed and its evaluation; a seed whose `seed.json` exists is read back, not run again."""
    record_file = folder / "seed.json"
    if record_file.exists():
        return json.loads(record_file.read_text())
    facts = pretrain(flags, extra, folder, budget, seed)
    entry = dict(**facts, seed=seed, accuracy=summary(evaluate(flags, folder, folder / "eval.json")))
    record_file.write_text(json.dumps(entry, indent=2))
    return entry


def evaluate(flags: list[str], model: Path, output_file: Path) -> dict:
    run([sys.executable, "-m", "msn_hf.evaluation", "--model_name_or_path", str(model), *flags, "--no_progress",
         "--no_pictures", "--output_file", str(output_file)])  # fmt: skip
    return json.loads(output_file.read_text())


def summary(evaluation: dict) -> dict:
    """`{encoder: {"1-shot": %, "5-shot": %, "10-shot": %, "knn": %}}`."""
    table = {}
    for encoder, values in evaluation["encoders"].items():
        row = {
            f"{k}-shot": 100 * values["logistic"][f"{k}-shot"]["mean"]
            for k in SHOTS
            if f"{k}-shot" in values["logistic"]
        }
        row["knn"] = 100 * values["knn"]
        table[encoder] = row
    return table


def format_table(results: dict) -> str:
    columns = [*(f"{k}-shot" for k in SHOTS), "knn"]
    lines = ["| data | budget | run | steps | encoder | " + " | ".join(columns) + " |",
             "|---|---|---|---|---|" + "---|" * len(columns)]  # fmt: skip
    for key, entry in results.items():
        dataset, budget, name = key.split("/")
        for encoder, row in entry["accuracy"].items():
            spread = entry.get("spread", {}).get(encoder, {})
            # The spread is over pretraining seeds: a baseline's is zero (its features do not depend on them).
            cells = [(f"{row[c]:.1f}" + (f" ± {spread[c]:.1f}" if spread.get(c, 0) >= 0.05 else "")) if c in row else "-"
                     for c in columns]  # fmt: skip
            steps = "/".join(str(run["steps"]) for run in entry["runs"]) if "runs" in entry else entry.get("steps", "-")
            lines.append(f"| {dataset} | {budget} | {name} | {steps} | {encoder} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """
    Accuracy (1/2/5/10-shot, kNN) against budget, one panel per data set. The colour is the setting; the line style
    the encoder: MSN solid, raw pixels dashed, random encoder dotted. The legend names both, once each.
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    datasets = sorted({key.split("/")[0] for key in results})
    columns = [*(f"{k}-shot" for k in SHOTS), "knn"]
    colours = dict(zip(columns, ("tab:blue", "tab:purple", "tab:orange", "tab:green", "tab:red")))
    styles = {"msn": "-", "pixels": "--", "random": ":"}
    figure = Figure(figsize=(5 * len(datasets), 4))
    axes = figure.subplots(1, len(datasets), squeeze=False)[0]
    for ax, dataset in zip(axes, datasets):
        runs = sorted(((seconds_of(key.split("/")[1]), entry) for key, entry in results.items()
                       if key.startswith(dataset + "/") and key.endswith("/auto")), key=lambda item: item[0])  # fmt: skip
        for encoder, style in styles.items():
            for column, colour in colours.items():
                points = [(budget / 60, entry["accuracy"][encoder][column]) for budget, entry in runs
                          if encoder in entry["accuracy"] and column in entry["accuracy"][encoder]]  # fmt: skip
                if points:
                    ax.plot(*zip(*points), style, color=colour, marker="o" if encoder == "msn" else None)
        handles = [Line2D([], [], color=colour, marker="o", label=column) for column, colour in colours.items()]
        handles += [Line2D([], [], color="black", linestyle=style, label=encoder) for encoder, style in styles.items()]
        ax.set_xscale("log")
        ax.set_xlabel("pretraining budget (minutes, 2 CPU cores)")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_title(dataset)
        ax.legend(handles=handles, fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def plot_continued(results: dict, target: str, path: Path) -> None:
    """Accuracy on `target` (1/2/5/10 shots, kNN) of each start of a continued-pretraining comparison, as grouped
    bars of the MSN encoder, with the raw-pixel and random-encoder baselines of the same evaluation as lines."""
    from matplotlib.figure import Figure

    columns = [*(f"{k}-shot" for k in SHOTS), "knn"]
    runs = [(key.split("/", 1)[1], entry["accuracy"]) for key, entry in results.items() if key.startswith(target + "/")]
    figure = Figure(figsize=(8, 4))
    ax = figure.subplots()
    width = 0.8 / len(runs)
    for i, (name, accuracy) in enumerate(runs):
        ax.bar([c + i * width for c in range(len(columns))], [accuracy["msn"][c] for c in columns], width, label=name)
    baselines = runs[0][1]
    for encoder, style in (("pixels", "--"), ("random", ":")):
        for c, column in enumerate(columns):
            ax.plot([c - width / 2, c + 0.8 - width / 2], [baselines[encoder][column]] * 2, style, color="black",
                    label=encoder if c == 0 else None)  # fmt: skip
    ax.set_xticks([c + 0.4 - width / 2 for c in range(len(columns))], columns)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"{target}: continued pretraining against scratch at equal time")
    ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def seconds_of(budget: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)([smhd]?)", budget).groups()
    return float(value) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[unit]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--budgets", nargs="+", default=["1m", "3m", "10m", "30m"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="Pretraining seeds (results averaged).")
    parser.add_argument("--variant", action="append", default=[], help="NAME=FLAGS: a run with extra flags.")
    parser.add_argument("--continued", help="SOURCE:TARGET data sets of a continued-pretraining comparison.")
    parser.add_argument("--output_dir", default="outputs/label_efficiency")
    args = parser.parse_args(argv)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    variants = [("auto", "")] + [tuple(v.split("=", 1)) for v in args.variant]
    results_file = output / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}

    def record(key: str, entry: dict) -> None:
        results[key] = entry
        results_file.write_text(json.dumps(results, indent=2))
        print(f"{key}: {entry.get('steps')} steps; MSN {entry['accuracy'].get('msn')}", flush=True)

    if args.continued:
        source, target = args.continued.split(":")
        budget = args.budgets[0]
        start = output / f"continued-{source}" / "run"
        pretrain(data_flags(source, output), [], start, budget, args.seeds[0])
        target_flags = data_flags(target, output)
        for name, extra in (("from-" + source, ["--model_name_or_path", str(start)]), ("scratch", [])):
            folder = output / f"continued-{target}" / name
            facts = pretrain(target_flags, extra, folder, budget, args.seeds[0])
            record(
                f"{target}/{budget}/{name}",
                dict(**facts, accuracy=summary(evaluate(target_flags, folder, folder / "eval.json"))),
            )
        record(
            f"{target}/0s/{source}-weights-as-they-are",
            dict(accuracy=summary(evaluate(target_flags, start, output / f"continued-{target}" / "start-eval.json"))),
        )
        plot_continued(results, target, output / "continued.png")
    else:
        for dataset in args.datasets:
            flags = data_flags(dataset, output)
            for budget in args.budgets:
                for name, extra in variants:
                    runs = [seed_run(flags, shlex.split(extra), output / dataset / budget / name / f"seed{seed}", budget, seed)
                            for seed in args.seeds]  # fmt: skip
                    accuracy = {encoder: {column: float(np.mean([r["accuracy"][encoder][column] for r in runs]))
                                          for column in runs[0]["accuracy"][encoder]} for encoder in runs[0]["accuracy"]}  # fmt: skip
                    spread = {encoder: {column: float(np.std([r["accuracy"][encoder][column] for r in runs]))
                                        for column in runs[0]["accuracy"][encoder]} for encoder in runs[0]["accuracy"]}  # fmt: skip
                    record(f"{dataset}/{budget}/{name}", dict(steps=runs[0]["steps"], seeds=args.seeds, accuracy=accuracy,
                                                              spread=spread, runs=runs, flags=extra))  # fmt: skip
        plot(results, output / "label_efficiency.png")
    print(format_table(results))
    return results


if __name__ == "__main__":
    main()
