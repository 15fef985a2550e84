"""Prepares `oxford_iiit_pet` from a tiny fake archive tree and reads it back."""

import io
import os
import pathlib
import socket
import sys
import tarfile

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from unet_flax import pets

_LABELS = pets._tfds_pets._LABEL_CLASSES  # pylint: disable=protected-access

# name: (height, width, how the member is stored, has head xml).
_TRAIN = {
    'Abyssinian_1': (40, 56, 'jpeg', True),
    'Abyssinian_5': (32, 48, 'rgba_png', True),
    'Abyssinian_34': (36, 30, 'gif', False),
    'beagle_116': (48, 40, 'truncated_jpeg', False),
    'Bengal_10': (30, 44, 'jpeg', True),
    'yorkshire_terrier_20': (50, 34, 'jpeg', False),
}
_TEST = {
    'chihuahua_3': (42, 38, 'jpeg', False),
    'Persian_7': (28, 52, 'jpeg', False),
    'pug_9': (46, 46, 'jpeg', False),
    'Sphynx_2': (34, 40, 'jpeg', False),
}
_BBOX = (3, 5, 20, 25)  # xmin, ymin, xmax, ymax in pixels.


def _breed(name):
  return name.rsplit('_', 1)[0]


def _species(name):
  return 0 if name[0].isupper() else 1  # Cats are capitalised, dogs not.


def _smooth_rgb(rng, h, w):
  # Low-frequency content, so JPEG loss stays small.
  coarse = rng.integers(0, 256, (h // 16 + 2, w // 16 + 2, 3), dtype=np.uint8)
  return np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR))


def _encode(array, fmt, **kwargs):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format=fmt, **kwargs)
  return buffer.getvalue()


