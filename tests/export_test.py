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
from unet_flax import errors
from unet_flax import export
from unet_flax import inference



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
    np.testing.assert_allclose(logits, restored.logits_fn()(restored.params, images),
                               rtol=1e-6, atol=1e-6)


def _readme_snippet() -> tuple[list[str], str]:
  """(the packages the README's jax-only snippet says to install, the snippet)."""
  readme = (ROOT / 'README.md').read_text()
  install = re.search(r'`pip install ([a-z ]+)`', readme[readme.index('## Use the trained model'):])
  snippet = readme.split('```python\nimport json\nimport jax\n', 1)[1].split('```', 1)[0]
  return install.group(1).split(), 'import json\nimport jax\n' + snippet


def _run_snippet(python, exported, tmp_path) -> subprocess.CompletedProcess:
  """The README's snippet on a 30x50 photo with the exported model, checked, in `python`."""
  _, snippet = _readme_snippet()
  assert 'unet_flax' not in snippet
  tmp_path.mkdir(exist_ok=True)
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 50, 3), np.uint8)).save(
      tmp_path / 'cat.jpg')
  os.symlink(exported, tmp_path / 'model')
  # A fresh interpreter: nothing of this package is imported, only what the snippet imports.
  check = snippet + textwrap.dedent('''
      import sys
      assert mask.shape == (30, 50) and mask.max() < 3
      assert not [m for m in sys.modules if m.startswith(('unet_flax', 'flax', 'orbax'))]
  ''')
  return subprocess.run([python, '-c', check], cwd=tmp_path, capture_output=True, text=True,
                        timeout=120, env=dict(os.environ, JAX_PLATFORMS='cpu'))


def test_readme_snippet_runs_without_unet_flax(exported, tmp_path):
  result = _run_snippet(sys.executable, exported, tmp_path)
  assert result.returncode == 0, result.stderr
  assert "'pet'" in result.stdout


@pytest.mark.skipif(not os.environ.get('UNET_FLAX_CLEAN_VENV_TEST'),
                    reason='installs packages into a new venv; CI sets UNET_FLAX_CLEAN_VENV_TEST=1')
def test_readme_snippet_runs_in_a_venv_with_only_the_packages_it_lists(exported, tmp_path):
  packages, _ = _readme_snippet()
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
