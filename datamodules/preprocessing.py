"""Decoding any plankton image file and bringing it to one square, fixed-size uint8 array.

Instruments disagree on almost everything: bit depth (8 or 16), mode (greyscale, RGB, palette,
RGBA, CMYK), polarity (ISIIS shadowgraphs are dark on white, UVP and darkfield cameras bright on
black) and aspect ratio (a diatom chain can be 40 times longer than wide). Every image is brought
to the same form once, before it enters the cache.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif"})


class ImageReadError(Exception):
    """An image file that cannot be used; the message is the reason shown to the user."""


@dataclass(frozen=True)
class Preprocessing:
    """Settings that decide the cached pixels; changing one rebuilds the cache.

    Args:
        image_size: side of the square images the models see.
        channels: 1 (greyscale, the default) or 3 (RGB).
        polarity: ``keep`` leaves grey levels as they are; ``auto`` inverts images whose
            background is brighter than mid-grey, so every instrument yields bright objects on a
            dark background.
        max_aspect: images longer than this ratio are widened to it before padding, so that thin
            objects (fibres, chains) keep more than a pixel of width after resizing.
        max_pixels: larger images are not decoded but skipped and listed, so that one huge or
            malicious file (a "decompression bomb": a few hundred KB on disk, gigabytes in
            memory) cannot stop a dataset. PIL's own limit is about 89 million pixels.
    """

    image_size: int = 32
    channels: Literal[1, 3] = 1
    polarity: Literal["keep", "auto"] = "keep"
    max_aspect: float = 4.0
    max_pixels: int = 89_478_485

    def __post_init__(self) -> None:
        if self.image_size < 4:
            raise ValueError(f"image_size must be at least 4, got {self.image_size}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.polarity not in ("keep", "auto"):
            raise ValueError(f"polarity must be 'keep' or 'auto', got {self.polarity!r}")
        if self.max_aspect < 1:
            raise ValueError(f"max_aspect must be >= 1, got {self.max_aspect}")
        if self.max_pixels < self.image_size**2:
            raise ValueError(
                f"max_pixels must be at least image_size squared, got {self.max_pixels}"
            )

    def as_dict(self) -> dict:
        return asdict(self)


@contextmanager
def _pixel_limit_checked_here() -> Iterator[None]:
    """PIL refuses to open images above twice its own limit; ``read_image`` applies the
    configured one instead, from the header, before any pixel is decoded."""
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def read_image(
    path: str | Path, channels: int, max_pixels: int = Preprocessing.max_pixels
) -> np.ndarray:
    """Decode ``path`` into uint8 ``(H, W)`` (greyscale) or ``(H, W, 3)`` (RGB).

    Raises:
        ImageReadError: the file is empty, truncated, not an image, in an unusable mode, or has
            more than ``max_pixels`` pixels.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageReadError("empty file (0 bytes)")
        with _pixel_limit_checked_here(), Image.open(path) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageReadError(
                    f"too large to decode: {width}x{height} = {width * height:,} pixels, above "
                    f"the limit of {max_pixels:,} (the data setting max_image_pixels)"
                )
            image.load()
            array = _to_uint8(image)
    except ImageReadError:
        raise
    except FileNotFoundError:
        raise ImageReadError("file not found") from None
    except UnidentifiedImageError:
        raise ImageReadError("not an image PIL can read") from None
    except (OSError, ValueError, SyntaxError) as error:
        raise ImageReadError(f"unreadable or truncated image ({error})") from None
    if channels == 1 and array.ndim == 3:
        array = np.asarray(Image.fromarray(array, "RGB").convert("L"))
    elif channels == 3 and array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    return array


def _to_uint8(image: Image.Image) -> np.ndarray:
    """Any PIL mode to uint8 grey ``(H, W)`` or RGB ``(H, W, 3)``, keeping true grey levels."""
    mode = image.mode
    if mode in ("L", "RGB"):
        return np.asarray(image)
    if mode == "1":
        return np.asarray(image.convert("L"))
    if mode.startswith("I"):
        # Integer modes hold 16-bit sensor data (PIL opens some 16-bit files as 32-bit "I"):
        # map the full 0-65535 range, never stretch per image, which would erase brightness
        # differences between images that classes can carry.
        values = np.asarray(image).astype(np.float64)
        return np.clip(values / 257.0, 0, 255).round().astype(np.uint8)
    if mode == "F":
        values = np.asarray(image).astype(np.float64)
        if values.max(initial=0) <= 1.0:
            values = values * 255
        return np.clip(values, 0, 255).round().astype(np.uint8)
    if mode in ("P", "PA", "LA", "RGBA", "La", "RGBa"):
        rgba = np.asarray(image.convert("RGBA")).astype(np.float64)
        return _flatten_alpha(rgba[..., :3], rgba[..., 3] / 255.0)
    if mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        return np.asarray(image.convert("RGB"))
    raise ImageReadError(f"unsupported image mode {mode!r}")


def _flatten_alpha(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Composite over the image's own background, so transparency does not add a frame."""
    opaque_border = _border(alpha) > 0.99
    border = _border(rgb)
    if opaque_border.any():
        background = np.median(border[opaque_border], axis=0)
    else:
        # A cut-out object: assume the usual contrast, a background opposite to the object.
        opaque = rgb[alpha > 0.5]
        object_level = opaque.mean() if opaque.size else 0.0
        background = np.full(3, 255.0 if object_level < 128 else 0.0)
    out = rgb * alpha[..., None] + background * (1 - alpha[..., None])
    out = np.clip(out, 0, 255).round().astype(np.uint8)
    if np.ptp(out, axis=2).max(initial=0) == 0:
        return out[..., 0]
    return out


def _border(array: np.ndarray) -> np.ndarray:
    """The outermost rows and columns of an image, as a list of pixels."""
    return np.concatenate([array[0], array[-1], array[1:-1, 0], array[1:-1, -1]])


def background_level(array: np.ndarray) -> np.ndarray:
    """Median of the border pixels, per channel: the image's own background level."""
    return np.median(_border(array), axis=0)


def preprocess(array: np.ndarray, settings: Preprocessing) -> np.ndarray:
    """Pad to a square with the background level, resize, and return uint8 ``(C, S, S)``."""
    background = background_level(array)
    if settings.polarity == "auto" and np.mean(background) > 127.5:
        array = 255 - array
        background = 255 - background
    height, width = array.shape[:2]
    long_side, short_side = max(height, width), min(height, width)
    if long_side > settings.max_aspect * short_side:
        short_target = max(1, round(long_side / settings.max_aspect))
        size = (width, short_target) if width >= height else (short_target, height)
        array = np.asarray(Image.fromarray(array).resize(size, Image.Resampling.BILINEAR))
        height, width = array.shape[:2]
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    square = np.empty((side, side) + array.shape[2:], np.uint8)
    square[...] = np.round(background).astype(np.uint8)
    square[top : top + height, left : left + width] = array
    resized = Image.fromarray(square).resize(
        (settings.image_size, settings.image_size), Image.Resampling.BILINEAR
    )
    out = np.array(resized)  # a writable copy: PIL's buffer is read-only
    return out[None] if out.ndim == 2 else np.ascontiguousarray(out.transpose(2, 0, 1))


def load_preprocessed(path: str | Path, settings: Preprocessing) -> np.ndarray:
    """Read and preprocess one file (the unit of work of the cache builder)."""
    return preprocess(read_image(path, settings.channels, settings.max_pixels), settings)
