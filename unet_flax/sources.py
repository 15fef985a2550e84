"""The data sets a run reads: a tfds data set or a folder of your own, opened once per run.

`open_source(dataset, data_dir, num_classes, options)` (or `source_of(config)`) returns a `Source`:
its splits' sizes, a reader of each split (decoded, at a size or as stored), the encoded pictures
with their labels (what predict is given, and its truth), and its class names. A tfds data set is
prepared to array_record files on first use (preparation.py: under a lock) and read through its
numpy path (`as_data_source`): TensorFlow is never imported. A folder (`folder:/path`) is listed
and checked once (folder.py). Both decode pictures through decode.decode, the trainer's and
predict's one picture path.
"""

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow_datasets as tfds
from absl import logging as absl_logging

from unet_flax import config as config_lib
from unet_flax import decode
from unet_flax import errors
from unet_flax import folder
from unet_flax import preparation
from unet_flax.config import FOLDER_PREFIX

# Oxford trimaps: 1 pet, 2 background, 3 border; the model's classes are 0, 1, 2.
TRIMAP_OFFSET = 1


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


def _builder(dataset: str, data_dir: str | None, prepare: bool = True):
  """The tfds builder of `dataset`, prepared to array_record files if it is not yet (with
  prepare=False a data set not prepared yet is a UserError instead: nothing is written)."""
  with _tfds_warnings_off():
    builder = _tfds_builder(dataset, data_dir)
    prepared = builder.is_prepared()
    if not prepared and not prepare:
      raise errors.UserError(
          f'the data set {dataset} is not prepared in {data_dir}, the data_dir of the run\'s '
          'config.json, and this tool writes nowhere but the workdir and --out; pass --data_dir '
          'to prepare it where you choose')
    if not prepared:  # Under a lock: other processes may be preparing it too.
      preparation.prepare(builder, dataset)
  return builder


def _tfds_builder(dataset: str, data_dir: str | None):
  """The tfds builder `dataset` names (synthetic_pets, the Pet archives or any tfds data set)."""
  if dataset.split('/')[0] == 'synthetic_pets':
    from unet_flax import synthetic  # pylint: disable=g-import-not-at-top  (registers it)
    return synthetic.builder(dataset.partition('/')[2] or None, data_dir)
  if dataset.split(':')[0] == 'oxford_iiit_pet':
    from unet_flax import pets  # pylint: disable=g-import-not-at-top
    return pets.builder(data_dir)
  try:
    return tfds.builder(dataset, data_dir=data_dir, file_format='array_record')
  except tfds.core.registered.DatasetNotFoundError:
    raise errors.UserError(
        f'config.dataset={dataset!r} is not a tfds data set; use oxford_iiit_pet, '
        'synthetic_pets/small, another tfds name, or folder:/path/to/data') from None


def _file_name(example: dict, default: str) -> str:
  name = example.get('file_name', default)
  return name.decode() if isinstance(name, bytes) else str(name)


def trimap_labels(trimap: np.ndarray, num_classes: int, what: str) -> np.ndarray:
  """An Oxford trimap [H, W] (values 1..K) -> classes [H, W] uint8 (0..K-1).

  Raises:
    UserError: naming `what`, if a value is not a class (TRIMAP_OFFSET..num_classes).
  """
  labels = trimap.astype(np.int64) - TRIMAP_OFFSET
  if labels.min() < 0 or labels.max() >= num_classes:
    raise errors.UserError(
        f'{what}: trimap values {sorted(set(np.unique(trimap).tolist()))} are outside '
        f'{TRIMAP_OFFSET}..{num_classes} (classes 0..{num_classes - 1} after the shift); '
        'fix the mask')
  return labels.astype(np.uint8)


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
  return image, trimap_labels(trimap, num_classes, f'{name} (mask)')


# A split's examples as (file name, encoded picture, labels [H, W] uint8 at the stored size).
Encoded = tuple[str, bytes, np.ndarray]
# An example's ((height, width) of its picture, (height, width) of its mask), as stored.
StoredSizes = tuple[tuple[int, int], tuple[int, int]]


