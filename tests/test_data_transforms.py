"""Decode + augmentation on real JPEGs (photos from scikit-image), uint8 in and out."""

from __future__ import annotations

import io

import numpy as np
import pytest
import simplejpeg
import torch
from PIL import Image
from skimage import data as skdata

from pipeline.data.transforms import (
    AUG_DRAWS,
    CROP_TRIES,
    DecodeError,
    crop_resize,
    eval_transform,
    random_resized_crop_box,
    train_transform,
)


@pytest.fixture(scope="module")
def photo() -> tuple[bytes, np.ndarray]:
    pixels = skdata.astronaut()[40:440, 30:480]  # 400 x 450
    return simplejpeg.encode_jpeg(np.ascontiguousarray(pixels), quality=90), pixels


def test_random_resized_crop_boxes_respect_scale_and_ratio():
    rng = np.random.default_rng(0)
    for _ in range(500):
        top, left, h, w = random_resized_crop_box(350, 400, rng.random(4 * CROP_TRIES), scale=(0.08, 1.0))
        assert top >= 0 and top + h <= 350 and left >= 0 and left + w <= 400
        assert 0.07 * 350 * 400 <= h * w <= 350 * 400
        assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05


def test_scaled_decode_matches_a_full_decode_and_resize(photo):
    data, _ = photo
    box = (0, 0, 400, 448)  # large crop -> decoded at 1/2 scale
    fast = crop_resize(data, box, 64).numpy().astype(float)
    full = Image.open(io.BytesIO(data)).convert("RGB").resize((64, 64), Image.BILINEAR, box=(0, 0, 448, 400))
    assert fast.shape == (64, 64, 3)
    assert np.abs(fast - np.asarray(full, dtype=float)).mean() < 6


def test_train_transform_is_deterministic_per_seed_and_flips(photo):
    data, _ = photo
    a = train_transform(data, 32, np.random.default_rng(5).random(AUG_DRAWS))
    b = train_transform(data, 32, np.random.default_rng(5).random(AUG_DRAWS))
    assert a.dtype == torch.uint8 and a.shape == (32, 32, 3) and torch.equal(a, b)
    box = (10, 20, 200, 220)
    assert torch.equal(crop_resize(data, box, 24, flip=True), crop_resize(data, box, 24).flip(1))


def test_eval_transform_center_crops_or_resizes_whole(photo):
    data, pixels = photo
    cropped = eval_transform(data, 40).numpy().astype(float)
    whole = eval_transform(data, 40, crop_fraction=None).numpy().astype(float)
    side = 400 * 0.875
    top, left = (400 - side) / 2, (450 - side) / 2
    ref = Image.fromarray(pixels).resize((40, 40), Image.BILINEAR, box=(left, top, left + side, top + side))
    # Decoded at 1/8 scale, the box is placed to within one decoded pixel: the same picture, not the same pixels.
    assert np.corrcoef(cropped.ravel(), np.asarray(ref, dtype=float).ravel())[0, 1] > 0.95
    assert not np.array_equal(cropped, whole)


def test_png_and_grey_images_decode_and_garbage_is_a_decode_error():
    buf = io.BytesIO()
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(buf, "PNG")
    assert eval_transform(buf.getvalue(), 16).shape == (16, 16, 3)
    grey = simplejpeg.encode_jpeg(np.full((20, 20, 1), 90, np.uint8), colorspace="GRAY")
    assert eval_transform(grey, 8).shape == (8, 8, 3)
    with pytest.raises(DecodeError):
        eval_transform(b"\xff\xd8garbage", 8)
