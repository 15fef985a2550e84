"""Shared fixtures and helpers: a tiny config on the tiny synthetic data set, a workdir trained
with it, batches and states for step tests, a folder data set, pictures' colours, and running the
repository's scripts as subprocesses. Test files import these; never each other's helpers."""

import atexit
import functools
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `configs` is a directory of the repository, not a package.

from configs import quickstart  # pylint: disable=g-import-not-at-top,wrong-import-position
from unet_flax import runtime  # pylint: disable=g-import-not-at-top,wrong-import-position

# The XLA:CPU flags train.py uses, before JAX starts: in-process runs then compute with the same
# kernels as the train.py subprocesses they are compared with, bit for bit.
runtime.configure_xla_cpu()
# One compile cache for the session's in-process runs, as train.py keeps one: the many tests that
# train the tiny config compile the same steps, and XLA then compiles each once. The scripts the
# tests run keep caches of their own (script_env).
_COMPILE_CACHE = tempfile.mkdtemp(prefix='unet_flax_test_compile_cache_')
atexit.register(shutil.rmtree, _COMPILE_CACHE, True)
os.environ['UNET_FLAX_CACHE'] = _COMPILE_CACHE
runtime.enable_compilation_cache()


@pytest.fixture(scope='session')
def tfds_dir(tmp_path_factory):
  """One tfds data_dir for the whole session: tiny synthetic data is prepared once."""
  return str(tmp_path_factory.mktemp('tfds'))


def make_tiny_config(data_dir):
  """A U-Net of widths (4, 8) on 16x16 synthetic images: compiles and trains in seconds."""
  config = quickstart.get_config()
  config.dataset = 'synthetic_pets/tiny'
  config.data_dir = data_dir
  config.image_size = 16
  config.widths = (4, 8)
  config.batch_size = 8
  config.num_epochs = 2
  config.eval_every_epochs = 1
  config.log_every_steps = 1
  config.checkpoint_every_steps = 2
  config.num_prediction_images = 2
  return config


@pytest.fixture
def tiny_config(tfds_dir):
  return make_tiny_config(tfds_dir)


@pytest.fixture(scope='session')
def trained_workdir(tmp_path_factory, tfds_dir):
  """A workdir trained for 2 epochs with the tiny config. Read it; do not write to it."""
  from unet_flax import train  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp('trained')
  train.train_and_evaluate(make_tiny_config(tfds_dir), str(workdir))
  return workdir


def tiny_overrides(data_dir) -> list[str]:
  """The --config.<field>=<value> flags that make configs/quickstart.py the tiny config."""
  tiny, base = make_tiny_config(data_dir).to_dict(), quickstart.get_config().to_dict()
  return [f'--config.{k}={"(" + ",".join(map(str, v)) + ")" if isinstance(v, tuple) else v}'
          for k, v in tiny.items() if v != base[k]]


# Steps on tiny batches.

def labelled_batch(config, n: int, seed: int = 0) -> dict:
  """n random examples of the config's size whose images carry their labels: a few steps fit
  them. {'image': [n, S, S, 3] uint8, 'label': [n, S, S] uint8}."""
  rng = np.random.default_rng(seed)
  size = config.image_size
  labels = rng.integers(0, config.num_classes, (n, size, size)).astype(np.uint8)
  images = (labels[..., None] * 100 + rng.integers(0, 40, (n, size, size, 3))).astype(np.uint8)
  return {'image': images, 'label': labels}


def fixed_state(config):
  """A TrainState whose params are fixed random numbers from numpy (the same in every process)
  and whose Adam state is fresh. Nothing to compile: initialising the model under jit takes
  seconds on CPU."""
  import jax  # pylint: disable=g-import-not-at-top  (after configure_xla_cpu)
  from unet_flax import steps  # pylint: disable=g-import-not-at-top
  shapes = jax.eval_shape(functools.partial(steps.create_train_state, config), jax.random.key(0))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.normal(0, 0.3, s.shape).astype(s.dtype), shapes.params)
  # numpy leaves: jax.device_put places them on any mesh, of one process or several.
  return jax.device_get(steps.TrainState.create(apply_fn=None, params=params,
                                                tx=shapes.tx))


# Independent numpy references of the losses, written out pixel by pixel, and of flip TTA.

