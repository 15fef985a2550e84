"""Stopping a run and starting it again: SIGKILL, SIGTERM, SIGINT, and non-finite losses.

The reference is `trained_workdir`: the tiny config trained for 2 epochs (6 steps) without a break.
A run interrupted anywhere and rerun with the same command must end with the same bits.
The signalled runs are train.py subprocesses; they share a compilation cache, so only the first
one compiles.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import quickstart
from tests.conftest import ROOT
from tests.conftest import make_tiny_config
from unet_flax import checkpoints
from unet_flax import errors
from unet_flax import train
from unet_flax import steps
from unet_flax.devices import Devices


@pytest.fixture(scope='module')
def compile_cache(tmp_path_factory):
  return tmp_path_factory.mktemp('jax_cache')


def _command(workdir, data_dir) -> list[str]:
  """train.py with the overrides that make quickstart the tiny config of the tests."""
  tiny, base = make_tiny_config(data_dir).to_dict(), quickstart.get_config().to_dict()
  overrides = [f'--config.{k}={"(" + ",".join(map(str, v)) + ")" if isinstance(v, tuple) else v}'
               for k, v in tiny.items() if v != base[k]]
  return [sys.executable, 'train.py', '--config', 'configs/quickstart.py', f'--workdir={workdir}',
          *overrides]


def _run(workdir, data_dir, cache, *, signal_when=None, sig=None) -> tuple[int, str]:
  """Runs train.py; sends `sig` once signal_when(output so far) holds. -> (exit code, output)."""
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu', UNET_FLAX_CACHE=str(cache))
  env.pop('XLA_FLAGS', None)
  log = workdir.parent / f'{workdir.name}.log'
  with open(log, 'w') as out:
    process = subprocess.Popen(_command(workdir, data_dir), env=env, cwd=ROOT, stdout=out,
                               stderr=subprocess.STDOUT)
  deadline = time.monotonic() + 300
  while signal_when and process.poll() is None and time.monotonic() < deadline:
    if signal_when(log.read_text()):
      process.send_signal(sig)
      break
    time.sleep(0.005)
  process.wait(timeout=max(deadline - time.monotonic(), 1))
  return process.returncode, log.read_text()


def _final_state(workdir, step: int = 6) -> dict:
  """Checkpoint `step` of a workdir, read without writing anything there."""
  config = make_tiny_config(None)
  cpu = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  saved = checkpoints._saved  # pylint: disable=protected-access
  abstract = jax.eval_shape(lambda: saved(steps.create_train_state(config, jax.random.key(0))))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cpu), abstract)
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(workdir / 'checkpoints' / str(step) / 'default', abstract)


def _assert_bit_identical(got: dict, want: dict):
  assert int(got['step']) == int(want['step'])
  for name in ('params', 'opt_state'):
    got_leaves, want_leaves = jax.tree.leaves(got[name]), jax.tree.leaves(want[name])
    assert len(got_leaves) == len(want_leaves)
    for a, b in zip(got_leaves, want_leaves):
      np.testing.assert_array_equal(a, b)


def test_sigkill_and_rerun_end_with_the_bits_of_an_uninterrupted_run(
    tmp_path, tfds_dir, trained_workdir, compile_cache):
  workdir = tmp_path / 'run'
  # Checkpoints every 2 steps, 3 steps an epoch: killed after step 2, inside the first epoch (the
  # evaluation after step 3 gives the poll a second to see step 2 before step 3 is saved).
  code, out = _run(workdir, tfds_dir, compile_cache, sig=signal.SIGKILL,
                   signal_when=lambda _: (workdir / 'checkpoints' / '2').is_dir())
  assert code == -signal.SIGKILL, out
  code, out = _run(workdir, tfds_dir, compile_cache)
  assert code == 0, out
  assert 'resumed from step 2 of 6' in out
  _assert_bit_identical(_final_state(workdir), _final_state(trained_workdir))


def test_sigterm_and_sigint_save_the_step_say_so_and_exit_0(tmp_path, tfds_dir, trained_workdir,
                                                            compile_cache):
  workdir = tmp_path / 'run'
  ckpts = workdir / 'checkpoints'
  # The signal arrives before the first step: the run finishes that step, saves it and stops.
  code, out = _run(workdir, tfds_dir, compile_cache, sig=signal.SIGTERM,
                   signal_when=lambda out: 'model:' in out)
  assert code == 0, out
  assert (f'preempted at step 1: checkpoint saved to {ckpts / "1"}; rerun the same command to '
          'resume') in out.splitlines()
  assert sorted(p.name for p in ckpts.iterdir()) == ['1']  # Whole: not a tmp directory.

  code, out = _run(workdir, tfds_dir, compile_cache, sig=signal.SIGINT,
                   signal_when=lambda out: 'resumed from step 1 of 6' in out)
  assert code == 0, out
  assert f'preempted at step 2: checkpoint saved to {ckpts / "2"};' in out

  code, out = _run(workdir, tfds_dir, compile_cache)
  assert code == 0, out
  assert 'resumed from step 2 of 6' in out
  _assert_bit_identical(_final_state(workdir), _final_state(trained_workdir))
  steps = [json.loads(l)['step'] for l in (workdir / 'metrics.jsonl').read_text().splitlines()
           if json.loads(l)['split'] == 'train']
  assert steps == [1, 2, 3, 4, 5, 6]  # Each step logged once over the three runs.


def _snapshot(root) -> dict:
  return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), 'rb').read()
          for d, _, files in os.walk(root) for f in files}


def test_nonfinite_loss_stops_naming_its_step_and_saves_nothing_after(tmp_path, tiny_config,
                                                                      trained_workdir):
  workdir = tmp_path / 'run'
  shutil.copytree(trained_workdir, workdir)  # Steps 1-6 trained; checkpoints 3, 4 and 6.
  before = _snapshot(workdir / 'checkpoints')
  # Step 7's Adam update multiplies the weights by ~1e30; step 8's forward pass overflows.
  tiny_config.learning_rate = 1e30
  tiny_config.num_epochs = 3
  tiny_config.log_every_steps = 3  # Losses fetched at step 9 only...
  tiny_config.checkpoint_every_steps = 2  # ...but also before the checkpoint of step 8.
  with pytest.raises(errors.UserError) as raised:
    train.train_and_evaluate(tiny_config, str(workdir))
  assert str(raised.value) == (
      f'the loss is nan at step 8: training stopped without saving it (the last checkpoint, '
      f'{workdir / "checkpoints" / "6"}, is untouched); lower config.learning_rate or check the '
      'data, or set config.skip_nonfinite_updates=True')
  assert _snapshot(workdir / 'checkpoints') == before  # No step 8, nothing rewritten.


class _NoCheckpoints:
  latest_step = None


@pytest.mark.parametrize('losses, counts, message', [
    ([1.0, np.nan, np.inf], [0, 1, 2], 'the loss is nan at step 8:'),
    ([1.0, 1.0, np.inf], [0, 0, 1], 'the loss is inf at step 9:'),
    ([1.0, 1.0, 1.0], [0, 1, 1], 'the gradients are not finite at step 8:'),  # Loss still finite.
])
def test_nonfinite_check_names_the_first_bad_step_of_the_fetched_history(losses, counts, message):
  history = [{'loss': np.float32(l), 'nonfinite_updates': np.int32(c)}
             for l, c in zip(losses, counts)]
  with pytest.raises(errors.UserError, match=f'^{message}.*no checkpoint was saved'):
    train.NonFiniteCheck(skip=False, count=0).check(9, history, _NoCheckpoints())
  train.NonFiniteCheck(skip=True, count=0).check(9, history, _NoCheckpoints())  # No error.


def test_skip_nonfinite_updates_skips_them_in_the_step_and_counts_them(tiny_config):
  tiny_config.learning_rate = 1e30
  tiny_config.skip_nonfinite_updates = True
  devices = Devices(2)
  step, _ = steps.compile_steps(tiny_config, devices)
  state = steps.create_train_state(tiny_config, jax.random.key(0))
  rng = np.random.default_rng(0)
  batch = devices.put({'image': rng.integers(0, 256, (2, 16, 16, 3)).astype(np.uint8),
                       'label': rng.integers(0, 3, (2, 16, 16)).astype(np.uint8)})
  history, params = [], []
  for _ in range(3):
    state, step_metrics = step(state, batch, jax.random.key(1))
    history.append(jax.device_get(step_metrics))
    params.append(jax.device_get(state.params))
  losses = [float(h['loss']) for h in history]
  assert np.isfinite(losses[0]) and not np.isfinite(losses[1]) and not np.isfinite(losses[2])
  assert [int(h['nonfinite_updates']) for h in history] == [0, 1, 2]
  assert int(state.step) == 3  # The step count (dropout keys, data position) still advances.
  for after_1, after_3 in zip(jax.tree.leaves(params[0]), jax.tree.leaves(params[2])):
    np.testing.assert_array_equal(after_1, after_3)  # Steps 2 and 3 changed nothing.
    assert np.all(np.isfinite(after_3))


def test_sigterm_while_the_data_set_is_prepared_exits_0_having_written_nothing(tmp_path,
                                                                                compile_cache):
  workdir = tmp_path / 'run'
  code, out = _run(workdir, str(tmp_path / 'fresh_tfds'), compile_cache, sig=signal.SIGTERM,
                   signal_when=lambda out: 'generating synthetic_pets/tiny' in out)
  assert code == 0, out
  assert (f'stopped by SIGTERM while preparing the data, before training; nothing was written to '
          f'{workdir}; rerun the same command to start') in out
  assert 'Traceback' not in out
  assert not workdir.exists()