class Source:
  """A data set, opened once per run: its splits' sizes, readers of a split, its class names.

  `open_source` returns the kind that fits the data set's name (a tfds data set, or a folder of
  your own); both give the same methods, so no caller tells them apart.

  Attributes:
    name: config.dataset.
    num_classes: K; labels are 0..K-1 (or the options' ignore_label).
    options: how files are read (decode.Options).
    class_names: the data set's own names of its classes (a folder's classes.json), or None.
  """
  name: str
  num_classes: int
  options: decode.Options
  class_names: tuple[str, ...] | None = None

  def num_examples(self, split: str) -> int:
    """Examples in the whole `split`, without decoding any.

    Raises:
      UserError: if the data set has no such split, saying which it has.
    """
    raise NotImplementedError

  def stems(self, split: str) -> list[str] | None:
    """The names of `split`'s examples (a folder's file stems), where the data set lists them
    without reading any; None where it cannot (tfds: a slice's rows are known only once read)."""
    return None

  def reader(self, split: str, image_size: int | None
             ) -> tuple[int, Callable[[int], tuple[str, np.ndarray, np.ndarray]]]:
    """(examples in `split`, index -> (file name, image [S, S, 3] uint8, labels [S, S] uint8)):
    pictures bilinear and labels nearest at image_size x image_size, or (None) both at their
    stored size."""
    raise NotImplementedError

  def encoded(self, split: str) -> tuple[int, Callable[[int], Encoded]]:
    """(examples in `split`, index -> (file name, the picture's encoded bytes, labels [H, W]
    uint8 at the stored size)): what predict would be given, and its truth."""
    raise NotImplementedError

  def stored_sizes(self, split: str) -> tuple[int, Callable[[int], StoredSizes]]:
    """(examples in `split`, index -> the (height, width) of its picture and of its mask as
    stored), read from the files' headers alone (decode.stored_size: no pixel is decoded, the
    EXIF rotation not applied); a header that cannot be read is the UserError its decode gives."""
    raise NotImplementedError


class _TfdsSource(Source):
  """A tfds data set, read through its numpy path (as_data_source over array_record files)."""

  def __init__(self, dataset: str, data_dir: str | None, num_classes: int,
               options: decode.Options, prepare: bool = True):
    self.name, self.num_classes, self.options = dataset, num_classes, options
    self._builder = _builder(dataset, data_dir, prepare)

  def num_examples(self, split: str) -> int:
    try:
      return self._builder.info.splits[split].num_examples
    except (KeyError, ValueError):  # tfds: an unknown split, or a slice it cannot parse.
      names = sorted(self._builder.info.splits.keys())
      raise errors.UserError(
          f'split {split!r} is not a split of {self.name}; use one of {", ".join(names)}, or a '
          f'slice such as {names[0]}[:80%]') from None

  def _examples(self, split: str) -> tuple[int, Callable[[int], dict]]:
    # An unknown split: one line naming those there are; an empty one (test[:0]) one line too,
    # since tfds cannot open a split of no files and that reads as damage below.
    check_split(self, split, f'split {split!r} of {self.name}')
    # Images and masks arrive encoded: decoding with PIL ourselves lets JPEG decode at reduced
    # scale.
    skip = tfds.decode.SkipDecoding()
    builder = self._builder
    try:
      source = builder.as_data_source(split=split,
                                      decoders={'image': skip, 'segmentation_mask': skip})
    except Exception as e:  # pylint: disable=broad-except  (a missing or damaged file: any type)
      raise _damaged(builder, split, None, e) from None

    def example(i):
      try:
        return source[i]
      except Exception as e:  # pylint: disable=broad-except  (array_record/Riegeli: any type)
        raise _damaged(builder, split, i, e) from None
    return len(source), example

  def reader(self, split, image_size):
    count, example = self._examples(split)

    def read(i):
      e = example(i)
      return (_file_name(e, f'#{i}'),
              *decode_example(e, image_size, self.num_classes, self.options))
    return count, read

  def encoded(self, split):
    count, example = self._examples(split)

    def read(i):
      e = example(i)
      name = _file_name(e, f'#{i}')
      trimap = decode.decode(e['segmentation_mask'], None, 'mask', f'{name} (mask)')
      return name, e['image'], trimap_labels(trimap, self.num_classes, f'{name} (mask)')
    return count, read

  def stored_sizes(self, split):
    count, example = self._examples(split)

    def sizes(i):
      e = example(i)  # The record's encoded files: the headers are in their first bytes.
      name = _file_name(e, f'#{i}')
      return (decode.stored_size(e['image'], name),
              decode.stored_size(e['segmentation_mask'], f'{name} (mask)'))
    return count, sizes


