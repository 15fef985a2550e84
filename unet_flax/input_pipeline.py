"""A data set's splits -> decoded, resized, in-memory uint8 arrays -> batches. Nothing here knows
about models.

Every example is decoded and resized once, in parallel over the cores, and kept in memory as uint8
(about 240 MB for Oxford-IIIT Pet at 128x128); later epochs only gather rows. The data set is a
sources.Source (a tfds data set or your own folder), opened once per run.

Each process reads only its own shard of a split (examples process_index::process_count), so a
TPU pod host never touches the others' data. Train batches may be augmented on the host
(augment.py). bench/input_pipeline.py measures the first pass (decode + resize) and the cached
pass. Crop mode reads the same sources at native resolution (crops.py).
"""

import concurrent.futures
import dataclasses
import os
from collections.abc import Iterator

import numpy as np

from unet_flax import augment
from unet_flax import sources


@dataclasses.dataclass(frozen=True)
class Split:
  """One process's shard of a split, resized, in memory.

  Attributes:
    images: [N, S, S, 3] uint8.
    labels: [N, S, S] uint8 in [0, num_classes).
    num_examples: examples in the whole split, over all processes.
  """
  images: np.ndarray
  labels: np.ndarray
  num_examples: int

  def __len__(self):
    return len(self.images)

  def __getitem__(self, row: int) -> tuple[np.ndarray, np.ndarray]:
    """(image [S, S, 3] uint8, labels [S, S] uint8) of a row."""
    return self.images[row], self.labels[row]


def load_split(source: sources.Source, split: str, *, image_size: int, process_index: int = 0,
               process_count: int = 1, num_threads: int = 0) -> Split:
  """Decodes and resizes this process's shard of `split` into memory, in parallel.

  Threads, not processes: most of a decode is in Pillow's C decoders and resize, which release
  the GIL, and worker processes would each import tfds first (bench/input_pipeline.py times both;
  docs/speed.md has figures).
  """
  total, read = source.reader(split, image_size)
  indices = range(process_index, total, process_count)
  images = np.empty((len(indices), image_size, image_size, 3), np.uint8)
  labels = np.empty((len(indices), image_size, image_size), np.uint8)

  def work(row_and_index):
    row, index = row_and_index
    _, images[row], labels[row] = read(index)

  threads = num_threads or os.cpu_count() or 1
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    # list() re-raises the first worker error here.
    list(pool.map(work, enumerate(indices)))
  return Split(images, labels, total)


def epoch_permutation(seed: int, epoch: int, process_index: int, n: int) -> np.ndarray:
  """The order of this process's shard in `epoch`: a function of (seed, epoch, process) alone."""
  return np.random.default_rng([seed, epoch, process_index]).permutation(n)


def train_batches(split: Split, batch_size: int, *, seed: int, epoch: int, process_index: int,
                  first_step: int = 0, num_steps: int | None = None,
                  augmentation: augment.Options = augment.Options()) -> Iterator[dict]:
  """One epoch of this process's batches, reshuffled from (seed, epoch); starts at `first_step`.

  Args:
    split: this process's shard.
    batch_size: this process's part of the global batch.
    num_steps: batches in the epoch; by default as many full batches as the shard holds. More
      than that wrap around the epoch's order.
    augmentation: what to draw for each batch, from (seed, epoch, step, process); none by default.

  Yields:
    {'image': [b, S, S, 3] uint8, 'label': [b, S, S] uint8}, arrays of their own.
  """
  order = epoch_permutation(seed, epoch, process_index, len(split))
  num_steps = len(split) // batch_size if num_steps is None else num_steps
  for step in range(first_step, num_steps):
    positions = np.arange(step * batch_size, (step + 1) * batch_size) % len(order)
    rows = np.sort(order[positions])  # Sorted: the gather reads memory in order.
    images, labels = split.images[rows], split.labels[rows]
    if augmentation.enabled:
      images, labels = augment.augment(images, labels,
                                       augment.batch_rng(seed, epoch, step, process_index),
                                       augmentation)
    yield {'image': images, 'label': labels}


def num_eval_batches(num_examples: int, batch_size: int, process_count: int) -> int:
  """Batches each process runs so that all run the same number and every example is seen."""
  largest_shard = -(-num_examples // process_count)
  return -(-largest_shard // batch_size)


def eval_batches(split: Split, batch_size: int, process_count: int = 1) -> Iterator[dict]:
  """Every example of this process's shard once, zero-padded; 'mask' is 0 on padding.

  Yields:
    {'image': [b, S, S, 3] uint8, 'label': [b, S, S] uint8, 'mask': [b] bool}.
  """
  for i in range(num_eval_batches(split.num_examples, batch_size, process_count)):
    rows = slice(i * batch_size, (i + 1) * batch_size)
    images, labels = split.images[rows], split.labels[rows]
    pad = batch_size - len(images)
    yield {
        'image': np.pad(images, ((0, pad), (0, 0), (0, 0), (0, 0))),
        'label': np.pad(labels, ((0, pad), (0, 0), (0, 0))),
        'mask': np.arange(batch_size) < len(images),
    }
