"""
Model cards of MSN checkpoints: written by `msn-pretrain` (and `MSNTrainer` users), updated by `msn-evaluate`.

A card holds a results table (MSN against the baselines, low-shot settings as columns), `model-index` metadata
for the Hub's evaluation widget, the effective recipe, the loss curve, usage, the citation and the limitations of
the run. The facts it is rendered from are kept next to it in `msn_card.json`, so that a later evaluation can
re-render it with new results without the training arguments.
"""

import json
import os
import re
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .data import SPLIT_OF_FOLDER_NAME
from .files import write_text_atomically

CARD_FACTS_FILE = "msn_card.json"
# The license of the card's metadata unless the run states one: msn_hf's own.
DEFAULT_LICENSE = "apache-2.0"
LOSS_CURVE_FILE = "loss_curve.png"
MSN_BIBTEX = """@inproceedings{assran2022masked,
  title     = {Masked Siamese Networks for Label-Efficient Learning},
  author    = {Assran, Mahmoud and Caron, Mathilde and Misra, Ishan and Bojanowski, Piotr and Bordes, Florian and
               Vincent, Pascal and Joulin, Armand and Rabbat, Michael and Ballas, Nicolas},
  booktitle = {European Conference on Computer Vision (ECCV)},
  year      = {2022},
  eprint    = {2204.07141},
  archivePrefix = {arXiv}
}"""
ENCODER_LABELS = {
    "msn": "MSN (this model)",
    "random": "random init, same architecture",
    "pixels": "raw pixels",
}
# timm size names whose width and depth are standard: a backbone is called e.g. "ViT-S/16" only when it has them.
_TIMM_SIZES = {"tiny": ("Ti", 192, 12), "small": ("S", 384, 12), "base": ("B", 768, 12), "large": ("L", 1024, 24),
               "huge": ("H", 1280, 32)}  # fmt: skip


def describe_architecture(model) -> dict:
    """Width, depth, heads, patch, image size and parameter count of an [`MSNModel`]'s encoder."""
    encoder = model.get_encoder()
    patch = tuple(encoder.patch_embed.patch_size)
    return dict(
        timm_name=model.config.backbone,
        width=int(encoder.embed_dim),
        depth=len(encoder.blocks),
        heads=int(encoder.blocks[0].attn.num_heads),
        patch=int(patch[0]) if patch[0] == patch[1] else list(patch),
        image_size=int(model.config.image_size),
        encoder_parameters=sum(p.numel() for p in encoder.parameters()),
    )


def backbone_name(architecture: dict) -> str:
    """`"ViT-S/16"` when the timm name's standard size matches, otherwise the real shape, e.g. `"ViT 4x128, patch 8"`."""
    match = re.fullmatch(r"vit_(tiny|small|base|large|huge)_patch(\d+)_\d+", architecture["timm_name"])
    if match:
        short, width, depth = _TIMM_SIZES[match.group(1)]
        if (width, depth, int(match.group(2))) == (architecture["width"], architecture["depth"], architecture["patch"]):
            return f"ViT-{short}/{architecture['patch']}"
    return f"ViT {architecture['depth']}x{architecture['width']}, patch {architecture['patch']}"


def describe_views(processor, config) -> dict:
    """The views of one image as the processor draws them and the model masks them."""
    return dict(
        crop_size=int(processor.crop_size["height"]),
        focal_crop_size=int(processor.focal_crop_size["height"]),
        num_anchor_views=int(processor.num_anchor_views),
        num_focal_views=int(processor.num_focal_views),
        mask_ratio=float(config.mask_ratio),
        num_prototypes=int(config.num_prototypes),
        projection_output_size=int(config.projection_output_size),
        temperature=float(config.temperature),
    )


def _percent(value: float) -> str:
    return f"{100 * value:.1f}"


def format_table(results: dict, labels: dict[str, str] | None = None) -> str:
    """
    A markdown table of top-1 accuracies in % (mean ± std over seeds for the logistic regressions), one row per
    encoder, named by `labels` where it has the encoder's name.
    """
    encoders = results["encoders"]
    columns = list(next(iter(encoders.values()))["logistic"])
    has_knn = any("knn" in values for values in encoders.values())
    knn_name = f"kNN (k={results['settings']['knn_k']})"
    titles = [_column_title(name, results["settings"]) for name in columns]
    header = ["encoder", *titles, *([knn_name] if has_knn else [])]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, values in encoders.items():
        cells = [f"{100 * r['mean']:.1f} ± {100 * r['std']:.1f}" for r in values["logistic"].values()]
        if has_knn:
            cells.append(f"{100 * values['knn']:.1f}" if "knn" in values else "-")
        lines.append("| " + " | ".join([(labels or {}).get(name, name), *cells]) + " |")
    return "\n".join(lines)


