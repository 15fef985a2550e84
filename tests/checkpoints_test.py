"""checkpoints.Manager when things go wrong: torn checkpoints, another model's config, bad disks.

No training: the checkpoints hold the tiny model's initial state with params + step, so that which
step was restored shows in the numbers.
"""

import contextlib
import errno

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.conftest import snapshot
from tests.conftest import tmpfs
from unet_flax import checkpoints
from unet_flax import errors
from unet_flax import train
from unet_flax import steps


def _state(config, step: int):
  state = steps.create_train_state(config, jax.random.key(0))
  return state.replace(step=jnp.int32(step), params=jax.tree.map(lambda p: p + step, state.params))


def _restored_step(workdir, config) -> int:
  """The step a fresh manager restores, checked against the params saved with it."""
  manager = checkpoints.Manager(workdir, config)
  state = manager.restore_or(_state(config, 0))
  manager.close()
  step = int(state.step)
  for got, init in zip(jax.tree.leaves(state.params), jax.tree.leaves(_state(config, 0).params)):
    np.testing.assert_allclose(got, init + step, rtol=1e-6)
  return step


@pytest.fixture
def workdir(tmp_path, tiny_config):
  """A workdir with whole checkpoints of steps 2 and 4, as a run leaves it."""
  manager = checkpoints.Manager(tmp_path, tiny_config)
  for step in (2, 4):
    manager.save(step, _state(tiny_config, step))
  manager.close()
  return tmp_path


def _warnings(capsys) -> list[str]:
  return [l for l in capsys.readouterr().err.splitlines() if l.startswith('warning:')]


def test_interrupted_save_is_skipped_then_removed_when_its_step_is_saved(workdir, tiny_config, capsys):
  ckpts = workdir / 'checkpoints'
  tmp = ckpts / '6.orbax-checkpoint-tmp'  # What SIGKILL during orbax's save of step 6 leaves.
  (tmp / 'default').mkdir(parents=True)
  (tmp / 'default' / '_METADATA').write_text('{"tree_metadata": {')
  before = snapshot(tmp)
  capsys.readouterr()
  assert _restored_step(workdir, tiny_config) == 4
  assert _warnings(capsys) == [
      f'warning: checkpoint {tmp} is incomplete (an interrupted save); skipping it (left as is)']
  assert snapshot(tmp) == before

  # Saving step 6 again: the leftover of the interrupted save holds nothing the new save does not;
  # it is removed (moved aside, it filled a small disk again after the user freed space).
  manager = checkpoints.Manager(workdir, tiny_config)
  manager.restore_or(_state(tiny_config, 0))
  capsys.readouterr()
  manager.save(6, _state(tiny_config, 6))
  manager.close()
  assert _warnings(capsys) == [
      f'warning: removed the incomplete checkpoint {tmp} (an interrupted save of step 6), to save '
      'step 6 in its place']
  assert sorted(p.name for p in ckpts.iterdir()) == ['2', '4', '6']
  assert _restored_step(workdir, tiny_config) == 6


def test_leftovers_moved_aside_by_earlier_versions_are_removed(workdir, tiny_config, capsys):
  ckpts = workdir / 'checkpoints'
  for name in ('6.interrupted', '8.interrupted-2'):
    (ckpts / name / 'default').mkdir(parents=True)
    (ckpts / name / 'default' / 'd').write_bytes(b'x' * 2 ** 19)
  capsys.readouterr()
  assert _restored_step(workdir, tiny_config) == 4
  assert _warnings(capsys) == [
      f'warning: removed 2 incomplete checkpoints of interrupted saves (1.0 MiB) from {ckpts}: '
      '6.interrupted, 8.interrupted-2']
  assert sorted(p.name for p in ckpts.iterdir()) == ['2', '4']


def _truncate_array_files(step_dir):
  """Cuts every OCDBT data file of the step (b-tree nodes and array data, in each 'd' folder: the
  process's and, in newer orbax, the merged one) to half its size, as a copy cut short would.
  Cutting only the largest file once left a checkpoint that restored (CI, Python 3.12)."""
  for path in (step_dir / 'default').rglob('*'):
    if path.is_file() and path.parent.name == 'd':
      path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


