"""preparation.py and locks.py: a tfds data set is prepared once whatever else runs, its
leftovers are removed, and a full disk is one line."""

import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT
from tests.conftest import script_env
from tests.conftest import tmpfs
from unet_flax import errors
from unet_flax import locks
from unet_flax import sources
from unet_flax import synthetic

DATASET = 'synthetic_pets/tiny'
_PREPARE = ('import sys; from unet_flax import sources as p; '
            f'print(p.open_source("{DATASET}", sys.argv[1], 3).num_examples("train"))')


def test_two_processes_preparing_one_data_set_at_once_both_read_it(tmp_path):
  data_dir = tmp_path / 'tfds'
  processes = [subprocess.Popen([sys.executable, '-c', _PREPARE, str(data_dir)], cwd=ROOT,
                                env=script_env(tmp_path / 'cache'), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
  results = [p.communicate(timeout=120) + (p.returncode,) for p in processes]
  for out, err, code in results:
    assert code == 0, err
    assert out.split()[-1] == '24'  # After the preparer's progress.
  assert sorted(p.name for p in (data_dir / 'synthetic_pets' / 'tiny').iterdir()) == [
      '.1.0.0.lock', '1.0.0']  # No incomplete.* left by a loser of the race.


def test_the_lock_makes_a_second_process_wait(tmp_path):
  lock = tmp_path / 'x.lock'
  holder = ('import sys, time; from unet_flax import locks\n'
            'with locks.exclusive(sys.argv[1], "x"):\n'
            '  print("held", flush=True); time.sleep(1.5)\n')
  process = subprocess.Popen([sys.executable, '-c', holder, str(lock)], cwd=ROOT,
                             env=script_env(tmp_path / 'cache'), stdout=subprocess.PIPE, text=True)
  assert process.stdout.readline() == 'held\n'
  started = time.monotonic()
  with locks.exclusive(lock, 'the test'):
    waited = time.monotonic() - started
  process.wait(timeout=30)
  assert waited > 0.5


def test_leftovers_of_a_killed_preparation_are_removed(tmp_path, capsys):
  builder = synthetic.builder('tiny', str(tmp_path))
  leftover = tmp_path / 'synthetic_pets' / 'tiny' / 'incomplete.ABC123_1.0.0'
  leftover.mkdir(parents=True)
  (leftover / 'synthetic_pets-train.array_record-00000-of-00001').write_bytes(b'x' * 2 ** 20)
  sources.open_source(DATASET, str(tmp_path), 3)
  assert not leftover.exists()
  assert builder.is_prepared()
  assert (f'removed 1 incomplete directory (1.0 MiB) left in {leftover.parent} by an interrupted '
          'preparation') in capsys.readouterr().err


@pytest.fixture
def tiny_disk(tmp_path):
  yield from tmpfs(tmp_path, '200k')


def test_a_full_disk_while_preparing_is_one_line(tiny_disk):
  with pytest.raises(errors.UserError) as raised:
    sources.open_source(DATASET, str(tiny_disk / 'tfds'), 3)
  assert str(raised.value) == (
      f'cannot write the data set {DATASET} in {tiny_disk / "tfds"}: no space left on the '
      'device; free some space or choose another --config.data_dir')
  assert not list((tiny_disk / 'tfds' / 'synthetic_pets' / 'tiny').glob('incomplete.*'))
