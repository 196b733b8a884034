"""Batched views: shapes and ranges, exact pixels where promised, per-image randomness, and
distributions checked against the per-image torchvision and lightly pipelines they replace."""

import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightly.transforms import DINOTransform, SimCLRTransform
from lightly.transforms.gaussian_blur import GaussianBlur
from lightly.transforms.rotation import RandomRotate
from lightly.transforms.solarize import RandomSolarization
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from datamodules import views
from datamodules.views import eval_view
from lightning_modules.baselines.dino import dino_view
from lightning_modules.baselines.simclr import simclr_view
from lightning_modules.baselines.supervised import supervised_view
from lightning_modules.diffusion import diffusion_view

CPU = torch.device("cpu")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
RANDOM_VIEWS = [diffusion_view, supervised_view, simclr_view, dino_view]


# -- references: the per-image pipelines the batched views replace -----------------------------


def _lightly_settings(size: int, channels: int) -> dict:
    grey = channels == 1
    return {
        "cj_sat": 0.0 if grey else 0.4,
        "cj_hue": 0.0 if grey else 0.1,
        "random_gray_scale": 0.0 if grey else 0.2,
        "vf_prob": 0.5,
        "hf_prob": 0.5,
        "rr_prob": 0.5,
        "sigmas": (0.1, max(0.2, size / 64)),
        "normalize": {"mean": [0.5] * channels, "std": [0.5] * channels},
    }


def _lightly_simclr(size, channels):
    return SimCLRTransform(
        input_size=size, min_scale=0.3, gaussian_blur=0.3, **_lightly_settings(size, channels)
    )


def _lightly_dino(size, channels, n_local_views=2):
    return DINOTransform(
        global_crop_size=size,
        global_crop_scale=(0.4, 1.0),
        local_crop_size=max(8, size // 2),
        local_crop_scale=(0.1, 0.4),
        n_local_views=n_local_views,
        **_lightly_settings(size, channels),
    )


def _old_supervised(size):
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(0.6, 1.0), ratio=(0.8, 1.25), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.Lambda(lambda image: torch.rot90(image, int(torch.randint(4, ())), dims=(-2, -1))),
            v2.ColorJitter(brightness=0.2, contrast=0.2),
        ]
    )


def _run_lightly(view_transform, image, n):
    """``n`` draws of one of a lightly transform's views on one image."""
    torch.manual_seed(0)
    np.random.seed(0)
    pil = TF.to_pil_image(image)
    return torch.stack([view_transform(pil) for _ in range(n)])


def _recipes(view):
    return [recipe for recipe, count in view.parts for _ in range(count)]


def _step(lightly_view, kind):
    return next((s for s in lightly_view.transform.transforms if isinstance(s, kind)), None)


def _as_list(out):
    return out if isinstance(out, list) else [out]


# -- interface --------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("view", [eval_view, *RANDOM_VIEWS])
def test_views_keep_device_dtype_and_range_batched_and_single(view, channels, device):
    images = torch.randint(0, 256, (5, channels, 16, 16), dtype=torch.uint8, device=device)
    expected = [16, 16, 8, 8, 8] if view is dino_view else [16, 16] if view is simclr_view else [16]
    make = view(16, channels, 3) if view is dino_view else view(16, channels)
    for batch, shape in ((images, (5, channels)), (images[0], (channels,))):
        out = _as_list(make(batch))
        assert [tuple(o.shape) for o in out] == [(*shape, s, s) for s in expected]
        for o in out:
            assert o.dtype == torch.float32 and o.device == images.device
            assert o.min() >= -1 and o.max() <= 1


def test_views_take_only_uint8_and_pickle():
    with pytest.raises(TypeError):
        eval_view(8, 1)(torch.zeros(1, 8, 8))
    view = pickle.loads(pickle.dumps(dino_view(16, 3)))
    assert len(view(torch.zeros(3, 16, 16, dtype=torch.uint8))) == 4


def test_eval_view_is_the_scaled_pixels():
    images = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).repeat(2, 3, 1, 1)
    assert torch.equal(eval_view(16, 3)(images), images.float() / 127.5 - 1)


@pytest.mark.parametrize("view", RANDOM_VIEWS)
def test_a_seed_fixes_the_batch(view):
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)

    def draw(seed):
        torch.manual_seed(seed)
        return torch.cat([o.flatten() for o in _as_list(view(16, 3)(images))])

    assert torch.equal(draw(0), draw(0))
    assert not torch.equal(draw(0), draw(1))


