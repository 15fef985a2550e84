"""export.py's files: model.jax_export and model.onnx give the model's logits for any batch size,
and docs/using.md's snippets segment a photo as predict does with jax or onnxruntime alone."""

import dataclasses
import json
import logging
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT
from tests.conftest import gradient_picture
from tests.conftest import make_tiny_config
from unet_flax import errors
from unet_flax import export
from unet_flax import inference
from unet_flax import models
from unet_flax import train

NEEDS_ONNX = pytest.mark.skipif(not export.onnx_installed(),
                                reason="model.onnx needs the onnx extra: pip install -e '.[onnx]'")


@pytest.fixture(scope='module')
def exported(trained_workdir, tmp_path_factory):
  out = tmp_path_factory.mktemp('export') / 'model'
  export.export(trained_workdir, out)  # Both formats where the onnx extra is installed.
  return out


def test_exported_function_equals_the_model_for_any_batch_size(exported, trained_workdir):
  info = json.loads((exported / export.INFO_FILE).read_text())
  assert info['image_size'] == 16 and info['num_classes'] == 3 and info['step'] == 6
  assert info['class_names'] == ['pet', 'background', 'border']
  assert info['input']['shape'] == ['b', 16, 16, 3]
  assert set(info['files']['jax']['platforms']) == {'cpu', 'cuda', 'tpu'}
  data = (exported / info['files']['jax']['file']).read_bytes()
  model = jax.export.deserialize(bytearray(data))
  restored = inference.load_model(trained_workdir)
  rng = np.random.default_rng(0)
  for batch in (1, 3):
    images = rng.integers(0, 256, (batch, 16, 16, 3), dtype=np.uint8)
    logits = model.call(images)
    assert logits.shape == (batch, 16, 16, 3) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, jax.jit(restored.forward)(restored.params, images),
                               rtol=1e-6, atol=1e-6)
  assert info['mode']['name'] == 'resize' and info['mode']['image_size'] == 16
  assert 'workdir' not in info  # No path of the exporter's machine.


# The first lines of docs/using.md's snippets: each runtime's loader, then the body they share.
LOADERS = {'jax': 'import jax\n', 'onnx': 'import numpy as np\nimport onnxruntime\n'}
BODY = 'import json\nfrom PIL'


def _docs_snippet(runtime: str = 'jax') -> tuple[list[str], str]:
  """(the packages docs/using.md says to install for `runtime`, its loader and the body)."""
  docs = (ROOT / 'docs' / 'using.md').read_text()
  docs = docs[docs.index('## export'):]
  installs = [line.split() for line in re.findall(r'`pip install ([a-z ]+)`', docs)]
  packages = [p for p in installs if ('onnxruntime' if runtime == 'onnx' else 'jax') in p]
  blocks = [block.split('```', 1)[0] for block in docs.split('```python\n')[1:]]
  loader = [b for b in blocks if b.startswith(LOADERS[runtime])]
  body = [b for b in blocks if b.startswith(BODY)]
  assert len(packages) == len(loader) == len(body) == 1, (runtime, packages)
  return packages[0], loader[0] + '\n' + body[0]


def _run_snippet(python, exported, tmp_path, photo_name='cat.jpg', photo=None,
                 runtime='jax') -> subprocess.CompletedProcess:
  """The docs' snippet for `runtime` on a photo (default: a random 30x50 JPEG) with the exported
  model, in `python`; it saves the mask as mask.npy beside the photo."""
  _, snippet = _docs_snippet(runtime)
  assert 'unet_flax' not in snippet
  tmp_path.mkdir(exist_ok=True)
  if photo is None:
    photo = np.random.default_rng(0).integers(0, 256, (30, 50, 3), np.uint8)
  Image.fromarray(photo).save(tmp_path / photo_name)
  os.symlink(exported, tmp_path / 'model')
  # A fresh interpreter: nothing of this package is imported, only what the snippet imports;
  # the onnxruntime snippet imports no jax either.
  unwanted = ('unet_flax', 'flax', 'orbax') + (('jax', 'jaxlib') if runtime == 'onnx' else ())
  check = snippet.replace("'cat.jpg'", repr(photo_name)) + textwrap.dedent(f'''
      import sys
      assert mask.shape == {photo.shape[:2]} and mask.max() < 3
      assert not [m for m in sys.modules if m.split('.')[0] in {unwanted!r}], sys.modules
      np.save('mask.npy', mask)
  ''')
  return subprocess.run([python, '-c', check], cwd=tmp_path, capture_output=True, text=True,
                        timeout=300, env=dict(os.environ, JAX_PLATFORMS='cpu'))


