"""One of the 2 JAX processes of multihost_test: reads its shards, evaluates, saves what it saw.

  python tests/multihost_worker.py PORT PROCESS_ID DATA_DIR OUT.npz
"""

import sys

import jax
import numpy as np

from tests.conftest import fixed_state
from tests.conftest import make_tiny_config
from unet_flax import models
from unet_flax import modes
from unet_flax import runtime
from unet_flax import sources
from unet_flax.devices import Devices

EVAL_SPLIT = 'test[:11]'  # 11 examples: shards of 6 and 5, both padded in their last batch.


def main(port: str, process_id: str, data_dir: str, out: str):
  runtime.setup(f'127.0.0.1:{port}', 2, int(process_id))
  config = make_tiny_config(data_dir)
  # Half of this process's 12 train examples in memory, the rest and the eval shard streamed.
  config.cache_bytes = 6 * config.image_size ** 2 * 4
  devices = Devices(config.batch_size)  # 4 devices over 2 processes: 4 rows a process.
  # The trainer's reading and scoring: each process its shard, the confusions summed over both.
  mode, source = modes.get(config), sources.source_of(config)
  train_data = mode.read_split(source, config.train_split, shard=True)
  eval_data = mode.read_split(source, EVAL_SPLIT, shard=True)
  params = jax.device_put(fixed_state(config).params, devices.replicated)
  confusion = mode.score(models.forward(config), params, eval_data, devices)
  train_images, train_labels = train_data.stack()
  eval_images, eval_labels = eval_data.stack()
  np.savez(out, devices=jax.device_count(), processes=jax.process_count(),
           train_images=train_images, train_labels=train_labels,
           train_total=train_data.num_examples, eval_images=eval_images,
           eval_labels=eval_labels, eval_total=eval_data.num_examples,
           confusion=confusion)


if __name__ == '__main__':
  main(*sys.argv[1:])
