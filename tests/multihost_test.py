"""2 real JAX processes on loopback read disjoint shards that cover each split, and evaluate as one.

Each process has 2 CPU devices (4 in all) and talks to the other through gloo, as on 2 hosts.
"""

import numpy as np

from tests import multihost_worker
from tests.conftest import fixed_state
from tests.conftest import free_port
from tests.conftest import make_tiny_config
from tests.conftest import start_script
from unet_flax import input_pipeline
from unet_flax import metrics
from unet_flax import models
from unet_flax import sources
from unet_flax import steps


def _rows(images, labels):
  """Each example as bytes, to compare sets of examples whatever their order."""
  return [i.tobytes() + l.tobytes() for i, l in zip(images, labels)]


def test_two_processes_read_each_example_once_and_evaluate_like_one(tmp_path, tfds_dir):
  config = make_tiny_config(tfds_dir)
  source = sources.source_of(config)  # Prepared once, before both start.
  port = free_port()
  outs = [tmp_path / f'{i}.npz' for i in range(2)]
  workers = [start_script('tests/multihost_worker.py', port, i, tfds_dir, outs[i],
                          cache=tmp_path / 'jax_cache',
                          XLA_FLAGS='--xla_force_host_platform_device_count=2')
             for i in range(2)]
  logs = [w.communicate(timeout=120)[0] for w in workers]
  for w, log in zip(workers, logs):
    assert w.returncode == 0, log
  got = [np.load(out) for out in outs]
  assert [int(g['devices']) for g in got] == [4, 4]
  assert [int(g['processes']) for g in got] == [2, 2]

  # One process reading everything: the reference.
  read = lambda split: input_pipeline.load_split(source, split, image_size=config.image_size)
  for split, prefix, sizes in [(config.train_split, 'train', [12, 12]),
                               (multihost_worker.EVAL_SPLIT, 'eval', [6, 5])]:
    whole = read(split)
    assert [len(g[f'{prefix}_images']) for g in got] == sizes
    assert [int(g[f'{prefix}_total']) for g in got] == [whole.num_examples] * 2
    union = sum((_rows(g[f'{prefix}_images'], g[f'{prefix}_labels']) for g in got), [])
    assert len(set(union)) == len(union) == whole.num_examples  # Each example once...
    assert set(union) == set(_rows(*whole.stack()))  # ...and all of them.

  state = fixed_state(config)
  forward = models.forward(config)
  want = sum(metrics.host_confusion_matrices(batch['label'][batch['mask']], np.asarray(
      steps.predict(forward, state.params, batch['image']))[batch['mask']], config.num_classes
                                             ).sum(0)
             for batch in input_pipeline.eval_batches(whole, 4))
  assert want.sum() == 11 * config.image_size ** 2
  assert np.count_nonzero(want.sum(axis=0)) >= 2  # The predictions vary: the check has teeth.
  for g in got:  # Summed over both processes' padded, masked batches: every process holds it.
    np.testing.assert_array_equal(g['confusion'], want)
