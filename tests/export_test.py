"""export.py's serialized model: same logits as the model, any batch size, usable without us."""

import json
import os
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
from unet_flax import errors
from unet_flax import export
from unet_flax import inference
from unet_flax import train



@pytest.fixture(scope='module')
def exported(trained_workdir, tmp_path_factory):
  out = tmp_path_factory.mktemp('export') / 'model'
  export.export(trained_workdir, out)
  return out


def test_exported_function_equals_the_model_for_any_batch_size(exported, trained_workdir):
  info = json.loads((exported / export.INFO_FILE).read_text())
  assert info['image_size'] == 16 and info['num_classes'] == 3 and info['step'] == 6
  assert info['class_names'] == ['pet', 'background', 'border']
  assert info['input']['shape'] == ['b', 16, 16, 3]
  assert set(info['platforms']) == {'cpu', 'cuda', 'tpu'}
  model = jax.export.deserialize(bytearray((exported / export.MODEL_FILE).read_bytes()))
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


def _docs_snippet() -> tuple[list[str], str]:
  """(the packages docs/using.md's jax-only snippet says to install, the snippet)."""
  docs = (ROOT / 'docs' / 'using.md').read_text()
  install = re.search(r'`pip install ([a-z ]+)`', docs[docs.index('## export'):])
  snippet = docs.split('```python\nimport json\nimport jax\n', 1)[1].split('```', 1)[0]
  return install.group(1).split(), 'import json\nimport jax\n' + snippet


def _run_snippet(python, exported, tmp_path, photo_name='cat.jpg',
                 photo=None) -> subprocess.CompletedProcess:
  """The docs' snippet on a photo (default: a random 30x50 JPEG) with the exported model, in
  `python`; it saves the mask as mask.npy beside the photo."""
  _, snippet = _docs_snippet()
  assert 'unet_flax' not in snippet
  tmp_path.mkdir(exist_ok=True)
  if photo is None:
    photo = np.random.default_rng(0).integers(0, 256, (30, 50, 3), np.uint8)
  Image.fromarray(photo).save(tmp_path / photo_name)
  os.symlink(exported, tmp_path / 'model')
  # A fresh interpreter: nothing of this package is imported, only what the snippet imports.
  check = snippet.replace("'cat.jpg'", repr(photo_name)) + textwrap.dedent(f'''
      import sys
      assert mask.shape == {photo.shape[:2]} and mask.max() < 3
      assert not [m for m in sys.modules if m.startswith(('unet_flax', 'flax', 'orbax'))]
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


def test_a_crop_mode_export_and_the_docs_snippet_give_predicts_mask(tmp_path, tiny_config):
  """A crop-mode run exports its window function and the tiling contract; the docs' snippet,
  with jax and numpy alone, then gives the mask predict.py writes for a 300x200 photo."""
  tiny_config.input_mode, tiny_config.crop_size, tiny_config.ignore_label = 'crop', 16, 255
  tiny_config.tile_overlap, tiny_config.scale = 0.25, 0.5
  tiny_config.num_epochs, tiny_config.steps_per_epoch = 1, 1
  workdir = tmp_path / 'run'
  train.train_and_evaluate(tiny_config, str(workdir))
  info = export.export(workdir, tmp_path / 'model', platforms=('cpu',))
  assert info['input']['shape'] == ['b', 16, 16, 3]
  assert info['mode'] == {**info['mode'], 'name': 'crop', 'crop_size': 16, 'tile_overlap': 0.25,
                          'scale': 0.5}
  assert info['ignore_label'] == 255
  photo = gradient_picture(200, 300)
  photo[50:120, 80:200] = (250, 40, 30)  # Something the network's classes follow.
  Image.fromarray(photo).save(tmp_path / 'photo.png')
  model = inference.load_model(workdir)
  assert inference.predict_files(model, [str(tmp_path / 'photo.png')], tmp_path / 'masks') == []
  predicted = np.asarray(Image.open(tmp_path / 'masks' / 'photo_mask.png'))
  result = _run_snippet(sys.executable, tmp_path / 'model', tmp_path / 'snippet', 'photo.png',
                        photo)
  assert result.returncode == 0, result.stderr
  exported = np.load(tmp_path / 'snippet' / 'mask.npy')
  assert predicted.shape == exported.shape == (200, 300)
  assert len(np.unique(predicted)) > 1  # Classes vary: equality has teeth.
  assert (exported == predicted).mean() >= 0.999, (exported != predicted).sum()