class _FolderSource(Source):
  """`folder:/path`: your own images and masks (folder.py), listed and checked once."""

  def __init__(self, path: str, num_classes: int, options: decode.Options):
    self.name, self.num_classes, self.options = FOLDER_PREFIX + path, num_classes, options
    self._folder = folder.Folder(path, options.mask_pattern)
    classes = self._folder.classes
    self.class_names = classes and classes['names']
    self._colours = classes and classes['colours']

  def num_examples(self, split):
    return len(self._folder.stems(split))

  def stems(self, split: str) -> list[str]:
    return self._folder.stems(split)

  def _decode(self, example: folder.Example, size: int | None):
    return folder.decode_example(example, size, self.num_classes, self.options, self._colours)

  def _examples(self, split: str) -> list[folder.Example]:
    examples = self._folder.examples(split)
    if not examples:
      raise _no_examples(f'split {split!r} of {self.name}')
    return examples

  def reader(self, split, image_size):
    examples = self._examples(split)
    return len(examples), lambda i: (examples[i].image.name,
                                     *self._decode(examples[i], image_size))

  def encoded(self, split):
    examples = self._examples(split)

    def read(i):
      data = decode.read_bytes(examples[i].image)  # Read once; only its header is decoded here.
      return examples[i].image.name, data, folder.decode_labels(
          examples[i], data, self.num_classes, self.options, self._colours)
    return len(examples), read

  def stored_sizes(self, split):
    examples = self._examples(split)
    return len(examples), lambda i: (decode.stored_size(examples[i].image, examples[i].image),
                                     decode.stored_size(examples[i].mask, examples[i].mask))


def open_source(dataset: str, data_dir: str | None, num_classes: int,
                options: decode.Options = decode.Options(), *, prepare: bool = True) -> Source:
  """The data set `dataset` (a tfds name, prepared if it is not yet; or folder:/path, listed and
  checked), opened once: make one per run and pass it down.

  Raises:
    UserError: an unknown tfds name, a folder that is not laid out as folder.py says, or a disk
      that cannot hold the prepared data set.
  """
  path = config_lib.folder_path(dataset)
  if path is not None:
    return _FolderSource(path, num_classes, options)
  return _TfdsSource(dataset, data_dir, num_classes, options, prepare)


def source_of(config) -> Source:
  """The data set of a run's config (`open_source`)."""
  return open_source(config.dataset, config.data_dir, config.num_classes,
                     decode.Options.from_config(config))


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

  def __getitem__(self, row: int):
    return self.read(range(self.num_examples)[row])  # range: IndexError past the end.


def originals(source: Source, split: str) -> Originals:
  """The examples of the whole `split` at their original size, decoded."""
  return Originals(*source.reader(split, None))


def encoded_originals(source: Source, split: str) -> Originals:
  """The examples of the whole `split` as (file name, encoded picture, labels at their original
  size): what predict is given, and its truth."""
  return Originals(*source.encoded(split))


def class_names(config, source: Source) -> tuple[str, ...]:
  """config.class_names, else the data set's own: a folder's classes.json names, Pet's three.

  Raises:
    UserError: if classes.json names another number of classes than config.num_classes.
  """
  if config.class_names or source.class_names is None:
    return config_lib.class_names(config)
  if len(source.class_names) != config.num_classes:
    raise errors.UserError(
        f'{config_lib.folder_path(config.dataset)}/{folder.CLASSES_FILE} names '
        f'{len(source.class_names)} classes but config.num_classes={config.num_classes}; set '
        f'config.num_classes={len(source.class_names)}')
  return tuple(source.class_names)


def _no_examples(what: str) -> errors.UserError:
  return errors.UserError(f'{what} holds no examples; choose another split or a slice that holds '
                          'some')


def check_split(source: Source, split: str, what: str) -> int:
  """-> examples in `split`, counted without reading any (Source.num_examples).

  Raises:
    UserError: if the data set has no such split; naming `what` (the flag or config field that
      chose it), if the split or slice holds no example.
  """
  count = source.num_examples(split)
  if not count:
    raise _no_examples(what)
  return count


def check_data(config, source: Source) -> int:
  """Checks that both splits of the config exist, hold examples and, where the data set lists
  its examples' names (Source.stems), share none; -> train examples.

  Raises:
    UserError: naming the config field, if a split does not exist or holds no example; naming
      both fields and the first shared images, if the splits overlap.
  """
  named = {field: f'config.{field}={config[field]!r}' for field in ('train_split', 'eval_split')}
  counts = {field: check_split(source, config[field], f'{what} of {config.dataset}')
            for field, what in named.items()}
  train, test = (source.stems(config[field]) for field in named)
  both = [] if train is None or test is None else sorted(set(train) & set(test))
  if both:  # Its scores would be of images it trained on.
    raise errors.UserError(
        f'{named["train_split"]} and {named["eval_split"]} of {config.dataset} share '
        f'{folder.listed(both)}; the evaluation set must not overlap the training set: choose '
        'splits that share none (evaluate.py --split scores any split after training)')
  return counts['train_split']
