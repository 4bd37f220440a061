"""Tests of MSNImageProcessor: evaluation preprocessing, the pretraining views, inputs, errors and serialisation."""

import io
import json
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms.v2 import functional as tvF

from conftest import tiny_config
from msn_hf import MSNImageProcessor, MSNModel, views_msn
from msn_hf import image_processing_msn as ipm

TINY = dict(size={"shortest_edge": 32}, crop_size=32, focal_crop_size=16)
# Only the crop (and flip): lets the tests read crop geometry out of the views.
NO_COLOUR = dict(color_jitter_probability=0.0, grayscale_probability=0.0, blur_probability=0.0, do_normalize=False)


def random_image(height, width, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)


def ramp_image(size=64):
    """Float RGB image whose red channel is the pixel-centre x coordinate / size and green the y one."""
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    image = np.zeros((size, size, 3), dtype=np.float32)
    image[..., 0] = coords[None, :]
    image[..., 1] = coords[:, None]
    return image


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation mode
# ---------------------------------------------------------------------------------------------------------------------


def test_eval_matches_resize_center_crop_protocol():
    processor = MSNImageProcessor(size={"shortest_edge": 40}, crop_size=32)
    images = [random_image(60, 50, seed=1), random_image(45, 80, seed=2)]
    pixel_values = processor(images, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (2, 3, 32, 32) and pixel_values.dtype == torch.float32
    reference = transforms.Compose(
        [
            transforms.Resize(40),
            transforms.CenterCrop(32),
            transforms.ToTensor(),
            transforms.Normalize(ipm.IMAGENET_DEFAULT_MEAN, ipm.IMAGENET_DEFAULT_STD),
        ]
    )
    expected = torch.stack([reference(image) for image in images])
    # Torch's and PIL's antialiased resizes differ by rounding only.
    assert (pixel_values - expected).abs().mean() < 0.01
    assert (pixel_values - expected).abs().max() < 0.1


def test_eval_is_deterministic_and_lists_without_return_tensors():
    processor = MSNImageProcessor(**TINY)
    images = [random_image(40, 36), random_image(20, 24, seed=3)]
    first = processor(images, return_tensors="pt")["pixel_values"]
    assert torch.equal(first, processor(images, return_tensors="pt")["pixel_values"])
    as_list = processor(images)["pixel_values"]
    assert isinstance(as_list, list) and len(as_list) == 2
    assert torch.equal(torch.stack(as_list), first)


# ---------------------------------------------------------------------------------------------------------------------
# Views: shapes, model compatibility, determinism
# ---------------------------------------------------------------------------------------------------------------------


def test_views_shapes_and_dtypes_default_recipe():
    processor = MSNImageProcessor()
    views = processor([random_image(64, 80)], return_views=True, seed=0, return_tensors="pt")
    assert views["pixel_values"].shape == (1, 3, 224, 224)
    assert views["anchor_pixel_values"].shape == (1, 1, 3, 224, 224)
    assert views["focal_pixel_values"].shape == (1, 10, 3, 96, 96)
    for value in views.values():
        assert value.dtype == torch.float32 and value.is_contiguous() and torch.isfinite(value).all()


def test_views_shapes_custom_counts_and_lists():
    processor = MSNImageProcessor(**TINY, num_anchor_views=2, num_focal_views=3)
    images = [random_image(40, 30), random_image(8, 8, seed=1), random_image(50, 70, seed=2)]
    views = processor(images, return_views=True, return_tensors="pt")
    assert views["pixel_values"].shape == (3, 3, 32, 32)
    assert views["anchor_pixel_values"].shape == (3, 2, 3, 32, 32)
    assert views["focal_pixel_values"].shape == (3, 3, 3, 16, 16)
    no_focal = processor(images, return_views=True, num_focal_views=0, return_tensors="pt")
    assert "focal_pixel_values" not in no_focal and no_focal["anchor_pixel_values"].shape == (3, 2, 3, 32, 32)
    as_lists = processor(images, return_views=True)
    assert len(as_lists["focal_pixel_values"]) == 3 and as_lists["focal_pixel_values"][0].shape == (3, 3, 16, 16)


def test_views_feed_msn_model():
    processor = MSNImageProcessor(**TINY, num_focal_views=2)
    views = processor([random_image(40, 40, seed=i) for i in range(4)], return_views=True, return_tensors="pt")
    output = MSNModel(tiny_config())(**views)
    assert output.loss is not None and torch.isfinite(output.loss)
    assert output.anchor_probs.shape[0] == 4 * (1 + 2)


def test_views_seed_and_generator_are_reproducible():
    processor = MSNImageProcessor(**TINY, num_focal_views=2)
    images = [random_image(40, 40), random_image(30, 50, seed=1)]
    a = processor(images, return_views=True, seed=7, return_tensors="pt")
    b = processor(images, return_views=True, seed=7, return_tensors="pt")
    c = processor(images, return_views=True, generator=torch.Generator().manual_seed(7), return_tensors="pt")
    for key in a:
        assert torch.equal(a[key], b[key]) and torch.equal(a[key], c[key])
    assert not torch.equal(
        a["pixel_values"], processor(images, return_views=True, seed=8, return_tensors="pt")["pixel_values"]
    )
    # Without a seed, draws come from torch's global generator: they differ call to call, and follow manual_seed.
    first = processor(images, return_views=True, return_tensors="pt")["pixel_values"]
    assert not torch.equal(first, processor(images, return_views=True, return_tensors="pt")["pixel_values"])
    torch.manual_seed(3)
    d = processor(images, return_views=True, return_tensors="pt")["pixel_values"]
    torch.manual_seed(3)
    assert torch.equal(d, processor(images, return_views=True, return_tensors="pt")["pixel_values"])
    # A generator is advanced by the call.
    generator = torch.Generator().manual_seed(0)
    e = processor(images, return_views=True, generator=generator, return_tensors="pt")["pixel_values"]
    assert not torch.equal(
        e, processor(images, return_views=True, generator=generator, return_tensors="pt")["pixel_values"]
    )


def test_views_are_independent_across_images_and_views():
    processor = MSNImageProcessor(**TINY, num_focal_views=2)
    image = random_image(48, 48)
    views = processor([image, image], return_views=True, seed=0, return_tensors="pt")
    assert not torch.equal(views["pixel_values"][0], views["pixel_values"][1])
    assert not torch.equal(views["pixel_values"][0], views["anchor_pixel_values"][0, 0])
    assert not torch.equal(views["focal_pixel_values"][0, 0], views["focal_pixel_values"][0, 1])


# ---------------------------------------------------------------------------------------------------------------------
# Views: the recipe, operation by operation and in distribution
# ---------------------------------------------------------------------------------------------------------------------


def test_colour_operations_match_torchvision():
    torch.manual_seed(0)
    views = torch.rand(5, 3, 12, 10)
    views[0] = views[0, :1]  # gray pixels: hue undefined
    views[1, :, :4] = 1.0  # saturated pixels: clamps matter
    factors = torch.tensor([0.6, 0.95, 1.0, 1.25, 1.4])
    shifts = torch.tensor([-0.1, -0.02, 0.0, 0.07, 0.5])
    cases = [
        (views_msn.adjust_brightness_, tvF.adjust_brightness, factors),
        (views_msn.adjust_contrast_, tvF.adjust_contrast, factors),
        (views_msn.adjust_saturation_, tvF.adjust_saturation, factors),
        (views_msn.adjust_hue, tvF.adjust_hue, shifts),
    ]
    for ours, theirs, values in cases:
        expected = torch.stack([theirs(views[i], values[i].item()) for i in range(5)])
        torch.testing.assert_close(ours(views.clone(), values), expected, atol=1e-5, rtol=0)
    gray = views_msn.grayscale_(views.clone(), torch.tensor([True, False, True, False, False]))
    torch.testing.assert_close(gray[2], tvF.rgb_to_grayscale(views[2], num_output_channels=3))
    assert torch.equal(gray[1], views[1])


def test_blur_and_crops_match_torchvision():
    torch.manual_seed(0)
    views = torch.rand(4, 3, 16, 14)
    sigma = torch.tensor([0.1, 0.7, 1.3, 2.0])
    expected = torch.stack(
        [tvF.gaussian_blur(views[i], [2 * int(np.ceil(3 * s)) + 1] * 2, [s] * 2) for i, s in enumerate(sigma.tolist())]
    )
    torch.testing.assert_close(views_msn.gaussian_blur(views, sigma), expected, atol=1e-5, rtol=0)

    image = torch.from_numpy(np.array(random_image(30, 40))).permute(2, 0, 1)
    params = views_msn.sample_view_params(
        torch.tensor([[30, 40]]),
        torch.zeros(6, dtype=torch.long),
        (0.1, 1.0),
        (0.75, 4 / 3),
        0.5,
        0.0,
        0.0,
        0.0,
        0.0,
        (0.1, 2.0),
        torch.Generator().manual_seed(0),
    )
    crops = views_msn.resized_crops([image], params, (16, 16), "bilinear")
    for crop, (top, left, height, width), flip in zip(crops, params.boxes.tolist(), params.flip.tolist()):
        expected = tvF.resized_crop(image, top, left, height, width, [16, 16], antialias=True)
        expected = (tvF.horizontal_flip(expected) if flip else expected).float() / 255
        torch.testing.assert_close(crop, expected, atol=1e-6, rtol=0)


def test_crop_boxes_follow_random_resized_crop():
    generator = torch.Generator().manual_seed(0)
    sizes = torch.tensor([[200, 160]]).expand(3000, 2)
    for scale in ((0.3, 1.0), (0.05, 0.3)):
        boxes = views_msn.sample_resized_crop_boxes(sizes, scale, (3 / 4, 4 / 3), generator).double()
        top, left, height, width = boxes.unbind(1)
        assert (top >= 0).all() and (left >= 0).all() and (top + height <= 200).all() and (left + width <= 160).all()
        area = height * width / (200 * 160)
        # Side lengths are rounded to pixels: allow that much.
        assert area.min() > scale[0] * 0.97 and area.max() < scale[1] * 1.03
        assert area.min() < scale[0] + 0.05 * (scale[1] - scale[0])
        assert area.max() > scale[1] - 0.15 * (scale[1] - scale[0])
        ratio = width / height
        assert ratio.min() > 0.75 * 0.95 and ratio.max() < 4 / 3 * 1.05
        # Placement is uniform over the free room.
        room = (200 - height).clamp(min=1)
        assert abs((top / room).mean().item() - 0.5) < 0.05


def test_view_crop_scale_respected_end_to_end():
    """Read each view's crop size from a coordinate ramp: its area fraction lies in the configured range."""
    processor = MSNImageProcessor(**TINY, **NO_COLOUR, horizontal_flip_probability=0.0, num_focal_views=12)
    views = processor([ramp_image(64)] * 8, return_views=True, seed=0, return_tensors="pt")

    def area_fractions(pixels):  # (n, 3, S, S) -> (n,)
        # Pixel centres span (S - 1) / S of the crop side.
        side = pixels.shape[-1]
        spread = pixels.amax(dim=(2, 3)) - pixels.amin(dim=(2, 3))
        return spread[:, 0] * spread[:, 1] * (side / (side - 1)) ** 2

    large = area_fractions(torch.cat([views["pixel_values"], views["anchor_pixel_values"].flatten(0, 1)]))
    focal = area_fractions(views["focal_pixel_values"].flatten(0, 1))
    assert large.min() > 0.3 * 0.85 and large.max() < 1.0 * 1.05
    assert focal.min() > 0.05 * 0.8 and focal.max() < 0.3 * 1.15
    assert large.std() > 0.1 and focal.std() > 0.03  # really random, not one fixed crop


def view_rates(processor, image, num_views=400, **kwargs):
    """Views of `image` as focal views `(num_views, 3, s, s)`, everything but the crop disabled unless overridden."""
    settings = dict(NO_COLOUR, anchor_crop_scale=(1.0, 1.0), focal_crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    settings.update(kwargs)
    views = processor(
        [image] * 4, return_views=True, seed=1, num_focal_views=num_views // 4, return_tensors="pt", **settings
    )
    return views["focal_pixel_values"].flatten(0, 1)


def test_flip_rate():
    processor = MSNImageProcessor(size=16, crop_size=16, focal_crop_size=16)
    image = np.zeros((16, 16, 3), dtype=np.uint8)
    image[:, 8:] = 255  # dark left, bright right
    for probability, low, high in ((0.5, 0.4, 0.6), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)):
        views = view_rates(processor, image, horizontal_flip_probability=probability)
        flipped = views[..., :8].mean(dim=(1, 2, 3)) > views[..., 8:].mean(dim=(1, 2, 3))
        assert low <= flipped.float().mean().item() <= high


def test_grayscale_jitter_and_blur_rates():
    processor = MSNImageProcessor(size=16, crop_size=16, focal_crop_size=16, horizontal_flip_probability=0.0)
    colour = np.zeros((16, 16, 3), dtype=np.uint8)
    colour[..., 0], colour[..., 1], colour[..., 2] = 200, 60, 30
    views = view_rates(processor, colour, grayscale_probability=0.2)
    is_gray = (views.amax(dim=1) - views.amin(dim=1)).amax(dim=(1, 2)) < 1e-6
    assert 0.13 < is_gray.float().mean().item() < 0.27

    original = torch.tensor([200, 60, 30]) / 255
    views = view_rates(processor, colour, color_jitter_probability=0.8)
    changed = (views - original.view(1, 3, 1, 1)).abs().amax(dim=(1, 2, 3)) > 1e-3
    assert 0.72 < changed.float().mean().item() < 0.88

    checkerboard = ((np.indices((16, 16)).sum(0) % 2) * 255).astype(np.uint8)
    views = view_rates(processor, checkerboard, blur_probability=0.5, blur_sigma=(1.0, 2.0))
    blurred = views.std(dim=(1, 2, 3)) < 0.3  # unblurred: std 0.5
    assert 0.4 < blurred.float().mean().item() < 0.6


# ---------------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------------


def test_input_types_give_the_same_result(tmp_path):
    processor = MSNImageProcessor(**TINY)
    rgb = np.array(random_image(24, 20, seed=5))
    path = tmp_path / "image.png"
    Image.fromarray(rgb).save(path)
    reference = processor(Image.fromarray(rgb), return_tensors="pt")["pixel_values"]
    same = [
        rgb,  # numpy HWC uint8
        np.ascontiguousarray(rgb.transpose(2, 0, 1)),  # numpy CHW
        torch.from_numpy(rgb).permute(2, 0, 1),  # torch CHW uint8
        torch.from_numpy(rgb).long().permute(2, 0, 1),  # torch CHW int64
        str(path),
        path,
        Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])),  # opaque RGBA
    ]
    for image in same:
        torch.testing.assert_close(processor(image, return_tensors="pt")["pixel_values"], reference, atol=0, rtol=0)
    for image in (rgb.astype(np.float32) / 255, torch.from_numpy(rgb).permute(2, 0, 1).double() / 255):
        torch.testing.assert_close(processor(image, return_tensors="pt")["pixel_values"], reference, atol=0.05, rtol=0)
    batch = processor(np.stack([rgb, rgb]), return_tensors="pt")["pixel_values"]  # 4-D batch
    assert batch.shape == (2, 3, 32, 32) and torch.equal(batch[1], reference[0])


