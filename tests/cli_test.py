"""The command-line tools as a user runs them: from another directory, with relative paths, `~`
and symlinks, a SIGTERM and a resume; and the shell's one-line errors and exit codes."""

import json
import os
import signal

import numpy as np
from PIL import Image

from tests.conftest import ROOT
from tests.conftest import run_script
from tests.conftest import run_script_signalled
from tests.conftest import tiny_overrides


def test_every_tool_takes_relative_home_and_symlinked_paths_from_anywhere(tmp_path, tfds_dir):
  home, here = tmp_path / 'home', tmp_path / 'somewhere' / 'else'
  home.mkdir()
  here.mkdir(parents=True)
  (home / 'tfds').symlink_to(tfds_dir)  # --config.data_dir=~/tfds, through a symlink.
  cache = tmp_path / 'cache'
  config = os.path.relpath(ROOT / 'configs' / 'quickstart.py', here)
  train = ['train.py', '--config', config, '--workdir', 'runs/tiny', *tiny_overrides('~/tfds')]
  # SIGTERM once the first step is logged: save, say so, exit 0.
  code, log = run_script_signalled(*train, cache=cache, cwd=here, HOME=home,
                                   log=tmp_path / 'train.log', sig=signal.SIGTERM,
                                   when=lambda out: 'step 1/6' in out)
  assert code == 0, log
  workdir = here / 'runs' / 'tiny'
  saved = [int(p.name) for p in (workdir / 'checkpoints').iterdir()]
  assert len(saved) == 1 and f'preempted at step {saved[0]}: checkpoint saved to' in log

  resumed = run_script(*train, cache=cache, cwd=here, HOME=home)
  assert resumed.returncode == 0, resumed.stderr
  assert f'resumed from step {saved[0]} of 6' in resumed.stdout
  assert (workdir / 'checkpoints' / '6').is_dir()
  assert 'next:\n  python predict.py --workdir runs/tiny' in resumed.stdout
  again = run_script(*train, cache=cache, cwd=here, HOME=home)
  assert again.returncode == 0 and 'already trained: step 6 of 6' in again.stdout, again.stderr

  Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(here / 'photo.jpg')
  (here / 'run_link').symlink_to(workdir)
  predicted = run_script('predict.py', '--workdir', 'run_link', '--out=~/masks', '--flip_tta',
                         'photo.jpg', cache=cache, cwd=here, HOME=home)
  assert predicted.returncode == 0, predicted.stderr
  assert 'wrote masks and overlays (flip TTA) of 1 of 1 images' in predicted.stdout
  with Image.open(home / 'masks' / 'photo_mask.png') as mask:
    assert mask.size == (40, 30) and mask.mode == 'P'
  evaluated = run_script('evaluate.py', '--workdir', 'runs/tiny', '--out', 'scores/tiny.json',
                         '--flip_tta', cache=cache, cwd=here, HOME=home)
  assert evaluated.returncode == 0, evaluated.stderr
  scores = json.loads((here / 'scores' / 'tiny.json').read_text())
  assert scores['step'] == 6 and scores['workdir'] == str(workdir.resolve())
  assert scores['flip_tta'] is True and 'with flip TTA' in evaluated.stdout
  assert np.sum(scores['confusion_matrix']) == 12 * 16 * 16  # The tiny test split, once.
  exported = run_script('export.py', '--workdir=~/../somewhere/else/runs/tiny', '--out', 'model',
                        '--platforms', 'cpu', '--formats', 'jax', cache=cache, cwd=here,
                        HOME=home)
  assert exported.returncode == 0, exported.stderr
  assert 'model.jax_export (cpu)' in exported.stdout
  info = json.loads((here / 'model' / 'model.json').read_text())
  assert (info['step'], info['image_size'], info['files']['jax']['platforms']) == (6, 16, ['cpu'])
  assert list(info['files']) == ['jax'] and (here / 'model' / 'model.jax_export').is_file()


def test_config_file_errors_name_the_file_and_line(tmp_path):
  bad = tmp_path / 'bad.py'
  bad.write_text('from configs import default\n\ndef get_config():\n  config = default.get_config()\n'
                 '  config.batch_size = 1 / 0\n  return config\n')
  result = run_script('train.py', '--config', bad, '--workdir', tmp_path / 'run',
                      cache=tmp_path / 'cache')
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [
      f'error: the config file fails at {bad} line 5 (ZeroDivisionError: division by zero); fix '
      'the file']
  assert not (tmp_path / 'run').exists()


def test_a_missing_config_file_is_one_line(tmp_path):
  result = run_script('train.py', '--config', 'nothere.py', '--workdir', tmp_path / 'run',
                      cache=tmp_path / 'cache', cwd=tmp_path)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [
      'error: the --config file nothere.py does not exist; pass a file such as '
      'configs/default.py']


