"""
Throughput of the MSN pretraining views: `MSNImageProcessor` against a plain per-image PIL + torchvision pipeline.

Both produce the full recipe of MSN_REFERENCE.md for every image (1 target + 1 anchor view of 224 px, 10 focal views of
96 px; crop, flip, colour jitter, grayscale, blur, normalisation) from the same 256x256 RGB PIL images, on one thread,
in alternating rounds so that load from other processes hits both alike. The figure is images per second per core.

    python benchmarks/processor_throughput.py [--batch-size 32] [--rounds 5]
"""

import argparse
import platform
import statistics
import time

import numpy as np
import torch
from PIL import Image, ImageFilter
from torchvision import transforms

from msn_hf import MSNImageProcessor

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class PILGaussianBlur:
    """Gaussian blur of the authors' code: PIL's filter with a radius uniform in `sigma`, applied with `p`."""

    def __init__(self, p: float = 0.5, sigma: tuple[float, float] = (0.1, 2.0)):
        self.p, self.sigma = p, sigma

    def __call__(self, image: Image.Image) -> Image.Image:
        if torch.rand(()).item() >= self.p:
            return image
        radius = self.sigma[0] + torch.rand(()).item() * (self.sigma[1] - self.sigma[0])
        return image.filter(ImageFilter.GaussianBlur(radius=radius))


def view_transform(size: int, scale: tuple[float, float], strength: float = 0.5) -> transforms.Compose:
    """One MSN view, per image, with PIL and torchvision.transforms (as in the original data pipeline)."""
    jitter = transforms.ColorJitter(0.8 * strength, 0.8 * strength, 0.8 * strength, 0.2 * strength)
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(size, scale=scale, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.RandomHorizontalFlip(0.5),
            transforms.RandomApply([jitter], p=0.8),
            transforms.RandomGrayscale(0.2),
            PILGaussianBlur(0.5, (0.1, 2.0)),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def make_plain_pipeline(num_anchor_views: int = 1, num_focal_views: int = 10):
    large, focal = view_transform(224, (0.3, 1.0)), view_transform(96, (0.05, 0.3))

    def run(images: list[Image.Image]) -> dict[str, torch.Tensor]:
        target, anchors, focals = [], [], []
        for image in images:
            target.append(large(image))
            anchors.append(torch.stack([large(image) for _ in range(num_anchor_views)]))
            focals.append(torch.stack([focal(image) for _ in range(num_focal_views)]))
        return {
            "pixel_values": torch.stack(target),
            "anchor_pixel_values": torch.stack(anchors),
            "focal_pixel_values": torch.stack(focals),
        }

    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32, help="images per call")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per pipeline (after one warm-up)")
    parser.add_argument("--image-size", type=int, default=256)
    args = parser.parse_args()

    torch.set_num_threads(1)  # per-core figures
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    # Smooth random images (upsampled noise), so blur and jitter work on image-like content.
    images = [
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).resize(
            (args.image_size, args.image_size), Image.BICUBIC
        )
        for _ in range(args.batch_size)
    ]
    processor = MSNImageProcessor()
    plain = make_plain_pipeline()
    pipelines = {
        "plain PIL + torchvision.transforms, per image": plain,
        "MSNImageProcessor(return_views=True), batched": lambda batch: processor(
            batch, return_views=True, return_tensors="pt"
        ),
    }
    reference = None
    for run in pipelines.values():  # warm-up, and both must produce the same layout
        shapes = {key: tuple(value.shape) for key, value in run(images).items()}
        assert reference is None or shapes == reference, (shapes, reference)
        reference = shapes

    timings = {name: [] for name in pipelines}
    for _ in range(args.rounds):
        for name, run in pipelines.items():
            start = time.perf_counter()
            run(images)
            timings[name].append(time.perf_counter() - start)

    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread")
    print(f"batch of {args.batch_size} {args.image_size}x{args.image_size} RGB PIL images; output shapes {reference}")
    rates = {}
    for name, seconds in timings.items():
        rates[name] = args.batch_size / statistics.median(seconds)
        spread = [args.batch_size / s for s in seconds]
        print(
            f"{name}: {rates[name]:.1f} images/s per core (median of {args.rounds}; "
            f"min {min(spread):.1f}, max {max(spread):.1f})"
        )
    plain_rate, ours_rate = rates.values()
    print(f"ratio MSNImageProcessor / plain: {ours_rate / plain_rate:.2f}x")


if __name__ == "__main__":
    main()