def test_16_bit_arrays_are_scaled_by_their_type_and_wider_integers_are_checked():
    processor = MSNImageProcessor(**TINY)
    gray = np.random.default_rng(0).integers(0, 256, (20, 20), dtype=np.uint8)
    as_16_bit = gray.astype(np.uint16) * 257  # the same grey levels in 16 bits: 255 -> 65535
    expected = processor(gray, return_tensors="pt")["pixel_values"]
    for image in (as_16_bit, torch.from_numpy(as_16_bit)):
        assert torch.equal(processor(image, return_tensors="pt")["pixel_values"], expected)
    for dtype in (np.uint32, np.uint64):
        assert torch.equal(processor(gray.astype(dtype), return_tensors="pt")["pixel_values"], expected)
        with pytest.raises(ValueError, match=r"image 0: integer images must have values in \[0, 255\], got \[0, 300\]"):
            processor(np.array([[0, 300]], dtype=dtype))


def test_grayscale_rgba_palette_become_rgb():
    processor = MSNImageProcessor(**TINY)
    gray = np.random.default_rng(0).integers(0, 256, (20, 20), dtype=np.uint8)
    as_rgb = processor(np.dstack([gray] * 3), return_tensors="pt")["pixel_values"]
    for image in (gray, Image.fromarray(gray), torch.from_numpy(gray), torch.from_numpy(gray)[None], gray[..., None]):
        assert torch.equal(processor(image, return_tensors="pt")["pixel_values"], as_rgb)
    # Fully transparent pixels are composited on white, whatever their colour.
    transparent = np.zeros((20, 20, 4), dtype=np.uint8)
    white = processor(np.full((20, 20, 3), 255, np.uint8), return_tensors="pt")["pixel_values"]
    assert torch.equal(processor(transparent, return_tensors="pt")["pixel_values"], white)
    assert torch.equal(processor(Image.fromarray(transparent, "RGBA"), return_tensors="pt")["pixel_values"], white)
    palette = random_image(20, 20).convert("P")
    torch.testing.assert_close(
        processor(palette, return_tensors="pt")["pixel_values"],
        processor(palette.convert("RGB"), return_tensors="pt")["pixel_values"],
    )


