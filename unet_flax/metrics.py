"""The loss, confusion matrices and the scores computed from them: pure jnp, and one numpy twin.

Every function takes a per-example validity `mask` so that the padded examples of a last partial
batch count nothing, and an optional `ignore_label`: pixels whose label it is (a data set's "don't
care", e.g. Pascal VOC's 255 along outlines) count in no loss and no confusion matrix. Confusion
matrices are sums: add them over a whole split, then call `scores` once (IoU, Dice and pixel
accuracy), so that every pixel of the split weighs the same. `host_confusion_matrices` counts
images of any size on the host with the same rule.
"""

import jax
import jax.numpy as jnp
import numpy as np


def _pixel_weights(mask: jax.Array, labels: jax.Array, ignore_label=None) -> jax.Array:
  """mask: [B] -> [B, H, W] float32 weights: 1 on the valid examples' pixels, 0 on padding and
  on pixels labelled ignore_label."""
  weights = jnp.broadcast_to(mask.astype(jnp.float32)[:, None, None], labels.shape)
  if ignore_label is not None:
    weights = weights * (labels != ignore_label)
  return weights


def pixel_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Softmax cross-entropy of each pixel: [B, H, W, K] logits, [B, H, W] int labels -> [B, H, W].

  -sum_k onehot(label)_k log softmax(logits)_k, computed in float32. The true class is picked by a
  one-hot product rather than a gather (optax's take_along_axis): its gradient is then
  elementwise, where a gather's is a scatter-add that XLA constant-folds for seconds at compile
  time and TPUs serialise.
  """
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.sum(log_probs * jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32),
                  axis=-1)


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array,
                  ignore_label=None) -> jax.Array:
  """Mean softmax cross-entropy over the valid pixels.

  Args:
    logits: [B, H, W, K] (computed in float32 whatever their dtype).
    labels: [B, H, W] int in [0, K).
    mask: [B] bool or {0, 1}; examples with 0 count nothing.
    ignore_label: a label whose pixels count nothing; None: none.

  Returns:
    scalar float32.
  """
  losses = pixel_cross_entropy(logits, labels)
  weights = _pixel_weights(mask, labels, ignore_label)
  return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def confusion_matrices(labels: jax.Array, predictions: jax.Array, num_classes: int,
                       mask: jax.Array, ignore_label=None) -> jax.Array:
  """[B, K, K] int32 counts, one matrix per example; row = true class, column = predicted class.

  One-hot contraction rather than a scatter: it runs at matmul speed on every backend (TPUs
  serialise scatters).

  Args:
    labels, predictions: [B, H, W] int in [0, K).
    num_classes: K.
    mask: [B]; examples with 0 count nothing (their matrix is zero).
    ignore_label: a label whose pixels count nothing; None: none.
  """
  weights = _pixel_weights(mask, labels, ignore_label)
  true = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * weights[..., None]
  pred = jax.nn.one_hot(predictions, num_classes, dtype=jnp.float32)
  # Per-example float32 sums stay exact (< 2**24 pixels).
  per_example = jnp.einsum('bhwk,bhwl->bkl', true, pred, precision=jax.lax.Precision.HIGHEST)
  return jnp.round(per_example).astype(jnp.int32)


def confusion_matrix(labels: jax.Array, predictions: jax.Array, num_classes: int,
                     mask: jax.Array, ignore_label=None) -> jax.Array:
  """[K, K] int32 counts of the whole batch: the sum of `confusion_matrices`."""
  return jnp.sum(confusion_matrices(labels, predictions, num_classes, mask, ignore_label), axis=0)


def host_confusion_matrices(labels: np.ndarray, predictions: np.ndarray, num_classes: int,
                            ignore_label: int | None = None) -> np.ndarray:
  """`confusion_matrices` in numpy, for images of any size scored on the host: [N, H, W] labels
  and predictions -> [N, K, K] int64 counts (rows: truth). The same rule: pixels labelled
  ignore_label count nothing (a label that is neither a class nor ignore_label is an error).

  Raises:
    ValueError: for a label outside 0..K-1 that is not ignore_label.
  """
  n, k = len(labels), num_classes
  labels = np.asarray(labels).reshape(n, -1).astype(np.int64)
  keep = labels != (-1 if ignore_label is None else ignore_label)
  if ((labels[keep] < 0) | (labels[keep] >= k)).any():
    raise ValueError(f'labels outside 0..{k - 1} that are not the ignore label {ignore_label}')
  index = labels * k + np.asarray(predictions).reshape(n, -1)
  index += np.arange(n)[:, None] * k * k  # Each image counts into its own K x K block.
  return np.bincount(index[keep].ravel(), minlength=n * k * k).reshape(n, k, k)


def scores(confusion: jax.Array) -> dict[str, jax.Array]:
  """Per-class and mean IoU, pixel accuracy, per-class and mean Dice of a [K, K] confusion matrix.

  IoU_k = TP / (TP + FP + FN) (Jaccard), Dice_k = 2 TP / (2 TP + FP + FN) (Sorensen-Dice),
  pixel accuracy = trace / total. A class absent from both truth and prediction has no IoU
  (NaN) and is left out of the means, as Keras's MeanIoU does.

  Returns:
    {'per_class_iou': [K], 'mean_iou': scalar, 'pixel_accuracy': scalar, 'per_class_dice': [K],
    'mean_dice': scalar}, float32.
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


def weighted_cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array,
                           class_weights=None, ignore_label=None) -> jax.Array:
  """Softmax cross-entropy, each pixel weighted by the weight of its true class.

  The weighted mean: sum(weight * loss) / sum(weight) over the valid pixels, so equal weights
  give `cross_entropy`, and raising a rare class's weight (Oxford's border) raises its share.

  Args:
    logits: [B, H, W, K] (computed in float32 whatever their dtype).
    labels: [B, H, W] int in [0, K).
    mask: [B]; examples with 0 count nothing.
    class_weights: [K] non-negative, or None for all 1.
    ignore_label: a label whose pixels count nothing; None: none.

  Returns:
    scalar float32.
  """
  if class_weights is None:
    return cross_entropy(logits, labels, mask, ignore_label)
  losses = pixel_cross_entropy(logits, labels)
  weights = _class_pixel_weights(labels, mask, class_weights, ignore_label)
  total = jnp.sum(weights)
  return jnp.sum(losses * weights) / jnp.where(total > 0, total, 1.0)


