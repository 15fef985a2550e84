"""Orbax checkpoints under <workdir>/checkpoints, and the run's config beside them.

The config is stored as <workdir>/config.json so that later tools (predict, evaluate, export) can
rebuild the model from the workdir alone, and so that a rerun with a config the checkpoints do not
fit is refused before anything is written.

A checkpoint that is not whole never blocks a resume: an interrupted save (orbax's
`<step>.orbax-checkpoint-tmp` directory) or a step directory that cannot be restored (a file
missing or cut short) is reported in one line and skipped, and the newest whole one is restored.
Nothing is deleted: such a directory is left as it is, and only moved aside (to `<step>.damaged`
or `<step>.interrupted`) if training reaches that step again, where orbax would delete it.
A full or read-only disk is one line naming what could not be written; the checkpoints already
written stay as they are.
"""

import contextlib
import dataclasses
import errno
import json
import logging
import re
import sys
import warnings

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from unet_flax import errors

# Fields that decide the shapes and meaning of the parameters: a checkpoint only fits their values.
MODEL_FIELDS = ('widths', 'num_classes', 'image_size', 'dtype')
CONFIG_FILE = 'config.json'
CHECKPOINT_DIR = 'checkpoints'
_TMP_SUFFIX = '.orbax-checkpoint-tmp'  # Orbax writes <step><suffix>, then renames it to <step>.
# Write failures that the user fixes on the disk, not in the code: errno -> (what, what to do).
_DISK_ERRNOS = {
    errno.ENOSPC: ('no space left on the device', 'free some space'),
    errno.EDQUOT: ('disk quota exceeded', 'free some space'),
    errno.EROFS: ('read-only file system', 'make it writable'),
    errno.EACCES: ('permission denied', 'make it writable'),
    errno.EPERM: ('operation not permitted', 'make it writable'),
    errno.EIO: ('input/output error', 'check the disk'),
}
# Errors that only a write can cause, whatever code raised them.
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
_INTACT = '; the earlier checkpoints are intact'
# Tensorstore (orbax's array writer) reports them as ValueError("... [os_error_code='28']").
_TENSORSTORE_ERRNO = re.compile(r"os_error_code='?(\d+)")
# Its status and what failed, without the paths and specs: 'DATA_LOSS: Error reading "params.x"'.
_TENSORSTORE_STATUS = re.compile(r'^([A-Z_]{5,}: [^\n]*?)(?: in OCDBT| at local| \[tensorstore|$)',
                                 re.MULTILINE)


def load_config(workdir) -> ml_collections.ConfigDict:
  """The config a workdir was trained with."""
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise errors.UserError(f'{path} not found: is {workdir} the --workdir of a training run?')
  return ml_collections.ConfigDict(_read_json(path))


