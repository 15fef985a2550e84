"""A data set's splits -> decoded examples, in memory up to a budget -> batches. Nothing here
knows about models.

One store serves both input modes (modes.py): a `Split` is one process's shard of a split whose
decoded examples are kept in memory while their total stays under a byte budget
(config.cache_bytes) and decoded again each time they are drawn past it. `decode_split` fills
it, in parallel over the cores, before training, or (a resize-mode shard larger than its budget)
as the examples are first decoded, so that training starts at once. Resize mode's rows are
[S, S] (`load_split`), crop mode's each picture's native size (crops.py). When every example is
held, later epochs only gather rows; else the batches are made in worker threads a few ahead of
the device (`made_ahead`), where an example not in memory is read and checked (sizes, mask
values) each time it is drawn.

Each process reads only its own shard of a split (examples process_index::process_count), so a
TPU pod host never touches the others' data. A train batch is a function of (seed, epoch, step,
process) alone, whether its examples come from memory or from disk: a resumed run sees the
batches of an uninterrupted one. Train batches may be augmented on the host (augment.py).
bench/input_pipeline.py measures the decode and the cached pass; bench/scale.py a data set on
disk many times larger than the budget.
"""

import collections
import concurrent.futures
import dataclasses
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np

from unet_flax import augment
from unet_flax import errors
from unet_flax import sources

PREFETCH_BATCHES = 4  # Batches made ahead when some examples are not in memory (at least).

# split index -> (image [H, W, 3] uint8, labels [H, W] uint8), decoded as a Split's rows hold them.
ReadFn = Callable[[int], tuple[np.ndarray, np.ndarray]]


class Keep:
  """The bytes a split may still keep of the examples decoded on the fly, shared by the worker
  threads that decode them.

  Attributes:
    rows: how many rows the budget holds (their sizes are alike).
  """

  def __init__(self, budget: int, rows: int):
    self.left, self.rows = budget, rows
    self._lock = threading.Lock()

  def offer(self, cached: list, row: int, example: tuple[np.ndarray, np.ndarray]) -> None:
    """Keeps `example` as cached[row] if the budget still holds it."""
    size = example[0].nbytes + example[1].nbytes
    with self._lock:
      if cached[row] is None and size <= self.left:
        cached[row] = example
        self.left -= size