def _class_pixel_weights(labels: jax.Array, mask: jax.Array, class_weights=None,
                         ignore_label=None) -> jax.Array:
  weights = _pixel_weights(mask, labels, ignore_label)
  if class_weights is not None:
    # A one-hot product, not a gather: ignored labels (past the last class) get weight 0 here too.
    one_hot = jax.nn.one_hot(labels, len(class_weights), dtype=jnp.float32)
    weights = weights * (one_hot @ jnp.asarray(class_weights, jnp.float32))
  return weights


def cross_entropy_weight(labels: jax.Array, mask: jax.Array, class_weights=None,
                         ignore_label=None) -> jax.Array:
  """The denominator of `weighted_cross_entropy`: the summed weight of the valid pixels.

  A batch's loss is the weight-share-weighted sum of its parts' losses, which is how a step that
  accumulates gradients over microbatches gets the gradient of the whole batch's loss.
  """
  return jnp.sum(_class_pixel_weights(labels, mask, class_weights, ignore_label))


def soft_dice_loss(logits: jax.Array, labels: jax.Array, mask: jax.Array,
                   smooth: float = 1.0, ignore_label=None) -> jax.Array:
  """1 - the soft Dice of the softmax probabilities, per class over the batch, averaged.

  Dice_k = (2 sum(p_k y_k) + smooth) / (sum(p_k) + sum(y_k) + smooth), sums over every valid
  pixel of the batch (not per image, so that a class absent from one image does not count as a
  perfect or a failed score for it); `smooth` keeps absent classes finite.

  Args:
    logits: [B, H, W, K] (computed in float32).
    labels: [B, H, W] int in [0, K).
    mask: [B]; examples with 0 count nothing.
    smooth: added to numerator and denominator.
    ignore_label: a label whose pixels count nothing; None: none.

  Returns:
    scalar float32 in [0, 1].
  """
  num_classes = logits.shape[-1]
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  weights = _pixel_weights(mask, labels, ignore_label)[..., None]
  truth = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * weights
  probs = probs * weights
  intersection = jnp.sum(probs * truth, axis=(0, 1, 2))
  sizes = jnp.sum(probs, axis=(0, 1, 2)) + jnp.sum(truth, axis=(0, 1, 2))
  return 1.0 - jnp.mean((2.0 * intersection + smooth) / (sizes + smooth))


def segmentation_loss(logits: jax.Array, labels: jax.Array, mask: jax.Array, *,
                      class_weights=None, dice_weight: float = 0.0,
                      ignore_label=None) -> jax.Array:
  """The training loss: weighted cross-entropy + dice_weight x soft Dice loss.

  With the defaults it is `cross_entropy`, exactly; see those two functions for the arguments.
  """
  loss = weighted_cross_entropy(logits, labels, mask, class_weights, ignore_label)
  if dice_weight:  # A Python float: with 0 the Dice term is not even traced.
    loss = loss + dice_weight * soft_dice_loss(logits, labels, mask, ignore_label=ignore_label)
  return loss
