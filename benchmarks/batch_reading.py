"""
What a map-style batch costs before the model sees it: reading the rows, decoding the images and drawing the views,
as the training process does it without DataLoader workers (`msn-pretrain`'s default on a CPU). Decoded images kept
in memory (`IndexedDataset(..., cache_bytes=DECODED_IMAGE_CACHE_BYTES)`, the loops' default) against reading and
decoding every row again (`cache_bytes=0`, as with workers), batches taking turns so that a machine's drift hits both.
The data is the built-in digits with the processor of `make pretrain`'s auto recipe (32 px, 1 anchor + 4 focal views);
the cache is filled by one pass first, as after a run's first epoch. Prints the median milliseconds per batch of
each and their ratio.

    python benchmarks/batch_reading.py [--batch_size 64] [--batches 60] [--threads 2]
"""

import argparse
import statistics
import time

import datasets
import torch

from msn_hf import MSNImageProcessor
from msn_hf.data import load_digits_dataset
from msn_hf.recipe import auto_recipe
from msn_hf.training import DECODED_IMAGE_CACHE_BYTES, IndexedDataset, MSNViewsCollator


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = load_digits_dataset("train").cast_column("image", datasets.Image(decode=False)).with_format(None)
    recipe = auto_recipe(32, True, len(rows), args.batch_size, 3_000)
    collator = MSNViewsCollator(MSNImageProcessor(**recipe["processor"]), "image")
    kept = IndexedDataset(rows, "image", DECODED_IMAGE_CACHE_BYTES)
    read_again = IndexedDataset(rows)
    [kept[i] for i in range(len(kept))]

    times = {"kept in memory": [], "read and decoded again": []}
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    for batch in range(args.batches):
        indices = [order[(batch * args.batch_size + i) % len(order)] for i in range(args.batch_size)]
        for name, dataset in (("kept in memory", kept), ("read and decoded again", read_again)):
            start = time.perf_counter()
            collator([dataset[i] for i in indices])
            times[name].append(time.perf_counter() - start)
    print(f"digits, batch {args.batch_size}, {args.batches} batches each, {args.threads} threads, "
          f"{kept.cached_bytes / 2**20:.1f} MiB kept:")  # fmt: skip
    for name, values in times.items():
        print(f"  {name}: {1e3 * statistics.median(values):.1f} ms per batch")
    medians = [statistics.median(values) for values in times.values()]
    print(f"  saved: {1e3 * (medians[1] - medians[0]):.1f} ms per batch ({medians[1] / medians[0]:.2f}x)")


if __name__ == "__main__":
    main()
