"""Shared fixtures: a tiny config on the tiny synthetic data set, and a workdir trained with it."""

import sys

import pytest

ROOT = __import__('pathlib').Path(__file__).resolve().parents[1]
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
