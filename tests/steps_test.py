"""steps.py on 2..4 examples of 16x16: the train step's loss and update, the optimizer's schedule
and non-finite handling, the eval step's counts, and bfloat16 compute."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import fixed_state
from tests.conftest import labelled_batch
from tests.conftest import reference_cross_entropy
from tests.conftest import reference_soft_dice
from unet_flax import layers
from unet_flax import metrics
from unet_flax import models
from unet_flax import steps
from unet_flax.devices import Devices


def _logits(config, params, images):
  """The model's logits in eval mode, from the module itself: images [B, H, W, 3] uint8 ->
  [B, H, W, K]."""
  return jax.jit(models.create(config).apply, static_argnames='train')(
      {'params': params}, images / 255.0, train=False)


def test_train_steps_lower_the_loss_on_a_fixed_batch(tiny_config):
  tiny_config.dropout_rate = 0.0
  tiny_config.learning_rate = 1e-2
  state = jax.jit(functools.partial(steps.create_train_state, tiny_config))(jax.random.key(0))
  step = jax.jit(functools.partial(steps.train_step, models.forward(tiny_config)),
                 donate_argnums=0)
  batch = labelled_batch(tiny_config, 4)
  losses = []
  for _ in range(20):
    state, step_metrics = step(state, batch, jax.random.key(1))
    losses.append(float(step_metrics['loss']))
  assert int(state.step) == 20
  assert losses[-1] < 0.6 * losses[0], losses


def test_train_step_loss_is_the_cross_entropy_of_the_model_and_its_update_is_adams(tiny_config):
  tiny_config.dropout_rate = 0.0
  state = fixed_state(tiny_config)
  batch = labelled_batch(tiny_config, 2)
  logits = np.asarray(_logits(tiny_config, state.params, batch['image']))
  expected = reference_cross_entropy(logits, batch['label'], np.ones(2, bool))
  new_state, step_metrics = jax.jit(functools.partial(steps.train_step, models.forward(
      tiny_config)))(state, batch, jax.random.key(1))
  np.testing.assert_allclose(step_metrics['loss'], expected, rtol=1e-5)
  # Adam's first step moves each parameter by lr * g / (|g| + eps): about lr, against the
  # gradient's sign.
  grads = jax.jit(jax.grad(lambda p: metrics.cross_entropy(
      models.forward(tiny_config)(p, batch['image']), batch['label'],
      np.ones(2, bool))))(state.params)
  lr, eps = tiny_config.learning_rate, tiny_config.adam_eps
  for new, old, g in zip(*(jax.tree.leaves(t) for t in (new_state.params, state.params, grads))):
    g = np.asarray(g, np.float64)
    np.testing.assert_allclose(new - old, -lr * g / (np.abs(g) + eps), rtol=2e-2, atol=1e-7)
  assert int(new_state.step) == 1


def test_train_step_loss_is_the_configured_segmentation_loss(tiny_config):
  tiny_config.dropout_rate = 0.0
  tiny_config.class_weights = (1.0, 2.0, 5.0)
  tiny_config.dice_weight = 0.5
  state = fixed_state(tiny_config)
  batch = labelled_batch(tiny_config, 2)
  valid = np.ones(2, bool)
  logits = np.asarray(_logits(tiny_config, state.params, batch['image']))
  forward = models.forward(tiny_config)
  # Plain cross-entropy.
  _, plain = jax.jit(functools.partial(steps.train_step, forward))(state, batch, jax.random.key(1))
  np.testing.assert_allclose(plain['loss'], reference_cross_entropy(logits, batch['label'], valid),
                             rtol=1e-4)
  step, _ = steps.compile_steps(tiny_config, Devices(tiny_config.batch_size), forward)
  _, step_metrics = step(state, batch, jax.random.key(1))
  want = (reference_cross_entropy(logits, batch['label'], valid, (1.0, 2.0, 5.0)) +
          0.5 * reference_soft_dice(logits, batch['label'], valid))
  np.testing.assert_allclose(step_metrics['loss'], want, rtol=1e-4)
  assert int(step_metrics['nonfinite_updates']) == 0


def test_eval_step_counts_only_valid_examples(tiny_config):
  state = fixed_state(tiny_config)
  batch = labelled_batch(tiny_config, 3)
  batch['mask'] = np.array([True, False, True])
  k = tiny_config.num_classes
  forward = models.forward(tiny_config)
  per_example = jax.jit(steps.eval_step, static_argnums=(0, 3))(forward, state.params, batch, k)
  predictions = np.argmax(np.asarray(_logits(tiny_config, state.params, batch['image'])), axis=-1)
  np.testing.assert_array_equal(
      predictions, jax.jit(steps.predict, static_argnums=0)(forward, state.params, batch['image']))
  expected = np.zeros((3, 3), np.int64)
  np.add.at(expected, (batch['label'][[0, 2]].ravel(), predictions[[0, 2]].ravel()), 1)
  np.testing.assert_array_equal(np.asarray(per_example['confusion']).sum(0), expected)
  assert np.count_nonzero(expected.sum(axis=0)) >= 2  # The predictions vary: the check has teeth.
  assert not np.asarray(per_example['confusion'][1]).any()
  np.testing.assert_array_equal(per_example['prediction'], predictions)


def _convolutions(jaxpr):
  """Every conv_general_dilated equation of a jaxpr, in sub-jaxprs too."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'conv_general_dilated':
      yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        if hasattr(sub, 'eqns'):
          yield from _convolutions(sub)
        elif hasattr(getattr(sub, 'jaxpr', None), 'eqns'):
          yield from _convolutions(sub.jaxpr)


