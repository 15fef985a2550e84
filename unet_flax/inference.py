"""Using a trained workdir: the model restored read-only, photos of any kind, masks of them.

`load_model(workdir)` rebuilds the model from <workdir>/config.json and a checkpoint without
writing anything there, so it is safe while a training run is still going. Photos are read as
the trainer reads its data (decode.py: upright, JPEG drafted, bilinear resize to
config.image_size); the logits are then upsampled bilinearly to each photo's own size before the
argmax, so that masks follow the outlines at full resolution instead of the network's pixel grid.

A crop-mode run (config.input_mode == 'crop') predicts each photo whole at its own resolution
with the sliding window instead (tiles.py): no resize.

Scoring a workdir on a split (evaluate.py) is evaluation.py's job; it builds on this module.
"""

import dataclasses
import functools
import sys
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from PIL import Image

from unet_flax import checkpoints
from unet_flax import config as config_lib
from unet_flax import decode
from unet_flax import errors
from unet_flax import models
from unet_flax import reporting
from unet_flax import tiles


@dataclasses.dataclass(frozen=True)
class Model:
  """A trained U-Net: the run's config, the checkpoint's step and its parameters.

  With flip_tta, every forward pass below (predict, evaluate at either resolution, crop mode's
  windows) gives models.flip_tta_logits of the network's: the image and its mirror, twice the
  compute. Off, they are the network's logits themselves.
  """
  config: ml_collections.ConfigDict
  step: int
  params: Any
  flip_tta: bool = False

  @property
  def module(self) -> models.UNet:
    return models.create(self.config)

  def logits_fn(self):
    """The jitted forward pass: (params, uint8 images [B, S, S, 3]) -> logits [B, S, S, K]
    float32 (with flip_tta, models.flip_tta_logits of the network's)."""
    module = self.module
    if not self.flip_tta:
      return jax.jit(functools.partial(models.logits, module))

    def flip_tta_logits(params, images):
      return models.flip_tta_logits(functools.partial(models.logits, module, params), images)
    return jax.jit(flip_tta_logits)

  def apply_fn(self):
    """The forward pass as a TrainState's apply_fn, for the trainer's eval step:
    (variables, float images [B, S, S, 3] in [0, 1], *, train) -> logits [B, S, S, K]."""
    module = self.module
    if not self.flip_tta:
      return module.apply

    def flip_tta_apply(variables, images, *, train: bool):
      return models.flip_tta_logits(functools.partial(module.apply, variables, train=train),
                                    images)
    return flip_tta_apply


def load_model(workdir, step: int | None = None,
               sharding: jax.sharding.Sharding | None = None, *,
               flip_tta: bool = False, ema: bool = True) -> Model:
  """The model of a training run, from its workdir alone (config.json and a checkpoint).

  Args:
    workdir: a training run's --workdir (relative paths and `~` are fine).
    step: the checkpoint; None: the newest that restores.
    sharding: where the parameters go; default: the first local device.
    flip_tta: the model's forward passes average the image's and its mirror's probabilities
      (Model.flip_tta).
    ema: of a run that kept a moving average of its weights (config.ema_decay), that average;
      False: the trained weights themselves.

  Raises:
    UserError: if the workdir is no training run's, or its checkpoint does not fit its config.
  """
  workdir = errors.absolute(workdir)
  if not workdir.is_dir():
    raise errors.UserError(f'--workdir {workdir} is not a directory; pass the --workdir of a '
                           'training run (python train.py --workdir ...)')
  if not checkpoints.restorable_steps(workdir):
    raise errors.UserError(f'{workdir / checkpoints.CHECKPOINT_DIR} holds no checkpoint; train '
                           f'first (python train.py --workdir {workdir} ...) or pass another '
                           '--workdir')
  config = checkpoints.load_config(workdir)
  # The trainer's convolutions were a speed choice for its machine; the parameters fit any.
  config.conv_backend = 'auto'
  step, params = checkpoints.restore_params(workdir, config, step, sharding, ema=ema)
  return Model(config, step, params, flip_tta)


# Logits -> classes at any resolution.


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


def padded_batch(images: list[np.ndarray], batch_size: int) -> np.ndarray:
  """Stacks up to batch_size images and pads with zeros: every batch has the one compiled shape."""
  batch = np.zeros((batch_size,) + images[0].shape, images[0].dtype)
  batch[:len(images)] = images
  return batch


def _output_paths(paths: list[str], out: epath.Path,
                  overwrite: bool) -> list[tuple[epath.Path, epath.Path]]:
  """(mask, overlay) paths of each input, checked before anything is written.

  Raises:
    UserError: if two inputs would write the same file, an output is one of the inputs, or an
      output exists and `overwrite` is off.
  """
  seen, inputs = {}, {errors.absolute(p): p for p in paths}
  outputs = []
  for path in paths:
    stem = epath.Path(path).stem
    if stem in seen:
      raise errors.UserError(
          f'{seen[stem]} and {path} would both write {out / (stem + "_mask.png")}; rename one '
          'or predict them into different --out directories')
    seen[stem] = path
    outputs.append((out / f'{stem}_mask.png', out / f'{stem}_overlay.png'))
  targets = [t for pair in outputs for t in pair]
  for target in targets:
    if target in inputs:
      raise errors.UserError(f'--out {out} would write {target.name} over the input '
                             f'{inputs[target]}; choose another --out')
  existing = [t for t in targets if t.exists()]
  if existing and not overwrite:
    more = f' (and {len(existing) - 1} more)' if len(existing) > 1 else ''
    raise errors.UserError(f'{existing[0]} exists{more}; pass --overwrite to replace, or choose '
                           'another --out')
  return outputs


