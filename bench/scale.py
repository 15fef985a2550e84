"""A folder data set many times larger than the memory budget: start-up, memory and speed.

  python bench/scale.py --num_images 20000 [--size 512] [--image_size 256] [--root /tmp/scale]
      [--steps 300] [--widths 8,16,32] [--batch_size 16] [--cache_bytes N] [--grain] [--keep]

Writes N synthetic photos (JPEG) and masks (PNG, 3 classes) of size x size into
ROOT/<N>x<size>/ in the layout of docs/own-data.md (not when they are there already; a few
templates copied, so writing 50,000 takes seconds; test.txt names the eval split, 500 stems at
most, so that the one evaluation at the end stays short), then prints:

  * listing: opening the folder source (listing images/ and masks/, matching them);
  * input img/s: train batches of the streamed pipeline (cache_bytes=0: every example decoded on
    the fly, in one worker thread per core), without the model; with --grain, also the same
    batches made by Grain's thread pool (MapDataset(...).to_iter_dataset(ReadOptions)) instead
    of input_pipeline.made_ahead;
  * the budget filled: the pipeline (no model) run until the default budget (or --cache_bytes)
    is full or the epoch ends, and this process's peak RSS;
  * train.py on the folder for --steps steps (one epoch, its evaluation at the end), with the
    default budget unless --cache_bytes: its peak RSS, the seconds from start to its data line
    (source opened, budget checked, the cached part decoded), to the compiled step and to the
    first step's line, and the step img/s (the median of the logged steps after the first 10).

The model is small by default (--widths 8,16,32) so that a few hundred steps take minutes on a
CPU; --widths 64,128,256 is the chapter's U-Net. docs/speed.md has figures. Delete ROOT after.
"""

import argparse
import io
import json
import os
import pathlib
import re
import resource
import shutil
import subprocess
import sys
import time

import numpy as np
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from unet_flax import augment  # pylint: disable=g-import-not-at-top,wrong-import-position
from unet_flax import decode  # pylint: disable=g-import-not-at-top,wrong-import-position
from unet_flax import input_pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position
from unet_flax import sources  # pylint: disable=g-import-not-at-top,wrong-import-position

TEMPLATES = 16  # Distinct photos and masks, paired in TEMPLATES**2 ways.
MAX_EVAL = 500


def _template(rng, size: int) -> tuple[bytes, bytes]:
  """A photo (smooth colours, a textured blob; JPEG) and its mask (the blob and a ring; PNG)."""
  y, x = np.mgrid[:size, :size] / size
  cy, cx, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.3)
  distance = np.hypot(y - cy, x - cx)
  mask = np.where(distance < r, 0, np.where(distance < r * 1.15, 2, 1)).astype(np.uint8)
  base = np.stack([x, y, 1 - x], -1) * rng.uniform(60, 200, 3)
  texture = rng.normal(0, 20, (size, size, 3)) + 60 * (mask == 0)[..., None]
  photo = np.clip(base + texture, 0, 255).astype(np.uint8)
  encoded = []
  for array, fmt in ((photo, 'JPEG'), (mask, 'PNG')):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **({'quality': 90} if fmt == 'JPEG' else {}))
    encoded.append(buffer.getvalue())
  return encoded[0], encoded[1]


