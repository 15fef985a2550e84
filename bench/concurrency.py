"""Two of a kind at once, repeatedly: python bench/concurrency.py [--rounds 20] [--photos 24]

Each round starts, at the same moment,
  - two preparations of the `synthetic_pets/tiny` tfds data set into one fresh data_dir (as two
    experiments of a sweep started together), each then counting its train examples, and
  - (after them) two predict.py runs of the same photos into one --out with --overwrite (two
    users, or a loop, writing one folder), on a workdir trained once at the start.
A round passes when all four exit 0, both preparations read 24 train examples, every mask in
--out is a whole PNG of the photo's size and no temporary (.partial) file is left. Prints each
round and the passes; exits 1 unless every round passed. The tiny training run takes about
30 s on 2 cores, each round about 20 s.
"""

import argparse
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import script_command  # pylint: disable=g-import-not-at-top,wrong-import-position
from tests.conftest import script_env  # pylint: disable=g-import-not-at-top,wrong-import-position
from tests.conftest import tiny_overrides  # pylint: disable=g-import-not-at-top,wrong-import-position

DATASET = 'synthetic_pets/tiny'
_PREPARE = ('import sys; from unet_flax import sources as p; '
            f'print("train examples:", p.open_source("{DATASET}", sys.argv[1], 3)'
            '.num_examples("train"))')


def _start(command, env) -> subprocess.Popen:
  return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _finish(processes) -> list[tuple[int, str]]:
  return [(p.wait(timeout=600), p.stdout.read()) for p in processes]


def _round(tmp: pathlib.Path, n: int, workdir, photos, env) -> list[str]:
  """-> what went wrong in round n (nothing: it passed)."""
  problems = []
  data_dir = tmp / f'tfds_{n}'
  prepared = _finish([_start([sys.executable, '-c', _PREPARE, str(data_dir)], env)
                      for _ in range(2)])
  for code, out in prepared:
    if code or 'train examples: 24' not in out:
      problems.append(f'preparation exit {code}: {out.strip().splitlines()[-1:]}')
  out_dir = tmp / f'out_{n}'
  predicted = _finish([_start(script_command('predict.py', f'--workdir={workdir}',
                                             f'--out={out_dir}', '--overwrite', *photos), env)
                       for _ in range(2)])
  for code, out in predicted:
    if code:
      problems.append(f'predict exit {code}: {out.strip().splitlines()[-1:]}')
  for photo in photos:
    mask = out_dir / f'{pathlib.Path(photo).stem}_mask.png'
    try:
      with Image.open(mask) as image:
        image.load()
        if image.size != (40, 30):
          problems.append(f'{mask} is {image.size}')
    except OSError as e:
      problems.append(f'{mask}: {e}')
  leftovers = [p.name for p in out_dir.glob('*.partial')] if out_dir.exists() else []
  if leftovers:
    problems.append(f'temporaries left: {leftovers}')
  return problems


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--rounds', type=int, default=20)
  parser.add_argument('--photos', type=int, default=24, help='Photos each predict writes.')
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    env = script_env(tmp / 'cache')
    workdir = tmp / 'run'
    started = time.perf_counter()
    trained = subprocess.run(
        script_command('train.py', '--config', ROOT / 'configs' / 'quickstart.py',
                       f'--workdir={workdir}', *tiny_overrides(str(tmp / 'tfds_train'))),
        cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if trained.returncode:
      print(trained.stdout + trained.stderr)
      return 1
    print(f'trained the tiny workdir in {time.perf_counter() - started:.0f}s', flush=True)
    rng = np.random.default_rng(0)
    (tmp / 'photos').mkdir()
    photos = []
    for i in range(args.photos):
      photos.append(str(tmp / 'photos' / f'photo_{i:02d}.png'))
      Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(photos[-1])
    passes = 0
    for n in range(1, args.rounds + 1):
      started = time.perf_counter()
      problems = _round(tmp, n, workdir, photos, env)
      passes += not problems
      print(f'round {n}: {"pass" if not problems else "FAIL: " + "; ".join(problems)} '
            f'({time.perf_counter() - started:.0f}s)', flush=True)
    print(f'{passes}/{args.rounds} rounds passed (two preparations and two predicts at once)')
    return 0 if passes == args.rounds else 1


if __name__ == '__main__':
  sys.exit(main())
