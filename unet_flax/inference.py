"""Using a trained workdir: the model restored read-only, photos of any kind, masks of them.

`load_model(workdir)` rebuilds the model from <workdir>/config.json and a checkpoint without
writing anything there, so it is safe while a training run is still going. Photos are read as
the trainer reads its data (JPEG drafted, bilinear resize to config.image_size); the logits are
then upsampled bilinearly to each photo's own size before the argmax, so that masks follow the
outlines at full resolution instead of showing the network's pixel grid.

Scoring a workdir on a split (evaluate.py) is evaluation.py's job; it builds on this module.
"""

import functools
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from PIL import Image
from PIL import ImageOps

from unet_flax import checkpoints
from unet_flax import errors
from unet_flax import input_pipeline
from unet_flax import train

# What PIL raises on files that are not images, are cut short, or are too large to decode.
READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)

# ---------------------------------------------------------------------------------------------
# The model, restored read-only.


def checkpoint_steps(workdir) -> list[int]:
  """The steps of the checkpoints under <workdir>/checkpoints, oldest first."""
  directory = epath.Path(workdir) / 'checkpoints'
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def _check_trained(workdir: epath.Path) -> None:
  if not workdir.is_dir():
    raise errors.UserError(f'--workdir {workdir} is not a directory; pass the --workdir of a '
                           'training run (python train.py --workdir ...)')
  if not checkpoint_steps(workdir):
    raise errors.UserError(f'{workdir / "checkpoints"} holds no checkpoint; train first '
                           f'(python train.py --workdir {workdir} ...) or pass another --workdir')


def restore(workdir, config: ml_collections.ConfigDict, step: int | None = None,
            sharding: jax.sharding.Sharding | None = None) -> train.TrainState:
  """The model of checkpoint `step`, read without writing anything.

  Only the step and the parameters are read: the optimizer state is not needed to predict, and
  skipping it also reads checkpoints whose optimizer differs from today's.

  Args:
    workdir: a training run's --workdir.
    config: the run's config (its model fields decide the shapes restored into).
    step: which checkpoint; None: the newest that restores (a damaged one is skipped, with a
      warning, as the trainer skips it).
    sharding: where the arrays go; default: the first local device.

  Returns:
    A TrainState with step, params and apply_fn; opt_state is None.
  """
  workdir = epath.Path(workdir)
  _check_trained(workdir)
  steps = checkpoint_steps(workdir)
  if step is not None and step not in steps:
    raise errors.UserError(f'{workdir / "checkpoints"} has no checkpoint of step {step}; '
                           f'pass --step with one of {", ".join(map(str, steps))}')
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  # Shapes only: nothing is initialised, the checkpoint fills them.
  abstract = jax.eval_shape(functools.partial(train.create_train_state, config),
                            jax.random.key(0))
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                        {'step': abstract.step, 'params': abstract.params})
  args = ocp.args.PyTreeRestore(target, partial_restore=True,
                                restore_args=ocp.checkpoint_utils.construct_restore_args(target))
  candidates = [step] if step is not None else steps[::-1]
  # A checkpointer only reads: unlike a CheckpointManager it creates no directory and cleans up
  # nothing, so a training run may go on writing beside it.
  with ocp.PyTreeCheckpointer() as checkpointer:
    for i, candidate in enumerate(candidates):
      path = workdir / 'checkpoints' / str(candidate) / 'default'
      try:
        restored = checkpointer.restore(path.resolve(), args=args)  # Orbax wants absolute paths.
        return abstract.replace(opt_state=None, **restored)
      except Exception as e:  # pylint: disable=broad-except  (tensorstore raises bare Exception)
        if i + 1 == len(candidates):
          raise errors.UserError(
              f'{path} cannot be restored into the model of {workdir / checkpoints.CONFIG_FILE}'
              f' ({_reason(e)}); pass another --step or --workdir') from None
        print(f'warning: {path} cannot be restored ({_reason(e)}); trying step '
              f'{candidates[i + 1]}', file=sys.stderr, flush=True)
  raise AssertionError('unreachable: there is at least one checkpoint')


def trained_config(workdir) -> ml_collections.ConfigDict:
  """The config of a training run; a UserError saying what to do if it has no checkpoint."""
  workdir = epath.Path(workdir)
  _check_trained(workdir)
  return checkpoints.load_config(workdir)


