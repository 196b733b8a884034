"""Views of cached uint8 images, augmented a whole batch at a time on any device: the steps, the
``Recipe`` that orders them, and the evaluation view. Each method's training view is a recipe
that lives beside the method (``lightning_modules``); the data layer knows none of them.

A view takes a uint8 batch ``(B, C, S, S)`` (or one image ``(C, S, S)``) on the CPU or the GPU and
returns float32 tensors on the same device, scaled to [-1, 1] (the diffusion model's range), so
features of all methods see the same pixel scale. Every random parameter is drawn per image with
torch's RNG on the input's device, so ``torch.manual_seed`` makes a call repeatable, and no step
loops over images in Python, goes through PIL or waits on the device.

Plankton have no canonical orientation: the training views flip and rotate by multiples of 90
degrees, which keeps every pixel (no interpolation). The steps reproduce lightly's transforms
(``SimCLRTransform``, ``DINOTransform``) with their default probabilities and strengths; colour
jitter is reduced to brightness and contrast for greyscale. Where the batched steps differ from
lightly's per-image PIL pipeline:

- lightly's pipeline rounds to uint8 after every PIL step; here the image stays float32 in [0, 1];
- colour jitter follows torchvision's tensor kernels (hue as a shift in HSV, saturation and
  contrast as blends with the greyscale image), not PIL's ImageEnhance; factors, the random order
  of the four adjustments and the decision to jitter at all are still drawn per image;
- a crop is resampled by ``grid_sample`` without antialiasing (only DINO's local crops shrink, by
  at most about 1.5x), and bicubic uses torch's kernel (a = -0.75) rather than PIL's (a = -0.5);
- the blur is a true Gaussian truncated at three times the largest sigma, where PIL approximates
  one with box blurs (both replicate the edge pixels).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

View = Callable[[torch.Tensor], torch.Tensor | list[torch.Tensor]]

# torchvision's rgb_to_grayscale weights; contrast, saturation and random greyscale all use them.
# Constants stay Python numbers: a tensor built from a list would be copied to the device at every
# call, and such a copy waits for the device.
_GREY_WEIGHTS = (0.2989, 0.587, 0.114)
# ImageOps.solarize's default threshold (128 of 255), which lightly's RandomSolarization keeps.
_SOLARIZE_THRESHOLD = 128 / 255
_CROP_TRIES = 10
# The square ratio range torchvision's and lightly's crops default to.
_DEFAULT_RATIO = (3 / 4, 4 / 3)


def _per_image(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def _draw(batch: int, device: torch.device, low: float, high: float) -> torch.Tensor:
    return torch.empty(batch, device=device).uniform_(low, high)


def _coin(batch: int, device: torch.device, p: float) -> torch.Tensor:
    return torch.rand(batch, device=device) < p


# -- geometry ---------------------------------------------------------------------------------


def _dihedral(images: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Image ``b`` turned by dihedral element ``index[b]`` (0-3: rotations by k * 90 degrees,
    4-7: the same after a horizontal flip), as one gather, so pixels move and are never mixed."""
    batch, channels, size, _ = images.shape
    pixels = torch.arange(size * size, device=images.device).view(size, size)
    tables = torch.stack(
        [torch.rot90(grid, k, dims=(0, 1)) for grid in (pixels, pixels.flip(1)) for k in range(4)]
    ).view(8, -1)
    source = tables[index].unsqueeze(1).expand(batch, channels, -1)
    return images.reshape(batch, channels, -1).gather(2, source).view(images.shape)


def _random_dihedral(images: torch.Tensor) -> torch.Tensor:
    """One of the 8 flips and 90-degree rotations per image, uniformly: the distribution of the
    old per-image horizontal flip followed by a uniform rot90, and of lightly's horizontal flip,
    vertical flip and 90-degree rotation each with probability 0.5."""
    index = torch.randint(8, (images.shape[0],), device=images.device)
    return _dihedral(images, index)


