"""Random flips, scale-and-crop and colour changes of train batches, on the host, in numpy.

Flip and scale-and-crop move image and mask together (one crop box and flip per example, for
both), the image sampled bilinearly and the mask nearest-neighbour, so that labels stay labels.
Brightness and contrast change the image only. Each batch draws from its own generator, seeded
from (seed, epoch, step, process), so a resumed run augments exactly as an uninterrupted one.

On the host, not in the jitted step: numpy here is faster than the same ops jitted on the CPU
device, and it overlaps the step (dispatch is asynchronous and `Devices.prefetch` keeps two batches
on the device ahead), so on an accelerator it costs no step time and no device memory.
`python bench/input_pipeline.py --device_augment` measures both ways; docs/speed.md has figures.
"""

import dataclasses

import ml_collections
import numpy as np


_SALT = 0x5EED  # Keeps the augmentation stream apart from the epoch shuffle's.


@dataclasses.dataclass(frozen=True)
class Options:
  """What to draw; the defaults change nothing.

  Attributes:
    flip: flip image and mask left-right, each example with probability 1/2.
    min_scale: crop a square of side in [min_scale, 1] x the image at a random place and resize
      it back to the image size; 1.0: no cropping.
    brightness: add a shift uniform in [-brightness, brightness] x 255 to the image.
    contrast: scale the image about its mean by a factor uniform in [1 - contrast, 1 + contrast].
  """
  flip: bool = False
  min_scale: float = 1.0
  brightness: float = 0.0
  contrast: float = 0.0

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> 'Options':
    """From config.augment_* (checked by config.validate)."""
    return cls(flip=bool(config.augment_flip), min_scale=float(config.augment_min_scale),
               brightness=float(config.augment_brightness),
               contrast=float(config.augment_contrast))

  @property
  def enabled(self) -> bool:
    return self.flip or self.min_scale < 1.0 or self.brightness > 0 or self.contrast > 0


def batch_rng(seed: int, epoch: int, step: int, process_index: int) -> np.random.Generator:
  """The generator of one batch: a function of (seed, epoch, step, process) alone."""
  return np.random.default_rng([_SALT, seed, epoch, step, process_index])


def draw(rng: np.random.Generator, batch_size: int, size: int, options: Options) -> dict:
  """Per-example parameters: crop 'top', 'left', 'side' (px), 'flip', 'brightness', 'contrast'."""
  low = min(size, max(1, int(np.ceil(options.min_scale * size))))
  side = rng.integers(low, size + 1, batch_size)
  return {
      'side': side,
      'top': rng.integers(0, size - side + 1),
      'left': rng.integers(0, size - side + 1),
      'flip': rng.random(batch_size) < 0.5 if options.flip else np.zeros(batch_size, bool),
      'brightness': rng.uniform(-options.brightness, options.brightness, batch_size) * 255,
      'contrast': rng.uniform(1 - options.contrast, 1 + options.contrast, batch_size),
  }


# Examples at a time, so that float32 temporaries (8 x 128 x 128 x 3: 1.5 MB) stay in cache. They
# are allocated once a batch and written with out=: fresh multi-MB arrays are mmapped and
# page-faulted anew by malloc each time, which made the scale-and-crop 3x slower.
_CHUNK = 8


def _nearest(start, side, size):
  """[B, size] source rows (or columns) of crops [start, start + side), resized to `size`.

  PIL's nearest mapping: output pixel i samples floor((i + 0.5) * side / size) of the crop.
  """
  at = np.floor((side / size)[:, None] * (np.arange(size) + 0.5)).astype(np.int64)
  return start[:, None] + np.minimum(at, side[:, None] - 1)


def _bilinear(start, side, size):
  """([B, size] lower source index, [B, size] upper, [B, size] float32 weight of the upper).

  Pixel centres align, as in PIL: output i samples (i + 0.5) * side / size - 0.5 of the crop.
  """
  at = np.clip((side / size)[:, None] * (np.arange(size) + 0.5) - 0.5, 0, (side - 1)[:, None])
  lower = np.floor(at).astype(np.int64)
  upper = np.minimum(lower + 1, (side - 1)[:, None])
  return start[:, None] + lower, start[:, None] + upper, (at - lower).astype(np.float32)


def _flip(index, flip):
  return np.where(flip[:, None], index[:, ::-1], index)


