"""The pure steps: TrainState, the optimizer, train_step and eval_step, jitted with shardings.

Each step is a function of its arguments alone (no I/O, no globals), so a test can call it on a
2x16x16 batch: the forward pass (models.forward) is its first argument, and the eval step takes
(forward, params, batch), never the optimizer. `compile_steps` jits them for the run's devices
with the state donated. The loop that drives them is train.py's; modes.py and the benchmark use
them too.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training import train_state

from unet_flax import metrics
from unet_flax import microbatches
from unet_flax import models
from unet_flax.devices import Devices

# apply_if_finite applies an update anyway after this many non-finite ones in a row: never.
_NEVER_GIVE_UP = 2**31 - 1


class TrainState(train_state.TrainState):
  """flax's TrainState: step, params, opt_state (tx is static), and ema_params.

  apply_fn is None: the forward pass is an argument of the steps (models.forward), not part of
  the state. ema_params: an exponential moving average of params (config.ema_decay), or None.
  """
  ema_params: Any = None


def inference_params(state: TrainState):
  """The weights that evaluation and inference use: the moving average where there is one."""
  return state.params if state.ema_params is None else state.ema_params


def create_optimizer(config: ml_collections.ConfigDict,
                     steps_per_epoch: int | None = None) -> optax.GradientTransformation:
  """Adam at config.learning_rate, constant or warmup + cosine decay per config.schedule, wrapped
  so that its state counts non-finite gradients (`total_notfinite`).

  With config.skip_nonfinite_updates such updates are skipped; without, they are applied (0
  tolerated) and the loop stops at its next check. Always wrapped: checkpoints of either setting
  have the same structure.

  Args:
    config: the run's config.
    steps_per_epoch: sizes the 'warmup_cosine' schedule; not needed for 'constant'.
  """
  learning_rate = config.learning_rate
  if config.schedule == 'warmup_cosine':
    if steps_per_epoch is None:
      raise ValueError("the 'warmup_cosine' schedule needs steps_per_epoch")
    learning_rate = optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, warmup_steps=round(config.warmup_epochs * steps_per_epoch),
        decay_steps=config.num_epochs * steps_per_epoch)
  tx = optax.adam(learning_rate, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps)
  if config.encoder in models.ENCODERS:  # A pretrained encoder: its updates scaled.
    tx = optax.chain(tx, _encoder_scale(config, steps_per_epoch))
  return optax.apply_if_finite(
      tx, max_consecutive_errors=_NEVER_GIVE_UP if config.skip_nonfinite_updates else 0)


def _encoder_scale(config: ml_collections.ConfigDict,
                   steps_per_epoch: int | None) -> optax.GradientTransformation:
  """The pretrained encoder's updates times 0 for its first config.encoder_frozen_epochs epochs,
  then times config.encoder_lr_scale; the decoder's unchanged."""
  if config.encoder_frozen_epochs and steps_per_epoch is None:
    raise ValueError('config.encoder_frozen_epochs needs steps_per_epoch')
  frozen = round(config.encoder_frozen_epochs * (steps_per_epoch or 0))
  scale = float(config.encoder_lr_scale)
  return optax.masked(
      optax.scale_by_schedule(lambda count: jnp.where(count < frozen, 0.0, scale)),
      lambda params: {name: name == 'encoder' for name in params})


def create_train_state(config: ml_collections.ConfigDict, rng: jax.Array,
                       steps_per_epoch: int | None = None, pretrained=None) -> TrainState:
  """The model's initial parameters (with the subtrees of `pretrained`, models.pretrained_params,
  in place of the random ones), Adam's state, and with config.ema_decay their moving average,
  which starts as a copy of them (see create_optimizer for the other arguments)."""
  params = models.with_pretrained(models.init_params(config, rng), pretrained)
  ema_params = jax.tree.map(jnp.copy, params) if config.ema_decay else None
  return TrainState.create(apply_fn=None, params=params,
                           tx=create_optimizer(config, steps_per_epoch), ema_params=ema_params)


