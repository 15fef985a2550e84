"""Host augmentation: against PIL's crop-and-resize, mask-only and image-only effects, seeding."""

import numpy as np
from PIL import Image

from configs import default
from unet_flax import augment

SIZE = 16  # A power of two: no output pixel centre falls exactly on a source pixel boundary.


def _batch(n=11, seed=0):
  """n is not a multiple of augment's chunk of 8, so a partial chunk is exercised too."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)
  labels = rng.integers(0, 3, (n, SIZE, SIZE), dtype=np.uint8)
  return images, labels


def _pil_reference(image, labels, top, left, side, flip):
  """One example through PIL: crop the square, resize it back (image bilinear, mask nearest)."""
  box = (left, top, left + side, top + side)
  image = np.asarray(Image.fromarray(image).crop(box).resize((SIZE, SIZE), Image.BILINEAR))
  labels = np.asarray(Image.fromarray(labels).crop(box).resize((SIZE, SIZE), Image.NEAREST))
  return (image[:, ::-1], labels[:, ::-1]) if flip else (image, labels)


def test_off_is_the_identity():
  images, labels = _batch()
  out_images, out_labels = augment.augment(images, labels, np.random.default_rng(0),
                                           augment.Options())
  np.testing.assert_array_equal(out_images, images)
  np.testing.assert_array_equal(out_labels, labels)
  assert augment.Options.from_config(default.get_config()) == augment.Options()  # Default: off.


def test_flip_and_crop_match_pil_and_move_image_and_mask_together():
  images, labels = _batch()
  options = augment.Options(flip=True, min_scale=0.4)
  params = augment.draw(np.random.default_rng(1), len(images), SIZE, options)
  assert params['flip'].any() and not params['flip'].all()
  assert (params['side'] < SIZE).any()
  out_images, out_labels = augment.apply(images, labels, params)
  assert set(np.unique(out_labels)) <= {0, 1, 2}
  for i in range(len(images)):
    want_image, want_labels = _pil_reference(
        images[i], labels[i], *(int(params[k][i]) for k in ('top', 'left', 'side', 'flip')))
    np.testing.assert_array_equal(out_labels[i], want_labels)  # Pixel-exact.
    # PIL interpolates in fixed point: at most 1 apart after rounding.
    assert np.abs(out_images[i].astype(int) - want_image).max() <= 1


def test_flip_alone_mirrors_image_and_mask_exactly():
  images, labels = _batch()
  params = augment.draw(np.random.default_rng(2), len(images), SIZE, augment.Options(flip=True))
  out_images, out_labels = augment.apply(images, labels, params)
  flip = params['flip']
  np.testing.assert_array_equal(out_images[flip], images[flip][:, :, ::-1])
  np.testing.assert_array_equal(out_labels[flip], labels[flip][:, :, ::-1])
  np.testing.assert_array_equal(out_images[~flip], images[~flip])
  np.testing.assert_array_equal(out_labels[~flip], labels[~flip])


def test_brightness_and_contrast_change_the_image_only():
  images, labels = _batch()
  options = augment.Options(brightness=0.2, contrast=0.3)
  params = augment.draw(np.random.default_rng(3), len(images), SIZE, options)
  out_images, out_labels = augment.apply(images, labels, params)
  np.testing.assert_array_equal(out_labels, labels)
  x = images.astype(np.float64)
  mean = x.mean(axis=(1, 2, 3), keepdims=True)
  c = params['contrast'][:, None, None, None]
  want = np.clip(np.floor((x - mean) * c + mean + params['brightness'][:, None, None, None] + 0.5),
                 0, 255)
  assert np.abs(out_images - want).max() <= 1  # float32 vs float64 at .5 boundaries.
  assert np.mean(out_images != want) < 0.01
  assert not np.array_equal(out_images, images)


def test_batches_are_seeded_by_seed_epoch_step_and_process():
  images, labels = _batch()
  options = augment.Options(flip=True, min_scale=0.5, brightness=0.1, contrast=0.1)
  run = lambda *key: augment.augment(images, labels, augment.batch_rng(*key), options)[0]
  np.testing.assert_array_equal(run(0, 1, 2, 0), run(0, 1, 2, 0))
  for other in [(1, 1, 2, 0), (0, 2, 2, 0), (0, 1, 3, 0), (0, 1, 2, 1)]:
    assert not np.array_equal(run(0, 1, 2, 0), run(*other)), other
