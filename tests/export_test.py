"""export.py's serialized model: same logits as the model, any batch size, usable without us."""

import ast
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from PIL import Image

from unet_flax import errors
from unet_flax import export
from unet_flax import inference

ROOT = __import__('pathlib').Path(__file__).resolve().parents[1]


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
  _, state = inference.load_model(trained_workdir)
  rng = np.random.default_rng(0)
  for batch in (1, 3):
    images = rng.integers(0, 256, (batch, 16, 16, 3), dtype=np.uint8)
    logits = model.call(images)
    assert logits.shape == (batch, 16, 16, 3) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, jax.jit(inference.logits_fn)(state, images),
                               rtol=1e-6, atol=1e-6)


def test_docstring_snippet_runs_without_unet_flax(exported, tmp_path):
  doc = ast.get_docstring(ast.parse((ROOT / 'unet_flax' / 'export.py').read_text()))
  snippet = textwrap.dedent(doc.split('as predict.py does):\n', 1)[1])
  assert 'unet_flax' not in snippet
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 50, 3), np.uint8)).save(
      tmp_path / 'cat.jpg')
  os.symlink(exported, tmp_path / 'model')
  # A fresh interpreter: nothing of this package is imported, only what the snippet imports.
  check = snippet + textwrap.dedent('''
      import sys
      assert mask.shape == (30, 50) and mask.max() < 3
      assert not [m for m in sys.modules if m.startswith(('unet_flax', 'flax', 'orbax'))]
  ''')
  result = subprocess.run([sys.executable, '-c', check], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS='cpu'))
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
