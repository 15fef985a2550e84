"""Input modes: how a run's pictures meet the network. One interface, one entry per mode.

A mode is chosen by name from config.input_mode (`get(config)`), the way scenic and big_vision
pick their variants; the drivers (train.py, evaluation.py, inference.py, export.py) call its
methods and never ask which mode they have:

  'resize' (`Resize`): every picture squashed to image_size x image_size, bilinear (the
      chapter's recipe); the classes of a photo are the logits upsampled bilinearly to its own
      size, then their argmax.
  'crop' (`Crop`): native resolution (after config.scale); training on random crop_size crops,
      and every picture classified whole with the sliding window of overlapping tiles (tiles.py).

Each provides: reading the splits (`read_splits`, `read_split`) and their size decoded, known
before decoding (`decoded_bytes`: the memory check's estimate), the train batches and their
compiled shape (`train_batches`, `batch_shape`), scoring a split (`score`: confusion matrices),
a photo as the network takes it and its classes at its own size (`picture`, `classes`), the
pictures of each evaluation (`sample`) and what export lowers (`export`). Every forward pass is
the one of models.forward (or its flip-TTA wrapper), passed in.
"""

import abc
import dataclasses
import functools
import time
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from unet_flax import augment
from unet_flax import crops
from unet_flax import decode
from unet_flax import input_pipeline
from unet_flax import metrics
from unet_flax import models
from unet_flax import sources
from unet_flax import steps
from unet_flax import tiles
from unet_flax.devices import Devices

# keep(row, confusion [K, K] int64, prediction [h, w] uint8): one scored example of a split.
KeepFn = Callable[[int, np.ndarray, np.ndarray], None]


@dataclasses.dataclass(frozen=True)
class Picture:
  """A photo as the network takes it, and the size its classes are given at.

  Attributes:
    array: [h, w, 3] uint8: resize mode's [S, S, 3], crop mode's native picture after scale.
    height, width: the photo's own size (upright), in pixels.
  """
  array: np.ndarray
  height: int
  width: int


