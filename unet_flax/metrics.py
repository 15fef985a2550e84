"""Pure jnp metrics: the loss, confusion matrices and the IoU computed from them.

Every function takes a per-example validity `mask` so that the padded examples of a last partial
batch count nothing. Confusion matrices are sums: add them over a whole split, then call `iou`
once, so that every pixel of the split weighs the same.
"""

import jax
import jax.numpy as jnp
import optax


def _pixel_weights(mask: jax.Array, labels: jax.Array) -> jax.Array:
  """mask: [B] -> [B, H, W] float32 weights, broadcast over the pixels of each example."""
  return jnp.broadcast_to(mask.astype(jnp.float32)[:, None, None], labels.shape)


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy over the valid pixels.

  Args:
    logits: [B, H, W, K] (computed in float32 whatever their dtype).
    labels: [B, H, W] int in [0, K).
    mask: [B] bool or {0, 1}; examples with 0 count nothing.

  Returns:
    scalar float32.
  """
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  weights = _pixel_weights(mask, labels)
  return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def confusion_matrix(labels: jax.Array, predictions: jax.Array, num_classes: int,
                     mask: jax.Array) -> jax.Array:
  """[K, K] int32 counts; row = true class, column = predicted class.

  One-hot contraction rather than a scatter: it runs at matmul speed on every backend (TPUs
  serialise scatters).

  Args:
    labels, predictions: [B, H, W] int in [0, K).
    num_classes: K.
    mask: [B]; examples with 0 count nothing.
  """
  weights = _pixel_weights(mask, labels)
  true = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * weights[..., None]
  pred = jax.nn.one_hot(predictions, num_classes, dtype=jnp.float32)
  # Per-example float32 sums stay exact (< 2**24 pixels); the sum over examples is int32.
  per_example = jnp.einsum('bhwk,bhwl->bkl', true, pred, precision=jax.lax.Precision.HIGHEST)
  return jnp.sum(jnp.round(per_example).astype(jnp.int32), axis=0)


def iou(confusion: jax.Array) -> dict[str, jax.Array]:
  """Per-class IoU, mean IoU, pixel accuracy and Dice from a [K, K] confusion matrix.

  A class absent from both truth and prediction has no IoU (NaN) and is left out of the mean,
  as Keras's MeanIoU does.
  """
  confusion = confusion.astype(jnp.float32)
  true_positives = jnp.diag(confusion)
  actual = confusion.sum(axis=1)
  predicted = confusion.sum(axis=0)
  union = actual + predicted - true_positives
  per_class = jnp.where(union > 0, true_positives / jnp.where(union > 0, union, 1.0), jnp.nan)
  dice = jnp.where(union > 0, 2 * true_positives / jnp.where(union > 0, actual + predicted, 1.0),
                   jnp.nan)
  total = confusion.sum()
  return {
      'per_class_iou': per_class,
      'mean_iou': jnp.nanmean(per_class),
      'pixel_accuracy': jnp.trace(confusion) / jnp.maximum(total, 1.0),
      'per_class_dice': dice,
      'mean_dice': jnp.nanmean(dice),
  }