@pytest.mark.parametrize("view", RANDOM_VIEWS)
def test_identical_images_in_a_batch_get_different_augmentations(view):
    torch.manual_seed(0)
    images = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8).repeat(16, 1, 1, 1)
    for out in _as_list(view(16, 3)(images)):
        distinct = torch.unique(out.flatten(1), dim=0)
        assert len(distinct) >= (5 if view is diffusion_view else 16)


# -- flips and rotations ----------------------------------------------------------------------


def _dihedral_images(images):
    """The 8 flips and rotations of ``(..., S, S)`` images, stacked on a new dim 1."""
    return torch.stack(
        [torch.rot90(g, k, dims=(-2, -1)) for g in (images, images.flip(-1)) for k in range(4)],
        dim=1,
    )


def test_diffusion_view_moves_pixels_exactly_and_draws_the_8_uniformly():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    out = diffusion_view(8, 3)(images)
    candidates = _dihedral_images(eval_view(8, 3)(images))
    assert (out.unsqueeze(1) == candidates).flatten(2).all(2).any(1).all()

    image = torch.randperm(64).to(torch.uint8).view(1, 1, 8, 8)  # 8 distinct dihedral images
    out = diffusion_view(8, 1)(image.repeat(4000, 1, 1, 1))
    matches = (out.unsqueeze(1) == _dihedral_images(eval_view(8, 1)(image))).flatten(2).all(2)
    assert (matches.sum(1) == 1).all()
    assert (matches.float().mean(0) - 1 / 8).abs().max() < 0.025


def _orientations(out):
    """Per image, which output axis carries the input's row coordinate (channel 0) and with
    which signs rows and columns (channel 1) run: 8 codes, one per flip and rotation."""
    out = out.float()
    row_step = out[:, :2, -1, :].mean(-1) - out[:, :2, 0, :].mean(-1)
    col_step = out[:, :2, :, -1].mean(-1) - out[:, :2, :, 0].mean(-1)
    along_rows = row_step[:, 0].abs() > col_step[:, 0].abs()
    signs = torch.where(along_rows[:, None], row_step, col_step).sign() > 0
    signs[:, 1] = torch.where(along_rows, col_step[:, 1], row_step[:, 1]) > 0
    return along_rows.long() * 4 + signs[:, 0].long() * 2 + signs[:, 1].long()


def test_supervised_flips_and_rotations_match_the_per_image_pipeline():
    coords = torch.arange(32) * 4 + 64
    image = torch.stack(
        [coords.view(-1, 1).expand(32, 32), coords.view(1, -1).expand(32, 32)]
        + [torch.full((32, 32), 128)]
    ).to(torch.uint8)
    torch.manual_seed(0)
    ours = torch.bincount(
        _orientations(supervised_view(32, 3)(image.repeat(2000, 1, 1, 1))), None, 8
    )
    reference = _old_supervised(32)
    theirs = torch.stack([reference(image) for _ in range(1000)])
    theirs = torch.bincount(_orientations(theirs), None, 8)
    assert ((ours / 2000 - 1 / 8).abs() < 0.03).all()
    assert ((theirs / 1000 - 1 / 8).abs() < 0.045).all()


def test_lightly_flips_and_rotations_are_the_uniform_dihedral_group():
    """hf, vf and a 90-degree rotation each with probability 0.5 reach all 8 elements once."""
    for build in (_lightly_simclr, _lightly_dino):
        for lightly_view in build(32, 1).transforms:
            assert _step(lightly_view, v2.RandomHorizontalFlip).p == 0.5
            assert _step(lightly_view, v2.RandomVerticalFlip).p == 0.5
            rotate = _step(lightly_view, RandomRotate)
            assert (rotate.prob, rotate.angle) == (0.5, 90)
    for view in (simclr_view(32, 1), dino_view(32, 1)):
        assert all(recipe.dihedral for recipe in _recipes(view))


# -- crops ------------------------------------------------------------------------------------