def load_model(workdir, step: int | None = None) -> tuple[ml_collections.ConfigDict,
                                                          train.TrainState]:
  """(config, train state) of a training run, from its workdir alone."""
  config = trained_config(workdir)
  return config, restore(workdir, config, step)


def logits_fn(state: train.TrainState, images: jax.Array) -> jax.Array:
  """images: [B, S, S, 3] uint8 -> logits [B, S, S, K] float32."""
  return state.apply_fn({'params': state.params}, train.normalize(images), train=False)


# ---------------------------------------------------------------------------------------------
# Photos of any mode and size.


def read_image(path, decode):
  """decode(the opened PIL image) of the file at `path`.

  Raises:
    UserError: naming the file, if it is missing, not an image, corrupt or cut short.
  """
  try:
    with Image.open(path) as image:
      return decode(image)
  except errors.UserError:  # A ValueError too, but already one line that names the file.
    raise
  except READ_ERRORS as e:  # Corrupt or cut-short data shows only when the pixels are decoded.
    raise errors.UserError(f'{path}: cannot read ({_reason(e)})') from None


def _reason(e: Exception) -> str:
  """What went wrong reading a file, in a few words."""
  if isinstance(e, Image.UnidentifiedImageError):
    return 'not an image format PIL knows'
  if isinstance(e, OSError) and e.strerror:
    return e.strerror  # 'No such file or directory', 'Is a directory', ... without the path.
  message = str(e).strip()
  return message.splitlines()[0][:160] if message else type(e).__name__  # Tensorstore's are long.


def upright_size(image: Image.Image) -> tuple[int, int]:
  """(height, width) of the image as shown, i.e. after its EXIF rotation."""
  width, height = image.size
  # EXIF orientations 5-8 turn the picture by 90 degrees.
  if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):
    width, height = height, width
  return height, width


def to_rgb(image: Image.Image) -> Image.Image:
  """The upright RGB picture of an image of any mode, converted as the trainer converts its data."""
  return input_pipeline.to_rgb(ImageOps.exif_transpose(image))


def network_input(image: Image.Image, size: int) -> np.ndarray:
  """An opened photo -> [size, size, 3] uint8, resized exactly as the trainer resizes its data.

  Call before anything loads the pixels: like the trainer, a JPEG is decoded at the smallest
  scale (1/2 .. 1/8) still >= size.
  """
  image.draft('RGB', (size, size))
  return np.asarray(to_rgb(image).resize((size, size), Image.Resampling.BILINEAR))


# ---------------------------------------------------------------------------------------------
# Logits -> classes at any resolution.


