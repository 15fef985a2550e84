"""Input pipeline speed: the first pass (decode + resize) and the cached pass (batches from memory).

  python bench/input_pipeline.py [--dataset synthetic_pets/small] [--data_dir D]
      [--image_size 128] [--batch_size 64] [--device_augment]

Prints images per second of
  * the first pass with a thread pool (what load_split does), with 1 thread, and with a process
    pool (spawned workers, each opening the data set), so that the faster can be kept;
  * the cached pass, train_batches over the in-memory arrays, against its target of 20,000 img/s;
  * the augmented pass, train_batches with every host augmentation on (AUGMENTATION);
  * with --device_augment, the same augmentation in jnp under jit on JAX's default device.
and the cache's bytes. Timings are medians of --repeats runs: on a shared machine, read them with
the load average printed beside them.
"""

import argparse
import concurrent.futures
import multiprocessing
import os
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs import default  # pylint: disable=g-import-not-at-top,wrong-import-position
from unet_flax import augment  # pylint: disable=g-import-not-at-top,wrong-import-position
from unet_flax import input_pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position
from unet_flax import sources

# Every host augmentation on, at the strengths docs/speed.md's figures were measured with.
AUGMENTATION = {'augment_flip': True, 'augment_min_scale': 0.6, 'augment_brightness': 0.1,
                'augment_contrast': 0.2}
CACHED_TARGET = 20_000  # img/s: far above any train step, so batches never wait on the host.

_worker_decode = None


def _start_worker(dataset, split, data_dir, image_size, num_classes):
  global _worker_decode
  source = sources.open_source(dataset, data_dir, num_classes)
  _, _worker_decode = source.reader(split, image_size)


def _decode_chunk(indices):
  pairs = [_worker_decode(i) for i in indices]
  return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def first_pass_processes(args, workers: int) -> float:
  """Seconds for the split through a spawned process pool, start-up included."""
  total = sources.open_source(args.dataset, args.data_dir, 3).num_examples(args.split)
  chunks = [range(i, min(i + 64, total)) for i in range(0, total, 64)]
  started = time.perf_counter()
  with concurrent.futures.ProcessPoolExecutor(
      workers, mp_context=multiprocessing.get_context('spawn'), initializer=_start_worker,
      initargs=(args.dataset, args.split, args.data_dir, args.image_size, 3)) as pool:
    list(pool.map(_decode_chunk, chunks))
  return time.perf_counter() - started


def first_pass_threads(args, threads: int):
  """(seconds, CPU seconds / wall seconds, the split) for load_split with `threads` threads."""
  started, cpu = time.perf_counter(), time.process_time()
  source = sources.open_source(args.dataset, args.data_dir, 3)
  split = input_pipeline.load_split(source, args.split, image_size=args.image_size,
                                    num_threads=threads)
  wall = time.perf_counter() - started
  return wall, (time.process_time() - cpu) / wall, split


def batches_pass(split, batch_size: int, epochs: int, augmentation=augment.Options()):
  """(img/s, img per CPU second) of train_batches over `epochs` epochs, every batch materialised.

  On a shared machine the second is what one free core would give: the pass runs on one thread.
  """
  started, cpu, count = time.perf_counter(), time.process_time(), 0
  for epoch in range(epochs):
    for batch in input_pipeline.train_batches(split, batch_size, seed=0, epoch=epoch,
                                              process_index=0, augmentation=augmentation):
      count += len(batch['image'])
  return count / (time.perf_counter() - started), count / (time.process_time() - cpu)


