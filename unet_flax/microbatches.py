"""Gradient accumulation: a batch's loss and gradient summed over microbatches of it.

On CPUs a step over a smaller working set runs faster (docs/speed.md has figures),
so the trainer splits each device's rows into microbatches and sums their gradients; the loss and
gradient are exactly the whole batch's. Accelerators get whole batches.
"""

import jax
import jax.numpy as jnp
import ml_collections

from unet_flax import errors
from unet_flax import metrics

# Auto microbatches on CPU: at most this many examples per device each.
CPU_MICROBATCH = 16


def count(config: ml_collections.ConfigDict, per_device_batch_size: int, platform: str) -> int:
  """How many microbatches a step takes: config.num_microbatches, or for 0 (auto) on CPUs the
  fewest that make microbatches of at most CPU_MICROBATCH examples per device (and at least 8);
  elsewhere 1, so that accelerators get whole batches. Always 1 with a Dice term, whose value for
  a batch is not a sum over its parts.

  Raises:
    UserError: if config.num_microbatches does not divide the examples each device gets.
  """
  per_device = per_device_batch_size
  if config.num_microbatches:
    if per_device % config.num_microbatches:
      raise errors.UserError(
          f'config.num_microbatches={config.num_microbatches} must divide the {per_device} '
          f'examples each device gets of config.batch_size={config.batch_size}; use a divisor, '
          'or 0 for auto')
    return config.num_microbatches
  if config.dice_weight or platform != 'cpu':
    return 1
  for n in range(1, per_device + 1):
    if per_device % n == 0 and per_device // n <= CPU_MICROBATCH:
      return n if per_device // n >= 8 else 1
  return 1


def value_and_grad(loss_fn, params, images, labels, dropout_rng, count: int, class_weights,
                   ignore_label=None):
  """The whole batch's cross-entropy and its gradient, summed over `count` microbatches.

  Args:
    loss_fn: (params, images, labels, dropout_rng) -> the mean cross-entropy of those examples.
    params: the parameters to differentiate.
    images, labels: the batch, [B, H, W, 3] and [B, H, W], sharded over the devices' rows.
    dropout_rng: each microbatch folds in its index.
    count: microbatches; must divide each device's rows.
    class_weights, ignore_label: as loss_fn weighs the pixels.

  Returns:
    (loss, grads) of the whole batch.

  Each microbatch's loss is a weighted mean over its pixels; scaled by its share of the batch's
  total pixel weight, the parts sum to the batch's mean. The loop is unrolled: XLA:CPU runs
  convolutions in a while loop's body far slower than unrolled.
  """
  def weight(labels):
    return metrics.cross_entropy_weight(labels, jnp.ones(labels.shape[0]), class_weights,
                                        ignore_label)

  def scaled_loss(params, images, labels, dropout_rng, share):
    return loss_fn(params, images, labels, dropout_rng) * share

  total = weight(labels)
  parts = []
  for i, (images_i, labels_i) in enumerate(zip(split(images, count), split(labels, count))):
    share = jnp.where(total > 0, weight(labels_i) / total, 0.0)
    parts.append(jax.value_and_grad(scaled_loss)(params, images_i, labels_i,
                                                 jax.random.fold_in(dropout_rng, i), share))
  return jax.tree.map(lambda *values: sum(values), *parts)


def split(x: jax.Array, count: int) -> list[jax.Array]:
  """[B, ...] -> `count` arrays [B / count, ...]; each takes a slice of every device's rows.

  The batch is sharded over the devices in contiguous blocks, so splitting each block rather than
  the whole batch keeps every microbatch where its rows already are: no data moves.
  """
  devices = jax.device_count()
  per_device = x.shape[0] // devices
  blocks = x.reshape(devices, per_device, *x.shape[1:])
  size = per_device // count
  return [blocks[:, i * size:(i + 1) * size].reshape(devices * size, *x.shape[1:])
          for i in range(count)]