def write_data(root: pathlib.Path, num_images: int, size: int) -> float:
  """Writes the data set unless it is complete; -> seconds taken."""
  done = root / 'done'
  if done.exists():
    return 0.0
  started = time.perf_counter()
  shutil.rmtree(root, ignore_errors=True)
  (root / 'images').mkdir(parents=True)
  (root / 'masks').mkdir()
  rng = np.random.default_rng(0)
  templates = [_template(rng, size) for _ in range(TEMPLATES)]
  for i in range(num_images):
    # Photo and mask of one template: the mask is the photo's. The pairs repeat, the files not.
    photo, mask = templates[i % TEMPLATES]
    (root / 'images' / f'img_{i:06d}.jpg').write_bytes(photo)
    (root / 'masks' / f'img_{i:06d}.png').write_bytes(mask)
  stems = [f'img_{i:06d}' for i in range(num_images)]
  (root / 'test.txt').write_text('\n'.join(stems[::max(1, num_images // MAX_EVAL)][:MAX_EVAL])
                                 + '\n')
  done.write_text('')
  return time.perf_counter() - started


def input_rate(source, args, grain: str | None = None) -> tuple[float, float]:
  """(img/s, CPU seconds per image) of streamed train batches (augmentation on),
  no model: input_pipeline.train_batches, or the same batches through Grain ('threads':
  to_iter_dataset's thread pool; 'processes': mp_prefetch's worker processes)."""
  split = input_pipeline.load_split(source, 'train', image_size=args.image_size, cache_bytes=0)
  options = augment.Options(flip=True)
  steps = max(8, 400 // args.batch_size)
  order = input_pipeline.epoch_permutation(0, 0, 0, len(split))

  def make(step):
    images, labels = split.stack(input_pipeline.batch_rows(order, step, args.batch_size))
    return augment.augment(images, labels, augment.batch_rng(0, 0, step, 0), options)

  if grain:
    import grain as grain_lib  # pylint: disable=g-import-not-at-top
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():
      flags.FLAGS(sys.argv[:1])  # Grain's workers read absl flags (their defaults).
    threads = os.cpu_count() or 1
    dataset = grain_lib.MapDataset.range(steps).map(make)
    if grain == 'threads':
      dataset = dataset.to_iter_dataset(grain_lib.ReadOptions(
          num_threads=threads,
          prefetch_buffer_size=max(input_pipeline.PREFETCH_BATCHES, threads)))
    else:
      dataset = dataset.to_iter_dataset(grain_lib.ReadOptions(num_threads=0)).mp_prefetch(
          grain_lib.MultiprocessingOptions(num_workers=threads, per_worker_buffer_size=2))
    batches = iter(dataset)
  else:
    batches = input_pipeline.train_batches(split, args.batch_size, seed=0, epoch=0,
                                           process_index=0, num_steps=steps,
                                           augmentation=options)
  started, cpu = time.perf_counter(), _cpu_seconds()
  count = sum(len(batch[0] if isinstance(batch, tuple) else batch['image']) for batch in batches)
  wall = time.perf_counter() - started
  if hasattr(batches, 'close'):
    batches.close()  # Joins Grain's worker processes: their CPU time is then counted.
  return count / wall, (_cpu_seconds() - cpu) / count


def fill(source, args) -> tuple[int, float, float]:
  """Batches of the pipeline with the budget (no model) until the budget is full or the epoch
  ends: (rows kept, GiB kept, peak RSS of this process in GiB)."""
  budget = {} if args.cache_bytes is None else {'cache_bytes': args.cache_bytes}
  split = input_pipeline.load_split(source, 'train', image_size=args.image_size, **budget)
  for _ in input_pipeline.train_batches(split, args.batch_size, seed=0, epoch=0,
                                        process_index=0):
    if split.num_cached >= split.held_rows:
      break
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2 ** 30
  return split.num_cached, split.cached_bytes / 2 ** 30, peak


def _cpu_seconds() -> float:
  """CPU seconds of this process and of its children that have ended."""
  children = resource.getrusage(resource.RUSAGE_CHILDREN)
  return time.process_time() + children.ru_utime + children.ru_stime


def train(root: pathlib.Path, args) -> dict:
  """Runs train.py on the folder; -> its figures."""
  workdir = root.parent / f'run_{root.name}'
  shutil.rmtree(workdir, ignore_errors=True)
  overrides = {'dataset': f'folder:{root}', 'num_classes': 3, 'image_size': args.image_size,
               'widths': f'({args.widths})', 'batch_size': args.batch_size,
               'steps_per_epoch': args.steps, 'num_epochs': 1, 'log_every_steps': 1,
               'checkpoint_every_steps': 10 ** 6, 'num_prediction_images': 0}
  if args.cache_bytes is not None:
    overrides['cache_bytes'] = args.cache_bytes
  command = [sys.executable, str(ROOT / 'train.py'), '--config',
             str(ROOT / 'configs' / 'default.py'), f'--workdir={workdir}',
             *(f'--config.{k}={v}' for k, v in overrides.items())]
  env = dict(os.environ, UNET_FLAX_CACHE=str(root.parent / 'jax_cache'))
  started = time.perf_counter()
  process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
  at, lines = {}, []
  for line in process.stdout:
    lines.append(line)
    now = time.perf_counter() - started
    for key, pattern in (('data', r'^data: '), ('compiled', r'^compiled in'),
                         ('first_step', r'^step 1/')):
      if key not in at and re.search(pattern, line):
        at[key] = now
        if key == 'data':
          at['data_line'] = line.strip()
  _, status, usage = os.wait4(process.pid, 0)
  if status:
    sys.exit(''.join(lines[-20:]))
  rates = [r['images_per_second'] for r in map(json.loads, (workdir / 'metrics.jsonl').open())
           if r['split'] == 'train' and r['step'] > 10]
  shutil.rmtree(workdir)
  return {**at, 'peak_rss_gib': usage.ru_maxrss * 1024 / 2 ** 30,
          'step_img_s': float(np.median(rates)), 'total': time.perf_counter() - started}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--num_images', type=int, required=True)
  parser.add_argument('--size', type=int, default=512, help='side of the photos on disk')
  parser.add_argument('--image_size', type=int, default=256)
  parser.add_argument('--root', default='/tmp/scale')
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--widths', default='8,16,32')
  parser.add_argument('--batch_size', type=int, default=16)
  parser.add_argument('--cache_bytes', type=int, default=None, help='default: the config\'s')
  parser.add_argument('--grain', action='store_true',
                      help='also time Grain\'s threads and processes (pip install grain)')
  parser.add_argument('--no_train', action='store_true', help='the input pipeline only')
  parser.add_argument('--keep', action='store_true', help='keep the data set for another run')
  args = parser.parse_args()
  root = pathlib.Path(args.root) / f'{args.num_images}x{args.size}'
  print(f'{args.num_images:,} photos {args.size}x{args.size} -> {args.image_size}x'
        f'{args.image_size}, batch {args.batch_size}, widths ({args.widths}), '
        f'{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}', flush=True)
  written = write_data(root, args.num_images, args.size)
  if written:
    print(f'wrote {root} in {written:.1f}s', flush=True)
  started = time.perf_counter()
  source = sources.open_source(f'folder:{root}', None, 3, decode.Options())
  listing = time.perf_counter() - started
  print(f'listing: {listing:.1f}s ({source.num_examples("train"):,} train, '
        f'{source.num_examples("test"):,} eval)', flush=True)
  rate, cpu = input_rate(source, args)
  print(f'input, streamed, thread pool: {rate:,.0f} img/s ({cpu * 1e3:.1f} ms CPU an image)',
        flush=True)
  if args.grain:
    for how in ('threads', 'processes'):
      rate, cpu = input_rate(source, args, grain=how)
      print(f'input, streamed, Grain {how}: {rate:,.0f} img/s ({cpu * 1e3:.1f} ms CPU an image)',
            flush=True)
  before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2 ** 30
  started = time.perf_counter()
  kept, kept_gib, peak = fill(source, args)
  print(f'budget filled by the pipeline: {kept:,} examples, {kept_gib:.2f} GiB kept in '
        f'{time.perf_counter() - started:.0f}s; peak RSS {peak:.2f} GiB (before: {before:.2f})',
        flush=True)
  if not args.no_train:
    got = train(root, args)
    print(f'train.py: {got["data_line"]}', flush=True)
    print(f'train.py: peak RSS {got["peak_rss_gib"]:.2f} GiB; data line at {got["data"]:.1f}s, '
          f'compiled at {got["compiled"]:.1f}s, first step at {got["first_step"]:.1f}s; '
          f'{got["step_img_s"]:.1f} img/s a step (median); {got["total"]:.0f}s in all',
          flush=True)
  if not args.keep:
    shutil.rmtree(root)


if __name__ == '__main__':
  main()