class Mode(abc.ABC):
  """How the pictures of a run's config meet the network (see the module's docstring)."""

  name: str
  shards_eval: bool  # Whether each process reads only its shard of the eval split (else all).

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self._jitted = {}  # Compiled functions, by what they were built from (forward, devices).

  def _cached(self, key, build):
    if key not in self._jitted:
      self._jitted[key] = build()
    return self._jitted[key]

  def _logits(self, forward: models.Forward):
    """forward jitted for inference: (params, images [B, h, w, 3] uint8) -> [B, h, w, K]."""
    return self._cached(('logits', forward), lambda: jax.jit(forward))

  @abc.abstractmethod
  def read_split(self, source: sources.Source, split: str, *, shard: bool = False,
                 cache_bytes: int | None = None) -> input_pipeline.Split:
    """A split as the trainer trains and scores on it (input_pipeline.Split: split[row] ->
    (image, labels)), in memory up to `cache_bytes`, the rest decoded when drawn.

    Args:
      source: the run's data set.
      split: e.g. 'train', 'test[:50%]'.
      shard: only this process's examples (process_index::process_count); else all of them.
      cache_bytes: the memory budget of its decoded examples (default config.cache_bytes).
    """

  @abc.abstractmethod
  def decoded_bytes(self, source: sources.Source, split: str, *, shard: bool) -> int:
    """The bytes of a split's examples (this process's, or all: `read_split`'s shard) decoded
    as its rows hold them, known before any is decoded."""

  def describe_data(self, train: input_pipeline.Split, evaluation: input_pipeline.Split) -> str:
    """What the run trains and scores on, for the run's first line about its data."""
    return (f'{train.num_examples} train and {evaluation.num_examples} eval examples '
            f'{self.describe_data_size()}')

  def read_splits(self, source: sources.Source
                  ) -> tuple[input_pipeline.Split, input_pipeline.Split, str]:
    """(this process's shard of the train split, the eval split, a line describing them).

    Both are held in memory up to config.cache_bytes together, train first; the rest is decoded
    on the fly. Where what the budget would hold of them (`decoded_bytes`, known before decoding)
    is more than the memory this machine has free, the run is refused first, before anything is
    decoded (input_pipeline.check_budget).
    """
    config = self.config
    started = time.perf_counter()
    num_train = source.num_examples(config.train_split)
    num_eval = source.num_examples(config.eval_split)
    needed = (self.decoded_bytes(source, config.train_split, shard=True)
              + self.decoded_bytes(source, config.eval_split, shard=self.shards_eval))
    input_pipeline.check_budget(
        config.cache_bytes, needed,
        f'the {num_train:,} train and {num_eval:,} eval examples ({self.describe_data_size()})')
    train = self.read_split(source, config.train_split, shard=True)
    evaluation = self.read_split(source, config.eval_split, shard=self.shards_eval,
                                 cache_bytes=max(config.cache_bytes - train.held_bytes, 0))
    return train, evaluation, (
        f'{self.describe_data(train, evaluation)}; {_held(train, evaluation)}, read in '
        f'{time.perf_counter() - started:.1f}s')

  @abc.abstractmethod
  def describe_data_size(self) -> str:
    """The size examples are decoded at, e.g. 'at 256x256'."""

  def labels_in_memory(self, split: input_pipeline.Split) -> list[np.ndarray]:
    """The label arrays of a split that are in memory (nothing is decoded for this)."""
    return [labels for _, labels in filter(None, split.cached)]

  @abc.abstractmethod
  def batch_shape(self) -> tuple[int, int]:
    """(height, width) of every train batch's pictures."""

  @abc.abstractmethod
  def train_batches(self, split, batch_size: int, *, epoch: int, process_index: int,
                    first_step: int, num_steps: int) -> Iterator[dict]:
    """One epoch of this process's train batches from `first_step`, a function of (seed, epoch,
    step, process) alone: {'image': [b, h, w, 3] uint8, 'label': [b, h, w] uint8}."""

  @abc.abstractmethod
  def score(self, forward: models.Forward, params, split, devices: Devices,
            keep: KeepFn | None = None) -> np.ndarray:
    """[K, K] int64: the confusion matrix of a split as the trainer scores it, summed over
    every process's examples; `keep`, if given, sees each example of this process."""

  @abc.abstractmethod
  def picture(self, data: bytes, what: str) -> Picture:
    """An encoded photo as the network takes it (decode.decode: the trainer's picture path,
    with the config's image_max_value). Raises UserError naming `what`."""

  @abc.abstractmethod
  def classes(self, forward: models.Forward, params, pictures: Sequence[Picture],
              batch_size: int) -> list[np.ndarray]:
    """Each picture's classes at its photo's own size: [height, width] uint8."""

  @abc.abstractmethod
  def sample(self, forward: models.Forward, params, split, n: int, devices: Devices) -> dict:
    """The first n examples of a split with their predictions, for the pictures of an
    evaluation, computed as `score` computes them: {'image': [...], 'label': [...],
    'prediction': [...]}."""

  @abc.abstractmethod
  def export(self) -> tuple[tuple[int, int], dict]:
    """((height, width) of the exported function's input pictures, what the caller must do
    around it: model.json's 'mode' entry)."""

  @abc.abstractmethod
  def describe(self) -> str:
    """The resolution a `score` is at, for reports."""