def test_crop_resamples_exactly_the_sampled_box():
    rows, cols = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    coords = torch.stack([rows, cols]).expand(500, 2, 64, 64)
    torch.manual_seed(0)
    boxes = views._sample_crop_boxes(500, 64, 64, (0.1, 1.0), (3 / 4, 4 / 3), CPU)
    torch.manual_seed(0)
    crops = views._random_resized_crop(coords, 32, (0.1, 1.0), (3 / 4, 4 / 3))
    # Output pixel k samples start + (k + 0.5) * length / 32 - 0.5; interior pixels avoid the
    # image border, where sampling clamps.
    k1, k2 = 8, 24
    read = []
    for values in (crops[:, 0, :, 16], crops[:, 1, 16, :]):
        length = (values[:, k2] - values[:, k1]) * 32 / (k2 - k1)
        read.append((values[:, k1] - (k1 + 0.5) * length / 32 + 0.5, length))
    (top, h), (left, w) = read
    assert torch.allclose(torch.stack([top, left, h, w], 1), boxes, atol=1e-3)


def _crop_cases():
    simclr, dino = _lightly_simclr(64, 1), _lightly_dino(64, 1)
    supervised = v2.RandomResizedCrop(64, scale=(0.6, 1.0), ratio=(0.8, 1.25))
    return [
        ("supervised", supervised_view(64, 1), 0, supervised),
        ("simclr", simclr_view(64, 1), 0, _step(simclr.transforms[0], v2.RandomResizedCrop)),
        ("dino-global", dino_view(64, 1), 1, _step(dino.transforms[1], v2.RandomResizedCrop)),
        ("dino-local", dino_view(64, 1), 2, _step(dino.transforms[2], v2.RandomResizedCrop)),
    ]


@pytest.mark.parametrize("name, view, index, reference", _crop_cases())
def test_crop_boxes_follow_the_reference_crop(name, view, index, reference):
    recipe = _recipes(view)[index]
    assert recipe.size == reference.size[0]
    assert recipe.interpolation == v2.InterpolationMode(reference.interpolation).value
    torch.manual_seed(0)
    ours = views._sample_crop_boxes(4000, 64, 64, recipe.scale, recipe.ratio, CPU)
    probe = [torch.empty(1, 64, 64)]
    params = [reference.make_params(probe) for _ in range(2000)]
    theirs = torch.tensor([[p["top"], p["left"], p["height"], p["width"]] for p in params])
    low, high = reference.scale
    quantiles = torch.linspace(0.05, 0.95, 19)
    stats = []
    for boxes in (ours, theirs.float()):
        top, left, h, w = boxes.T
        assert (top >= 0).all() and (left >= 0).all()
        assert (top + h <= 64).all() and (left + w <= 64).all()
        area, ratio = h * w / 64**2, w / h
        # Integer sides move the area and the ratio a little off the sampled values.
        assert low - 0.01 <= area.min() and area.max() <= high + 0.01
        assert reference.ratio[0] / 1.06 <= ratio.min() and ratio.max() <= reference.ratio[1] * 1.06
        stats.append([area.quantile(quantiles), ratio.log().quantile(quantiles)])
        stats[-1].append((left + w / 2).quantile(quantiles) / 64)
    for ours_stat, theirs_stat in zip(*stats, strict=True):
        assert (ours_stat - theirs_stat).abs().max() < 0.03


def test_crop_falls_back_to_the_central_crop_like_torchvision():
    reference = v2.RandomResizedCrop(64, scale=(1.0, 1.0), ratio=(2.0, 3.0))
    params = reference.make_params([torch.empty(1, 64, 64)])
    expected = [params["top"], params["left"], params["height"], params["width"]]
    boxes = views._sample_crop_boxes(10, 64, 64, (1.0, 1.0), (2.0, 3.0), CPU)
    assert expected == [16, 0, 32, 64]
    assert (boxes == torch.tensor(expected, dtype=torch.float32)).all()


# -- colour -----------------------------------------------------------------------------------


def _jitter_factors(out_hi, out_lo, in_hi, in_lo):
    return (out_hi - out_lo) / (in_hi - in_lo)


def test_supervised_brightness_matches_the_per_image_pipeline():
    image = torch.full((1, 16, 16), 128, dtype=torch.uint8)
    torch.manual_seed(0)
    ours = (supervised_view(16, 1)(image.repeat(3000, 1, 1, 1)) + 1) / 2
    # A constant image keeps its value under crop and contrast: brightness alone scales it.
    ours = ours.mean((1, 2, 3)) * 255 / 128
    reference = _old_supervised(16)
    theirs = torch.stack([reference(image) for _ in range(1000)]).float().mean((1, 2, 3)) / 128
    for factors, slack in ((ours, 1e-4), (theirs, 1 / 128)):
        assert 0.8 - slack <= factors.min() < 0.81 and 1.19 < factors.max() <= 1.2 + slack
    assert abs(ours.mean() - 1) < 0.01 and abs(theirs.mean() - 1) < 0.02


