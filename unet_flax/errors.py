"""One-line errors for bad input: the exception the user sees, and checks of output paths."""

import os

from etils import epath


class UserError(ValueError):
  """Bad input the user can fix: the message names the thing and says what to do."""


def make_output_dir(path, flag: str) -> None:
  """Creates the directory `path` that `flag` names, or raises a UserError saying why not."""
  path = epath.Path(path)
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
