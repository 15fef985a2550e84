"""`folder:` data sets: decoding, splits, each bad input's one-line error, training end to end."""

import json

import numpy as np
from PIL import Image
import pytest

from tests.conftest import FOLDER_CLASSES
from tests.conftest import FOLDER_EXAMPLES
from tests.conftest import FOLDER_SUFFIX
from tests.conftest import write_folder_data
from unet_flax import errors
from unet_flax import folder
from unet_flax import input_pipeline
from unet_flax import sources
from unet_flax import train


@pytest.fixture
def data(tmp_path):
  return write_folder_data(tmp_path / 'data')


def _read(root, split='train', size=16):
  source = sources.open_source(f'folder:{root}', None, FOLDER_CLASSES)
  return input_pipeline.load_split(source, split, image_size=size)


def test_examples_decode_like_pil_bilinear_and_nearest_without_a_shift(data):
  split = _read(data, 'train')
  stems = folder.Folder(str(data)).stems('train')
  assert len(split) == split.num_examples == len(stems) == 8
  images, labels = split.stack()
  for row, stem in enumerate(stems):
    h, w, fmt = FOLDER_EXAMPLES[stem]
    image = Image.open(data / 'images' / (stem + FOLDER_SUFFIX[fmt])).convert('RGB')
    np.testing.assert_array_equal(images[row],
                                  np.asarray(image.resize((16, 16), Image.BILINEAR)))
    mask = Image.fromarray(np.asarray(Image.open(data / 'masks' / (stem + '.png'))))
    np.testing.assert_array_equal(labels[row],
                                  np.asarray(mask.resize((16, 16), Image.NEAREST)))
  assert set(np.unique(labels)) == {0, 1, 2}  # Values as they are: no trimap shift.


def test_without_lists_the_split_is_a_fixed_80_20(data):
  data_set = folder.Folder(str(data))
  train_stems, test_stems = data_set.stems('train'), data_set.stems('test')
  assert len(train_stems) == 8 and len(test_stems) == 2
  assert sorted(train_stems + test_stems) == sorted(FOLDER_EXAMPLES)
  assert folder.Folder(str(data)).stems('test') == test_stems  # The same every time.


def test_lists_choose_the_splits_and_one_list_leaves_the_rest(data):
  (data / 'test.txt').write_text('dog_02\nowl_03.jpg\n\n')  # A file name is taken as its stem.
  data_set = folder.Folder(str(data))
  assert data_set.stems('test') == ['dog_02', 'owl_03']
  assert sorted(data_set.stems('train')) == sorted(set(FOLDER_EXAMPLES) - {'dog_02', 'owl_03'})
  (data / 'train.txt').write_text('cat_01\nfox_02\n')
  assert data_set.stems('train') == ['cat_01', 'fox_02']
  assert sources.open_source(f'folder:{data}', None, 3).num_examples('train') == 2


def _one_line_error(root, match, split='train'):
  with pytest.raises(errors.UserError, match=match) as e:
    _read(root, split)
  assert '\n' not in str(e.value)
  return str(e.value)


def test_a_missing_mask_names_the_image(data):
  (data / 'masks' / 'dog_01.png').unlink()
  _one_line_error(data, r'dog_01\.jpg has no mask named dog_01 \(any image format\) in .*masks')


def test_an_image_and_mask_of_different_sizes_name_both(data):
  Image.fromarray(np.zeros((5, 7), np.uint8)).save(data / 'masks' / 'cat_02.png')
  split = 'test' if 'cat_02' in folder.Folder(str(data)).stems('test') else 'train'
  _one_line_error(data, r'cat_02\.png is 7x5 but its image .*cat_02\.png is 18x18', split)


def test_a_label_not_below_num_classes_names_the_mask(data):
  for stem in FOLDER_EXAMPLES:
    Image.fromarray(np.full(FOLDER_EXAMPLES[stem][:2], 3, np.uint8)).save(
        data / 'masks' / (stem + '.png'))
  _one_line_error(data, r'masks/\w+\.png: value 3 is not a class 0\.\.2')


def test_unreadable_files_are_named(data):
  (data / 'images' / 'fox_01.png').write_bytes(b'not a picture')
  (data / 'masks' / 'fox_02.png').write_bytes(b'')
  message = _one_line_error(data, r'(fox_01\.png|fox_02\.png): cannot decode')
  assert 'remove or replace the file' in message


