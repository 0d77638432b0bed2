"""Decoding any image file into RGB, and the resize/crop/normalise step a backbone asks for.

Workers return uint8 tensors (4x less inter-process traffic than float); normalisation runs on
the whole batch in the main process, on the device, with the same operations as torchvision's
``ToTensor`` + ``Normalize`` so that results match a plain timm/torchvision pipeline bit for bit.

The PIL path (decode, filter, resize, crop) needs no PyTorch: :meth:`Preprocess.load_array` gives the
same pixels as NumPy, for the extraction that runs without importing it (:mod:`featcache.extraction.lean`).
PyTorch is imported only by what returns tensors.
"""

from __future__ import annotations

import io
import math
import re
import warnings
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
import simplejpeg
from PIL import Image, ImageOps

from featcache.options import Resampler, ResizeMode, ViewCount
from featcache.recipes import named_settings

if TYPE_CHECKING:
    import torch

RESIZE_MODES = tuple(m.value for m in ResizeMode)
RESAMPLERS = tuple(r.value for r in Resampler)
CROP_CORNERS = ("round", "floor")
_EXIF_ORIENTATION = 0x0112
# The dihedral group of the square, in the order --views K takes them: 2 = the identity and a
# mirror, 4 = both mirrors and the half turn (every view keeps the image's own axes), 8 = all.
# Dermoscopy has no natural orientation, so each is as plausible a photo as the original.
VIEWS = ("identity", "hflip", "vflip", "rot180", "rot90", "rot270", "transpose", "antitranspose")
VIEW_COUNTS = tuple(int(v.value) for v in ViewCount)

# the interpolations by name, as PIL's filters (torchvision's own mapping of its InterpolationMode)
_PIL_FILTERS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


# preprocessing settings added after the first entries were named, at the default they had before there was a
# choice: left out of the fingerprint there, so those entries keep their names (featcache.recipes.named_settings)
PREPROCESS_SETTINGS_ADDED = {"resize_mode": "crop", "filters": (), "resampler": "pil", "crop_corner": "round"}


