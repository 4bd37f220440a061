#!/usr/bin/env python
"""
MSN pretraining with the Transformers `Trainer` instead of the Accelerate loop of `pretrain_msn.py`.

`MSNModel` returns its loss, so the `Trainer` optimises it as it is; `MSNMomentumCallback` adds the one thing the
`Trainer` does not know about: the EMA update of the target encoder after every optimiser step.

    python examples/pretrain_msn_trainer.py --output_dir outputs/msn-digits-trainer --max_steps 200
"""

import argparse

from transformers import Trainer, TrainingArguments

from msn_hf import MSNConfig, MSNImageProcessor, MSNModel
from msn_hf.data import load_digits_dataset
from msn_hf.pretraining import DIGITS_DEFAULTS, MSNMomentumCallback, MSNViewsCollator


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/msn-digits-trainer")
    parser.add_argument("--max_steps", type=int, default=200)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--per_device_train_batch_size", type=int, default=64)
    args = parser.parse_args(argv)

    config = MSNConfig(
        backbone=DIGITS_DEFAULTS["backbone"], backbone_kwargs=DIGITS_DEFAULTS["backbone_kwargs"],
        **DIGITS_DEFAULTS["config"],
    )
    model = MSNModel(config)
    processor = MSNImageProcessor(**DIGITS_DEFAULTS["processor"])
    views = MSNViewsCollator(processor, image_column="image")

    def collate(rows):
        batch = dict(views(rows))
        batch.pop("num_skipped")  # the built-in digits are all readable
        return batch

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        per_device_train_batch_size=args.per_device_train_batch_size,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.max_steps // 20),
        weight_decay=0.04,
        max_grad_norm=3.0,
        remove_unused_columns=False,  # the collator needs the image column
        dataloader_drop_last=True,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=load_digits_dataset("train"),
        data_collator=collate,
        callbacks=[MSNMomentumCallback()],
    )
    trainer.train()
    model.save_pretrained(args.output_dir)
    processor.save_pretrained(args.output_dir)


if __name__ == "__main__":
    main()
