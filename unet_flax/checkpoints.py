"""Orbax checkpoints under <workdir>/checkpoints, and the run's config beside them.

The config is stored as <workdir>/config.json so that later tools (predict, evaluate, export) can
rebuild the model from the workdir alone, and so that a rerun with a config the checkpoints do not
fit, or would train on differently, is refused before anything is written (`check_config`). It is
written once the checkpoints are known to fit: a refused config never replaces theirs.

A checkpoint that is not whole never blocks a resume: an interrupted save (orbax's
`<step>.orbax-checkpoint-tmp` directory) or a step directory that cannot be restored (a file
missing or cut short) is reported in one line and skipped, and the newest whole one is restored.
A damaged checkpoint is never deleted: it is left as it is, and only moved aside (to
`<step>.damaged`) if training reaches that step again, where orbax would delete it. An interrupted
save's temporary directory holds nothing that is not saved again: it is removed when its step is
saved again (and `<step>.interrupted` directories of earlier versions when a run starts), so that
it does not fill a small disk again after the user freed space.
A full or read-only disk is one line naming what could not be written; the checkpoints already
written stay as they are.
"""

import contextlib
import dataclasses
import functools
import logging
import os
import re
import shutil
import sys
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from unet_flax import config as config_lib
from unet_flax import errors
from unet_flax import paths

CONFIG_FILE = 'config.json'
CHECKPOINT_DIR = 'checkpoints'
_TMP_SUFFIX = '.orbax-checkpoint-tmp'  # Orbax writes <step><suffix>, then renames it to <step>.
_INTACT = '; the earlier checkpoints are intact'
# Its status and what failed, without the paths and specs: 'DATA_LOSS: Error reading "params.x"'.
_TENSORSTORE_STATUS = re.compile(r'^([A-Z_]{5,}: [^\n]*?)(?: in OCDBT| at local| \[tensorstore|$)',
                                 re.MULTILINE)


def load_config(workdir) -> ml_collections.ConfigDict:
  """The config a workdir was trained with, on today's defaults and checked (config.load)."""
  return config_lib.load(epath.Path(workdir) / CONFIG_FILE)


def _comparable(value):
  return list(value) if isinstance(value, (list, tuple)) else value


def _warn(line: str) -> None:
  if jax.process_index() == 0:
    print(f'warning: {line}', file=sys.stderr, flush=True)


@dataclasses.dataclass
class _SkippingNameFormat:
  """Orbax's standard step names (<step>), with the steps found damaged hidden from orbax.

  Hidden, a damaged step is neither restored, nor counted as the latest (which would stop saves of
  earlier steps), nor deleted by max_to_keep.
  """
  damaged: set[int] = dataclasses.field(default_factory=set)
  base: ocp.path.step.NameFormat = dataclasses.field(
      default_factory=ocp.path.step.standard_name_format)

  def build_name(self, step: int) -> str:
    return self.base.build_name(step)

  def find_all(self, base_path):
    return (m for m in self.base.find_all(base_path) if m.step not in self.damaged)

  def find_step(self, base_path, step: int):
    if step in self.damaged:
      raise ValueError(f'step {step} is damaged')
    return self.base.find_step(base_path, step)