def _softmax(logits):
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def reference_cross_entropy(logits, labels, mask, class_weights=None) -> float:
  """Softmax cross-entropy of the valid examples' pixels, each weighted by its true class's
  weight, divided by the summed weight. logits [B, H, W, K], labels [B, H, W], mask [B]."""
  class_weights = np.ones(logits.shape[-1]) if class_weights is None else class_weights
  total = weight_sum = 0.0
  for b in range(len(logits)):
    if not mask[b]:
      continue
    for y, x in np.ndindex(labels.shape[1:]):
      k = labels[b, y, x]
      p = _softmax(np.asarray(logits[b, y, x], np.float64))
      total += class_weights[k] * -np.log(p[k])
      weight_sum += class_weights[k]
  return total / weight_sum


def reference_soft_dice(logits, labels, mask, smooth=1.0) -> float:
  """1 - the mean over classes of (2 sum(p y) + smooth) / (sum(p) + sum(y) + smooth), sums over
  every valid pixel of the batch."""
  mask = np.asarray(mask, bool)
  k = logits.shape[-1]
  probs = _softmax(np.asarray(logits, np.float64))[mask]
  truth = np.eye(k)[np.asarray(labels)[mask]]
  dice = [(2 * np.sum(probs[..., c] * truth[..., c]) + smooth) /
          (np.sum(probs[..., c]) + np.sum(truth[..., c]) + smooth) for c in range(k)]
  return 1 - np.mean(dice)


def reference_flip_tta_logits(forward, images) -> np.ndarray:
  """log((softmax(forward(x)) + softmax(forward(mirror x)) mirrored back) / 2) in float64, the
  mirror taken with numpy along the width. images [B, H, W, C]; forward -> [B, H, W, K]."""
  plain = _softmax(np.asarray(forward(images), np.float64))
  mirrored = _softmax(np.asarray(forward(np.asarray(images)[:, :, ::-1]), np.float64))
  return np.log((plain + mirrored[:, :, ::-1]) / 2)


# A `folder:` data set: stem -> (height, width, image format); sizes vary, formats too.
FOLDER_EXAMPLES = {
    'cat_01': (20, 24, 'JPEG'), 'cat_02': (18, 18, 'PNG'), 'dog_01': (24, 16, 'JPEG'),
    'dog_02': (16, 22, 'PNG'), 'dog_03': (22, 20, 'JPEG'), 'fox_01': (17, 23, 'PNG'),
    'fox_02': (21, 19, 'JPEG'), 'owl_01': (19, 21, 'JPEG'), 'owl_02': (23, 17, 'PNG'),
    'owl_03': (20, 20, 'JPEG'),
}
FOLDER_SUFFIX = {'JPEG': '.jpg', 'PNG': '.png'}
FOLDER_CLASSES = 3


def write_folder_data(root, examples=None, seed=0):
  """images/ and masks/ under root (FOLDER_EXAMPLES by default); masks hold 0..2 in a blob, as
  PNG ('P' mode for the first: its indices are the classes). -> root."""
  examples = FOLDER_EXAMPLES if examples is None else examples
  rng = np.random.default_rng(seed)
  (root / 'images').mkdir(parents=True)
  (root / 'masks').mkdir()
  for i, (stem, (h, w, fmt)) in enumerate(examples.items()):
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(image).save(root / 'images' / (stem + FOLDER_SUFFIX[fmt]), format=fmt)
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4:3 * h // 4, w // 4:3 * w // 4] = 1
    mask[h // 3:h // 2, w // 3:w // 2] = 2
    mask_image = Image.fromarray(mask)
    if i == 0:
      mask_image = mask_image.convert('P')
      mask_image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    mask_image.save(root / 'masks' / (stem + '.png'))
  return root


def snapshot(root) -> dict:
  """Everything under root: each file's bytes and modification time, each directory's name.

  Equal snapshots: nothing was added, removed, written or touched.
  """
  root = pathlib.Path(root)
  return {str(p.relative_to(root)):
          (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else None
          for p in root.rglob('*')}


def tmpfs(tmp_path, size: str):
  """A `size` tmpfs (a real disk that fills up) under tmp_path, yielded, then unmounted; or a
  skip where mounting is not allowed. For a fixture: yield from tmpfs(tmp_path, '300k')."""
  path = tmp_path / 'disk'
  path.mkdir()
  mount = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)],
                         capture_output=True, check=False)
  if mount.returncode:
    pytest.skip(f'cannot mount a tmpfs here: {mount.stderr.decode().strip()}')
  yield path
  subprocess.run(['umount', str(path)], check=True)


