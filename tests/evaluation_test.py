"""evaluate.py: scores equal to the trainer's, original-resolution counts, per-image IoU, flip
TTA."""

import functools
import json

import jax
import numpy as np
import pytest
from PIL import Image
import tensorflow_datasets as tfds

from tests.conftest import FOLDER_CLASSES
from tests.conftest import colour_counts
from tests.conftest import png_pixels
from tests.conftest import reference_flip_tta_logits
from tests.conftest import run_script
from tests.conftest import write_folder_data
from unet_flax import checkpoints
from unet_flax import errors
from unet_flax import evaluation
from unet_flax import inference
from unet_flax import input_pipeline
from unet_flax import metrics
from unet_flax import models
from unet_flax import modes
from unet_flax import plots
from unet_flax import sources
from unet_flax import synthetic
from unet_flax import train

def _assert_pictures(report, stem):
  """<stem>_confusion.png is the report's confusion matrix; <stem>_worst.png shows masks."""
  assert report['files'] == {'json': f'{stem}.json', 'confusion_matrix': f'{stem}_confusion.png',
                             'worst': f'{stem}_worst.png'}
  tta = ', flip TTA' if report['flip_tta'] else ''
  title = (f'step {report["step"]} on {report["dataset"]} {report["split"]} '
           f'({report["num_examples"]} images)\nat {report["resolution"]} resolution{tta}, rows '
           'sum to 100%')
  plots.confusion_matrix(f'{stem}_redrawn.png', np.array(report['confusion_matrix']),
                         list(report['per_class_iou']), title)
  np.testing.assert_array_equal(png_pixels(f'{stem}_confusion.png'),
                                png_pixels(f'{stem}_redrawn.png'))
  # Every row's true mask holds each class (the synthetic and folder masks do), drawn large.
  rows = len(report['worst'])
  counts = colour_counts(f'{stem}_worst.png', plots.class_palette(3))
  assert min(counts) > 300 * rows, counts


def test_per_image_confusions_and_mean_iou_equal_metrics_iou_of_each_image():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, (4, 5, 6)).astype(np.uint8)
  predictions = rng.integers(0, 3, (4, 5, 6)).astype(np.uint8)
  labels[1] = predictions[1] = np.where(labels[1] == 2, 0, labels[1])  # Class 2 absent: no IoU.
  per_image = metrics.host_confusion_matrices(labels, predictions, 3)
  for i in range(4):
    expected = np.zeros((3, 3), np.int64)
    np.add.at(expected, (labels[i].ravel(), predictions[i].ravel()), 1)
    np.testing.assert_array_equal(per_image[i], expected)
  expected_iou = [float(jax.device_get(metrics.scores(c))['mean_iou']) for c in per_image]
  np.testing.assert_allclose(evaluation.image_mean_iou(per_image), expected_iou, rtol=1e-6)
  assert evaluation.image_mean_iou(per_image)[1] == 1.0


def test_evaluate_equals_the_trainers_eval_and_draws_pictures(trained_workdir, tmp_path):
  lines = [json.loads(l) for l in (trained_workdir / 'metrics.jsonl').read_text().splitlines()]
  trainer = [l for l in lines if l['split'] == 'eval'][-1]
  printed = []
  report = evaluation.evaluate_workdir(trained_workdir, out=tmp_path, worst_k=2, log=printed.append)
  assert report['step'] == trainer['step'] == 6
  assert report['confusion_matrix'] == trainer['confusion_matrix']
  assert report['mean_iou'] == trainer['mean_iou']
  assert report['pixel_accuracy'] == trainer['pixel_accuracy']
  assert "at the network's 16x16 resolution" in printed[0]
  assert json.loads((tmp_path / 'step_6.json').read_text()) == report
  _assert_pictures(report, tmp_path / 'step_6')
  worst = [w['mean_iou'] for w in report['worst']]
  assert len(worst) == 2 and worst == sorted(worst)


