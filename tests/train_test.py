"""train_step, eval_step and train_and_evaluate on tiny data."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unet_flax import checkpoints
from unet_flax import config as config_lib
from unet_flax import errors
from unet_flax import metrics
from unet_flax import train
from unet_flax import steps
from unet_flax.devices import Devices


def _batch(config, n, seed=0):
  rng = np.random.default_rng(seed)
  size = config.image_size
  labels = rng.integers(0, config.num_classes, (n, size, size)).astype(np.uint8)
  # Images that carry the labels, so a few steps can fit them.
  images = (labels[..., None] * 100 + rng.integers(0, 40, (n, size, size, 3))).astype(np.uint8)
  return {'image': images, 'label': labels}


def test_train_steps_lower_the_loss_on_a_fixed_batch(tiny_config):
  tiny_config.dropout_rate = 0.0
  tiny_config.learning_rate = 1e-2
  state = steps.create_train_state(tiny_config, jax.random.key(0))
  step = jax.jit(steps.train_step, donate_argnums=0)
  batch = _batch(tiny_config, 4)
  losses = []
  for _ in range(20):
    state, step_metrics = step(state, batch, jax.random.key(1))
    losses.append(float(step_metrics['loss']))
  assert int(state.step) == 20
  assert losses[-1] < 0.6 * losses[0], losses


def test_train_step_loss_is_cross_entropy_of_the_model(tiny_config):
  tiny_config.dropout_rate = 0.0
  state = steps.create_train_state(tiny_config, jax.random.key(0))
  batch = _batch(tiny_config, 2)
  logits = state.apply_fn({'params': state.params}, batch['image'] / 255.0, train=False)
  log_probs = jax.nn.log_softmax(logits)
  expected = -np.mean(np.take_along_axis(np.asarray(log_probs),
                                         batch['label'][..., None].astype(int), -1))
  _, step_metrics = steps.train_step(state, batch, jax.random.key(1))
  np.testing.assert_allclose(step_metrics['loss'], expected, rtol=1e-5)


def test_eval_step_counts_only_valid_examples(tiny_config):
  state = steps.create_train_state(tiny_config, jax.random.key(0))
  batch = _batch(tiny_config, 3)
  batch['mask'] = np.array([True, False, True])
  confusion = steps.eval_step(state, batch, tiny_config.num_classes)
  predictions = np.asarray(steps.predict(state, batch['image']))
  expected = metrics.confusion_matrix(batch['label'][[0, 2]], predictions[[0, 2]],
                                      tiny_config.num_classes, np.ones(2, bool))
  np.testing.assert_array_equal(confusion, expected)
  assert int(confusion.sum()) == 2 * tiny_config.image_size ** 2


def test_bfloat16_computes_in_bf16_with_float32_params_and_loss(tiny_config):
  tiny_config.dtype = 'bfloat16'
  state = steps.create_train_state(tiny_config, jax.random.key(0))
  new_state, step_metrics = steps.train_step(state, _batch(tiny_config, 2), jax.random.key(1))
  assert step_metrics['loss'].dtype == jnp.float32
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(new_state.params))
  jaxpr = jax.make_jaxpr(steps.train_step)(state, _batch(tiny_config, 2), jax.random.key(1))
  assert 'bf16' in str(jaxpr)


def test_train_and_evaluate_writes_checkpoint_metrics_and_pictures(trained_workdir):
  lines = [json.loads(l) for l in (trained_workdir / 'metrics.jsonl').read_text().splitlines()]
  evals = [l for l in lines if l['split'] == 'eval']
  assert [e['step'] for e in evals] == [3, 6]  # 24 examples // batch 8 = 3 steps an epoch.
  confusion = np.array(evals[-1]['confusion_matrix'])
  assert confusion.sum() == 12 * 16 * 16  # Every test example exactly once.
  assert 0.0 <= evals[-1]['mean_iou'] <= 1.0
  assert [l['step'] for l in lines if l['split'] == 'train'] == [1, 2, 3, 4, 5, 6]
  assert (trained_workdir / 'predictions' / 'step_6.png').read_bytes()[:4] == b'\x89PNG'
  assert list((trained_workdir / 'tensorboard').glob('events.out.tfevents.*'))
  assert checkpoints.load_config(trained_workdir).widths == (4, 8)


def test_second_run_resumes_from_the_saved_step(tmp_path, tiny_config, capsys):
  tiny_config.num_epochs = 1
  first = train.train_and_evaluate(tiny_config, str(tmp_path))
  assert int(first.step) == 3
  tiny_config.num_epochs = 2
  capsys.readouterr()
  second = train.train_and_evaluate(tiny_config, str(tmp_path))
  assert 'resumed from step 3 of 6' in capsys.readouterr().out
  assert int(second.step) == 6
  train_steps = [json.loads(l)['step'] for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()
                 if json.loads(l)['split'] == 'train']
  assert train_steps == [1, 2, 3, 4, 5, 6]  # Steps 1-3 were not run again.


@pytest.mark.parametrize('class_weights', [None, (1.0, 0.5, 3.0)])
def test_microbatched_step_has_the_whole_batchs_loss_and_gradient(tiny_config, class_weights):
  tiny_config.dropout_rate = 0.0  # Microbatches draw their own dropout masks.
  batch = _batch(tiny_config, 8)
  results = []
  for microbatches in (1, 4):
    state = steps.create_train_state(tiny_config, jax.random.key(0))
    results.append(steps.train_step(state, batch, jax.random.key(1), class_weights=class_weights,
                                    num_microbatches=microbatches))
  (whole, whole_metrics), (parts, parts_metrics) = results
  np.testing.assert_allclose(parts_metrics['loss'], whole_metrics['loss'], rtol=1e-6)
  # After one step Adam's first moment is (1 - b1) x the gradient.
  grads = [jax.tree.leaves(s.opt_state.inner_state[0].mu) for s in (whole, parts)]
  for got, want in zip(grads[1], grads[0]):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-8)


def test_num_microbatches(tiny_config):
  def count(batch_size, **overrides):
    tiny_config.batch_size = batch_size
    tiny_config.update(overrides)
    return steps.num_microbatches(tiny_config, Devices(batch_size))
  # Auto on CPU: microbatches of 8 to 16 examples, else the whole batch.
  assert [count(b) for b in (8, 16, 24, 32, 64, 17)] == [1, 1, 2, 2, 4, 1]
  assert count(64, dice_weight=0.5) == 1  # A batch's Dice is not a sum over microbatches.
  assert count(64, dice_weight=0.0, num_microbatches=8) == 8
  with pytest.raises(errors.UserError, match='config.num_microbatches=3 must divide the 64'):
    count(64, num_microbatches=3)
  tiny_config.update({'num_microbatches': 2, 'dice_weight': 0.5})
  with pytest.raises(errors.UserError, match='config.dice_weight=0.5'):
    config_lib.validate(tiny_config)


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
  train.train_and_evaluate(tiny_config, tmp_path)
  records = [json.loads(l) for l in metrics_file.read_text().splitlines()]
  assert [r['step'] for r in records if r['split'] == 'train'] == [1, 2, 3, 4, 5, 6]
  assert metrics_file.read_text().endswith('\n')
