"""Image sizes for pre-encoding: a square center crop, or aspect-ratio buckets.

SD3 pre-trains on 256^2 square crops and then fine-tunes on mixed aspect ratios at a fixed
pixel count (paper section 5.3.2, "variable aspect ratios"). A bucket is (H, W) pixels with
H*W close to resolution^2 and both sides multiples of `step` = VAE downsampling x transformer
patch size (16 for SD3), so every bucket patchifies exactly. An image goes to the bucket
whose aspect ratio is closest in log space, is resized to cover it, and center-cropped.
"""

from __future__ import annotations

import math

from PIL import Image

RESAMPLE = Image.Resampling.BICUBIC


def make_buckets(resolution: int, step: int, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(H, W) pixel sizes with H*W <= resolution^2 (as close as the step allows), sides multiples of step."""
    if resolution < step or resolution % step:
        raise ValueError(
            f"resolution {resolution} is not a multiple of {step} (VAE factor x patch size); "
            f"use e.g. {max(step, round(resolution / step) * step)}"
        )
    area = resolution * resolution
    buckets = set()
    for width in range(step, int(resolution * math.sqrt(max_ratio)) + step, step):
        height = (area // width) // step * step
        if height >= step and max(height / width, width / height) <= max_ratio + 1e-9:
            buckets.add((height, width))
            buckets.add((width, height))
    return sorted(buckets, key=lambda hw: hw[1] / hw[0])


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's, in log space."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda hw: (abs(math.log(hw[1] / hw[0]) - ratio), -hw[0] * hw[1]))


def center_crop_resize(
    image: Image.Image, size: tuple[int, int]
) -> tuple[Image.Image, dict[str, int]]:
    """Resize `image` to cover (H, W) and center-crop it; returns the crop and where it came from.

    The record gives the resized size and the crop's top-left corner in resized pixels.
    """
    height, width = size
    scale = max(width / image.width, height / image.height)
    resized_w, resized_h = (
        max(width, round(image.width * scale)),
        max(height, round(image.height * scale)),
    )
    left, top = (resized_w - width) // 2, (resized_h - height) // 2
    resized = (
        image.resize((resized_w, resized_h), RESAMPLE)
        if (resized_w, resized_h) != image.size
        else image
    )
    crop = resized.crop((left, top, left + width, top + height))
    return crop, {
        "resized_w": resized_w,
        "resized_h": resized_h,
        "crop_left": left,
        "crop_top": top,
    }
