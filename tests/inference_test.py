"""Restoring read-only, reading photos of any mode, and predict.py, on tiny data."""

import io
import jax
import numpy as np
import pytest
from PIL import Image

from tests.conftest import gradient_picture
from tests.conftest import reference_flip_tta_logits
from tests.conftest import run_script
from tests.conftest import snapshot
from unet_flax import errors
from unet_flax import inference
from unet_flax import models
from unet_flax import modes


def test_load_model_reads_latest_or_given_step_and_writes_nothing(trained_workdir):
  before = snapshot(trained_workdir)
  model = inference.load_model(trained_workdir)
  assert model.step == 6 and model.config.widths == (4, 8)
  older = inference.load_model(trained_workdir, step=3)
  assert older.step == 3
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), model.params, older.params)
  assert any(jax.tree.leaves(changed))
  assert snapshot(trained_workdir) == before


def test_load_model_errors_name_the_path_and_what_to_do(trained_workdir, tmp_path):
  with pytest.raises(errors.UserError, match=r'no checkpoint of step 5.*one of 3, 4, 6'):
    inference.load_model(trained_workdir, step=5)
  with pytest.raises(errors.UserError, match=r'missing is not a directory.*training run'):
    inference.load_model(tmp_path / 'missing')
  with pytest.raises(errors.UserError, match=r'checkpoints holds no checkpoint; train first'):
    inference.load_model(tmp_path)


def test_upsample_classes_is_bilinear_resize_of_the_logits():
  logits = np.random.default_rng(0).standard_normal((16, 16, 3)).astype(np.float32)
  for height, width in [(37, 100), (9, 20)]:  # One compiled bucket (128) serves both.
    expected = np.argmax(jax.image.resize(logits, (height, width, 3), 'bilinear'), axis=-1)
    np.testing.assert_array_equal(modes.upsample_classes(logits, height, width), expected)


def test_predict_of_only_missing_files_is_refused_before_out_is_made(trained_workdir, tmp_path):
  model = inference.load_model(trained_workdir)
  out = tmp_path / 'masks'
  with pytest.raises(errors.UserError,
                     match=r'^none of the 2 images named exists \(the first: \S*typo\.jpg\); '
                           r'check the paths \(nothing was written\)$'):
    inference.predict_files(model, [str(tmp_path / 'typo.jpg'), str(tmp_path / 'other.jpg')], out)
  assert not out.exists()


def test_predict_cli_writes_masks_at_original_sizes_and_skips_unreadable(trained_workdir,
                                                                         tmp_path):
  photos = tmp_path / 'photos'
  photos.mkdir()
  Image.fromarray(gradient_picture(40, 70)).save(photos / 'wide.jpg')
  Image.fromarray(gradient_picture(90, 30)).convert('L').save(photos / 'tall_grey.png')
  Image.fromarray(np.dstack([gradient_picture(33, 33), np.full((33, 33), 99, np.uint8)]),
                  'RGBA').save(photos / 'alpha.png')
  Image.fromarray(gradient_picture(50, 60)).convert('P').save(photos / 'palette.gif')
  Image.fromarray(np.arange(20 * 25, dtype=np.uint16).reshape(20, 25) * 100).save(
      photos / 'deep.png')
  assert Image.open(photos / 'deep.png').mode == 'I;16'
  (photos / 'broken.jpg').write_bytes(b'not an image')
  good = {'wide': (40, 70), 'tall_grey': (90, 30), 'alpha': (33, 33), 'palette': (50, 60),
          'deep': (20, 25)}
  out = tmp_path / 'masks'
  result = run_script('predict.py', '--workdir', trained_workdir, '--out', out, '--batch_size', 4,
                      *sorted(photos.iterdir()), cache=tmp_path / 'cache')
  assert result.returncode == 1, result.stderr
  errors_lines = [l for l in result.stderr.splitlines() if l.startswith('error:')]
  assert errors_lines[0] == f'error: {photos / "broken.jpg"}: cannot decode (not an image, or a ' \
                            'format PIL does not read); remove or replace the file; skipped'
  assert errors_lines[1] == 'error: 1 of 6 images could not be read (named above)'
  assert 'Traceback' not in result.stderr
  assert sorted(p.name for p in out.iterdir()) == sorted(
      f'{stem}_{kind}.png' for stem in good for kind in ('mask', 'overlay'))
  for stem, size in good.items():
    with Image.open(out / f'{stem}_mask.png') as mask:
      assert mask.mode == 'P', stem  # A palette PNG: class values, shown in colour.
      assert mask.getpalette()[:9] == [242, 142, 43, 78, 121, 167, 237, 201, 72], stem
      mask = np.asarray(mask)
    assert mask.shape == size and mask.dtype == np.uint8 and mask.max() < 3, stem
    overlay = Image.open(out / f'{stem}_overlay.png')
    assert overlay.mode == 'RGB' and overlay.size == size[::-1]


def test_predict_refuses_an_out_that_is_a_file(trained_workdir, tmp_path):
  model = inference.load_model(trained_workdir)
  (tmp_path / 'masks').write_text('')
  Image.fromarray(gradient_picture(12, 14)).save(tmp_path / 'x.jpg')
  with pytest.raises(errors.UserError, match='--out .*masks is a file'):
    inference.predict_files(model, [str(tmp_path / 'x.jpg')], tmp_path / 'masks')
  with pytest.raises(errors.UserError, match=r'a/x.jpg and b/x.png would both write'):
    inference.predict_files(model, ['a/x.jpg', 'b/x.png'], tmp_path / 'out')


