"""`crop_first` and `split` against open_clip's own inference transforms, on the sample photographs."""

from __future__ import annotations

import random
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from torchvision import transforms

from prelabel.pipeline.preprocess import crop_first, split

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "images"

_rng = random.Random(0)
_random_heights = [_rng.randint(225, 1200) for _ in range(6)]
SHRUNK = [(1280, 720), (1920, 1080), (640, 360), (1024, 768), (777, 333), (300, 257)] + [
    (_rng.randint(h + 1, int(h * 2.5)), h) for h in _random_heights
]
"""Landscape frames that are scaled down: video and photo shapes, odd ones, random ones."""
OTHERS = [(720, 1280), (333, 777), (1000, 1000), (300, 200), (120, 90), (90, 120)]
"""Portrait, square, and frames smaller than the model's input (enlarged)."""
CASES = [(224, "bicubic"), (256, "bicubic"), (224, "bilinear")]


def _photos(sizes: list[tuple[int, int]]) -> list[Image.Image]:
    photos = [Image.open(path).convert("RGB") for path in sorted(SAMPLES.glob("*.jpg"))]
    assert photos
    return [photo.resize(size, Image.Resampling.LANCZOS) for photo in photos for size in sizes]


def _grey_levels(tensor: torch.Tensor, transform: object) -> torch.Tensor:
    """The normalised tensor back in 0..255 grey levels (undoing open_clip's Normalize)."""
    normalize = transform.transforms[-1]
    mean = torch.tensor(normalize.mean).view(3, 1, 1)
    std = torch.tensor(normalize.std).view(3, 1, 1)
    return (tensor * std + mean) * 255


@pytest.mark.parametrize(("image_size", "interpolation"), CASES)
def test_crop_first_matches_open_clip_within_two_grey_levels(image_size: int, interpolation: str) -> None:
    transform = open_clip.image_transform(image_size, is_train=False, interpolation=interpolation)
    fast = crop_first(transform)
    assert fast is not transform

    differing = total = 0
    for image in _photos(SHRUNK):
        expected, got = transform(image), fast(image)
        assert got.shape == expected.shape == (3, image_size, image_size)
        levels = (_grey_levels(got, transform) - _grey_levels(expected, transform)).abs()
        assert levels.max().item() <= 2.0 + 1e-3, image.size
        differing += int((levels > 0.5).sum())
        total += levels.numel()
    assert differing / total < 1e-3  # measured on 120 random shapes: at most 3 in 10,000

    for image in _photos(OTHERS):  # these go through open_clip's transform itself
        assert torch.equal(fast(image), transform(image))


@pytest.mark.parametrize("resize_mode", ["longest", "squash"])
def test_other_transforms_are_left_as_they_are(resize_mode: str) -> None:
    transform = open_clip.image_transform(224, is_train=False, resize_mode=resize_mode)
    assert crop_first(transform) is transform
    assert crop_first(lambda image: torch.zeros(3)) is not None


def test_a_tensor_goes_through_the_original_transform() -> None:
    transform = open_clip.image_transform(224, is_train=False)
    pixels = torch.rand(3, 224, 224)
    assert torch.equal(crop_first(transform)(pixels), transform(pixels))


SPLIT_CASES = [
    (224, "bicubic", "shortest"),
    (256, "bilinear", "shortest"),
    (224, "bicubic", "squash"),
    (224, "bicubic", "longest"),
]


@pytest.mark.parametrize(("image_size", "interpolation", "resize_mode"), SPLIT_CASES)
def test_split_gives_open_clip_s_values_exactly(
    image_size: int, interpolation: str, resize_mode: str
) -> None:
    transform = image_transform_v2(
        PreprocessCfg(size=image_size, interpolation=interpolation, resize_mode=resize_mode),
        is_train=False,
    )
    images = _photos(SHRUNK[:6] + OTHERS)
    expected = torch.stack([transform(image) for image in images])
    exact = split(transform, crop=False)
    pixels = [exact.frame(image) for image in images]
    assert all(p.dtype == torch.uint8 and p.shape == (image_size, image_size, 3) for p in pixels)
    assert torch.equal(exact.batch(torch.stack(pixels)), expected)
    # With the crop moved into the resize, the values are crop_first's, exactly.
    cropped = split(transform, crop=True)
    fast = crop_first(transform)
    got = cropped.batch(torch.stack([cropped.frame(image) for image in images]))
    assert torch.equal(got, torch.stack([fast(image) for image in images]))


def test_split_runs_a_transform_it_cannot_cut_whole_on_each_frame() -> None:
    transform = open_clip.image_transform(224, is_train=False)
    ends_otherwise = transforms.Compose([*transform.transforms, transforms.Lambda(lambda t: t * 2)])
    image = _photos([(300, 200)])[0]
    for uncut in (ends_otherwise, lambda image: torch.zeros(3, 4, 4)):
        parts = split(uncut, crop=False)
        assert parts.frame is uncut
        stacked = torch.stack([uncut(image)])
        assert parts.batch(stacked) is stacked