def test_small_and_mixed_size_images_in_both_modes():
    processor = MSNImageProcessor(**TINY)
    images = [random_image(5, 7), random_image(64, 40, seed=1), np.zeros((1, 1, 3), np.uint8)]
    assert processor(images, return_tensors="pt")["pixel_values"].shape == (3, 3, 32, 32)
    views = processor(images, return_views=True, return_tensors="pt")
    assert views["focal_pixel_values"].shape == (3, 10, 3, 16, 16) and torch.isfinite(views["pixel_values"]).all()


def corrupt_png(tmp_path):
    buffer = io.BytesIO()
    random_image(32, 32).save(buffer, format="PNG")
    path = tmp_path / "corrupt.png"
    path.write_bytes(buffer.getvalue()[:200])  # header intact, pixel data cut
    return path


@pytest.mark.parametrize(
    "bad, index, message",
    [
        (5, 1, "expected a PIL.Image.Image, numpy.ndarray, torch.Tensor or file path, got int"),
        (np.zeros((10, 10, 2), np.uint8), 1, "channels"),
        (torch.zeros(5, 10, 10), 1, "channels"),
        (np.zeros((2, 3, 10, 10)), 1, "dimensions"),
        (np.full((10, 10, 3), 2.0), 1, r"values in \[0, 1\], got \[2, 2\]"),
        (np.full((10, 10, 3), np.nan), 1, "NaN"),
        (np.full((10, 10, 3), 300), 1, r"\[0, 255\], got \[300, 300\]"),
        (np.zeros((10, 10, 3), bool), 1, "dtype"),
        (np.zeros((0, 10, 3), np.uint8), 1, "empty"),
        ("missing.png", 1, "could not open"),
    ],
)
def test_bad_inputs_name_the_item(bad, index, message):
    processor = MSNImageProcessor(**TINY)
    for return_views in (False, True):
        with pytest.raises(ValueError, match=rf"image {index}: .*{message}"):
            processor([random_image(10, 10), bad], return_views=return_views)