def test_evaluate_at_original_resolution_counts_every_original_pixel(trained_workdir, tfds_dir,
                                                                     tmp_path):
  printed = []
  report = evaluation.evaluate_workdir(trained_workdir, out=tmp_path / 'original.json', worst_k=1,
                               original_resolution=True, log=printed.append)
  source = synthetic.builder('tiny', tfds_dir).as_data_source(
      split='test', decoders={'image': tfds.decode.SkipDecoding()})
  pixels = sum(int(np.prod(source[i]['segmentation_mask'].shape)) for i in range(len(source)))
  assert pixels != 12 * 16 * 16
  assert np.sum(report['confusion_matrix']) == pixels
  assert "at each image's original resolution" in printed[0]
  _assert_pictures(report, tmp_path / 'original')


def test_evaluate_with_flip_tta_scores_the_mean_softmax_of_image_and_mirror(tmp_path,
                                                                           tiny_config):
  # One step from the initial parameters: unlike the trained workdir, which calls every pixel
  # background, its classes vary and its mirror's differ, so a path that skipped TTA would show.
  tiny_config.num_epochs, tiny_config.steps_per_epoch = 1, 1
  workdir = tmp_path / 'run'
  train.train_and_evaluate(tiny_config, str(workdir))
  model = inference.load_model(workdir)
  forward = functools.partial(jax.jit(models.forward(tiny_config)), model.params)
  source = sources.source_of(tiny_config)
  data = input_pipeline.load_split(source, 'test', image_size=16)
  originals = sources.originals(source, 'test')
  logits = reference_flip_tta_logits(forward, data.stack()[0]).astype(np.float32)

  printed = []
  network = evaluation.evaluate_workdir(workdir, out=tmp_path, worst_k=2, flip_tta=True,
                                log=printed.append)
  assert network['flip_tta'] is True and network['resolution'] == 'network'
  assert "at the network's 16x16 resolution (as the trainer evaluates), with flip TTA" in printed[0]
  expected = metrics.host_confusion_matrices(data.stack()[1], logits.argmax(-1), 3).sum(axis=0)
  np.testing.assert_array_equal(network['confusion_matrix'], expected)
  # Its files are beside the plain evaluation's, not over them.
  assert json.loads((tmp_path / 'step_1_flip_tta.json').read_text()) == network
  _assert_pictures(network, tmp_path / 'step_1_flip_tta')
  plain = evaluation.evaluate_workdir(workdir, out=tmp_path, worst_k=0, log=printed.append)
  tables = [line for line in printed if line.startswith('evaluation of')]
  assert plain['flip_tta'] is False and 'flip TTA' not in tables[1]
  assert (tmp_path / 'step_1.json').exists() and (tmp_path / 'step_1_flip_tta.json').exists()
  assert plain['confusion_matrix'] != network['confusion_matrix']

  original = evaluation.evaluate_workdir(workdir, out=tmp_path, worst_k=1, flip_tta=True,
                                 original_resolution=True, log=printed.append)
  assert original['flip_tta'] is True and original['resolution'] == 'original'

  def upsampled_counts(all_logits):
    return sum(metrics.host_confusion_matrices(labels[None], modes.upsample_classes(
        image_logits, *labels.shape)[None], 3)[0]
               for image_logits, (_, _, labels) in zip(all_logits, originals))
  expected = upsampled_counts(logits)
  # Of ~500,000 upsampled pixels a few sit on a near-tie of two classes' interpolated scores,
  # where float32 and the float64 reference may part (measured: 1 pixel, 2 counts); no TTA moves
  # thousands.
  assert np.abs(np.subtract(original['confusion_matrix'], expected)).sum() <= 10
  no_tta = upsampled_counts(np.asarray(forward(data.stack()[0])))
  assert np.abs(no_tta - expected).sum() > 1000
  _assert_pictures(original, tmp_path / 'step_1_original_flip_tta')


