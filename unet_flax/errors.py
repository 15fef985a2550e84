"""The exception a user sees as one line, and the paths a user gives.

A `UserError` is bad input the user can fix (a missing file, a bad config value, a mismatched
checkpoint): the command-line tools print its message as one line and exit 1 (unet_flax/cli.py).
It is not a ValueError, so that no `except ValueError` meant for a library's errors catches it.
"""

import os
import secrets

from etils import epath


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


def absolute(path) -> epath.Path:
  """A path the user gave -> absolute: `~` expanded, relative to the current directory, symlinks
  resolved. URLs (gs://bucket/...) are returned as they are.

  Every tool takes paths relative to where the user runs it; resolving them once, where they enter
  the library, keeps later changes of directory and libraries that need absolute paths (orbax's
  checkpoints) from seeing anything else.
  """
  text = os.fspath(path)
  if '://' in text:
    return epath.Path(text)
  return epath.Path(os.path.realpath(os.path.expanduser(text)))


def make_output_dir(path, flag: str) -> epath.Path:
  """Creates the directory `path` that `flag` names, or raises a UserError saying why not.

  Returns:
    The directory, absolute (see `absolute`).
  """
  path = absolute(path)
  if path.exists() and not path.is_dir():
    raise UserError(f'{flag} {path} is a file, not a directory; choose another path')
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise UserError(f'{flag} {path} cannot be created ({e.strerror}); '
                    'choose a writable path') from None
  # Root passes permission bits but not a read-only file system: access() checks both.
  if not os.access(path, os.W_OK):
    raise UserError(f'{flag} {path} is not writable; choose a writable path')
  return path


def refuse_link(path) -> None:
  """Raises a UserError if `path` is a symbolic link: outputs are never written through a link
  this program did not make (a planted one would send the write anywhere)."""
  text = os.fspath(path)
  if '://' not in text and os.path.islink(text):
    raise UserError(f'{path} is a symbolic link (to {os.readlink(text)}); this program does not '
                    'write through links it did not make: remove the link, or choose another '
                    'place')


def write_atomically(path, write) -> None:
  """Calls write(temporary path), then renames it to `path`: a failed write leaves no partial
  file, and an existing `path` stays as it was.

  The temporary's name is unique to this call (process id and random bits), so that two
  processes writing one file never share it, and no planted link can be in its place; the rename
  replaces `path` itself, never a file a link at `path` points to (such a link is refused).

  Raises:
    UserError: naming `path`, if it is a symbolic link, or the disk is full or read-only
      (OSError).
  """
  path = epath.Path(path)
  refuse_link(path)
  temporary = path.parent / f'.{path.name}.{os.getpid()}-{secrets.token_hex(4)}.partial'
  try:
    write(temporary)
    temporary.replace(path)
  except OSError as e:
    temporary.unlink(missing_ok=True)
    raise UserError(f'cannot write {path} ({e.strerror or e}); free some space or choose a '
                    'writable place') from None
