"""Aesthetic (or, offline, technical-quality) score per image; higher is better for every kind.

- `laion_v2`: LAION aesthetic predictor v2, the MLP 768-1024-128-64-16-1 on L2-normalised CLIP
  ViT-L/14 image embeddings (scores about 1-10; LAION-Aesthetics cut at 4.5, 5, 6).
- `brisque_quality`: 100 - BRISQUE (Mittal et al. 2012) with the fitted SVR that ships in the
  `brisque` wheel, computed at a longest side of 512 px. A no-reference *technical quality*
  score (noise, blur, blocking), not an aesthetic one; BRISQUE is nominally 0 (pristine) to 100.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from curate.heads import ClipHeadScorer

BRISQUE_SIDE = 512
DEFAULT_THRESHOLDS = {"laion_v2": 4.5, "brisque_quality": 0.0}


def _brisque_class():
    import cv2
    from brisque import BRISQUE

    class Brisque(BRISQUE):
        """The package's BRISQUE with two local fixes.

        numpy 2: some features come out as shape-(1,) arrays, which `float()` no longer accepts;
        we flatten them. Speed: the 7x7 Gaussian local statistics use OpenCV's filter2D with a
        zero border, the same numbers as scipy's convolve2d(..., 'same') at a fraction of the cost.
        """

        def local_mean(self, image, kernel):
            return cv2.filter2D(image, -1, kernel, borderType=cv2.BORDER_CONSTANT)

        def local_deviation(self, image, local_mean, kernel):
            sigma = cv2.filter2D(image**2, -1, kernel, borderType=cv2.BORDER_CONSTANT)
            return np.sqrt(np.abs(local_mean**2 - sigma))

        def calculate_mscn_coefficients(self, image, kernel_size=6, sigma=7 / 6):
            kernel = self.gaussian_kernel2d(kernel_size, sigma=sigma)
            local_mean = self.local_mean(image, kernel)
            local_var = self.local_deviation(image, local_mean, kernel)
            return (image - local_mean) / (local_var + 1 / 255)

        def calculate_brisque_features(self, image, kernel_size=7, sigma=7 / 6):
            features = super().calculate_brisque_features(image, kernel_size, sigma)
            return np.array(
                [float(np.asarray(f).reshape(-1)[0]) for f in features], dtype=np.float64
            )

    return Brisque


class BrisqueQuality:
    kind = "brisque_quality"

    def __init__(self) -> None:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model = _brisque_class()(url=False)

    def score_one(self, image: Image.Image) -> float:
        small = image.copy()
        small.thumbnail((BRISQUE_SIDE, BRISQUE_SIDE), Image.Resampling.BICUBIC)
        with np.errstate(all="ignore"):
            value = float(self.model.score(np.asarray(small, dtype=np.float64) / 255.0))
        return 100.0 - value if np.isfinite(value) else float("-inf")

    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        return np.array([self.score_one(image) for image in images], dtype=np.float64)


class LaionAestheticV2(ClipHeadScorer):
    kind = "laion_v2"
    activation = "none"
    output = "linear"
    weights_option = "--aesthetic-model"