def _crop(images, labels, params, out_labels, scratch, rows_u8):
  """Flip and scale-and-crop. Writes the labels to out_labels; returns the image, in scratch.

  Args:
    images: [b, S, S, 3] uint8; labels: [b, S, S] uint8.
    out_labels: [b, S, S] uint8, written.
    scratch: [4, b, S, S * 3] float32, overwritten; rows_u8: [b * S, S * 3] uint8, overwritten.

  Returns:
    [b, S, S * 3] float32, a view of scratch.
  """
  b, size = images.shape[:2]
  side, flip = params['side'], params['flip']
  first_row = np.arange(b)[:, None] * size
  # The mask: one nearest-neighbour gather, flat indices into [b * S * S].
  rows = _nearest(params['top'], side, size)
  cols = _flip(_nearest(params['left'], side, size), flip)
  np.take(labels.reshape(-1), (first_row[:, :, None] + rows[:, :, None]) * size + cols[:, None, :],
          out=out_labels)
  # The image: separable bilinear, whole rows first (cheap gathers), then single pixels.
  upper, lower, image, right_px = scratch
  top, bottom, wy = _bilinear(params['top'], side, size)
  for rows_f32, source_rows in ((upper, top), (lower, bottom)):
    np.take(images.reshape(b * size, -1), (first_row + source_rows).reshape(-1), axis=0,
            out=rows_u8)
    np.copyto(rows_f32, rows_u8.reshape(rows_f32.shape))
  lower -= upper
  lower *= wy[:, :, None]
  upper += lower  # [b, S, W * 3]: rows interpolated, columns not yet.
  left, right, wx = (_flip(a, flip) for a in _bilinear(params['left'], side, size))
  pixels = upper.reshape(-1, 3)
  row_start = (first_row[:, :, None] + np.arange(size)[None, :, None]) * size
  np.take(pixels, (row_start + left[:, None, :]).reshape(-1), axis=0, out=image.reshape(-1, 3))
  np.take(pixels, (row_start + right[:, None, :]).reshape(-1), axis=0,
          out=right_px.reshape(-1, 3))
  right_px -= image
  right_px *= np.repeat(wx, 3, axis=1)[:, None, :]
  image += right_px
  return image


def _apply_chunk(images, labels, params, out_images, out_labels, scratch, rows_u8):
  """Augments b examples into out_images, out_labels; see `apply`."""
  b, size = images.shape[:2]
  contrast = params['contrast'].astype(np.float32)[:, None, None]
  brightness = params['brightness'].astype(np.float32)[:, None, None]
  coloured = np.any(brightness != 0) or np.any(contrast != 1)
  if np.any(params['side'] < size):
    image = _crop(images, labels, params, out_labels, scratch, rows_u8)
  else:
    flip = params['flip']
    out_images[...], out_labels[...] = images, labels
    out_images[flip], out_labels[flip] = images[flip, :, ::-1], labels[flip, :, ::-1]
    if not coloured:
      return
    image = scratch[0]
    np.copyto(image, out_images.reshape(image.shape))
  if coloured:
    # Contrast about the image's mean (over pixels and channels), then brightness: one affine map.
    mean = image.reshape(b, -1).mean(axis=1)[:, None, None]
    image *= contrast
    image += mean * (1 - contrast) + brightness
  image += 0.5  # Truncating then rounds half up.
  np.clip(image, 0, 255, out=image)
  np.copyto(out_images.reshape(image.shape), image, casting='unsafe')


def apply(images: np.ndarray, labels: np.ndarray, params: dict) -> tuple[np.ndarray, np.ndarray]:
  """Augments a batch as `params` (from `draw`) say; the inputs are not modified.

  Args:
    images: [B, S, S, 3] uint8.
    labels: [B, S, S] uint8.
    params: per-example parameters, each [B].

  Returns:
    (images [B, S, S, 3] uint8, labels [B, S, S] uint8), new arrays.
  """
  batch, size = images.shape[:2]
  out_images, out_labels = np.empty_like(images), np.empty_like(labels)
  chunk = min(_CHUNK, batch)
  scratch = np.empty((4, chunk, size, size * 3), np.float32)
  rows_u8 = np.empty((chunk * size, size * 3), np.uint8)
  for start in range(0, batch, chunk):
    part = slice(start, start + chunk)
    b = len(images[part])
    _apply_chunk(images[part], labels[part], {k: v[part] for k, v in params.items()},
                 out_images[part], out_labels[part], scratch[:, :b], rows_u8[:b * size])
  return out_images, out_labels


def augment(images: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
            options: Options) -> tuple[np.ndarray, np.ndarray]:
  """Draws each example's parameters from `rng` and applies them; off: the inputs unchanged."""
  if not options.enabled:
    return images, labels
  return apply(images, labels, draw(rng, len(images), images.shape[1], options))
