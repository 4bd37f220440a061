#!/usr/bin/env python
"""
Low-shot evaluation of a frozen MSN encoder (the same as the `msn-evaluate` console script).

Multinomial logistic regression on 1, 2, 5 and 10 labelled images per class and on 1 % of the labels (mean and
standard deviation over seeds), and cosine 20-nearest-neighbour accuracy on all labels, optionally against a randomly
initialised encoder of the same shape and raw pixels. Prints a table and writes the results as JSON. Example, on the
built-in digits:

    python examples/evaluate_lowshot.py --model_name_or_path outputs/msn-digits --baselines random pixels

See `python examples/evaluate_lowshot.py --help` for the data arguments (`--dataset_name`, `--train_dir`, ...), which
are those of the pretraining script, and `msn_hf.evaluation.evaluate_lowshot` for the library function.
"""

from msn_hf.cli import evaluate

if __name__ == "__main__":
    evaluate()