def augment_ms(split, batch_size: int, options: augment.Options, repeats: int):
  """(host ms, device ms) a batch: augment.augment vs the same ops in jnp, jitted, on JAX's
  default device; interleaved, so that both see the same load. Medians."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  size = split.size[0]

  def one(image, label, key):
    k_side, k_top, k_left, k_flip, k_bright, k_contrast = jax.random.split(key, 6)
    side = jnp.floor(jax.random.uniform(k_side, (), minval=options.min_scale, maxval=1.0) * size)
    top = jnp.floor(jax.random.uniform(k_top, ()) * (size - side + 1))
    left = jnp.floor(jax.random.uniform(k_left, ()) * (size - side + 1))
    scale = jnp.stack([size / side, size / side])
    image = jax.image.scale_and_translate(image.astype(jnp.float32), (size, size, 3), (0, 1),
                                          scale, -jnp.stack([top, left]) * scale, 'linear',
                                          antialias=False)
    at = jnp.floor((jnp.arange(size) + 0.5) * side / size).astype(jnp.int32)
    label = label[top.astype(jnp.int32) + at][:, left.astype(jnp.int32) + at]
    flip = jax.random.bernoulli(k_flip)
    image, label = (jnp.where(flip, a[:, ::-1], a) for a in (image, label))
    contrast = jax.random.uniform(k_contrast, (), minval=1 - options.contrast,
                                  maxval=1 + options.contrast)
    brightness = jax.random.uniform(k_bright, (), minval=-options.brightness,
                                    maxval=options.brightness) * 255
    mean = image.mean()
    image = (image - mean) * contrast + mean + brightness
    return jnp.clip(jnp.round(image), 0, 255).astype(jnp.uint8), label

  fn = jax.jit(lambda images, labels, key: jax.vmap(one)(
      images, labels, jax.random.split(key, images.shape[0])))
  host_images, host_labels = split.stack(range(batch_size))
  images, labels = jax.device_put(host_images), jax.device_put(host_labels)
  jax.block_until_ready(fn(images, labels, jax.random.key(0)))  # Compiles.
  host, device = [], []
  for i in range(repeats * 10):
    started = time.perf_counter()
    augment.augment(host_images, host_labels, np.random.default_rng(i), options)
    host.append(time.perf_counter() - started)
    started = time.perf_counter()
    jax.block_until_ready(fn(images, labels, jax.random.key(i)))
    device.append(time.perf_counter() - started)
  return 1e3 * float(np.median(host)), 1e3 * float(np.median(device))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--dataset', default='synthetic_pets/small')
  parser.add_argument('--data_dir', default=None)
  parser.add_argument('--split', default='train')
  parser.add_argument('--image_size', type=int, default=128)
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--epochs', type=int, default=5, help='epochs of each cached pass')
  parser.add_argument('--repeats', type=int, default=3, help='runs of each measurement')
  parser.add_argument('--device_augment', action='store_true',
                      help='also time the augmentation in jnp on the JAX device')
  args = parser.parse_args()
  cores = os.cpu_count() or 1
  print(f'{args.dataset} {args.split} at {args.image_size}x{args.image_size}, batch '
        f'{args.batch_size}, {cores} cores, load average {os.getloadavg()[0]:.1f}')
  sources.open_source(args.dataset, args.data_dir, 3)  # Prepares it, untimed.

  first = [first_pass_threads(args, cores) for _ in range(args.repeats)]
  split = first[-1][2]
  n = len(split)
  wall = float(np.median([f[0] for f in first]))
  print(f'first pass, {cores} threads:      {n / wall:8,.0f} img/s  ({n} images in {wall:.2f} s; '
        f'CPU/wall {np.median([f[1] for f in first]):.2f})')
  single = float(np.median([first_pass_threads(args, 1)[0] for _ in range(args.repeats)]))
  print(f'first pass, 1 thread:        {n / single:8,.0f} img/s  (threads speed-up '
        f'{single / wall:.2f}x)')
  procs = float(np.median([first_pass_processes(args, cores) for _ in range(args.repeats)]))
  print(f'first pass, {cores} processes:    {n / procs:8,.0f} img/s  (start-up included; '
        f'{"threads" if wall <= procs else "processes"} faster)')

  cached = np.median([batches_pass(split, args.batch_size, args.epochs)
                      for _ in range(args.repeats)], axis=0)
  print(f'cached pass:                 {cached[0]:8,.0f} img/s  (target {CACHED_TARGET:,}: '
        f'{cached[0] / CACHED_TARGET:.2f}x; {cached[1]:,.0f} img per CPU second)')
  config = default.get_config()
  config.update(AUGMENTATION)
  options = augment.Options.from_config(config)
  augmented = np.median([batches_pass(split, args.batch_size, 1, options)
                         for _ in range(args.repeats)], axis=0)
  print(f'augmented pass:              {augmented[0]:8,.0f} img/s  ({augmented[1]:,.0f} img per '
        f'CPU second; {options})')
  print(f'cache: {split.cached_bytes:,} bytes of images and labels (uint8)')
  if args.device_augment:
    import jax  # pylint: disable=g-import-not-at-top
    host_ms, device_ms = augment_ms(split, args.batch_size, options, args.repeats)
    print(f'augmentation of a batch, interleaved: host {host_ms:.1f} ms, jitted on '
          f'{jax.devices()[0].platform} {device_ms:.1f} ms')


if __name__ == '__main__':
  main()