class Manager:
  """Saves and restores the train state; knows the run's config."""

  def __init__(self, workdir, config: ml_collections.ConfigDict):
    self.workdir = paths.absolute(workdir)  # Orbax takes absolute paths only.
    self.directory = self.workdir / CHECKPOINT_DIR
    paths.make_output_dir(self.workdir, '--workdir')
    self._names = _SkippingNameFormat()
    _silence_orbax_echoes()
    self._check_config(config)  # Before orbax creates anything.
    options = ocp.CheckpointManagerOptions(max_to_keep=config.max_checkpoints_to_keep,
                                           create=True, step_name_format=self._names)
    with errors.disk_errors(str(self.directory)):
      self._manager = ocp.CheckpointManager(self.directory, options=options)

  def _stored_steps(self) -> list[int]:
    return _steps(self.directory, self._names)

  def _check_config(self, config):
    """Refuses a config the checkpoints do not fit; stores it now if there are none to fit."""
    self._config = config
    check_config(self.workdir, config, allow_change=True)  # Before orbax creates anything.
    if not self._stored_steps():
      self._store_config()

  def _store_config(self):
    """Writes the config beside checkpoints it is known to fit (or where there are none yet)."""
    path = self.workdir / CONFIG_FILE
    if jax.process_index() == 0:
      paths.refuse_link(path)  # A workdir from someone else: never written through.
      with errors.disk_errors(str(path)):
        path.write_text(self._config.to_json_best_effort(indent=2, sort_keys=True) + '\n')

  @property
  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def path(self, step: int) -> epath.Path:
    return self.directory / self._names.build_name(step)

  def restore_or(self, state):
    """The newest whole checkpoint restored into `state`'s structure and shardings, or `state`.

    Damaged checkpoints are skipped with a warning; if there are checkpoints but none restores,
    that is more likely a mismatch than damage, and an error. The config is stored once one has
    restored.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _saved(state))

    def skip(step, e, next_step):
      del next_step
      _warn(f'checkpoint {self.path(step)} cannot be restored ({_reason(e)}); '
            'skipping it (left as is)')
      self._names.damaged.add(step)

    if self.directory.is_dir():
      self._remove_interrupted_leftovers()
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      self._warn_interrupted_saves(after=-1)
      return state
    with _quiet_absl():  # Orbax logs each failed read: the one line below says what matters.
      step, restored = _restore_newest(
          steps, lambda step: self._manager.restore(step, args=ocp.args.StandardRestore(abstract)),
          skip, lambda e: errors.UserError(
              f'no checkpoint in {self.directory} can be restored into this model (newest: '
              f'{_reason(e)}); use another --workdir'))
    self._store_config()  # Only now: a config the checkpoints refuse must not replace theirs.
    if self._names.damaged:
      self._manager.reload()  # Orbax forgets the damaged steps.
    self._warn_interrupted_saves(after=step)
    return state.replace(**restored)

  def _warn_interrupted_saves(self, after: int) -> None:
    for path in sorted(self.directory.glob(f'*{_TMP_SUFFIX}*')):
      step = path.name.split('.')[0]
      if step.isdigit() and int(step) > after:
        _warn(f'checkpoint {path} is incomplete (an interrupted save); skipping it (left as is)')

  def _remove_interrupted_leftovers(self) -> None:
    """Removes the `<step>.interrupted*` directories earlier versions moved interrupted saves to:
    parts of saves that were never whole, which filled small disks again and again."""
    leftovers = sorted(p for p in self.directory.glob('*.interrupted*') if p.is_dir())
    if not leftovers or jax.process_index() != 0:
      return
    size = sum(os.path.getsize(os.path.join(d, f)) for path in leftovers
               for d, _, files in os.walk(path) for f in files)
    for path in leftovers:
      shutil.rmtree(path, ignore_errors=True)
    _warn(f'removed {len(leftovers)} incomplete checkpoint{"s" * (len(leftovers) > 1)} of '
          f'interrupted saves ({size / 2**20:.1f} MiB) from {self.directory}: '
          f'{", ".join(p.name for p in leftovers)}')

  def _clear_way(self, step: int) -> None:
    """Clears the way for saving `step`, where orbax would delete leftovers: an interrupted save's
    temporary directory is removed (it holds a part of what is saved now); a damaged checkpoint
    is moved aside, never deleted."""
    final = self.path(step)
    interrupted = final.parent / (final.name + _TMP_SUFFIX)
    if interrupted.exists():
      if jax.process_index() == 0:
        shutil.rmtree(interrupted)
      _warn(f'removed the incomplete checkpoint {interrupted} (an interrupted save of step '
            f'{step}), to save step {step} in its place')
    leftovers = [(final, 'damaged')] if step in self._names.damaged else []
    for path, kind in leftovers:
      if not path.exists():
        continue
      aside, n = final.parent / f'{final.name}.{kind}', 1
      while aside.exists():
        n += 1
        aside = final.parent / f'{final.name}.{kind}-{n}'
      if jax.process_index() == 0:
        path.rename(aside)
      _warn(f'moved the incomplete checkpoint {path} to {aside}, to save step {step} in its place')
    self._names.damaged.discard(step)

  def save(self, step: int, state) -> None:
    """Starts writing the checkpoint of `step` (in the background); a no-op if it exists."""
    if self._manager.latest_step() == step:
      return
    self.wait()  # A failure of the previous one shows here.
    with errors.disk_errors(f'checkpoint {self.path(step)}', _INTACT):
      self._clear_way(step)
      self._manager.save(step, args=ocp.args.StandardSave(_saved(state)))

  def wait(self) -> None:
    """Blocks until the checkpoints started are whole on disk."""
    with errors.disk_errors(f'a checkpoint in {self.directory}', _INTACT):
      self._manager.wait_until_finished()

  def close(self):
    """Waits for the checkpoints started, then releases orbax's threads."""
    try:
      self.wait()
    except BaseException:
      with contextlib.suppress(Exception):  # It re-raises the error just reported.
        self._manager.close()
      raise
    with errors.disk_errors(f'a checkpoint in {self.directory}', _INTACT):  # A failure after wait().
      self._manager.close()


