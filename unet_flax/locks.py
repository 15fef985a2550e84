"""File locks between processes of one machine: `exclusive(path)` around work two may start at once.

Two experiments started together (a sweep) both find their data set unprepared and both prepare
it; tfds's final rename then fails in the second with FileExistsError. Under `exclusive`, the
second waits for the first and then finds the data set prepared.

The lock is `fcntl.flock` on a small file that is never deleted (deleting it would let a third
process lock a new file while the second holds the old one). The kernel releases it when the
process ends, however it ends: a killed preparation leaves no stale lock. Paths with a scheme
(gs://...) are not locked: flock needs a local file system.
"""

import contextlib
import fcntl
import os
import sys

from unet_flax import errors


@contextlib.contextmanager
def exclusive(path, what: str):
  """A context in which this process alone holds the lock file `path` (created, with its parent).

  Args:
    path: the lock file, e.g. beside the directory being prepared.
    what: what is being waited for, said once on stderr if another process holds the lock.

  Raises:
    UserError: if the lock file cannot be created or is a link.
  """
  text = os.fspath(path)
  if '://' in text:
    yield
    return
  try:
    os.makedirs(os.path.dirname(text), exist_ok=True)
    # O_NOFOLLOW: a link planted at the lock's name is refused, not followed.
    fd = os.open(text, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o666)
  except OSError as e:
    raise errors.UserError(f'cannot create the lock file {text} ({e.strerror or e}); make its '
                           'directory writable, or choose another place') from None
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      print(f'waiting for another process to finish {what} (lock {text})', file=sys.stderr,
            flush=True)
      fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)  # Releases the lock.
