"""Stopping a run and starting it again: preemption.Notice, and SIGKILL, SIGTERM and SIGINT.

The reference is `trained_workdir`: the tiny config trained for 2 epochs (6 steps) without a break.
A run interrupted anywhere and rerun with the same command must end with the same bits.
The signalled runs are train.py subprocesses; they share a compilation cache, so only the first
one compiles.
"""

import json
import os
import signal

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.conftest import make_tiny_config
from tests.conftest import run_script_signalled
from tests.conftest import tiny_overrides
from unet_flax import checkpoints
from unet_flax import preemption
from unet_flax import steps


def test_notice_records_the_first_signal_stops_at_a_second_ctrl_c_and_restores_handlers():
  def previous_term(signum, frame):
    del signum, frame
  previous = {signal.SIGTERM: previous_term, signal.SIGINT: signal.default_int_handler}
  for sig, handler in previous.items():
    signal.signal(sig, handler)
  try:
    with preemption.Notice() as notice:
      assert notice.received is None and not notice.stop(sync=False)
      os.kill(os.getpid(), signal.SIGTERM)  # Handled before os.kill returns (main thread).
      assert notice.received == 'SIGTERM'
      assert notice.stop(sync=False) and notice.stop(sync=True)  # One process: at once.
      os.kill(os.getpid(), signal.SIGTERM)  # A second SIGTERM changes nothing.
      with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)  # A second Ctrl-C: stop now, unsaved.
      assert notice.received == 'SIGTERM'  # The first signal's name.
    for sig, handler in previous.items():
      assert signal.getsignal(sig) is handler
    with preemption.Notice() as notice:
      os.kill(os.getpid(), signal.SIGINT)  # A first Ctrl-C only asks.
      assert notice.received == 'SIGINT'
      os.kill(os.getpid(), signal.SIGTERM)
      assert notice.received == 'SIGINT'  # Still the first.
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  finally:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope='module')
def compile_cache(tmp_path_factory):
  return tmp_path_factory.mktemp('jax_cache')


def _run(workdir, data_dir, cache, *, signal_when=None, sig=None) -> tuple[int, str]:
  """Runs train.py with the tiny config; sends `sig` once signal_when(output so far) holds.
  -> (exit code, output)."""
  return run_script_signalled(
      'train.py', '--config', 'configs/quickstart.py', f'--workdir={workdir}',
      *tiny_overrides(data_dir), cache=cache, log=workdir.parent / f'{workdir.name}.log',
      when=signal_when, sig=sig)


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
  # Acknowledged as it came, before the step it waits for.
  acknowledged = 'received SIGTERM: stopping after the current step and saving a checkpoint'
  assert out.index(acknowledged) < out.index('preempted at step 1')
  assert sorted(p.name for p in ckpts.iterdir()) == ['1']  # Whole: not a tmp directory.

  code, out = _run(workdir, tfds_dir, compile_cache, sig=signal.SIGINT,
                   signal_when=lambda out: 'resumed from step 1 of 6' in out)
  assert code == 0, out
  assert f'preempted at step 2: checkpoint saved to {ckpts / "2"};' in out
  assert ('received SIGINT: stopping after the current step and saving a checkpoint (Ctrl-C '
          'again stops at once, unsaved)') in out

  code, out = _run(workdir, tfds_dir, compile_cache)
  assert code == 0, out
  assert 'resumed from step 2 of 6' in out
  _assert_bit_identical(_final_state(workdir), _final_state(trained_workdir))
  steps = [json.loads(l)['step'] for l in (workdir / 'metrics.jsonl').read_text().splitlines()
           if json.loads(l)['split'] == 'train']
  assert steps == [1, 2, 3, 4, 5, 6]  # Each step logged once over the three runs.


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
