"""Using a trained workdir: the model restored read-only, photos of any kind, masks of them.

`load_model(workdir)` rebuilds the model from <workdir>/config.json and a checkpoint without
writing anything there, so it is safe while a training run is still going. Photos are read as
the trainer reads its data (decode.decode, with the run's image_max_value) and classified at
their own size by the run's input mode (modes.py): resize mode upsamples the logits bilinearly
to each photo's size before the argmax, crop mode runs the sliding window at native resolution.

Scoring a workdir on a split (evaluate.py) is evaluation.py's job; it builds on this module.
"""

import dataclasses
import glob
import os
import sys
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from PIL import Image

from unet_flax import checkpoints
from unet_flax import config as config_lib
from unet_flax import decode
from unet_flax import errors
from unet_flax import folder
from unet_flax import paths as paths_lib
from unet_flax import models
from unet_flax import modes
from unet_flax import reporting


@dataclasses.dataclass(frozen=True)
class Model:
  """A trained U-Net: the run's config, the checkpoint's step, its parameters, and its one
  forward pass.

  Attributes:
    forward: (params, images [B, h, w, 3] uint8) -> logits [B, h, w, K] float32: models.forward
      on the process's convolutions, or with flip TTA its models.flip_tta wrapper (the image and
      its mirror, twice the compute).
    mode: the run's input mode (modes.get(config)).
  """
  config: ml_collections.ConfigDict
  step: int
  params: Any
  forward: models.Forward
  mode: modes.Mode
  flip_tta: bool = False


def make_model(config: ml_collections.ConfigDict, step: int, params, *,
               flip_tta: bool = False) -> Model:
  """The Model of a config and its parameters: the forward pass built once, here."""
  forward = models.forward(config)
  if flip_tta:
    forward = models.flip_tta(forward)
  return Model(config, step, params, forward, modes.get(config), flip_tta)


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
  workdir = paths_lib.absolute(workdir)
  if not workdir.is_dir():
    raise errors.UserError(f'--workdir {workdir} is not a directory; pass the --workdir of a '
                           'training run (python train.py --workdir ...)')
  if not checkpoints.restorable_steps(workdir):
    raise errors.UserError(f'{workdir / checkpoints.CHECKPOINT_DIR} holds no checkpoint; train '
                           f'first (python train.py --workdir {workdir} ...) or pass another '
                           '--workdir')
  config = checkpoints.load_config(workdir)
  step, params = checkpoints.restore_params(workdir, config, step, sharding, ema=ema)
  return make_model(config, step, params, flip_tta=flip_tta)


def _output_paths(paths: list[str], out: epath.Path,
                  overwrite: bool) -> list[tuple[epath.Path, epath.Path]]:
  """(mask, overlay) paths of each input, checked before anything is written.

  Raises:
    UserError: if two inputs would write the same file, an output is one of the inputs, or an
      output exists and `overwrite` is off.
  """
  seen, inputs = {}, {paths_lib.absolute(p): p for p in paths}
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


def _save_png(picture: Image.Image, path: epath.Path, overwrite: bool) -> None:
  paths_lib.write_atomically(path, lambda temporary: picture.save(temporary, format='PNG'),
                             overwrite=overwrite)


def _write_outputs(photo: np.ndarray, classes: np.ndarray, targets, names,
                   overwrite: bool) -> int:
  """Writes the mask (palette PNG) and the overlay; returns how many replaced existing files.

  Raises:
    UserError: if a file appeared meanwhile (another process) and overwrite is off.
  """
  from unet_flax import plots  # pylint: disable=g-import-not-at-top  (matplotlib is slow)
  replaced = 0
  pictures = (plots.mask_image(classes, len(names)),
              Image.fromarray(plots.overlay(photo, classes, names)))
  for picture, target in zip(pictures, targets):
    replaced += target.exists()
    _save_png(picture, target, overwrite)
  return replaced


def expand_inputs(inputs: list[str]) -> list[str]:
  """What predict's arguments name, in order: a file as it is, a directory's image files (sorted,
  not its subdirectories; macOS's ._* skipped), a glob pattern's matches (sorted) when no file has
  that name.

  Raises:
    UserError: for a directory without images, or a pattern that matches nothing.
  """
  paths = []
  for text in inputs:
    if os.path.isdir(text):
      found = sorted(str(p) for p in epath.Path(text).iterdir()
                     if p.suffix.lower() in folder.IMAGE_SUFFIXES and not p.name.startswith('._')
                     and p.is_file())
      if not found:
        raise errors.UserError(f'{text} is a directory without images '
                               f'({", ".join(folder.IMAGE_SUFFIXES)}); name images or a directory '
                               'that holds them')
      paths += found
    elif not os.path.lexists(text) and any(c in text for c in '*?['):
      found = sorted(glob.glob(text))
      if not found:
        raise errors.UserError(f'{text} matches no file; check the pattern')
      paths += found
    else:
      paths.append(text)  # A missing file is named when it is read, and skipped.
  return paths