@pytest.mark.parametrize('damage', ['missing file', 'truncated file'])
def test_damaged_newest_checkpoint_is_skipped_and_left_as_it_is(workdir, tiny_config, capsys,
                                                                 damage):
  newest = workdir / 'checkpoints' / '4'
  if damage == 'missing file':
    (newest / 'default' / 'manifest.ocdbt').unlink()
  else:
    _truncate_array_files(newest)
  before = snapshot(newest)
  capsys.readouterr()

  manager = checkpoints.Manager(workdir, tiny_config)
  state = manager.restore_or(_state(tiny_config, 0))
  assert int(state.step) == 2
  (line,) = _warnings(capsys)
  assert line.startswith(f'warning: checkpoint {newest} cannot be restored (')
  assert snapshot(newest) == before
  # The damaged step is not the latest any more: steps before it are saved, and it is moved aside
  # (not deleted) when its own step is saved again.
  manager.save(3, _state(tiny_config, 3))
  manager.save(4, _state(tiny_config, 4))
  manager.close()
  assert snapshot(workdir / 'checkpoints' / '4.damaged') == before
  assert _restored_step(workdir, tiny_config) == 4


def test_no_restorable_checkpoint_is_an_error(workdir, tiny_config):
  for step in (2, 4):
    _truncate_array_files(workdir / 'checkpoints' / str(step))
  manager = checkpoints.Manager(workdir, tiny_config)
  with pytest.raises(errors.UserError, match=r'^no checkpoint in .* can be restored'):
    manager.restore_or(_state(tiny_config, 0))
  manager.close()


def test_another_models_config_is_refused_before_anything_is_written(workdir, tiny_config):
  before = snapshot(workdir)
  other = tiny_config.copy_and_resolve_references()
  other.widths = (8, 16)
  other.num_classes = 4
  other.num_epochs = 7  # Not a model field: no complaint.
  with pytest.raises(errors.UserError) as raised:
    train.train_and_evaluate(other, str(workdir))
  message = str(raised.value)
  assert '\n' not in message
  assert 'widths: checkpoint [4, 8], config [8, 16]' in message
  assert 'num_classes: checkpoint 3, config 4' in message
  assert 'image_size' not in message and 'dtype' not in message and 'num_epochs' not in message
  assert snapshot(workdir) == before  # config.json included: no file added, changed or touched.
  assert checkpoints.load_config(workdir).widths == (4, 8)


def test_checkpoints_without_their_config_are_compared_by_shape_before_a_restore(
    workdir, tiny_config, capfd):
  (workdir / 'config.json').unlink()  # Checkpoints copied alone.
  before = snapshot(workdir)
  other = tiny_config.copy_and_resolve_references()
  other.widths = (8, 16)
  capfd.readouterr()
  with pytest.raises(errors.UserError) as raised:
    train.train_and_evaluate(other, str(workdir))
  assert str(raised.value) == (
      f'the checkpoints in {workdir / "checkpoints"} do not fit this config (params'
      "['bottleneck']['Conv_0']['bias']: checkpoint (16,), config (32,) and 24 more) and there is "
      'no config.json beside them to say theirs; pass the model fields they were trained with, '
      'or use another --workdir')
  out, err = capfd.readouterr()
  assert out == err == ''  # No orbax log line, no restore attempted.
  assert snapshot(workdir) == before  # No config.json of the refused config.
  assert _restored_step(workdir, tiny_config) == 4  # The right one restores, then is stored.
  assert checkpoints.load_config(workdir).widths == (4, 8)


@pytest.mark.parametrize('field, value', [('widths', (8, 16)), ('learning_rate', 0.5)])
def test_a_config_the_checkpoints_refuse_is_refused_before_the_data_are_opened(
    workdir, tiny_config, monkeypatch, field, value):
  def no_data(config):
    raise AssertionError('the data were opened')
  monkeypatch.setattr(train.sources, 'source_of', no_data)
  tiny_config[field] = value
  with pytest.raises(errors.UserError, match=f'{field}: '):
    train.train_and_evaluate(tiny_config, str(workdir))


