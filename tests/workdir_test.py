"""workdir.py: a workdir is checked, and owned by one training run at a time through its .lock."""

import json
import os
import shutil
import socket
import subprocess

import pytest

from tests.conftest import read_only_dir
from tests.conftest import snapshot
from unet_flax import errors
from unet_flax import train
from unet_flax import workdir as workdir_lib

HOST = socket.gethostname()


def _dead_pid() -> int:
  """The process id of a process of this host that has exited (and been reaped)."""
  process = subprocess.Popen(['true'])
  process.wait()
  return process.pid


def _write_lock(workdir, **owner):
  (workdir / workdir_lib.LOCK_FILE).write_text(json.dumps(owner))


def test_the_lock_names_its_owner_and_is_removed_on_exit(tmp_path):
  path = tmp_path / workdir_lib.LOCK_FILE
  with workdir_lib.Lock(tmp_path) as lock:
    assert lock.path == path
    owner = json.loads(path.read_text())
    assert owner['host'] == HOST and owner['pid'] == os.getpid()
    assert set(owner) == {'host', 'pid', 'started'}
  assert not path.exists()
  with pytest.raises(RuntimeError):
    with workdir_lib.Lock(tmp_path):
      raise RuntimeError('the run failed')
  assert not path.exists()  # Also when the run stops on an error.


def test_a_second_lock_while_the_first_is_held_names_the_first_run(tmp_path):
  with workdir_lib.Lock(tmp_path):
    started = json.loads((tmp_path / workdir_lib.LOCK_FILE).read_text())['started']
    with pytest.raises(errors.UserError) as raised:
      with workdir_lib.Lock(tmp_path):
        pass
    assert str(raised.value) == (
        f'--workdir {tmp_path} is in use by another training run (pid {os.getpid()} on {HOST}, '
        f'started {started}); wait for it to end or use another --workdir (if that run is gone, '
        f'delete {tmp_path / workdir_lib.LOCK_FILE})')
    assert (tmp_path / workdir_lib.LOCK_FILE).exists()  # The refused one removes nothing.
  assert not (tmp_path / workdir_lib.LOCK_FILE).exists()


def test_a_lock_of_a_dead_process_of_this_host_is_taken_over_with_a_warning(tmp_path, capsys):
  pid = _dead_pid()
  _write_lock(tmp_path, host=HOST, pid=pid, started='2024-01-02T03:04:05')
  with workdir_lib.Lock(tmp_path):
    assert json.loads((tmp_path / workdir_lib.LOCK_FILE).read_text())['pid'] == os.getpid()
  assert capsys.readouterr().err == (
      f'warning: {tmp_path / workdir_lib.LOCK_FILE}: the run that held it (pid {pid}, started '
      '2024-01-02T03:04:05) is gone; taking over the workdir\n')
  assert not (tmp_path / workdir_lib.LOCK_FILE).exists()


def test_a_lock_of_another_host_or_a_live_process_is_refused(tmp_path):
  for host, pid in [('another-host', _dead_pid()), (HOST, os.getppid())]:
    _write_lock(tmp_path, host=host, pid=pid, started='2024-01-02T03:04:05')
    with pytest.raises(errors.UserError, match=rf'\(pid {pid} on {host}, started 2024-01-02'):
      with workdir_lib.Lock(tmp_path):
        pass
    assert json.loads((tmp_path / workdir_lib.LOCK_FILE).read_text())['pid'] == pid


@pytest.mark.parametrize('text', ['garbage', '{"host": "x"}', '[1, 2]', '{"host": "x", "pid": '
                                  '"one"}', ''])
def test_a_lock_file_this_program_did_not_write_is_refused(tmp_path, text):
  (tmp_path / workdir_lib.LOCK_FILE).write_text(text)
  with pytest.raises(errors.UserError) as raised:
    with workdir_lib.Lock(tmp_path):
      pass
  assert str(raised.value) == (f'{tmp_path / workdir_lib.LOCK_FILE} is not a lock this program '
                               f'wrote; delete it if no run uses {tmp_path}, then rerun')
  assert (tmp_path / workdir_lib.LOCK_FILE).read_text() == text


def test_training_in_a_workdir_in_use_stops_before_writing_anything(tmp_path, tiny_config):
  _write_lock(tmp_path, host=HOST, pid=os.getppid(), started='2024-01-02T03:04:05')
  with pytest.raises(errors.UserError, match='is in use by another training run'):
    train.train_and_evaluate(tiny_config, str(tmp_path))
  assert [p.name for p in tmp_path.iterdir()] == [workdir_lib.LOCK_FILE]


@pytest.mark.parametrize('kind', ['read-only directory', 'file in the path'])
def test_training_in_an_unwritable_workdir_is_a_one_line_error(tmp_path, tiny_config, kind):
  if kind == 'read-only directory':
    workdir, expected = read_only_dir(tmp_path), 'is not writable; choose a writable path'
  else:
    (tmp_path / 'file').write_text('')
    workdir, expected = tmp_path / 'file' / 'run', 'cannot be created (Not a directory)'
  with pytest.raises(errors.UserError) as raised:
    train.train_and_evaluate(tiny_config, str(workdir))
  assert str(raised.value) == f'--workdir {workdir} {expected}' + (
      '; choose a writable path' if kind == 'file in the path' else '')


