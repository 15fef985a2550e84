"""The train step on oneDNN's convolutions against XLA's, alternated, for the chapter's U-Net and
the pretrained one side by side.

python bench/onednn_step.py [--batch 8] [--dtypes float32,bfloat16] [--rounds 5]
    [--encoders unet,efficientnet_lite0]

Every step is the trainer's own (steps.compile_steps, microbatches included) on the default
config with config.encoder set (128x128), on the 'xla' and 'onednn' layer functions: in the
second every convolution (forward and both gradients) runs in oneDNN; for the pretrained U-Net
that includes its stride-2 and depthwise ones. Per dtype, each round runs `calls` steps of every
(encoder, backend) in turn, so that all share the machine's load alike; medians over rounds. The
last column of a pretrained row is its img/s over the chapter's on the same backend.
"""

import argparse
import functools
import importlib.util
import pathlib
import re
import statistics
import time

from unet_flax import runtime

runtime.configure_xla_cpu()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from unet_flax import layers  # noqa: E402
from unet_flax import models  # noqa: E402
from unet_flax import steps  # noqa: E402
from unet_flax.devices import Devices  # noqa: E402


def default_config():
  path = pathlib.Path(__file__).resolve().parents[1] / 'configs' / 'default.py'
  spec = importlib.util.spec_from_file_location('default_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--dtypes', default='float32,bfloat16')
  parser.add_argument('--encoders', default='unet',
                      help='config.encoder values, e.g. unet,efficientnet_lite0')
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--calls', type=int, default=1)
  args = parser.parse_args()
  encoders = args.encoders.split(',')
  print(f'{"encoder":>18} {"dtype":>8} {"xla s":>7} {"onednn s":>8} {"xla img/s":>9} '
        f'{"dnnl img/s":>10} {"speedup":>7} {"min xla":>7} {"min dnnl":>8} {"ffi calls":>9} '
        f'{"vs chapter (xla, dnnl)":>22}', flush=True)
  for dtype in args.dtypes.split(','):
    devices = Devices(args.batch)
    rng = np.random.default_rng(0)
    batch = devices.put({
        'image': rng.integers(0, 256, (args.batch, 128, 128, 3), np.uint8),
        'label': rng.integers(0, 3, (args.batch, 128, 128), np.uint8)})
    runs = {}  # (encoder, backend) -> [compiled step, state, step seconds per round]
    for encoder in encoders:
      config = default_config()
      config.batch_size = args.batch
      config.dtype = dtype
      config.encoder = encoder
      for backend in ('xla', 'onednn'):
        state = jax.jit(functools.partial(steps.create_train_state, config),
                        out_shardings=devices.replicated)(jax.random.key(0))
        forward = models.forward(config, layers.layer_function(backend, dtype))
        step, _ = steps.compile_steps(config, devices, forward)
        c = step.lower(state, batch, jax.random.key(0)).compile()
        state, _ = c(state, batch, jax.random.key(0))  # Warm-up.
        jax.block_until_ready(state)
        runs[encoder, backend] = [c, state, []]
      assert not re.findall(r'unet_onednn', runs[encoder, 'xla'][0].as_text())
    for _ in range(args.rounds):
      for run in runs.values():
        start = time.perf_counter()
        for _ in range(args.calls):
          run[1], _ = run[0](run[1], batch, jax.random.key(0))
        jax.block_until_ready(run[1])
        run[2].append((time.perf_counter() - start) / args.calls)
    median = {key: statistics.median(run[2]) for key, run in runs.items()}
    for encoder in encoders:
      a, b = median[encoder, 'xla'], median[encoder, 'onednn']
      ffi_calls = len(re.findall(r'custom-call\(.*unet_onednn',
                                 runs[encoder, 'onednn'][0].as_text()))
      versus = ''
      if encoder != encoders[0]:
        versus = (f'{median[encoders[0], "xla"] / a:.2f}x, '
                  f'{median[encoders[0], "onednn"] / b:.2f}x')
      print(f'{encoder:>18} {dtype:>8} {a:>7.3f} {b:>8.3f} {args.batch / a:>9.2f} '
            f'{args.batch / b:>10.2f} {a / b:>6.2f}x {min(runs[encoder, "xla"][2]):>7.3f} '
            f'{min(runs[encoder, "onednn"][2]):>8.3f} {ffi_calls:>9} {versus:>22}', flush=True)


if __name__ == '__main__':
  main()