def test_every_convolution_computes_in_the_configured_dtype_with_float32_params_and_loss(
    tiny_config):
  for dtype in ('bfloat16', 'float32'):
    tiny_config.dtype = dtype
    state = fixed_state(tiny_config)
    batch = labelled_batch(tiny_config, 2)
    forward_fn = models.forward(tiny_config, layers.xla_layer)
    forward = list(_convolutions(jax.make_jaxpr(forward_fn)(state.params, batch['image']).jaxpr))
    jaxpr = jax.make_jaxpr(functools.partial(steps.train_step, forward_fn))(
        state, batch, jax.random.key(1))
    step = list(_convolutions(jaxpr.jaxpr))
    # Each forward convolution, and its kernel's and input's gradients (none for the first's
    # input: the images are not differentiated).
    assert len(forward) >= 10 and len(step) == 3 * len(forward) - 1, (len(forward), len(step))
    for eqn in forward + step:
      assert [v.aval.dtype for v in eqn.invars] == [jnp.dtype(dtype)] * 2, (dtype, eqn)
    loss = jaxpr.out_avals[-1]
    assert loss.dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(jaxpr.out_avals[:-1])
               if jnp.issubdtype(p.dtype, jnp.floating))


def test_warmup_cosine_schedule_starts_at_zero_and_peaks_after_warmup(tiny_config):
  tiny_config.schedule = 'warmup_cosine'
  tiny_config.warmup_epochs = 1.0
  tiny_config.num_epochs = 3  # 3 steps an epoch, 9 in all.
  tx = steps.create_optimizer(tiny_config, steps_per_epoch=3)
  params = {'w': np.zeros(3, np.float32)}
  state = tx.init(params)
  sizes = []
  for _ in range(9):
    updates, state = tx.update({'w': np.ones(3, np.float32)}, state, params)
    sizes.append(float(np.abs(updates['w'][0])))
  # Adam's updates of a constant gradient are ~lr in size, so they follow the schedule.
  lr = tiny_config.learning_rate
  schedule = [lr * i / 3 for i in range(3)] + [
      lr * 0.5 * (1 + np.cos(np.pi * (i - 3) / 6)) for i in range(3, 9)]
  np.testing.assert_allclose(sizes, schedule, rtol=1e-3, atol=1e-9)
  assert sizes[0] == 0.0 and sizes[3] == pytest.approx(lr, rel=1e-3)
  with pytest.raises(ValueError, match='steps_per_epoch'):
    steps.create_optimizer(tiny_config)


def test_constant_schedule_takes_adams_steps_with_the_configured_hyperparameters(tiny_config):
  tiny_config.update({'learning_rate': 0.01, 'adam_b1': 0.5, 'adam_b2': 0.75, 'adam_eps': 0.1})
  tx = steps.create_optimizer(tiny_config)
  params = {'w': np.zeros(2, np.float32)}
  state = tx.init(params)
  m = v = np.zeros(2)
  for t, g in enumerate([np.array([1.0, -2.0]), np.array([0.5, 3.0])], start=1):
    updates, state = tx.update({'w': g.astype(np.float32)}, state, params)
    m, v = 0.5 * m + 0.5 * g, 0.75 * v + 0.25 * g**2
    want = -0.01 * (m / (1 - 0.5**t)) / (np.sqrt(v / (1 - 0.75**t)) + 0.1)
    np.testing.assert_allclose(updates['w'], want, rtol=1e-5)


