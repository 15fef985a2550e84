"""Crop mode's data: images and masks at native resolution (after config.scale), random crops.

`load_native_split` decodes this process's shard of a split at each example's stored size,
rescaled by config.scale, into input_pipeline's store: kept in memory (a list: sizes differ)
while their total stays under a byte budget (config.cache_bytes), the examples past it decoded
again each time they are drawn. `native_bytes` is what the whole shard takes decoded, read from
the files' headers before any is decoded (the memory check's estimate). `crop_batches` gives one
epoch of train batches: one random crop_size x crop_size crop per example, image and mask cut
together, drawn from (seed, epoch, step, process) so that a resumed run crops exactly as an
uninterrupted one. Images smaller than the crop are padded (images with 0, masks with
config.ignore_label, which then counts nothing). Batches that need decoding are made in worker
threads, a bounded number ahead of the device (input_pipeline.made_ahead).
"""

import concurrent.futures
import math
import os
from collections.abc import Iterator

import numpy as np

from unet_flax import augment
from unet_flax import decode
from unet_flax import input_pipeline
from unet_flax import sources

_SALT = 0xC209  # Keeps the crop stream apart from the shuffle's and the augmentation's.


def _scaled(example, scale: float) -> tuple[np.ndarray, np.ndarray]:
  _, image, labels = example
  return decode.rescale(image, scale, 'picture'), decode.rescale(labels, scale, 'mask')


def load_native_split(source: sources.Source, split: str, *, scale: float = 1.0,
                      cache_bytes: int = 2 * 1024 ** 3, process_index: int = 0,
                      process_count: int = 1, num_threads: int = 0) -> input_pipeline.Split:
  """This process's shard of `split` at native resolution (after scale): decoded in parallel
  into memory until `cache_bytes` are held; later examples are left to be decoded when drawn.

  Raises:
    UserError: naming the file, for an example that cannot be read (those decoded here).
  """
  originals = sources.originals(source, split)
  return input_pipeline.decode_split(
      lambda i: _scaled(originals.read(i), scale), originals.num_examples,
      cache_bytes=cache_bytes, process_index=process_index, process_count=process_count,
      num_threads=num_threads)


def native_bytes(source: sources.Source, split: str, *, scale: float = 1.0,
                 process_index: int = 0, process_count: int = 1, num_threads: int = 0) -> int:
  """The bytes `load_native_split` holds of this process's shard of `split` once every example
  is decoded (image [h, w, 3] and labels [h, w], uint8, each at its stored size times scale),
  from the files' headers alone: known before any pixel is decoded.

  The headers are read in `num_threads` threads (0: one per core): each is a few small reads,
  which mostly wait on the disk (or a bucket) where the files are not in the page cache.

  Raises:
    UserError: naming the file, as its decode does, for a header that cannot be read.
  """
  num_examples, sizes = source.stored_sizes(split)

  def example_bytes(i):
    image, mask = sizes(i)
    return (3 * math.prod(decode.scaled_size(*image, scale))
            + math.prod(decode.scaled_size(*mask, scale)))

  with concurrent.futures.ThreadPoolExecutor(num_threads or os.cpu_count() or 1) as pool:
    # map: the first error in the split's order is raised, and the reads not begun are dropped.
    return sum(pool.map(example_bytes, range(process_index, num_examples, process_count)))


def crop_rng(seed: int, epoch: int, step: int, process_index: int) -> np.random.Generator:
  """The generator of one batch's crop boxes: a function of (seed, epoch, step, process) alone."""
  return np.random.default_rng([_SALT, seed, epoch, step, process_index])


def random_crop(image: np.ndarray, labels: np.ndarray, crop_size: int, rng: np.random.Generator,
                ignore_label: int) -> tuple[np.ndarray, np.ndarray]:
  """One crop_size x crop_size crop of an image and its mask, at one random place for both.

  A side shorter than the crop is padded at the end (image 0, mask ignore_label).

  Returns:
    (image [crop, crop, 3] uint8, labels [crop, crop] uint8), new arrays.
  """
  h, w = labels.shape
  top = int(rng.integers(0, max(h - crop_size, 0) + 1))
  left = int(rng.integers(0, max(w - crop_size, 0) + 1))
  out_image = np.zeros((crop_size, crop_size, 3), np.uint8)
  out_labels = np.full((crop_size, crop_size), ignore_label, np.uint8)
  part = (slice(top, top + crop_size), slice(left, left + crop_size))
  cut_image, cut_labels = image[part], labels[part]
  out_image[:cut_labels.shape[0], :cut_labels.shape[1]] = cut_image
  out_labels[:cut_labels.shape[0], :cut_labels.shape[1]] = cut_labels
  return out_image, out_labels


def crop_batch(split: input_pipeline.Split, rows: np.ndarray, *, crop_size: int, ignore_label: int,
               seed: int, epoch: int, step: int, process_index: int,
               augmentation: augment.Options = augment.Options()) -> dict:
  """The batch of `rows`: a random crop of each, then the augmentations (augment.py).

  Returns:
    {'image': [b, crop, crop, 3] uint8, 'label': [b, crop, crop] uint8}.
  """
  rng = crop_rng(seed, epoch, step, process_index)
  images = np.empty((len(rows), crop_size, crop_size, 3), np.uint8)
  labels = np.empty((len(rows), crop_size, crop_size), np.uint8)
  for i, row in enumerate(rows):
    images[i], labels[i] = random_crop(*split[row], crop_size, rng, ignore_label)
  if augmentation.enabled:
    images, labels = augment.augment(images, labels,
                                     augment.batch_rng(seed, epoch, step, process_index),
                                     augmentation)
  return {'image': images, 'label': labels}


def crop_batches(split: input_pipeline.Split, batch_size: int, *, crop_size: int, ignore_label: int,
                 seed: int, epoch: int, process_index: int, first_step: int = 0,
                 num_steps: int | None = None, augmentation: augment.Options = augment.Options(),
                 num_threads: int = 0) -> Iterator[dict]:
  """One epoch of this process's crop batches, reshuffled from (seed, epoch); starts at
  `first_step`. Arguments as input_pipeline.train_batches, plus the crop's.

  When every example is in memory the batches are made here; else in `num_threads` worker
  threads (0: one per core), a few ahead (input_pipeline.made_ahead). Either way each batch is a
  function of (seed, epoch, step, process) alone.

  Yields:
    {'image': [b, crop, crop, 3] uint8, 'label': [b, crop, crop] uint8}.
  """
  order = input_pipeline.epoch_permutation(seed, epoch, process_index, len(split))
  num_steps = len(split) // batch_size if num_steps is None else num_steps

  def make(step):
    return crop_batch(split, input_pipeline.batch_rows(order, step, batch_size),
                      crop_size=crop_size, ignore_label=ignore_label, seed=seed, epoch=epoch,
                      step=step, process_index=process_index, augmentation=augmentation)

  return input_pipeline.made_ahead(make, range(first_step, num_steps),
                                   in_workers=not split.all_cached, num_threads=num_threads)