def test_predict_replaces_nothing_it_did_not_write_without_overwrite(trained_workdir, tmp_path):
  model = inference.load_model(trained_workdir)
  photos = tmp_path / 'photos'
  photos.mkdir()
  Image.fromarray(gradient_picture(12, 14)).save(photos / 'a.jpg')
  (photos / 'a_mask.png').write_bytes(b'the user\'s own mask')
  with pytest.raises(errors.UserError, match=r'a_mask.png exists; pass --overwrite'):
    inference.predict_files(model, [str(photos / 'a.jpg')], photos)
  assert (photos / 'a_mask.png').read_bytes() == b'the user\'s own mask'
  assert not (photos / 'a_overlay.png').exists()  # Refused before anything was written.
  # An input is never an output, --overwrite or not.
  Image.fromarray(gradient_picture(12, 14)).save(photos / 'a_mask.png')
  with pytest.raises(errors.UserError, match=r'would write a_mask.png over the input'):
    inference.predict_files(model, [str(photos / 'a.jpg'), str(photos / 'a_mask.png')], photos,
                            overwrite=True)
  assert inference.predict_files(model, [str(photos / 'a.jpg')], photos, overwrite=True) == []
  with Image.open(photos / 'a_mask.png') as mask:
    assert mask.mode == 'P' and mask.size == (14, 12)


def test_flip_tta_is_every_forward_pass_of_the_model_and_of_predict(tiny_config, tmp_path):
  """Freshly initialised parameters: not mirror-symmetric, so the augmentation changes the
  classes of many pixels and a path that skipped it would show."""
  params = models.init_params(tiny_config, jax.random.key(0))
  plain = inference.make_model(tiny_config, 0, params)
  tta = inference.make_model(tiny_config, 0, params, flip_tta=True)
  photo = gradient_picture(16, 16)
  module = models.create(tiny_config)
  forward = jax.jit(lambda x: module.apply({'params': params}, x / 255.0, train=False))
  # Off: the module's logits, as before flip TTA existed.
  np.testing.assert_allclose(jax.jit(plain.forward)(params, photo[None]), forward(photo[None]),
                             atol=1e-6)
  expected = reference_flip_tta_logits(forward, photo[None])
  logits = np.asarray(jax.jit(tta.forward)(params, photo[None]))
  np.testing.assert_allclose(logits, expected, atol=1e-5)

  Image.fromarray(photo).save(tmp_path / 'photo.png')
  masks = {}
  for model in (plain, tta):
    out = tmp_path / f'tta_{model.flip_tta}'
    assert inference.predict_files(model, [str(tmp_path / 'photo.png')], out) == []
    masks[model.flip_tta] = np.asarray(Image.open(out / 'photo_mask.png'))
  # The same compiled forward passes (one photo: a batch of 1); at the network's size
  # upsample_classes is the argmax itself.
  np.testing.assert_array_equal(masks[True], logits[0].argmax(-1))
  np.testing.assert_array_equal(masks[False], np.asarray(forward(photo[None]))[0].argmax(-1))
  assert (masks[True] != masks[False]).sum() > 10


def test_predict_takes_directories_and_patterns_as_well_as_files(tmp_path):
  photos = tmp_path / 'photos'
  (photos / 'nested').mkdir(parents=True)
  for name in ('b.PNG', 'a.jpg', '._a.jpg', 'notes.txt', 'nested/c.png'):
    (photos / name).write_bytes(b'')
  want = [str(photos / 'a.jpg'), str(photos / 'b.PNG')]
  assert inference.expand_inputs([str(photos)]) == want
  assert inference.expand_inputs([str(photos / '*.jpg'), 'x.png']) == want[:1] + ['x.png']
  with pytest.raises(errors.UserError, match=r'nested/\*.gif matches no file'):
    inference.expand_inputs([str(photos / 'nested' / '*.gif')])
  (photos / 'nested' / 'c.png').unlink()
  with pytest.raises(errors.UserError, match='nested is a directory without images'):
    inference.expand_inputs([str(photos / 'nested')])


def test_predict_progress_counts_the_images_written_not_those_skipped(trained_workdir, tmp_path):
  model = inference.load_model(trained_workdir)
  Image.fromarray(gradient_picture(12, 14)).save(tmp_path / 'a.jpg')
  (tmp_path / 'broken.jpg').write_bytes(b'not an image')
  paths = [str(tmp_path / 'a.jpg'), str(tmp_path / 'broken.jpg'), str(tmp_path / 'gone.jpg')]
  log = io.StringIO()
  assert inference.predict_files(model, paths, tmp_path / 'masks', batch_size=1,
                                 stderr=log) == paths[1:]
  assert 'predicted 1/3 images (2 skipped), ' in log.getvalue()
  assert sorted(p.name for p in (tmp_path / 'masks').iterdir()) == ['a_mask.png', 'a_overlay.png']


def test_predict_makes_no_out_when_no_image_could_be_read(trained_workdir, tmp_path):
  model = inference.load_model(trained_workdir)
  (tmp_path / 'broken.jpg').write_bytes(b'not an image')
  paths = [str(tmp_path / 'broken.jpg'), str(tmp_path / 'gone.jpg')]
  assert inference.predict_files(model, paths, tmp_path / 'masks', stderr=io.StringIO()) == paths
  assert not (tmp_path / 'masks').exists()
