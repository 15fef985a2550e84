"""Tests of the `synthetic_pets` tfds builder, read through the numpy (array_record) path."""

import sys

import numpy as np
import pytest
from scipy import ndimage
import tensorflow_datasets as tfds

from unet_flax import synthetic

_TINY = {'train': 24, 'test': 12}
_FOUR_NEIGHBOURS = ndimage.generate_binary_structure(2, 1)
_EIGHT_NEIGHBOURS = ndimage.generate_binary_structure(2, 2)


@pytest.fixture(scope='module')
def tiny_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp('tfds')
  synthetic.builder('tiny', data_dir).download_and_prepare()
  return data_dir


@pytest.fixture(scope='module')
def tiny(tiny_dir):
  """{split: [example dict]}, every example of `synthetic_pets/tiny` decoded to numpy."""
  sources = tfds.data_source('synthetic_pets/tiny', data_dir=tiny_dir,
                             builder_kwargs={'file_format': 'array_record'}, download=False)
  return {split: [source[i] for i in range(len(source))] for split, source in sources.items()}


def test_registered_with_oxford_features(tmp_path):
  assert tfds.builder_cls('synthetic_pets') is synthetic.SyntheticPets
  mine = synthetic.SyntheticPets.BUILDER_CONFIGS
  assert mine[0].name == 'small' and {c.name for c in mine} >= {'small', 'tiny'}
  info = synthetic.SyntheticPets(config='tiny', data_dir=tmp_path).info
  features = info.features
  assert set(features.keys()) == {'image', 'label', 'species', 'file_name', 'segmentation_mask',
                                  'head_bbox'}
  assert features['label'].num_classes == 37 and features['species'].names == ['Cat', 'Dog']
  assert features['image'].encoding_format == 'jpeg'
  assert features['segmentation_mask'].shape == (None, None, 1)


def test_split_sizes_and_array_record(tiny_dir, tiny):
  assert {split: len(examples) for split, examples in tiny.items()} == _TINY
  b = synthetic.builder('tiny', tiny_dir)
  assert str(b.info.file_format.value) == 'array_record'
  assert len(b.as_data_source(split='test')) == _TINY['test']


def test_images_and_masks(tiny):
  examples = tiny['train'] + tiny['test']
  aspect_ratios = set()
  all_three = 0
  for ex in examples:
    image, mask = ex['image'], ex['segmentation_mask']
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert mask.dtype == np.uint8 and mask.shape == image.shape[:2] + (1,)
    values = set(np.unique(mask).tolist())
    assert values <= {1, 2, 3}
    all_three += values == {1, 2, 3}
    aspect_ratios.add(round(image.shape[0] / image.shape[1], 2))
    assert 0 <= ex['label'] < 37 and ex['species'] in (0, 1)
    ymin, xmin, ymax, xmax = ex['head_bbox']
    assert 0 <= ymin <= ymax <= 1 and 0 <= xmin <= xmax <= 1
  assert len(aspect_ratios) >= 2
  assert all_three >= 0.9 * len(examples)
  assert len({ex['file_name'] for ex in examples}) == len(examples)
  assert 'tensorflow' not in sys.modules


def test_border_separates_pet_from_background(tiny):
  for ex in tiny['train']:
    mask = ex['segmentation_mask'][..., 0]
    pet, background, border = mask == 1, mask == 2, mask == 3
    # No pet pixel has a background 4-neighbour: the border band lies between them.
    assert not np.any(pet & ndimage.binary_dilation(background, _FOUR_NEIGHBOURS))
    # The border follows pet/background outlines: nearly all of it lies in 8-connected pieces
    # that touch both classes. The rest are legitimate scraps: a background pocket narrower than
    # the band between pet and image edge, or a pet tip thinner than it.
    touches_pet = ndimage.binary_dilation(pet, _FOUR_NEIGHBOURS) & border
    touches_background = ndimage.binary_dilation(background, _FOUR_NEIGHBOURS) & border
    pieces, count = ndimage.label(border, _EIGHT_NEIGHBOURS)
    sizes = np.bincount(pieces.ravel(), minlength=count + 1)[1:]
    both = np.isin(np.arange(1, count + 1), pieces[touches_pet]) & np.isin(
        np.arange(1, count + 1), pieces[touches_background])
    assert both[np.argmax(sizes)] and sizes[both].sum() >= 0.9 * sizes.sum()
    # A 2..4 px band: most border pixels are within 2 px of a non-border one. Narrow gaps (between
    # legs, at ear tips) fill up entirely, as in the Oxford trimaps, hence the looser maximum.
    depth = ndimage.distance_transform_cdt(border, 'chessboard')[border]
    assert np.percentile(depth, 90) <= 2 and depth.max() <= 6


def test_deterministic(tmp_path, tiny_dir, tiny):
  def records(data_dir):
    return {f.name: f.read_bytes() for f in data_dir.glob('synthetic_pets/tiny/*/*array_record*')}

  synthetic.builder('tiny', tmp_path).download_and_prepare()
  assert records(tmp_path) and records(tmp_path) == records(tiny_dir)  # Bit-identical files.
  again = tfds.data_source('synthetic_pets/tiny', data_dir=tmp_path, download=False)
  for split, examples in tiny.items():
    for i, ex in enumerate(examples):
      other = again[split][i]
      assert other['file_name'] == ex['file_name']
      np.testing.assert_array_equal(other['image'], ex['image'])
      np.testing.assert_array_equal(other['segmentation_mask'], ex['segmentation_mask'])
  assert 'tensorflow' not in sys.modules