def check_config(workdir, config: ml_collections.ConfigDict, allow_change: bool = False) -> None:
  """Refuses a config that the checkpoints of `workdir` do not fit, or that would train them on
  differently; reads a little, writes nothing, restores nothing.

  Beside a config.json, its model fields must be the config's, and (unless allow_change) so must
  every field but config.RESUME_FREE_FIELDS: a resume is exact only with the config the
  checkpoints were trained with. Checkpoints without a config.json (copied alone) are compared by
  the shapes of their stored parameters.

  Raises:
    UserError: naming the fields (or the parameter) that differ, and what to do.
  """
  workdir = paths.absolute(workdir)
  steps = restorable_steps(workdir)
  if not steps:
    return
  path = workdir / CONFIG_FILE
  if not path.exists():
    _check_shapes(workdir / CHECKPOINT_DIR, steps, config)
    return
  stored = config_lib.load(path)
  differ = [f'{k}: checkpoint {_comparable(stored[k])!r}, config {_comparable(config[k])!r}'
            for k in config_lib.MODEL_FIELDS if _comparable(stored[k]) != _comparable(config[k])]
  if bool(stored.ema_decay) != bool(config.ema_decay):
    differ.append(f'ema_decay: checkpoint {stored.ema_decay!r}, config {config.ema_decay!r} '
                  '(a moving average of the weights is kept or not)')
  if differ:
    raise errors.UserError(
        f'the checkpoints in {workdir} do not fit this config ({"; ".join(differ)}); '
        'use another --workdir or the same model fields')
  changed = [f'{k}: {_comparable(stored[k])!r} -> {_comparable(config[k])!r}'
             for k in sorted(config.keys()) if k not in config_lib.RESUME_FREE_FIELDS
             and _comparable(stored[k]) != _comparable(config[k])]
  if changed and not allow_change:
    raise errors.UserError(
        f'this config changes how the checkpoints in {workdir} were trained '
        f'({"; ".join(changed)}), and a resume is exact only with their config ({path}); rerun '
        'without those overrides, use another --workdir, or pass --allow_config_change to go on '
        'with the new values')


def _check_shapes(directory: epath.Path, steps: list[int], config) -> None:
  """Compares the parameter shapes stored in the newest readable checkpoint's metadata with
  those of the config's model; a checkpoint whose metadata cannot be read is left to restore."""
  from unet_flax import models  # pylint: disable=g-import-not-at-top  (flax only when needed)
  expected = jax.eval_shape(functools.partial(models.init_params, config), jax.random.key(0))
  for step in reversed(steps):
    try:
      with _quiet_absl(), ocp.StandardCheckpointer() as checkpointer:
        stored = checkpointer.metadata(directory / str(step) / 'default').item_metadata
      stored = stored['params']
    except Exception:  # pylint: disable=broad-except  (damaged: the restore skips it, warning)
      continue
    want = {jax.tree_util.keystr(k): tuple(v.shape)
            for k, v in jax.tree_util.tree_leaves_with_path(expected)}
    have = {jax.tree_util.keystr(k): tuple(getattr(v, 'shape', ()) or ())
            for k, v in jax.tree_util.tree_leaves_with_path(stored)}
    differ = [f'params{k}: checkpoint {have.get(k, "absent")}, config {want.get(k, "absent")}'
              for k in sorted(want.keys() | have.keys()) if have.get(k) != want.get(k)]
    if differ:
      more = f' and {len(differ) - 1} more' if len(differ) > 1 else ''
      raise errors.UserError(
          f'the checkpoints in {directory} do not fit this config ({differ[0]}{more}) and there '
          f'is no {CONFIG_FILE} beside them to say theirs; pass the model fields they were '
          'trained with, or use another --workdir')
    return


