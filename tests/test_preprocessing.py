"""Decoding image files of every mode and bringing them to square uint8 arrays."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from datamodules.preprocessing import (
    ImageReadError,
    Preprocessing,
    load_preprocessed,
    preprocess,
    read_image,
)


def luma(r: float, g: float, b: float) -> float:
    """ITU-R 601-2 luma, the usual RGB -> grey transform."""
    return 0.299 * r + 0.587 * g + 0.114 * b


def save(array: np.ndarray, path, mode: str | None = None, **params):
    image = Image.fromarray(array) if mode is None else Image.fromarray(array, mode)
    image.save(path, **params)
    return path


def dark_on_white(height: int = 20, width: int = 40) -> np.ndarray:
    """A shadowgraph-like image: white background, a dark blob in the middle."""
    array = np.full((height, width), 255, np.uint8)
    array[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 20
    return array


def bright_on_black(height: int = 20, width: int = 40) -> np.ndarray:
    """A darkfield-like image: black background, a bright blob in the middle."""
    return 255 - dark_on_white(height, width)


def corners(out: np.ndarray) -> np.ndarray:
    """The four corner pixels of every channel of a ``(C, S, S)`` array."""
    return out[:, [0, 0, -1, -1], [0, -1, 0, -1]]


# -- read_image: modes and bit depths -------------------------------------------------------


def test_read_8bit_grey_png_is_lossless(tmp_path):
    array = np.arange(64 * 16, dtype=np.uint32).reshape(16, 64).astype(np.uint8)
    path = save(array, tmp_path / "grey.png")
    out = read_image(path, 1)
    assert out.dtype == np.uint8
    assert out.shape == (16, 64)
    np.testing.assert_array_equal(out, array)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_read_16bit_grey_maps_the_full_range(tmp_path, suffix):
    levels = np.array([0, 1, 2, 100, 128, 200, 254, 255], np.uint16)
    array = np.tile(levels * 257, (4, 1)).astype(np.uint16)
    array[0, 0] = 65535
    path = save(array, tmp_path / f"grey16{suffix}")
    assert Image.open(path).mode == "I;16"
    out = read_image(path, 1)
    assert out.dtype == np.uint8
    expected = np.tile(levels, (4, 1)).astype(np.uint8)
    expected[0, 0] = 255
    np.testing.assert_array_equal(out, expected)


def test_read_16bit_dark_image_is_not_stretched(tmp_path):
    # A dark 16-bit image (max 2570 of 65535) stays dark: no per-image contrast stretch.
    array = np.full((8, 8), 257 * 5, np.uint16)
    array[2:6, 2:6] = 257 * 10
    out = read_image(save(array, tmp_path / "dark16.png"), 1)
    assert set(np.unique(out).tolist()) == {5, 10}


def test_read_16bit_pgm_matches_16bit_png(tmp_path):
    array = np.full((8, 8), 200, np.uint16)
    array[0, 0] = 0
    png = read_image(save(array, tmp_path / "dark16.png"), 1)
    pgm = read_image(save(array, tmp_path / "dark16.pgm"), 1)
    np.testing.assert_array_equal(pgm, png)


def rgb_patches() -> np.ndarray:
    """Four solid 8x8 colour patches (red, green, blue, orange) side by side."""
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (250, 160, 30)]
    array = np.zeros((8, 32, 3), np.uint8)
    for i, colour in enumerate(colours):
        array[:, 8 * i : 8 * i + 8] = colour
    return array


def test_read_rgb_png_as_grey_uses_luma(tmp_path):
    path = save(rgb_patches(), tmp_path / "rgb.png")
    out = read_image(path, 1)
    assert out.shape == (8, 32)
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (250, 160, 30)]):
        patch = out[:, 8 * i : 8 * i + 8]
        assert np.abs(patch.astype(int) - luma(*colour)).max() <= 1


def test_read_rgb_png_with_three_channels_is_lossless(tmp_path):
    array = rgb_patches()
    out = read_image(save(array, tmp_path / "rgb.png"), 3)
    assert out.shape == (8, 32, 3)
    np.testing.assert_array_equal(out, array)


def test_read_rgb_jpeg_grey_and_colour(tmp_path):
    array = np.zeros((16, 32, 3), np.uint8)
    array[:, :16] = (200, 40, 40)
    array[:, 16:] = (40, 40, 200)
    path = save(array, tmp_path / "rgb.jpg", quality=95)
    colour = read_image(path, 3)
    assert colour.shape == (16, 32, 3)
    # Lossy, so compare the inside of each patch with a tolerance.
    assert np.abs(colour[4:12, 4:12].astype(int) - (200, 40, 40)).max() <= 12
    assert np.abs(colour[4:12, 20:28].astype(int) - (40, 40, 200)).max() <= 12
    grey = read_image(path, 1)
    assert grey.shape == (16, 32)
    assert abs(grey[4:12, 4:12].mean() - luma(200, 40, 40)) <= 6
    assert abs(grey[4:12, 20:28].mean() - luma(40, 40, 200)) <= 6
    assert grey[8, 8] > grey[8, 24]  # red is brighter than blue in luma


def test_read_grey_with_three_channels_repeats_the_grey_level(tmp_path):
    array = dark_on_white(12, 20)
    out = read_image(save(array, tmp_path / "grey.png"), 3)
    assert out.shape == (12, 20, 3)
    for channel in range(3):
        np.testing.assert_array_equal(out[..., channel], array)


def test_read_palette_png_gives_the_palette_grey_levels(tmp_path):
    palette = [0, 0, 0, 90, 90, 90, 210, 210, 210, 255, 0, 0]
    indices = np.zeros((8, 8), np.uint8)
    indices[:, 2:4] = 1
    indices[:, 4:6] = 2
    indices[:, 6:] = 3
    image = Image.fromarray(indices, "P")
    image.putpalette(palette + [0] * (768 - len(palette)))
    path = tmp_path / "palette.png"
    image.save(path)
    assert Image.open(path).mode == "P"
    out = read_image(path, 1)
    assert out.shape == (8, 8)
    np.testing.assert_array_equal(out[:, :6], np.tile([0, 0, 90, 90, 210, 210], (8, 1)))
    assert np.abs(out[:, 6:].astype(int) - luma(255, 0, 0)).max() <= 1
    colour = read_image(path, 3)
    np.testing.assert_array_equal(colour[0, 7], (255, 0, 0))
    np.testing.assert_array_equal(colour[0, 3], (90, 90, 90))


@pytest.mark.parametrize("background", [255, 180, 0])
def test_read_rgba_transparent_pixels_take_the_background_level(tmp_path, background):
    rgba = np.zeros((16, 16, 4), np.uint8)  # transparent black inside
    rgba[..., :3] = 0
    object_level = 60 if background > 127 else 200
    # Opaque border at the background level.
    rgba[[0, -1], :] = (background, background, background, 255)
    rgba[:, [0, -1]] = (background, background, background, 255)
    # An opaque object in the middle.
    rgba[6:10, 6:10] = (object_level, object_level, object_level, 255)
    path = save(rgba, tmp_path / "rgba.png", mode="RGBA")
    out = read_image(path, 1)
    assert out.shape == (16, 16)
    assert set(np.unique(out).tolist()) == {background, object_level}
    inside = np.zeros((16, 16), bool)
    inside[6:10, 6:10] = True
    assert (out[inside] == object_level).all()
    assert (out[~inside] == background).all()  # no frame where the pixels were transparent
    colour = read_image(path, 3)
    assert colour.shape == (16, 16, 3)
    assert (colour[~inside] == background).all()


def test_read_rgba_half_transparent_blends_with_the_background(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[...] = (255, 255, 255, 255)
    rgba[3:5, 3:5] = (0, 0, 0, 128)  # half-transparent black on white
    out = read_image(save(rgba, tmp_path / "rgba.png", mode="RGBA"), 1)
    assert abs(int(out[4, 4]) - 127) <= 1
    assert out[0, 0] == 255


@pytest.mark.parametrize("suffix", [".jpg", ".tif"])
@pytest.mark.parametrize(
    ("cmyk", "grey"),
    [((0, 0, 0, 0), 255), ((0, 0, 0, 255), 0), ((0, 0, 0, 128), 127), ((255, 0, 0, 0), None)],
)
def test_read_cmyk(tmp_path, suffix, cmyk, grey):
    path = tmp_path / f"cmyk{suffix}"
    Image.new("CMYK", (8, 8), cmyk).save(path)
    assert Image.open(path).mode == "CMYK"
    tolerance = 3 if suffix == ".jpg" else 1
    out = read_image(path, 1)
    assert out.shape == (8, 8)
    expected = luma(0, 255, 255) if grey is None else grey  # pure cyan is (0, 255, 255)
    assert np.abs(out.astype(int) - expected).max() <= tolerance
    colour = read_image(path, 3)
    assert colour.shape == (8, 8, 3)
    if grey is None:
        assert np.abs(colour.astype(int) - (0, 255, 255)).max() <= tolerance
    else:
        assert np.abs(colour.astype(int) - grey).max() <= tolerance


def test_read_bilevel_png(tmp_path):
    array = np.zeros((8, 8), bool)
    array[2:6, 2:6] = True
    path = tmp_path / "bits.png"
    Image.fromarray(array).save(path)
    assert Image.open(path).mode == "1"
    out = read_image(path, 1)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.where(array, 255, 0))


# -- read_image: unusable files -------------------------------------------------------------


def test_read_empty_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty"):
        read_image(path, 1)


def test_read_text_renamed_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("these are not pixels\n" * 10)
    with pytest.raises(ImageReadError, match="not an image"):
        read_image(path, 1)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_read_truncated_file(tmp_path, suffix):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    path = save(noise, tmp_path / f"noise{suffix}")
    read_image(path, 1)  # the complete file is fine
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="truncated"):
        read_image(path, 1)


def test_image_read_error_is_not_chained(tmp_path):
    # The message is shown to users as the reason, without PIL's traceback.
    path = tmp_path / "notes.png"
    path.write_text("text")
    with pytest.raises(ImageReadError) as info:
        read_image(path, 1)
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


# -- preprocess ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [4, 16, 32, 64])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("shape", [(20, 40), (40, 20), (17, 17)])
def test_load_preprocessed_shape_and_dtype(tmp_path, size, channels, shape):
    path = save(np.stack([dark_on_white(*shape)] * 3, axis=2), tmp_path / "rgb.png")
    out = load_preprocessed(path, Preprocessing(image_size=size, channels=channels))
    assert out.shape == (channels, size, size)
    assert out.dtype == np.uint8
    assert out.flags.c_contiguous


def test_preprocess_grey_keeps_levels_of_a_square_image():
    array = np.zeros((32, 32), np.uint8)
    array[:, 16:] = 200
    out = preprocess(array, Preprocessing(image_size=32))
    np.testing.assert_array_equal(out[0], array)


@pytest.mark.parametrize("shape", [(20, 40), (40, 20)])
def test_padding_of_dark_on_white_is_white(shape):
    out = preprocess(dark_on_white(*shape), Preprocessing(image_size=32, polarity="keep"))
    assert (corners(out) >= 250).all()
    assert out[0, 16, 16] <= 30  # the dark object is still in the middle


@pytest.mark.parametrize("shape", [(20, 40), (40, 20)])
def test_padding_of_bright_on_black_is_black(shape):
    out = preprocess(bright_on_black(*shape), Preprocessing(image_size=32, polarity="keep"))
    assert (corners(out) <= 5).all()
    assert out[0, 16, 16] >= 225


def test_padding_uses_the_border_median_not_a_constant():
    array = np.full((10, 40), 120, np.uint8)
    array[3:7, 10:30] = 240
    array[0, :5] = 0  # a few odd border pixels do not move the median
    out = preprocess(array, Preprocessing(image_size=32))
    assert (np.abs(out[0, :8].astype(int) - 120) <= 1).all()  # the padded band on top
    assert (np.abs(out[0, -8:].astype(int) - 120) <= 1).all()  # and at the bottom


def test_padding_of_rgb_uses_each_channel_background():
    array = np.zeros((10, 30, 3), np.uint8)
    array[...] = (30, 140, 220)
    array[4:6, 10:20] = (255, 255, 0)
    out = preprocess(array, Preprocessing(image_size=30, channels=3))
    assert out.shape == (3, 30, 30)
    np.testing.assert_array_equal(corners(out), np.array([[30] * 4, [140] * 4, [220] * 4]))


def test_polarity_auto_inverts_a_white_background():
    array = dark_on_white(20, 40)
    out = preprocess(array, Preprocessing(image_size=32, polarity="auto"))
    assert (corners(out) <= 5).all()  # background dark, padding included
    assert out[0, 16, 16] >= 225  # object bright
    keep = preprocess(array, Preprocessing(image_size=32, polarity="keep"))
    assert np.abs(out.astype(int) + keep.astype(int) - 255).max() <= 1


def test_polarity_auto_leaves_a_dark_background_alone():
    array = bright_on_black(20, 40)
    auto = preprocess(array, Preprocessing(image_size=32, polarity="auto"))
    keep = preprocess(array, Preprocessing(image_size=32, polarity="keep"))
    np.testing.assert_array_equal(auto, keep)
    assert (corners(auto) <= 5).all()


def test_polarity_keep_never_inverts():
    array = dark_on_white(20, 40)
    out = preprocess(array, Preprocessing(image_size=32, polarity="keep"))
    assert (corners(out) >= 250).all()
    assert out[0, 16, 16] <= 30


def test_polarity_auto_on_rgb_white_background(tmp_path):
    array = np.full((20, 40, 3), 250, np.uint8)
    array[5:15, 10:30] = (10, 40, 90)
    out = preprocess(array, Preprocessing(image_size=32, channels=3, polarity="auto"))
    assert (corners(out) <= 5).all()
    np.testing.assert_array_equal(out[:, 16, 16], (245, 215, 165))


def line_on_black(vertical: bool) -> np.ndarray:
    array = np.zeros((6, 300), np.uint8)
    array[1:5] = 255
    return array.T.copy() if vertical else array


def lit_lines(out: np.ndarray, vertical: bool, threshold: int) -> int:
    """How many output rows (or columns, for a vertical object) contain the bright object."""
    profile = out[0].max(axis=0 if vertical else 1)
    return int((profile > threshold).sum())


@pytest.mark.parametrize("vertical", [False, True])
def test_max_aspect_keeps_thin_objects_visible(vertical):
    array = line_on_black(vertical)
    widened = preprocess(array, Preprocessing(image_size=32, max_aspect=4))
    assert lit_lines(widened, vertical, threshold=128) >= 4
    assert widened.max() >= 250
    collapsed = preprocess(array, Preprocessing(image_size=32, max_aspect=1000))
    assert lit_lines(collapsed, vertical, threshold=0) <= 2
    assert collapsed.max() < 128  # smeared into a faint line
    # The long side still spans the whole output in both cases.
    along = widened[0].max(axis=1 if vertical else 0)
    assert (along > 128).all()


def test_max_aspect_leaves_moderate_shapes_alone():
    array = bright_on_black(20, 40)  # aspect 2 < 4: plain padding
    a = preprocess(array, Preprocessing(image_size=32, max_aspect=4))
    b = preprocess(array, Preprocessing(image_size=32, max_aspect=100))
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"channels": 2}, "channels"),
        ({"image_size": 0}, "image_size"),
        ({"image_size": 3}, "image_size"),
        ({"polarity": "x"}, "polarity"),
        ({"max_aspect": 0.5}, "max_aspect"),
    ],
)
def test_preprocessing_rejects_bad_settings(kwargs, option):
    with pytest.raises(ValueError, match=option):
        Preprocessing(**kwargs)


def test_preprocessing_as_dict_round_trips():
    settings = Preprocessing(image_size=48, channels=3, polarity="auto", max_aspect=6.0)
    assert Preprocessing(**settings.as_dict()) == settings


def test_preprocessing_is_deterministic(tmp_path):
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    path = save(noise, tmp_path / "noise.jpg")
    settings = Preprocessing(image_size=24, channels=3, polarity="auto", max_aspect=1.5)
    first = load_preprocessed(path, settings)
    second = load_preprocessed(path, Preprocessing(**settings.as_dict()))
    assert first.tobytes() == second.tobytes()


def test_missing_file_says_so(tmp_path):
    with pytest.raises(ImageReadError, match="file not found"):
        read_image(tmp_path / "gone.png", 1)