def test_a_run_with_ema_is_scored_with_the_average_as_the_trainer_did_or_its_weights(
    tmp_path, tiny_config):
  tiny_config.num_epochs, tiny_config.steps_per_epoch, tiny_config.ema_decay = 1, 2, 0.5
  workdir = tmp_path / 'run'
  train.train_and_evaluate(tiny_config, str(workdir))
  trainer = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()
             if json.loads(l)['split'] == 'eval'][-1]
  data = input_pipeline.load_split(sources.source_of(tiny_config), 'test', image_size=16)
  forward = jax.jit(models.forward(tiny_config))
  printed = []
  matrices = []
  for ema in (True, False):
    _, params = checkpoints.restore_params(workdir, tiny_config, ema=ema)
    predicted = np.asarray(forward(params, data.stack()[0])).argmax(-1)
    report = evaluation.evaluate_workdir(workdir, out=tmp_path, worst_k=0, ema=ema, log=printed.append)
    assert report['ema'] is ema
    np.testing.assert_array_equal(report['confusion_matrix'],
                                  metrics.host_confusion_matrices(data.stack()[1], predicted, 3).sum(axis=0))
    matrices.append(report['confusion_matrix'])
  assert trainer['mean_iou'] == pytest.approx(
      json.loads((tmp_path / 'step_2.json').read_text())['mean_iou'])
  tables = [line for line in printed if line.startswith('evaluation of')]
  assert "the weights' moving average" in tables[0]
  assert 'the trained weights (not their moving average)' in tables[1]
  assert (tmp_path / 'step_2_no_ema.json').exists()
  assert matrices[0] != matrices[1]  # Two steps at decay 0.5 leave the average elsewhere.


def test_evaluate_a_folder_data_set_at_both_resolutions(tmp_path, tiny_config):
  data = write_folder_data(tmp_path / 'data')
  test_stems = ['cat_01', 'dog_01']  # cat_01's mask is a palette PNG: its indices are classes.
  (data / 'test.txt').write_text('\n'.join(test_stems) + '\n')
  tiny_config.dataset, tiny_config.data_dir = f'folder:{data}', None
  tiny_config.num_epochs = 1
  workdir = tmp_path / 'run'
  train.train_and_evaluate(tiny_config, str(workdir))
  lines = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  trainer = [l for l in lines if l['split'] == 'eval'][-1]

  network = evaluation.evaluate_workdir(workdir, out=tmp_path / 'network.json', worst_k=1,
                                log=lambda _: None)
  assert network['step'] == trainer['step'] == 1  # 8 train images // batch 8.
  assert network['confusion_matrix'] == trainer['confusion_matrix']
  assert network['mean_iou'] == trainer['mean_iou']
  assert network['pixel_accuracy'] == trainer['pixel_accuracy']

  original = evaluation.evaluate_workdir(workdir, out=tmp_path / 'original.json', worst_k=2,
                                 original_resolution=True, log=lambda _: None)
  masks = [np.asarray(Image.open(data / 'masks' / f'{s}.png')) for s in test_stems]
  truth = np.bincount(np.concatenate([m.ravel() for m in masks]), minlength=FOLDER_CLASSES)
  assert np.sum(original['confusion_matrix']) == sum(m.size for m in masks) == 20 * 24 + 24 * 16
  np.testing.assert_array_equal(np.sum(original['confusion_matrix'], axis=1), truth)  # No shift.
  assert sorted(w['file_name'] for w in original['worst']) == ['cat_01.jpg', 'dog_01.jpg']
  _assert_pictures(original, tmp_path / 'original')


def test_evaluate_cli_reports_a_missing_workdir_in_one_line(tmp_path):
  result = run_script('evaluate.py', '--workdir', tmp_path / 'nowhere', cache=tmp_path / 'cache')
  assert result.returncode == 1
  assert result.stderr.strip() == (f'error: --workdir {tmp_path / "nowhere"} is not a directory; '
                                   'pass the --workdir of a training run '
                                   '(python train.py --workdir ...)')


