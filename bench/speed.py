"""Benchmark: python bench/speed.py [--config configs/default.py] [--batch_sizes 8,16,64]

Prints, for the config's model at its image size: train-step img/s per batch size, the step's
FLOPs (XLA's cost analysis) and achieved GFLOP/s, this machine's matmul GFLOP/s in config.dtype
measured in the same run (the limit) and the ratio of the two, with --peak_tflops the model FLOP
utilization (MFU) against the device's datasheet peak, eval img/s, compile times, and the input
pipeline's cached-pass img/s. A table on stdout, and JSON (--json). Runs unchanged on CPU or GPU.

Two FLOP counts are given: `model` counts the U-Net as the chapter defines it (transposed
convolutions, nothing else), which is the work any implementation must do; `xla` is what XLA
counts for the compiled step as we write it. Achieved GFLOP/s and the ratio to the matmul limit
use the model count, so that a formulation that does more work cannot look faster. The train
step is the trainer's own, microbatches included (`micro`: see microbatches.count).

With --tiles_image=4096 it also times crop-mode predict (the sliding window of tiles.py at
config.crop_size) on a 4096x4096 image, in megapixels/s; --tiles_only times only that.

`of target` is the achieved fraction divided by --target_fraction (0.85 by default: the train
step at 85% of the matmul limit). Every forward pass is models.forward's, on the process's
convolutions (--conv_backend); --upsample=conv_transpose times the chapter's nn.ConvTranspose
form instead, to compare the two upsamplings.
"""

import dataclasses
import functools
import json
import pathlib
import platform
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

# The repository's root: config files import `configs.default`, as under train.py.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from unet_flax import cli  # noqa: E402
from unet_flax import input_pipeline  # noqa: E402
from unet_flax import layers  # noqa: E402
from unet_flax import models  # noqa: E402
from unet_flax import steps  # noqa: E402
from unet_flax import tiles  # noqa: E402
from unet_flax.devices import Devices  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', 'configs/default.py', 'The model to measure.')
flags.DEFINE_list('batch_sizes', ['8', '16', '64'], 'Train-step batch sizes.')
flags.DEFINE_integer('repeats', 3, 'Timed steps per batch size (after one warm-up step).')
flags.DEFINE_integer('matmul_size', 4096,
                     "n of the n x n x n matmul (in config.dtype) that sets the limit.")
flags.DEFINE_enum('upsample', 'phase', ['phase', 'conv_transpose'],
                  "The chapter's U-Net's upsampling in the timed steps: 'phase' (models.Upsample, "
                  "what every tool runs) or 'conv_transpose' (flax's nn.ConvTranspose, the "
                  "chapter's form, always XLA's convolutions): same parameters and results.")
flags.DEFINE_float('peak_tflops', 0.0,
                   "The device's datasheet peak in config.dtype, TFLOP/s (e.g. an H100 SXM's "
                   'dense bfloat16 989.4); if given, the table adds MFU = model FLOP/s / peak.',
                   lower_bound=0.0)
flags.DEFINE_integer('tiles_image', 0,
                     'If > 0, also time crop-mode predict (tiles.py: the sliding window at '
                     "config.crop_size, overlap config.tile_overlap) on one random image of this "
                     'side, in megapixels/s; e.g. 4096. 0: skip (it takes minutes on a CPU).',
                     lower_bound=0)
flags.DEFINE_bool('tiles_only', False, 'With --tiles_image: time only that.')
flags.DEFINE_integer('window_batch', 8, 'With --tiles_image: windows per forward pass.',
                     lower_bound=1)
flags.DEFINE_float('target_fraction', 0.85,
                   'The fraction of the matmul limit that `of target` divides by.')
flags.DEFINE_string('json', 'bench.json', 'Where to write the results as JSON ("" for nowhere).')


def _timed(fn, *args, repeats: int) -> float:
  """Seconds per call, after one warm-up call; blocks on the results."""
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(repeats):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / repeats


def matmul_gflops(n: int, repeats: int, dtype=jnp.float32) -> float:
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  seconds = _timed(jax.jit(jnp.matmul), a, b, repeats=repeats)
  return 2 * n ** 3 / seconds / 1e9


