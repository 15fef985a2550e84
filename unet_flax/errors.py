"""The exception a user sees as one line, and the translators of other errors into it.

A `UserError` is bad input the user can fix (a missing file, a bad config value, a mismatched
checkpoint): the command-line tools print its message as one line and exit 1 (unet_flax/cli.py).
It is not a ValueError, so that no `except ValueError` meant for a library's errors catches it.
"""

import contextlib
import errno
import os
import re
import warnings


def printable(text) -> str:
  """`text` safe to print on a terminal: control characters (terminal escape codes, line breaks,
  carriage returns) and other unprintable ones shown as Python escapes (\\x1b, \\n, \\u202e).

  For anything a user or a file provided: file names, class names, config values.
  """
  text = str(text)
  if text.isprintable():
    return text
  return ''.join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class UserError(Exception):
  """Bad input the user can fix: the message names the thing and says what to do.

  The message is made `printable`: it often quotes file and class names, and it is one line.
  """

  def __init__(self, message='', *args):
    super().__init__(printable(message), *args)


# Write failures that the user fixes on the disk, not in the code: errno -> (what, what to do).
DISK_ERRNOS = {
    errno.ENOSPC: ('no space left on the device', 'free some space'),
    errno.EDQUOT: ('disk quota exceeded', 'free some space'),
    errno.EROFS: ('read-only file system', 'make it writable'),
    errno.EACCES: ('permission denied', 'make it writable'),
    errno.EPERM: ('operation not permitted', 'make it writable'),
    errno.EIO: ('input/output error', 'check the disk'),
}
# Errors that only a write can cause, whatever code raised them.
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
# Tensorstore (orbax's array writer) reports them as ValueError("... [os_error_code='28']").
_TENSORSTORE_ERRNO = re.compile(r"os_error_code='?(\d+)")


def disk_error_reason(e: BaseException, errnos=tuple(DISK_ERRNOS)) -> tuple[str, str] | None:
  """(what went wrong, what to do) if `e` is a failed write the user can fix, else None."""
  code = e.errno if isinstance(e, OSError) else None
  if isinstance(e, ValueError):
    match = _TENSORSTORE_ERRNO.search(str(e))
    code = int(match.group(1)) if match else None
  if isinstance(e, RuntimeError):
    # array_record (tfds's writer) raises RuntimeError('... write() failed: No space left on
    # device; ...'): no errno attribute, only the C library's strerror text of the errno.
    code = next((c for c in WRITE_ERRNOS if os.strerror(c) in str(e)), None)
  return DISK_ERRNOS[code] if code in errnos else None


@contextlib.contextmanager
def disk_errors(what: str | None, note: str = '', errnos=tuple(DISK_ERRNOS),
                flag: str = '--workdir'):
  """Turns a failed write (full or read-only disk...) into one UserError line naming `what`.

  Args:
    what: what was being written, for the message; None: the file the error names.
    note: said after what to do, e.g. that nothing else was lost.
    errnos: the errors converted; others propagate unchanged.
    flag: the flag that chooses another place.
  """
  try:
    yield
  except (OSError, ValueError, RuntimeError) as e:
    reason = disk_error_reason(e, errnos)
    if reason is None:
      raise
    # Orbax's abandoned writes also warn at exit; the line below has said it.
    warnings.filterwarnings('ignore', r"coroutine '.*' was never awaited", RuntimeWarning)
    filename = e.filename if isinstance(e, OSError) and e.filename else None
    what = (what or filename or 'a file') + (f' ({filename})' if what and filename else '')
    raise UserError(f'cannot write {what}: {reason[0]}; {reason[1]} or choose another '
                    f'{flag}{note}') from None