def test_corrupt_files_and_empty_batches(tmp_path):
    processor = MSNImageProcessor(**TINY)
    path = corrupt_png(tmp_path)
    with pytest.raises(ValueError, match="image 2: could not decode"):
        processor([random_image(10, 10), random_image(10, 10), Image.open(path)])
    with pytest.raises(ValueError, match="image 0: could not decode"):
        processor(str(path), return_views=True)
    for empty in ([], (), np.zeros((0, 8, 8, 3), np.uint8)):
        with pytest.raises(ValueError, match="at least one image"):
            processor(empty)


@pytest.mark.parametrize(
    "settings, name",
    [
        (dict(grayscale_probability=1.5), "grayscale_probability"),
        (dict(anchor_crop_scale=(0.5, 0.2)), "anchor_crop_scale"),
        (dict(focal_crop_scale=(0.1, 1.5)), "focal_crop_scale"),
        (dict(blur_sigma=(0.0, 1.0)), "blur_sigma"),
        (dict(num_focal_views=-1), "num_focal_views"),
        (dict(color_jitter_strength=3.0), "color_jitter_strength"),
        (dict(resample=5), "resample"),
    ],
)
def test_bad_settings(settings, name):
    with pytest.raises(ValueError, match=name):
        MSNImageProcessor(**settings)
    processor = MSNImageProcessor(**TINY)
    if name != "resample":  # per-call overrides are checked too
        with pytest.raises(ValueError, match=name):
            processor(random_image(10, 10), return_views=True, **settings)


