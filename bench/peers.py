"""This project's train step against the chapter's model in Keras and in PyTorch, alternated in
one run.

  python3 -m venv ~/keras-peer && ~/keras-peer/bin/pip install tensorflow-cpu pillow
  python3 -m venv ~/torch-peer && ~/torch-peer/bin/pip install torch  # the CPU build will do
  python bench/peers.py --keras_python ~/keras-peer/bin/python \
      --torch_python ~/torch-peer/bin/python [--batch 8] [--rounds 5]

Contenders, at batch 8 (default), 128x128, the default config's U-Net, per precision (float32;
bfloat16 = the project's config.dtype 'bfloat16', Keras's mixed_bfloat16 policy, PyTorch's
torch.autocast('cpu', torch.bfloat16)):

  unet-flax xla     the trainer's step (steps.compile_steps), --conv_backend=xla
  unet-flax onednn  the same with 'onednn' (when ext/unet_flax_onednn is installed)
  keras             keras_unet.unet_model(3), Adam, train_on_batch, in its own process
                    (bench/keras_worker.py under --keras_python)
  torch             the same model in PyTorch, channels_last, Adam, in its own process
                    (bench/torch_worker.py under --torch_python)

TensorFlow and PyTorch are never dependencies of this project: each peer runs in a venv of its
own; either may be left out. Each round times every contender in turn (`calls` steps each; the
order rotates from round to round), so all of them see the same machine load; the table gives
medians over rounds, img/s, ratios to the faster peer of the same precision and to the project's
XLA step, and the fraction of this machine's matmul limit for that precision: the best n x n x n
matmul of jax, numpy (float32) and the peers' (oneDNN), timed in the same rounds (medians).
FLOPs are the model's (speed.model_flops: the chapter's formulation), the same for every
contender.
"""

import argparse
import functools
import importlib.util
import pathlib
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

from unet_flax import runtime

runtime.configure_xla_cpu()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import speed as bench  # noqa: E402  (bench/speed.py, beside this file)
from unet_flax import layers  # noqa: E402
from unet_flax import models  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
# What each peer's worker calls the precisions.
PEERS = {
    'keras': ('keras_worker.py', {'float32': 'float32', 'bfloat16': 'mixed_bfloat16'}),
    'torch': ('torch_worker.py', {'float32': 'float32', 'bfloat16': 'bfloat16'}),
}


