"""The pure steps: TrainState, the optimizer, train_step and eval_step, jitted with shardings.

Each step is a function of its arguments alone (no I/O, no globals), so a test can call it on a
2x16x16 batch; `compile_steps` jits them for the run's devices with the state donated. The loop
that drives them is train.py's; evaluation.py and the benchmark use them too.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state

from unet_flax import input_pipeline
from unet_flax import metrics
from unet_flax import microbatches
from unet_flax import models
from unet_flax.devices import Devices

# apply_if_finite applies an update anyway after this many non-finite ones in a row: never.
_NEVER_GIVE_UP = 2**31 - 1


class TrainState(train_state.TrainState):
  """flax's TrainState: step, params, opt_state (apply_fn and tx are static), and ema_params.

  ema_params: an exponential moving average of params (config.ema_decay), or None.
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
  adam = optax.adam(learning_rate, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps)
  return optax.apply_if_finite(
      adam, max_consecutive_errors=_NEVER_GIVE_UP if config.skip_nonfinite_updates else 0)


def create_train_state(config: ml_collections.ConfigDict, rng: jax.Array,
                       steps_per_epoch: int | None = None) -> TrainState:
  """The model's initial parameters, Adam's state, and with config.ema_decay their moving
  average, which starts as a copy of them (see create_optimizer for the arguments)."""
  params = models.init_params(config, rng)
  ema_params = jax.tree.map(jnp.copy, params) if config.ema_decay else None
  return TrainState.create(apply_fn=models.create(config).apply, params=params,
                           tx=create_optimizer(config, steps_per_epoch), ema_params=ema_params)


def train_step(state: TrainState, batch: dict, rng: jax.Array, *, class_weights=None,
               dice_weight: float = 0.0, ignore_label=None, num_microbatches: int = 1,
               ema_decay: float = 0.0) -> tuple[TrainState, dict]:
  """One Adam step on the segmentation loss: softmax cross-entropy, by default unweighted.

  Args:
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
    logits = state.apply_fn({'params': params}, models.normalize(images), train=True,
                            rngs={'dropout': dropout_rng})
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


def predict(state: TrainState, images: jax.Array) -> jax.Array:
  """images: [B, H, W, 3] uint8 -> predicted classes [B, H, W] int32 (inference_params)."""
  logits = state.apply_fn({'params': inference_params(state)}, models.normalize(images),
                          train=False)
  return jnp.argmax(logits, axis=-1)


def eval_step(state: TrainState, batch: dict, num_classes: int,
              ignore_label=None) -> jax.Array:
  """The [K, K] confusion matrix of one batch; examples with batch['mask'] == 0 and pixels
  labelled ignore_label count nothing."""
  labels = batch['label'].astype(jnp.int32)
  return metrics.confusion_matrix(labels, predict(state, batch['image']), num_classes,
                                  batch['mask'], ignore_label)


def eval_step_per_example(state: TrainState, batch: dict, num_classes: int,
                          ignore_label=None) -> dict:
  """eval_step, per example: {'confusion': [B, K, K] int32, 'prediction': [B, H, W] uint8}.

  The same predictions and counts as eval_step (whose matrix is the sum over the examples), for
  scores and pictures of single images (evaluation.py) in the same pass.
  """
  labels = batch['label'].astype(jnp.int32)
  predictions = predict(state, batch['image'])
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


def compile_steps(config: ml_collections.ConfigDict, devices: Devices):
  """The jitted train and eval steps, with explicit shardings and the state donated."""
  repl, data = devices.replicated, devices.data
  class_weights = config.class_weights
  if class_weights is not None:
    class_weights = tuple(float(w) for w in class_weights)
  step = functools.partial(train_step, class_weights=class_weights,
                           dice_weight=float(config.dice_weight),
                           ignore_label=config.ignore_label,
                           num_microbatches=num_microbatches(config, devices),
                           ema_decay=float(config.ema_decay))
  train = jax.jit(_counting_nonfinite(step), in_shardings=(repl, data, repl),
                  out_shardings=(repl, repl), donate_argnums=0)
  evaluate = jax.jit(functools.partial(eval_step, num_classes=config.num_classes,
                                       ignore_label=config.ignore_label),
                     in_shardings=(repl, data), out_shardings=repl)
  return train, evaluate


def evaluate(eval_fn, state, split: input_pipeline.Split, devices: Devices) -> dict[str, Any]:
  """Metrics of the whole split: confusion matrices summed on device, then one fetch."""
  batches = input_pipeline.eval_batches(split, devices.local_batch_size, jax.process_count())
  confusion = None
  for batch in devices.prefetch(batches):
    c = eval_fn(state, batch)
    confusion = c if confusion is None else confusion + c
  results = jax.device_get(metrics.iou(confusion))
  results['confusion_matrix'] = np.asarray(jax.device_get(confusion))
  return results
