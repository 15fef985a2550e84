"""Folder data sets laid out as people store them: each layout's labels, as the model sees them,
against the source masks; the refusals that name the flag; two layouts end to end."""

import json

import numpy as np
import pytest
from PIL import Image

from unet_flax import config as config_lib
from unet_flax import errors
from unet_flax import evaluation
from unet_flax import inference
from unet_flax import metrics
from unet_flax import sources as sources_lib
from unet_flax import train

H, W = 20, 24


def _scene(rng, num_classes: int) -> np.ndarray:
  """[H, W] classes 0..num_classes-1: a background and a disc of each other class."""
  yy, xx = np.mgrid[:H, :W]
  labels = np.zeros((H, W), np.uint8)
  for k in range(1, num_classes):
    cy, cx, r = rng.integers(5, H - 5), rng.integers(5, W - 5), rng.integers(3, 6)
    labels[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = k
  return labels


def _photo(rng, labels: np.ndarray) -> np.ndarray:
  return (rng.integers(0, 60, (*labels.shape, 3)) + labels[..., None] * 60).astype(np.uint8)


def _folder(root, masks: dict, image_suffix='.jpg', photos=None) -> str:
  """images/<stem><image_suffix> and masks/<file name> from {mask file name: (stem, PIL image)}."""
  (root / 'images').mkdir(parents=True)
  (root / 'masks').mkdir()
  rng = np.random.default_rng(0)
  for name, (stem, mask) in masks.items():
    photo = photos[stem] if photos else _photo(rng, np.zeros((mask.height, mask.width), np.uint8))
    Image.fromarray(photo).save(root / 'images' / (stem + image_suffix), quality=95)
    mask.save(root / 'masks' / name, quality=75)
  return f'folder:{root}'


def _config(dataset, num_classes, **fields):
  config = config_lib.defaults()
  config.dataset, config.num_classes = dataset, num_classes
  config.update(fields)
  return config_lib.validate(config)


def _labels(config, splits=('test', 'train')) -> list[np.ndarray]:
  """The labels the model is scored and trained on, at the stored size: each split's in its
  order (with _list_all's lists, the stems in the order given)."""
  source = sources_lib.source_of(config)
  labels = []
  for split in splits:
    originals = sources_lib.originals(source, split)
    labels += [originals[i][2] for i in range(len(originals))]
  return labels


def _sources(n, num_classes, seed=1):
  rng = np.random.default_rng(seed)
  return [_scene(rng, num_classes) for _ in range(n)]


def _list_all(root, stems):
  """test.txt: the first stem; train.txt: the others (the lists must not overlap)."""
  (root / 'train.txt').write_text('\n'.join(stems[1:]) + '\n')
  (root / 'test.txt').write_text(stems[0] + '\n')


def test_binary_0_255_masks_with_mask_mode_binary(tmp_path):
  sources = _sources(3, 2)
  dataset = _folder(tmp_path, {f'c{i}.png': (f'c{i}', Image.fromarray(s * 255))
                               for i, s in enumerate(sources)})
  _list_all(tmp_path, ['c0', 'c1', 'c2'])
  with pytest.raises(errors.UserError, match=r'c0.png: value 255 is not a class 0..1 .*'
                                             'for 0/255 masks set config.mask_mode=binary'):
    _labels(_config(dataset, 2))
  for got, want in zip(_labels(_config(dataset, 2, mask_mode='binary')), sources, strict=True):
    np.testing.assert_array_equal(got, want)


def test_jpeg_masks_with_noisy_edges_read_as_binary(tmp_path):
  sources = _sources(3, 2)
  dataset = _folder(tmp_path, {f'p{i}.jpg': (f'p{i}', Image.fromarray(s * 255))
                               for i, s in enumerate(sources)})
  _list_all(tmp_path, ['p0', 'p1', 'p2'])
  noisy = np.asarray(Image.open(tmp_path / 'masks' / 'p0.jpg').convert('L'))
  assert len(np.unique(noisy)) > 2  # Compression noise along the edges.
  for got, want in zip(_labels(_config(dataset, 2, mask_mode='binary')), sources, strict=True):
    assert np.mean(got == want) > 0.98  # Thresholding keeps all but rare ringing pixels.


def test_carvana_names_and_any_case_extensions(tmp_path):
  sources = _sources(2, 2)
  masks = {}
  for i, s in enumerate(sources):
    mask = Image.fromarray(s, 'P')
    mask.putpalette([0, 0, 0, 255, 255, 255])
    masks[f'car{i}_mask.GIF'] = (f'car{i}', mask)
  dataset = _folder(tmp_path, masks, image_suffix='.JPG')
  _list_all(tmp_path, ['car0', 'car1'])
  with pytest.raises(errors.UserError, match=r"car0.JPG has no mask named car0 .*config.mask_pattern"):
    _labels(_config(dataset, 2))
  for got, want in zip(_labels(_config(dataset, 2, mask_pattern='{stem}_mask')), sources, strict=True):
    np.testing.assert_array_equal(got, want)


def _voc(root, n=4):
  sources = []
  for s in _sources(n, 3):
    s = s.copy()
    s[:, 0] = 255  # Void.
    sources.append(s)
  masks = {}
  for i, s in enumerate(sources):
    mask = Image.fromarray(s, 'P')
    mask.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0, 0, 0] * 252 + [224, 224, 192])
    masks[f'2007_{i}.png'] = (f'2007_{i}', mask)
  photos = {f'2007_{i}': _photo(np.random.default_rng(i), s % 3) for i, s in enumerate(sources)}
  return _folder(root, masks, photos=photos), sources