def _read_json(path: epath.Path) -> dict:
  try:
    return json.loads(path.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise errors.UserError(f'{path} is damaged ({e}); restore it from a copy, or use another '
                           '--workdir') from None


def _comparable(value):
  return list(value) if isinstance(value, (list, tuple)) else value


def _warn(line: str) -> None:
  if jax.process_index() == 0:
    print(f'warning: {line}', file=sys.stderr, flush=True)


def disk_error_reason(e: BaseException, errnos=tuple(_DISK_ERRNOS)) -> tuple[str, str] | None:
  """(what went wrong, what to do) if `e` is a failed write the user can fix, else None."""
  code = e.errno if isinstance(e, OSError) else None
  if isinstance(e, ValueError) and not isinstance(e, errors.UserError):
    match = _TENSORSTORE_ERRNO.search(str(e))
    code = int(match.group(1)) if match else None
  return _DISK_ERRNOS[code] if code in errnos else None


@contextlib.contextmanager
def disk_errors(what: str | None, note: str = '', errnos=tuple(_DISK_ERRNOS)):
  """Turns a failed write (full or read-only disk...) into one UserError line naming `what`.

  Args:
    what: what was being written, for the message; None: the file the error names.
    note: said after what to do, e.g. that nothing else was lost.
    errnos: the errors converted; others propagate unchanged.
  """
  try:
    yield
  except (OSError, ValueError) as e:
    reason = disk_error_reason(e, errnos)
    if reason is None:
      raise
    # Orbax's abandoned writes also warn at exit; the line below has said it.
    warnings.filterwarnings('ignore', r"coroutine '.*' was never awaited", RuntimeWarning)
    filename = e.filename if isinstance(e, OSError) and e.filename else None
    what = (what or filename or 'a file') + (f' ({filename})' if what and filename else '')
    raise errors.UserError(f'cannot write {what}: {reason[0]}; {reason[1]} or choose another '
                           f'--workdir{note}') from None


def check_workdir(workdir: epath.Path) -> None:
  """Refuses a workdir that is a file or that cannot be written, with what to do."""
  errors.make_output_dir(workdir, '--workdir')


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
    self.workdir = epath.Path(workdir)
    self.directory = self.workdir / CHECKPOINT_DIR
    check_workdir(self.workdir)
    self._names = _SkippingNameFormat()
    _silence_orbax_echoes()
    self._check_config(config)  # Before orbax creates anything.
    options = ocp.CheckpointManagerOptions(max_to_keep=config.max_checkpoints_to_keep,
                                           create=True, step_name_format=self._names)
    with disk_errors(str(self.directory)):
      self._manager = ocp.CheckpointManager(self.directory, options=options)

  def _stored_steps(self) -> list[int]:
    if not self.directory.is_dir():
      return []
    return sorted(m.step for m in self._names.find_all(self.directory))

  def _check_config(self, config):
    """Stores the config, or refuses one whose model fields differ from the stored one."""
    path = self.workdir / CONFIG_FILE
    if path.exists() and self._stored_steps():
      stored = _read_json(path)
      differ = [f'{k}: checkpoint {stored.get(k)!r}, config {_comparable(config[k])!r}'
                for k in MODEL_FIELDS if _comparable(stored.get(k)) != _comparable(config[k])]
      if differ:
        raise errors.UserError(
            f'the checkpoints in {self.workdir} do not fit this config ({"; ".join(differ)}); '
            'use another --workdir or the same model fields')
    if jax.process_index() == 0:
      with disk_errors(str(path)):
        path.write_text(config.to_json_best_effort(indent=2, sort_keys=True) + '\n')

  @property
  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def path(self, step: int) -> epath.Path:
    return self.directory / self._names.build_name(step)

  def restore_or(self, state):
    """The newest whole checkpoint restored into `state`'s structure and shardings, or `state`.

    Damaged checkpoints are skipped with a warning; if there are checkpoints but none restores,
    that is more likely a mismatch than damage, and an error.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _saved(state))
    steps = sorted(self._manager.all_steps(), reverse=True)
    newest_error = None
    for step in steps:
      try:
        restored = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
      except Exception as e:  # pylint: disable=broad-except  (tensorstore raises bare Exception)
        _warn(f'checkpoint {self.path(step)} cannot be restored ({_reason(e)}); '
              'skipping it (left as is)')
        self._names.damaged.add(step)
        newest_error = newest_error or e
        continue
      if self._names.damaged:
        self._manager.reload()  # Orbax forgets the damaged steps.
      self._warn_interrupted_saves(after=step)
      return state.replace(**restored)
    if steps:
      raise errors.UserError(
          f'no checkpoint in {self.directory} can be restored into this model (newest: '
          f'{_reason(newest_error)}); use another --workdir')
    self._warn_interrupted_saves(after=-1)
    return state

  def _warn_interrupted_saves(self, after: int) -> None:
    for path in sorted(self.directory.glob(f'*{_TMP_SUFFIX}*')):
      step = path.name.split('.')[0]
      if step.isdigit() and int(step) > after:
        _warn(f'checkpoint {path} is incomplete (an interrupted save); skipping it (left as is)')

  def _clear_way(self, step: int) -> None:
    """Moves leftovers of `step` aside (never deletes them): orbax would delete them to save it."""
    final = self.path(step)
    leftovers = [(final.parent / (final.name + _TMP_SUFFIX), 'interrupted')]
    if step in self._names.damaged:
      leftovers.append((final, 'damaged'))
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
    with disk_errors(f'checkpoint {self.path(step)}', _INTACT):
      self._clear_way(step)
      self._manager.save(step, args=ocp.args.StandardSave(_saved(state)))

  def wait(self) -> None:
    """Blocks until the checkpoints started are whole on disk."""
    with disk_errors(f'a checkpoint in {self.directory}', _INTACT):
      self._manager.wait_until_finished()

  def close(self):
    """Waits for the checkpoints started, then releases orbax's threads."""
    try:
      self.wait()
    except BaseException:
      with contextlib.suppress(Exception):  # It re-raises the error just reported.
        self._manager.close()
      raise
    self._manager.close()


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
  return {'step': state.step, 'params': state.params, 'opt_state': state.opt_state}
