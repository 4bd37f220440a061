"""Image processor class for MSN: evaluation preprocessing and the multi-view pretraining views."""

import math
import os

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from torchvision.transforms.v2 import functional as tvF
from transformers.image_processing_backends import TorchvisionBackend
from transformers.image_processing_utils import BatchFeature, get_size_dict
from transformers.image_transforms import convert_to_rgb
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    PILImageResampling,
    SizeDict,
    is_valid_image,
)
from transformers.processing_utils import ImagesKwargs, Unpack

from .views_msn import INTERPOLATION_MODES, render_views, sample_view_params


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
# Input checking and conversion
# ---------------------------------------------------------------------------------------------------------------------


# The largest value of PIL's 16-bit integer modes ("I;16", "I;16B", "I;16L", "I;16N"): 65535 / 257 = 255 exactly.
UINT16_MAX = 65535
EXIF_ORIENTATION = 0x0112


def to_8_bit(image: PIL.Image.Image) -> PIL.Image.Image:
    """
    A grey mode "L" image of a 16-bit ("I;16", "I;16B", ...), 32-bit integer ("I") or float ("F") image, its values
    scaled to [0, 255] rather than clipped as PIL's conversions do (a 16-bit ramp comes out 99.6 % white, a [0, 1]
    float one black); "LA" when the image names a transparent grey level. Other images are returned as they are.

    - 16-bit: by the range of the type, 65535 -> 255 (microscopy, medical and astronomy PNG / TIFF files).
    - "I": as 8-bit data when every value is in [0, 255], else by the 16-bit range when every value is in
      [0, 65535], else by the image's own min..max.
    - "F": x 255 when every value is in [0, 1], else by the image's own min..max (non-finite values clipped to it).

    Why these scales for "I", which has no bit depth of its own: it holds 8-bit data (`datasets` stores numpy's
    default int64 pixels so, and an integer array in [0, 255] is read as 8-bit by the processor) or 16-bit data
    widened to 32 bits (`convert("I")`, older Pillow versions opening 16-bit PNGs, many TIFF writers), which the
    int32 range would turn black and which should decode as the same file saved as "I;16" does. A 16-bit image
    whose every value is under 256 is black at its own scale and is read as 8-bit. Values no bit depth explains
    (negative, or above 65535) have no scale but their own, hence the image's range, as for floats outside [0, 1];
    a constant such image is black.
    """
    if not image.mode.startswith("I") and image.mode != "F":
        return image
    pixels = np.asarray(image, dtype=np.float64)
    finite = pixels[np.isfinite(pixels)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    clipped = np.clip(np.nan_to_num(pixels, nan=low), low, high)
    if image.mode.startswith("I;16") or (image.mode == "I" and low >= 0 and 255 < high <= UINT16_MAX):
        low, high = 0.0, float(UINT16_MAX)
    elif image.mode == "I" and low >= 0 and high <= 255:
        low, high = 0.0, 255.0
    elif image.mode == "F" and low >= 0 and high <= 1:
        low, high = 0.0, 1.0
    scaled = (clipped - low) * (255 / (high - low)) if high > low else np.zeros_like(clipped)
    grey = PIL.Image.fromarray(np.rint(scaled).astype(np.uint8))
    transparent = image.info.get("transparency")
    if not isinstance(transparent, (int, float)):
        return grey
    # The transparent level is a value of the source's scale, which 8 bits may share with visible levels.
    alpha = PIL.Image.fromarray(np.where(pixels == transparent, 0, 255).astype(np.uint8))
    return PIL.Image.merge("LA", (grey, alpha))


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """
    An upright RGB image of a PIL image of any mode: turned as its EXIF orientation says (as `datasets` and
    `transformers.image_utils.load_image` do), 16/32-bit and float images scaled to 8 bits (see [`to_8_bit`]),
    transparency (an alpha band, or the transparent colour of a palette, grey or RGB image) composited on white,
    palettes and other colour spaces converted.
    """
    if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
        image = PIL.ImageOps.exif_transpose(image)
    if image.mode == "RGB" and "transparency" in image.info:
        image = image.convert("RGBA")  # `convert_to_rgb` returns an RGB image as it is, its transparent colour too
    if image.mode == "RGB":
        return image
    return PIL.Image.fromarray(convert_to_rgb(to_8_bit(image), return_numpy=True))


def _image_item_error(index: int, message: str) -> ValueError:
    return ValueError(f"MSNImageProcessor: image {index}: {message}")


def _open_image(index: int, image):
    """An RGB PIL image (see [`to_rgb`]) from a PIL image or a file path, decoded here so that broken files fail
    naming the image; arrays are returned as they are."""
    if isinstance(image, (str, os.PathLike)):
        try:
            image = PIL.Image.open(image)
        except Exception as error:
            raise _image_item_error(index, f"could not open image file {os.fspath(image)!r} ({error}).") from error
    if isinstance(image, PIL.Image.Image):
        try:
            image = to_rgb(image)
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
    Check the shape and values of an array image and bring it to `uint8` (integers, `[0, 255]`; `uint16` scaled by
    its range) or `float32` (floating point, `[0, 1]`), the two kinds the backend's RGB conversion understands.
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
    if array.dtype == torch.uint16:  # 16-bit data (`np.asarray` of a 16-bit file): the type's range, as `to_8_bit`
        return torch.round(array.double() / (UINT16_MAX / 255)).to(torch.uint8)
    if not array.is_floating_point() and not array.is_signed():
        array = array.long()  # torch has no min / max for uint32 and uint64
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


__all__ = ["MSNImageProcessor", "to_8_bit", "to_rgb"]