@dataclass(frozen=True)
class Preprocess:
    """What turns a decoded image into the backbone's input; part of the cache fingerprint."""

    crop_size: int
    resize_size: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # JPEG DCT-domain downscaling (PIL draft) before the resize: much faster on large photos;
    # it changes pixels slightly, which is why it is part of the fingerprint.
    jpeg_draft: bool = True
    # "crop": resize the short side, centre-crop (the backbone's own eval transform);
    # "full": the whole image squeezed to a square (nothing cut, aspect changed);
    # "pad": the whole image padded to a square with black, then resized (nothing cut or squeezed).
    # A centre crop can cut off a lesion that reaches the border.
    resize_mode: str = "crop"
    # --preprocess: image filters run on the decoded image, in this order (featcache.data.preprocessing)
    filters: tuple[str, ...] = ()
    # --resampler: "pil" (timm's eval transform, bit for bit) or "torch" (PyTorch's uint8 SIMD resize of
    # a tensor decoded straight from the JPEG: 1.7 ms less per 600x450 photo, pixels within 3 levels)
    resampler: str = "pil"
    # where a centre crop's corner falls when the margin is odd: "round" (half to even, torchvision's and so
    # timm's and open_clip's) or "floor" (Hugging Face transformers' image processors): one pixel apart
    crop_corner: str = "round"

    def __post_init__(self) -> None:
        from featcache.data.preprocessing import checked_filters

        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"--resize {self.resize_mode}: choose one of {', '.join(RESIZE_MODES)}")
        if self.resampler not in RESAMPLERS:
            raise ValueError(f"--resampler {self.resampler}: choose one of {', '.join(RESAMPLERS)}")
        if self.crop_corner not in CROP_CORNERS:
            raise ValueError(f"crop_corner {self.crop_corner!r}: one of {', '.join(CROP_CORNERS)}")
        object.__setattr__(self, "filters", checked_filters(self.filters))

    @classmethod
    def from_crop_pct(
        cls,
        crop_size: int,
        crop_pct: float,
        interpolation: str,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        jpeg_draft: bool = True,
    ) -> Preprocess:
        # Same rule as timm's eval transform: resize the short side to floor(size / crop_pct).
        return cls(
            crop_size=int(crop_size),
            resize_size=int(math.floor(crop_size / crop_pct)),
            interpolation=str(interpolation),
            mean=tuple(float(m) for m in mean),  # type: ignore[arg-type]
            std=tuple(float(s) for s in std),  # type: ignore[arg-type]
            jpeg_draft=jpeg_draft,
        )

    def to_dict(self) -> dict:
        """The fields that name an entry's preprocessing (those added since, at their first default, left out)."""
        fields = named_settings(asdict(self), PREPROCESS_SETTINGS_ADDED)
        if "filters" in fields:
            fields["filters"] = list(fields["filters"])
        return fields

    @classmethod
    def from_fields(cls, fields: dict) -> Preprocess:
        """The preprocessing :meth:`to_dict` wrote (an entry's ``fingerprint_inputs["preprocess"]``)."""
        fields = dict(fields)
        for key in ("mean", "std", "filters"):
            if key in fields:
                fields[key] = tuple(fields[key])
        return cls(**fields)

    @property
    def decode_min_side(self) -> int:
        """The smallest side a JPEG draft decode may shrink the image to without losing detail."""
        return self.resize_size if self.resize_mode == "crop" else self.crop_size

    def load(self, content: bytes | np.ndarray) -> torch.Tensor:
        """File bytes (or an array's pixels) to the backbone's 3 x crop x crop uint8 input: decode,
        filter, resize. Raises ``ValueError`` for content that is not a decodable image."""
        if self.resampler == Resampler.torch and not self.filters and not isinstance(content, np.ndarray):
            tensor = decode_jpeg_tensor(content, self.decode_min_side if self.jpeg_draft else None)
            if tensor is not None:
                return self._resize_tensor(tensor)
        if self.resampler == Resampler.torch:
            return self.to_uint8(array_to_rgb(content) if isinstance(content, np.ndarray) else
                                 decode_rgb(content, self.decode_min_side if self.jpeg_draft else None))
        import torch

        return torch.from_numpy(self.load_array(content))

    def load_array(self, content: bytes | np.ndarray) -> np.ndarray:
        """:meth:`load` as a 3 x crop x crop uint8 array, without PyTorch (the ``pil`` resampler only)."""
        if self.resampler != Resampler.pil:
            raise ValueError(f"--resampler {self.resampler} resizes with PyTorch: load() it")
        if isinstance(content, np.ndarray):
            return self.to_array(array_to_rgb(content))
        return self.to_array(decode_rgb(content, self.decode_min_side if self.jpeg_draft else None))

    def to_uint8(self, image: Image.Image) -> torch.Tensor:
        """Filter (``filters``), then resize (and crop or pad, by ``resize_mode``) to a 3 x crop x crop
        uint8 tensor."""
        import torch

        if self.resampler == Resampler.torch:
            from featcache.data.preprocessing import apply_filters

            return self._resize_tensor(torch.from_numpy(_chw(apply_filters(image, self.filters))))
        return torch.from_numpy(self.to_array(image))

    def to_array(self, image: Image.Image) -> np.ndarray:
        """:meth:`to_uint8` by PIL alone (the ``pil`` resampler): the pixels torchvision's ``resize`` and
        ``center_crop`` make of a PIL image, as a 3 x crop x crop uint8 array (tested equal)."""
        from featcache.data.preprocessing import apply_filters

        image = apply_filters(image, self.filters)
        resample = _PIL_FILTERS[self.interpolation]
        if self.resize_mode == "pad":
            side = max(image.size)
            square = Image.new("RGB", (side, side))
            square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
            image = square
        if self.resize_mode in ("full", "pad"):
            return _chw(_resized(image, (self.crop_size, self.crop_size), resample))
        width, height = image.size  # the short side to resize_size, the long one scaled and truncated
        short, long = min(width, height), max(width, height)
        new_long = int(self.resize_size * long / short)
        image = _resized(image, (self.resize_size, new_long) if width <= height else (new_long, self.resize_size),
                         resample)
        return _chw(_center_crop(image, self.crop_size, self.crop_corner))

    def _resize_tensor(self, image: torch.Tensor) -> torch.Tensor:
        """``to_uint8``'s geometry on a 3 x H x W uint8 tensor, by PyTorch's antialiased uint8 resize."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as TF2

        interpolation = InterpolationMode(self.interpolation)
        if self.resize_mode == "pad":  # black borders, the image centred, as the PIL path pastes it
            height, width = image.shape[-2:]
            side = max(height, width)
            top, left = (side - height) // 2, (side - width) // 2
            image = TF2.pad(image, [left, top, side - width - left, side - height - top], fill=0)
        if self.resize_mode in ("full", "pad"):
            return TF2.resize(image, [self.crop_size, self.crop_size], interpolation=interpolation, antialias=True)
        image = TF2.resize(image, self.resize_size, interpolation=interpolation, antialias=True)
        if self.crop_corner == "round":
            return TF2.center_crop(image, [self.crop_size, self.crop_size])  # the batch's stack copies it
        side = self.crop_size
        height, width = image.shape[-2:]
        if side > height or side > width:  # padded as torchvision pads, then cropped at the floored corner
            image = TF2.pad(image, [(side - width) // 2 if side > width else 0, (side - height) // 2 if side > height
                                    else 0, (side - width + 1) // 2 if side > width else 0,
                                    (side - height + 1) // 2 if side > height else 0], fill=0)
            height, width = image.shape[-2:]
        top, left = crop_corner(height, side, self.crop_corner), crop_corner(width, side, self.crop_corner)
        return image[..., top:top + side, left:left + side]

    def normalize(self, batch_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 NxCxHxW -> float32 normalised, exactly as ToTensor() + Normalize() compute it."""
        import torch

        mean = torch.tensor(self.mean, device=batch_uint8.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=batch_uint8.device).view(1, 3, 1, 1)
        return batch_uint8.float().div_(255).sub_(mean).div_(std)


