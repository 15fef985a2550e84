"""The default model's train step on oneDNN's convolutions against XLA's, alternated.

python bench/onednn_step.py [--batch 8] [--dtypes float32,bfloat16] [--rounds 5]

Both steps are the trainer's own (steps.compile_steps, microbatches included) on the default
config, on the 'xla' and 'onednn' layer functions: in the second every convolution (3x3, the
upsampling's four phases, the 1x1 logits; forward and both gradients) runs in oneDNN. Each round
runs `calls` XLA steps then `calls` oneDNN steps; medians over rounds.
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
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--calls', type=int, default=1)
  args = parser.parse_args()
  print(f'{"dtype":>8} {"xla s":>7} {"onednn s":>8} {"xla img/s":>9} {"dnnl img/s":>10} '
        f'{"speedup":>7} {"min xla":>7} {"min dnnl":>8} {"ffi calls":>9}', flush=True)
  for dtype in args.dtypes.split(','):
    config = default_config()
    config.batch_size = args.batch
    config.dtype = dtype
    devices = Devices(args.batch)
    rng = np.random.default_rng(0)
    batch = devices.put({
        'image': rng.integers(0, 256, (args.batch, 128, 128, 3), np.uint8),
        'label': rng.integers(0, 3, (args.batch, 128, 128), np.uint8)})
    compiled, states = [], []
    for backend in ('xla', 'onednn'):
      state = jax.jit(functools.partial(steps.create_train_state, config),
                      out_shardings=devices.replicated)(jax.random.key(0))
      forward = models.forward(config, layers.layer_function(backend))
      step, _ = steps.compile_steps(config, devices, forward)
      c = step.lower(state, batch, jax.random.key(0)).compile()
      compiled.append(c)
      state, _ = c(state, batch, jax.random.key(0))  # Warm-up.
      jax.block_until_ready(state)
      states.append(state)
    ffi_calls = len(re.findall(r'custom-call\(.*unet_onednn', compiled[1].as_text()))
    assert not re.findall(r'unet_onednn', compiled[0].as_text())
    times = [[], []]
    for _ in range(args.rounds):
      for i in (0, 1):
        start = time.perf_counter()
        for _ in range(args.calls):
          states[i], _ = compiled[i](states[i], batch, jax.random.key(0))
        jax.block_until_ready(states[i])
        times[i].append((time.perf_counter() - start) / args.calls)
    a, b = (statistics.median(t) for t in times)
    print(f'{dtype:>8} {a:>7.3f} {b:>8.3f} {args.batch / a:>9.2f} {args.batch / b:>10.2f} '
          f'{a / b:>6.2f}x {min(times[0]):>7.3f} {min(times[1]):>8.3f} {ffi_calls:>9}',
          flush=True)


if __name__ == '__main__':
  main()
