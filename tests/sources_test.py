"""sources.py: tfds examples decoded into classes, a damaged prepared data set, a split it lacks."""

import io
import shutil

import numpy as np
from PIL import Image
import pytest

from unet_flax import errors
from unet_flax import input_pipeline
from unet_flax import sources


def _png(array):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format='PNG')
  return buffer.getvalue()


def _example(trimap, rng):
  """An oxford_iiit_pet-style example, encoded as tfds stores it: image JPEG, trimap PNG."""
  h, w = trimap.shape
  buffer = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buffer, format='JPEG')
  return {'image': buffer.getvalue(), 'segmentation_mask': _png(trimap),
          'file_name': b'x_1.jpg'}


def _nearest_reference(array, size):
  """PIL's nearest-neighbour resize, written out: output i samples floor((i + 0.5) * n / size)."""
  h, w = array.shape
  rows = np.floor((np.arange(size) + 0.5) * h / size).astype(int)
  cols = np.floor((np.arange(size) + 0.5) * w / size).astype(int)
  return array[rows][:, cols]


def test_mask_is_resized_nearest_and_shifted_to_classes():
  rng = np.random.default_rng(0)
  trimap = rng.integers(1, 4, (37, 23)).astype(np.uint8)  # Oxford: 1 pet, 2 background, 3 border.
  image, labels = sources.decode_example(_example(trimap, rng), 16, 3)
  assert image.shape == (16, 16, 3) and image.dtype == np.uint8
  assert labels.shape == (16, 16) and labels.dtype == np.uint8
  assert set(np.unique(labels)) <= {0, 1, 2}
  np.testing.assert_array_equal(labels, _nearest_reference(trimap, 16) - 1)


@pytest.mark.parametrize('inside, outside, dtype', [
    (2, 4, np.uint8),  # 4 is no class of 3.
    (1, 0, np.uint8),  # 0 shifts to -1.
    (258, 257, np.uint16),  # 16-bit values, not their low 8 bits (2 and 1).
])
def test_trimap_values_outside_the_classes_are_a_one_line_user_error(inside, outside, dtype):
  rng = np.random.default_rng(0)
  trimap = np.full((20, 20), inside, dtype)
  trimap[5:15, 5:15] = outside
  with pytest.raises(errors.UserError) as e:
    sources.decode_example(_example(trimap, rng), 16, 3)
  low, high = sorted([inside, outside])
  assert str(e.value).startswith(f'x_1.jpg (mask): trimap values [{low}, {high}] are outside '
                                 '1..3 (classes 0..2 after the shift)')
  assert '\n' not in str(e.value)


def test_a_damaged_prepared_data_set_is_one_line_saying_how_to_rebuild_it(tmp_path, tfds_dir):
  sources.open_source('synthetic_pets/tiny', tfds_dir, 3)  # Prepared, then copied.
  data_dir = tmp_path / 'tfds'
  shutil.copytree(tfds_dir, data_dir)
  [record] = sorted(data_dir.glob('synthetic_pets/tiny/*/*test.array_record*'))[:1]
  record.write_bytes(record.read_bytes()[:100])  # Cut short, as by a full disk or a bad copy.
  with pytest.raises(errors.UserError) as raised:
    input_pipeline.load_split(sources.open_source('synthetic_pets/tiny', str(data_dir), 3),
                              'test', image_size=16)
  message = str(raised.value)
  assert '\n' not in message
  assert f'of the prepared data set in {record.parent} cannot be read' in message
  assert message.endswith(f'delete {record.parent} and rerun, which prepares it again')


def test_a_split_the_data_set_lacks_is_one_line_naming_those_it_has(tiny_config):
  tiny_config.train_split = 'validation'
  with pytest.raises(errors.UserError, match=r"^split 'validation' is not a split of "
                                             r'synthetic_pets/tiny; use one of test, train'):
    sources.check_data(tiny_config, sources.source_of(tiny_config))


def test_an_unknown_split_or_configuration_is_one_line_that_keeps_the_data(tfds_dir):
  """Neither names the prepared data set as damaged (which told users to delete it)."""
  source = sources.open_source('synthetic_pets/tiny', tfds_dir, 3)
  for read in (source.reader, lambda split, size: source.encoded(split)):
    with pytest.raises(errors.UserError, match=r"^split 'validation' is not a split of "
                       r'synthetic_pets/tiny; use one of test, train'):
      read('validation', 16)
  with pytest.raises(errors.UserError, match=r'^config.dataset=synthetic_pets/smal names no '
                     r'configuration; use one of synthetic_pets/small, synthetic_pets/tiny'):
    sources.open_source('synthetic_pets/smal', tfds_dir, 3)


def test_an_empty_split_or_slice_is_one_line_that_keeps_the_data(tfds_dir):
  """Not named as a damaged data set (which told users to delete it): the slice is empty."""
  source = sources.open_source('synthetic_pets/tiny', tfds_dir, 3)
  for read in (source.reader, lambda split, size: source.encoded(split)):
    with pytest.raises(errors.UserError, match=r"^split 'test\[:0\]' of synthetic_pets/tiny holds "
                       r'no examples; choose another split or a slice that holds some$'):
      read('test[:0]', 16)


def test_preparing_a_data_set_in_a_fresh_directory_logs_none_of_tfds_layout_warnings(tmp_path,
                                                                                    caplog):
  """tfds warns 'Variant folder ... has no dataset_info.json' while a data set is being made:
  nothing a user can act on."""
  with caplog.at_level('WARNING'):
    source = sources.open_source('synthetic_pets/tiny', str(tmp_path), 3)
  assert source.num_examples('train') == 24
  assert [r.getMessage() for r in caplog.records if 'tensorflow_datasets' in r.pathname] == []