def _chw(image: Image.Image) -> np.ndarray:
    """An RGB PIL image as a 3 x H x W uint8 array (a view of one copy, as torchvision's pil_to_tensor)."""
    return np.array(image, dtype=np.uint8, copy=True).reshape(image.height, image.width, 3).transpose(2, 0, 1)


def _resized(image: Image.Image, size: tuple[int, int], resample: Image.Resampling) -> Image.Image:
    """``image`` at ``size`` (width, height); untouched when it already has that size (as torchvision)."""
    return image if image.size == size else image.resize(size, resample)


def crop_corner(length: int, side: int, rule: str = "round") -> int:
    """Where a centre crop of ``side`` starts along an axis of ``length``: the margin halved, rounded half to
    even (``round``: torchvision) or truncated (``floor``: transformers' image processors)."""
    half = (length - side) / 2.0
    return int(round(half)) if rule == "round" else int(half)


def _center_crop(image: Image.Image, side: int, rule: str = "round") -> Image.Image:
    """torchvision's ``center_crop`` of a PIL image to side x side: black padding first where the image is
    smaller, then the crop whose corner is placed by ``rule`` (:func:`crop_corner`)."""
    width, height = image.size
    if side > width or side > height:
        padded = Image.new(image.mode, (max(side, width), max(side, height)))
        padded.paste(image, ((side - width) // 2 if side > width else 0, (side - height) // 2 if side > height else 0))
        image, (width, height) = padded, padded.size
        if (width, height) == (side, side):
            return image
    top, left = crop_corner(height, side, rule), crop_corner(width, side, rule)
    return image.crop((left, top, left + side, top + side))


def load_for_each(content: bytes | np.ndarray, preprocesses: list[Preprocess]) -> list[torch.Tensor]:
    """``[p.load(content) for p in preprocesses]``, with the file decoded once for all that decode it alike
    (the same PIL path and the same JPEG draft scale): several backbones fed from one decode. Raises
    ``ValueError`` as :meth:`Preprocess.load` does."""
    if isinstance(content, np.ndarray) or len(preprocesses) == 1:
        return [p.load(content) for p in preprocesses]
    decoded: dict[tuple, Image.Image] = {}
    out = []
    for p in preprocesses:
        if p.resampler == Resampler.torch and not p.filters:  # its own JPEG decoder (simplejpeg)
            out.append(p.load(content))
            continue
        min_side = p.decode_min_side if p.jpeg_draft else None
        key = _decode_key(content, min_side)
        if key not in decoded:
            decoded[key] = decode_rgb(content, min_side)
        out.append(p.to_uint8(decoded[key]))
    return out


def _decode_key(content: bytes, min_side: int | None) -> tuple:
    """What decides :func:`decode_rgb`'s pixels: whether a JPEG draft is asked for and at which scale
    (PIL's draft rule, as in :func:`decode_jpeg_tensor`). Two requests with the same key decode alike."""
    if not min_side:
        return ("plain",)
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(content)
    except (ValueError, RuntimeError):
        return ("draft", min_side)  # not a plain JPEG: keyed by the request itself, never shared wrongly
    scale = min(width // min_side, height // min_side)
    return ("draft", next((s for s in (8, 4, 2) if scale >= s), 1))


_VIEW_TRANSFORMS = {  # on the last two axes (height, width); ``xp`` is NumPy or PyTorch (same functions)
    "identity": lambda xp, x: x,
    "hflip": lambda xp, x: xp.flip(x, (-1,)),
    "vflip": lambda xp, x: xp.flip(x, (-2,)),
    "rot180": lambda xp, x: xp.flip(x, (-2, -1)),
    "rot90": lambda xp, x: xp.rot90(x, 1, (-2, -1)),
    "rot270": lambda xp, x: xp.rot90(x, -1, (-2, -1)),
    "transpose": lambda xp, x: xp.swapaxes(x, -2, -1),
    "antitranspose": lambda xp, x: xp.flip(xp.swapaxes(x, -2, -1), (-2, -1)),
}


def apply_view(batch: torch.Tensor | np.ndarray, view: str) -> torch.Tensor | np.ndarray:
    """One of :data:`VIEWS` applied to a square N x C x H x W batch, a tensor or an array (exact: pixels
    are only moved)."""
    if isinstance(batch, np.ndarray):
        return _VIEW_TRANSFORMS[view](np, batch)
    import torch

    return _VIEW_TRANSFORMS[view](torch, batch)


def views_for(count: int) -> tuple[str, ...]:
    if count not in VIEW_COUNTS:
        raise ValueError(f"--views {count}: choose one of {', '.join(map(str, VIEW_COUNTS))} "
                         f"(views are taken in the order {', '.join(VIEWS)})")
    return VIEWS[:count]


def decode_rgb(data: bytes, min_side: int | None = None) -> Image.Image:
    """Decode image bytes to an RGB PIL image with EXIF orientation applied.

    Handles grayscale, palette, alpha (flattened onto white), CMYK and 16-bit images.
    ``min_side`` enables JPEG draft decoding that keeps both sides >= ``min_side``.
    Raises ``ValueError`` with a plain reason for files that are not decodable images.
    """
    if not data:
        raise ValueError("empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
            if min_side and image.format == "JPEG":
                image.draft("RGB", (min_side, min_side))
            image.load()
        except Image.DecompressionBombError as exc:
            raise ValueError(f"image too large to decode safely ({exc})") from None
        except (OSError, SyntaxError, Image.UnidentifiedImageError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            reason = re.sub(r" ?<[^<>]* at 0x[0-9a-fA-F]+>", "", reason)  # PIL names its in-memory file by address
            raise ValueError(f"not a decodable image ({reason})") from None
        image = ImageOps.exif_transpose(image)
    return to_rgb(image)


def decode_jpeg_tensor(data: bytes, min_side: int | None = None) -> torch.Tensor | None:
    """A plain JPEG (YCbCr or grey, no EXIF rotation) decoded by libjpeg-turbo (simplejpeg) straight into
    a 3 x H x W uint8 tensor, DCT-scaled by PIL's draft rule for ``min_side``: the same pixels as
    :func:`decode_rgb` (tested) without PIL's copies. ``None`` for anything else (other formats and colour
    spaces, EXIF-rotated or oversized images): the caller decodes it with :func:`decode_rgb`, which also
    gives the reasons for files that are not images."""
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)  # the header only, no PIL
    except (ValueError, RuntimeError):
        return None
    if colorspace not in ("YCbCr", "Gray") or width * height > (Image.MAX_IMAGE_PIXELS or math.inf):
        return None  # CMYK, Adobe RGB and decompression bombs take PIL's path, with its checks
    if b"Exif\x00\x00" in data[:65536] and _exif_orientation(data) != 1:
        return None  # rotated: PIL applies the EXIF orientation
    if min_side:  # PIL's draft rule (JpegImageFile.draft): the largest of 1/8, 1/4, 1/2 keeping min_side
        scale = min(width // min_side, height // min_side)
        step = next((s for s in (8, 4, 2) if scale >= s), 1)
        width, height = (width + step - 1) // step, (height + step - 1) // step
    try:
        pixels = simplejpeg.decode_jpeg(data, "RGB", min_height=height, min_width=width)
    except (ValueError, RuntimeError):
        return None
    if pixels.shape[:2] != (height, width):  # not PIL's scale: leave it to PIL
        return None
    import torch

    return torch.from_numpy(pixels).permute(2, 0, 1)


def _exif_orientation(data: bytes) -> int:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return int(Image.open(io.BytesIO(data)).getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # unreadable EXIF: PIL's own path decides
        return 0


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB without wrapping or clipping high bit depths."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if (mode.startswith("I;16") or array.max() > 255) else 255.0
        array = np.clip(np.rint(array * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def array_to_rgb(array: np.ndarray) -> Image.Image:
    """An image stored in an array (HxW or HxWxC, as in MedMNIST .npz files) to RGB."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {array.dtype}")
    return to_rgb(Image.fromarray(array))