def test_void_label_is_kept_as_the_ignore_label(tmp_path):
  dataset, sources = _voc(tmp_path)
  _list_all(tmp_path, [f'2007_{i}' for i in range(4)])
  with pytest.raises(errors.UserError, match=r"value 255 is not a class 0..2.*"
                                             r"config.ignore_label=255"):
    _labels(_config(dataset, 3))
  for got, want in zip(_labels(_config(dataset, 3, ignore_label=255)), sources, strict=True):
    np.testing.assert_array_equal(got, want)


def _camvid(root, n=4):
  colours = [[0, 0, 0], [128, 128, 128], [128, 64, 128], [64, 0, 128], [192, 192, 0]]
  names = ['void', 'sky', 'road', 'car', 'sign']
  sources = _sources(n, 5)
  photos = {f'f{i}': _photo(np.random.default_rng(i), s) for i, s in enumerate(sources)}
  masks = {f'f{i}.png': (f'f{i}', Image.fromarray(np.array(colours, np.uint8)[s]))
           for i, s in enumerate(sources)}
  dataset = _folder(root, masks, photos=photos)
  (root / 'classes.json').write_text(json.dumps({'names': names, 'colours': colours}))
  return dataset, sources, names


def test_colour_masks_through_classes_json(tmp_path):
  dataset, sources, names = _camvid(tmp_path)
  _list_all(tmp_path, [f'f{i}' for i in range(4)])
  with pytest.raises(errors.UserError, match=r'a colour RGB picture, not a mask.*mask_mode=colour'):
    _labels(_config(dataset, 5))
  config = _config(dataset, 5, mask_mode='colour')
  assert sources_lib.class_names(config, sources_lib.source_of(config)) == tuple(names)
  for got, want in zip(_labels(config), sources, strict=True):
    np.testing.assert_array_equal(got, want)
  with pytest.raises(errors.UserError, match=r'classes.json names 5 classes but '
                                             r'config.num_classes=4; set config.num_classes=5'):
    config = _config(dataset, 4, mask_mode='colour')
    sources_lib.class_names(config, sources_lib.source_of(config))


def test_a_value_map_and_the_values_it_does_not_cover(tmp_path):
  sources = _sources(2, 3)
  dataset = _folder(tmp_path, {f'm{i}.png': (f'm{i}', Image.fromarray(
      np.array([0, 128, 255], np.uint8)[s])) for i, s in enumerate(sources)})
  _list_all(tmp_path, ['m0', 'm1'])
  for got, want in zip(_labels(_config(dataset, 3, mask_values='0:0,128:1,255:2')), sources, strict=True):
    np.testing.assert_array_equal(got, want)
  with pytest.raises(errors.UserError, match=r"m0.png: value 255 is not in "
                                             r"config.mask_values='0:0,128:1'; add it"):
    _labels(_config(dataset, 3, mask_values='0:0,128:1'))