@contextlib.contextmanager
def _quiet_absl():
  """Orbax's absl warnings (a missing metadata file, each array that failed to restore) held
  back while it runs; the caller reports a failure in one line."""
  logger = logging.getLogger('absl')
  level = logger.level
  logger.setLevel(logging.ERROR + 10)
  try:
    yield
  finally:
    logger.setLevel(level)


def _steps(directory: epath.Path, names=None) -> list[int]:
  """The steps of the whole checkpoints in `directory`, oldest first (orbax's step names)."""
  if not directory.is_dir():
    return []
  names = names or ocp.path.step.standard_name_format()
  return sorted(m.step for m in names.find_all(directory))


def _restore_newest(steps: list[int], restore, skip, no_restore, passthrough=()):
  """(step, restore(step)) for the first of `steps` that restores.

  Args:
    steps: candidates, the preferred first.
    restore: step -> the restored tree; raises if the checkpoint cannot be read.
    skip: called as skip(step, error, next step) for each one that fails but the last.
    no_restore: error -> the exception to raise when none restores (given the first's error).
    passthrough: exceptions of restore that are raised as they are, not skipped.
  """
  first_error = None
  for step, next_step in zip(steps, [*steps[1:], None]):
    try:
      return step, restore(step)
    except passthrough:
      raise
    except Exception as e:  # pylint: disable=broad-except  (tensorstore raises bare Exception)
      first_error = first_error or e
      if next_step is not None:
        skip(step, e, next_step)
  raise no_restore(first_error)


def restorable_steps(workdir) -> list[int]:
  """The steps of the checkpoints of a training run's workdir, oldest first."""
  return _steps(paths.absolute(workdir) / CHECKPOINT_DIR)