def default_config():
  spec = importlib.util.spec_from_file_location('default_config', ROOT / 'configs' / 'default.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def cpu_model() -> str:
  try:
    out = subprocess.run(['lscpu'], capture_output=True, text=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError):
    return 'unknown CPU'
  fields = dict(line.split(':', 1) for line in out.splitlines() if ':' in line)
  flags = fields.get('Flags', '').split()
  extras = [f for f in ('avx512f', 'avx512_bf16', 'amx_bf16') if f in flags]
  return (f'{fields.get("Model name", "?").strip()}, {fields.get("CPU(s)", "?").strip()} CPUs, '
          f'{" ".join(extras) or "no AVX-512"}')


class Worker:
  """A peer's worker process (PEERS): one command a line, one answer a line."""

  def __init__(self, peer: str, python: str, batch: int):
    self.peer = peer
    script, self.precisions = PEERS[peer]
    self.log = tempfile.NamedTemporaryFile('w+', prefix=f'{peer}_worker_', suffix='.log',
                                           delete=False)
    self.proc = subprocess.Popen([python, str(ROOT / 'bench' / script), str(batch)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                 text=True)

  def _read(self) -> str:
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f'the {self.peer} worker stopped; its log: {self.log.name}')
    return line.strip()

  def ready(self) -> str:
    line = self._read()
    if not line.startswith('ready'):
      raise RuntimeError(f'{self.peer} worker: {line} (log: {self.log.name})')
    return line[len('ready '):]

  def ask(self, *command) -> float:
    self.proc.stdin.write(' '.join(map(str, command)) + '\n')
    self.proc.stdin.flush()
    return float(self._read())

  def close(self):
    if self.proc.poll() is None:
      self.proc.stdin.write('quit\n')
      self.proc.stdin.flush()
      self.proc.wait(timeout=60)


def project_step(config, batch_size: int, backend: str):
  """A function running `calls` train steps of config's model (speed.train_step's), and the
  model's FLOPs per step."""
  forward = models.forward(config, layers.layer_function(backend, config.dtype))
  timed = bench.train_step(config, batch_size, forward)
  return timed.run, bench.model_flops(config, timed.state, timed.batch)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--keras_python', help="python of a venv with tensorflow-cpu (not this "
                      "project's); leave out to run without Keras")
  parser.add_argument('--torch_python', help="python of a venv with torch (not this project's); "
                      'leave out to run without PyTorch')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--dtypes', default='float32,bfloat16')
  parser.add_argument('--backends', default='xla,onednn',
                      help='conv backends of the project to run; onednn needs the extension')
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--calls', type=int, default=1, help='steps per contender per round')
  parser.add_argument('--matmul_size', type=int, default=4096)
  args = parser.parse_args()
  dtypes = args.dtypes.split(',')
  backends = args.backends.split(',')
  pythons = {'keras': args.keras_python, 'torch': args.torch_python}

  print(f'machine: {cpu_model()}; jax {jax.__version__}, {jax.devices()[0].platform}')
  print('command: python ' + ' '.join(shlex.quote(a) for a in sys.argv), flush=True)
  # The peers build their models while ours compile.
  workers = {peer: Worker(peer, python, args.batch) for peer, python in pythons.items() if python}
  runners, flops = {}, {}
  for dtype in dtypes:
    for backend in backends:
      config = default_config()
      config.batch_size = args.batch
      config.dtype = dtype
      layers.resolve_backend(backend)  # Fails here, plainly, where oneDNN is asked but missing.
      if backend != 'xla' and layers.layer_function(backend, dtype) is layers.xla_layer:
        print(f"unet-flax {backend} {dtype}: left out, this CPU's oneDNN has no {dtype} "
              'convolution (its layers would be XLA\'s)', flush=True)
        continue
      runners[f'unet-flax {backend}', dtype], flops[dtype] = project_step(config, args.batch,
                                                                          backend)
    for peer, worker in workers.items():
      runners[peer, dtype] = functools.partial(
          lambda worker, precision, calls: worker.ask('step', precision, calls),
          worker, worker.precisions[dtype])
  for peer, worker in workers.items():
    print(f'{peer} worker: {worker.ready()}', flush=True)

  # The matmul limits are timed inside the rounds too, as contenders: the load moves.
  for dtype in dtypes:
    n = args.matmul_size
    a = jnp.ones((n, n), dtype)
    mm = jax.jit(jnp.matmul)
    jax.block_until_ready(mm(a, a))

    def jax_matmul(calls, a=a, mm=mm, n=n):
      start = time.perf_counter()
      for _ in range(calls):
        out = mm(a, a)
      jax.block_until_ready(out)
      return 2 * n ** 3 / ((time.perf_counter() - start) / calls) / 1e9
    matmuls = {('jax', dtype): jax_matmul}
    for peer, worker in workers.items():
      matmuls[peer, dtype] = functools.partial(
          lambda worker, dtype, n, calls: worker.ask('matmul', dtype, n), worker, dtype, n)
    if dtype == 'float32':
      matmuls['numpy', dtype] = lambda calls, n=n: bench.numpy_matmul_gflops(n, calls)
    runners.update({('matmul ' + k, d): f for (k, d), f in matmuls.items()})

  names = list(runners)
  times = {name: [] for name in names}
  for r in range(args.rounds):
    order = names[r % len(names):] + names[:r % len(names)]
    for name in order:
      times[name].append(runners[name](args.calls))
    print(f'round {r + 1}/{args.rounds}: ' + ', '.join(
        f'{c} {d} {times[c, d][-1]:.2f}' + ('GFLOP/s' if c.startswith('matmul') else 's')
        for c, d in names), flush=True)
  limits = {}
  for dtype in dtypes:
    found = {c[len('matmul '):]: statistics.median(v) for (c, d), v in times.items()
             if c.startswith('matmul') and d == dtype}
    best = max(found, key=found.get)
    limits[dtype] = found[best]
    print(f'{dtype} matmul {args.matmul_size}^3 GFLOP/s (medians): ' + ', '.join(
        f'{k} {v:.1f}' for k, v in found.items()) + f'; the limit is {best}\'s', flush=True)
  names = [name for name in names if not name[0].startswith('matmul')]

  print()
  print('| contender | precision | step s (median) | img/s | vs the faster peer | vs unet-flax xla '
        '| GFLOP/s | of matmul limit |')
  print('| --- | --- | --- | --- | --- | --- | --- | --- |')
  for name in names:
    contender, dtype = name
    seconds = statistics.median(times[name])
    peer_s = min((statistics.median(times[peer, dtype]) for peer in workers), default=None)
    vs_peer = f'{peer_s / seconds:.2f}x' if peer_s else '-'
    xla = times.get(('unet-flax xla', dtype))
    vs_xla = f'{statistics.median(xla) / seconds:.2f}x' if xla else '-'
    gflops = flops[dtype] / seconds / 1e9
    print(f'| {contender} | {dtype} | {seconds:.3f} | {args.batch / seconds:.2f} | '
          f'{vs_peer} | {vs_xla} | {gflops:.1f} | {gflops / limits[dtype]:.1%} |')
  print(f'\nmodel: {flops[dtypes[0]] / 1e9:.1f} GFLOP per step at batch {args.batch}; matmul '
        'limits: ' + ', '.join(f'{d} {limits[d]:.1f} GFLOP/s' for d in dtypes))
  for worker in workers.values():
    worker.close()


if __name__ == '__main__':
  main()