def test_contrast_and_saturation_factor_ranges_match_torchvision():
    image = (
        torch.tensor([0.25, 0.75]).repeat_interleave(8).view(1, 1, 1, 16).expand(2000, 1, 16, 16)
    )
    torch.manual_seed(0)
    ours = views._colour_jitter(image, 1.0, 0.0, 0.2, 0.0, 0.0)
    ours = _jitter_factors(ours[:, 0, 0, -1], ours[:, 0, 0, 0], 0.75, 0.25)
    reference = v2.ColorJitter(contrast=0.2)
    theirs = torch.stack([reference(image[0]) for _ in range(1000)])
    theirs = _jitter_factors(theirs[:, 0, 0, -1], theirs[:, 0, 0, 0], 0.75, 0.25)
    for factors in (ours, theirs):
        assert 0.8 - 1e-5 <= factors.min() < 0.81 and 1.19 < factors.max() <= 1.2 + 1e-5
    assert abs(ours.mean() - theirs.mean()) < 0.01

    colour = torch.tensor([0.3, 0.5, 0.7]).view(1, 3, 1, 1).expand(2000, 3, 4, 4)
    out = views._colour_jitter(colour, 1.0, 0.0, 0.0, 0.4, 0.0)
    factors = _jitter_factors(out[:, 2, 0, 0], out[:, 0, 0, 0], 0.7, 0.3)
    assert 0.6 - 1e-5 <= factors.min() < 0.61 and 1.39 < factors.max() <= 1.4 + 1e-5


def test_hue_shift_equals_torchvisions_per_image():
    torch.manual_seed(0)
    images = torch.rand(32, 3, 8, 8)
    images[:, :, 0, 0] = 0.5  # grey pixels have no hue to shift
    shifts = torch.empty(32).uniform_(-0.5, 0.5)
    reference = torch.stack(
        [TF.adjust_hue(image, float(s)) for image, s in zip(images, shifts, strict=True)]
    )
    assert torch.allclose(views._adjust_hue(images, shifts), reference, atol=1e-5)


def _factors(view):
    """Brightness factor per image of a view of the constant image 100: blur, crop and contrast
    keep a constant image constant."""
    return ((view + 1) / 2 * 255 / 100).mean((1, 2, 3))


def test_simclr_jitter_rate_and_brightness_match_lightly():
    image = torch.full((1, 16, 16), 100, dtype=torch.uint8)
    torch.manual_seed(0)
    ours = [_factors(v) for v in simclr_view(16, 1)(image.repeat(4000, 1, 1, 1))]
    # lightly's two SimCLR views are one transform; PIL rounds the pixels to uint8.
    theirs = _factors(_run_lightly(_lightly_simclr(16, 1).transforms[0], image, 500))
    for factor, slack, tolerance in [(v, 1e-4, 0.025) for v in ours] + [(theirs, 0.006, 0.07)]:
        assert abs(((factor - 1).abs() > slack).float().mean() - 0.8) < tolerance
        assert 0.2 - slack <= factor.min() < 0.25 and 1.75 < factor.max() <= 1.8 + slack


def test_dino_solarizes_only_the_second_global_view_as_lightly():
    # Bright enough to stay above the threshold under any brightness factor (>= 0.6).
    image = torch.full((1, 16, 16), 250, dtype=torch.uint8)

    def solarized(view):
        return ((view + 1) / 2).mean((1, 2, 3)).lt(0.5).float().mean()

    torch.manual_seed(0)
    rates = [solarized(v) for v in dino_view(16, 1)(image.repeat(4000, 1, 1, 1))]
    assert rates[0] == 0 and rates[2] == 0 and rates[3] == 0
    assert abs(rates[1] - 0.2) < 0.025
    theirs = solarized(_run_lightly(_lightly_dino(16, 1).transforms[1], image, 500))
    assert abs(theirs - 0.2) < 0.07


# -- recipes and filters ----------------------------------------------------------------------