@dataclasses.dataclass(frozen=True)
class Split(Sequence):
  """One process's shard of a split, decoded, in memory up to a byte budget.

  split[row] -> (image [H, W, 3] uint8, labels [H, W] uint8): resize mode's [S, S] at
  image_size, crop mode's at each picture's native size (after scale).

  Attributes:
    num_examples: examples in the whole split, over all processes.
    indices: the split's index of each row of this shard.
    cached: each row's (image, labels), or None for rows decoded when asked for.
    read: split index -> (image, labels), for the rows that are not cached.
    size: (S, S) of every row where all are alike (resize mode's), else None.
    keep: where rows decoded on the fly are kept in memory until a budget is spent (a shard
      larger than its budget, of rows alike); None: `cached` is what it is.
  """
  num_examples: int
  indices: Sequence[int]
  cached: list
  read: ReadFn
  size: tuple[int, int] | None = None
  keep: Keep | None = None

  def __len__(self):
    return len(self.indices)

  def __getitem__(self, row: int) -> tuple[np.ndarray, np.ndarray]:
    example = self.cached[row]
    if example is None:
      example = self.read(self.indices[row])
      if self.keep is not None:
        self.keep.offer(self.cached, row, example)
    return example

  @property
  def cached_bytes(self) -> int:
    return sum(image.nbytes + labels.nbytes for image, labels in filter(None, self.cached))

  @property
  def num_cached(self) -> int:
    return sum(example is not None for example in self.cached)

  @property
  def all_cached(self) -> bool:
    return all(example is not None for example in self.cached)

  @property
  def held_rows(self) -> int:
    """The rows in memory, or that will be once decoded (`keep`)."""
    return self.num_cached if self.keep is None else self.keep.rows

  @property
  def held_bytes(self) -> int:
    """The bytes of `held_rows`."""
    if self.keep is None:
      return self.cached_bytes
    return self.keep.rows * self.size[0] * self.size[1] * 4

  def stack(self, rows: Iterable[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images [b, S, S, 3] uint8, labels [b, S, S] uint8) of `rows` (all by default) of a split
    of one size (resize mode's); rows not in memory are decoded here."""
    rows = list(range(len(self)) if rows is None else rows)
    images = np.empty((len(rows), *self.size, 3), np.uint8)
    labels = np.empty((len(rows), *self.size), np.uint8)
    for i, row in enumerate(rows):
      images[i], labels[i] = self[row]
    return images, labels


def decode_split(read: ReadFn, num_examples: int, *, cache_bytes: int, process_index: int = 0,
                 process_count: int = 1, num_threads: int = 0,
                 size: tuple[int, int] | None = None) -> Split:
  """This process's shard of a split, in memory up to `cache_bytes`, the rest decoded when drawn.

  A shard that fits, and one whose examples' sizes are not known (size None: crop mode), has its
  first examples decoded here, in parallel, until one does not fit: they are checked before
  training. A shard of examples alike (size) larger than the budget has none decoded here: the
  examples the budget holds are kept as they are first decoded (`Keep`), in the workers that
  make the batches, so that training starts at once whatever the data set's size.

  Args:
    read: split index -> (image, labels) (it raises UserError naming the file).
    num_examples: examples in the whole split.
    cache_bytes: the most bytes of decoded examples to hold.
    size: (S, S) of every example where all are alike (resize mode's), else None.
  """
  indices = range(process_index, num_examples, process_count)
  cached = [None] * len(indices)
  if size is not None and len(indices) * size[0] * size[1] * 4 > cache_bytes:
    rows = cache_bytes // (size[0] * size[1] * 4)
    return Split(num_examples, indices, cached, read, size, Keep(cache_bytes, rows))
  threads = num_threads or os.cpu_count() or 1
  held = 0
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    for start in range(0, len(indices), 4 * threads):
      rows = range(start, min(start + 4 * threads, len(indices)))
      # map: in order, and the first worker error is re-raised here.
      for row, (image, labels) in zip(rows, pool.map(lambda r: read(indices[r]), rows)):
        if held + image.nbytes + labels.nbytes > cache_bytes:
          return Split(num_examples, indices, cached, read, size)
        cached[row] = (image, labels)
        held += image.nbytes + labels.nbytes
  return Split(num_examples, indices, cached, read, size)


def load_split(source: sources.Source, split: str, *, image_size: int, process_index: int = 0,
               process_count: int = 1, num_threads: int = 0,
               cache_bytes: int = 2 * 1024 ** 3) -> Split:
  """This process's shard of `split` resized to image_size x image_size, in memory up to
  `cache_bytes` (all of it decoded here in parallel if it fits; else kept as first decoded,
  `decode_split`), the rest decoded when drawn.

  Threads, not processes: most of a decode is in Pillow's C decoders and resize, which release
  the GIL, and worker processes would each import tfds first (bench/input_pipeline.py times both;
  docs/speed.md has figures).
  """
  total, read = source.reader(split, image_size)
  return decode_split(lambda i: read(i)[1:], total, cache_bytes=cache_bytes,
                      process_index=process_index, process_count=process_count,
                      num_threads=num_threads, size=(image_size, image_size))


def memory_available() -> int | None:
  """Bytes of memory this process may still take: the kernel's MemAvailable, lowered to what the
  cgroup (a container's limit) has left; None where neither can be read."""
  available = None
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          available = int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  try:
    with open('/sys/fs/cgroup/memory.max') as f:
      limit = f.read().strip()
    with open('/sys/fs/cgroup/memory.current') as f:
      used = int(f.read())
    if limit != 'max':
      left = int(limit) - used
      available = left if available is None else min(available, left)
  except (OSError, ValueError):
    pass
  return available


def check_budget(cache_bytes: int, needed_bytes: int, what: str) -> None:
  """Refuses a budget that would hold more decoded examples than this machine has memory.

  Args:
    cache_bytes: config.cache_bytes.
    needed_bytes: the bytes of every example decoded, known before decoding (Mode.decoded_bytes:
      resize mode's from the count, crop mode's from the files' headers).
    what: the examples, for the message, e.g. '50,000 examples at 256x256'.

  Raises:
    UserError: naming the field, the estimate and the memory there is.
  """
  held = min(cache_bytes, needed_bytes)
  available = memory_available()
  if available is None or held <= available:
    return
  estimate = (f'{what} take {_size(needed_bytes)} decoded, and config.cache_bytes={cache_bytes} '
              f'would hold {_size(held)} of them')
  suggested = available // 2
  suggested -= suggested % 2 ** 20 if suggested >= 2 ** 20 else 0
  raise errors.UserError(
      f'{estimate}: more than the {_size(available)} of memory this machine has free; set '
      f'config.cache_bytes={suggested} or less (the examples past it are decoded on the fly)')


def _size(n: int) -> str:
  """Bytes as people read them: '12.2 GiB', '35.0 KiB'."""
  for unit, scale in (('GiB', 2 ** 30), ('MiB', 2 ** 20), ('KiB', 2 ** 10)):
    if n >= scale:
      return f'{n / scale:.1f} {unit}'
  return f'{n} bytes'


def made_ahead(make: Callable[[int], dict], steps: Iterable[int], *, in_workers: bool,
               num_threads: int = 0) -> Iterator[dict]:
  """make(step) for each step, in order: here, or (in_workers) in `num_threads` worker threads
  (0: one per core), at most max(PREFETCH_BATCHES, threads) ahead of the consumer.

  Either way each batch is make(step): the same batches in the same order.
  """
  if not in_workers:
    for step in steps:
      yield make(step)
    return
  threads = num_threads or os.cpu_count() or 1
  pool = concurrent.futures.ThreadPoolExecutor(threads)
  ahead = collections.deque()
  steps = iter(steps)
  try:
    for step in steps:
      ahead.append(pool.submit(make, step))
      if len(ahead) >= max(PREFETCH_BATCHES, threads):
        break
    while ahead:
      batch = ahead.popleft().result()  # Re-raises a worker's error here.
      for step in steps:
        ahead.append(pool.submit(make, step))
        break
      yield batch
  finally:  # Also when the consumer stops early (a preemption): batches not begun are dropped.
    pool.shutdown(wait=True, cancel_futures=True)


def epoch_permutation(seed: int, epoch: int, process_index: int, n: int) -> np.ndarray:
  """The order of this process's shard in `epoch`: a function of (seed, epoch, process) alone."""
  return np.random.default_rng([seed, epoch, process_index]).permutation(n)


def batch_rows(order: np.ndarray, step: int, batch_size: int) -> np.ndarray:
  """The rows of batch `step` in an epoch's order, sorted (a gather then reads memory in order);
  past the order's end the positions wrap around."""
  positions = np.arange(step * batch_size, (step + 1) * batch_size) % len(order)
  return np.sort(order[positions])


def train_batches(split: Split, batch_size: int, *, seed: int, epoch: int, process_index: int,
                  first_step: int = 0, num_steps: int | None = None,
                  augmentation: augment.Options = augment.Options(),
                  num_threads: int = 0) -> Iterator[dict]:
  """One epoch of this process's batches, reshuffled from (seed, epoch); starts at `first_step`.

  Args:
    split: this process's shard (rows of one size: resize mode's).
    batch_size: this process's part of the global batch.
    num_steps: batches in the epoch; by default as many full batches as the shard holds. More
      than that wrap around the epoch's order.
    augmentation: what to draw for each batch, from (seed, epoch, step, process); none by default.
    num_threads: worker threads when some examples are not in memory (0: one per core).

  Yields:
    {'image': [b, S, S, 3] uint8, 'label': [b, S, S] uint8}, arrays of their own.
  """
  order = epoch_permutation(seed, epoch, process_index, len(split))
  num_steps = len(split) // batch_size if num_steps is None else num_steps

  def make(step):
    images, labels = split.stack(batch_rows(order, step, batch_size))
    if augmentation.enabled:
      images, labels = augment.augment(images, labels,
                                       augment.batch_rng(seed, epoch, step, process_index),
                                       augmentation)
    return {'image': images, 'label': labels}

  return made_ahead(make, range(first_step, num_steps), in_workers=not split.all_cached,
                    num_threads=num_threads)


def num_eval_batches(num_examples: int, batch_size: int, process_count: int) -> int:
  """Batches each process runs so that all run the same number and every example is seen."""
  largest_shard = -(-num_examples // process_count)
  return -(-largest_shard // batch_size)


def eval_batches(split: Split, batch_size: int, process_count: int = 1,
                 num_threads: int = 0) -> Iterator[dict]:
  """Every example of this process's shard once, zero-padded; 'mask' is 0 on padding. Examples
  not in memory are decoded in `num_threads` worker threads (0: one per core).

  Yields:
    {'image': [b, S, S, 3] uint8, 'label': [b, S, S] uint8, 'mask': [b] bool}.
  """
  def make(i):
    rows = range(min(i * batch_size, len(split)), min((i + 1) * batch_size, len(split)))
    images, labels = split.stack(rows)
    pad = batch_size - len(rows)
    return {'image': np.pad(images, ((0, pad), (0, 0), (0, 0), (0, 0))),
            'label': np.pad(labels, ((0, pad), (0, 0), (0, 0))),
            'mask': np.arange(batch_size) < len(rows)}

  return made_ahead(make, range(num_eval_batches(split.num_examples, batch_size, process_count)),
                    in_workers=not split.all_cached, num_threads=num_threads)
