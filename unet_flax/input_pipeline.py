"""tfds -> decoded, resized, in-memory uint8 arrays -> batches. Nothing here knows about models.

Every example is decoded and resized once, in parallel over the cores, and kept in memory as uint8
(about 240 MB for Oxford-IIIT Pet at 128x128); later epochs only gather rows. TensorFlow is never
imported: tfds is read through its numpy path (`as_data_source`, backed by array_record files).

Each process reads only its own shard of a split (examples process_index::process_count), so a
TPU pod host never touches the others' data.

Sources: a tfds name, or `folder:/path` (your own images and masks; see folder.py), decoded by
the same resize path. Train batches may be augmented on the host (augment.py).
bench/input_pipeline.py measures the first pass (decode + resize) and the cached pass.
Crop mode (config.input_mode == 'crop') keeps images at native resolution instead: crops.py.
"""

import concurrent.futures
import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from absl import logging as absl_logging

from unet_flax import augment
from unet_flax import config as config_lib
from unet_flax import decode
from unet_flax import errors
from unet_flax import folder

# Oxford trimaps: 1 pet, 2 background, 3 border; the model's classes are 0, 1, 2.
TRIMAP_OFFSET = 1


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


@contextlib.contextmanager
def _tfds_warnings_off():
  """Drops tfds's warnings about its own directory layout while a data set is not prepared yet
  ('Variant folder ... has no dataset_info.json'): nothing a user can act on. Errors still show."""
  logger = absl_logging.get_absl_logger()

  def keep(record):
    return '/tensorflow_datasets/' not in record.pathname or record.levelno >= logging.ERROR

  logger.addFilter(keep)
  try:
    yield
  finally:
    logger.removeFilter(keep)


def get_builder(dataset: str, data_dir: str | None, mask_pattern: str = '{stem}'):
  """The tfds builder of `dataset`, prepared to array_record files if it is not yet.

  For 'folder:/path', the `folder.Folder` instead, listed and checked (data_dir is not used;
  mask_pattern names its masks).
  """
  if config_lib.folder_path(dataset) is not None:
    return folder.Folder(config_lib.folder_path(dataset), mask_pattern)
  if dataset.split('/')[0] == 'synthetic_pets':
    from unet_flax import synthetic  # pylint: disable=g-import-not-at-top  (registers it)
    builder = synthetic.builder(dataset.partition('/')[2] or None, data_dir)
  elif dataset.split(':')[0] == 'oxford_iiit_pet':
    from unet_flax import pets  # pylint: disable=g-import-not-at-top
    builder = pets.builder(data_dir)
  else:
    try:
      builder = tfds.builder(dataset, data_dir=data_dir, file_format='array_record')
    except tfds.core.registered.DatasetNotFoundError:
      raise errors.UserError(
          f'config.dataset={dataset!r} is not a tfds data set; use oxford_iiit_pet, '
          'synthetic_pets/small, another tfds name, or folder:/path/to/data') from None
  with _tfds_warnings_off():
    prepared = builder.is_prepared()
  if not prepared:  # Under a lock: other processes may be preparing it too.
    from unet_flax import preparation  # pylint: disable=g-import-not-at-top  (orbax: only here)
    preparation.prepare(builder, dataset)
  return builder


def _file_name(example: dict, default: str) -> str:
  name = example.get('file_name', default)
  return name.decode() if isinstance(name, bytes) else str(name)


def decode_example(example: dict, size: int | None, num_classes: int,
                   options: decode.Options = decode.Options()) -> tuple[np.ndarray, np.ndarray]:
  """A tfds oxford_iiit_pet-style example -> image [S, S, 3] uint8, labels [S, S] uint8.

  The image is resized bilinearly; the trimap nearest-neighbour, so that labels stay labels (the
  chapter's bilinear mask resize invents fractional classes along every border). size None: both
  at their stored size, [H, W, 3] and [H, W].

  Raises:
    UserError: naming the file, if the image or trimap cannot be decoded, or if a trimap value is
      not a class (TRIMAP_OFFSET..num_classes).
  """
  name = _file_name(example, '?')
  image = decode.decode(example['image'], size, 'picture', name, options.image_max_value)
  trimap = decode.decode(example['segmentation_mask'], size, 'mask', f'{name} (mask)')
  labels = trimap.astype(np.int64) - TRIMAP_OFFSET
  if labels.min() < 0 or labels.max() >= num_classes:
    raise errors.UserError(
        f'{name} (mask): trimap values {sorted(set(np.unique(trimap).tolist()))} are outside '
        f'{TRIMAP_OFFSET}..{num_classes} (classes 0..{num_classes - 1} after the shift); '
        'fix the mask')
  return image, labels.astype(np.uint8)