def _column_title(setting: str, settings: dict) -> str:
    """
    A setting as its column is titled: the label fraction with the labels it drew (`'1% (14 labels)'`), which a
    percentage alone does not tell on a small set; results written before that count was kept show the name only.
    """
    images = settings.get("label_fraction_images")
    if setting.endswith("-shot") or images is None:
        return setting
    return f"{setting} ({images} labels)"


def results_table(results: dict) -> str:
    """Markdown table, one row per encoder (MSN first) and one column per setting; accuracies in %, mean ± std."""
    return format_table(results, labels=ENCODER_LABELS)


def eval_results(results: dict, facts: dict) -> list[EvalResult]:
    """One `model-index` metric per evaluation setting of the MSN encoder (k-shot, label fraction, kNN), in %."""
    msn = results["encoders"].get("msn")
    if msn is None:
        return []
    settings = results.get("settings", {})
    common = dict(
        task_type="image-classification",
        task_name="Low-shot image classification (frozen features)",
        # The evaluation data's own id (None: local images, `custom`); card facts written before that key existed
        # fall back to the pretraining data's.
        dataset_type=(facts.get("eval_dataset_id") if "eval_dataset_id" in facts else facts.get("dataset_id")) or "custom",
        dataset_name=_evaluation_data_title(facts),
        dataset_split=_metadata_split(facts.get("eval_split") or "test"),
        metric_type="accuracy",
    )
    num_seeds = len(settings.get("seeds", [])) or 1
    entries = []
    for name, run in msn["logistic"].items():
        entries.append(EvalResult(
            **common, metric_value=round(100 * run["mean"], 2), metric_config=name,
            metric_name=f"{name} top-1 (%), logistic regression, mean of {num_seeds} seeds",
        ))  # fmt: skip
    if "knn" in msn:
        k = settings.get("knn_k")
        entries.append(EvalResult(
            **common, metric_value=round(100 * msn["knn"], 2), metric_config="knn",
            metric_name=f"{k}-NN top-1 (%), all labels",
        ))  # fmt: skip
    return entries


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {seconds:02d} s"


