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


def check(workdir) -> epath.Path:
  """The workdir, absolute, if it can be used; creates nothing (Lock does, when taken).

  Raises:
    UserError: if it is a file, or it does not exist and cannot be created.
  """
  path = paths.absolute(workdir)
  if path.exists() and not path.is_dir():
    raise errors.UserError(f'--workdir {path} is a file, not a directory; choose another path')
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