def _bucket(n: int) -> int:
  """The next of 128, 192, 256, 384, 512, 768, ...: few shapes to compile, < 50% padding."""
  size = 128
  while True:
    for bucket in (size, size * 3 // 2):
      if bucket >= n:
        return bucket
    size *= 2


@functools.partial(jax.jit, static_argnames='bucket')
def _upsampled_classes(logits: jax.Array, size: jax.Array, bucket: int) -> jax.Array:
  """[S, S, K] logits -> [bucket, bucket] uint8 classes, of which [:H, :W] are the photo's.

  jax.image.resize(logits, (H, W, K), 'bilinear') is scale_and_translate with scale (H/S, W/S)
  and no translation; output pixels past H or W only get zero weights. So the scale is traced and
  the output is a square bucket: one compile serves every photo whose sides fit the bucket.
  """
  scale = size.astype(jnp.float32) / jnp.array(logits.shape[:2], jnp.float32)
  resized = jax.image.scale_and_translate(logits, (bucket, bucket, logits.shape[-1]), (0, 1),
                                          scale, jnp.zeros(2, jnp.float32), 'linear')
  return jnp.argmax(resized, axis=-1).astype(jnp.uint8)


def upsample_classes(logits, height: int, width: int) -> np.ndarray:
  """logits [S, S, K] -> classes [height, width] uint8: bilinear on the logits, then argmax.

  Upsampling the logits rather than the argmax puts the outline between the network's pixels,
  where the classes' scores cross, instead of drawing the network's pixel grid.
  """
  bucket = _bucket(max(height, width))
  classes = _upsampled_classes(logits, jnp.array([height, width]), bucket=bucket)
  return np.asarray(classes)[:height, :width]


# ---------------------------------------------------------------------------------------------
# Predicting files.


class Progress:
  """'done/total, img/s, ETA' on stderr for long loops: in place on a terminal, else every 10 s."""

  def __init__(self, what: str, total: int, stream=None):
    self.what, self.total = what, total
    self.stream = stream or sys.stderr
    self.in_place = self.stream.isatty()
    self.started = self._shown = time.perf_counter()

  def update(self, done: int) -> None:
    now = time.perf_counter()
    if done < self.total and not self.in_place and now - self._shown < 10:
      return
    self._shown = now
    rate = done / max(now - self.started, 1e-9)
    eta = (self.total - done) / max(rate, 1e-9)
    line = f'{self.what} {done}/{self.total} images, {rate:.1f} img/s, ETA {eta:.0f}s'
    end = '\n' if done >= self.total or not self.in_place else ''
    print(('\r' if self.in_place else '') + line, end=end, file=self.stream, flush=True)


def padded_batch(images: list[np.ndarray], batch_size: int) -> np.ndarray:
  """Stacks up to batch_size images and pads with zeros: every batch has the one compiled shape."""
  batch = np.zeros((batch_size,) + images[0].shape, images[0].dtype)
  batch[:len(images)] = images
  return batch


def _output_paths(paths: list[str], out: epath.Path) -> list[tuple[epath.Path, epath.Path]]:
  """(mask, overlay) paths of each input; two inputs with one stem would overwrite each other."""
  seen = {}
  for path in paths:
    stem = epath.Path(path).stem
    if stem in seen:
      raise errors.UserError(
          f'{seen[stem]} and {path} would both write {out / (stem + "_mask.png")}; rename one '
          'or predict them into different --out directories')
    seen[stem] = path
  return [(out / f'{epath.Path(p).stem}_mask.png', out / f'{epath.Path(p).stem}_overlay.png')
          for p in paths]


def _save_png(pixels: np.ndarray, path: epath.Path) -> None:
  try:
    Image.fromarray(pixels).save(path, format='PNG')
  except OSError as e:
    raise errors.UserError(f'cannot write {path} ({e.strerror or e}); '
                           'free space or choose another --out') from None


def _write_outputs(photo: np.ndarray, classes: np.ndarray, targets, num_classes: int) -> int:
  """Writes the mask and the overlay; returns how many of the two replaced existing files."""
  from unet_flax import plots  # pylint: disable=g-import-not-at-top  (matplotlib is slow)
  replaced = 0
  for picture, target in zip((classes, plots.overlay(photo, classes, num_classes)), targets):
    replaced += target.exists()
    _save_png(picture, target)
  return replaced


def predict_files(state: train.TrainState, config: ml_collections.ConfigDict, paths: list[str],
                  out, *, batch_size: int = 8, stderr=None) -> list[str]:
  """Writes <out>/<stem>_mask.png and <stem>_overlay.png at each image's own resolution.

  Args:
    state: the restored model.
    config: its config (image_size, num_classes).
    paths: image files of any format, mode and size.
    out: the output directory (created).
    batch_size: images per jit call; every call has this shape, so the model compiles once.
    stderr: where failures and progress go.

  Returns:
    The paths that could not be read; each was reported on `stderr` in one line and skipped.
  """
  stderr = stderr or sys.stderr
  out = epath.Path(out)
  errors.make_output_dir(out, '--out')
  outputs = dict(zip(paths, _output_paths(paths, out)))
  batch_size = max(1, min(batch_size, len(paths)))
  predict = jax.jit(logits_fn)
  progress = Progress('predicted', len(paths), stderr) if len(paths) > batch_size else None
  failed, replaced = [], 0

  def failure(path, error):
    print(f'error: {error}; skipped', file=stderr, flush=True)
    failed.append(path)

  def read_input(image):
    return upright_size(image), network_input(image, config.image_size)

  for start in range(0, len(paths), batch_size):
    batch = []
    for path in paths[start:start + batch_size]:
      try:
        batch.append((path, *read_image(path, read_input)))
      except errors.UserError as e:
        failure(path, e)
    if batch:
      logits = np.asarray(predict(state, padded_batch([x for _, _, x in batch], batch_size)))
      for (path, size, _), image_logits in zip(batch, logits):
        try:
          photo = read_image(path, lambda image: np.asarray(to_rgb(image)))  # For the overlay.
        except errors.UserError as e:
          failure(path, e)
          continue
        classes = upsample_classes(image_logits, *size)
        replaced += _write_outputs(photo, classes, outputs[path], config.num_classes)
    if progress:
      progress.update(min(start + batch_size, len(paths)))
  if replaced:
    print(f'note: replaced {replaced} existing files in {out}', file=stderr)
  return failed
