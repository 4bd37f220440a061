"""
The MSN pretraining views as batched tensor operations: random view parameters (resized-crop boxes, flips, colour
jitter, grayscale, blur), crops and resizes (per image, or batched as two matrix products on any device), the colour
operations of torchvision's `ColorJitter`, Gaussian blur and normalisation, and `render_views`, which applies them.
`MSNImageProcessor` draws its views with these.
"""

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from transformers.image_utils import (
    PILImageResampling,
)

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
    # Read where the factors were drawn (the CPU), before they move: reading them on the views' device would wait
    # for it. A convex blend (factor <= 1) stays in [0, 1].
    needs_clamp = bool((factor > 1).any())
    weights = views.new_tensor(GRAYSCALE_WEIGHTS)
    mean_luma = (views.mean(dim=(2, 3)) @ weights).view(-1, 1, 1, 1)
    factor = _per_view(factor, views)
    views.mul_(factor).add_(mean_luma * (1 - factor))
    if needs_clamp:
        views.clamp_(0.0, 1.0)
    return views


def adjust_saturation_(views: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """In place, per view: blend with the view's luma image, as torchvision's `adjust_saturation`."""
    needs_clamp = bool((factor > 1).any())  # on the factors' own device, as in `adjust_contrast_`
    factor = _per_view(factor, views)
    luma = rgb_to_grayscale(views).mul_(1 - factor)
    views.mul_(factor).add_(luma)
    if needs_clamp:
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
