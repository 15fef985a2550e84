"""A training run's workdir: checked before anything is written, and owned by one run at a time.

Two trainers on one workdir would take each other's checkpoints for interrupted ones and write
over each other's files. `Lock` makes a second one stop at once, in one line naming the first:
<workdir>/.lock holds the owner's host, process id and start time, and is removed when the run
ends. A lock left by a run that was killed (its process is gone from this host) is taken over
with a warning. Readers (predict, evaluate, export) take no lock.
"""

import datetime
import errno
import json
import os
import socket
import sys

import jax
from etils import epath

from unet_flax import errors
from unet_flax import paths

LOCK_FILE = '.lock'
CONFIG_FILE = 'config.json'  # checkpoints.CONFIG_FILE (not imported: orbax is slow to import).
# What a run writes in its workdir: none of them, and nothing in them, may be a link (a workdir
# from someone else could send the writes anywhere).
RUN_FILES = (CONFIG_FILE, 'checkpoints', 'metrics.jsonl', 'tensorboard', 'predictions',
             'curves.png', 'eval', LOCK_FILE)


def check(workdir, allow_nonempty: bool = True) -> epath.Path:
  """The workdir, absolute, if it can be used; creates nothing (Lock does, when taken).

  Args:
    workdir: the --workdir given.
    allow_nonempty: False: a directory that holds files but is not a run (`is_run`) is refused,
      since training would replace a user's own config.json, metrics.jsonl or curves.png.

  Raises:
    UserError: if it is a file, cannot be created, holds a link where a run writes (RUN_FILES and
      anything in them), or
      (allow_nonempty False) holds files of something other than a run.
  """
  path = paths.absolute(workdir)
  if path.exists() and not path.is_dir():
    raise errors.UserError(f'--workdir {path} is a file, not a directory; choose another path')
  if path.is_dir():
    _refuse_links(path)
    if not allow_nonempty:
      _refuse_other_files(path)
  existing = path
  while not existing.exists() and existing.parent != existing:
    existing = existing.parent
  # Root passes permission bits but not a read-only file system: access() checks both.
  if existing == path and not os.access(path, os.W_OK):
    raise errors.UserError(f'--workdir {path} is not writable; choose a writable path')
  if existing != path and (not existing.is_dir() or not os.access(existing, os.W_OK)):
    why = errno.ENOTDIR if not existing.is_dir() else errno.EACCES
    raise errors.UserError(f'--workdir {path} cannot be created ({os.strerror(why)}); choose a '
                           'writable path')
  return path


def _refuse_links(path: epath.Path) -> None:
  """Raises a UserError naming the first symbolic link among RUN_FILES or anywhere below them.

  The directories are walked without following links, so a checkpoints/ of many files costs one
  listing a directory; a link further down (predictions/step_2.png, checkpoints/5) would send a
  write, or orbax's removal of an old checkpoint, outside the workdir.
  """
  for name in RUN_FILES:
    top = path / name
    link = top if os.path.islink(top) else None
    if link is None and top.is_dir():
      link = next((os.path.join(parent, entry) for parent, dirs, files in os.walk(top)
                   for entry in sorted(dirs + files) if os.path.islink(os.path.join(parent, entry))),
                  None)
    if link is not None:
      raise errors.UserError(
          f'--workdir {path}: {os.path.relpath(link, path)} is a symbolic link (to '
          f'{os.readlink(link)}); a run writes its files only in its workdir, never through '
          'links: remove the link, or use another --workdir')


def is_run(path: epath.Path) -> bool:
  """Whether the directory is a training run's workdir: it has checkpoints/, or a config.json
  that holds a run's model fields."""
  from unet_flax import config as config_lib  # pylint: disable=g-import-not-at-top
  if (path / 'checkpoints').is_dir():
    return True
  try:
    stored = json.loads((path / CONFIG_FILE).read_text())
  except (OSError, ValueError):
    return False
  return isinstance(stored, dict) and all(
      name in stored for name in config_lib.MODEL_FIELDS
      if name not in config_lib.LATER_MODEL_FIELDS)


def _refuse_other_files(path: epath.Path) -> None:
  names = sorted(p.name for p in path.iterdir() if p.name != LOCK_FILE)
  if names and not is_run(path):
    shown = ', '.join(names[:5]) + (f' and {len(names) - 5} more' if len(names) > 5 else '')
    raise errors.UserError(
        f'--workdir {path} holds files ({shown}) but is not a unet-flax run (no checkpoints/, no '
        'config.json of a run), and training would replace them; use a new or empty directory, '
        'or pass --allow_nonempty_workdir')


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Someone else's process: alive.
    return True
  return True


class Lock:
  """A context in which this run owns `workdir` (only the lead process writes the lock)."""

  def __init__(self, workdir):
    self.path = epath.Path(workdir) / LOCK_FILE
    self._owned = False

  def __enter__(self) -> 'Lock':
    paths.make_output_dir(self.path.parent, '--workdir')
    if jax.process_index() != 0:
      return self
    me = {'host': socket.gethostname(), 'pid': os.getpid(),
          'started': datetime.datetime.now().isoformat(timespec='seconds')}
    for _ in range(2):  # The second try follows the removal of a stale lock.
      try:
        with open(self.path, 'x') as f:
          json.dump(me, f)
        self._owned = True
        return self
      except FileExistsError:
        self._take_over_if_stale()
    raise errors.UserError(f'{self.path} could not be taken; retry, or delete it if no run uses '
                           f'{self.path.parent}')

  def _take_over_if_stale(self) -> None:
    """Removes a lock whose run is gone from this host; else raises a UserError naming the run."""
    try:
      owner = json.loads(self.path.read_text())
      host, pid, started = owner['host'], int(owner['pid']), owner.get('started', '?')
    except FileNotFoundError:
      return  # Released in the meantime.
    except (ValueError, KeyError, TypeError, OSError):
      raise errors.UserError(f'{self.path} is not a lock this program wrote; delete it if no run '
                             f'uses {self.path.parent}, then rerun') from None
    if host == socket.gethostname() and not _alive(pid):
      print(f'warning: {self.path}: the run that held it (pid {pid}, started {started}) is gone; '
            'taking over the workdir', file=sys.stderr, flush=True)
      self.path.unlink(missing_ok=True)
      return
    raise errors.UserError(
        f'--workdir {self.path.parent} is in use by another training run (pid {pid} on {host}, '
        f'started {started}); wait for it to end or use another --workdir (if that run is gone, '
        f'delete {self.path})')

  def __exit__(self, *exc_info) -> None:
    if self._owned:
      self.path.unlink(missing_ok=True)
      self._owned = False