def recipe_table(facts: dict) -> str:
    arch, views = facts["architecture"], facts["views"]
    rows = [
        ("backbone", f"{backbone_name(arch)}: width {arch['width']}, depth {arch['depth']}, {arch['heads']} heads, "
                     f"patch {arch['patch']}, {arch['encoder_parameters'] / 1e6:.2f} M parameters "
                     f"(timm `{arch['timm_name']}` as configured)"),
        ("views per image", f"1 target + {views['num_anchor_views']} anchor at {views['crop_size']} px "
                            f"(mask ratio {views['mask_ratio']:g}), {views['num_focal_views']} focal at "
                            f"{views['focal_crop_size']} px"),
        ("prototypes", f"{views['num_prototypes']} x {views['projection_output_size']}, "
                       f"temperature {views['temperature']:g}"),
        ("optimiser steps", facts.get("steps", "-")),
        ("batch size (global)", facts.get("batch_size", "-")),
        ("learning rate", facts.get("learning_rate_schedule", "-")),
        ("precision", facts.get("precision", "fp32")),
        ("wall time", f"{_duration(facts.get('wall_time_seconds'))}" + (f" on {facts['hardware']}" if facts.get("hardware") else "")),
        ("trained with", facts.get("trainer", "msn-pretrain")),
    ]  # fmt: skip
    if facts.get("base_model"):
        rows.insert(0, ("started from", f"`{facts['base_model']}`"))
    return "\n".join(["| | |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)])


def dataset_title(source: str | None) -> str:
    """
    How a data set is named in a title: a Hub id or a name as it is, a local folder or file by its own name, or by
    the folder that holds it when that name is a split's (`data/train` is "data").
    """
    if not source:
        return "custom data"
    names = [part.strip() for part in source.split(",")]
    titled = [_folder_title(name) if ("/" in name or os.sep in name) and not _is_hub_id(name) else name for name in names]
    return ", ".join(dict.fromkeys(titled))


def _folder_title(path: str) -> str:
    folder = Path(path.rstrip("/\\"))
    if folder.name.lower() in SPLIT_OF_FOLDER_NAME and folder.parent.name not in ("", ".", ".."):
        return folder.parent.name
    return folder.name


def _metadata_split(split: str) -> str:
    """The split a card's metadata names: a test folder (`"test_dir <path>"`) is "test", so that no local path
    reaches the Hub's metadata; the card's text names the folder."""
    return "test" if split.startswith("test_dir ") else split


def _evaluation_data_title(facts: dict) -> str:
    """
    The data set the card's results come from: the one stated for the evaluation (`eval_dataset`: msn-evaluate's
    data, a --test_dir), else the pretraining data (`dataset`), whose labelled split was evaluated.
    """
    return dataset_title(facts.get("eval_dataset") or facts.get("dataset"))


def _is_hub_id(name: str) -> bool:
    """`user/name` (one slash, no path syntax) that is not a folder here."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not os.path.exists(name)


def pictures_section(results: dict, output_dir: str | os.PathLike | None) -> str:
    """Markdown embedding the pictures of `results["pictures"]` that exist in `output_dir`."""
    pictures = results.get("pictures") or {}
    if output_dir is None:
        return ""
    output_dir = Path(output_dir)
    captions = {
        "neighbours.png": "Nearest training images of test images under the model's features (left) and under raw "
                          "pixels (right): what the features treat as alike",
        "lowshot.png": "Top-1 accuracy against labelled images per class, MSN against the baselines",
        "prototypes.png": "Share of the training images each prototype takes, sorted: a collapse shows as a few bars",
    }  # fmt: skip
    lines = [f"![{captions[name]}]({name})" for name in pictures.get("files", []) if (output_dir / name).exists()]
    prototypes = pictures.get("prototypes")
    if prototypes:
        lines.append(
            f"The training images use **{prototypes['used']} of the {prototypes['num_prototypes']} prototypes** (each "
            "image counted for its most likely prototype under the target encoder)."
        )
    return "".join(f"\n\n{line}" for line in lines)


def render_model_card(facts: dict, results: dict | None = None, output_dir: str | os.PathLike | None = None) -> ModelCard:
    """The card of a run described by `facts` (see [`write_model_card`]) with evaluation `results` (or none yet)."""
    arch = facts["architecture"]
    dataset = dataset_title(facts.get("dataset"))
    model_name = facts.get("model_name") or f"msn-{backbone_name(arch).lower().replace(' ', '-').replace('/', '')}"
    model_name = re.sub(r"[^a-z0-9.]+", "-", model_name.lower()).strip("-")
    # The Hub's `base_model` names a model on the Hub: a local folder or file (an absolute path) stays in the table.
    base_model = facts.get("base_model")
    card_data = ModelCardData(
        base_model=base_model if base_model and not os.path.isabs(base_model) else None,
        model_name=model_name,
        library_name="transformers",
        pipeline_tag="image-feature-extraction",
        license=facts.get("license") or DEFAULT_LICENSE,
        datasets=[facts["dataset_id"]] if facts.get("dataset_id") else None,
        tags=["msn", "masked-siamese-networks", "self-supervised", "vision", "image-feature-extraction", "timm"],
        eval_results=eval_results(results, facts) if results else None,
    )
    # The Hub repository when there is one, else this folder as the run named it: the snippets work as written.
    repo = facts.get("repo_id") or (str(output_dir) if output_dir is not None else "path/to/this/folder")
    settings = (results or {}).get("settings", {})
    num_labels = settings.get("num_labels")
    if results:
        split = f", {facts['eval_split']}" if facts.get("eval_split") else ""
        results_section = (
            f"Low-shot evaluation of the frozen target encoder on {_evaluation_data_title(facts)}{split} "
            f"({settings.get('num_train', '?')} training / {settings.get('num_test', '?')} test images, "
            f"{settings.get('num_labels', '?')} classes). Top-1 accuracy in %, logistic regression on the class "
            f"token with k images per class or a fraction of the labels, mean ± std over seeds "
            f"{settings.get('seeds', [])}; cosine kNN on all labels. Baselines ran on the same data and samples.\n\n"
            f"{results_table(results)}"
        )
        if settings.get("label_fraction_note"):
            results_section += f"\n\nNo label-fraction column: {settings['label_fraction_note']}"
        if settings.get("shots_note"):
            results_section += f"\n\nFewer images than shots: {settings['shots_note']}"
        results_section += pictures_section(results, output_dir)
    else:
        results_section = f"Not evaluated yet: `msn-evaluate --model_name_or_path {repo}` (with the data flags of the run)."
    loss_plot = ""
    if output_dir is not None and (Path(output_dir) / LOSS_CURVE_FILE).exists():
        loss_plot = f"\n\n![Training loss: cross-entropy (with the total) and me-max, on their own axes]({LOSS_CURVE_FILE})"
    evaluated = f", evaluated on {_evaluation_data_title(facts)}," if results else ""
    limitations = facts.get("limitations") or (
        f"Pretrained on {dataset} for {facts.get('steps', '?')} steps ({_duration(facts.get('wall_time_seconds'))}); "
        f"the figures above come from that pretraining and budget only{evaluated} and are not comparable with the "
        "paper's ImageNet results."
    )
    classifier_labels = f"num_labels={num_labels}, " if num_labels else "num_labels=NUM_CLASSES, "
    content = f"""---
{card_data.to_yaml()}
---

# MSN {backbone_name(arch)} pretrained on {dataset}

A Vision Transformer pretrained with Masked Siamese Networks (Assran et al., ECCV 2022) using `msn_hf`. The
checkpoint holds the anchor and target encoders, both projection heads and the prototypes; the **target encoder**
is the one used for evaluation and downstream tasks (`MSNModel(...).pooler_output` is its class token).

## Results

{results_section}

## Training recipe

{recipe_table(facts)}{loss_plot}

## Usage

Image embeddings (the target encoder's class token):

```python
import msn_hf  # registers the MSN classes; or pass trust_remote_code=True without it
from transformers import pipeline

extractor = pipeline("image-feature-extraction", model="{repo}", pool=True)
embedding = extractor("image.png")  # [[hidden_size floats]]
```

Fine-tuning a classifier (its encoder starts from the target encoder):

```python
from transformers import AutoModelForImageClassification

model = AutoModelForImageClassification.from_pretrained("{repo}", {classifier_labels}trust_remote_code=True)
```

`msn-convert to-vit-msn --model {repo} --output vit-msn` exports the target encoder as a Transformers
`ViTMSNModel`, which needs no custom code.

## Limitations

{limitations}

## Citation

```bibtex
{MSN_BIBTEX}
```
"""
    return ModelCard(content)


def write_model_card(
    output_dir: str | os.PathLike, model, processor, run_info: dict, results: dict | None = None
) -> Path:
    """
    Write `README.md` (and its facts, `msn_card.json`) into `output_dir`.

    Args:
        model ([`MSNModel`] or [`MSNForImageClassification`]): the trained model (architecture, views, prototypes).
        processor ([`MSNImageProcessor`]): its image processor (view sizes and counts).
        run_info (`dict`): facts of the run, all optional: `dataset` (words), `dataset_id` (Hub id, for the
            metadata), `eval_dataset`, `eval_dataset_id`, `eval_split`, `steps`, `batch_size` (global),
            `learning_rate_schedule` (words), `precision`, `wall_time_seconds`, `hardware`, `trainer`, `repo_id`,
            `model_name`, `license`, `limitations`, `base_model` (the weights the run started from: a Hub id, in
            the metadata and the recipe table, or an absolute local path, in the table only).
        results (`dict`, *optional*): the output of [`~msn_hf.evaluation.evaluate_lowshot`].

    Returns: the path of the card.
    """
    facts = {
        **run_info,
        "architecture": describe_architecture(model),
        "views": describe_views(processor, model.config),
    }
    output_dir = Path(output_dir)
    write_text_atomically(output_dir / CARD_FACTS_FILE, json.dumps(facts, indent=2, default=str))
    return _save_card(render_model_card(facts, results, output_dir), output_dir)


def update_model_card(output_dir: str | os.PathLike, results: dict, evaluated_on: dict | None = None) -> Path | None:
    """
    Re-render the card of an `msn_hf` run folder with new `results`; None when the folder has no card facts.
    `evaluated_on` (`eval_dataset`, `eval_split`, ...) replaces the facts of the run's own evaluation, in the card and
    in its facts file.
    """
    output_dir = Path(output_dir)
    facts_file = output_dir / CARD_FACTS_FILE
    if not facts_file.is_file():
        return None
    facts = json.loads(facts_file.read_text())
    if evaluated_on:
        facts.update(evaluated_on)
        write_text_atomically(facts_file, json.dumps(facts, indent=2, default=str))
    return _save_card(render_model_card(facts, results, output_dir), output_dir)


def headline(results: dict, setting: str | None = None) -> str:
    """One line, e.g. `5-shot top-1: MSN 81.2 % vs random init 30.5 %, raw pixels 60.1 %`."""
    encoders = results["encoders"]
    settings = list(encoders["msn"]["logistic"])
    setting = setting or ("5-shot" if "5-shot" in settings else settings[0])
    values = {name: encoders[name]["logistic"][setting]["mean"] for name in encoders}
    others = ", ".join(f"{ENCODER_LABELS.get(n, n).split(',')[0]} {_percent(v)} %" for n, v in values.items() if n != "msn")
    return f"{setting} top-1: MSN {_percent(values['msn'])} %" + (f" vs {others}" if others else "")


def _save_card(card: ModelCard, output_dir: Path) -> Path:
    path = output_dir / "README.md"
    write_text_atomically(path, str(card))
    return path


__all__ = ["headline", "render_model_card", "results_table", "update_model_card", "write_model_card"]