def test_exif_rotated_phone_photos_train_upright(tmp_path):
  (tmp_path / 'images').mkdir()
  (tmp_path / 'masks').mkdir()
  upright = np.zeros((W, H), np.uint8)  # Portrait as shown: W rows, H columns.
  upright[: W // 2] = 1
  stored = np.rot90(np.stack([upright * 200] * 3, -1), k=1)  # Landscape as stored.
  photo = Image.fromarray(np.ascontiguousarray(stored))
  exif = photo.getexif()
  exif[0x0112] = 6  # Shown turned 90 degrees clockwise.
  photo.save(tmp_path / 'images' / 'phone.jpg', exif=exif, quality=95)
  Image.fromarray(upright).save(tmp_path / 'masks' / 'phone.png')
  (tmp_path / 'train.txt').write_text('phone\n')  # Only the train split is read.
  originals = sources_lib.originals(
      sources_lib.open_source(f'folder:{tmp_path}', None, 2), 'train')
  _, image, labels = originals[0]
  assert image.shape == (W, H, 3) and labels.shape == (W, H)
  bright = image.mean(-1) > 100
  assert np.mean(bright == labels.astype(bool)) > 0.95  # The photo's bright half is class 1.


def test_16_bit_images_of_12_bit_data(tmp_path, capsys):
  (tmp_path / 'images').mkdir()
  (tmp_path / 'masks').mkdir()
  labels = _sources(1, 2)[0]
  pixels = 800 + labels.astype(np.uint16) * 30  # 12-bit microscopy: ~800 and ~830.
  Image.fromarray(pixels).save(tmp_path / 'images' / 'cell.png')
  Image.fromarray(labels).save(tmp_path / 'masks' / 'cell.png')
  (tmp_path / 'train.txt').write_text('cell\n')  # Only the train split is read.
  dataset = f'folder:{tmp_path}'
  image = sources_lib.originals(sources_lib.open_source(dataset, None, 2), 'train')[0][1]
  assert len(np.unique(image)) <= 2
  warning = capsys.readouterr().err
  assert 'cell.png: its values 800..830 become' in warning
  assert 'set config.image_max_value to the real maximum (e.g. 830)' in warning
  config = _config(dataset, 2, image_max_value=4095.0)
  image = sources_lib.originals(sources_lib.source_of(config), 'train')[0][1]
  np.testing.assert_array_equal(image[..., 0], np.round(pixels * (255 / 4095)).astype(np.uint8))


def test_empty_eval_split_is_refused_before_anything_is_written(tmp_path, tiny_config):
  sources = _sources(3, 3)
  dataset = _folder(tmp_path / 'data', {f'x{i}.png': (f'x{i}', Image.fromarray(s))
                                        for i, s in enumerate(sources)})
  (tmp_path / 'data' / 'train.txt').write_text('x0\nx1\nx2\n')
  tiny_config.dataset, tiny_config.data_dir = dataset, None
  with pytest.raises(errors.UserError, match=r"config.eval_split='test' of .* holds no examples"):
    train.train_and_evaluate(tiny_config, tmp_path / 'run')
  assert not (tmp_path / 'run').exists()


def test_ignore_label_counts_in_no_loss_and_no_confusion_matrix():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 4, 5, 3)).astype(np.float32)
  labels = rng.integers(0, 3, (2, 4, 5))
  labels[0, 0] = 255
  valid = labels != 255
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  picked = np.take_along_axis(log_probs, np.where(valid, labels, 0)[..., None], -1)[..., 0]
  want = -picked[valid].mean()
  mask = np.ones(2, bool)
  np.testing.assert_allclose(metrics.cross_entropy(logits, labels, mask, ignore_label=255), want,
                             rtol=1e-5)
  np.testing.assert_allclose(metrics.segmentation_loss(
      logits, labels, mask, class_weights=(1.0, 1.0, 1.0), ignore_label=255), want, rtol=1e-5)
  predictions = logits.argmax(-1)
  expected = np.zeros((3, 3), np.int64)
  np.add.at(expected, (labels[valid], predictions[valid]), 1)
  np.testing.assert_array_equal(
      metrics.confusion_matrix(labels, predictions, 3, mask, ignore_label=255), expected)
  np.testing.assert_array_equal(
      metrics.host_confusion_matrices(labels, predictions, 3, ignore_label=255).sum(0), expected)


def test_voc_and_camvid_layouts_train_evaluate_and_predict(tmp_path, tiny_config):
  dataset, sources = _voc(tmp_path / 'voc', n=10)
  tiny_config.update({'dataset': dataset, 'data_dir': None, 'ignore_label': 255,
                      'steps_per_epoch': 2, 'num_epochs': 1})
  train.train_and_evaluate(tiny_config, tmp_path / 'voc_run')
  report = evaluation.evaluate_workdir(tmp_path / 'voc_run', original_resolution=True, worst_k=1,
                               log=lambda _: None)
  test_masks = [sources[int(s.split('_')[1])]
                for s in sources_lib.open_source(dataset, None, 3).stems('test')]
  valid = sum(int((m != 255).sum()) for m in test_masks)
  assert valid < sum(m.size for m in test_masks)
  assert np.sum(report['confusion_matrix']) == valid  # Void pixels count nothing.

  dataset, _, names = _camvid(tmp_path / 'camvid', n=10)
  tiny_config.update({'dataset': dataset, 'num_classes': 5, 'ignore_label': None,
                      'mask_mode': 'colour'})
  train.train_and_evaluate(tiny_config, tmp_path / 'camvid_run')
  lines = [json.loads(l) for l in (tmp_path / 'camvid_run' / 'metrics.jsonl').read_text()
           .splitlines()]
  evals = [l for l in lines if l['split'] == 'eval']
  assert {f'iou_{n}' for n in names} <= set(evals[-1])
  model = inference.load_model(tmp_path / 'camvid_run')
  assert config_lib.class_names(model.config) == tuple(names)
  photo = tmp_path / 'camvid' / 'images' / 'f0.jpg'
  assert inference.predict_files(model, [str(photo)], tmp_path / 'masks') == []
  with Image.open(tmp_path / 'masks' / 'f0_mask.png') as mask:
    assert mask.size == (W, H) and max(np.asarray(mask).ravel()) < 5
