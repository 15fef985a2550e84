"""modes.py: one picture path for training, evaluate and predict, in both input modes.

A run trained on 12-bit pictures (image_max_value=4095) with photos of every decoding option
(16-bit, EXIF rotation, grey, palette): predict's masks, scored against the true masks, are
evaluate's --original_resolution counts, in resize and crop mode alike.
"""

import io
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from tests.conftest import FOLDER_CLASSES
from tests.conftest import FOLDER_EXAMPLES
from tests.conftest import gradient_picture
from tests.conftest import write_folder_data
from unet_flax import decode
from unet_flax import errors
from unet_flax import evaluation
from unet_flax import input_pipeline
from unet_flax import inference
from unet_flax import metrics
from unet_flax import models
from unet_flax import modes
from unet_flax import sources
from unet_flax import train


@pytest.mark.parametrize('fmt', ['JPEG', 'PNG'])
def test_resize_modes_picture_is_the_trainers_decode_at_image_size(fmt, tiny_config):
  # 70x90: JPEG drafting decodes it at 1/2 scale (35x45 >= 16), then resizes; both paths must.
  image = Image.fromarray(gradient_picture(70, 90))
  buffer = io.BytesIO()
  image.save(buffer, format=fmt)
  data = buffer.getvalue()
  picture = modes.get(tiny_config).picture(data, 'photo')
  np.testing.assert_array_equal(picture.array, decode.decode(data, 16, 'picture', 'photo'))
  assert (picture.height, picture.width) == (70, 90)


def _write_photos(root) -> dict[str, np.ndarray]:
  """images/ and masks/ of 4 photos, one per decoding option; -> stem: true mask (upright)."""
  (root / 'images').mkdir(parents=True)
  (root / 'masks').mkdir()
  rng = np.random.default_rng(0)
  masks = {}
  for i, stem in enumerate(('deep', 'turned', 'grey', 'palette')):
    h, w = 24 + 4 * i, 36 - 4 * i
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4:3 * h // 4, w // 3:] = 1
    bright = mask.astype(np.float64) * 0.6 + rng.uniform(0, 0.3, (h, w))
    if stem == 'deep':  # 12-bit microscopy in a 16-bit PNG: white is 4095, not 65535.
      Image.fromarray((bright * 4095).astype(np.uint16)).save(root / 'images' / 'deep.png')
    elif stem == 'turned':  # Stored on its side; EXIF says to turn it upright.
      stored = np.rot90(bright, k=1)  # Turned left; orientation 6 turns it back right.
      image = Image.fromarray((np.repeat(stored[..., None], 3, -1) * 255).astype(np.uint8))
      exif = image.getexif()
      exif[0x0112] = 6
      image.save(root / 'images' / 'turned.jpg', exif=exif, quality=95)
    elif stem == 'grey':
      Image.fromarray((bright * 255).astype(np.uint8)).save(root / 'images' / 'grey.png')
    else:
      grey = Image.fromarray((bright * 255).astype(np.uint8)).convert('RGB')
      grey.quantize(64).save(root / 'images' / 'palette.png')
    Image.fromarray(mask).save(root / 'masks' / f'{stem}.png')
    masks[stem] = mask
  # The run trains on copies: a test list may not share an image with the train list.
  for path in [*(root / 'images').iterdir(), *(root / 'masks').iterdir()]:
    shutil.copyfile(path, path.with_name(f'train_{path.name}'))
  (root / 'train.txt').write_text(''.join(f'train_{stem}\n' for stem in masks))
  (root / 'test.txt').write_text('\n'.join(masks) + '\n')
  return masks


