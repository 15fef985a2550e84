"""The paths a user gives: made absolute once, output directories made, files written whole."""

import errno
import os
import secrets

from etils import epath

from unet_flax.errors import UserError


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


def check_output_dir(path, flag: str) -> epath.Path:
  """Raises the UserError make_output_dir would raise, without creating anything: an existing
  `path` must be a writable directory, a new one must be creatable (its nearest existing
  ancestor a writable directory). A tool calls this before its work and make_output_dir at its
  first write, so that a refused or failed run leaves no empty directory behind.

  Returns:
    The directory, absolute (see `absolute`). URLs are returned unchecked.
  """
  path = absolute(path)
  if '://' in os.fspath(path):
    return path
  if path.exists():
    return make_output_dir(path, flag)  # Creates nothing: checks a file or a read-only place.
  ancestor = os.fspath(path)
  while not os.path.lexists(ancestor):
    ancestor = os.path.dirname(ancestor)
  if not os.path.isdir(ancestor):
    raise UserError(f'{flag} {path} cannot be created ({os.strerror(errno.ENOTDIR)}); '
                    'choose a writable path')
  if not os.access(ancestor, os.W_OK | os.X_OK):
    raise UserError(f'{flag} {path} cannot be created ({os.strerror(errno.EACCES)}: {ancestor}); '
                    'choose a writable path')
  return path


def refuse_link(path) -> None:
  """Raises a UserError if `path` is a symbolic link: outputs are never written through a link
  this program did not make (a planted one would send the write anywhere)."""
  text = os.fspath(path)
  if '://' not in text and os.path.islink(text):
    raise UserError(f'{path} is a symbolic link (to {os.readlink(text)}); this program does not '
                    'write through links it did not make: remove the link, or choose another '
                    'place')


def write_atomically(path, write, overwrite: bool = True) -> None:
  """Calls write(temporary path), then renames it to `path`: a failed write leaves no partial
  file, and an existing `path` stays as it was.

  With overwrite=False the file is created only if no file has that name by then, checked and
  created in one step (a hard link), so that of two processes writing it one fails instead of
  replacing the other's file unasked.

  The temporary's name is unique to this call (process id and random bits), so that two
  processes writing one file never share it, and no planted link can be in its place; the rename
  replaces `path` itself, never a file a link at `path` points to (such a link is refused).

  Raises:
    UserError: naming `path`, if it is a symbolic link, exists and overwrite is off, or the disk
      is full or read-only (OSError).
  """
  path = epath.Path(path)
  refuse_link(path)
  temporary = path.parent / f'.{path.name}.{os.getpid()}-{secrets.token_hex(4)}.partial'
  try:
    write(temporary)
    if overwrite:
      temporary.replace(path)
    else:
      os.link(temporary, path)  # FileExistsError if another process wrote it meanwhile.
      temporary.unlink()
  except FileExistsError:
    temporary.unlink(missing_ok=True)
    raise UserError(f'{path} exists (another process wrote it meanwhile); pass --overwrite to '
                    'replace it, or choose another --out') from None
  except OSError as e:
    temporary.unlink(missing_ok=True)
    raise UserError(f'cannot write {path} ({e.strerror or e}); free some space or choose a '
                    'writable place') from None
