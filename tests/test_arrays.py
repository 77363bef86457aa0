"""Tests of digital_stain.core.arrays: shape conventions, value scaling, conversion to unit RGB."""

from __future__ import annotations

import numpy as np
import pytest

from digital_stain.core.arrays import (
    MIN_SIDE,
    InputError,
    ValueScaling,
    check_plane_shape,
    split_planes,
    to_uint8,
    to_unit_rgb,
    value_scaling,
)

# ---------------------------------------------------------------- split_planes


@pytest.mark.parametrize(
    "shape, expected",
    [
        ((32, 40), ((), (32, 40))),
        ((32, 40, 1), ((), (32, 40, 1))),
        ((32, 40, 3), ((), (32, 40, 3))),
        ((32, 40, 4), ((), (32, 40, 4))),
        ((5, 32, 40), ((5,), (32, 40))),
        ((5, 32, 40, 3), ((5,), (32, 40, 3))),
        ((2, 5, 32, 40), ((2, 5), (32, 40))),
        ((2, 5, 32, 40, 4), ((2, 5), (32, 40, 4))),
        ((6, 32, 40, 1), ((6,), (32, 40, 1))),
    ],
)
def test_split_planes_gray_rgb_rgba_and_stacks(shape, expected):
    assert split_planes(shape) == expected


@pytest.mark.parametrize("channels", [2, 5])
def test_split_planes_refuses_unsupported_channel_counts_naming_the_count(channels):
    with pytest.raises(InputError, match=rf"\b{channels} channels\b"):
        split_planes((64, 48, channels))


def test_split_planes_refuses_unsupported_channel_count_in_a_stack():
    with pytest.raises(InputError, match=r"\b2 channels\b"):
        split_planes((3, 64, 48, 2))


@pytest.mark.parametrize("shape", [(), (10,)])
def test_split_planes_refuses_fewer_than_two_dimensions(shape):
    with pytest.raises(InputError, match="at least 2 dimensions"):
        split_planes(shape)


def test_input_error_is_a_value_error():
    assert issubclass(InputError, ValueError)


# ---------------------------------------------------------- check_plane_shape


@pytest.mark.parametrize("shape", [(0, 10), (10, 0), (0, 0, 3)])
def test_check_plane_shape_refuses_empty(shape):
    with pytest.raises(InputError, match="empty"):
        check_plane_shape(shape)


@pytest.mark.parametrize("shape", [(1, 1), (1, 1, 3), (7, 100), (100, 7), (7, 7, 3)])
def test_check_plane_shape_refuses_planes_smaller_than_8(shape):
    with pytest.raises(InputError, match=rf"{shape[0]} x {shape[1]} pixels"):
        check_plane_shape(shape)


@pytest.mark.parametrize("shape", [(8, 8), (8, 8, 3), (8, 1000), (1000, 8, 1), (256, 256, 4)])
def test_check_plane_shape_accepts_8_and_larger(shape):
    assert MIN_SIDE == 8
    check_plane_shape(shape)  # no exception


# -------------------------------------------------------------- value_scaling


def test_value_scaling_uint8_divides_by_255():
    image = np.array([[0, 17], [128, 200]], dtype=np.uint8)
    s = value_scaling(image)
    assert (s.offset, s.scale) == (0.0, 255.0)
    assert "uint8" in s.source and "255" in s.source


def test_value_scaling_uint16_divides_by_65535_without_8_bit_clipping():
    image = np.zeros((16, 16), dtype=np.uint16)
    image[3, 4] = 4000
    image[5, 6] = 255
    image[7, 8] = 256
    s = value_scaling(image)
    assert (s.offset, s.scale) == (0.0, 65535.0)
    assert "65535" in s.source
    unit = to_unit_rgb(image)
    assert unit[3, 4, 0] == pytest.approx(4000 / 65535, rel=1e-6)
    # 255 and 256 remain distinguishable (no 8-bit reduction)
    assert unit[7, 8, 0] > unit[5, 6, 0]
    assert unit[5, 6, 0] == pytest.approx(255 / 65535, rel=1e-6)
    assert unit.max() < 0.07  # not stretched to [0, 1]


def test_value_scaling_uint8_and_uint16_do_not_depend_on_content():
    assert value_scaling(np.full((8, 8), 3, np.uint8)) == value_scaling(np.full((8, 8), 250, np.uint8))
    assert value_scaling(np.full((8, 8), 3, np.uint16)).scale == 65535.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_value_scaling_float_in_unit_range_is_taken_as_is(dtype):
    image = np.array([[0.1, 0.2], [0.3, 0.9]], dtype=dtype)
    s = value_scaling(image)
    assert (s.offset, s.scale) == (0.0, 1.0)
    unit = to_unit_rgb(np.tile(image, (4, 4)))
    np.testing.assert_allclose(unit[:2, :2, 0], image.astype(np.float32), rtol=1e-6)


def test_value_scaling_float_at_exact_unit_bounds_is_taken_as_is():
    image = np.array([[0.0, 1.0]], dtype=np.float32)
    assert (value_scaling(image).offset, value_scaling(image).scale) == (0.0, 1.0)