def test_a_colour_mask_and_a_bad_list_line_are_user_errors(data):
  for stem in FOLDER_EXAMPLES:
    Image.new('RGB', FOLDER_EXAMPLES[stem][1::-1], (200, 0, 0)).save(
        data / 'masks' / (stem + '.png'))
  _one_line_error(data, r'\.png: a colour RGB picture, not a mask')
  (data / 'train.txt').write_text('cat_01\nzebra_9\n')
  _one_line_error(data, r'train\.txt line 2: no image .zebra_9.')


def test_a_stem_listed_twice_in_one_list_is_one_line_naming_its_lines(data):
  (data / 'train.txt').write_text('cat_01\nfox_02\ncat_01.jpg\ncat_01\n')  # File name = stem.
  _one_line_error(data, r"train\.txt: 'cat_01' is listed on lines 1, 3 and 4; list each image "
                  r'once$')


def test_lists_that_share_stems_are_refused_before_anything_is_written(data, tiny_config,
                                                                       tmp_path):
  """A test set that overlaps the training set would score images the model trained on."""
  (data / 'train.txt').write_text('cat_01\ncat_02\ndog_01\ndog_02\nfox_01\nowl_01\n')
  (data / 'test.txt').write_text('owl_03\ndog_02\ncat_01\nfox_01\nowl_01\n')
  message = _one_line_error(
      data, r"train\.txt and .*test\.txt both list 4 images \('cat_01', 'dog_02', 'fox_01', \.\.\.\)"
      r'; the test set must not overlap the training set: keep each image in one list$')
  assert f'{data}/train.txt and {data}/test.txt' in message
  tiny_config.dataset, tiny_config.data_dir = f'folder:{data}', None
  with pytest.raises(errors.UserError, match=r'both list 4 images'):
    train.train_and_evaluate(tiny_config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_a_training_and_an_evaluation_split_that_overlap_are_refused_naming_both_fields(
    data, tiny_config):
  """Any two lists, not only train.txt and test.txt: here val.txt, and a split used twice."""
  (data / 'train.txt').write_text('cat_01\ncat_02\ndog_01\ndog_02\nfox_01\n')
  (data / 'val.txt').write_text('owl_03\ndog_02\n')
  tiny_config.dataset, tiny_config.data_dir = f'folder:{data}', None
  source = sources.source_of(tiny_config)
  assert sources.check_data(tiny_config, source) == 5  # train and test: disjoint.
  tiny_config.eval_split = 'val'
  with pytest.raises(errors.UserError) as raised:
    sources.check_data(tiny_config, source)
  assert str(raised.value) == (
      f"config.train_split='train' and config.eval_split='val' of folder:{data} share 1 image "
      "('dog_02'); the evaluation set must not overlap the training set: choose splits that "
      'share none (evaluate.py --split scores any split after training)')
  tiny_config.eval_split = 'train'
  with pytest.raises(errors.UserError, match=r"share 5 images \('cat_01', 'cat_02', 'dog_01', "
                     r'\.\.\.\)'):
    sources.check_data(tiny_config, source)


def test_grey_masks_saved_as_rgb_or_with_alpha_are_read(data):
  stems = folder.Folder(str(data)).stems('train')
  want = _read(data).stack()[1]
  for stem in stems:
    path = data / 'masks' / (stem + '.png')
    grey = np.asarray(Image.open(path))
    mode = 'RGB' if stem == stems[0] else 'LA'
    Image.fromarray(grey).convert(mode).save(path)
  np.testing.assert_array_equal(_read(data).stack()[1], want)


def test_missing_directories_are_user_errors(tmp_path):
  with pytest.raises(errors.UserError, match='images is not a directory'):
    sources.open_source(f'folder:{tmp_path}', None, 3)


def test_trains_end_to_end_on_a_folder(tmp_path, tiny_config):
  data = write_folder_data(tmp_path / 'data')
  tiny_config.dataset = f'folder:{data}'
  tiny_config.data_dir = None
  tiny_config.batch_size = 4
  tiny_config.num_epochs = 1
  workdir = tmp_path / 'run'
  state = train.train_and_evaluate(tiny_config, str(workdir))
  assert int(state.step) == 2  # 8 train examples // batch 4.
  lines = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  (last_eval,) = [l for l in lines if l['split'] == 'eval']
  assert np.sum(last_eval['confusion_matrix']) == 2 * 16 * 16  # Both test images, once.


def test_a_bad_mask_is_told_before_a_batch_too_large_for_the_data(tmp_path, tiny_config):
  """A few photos with a wrong mask and the default batch size: the mask's error comes first
  (a smaller batch would not mend it), then, the mask mended, the batch size's."""
  data = write_folder_data(tmp_path / 'data')
  stem = next(iter(FOLDER_EXAMPLES))
  mask = data / 'masks' / (stem + '.png')
  good = mask.read_bytes()
  Image.fromarray(np.full(FOLDER_EXAMPLES[stem][:2], 3, np.uint8)).save(mask)
  tiny_config.update({'dataset': f'folder:{data}', 'data_dir': None, 'batch_size': 16})
  with pytest.raises(errors.UserError, match=rf'{stem}\.png: value 3 is not a class'):
    train.train_and_evaluate(tiny_config, str(tmp_path / 'run'))
  mask.write_bytes(good)
  with pytest.raises(errors.UserError, match='fewer than config.batch_size=16'):
    train.train_and_evaluate(tiny_config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


# Hostile and careless files: each is one line naming the file, never a traceback.

def _truncated_png(data):
  """A PNG image of the folder cut inside its pixel data: the header still parses."""
  stem = next(s for s, (_, _, fmt) in FOLDER_EXAMPLES.items() if fmt == 'PNG')
  path = data / 'images' / (stem + '.png')
  path.write_bytes(path.read_bytes()[:80])
  return path


def _every_split_error(root, match):
  """The one-line error of reading both splits, one of which holds the bad file."""
  messages = []
  for split in ('train', 'test'):
    try:
      _read(root, split)
    except errors.UserError as e:
      messages.append(str(e))
  assert messages, 'no split was refused'
  assert all('\n' not in m for m in messages)
  assert any(__import__('re').search(match, m) for m in messages), messages
  return messages


def test_a_truncated_png_image_is_one_line_naming_it(data):
  path = _truncated_png(data)
  _every_split_error(data, rf'{path.name}: cannot decode')


def _bad_file(data, make):
  """Replaces the mask of cat_01 with what make(path) creates there."""
  path = data / 'masks' / 'cat_01.png'
  path.unlink()
  make(path)
  return path


@pytest.mark.parametrize('kind,match', [
    ('directory', r'cat_01\.png: not a regular file \(a directory\); only regular files are '
                  r'read as images'),
    ('symlink loop', r'cat_01\.png: cannot read \(Too many levels of symbolic links\)'),
    ('dev zero', r'cat_01\.png: not a regular file \(a device\)'),
    ('fifo', r'cat_01\.png: not a regular file \(a FIFO\)'),
])
def test_only_regular_files_are_data_and_reads_never_block(data, kind, match):
  import os  # pylint: disable=g-import-not-at-top
  make = {'directory': lambda p: p.mkdir(),
          'symlink loop': lambda p: p.symlink_to(p),
          'dev zero': lambda p: p.symlink_to('/dev/zero'),
          'fifo': lambda p: os.mkfifo(p)}[kind]
  path = _bad_file(data, make)
  # A FIFO without a writer blocks open() and read() forever: a thread that is not done in 20 s
  # marks a hang (then a writer frees it).
  import threading  # pylint: disable=g-import-not-at-top
  outcome = []
  reader = threading.Thread(target=lambda: outcome.append(_every_split_error(data, match)),
                            daemon=True)
  reader.start()
  reader.join(20)
  if reader.is_alive() and kind == 'fifo':
    with open(path, 'wb'):
      pass
  assert outcome, 'hung or failed'


def test_a_directory_named_like_an_image_is_told_before_its_missing_mask(data):
  (data / 'images' / 'dir.png').mkdir()
  with pytest.raises(errors.UserError, match=r'^.*images/dir\.png: not a regular file \(a '
                     r'directory\); only regular files are read as images'):
    sources.open_source(f'folder:{data}', None, FOLDER_CLASSES)


def test_macos_resource_forks_are_not_images(data):
  (data / 'images' / '._cat_01.jpg').write_bytes(b'\x00\x05\x16\x07 AppleDouble')
  (data / 'masks' / '._cat_01.png').write_bytes(b'\x00\x05\x16\x07 AppleDouble')
  assert '._cat_01' not in folder.Folder(str(data)).images
  assert len(_read(data)) == 8


def test_mask_pattern_is_plain_substitution_never_format(data):
  for stem in FOLDER_EXAMPLES:
    (data / 'masks' / (stem + '.png')).rename(data / 'masks' / (stem + '_{0}.png'))
  # str.format would read '{0}' as a positional field, and '{stem.__class__}' reaches attributes.
  assert len(folder.Folder(str(data), '{stem}_{0}').masks) == len(FOLDER_EXAMPLES)
  with pytest.raises(errors.UserError, match=r"no mask named cat_01\{stem\.__class__\}"):
    folder.Folder(str(data), '{stem}{stem.__class__}')


@pytest.mark.parametrize('encoding', ['utf-8-sig', 'utf-16'])
def test_lists_and_classes_json_from_windows_editors_are_read(data, encoding):
  (data / 'test.txt').write_text('dog_02\r\nowl_03\r\n', encoding=encoding)
  (data / 'classes.json').write_text(json.dumps({'names': ['bg', 'cat', 'dog']}),
                                     encoding=encoding)
  data_set = folder.Folder(str(data))
  assert data_set.stems('test') == ['dog_02', 'owl_03']
  assert data_set.classes['names'] == ('bg', 'cat', 'dog')


def test_a_list_in_an_unknown_encoding_is_one_line(data):
  (data / 'test.txt').write_bytes(b'dog_02\n\xff\xfe\xfa\x00owl')
  with pytest.raises(errors.UserError, match=r'test\.txt is not UTF-8 or UTF-16 text; save it as '
                                             r'UTF-8'):
    folder.Folder(str(data)).stems('test')


def test_alpha_channel_masks_name_the_file_and_the_fix(data):
  for stem in FOLDER_EXAMPLES:
    path = data / 'masks' / (stem + '.png')
    classes = np.asarray(Image.open(path))
    rgba = np.zeros(classes.shape + (4,), np.uint8)
    rgba[..., 3] = classes * 100  # Black everywhere; the classes only in the alpha channel.
    Image.fromarray(rgba).save(path)
  _every_split_error(data, r'\.png: its classes are in the alpha channel \(its colours are one '
                           r'colour\); save the alpha channel as a one-channel \(L\) PNG')


def test_jpeg_masks_with_compression_noise_are_told_to_use_binary(tmp_path):
  data = write_folder_data(tmp_path / 'data')
  for stem in FOLDER_EXAMPLES:
    path = data / 'masks' / (stem + '.png')
    classes = np.asarray(Image.open(path))
    blob = (classes > 0).astype(np.uint8) * 255
    noisy = np.clip(blob.astype(int) + np.random.default_rng(0).integers(-9, 9, blob.shape), 0,
                    255).astype(np.uint8)
    Image.fromarray(noisy).save(path)
  messages = _every_split_error(data, r'set config\.mask_mode=binary')
  assert not any('raise config.num_classes' in m for m in messages)


def test_damaged_pngs_and_jpegs_are_each_one_line_naming_the_file(tmp_path):
  from bench import fuzz_folder  # pylint: disable=g-import-not-at-top
  escapes, kinds = fuzz_folder.fuzz(tmp_path / 'data', 400)
  assert escapes == 0, kinds


def test_a_class_name_with_a_terminal_escape_code_is_refused_where_it_is_read(data):
  """classes.json's names become the run's config.class_names; one that would clear a terminal
  is refused in one line, printed escaped, before anything is trained."""
  (data / 'classes.json').write_text(json.dumps({'names': ['bg', '\x1b[2Jcat', 'dog']}))
  with pytest.raises(errors.UserError) as raised:
    sources.open_source(f'folder:{data}', None, 3)
  assert str(raised.value) == (f"{data / 'classes.json'}: class name '\\x1b[2Jcat' is not a name "
                               'of at most 100 printable characters; fix it')


def test_0_255_masks_with_more_classes_configured_are_told_both_readings(tmp_path):
  root = write_folder_data(tmp_path / 'data', {'a': (16, 16, 'PNG'), 'b': (16, 16, 'PNG')})
  for mask in (root / 'masks').iterdir():
    Image.fromarray(np.where(np.asarray(Image.open(mask)) > 0, 255, 0).astype(np.uint8)).save(mask)
  with pytest.raises(errors.UserError, match=r"value 255 is not a class 0..3 .*for 0/255 masks set "
                     r"config.mask_mode=binary and config.num_classes=2; if 255 means 'don't "
                     r"care' set config.ignore_label=255$"):
    sources.open_source(f'folder:{root}', None, 4).reader('train', 16)[1](0)


def test_a_classes_json_of_one_class_or_over_256_is_told_what_fits(data):
  """Not 'set config.num_classes=1' (or 257), which the config refuses in turn."""
  (data / 'classes.json').write_text(json.dumps({'names': ['cell']}))
  with pytest.raises(errors.UserError) as raised:
    sources.open_source(f'folder:{data}', None, 2)
  assert str(raised.value) == (
      f"{data / 'classes.json'} names 1 class; segmentation needs at least 2, e.g. the background "
      'and the object: name one class per mask value, as {"names": ["background", "cell"]}')
  (data / 'classes.json').write_text(json.dumps({'names': [f'c{k}' for k in range(257)]}))
  with pytest.raises(errors.UserError, match=r'classes\.json names 257 classes; at most 256 are '
                     r'possible: merge some$'):
    sources.open_source(f'folder:{data}', None, 2)