def read_picture(mode: modes.Mode, path) -> tuple[modes.Picture, bytes]:
  """(the photo at `path` as the network takes it, the file's bytes).

  Raises:
    UserError: naming the file, if it cannot be read or decoded.
  """
  data = decode.read_bytes(path)
  return mode.picture(data, str(path)), data


def read_photo(config: ml_collections.ConfigDict, data: bytes, what: str) -> np.ndarray:
  """An encoded photo as the trainer decodes its pictures, at its own size: [H, W, 3] uint8
  (decode.decode with the config's image_max_value)."""
  return decode.decode(data, None, 'picture', what, config.image_max_value)


def _classes(model: Model, batch: list, batch_size: int) -> list[np.ndarray | None]:
  """The classes of a batch of (path, picture, data); None for a photo too large for the host
  or device memory (each is then tried alone)."""
  pictures = [picture for _, picture, _ in batch]
  try:
    return model.mode.classes(model.forward, model.params, pictures, batch_size)
  except (MemoryError, jax.errors.JaxRuntimeError):
    if len(pictures) == 1:
      return [None]
    return [_classes(model, [item], batch_size)[0] for item in batch]


def predict_files(model: Model, paths: list[str], out, *, batch_size: int = 8,
                  overwrite: bool = False, stderr=None) -> list[str]:
  """Writes <out>/<stem>_mask.png and <stem>_overlay.png at each image's own resolution.

  The mask is a palette PNG whose pixel values are the classes (0..K-1), shown in the class
  colours; the overlay is the photo tinted by class, with a legend.

  Args:
    model: the restored model; with model.flip_tta, its masks are the flip TTA's.
    paths: image files of any format, mode and size.
    out: the output directory, created when the first image is written (not when none is).
    overwrite: replace masks and overlays that exist in `out`; without it they are refused
      before anything is written.
    batch_size: pictures (resize mode) or windows (crop mode) per forward pass; every pass has
      this shape, so the model compiles once.
    stderr: where failures and progress go.

  Returns:
    The paths that could not be read; each was reported on `stderr` in one line and skipped.

  Raises:
    UserError: if none of `paths` exists (a mistyped path), before `out` is created.
  """
  stderr = stderr or sys.stderr
  config = model.config
  outputs = dict(zip(paths, _output_paths(paths, paths_lib.absolute(out), overwrite)))
  if not any(os.path.lexists(path) for path in paths):
    what = (f'{paths[0]} does not exist' if len(paths) == 1 else
            f'none of the {len(paths)} images named exists (the first: {paths[0]})')
    raise errors.UserError(f'{what}; check the paths (nothing was written)')
  # A file or a read-only place is refused now; --out is made at the first write, so that no
  # empty --out stays behind when no image could be read.
  out = paths_lib.check_output_dir(out, '--out')
  failed = []
  batch_size = max(1, min(batch_size, len(paths)))
  progress = reporting.Progress('predicted', len(paths), stderr) if len(paths) > batch_size else None
  names = config_lib.class_names(config)
  replaced = 0

  def failure(path, message):
    print(f'error: {message}; skipped', file=stderr, flush=True)
    failed.append(path)

  for start in range(0, len(paths), batch_size):
    batch = []
    for path in paths[start:start + batch_size]:
      try:
        batch.append((path, *read_picture(model.mode, path)))
      except errors.UserError as e:
        failure(path, e)
    for (path, picture, data), mask in zip(batch, _classes(model, batch, batch_size)):
      if mask is None:
        failure(path, f'{path}: too large to process here ({picture.width}x{picture.height} '
                'pixels)')
        continue
      paths_lib.make_output_dir(out, '--out')  # Its failure stops predict: not this image's.
      try:
        replaced += _write_outputs(read_photo(config, data, path), mask, outputs[path], names,
                                   overwrite)
      except errors.UserError as e:
        failure(path, e)
    if progress:
      progress.update(min(start + batch_size, len(paths)), skipped=len(failed))
  if replaced:
    print(f'note: replaced {replaced} existing files in {out}', file=stderr)
  return failed