def _write_tree(root, rng, train, test):
  """Writes `images/` and `annotations/` as the two Oxford archives hold them."""
  images = root / 'images'
  trimaps = root / 'annotations' / 'trimaps'
  xmls = root / 'annotations' / 'xmls'
  for d in (images, trimaps, xmls):
    d.mkdir(parents=True)
  sources = {}
  for split_file, examples in (('trainval.txt', train), ('test.txt', test)):
    lines = []
    for name, (h, w, kind, has_xml) in examples.items():
      rgb = _smooth_rgb(rng, h, w)
      if kind == 'jpeg':
        data = _encode(rgb, 'JPEG', quality=95)
      elif kind == 'rgba_png':
        alpha = rng.integers(0, 256, (h, w, 1), dtype=np.uint8)
        data = _encode(np.concatenate([rgb, alpha], -1), 'PNG')
      elif kind == 'gif':
        palette = Image.fromarray(rgb).quantize(256, dither=Image.Dither.NONE)
        rgb = np.asarray(palette.convert('RGB'))
        buffer = io.BytesIO()
        palette.save(buffer, format='GIF')
        data = buffer.getvalue()
      elif kind == 'truncated_jpeg':
        data = _encode(rgb, 'JPEG', quality=95)
        data = data[:len(data) * 9 // 10]
      else:  # Undecodable.
        data = rng.bytes(1000)
      (images / f'{name}.jpg').write_bytes(data)
      trimap = rng.integers(1, 4, (h, w), dtype=np.uint8)
      Image.fromarray(trimap, mode='L').save(trimaps / f'{name}.png')
      if has_xml:
        xmin, ymin, xmax, ymax = _BBOX
        (xmls / f'{name}.xml').write_text(
            f'<annotation><filename>{name}.jpg</filename>'
            f'<size><width>{w}</width><height>{h}</height><depth>3</depth></size>'
            '<object><name>cat</name><pose>Frontal</pose><truncated>0</truncated>'
            f'<bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax>'
            f'<ymax>{ymax}</ymax></bndbox><difficult>0</difficult></object></annotation>')
      breed_id = 1 + sorted(n for n in _LABELS if _species(n) == _species(name)).index(_breed(name))
      lines.append(f'{name} {_LABELS.index(_breed(name)) + 1} {_species(name) + 1} {breed_id}')
      sources[name] = (rgb, trimap, kind, has_xml)
    (root / 'annotations' / split_file).write_text('\n'.join(lines) + '\n')
  return sources


def _no_network(*args, **kwargs):
  raise AssertionError(f'Network access attempted: {args}')


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  src = tmp_path_factory.mktemp('src')
  sources = _write_tree(src, np.random.default_rng(0), _TRAIN, _TEST)
  data_dir = tmp_path_factory.mktemp('data')
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(socket.socket, 'connect', _no_network)
    builder = pets.builder(data_dir, extracted_dirs={'images': src, 'annotations': src})
    builder.download_and_prepare()
  return data_dir, sources


def _read(data_dir, split):
  source = tfds.data_source('oxford_iiit_pet', split=split, data_dir=data_dir,
                            builder_kwargs={'file_format': 'array_record'}, download=False)
  return [source[i] for i in range(len(source))]


def test_standard_layout(prepared):
  data_dir, _ = prepared
  assert (data_dir / 'oxford_iiit_pet' / '4.0.0' / 'dataset_info.json').exists()
  # tfds makes the (empty) download dirs, but nothing is downloaded into them.
  assert not [p for p in data_dir.rglob('*') if p.is_file() and 'downloads' in p.parts]


@pytest.mark.parametrize('split, names', [('train', _TRAIN), ('test', _TEST)])
def test_contents(prepared, split, names):
  data_dir, sources = prepared
  examples = _read(data_dir, split)
  assert len(examples) == len(names)
  for ex in examples:
    file_name = ex['file_name']
    file_name = file_name.decode() if isinstance(file_name, bytes) else file_name
    name = file_name.removesuffix('.jpg')
    assert name in names
    rgb, trimap, kind, has_xml = sources[name]
    h, w = trimap.shape

    image = ex['image']
    assert image.shape == (h, w, 3) and image.dtype == np.uint8
    diff = np.abs(image.astype(np.float32) - rgb)
    if kind == 'truncated_jpeg':
      diff = diff[:h // 3]  # Only the start of the scan survived the truncation.
    assert diff.mean() < 4, (name, diff.mean())

    mask = ex['segmentation_mask']
    assert mask.shape == (h, w, 1) and mask.dtype == np.uint8
    np.testing.assert_array_equal(mask[..., 0], trimap)

    assert ex['label'] == _LABELS.index(_breed(name))
    assert ex['species'] == _species(name)
    if has_xml:
      xmin, ymin, xmax, ymax = _BBOX
      np.testing.assert_allclose(ex['head_bbox'], [ymin / h, xmin / w, ymax / h, xmax / w],
                                 rtol=1e-6)
    else:
      np.testing.assert_array_equal(ex['head_bbox'], np.zeros(4))
  assert 'tensorflow' not in sys.modules


def test_undecodable_image_names_file(tmp_path):
  src = tmp_path / 'src'
  _write_tree(src, np.random.default_rng(1),
              {'Abyssinian_1': (20, 20, 'jpeg', False), 'Bombay_3': (20, 20, 'garbage', False)}, {})
  builder = pets.builder(tmp_path / 'data', extracted_dirs={'images': src, 'annotations': src})
  with pytest.raises(Exception, match=r'Bombay_3\.jpg'):
    builder.download_and_prepare()
  assert not os.path.exists(tmp_path / 'data' / 'oxford_iiit_pet' / '4.0.0')


def test_as_rgb_jpeg_keeps_intact_jpegs_and_converts_the_rest():
  rgb = _smooth_rgb(np.random.default_rng(2), 24, 32)
  jpeg = _encode(rgb, 'JPEG', quality=95)
  assert pets.as_rgb_jpeg(jpeg, 'a.jpg') is jpeg
  others = [jpeg, _encode(rgb[..., 0], 'JPEG'), _encode(rgb[..., 0], 'PNG'), jpeg[:-20]]
  for i, data in enumerate(others):
    with Image.open(io.BytesIO(pets.as_rgb_jpeg(data, 'b.jpg', known_corrupt=i == 0))) as out:
      assert (out.format, out.mode, out.size) == ('JPEG', 'RGB', (32, 24))


def test_prepares_from_downloaded_archives(tmp_path, monkeypatch):
  # The default path: tfds downloads the archives, `pets` extracts them. Only
  # the HTTP transfer is faked, by handing back local (uncompressed, as the
  # real ones are) tars.
  src = tmp_path / 'src'
  _write_tree(src, np.random.default_rng(3), {'Abyssinian_1': (30, 32, 'jpeg', True)},
              {'pug_9': (22, 18, 'jpeg', False)})
  archives = {}
  for key in ('images', 'annotations'):
    archives[key] = tmp_path / f'{key}.tar.gz'
    with tarfile.open(archives[key], 'w') as tar:
      tar.add(src / key, arcname=key)

  def download(self, urls):
    del self  # Unused.
    assert urls == {k: f'{pets._tfds_pets._BASE_URL}/{k}.tar.gz' for k in archives}  # pylint: disable=protected-access
    return {k: archives[k] for k in urls}

  monkeypatch.setattr(tfds.download.DownloadManager, 'download', download)
  monkeypatch.setattr(socket.socket, 'connect', _no_network)
  data_dir = tmp_path / 'data'
  pets.builder(data_dir).download_and_prepare()
  assert [len(_read(data_dir, split)) for split in ('train', 'test')] == [1, 1]
  assert (data_dir / 'downloads' / 'extracted' / 'TAR_GZ.images.tar.gz' / 'images').is_dir()


def test_a_failed_download_is_one_line_naming_the_url_and_the_way_without_one(tmp_path,
                                                                              monkeypatch, capsys):
  """Offline: a real connection that fails (to a proxy at 127.0.0.1:1, which refuses it), not a
  237-line traceback ending in requests' ConnectionError."""
  from tensorflow_datasets.core.download import downloader  # pylint: disable=g-import-not-at-top
  from unet_flax import errors  # pylint: disable=g-import-not-at-top
  from unet_flax import sources  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(downloader, 'MAX_RETRIES', 0)  # tfds's 10 retries take 3.4 minutes.
  for name in ('HTTP_PROXY', 'HTTPS_PROXY', 'http_proxy', 'https_proxy'):
    monkeypatch.setenv(name, 'http://127.0.0.1:1')
  for name in ('NO_PROXY', 'no_proxy', 'ALL_PROXY', 'all_proxy'):
    monkeypatch.delenv(name, raising=False)
  with pytest.raises(errors.UserError) as raised:
    sources.open_source('oxford_iiit_pet', str(tmp_path / 'tfds'), 3)
  message = str(raised.value)
  assert '\n' not in message
  assert message.startswith('downloading the Oxford-IIIT Pet archives failed (ProxyError from '
                            f'{pets._tfds_pets._BASE_URL}/')  # pylint: disable=protected-access
  assert message.endswith('offline, prepare the data set from archives downloaded elsewhere: see '
                          '"The Pet data without a download" in docs/training.md')
  assert 'Traceback' not in capsys.readouterr().err
  docs = (pathlib.Path(__file__).parents[1] / pets.DOCS).read_text()
  assert '\n## The Pet data without a download\n' in docs
