"""Decode + augment on the CPU workers (uint8 in, uint8 out), normalise on the training device.

Why this is fast: a random-resized crop of a photo needs far fewer pixels than the photo has, so
1. the crop box is drawn from the JPEG header alone (no decode yet);
2. the JPEG is decoded by libjpeg-turbo (simplejpeg, fast integer DCT and chroma upsampling) at the smallest
   power-of-two DCT scale (1/2, 1/4, 1/8) at which the crop still has at least ``size`` pixels on each side: the
   IDCT then does the antialiased part of the downscaling for free (only these scales have SIMD kernels; 3/4,
   5/8... are slower than a full decode);
3. what is left is a resize by less than 2x (or an upscale), done with torch's vectorised uint8 bilinear kernel
   on the channels-last crop, without antialiasing -- as TensorFlow's default resize in the Inception crop of
   big_vision -- at a fraction of the cost of PIL's resampling. Eval keeps antialiasing (its cost matters less);
4. images stay uint8 until ``normalize`` runs on the accelerator: a quarter of the bytes through shared memory
   and host-to-device copies, and no float work on the CPU.
Anything simplejpeg cannot decode (PNG, CMYK JPEG) goes through PIL; what PIL cannot decode is a bad sample.

Every decode path reads the image's dimensions from its header first and refuses an image of more than
``max_pixels`` pixels (``data.max_image_pixels``) before a single pixel is allocated: a few hundred bytes can
declare a 60000 x 60000 JPEG (a decompression bomb), which would otherwise cost a loader worker gigabytes.
"""

from __future__ import annotations

import io
import math

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.data.config import DEFAULT_MAX_IMAGE_PIXELS

INCEPTION_RATIO = (3 / 4, 4 / 3)
# Eval: resize the shorter side to size / 0.875 (1.14x) and take the centre crop (the Inception / timm
# convention). ``crop_fraction=None`` instead resizes the whole image straight to size x size, as the ViT
# paper's fine-tuning evaluation did.
EVAL_CROP_FRACTION = 0.875


class DecodeError(ValueError):
    """The bytes are not an image we can decode (or one larger than the image limit)."""


def check_pixels(height: int, width: int, max_pixels: int) -> None:
    """Raise ``DecodeError`` for an image of more than ``max_pixels`` pixels (read from its header)."""
    if height * width > max_pixels:
        raise DecodeError(
            f"image of {width} x {height} = {height * width:,} pixels is over the limit of {max_pixels:,} "
            "(data.max_image_pixels): a decompression bomb, or a photo to downscale before conversion"
        )


def image_size(data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """(height, width) from the JPEG header, or from PIL for other formats, without decoding pixels; raises
    ``DecodeError`` for an image over ``max_pixels``."""
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        try:
            with Image.open(io.BytesIO(data)) as im:  # reads the header only
                height, width = im.height, im.width
        except Image.DecompressionBombError as exc:  # past twice PIL's default, refused by PIL itself
            raise DecodeError(
                f"image is over the limit of {max_pixels:,} pixels (data.max_image_pixels), by PIL's check: {exc}"
            ) from exc
        except Exception as exc:  # PIL's errors share no base class with OSError or ValueError
            raise DecodeError(f"not an image ({type(exc).__name__}: {exc})") from exc
    check_pixels(height, width, max_pixels)
    return height, width


def _decode(data: bytes, height: int, width: int, scale_down: int, fast: bool) -> np.ndarray:
    """RGB uint8 [h, w, 3] at 1/scale_down of the full size (approximately: libjpeg rounds up)."""
    try:
        if scale_down > 1:
            return simplejpeg.decode_jpeg(
                data,
                colorspace="RGB",
                fastdct=fast,
                fastupsample=fast,
                min_height=math.ceil(height / scale_down),
                min_width=math.ceil(width / scale_down),
            )
        return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=fast, fastupsample=fast)
    except ValueError:
        pass
    try:
        with Image.open(io.BytesIO(data)) as im:
            if scale_down > 1:
                im.draft("RGB", (math.ceil(width / scale_down), math.ceil(height / scale_down)))
            return np.asarray(im.convert("RGB"))
    except Exception as exc:
        raise DecodeError(f"undecodable image ({type(exc).__name__}: {exc})") from exc


def _scale_down_for(crop_h: float, crop_w: float, size: int) -> int:
    for factor in (8, 4, 2):
        if crop_h / factor >= size and crop_w / factor >= size:
            return factor
    return 1