def numpy_matmul_gflops(n: int, repeats: int) -> float:
  """The same product through numpy's BLAS: the limit is the better of the two libraries."""
  a = np.random.default_rng(0).standard_normal((n, n), np.float32)
  a @ a
  start = time.perf_counter()
  for _ in range(repeats):
    a @ a
  return 2 * n ** 3 / ((time.perf_counter() - start) / repeats) / 1e9


def _batch(config, batch_size: int, devices: Devices) -> dict:
  rng = np.random.default_rng(0)
  size = config.image_size
  return devices.put({
      'image': rng.integers(0, 256, (batch_size, size, size, 3), np.uint8),
      'label': rng.integers(0, config.num_classes, (batch_size, size, size), np.uint8),
      'mask': np.ones(batch_size, bool),
  })


def chapters_forward(config) -> models.Forward:
  """models.forward's contract, with the chapter's nn.ConvTranspose upsampling (where the model
  has it) and XLA's convolutions: XLA's cost analysis counts no FLOPs in a custom call
  (oneDNN's)."""
  module = models.create(config, layers.xla_layer)
  if hasattr(module, 'fast_upsample'):  # The chapter's U-Net.
    module = module.clone(fast_upsample=False)

  def forward(params, images, dropout_rng=None):
    train = dropout_rng is not None
    return module.apply({'params': params}, models.normalize(images), train=train,
                        rngs={'dropout': dropout_rng} if train else None)
  return forward


def timed_forward(config) -> models.Forward:
  """The forward pass the timed steps run (--upsample)."""
  if FLAGS.upsample == 'conv_transpose':
    if config.encoder in models.ENCODERS:
      raise app.UsageError('--upsample=conv_transpose: only the chapter\'s U-Net has that form')
    return chapters_forward(config)
  return models.forward(config)


def model_flops(config, state, batch) -> float:
  """FLOPs of one train step of the chapter's formulation (nn.ConvTranspose upsampling)."""
  step = functools.partial(steps.train_step, chapters_forward(config))
  lowered = jax.jit(step).lower(state, batch, jax.random.key(0))
  return lowered.cost_analysis()['flops']


@dataclasses.dataclass
class TrainStep:
  """The trainer's step of a config's model on one random batch, compiled (`train_step`)."""
  compiled: Any
  state: steps.TrainState  # The state after the last step run.
  batch: dict
  compile_seconds: float

  def run(self, calls: int) -> float:
    """Seconds a step over `calls` steps, each from the state the last one left."""
    start = time.perf_counter()
    for _ in range(calls):
      self.state, _ = self.compiled(self.state, self.batch, jax.random.key(0))
    jax.block_until_ready(self.state)
    return (time.perf_counter() - start) / calls


def train_step(config, batch_size: int, forward: models.Forward,
               steps_per_epoch: int | None = None) -> TrainStep:
  """The trainer's train step (steps.compile_steps, microbatches included) of config's model at
  batch_size and config.image_size, on random data, compiled (timed) and run once to warm up."""
  config = config.copy_and_resolve_references()
  config.batch_size = batch_size
  devices = Devices(batch_size)
  state = jax.jit(functools.partial(steps.create_train_state, config,
                                    steps_per_epoch=steps_per_epoch),
                  out_shardings=devices.replicated)(jax.random.key(0))
  batch = {k: v for k, v in _batch(config, batch_size, devices).items() if k != 'mask'}
  step, _ = steps.compile_steps(config, devices, forward)
  start = time.perf_counter()
  compiled = step.lower(state, batch, jax.random.key(0)).compile()
  timed = TrainStep(compiled, state, batch, time.perf_counter() - start)
  timed.run(1)  # Warm-up.
  return timed


def bench_train(config, batch_size: int, repeats: int, forward: models.Forward) -> dict:
  timed = train_step(config, batch_size, forward)
  xla_flops = timed.compiled.cost_analysis()['flops']
  flops = model_flops(config, timed.state, timed.batch)
  seconds = timed.run(repeats)
  config = config.copy_and_resolve_references()
  config.batch_size = batch_size
  microbatches = steps.num_microbatches(config, Devices(batch_size))
  return {
      'batch_size': batch_size, 'microbatches': microbatches,
      'step_seconds': seconds, 'images_per_second': batch_size / seconds,
      'compile_seconds': timed.compile_seconds, 'model_gflop': flops / 1e9,
      'xla_gflop': xla_flops / 1e9, 'gflops_per_second': flops / seconds / 1e9,
  }