def _reader(dataset: str, split: str, data_dir: str | None, image_size: int | None,
            num_classes: int, options: decode.Options):
  """(examples in `split`, index -> (file name, image, labels)) for a tfds or a folder data set.

  image_size None: images and labels at their stored size.
  """
  builder = get_builder(dataset, data_dir, options.mask_pattern)
  if isinstance(builder, folder.Folder):
    examples = builder.examples(split)
    colours = builder.classes and builder.classes['colours']
    return len(examples), lambda i: (examples[i].image.name, *folder.decode_example(
        examples[i], image_size, num_classes, options, colours))
  # Images and masks arrive encoded: decoding with PIL ourselves lets JPEG decode at reduced scale.
  skip = tfds.decode.SkipDecoding()
  try:
    source = builder.as_data_source(split=split,
                                    decoders={'image': skip, 'segmentation_mask': skip})
  except Exception as e:  # pylint: disable=broad-except  (a missing or damaged file: any type)
    raise _damaged(builder, split, None, e) from None

  def read(i):
    try:
      example = source[i]
    except Exception as e:  # pylint: disable=broad-except  (array_record/Riegeli: any type)
      raise _damaged(builder, split, i, e) from None
    return (_file_name(example, f'#{i}'),
            *decode_example(example, image_size, num_classes, options))

  return len(source), read


def _damaged(builder, split: str, index: int | None, e: Exception) -> errors.UserError:
  """The one line for a prepared tfds data set whose files cannot be read: how to rebuild it."""
  lines = str(e).strip().splitlines()
  reason = f'{type(e).__name__}: {lines[0][:160]}' if lines else type(e).__name__
  where = f'example {index} of {split}' if index is not None else split
  return errors.UserError(
      f'{where} of the prepared data set in {builder.data_dir} cannot be read ({reason}); its '
      f'files are damaged or missing: delete {builder.data_dir} and rerun, which prepares it again')


@dataclasses.dataclass(frozen=True)
class Originals(Sequence):
  """A whole split as stored, in load_split's order; each row is read and checked when asked for.

  originals[row] -> (file name, image [H, W, 3] uint8, labels [H, W] uint8 in [0, num_classes)),
  at the example's own size, decoded as load_split decodes it but not resized: the classes of
  tfds trimaps are shifted by TRIMAP_OFFSET, those of folder masks are the values as they are.
  """
  num_examples: int
  read: Callable[[int], tuple[str, np.ndarray, np.ndarray]]

  def __len__(self):
    return self.num_examples

  def __getitem__(self, row: int) -> tuple[str, np.ndarray, np.ndarray]:
    return self.read(range(self.num_examples)[row])  # range: IndexError past the end.


def originals(dataset: str, split: str, data_dir: str | None, num_classes: int,
              options: decode.Options = decode.Options()) -> Originals:
  """The examples of the whole `split` at their original size, for scoring at full resolution."""
  return Originals(*_reader(dataset, split, data_dir, None, num_classes, options))


def num_examples(dataset: str, split: str, data_dir: str | None,
                 mask_pattern: str = '{stem}') -> int:
  """Examples in the whole `split`, without decoding any.

  Raises:
    UserError: if the data set has no such split, saying which it has.
  """
  builder = get_builder(dataset, data_dir, mask_pattern)
  if isinstance(builder, folder.Folder):
    return len(builder.stems(split))
  try:
    return builder.info.splits[split].num_examples
  except (KeyError, ValueError):  # tfds: an unknown split, or a slice it cannot parse.
    raise errors.UserError(
        f'split {split!r} is not a split of {dataset}; use one of '
        f'{", ".join(sorted(builder.info.splits.keys()))}, or a slice such as '
        f'{sorted(builder.info.splits.keys())[0]}[:80%]') from None


def class_names(config) -> tuple[str, ...]:
  """config.class_names, else the data set's own: a folder's classes.json names, Pet's three.

  Raises:
    UserError: if classes.json names another number of classes than config.num_classes.
  """
  path = config_lib.folder_path(config.dataset)
  if config.class_names or path is None:
    return config_lib.class_names(config)
  classes = get_builder(config.dataset, config.data_dir, config.mask_pattern).classes
  if classes is None:
    return config_lib.class_names(config)
  if len(classes['names']) != config.num_classes:
    raise errors.UserError(
        f'{path}/{folder.CLASSES_FILE} names {len(classes["names"])} classes but '
        f'config.num_classes={config.num_classes}; set config.num_classes='
        f'{len(classes["names"])}')
  return classes['names']


def check_data(config) -> int:
  """Prepares the config's data set if needed and checks both splits; -> train examples.

  Raises:
    UserError: naming the config field, if a split does not exist or holds no example.
  """
  counts = {}
  for field in ('train_split', 'eval_split'):
    counts[field] = num_examples(config.dataset, config[field], config.data_dir,
                                 config.mask_pattern)
    if not counts[field]:
      raise errors.UserError(
          f'config.{field}={config[field]!r} of {config.dataset} holds no examples; choose '
          'another split, or give the split examples')
  return counts['train_split']


def load_split(dataset: str, split: str, *, data_dir: str | None, image_size: int,
               num_classes: int, process_index: int = 0, process_count: int = 1,
               num_threads: int = 0, options: decode.Options = decode.Options()) -> Split:
  """Decodes and resizes this process's shard of `split` into memory, in parallel.

  Threads, not processes: most of a decode is in Pillow's C decoders and resize, which release
  the GIL, and worker processes would each import tfds first (bench/input_pipeline.py times both;
  the README has figures).
  """
  total, read = _reader(dataset, split, data_dir, image_size, num_classes, options)
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