def test_evaluate_never_writes_through_a_link_planted_in_a_received_workdir(trained_workdir,
                                                                            tmp_path):
  """A workdir from someone else whose eval/step_6.json links to a file of the user's: refused
  in one line, the file untouched."""
  import shutil  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / 'received'
  shutil.copytree(trained_workdir, workdir)
  shutil.rmtree(workdir / 'eval', ignore_errors=True)
  (workdir / 'eval').mkdir()
  victim = tmp_path / 'victim.txt'
  victim.write_text('mine')
  (workdir / 'eval' / 'step_6.json').symlink_to(victim)
  with pytest.raises(errors.UserError, match=r'step_6.json is a symbolic link \(to .*victim.txt\)'):
    evaluation.evaluate_workdir(workdir, worst_k=0, log=lambda _: None)
  assert victim.read_text() == 'mine'
  assert sorted(p.name for p in (workdir / 'eval').iterdir()) == ['step_6.json']


def test_an_evaluation_of_another_data_dir_is_written_beside_the_runs_own(trained_workdir,
                                                                        tfds_dir, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  other = tmp_path / 'other_tfds'
  shutil.copytree(tfds_dir, other)
  own = evaluation.evaluate_workdir(trained_workdir, worst_k=0, out=tmp_path / 'eval',
                                    log=lambda _: None)
  elsewhere = evaluation.evaluate_workdir(trained_workdir, worst_k=0, out=tmp_path / 'eval',
                                          data_dir=str(other), log=lambda _: None)
  assert own['files']['json'] == str(tmp_path / 'eval' / 'step_6.json')
  assert elsewhere['files']['json'] != own['files']['json']
  assert 'other-tfds' in elsewhere['files']['json']
  assert json.loads((tmp_path / 'eval' / 'step_6.json').read_text()) == own


def test_an_evaluation_of_a_split_slice_is_named_without_brackets(trained_workdir, tmp_path):
  files = {split: evaluation.evaluate_workdir(trained_workdir, worst_k=0, out=tmp_path / 'eval',
                                              split=split, log=lambda _: None)['files']['json']
           for split in ('test[:50%]', 'test[50%:]')}
  assert files == {'test[:50%]': str(tmp_path / 'eval' / 'step_6_test_to50pct.json'),
                   'test[50%:]': str(tmp_path / 'eval' / 'step_6_test_50pctto.json')}


def test_an_evaluation_of_an_empty_slice_is_one_line_naming_the_flag(trained_workdir, tmp_path):
  with pytest.raises(errors.UserError, match=r'^--split test\[:0\] holds no examples; choose '
                     r'another split or a slice that holds some$'):
    evaluation.evaluate_workdir(trained_workdir, worst_k=0, out=tmp_path / 'eval',
                                split='test[:0]', log=lambda _: None)
  assert not list(tmp_path.rglob('*'))  # Not even the --out folder.


def test_evaluate_never_prepares_a_data_set_where_a_received_config_points(trained_workdir,
                                                                          tmp_path):
  """A received workdir whose config.json names a data_dir of someone else's: evaluate reads
  there, and where nothing is prepared it says so instead of writing a data set there."""
  import shutil  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / 'received'
  shutil.copytree(trained_workdir, workdir)
  config = json.loads((workdir / 'config.json').read_text())
  elsewhere = tmp_path / 'not_mine'
  config['data_dir'] = str(elsewhere)
  (workdir / 'config.json').write_text(json.dumps(config))
  with pytest.raises(errors.UserError, match=r'^the data set synthetic_pets/tiny is not prepared '
                     f'in {elsewhere}, the data_dir of the run'):
    evaluation.evaluate_workdir(workdir, worst_k=0, out=tmp_path / 'eval', log=lambda _: None)
  assert not elsewhere.exists()


def test_noema_on_a_run_without_an_average_is_one_line_not_a_silent_rewrite(trained_workdir,
                                                                          tmp_path):
  with pytest.raises(errors.UserError, match=r'^--noema: the run in .* keeps no moving average'):
    evaluation.evaluate_workdir(trained_workdir, ema=False, out=tmp_path, log=lambda _: None)
  assert not list(tmp_path.iterdir())