def test_docs_snippet_runs_without_unet_flax(exported, tmp_path):
  result = _run_snippet(sys.executable, exported, tmp_path)
  assert result.returncode == 0, result.stderr
  assert "'pet'" in result.stdout


@pytest.mark.skipif(not os.environ.get('UNET_FLAX_CLEAN_VENV_TEST'),
                    reason='installs packages into a new venv; CI sets UNET_FLAX_CLEAN_VENV_TEST=1')
def test_docs_snippet_runs_in_a_venv_with_only_the_packages_it_lists(exported, tmp_path):
  packages, _ = _docs_snippet()
  venv = tmp_path / 'venv'
  subprocess.run([sys.executable, '-m', 'venv', str(venv)], check=True)
  python = str(venv / 'bin' / 'python')
  subprocess.run([python, '-m', 'pip', 'install', '-q', *packages], check=True, timeout=600)
  result = _run_snippet(python, exported, tmp_path / 'run')
  assert result.returncode == 0, result.stderr
  assert "'pet'" in result.stdout


def test_export_refuses_a_non_empty_out_and_a_file(exported, tmp_path):
  with pytest.raises(errors.UserError, match='is not empty; pass --overwrite'):
    export.export('unused', exported)
  (tmp_path / 'file').write_text('')
  with pytest.raises(errors.UserError, match='is a file'):
    export.export('unused', tmp_path / 'file')
  with pytest.raises(errors.UserError, match='gpu not known; choose from cpu,cuda,rocm,tpu'):
    export.export('unused', tmp_path / 'new', platforms=('gpu',))


def _predicted(workdir, photo: np.ndarray, out) -> np.ndarray:
  """The mask predict.py writes for `photo` (saved as out/photo.png): [H, W] uint8."""
  out.mkdir(exist_ok=True)
  Image.fromarray(photo).save(out / 'photo.png')
  model = inference.load_model(workdir)
  assert inference.predict_files(model, [str(out / 'photo.png')], out / 'masks') == []
  predicted = np.asarray(Image.open(out / 'masks' / 'photo_mask.png'))
  assert predicted.shape == photo.shape[:2]
  assert len(np.unique(predicted)) > 1  # Classes vary: equality has teeth.
  return predicted


@pytest.fixture(scope='module')
def resize_run(tmp_path_factory, tfds_dir):
  """A resize-mode run trained one step (the trained workdir calls every pixel background; this
  one's classes vary), exported in both formats where the onnx extra is installed, and the mask
  predict.py writes for a 70x45 photo: (model dir, photo [45, 70, 3] uint8, mask [45, 70])."""
  config = make_tiny_config(tfds_dir)
  config.num_epochs, config.steps_per_epoch = 1, 1
  tmp_path = tmp_path_factory.mktemp('resize')
  train.train_and_evaluate(config, str(tmp_path / 'run'))
  export.export(tmp_path / 'run', tmp_path / 'model', platforms=('cpu',))
  photo = gradient_picture(45, 70)
  photo[10:30, 20:50] = (250, 40, 30)
  return tmp_path / 'model', photo, _predicted(tmp_path / 'run', photo, tmp_path)


@pytest.mark.parametrize('runtime', ['jax', pytest.param('onnx', marks=NEEDS_ONNX)])
def test_a_resize_mode_export_and_the_docs_snippet_give_predicts_mask(resize_run, tmp_path,
                                                                      runtime):
  """The docs' snippet, with numpy and the format's runtime alone, upsamples the logits to the
  photo's size as predict does."""
  model_dir, photo, predicted = resize_run
  result = _run_snippet(sys.executable, model_dir, tmp_path, 'photo.png', photo, runtime)
  assert result.returncode == 0, result.stderr
  mask = np.load(tmp_path / 'mask.npy')
  assert (mask == predicted).mean() >= 0.999, (mask != predicted).sum()


@pytest.fixture(scope='module')
def crop_run(tmp_path_factory, tfds_dir):
  """A crop-mode run trained one step, exported in both formats (where the onnx extra is
  installed), and the mask predict.py writes for a 300x200 photo: (workdir, model dir, photo
  [200, 300, 3] uint8, predicted mask [200, 300] uint8)."""
  config = make_tiny_config(tfds_dir)
  config.input_mode, config.crop_size, config.ignore_label = 'crop', 16, 255
  config.tile_overlap, config.scale = 0.25, 0.5
  config.num_epochs, config.steps_per_epoch = 1, 1
  tmp_path = tmp_path_factory.mktemp('crop')
  workdir = tmp_path / 'run'
  train.train_and_evaluate(config, str(workdir))
  export.export(workdir, tmp_path / 'model', platforms=('cpu',))
  photo = gradient_picture(200, 300)
  photo[50:120, 80:200] = (250, 40, 30)  # Something the network's classes follow.
  return workdir, tmp_path / 'model', photo, _predicted(workdir, photo, tmp_path)


