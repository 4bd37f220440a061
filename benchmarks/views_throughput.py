"""
MSN pretraining views per second: CPU DataLoader workers against rendering on a device.

CPU: `MSNImageProcessor(return_views=True)` on decoded images inside a DataLoader with 1, 2, ... workers (one thread
each), as `msn-pretrain` does by default. Device: the workers only make `uint8` canvases (`make_canvas`) and the views
are drawn in this process with `device=...` (`--device cuda` when one exists; `--device cpu` runs the batched device
path on the CPU). Images are random RGB `--image_size` px JPEG-free tensors decoded once, so the figures are the view
work itself, not JPEG decoding. The recipe is the paper's: 1 target + 1 anchor view at 224 px, 10 focal views at 96 px.

    python benchmarks/views_throughput.py --workers 1 2 --batches 4
    python benchmarks/views_throughput.py --workers 16 --device cuda --batches 20
"""

import argparse
import time

import numpy as np
import torch
from PIL import Image

from msn_hf import MSNImageProcessor


class RandomImages(torch.utils.data.Dataset):
    def __init__(self, count: int, size: int):
        rng = np.random.default_rng(0)
        self.images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index]


class Collate:
    def __init__(self, processor: MSNImageProcessor, canvas: bool):
        self.processor, self.canvas = processor, canvas

    def __call__(self, images):
        if self.canvas:
            return self.processor.make_canvas(images)
        return dict(self.processor(images, return_views=True, return_tensors="pt"))


def _set_one_thread(_):
    torch.set_num_threads(1)


def images_per_second(processor, dataset, batch_size, workers, device=None) -> float:
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, collate_fn=Collate(processor, device is not None),
        worker_init_fn=_set_one_thread if workers else None, persistent_workers=False, prefetch_factor=2 if workers else None,
    )  # fmt: skip
    iterator = iter(loader)
    first = next(iterator)  # worker start-up and warm-up, not timed
    if device is not None:
        processor(first.to(device), return_views=True, seed=0, device=device)
    count, start = 0, time.perf_counter()
    for batch in iterator:
        if device is not None:
            views = processor(batch.to(device, non_blocking=True), return_views=True, device=device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            del views
        count += batch_size
    return count / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", help="also time rendering on this device (canvases made by the workers)")
    parser.add_argument("--device_workers", type=int, default=None, help="canvas workers (default: max --workers)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=4, help="timed batches per setting (after one warm-up batch)")
    parser.add_argument("--image_size", type=int, default=320)
    args = parser.parse_args()

    processor = MSNImageProcessor()  # the paper's recipe: 224 px target + anchor, 10 x 96 px focal, canvas 256 px
    dataset = RandomImages(args.batch_size * (args.batches + 1), args.image_size)
    print("| where | workers | images/s (12 views each) | views/s |")
    print("|---|---:|---:|---:|")
    for workers in args.workers:
        speed = images_per_second(processor, dataset, args.batch_size, workers)
        print(f"| CPU workers | {workers} | {speed:.1f} | {12 * speed:.0f} |", flush=True)
    if args.device:
        device = torch.device(args.device)
        workers = args.device_workers if args.device_workers is not None else max(args.workers)
        speed = images_per_second(processor, dataset, args.batch_size, workers, device)
        print(f"| {device} (canvas in {workers} workers) | {workers} | {speed:.1f} | {12 * speed:.0f} |")


if __name__ == "__main__":
    main()