def _held(train: input_pipeline.Split, evaluation: input_pipeline.Split) -> str:
  """How much of the splits is in memory, and that the rest is decoded on the fly."""
  held = (train.held_bytes + evaluation.held_bytes) / 2 ** 20
  if train.all_cached and evaluation.all_cached:
    return f'all in memory ({held:,.1f} MiB)'
  parts = [f'{split.held_rows:,} of {len(split):,} {name} ({split.held_rows / len(split):.0%})'
           for name, split in (('train', train), ('eval', evaluation)) if len(split)]
  later = any(split.keep is not None and split.keep.rows for split in (train, evaluation))
  return (f'{held:,.1f} MiB in memory: {", ".join(parts)}'
          + (', kept as they are first decoded' if later else '')
          + '; the rest decoded on the fly in worker threads (config.cache_bytes)')


# Resize mode.


def _bucket(n: int) -> int:
  """The next of 128, 192, 256, 384, 512, 768, ...: few shapes to compile, < 50% padding."""
  size = 128
  while True:
    for bucket in (size, size * 3 // 2):
      if bucket >= n:
        return bucket
    size *= 2


@functools.partial(jax.jit, static_argnames='buckets')
def _upsampled_classes(logits: jax.Array, size: jax.Array,
                       buckets: tuple[int, int]) -> jax.Array:
  """[S, S, K] logits -> [bucket_h, bucket_w] uint8 classes, of which [:H, :W] are the photo's.

  jax.image.resize(logits, (H, W, K), 'bilinear') is scale_and_translate with scale (H/S, W/S)
  and no translation; output pixels past H or W only get zero weights. So the scale is traced and
  each side is bucketed: one compile serves every photo whose sides fit the buckets, and memory
  follows the photo's own sides (a long strip is not padded to a square).
  """
  scale = size.astype(jnp.float32) / jnp.array(logits.shape[:2], jnp.float32)
  resized = jax.image.scale_and_translate(logits, (*buckets, logits.shape[-1]), (0, 1),
                                          scale, jnp.zeros(2, jnp.float32), 'linear')
  return jnp.argmax(resized, axis=-1).astype(jnp.uint8)


def upsample_classes(logits, height: int, width: int) -> np.ndarray:
  """logits [S, S, K] -> classes [height, width] uint8: bilinear on the logits, then argmax.

  Upsampling the logits rather than the argmax puts the outline between the network's pixels,
  where the classes' scores cross, instead of drawing the network's pixel grid.
  """
  classes = _upsampled_classes(logits, jnp.array([height, width]),
                               buckets=(_bucket(height), _bucket(width)))
  return np.asarray(classes)[:height, :width]


def padded_batch(images: Sequence[np.ndarray], batch_size: int) -> np.ndarray:
  """Stacks up to batch_size images and pads with zeros: every batch has the one compiled shape."""
  batch = np.zeros((batch_size,) + images[0].shape, images[0].dtype)
  batch[:len(images)] = images
  return batch


class Resize(Mode):
  """Every picture squashed to config.image_size x image_size (input_pipeline.py)."""

  name = 'resize'
  shards_eval = True

  def read_split(self, source, split, *, shard=False, cache_bytes=None):
    config = self.config
    return input_pipeline.load_split(
        source, split, image_size=config.image_size,
        process_index=jax.process_index() if shard else 0,
        process_count=jax.process_count() if shard else 1, num_threads=config.input_threads,
        cache_bytes=config.cache_bytes if cache_bytes is None else cache_bytes)

  def decoded_bytes(self, source, split, *, shard):
    num_examples = source.num_examples(split)
    if shard:  # The largest process's share: every process's check refuses alike.
      num_examples = -(-num_examples // jax.process_count())
    return num_examples * self.config.image_size ** 2 * 4  # uint8 RGB image and its labels.

  def describe_data_size(self):
    size = self.config.image_size
    return f'at {size}x{size}'

  def batch_shape(self):
    return self.config.image_size, self.config.image_size

  def train_batches(self, split, batch_size, *, epoch, process_index, first_step, num_steps):
    return input_pipeline.train_batches(
        split, batch_size, seed=self.config.seed, epoch=epoch, process_index=process_index,
        first_step=first_step, num_steps=num_steps,
        augmentation=augment.Options.from_config(self.config),
        num_threads=self.config.input_threads)

  def _eval_step(self, forward, devices):
    return self._cached(('eval', forward, devices),
                        lambda: steps.compile_eval_step(self.config, devices, forward))

  def _add(self, devices):
    """(total [K, K], confusions [B, K, K]) -> total + their sum, replicated (every process's)."""
    return self._cached(('add', devices), lambda: jax.jit(
        lambda total, c: total + c.sum(axis=0), out_shardings=devices.replicated))

  def score(self, forward, params, split, devices, keep=None):
    """The split's confusion matrix at the network's resolution: eval_step on each batch of this
    process's shard, summed on the devices over every process, then one fetch."""
    eval_step, add = self._eval_step(forward, devices), self._add(devices)
    k = self.config.num_classes
    total = jax.device_put(jnp.zeros((k, k), jnp.int32), devices.replicated)
    batches = input_pipeline.eval_batches(split, devices.local_batch_size, jax.process_count(),
                                          self.config.input_threads)
    for i, batch in enumerate(devices.prefetch(batches)):
      out = eval_step(params, batch)
      total = add(total, out['confusion'])
      if keep is not None:  # One process: its rows are the whole batch.
        out = jax.device_get(out)
        for j in range(min(devices.local_batch_size, len(split) - i * devices.local_batch_size)):
          keep(i * devices.local_batch_size + j, out['confusion'][j].astype(np.int64),
               out['prediction'][j])
    return np.asarray(jax.device_get(total), np.int64)

  def picture(self, data, what):
    size = self.config.image_size
    array = decode.decode(data, size, 'picture', what, self.config.image_max_value)
    return Picture(array, *decode.picture_size(data, what))

  def classes(self, forward, params, pictures, batch_size):
    logits_fn = self._logits(forward)
    out = []
    for start in range(0, len(pictures), batch_size):
      chunk = pictures[start:start + batch_size]
      logits = np.asarray(logits_fn(params, padded_batch([p.array for p in chunk], batch_size)))
      out += [upsample_classes(x, p.height, p.width) for p, x in zip(chunk, logits)]
    return out

  def sample(self, forward, params, split, n, devices):
    del devices  # The whole sample in one call.
    images, labels = split.stack(range(n))
    logits = self._logits(forward)(params, images)
    return {'image': images, 'label': labels,
            'prediction': np.asarray(jnp.argmax(logits, axis=-1))}

  def export(self):
    size = self.config.image_size
    return (size, size), {
        'name': 'resize', 'image_size': size,
        'how': f'resize each RGB photo to {size}x{size} (bilinear), call the function, resize '
               'the logits bilinearly back to the photo\'s size and take their argmax'}

  def describe(self):
    size = self.config.image_size
    return f"the network's {size}x{size} resolution (as the trainer evaluates)"


# Crop mode.


class Crop(Mode):
  """Native resolution after config.scale: random crops to train, the sliding window to classify
  (crops.py, tiles.py)."""

  name = 'crop'
  shards_eval = False  # Each process scores the whole eval split on its host.

  def read_split(self, source, split, *, shard=False, cache_bytes=None):
    return crops.load_native_split(
        source, split, scale=self.config.scale,
        cache_bytes=self.config.cache_bytes if cache_bytes is None else cache_bytes,
        process_index=jax.process_index() if shard else 0,
        process_count=jax.process_count() if shard else 1, num_threads=self.config.input_threads)

  def decoded_bytes(self, source, split, *, shard):
    return crops.native_bytes(source, split, scale=self.config.scale,
                              process_index=jax.process_index() if shard else 0,
                              process_count=jax.process_count() if shard else 1,
                              num_threads=self.config.input_threads)

  def describe_data_size(self):
    return f'at native resolution, scale {self.config.scale:g}'

  def describe_data(self, train, evaluation):
    crop = self.config.crop_size
    return f'{super().describe_data(train, evaluation)}, {crop}x{crop} crops'

  def batch_shape(self):
    return self.config.crop_size, self.config.crop_size

  def train_batches(self, split, batch_size, *, epoch, process_index, first_step, num_steps):
    config = self.config
    return crops.crop_batches(
        split, batch_size, crop_size=config.crop_size, ignore_label=config.ignore_label,
        seed=config.seed, epoch=epoch, process_index=process_index, first_step=first_step,
        num_steps=num_steps, augmentation=augment.Options.from_config(config),
        num_threads=config.input_threads)

  def _window_classes(self, forward, params, image: np.ndarray, window_batch: int) -> np.ndarray:
    return tiles.sliding_window_classes(self._logits(forward), params, image,
                                        crop_size=self.config.crop_size,
                                        overlap=self.config.tile_overlap,
                                        window_batch=window_batch)

  def score(self, forward, params, split, devices, keep=None):
    """The split's confusion matrix at native resolution (after scale): each image whole
    through the sliding window, on this host, in windows of the devices' local batch size.
    Every process scores the whole split (read_splits gives each all of it); the examples not in
    memory are decoded in worker threads, a few ahead."""
    k = self.config.num_classes
    total = np.zeros((k, k), np.int64)
    examples = input_pipeline.made_ahead(split.__getitem__, range(len(split)),
                                         in_workers=not split.all_cached,
                                         num_threads=self.config.input_threads)
    for row, (image, labels) in enumerate(examples):
      predicted = self._window_classes(forward, params, image, devices.local_batch_size)
      confusion = metrics.host_confusion_matrices(labels[None], predicted[None], k,
                                                  self.config.ignore_label)[0]
      total += confusion
      if keep is not None:
        keep(row, confusion, predicted)
    return total

  def picture(self, data, what):
    native = decode.decode(data, None, 'picture', what, self.config.image_max_value)
    return Picture(decode.rescale(native, self.config.scale, 'picture'), *native.shape[:2])

  def classes(self, forward, params, pictures, batch_size):
    return [decode.resize_mask(self._window_classes(forward, params, p.array, batch_size),
                               p.height, p.width) for p in pictures]

  def sample(self, forward, params, split, n, devices):
    examples = [split[row] for row in range(n)]
    # score's window batch: the window pass compiled for the evaluation serves the pictures.
    return {'image': [image for image, _ in examples], 'label': [l for _, l in examples],
            'prediction': [self._window_classes(forward, params, image,
                                                devices.local_batch_size)
                           for image, _ in examples]}

  def export(self):
    config = self.config
    crop = config.crop_size
    return (crop, crop), {
        'name': 'crop', 'crop_size': crop, 'tile_overlap': config.tile_overlap,
        'scale': config.scale, 'sigma_scale': tiles.SIGMA_SCALE, 'min_weight': tiles.MIN_WEIGHT,
        'how': f'rescale each RGB photo by scale (bilinear); pad it with zeros at the bottom and '
               f'right to at least {crop}x{crop}; cover it with {crop}x{crop} windows whose '
               f'starts step by int({crop} x (1 - tile_overlap)), the last moved back to end at '
               'the edge; call the function on the windows; add each window\'s logits weighted '
               'by a Gaussian of sigma sigma_scale x crop_size (1 at its centre, at least '
               'min_weight); take the argmax, crop the padding off and resize the classes back '
               'to the photo\'s size (nearest)'}

  def describe(self):
    config = self.config
    return (f"each image's native resolution, scale {config.scale:g} "
            f'({config.crop_size}x{config.crop_size} sliding window, overlap '
            f'{config.tile_overlap:g})')


MODES = {mode.name: mode for mode in (Resize, Crop)}


def get(config: ml_collections.ConfigDict) -> Mode:
  """The input mode of a run's config (config.input_mode), one of MODES."""
  return MODES[config.input_mode](config)