def test_seed_and_generator_are_exclusive():
    processor = MSNImageProcessor(**TINY)
    with pytest.raises(ValueError, match="either `seed` or `generator`"):
        processor(random_image(10, 10), return_views=True, seed=0, generator=torch.Generator())
    with pytest.raises(ValueError, match="`seed` must be an int"):
        processor(random_image(10, 10), return_views=True, seed="0")


# ---------------------------------------------------------------------------------------------------------------------
# Serialisation, Auto classes, remote code, pickling, datasets and DataLoader
# ---------------------------------------------------------------------------------------------------------------------


CUSTOM = dict(TINY, num_focal_views=3, anchor_crop_scale=(0.4, 0.9), blur_sigma=(0.2, 1.5), grayscale_probability=0.1)


def test_save_load_round_trip_and_auto_image_processor(tmp_path):
    from transformers import AutoImageProcessor

    processor = MSNImageProcessor(**CUSTOM)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["num_focal_views"] == 3 and saved["anchor_crop_scale"] == [0.4, 0.9]
    assert saved["crop_size"] == {"height": 32, "width": 32} and saved["focal_crop_size"] == {
        "height": 16,
        "width": 16,
    }
    assert saved["auto_map"]["AutoImageProcessor"] == "image_processing_msn.MSNImageProcessor"
    assert (tmp_path / "image_processing_msn.py").exists()

    images = [random_image(40, 30)]
    expected = processor(images, return_views=True, seed=0, return_tensors="pt")
    for loaded in (MSNImageProcessor.from_pretrained(tmp_path), AutoImageProcessor.from_pretrained(tmp_path)):
        assert isinstance(loaded, MSNImageProcessor)
        assert loaded.to_dict() == processor.to_dict()
        got = loaded(images, return_views=True, seed=0, return_tensors="pt")
        assert all(torch.equal(got[key], expected[key]) for key in expected)
    assert MSNImageProcessor.from_pretrained(tmp_path, num_focal_views=5).num_focal_views == 5


