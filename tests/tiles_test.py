"""Crop mode: the sliding window against whole-image forward passes, random crops, end to end."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from tests.conftest import FOLDER_CLASSES
from tests.conftest import reference_flip_tta_logits
from tests.conftest import write_folder_data
from unet_flax import config as config_lib
from unet_flax import crops
from unet_flax import decode
from unet_flax import errors
from unet_flax import evaluation
from unet_flax import inference
from unet_flax import input_pipeline
from unet_flax import metrics
from unet_flax import models
from unet_flax import modes
from unet_flax import sources
from unet_flax import tiles
from unet_flax import train

K = 3
IGNORE = 255


@pytest.fixture(scope='module')
def model():
  """A tiny U-Net (2 levels: sides divisible by 4), its parameters and the jitted window pass."""
  module = models.UNet(num_classes=K, widths=(4, 8), dropout_rate=0.0)
  params = module.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False)['params']
  forward = jax.jit(lambda p, x: module.apply({'params': p}, models.normalize(x), train=False))
  return module, params, forward


def _image(h, w, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)


def test_gaussian_weight_is_1_at_the_centre_and_falls_to_the_edges():
  weight = tiles.gaussian_weight(32)
  assert weight.shape == (32, 32) and weight.dtype == np.float32
  assert weight.max() == 1 == weight[15, 16]  # The 4 centre pixels, 0.5 px from the centre.
  sigma = 0.125 * 32
  expected = np.exp(-0.5 * ((np.arange(32) - 15.5) / sigma) ** 2) / np.exp(-0.5 * (0.5 / sigma) ** 2)
  np.testing.assert_allclose(weight[15], np.maximum(expected * 1.0, tiles.MIN_WEIGHT), rtol=1e-5)
  assert weight[0, 0] == pytest.approx(tiles.MIN_WEIGHT)  # exp(-0.5 * (15.5 / 4)^2)^2 < 1e-3.
  np.testing.assert_array_equal(weight, weight.T)


def test_window_starts_step_by_the_overlap_and_end_at_the_edge():
  assert tiles.window_starts(32, 32, 0.25) == [0]
  assert tiles.window_starts(20, 32, 0.25) == [0]  # Padded to one window.
  assert tiles.window_starts(56, 32, 0.25) == [0, 24]
  assert tiles.window_starts(100, 32, 0.5) == [0, 16, 32, 48, 64, 68]
  assert tiles.window_starts(40, 32, 0.0) == [0, 8]


def test_an_image_of_one_window_gives_the_direct_forward_pass(model):
  module, params, forward = model
  image = _image(32, 32)
  tiled = tiles.sliding_window_logits(forward, params, image, crop_size=32)
  direct = np.asarray(forward(params, image[None]))[0]
  np.testing.assert_allclose(tiled, direct, atol=1e-5)


def test_tiled_logits_match_the_whole_image_away_from_the_border(model):
  """40x56 in 32-px windows, 6 of them (two batches of 4, the last padded). The network is
  convolutional, so it runs on the whole image too; windows see zero padding at their edges that
  the whole image does not, which the Gaussian weight keeps small."""
  module, params, forward = model
  image = _image(40, 56, seed=1)
  tiled = tiles.sliding_window_logits(forward, params, image, crop_size=32, overlap=0.5,
                                      window_batch=4)
  whole = np.asarray(forward(params, image[None]))[0]
  inner = (slice(8, -8), slice(8, -8))
  # Measured: 0.009 inside, 0.10 at the border, where the mean |logit| is 0.094.
  assert np.abs(tiled - whole)[inner].max() < 0.03
  classes = tiles.sliding_window_classes(forward, params, image, crop_size=32, overlap=0.5,
                                         window_batch=4)
  assert classes.dtype == np.uint8 and classes.shape == (40, 56)
  np.testing.assert_array_equal(classes, tiled.argmax(-1))


def test_an_image_smaller_than_a_window_is_padded_then_cropped_back(model):
  module, params, forward = model
  image = _image(20, 12, seed=2)
  classes = tiles.sliding_window_classes(forward, params, image, crop_size=32, window_batch=2)
  padded = np.zeros((32, 32, 3), np.uint8)
  padded[:20, :12] = image
  direct = np.asarray(forward(params, padded[None]))[0, :20, :12]
  assert classes.shape == (20, 12)
  np.testing.assert_array_equal(classes, direct.argmax(-1))


def test_crop_modes_window_pass_is_the_configs_model_group_norm_included(tiny_config):
  tiny_config.normalization = 'group'
  tiny_config.input_mode, tiny_config.ignore_label, tiny_config.crop_size = 'crop', 255, 16
  params = models.init_params(tiny_config, jax.random.key(0))
  image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), np.uint8)
  module = models.create(tiny_config)
  direct = module.apply({'params': params}, image[None] / 255.0, train=False)[0]
  mode = modes.get(tiny_config)
  picture = modes.Picture(image, 16, 16)
  [classes] = mode.classes(models.forward(tiny_config), params, [picture], batch_size=2)
  np.testing.assert_array_equal(classes, np.argmax(direct, axis=-1))


def test_crop_mode_needs_an_ignore_label_and_a_crop_the_widths_divide():
  config = config_lib.defaults()
  config.input_mode = 'crop'
  with pytest.raises(errors.UserError, match=r'--config.ignore_label=255'):
    config_lib.validate(config)
  config.ignore_label = 255
  config.crop_size = 100
  with pytest.raises(errors.UserError, match=r'crop_size=100 .* use 96 or 104'):
    config_lib.validate(config)
  config.crop_size, config.scale = 96, 0.5
  config_lib.validate(config)


def _split(sizes, seed=0):
  rng = np.random.default_rng(seed)
  examples = [(rng.integers(0, 256, (h, w, 3), np.uint8),
               rng.integers(0, K, (h, w), np.uint8)) for h, w in sizes]
  return input_pipeline.Split(len(examples), range(len(examples)), examples, None)


def test_crops_cut_image_and_mask_together_and_pad_masks_with_the_ignore_label():
  split = _split([(40, 56), (10, 20)])
  batch = crops.crop_batch(split, np.array([0, 1]), crop_size=16, ignore_label=IGNORE, seed=0,
                           epoch=0, step=0, process_index=0)
  image, labels = split[0]
  # Find the crop of example 0 in its image: its mask must be cut at the same place.
  found = [(t, l) for t in range(40 - 15) for l in range(56 - 15)
           if np.array_equal(image[t:t + 16, l:l + 16], batch['image'][0])]
  assert len(found) == 1
  top, left = found[0]
  np.testing.assert_array_equal(batch['label'][0], labels[top:top + 16, left:left + 16])
  small_image, small_labels = split[1]  # 10 rows: rows 10.. are padding.
  assert (batch['label'][1, 10:] == IGNORE).all() and (batch['image'][1, 10:] == 0).all()
  assert (batch['label'][1, :10] != IGNORE).all()
  assert any(np.array_equal(batch['label'][1, :10], small_labels[:, l:l + 16]) for l in range(5))


def test_crop_batches_are_a_function_of_their_seeds_so_resume_crops_the_same():
  split = _split([(40, 56), (24, 20), (33, 47), (16, 16)])
  kwargs = dict(crop_size=16, ignore_label=IGNORE, seed=3, epoch=1, process_index=0,
                num_steps=4)
  whole = list(crops.crop_batches(split, 2, **kwargs))
  resumed = list(crops.crop_batches(split, 2, first_step=2, **kwargs))
  assert len(whole) == 4 and len(resumed) == 2
  for a, b in zip(whole[2:], resumed):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  # Not in memory: decoded on the fly in threads, ahead of the consumer; the same batches.
  uncached = input_pipeline.Split(4, range(4), [split.cached[0], None, None, split.cached[3]],
                                  lambda i: split.cached[i])
  for a, b in zip(whole, crops.crop_batches(uncached, 2, num_threads=2, **kwargs)):
    np.testing.assert_array_equal(a['image'], b['image'])
  other_epoch = next(iter(crops.crop_batches(split, 2, **{**kwargs, 'epoch': 2})))
  assert not np.array_equal(other_epoch['image'], whole[0]['image'])


def test_native_bytes_read_from_the_headers_are_the_bytes_held_once_decoded(tmp_path, tfds_dir):
  """The memory check's estimate of crop mode (from the files' headers alone) against the arrays
  load_native_split holds: folder pictures of sizes, formats and modes that differ (one turned by
  its EXIF, one 16-bit), rescaled and sharded; and the tfds records of synthetic_pets/tiny."""
  data = write_folder_data(tmp_path / 'data')
  turned = Image.fromarray(_image(12, 30))
  exif = turned.getexif()
  exif[0x0112] = 6  # Shown 30x12: its mask is 30x12.
  turned.save(data / 'images' / 'turned.jpg', exif=exif)
  Image.fromarray(np.zeros((30, 12), np.uint8)).save(data / 'masks' / 'turned.png')
  Image.fromarray(np.full((13, 29), 40000, np.uint16)).save(data / 'images' / 'deep.png')
  Image.fromarray(np.ones((13, 29), np.uint8)).save(data / 'masks' / 'deep.png')
  folder = sources.open_source(f'folder:{data}', None, FOLDER_CLASSES)
  synthetic = sources.open_source('synthetic_pets/tiny', tfds_dir, K)
  for source in (folder, synthetic):
    for split in ('train', 'test'):
      for scale, process_index, process_count in ((1.0, 0, 1), (0.37, 1, 3), (1.3, 0, 2)):
        shard = dict(scale=scale, process_index=process_index, process_count=process_count)
        held = crops.load_native_split(source, split, cache_bytes=2 ** 40, **shard)
        assert held.all_cached and len(held) == len(range(process_index, source.num_examples(
            split), process_count))
        decoded = sum(image.nbytes + labels.nbytes for image, labels in held.cached)
        assert crops.native_bytes(source, split, **shard) == decoded, (source.name, split, shard)

  # A file whose header cannot be read: the line its decode gives, for the first in the order.
  (data / 'images' / 'owl_02.png').write_bytes(b'not an image')
  (data / 'masks' / 'dog_02.png').write_bytes(b'')
  messages = []
  for split in ('train', 'test'):
    for read in (crops.native_bytes, crops.load_native_split):
      with pytest.raises(errors.UserError) as raised:
        read(folder, split, num_threads=3)
      messages.append(str(raised.value))
  assert messages[0] == messages[1] and messages[2] == messages[3], messages
  assert {m.split(': ', 1)[1] for m in messages} == {
      'cannot decode (not an image, or a format PIL does not read); remove or replace the file',
      'the file is empty (0 bytes); remove or replace it'}, messages


# stem: (height, width); not square, one smaller than a crop.
_FOLDER = {'a': (40, 56), 'b': (24, 20), 'c': (40, 56)}


def _write_folder(root):
  rng = np.random.default_rng(0)
  (root / 'images').mkdir(parents=True)
  (root / 'masks').mkdir()
  for stem, (h, w) in _FOLDER.items():
    Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(root / 'images' / f'{stem}.png')
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4:3 * h // 4, w // 4:3 * w // 4] = 1
    mask[:2] = IGNORE  # Not labelled: counts nothing.
    Image.fromarray(mask).save(root / 'masks' / f'{stem}.png')
  return root


def test_crop_mode_trains_evaluates_and_predicts_at_the_images_own_sizes(tmp_path, tiny_config):
  data = _write_folder(tmp_path / 'data')
  config = tiny_config
  config.dataset = f'folder:{data}'
  config.num_classes, config.ignore_label = 2, IGNORE
  config.input_mode, config.crop_size, config.tile_overlap = 'crop', 16, 0.25
  config.batch_size, config.steps_per_epoch, config.num_epochs = 2, 1, 2
  config.augment_flip = True
  config.num_prediction_images = 1
  workdir = tmp_path / 'run'
  state = train.train_and_evaluate(config, str(workdir))
  assert int(state.step) == 2
  lines = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  evals = [l for l in lines if 'mean_iou' in l]
  assert evals, lines
  # The one test image at its own size less its 2 ignored rows: every pixel counted once.
  confusion = np.array(evals[-1]['confusion_matrix'])
  sizes = {s: (h - 2) * w for s, (h, w) in _FOLDER.items()}
  assert confusion.sum() in sizes.values()
  assert (workdir / 'predictions' / 'step_2.png').exists()

  report = evaluation.evaluate_workdir(workdir, split='train', worst_k=1, log=lambda _: None,
                                       original_resolution=True)
  assert report['resolution'] == 'original'
  # At scale 1 the trainer's native resolution is the original one: the same counts.
  network = evaluation.evaluate_workdir(workdir, split='train', worst_k=0, log=lambda _: None)
  assert network['resolution'] == 'network'
  np.testing.assert_array_equal(network['confusion_matrix'], report['confusion_matrix'])
  assert np.array(report['confusion_matrix']).sum() == sum(sizes.values()) - confusion.sum()

  model = inference.load_model(workdir)
  paths = [str(data / 'images' / f'{s}.png') for s in _FOLDER]
  assert inference.predict_files(model, paths, tmp_path / 'out', batch_size=3) == []
  for stem, (h, w) in _FOLDER.items():
    mask = np.asarray(Image.open(tmp_path / 'out' / f'{stem}_mask.png'))
    assert mask.shape == (h, w) and mask.max() < 2

  # Flip TTA: each window's logits are the log of the mean softmax of it and its mirror.
  tta = evaluation.evaluate_workdir(workdir, split='train', worst_k=1, flip_tta=True,
                                    original_resolution=True, log=lambda _: None)
  assert tta['flip_tta'] is True
  assert tta['files']['json'].endswith('/step_2_train_original_flip_tta.json')
  tta_model = inference.make_model(model.config, model.step, model.params, flip_tta=True)
  assert inference.predict_files(tta_model, paths, tmp_path / 'tta', batch_size=3) == []
  network = jax.jit(models.forward(model.config))

  def reference_forward(params, windows):
    return reference_flip_tta_logits(functools.partial(network, params), windows)

  def reference_classes(image):
    classes = tiles.sliding_window_classes(reference_forward, model.params, image,
                                           crop_size=config.crop_size,
                                           overlap=config.tile_overlap)
    return decode.resize_mask(classes, *image.shape[:2])  # Scale 1: the same size.

  originals = sources.originals(sources.source_of(config), 'train')
  expected = sum(metrics.host_confusion_matrices(labels[None], reference_classes(image)[None], 2,
                                       IGNORE)[0] for _, image, labels in originals)
  # A pixel on a near-tie may part from the float64 reference; without TTA hundreds do.
  assert np.abs(np.subtract(tta['confusion_matrix'], expected)).sum() <= 4
  assert np.abs(np.subtract(report['confusion_matrix'], expected)).sum() > 100
  for path, stem in zip(paths, _FOLDER):
    reference = reference_classes(inference.read_photo(config, decode.read_bytes(path), path))
    mask, plain = (np.asarray(Image.open(tmp_path / out / f'{stem}_mask.png'))
                   for out in ('tta', 'out'))
    assert (mask != reference).sum() <= 2 and (plain != reference).sum() > 50, stem


_STRIP = '''
import sys, time
import jax, jax.numpy as jnp, numpy as np
from unet_flax import models, tiles
module = models.UNet(num_classes=3, widths=(4, 8), dropout_rate=0.0)
params = module.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False)['params']
image = np.random.default_rng(0).integers(0, 256, (20000, 500, 3), np.uint8)
started = time.perf_counter()
# Overlap 0: half the windows of 0.25, the same memory; 45 s on a loaded 2-core machine.
forward = jax.jit(lambda p, x: module.apply({'params': p}, x / 255.0, train=False))
classes = tiles.sliding_window_classes(forward, params, image, crop_size=256,
                                       window_batch=8, overlap=0.0)
assert classes.shape == (20000, 500) and classes.dtype == np.uint8
print(f'{time.perf_counter() - started:.1f}s')
# KiB: this program's own peak (VmHWM). ru_maxrss would also count the forked test process's
# pages from before the exec.
print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')))
'''


def test_a_20000_by_500_strip_is_tiled_in_bounded_memory(tmp_path):
  """Peak RSS of a child predicting a 10-megapixel strip: JAX itself, the image (30 MB), one
  [H, W, 3] float32 accumulator (120 MB) and a batch of windows; no [H, W] resize anywhere."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from tests import conftest  # pylint: disable=g-import-not-at-top
  done = subprocess.run([sys.executable, '-c', _STRIP], env=conftest.script_env(tmp_path),
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  # The child's own peak: RUSAGE_CHILDREN here would also count other tests' children.
  peak_kib = int(done.stdout.split()[-1])
  assert peak_kib > 100 * 2**10  # JAX alone takes more: the figure is real.
  assert peak_kib < 2 * 2**20, f'peak RSS {peak_kib / 2**20:.2f} GiB'  # Measured: 0.64 GiB.
