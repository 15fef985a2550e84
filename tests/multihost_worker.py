"""One of the 2 JAX processes of multihost_test: reads its shards, evaluates, saves what it saw.

  python tests/multihost_worker.py PORT PROCESS_ID DATA_DIR OUT.npz
"""

import functools
import sys

import jax
import numpy as np

from tests.conftest import fixed_state
from tests.conftest import make_tiny_config
from unet_flax import input_pipeline
from unet_flax import runtime
from unet_flax import steps
from unet_flax.devices import Devices

EVAL_SPLIT = 'test[:11]'  # 11 examples: shards of 6 and 5, both padded in their last batch.


def main(port: str, process_id: str, data_dir: str, out: str):
  runtime.setup(f'127.0.0.1:{port}', 2, int(process_id))
  config = make_tiny_config(data_dir)
  devices = Devices(config.batch_size)  # 4 devices over 2 processes: 4 rows a process.
  read = functools.partial(
      input_pipeline.load_split, config.dataset, data_dir=data_dir, image_size=config.image_size,
      num_classes=config.num_classes, process_index=jax.process_index(),
      process_count=jax.process_count())
  train_data, eval_data = read(config.train_split), read(EVAL_SPLIT)
  state = jax.device_put(fixed_state(config), devices.replicated)
  _, eval_fn = steps.compile_steps(config, devices)
  results = steps.evaluate(eval_fn, state, eval_data, devices)
  np.savez(out, devices=jax.device_count(), processes=jax.process_count(),
           train_images=train_data.images, train_labels=train_data.labels,
           train_total=train_data.num_examples, eval_images=eval_data.images,
           eval_labels=eval_data.labels, eval_total=eval_data.num_examples,
           confusion=results['confusion_matrix'])


if __name__ == '__main__':
  main(*sys.argv[1:])