def test_remote_code_loads_without_the_package(tmp_path):
    processor = MSNImageProcessor(**CUSTOM)
    folder = tmp_path / "checkpoint"
    processor.save_pretrained(folder)
    image = np.asarray(random_image(40, 30))
    np.save(tmp_path / "image.npy", image)
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["msn_hf"] = None  # the package must not be importable: only the shipped code may be used
        import numpy as np, torch
        from transformers import AutoImageProcessor
        processor = AutoImageProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
        image = np.load({str(tmp_path / "image.npy")!r})
        out = dict(processor([image], return_views=True, seed=0, return_tensors="pt"))
        out["eval"] = processor([image], return_tensors="pt")["pixel_values"]
        torch.save(out, {str(tmp_path / "out.pt")!r})
        """
    )
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", PYTHONPATH="")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    remote = torch.load(tmp_path / "out.pt")
    expected = processor([image], return_views=True, seed=0, return_tensors="pt")
    for key in expected:
        assert torch.equal(remote[key], expected[key])
    assert torch.equal(remote["eval"], processor([image], return_tensors="pt")["pixel_values"])


def test_pickle_round_trip():
    processor = MSNImageProcessor(**CUSTOM)
    clone = pickle.loads(pickle.dumps(processor))
    images = [random_image(30, 30)]
    a = processor(images, return_views=True, seed=0, return_tensors="pt")
    b = clone(images, return_views=True, seed=0, return_tensors="pt")
    assert all(torch.equal(a[key], b[key]) for key in a)


class ViewsDataset(torch.utils.data.Dataset):
    def __init__(self, processor, image, length):
        self.processor, self.image, self.length = processor, image, length

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        views = self.processor(self.image, return_views=True, return_tensors="pt")
        return {key: value[0] for key, value in views.items()}


def test_dataloader_workers_and_datasets_set_transform():
    import datasets

    processor = MSNImageProcessor(**TINY, num_focal_views=2)
    image = random_image(24, 24)
    loader = torch.utils.data.DataLoader(ViewsDataset(processor, image, 4), batch_size=2, num_workers=2)
    batches = list(loader)
    assert [tuple(b["focal_pixel_values"].shape) for b in batches] == [(2, 2, 3, 16, 16)] * 2
    # Every worker draws its own views of the same image.
    targets = torch.cat([b["pixel_values"] for b in batches])
    assert len({tuple(t.flatten()[:64].tolist()) for t in targets}) == 4

    dataset = datasets.Dataset.from_dict({"image": [image, random_image(30, 20, seed=1)], "label": [0, 1]})
    dataset.set_transform(lambda batch: dict(processor(batch["image"], return_views=True, return_tensors="pt")))
    batch = dataset[:2]
    assert batch["pixel_values"].shape == (2, 3, 32, 32) and batch["anchor_pixel_values"].shape == (2, 1, 3, 32, 32)
    assert dataset[0]["focal_pixel_values"].shape == (2, 3, 16, 16)


# ---------------------------------------------------------------------------------------------------------------------
# Views: every view from its own image, in its role; rendering on a device; the canvas
# ---------------------------------------------------------------------------------------------------------------------


def reference_views(image, params, size, mean, std):
    """Each view of `params` rendered alone with torchvision's functional ops, in the recipe's order."""
    operations = (tvF.adjust_brightness, tvF.adjust_contrast, tvF.adjust_saturation, tvF.adjust_hue)
    views = []
    for i in range(len(params)):
        top, left, height, width = params.boxes[i].tolist()
        view = tvF.resized_crop(image[params.source[i]], top, left, height, width, list(size), antialias=True)
        view = view.float() / 255
        if params.flip[i]:
            view = tvF.horizontal_flip(view)
        if params.jitter[i]:
            for operation in params.jitter_order[i].tolist():
                view = operations[operation](view, params.jitter_factors[i, operation].item())
        if params.grayscale[i]:
            view = tvF.rgb_to_grayscale(view, num_output_channels=3)
        if params.blur[i]:
            sigma = params.blur_sigma[i].item()
            view = tvF.gaussian_blur(view, [2 * int(np.ceil(3 * sigma)) + 1] * 2, [sigma] * 2)
        views.append(tvF.normalize(view, mean, std))
    return torch.stack(views)


@pytest.mark.parametrize("device", [None, "cpu"])
def test_each_view_comes_from_its_own_image_in_its_role(device):
    """Distinct images; every output slot equals the view drawn for that image and role, rendered independently."""
    mean, std = (0.3, 0.5, 0.6), (0.2, 0.25, 0.3)
    settings = dict(TINY, num_anchor_views=2, num_focal_views=3, image_mean=mean, image_std=std)
    processor = MSNImageProcessor(**settings)
    images = [random_image(40, 48, seed=1), random_image(56, 36, seed=2), random_image(44, 44, seed=3)]
    views = processor(images, return_views=True, seed=5, device=device, return_tensors="pt")

    # The draws the processor makes: the target + anchor group first, then the focal group, image by image.
    generator = torch.Generator().manual_seed(5)
    sizes = torch.tensor([[40, 48], [56, 36], [44, 44]])
    common = (processor.crop_ratio, 0.5, 0.5, 0.8, 0.2, 0.5, (0.1, 2.0))
    large = views_msn.sample_view_params(sizes, torch.arange(3).repeat_interleave(3), (0.3, 1.0), *common, generator)
    focal = views_msn.sample_view_params(sizes, torch.arange(3).repeat_interleave(3), (0.05, 0.3), *common, generator)
    assert large.jitter.any() and focal.jitter.any() and large.jitter_order.unique(dim=0).shape[0] > 1
    sources = [torch.from_numpy(np.array(image)).permute(2, 0, 1) for image in images]
    expected_large = reference_views(sources, large, (32, 32), mean, std).view(3, 3, 3, 32, 32)
    expected_focal = reference_views(sources, focal, (16, 16), mean, std).view(3, 3, 3, 16, 16)

    # The CPU path matches to float precision; the device path up to the uint8 rounding of the CPU crops.
    tolerance = dict(atol=2e-4, rtol=0) if device is None else dict(atol=5 / 255 / min(std), rtol=0)
    torch.testing.assert_close(views["pixel_values"], expected_large[:, 0], **tolerance)
    torch.testing.assert_close(views["anchor_pixel_values"], expected_large[:, 1:], **tolerance)
    torch.testing.assert_close(views["focal_pixel_values"], expected_focal, **tolerance)


def test_device_rendering_matches_cpu_rendering():
    processor = MSNImageProcessor(**TINY, num_focal_views=4, do_normalize=False)
    mixed = [random_image(40, 52, seed=i) for i in range(3)] + [random_image(24, 70, seed=9)]
    canvas = torch.stack([torch.from_numpy(np.array(random_image(40, 40, seed=i))).permute(2, 0, 1) for i in range(6)])
    for images in (mixed, canvas):
        for resample in (ipm.PILImageResampling.BILINEAR, ipm.PILImageResampling.BICUBIC):
            cpu = processor(images, return_views=True, seed=3, resample=resample, return_tensors="pt")
            on_device = processor(
                images, return_views=True, seed=3, resample=resample, device="cpu", return_tensors="pt"
            )
            for key in cpu:
                difference = (cpu[key] - on_device[key]).abs()
                # Same draws; only the CPU path's uint8 rounding of the resized crops differs.
                assert difference.max() < 4 / 255 and difference.mean() < 0.3 / 255, (key, resample)
    # Crop geometry of the batched resize, nearest included, against one resize call per view.
    image = torch.from_numpy(np.array(random_image(30, 40))).permute(2, 0, 1)
    params = views_msn.sample_view_params(
        torch.tensor([[30, 40]]), torch.zeros(8, dtype=torch.long), (0.05, 1.0), (0.75, 4 / 3), 0.5,
        0.0, 0.0, 0.0, 0.0, (0.1, 2.0), torch.Generator().manual_seed(1),
    )  # fmt: skip
    for interpolation in ("nearest", "bilinear", "bicubic"):
        batched = views_msn.batched_resized_crops(image[None], params, (12, 20), interpolation)
        one_by_one = views_msn.resized_crops([image], params, (12, 20), interpolation)
        # The one-by-one uint8 resize rounds each pass to a pixel level (nearest: no arithmetic, exact).
        torch.testing.assert_close(batched, one_by_one, atol=1.01 / 255 if interpolation != "nearest" else 0, rtol=0)


def test_jitter_and_blur_draws_follow_torchvision_ranges():
    num_views = 24000
    for strength in (0.5, 1.5):
        params = views_msn.sample_view_params(
            torch.tensor([[64, 64]]), torch.zeros(num_views, dtype=torch.long), (0.3, 1.0), (0.75, 4 / 3), 0.5,
            strength, 1.0, 0.2, 0.5, (0.1, 2.0), torch.Generator().manual_seed(0),
        )  # fmt: skip
        jitter = transforms.ColorJitter(0.8 * strength, 0.8 * strength, 0.8 * strength, 0.2 * strength)
        for operation, (low, high) in enumerate((jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)):
            factors = params.jitter_factors[:, operation]
            width = high - low
            assert low - 1e-6 <= factors.min() < low + 0.01 * width and high - 0.01 * width < factors.max() <= high
            assert abs(factors.mean().item() - (low + high) / 2) < 0.02 * width  # uniform
        # The operations' order is a uniformly random permutation, as ColorJitter's `randperm(4)`.
        orders, counts = params.jitter_order.unique(dim=0, return_counts=True)
        assert orders.shape[0] == 24 and ((orders.sort(dim=1).values == torch.arange(4)).all())
        assert counts.min() > 0.85 * num_views / 24 and counts.max() < 1.15 * num_views / 24
    # Blur sigma: uniform over the range, as GaussianBlur(sigma=(0.1, 2.0)).
    sigma = params.blur_sigma
    assert 0.1 <= sigma.min() < 0.11 and 1.99 < sigma.max() <= 2.0 and abs(sigma.mean().item() - 1.05) < 0.02


def test_canvas_is_shortest_side_then_centre_square():
    processor = MSNImageProcessor(**TINY)
    wide, tall, tiny = random_image(40, 64, seed=1), random_image(50, 30, seed=2), random_image(5, 7, seed=3)
    canvas = processor.make_canvas([wide, tall, tiny])
    assert canvas.shape == (3, 3, 32, 32) and canvas.dtype == torch.uint8
    for got, image in zip(canvas, (wide, tall, tiny)):
        tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1)
        expected = tvF.center_crop(tvF.resize(tensor, 32, antialias=True), [32, 32])
        assert (got.int() - expected.int()).abs().max() <= 1
    # The middle of a wide image is kept, its sides are cut.
    stripes = np.zeros((32, 96, 3), np.uint8)
    stripes[:, 32:64] = 255
    assert (processor.make_canvas(stripes, size=32) == 255).all()
    # Transparency is composited on white, floats in [0, 1] are pixels / 255.
    assert (processor.make_canvas(Image.fromarray(np.zeros((20, 20, 4), np.uint8), "RGBA")) == 255).all()
    float_canvas = processor.make_canvas(np.array(wide).astype(np.float32) / 255)
    assert (float_canvas.int() - canvas[:1].int()).abs().max() <= 1
    with pytest.raises(ValueError, match="size"):
        processor.make_canvas(wide, size={"height": 32, "width": 32})


def test_views_reject_other_pixel_scales():
    processor = MSNImageProcessor(**TINY)
    image = random_image(20, 20)
    for settings in (dict(do_rescale=False), dict(rescale_factor=1 / 127.5)):
        with pytest.raises(ValueError, match="do_rescale=True` and `rescale_factor=1/255"):
            processor(image, return_views=True, **settings)
    # The evaluation mode honours them.
    plain = processor(image, return_tensors="pt", do_rescale=False, do_normalize=False)["pixel_values"]
    assert plain.max() > 1.5
