"""Exact resume under SIGKILL at random moments: python bench/kill_test.py [--kills 8] [--seed 0]

Trains the tests' tiny config (widths 4-8, 16x16, 2 epochs of 3 steps, a checkpoint every 2
steps) once without a break, then again in a fresh workdir where a SIGKILL lands at random times
chosen by a seeded generator (during start-up and compile, mid-step, mid-save, during
evaluation), the same command rerun after each kill, and a last run to the end. Passes when the
interrupted workdir's final checkpoint is bit for bit the uninterrupted one's and every step was
logged exactly once in metrics.jsonl. It takes a few minutes; the unit tests (tests/
preemption_test.py) kill at fixed points only.
"""

import argparse
import json
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import script_command  # pylint: disable=g-import-not-at-top,wrong-import-position
from tests.conftest import script_env  # pylint: disable=g-import-not-at-top,wrong-import-position
from tests.conftest import tiny_overrides  # pylint: disable=g-import-not-at-top,wrong-import-position


def _train(workdir, data_dir, cache, kill_after: float | None) -> tuple[int, str]:
  """Runs train.py; with kill_after, SIGKILLs it that many seconds after it starts."""
  command = script_command('train.py', '--config', ROOT / 'configs' / 'quickstart.py',
                           f'--workdir={workdir}', *tiny_overrides(data_dir))
  process = subprocess.Popen(command, cwd=ROOT, env=script_env(cache), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
  try:
    out, _ = process.communicate(timeout=kill_after)
  except subprocess.TimeoutExpired:
    process.send_signal(signal.SIGKILL)
    out, _ = process.communicate()
  return process.returncode, out


def _final_params(workdir) -> list[np.ndarray]:
  """The leaves of checkpoint 6 (step, params, optimizer state), read with orbax."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  warnings.filterwarnings('ignore', 'Sharding info not provided', UserWarning)
  with ocp.PyTreeCheckpointer() as checkpointer:
    tree = checkpointer.restore(pathlib.Path(workdir) / 'checkpoints' / '6' / 'default')
  import jax  # pylint: disable=g-import-not-at-top
  return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--kills', type=int, default=8, help='SIGKILLs before the last run.')
  parser.add_argument('--seed', type=int, default=0, help='Seeds the kill times.')
  args = parser.parse_args()
  rng = np.random.default_rng(args.seed)
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    data_dir, cache = str(tmp / 'tfds'), tmp / 'cache'
    code, out = _train(tmp / 'reference', data_dir, cache, None)  # Prepares data, compiles.
    if code:
      print(out)
      return 1
    started = time.perf_counter()
    _train(tmp / 'timing', data_dir, cache, None)
    reference_seconds = time.perf_counter() - started
    print(f'an uninterrupted run takes {reference_seconds:.1f}s (data prepared, compile cached)',
          flush=True)
    workdir = tmp / 'killed'
    for i in range(args.kills):
      # Anywhere from start-up to the end of a whole run.
      kill_after = float(rng.uniform(0.05, 1.0) * reference_seconds)
      code, out = _train(workdir, data_dir, cache, kill_after)
      last = [l for l in out.splitlines() if l.strip()][-1:] or ['(no output)']
      print(f'kill {i + 1}: after {kill_after:.1f}s, exit {code}, last line: {last[0][:90]}',
            flush=True)
    code, out = _train(workdir, data_dir, cache, None)
    if code:
      print(out)
      return 1
    steps = [json.loads(l)['step'] for l in (workdir / 'metrics.jsonl').read_text().splitlines()
             if json.loads(l)['split'] == 'train']
    same = all(np.array_equal(a, b) for a, b in zip(_final_params(workdir),
                                                     _final_params(tmp / 'reference')))
    print(f'final checkpoint bit-identical to the uninterrupted run: {same}; train steps logged: '
          f'{steps}')
    return 0 if same and steps == list(range(1, 7)) else 1


if __name__ == '__main__':
  sys.exit(main())
