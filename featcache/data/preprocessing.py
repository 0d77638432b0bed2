"""Image filters applied before the backbone's own transform (``extract --preprocess``).

- ``hair-removal``: DullRazor (Lee et al. 1997) as usually implemented: a morphological black-hat
  finds thin dark structures, a threshold makes them a mask, and inpainting fills them (OpenCV).
- ``color-constancy``: Shades of Gray (Finlayson & Trezzi 2004) with Minkowski p = 6, the colour
  normalisation ISIC challenge winners used: the illuminant is the p-norm mean of each channel,
  and each channel is divided by it.

- ``dataset-norm``: the backbone's input normalised with the per-channel mean and standard deviation
  of the dataset's own images (after the filters, resize and crop) instead of the backbone's
  (ImageNet's). The statistics are computed once per dataset and kept beside its entries
  (``featcache.extraction.extract.dataset_norm_stats``); images of another dataset (a test set, new images to
  predict) are normalised with the training dataset's statistics, never their own.

They run in the order given, on the decoded image, and are part of the entry's fingerprint.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

FILTERS = ("hair-removal", "color-constancy", "dataset-norm")
DATASET_NORM = "dataset-norm"
MINKOWSKI_P = 6


def checked_filters(text: str | tuple[str, ...] | None) -> tuple[str, ...]:
    """``"hair-removal,color-constancy"`` -> a tuple of filter names; anything else is a ValueError
    naming the valid ones."""
    names = tuple(n.strip() for n in text.split(",") if n.strip()) if isinstance(text, str) else tuple(text or ())
    for name in names:
        if name not in FILTERS:
            raise ValueError(f"--preprocess {name!r}: choose from {', '.join(FILTERS)} (a comma list, in order)")
    if len(set(names)) != len(names):
        raise ValueError(f"--preprocess {','.join(names)}: a filter is named twice")
    if DATASET_NORM in names[:-1]:
        raise ValueError(f"--preprocess {','.join(names)}: {DATASET_NORM} must come last (it replaces the "
                         "backbone's normalisation, after the image filters)")
    return names


def shades_of_gray(rgb: np.ndarray, p: int = MINKOWSKI_P) -> np.ndarray:
    """Colour constancy: divide each channel by its p-norm mean, scaled so grey stays grey."""
    pixels = rgb.astype(np.float64)
    illuminant = np.power(np.mean(np.power(pixels, p), axis=(0, 1)), 1.0 / p)
    illuminant = illuminant / max(np.linalg.norm(illuminant), 1e-12)
    corrected = pixels / (illuminant * np.sqrt(3) + 1e-12)
    return np.clip(corrected, 0, 255).astype(np.uint8)


def remove_hair(rgb: np.ndarray) -> np.ndarray:
    """DullRazor: black-hat with a kernel of ~1/25 of the short side, threshold, Telea inpainting."""
    try:
        import cv2
    except ImportError:
        raise ValueError("--preprocess hair-removal needs OpenCV: pip install 'featcache[preprocess]'") from None
    side = max(9, (min(rgb.shape[:2]) // 25) | 1)
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    blackhat = cv2.morphologyEx(gray, cv2.MORPH_BLACKHAT, cv2.getStructuringElement(cv2.MORPH_RECT, (side, side)))
    _, mask = cv2.threshold(blackhat, 10, 255, cv2.THRESH_BINARY)
    return cv2.inpaint(np.ascontiguousarray(rgb), mask, 3, cv2.INPAINT_TELEA)


def apply_filters(image: Image.Image, filters: tuple[str, ...]) -> Image.Image:
    if not filters:
        return image
    pixel_filters = [name for name in filters if name != DATASET_NORM]  # that one acts on the tensor
    if not pixel_filters:
        return image
    rgb = np.asarray(image.convert("RGB"))
    for name in pixel_filters:
        rgb = remove_hair(rgb) if name == "hair-removal" else shades_of_gray(rgb)
    return Image.fromarray(rgb)
