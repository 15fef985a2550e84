"""Class-weighted cross-entropy, soft Dice and the train step's loss, against numpy references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from unet_flax import config as config_lib
from unet_flax import errors
from unet_flax import metrics
from unet_flax import steps
from unet_flax.devices import Devices
from unet_flax import models

K = 3


def _inputs(seed=0, b=3, h=4, w=5):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(b, h, w, K)).astype(np.float32)
  labels = rng.integers(0, K, (b, h, w))
  mask = np.array([True, False, True][:b])
  return logits, labels, mask


def _softmax(logits):
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _weighted_ce_reference(logits, labels, mask, class_weights):
  total = weight_sum = 0.0
  for b in range(len(logits)):
    if not mask[b]:
      continue
    for y, x in np.ndindex(labels.shape[1:]):
      k = labels[b, y, x]
      p = _softmax(logits[b, y, x].astype(np.float64))
      total += class_weights[k] * -np.log(p[k])
      weight_sum += class_weights[k]
  return total / weight_sum


def _dice_reference(logits, labels, mask, smooth=1.0):
  probs = _softmax(logits.astype(np.float64))[mask]
  truth = np.eye(K)[labels[mask]]
  dice = [(2 * np.sum(probs[..., k] * truth[..., k]) + smooth) /
          (np.sum(probs[..., k]) + np.sum(truth[..., k]) + smooth) for k in range(K)]
  return 1 - np.mean(dice)


def test_weighted_cross_entropy_matches_numpy():
  logits, labels, mask = _inputs()
  weights = (0.5, 1.0, 4.0)
  np.testing.assert_allclose(metrics.weighted_cross_entropy(logits, labels, mask, weights),
                             _weighted_ce_reference(logits, labels, mask, weights), rtol=1e-5)


def test_equal_weights_or_none_give_the_plain_cross_entropy():
  logits, labels, mask = _inputs(1)
  plain = metrics.cross_entropy(logits, labels, mask)
  np.testing.assert_allclose(metrics.weighted_cross_entropy(logits, labels, mask, None), plain)
  np.testing.assert_allclose(metrics.weighted_cross_entropy(logits, labels, mask, (2.0,) * K),
                             plain, rtol=1e-6)
  np.testing.assert_array_equal(metrics.segmentation_loss(logits, labels, mask), plain)


def test_soft_dice_matches_numpy_and_is_zero_for_a_perfect_prediction():
  logits, labels, mask = _inputs(2)
  np.testing.assert_allclose(metrics.soft_dice_loss(logits, labels, mask),
                             _dice_reference(logits, labels, mask), rtol=1e-5)
  perfect = np.eye(K)[labels] * 50.0
  assert float(metrics.soft_dice_loss(perfect, labels, mask)) < 1e-6
  assert 0 < float(metrics.soft_dice_loss(-perfect, labels, mask)) <= 1


def test_padded_examples_count_nothing():
  logits, labels, mask = _inputs(3)
  other_logits, other_labels = logits.copy(), labels.copy()
  other_logits[~mask] = 9.0  # Change only the padded example.
  other_labels[~mask] = 0
  for loss in (lambda l, y: metrics.weighted_cross_entropy(l, y, mask, (1.0, 2.0, 3.0)),
               lambda l, y: metrics.soft_dice_loss(l, y, mask)):
    np.testing.assert_allclose(loss(other_logits, other_labels), loss(logits, labels), rtol=1e-6)


def test_segmentation_loss_adds_the_weighted_dice_term():
  logits, labels, mask = _inputs(4)
  weights = (1.0, 1.0, 3.0)
  want = (_weighted_ce_reference(logits, labels, mask, weights) +
          0.7 * _dice_reference(logits, labels, mask))
  got = metrics.segmentation_loss(logits, labels, mask, class_weights=weights, dice_weight=0.7)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def _batch(n=2, size=16):
  rng = np.random.default_rng(0)
  return {'image': rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
          'label': rng.integers(0, K, (n, size, size)).astype(np.uint8)}


def _state(config):
  """A TrainState with fixed random params from numpy: the model init compiles for seconds."""
  model = models.create(config)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, config.image_size, config.image_size, 3)), train=False))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.normal(0, 0.3, s.shape).astype(s.dtype), shapes['params'])
  return steps.TrainState.create(apply_fn=model.apply, params=params,
                                 tx=steps.create_optimizer(config))


def test_train_step_loss_is_the_configured_segmentation_loss(tiny_config):
  tiny_config.dropout_rate = 0.0
  tiny_config.class_weights = (1.0, 2.0, 5.0)
  tiny_config.dice_weight = 0.5
  state = _state(tiny_config)
  batch = _batch()
  logits = np.asarray(jax.jit(functools.partial(state.apply_fn, train=False))(
      {'params': state.params}, batch['image'] / 255.0))
  want = (_weighted_ce_reference(logits, batch['label'], np.ones(2, bool), (1.0, 2.0, 5.0)) +
          0.5 * _dice_reference(logits, batch['label'], np.ones(2, bool)))
  _, plain = jax.jit(steps.train_step)(state, batch, jax.random.key(1))  # Plain cross-entropy.
  np.testing.assert_allclose(
      plain['loss'], _weighted_ce_reference(logits, batch['label'], np.ones(2, bool), (1,) * K),
      rtol=1e-4)
  step, _ = steps.compile_steps(tiny_config, Devices(tiny_config.batch_size))
  _, step_metrics = step(state, batch, jax.random.key(1))  # Donates the state: last.
  np.testing.assert_allclose(step_metrics['loss'], want, rtol=1e-4)


def test_class_weights_of_the_wrong_length_are_a_user_error(tiny_config):
  tiny_config.class_weights = (1.0, 2.0)
  with pytest.raises(errors.UserError, match='config.class_weights'):
    config_lib.validate(tiny_config)


def test_warmup_cosine_schedule_starts_at_zero_and_peaks_after_warmup(tiny_config):
  tiny_config.schedule = 'warmup_cosine'
  tiny_config.warmup_epochs = 1.0
  tiny_config.num_epochs = 3  # 24 examples // batch 8: 3 steps an epoch, 9 in all.
  tx = steps.create_optimizer(tiny_config, steps_per_epoch=3)
  params = {'w': np.zeros(3, np.float32)}
  state = tx.init(params)
  sizes = []
  for _ in range(9):
    updates, state = tx.update({'w': np.ones(3, np.float32)}, state, params)
    sizes.append(float(np.abs(updates['w'][0])))
  # Adam's first steps are ~lr in size, so the update follows the schedule.
  schedule = optax.warmup_cosine_decay_schedule(0.0, tiny_config.learning_rate, 3, 9)
  np.testing.assert_allclose(sizes, [schedule(i) for i in range(9)], rtol=1e-3, atol=1e-9)
  assert sizes[0] == 0.0 and sizes[3] == pytest.approx(tiny_config.learning_rate, rel=1e-3)


@pytest.mark.parametrize('field, value, match', [('schedule', 'linear', 'config.schedule'),
                                                 ('warmup_epochs', 2.0, 'config.warmup_epochs')])
def test_bad_schedule_settings_are_user_errors(tiny_config, field, value, match):
  tiny_config.schedule = 'warmup_cosine'
  tiny_config[field] = value
  with pytest.raises(errors.UserError, match=match):
    config_lib.validate(tiny_config)
