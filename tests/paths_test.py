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


def _refusal(path, flag='--out', check=paths.make_output_dir) -> str:
  """check(path, flag)'s UserError, asserted one line."""
  with pytest.raises(errors.UserError) as raised:
    check(path, flag)
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


def test_check_output_dir_creates_nothing_and_refuses_what_make_output_dir_would(here):
  assert str(paths.check_output_dir('new/nested', '--out')) == str(here / 'new' / 'nested')
  assert not (here / 'new').exists()
  (here / 'file').write_text('')
  assert _refusal('file', check=paths.check_output_dir) == _refusal('file')
  assert _refusal('file/x/y', '--workdir', check=paths.check_output_dir) == (
      f'--workdir {here / "file" / "x" / "y"} cannot be created (Not a directory); choose a '
      'writable path')
  read_only = read_only_dir(here)
  assert _refusal(read_only, check=paths.check_output_dir) == _refusal(read_only)
  assert _refusal(read_only / 'new' / 'nested', check=paths.check_output_dir) == (
      f'--out {read_only / "new" / "nested"} cannot be created (Permission denied: {read_only}); '
      'choose a writable path')
  assert not os.path.lexists(read_only / 'new')


# Writes never go through links the program did not make.

def test_write_atomically_refuses_a_planted_symlink_and_leaves_its_target(tmp_path):
  (tmp_path / 'victim').write_text('precious')
  (tmp_path / 'out').mkdir()
  (tmp_path / 'out' / 'step_6.json').symlink_to(tmp_path / 'victim')
  with pytest.raises(errors.UserError) as raised:
    paths.write_atomically(tmp_path / 'out' / 'step_6.json', lambda t: t.write_text('{}'))
  assert str(raised.value) == (
      f'{tmp_path / "out" / "step_6.json"} is a symbolic link (to {tmp_path / "victim"}); this '
      'program does not write through links it did not make: remove the link, or choose another '
      'place')
  assert (tmp_path / 'victim').read_text() == 'precious'


def test_write_atomically_never_writes_through_a_planted_temporary(tmp_path):
  (tmp_path / 'victim').write_text('precious')
  for name in ('.mask.png.partial', '.mask.png.tmp'):  # The names a fixed scheme would use.
    (tmp_path / name).symlink_to(tmp_path / 'victim')
  paths.write_atomically(tmp_path / 'mask.png', lambda t: t.write_text('new'))
  assert (tmp_path / 'mask.png').read_text() == 'new'
  assert (tmp_path / 'victim').read_text() == 'precious'


def test_two_writers_of_one_file_each_use_their_own_temporary(tmp_path):
  """Two predicts on one --out: a writer that starts while another is writing the same file."""
  path = tmp_path / 'a_mask.png'
  temporaries = []

  def outer(temporary):
    temporaries.append(temporary)
    temporary.write_text('outer')
    paths.write_atomically(path, inner)  # The other process, mid-write.

  def inner(temporary):
    temporaries.append(temporary)
    temporary.write_text('inner')

  paths.write_atomically(path, outer)
  assert path.read_text() == 'outer'  # The last rename wins; neither failed.
  assert temporaries[0] != temporaries[1]
  assert sorted(p.name for p in tmp_path.iterdir()) == ['a_mask.png']  # No temporary left.


def test_without_overwrite_a_file_another_process_wrote_meanwhile_is_kept(tmp_path):
  """Two predicts into one --out without --overwrite: the second to finish a file fails on it
  in one line instead of replacing the first's (the check and the creation are one step)."""
  path = tmp_path / 'photo_mask.png'

  def racing(temporary):  # The other process finishes its file while this one writes.
    path.write_text('theirs')
    temporary.write_text('mine')
  with pytest.raises(errors.UserError, match=r'photo_mask.png exists \(another process wrote it '
                     r'meanwhile\); pass --overwrite'):
    paths.write_atomically(path, racing, overwrite=False)
  assert path.read_text() == 'theirs'
  assert [p.name for p in tmp_path.iterdir()] == ['photo_mask.png']  # No temporary left.
  paths.write_atomically(tmp_path / 'new.png', lambda t: t.write_text('x'), overwrite=False)
  assert (tmp_path / 'new.png').read_text() == 'x'
