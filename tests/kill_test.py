"""Exact resume under SIGKILL at random moments (marker `kill`; CI runs it with the suite).

  python -m pytest -m kill            # only this; UNET_FLAX_KILLS=8 for more kills
  UNET_FLAX_KILL_CACHE_BYTES=0 python -m pytest -m kill   # the killed runs fully streamed

Trains the tests' tiny config (widths 4-8, 16x16, 2 epochs of 3 steps, a checkpoint every 2
steps) once without a break, every example in memory; then again in a fresh workdir, with half of
the train examples in memory and the rest and the eval split decoded on the fly in worker threads
(config.cache_bytes; UNET_FLAX_KILL_CACHE_BYTES sets it), where a SIGKILL lands at random times
chosen by a seeded generator (during start-up and compile, mid-step, mid-save, during
evaluation), the same command rerun after each kill, and a last run to the end. Passes when the
interrupted workdir's final checkpoint is bit for bit the uninterrupted one's and every step was
logged exactly once in metrics.jsonl. With the default 3 kills it takes about a minute; the unit
tests of tests/preemption_test.py kill at fixed points only.
"""

import json
import os
import pathlib
import signal
import subprocess
import time
import warnings

import numpy as np
import pytest

from tests.conftest import ROOT
from tests.conftest import script_command
from tests.conftest import script_env
from tests.conftest import tiny_overrides


# Half of the tiny train split's 24 examples of 16x16x4 bytes: memory and disk both serve batches.
HALF_CACHED = 12 * 16 * 16 * 4


def _train(workdir, data_dir, cache, kill_after: float | None,
           cache_bytes: int | None = None) -> tuple[int, str]:
  """Runs train.py; with kill_after, SIGKILLs it that many seconds after it starts."""
  command = script_command('train.py', '--config', ROOT / 'configs' / 'quickstart.py',
                           f'--workdir={workdir}', *tiny_overrides(data_dir),
                           *([f'--config.cache_bytes={cache_bytes}']
                             if cache_bytes is not None else []))
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


@pytest.mark.kill
def test_random_sigkills_then_a_rerun_end_in_the_uninterrupted_runs_checkpoint(tmp_path,
                                                                                 tfds_dir):
  kills = int(os.environ.get('UNET_FLAX_KILLS', '3'))
  cache_bytes = int(os.environ.get('UNET_FLAX_KILL_CACHE_BYTES', str(HALF_CACHED)))
  rng = np.random.default_rng(int(os.environ.get('UNET_FLAX_KILL_SEED', '0')))
  cache = tmp_path / 'cache'
  code, out = _train(tmp_path / 'reference', tfds_dir, cache, None)  # Compiles, caches.
  assert code == 0, out
  started = time.perf_counter()
  code, out = _train(tmp_path / 'timing', tfds_dir, cache, None)
  reference_seconds = time.perf_counter() - started
  assert code == 0, out
  print(f'an uninterrupted run takes {reference_seconds:.1f}s (compile cached)')
  workdir = tmp_path / 'killed'
  for i in range(kills):
    # Anywhere from start-up to the end of a whole run.
    kill_after = float(rng.uniform(0.05, 1.0) * reference_seconds)
    code, out = _train(workdir, tfds_dir, cache, kill_after, cache_bytes)
    last = [l for l in out.splitlines() if l.strip()][-1:] or ['(no output)']
    print(f'kill {i + 1}: after {kill_after:.1f}s, exit {code}, last line: {last[0][:90]}')
  code, out = _train(workdir, tfds_dir, cache, None, cache_bytes)
  assert code == 0, out
  assert 'decoded on the fly' in out  # The streamed path ran.
  steps = [json.loads(l)['step'] for l in (workdir / 'metrics.jsonl').read_text().splitlines()
           if json.loads(l)['split'] == 'train']
  assert steps == list(range(1, 7))
  for a, b in zip(_final_params(workdir), _final_params(tmp_path / 'reference'), strict=True):
    np.testing.assert_array_equal(a, b)