def _central_box(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
    """torchvision's fallback crop size (height, width) when no random candidate fits."""
    in_ratio = width / height
    if in_ratio < ratio[0]:
        return int(round(width / ratio[0])), width
    if in_ratio > ratio[1]:
        return height, int(round(height * ratio[1]))
    return height, width


def _sample_crop_boxes(
    batch: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    device: torch.device,
) -> torch.Tensor:
    """``(batch, 4)`` float boxes (top, left, height, width) drawn by torchvision's
    RandomResizedCrop rule: area fraction uniform in ``scale``, log aspect ratio uniform in
    ``log(ratio)``, integer sides, the first of ten candidates that fits, else the central crop.
    All candidates are drawn at once so that no image waits for another's retries."""
    area = _draw(batch * _CROP_TRIES, device, *scale).view(batch, _CROP_TRIES) * (height * width)
    aspect = torch.exp(
        _draw(batch * _CROP_TRIES, device, math.log(ratio[0]), math.log(ratio[1]))
    ).view(batch, _CROP_TRIES)
    # torch.round, like Python's round, rounds halves to even.
    widths = torch.sqrt(area * aspect).round()
    heights = torch.sqrt(area / aspect).round()
    fits = (widths > 0) & (widths <= width) & (heights > 0) & (heights <= height)
    first = fits.int().argmax(dim=1, keepdim=True)  # argmax returns the first of tied maxima
    found = fits.any(dim=1)
    central_h, central_w = _central_box(height, width, ratio)
    h = torch.where(found, heights.gather(1, first).squeeze(1), float(central_h))
    w = torch.where(found, widths.gather(1, first).squeeze(1), float(central_w))
    # Float rounding can carry rand() * n up to n itself, hence the clamp.
    top = (torch.rand(batch, device=device) * (height - h + 1)).floor().clamp(max=height - h)
    left = (torch.rand(batch, device=device) * (width - w + 1)).floor().clamp(max=width - w)
    top = torch.where(found, top, float((height - central_h) // 2))
    left = torch.where(found, left, float((width - central_w) // 2))
    return torch.stack([top, left, h, w], dim=1)


def _random_resized_crop(
    images: torch.Tensor,
    size: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    mode: str = "bilinear",
) -> torch.Tensor:
    """Float images ``(B, C, H, W)`` cropped to per-image boxes from ``_sample_crop_boxes`` and
    resized to ``(size, size)`` by one ``grid_sample``. Output pixel k samples the crop at
    ``left + (k + 0.5) * width / size - 0.5``, the position torchvision's resize uses."""
    batch, channels, height, width = images.shape
    top, left, h, w = _sample_crop_boxes(batch, height, width, scale, ratio, images.device).T
    theta = torch.zeros(batch, 2, 3, device=images.device)
    theta[:, 0, 0] = w / width
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    grid = F.affine_grid(theta, [batch, channels, size, size], align_corners=False)
    return F.grid_sample(images, grid, mode=mode, padding_mode="border", align_corners=False)


# -- colour -----------------------------------------------------------------------------------


def _grey(images: torch.Tensor) -> torch.Tensor:
    if images.shape[1] == 1:
        return images
    red, green, blue = images.unbind(dim=1)
    weight_r, weight_g, weight_b = _GREY_WEIGHTS
    return (weight_r * red + weight_g * green + weight_b * blue).unsqueeze(1)


def _blend(images: torch.Tensor, other: torch.Tensor | float, factor: torch.Tensor) -> torch.Tensor:
    factor = _per_image(factor)
    return (factor * images + (1 - factor) * other).clamp(0, 1)


def _adjust_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_hue (hue shifted by ``shift`` turns in HSV) with a shift per image,
    via the closed-form HSV-to-RGB map ``v - c * clamp(min(k, 4 - k), 0, 1)``."""
    red, green, blue = images.unbind(dim=1)
    value = images.amax(dim=1)
    chroma = value - images.amin(dim=1)
    divisor = torch.where(chroma > 0, chroma, 1.0)
    sector = torch.where(
        value == red,
        (green - blue) / divisor,
        torch.where(value == green, 2 + (blue - red) / divisor, 4 + (red - green) / divisor),
    )
    hue = (sector / 6 + shift.view(-1, 1, 1)) % 1
    k = torch.stack([(offset + 6 * hue) % 6 for offset in (5, 3, 1)], dim=1)
    return value.unsqueeze(1) - chroma.unsqueeze(1) * torch.minimum(k, 4 - k).clamp(0, 1)


def _colour_jitter(
    images: torch.Tensor,
    p: float,
    brightness: float,
    contrast: float,
    saturation: float,
    hue: float,
) -> torch.Tensor:
    """``RandomApply([ColorJitter(brightness, contrast, saturation, hue)], p)`` per image: the
    factor ranges of torchvision, and its random order of the adjustments, drawn per image.
    Brightness, contrast and saturation are torchvision's blends of the image with black, its
    mean grey level and its greyscale image, so each step is one blend whose target each image
    picks; only hue, when jittered, is computed at every step for the whole batch."""
    batch, device = images.shape[0], images.device
    ranges = {
        "brightness": (brightness, max(0.0, 1 - brightness), 1 + brightness),
        "contrast": (contrast, max(0.0, 1 - contrast), 1 + contrast),
        "saturation": (saturation, max(0.0, 1 - saturation), 1 + saturation),
        "hue": (hue, -hue, hue),
    }
    kinds = [kind for kind, (strength, _, _) in ranges.items() if strength > 0]
    if not kinds:
        return images
    # Column of each adjustment in ``factors``; -1 matches no image.
    column = {kind: kinds.index(kind) if kind in kinds else -1 for kind in ranges}
    factors = torch.stack([_draw(batch, device, *ranges[kind][1:]) for kind in kinds], dim=1)
    applied = _coin(batch, device, p)
    order = torch.rand(batch, len(kinds), device=device).argsort(dim=1)
    jittered = images
    for step in range(len(kinds)):
        chosen = _per_image(order[:, step])
        factor = factors.gather(1, order[:, step : step + 1]).squeeze(1)
        grey = _grey(jittered)
        mean = grey.mean(dim=(1, 2, 3), keepdim=True)
        target = torch.where(chosen == column["contrast"], mean, grey)
        target = torch.where(chosen == column["brightness"], 0.0, target)
        blended = _blend(jittered, target, factor)
        if hue > 0:
            hued = _adjust_hue(jittered, factor)
            blended = torch.where(chosen == column["hue"], hued, blended)
        jittered = blended
    return torch.where(_per_image(applied), jittered, images)


def _random_grayscale(images: torch.Tensor, p: float) -> torch.Tensor:
    """torchvision's RandomGrayscale: the greyscale image repeated on every channel."""
    applied = _coin(images.shape[0], images.device, p)
    return torch.where(_per_image(applied), _grey(images).expand_as(images), images)


# -- filters ----------------------------------------------------------------------------------


def _blur_matrices(weights: torch.Tensor, length: int) -> torch.Tensor:
    """``(B, length, length)`` matrices that convolve a line with each image's kernel
    ``weights`` (``(B, 2r + 1)``), edges replicated as PIL does."""
    radius = weights.shape[1] // 2
    taps = torch.arange(-radius, radius + 1, device=weights.device)
    positions = torch.arange(length, device=weights.device)
    sources = (positions.unsqueeze(1) + taps).clamp(0, length - 1)
    picks = (sources.unsqueeze(2) == positions).to(weights.dtype)
    return torch.einsum("bk,ikj->bij", weights, picks)


def _gaussian_blur(images: torch.Tensor, p: float, sigmas: tuple[float, float]) -> torch.Tensor:
    """lightly's GaussianBlur per image: applied with probability ``p``, sigma uniform in
    ``sigmas``. The separable blur is two batched matrix products, each image with its own
    kernel, rather than a depthwise convolution with one group per image and channel, which is
    slow on CPUs; the kernel spans three of the largest sigmas."""
    batch, device = images.shape[0], images.device
    applied = _coin(batch, device, p)
    sigma = _draw(batch, device, *sigmas)
    radius = math.ceil(3 * sigmas[1])
    taps = torch.arange(-radius, radius + 1, device=device, dtype=images.dtype)
    weights = torch.exp(-0.5 * (taps / sigma.unsqueeze(1)) ** 2)
    weights = weights / weights.sum(dim=1, keepdim=True)
    down = _blur_matrices(weights, images.shape[2]).unsqueeze(1)
    across = _blur_matrices(weights, images.shape[3]).unsqueeze(1)
    blurred = down @ images @ across.transpose(-1, -2)
    # Selected rather than blurred with a unit kernel, which TF32 products would not keep exact.
    return torch.where(_per_image(applied), blurred, images)


def _solarize(images: torch.Tensor, p: float) -> torch.Tensor:
    """lightly's RandomSolarization: with probability ``p``, pixels at or above the threshold
    are inverted."""
    applied = _per_image(_coin(images.shape[0], images.device, p))
    return torch.where(applied & (images >= _SOLARIZE_THRESHOLD), 1 - images, images)


# -- views ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """One augmented view of a batch, steps in lightly's order: crop, flips and rotations,
    colour jitter, greyscale, blur, solarization. ``size=None`` keeps the whole image, so
    without a crop the pixels are only moved, never resampled."""

    size: int | None = None
    scale: tuple[float, float] = (1.0, 1.0)
    ratio: tuple[float, float] = _DEFAULT_RATIO
    interpolation: str = "bilinear"
    dihedral: bool = True
    jitter_prob: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    grey_prob: float = 0.0
    blur_prob: float = 0.0
    sigmas: tuple[float, float] = (0.1, 2.0)
    solarize_prob: float = 0.0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255
        if self.size is not None:
            # Bicubic overshoots; clamping keeps the later steps' [0, 1] assumption.
            x = _random_resized_crop(x, self.size, self.scale, self.ratio, self.interpolation)
            x = x.clamp(0, 1)
        if self.dihedral:
            x = _random_dihedral(x)
        if self.jitter_prob > 0:
            x = _colour_jitter(
                x, self.jitter_prob, self.brightness, self.contrast, self.saturation, self.hue
            )
        if self.grey_prob > 0:
            x = _random_grayscale(x, self.grey_prob)
        if self.blur_prob > 0:
            x = _gaussian_blur(x, self.blur_prob, self.sigmas)
        if self.solarize_prob > 0:
            x = _solarize(x, self.solarize_prob)
        if self.blur_prob > 0 or self.hue > 0:
            x = x.clamp(0, 1)  # only the blur's and hue's rounding can step past 1
        # On x / 255, x * 2 - 1 equals x / 127.5 - 1 bit for bit for every uint8 value.
        return x * 2 - 1


@dataclass(frozen=True)
class Views:
    """Applies each ``(recipe, count)`` part, ``count`` independent views of the batch each; a
    part with several views runs once on the repeated batch. Returns one tensor, or a list of
    views when ``as_list``. A single image ``(C, S, S)`` is augmented as a batch of one."""

    parts: tuple[tuple[Recipe, int], ...]
    as_list: bool = True

    def __call__(self, images: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if images.dtype != torch.uint8:
            raise TypeError(f"views take uint8 images, got {images.dtype}")
        single = images.dim() == 3
        batch = images.unsqueeze(0) if single else images
        views: list[torch.Tensor] = []
        for recipe, count in self.parts:
            if count > 0:
                repeated = batch.repeat(count, 1, 1, 1) if count > 1 else batch
                views += recipe(repeated).chunk(count)
        if single:
            views = [view.squeeze(0) for view in views]
        return views if self.as_list else views[0]


def colour_recipe(channels: int, strength: float) -> dict[str, float]:
    """lightly's colour defaults at ``strength`` (its ``cj_strength``): brightness and contrast
    0.8, saturation 0.4 and hue 0.1 as the suite configured them, greyscale with probability 0.2;
    a greyscale image gets only brightness and contrast."""
    grey = channels == 1
    return {
        "jitter_prob": 0.8,
        "brightness": 0.8 * strength,
        "contrast": 0.8 * strength,
        "saturation": 0.0 if grey else 0.4 * strength,
        "hue": 0.0 if grey else 0.1 * strength,
        "grey_prob": 0.0 if grey else 0.2,
    }


def blur_sigmas(image_size: int) -> tuple[float, float]:
    """Blur sigmas that grow with the image, so that a blur removes a similar share of detail."""
    return (0.1, max(0.2, image_size / 64))


# The largest image side at which the self-supervised views follow lightly's CIFAR-10 recipe
# rather than its ImageNet one (no blur; for DINO, no local crops).
CIFAR_RECIPE_MAX_SIZE = 32


def small_image_blur(image_size: int, prob: float) -> float:
    """``prob``, or none at ``CIFAR_RECIPE_MAX_SIZE`` and below: lightly's CIFAR-10 benchmark
    turns the blur off at 32 px, where even the smallest blur erases most of an image's
    detail."""
    return 0.0 if image_size <= CIFAR_RECIPE_MAX_SIZE else prob


def eval_view(image_size: int, channels: int) -> View:
    """Deterministic: the cached pixels, scaled."""
    return Views(((Recipe(dihedral=False), 1),), as_list=False)