def test_skip_nonfinite_updates_skips_them_in_the_step_and_counts_them(tiny_config):
  tiny_config.learning_rate = 1e30
  tiny_config.skip_nonfinite_updates = True
  devices = Devices(2)
  step, _ = steps.compile_steps(tiny_config, devices, models.forward(tiny_config))
  state = fixed_state(tiny_config)
  rng = np.random.default_rng(0)
  batch = devices.put({'image': rng.integers(0, 256, (2, 16, 16, 3)).astype(np.uint8),
                       'label': rng.integers(0, 3, (2, 16, 16)).astype(np.uint8)})
  history, params = [], []
  for _ in range(3):
    state, step_metrics = step(state, batch, jax.random.key(1))
    history.append(jax.device_get(step_metrics))
    params.append(jax.device_get(state.params))
  losses = [float(h['loss']) for h in history]
  assert np.isfinite(losses[0]) and not np.isfinite(losses[1]) and not np.isfinite(losses[2])
  assert [int(h['nonfinite_updates']) for h in history] == [0, 1, 2]
  assert int(state.step) == 3  # The step count (dropout keys, data position) still advances.
  for after_1, after_3 in zip(jax.tree.leaves(params[0]), jax.tree.leaves(params[2])):
    np.testing.assert_array_equal(after_1, after_3)  # Steps 2 and 3 changed nothing.
    assert np.all(np.isfinite(after_3))


def test_without_skipping_a_nonfinite_update_is_applied_and_counted(tiny_config):
  tiny_config.learning_rate = 1e30
  step, _ = steps.compile_steps(tiny_config, Devices(2), models.forward(tiny_config))
  state = fixed_state(tiny_config)
  batch = labelled_batch(tiny_config, 2)
  for _ in range(2):
    state, step_metrics = step(state, batch, jax.random.key(1))
  # The second step's loss overflows; its update is applied (the loop stops on it, see train).
  assert int(step_metrics['nonfinite_updates']) == 1
  assert not all(np.all(np.isfinite(p)) for p in jax.tree.leaves(state.params))


def test_ema_params_follow_the_moving_average_of_the_trained_params(tiny_config):
  tiny_config.ema_decay = 0.75
  state = jax.jit(functools.partial(steps.create_train_state, tiny_config))(jax.random.key(0))
  forward = models.forward(tiny_config)
  step = jax.jit(functools.partial(steps.train_step, forward, ema_decay=tiny_config.ema_decay))
  batch = labelled_batch(tiny_config, 2)
  ema = [np.asarray(p, np.float64) for p in jax.tree.leaves(state.params)]
  for _ in range(3):
    state, _ = step(state, batch, jax.random.key(1))
    ema = [0.75 * e + 0.25 * np.asarray(p, np.float64)
           for e, p in zip(ema, jax.tree.leaves(state.params))]
  for expected, got in zip(ema, jax.tree.leaves(state.ema_params)):
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
  assert not all(np.allclose(e, p) for e, p in zip(ema, jax.tree.leaves(state.params)))
  # Evaluation predicts with the average.
  images = batch['image']
  expected = np.argmax(_logits(tiny_config, state.ema_params, images), axis=-1)
  np.testing.assert_array_equal(jax.jit(steps.predict, static_argnums=0)(
      forward, steps.inference_params(state), images), expected)


def test_without_ema_decay_the_state_keeps_no_average(tiny_config):
  state = jax.jit(functools.partial(steps.create_train_state, tiny_config))(jax.random.key(0))
  assert state.ema_params is None and steps.inference_params(state) is state.params


def test_a_pretrained_encoder_is_frozen_then_scaled_and_the_decoder_trains(tiny_config):
  tiny_config.update({'encoder': 'efficientnet_lite0', 'image_size': 32, 'dropout_rate': 0.0,
                      'encoder_frozen_epochs': 1.0, 'encoder_lr_scale': 0.25,
                      'learning_rate': 1e-2})
  forward = models.forward(tiny_config)
  state = jax.jit(functools.partial(steps.create_train_state, tiny_config, steps_per_epoch=2))(
      jax.random.key(0))
  step = jax.jit(functools.partial(steps.train_step, forward))
  batch = labelled_batch(tiny_config, 2)
  history = [state.params]
  for _ in range(3):
    state, _ = step(state, batch, jax.random.key(1))
    history.append(state.params)
  moved = lambda a, b, part: max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
                                 for x, y in zip(jax.tree.leaves(a[part]), jax.tree.leaves(b[part])))
  # Steps 1 and 2 (the first epoch): the encoder stays, the decoder moves.
  assert moved(history[0], history[2], 'encoder') == 0.0
  assert moved(history[0], history[1], 'logits') > 0
  # Step 3: the encoder moves by a quarter of Adam's update (about lr per parameter).
  assert 0 < moved(history[2], history[3], 'encoder') <= 0.25 * 1e-2 * 1.01