@pytest.mark.parametrize(
    "values, lo, hi",
    [([0.0, 5.0, 2.5], 0.0, 5.0), ([-1.0, 0.0, 1.0], -1.0, 1.0), ([0.2, 1.5, 0.7], 0.2, 1.5), ([100.0, 300.0, 200.0], 100.0, 300.0)],
)
def test_value_scaling_other_floats_are_stretched_from_their_range(values, lo, hi):
    image = np.resize(np.array(values, dtype=np.float64), (8, 9))
    s = value_scaling(image)
    assert s.offset == pytest.approx(lo)
    assert s.scale == pytest.approx(hi - lo)
    assert "stretched" in s.source
    unit = to_unit_rgb(image)
    assert unit.min() == pytest.approx(0.0, abs=1e-7)
    assert unit.max() == pytest.approx(1.0, abs=1e-6)


def test_value_scaling_constant_float_image_is_not_divided_by_zero():
    image = np.full((8, 8), 7.5, dtype=np.float32)
    s = value_scaling(image)
    assert s.scale != 0.0
    unit = to_unit_rgb(image)
    assert np.isfinite(unit).all()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_value_scaling_refuses_nan_and_inf_with_a_message(bad):
    image = np.ones((8, 8), dtype=np.float32) * 0.5
    image[2, 3] = bad
    image[4, 4] = bad
    with pytest.raises(InputError, match=r"2 NaN or infinite pixel"):
        value_scaling(image)
    with pytest.raises(InputError, match="NaN"):
        to_unit_rgb(image)


def test_value_scaling_refuses_bool_masks():
    with pytest.raises(InputError, match="boolean"):
        value_scaling(np.zeros((8, 8), dtype=bool))


def test_value_scaling_refuses_complex():
    with pytest.raises(InputError, match="pixel type"):
        value_scaling(np.zeros((8, 8), dtype=np.complex64))


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.uint32])
def test_value_scaling_other_integers_are_stretched(dtype):
    image = np.resize(np.array([10, 20, 30], dtype=dtype), (8, 8))
    s = value_scaling(image)
    assert (s.offset, s.scale) == (10.0, 20.0)


def test_value_scaling_as_dict():
    s = ValueScaling(1.0, 2.0, "x")
    assert s.as_dict() == {"offset": 1.0, "scale": 2.0, "source": "x"}


# ---------------------------------------------------------------- to_unit_rgb


def test_to_unit_rgb_from_gray_2d():
    image = np.arange(64, dtype=np.uint8).reshape(8, 8)
    unit = to_unit_rgb(image)
    assert unit.shape == (8, 8, 3)
    assert unit.dtype == np.float32
    assert unit.flags["C_CONTIGUOUS"]
    for c in range(3):
        np.testing.assert_allclose(unit[..., c], image / 255.0, rtol=1e-6)


def test_to_unit_rgb_from_single_channel():
    image = np.arange(64, dtype=np.uint8).reshape(8, 8, 1)
    unit = to_unit_rgb(image)
    assert unit.shape == (8, 8, 3)
    np.testing.assert_allclose(unit[..., 2], image[..., 0] / 255.0, rtol=1e-6)


def test_to_unit_rgb_from_rgb_uint8():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    unit = to_unit_rgb(image)
    assert unit.shape == (9, 11, 3) and unit.dtype == np.float32
    np.testing.assert_allclose(unit, image / 255.0, rtol=1e-6)


def test_to_unit_rgb_drops_alpha():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (8, 10, 4), dtype=np.uint8)
    image[..., 3] = 0  # fully transparent: alpha must not darken or matter
    unit = to_unit_rgb(image)
    assert unit.shape == (8, 10, 3)
    np.testing.assert_allclose(unit, image[..., :3] / 255.0, rtol=1e-6)


def test_to_unit_rgb_uses_given_scaling_and_clips():
    image = np.array([[0.0, 5.0, 10.0, 20.0]] * 8, dtype=np.float32).repeat(2, axis=1)
    scaling = ValueScaling(0.0, 10.0, "stack-level")
    unit = to_unit_rgb(image, scaling)
    np.testing.assert_allclose(unit[0, ::2, 0], [0.0, 0.5, 1.0, 1.0])  # 20 clipped to 1


def test_to_unit_rgb_output_is_in_unit_range():
    rng = np.random.default_rng(2)
    image = rng.normal(size=(12, 12, 3)) * 100
    unit = to_unit_rgb(image)
    assert unit.min() >= 0.0 and unit.max() <= 1.0


def test_to_unit_rgb_refuses_stacks_and_small_planes():
    with pytest.raises(InputError, match="one plane"):
        to_unit_rgb(np.zeros((3, 16, 16), np.uint8))
    with pytest.raises(InputError, match="8 x 8"):
        to_unit_rgb(np.zeros((7, 16, 3), np.uint8))
    with pytest.raises(InputError, match="2 channels"):
        to_unit_rgb(np.zeros((16, 16, 2), np.uint8))


def test_to_uint8_rounds_and_clips():
    unit = np.array([-0.5, 0.0, 0.5 / 255, 0.49 / 255, 0.5, 1.0, 1.5], dtype=np.float32)
    out = to_uint8(unit)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [0, 0, 1, 0, 128, 255, 255])