@pytest.mark.parametrize('runtime', ['jax', pytest.param('onnx', marks=NEEDS_ONNX)])
def test_a_crop_mode_export_and_the_docs_snippet_give_predicts_mask(crop_run, tmp_path, runtime):
  """A crop-mode run exports its window function and the tiling contract; the docs' snippet,
  with numpy and the format's runtime alone, then gives the mask predict.py writes."""
  _, model_dir, photo, predicted = crop_run
  info = json.loads((model_dir / export.INFO_FILE).read_text())
  assert info['input']['shape'] == ['b', 16, 16, 3]
  assert info['mode'] == {**info['mode'], 'name': 'crop', 'crop_size': 16, 'tile_overlap': 0.25,
                          'scale': 0.5}
  assert info['ignore_label'] == 255
  result = _run_snippet(sys.executable, model_dir, tmp_path, 'photo.png', photo, runtime)
  assert result.returncode == 0, result.stderr
  exported = np.load(tmp_path / 'mask.npy')
  assert exported.shape == (200, 300)
  assert (exported == predicted).mean() >= 0.999, (exported != predicted).sum()


# model.onnx: the same function, run by onnxruntime.


def _onnx_logits(model: pathlib.Path | bytes, images: np.ndarray) -> np.ndarray:
  """onnxruntime's logits [B, S, S, K] float32 of a model.onnx file or its bytes."""
  import onnxruntime  # pylint: disable=g-import-not-at-top  (the onnx extra)
  session = onnxruntime.InferenceSession(model if isinstance(model, bytes) else str(model),
                                         providers=['CPUExecutionProvider'])
  return session.run(['logits'], {'images': images})[0]


def _assert_close(onnx_logits, jax_logits):
  """The issue's bar: logits within 1e-4, classes equal on >= 99.9% of the pixels."""
  assert onnx_logits.shape == jax_logits.shape and onnx_logits.dtype == np.float32
  assert np.abs(onnx_logits - jax_logits).max() <= 1e-4
  assert (onnx_logits.argmax(-1) == jax_logits.argmax(-1)).mean() >= 0.999


