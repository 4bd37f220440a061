#!/usr/bin/env python
"""
Fine-tune an MSN encoder for image classification with the 🤗 Trainer (in the style of Transformers'
`run_image_classification.py`), or train only a linear classifier on the frozen encoder (`--freeze_encoder`).

The encoder comes from the TARGET encoder of an `MSNModel` pretraining folder (or from a fine-tuned
`MSNForImageClassification` folder); the data from `--dataset_name` (Hub id or `save_to_disk` folder),
`--train_dir` (an image folder) or, with neither, the built-in digits. Example:

    python examples/finetune_classification.py --model_name_or_path outputs/msn-digits \
        --output_dir outputs/msn-digits-classifier --do_train --do_eval --num_train_epochs 20 \
        --learning_rate 1e-3 --per_device_train_batch_size 64 --eval_strategy epoch --report_to none
"""

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    set_seed,
)

import msn_hf  # noqa: F401  (registers the MSN classes with the Auto classes)
from msn_hf.data import DataArguments, ImageDataset, decode_image
from msn_hf.evaluation import load_evaluation_data
from msn_hf.sources import source_name

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    """Which checkpoint to fine-tune, and how."""

    model_name_or_path: str = field(metadata={"help": "MSNModel pretraining folder or fine-tuned classifier."})
    image_processor_name: str | None = field(default=None, metadata={"help": "Processor folder; default: model's."})
    freeze_encoder: bool = field(default=False, metadata={"help": "Linear probing: train only the classifier."})
    classifier_pooling: str | None = field(default=None, metadata={"help": "'cls' or 'cls_mean' (class + mean patch)."})
    random_flip: bool = field(default=True, metadata={"help": "Random horizontal flips during training."})
    min_crop_scale: float = field(default=0.08, metadata={"help": "Smallest area fraction of the training crops."})
    ignore_mismatched_sizes: bool = field(
        default=False, metadata={"help": "Re-initialise a classifier of another number of labels."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Load code shipped with the checkpoint."})


def ensure_class_labels(train: ImageDataset, test: ImageDataset) -> None:
    """Give both splits one `ClassLabel` label column (string labels are encoded the same way in both)."""
    if train.num_labels is None:
        train.dataset = train.dataset.class_encode_column(train.label_column)
    feature = train.dataset.features[train.label_column]
    if test.dataset.features[test.label_column] != feature:
        test.dataset = test.dataset.cast_column(test.label_column, feature)


def build_transforms(image_processor, random_flip: bool = True, min_crop_scale: float = 0.08):
    """
    `(train_transform, eval_transform)` mapping a list of PIL images to a `(N, 3, H, W)` tensor. Training takes
    one view of the processor's pretraining recipe reduced to a random resized crop (and flip); evaluation is
    the processor's resize and centre crop.
    """
    train_settings = dict(
        return_views=True,
        num_anchor_views=0,
        num_focal_views=0,
        anchor_crop_scale=(min_crop_scale, 1.0),
        horizontal_flip_probability=0.5 if random_flip else 0.0,
        color_jitter_probability=0.0,
        grayscale_probability=0.0,
        blur_probability=0.0,
    )

    def train_transform(images):
        return image_processor(images, return_tensors="pt", **train_settings)["pixel_values"]

    def eval_transform(images):
        return image_processor(images, return_tensors="pt")["pixel_values"]

    return train_transform, eval_transform


def with_transform(dataset: ImageDataset, transform):
    """The dataset with `pixel_values` and `labels` computed on access; unreadable images give `None`."""

    def apply(batch):
        images = [decode_image(value) for value in batch[dataset.image_column]]
        readable = [image for image in images if image is not None]
        pixel_values = iter(transform(readable) if readable else [])
        return {
            "pixel_values": [next(pixel_values) if image is not None else None for image in images],
            "labels": batch[dataset.label_column],
        }

    data = dataset.dataset
    data.set_transform(apply)
    return data


def collate_fn(examples: list[dict]) -> dict:
    """Stack a batch, leaving out images that could not be read."""
    examples = [example for example in examples if example["pixel_values"] is not None]
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "labels": torch.tensor([example["labels"] for example in examples]),
    }


def compute_metrics(eval_prediction) -> dict:
    """Top-1 accuracy, computed locally (no `evaluate.load`, so no network access)."""
    predictions = np.argmax(eval_prediction.predictions, axis=1)
    return {"accuracy": float(np.mean(predictions == eval_prediction.label_ids))}


# How the Trainer's card begins its text when it is given no model to have been fine-tuned from.
FROM_SCRATCH = "This model was trained from scratch on"


class ClassifierTrainer(Trainer):
    """
    A `Trainer` whose model card (`create_model_card`, which `push_to_hub` calls too) names the model it started
    from, `base_model`, as the msn-pretrain card does: a Hub id in the card's `base_model` metadata, which the Hub
    links to it; a local folder by its absolute path (see `msn_hf.sources.source_name`) in the text only, since the
    Trainer's card links `finetuned_from` to huggingface.co and, given none, says "trained from scratch".
    """

    def __init__(self, *args, base_model: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.base_model = source_name(base_model)

    def create_model_card(self, **kwargs) -> None:
        local = os.path.isabs(self.base_model)
        super().create_model_card(**kwargs, finetuned_from=None if local else self.base_model)
        if local and self.is_world_process_zero():
            card = Path(self.args.output_dir) / "README.md"
            started = f"This model is a fine-tuned version of the local folder `{self.base_model}` on"
            card.write_text(card.read_text(encoding="utf-8").replace(FROM_SCRATCH, started, 1), encoding="utf-8")


def load_model(model_args: ModelArguments, label_names: list[str]):
    """An image classifier from `model_name_or_path`; for an MSNModel folder the encoder is its target encoder."""
    label2id = {name: i for i, name in enumerate(label_names)}
    config = AutoConfig.from_pretrained(
        model_args.model_name_or_path,
        num_labels=len(label_names),
        id2label={i: name for name, i in label2id.items()},
        label2id=label2id,
        finetuning_task="image-classification",
        trust_remote_code=model_args.trust_remote_code,
    )
    if model_args.classifier_pooling is not None:
        config.classifier_pooling = model_args.classifier_pooling
    model = AutoModelForImageClassification.from_pretrained(
        model_args.model_name_or_path,
        config=config,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
        trust_remote_code=model_args.trust_remote_code,
    )
    if model_args.freeze_encoder:
        # After loading: `from_pretrained` recreates parameters as trainable.
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name.startswith("classifier."))
    return model


def main(argv: list[str] | None = None) -> dict:
    """Train and/or evaluate; returns the metrics (`train_*`, `eval_*`)."""
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if training_args.hub_token:
        # The Trainer pickles its arguments into training_args.bin, saved with every checkpoint and uploaded by
        # `push_to_hub`: the token reaches the Hub client through this process's environment instead.
        os.environ["HF_TOKEN"], training_args.hub_token = training_args.hub_token, None
    # The transform builds `pixel_values` and `labels` from the image and label columns, which the Trainer must keep.
    training_args.remove_unused_columns = False
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=[logging.StreamHandler(sys.stdout)]
    )
    logger.setLevel(training_args.get_process_log_level())
    set_seed(training_args.seed)

    train, test = load_evaluation_data(data_args)
    ensure_class_labels(train, test)
    model = load_model(model_args, train.label_names)
    image_processor = AutoImageProcessor.from_pretrained(
        model_args.image_processor_name or model_args.model_name_or_path,
        trust_remote_code=model_args.trust_remote_code,
    )
    train_transform, eval_transform = build_transforms(image_processor, model_args.random_flip, model_args.min_crop_scale)

    trainer = ClassifierTrainer(
        model=model,
        base_model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=with_transform(train, train_transform) if training_args.do_train else None,
        eval_dataset=with_transform(test, eval_transform) if training_args.do_eval else None,
        compute_metrics=compute_metrics,
        processing_class=image_processor,
        data_collator=collate_fn,
    )
    metrics = {}
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
        metrics.update(result.metrics)
    if training_args.do_eval:
        eval_metrics = trainer.evaluate()
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)

    card = {
        "tasks": "image-classification",
        "dataset": data_args.source_name,
        "tags": ["image-classification", "msn", "vision"],
    }
    if training_args.push_to_hub:
        trainer.push_to_hub(**card)
    else:
        trainer.create_model_card(**card)
    return metrics


if __name__ == "__main__":
    main()
