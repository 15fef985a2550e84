"""Shared fixtures and helpers: a tiny config on the tiny synthetic data set, a workdir trained
with it, and running the repository's scripts as subprocesses."""

import os
import pathlib
import socket
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `configs` is a directory of the repository, not a package.

from configs import quickstart  # pylint: disable=g-import-not-at-top,wrong-import-position
from unet_flax import runtime  # pylint: disable=g-import-not-at-top,wrong-import-position

# The XLA:CPU flags train.py uses, before JAX starts: in-process runs then compute with the same
# kernels as the train.py subprocesses they are compared with, bit for bit.
runtime.configure_xla_cpu()


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


def script_env(cache, **extra) -> dict:
  """The environment of a script run by a test: CPU, its own compile cache, our package first."""
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu', UNET_FLAX_CACHE=str(cache),
             **{k: str(v) for k, v in extra.items()})
  env.pop('XLA_FLAGS', None)
  return env


def run_script(script: str, *args, cache, cwd=ROOT, timeout=300, **env):
  """Runs a top-level script of the repository (train.py, predict.py, ...) to its end."""
  return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd,
                        env=script_env(cache, **env), capture_output=True, text=True,
                        timeout=timeout)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]