@pytest.mark.parametrize('failure', [
    OSError(errno.ENOSPC, 'No space left on device', 'checkpoints/6.orbax-checkpoint-tmp/_x'),
    # What tensorstore, orbax's array writer, raises for the same.
    ValueError('RESOURCE_EXHAUSTED: Error writing "params.a/0" in OCDBT database at local file '
               '"checkpoints/6.orbax-checkpoint-tmp/": Failed to write 177 bytes to file 14: No '
               "space left on device [os_error_code='28']"),
], ids=['OSError', 'tensorstore'])
def test_full_disk_is_a_one_line_error_and_the_checkpoints_stay(workdir, tiny_config, monkeypatch,
                                                                failure):
  before = snapshot(workdir / 'checkpoints')

  def save(*args, **kwargs):
    raise failure

  manager = checkpoints.Manager(workdir, tiny_config)
  manager.restore_or(_state(tiny_config, 0))
  monkeypatch.setattr(ocp.CheckpointManager, 'save', save)
  with pytest.raises(errors.UserError) as raised:
    manager.save(6, _state(tiny_config, 6))
  manager.close()
  assert str(raised.value).startswith(
      f'cannot write checkpoint {workdir / "checkpoints" / "6"}')
  assert str(raised.value).endswith(
      'no space left on the device; free some space or choose another --workdir; the earlier '
      'checkpoints are intact')
  assert '\n' not in str(raised.value)
  assert snapshot(workdir / 'checkpoints') == before
  monkeypatch.undo()
  assert _restored_step(workdir, tiny_config) == 4


@pytest.fixture
def tiny_disk(tmp_path):
  yield from tmpfs(tmp_path, '300k')


def test_real_full_disk_in_a_background_save(tiny_disk, tiny_config):
  manager = checkpoints.Manager(tiny_disk, tiny_config)
  saved = []
  with pytest.raises(errors.UserError) as raised:
    for step in range(1, 20):  # Orbax writes in the background: the error shows at a later call.
      manager.save(step, _state(tiny_config, step))
      saved.append(step)
    manager.wait()
  with contextlib.suppress(errors.UserError):  # Closing may say it again.
    manager.close()
  assert 'no space left on the device; free some space' in str(raised.value)
  assert '\n' not in str(raised.value)
  assert len(saved) >= 2  # The disk took one checkpoint at least; it was not the first save.
  whole = sorted(int(p.name) for p in (tiny_disk / 'checkpoints').iterdir() if p.name.isdigit())
  assert whole and set(whole) <= set(saved)
  for step in whole:  # Whatever orbax finished before the disk filled is whole.
    with ocp.StandardCheckpointer() as checkpointer:
      restored = checkpointer.restore(tiny_disk / 'checkpoints' / str(step) / 'default')
    assert int(restored['step']) == step


def test_ema_params_are_saved_restored_and_read_by_inference(tmp_path, tiny_config):
  tiny_config.ema_decay = 0.9
  state = _state(tiny_config, 3)
  state = state.replace(ema_params=jax.tree.map(lambda p: p - 10.0, state.params))
  manager = checkpoints.Manager(tmp_path, tiny_config)
  manager.save(3, state)
  manager.close()
  manager = checkpoints.Manager(tmp_path, tiny_config)
  restored = manager.restore_or(steps.create_train_state(tiny_config, jax.random.key(1)))
  manager.close()
  for saved, got in [(state.params, restored.params), (state.ema_params, restored.ema_params)]:
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(got)):
      np.testing.assert_array_equal(a, b)
  # Inference reads the average by default, the trained weights when asked.
  for ema, expected in [(True, state.ema_params), (False, state.params)]:
    step, params = checkpoints.restore_params(tmp_path, tiny_config, ema=ema)
    assert step == 3
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(params)):
      np.testing.assert_array_equal(a, b)


def test_a_run_with_ema_and_one_without_do_not_share_checkpoints(workdir, tiny_config):
  before = snapshot(workdir)
  other = tiny_config.copy_and_resolve_references()
  other.ema_decay = 0.99
  with pytest.raises(errors.UserError) as raised:
    train.train_and_evaluate(other, str(workdir))
  assert str(raised.value) == (
      f'the checkpoints in {workdir} do not fit this config (ema_decay: checkpoint 0.0, config '
      '0.99 (a moving average of the weights is kept or not)); use another --workdir or the '
      'same model fields')
  assert snapshot(workdir) == before
