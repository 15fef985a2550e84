"""The same step on 1 device, 4 simulated devices, and 2 processes: the same numbers.

Device counts are fixed when JAX starts, so the many-device sides run in subprocesses.
"""

import functools
import json
import subprocess
import sys
import textwrap

import jax
import numpy as np

from tests.conftest import ROOT
from tests.conftest import free_port
from tests.conftest import make_tiny_config
from tests.conftest import script_env
from tests.conftest import start_script
from unet_flax import checkpoints
from unet_flax import input_pipeline
from unet_flax import models
from unet_flax import sources
from unet_flax import train
from unet_flax import steps

# One step of the tiny model on a fixed global batch of 8, on however many devices JAX has.
STEP = textwrap.dedent('''
    import sys, jax, numpy as np
    from tests.conftest import make_tiny_config
    from unet_flax import models, steps
    from unet_flax.devices import Devices
    config = make_tiny_config(None)
    config.num_microbatches = int(sys.argv[2])
    if config.num_microbatches:  # Not auto: compared across microbatch counts.
      config.dropout_rate = 0.0  # Microbatches draw their own dropout masks.
    devices = Devices(config.batch_size)
    step, _ = steps.compile_steps(config, devices, models.forward(config))
    state = jax.jit(lambda k: steps.create_train_state(config, k),
                    out_shardings=devices.replicated)(jax.random.key(0))
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, (8, 16, 16)).astype(np.uint8)
    batch = {'image': rng.integers(0, 256, (8, 16, 16, 3)).astype(np.uint8), 'label': labels}
    batch = devices.put(batch)
    hlo = step.lower(state, batch, jax.random.key(1)).compile().as_text()
    moves = sum(hlo.count(op) for op in ('all-to-all', 'all-gather', 'collective-permute'))
    state, metrics = step(state, batch, jax.random.key(1))
    leaves = jax.tree.leaves(jax.device_get(state.params))
    # Adam's first moment after one step: (1 - b1) x the gradient.
    mu = {f'mu_{i}': m for i, m in enumerate(
        jax.tree.leaves(jax.device_get(state.opt_state.inner_state[0].mu)))}
    np.savez(sys.argv[1], loss=metrics['loss'], devices=jax.device_count(), moves=moves, *leaves,
             **mu)
''')


def _devices(count: int) -> str:
  """The XLA_FLAGS of a process with `count` CPU devices."""
  return f'--xla_force_host_platform_device_count={count}'


def _steps(tmp_path, runs):
  """Runs STEP for each (devices, microbatches); returns the saved results."""
  results = []
  for devices, microbatches in runs:
    out = tmp_path / f'{devices}_{microbatches}.npz'
    subprocess.run([sys.executable, '-c', STEP, str(out), str(microbatches)],
                   env=script_env('', XLA_FLAGS=_devices(devices)), cwd=ROOT, check=True,
                   timeout=300)
    results.append(np.load(out))
    assert int(results[-1]['devices']) == devices
  return results


def test_four_devices_give_the_same_step_as_one(tmp_path):
  one, four = _steps(tmp_path, [(1, 0), (4, 0)])
  np.testing.assert_allclose(four['loss'], one['loss'], atol=1e-5)
  leaves = [k for k in one.files if k.startswith('arr_')]
  assert leaves
  for key in leaves:
    np.testing.assert_allclose(four[key], one[key], atol=1e-5)


def _reference_run(config):
  """One process, one device, fed the global batches the 2 processes assemble between them."""
  source = sources.source_of(config)
  read = lambda split, p: input_pipeline.load_split(source, split, image_size=config.image_size,
                                                    process_index=p, process_count=2)
  shards = [read(config.train_split, p) for p in range(2)]
  init_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))
  state = steps.create_train_state(config, init_rng)
  forward = models.forward(config)
  step = jax.jit(functools.partial(steps.train_step, forward))
  per_epoch = train.steps_per_epoch(config, shards[0].num_examples)
  for epoch in range(config.num_epochs):
    local = [input_pipeline.train_batches(s, config.batch_size // 2, seed=config.seed,
                                          epoch=epoch, process_index=p, num_steps=per_epoch)
             for p, s in enumerate(shards)]
    for parts in zip(*local):
      batch = {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}
      state, _ = step(state, batch, dropout_rng)
  eval_shards = [read(config.eval_split, p) for p in range(2)]
  confusion = sum(
      np.asarray(steps.eval_step(forward, state.params, batch, config.num_classes)['confusion'])
      .sum(0)
      for s in eval_shards for batch in input_pipeline.eval_batches(s, 4, process_count=2))
  return state, confusion


def test_two_processes_train_like_one_on_the_same_global_batches(tmp_path, tfds_dir):
  config = make_tiny_config(tfds_dir)
  config.num_epochs = 1
  sources.source_of(config)  # Prepared once, before both start.
  port = free_port()
  workdir = tmp_path / 'run'
  overrides = [f'--config.{k}={v}' for k, v in
               [('dataset', config.dataset), ('data_dir', tfds_dir), ('image_size', 16),
                ('widths', '(4,8)'), ('batch_size', 8), ('num_epochs', 1)]]
  processes = [
      start_script('train.py', '--config', 'configs/quickstart.py', f'--workdir={workdir}',
                   f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
                   f'--process_id={i}', *overrides, cache='', XLA_FLAGS=_devices(2))
      for i in range(2)]
  outputs = [p.communicate(timeout=240)[0] for p in processes]
  for p, out in zip(processes, outputs):
    assert p.returncode == 0, out
  assert '4 cpu device(s), 2 process(es)' in outputs[0]

  reference, reference_confusion = _reference_run(config)
  manager = checkpoints.Manager(workdir, config)
  restored = manager.restore_or(steps.create_train_state(config, jax.random.key(9)))
  manager.close()
  assert int(restored.step) == int(reference.step) == 3
  for got, want in zip(jax.tree.leaves(restored.params), jax.tree.leaves(reference.params)):
    np.testing.assert_allclose(got, want, atol=1e-5)
  last_eval = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()
               if json.loads(l)['split'] == 'eval'][-1]
  np.testing.assert_array_equal(last_eval['confusion_matrix'], reference_confusion)
  assert reference_confusion.sum() == 12 * 16 * 16


def test_microbatches_on_four_devices_give_one_batchs_step_and_move_no_data(tmp_path):
  one, four = _steps(tmp_path, [(1, 1), (4, 2)])
  # Each device splits its own rows: no batch data crosses devices, only gradients are summed.
  assert int(four['moves']) == 0
  np.testing.assert_allclose(four['loss'], one['loss'], rtol=1e-6)
  # Gradients, not parameters: Adam's first step is about lr x sign(gradient), whose sign
  # rounding can flip where a gradient is nearly zero.
  moments = [k for k in one.files if k.startswith('mu_')]
  assert moments
  for key in moments:
    np.testing.assert_allclose(four[key], one[key], rtol=1e-4, atol=1e-8)