def restore_params(workdir, config: ml_collections.ConfigDict, step: int | None = None,
                   sharding: jax.sharding.Sharding | None = None,
                   ema: bool = True) -> tuple[int, Any]:
  """(step, parameters) of a checkpoint of `workdir`, read without writing anything there.

  Of a run that kept a moving average of its weights (config.ema_decay > 0), that average is
  read, as the trainer evaluated it; with ema=False, the trained weights themselves.

  Only the parameters are read, into the shapes of `models.init_params(config)`: neither the
  optimizer nor the data set is needed, so a run trained elsewhere restores anywhere, while its
  trainer may still be writing beside it.

  Args:
    workdir: a training run's --workdir.
    config: the run's config (its model fields decide the shapes).
    step: which checkpoint; None: the newest that restores (a damaged one is skipped, with a
      warning, as the trainer skips it).
    sharding: where the arrays go; default: the first local device.

  Raises:
    UserError: if there is no such checkpoint, or none restores into the config's model.
  """
  from unet_flax import models  # pylint: disable=g-import-not-at-top  (flax only when restoring)
  workdir = paths.absolute(workdir)
  directory = workdir / CHECKPOINT_DIR
  steps = restorable_steps(workdir)
  if not steps:
    raise errors.UserError(f'{directory} holds no checkpoint; train first (python train.py '
                           f'--workdir {workdir} ...) or pass another --workdir')
  if step is not None and step not in steps:
    raise errors.UserError(f'{directory} has no checkpoint of step {step}; '
                           f'pass --step with one of {", ".join(map(str, steps))}')
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  shapes = jax.eval_shape(functools.partial(models.init_params, config), jax.random.key(0))
  key = 'ema_params' if ema and config.ema_decay else 'params'
  target = {key: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)}
  args = ocp.args.PyTreeRestore(target, partial_restore=True,
                                restore_args=ocp.checkpoint_utils.construct_restore_args(target))
  _silence_orbax_echoes()

  def skip(step, e, next_step):
    _warn(f'checkpoint {directory / str(step)} cannot be restored ({_reason(e)}); trying step '
          f'{next_step}')

  def restore(step):
    try:
      return checkpointer.restore(directory / str(step) / 'default', args=args)
    except Exception:  # pylint: disable=broad-except  (tensorstore raises bare Exception)
      if not (directory / str(step)).exists():
        raise _Deleted(step) from None  # The trainer removed it (max_checkpoints_to_keep).
      raise

  def none_restores(e):
    return errors.UserError(f'{directory} has no checkpoint that restores into the model of '
                            f'{workdir / CONFIG_FILE} ({_reason(e)}); pass another --step or '
                            '--workdir')

  # A checkpointer only reads: unlike a CheckpointManager it creates no directory and cleans up
  # nothing, so a training run may go on writing beside it. A checkpoint it deletes while we read
  # it sends us to the newest again.
  with ocp.PyTreeCheckpointer() as checkpointer:
    for _ in range(_DELETED_RETRIES):
      candidates = [step] if step is not None else restorable_steps(workdir)[::-1]
      try:
        step, restored = _restore_newest(candidates, restore, skip, none_restores,
                                         passthrough=(_Deleted,))
        return step, restored[key]
      except _Deleted as deleted:
        if step is not None:
          raise errors.UserError(f'checkpoint {directory / str(deleted.step)} was deleted (by '
                                 'its training run) while being read; pass another --step') from None
  raise errors.UserError(f'the checkpoints of {directory} were deleted while being read, '
                         f'{_DELETED_RETRIES} times; retry when its training run has ended')


# Restores a reader retries when the trainer deletes the checkpoint it reads.
_DELETED_RETRIES = 5


class _Deleted(Exception):
  """A checkpoint's directory vanished while it was restored."""

  def __init__(self, step: int):
    super().__init__(f'step {step} deleted')
    self.step = step



def _reason(e: BaseException) -> str:
  """A failed restore in a few words: tensorstore's status if there is one (DATA_LOSS: ...)."""
  chain = [e]
  while len(chain) < 8 and (chain[-1].__cause__ or chain[-1].__context__) is not None:
    chain.append(chain[-1].__cause__ or chain[-1].__context__)
  for error in chain:
    status = _TENSORSTORE_STATUS.match(str(error))
    if status:
      return status.group(1)
  lines = str(e).strip().splitlines()
  return f'{type(e).__name__}: {lines[0][:200]}' if lines else type(e).__name__


_silenced = False  # Whether _silence_orbax_echoes has run in this process.


def _silence_orbax_echoes() -> None:
  """Drops the echoes of a failed restore or save; the one line we print says what matters.

  When one array of a checkpoint cannot be read or written, orbax gives up on the others while
  tensorstore still completes them, in threads and at garbage collection: each prints a traceback
  (hundreds for one full disk). Only those are dropped; installed once per process.
  """
  global _silenced
  if _silenced:
    return
  _silenced = True
  previous = sys.unraisablehook

  def is_echo(text: str) -> bool:
    return 'TensorStore' in text or 'OCDBT' in text or text == 'Event loop is closed'

  def hook(unraisable):
    if not is_echo(str(unraisable.exc_value)):
      previous(unraisable)

  sys.unraisablehook = hook
  logging.getLogger('asyncio').addFilter(
      lambda record: not ('exception was never retrieved' in record.getMessage()
                          and is_echo(record.getMessage())))


def _saved(state) -> dict:
  """What a checkpoint holds: everything of the state that changes while training."""
  saved = {'step': state.step, 'params': state.params, 'opt_state': state.opt_state}
  if state.ema_params is not None:
    saved['ema_params'] = state.ema_params
  return saved