def bench_eval(config, batch_size: int, repeats: int, forward: models.Forward) -> dict:
  devices = Devices(batch_size)
  state = jax.jit(functools.partial(steps.create_train_state, config),
                  out_shardings=devices.replicated)(jax.random.key(0))
  evaluate = steps.compile_eval_step(config, devices, forward)
  batch = _batch(config, batch_size, devices)
  start = time.perf_counter()
  compiled = evaluate.lower(state.params, batch).compile()
  compile_seconds = time.perf_counter() - start
  seconds = _timed(compiled, state.params, batch, repeats=repeats)
  return {'batch_size': batch_size, 'images_per_second': batch_size / seconds,
          'compile_seconds': compile_seconds}


def bench_cached_input(config, batch_size: int, num_examples: int = 2048) -> float:
  """img/s of the cached pass: batches gathered from uint8 examples in memory."""
  rng = np.random.default_rng(0)
  size = config.image_size
  examples = [(rng.integers(0, 256, (size, size, 3), np.uint8),
               rng.integers(0, config.num_classes, (size, size), np.uint8))
              for _ in range(num_examples)]
  split = input_pipeline.Split(num_examples, range(num_examples), examples, None, (size, size))
  start = time.perf_counter()
  n = sum(len(b['image']) for b in input_pipeline.train_batches(
      split, batch_size, seed=0, epoch=0, process_index=0))
  return n / (time.perf_counter() - start)


def bench_tiles(config, side: int, window_batch: int) -> dict:
  """Megapixels/s of crop-mode predict on one side x side image: windows of config.crop_size
  overlapping by config.tile_overlap, Gaussian-blended, argmax (tiles.sliding_window_classes)."""
  params = models.init_params(config, jax.random.key(0))
  forward = jax.jit(models.forward(config))
  crop = config.crop_size
  image = np.random.default_rng(0).integers(0, 256, (side, side, 3), np.uint8)
  start = time.perf_counter()
  tiles.sliding_window_classes(forward, params, image[:crop, :crop], crop_size=crop,
                               window_batch=window_batch)  # Compiles the one window batch.
  compile_seconds = time.perf_counter() - start
  start = time.perf_counter()
  tiles.sliding_window_classes(forward, params, image, crop_size=crop,
                               overlap=config.tile_overlap, window_batch=window_batch)
  seconds = time.perf_counter() - start
  windows = len(tiles.window_starts(side, crop, config.tile_overlap)) ** 2
  return {'side': side, 'crop_size': crop, 'tile_overlap': config.tile_overlap,
          'window_batch': window_batch, 'windows': windows, 'seconds': seconds,
          'megapixels_per_second': side * side / seconds / 1e6,
          'compile_seconds': compile_seconds}


def _print_tiles(results: dict) -> None:
  r = results['tiles']
  print(f'crop-mode predict: {r["megapixels_per_second"]:.3f} megapixels/s on a {r["side"]}x'
        f'{r["side"]} image ({r["windows"]} windows of {r["crop_size"]}, overlap '
        f'{r["tile_overlap"]:g}, {r["window_batch"]} a pass; {r["seconds"]:.1f}s, compile '
        f'{r["compile_seconds"]:.1f}s)', flush=True)