def test_check_makes_the_workdir_absolute_creating_nothing_and_refuses_a_file(tmp_path,
                                                                              monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert workdir_lib.check('runs/a') == tmp_path.resolve() / 'runs' / 'a'
  assert not (tmp_path / 'runs').exists()  # Created when the lock is taken, after the checks.
  with workdir_lib.Lock(tmp_path / 'runs' / 'a'):
    assert (tmp_path / 'runs' / 'a' / '.lock').is_file()
  (tmp_path / 'file').write_text('')
  with pytest.raises(errors.UserError, match=r'^--workdir .*file is a file, not a directory'):
    workdir_lib.check('file')


# A workdir of someone else's: no write through its links, no user's files replaced.

@pytest.mark.parametrize('name', ['config.json', 'metrics.jsonl', 'checkpoints'])
def test_a_workdir_whose_files_are_symlinks_is_refused_before_writing(tmp_path, tiny_config,
                                                                       name):
  workdir, victim = tmp_path / 'run', tmp_path / 'victim'
  workdir.mkdir()
  victim.write_text('precious')
  (workdir / name).symlink_to(victim)
  with pytest.raises(errors.UserError) as raised:
    train.train_and_evaluate(tiny_config, str(workdir))
  assert str(raised.value) == (
      f'--workdir {workdir}: {name} is a symbolic link (to {victim}); a run writes its files '
      'only in its workdir, never through links: remove the link, or use another --workdir')
  assert victim.read_text() == 'precious'


def test_a_non_empty_directory_that_is_not_a_run_is_refused_unless_allowed(tmp_path):
  workdir = tmp_path / 'mine'
  workdir.mkdir()
  for name in ('config.json', 'metrics.jsonl', 'curves.png'):
    (workdir / name).write_text('my own')
  with pytest.raises(errors.UserError) as raised:
    workdir_lib.check(workdir, allow_nonempty=False)
  assert str(raised.value) == (
      f'--workdir {workdir} holds files (config.json, curves.png, metrics.jsonl) but is not a '
      'unet-flax run (no checkpoints/, no config.json of a run), and training would replace '
      'them; use a new or empty directory, or pass --allow_nonempty_workdir')
  assert workdir_lib.check(workdir, allow_nonempty=True) == workdir
  # A run's own workdir, and an empty one, are fine.
  (workdir / 'config.json').write_text(json.dumps({'widths': [4, 8], 'num_classes': 3,
                                                   'image_size': 16, 'dtype': 'float32'}))
  assert workdir_lib.check(workdir, allow_nonempty=False) == workdir
  (tmp_path / 'empty').mkdir()
  assert workdir_lib.check(tmp_path / 'empty', allow_nonempty=False) == tmp_path / 'empty'


def test_train_py_refuses_a_users_folder_before_anything_is_written(tmp_path):
  from tests.conftest import ROOT, run_script  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / 'mine'
  workdir.mkdir()
  (workdir / 'curves.png').write_text('my own')
  before = snapshot(workdir)
  result = run_script('train.py', '--config', ROOT / 'configs' / 'quickstart.py', '--workdir',
                      workdir, cache=tmp_path / 'cache')
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [
      f'error: --workdir {workdir} holds files (curves.png) but is not a unet-flax run (no '
      'checkpoints/, no config.json of a run), and training would replace them; use a new or '
      'empty directory, or pass --allow_nonempty_workdir']
  assert snapshot(workdir) == before


@pytest.mark.parametrize('name, target', [('predictions/step_2.png', 'file'),
                                          ('checkpoints/5', 'directory'),
                                          ('tensorboard/deeper/events', 'file')])
def test_a_link_anywhere_in_a_runs_directories_is_refused_before_writing(
    tmp_path, tiny_config, trained_workdir, name, target):
  workdir, victim = tmp_path / 'run', tmp_path / 'victim'
  shutil.copytree(trained_workdir, workdir)
  if target == 'file':
    victim.write_text('precious')
  else:  # Orbax would take it for a checkpoint, and remove it as an old one.
    victim.mkdir()
    (victim / 'precious').write_text('precious')
  (workdir / name).parent.mkdir(exist_ok=True)
  (workdir / name).symlink_to(victim)
  before = snapshot(workdir)
  tiny_config.num_epochs = 3  # Training would go on, writing predictions and checkpoints.
  with pytest.raises(errors.UserError) as raised:
    train.train_and_evaluate(tiny_config, str(workdir))
  assert str(raised.value) == (
      f'--workdir {workdir}: {name} is a symbolic link (to {victim}); a run writes its files '
      'only in its workdir, never through links: remove the link, or use another --workdir')
  assert snapshot(workdir) == before
  assert (victim.read_text() if target == 'file' else os.listdir(victim)) == (
      'precious' if target == 'file' else ['precious'])