def train_step(forward: models.Forward, state: TrainState, batch: dict, rng: jax.Array, *,
               class_weights=None, dice_weight: float = 0.0, ignore_label=None,
               num_microbatches: int = 1, ema_decay: float = 0.0) -> tuple[TrainState, dict]:
  """One Adam step on the segmentation loss: softmax cross-entropy, by default unweighted.

  Args:
    forward: the model's forward pass (models.forward), static under jit.
    state: the train state (donated by the caller's jit).
    batch: {'image': [B, H, W, 3] uint8, 'label': [B, H, W] int}.
    rng: the run's dropout key; each step folds in its own step number, so a resumed run draws
      the same dropout masks as an uninterrupted one.
    class_weights, dice_weight, ignore_label: per-class cross-entropy weights ([K] or None), the
      weight of the soft Dice term, and the label whose pixels count nothing (or None); see
      metrics.segmentation_loss.
    num_microbatches: the gradient is accumulated over this many slices of each device's rows
      (microbatches.py); the loss and gradient are those of the whole batch. Needs
      dice_weight == 0: a batch's Dice is not a sum over its parts.
    ema_decay: where the state has ema_params, they become
      ema_decay * ema_params + (1 - ema_decay) * new params (optax.incremental_update).

  Returns:
    (new state, {'loss': scalar float32}).
  """
  dropout_rng = jax.random.fold_in(rng, state.step)
  labels = batch['label'].astype(jnp.int32)

  def loss_fn(params, images, labels, dropout_rng):
    logits = forward(params, images, dropout_rng)
    mask = jnp.ones(labels.shape[0], jnp.bool_)
    return metrics.segmentation_loss(logits, labels, mask, class_weights=class_weights,
                                     dice_weight=dice_weight, ignore_label=ignore_label)

  if num_microbatches == 1:
    loss, grads = jax.value_and_grad(loss_fn)(state.params, batch['image'], labels, dropout_rng)
  else:
    if dice_weight:
      raise ValueError('microbatches need dice_weight == 0')
    loss, grads = microbatches.value_and_grad(loss_fn, state.params, batch['image'], labels,
                                              dropout_rng, num_microbatches, class_weights,
                                              ignore_label)
  new_state = state.apply_gradients(grads=grads)
  if state.ema_params is not None:
    new_state = new_state.replace(ema_params=optax.incremental_update(
        new_state.params, state.ema_params, step_size=1.0 - ema_decay))
  return new_state, {'loss': loss}


def predict(forward: models.Forward, params, images: jax.Array) -> jax.Array:
  """images: [B, H, W, 3] uint8 -> predicted classes [B, H, W] int32 (inference: no dropout)."""
  return jnp.argmax(forward(params, images), axis=-1)


def eval_step(forward: models.Forward, params, batch: dict, num_classes: int,
              ignore_label=None) -> dict:
  """Each example's confusion matrix and prediction, from the forward pass alone.

  Args:
    forward: the model's forward pass (models.forward, or a flip-TTA wrapper of it).
    params: the weights to score (TrainState.inference_params, or a restored model's).
    batch: {'image': [B, H, W, 3] uint8, 'label': [B, H, W] int, 'mask': [B] bool}; examples
      with mask 0 (padding) and pixels labelled ignore_label count nothing.

  Returns:
    {'confusion': [B, K, K] int32 (rows: truth), 'prediction': [B, H, W] uint8}.
  """
  labels = batch['label'].astype(jnp.int32)
  predictions = predict(forward, params, batch['image'])
  return {'confusion': metrics.confusion_matrices(labels, predictions, num_classes,
                                                  batch['mask'], ignore_label),
          'prediction': predictions.astype(jnp.uint8)}


def _counting_nonfinite(step_fn):
  """step_fn, whose metrics also hold 'nonfinite_updates': how many so far, over the whole run."""
  @functools.wraps(step_fn)
  def step(state, batch, rng):
    state, step_metrics = step_fn(state, batch, rng)
    return state, {**step_metrics, 'nonfinite_updates': state.opt_state.total_notfinite}
  return step


def num_microbatches(config: ml_collections.ConfigDict, devices: Devices) -> int:
  """The microbatches of the run's train step (microbatches.count)."""
  return microbatches.count(config, devices.per_device_batch_size, devices.platform)


def compile_steps(config: ml_collections.ConfigDict, devices: Devices,
                  forward: models.Forward):
  """The jitted train step, (state, batch, rng) -> (state, metrics) with the state donated, and
  eval step, (params, batch) -> per-example `eval_step`, with the run's shardings."""
  repl, data = devices.replicated, devices.data
  class_weights = config.class_weights
  if class_weights is not None:
    class_weights = tuple(float(w) for w in class_weights)
  step = functools.partial(train_step, forward, class_weights=class_weights,
                           dice_weight=float(config.dice_weight),
                           ignore_label=config.ignore_label,
                           num_microbatches=num_microbatches(config, devices),
                           ema_decay=float(config.ema_decay))
  train = jax.jit(_counting_nonfinite(step), in_shardings=(repl, data, repl),
                  out_shardings=(repl, repl), donate_argnums=0)
  return train, compile_eval_step(config, devices, forward)


def compile_eval_step(config: ml_collections.ConfigDict, devices: Devices,
                      forward: models.Forward):
  """`eval_step` jitted: (params, batch) -> {'confusion', 'prediction'}, sharded by example."""
  return jax.jit(functools.partial(eval_step, forward, num_classes=config.num_classes,
                                   ignore_label=config.ignore_label),
                 in_shardings=(devices.replicated, devices.data), out_shardings=devices.data)
