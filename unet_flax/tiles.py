"""Sliding-window (overlap-tile) inference: any image, at its own resolution, in fixed-size windows.

An image [H, W, 3] of any size is covered by crop_size x crop_size windows that overlap by
`overlap` (config.tile_overlap) of a window; the windows go through ONE jitted forward pass
(models.forward, jitted) in batches of a fixed shape [window_batch, crop, crop, 3] (the last batch
padded), so it compiles once whatever the image. Each window's logits are weighted by a Gaussian
that falls off towards its edges (sigma = 0.125 x crop_size, MONAI's sliding_window_inference
default), where a convolutional network sees the least context, and summed into one [H, W, K]
float32 accumulator; the classes are its argmax. Images smaller than a window are padded with
zeros and the result cropped back. Nothing is resized, so memory is the window batch plus the
accumulator: a 20000 x 500 strip with 2 classes needs 80 MB.

Crop mode (modes.Crop) rescales an image by config.scale first, as the trainer rescales its data,
and brings the classes back to the image's own size nearest-neighbour.
"""

import numpy as np

SIGMA_SCALE = 0.125  # Of the window's side: MONAI's default.
MIN_WEIGHT = 1e-3  # MONAI's floor: window corners still count a little, and no pixel gets 0.
WINDOW_BATCH = 8  # Windows per forward pass, by default.


def gaussian_weight(crop_size: int, sigma_scale: float = SIGMA_SCALE) -> np.ndarray:
  """[crop, crop] float32: a Gaussian centred on the window, 1 at its centre, >= MIN_WEIGHT."""
  centre = (crop_size - 1) / 2
  x = np.arange(crop_size) - centre
  g = np.exp(-0.5 * (x / (sigma_scale * crop_size)) ** 2)
  weight = np.outer(g, g)
  return np.maximum(weight / weight.max(), MIN_WEIGHT).astype(np.float32)


def window_starts(length: int, crop_size: int, overlap: float) -> list[int]:
  """Starts of the windows along one side of `length` >= crop_size px, MONAI's scan.

  Windows step by int(crop_size x (1 - overlap)) (at least 1); the last one is moved back so that
  it ends at the edge.
  """
  if length <= crop_size:
    return [0]
  stride = max(1, int(crop_size * (1 - overlap)))
  count = -(-(length - crop_size) // stride) + 1
  return sorted({min(i * stride, length - crop_size) for i in range(count)})


def _accumulate(forward, params, image: np.ndarray, crop_size: int, overlap: float,
                window_batch: int, weights: np.ndarray | None) -> np.ndarray:
  """The Gaussian-weighted sum of window logits over the padded image: [H', W', K] float32.

  H' = max(H, crop), W' likewise. `weights` [H', W'] float32, if given, receives the summed
  weights.
  """
  h, w = image.shape[:2]
  padded_h, padded_w = max(h, crop_size), max(w, crop_size)
  if (padded_h, padded_w) != (h, w):
    image = np.pad(image, ((0, padded_h - h), (0, padded_w - w), (0, 0)))
  boxes = [(top, left) for top in window_starts(padded_h, crop_size, overlap)
           for left in window_starts(padded_w, crop_size, overlap)]
  gauss = gaussian_weight(crop_size)
  total = None
  pending = None  # (boxes, logits on the device): the next batch is dispatched before fetching.

  def add(done_boxes, logits):
    nonlocal total
    logits = np.asarray(logits)
    if total is None:
      total = np.zeros((padded_h, padded_w, logits.shape[-1]), np.float32)
    for (top, left), window in zip(done_boxes, logits):
      total[top:top + crop_size, left:left + crop_size] += window * gauss[:, :, None]
      if weights is not None:
        weights[top:top + crop_size, left:left + crop_size] += gauss

  for start in range(0, len(boxes), window_batch):
    chunk = boxes[start:start + window_batch]
    # A fresh array each time: on CPU jax may read the numpy buffer itself, after this returns.
    batch = np.zeros((window_batch, crop_size, crop_size, 3), np.uint8)  # The last: padded.
    for i, (top, left) in enumerate(chunk):
      batch[i] = image[top:top + crop_size, left:left + crop_size]
    logits = forward(params, batch)  # Asynchronous: the device works while the host adds.
    if pending is not None:
      add(*pending)
    pending = (chunk, logits)
  add(*pending)
  return total


def sliding_window_logits(forward, params, image: np.ndarray, *, crop_size: int,
                          overlap: float = 0.25,
                          window_batch: int = WINDOW_BATCH) -> np.ndarray:
  """The blended logits of an image of any size: the weighted mean over the windows.

  Args:
    forward: (params, [window_batch, crop, crop, 3] uint8) -> [window_batch, crop, crop, K]
      float32, e.g. jax.jit(models.forward(config)).
    params: the model's parameters.
    image: [H, W, 3] uint8, any H, W >= 1.
    crop_size: the window's side, divisible by 2**len(widths).
    overlap: the fraction of a window shared with its neighbour, in [0, 1).
    window_batch: windows per forward pass.

  Returns:
    [H, W, K] float32.
  """
  h, w = image.shape[:2]
  weights = np.zeros((max(h, crop_size), max(w, crop_size)), np.float32)
  total = _accumulate(forward, params, image, crop_size, overlap, window_batch, weights)
  total /= weights[:, :, None]
  return total[:h, :w]


def sliding_window_classes(forward, params, image: np.ndarray, *, crop_size: int,
                           overlap: float = 0.25,
                           window_batch: int = WINDOW_BATCH) -> np.ndarray:
  """The classes of an image of any size: [H, W, 3] uint8 -> [H, W] uint8 (the argmax).

  The argmax of the weighted sum equals that of the weighted mean (each pixel's weights sum to
  one positive number), so no weight map is kept: one [H, W, K] float32 accumulator in all.
  Arguments as `sliding_window_logits`.
  """
  h, w = image.shape[:2]
  total = _accumulate(forward, params, image, crop_size, overlap, window_batch, None)[:h, :w]
  classes = np.empty((h, w), np.uint8)
  rows = max(1, (1 << 22) // max(1, w * total.shape[-1]))  # argmax's int64 temporary stays small.
  for top in range(0, h, rows):
    classes[top:top + rows] = total[top:top + rows].argmax(axis=-1)
  return classes
