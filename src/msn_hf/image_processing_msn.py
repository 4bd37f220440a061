"""Image processor class for MSN: evaluation preprocessing and the multi-view pretraining views."""

import math
import os
from dataclasses import dataclass, fields

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as tvF
from transformers.image_processing_backends import TorchvisionBackend
from transformers.image_processing_utils import BatchFeature, get_size_dict
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    PILImageResampling,
    SizeDict,
    is_valid_image,
)
from transformers.processing_utils import ImagesKwargs, Unpack

# ITU-R 601-2 luma weights, the ones torchvision's `rgb_to_grayscale` uses.
GRAYSCALE_WEIGHTS = (0.2989, 0.587, 0.114)
# Order of the four colour jitter operations in `ViewParams.jitter_factors` and `ViewParams.jitter_order`.
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)
# torch interpolation modes of the PIL resampling filters the views support.
INTERPOLATION_MODES = {
    PILImageResampling.NEAREST: "nearest",
    PILImageResampling.BILINEAR: "bilinear",
    PILImageResampling.BICUBIC: "bicubic",
}


class MSNImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    num_anchor_views (`int`, *optional*, defaults to `self.num_anchor_views`):
        Random anchor views per image, of size `crop_size`.
    num_focal_views (`int`, *optional*, defaults to `self.num_focal_views`):
        Focal anchor views per image, of size `focal_crop_size`.
    focal_crop_size (`dict[str, int]` or `int`, *optional*, defaults to `self.focal_crop_size`):
        Size `{"height", "width"}` of the focal views.
    anchor_crop_scale (`tuple[float, float]`, *optional*, defaults to `self.anchor_crop_scale`):
        Range of the area fraction of the image covered by the target and anchor crops.
    focal_crop_scale (`tuple[float, float]`, *optional*, defaults to `self.focal_crop_scale`):
        Range of the area fraction of the image covered by the focal crops.
    crop_ratio (`tuple[float, float]`, *optional*, defaults to `self.crop_ratio`):
        Range of the aspect ratio (width / height) of every random crop.
    color_jitter_strength (`float`, *optional*, defaults to `self.color_jitter_strength`):
        Strength `s` of the colour distortion: `ColorJitter(0.8 s, 0.8 s, 0.8 s, 0.2 s)`.
    color_jitter_probability (`float`, *optional*, defaults to `self.color_jitter_probability`):
        Probability that a view is colour jittered.
    grayscale_probability (`float`, *optional*, defaults to `self.grayscale_probability`):
        Probability that a view is turned to grayscale.
    blur_probability (`float`, *optional*, defaults to `self.blur_probability`):
        Probability that a view is blurred.
    blur_sigma (`tuple[float, float]`, *optional*, defaults to `self.blur_sigma`):
        Range of the standard deviation, in output pixels, of the Gaussian blur.
    horizontal_flip_probability (`float`, *optional*, defaults to `self.horizontal_flip_probability`):
        Probability that a view is flipped left-right.
    """

    num_anchor_views: int
    num_focal_views: int
    focal_crop_size: int | list[int] | tuple[int, ...] | dict[str, int]
    anchor_crop_scale: tuple[float | int, float | int] | list[float | int]
    focal_crop_scale: tuple[float | int, float | int] | list[float | int]
    crop_ratio: tuple[float | int, float | int] | list[float | int]
    color_jitter_strength: float | int
    color_jitter_probability: float | int
    grayscale_probability: float | int
    blur_probability: float | int
    blur_sigma: tuple[float | int, float | int] | list[float | int]
    horizontal_flip_probability: float | int


# ---------------------------------------------------------------------------------------------------------------------
# Random view parameters
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class ViewParams:
    """
    The random draws of `N` views, one row per view. Every field is a CPU tensor whose first dimension is `N`.

    Attributes:
        source (`torch.LongTensor` of shape `(N,)`): index of the image each view is cut from.
        boxes (`torch.LongTensor` of shape `(N, 4)`): crop `(top, left, height, width)` in source pixels.
        flip (`torch.BoolTensor` of shape `(N,)`): horizontal flip.
        jitter (`torch.BoolTensor` of shape `(N,)`): whether the colour jitter is applied.
        jitter_factors (`torch.FloatTensor` of shape `(N, 4)`): brightness, contrast, saturation factors and hue
            shift (in turns, `[-0.5, 0.5]`).
        jitter_order (`torch.LongTensor` of shape `(N, 4)`): a permutation of the four jitter operations.
        grayscale (`torch.BoolTensor` of shape `(N,)`): conversion to grayscale.
        blur (`torch.BoolTensor` of shape `(N,)`): Gaussian blur.
        blur_sigma (`torch.FloatTensor` of shape `(N,)`): standard deviation of the blur, in output pixels.
    """

    source: torch.Tensor
    boxes: torch.Tensor
    flip: torch.Tensor
    jitter: torch.Tensor
    jitter_factors: torch.Tensor
    jitter_order: torch.Tensor
    grayscale: torch.Tensor
    blur: torch.Tensor
    blur_sigma: torch.Tensor

    def __len__(self) -> int:
        return self.source.shape[0]

    def select(self, index: torch.Tensor) -> "ViewParams":
        """The parameters of the views `index` (a `LongTensor` of view indices), in that order."""
        return ViewParams(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


def _uniform(shape, low: float, high: float, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(shape, generator=generator, dtype=torch.float64) * (high - low) + low


def sample_resized_crop_boxes(
    image_sizes: torch.Tensor,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None = None,
    num_attempts: int = 10,
) -> torch.Tensor:
    """
    Crop boxes of `torchvision.transforms.RandomResizedCrop`, drawn for many views at once.

    For each view, up to `num_attempts` candidates of area `uniform(scale) * H * W` and aspect ratio
    `exp(uniform(log(ratio)))` are drawn; the first that fits the image is placed uniformly at random. When none fits,
    the largest central crop with an aspect ratio clamped to `ratio` is used, as torchvision does.

    Args:
        image_sizes (`torch.LongTensor` of shape `(N, 2)`): `(height, width)` of each view's source image.
        scale (`tuple[float, float]`): range of the crop area as a fraction of the image area.
        ratio (`tuple[float, float]`): range of the crop aspect ratio (width / height).
        generator (`torch.Generator`, *optional*): source of randomness (torch's global one by default).

    Returns:
        `torch.LongTensor` of shape `(N, 4)`: `(top, left, height, width)` of each crop.
    """
    num_views = image_sizes.shape[0]
    height, width = image_sizes[:, 0:1].double(), image_sizes[:, 1:2].double()
    target_area = height * width * _uniform((num_views, num_attempts), *scale, generator)
    log_ratio = _uniform((num_views, num_attempts), math.log(ratio[0]), math.log(ratio[1]), generator)
    aspect = torch.exp(log_ratio)
    crop_w = torch.round(torch.sqrt(target_area * aspect))
    crop_h = torch.round(torch.sqrt(target_area / aspect))
    fits = (crop_w > 0) & (crop_h > 0) & (crop_w <= width) & (crop_h <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)
    found = fits.any(dim=1)
    crop_h = crop_h.gather(1, first).squeeze(1)
    crop_w = crop_w.gather(1, first).squeeze(1)

    # Fallback of torchvision: a central crop, as large as possible with an aspect ratio inside `ratio`.
    height, width = height.squeeze(1), width.squeeze(1)
    in_ratio = width / height
    fallback_w = torch.where(in_ratio > ratio[1], torch.round(height * ratio[1]), width)
    fallback_h = torch.where(in_ratio < ratio[0], torch.round(width / ratio[0]), height)
    crop_h = torch.where(found, crop_h, fallback_h).clamp(1, None)
    crop_w = torch.where(found, crop_w, fallback_w).clamp(1, None)

    # torchvision draws `randint(0, H - h + 1)`; `floor(u * (H - h + 1))` is the same distribution.
    top = torch.floor(torch.rand(num_views, generator=generator, dtype=torch.float64) * (height - crop_h + 1))
    left = torch.floor(torch.rand(num_views, generator=generator, dtype=torch.float64) * (width - crop_w + 1))
    top = torch.where(found, top, torch.div(height - crop_h, 2, rounding_mode="floor"))
    left = torch.where(found, left, torch.div(width - crop_w, 2, rounding_mode="floor"))
    return torch.stack([top, left, crop_h, crop_w], dim=1).long()


def sample_view_params(
    image_sizes: torch.Tensor,
    source: torch.Tensor,
    crop_scale: tuple[float, float],
    crop_ratio: tuple[float, float],
    horizontal_flip_probability: float,
    color_jitter_strength: float,
    color_jitter_probability: float,
    grayscale_probability: float,
    blur_probability: float,
    blur_sigma: tuple[float, float],
    generator: torch.Generator | None = None,
) -> ViewParams:
    """
    Draw the augmentation of `N` independent views (crop, flip, colour jitter, grayscale, blur).

    Colour jitter factors follow `torchvision.transforms.ColorJitter(0.8 s, 0.8 s, 0.8 s, 0.2 s)`: brightness,
    contrast and saturation uniform in `[max(0, 1 - 0.8 s), 1 + 0.8 s]`, hue uniform in `[-0.2 s, 0.2 s]`, the four
    operations in a uniformly random order.

    Args:
        image_sizes (`torch.LongTensor` of shape `(num_images, 2)`): `(height, width)` of every source image.
        source (`torch.LongTensor` of shape `(N,)`): source image of every view.
        generator (`torch.Generator`, *optional*): source of randomness (torch's global one by default).

    Returns:
        [`ViewParams`] of `N` views.
    """
    num_views = source.shape[0]
    boxes = sample_resized_crop_boxes(image_sizes[source], crop_scale, crop_ratio, generator)
    flip = torch.rand(num_views, generator=generator) < horizontal_flip_probability
    jitter = torch.rand(num_views, generator=generator) < color_jitter_probability
    bcs, hue = 0.8 * color_jitter_strength, 0.2 * color_jitter_strength
    bcs_factors = _uniform((num_views, 3), max(0.0, 1.0 - bcs), 1.0 + bcs, generator)
    hue_factors = _uniform((num_views, 1), -hue, hue, generator)
    jitter_factors = torch.cat([bcs_factors, hue_factors], dim=1).float()
    # argsort of i.i.d. uniforms is a uniformly random permutation, drawn for all views at once.
    jitter_order = torch.rand(num_views, 4, generator=generator).argsort(dim=1)
    grayscale = torch.rand(num_views, generator=generator) < grayscale_probability
    blur = torch.rand(num_views, generator=generator) < blur_probability
    sigma = _uniform(num_views, *blur_sigma, generator).float()
    return ViewParams(source, boxes, flip, jitter, jitter_factors, jitter_order, grayscale, blur, sigma)


# ---------------------------------------------------------------------------------------------------------------------
# Batched view operations on float images in [0, 1]
# ---------------------------------------------------------------------------------------------------------------------


def resized_crops(
    images: list[torch.Tensor],
    params: ViewParams,
    size: tuple[int, int],
    interpolation: str = "bilinear",
) -> torch.Tensor:
    """
    Cut, resize and flip every view: `RandomResizedCrop` + `RandomHorizontalFlip` with drawn parameters.

    Resizing is antialiased (like PIL and torchvision's tensor resize) and runs on `uint8` sources when possible,
    where torch has a vectorised kernel.

    Args:
        images (`list[torch.Tensor]`): source images `(3, H_i, W_i)`, `uint8` or float in `[0, 255]`.
        params ([`ViewParams`]): the `N` views; only `source`, `boxes` and `flip` are used.
        size (`tuple[int, int]`): output `(height, width)`.
        interpolation (`str`): `"bilinear"`, `"bicubic"` or `"nearest"`.

    Returns:
        `torch.FloatTensor` of shape `(N, 3, height, width)` with values in `[0, 1]`.
    """
    device = images[0].device
    views = torch.empty(len(params), 3, *size, dtype=torch.float32, device=device)
    antialias = interpolation != "nearest"
    align_corners = None if interpolation == "nearest" else False
    rows = zip(params.source.tolist(), params.boxes.tolist(), params.flip.tolist())
    for index, (source, (top, left, height, width), flip) in enumerate(rows):
        crop = images[source][None, :, top : top + height, left : left + width]
        crop = F.interpolate(crop, size=size, mode=interpolation, antialias=antialias, align_corners=align_corners)
        if flip:
            crop = crop.flip(-1)
        # Writing the 1/255 scaling straight into the float buffer saves a full pass over the views.
        torch.mul(crop[0], 1.0 / 255.0, out=views[index])
    if interpolation == "bicubic":
        # Bicubic overshoots on float sources; uint8 ones were already saturated by the kernel.
        views.clamp_(0.0, 1.0)
    return views


def _resize_filter(distance: torch.Tensor, interpolation: str) -> torch.Tensor:
    """Filter of torch's antialiased resize: the triangle (bilinear) or Keys' cubic with a = -0.5 (bicubic)."""
    distance = distance.abs()
    if interpolation == "bilinear":
        return (1.0 - distance).clamp_min_(0.0)
    a = -0.5
    near = ((a + 2) * distance - (a + 3)) * distance * distance + 1
    far = ((a * distance - 5 * a) * distance + 8 * a) * distance - 4 * a
    return torch.where(distance < 1, near, torch.where(distance < 2, far, torch.zeros_like(distance)))


def resize_matrices(
    start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int, interpolation: str, device=None
) -> torch.Tensor:
    """
    Matrices `M` `(N, out_size, in_size)` with `M[n] @ line` = the 1-D resize of `line[start[n] : start[n] + length[n]]`
    to `out_size` samples, as `F.interpolate(..., antialias=True)` computes it (`"bilinear"`, `"bicubic"`), or the
    legacy nearest-neighbour index (`"nearest"`). Weights outside the crop are zero.

    The crop bounds and filter centres are computed in float64 on the CPU, the matrices in float32 on `device`.
    """
    start, length = start.double().view(-1, 1), length.double().view(-1, 1)
    positions = torch.arange(in_size, device=device, dtype=torch.float32)
    # Source pixel index relative to the crop, (N, 1, in_size).
    local = positions.view(1, 1, -1) - start.to(device, torch.float32).unsqueeze(-1)
    if interpolation == "nearest":
        # torch's legacy nearest: floor(i * scale) with a float32 scale.
        scale = (length / out_size).float()
        index = torch.floor(torch.arange(out_size, dtype=torch.float32).view(1, -1) * scale)
        index = torch.minimum(index, length.float() - 1).to(device)
        return (local == index.unsqueeze(-1)).float()
    scale = length / out_size
    half_width = 1.0 if interpolation == "bilinear" else 2.0
    support = torch.where(scale >= 1, half_width * scale, torch.full_like(scale, half_width))
    inverse = torch.where(scale >= 1, 1.0 / scale, torch.ones_like(scale))
    center = scale * (torch.arange(out_size, dtype=torch.float64) + 0.5)
    low = torch.trunc(center - support + 0.5).clamp_min(0.0)
    high = torch.minimum(torch.trunc(center + support + 0.5), length)
    as_3d = {"device": device, "dtype": torch.float32}
    center, low, high = (t.to(**as_3d).unsqueeze(-1) for t in (center, low, high))
    weights = _resize_filter((local - center + 0.5) * inverse.to(**as_3d).unsqueeze(-1), interpolation)
    weights = weights * ((local >= low) & (local < high))
    return weights / weights.sum(dim=-1, keepdim=True)


def batched_resized_crops(
    images: torch.Tensor,
    params: ViewParams,
    size: tuple[int, int],
    interpolation: str = "bilinear",
) -> torch.Tensor:
    """
    `resized_crops` for a batch of same-size images on any device, with two batched matrix products instead of one
    resize call per view: each view is `rows @ (image @ columns.T)`, with the antialiased resize weights of its crop
    (and its flip) in `rows` `(height, H)` and `columns` `(width, W)`.

    Every image must have the same number of views, listed image by image (`params.source` is
    `arange(B).repeat_interleave(V)`). The views agree with `resized_crops` up to the rounding of its `uint8` kernel.

    Args:
        images (`torch.Tensor` of shape `(B, 3, H, W)`): `uint8` or float in `[0, 255]`.
        params ([`ViewParams`]): the `N = B * V` views; only `source`, `boxes` and `flip` are used.
        size (`tuple[int, int]`): output `(height, width)`.
        interpolation (`str`): `"bilinear"`, `"bicubic"` or `"nearest"`.

    Returns:
        `torch.FloatTensor` of shape `(N, 3, height, width)` with values in `[0, 1]`, in the order of `params`.
    """
    batch_size, channels, in_height, in_width = images.shape
    num_views = len(params)
    if num_views % batch_size or not torch.equal(
        params.source, torch.arange(batch_size).repeat_interleave(num_views // batch_size)
    ):
        raise ValueError("batched_resized_crops: the views must be listed image by image, as many for every image.")
    views_per_image = num_views // batch_size
    device = images.device
    top, left, height, width = params.boxes.unbind(dim=1)
    rows = resize_matrices(top, height, in_height, size[0], interpolation, device)
    columns = resize_matrices(left, width, in_width, size[1], interpolation, device)
    flip = params.flip.to(device).view(-1, 1, 1)
    columns = torch.where(flip, columns.flip(1), columns)
    pixels = images.to(torch.float32).mul_(1.0 / 255.0) if images.dtype == torch.uint8 else images.float() / 255.0
    # Horizontal pass, then vertical, as torch's uint8 kernel: (B, 3, 1, H, W) @ (B, 1, V, W, w) -> (B, 3, V, H, w).
    columns = columns.view(batch_size, 1, views_per_image, size[1], in_width).transpose(-1, -2)
    partial = torch.matmul(pixels.unsqueeze(2), columns)
    if interpolation == "bicubic":
        # Bicubic overshoots; the uint8 kernel saturates between its two passes.
        partial.clamp_(0.0, 1.0)
    rows = rows.view(batch_size, 1, views_per_image, size[0], in_height)
    views = torch.matmul(rows, partial)  # (B, 3, V, h, w)
    views = views.permute(0, 2, 1, 3, 4).reshape(num_views, channels, *size)
    if interpolation == "bicubic":
        views.clamp_(0.0, 1.0)
    return views


def _per_view(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`(n,)` per-view values as `(n, 1, 1, 1)` on the device and dtype of `like`."""
    return values.to(device=like.device, dtype=like.dtype).view(-1, 1, 1, 1)


def rgb_to_grayscale(views: torch.Tensor) -> torch.Tensor:
    """Luma `(n, 1, H, W)` of RGB views `(n, 3, H, W)`, with torchvision's weights."""
    red, green, blue = views.unbind(dim=1)
    luma = red.mul(GRAYSCALE_WEIGHTS[0]).add_(green, alpha=GRAYSCALE_WEIGHTS[1]).add_(blue, alpha=GRAYSCALE_WEIGHTS[2])
    return luma.unsqueeze(1)


def adjust_brightness_(views: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """In place, per view: `clamp(x * factor, 0, 1)`, as `torchvision.transforms.v2.functional.adjust_brightness`."""
    views.mul_(_per_view(factor, views))
    if bool((factor > 1).any()):  # factors <= 1 cannot leave [0, 1]: skip a pass
        views.clamp_(max=1.0)
    return views


def adjust_contrast_(views: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """In place, per view: blend with the mean of the view's luma, as torchvision's `adjust_contrast`."""
    weights = views.new_tensor(GRAYSCALE_WEIGHTS)
    mean_luma = (views.mean(dim=(2, 3)) @ weights).view(-1, 1, 1, 1)
    factor = _per_view(factor, views)
    views.mul_(factor).add_(mean_luma * (1 - factor))
    if bool((factor > 1).any()):  # a convex blend (factor <= 1) stays in [0, 1]
        views.clamp_(0.0, 1.0)
    return views


def adjust_saturation_(views: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """In place, per view: blend with the view's luma image, as torchvision's `adjust_saturation`."""
    factor = _per_view(factor, views)
    luma = rgb_to_grayscale(views).mul_(1 - factor)
    views.mul_(factor).add_(luma)
    if bool((factor > 1).any()):
        views.clamp_(0.0, 1.0)
    return views


def _circular_distance(x: torch.Tensor) -> torch.Tensor:
    """In place: distance of `x` to the nearest multiple of 6, for `|x| <= 9`, with 4 cheap passes and no branch."""
    # For |x| <= 6, 3 - ||x| - 3| is that distance; for 6 < |x| <= 9 it is minus that distance.
    return x.abs_().sub_(3.0).abs_().neg_().add_(3.0).abs_()


def adjust_hue(views: torch.Tensor, hue_shift: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """
    Rotate the HSV hue of every view by `hue_shift` turns, as torchvision's `adjust_hue`.

    Instead of a round trip through HSV, this uses a closed form: the rotation keeps each pixel's channel max and
    min, and channel `n` of the output is `min + chroma * clamp(d_n - 1, 0, 1)` where `d_n` is the circular distance
    (period 6) between the hue in sixths of a turn and `(3, 5, 1)[n]`. Everything is arithmetic on whole tensors
    (`torch.where` and `torch.remainder` are several times slower than a multiply on CPU).

    Args:
        views (`torch.FloatTensor` of shape `(n, 3, H, W)`): RGB views in `[0, 1]`.
        hue_shift (`torch.FloatTensor` of shape `(n,)`): shift of each view, in `[-0.5, 0.5]`.
        out (`torch.FloatTensor` of shape `(n, 3, H, W)`, *optional*): where to write the result; may be `views`.

    Returns:
        `torch.FloatTensor` of shape `(n, 3, H, W)`.
    """
    red, green, blue = views.unbind(dim=1)
    max_channel, min_channel = views.amax(dim=1), views.amin(dim=1)
    chroma = max_channel - min_channel
    # Which channel is the max, with torchvision's tie-breaking: red wins over green, green over blue.
    red_is_max = max_channel == red
    is_red = red_is_max.to(views.dtype)
    is_green = (max_channel == green).logical_and_(red_is_max.logical_not_()).to(views.dtype)
    is_blue = 1.0 - is_red - is_green
    # Hue in sixths of a turn, in [-1, 5): (g - b) / C, 2 + (b - r) / C or 4 + (r - g) / C.
    hue = (green - blue).mul_(is_red)
    hue.addcmul_((blue - red).add_(chroma, alpha=2.0), is_green)
    hue.addcmul_((red - green).add_(chroma, alpha=4.0), is_blue)
    # Gray pixels (chroma 0) have a numerator of exactly 0: the floor only avoids 0 / 0, any finite hue will do.
    hue.div_(chroma.clamp_min(1e-12))
    # Shifted hue minus 3 lies in [-7, 5); with the channel offsets below, every |x| <= 9.
    hue.add_(_per_view(hue_shift * 6.0 - 3.0, hue).view(-1, 1, 1))
    offsets = torch.tensor([0.0, -2.0, 2.0], device=views.device, dtype=views.dtype).view(1, 3, 1, 1)
    ramp = _circular_distance(hue.unsqueeze(1) + offsets).sub_(1.0).clamp_(0.0, 1.0)
    # All inputs of this last step are temporaries, so it may write into `views` itself.
    return torch.addcmul(min_channel.unsqueeze(1), chroma.unsqueeze(1), ramp, out=out)


def _jitter_code(order: torch.Tensor) -> torch.Tensor:
    """A unique integer in `[0, 256)` for every permutation `(n, 4)` of the four jitter operations."""
    return order[:, 0] * 64 + order[:, 1] * 16 + order[:, 2] * 4 + order[:, 3]


def color_jitter_(views: torch.Tensor, params: ViewParams) -> torch.Tensor:
    """
    In place: `ColorJitter` on the views with `params.jitter`, each with its own factors and operation order.

    Views should be sorted so that views with jitter and the same operation order are contiguous (as `render_views`
    arranges them): each such run is then jittered in place, as a slice, with no gather or scatter.

    Args:
        views (`torch.FloatTensor` of shape `(N, 3, H, W)`): RGB views in `[0, 1]`.
        params ([`ViewParams`]): the `N` views.
    """
    codes = torch.where(params.jitter, _jitter_code(params.jitter_order), -1)
    runs, lengths = torch.unique_consecutive(codes, return_counts=True)
    start = 0
    for code, length in zip(runs.tolist(), lengths.tolist()):
        stop = start + length
        if code >= 0:
            block, factors = views[start:stop], params.jitter_factors[start:stop]
            for operation in params.jitter_order[start].tolist():
                if operation == BRIGHTNESS:
                    adjust_brightness_(block, factors[:, BRIGHTNESS])
                elif operation == CONTRAST:
                    adjust_contrast_(block, factors[:, CONTRAST])
                elif operation == SATURATION:
                    adjust_saturation_(block, factors[:, SATURATION])
                else:
                    adjust_hue(block, factors[:, HUE], out=block)
        start = stop
    return views


def grayscale_(views: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """In place: the views where `mask` `(N,)` is set become their luma, repeated on the 3 channels."""
    index = mask.nonzero().squeeze(1).to(views.device)
    if index.numel():
        luma = rgb_to_grayscale(views.index_select(0, index)).expand(-1, 3, -1, -1)
        views.index_copy_(0, index, luma)
    return views


def gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """
    Normalised 1-D Gaussian kernels of standard deviations `sigma` `(n,)`, each cut at its own `ceil(3 * sigma)`
    (torchvision's `kernel_size = 2 * ceil(3 * sigma) + 1`) and zero-padded to the common width `2 * radius + 1`.
    """
    taps = torch.arange(-radius, radius + 1, dtype=torch.float32)
    sigma = sigma.float().unsqueeze(1)
    kernels = torch.exp(-0.5 * (taps / sigma) ** 2) * (taps.abs() <= torch.ceil(3 * sigma))
    return kernels / kernels.sum(dim=1, keepdim=True)


def gaussian_blur(views: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """
    Separable Gaussian blur of every view with its own `sigma`, as torchvision's `gaussian_blur` with
    `kernel_size = 2 * ceil(3 * sigma) + 1` and reflect padding.

    All views go through one depthwise convolution per axis, with the kernels zero-padded to the widest: zero taps
    leave each view's result as with its own kernel size, and one large call beats several small ones.

    Args:
        views (`torch.FloatTensor` of shape `(n, 3, H, W)`): the views.
        sigma (`torch.FloatTensor` of shape `(n,)`): standard deviation of each view's blur, in pixels.

    Returns:
        `torch.FloatTensor` of shape `(n, 3, H, W)`.
    """
    num_views, channels, height, width = views.shape
    # Reflect padding needs radius < side: the kernels of very small views are cut there (no blur at 1 pixel).
    radius = min(int(math.ceil(3 * float(sigma.max()))), height - 1, width - 1)
    if num_views == 0 or radius <= 0:
        return views.clone()
    kernels = gaussian_kernels(sigma, radius).to(views.device, views.dtype)
    kernels = kernels.repeat_interleave(channels, dim=0)  # one kernel per (view, channel) plane
    planes = num_views * channels
    padded = F.pad(views.reshape(1, planes, height, width), [radius] * 4, mode="reflect")
    blurred = F.conv2d(padded, kernels.view(planes, 1, 1, -1), groups=planes)
    blurred = F.conv2d(blurred, kernels.view(planes, 1, -1, 1), groups=planes)
    return blurred.view(num_views, channels, height, width)


def normalize_(views: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """In place: `(views - mean) / std` per channel, for views `(N, C, H, W)`."""
    # In place on purpose: a fresh tensor of this size costs more in page faults than the arithmetic.
    as_views = {"dtype": views.dtype, "device": views.device}
    views.sub_(torch.tensor(mean, **as_views).view(1, -1, 1, 1))
    return views.div_(torch.tensor(std, **as_views).view(1, -1, 1, 1))


def render_views(
    images: list[torch.Tensor] | torch.Tensor,
    params: ViewParams,
    size: tuple[int, int],
    interpolation: str,
    image_mean: tuple[float, ...] | None,
    image_std: tuple[float, ...] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Produce the views drawn in `params`: crop + resize, flip, colour jitter, grayscale, blur, normalisation.

    Views are rendered in an order where the blurred ones, and those sharing a colour-jitter operation order, are
    contiguous, so every step runs batched on slices, in place. The caller picks views from the result with the
    returned slot index.

    Args:
        images (`list[torch.Tensor]` or `torch.Tensor`): source images `(3, H_i, W_i)`, `uint8` or float in
            `[0, 255]`; a 4-D batch `(B, 3, H, W)` on any device is cropped with `batched_resized_crops` (views listed
            image by image), a list with one resize call per view.
        params ([`ViewParams`]): the `N` views.
        size (`tuple[int, int]`): `(height, width)` of the views.
        interpolation (`str`): resize filter, `"bilinear"`, `"bicubic"` or `"nearest"`.
        image_mean, image_std (`tuple[float, ...]`, *optional*): normalisation; `None` keeps values in `[0, 1]`.

    Returns:
        `(views, slot)`: `views` `torch.FloatTensor` of shape `(N, 3, height, width)` in rendering order, and
        `slot` `torch.LongTensor` of shape `(N,)`, the row of `views` holding view `i` of `params`.
    """
    # Rendering order: unblurred views first, then blurred ones; within each, runs of equal jitter operation order.
    codes = torch.where(params.jitter, _jitter_code(params.jitter_order), -1) + 1000 * params.blur
    rendering_order = codes.argsort(stable=True)
    sorted_params = params.select(rendering_order)
    if isinstance(images, torch.Tensor):
        views = batched_resized_crops(images, params, size, interpolation)
        views = views.index_select(0, rendering_order.to(views.device))
    else:
        views = resized_crops(images, sorted_params, size, interpolation)
    color_jitter_(views, sorted_params)
    grayscale_(views, sorted_params.grayscale)
    first_blurred = len(params) - int(sorted_params.blur.sum())
    if first_blurred < len(params):
        views[first_blurred:] = gaussian_blur(views[first_blurred:], sorted_params.blur_sigma[first_blurred:])
    if image_mean is not None and image_std is not None:
        normalize_(views, image_mean, image_std)
    slot = torch.empty_like(rendering_order)
    slot[rendering_order] = torch.arange(len(rendering_order))
    return views, slot.to(views.device)


# ---------------------------------------------------------------------------------------------------------------------
# Input checking and conversion
# ---------------------------------------------------------------------------------------------------------------------


def _image_item_error(index: int, message: str) -> ValueError:
    return ValueError(f"MSNImageProcessor: image {index}: {message}")


def _open_image(index: int, image):
    """A PIL image from a file path, loaded (so that broken files fail here, naming the image)."""
    if isinstance(image, (str, os.PathLike)):
        try:
            image = PIL.Image.open(image)
        except Exception as error:
            raise _image_item_error(index, f"could not open image file {os.fspath(image)!r} ({error}).") from error
    if isinstance(image, PIL.Image.Image):
        try:
            image.load()
        except Exception as error:  # PIL raises OSError, SyntaxError, ... for broken files
            raise _image_item_error(index, f"could not decode the image ({type(error).__name__}: {error}).") from error
    elif not is_valid_image(image):
        raise _image_item_error(
            index,
            f"expected a PIL.Image.Image, numpy.ndarray, torch.Tensor or file path, got {type(image).__name__}.",
        )
    return image


def _check_array(index: int, array: torch.Tensor, input_data_format) -> torch.Tensor:
    """
    Check the shape and values of an array image and bring it to `uint8` (integers, `[0, 255]`) or `float32`
    (floating point, `[0, 1]`), the two kinds the backend's RGB conversion understands.
    """
    shape = tuple(array.shape)
    if array.ndim not in (2, 3):
        raise _image_item_error(index, f"expected 2 (H, W) or 3 (with channels) dimensions, got shape {shape}.")
    if array.ndim == 3 and input_data_format is None and shape[0] not in (1, 3, 4) and shape[-1] not in (1, 3, 4):
        raise _image_item_error(
            index, f"expected 1 (grayscale), 3 (RGB) or 4 (RGBA) channels on the first or last axis, got shape {shape}."
        )
    if array.numel() == 0:
        raise _image_item_error(index, f"the image is empty (shape {shape}).")
    if array.dtype == torch.uint8:
        return array
    if array.dtype == torch.bool or array.is_complex():
        raise _image_item_error(index, f"unsupported dtype {array.dtype}; expected uint8 or floating point.")
    if array.is_floating_point():
        array = array.float()
        if not bool(torch.isfinite(array).all()):
            raise _image_item_error(index, "the image contains NaN or infinite values.")
        low, high = array.min().item(), array.max().item()
        if low < 0.0 or high > 1.0:
            raise _image_item_error(
                index,
                f"floating-point images must have values in [0, 1], got [{low:.4g}, {high:.4g}] "
                "(pass 0-255 data as uint8).",
            )
        return array
    low, high = array.min().item(), array.max().item()
    if low < 0 or high > 255:
        raise _image_item_error(index, f"integer images must have values in [0, 255], got [{low}, {high}].")
    return array.to(torch.uint8)


# ---------------------------------------------------------------------------------------------------------------------
# The processor
# ---------------------------------------------------------------------------------------------------------------------


class MSNImageProcessor(TorchvisionBackend):
    r"""
    Image processor of [`MSNModel`], on the Transformers torchvision backend.

    Two modes:

    - `processor(images, return_tensors="pt")`: evaluation preprocessing, as in the MSN evaluation protocol: resize the
      shorter side to `size["shortest_edge"]`, centre crop `crop_size`, rescale to `[0, 1]`, ImageNet mean / std.
      Returns `pixel_values` `(batch_size, 3, crop_height, crop_width)`.
    - `processor(images, return_views=True, return_tensors="pt")`: the MSN pretraining views, drawn independently for
      every image: `pixel_values` `(batch_size, 3, crop_height, crop_width)` (target view), `anchor_pixel_values`
      `(batch_size, num_anchor_views, 3, crop_height, crop_width)` and `focal_pixel_values`
      `(batch_size, num_focal_views, 3, focal_height, focal_width)`, ready for `MSNModel(**views)`.

    Every view follows the recipe of the paper: `RandomResizedCrop` (area fraction in `anchor_crop_scale` for the
    target and anchor views, `focal_crop_scale` for the focal views, aspect ratio in `crop_ratio`), horizontal flip,
    `ColorJitter(0.8 s, 0.8 s, 0.8 s, 0.2 s)` with probability `color_jitter_probability` (operations in random order),
    grayscale, Gaussian blur with sigma in `blur_sigma`, then normalisation. Crops are resized with `resample`
    (bilinear by default, as in the authors' code, antialiased when shrinking); the evaluation resize uses the same
    filter. The views are computed batched on tensors: the colour operations match torchvision's to float precision.

    Randomness comes from `seed` or `generator` when given (identical arguments give identical views), otherwise from
    torch's global generator, which DataLoader seeds differently in every worker. The random parameters are always
    drawn on the CPU; `device=...` only moves the rendering: `processor(images, return_views=True, device="cuda")`
    renders on that device, batched (`batched_resized_crops`: crop, resize and flip as two matrix products), with the
    same draws as on the CPU for the same seed, and the same views up to float rounding (the CPU path rounds its
    resized crops to `uint8`). Same-size images (e.g. the `uint8` canvases of `make_canvas`, made in DataLoader
    workers) batch best. Views assume pixels in `[0, 1]`: `do_rescale=False` or another `rescale_factor` is rejected.

    Args:
        size (`dict[str, int]` or `int`, *optional*, defaults to `{"shortest_edge": 256}`):
            Evaluation resize; an int is the shorter side.
        crop_size (`dict[str, int]` or `int`, *optional*, defaults to `{"height": 224, "width": 224}`):
            Evaluation centre crop, and the size of the target and anchor views.
        focal_crop_size (`dict[str, int]` or `int`, *optional*, defaults to `{"height": 96, "width": 96}`):
            Size of the focal views.
        num_anchor_views (`int`, *optional*, defaults to 1):
            Random anchor views per image.
        num_focal_views (`int`, *optional*, defaults to 10):
            Focal anchor views per image.
        anchor_crop_scale (`tuple[float, float]`, *optional*, defaults to `(0.3, 1.0)`):
            Area fraction range of the target and anchor crops.
        focal_crop_scale (`tuple[float, float]`, *optional*, defaults to `(0.05, 0.3)`):
            Area fraction range of the focal crops.
        crop_ratio (`tuple[float, float]`, *optional*, defaults to `(3 / 4, 4 / 3)`):
            Aspect ratio (width / height) range of the random crops.
        color_jitter_strength (`float`, *optional*, defaults to 0.5):
            Strength `s` of the colour jitter, in `[0, 2.5]`.
        color_jitter_probability (`float`, *optional*, defaults to 0.8):
            Probability of the colour jitter.
        grayscale_probability (`float`, *optional*, defaults to 0.2):
            Probability of the grayscale conversion.
        blur_probability (`float`, *optional*, defaults to 0.5):
            Probability of the Gaussian blur.
        blur_sigma (`tuple[float, float]`, *optional*, defaults to `(0.1, 2.0)`):
            Range of the blur's standard deviation, in pixels of the view.
        horizontal_flip_probability (`float`, *optional*, defaults to 0.5):
            Probability of the horizontal flip.
        resample (`PILImageResampling`, *optional*, defaults to `PILImageResampling.BILINEAR`):
            Resize filter: `NEAREST`, `BILINEAR` or `BICUBIC`.
        image_mean, image_std (`list[float]`, *optional*, default to the ImageNet mean and std):
            Normalisation of every output.

    Inputs: a PIL image, numpy array or torch tensor (`(H, W)`, `(H, W, C)` or `(C, H, W)`; channels first when
    ambiguous, as Transformers infers it, unless `input_data_format` says otherwise), file path, a list of those (sizes
    may differ) or a 4-D batch. Grayscale, RGBA and palette images are converted to RGB by the backend's
    `process_image` (transparency composited on white). `uint8` / integer inputs hold `[0, 255]`, floating-point ones
    `[0, 1]`. Invalid inputs raise a `ValueError` naming the offending image's index.

    Example:

    ```python
    >>> from msn_hf import MSNImageProcessor

    >>> processor = MSNImageProcessor(size=32, crop_size=32, focal_crop_size=16)
    >>> views = processor(images, return_views=True, seed=0, return_tensors="pt")
    >>> outputs = model(**views)
    ```"""

    valid_kwargs = MSNImageProcessorKwargs
    model_input_names = ["pixel_values", "anchor_pixel_values", "focal_pixel_values"]

    resample = PILImageResampling.BILINEAR
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    size = {"shortest_edge": 256}
    default_to_square = False
    crop_size = {"height": 224, "width": 224}
    do_resize = True
    do_center_crop = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    num_anchor_views = 1
    num_focal_views = 10
    focal_crop_size = {"height": 96, "width": 96}
    anchor_crop_scale = (0.3, 1.0)
    focal_crop_scale = (0.05, 0.3)
    crop_ratio = (3 / 4, 4 / 3)
    color_jitter_strength = 0.5
    color_jitter_probability = 0.8
    grayscale_probability = 0.2
    blur_probability = 0.5
    blur_sigma = (0.1, 2.0)
    horizontal_flip_probability = 0.5

    def __init__(self, **kwargs: Unpack[MSNImageProcessorKwargs]):
        super().__init__(**kwargs)
        self._check_view_settings(**{name: getattr(self, name) for name in self._valid_kwargs_names})

    def preprocess(
        self,
        images,
        return_views: bool = False,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        **kwargs: Unpack[MSNImageProcessorKwargs],
    ) -> BatchFeature:
        r"""
        Preprocess an image or a batch of images.

        Args:
            images: one image or a list of images (see the class docstring for the accepted types).
            return_views (`bool`, *optional*, defaults to `False`):
                Return the MSN pretraining views instead of the evaluation preprocessing.
            seed (`int`, *optional*):
                Seed of the view randomness; the same seed gives the same views.
            generator (`torch.Generator`, *optional*):
                CPU generator to draw the views from (advanced by the call). Exclusive with `seed`.
            kwargs: any setting of the processor, overriding it for this call; `return_tensors="pt"` stacks the
                outputs into tensors, otherwise they are lists of per-image tensors.

        Returns:
            [`BatchFeature`] with `pixel_values` and, with `return_views=True`, `anchor_pixel_values` and
            `focal_pixel_values` (a key is left out when its number of views is 0).
        """
        if not isinstance(return_views, bool):
            raise ValueError(f"MSNImageProcessor: `return_views` must be a bool, got {return_views!r}.")
        if seed is not None and generator is not None:
            raise ValueError("MSNImageProcessor: pass either `seed` or `generator`, not both.")
        if seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
                raise ValueError(f"MSNImageProcessor: `seed` must be an int, got {seed!r}.")
            generator = torch.Generator().manual_seed(int(seed))
        elif generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(
                f"MSNImageProcessor: `generator` must be a torch.Generator, got {type(generator).__name__}."
            )
        elif generator is not None and generator.device.type != "cpu":
            raise ValueError(f"MSNImageProcessor: `generator` must be a CPU generator, got one on {generator.device}.")
        return super().preprocess(
            images, image_like_kwargs={"return_views": return_views, "generator": generator}, **kwargs
        )

    def _standardize_kwargs(
        self,
        focal_crop_size=None,
        anchor_crop_scale=None,
        focal_crop_scale=None,
        crop_ratio=None,
        blur_sigma=None,
        **kwargs,
    ) -> dict:
        kwargs = super()._standardize_kwargs(**kwargs)
        if focal_crop_size is not None and not isinstance(focal_crop_size, SizeDict):
            focal_crop_size = SizeDict(**get_size_dict(focal_crop_size, param_name="focal_crop_size"))
        kwargs["focal_crop_size"] = focal_crop_size
        # Ranges are tuples inside, lists in JSON: normalise so a loaded processor equals the saved one.
        for name, value in (
            ("anchor_crop_scale", anchor_crop_scale),
            ("focal_crop_scale", focal_crop_scale),
            ("crop_ratio", crop_ratio),
            ("blur_sigma", blur_sigma),
        ):
            if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
                value = tuple(float(v) for v in value)
            kwargs[name] = value
        return kwargs

    def _validate_preprocess_kwargs(self, **kwargs):
        super()._validate_preprocess_kwargs(**kwargs)
        self._check_view_settings(**kwargs)

    @staticmethod
    def _check_view_settings(**settings) -> None:
        """Raise a `ValueError` naming the first invalid view setting."""

        def fail(name, expected):
            raise ValueError(f"MSNImageProcessor: `{name}` must be {expected}, got {settings.get(name)!r}.")

        def is_number(value):
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        for name in ("num_anchor_views", "num_focal_views"):
            value = settings.get(name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                fail(name, "a non-negative integer")
        for name in ("crop_size", "focal_crop_size"):
            value = settings.get(name)
            if (
                not isinstance(value, SizeDict)
                or not (value.height and value.width)
                or min(value.height, value.width) < 1
            ):
                fail(name, 'a positive int or a {"height": int, "width": int} dict')
        for name in (
            "color_jitter_probability",
            "grayscale_probability",
            "blur_probability",
            "horizontal_flip_probability",
        ):
            if not is_number(settings.get(name)) or not 0 <= settings[name] <= 1:
                fail(name, "a probability in [0, 1]")
        strength = settings.get("color_jitter_strength")
        if not is_number(strength) or not 0 <= strength <= 2.5:
            fail("color_jitter_strength", "a number in [0, 2.5] (the hue shift 0.2 s must not exceed 0.5)")
        for name, upper in (
            ("anchor_crop_scale", 1.0),
            ("focal_crop_scale", 1.0),
            ("crop_ratio", None),
            ("blur_sigma", None),
        ):
            value = settings.get(name)
            if not (isinstance(value, tuple) and len(value) == 2 and all(is_number(v) for v in value)):
                fail(name, "a pair of numbers (low, high)")
            if not 0 < value[0] <= value[1] or (upper is not None and value[1] > upper):
                fail(name, f"a range with 0 < low <= high{f' <= {upper}' if upper else ''}")
        if settings.get("resample") not in INTERPOLATION_MODES:
            fail("resample", "PILImageResampling.NEAREST, BILINEAR or BICUBIC")

    def _prepare_image_like_inputs(self, images, *args, input_data_format=None, device=None, **kwargs) -> list:
        """
        Check every input and convert it to RGB `(3, H, W)` with the backend's `process_image` (transparency
        composited on white): `uint8` for integer inputs, float32 in `[0, 255]` for floating-point ones.
        """
        if isinstance(images, (list, tuple)) or (isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4):
            images = list(images)
        else:
            images = [images]
        if not images:
            raise ValueError("MSNImageProcessor: expected at least one image, got none.")
        prepared = []
        for index, image in enumerate(images):
            image = _open_image(index, image)
            if isinstance(image, np.ndarray):
                if not (np.issubdtype(image.dtype, np.number) or image.dtype == bool):
                    raise _image_item_error(index, f"unsupported numpy dtype {image.dtype}.")
                image = torch.from_numpy(np.array(image, copy=True))
            if isinstance(image, torch.Tensor):
                image = _check_array(index, image.detach(), input_data_format)
            image = self.process_image(image, do_convert_rgb=True, input_data_format=input_data_format)
            if image.shape[0] != 3:
                raise _image_item_error(index, f"expected 1, 3 or 4 channels, got {image.shape[0]}.")
            if image.is_floating_point():
                image = image * 255.0  # one pixel scale for both kinds: `rescale_factor` applies to both
            elif image.device.type == "cpu":
                # Channels-last memory: torch's antialiased uint8 resize is fastest on it.
                image = image.permute(1, 2, 0).contiguous().permute(2, 0, 1)
            prepared.append(image if device is None else image.to(device))
        return prepared

    def make_canvas(
        self, images, size: dict | int | None = None, resample=None, input_data_format=None
    ) -> torch.Tensor:
        """
        Decode images and bring them to one fixed `uint8` canvas, so that their views can be drawn later, batched, on
        an accelerator (`processor(canvas, return_views=True, device=...)`), e.g. with DataLoader workers that only
        decode.

        The canvas of an image: its shorter side resized to `S = size["shortest_edge"]` (antialiased, `resample`),
        then its longer side centre-cropped to `S`, so every canvas is `S x S`. The views are then cut from this
        central square at this resolution rather than from the whole original image: for square images at least
        `S` pixels wide the two are the same recipe; for others the crop scales are relative to the square.

        Args:
            images: one image or a list of images (see the class docstring for the accepted types).
            size (`dict[str, int]` or `int`, *optional*, defaults to `self.size`): `{"shortest_edge": S}` or `S`.
            resample (`PILImageResampling`, *optional*, defaults to `self.resample`): the resize filter.

        Returns:
            `torch.ByteTensor` of shape `(batch_size, 3, S, S)`.
        """
        size = self.size if size is None else size
        side = size if isinstance(size, int) else dict(size).get("shortest_edge")
        if isinstance(side, bool) or not isinstance(side, int) or side < 1:
            raise ValueError(
                f"MSNImageProcessor.make_canvas: `size` must be an int or {{'shortest_edge': int}}, got {size!r}."
            )
        resample = self.resample if resample is None else resample
        if resample not in INTERPOLATION_MODES:
            raise ValueError(
                f"MSNImageProcessor.make_canvas: `resample` must be NEAREST, BILINEAR or BICUBIC, got {resample!r}."
            )
        canvases = []
        for image in self._prepare_image_like_inputs(images, input_data_format=input_data_format):
            if image.is_floating_point():
                image = image.round().to(torch.uint8)
            image = self.resize(image, SizeDict(shortest_edge=side), resample=resample)
            canvases.append(tvF.center_crop(image, [side, side]))
        return torch.stack(canvases)

    def center_crop(self, image: torch.Tensor, size: SizeDict, **kwargs) -> torch.Tensor:
        """Centre crop (zero padding when too small) with torchvision's rounded offset, as the MSN evaluation does."""
        if size.height is None or size.width is None:
            raise ValueError(f"MSNImageProcessor: the crop size must have 'height' and 'width', got {dict(size)}.")
        return tvF.center_crop(image, [size.height, size.width])

    def _preprocess(self, images: list[torch.Tensor], return_views: bool = False, **kwargs) -> BatchFeature:
        if return_views:
            return self._preprocess_views(images, **kwargs)
        return self._preprocess_eval(images, **kwargs)

    def _preprocess_eval(
        self, images: list[torch.Tensor], return_tensors=None, do_rescale=True, **kwargs
    ) -> BatchFeature:
        """Resize, centre crop, normalise with the backend; `uint8` and float images go through separate batches."""
        kwargs.pop("generator", None)
        pixel_values = [None] * len(images)
        for is_float in (False, True):
            indices = [i for i, image in enumerate(images) if image.is_floating_point() == is_float]
            if indices:
                # Float inputs were scaled to [0, 255] on conversion, so both kinds share `rescale_factor`.
                batch = super()._preprocess(
                    [images[i] for i in indices], do_rescale=do_rescale, return_tensors=None, **kwargs
                )
                for i, values in zip(indices, batch["pixel_values"]):
                    pixel_values[i] = values
        return BatchFeature(data={"pixel_values": pixel_values}, tensor_type=return_tensors)

    def _preprocess_views(
        self,
        images: list[torch.Tensor],
        do_rescale: bool,
        rescale_factor: float,
        crop_size: SizeDict,
        focal_crop_size: SizeDict,
        num_anchor_views: int,
        num_focal_views: int,
        anchor_crop_scale: tuple[float, float],
        focal_crop_scale: tuple[float, float],
        crop_ratio: tuple[float, float],
        color_jitter_strength: float,
        color_jitter_probability: float,
        grayscale_probability: float,
        blur_probability: float,
        blur_sigma: tuple[float, float],
        horizontal_flip_probability: float,
        resample,
        do_normalize: bool,
        image_mean,
        image_std,
        generator: torch.Generator | None = None,
        device=None,
        return_tensors=None,
        **kwargs,
    ) -> BatchFeature:
        """The target, anchor and focal views of every image (see the class docstring for the recipe)."""
        if not do_rescale or not math.isclose(rescale_factor, 1 / 255, rel_tol=1e-6):
            # The colour operations work on [0, 1] pixels; another scale would change what they compute.
            raise ValueError(
                "MSNImageProcessor: views need `do_rescale=True` and `rescale_factor=1/255` (pixels in [0, 1]), got "
                f"do_rescale={do_rescale!r}, rescale_factor={rescale_factor!r}."
            )
        batch_size = len(images)
        image_sizes = torch.tensor([tuple(image.shape[-2:]) for image in images])
        if device is not None:
            # Device rendering: one batch, same-size images as they are, others zero-padded (no crop reaches the
            # padding).
            height, width = image_sizes.amax(dim=0).tolist()
            if bool((image_sizes == image_sizes[0]).all()):
                images = torch.stack(images)
            else:
                batch = images[0].new_zeros(batch_size, 3, height, width)
                for target, image in zip(batch, images):
                    target[:, : image.shape[-2], : image.shape[-1]] = image
                images = batch
        interpolation = INTERPOLATION_MODES[PILImageResampling(resample)]
        recipe = dict(
            crop_ratio=crop_ratio,
            horizontal_flip_probability=horizontal_flip_probability,
            color_jitter_strength=color_jitter_strength,
            color_jitter_probability=color_jitter_probability,
            grayscale_probability=grayscale_probability,
            blur_probability=blur_probability,
            blur_sigma=blur_sigma,
            generator=generator,
        )
        normalization = (image_mean, image_std) if do_normalize else (None, None)
        data = {}
        groups = (
            # (views per image, output keys with the number of views each takes, crop scale, size)
            (
                1 + num_anchor_views,
                (("pixel_values", None), ("anchor_pixel_values", num_anchor_views)),
                anchor_crop_scale,
                crop_size,
            ),
            (num_focal_views, (("focal_pixel_values", num_focal_views),), focal_crop_scale, focal_crop_size),
        )
        for views_per_image, keys, scale, size in groups:
            if views_per_image == 0:
                continue
            source = torch.arange(batch_size).repeat_interleave(views_per_image)
            params = sample_view_params(image_sizes, source, crop_scale=scale, **recipe)
            views, slot = render_views(images, params, (size.height, size.width), interpolation, *normalization)
            slot = slot.view(batch_size, views_per_image)
            first = 0
            for key, count in keys:
                if count == 0:
                    continue
                # One gather per output key puts every image's views together and makes the tensor contiguous.
                rows = slot[:, first : first + (count or 1)]
                picked = views.index_select(0, rows.reshape(-1))
                data[key] = picked.view(batch_size, *(() if count is None else (count,)), *views.shape[1:])
                first += count or 1
        if return_tensors is None:
            data = {key: list(value.unbind(0)) for key, value in data.items()}
        return BatchFeature(data=data, tensor_type=return_tensors)


__all__ = ["MSNImageProcessor"]
