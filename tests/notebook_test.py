"""notebooks/quickstart.ipynb, executed end to end in a Jupyter kernel with tiny settings."""

import base64
import json
import pathlib
import re

import jax
import nbclient
import nbformat
import numpy as np

from configs import quickstart
from tests import conftest
from unet_flax import checkpoints
from unet_flax import metrics
from unet_flax import models
from unet_flax import reporting

NOTEBOOK = conftest.ROOT / 'notebooks' / 'quickstart.ipynb'


def _parameters_cell(notebook):
  cells = [c for c in notebook.cells if 'parameters' in c.metadata.get('tags', [])]
  assert len(cells) == 1, 'the notebook needs exactly one cell tagged "parameters"'
  assert cells[0] is next(c for c in notebook.cells if c.cell_type == 'code'), (
      'the parameters cell must be the first code cell')
  return cells[0]


def _tiny_parameters(tiny, workdir: str) -> str:
  """The parameters cell for the tiny config's data and model, one epoch, and `workdir`."""
  values = {field: tiny[field] for field in ('dataset', 'data_dir', 'image_size', 'widths',
                                             'batch_size')}
  values.update(num_epochs=1, workdir=workdir)
  return '\n'.join(f'{name} = {value!r}' for name, value in values.items())


def _text(cell) -> str:
  """A cell's stream and text/plain outputs, joined."""
  parts = []
  for output in cell.outputs:
    if output.output_type == 'stream':
      parts.append(output.text)
    elif 'data' in output and 'text/plain' in output.data:
      parts.append(output.data['text/plain'])
  return ''.join(parts)


def _cell_calling(notebook, call: str):
  cells = [c for c in notebook.cells if c.cell_type == 'code' and call in c.source]
  assert len(cells) == 1, f'one code cell should call {call}'
  return cells[0]


def _pngs(cell) -> list[bytes]:
  """The PNG pictures a cell displayed."""
  return [base64.b64decode(output.data['image/png']) for output in cell.outputs
          if 'image/png' in output.get('data', {})]


def test_stored_notebook_has_no_outputs_and_quickstart_parameters():
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(notebook)
  code = [c for c in notebook.cells if c.cell_type == 'code']
  assert all(not c.outputs and c.execution_count is None for c in code)
  values = {}
  exec(_parameters_cell(notebook).source, {}, values)  # pylint: disable=exec-used
  assert set(values) == {'dataset', 'data_dir', 'image_size', 'widths', 'batch_size',
                         'num_epochs', 'workdir'}
  expected = quickstart.get_config()
  for field in ('dataset', 'data_dir', 'image_size', 'widths', 'batch_size', 'num_epochs'):
    assert values[field] == expected[field], field
  assert not pathlib.Path(values['workdir']).is_absolute()


def test_notebook_runs_end_to_end_with_tiny_settings(tfds_dir, tmp_path):
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  tiny = conftest.make_tiny_config(tfds_dir)
  # Relative, as the stored notebook's: the kernel runs in tmp_path.
  _parameters_cell(notebook).source = _tiny_parameters(tiny, 'runs/notebook')
  client = nbclient.NotebookClient(notebook, kernel_name='python3', timeout=300,
                                   resources={'metadata': {'path': str(tmp_path)}})
  client.execute(env=conftest.script_env(tmp_path / 'cache'))

  errors = [o for c in notebook.cells if c.cell_type == 'code' for o in c.outputs
            if o.output_type == 'error']
  assert not errors, errors

  # The parameter count it prints is the tiny model's; the chapter's is Keras's.
  expected = models.param_count(jax.eval_shape(lambda r: models.init_params(tiny, r),
                                               jax.random.key(0)))
  model_text = _text(_cell_calling(notebook, 'models.create('))
  printed = re.search(r'Model created with ([\d,]+) parameters\.', model_text)
  assert printed and int(printed.group(1).replace(',', '')) == expected, model_text
  assert "The chapter's model (configs/default.py): 8,557,635 parameters" in model_text

  # Training wrote a checkpoint into the workdir the parameters cell named.
  workdir = tmp_path / 'runs' / 'notebook'
  assert checkpoints.restorable_steps(workdir), list(workdir.iterdir())

  # Pictures: the example beside its trimap, the curves, the predictions, the confusion matrix.
  assert len(_pngs(_cell_calling(notebook, 'train_batches('))) == 1
  assert _pngs(_cell_calling(notebook, 'train.train_and_evaluate(')) == [
      (workdir / 'curves.png').read_bytes()]
  assert _pngs(_cell_calling(notebook, 'plots.predictions(')) == [
      (workdir / 'notebook_predictions.png').read_bytes()]

  # The IoU table printed is that of the confusion matrix evaluate wrote, and the trainer's last.
  eval_cell = _cell_calling(notebook, 'evaluation.evaluate_workdir(')
  [report_path] = (workdir / 'eval').glob('step_*.json')
  report = json.loads(report_path.read_text())
  assert _pngs(eval_cell) == [pathlib.Path(report['files']['confusion_matrix']).read_bytes()]
  table = reporting.iou_table(jax.device_get(metrics.scores(np.asarray(report['confusion_matrix']))),
                              ('pet', 'background', 'border'))
  assert table in _text(eval_cell)
  assert table in _text(_cell_calling(notebook, 'train.train_and_evaluate('))
  assert f"Test Mean IoU: {report['mean_iou']:.4f}" in _text(eval_cell)