def _save_png(picture: Image.Image, path: epath.Path) -> None:
  errors.write_atomically(path, lambda temporary: picture.save(temporary, format='PNG'))


def _write_outputs(photo: np.ndarray, classes: np.ndarray, targets, names) -> int:
  """Writes the mask (palette PNG) and the overlay; returns how many replaced existing files."""
  from unet_flax import plots  # pylint: disable=g-import-not-at-top  (matplotlib is slow)
  replaced = 0
  pictures = (plots.mask_image(classes, len(names)),
              Image.fromarray(plots.overlay(photo, classes, names)))
  for picture, target in zip(pictures, targets):
    replaced += target.exists()
    _save_png(picture, target)
  return replaced


def predict_files(model: Model, paths: list[str], out, *, batch_size: int = 8,
                  overwrite: bool = False, stderr=None) -> list[str]:
  """Writes <out>/<stem>_mask.png and <stem>_overlay.png at each image's own resolution.

  The mask is a palette PNG whose pixel values are the classes (0..K-1), shown in the class
  colours; the overlay is the photo tinted by class, with a legend.

  Args:
    model: the restored model; with model.flip_tta, its masks are the flip TTA's.
    paths: image files of any format, mode and size.
    out: the output directory (created).
    overwrite: replace masks and overlays that exist in `out`; without it they are refused
      before anything is written.
    batch_size: images per jit call; every call has this shape, so the model compiles once. In
      crop mode (config.input_mode == 'crop'), windows per call: each image is predicted whole,
      at its own resolution, with the sliding window (tiles.py).
    stderr: where failures and progress go.

  Returns:
    The paths that could not be read; each was reported on `stderr` in one line and skipped.
  """
  stderr = stderr or sys.stderr
  config = model.config
  outputs = dict(zip(paths, _output_paths(paths, errors.absolute(out), overwrite)))
  out = errors.make_output_dir(out, '--out')
  failed = []

  def failure(path, error):
    print(f'error: {error}; skipped', file=stderr, flush=True)
    failed.append(path)

  if config.input_mode == 'crop':
    replaced = _predict_tiled(model, paths, outputs, batch_size, failure, stderr)
    if replaced:
      print(f'note: replaced {replaced} existing files in {out}', file=stderr)
    return failed
  batch_size = max(1, min(batch_size, len(paths)))
  predict = model.logits_fn()
  progress = reporting.Progress('predicted', len(paths), stderr) if len(paths) > batch_size else None
  replaced = 0

  def read_input(image):
    return decode.upright_size(image), decode.network_input(image, config.image_size)

  for start in range(0, len(paths), batch_size):
    batch = []
    for path in paths[start:start + batch_size]:
      try:
        batch.append((path, *decode.read_image(path, read_input)))
      except errors.UserError as e:
        failure(path, e)
    if batch:
      logits = np.asarray(predict(model.params,
                                  padded_batch([x for _, _, x in batch], batch_size)))
      for (path, size, _), image_logits in zip(batch, logits):
        try:
          photo = decode.read_image(path, lambda image: np.asarray(decode.to_rgb(image)))
          classes = upsample_classes(image_logits, *size)
        except errors.UserError as e:
          failure(path, e)
          continue
        except (MemoryError, jax.errors.JaxRuntimeError):  # Out of host or device memory.
          failure(path, f'{path}: too large to process here ({size[1]}x{size[0]} pixels)')
          continue
        replaced += _write_outputs(photo, classes, outputs[path],
                                   config_lib.class_names(config))
    if progress:
      progress.update(min(start + batch_size, len(paths)))
  if replaced:
    print(f'note: replaced {replaced} existing files in {out}', file=stderr)
  return failed


def read_photo(path) -> np.ndarray:
  """An image file of any format and mode -> [H, W, 3] uint8, upright RGB (decode.to_rgb).

  Raises:
    UserError: naming the file, if it cannot be read.
  """
  return decode.read_image(path, lambda image: np.asarray(decode.to_rgb(image)))


def _predict_tiled(model: Model, paths: list[str], outputs: dict, window_batch: int, failure,
                   stderr) -> int:
  """Crop mode's predict: each image whole through the sliding window; -> files replaced."""
  config = model.config
  forward = model.logits_fn()
  progress = reporting.Progress('predicted', len(paths), stderr) if len(paths) > 1 else None
  replaced = 0
  for done, path in enumerate(paths, 1):
    try:
      photo = read_photo(path)
    except errors.UserError as e:
      failure(path, e)
      continue
    classes = tiles.predict_classes(forward, model.params, photo, config, window_batch)
    replaced += _write_outputs(photo, classes, outputs[path], config_lib.class_names(config))
    if progress:
      progress.update(done)
  return replaced
