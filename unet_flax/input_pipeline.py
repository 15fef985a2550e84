"""tfds -> decoded, resized, in-memory uint8 arrays -> batches. Nothing here knows about models.

Every example is decoded and resized once, in parallel over the cores, and kept in memory as uint8
(about 240 MB for Oxford-IIIT Pet at 128x128); later epochs only gather rows. TensorFlow is never
imported: tfds is read through its numpy path (`as_data_source`, backed by array_record files).

Each process reads only its own shard of a split (examples process_index::process_count), so a
TPU pod host never touches the others' data.

Sources: a tfds name, or `folder:/path` (your own images and masks; see folder.py), decoded by
the same resize path. Train batches may be augmented on the host (augment.py).
bench/input_pipeline.py measures the first pass (decode + resize) and the cached pass.
"""

import concurrent.futures
import dataclasses
import io
import os
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from unet_flax import augment
from unet_flax import errors

# Oxford trimaps: 1 pet, 2 background, 3 border; the model's classes are 0, 1, 2.
TRIMAP_OFFSET = 1
CLASS_NAMES = ('pet', 'background', 'border')

# PIL modes that hold one value a pixel: 1-bit, 8-bit grey, palette indices, 16/32-bit integers.
MASK_MODES = ('1', 'L', 'P', 'I', 'I;16', 'I;16L', 'I;16B', 'I;16N')


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


def get_builder(dataset: str, data_dir: str | None):
  """The tfds builder of `dataset`, prepared to array_record files if it is not yet.

  For 'folder:/path', the `folder.Folder` instead, listed and checked (data_dir is not used).
  """
  from unet_flax import folder  # pylint: disable=g-import-not-at-top  (it imports this module)
  if folder.parse(dataset) is not None:
    return folder.Folder(folder.parse(dataset))
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
  if not builder.is_prepared():
    builder.download_and_prepare()
  return builder


def _decode_image(data, size: int | None, resample, mode: str, what: str) -> np.ndarray:
  """Encoded bytes (or an already decoded array) -> [size, size(, 3)] integers.

  size None: at the stored size, [H, W(, 3)], neither drafted nor resized (evaluation's truth).

  mode 'RGB' (pictures) -> uint8 RGB from any PIL mode: grey, palette, CMYK, 1-bit; 16-bit and
  float scaled to 8 bits (PIL's convert clips them: a 16-bit photo comes out white); transparent
  ones over white, as a viewer shows them. mode 'L' (masks) -> the stored values: palette indices,
  not their colours; 16-bit values unchanged (the caller checks the range); grey saved as RGB.

  Raises:
    UserError: naming `what`, if the data is empty, cut short, not an image, or a colour mask.
  """
  try:
    if isinstance(data, np.ndarray):
      image = Image.fromarray(data.squeeze(-1) if data.shape[-1] == 1 else data)
    else:
      if not len(data):
        raise errors.UserError(f'{what}: the file is empty (0 bytes); remove or replace it')
      image = Image.open(io.BytesIO(data))
      if mode == 'RGB' and size is not None:
        # JPEG decodes straight to the smallest scale (1/2, 1/4, 1/8) still >= size: 2-4x faster.
        image.draft('RGB', (size, size))
    image.load()  # Cut-short or corrupt data shows only when the pixels are decoded.
    if mode == 'L':
      if image.mode in ('LA', 'La', 'PA'):
        image = image.getchannel(0)  # The values; a mask's alpha means nothing.
      elif image.mode not in MASK_MODES:
        rgb = np.asarray(image.convert('RGB'))
        if (rgb != rgb[..., :1]).any():
          raise errors.UserError(
              f'{what}: a colour {image.mode} picture, not a mask; save it with one channel of '
              'class values')
        image = Image.fromarray(rgb[..., 0])
      return _resized(image, size, resample)
    return _resized(to_rgb(image), size, resample)
  except errors.UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (PIL: OSError, SyntaxError, ValueError...)
    reason = ('not an image, or a format PIL does not read' if
              isinstance(e, Image.UnidentifiedImageError) else str(e))
    raise errors.UserError(
        f'{what}: cannot decode ({reason}); remove or replace the file') from None