def test_a_bad_config_value_stops_in_one_line_before_anything_is_written(tmp_path):
  result = run_script('train.py', '--config', ROOT / 'configs' / 'quickstart.py', '--workdir',
                      tmp_path / 'run', '--config.max_checkpoints_to_keep=0',
                      cache=tmp_path / 'cache')
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [
      'error: config.max_checkpoints_to_keep=0 must be a whole number >= 1']
  assert not (tmp_path / 'run').exists()


def test_a_config_field_given_twice_is_refused(tmp_path):
  # ml_collections would concatenate the tuples: widths (4, 8, 8, 16), a model of four levels.
  result = run_script('train.py', '--config', ROOT / 'configs' / 'quickstart.py', '--workdir',
                      tmp_path / 'run', '--config.widths=(4,8)', '--config.widths=(8,16)',
                      cache=tmp_path / 'cache')
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [
      'error: --config.widths is given more than once; give each config field once']
  assert not (tmp_path / 'run').exists()


def test_a_photo_named_like_a_flag_is_a_photo_not_a_flag(tmp_path, trained_workdir):
  """`predict.py --out masks *.png` where the glob picks up a file named '--out=stolen.png'."""
  for name in ('a.png', '--out=stolen.png'):
    Image.fromarray(np.zeros((12, 10, 3), np.uint8)).save(tmp_path / name)
  result = run_script('predict.py', f'--workdir={trained_workdir}', '--out', 'masks', 'a.png',
                      '--out=stolen.png', cache=tmp_path / 'cache', cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  assert sorted(p.name for p in (tmp_path / 'masks').iterdir()) == [
      '--out=stolen_mask.png', '--out=stolen_overlay.png', 'a_mask.png', 'a_overlay.png']
  assert not (tmp_path / 'stolen.png').is_dir()
  # A flag typed after the images (no such file) is told where flags go.
  result = run_script('predict.py', f'--workdir={trained_workdir}', '--out', 'masks', 'a.png',
                      '--overwrite', cache=tmp_path / 'cache', cwd=tmp_path)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [
      'error: --overwrite comes after the images; flags go before them, e.g. python predict.py '
      '--workdir runs/pets --out masks/ photos/*.jpg']
  # --out after the photos is misplaced, not missing.
  result = run_script('predict.py', f'--workdir={trained_workdir}', 'a.png', '--out', 'masks',
                      cache=tmp_path / 'cache', cwd=tmp_path)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [
      'error: --out comes after the images; flags go before them, e.g. python predict.py '
      '--workdir runs/pets --out masks/ photos/*.jpg']


def test_every_tool_without_a_workdir_says_so_in_one_line(tmp_path):
  config = ROOT / 'configs' / 'quickstart.py'
  tools = {'train.py': ['--config', config], 'evaluate.py': [],
           'predict.py': ['--out', tmp_path / 'masks'], 'export.py': ['--out', tmp_path / 'model']}
  for tool, args in tools.items():
    for workdir in ([], ['--workdir', '']):  # Missing, and empty (not the current directory).
      result = run_script(tool, *workdir, *args, *(['a.png'] if tool == 'predict.py' else []),
                          cache=tmp_path / 'cache', cwd=tmp_path)
      assert result.returncode == 1, (tool, workdir)
      assert result.stderr.strip().splitlines() == [
          "error: --workdir is required: the run's directory, e.g. --workdir runs/pets"], tool
  assert sorted(p.name for p in tmp_path.iterdir()) == []
  # export's --out likewise, before the workdir is read (after the compile cache is set up).
  for out in ([], ['--out', '']):
    result = run_script('export.py', '--workdir', tmp_path / 'run', *out,
                        cache=tmp_path / 'cache', cwd=tmp_path)
    assert result.returncode == 1, out
    assert result.stderr.strip().splitlines() == [
        'error: --out is required: the directory for the exported model, e.g. python export.py '
        '--workdir runs/pets --out model/'], out
  assert sorted(p.name for p in tmp_path.iterdir()) == ['cache']


def test_an_unknown_config_field_is_named_with_the_nearest_field(tmp_path):
  for override, hint in [('--config.batch_szie=3', 'batch_szie (did you mean batch_size?)'),
                         ('--config.zzz=3', 'zzz')]:
    result = run_script('train.py', '--config', ROOT / 'configs' / 'quickstart.py', '--workdir',
                        tmp_path / 'run', override, cache=tmp_path / 'cache')
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f'error: unknown config field {hint}; see unet_flax/config.py for the fields']
  assert not (tmp_path / 'run').exists()
