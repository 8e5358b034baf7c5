"""Augmentation of training batches, checked in image space."""

from __future__ import annotations

import re

import numpy as np
import pytest

from mlplab.engine import augment, checks, data

SHAPE = augment.CIFAR_IMAGE_SHAPE


def _batch(b=6, seed=0):
    return np.random.default_rng(seed).standard_normal((b, 3072), dtype=np.float32)


def _images(rows):
    return data.rows_to_images(rows, SHAPE)  # (b, 32, 32, 3)


def _apply(X, flip=(), dy=(), dx=()):
    b = len(X)
    pad = lambda v, fill: np.array(list(v) + [fill] * (b - len(v)))  # noqa: E731
    return augment.flip_translate(X, pad(flip, False), pad(dy, 0), pad(dx, 0), SHAPE)


def test_a_flipped_image_is_the_image_reversed_along_x():
    X = _batch()
    out = _images(_apply(X, flip=[True, False]))
    np.testing.assert_array_equal(out[0], _images(X)[0][:, ::-1, :])
    np.testing.assert_array_equal(out[1], _images(X)[1])  # the others untouched
    assert out.dtype == np.float32


@pytest.mark.parametrize("dy, dx", [(2, 3), (-3, 1), (0, -4), (4, 0)])
def test_a_shift_moves_pixels_by_the_stated_amount_and_fills_zeros(dy, dx):
    X = _batch()
    img, out = _images(X)[0], _images(_apply(X, dy=[dy], dx=[dx]))[0]
    h, w, _ = SHAPE
    for y in range(h):
        for x in range(w):
            src_y, src_x = y - dy, x - dx
            inside = 0 <= src_y < h and 0 <= src_x < w
            expected = img[src_y, src_x] if inside else np.zeros(3)
            np.testing.assert_array_equal(out[y, x], expected, err_msg=f"pixel {y},{x}")


def test_flip_then_shift_composes_in_that_order():
    X = _batch()
    out = _images(_apply(X, flip=[True], dx=[2]))[0]
    flipped = _images(X)[0][:, ::-1, :]
    np.testing.assert_array_equal(out[:, 2:], flipped[:, :-2])
    assert not out[:, :2].any()


def test_the_input_batch_is_left_alone():
    X = _batch()
    before = X.copy()
    augment.FlipTranslate(max_shift=4)(X, np.random.default_rng(0))
    np.testing.assert_array_equal(X, before)


def test_no_shift_and_no_flip_is_the_identity():
    X = _batch()
    out = augment.FlipTranslate(max_shift=0, flip=False)(X, np.random.default_rng(0))
    np.testing.assert_array_equal(out, X)


def test_same_generator_state_gives_the_same_batches_and_draws_differ_per_image():
    X = _batch(b=200)
    aug = augment.FlipTranslate(max_shift=4)
    a1, a2 = np.random.default_rng(3), np.random.default_rng(3)
    first, again = [aug(X, a1) for _ in range(3)], [aug(X, a2) for _ in range(3)]
    for u, v in zip(first, again, strict=True):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(first[0], first[1])  # the generator moves on


def test_draws_flip_about_half_the_images_and_shift_uniformly_within_max_shift():
    # pixel values that name their source: channel 0 holds 32 * y + x + 1 at (y, x)
    X = np.broadcast_to(np.arange(3072, dtype=np.float32) + 1, (2000, 3072)).copy()
    out = _images(augment.FlipTranslate(max_shift=3)(X, np.random.default_rng(0)))
    # the two middle pixels of row 16 stay inside for any shift of <= 3
    src_y, src_x = np.divmod(out[:, 16, 16, 0].astype(int) - 1, 32)
    next_x = (out[:, 16, 17, 0].astype(int) - 1) % 32
    flipped = next_x < src_x  # a mirrored row runs right to left
    dy = 16 - src_y
    dx = 16 - np.where(flipped, 31 - src_x, src_x)
    assert set(dy) == set(dx) == set(range(-3, 4))
    assert np.mean(flipped) == pytest.approx(augment.FLIP_PROBABILITY, abs=0.04)


def test_make_augment_gives_none_or_flip_translate():
    assert augment.make_augment("none") is None
    aug = augment.make_augment("flip_translate", max_shift=2)
    assert isinstance(aug, augment.FlipTranslate) and aug.max_shift == 2


def test_digits_sized_images_augment_too():
    X = np.random.default_rng(0).standard_normal((5, 64), dtype=np.float32)
    aug = augment.FlipTranslate(max_shift=2, image_shape=(8, 8, 1))
    assert aug(X, np.random.default_rng(0)).shape == (5, 64)
    with pytest.raises(checks.ArgumentError, match=re.escape("max_shift=4: must be an "
                                                             "integer in 0..3")):
        augment.FlipTranslate(max_shift=4, image_shape=(8, 8, 1))


@pytest.mark.parametrize("call, message", [
    (lambda: augment.FlipTranslate(max_shift=16), "max_shift=16: must be an integer in 0..15"),
    (lambda: augment.FlipTranslate(max_shift=-1), "max_shift=-1: must be an integer in 0..15"),
    (lambda: augment.FlipTranslate(max_shift=2.5), "max_shift=2.5: must be an integer"),
    (lambda: augment.FlipTranslate(flip=1), "flip=1: must be true or false"),
    (lambda: augment.make_augment("cutout"), "augment='cutout': allowed ('none', "),
    (lambda: augment.make_augment("none", max_shift=2),
     "max_shift=2: not a setting of augment 'none'"),
])
def test_bad_arguments_raise_argument_error_naming_the_argument(call, message):
    with pytest.raises(checks.ArgumentError, match=re.escape(message)):
        call()