def _pictures(n: int, size: int) -> np.ndarray:
  """n pictures [n, size, size, 3] uint8: gradients with a block of colour, and noise."""
  rng = np.random.default_rng(n)
  pictures = rng.integers(0, 256, (n, size, size, 3), np.uint8)
  for i in range(0, n, 2):
    pictures[i] = gradient_picture(size, size)
    pictures[i, size // 4:size // 2, size // 3:] = rng.integers(0, 256, 3)
  return pictures


@NEEDS_ONNX
def test_onnx_logits_equal_jax_for_any_batch_size(exported, trained_workdir):
  info = json.loads((exported / export.INFO_FILE).read_text())
  onnx_info = info['files']['onnx']
  assert onnx_info['file'] == 'model.onnx' and onnx_info['format'] == 'ONNX, opset 18'
  assert onnx_info['checked']['max_abs_logit_diff'] <= 1e-4
  assert onnx_info['checked']['mask_agreement'] >= 0.999
  restored = inference.load_model(trained_workdir)
  for batch in (1, 3, 5):
    images = _pictures(batch, 16)
    _assert_close(_onnx_logits(exported / 'model.onnx', images),
                  np.asarray(jax.jit(restored.forward)(restored.params, images)))


@NEEDS_ONNX
def test_export_refuses_an_onnx_file_whose_logits_are_not_the_models(exported, trained_workdir):
  restored = inference.load_model(trained_workdir)
  other = dataclasses.replace(restored, params=jax.tree.map(lambda p: p * 1.5, restored.params))
  data = (exported / 'model.onnx').read_bytes()
  assert export.check_onnx(data, restored)['max_abs_logit_diff'] <= 1e-4
  with pytest.raises(errors.UserError, match=r'model.onnx computes logits .* away from the jax '
                                             r"model's in onnxruntime .*--formats=jax"):
    export.check_onnx(data, other)


@NEEDS_ONNX
def test_onnx_crop_windows_equal_jax(crop_run):
  workdir, model_dir, _, _ = crop_run
  restored = inference.load_model(workdir)
  windows = _pictures(4, 16)
  _assert_close(_onnx_logits(model_dir / 'model.onnx', windows),
                np.asarray(jax.jit(restored.forward)(restored.params, windows)))


@NEEDS_ONNX
def test_onnx_of_the_pretrained_encoders_unet_equals_jax(tiny_config):
  """The EfficientNet-Lite0 encoder (random weights: the conversion, not the training, is under
  test) under the chapter's decoder, at a fixed batch size."""
  tiny_config.encoder, tiny_config.image_size = 'efficientnet_lite0', 32
  params = jax.tree.map(np.asarray, models.init_params(tiny_config, jax.random.key(0)))
  model = inference.make_model(tiny_config, 0, params)
  data = export.onnx_model(model, batch_size=2)
  images = _pictures(2, 32)
  _assert_close(_onnx_logits(data, images),
                np.asarray(jax.jit(model.forward)(model.params, images)))


@NEEDS_ONNX
def test_onnx_conversion_logs_no_warning_about_its_shape_tensors(tiny_config, caplog):
  """onnx_ir's warnings about the untyped Reshape shape tensors are kept from the user; its
  logger is as it was afterwards."""
  params = jax.tree.map(np.asarray, models.init_params(tiny_config, jax.random.key(0)))
  level = logging.getLogger('onnx_ir.serde').level
  with caplog.at_level(logging.WARNING):
    export.onnx_model(inference.make_model(tiny_config, 0, params))
  assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
  assert logging.getLogger('onnx_ir.serde').level == level


def test_without_the_converter_export_writes_the_jax_form_and_says_so(
    trained_workdir, tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(export, 'onnx_installed', lambda: False)
  info = export.export(trained_workdir, tmp_path / 'model')
  assert list(info['files']) == ['jax']
  assert sorted(p.name for p in (tmp_path / 'model').iterdir()) == ['model.jax_export',
                                                                    'model.json']
  assert "model.onnx not written: its converter is not installed (pip install -e '.[onnx]'" in (
      capsys.readouterr().err)
  with pytest.raises(errors.UserError, match=r"needs jax2onnx and onnxruntime: pip install -e "
                                             r"'\.\[onnx\]'.*or pass --formats=jax"):
    export.export(trained_workdir, tmp_path / 'other', formats=('onnx',))
  assert not (tmp_path / 'other').exists()  # Refused before anything is written.
  with pytest.raises(errors.UserError, match='tflite not known; choose from jax,onnx'):
    export.export(trained_workdir, tmp_path / 'other', formats=('tflite',))


@NEEDS_ONNX
@pytest.mark.skipif(not os.environ.get('UNET_FLAX_CLEAN_VENV_TEST'),
                    reason='installs packages into a new venv; CI sets UNET_FLAX_CLEAN_VENV_TEST=1')
def test_onnx_docs_snippet_runs_in_a_venv_with_only_the_packages_it_lists(exported, tmp_path):
  packages, _ = _docs_snippet('onnx')
  venv = tmp_path / 'venv'
  subprocess.run([sys.executable, '-m', 'venv', str(venv)], check=True)
  python = str(venv / 'bin' / 'python')
  subprocess.run([python, '-m', 'pip', 'install', '-q', *packages], check=True, timeout=600)
  assert subprocess.run([python, '-c', 'import jax'], capture_output=True).returncode != 0
  result = _run_snippet(python, exported, tmp_path / 'run', runtime='onnx')
  assert result.returncode == 0, result.stderr
  assert "'pet'" in result.stdout


def test_overwrite_removes_the_model_files_this_export_does_not_write(trained_workdir, tmp_path,
                                                                      capsys):
  """An earlier export's model.onnx does not stay beside a jax-only export; the user's files do."""
  out = tmp_path / 'model'
  out.mkdir()
  (out / 'model.onnx').write_bytes(b'an earlier run\'s model')
  (out / 'notes.txt').write_text('mine')
  info = export.export(trained_workdir, out, formats=('jax',), platforms=('cpu',), overwrite=True)
  assert list(info['files']) == ['jax']
  assert sorted(p.name for p in out.iterdir()) == ['model.jax_export', 'model.json', 'notes.txt']
  assert f'removed {out / "model.onnx"} of an earlier export' in capsys.readouterr().err


def test_a_refused_export_says_nothing_about_the_onnx_it_would_leave_out(tmp_path, monkeypatch,
                                                                          capsys):
  monkeypatch.setattr(export, 'onnx_installed', lambda: False)
  (tmp_path / 'model').mkdir()
  (tmp_path / 'model' / 'notes.txt').write_text('mine')
  with pytest.raises(errors.UserError, match='is not empty; pass --overwrite'):
    export.export('unused', tmp_path / 'model')
  assert capsys.readouterr().err == ''