def read_only_dir(tmp_path):
  """A directory this process cannot write, or a skip where none can be made."""
  path = tmp_path / 'read_only'
  path.mkdir()
  path.chmod(0o555)
  if not os.access(path, os.W_OK):
    return path
  # Root writes through permission bits; the kernel refuses writes to /proc/sys even to root.
  if os.path.isdir('/proc/sys') and not os.access('/proc/sys', os.W_OK):
    return pathlib.Path('/proc/sys')
  pytest.skip('this process can write everywhere (root, and no /proc/sys)')


def tensorboard_scalars(directory) -> dict:
  """{(tag, step): value} of every scalar in the event files (TFRecords) under `directory`."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  scalars = {}
  for path in sorted(pathlib.Path(directory).glob('events.out.tfevents.*')):
    data, i = path.read_bytes(), 0
    while i < len(data):
      length = int.from_bytes(data[i:i + 8], 'little')
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + length])  # After length and CRC.
      i += 12 + length + 4
      for value in event.summary.value:
        scalars[(value.tag, event.step)] = value.simple_value
  return scalars


# Pictures.

def gradient_picture(height: int, width: int) -> np.ndarray:
  """[H, W, 3] uint8: a picture that differs along both axes, so a rotation or a shift shows."""
  y, x = np.mgrid[:height, :width]
  return np.stack([x * 255 // width, y * 255 // height, (x * y) % 256], -1).astype(np.uint8)


def colour_counts(path, colours, tolerance: int = 0) -> list[int]:
  """How many pixels of the PNG at `path` have each RGB colour of `colours` (uint8 triples),
  each channel within `tolerance`."""
  with Image.open(path) as image:
    pixels = np.asarray(image.convert('RGB')).reshape(-1, 3).astype(int)
  return [int(np.all(np.abs(pixels - np.asarray(c, int)) <= tolerance, axis=1).sum())
          for c in colours]


def png_pixels(path) -> np.ndarray:
  """[H, W, 3] uint8: the pixels of the PNG at `path`."""
  with Image.open(path) as image:
    return np.asarray(image.convert('RGB'))


# Scripts as subprocesses.

def script_env(cache, **extra) -> dict:
  """The environment of a script run by a test: CPU, its own compile cache, our package first.

  The test process's XLA_FLAGS are dropped (scripts set their own); `extra` may set them.
  """
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu', UNET_FLAX_CACHE=str(cache))
  env.pop('XLA_FLAGS', None)
  env.update({k: str(v) for k, v in extra.items()})
  return env


def script_command(script: str, *args) -> list[str]:
  """python <ROOT>/<script> args...: a top-level script, or one under tests/."""
  return [sys.executable, str(ROOT / script), *map(str, args)]


def run_script(script: str, *args, cache, cwd=ROOT, timeout=300, **env):
  """Runs a top-level script of the repository (train.py, predict.py, ...) to its end."""
  return subprocess.run(script_command(script, *args), cwd=cwd, env=script_env(cache, **env),
                        capture_output=True, text=True, timeout=timeout)


def start_script(script: str, *args, cache, cwd=ROOT, stdout=subprocess.PIPE,
                 **env) -> subprocess.Popen:
  """Starts a script in the background; its stderr goes with its stdout (a pipe or a file)."""
  return subprocess.Popen(script_command(script, *args), cwd=cwd, env=script_env(cache, **env),
                          stdout=stdout, stderr=subprocess.STDOUT, text=True)


def run_script_signalled(script: str, *args, cache, log, when=None, sig=None, cwd=ROOT,
                         timeout=300, **env) -> tuple[int, str]:
  """Runs a script with its output going to the file `log`; sends it `sig` as soon as
  when(output so far) holds, then waits for its end. -> (exit code, output)."""
  with open(log, 'w') as out:
    process = start_script(script, *args, cache=cache, cwd=cwd, stdout=out, **env)
  deadline = time.monotonic() + timeout
  try:
    while when and process.poll() is None:
      if when(pathlib.Path(log).read_text()):
        process.send_signal(sig)
        break
      assert time.monotonic() < deadline, pathlib.Path(log).read_text()
      time.sleep(0.005)
    process.wait(timeout=max(deadline - time.monotonic(), 1))
  finally:
    if process.poll() is None:
      process.kill()
      process.wait()
  return process.returncode, pathlib.Path(log).read_text()


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]
