"""paths.py: the paths a user gives made absolute, and output directories made or refused; errors.py: UserError."""

import os

import pytest

from tests.conftest import read_only_dir
from unet_flax import errors
from unet_flax import paths


@pytest.fixture
def here(tmp_path, monkeypatch):
  """The current directory tmp_path/here, and HOME tmp_path/home."""
  for name in ('here', 'home'):
    (tmp_path / name).mkdir()
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  monkeypatch.chdir(tmp_path / 'here')
  return (tmp_path / 'here').resolve()


def test_absolute_takes_relative_paths_from_the_current_directory(here):
  assert str(paths.absolute('runs/a')) == str(here / 'runs' / 'a')
  assert str(paths.absolute('./runs/../b')) == str(here / 'b')
  assert str(paths.absolute('..')) == str(here.parent)
  assert str(paths.absolute(here / 'c')) == str(here / 'c')  # A Path, already absolute.


def test_absolute_expands_home(here):
  assert str(paths.absolute('~/masks')) == str(here.parent / 'home' / 'masks')
  assert str(paths.absolute('~')) == str(here.parent / 'home')


def test_absolute_paths_through_symlinks_reach_the_targets_files(here):
  (here.parent / 'target' / 'run').mkdir(parents=True)
  (here / 'link').symlink_to(here.parent / 'target')
  (here.parent / 'home' / 'data').symlink_to(here.parent / 'target')
  for given in ('link/run', '~/data/run'):
    path = paths.absolute(given)
    assert os.path.isabs(path) and os.path.samefile(path, here.parent / 'target' / 'run'), given


def test_absolute_resolves_symlinks_as_its_docstring_says(here):
  (here.parent / 'target').mkdir()
  (here / 'link').symlink_to(here.parent / 'target')
  assert str(paths.absolute('link/run')) == str(here.parent / 'target' / 'run')


def test_absolute_leaves_urls_as_they_are(here):
  del here
  for url in ('gs://bucket/runs/a', 'gs://bucket/runs/../b', 's3://bucket/x'):
    assert os.fspath(paths.absolute(url)) == url


def test_a_user_error_is_not_a_value_error():
  assert not issubclass(errors.UserError, ValueError)


def test_make_output_dir_creates_the_directory_and_returns_it_absolute(here):
  path = paths.make_output_dir('out/nested', '--out')
  assert str(path) == str(here / 'out' / 'nested') and (here / 'out' / 'nested').is_dir()
  (here / 'out' / 'nested' / 'kept').write_text('x')
  assert str(paths.make_output_dir(here / 'out' / 'nested', '--out')) == str(path)  # Exists.
  assert (here / 'out' / 'nested' / 'kept').read_text() == 'x'


def _refusal(path, flag='--out') -> str:
  with pytest.raises(errors.UserError) as raised:
    paths.make_output_dir(path, flag)
  assert '\n' not in str(raised.value)
  return str(raised.value)


def test_make_output_dir_refuses_a_file_a_path_through_a_file_and_a_read_only_dir(here):
  (here / 'file').write_text('')
  assert _refusal('file') == (f'--out {here / "file"} is a file, not a directory; choose another '
                              'path')
  assert _refusal('file/x', '--workdir') == (f'--workdir {here / "file" / "x"} cannot be created '
                                             '(Not a directory); choose a writable path')
  read_only = read_only_dir(here)
  assert _refusal(read_only) == f'--out {read_only} is not writable; choose a writable path'