def crop_resize(
    data: bytes,
    box: tuple[float, float, float, float],
    size: int,
    *,
    flip: bool = False,
    fast: bool = False,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> torch.Tensor:
    """Decode the region ``box`` = (top, left, height, width) of an image (in full-size pixels) to [size, size, 3].

    ``fast`` (training): fast DCT / chroma upsampling and no antialiasing in the final (< 2x) resize.
    """
    height, width = image_size(data, max_pixels)
    top, left, crop_h, crop_w = box
    factor = _scale_down_for(crop_h, crop_w, size)
    pixels = _decode(data, height, width, factor, fast)
    sy, sx = pixels.shape[0] / height, pixels.shape[1] / width
    y0, x0 = int(top * sy), int(left * sx)
    y1 = max(y0 + 1, min(pixels.shape[0], round((top + crop_h) * sy)))
    x1 = max(x0 + 1, min(pixels.shape[1], round((left + crop_w) * sx)))
    # HWC numpy -> NCHW view in channels-last layout, which the uint8 bilinear kernel is vectorised for.
    if not pixels.flags.writeable:  # PIL hands out read-only arrays; torch wants writable memory
        pixels = pixels.copy()
    region = torch.from_numpy(pixels[y0:y1, x0:x1]).permute(2, 0, 1).unsqueeze(0)
    if region.shape[-2:] != (size, size):
        region = F.interpolate(region, size=(size, size), mode="bilinear", antialias=not fast, align_corners=False)
    out = region[0].permute(1, 2, 0)  # [size, size, 3]
    return out.flip(1) if flip else out


CROP_TRIES = 10
# Uniform draws one training augmentation uses, always exactly this many: a stream can then skip a sample's
# randomness without decoding it, and a sample's augmentation does not depend on how many tries others needed.
AUG_DRAWS = 4 * CROP_TRIES + 1


def random_resized_crop_box(
    height: int,
    width: int,
    u: np.ndarray,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = INCEPTION_RATIO,
) -> tuple[int, int, int, int]:
    """Inception-style crop: area uniform in ``scale`` of the image, log-uniform aspect ratio; (top, left, h, w).

    ``u`` holds 4 * CROP_TRIES uniforms in [0, 1). Ten tries as in the Inception preprocessing; then the centre
    crop with the aspect ratio clamped into range.
    """
    area = height * width
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for t in range(CROP_TRIES):
        u_area, u_ratio, u_top, u_left = u[4 * t : 4 * t + 4]
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u_area)
        aspect = math.exp(log_low + (log_high - log_low) * u_ratio)
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(u_top * (height - h + 1)), int(u_left * (width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def train_transform(
    data: bytes,
    size: int,
    u: np.ndarray,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    flip: bool = True,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> torch.Tensor:
    """Inception crop + random horizontal flip of an encoded image: uint8 [size, size, 3].

    ``u``: the sample's ``AUG_DRAWS`` uniforms in [0, 1), e.g. ``rng.random(AUG_DRAWS)``.
    """
    height, width = image_size(data, max_pixels)
    box = random_resized_crop_box(height, width, u[:-1], scale)
    return crop_resize(data, box, size, flip=flip and bool(u[-1] < 0.5), fast=True, max_pixels=max_pixels)


def eval_transform(
    data: bytes,
    size: int,
    *,
    crop_fraction: float | None = EVAL_CROP_FRACTION,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> torch.Tensor:
    """Resize + centre crop (or straight to size x size when ``crop_fraction`` is None): uint8 [size, size, 3]."""
    height, width = image_size(data, max_pixels)
    if crop_fraction is None:
        return crop_resize(data, (0, 0, height, width), size, max_pixels=max_pixels)
    side = min(height, width) * crop_fraction
    return crop_resize(data, ((height - side) / 2, (width - side) / 2, side, side), size, max_pixels=max_pixels)


def to_chw_batch(images: list[torch.Tensor]) -> torch.Tensor:
    """Copy [S, S, 3] uint8 images into a contiguous [B, 3, S, S] batch (one copy per image)."""
    height, width, channels = images[0].shape
    batch = torch.empty((len(images), channels, height, width), dtype=torch.uint8)
    for out, image in zip(batch, images, strict=True):
        out.copy_(image.permute(2, 0, 1))
    return batch


def normalize(images: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [B, 3, H, W] in [0, 255] -> ``dtype`` in [-1, 1] (x / 127.5 - 1, as the ViT paper / big_vision).

    Call it on the training device, after the uint8 batch has been copied there.
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize expects the loader's uint8 images, got {images.dtype}")
    return images.to(dtype).div_(127.5).sub_(1.0)
