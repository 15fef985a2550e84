"""Preparing a tfds data set once, whatever else runs: `prepare(builder, dataset)`.

Several processes of one machine may find a data set unprepared at once (a sweep, two
experiments started together): the first to take the lock beside the data set prepares it, the
others wait and then read what it wrote (locks.exclusive). Leftovers of a preparation that was
killed (tfds's `incomplete.*` directories, which tfds removes only when Python unwinds) are removed
first, under the lock, so that they do not fill the disk run after run. A full or read-only disk
is one line naming the data set and what to do, also when array_record reports it as a
RuntimeError.
"""

import os
import shutil
import sys

from etils import epath

from unet_flax import errors
from unet_flax import locks

_INCOMPLETE = 'incomplete.*'  # tfds writes <config dir>/incomplete.<random>_<version>/, renamed.


def lock_path(builder) -> epath.Path:
  """The lock file of the builder's data set: beside its version directory, hidden."""
  version_dir = epath.Path(builder.data_dir)
  return version_dir.parent / f'.{version_dir.name}.lock'


def prepare(builder, dataset: str) -> None:
  """Prepares `builder`'s data set unless another process has; either way it is readable after.

  Args:
    builder: a tfds builder (array_record) found unprepared.
    dataset: the data set's name, for messages.

  Raises:
    UserError: if the disk fills up or is read-only while preparing.
  """
  with locks.exclusive(lock_path(builder), f'preparing the data set {dataset}'):
    if builder.is_prepared():  # Another process prepared it while this one waited.
      # The builder was made before the data existed: its info lacks the splits.
      builder.info.read_from_directory(builder.data_dir)
      return
    remove_leftovers(builder)
    with errors.disk_errors(f'the data set {dataset} in {builder.data_dir_root}',
                            flag='--config.data_dir'):
      builder.download_and_prepare()


def remove_leftovers(builder) -> list[epath.Path]:
  """Removes the `incomplete.*` directories of killed preparations of the builder's data set
  (call under the lock: no other preparation is running); says so in one line. -> removed."""
  parent = epath.Path(builder.data_dir).parent
  if '://' in os.fspath(parent) or not parent.exists():  # Local disks only, as locks.exclusive.
    return []
  removed = sorted(p for p in parent.glob(_INCOMPLETE) if p.is_dir())
  size = 0
  for path in removed:
    size += sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path)
                for f in files)
    shutil.rmtree(path, ignore_errors=True)
  if removed:
    print(f'removed {len(removed)} incomplete director{"y" if len(removed) == 1 else "ies"} '
          f'({size / 2**20:.1f} MiB) left in {parent} by an interrupted preparation',
          file=sys.stderr, flush=True)
  return removed