@pytest.mark.parametrize('input_mode', ['resize', 'crop'])
def test_predict_and_evaluate_classify_every_kind_of_photo_alike(tmp_path, tiny_config,
                                                                 input_mode):
  masks = _write_photos(tmp_path / 'data')
  config = tiny_config
  config.update({'dataset': f'folder:{tmp_path / "data"}', 'data_dir': None, 'num_classes': 2,
                 'image_max_value': 4095.0, 'batch_size': 4, 'steps_per_epoch': 4,
                 'num_epochs': 1, 'learning_rate': 1e-2, 'num_prediction_images': 1})
  if input_mode == 'crop':
    config.update({'input_mode': 'crop', 'crop_size': 16, 'ignore_label': 255})
  workdir = tmp_path / 'run'
  train.train_and_evaluate(config, str(workdir))
  report = evaluation.evaluate_workdir(workdir, original_resolution=True, worst_k=0,
                                       out=tmp_path / 'eval', log=lambda _: None)
  model = inference.load_model(workdir)
  photos = sorted((tmp_path / 'data' / 'images').iterdir())
  assert inference.predict_files(model, [str(p) for p in photos], tmp_path / 'masks') == []
  predicted = {p.stem: np.asarray(Image.open(tmp_path / 'masks' / f'{p.stem}_mask.png'))
               for p in photos}
  counts = sum(metrics.host_confusion_matrices(masks[s][None], predicted[s][None], 2)[0]
               for s in masks)
  np.testing.assert_array_equal(report['confusion_matrix'], counts)
  assert {s: predicted[s].shape for s in masks} == {s: m.shape for s, m in masks.items()}

  # The check has teeth: the 12-bit photo read as 16-bit (white at 65535, the old predict's
  # mistake) gives other classes.
  data = (tmp_path / 'data' / 'images' / 'deep.png').read_bytes()
  picture = model.mode.picture(data, 'deep.png')
  dark = decode.decode(data, None, 'picture', 'deep.png')  # No image_max_value: 65535 is white.
  assert dark.max() < 20 and picture.array.max() > 100
  wrong = modes.Picture(decode.rescale(dark, config.scale, 'picture') if input_mode == 'crop'
                        else decode.decode(data, 16, 'picture', 'deep.png'), *dark.shape[:2])
  [wrong_classes] = model.mode.classes(model.forward, model.params, [wrong], 4)
  assert (wrong_classes != predicted['deep']).sum() > 20  # Measured: 34 (crop), hundreds (resize).


def test_every_mode_is_an_entry_of_the_registry_with_the_whole_interface(tiny_config):
  assert set(modes.MODES) == {'resize', 'crop'}
  for name, mode_class in modes.MODES.items():
    assert mode_class.name == name and not mode_class.__abstractmethods__
  tiny_config.update({'input_mode': 'crop', 'crop_size': 16, 'ignore_label': 255})
  assert isinstance(modes.get(tiny_config), modes.Crop)
  params = models.init_params(tiny_config, jax.random.key(0))
  # Crop mode's classes of a picture smaller than a window: the network's on the padded window.
  image = gradient_picture(12, 10)
  [classes] = modes.get(tiny_config).classes(models.forward(tiny_config), params,
                                             [modes.Picture(image, 12, 10)], batch_size=2)
  padded = np.zeros((1, 16, 16, 3), np.uint8)
  padded[0, :12, :10] = image
  direct = np.asarray(models.forward(tiny_config)(params, padded))[0, :12, :10].argmax(-1)
  np.testing.assert_array_equal(classes, direct)


def test_crop_modes_budget_is_weighed_from_the_files_headers(tmp_path, tiny_config, monkeypatch):
  """A crop-mode run of a few small pictures is not refused on a machine with little memory free
  (the budget itself, 2 GiB by default, was weighed against it: its pictures' sizes were not
  known before decoding), and one whose pictures take more than is free is refused, with the
  estimate read from the headers before any picture is decoded."""
  data = write_folder_data(tmp_path / 'data')  # 10 pictures of 16-24 px a side.
  tiny_config.update({'dataset': f'folder:{data}', 'data_dir': None,
                      'num_classes': FOLDER_CLASSES, 'input_mode': 'crop', 'crop_size': 16,
                      'ignore_label': 255})
  assert tiny_config.cache_bytes == 2 * 2 ** 30
  mode, source = modes.get(tiny_config), sources.source_of(tiny_config)
  monkeypatch.setattr(input_pipeline, 'memory_available', lambda: 2 ** 20)
  train_data, eval_data, _ = mode.read_splits(source)
  assert train_data.all_cached and eval_data.all_cached
  # RGB and labels, uint8: 4 bytes a pixel.
  held = 4 * sum(height * width for height, width, _ in FOLDER_EXAMPLES.values())
  assert train_data.cached_bytes + eval_data.cached_bytes == held == 15_840

  monkeypatch.setattr(input_pipeline, 'memory_available', lambda: 10_000)
  with monkeypatch.context() as no_decode:
    no_decode.setattr(decode, 'decode', lambda *args, **kwargs: 1 / 0)
    with pytest.raises(errors.UserError) as raised:
      mode.read_splits(source)
  assert str(raised.value) == (
      'the 8 train and 2 eval examples (at native resolution, scale 1) take 15.5 KiB decoded, and '
      'config.cache_bytes=2147483648 would hold 15.5 KiB of them: more than the 9.8 KiB of '
      'memory this machine has free; set config.cache_bytes=5000 or less (the examples past it '
      'are decoded on the fly)')
  tiny_config.scale = 0.5  # A quarter of the pixels: fits.
  train_data, eval_data, _ = modes.get(tiny_config).read_splits(source)
  assert train_data.cached_bytes + eval_data.cached_bytes < 10_000