def _lightly_pairs(channels):
    return [
        *zip(
            _recipes(simclr_view(64, channels)),
            _lightly_simclr(64, channels).transforms,
            strict=True,
        ),
        *zip(
            _recipes(dino_view(64, channels)), _lightly_dino(64, channels).transforms, strict=True
        ),
    ]


def _jitter_range(strength, centre):
    return None if strength == 0 else pytest.approx((max(0, centre - strength), centre + strength))


@pytest.mark.parametrize("channels", [1, 3])
def test_recipes_carry_lightlys_parameters(channels):
    pairs = _lightly_pairs(channels)
    assert len(pairs) == 6
    for recipe, lightly_view in pairs:
        crop = _step(lightly_view, v2.RandomResizedCrop)
        assert (recipe.size, recipe.scale) == (crop.size[0], crop.scale)
        assert recipe.ratio == pytest.approx(crop.ratio)
        apply = _step(lightly_view, v2.RandomApply)
        jitter = apply.transforms[0]
        assert recipe.jitter_prob == apply.p
        assert jitter.brightness == _jitter_range(recipe.brightness, 1)
        assert jitter.contrast == _jitter_range(recipe.contrast, 1)
        assert jitter.saturation == _jitter_range(recipe.saturation, 1)
        hue = None if recipe.hue == 0 else pytest.approx((-recipe.hue, recipe.hue))
        assert jitter.hue == hue
        assert recipe.grey_prob == _step(lightly_view, v2.RandomGrayscale).p
        blur = _step(lightly_view, GaussianBlur)
        assert (recipe.blur_prob, recipe.sigmas) == (blur.prob, blur.sigmas)
        solarize = _step(lightly_view, RandomSolarization)
        assert recipe.solarize_prob == (0.0 if solarize is None else solarize.prob)


@pytest.mark.parametrize("p", sorted({r.blur_prob for r, _ in _lightly_pairs(1)}))
def test_blur_rate_matches_lightlys(p):
    # sigma >= 0.5 visibly blurs a checkerboard, so every applied blur is detected.
    board = ((torch.arange(16).view(-1, 1) + torch.arange(16)) % 2 * 200 + 20).to(torch.uint8)
    torch.manual_seed(0)
    ours = views._gaussian_blur(board.float().expand(4000, 1, 16, 16) / 255, p, (0.5, 1.0))
    ours_rate = ((ours * 255 - board).abs().amax((1, 2, 3)) > 1).float().mean()
    np.random.seed(0)
    blur, pil = GaussianBlur(prob=p, sigmas=(0.5, 1.0)), TF.to_pil_image(board)
    theirs = [np.abs(np.asarray(blur(pil), float) - board.numpy()).max() > 1 for _ in range(1000)]
    assert abs(ours_rate - p) < 0.03 and abs(np.mean(theirs) - p) < 0.06


@pytest.mark.parametrize("sigma", [0.5, 1.5])
def test_blur_is_a_separable_gaussian_with_replicated_edges(sigma):
    torch.manual_seed(0)
    images = torch.rand(4, 3, 12, 12)
    radius = math.ceil(3 * sigma)
    kernel = torch.exp(-0.5 * (torch.arange(-radius, radius + 1.0) / sigma) ** 2)
    kernel = kernel / kernel.sum()
    reference = F.pad(images, (radius,) * 4, mode="replicate").flatten(0, 1).unsqueeze(1)
    reference = F.conv2d(reference, kernel.view(1, 1, -1, 1))
    reference = F.conv2d(reference, kernel.view(1, 1, 1, -1)).view(images.shape)
    assert torch.allclose(views._gaussian_blur(images, 1.0, (sigma, sigma)), reference, atol=1e-6)


def test_blur_draws_a_sigma_per_image():
    impulse = torch.zeros(3, 1, 17, 17)  # wide enough for the widest kernel: no mass at edges
    impulse[:, :, 8, 8] = 1
    torch.manual_seed(0)
    out = views._gaussian_blur(impulse, 1.0, (0.5, 2.0))
    assert torch.allclose(out.sum((1, 2, 3)), torch.ones(3))
    assert len(set(out[:, 0, 8, 8].tolist())) == 3
    flat = torch.full((2, 3, 8, 8), 0.4)
    assert torch.allclose(views._gaussian_blur(flat, 1.0, (0.5, 2.0)), flat)