def main(argv):
  del argv
  config = FLAGS.config
  if FLAGS.tiles_only:
    if not FLAGS.tiles_image:
      raise app.UsageError('--tiles_only needs --tiles_image, e.g. 4096')
    device = jax.devices()[0]
    results = {'device': f'{device.device_kind} ({device.platform})',
               'widths': list(config.widths), 'dtype': config.dtype,
               'tiles': bench_tiles(config, FLAGS.tiles_image, FLAGS.window_batch)}
    _print_tiles(results)
    if FLAGS.json:
      with open(FLAGS.json, 'w') as f:
        json.dump(results, f, indent=2)
      print(f'wrote {FLAGS.json}')
    return
  device = jax.devices()[0]
  results = {
      'device': f'{jax.device_count()} x {device.device_kind} ({device.platform})',
      'host': platform.processor() or platform.machine(),
      'image_size': config.image_size, 'widths': list(config.widths), 'dtype': config.dtype,
      'conv_backend': layers.backend(config.dtype), 'upsample': FLAGS.upsample,
  }
  print(f'unet-flax benchmark: {results["device"]}, {config.image_size}x{config.image_size}, '
        f'widths {tuple(config.widths)}, {config.dtype}, {layers.convolutions(config.dtype)}, '
        f'{FLAGS.upsample} upsampling', flush=True)
  jax_limit = matmul_gflops(FLAGS.matmul_size, FLAGS.repeats, jnp.dtype(config.dtype))
  # numpy has no bfloat16 BLAS; on a GPU it is the host's.
  numpy_limit = (numpy_matmul_gflops(FLAGS.matmul_size, FLAGS.repeats)
                 if config.dtype == 'float32' and device.platform == 'cpu' else 0.0)
  limit = max(jax_limit, numpy_limit)
  results.update(matmul_gflops_per_second=limit, jax_matmul_gflops_per_second=jax_limit,
                 numpy_matmul_gflops_per_second=numpy_limit)
  print(f'{config.dtype} matmul {FLAGS.matmul_size}^3: jax {jax_limit:.1f}'
        + (f', numpy {numpy_limit:.1f}' if numpy_limit else '')
        + f' GFLOP/s; the limit is the better, {limit:.1f}', flush=True)
  peak = FLAGS.peak_tflops * 1e3  # GFLOP/s
  if peak:
    results['peak_gflops_per_second'] = peak
    print(f'datasheet peak (--peak_tflops): {peak:.0f} GFLOP/s; the measured matmul is '
          f'{limit / peak:.1%} of it', flush=True)

  print(f'{"batch":>5} {"micro":>5} {"img/s":>9} {"step s":>8} {"model GFLOP":>11} '
        f'{"xla GFLOP":>10} {"GFLOP/s":>8} {"of limit":>8} {"of target":>9} {"compile s":>9}'
        + (f' {"MFU":>6}' if peak else ''), flush=True)
  results['train'] = []
  forward = timed_forward(config)
  for batch_size in map(int, FLAGS.batch_sizes):
    r = bench_train(config, batch_size, FLAGS.repeats, forward)
    r['fraction_of_matmul'] = r['gflops_per_second'] / limit
    r['fraction_of_target'] = r['fraction_of_matmul'] / FLAGS.target_fraction
    if peak:
      r['mfu'] = r['gflops_per_second'] / peak
    results['train'].append(r)
    print(f'{batch_size:>5} {r["microbatches"]:>5} {r["images_per_second"]:>9.2f} '
          f'{r["step_seconds"]:>8.3f} {r["model_gflop"]:>11.1f} {r["xla_gflop"]:>10.1f} '
          f'{r["gflops_per_second"]:>8.1f} {r["fraction_of_matmul"]:>8.1%} '
          f'{r["fraction_of_target"]:>9.2f} {r["compile_seconds"]:>9.1f}'
          + (f' {r["mfu"]:>6.1%}' if peak else ''), flush=True)
  results['target_fraction_of_matmul'] = FLAGS.target_fraction

  eval_batch = int(FLAGS.batch_sizes[-1])
  results['eval'] = bench_eval(config, eval_batch, FLAGS.repeats, forward)
  print(f'eval: {results["eval"]["images_per_second"]:.1f} img/s at batch {eval_batch} '
        f'(compile {results["eval"]["compile_seconds"]:.1f}s)', flush=True)
  results['input_cached_images_per_second'] = bench_cached_input(config, eval_batch)
  print(f'input pipeline, cached pass: {results["input_cached_images_per_second"]:,.0f} img/s '
        f'(python bench/input_pipeline.py measures the first pass too)', flush=True)
  if FLAGS.tiles_image:
    results['tiles'] = bench_tiles(config, FLAGS.tiles_image, FLAGS.window_batch)
    _print_tiles(results)
  if FLAGS.json:
    with open(FLAGS.json, 'w') as f:
      json.dump(results, f, indent=2)
    print(f'wrote {FLAGS.json}')


if __name__ == '__main__':
  cli.run(main)  # As train.py: its XLA flags and compile cache.