def to_rgb(image: Image.Image) -> Image.Image:
  """The RGB picture of a decoded image of any PIL mode, as a viewer shows it.

  Grey, palette, CMYK and 1-bit are converted; 16-bit and float are scaled to 8 bits (PIL's
  convert clips them: a 16-bit photo comes out white); transparent ones go over white.
  """
  if image.mode.startswith('I') or image.mode == 'F':
    pixels = np.asarray(image, np.float32)
    if image.mode.startswith('I;16') or pixels.max() > 255:
      pixels = pixels / 257  # 0..65535 -> 0..255.
    elif image.mode == 'F' and pixels.max() <= 1:
      pixels = pixels * 255  # Float pictures in [0, 1].
    image = Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))
  if 'A' in image.mode or 'a' in image.mode or 'transparency' in image.info:
    rgba = image.convert('RGBA')  # Transparent pixels hold arbitrary colours.
    image = Image.alpha_composite(Image.new('RGBA', rgba.size, 'white'), rgba)
  return image.convert('RGB')


def _resized(image: Image.Image, size: int | None, resample) -> np.ndarray:
  return np.asarray(image if size is None else image.resize((size, size), resample))


def _file_name(example: dict, default: str) -> str:
  name = example.get('file_name', default)
  return name.decode() if isinstance(name, bytes) else str(name)


def decode_example(example: dict, size: int | None,
                   num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  """A tfds oxford_iiit_pet-style example -> image [S, S, 3] uint8, labels [S, S] uint8.

  The image is resized bilinearly; the trimap nearest-neighbour, so that labels stay labels (the
  chapter's bilinear mask resize invents fractional classes along every border). size None: both
  at their stored size, [H, W, 3] and [H, W].

  Raises:
    UserError: naming the file, if the image or trimap cannot be decoded, or if a trimap value is
      not a class (TRIMAP_OFFSET..num_classes).
  """
  name = _file_name(example, '?')
  image = _decode_image(example['image'], size, Image.Resampling.BILINEAR, 'RGB', name)
  trimap = _decode_image(example['segmentation_mask'], size, Image.Resampling.NEAREST, 'L',
                         f'{name} (mask)')
  labels = trimap.astype(np.int64) - TRIMAP_OFFSET
  if labels.min() < 0 or labels.max() >= num_classes:
    raise errors.UserError(
        f'{name} (mask): trimap values {sorted(set(np.unique(trimap).tolist()))} are outside '
        f'{TRIMAP_OFFSET}..{num_classes} (classes 0..{num_classes - 1} after the shift); '
        'fix the mask')
  return image, labels.astype(np.uint8)


def _reader(dataset: str, split: str, data_dir: str | None, image_size: int | None,
            num_classes: int):
  """(examples in `split`, index -> (file name, image, labels)) for a tfds or a folder data set.

  image_size None: images and labels at their stored size.
  """
  from unet_flax import folder  # pylint: disable=g-import-not-at-top
  builder = get_builder(dataset, data_dir)
  if isinstance(builder, folder.Folder):
    examples = builder.examples(split)
    return len(examples), lambda i: (examples[i].image.name, *folder.decode_example(
        examples[i], image_size, num_classes))
  # Images and masks arrive encoded: decoding with PIL ourselves lets JPEG decode at reduced scale.
  skip = tfds.decode.SkipDecoding()
  source = builder.as_data_source(split=split,
                                  decoders={'image': skip, 'segmentation_mask': skip})

  def read(i):
    example = source[i]
    return (_file_name(example, f'#{i}'), *decode_example(example, image_size, num_classes))

  return len(source), read


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


def originals(dataset: str, split: str, data_dir: str | None, num_classes: int) -> Originals:
  """The examples of the whole `split` at their original size, for scoring at full resolution."""
  return Originals(*_reader(dataset, split, data_dir, None, num_classes))


def num_examples(dataset: str, split: str, data_dir: str | None) -> int:
  """Examples in the whole `split`, without decoding any."""
  from unet_flax import folder  # pylint: disable=g-import-not-at-top
  builder = get_builder(dataset, data_dir)
  if isinstance(builder, folder.Folder):
    return len(builder.stems(split))
  return builder.info.splits[split].num_examples


def load_split(dataset: str, split: str, *, data_dir: str | None, image_size: int,
               num_classes: int, process_index: int = 0, process_count: int = 1,
               num_threads: int = 0) -> Split:
  """Decodes and resizes this process's shard of `split` into memory, in parallel.

  Threads, not processes (bench/input_pipeline.py times both): on a 2-core CPU a spawned
  process pool took twice as long for 1,024 images, each worker first spending ~2 s importing
  tfds; ~60% of a decode is in Pillow's C decoders and resize, which release the GIL.
  """
  total, decode = _reader(dataset, split, data_dir, image_size, num_classes)
  indices = range(process_index, total, process_count)
  images = np.empty((len(indices), image_size, image_size, 3), np.uint8)
  labels = np.empty((len(indices), image_size, image_size), np.uint8)

  def work(row_and_index):
    row, index = row_and_index
    _, images[row], labels[row] = decode(index)

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
