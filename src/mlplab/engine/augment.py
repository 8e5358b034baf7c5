"""Data augmentation of training batches, drawn afresh for every batch.

Images stay rows: a batch is X: (b, C*H*W) float in the datasets' layout, C channel
planes of H x W pixels, row-major (see data.rows_to_images). An augmentation is a
callable (X, rng) -> (b, C*H*W) that transforms one batch, never the training set,
with every random choice drawn from `rng` (a np.random.Generator): the same
generator state gives the same batch.

- "none": no augmentation (`make_augment` returns None, which the trainer skips).
- "flip_translate": each image is mirrored left-right with probability 1/2, then
  moved by up to `max_shift` pixels in y and in x, independently and uniformly; the
  pixels moved in from outside are 0, which in the standardised rows is the training
  mean of that pixel, not black.

The work per batch is a copy into a zero-bordered buffer kept between batches and one
window slice per image: no index arrays of batch size and no fresh large buffers,
whose page faults cost more than the copying itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mlplab.engine import checks

AUGMENTS = ("none", "flip_translate")
SETTINGS = {"none": (), "flip_translate": ("max_shift", "flip", "image_shape")}
CIFAR_IMAGE_SHAPE = (32, 32, 3)  # (height, width, channels), as Dataset.image_shape
FLIP_PROBABILITY = 0.5


def padded_buffer(batch: int, image_shape, max_shift: int, dtype=np.float32) -> np.ndarray:
    """Zeros (batch, C, H + 2 max_shift, W + 2 max_shift): images go in the middle,
    and a shifted image is a window of it, with the zero border moving in."""
    h, w, c = image_shape
    return np.zeros((batch, c, h + 2 * max_shift, w + 2 * max_shift), dtype)


def flip_translate(X, flip, dy, dx, image_shape=CIFAR_IMAGE_SHAPE, buffer=None) -> np.ndarray:
    """Mirror and shift each image of a batch into a new array; X is left alone.

    X: (b, C*H*W) rows; flip: (b,) bool, mirror image i left-right first; dy, dx: (b,)
    ints, then move it dy pixels down and dx to the right (negative: up, left):
    out[i](y, x) = flipped X[i](y - dy[i], x - dx[i]), 0 where that is outside the
    image. X is standardised, so 0 is the training mean of that pixel (the average
    image shows through), not black.
    buffer: from padded_buffer(b, image_shape, s, X.dtype) with s >= every |dy|, |dx|;
    pass the same one on every call (only its middle is written, so its border stays
    zero) to save allocating it.
    """
    h, w, c = image_shape
    b = len(X)
    if buffer is None:
        reach = int(max(np.abs(dy).max(initial=0), np.abs(dx).max(initial=0)))
        buffer = padded_buffer(b, image_shape, reach, X.dtype)
    s = (buffer.shape[2] - h) // 2
    images = X.reshape(b, c, h, w)
    middle = buffer[:, :, s:s + h, s:s + w]
    np.copyto(middle, images)
    middle[flip] = images[flip][..., ::-1]
    out = np.empty((b, c, h, w), X.dtype)
    for i, (y0, x0) in enumerate(zip(s - dy, s - dx, strict=True)):  # corners in buffer
        out[i] = buffer[i, :, y0:y0 + h, x0:x0 + w]
    return out.reshape(b, c * h * w)


@dataclass
class FlipTranslate:
    """Random left-right flips and translations of up to max_shift pixels.

    Per image: flipped with probability FLIP_PROBABILITY (if `flip`), then shifted by
    dy, dx drawn uniformly from -max_shift..max_shift each; zero fill (see
    flip_translate). max_shift=0 with flip=False is the identity.
    """

    max_shift: int = 4
    flip: bool = True
    image_shape: tuple[int, int, int] = CIFAR_IMAGE_SHAPE
    _buffer: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        limit = (min(self.image_shape[:2]) - 1) // 2  # 15 for CIFAR's 32 x 32
        checks.require(isinstance(self.max_shift, (int, np.integer))
                       and not isinstance(self.max_shift, bool)
                       and 0 <= self.max_shift <= limit,
                       "max_shift", self.max_shift, f"must be an integer in 0..{limit}")
        checks.require(isinstance(self.flip, bool), "flip", self.flip,
                       "must be true or false")

    def __call__(self, X, rng) -> np.ndarray:
        """X: (b, C*H*W) -> augmented copy (b, C*H*W)."""
        b = len(X)
        flip = rng.random(b) < FLIP_PROBABILITY if self.flip else np.zeros(b, bool)
        dy, dx = rng.integers(-self.max_shift, self.max_shift + 1, size=(2, b))
        if self._buffer is None or len(self._buffer) != b or self._buffer.dtype != X.dtype:
            self._buffer = padded_buffer(b, self.image_shape, self.max_shift, X.dtype)
        return flip_translate(X, flip, dy, dx, self.image_shape, self._buffer)


def make_augment(name: str, **settings):
    """The augmentation called `name` (one of AUGMENTS): None for "none", else a
    FlipTranslate with the given settings (max_shift, flip, image_shape)."""
    checks.one_of("augment", name, AUGMENTS)
    checks.settings_of("augment", name, settings, SETTINGS[name])
    return None if name == "none" else FlipTranslate(**settings)
