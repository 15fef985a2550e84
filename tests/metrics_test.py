"""metrics.py against independent numpy references, on tiny shapes: confusion matrices, IoU and
Dice, and the losses (cross-entropy, class-weighted, soft Dice) with padded examples."""

import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import reference_cross_entropy
from tests.conftest import reference_soft_dice
from unet_flax import metrics


def numpy_confusion(labels, predictions, num_classes, mask):
  confusion = np.zeros((num_classes, num_classes), np.int64)
  for example in np.flatnonzero(mask):
    for t, p in zip(labels[example].ravel(), predictions[example].ravel()):
      confusion[t, p] += 1
  return confusion


def numpy_iou(labels, predictions, num_classes, mask):
  """IoU by set counting over the valid examples; NaN for a class in neither."""
  valid = np.asarray(mask, bool)
  t, p = labels[valid], predictions[valid]
  ious = []
  for k in range(num_classes):
    union = np.sum((t == k) | (p == k))
    ious.append(np.sum((t == k) & (p == k)) / union if union else np.nan)
  return np.array(ious), np.mean(t == p)


@pytest.fixture
def batch():
  rng = np.random.default_rng(0)
  num_classes = 4
  # Class 3 is absent from both truth and prediction.
  labels = rng.integers(0, 3, (5, 16, 16))
  predictions = np.where(rng.random((5, 16, 16)) < 0.6, labels, rng.integers(0, 3, (5, 16, 16)))
  mask = np.array([1, 1, 0, 1, 0], bool)
  return labels, predictions, num_classes, mask


def test_confusion_matrix_matches_numpy(batch):
  got = metrics.confusion_matrix(*map(jnp.asarray, batch[:2]), batch[2], jnp.asarray(batch[3]))
  np.testing.assert_array_equal(got, numpy_confusion(*batch))


def test_masked_examples_count_nothing(batch):
  labels, predictions, num_classes, mask = batch
  all_valid = metrics.confusion_matrix(labels[mask], predictions[mask], num_classes,
                                       np.ones(mask.sum(), bool))
  padded = metrics.confusion_matrix(labels, predictions, num_classes, mask)
  np.testing.assert_array_equal(padded, all_valid)
  assert int(padded.sum()) == mask.sum() * 16 * 16


def test_per_example_confusion_matrices_match_numpy_and_sum_to_the_batchs(batch):
  labels, predictions, num_classes, mask = batch
  per_example = np.asarray(metrics.confusion_matrices(labels, predictions, num_classes, mask))
  assert per_example.shape == (5, num_classes, num_classes)
  for b in range(5):
    one = np.zeros(5, bool)
    one[b] = mask[b]
    np.testing.assert_array_equal(per_example[b], numpy_confusion(labels, predictions,
                                                                  num_classes, one))
  assert not per_example[~mask].any()  # Padded examples: all zero.
  np.testing.assert_array_equal(per_example.sum(0),
                                metrics.confusion_matrix(labels, predictions, num_classes, mask))


def test_iou_matches_set_counting_and_skips_absent_class(batch):
  labels, predictions, num_classes, mask = batch
  results = metrics.scores(metrics.confusion_matrix(labels, predictions, num_classes, mask))
  expected, accuracy = numpy_iou(*batch)
  np.testing.assert_allclose(results['per_class_iou'], expected, rtol=1e-6)
  assert np.isnan(results['per_class_iou'][3])
  np.testing.assert_allclose(results['mean_iou'], np.mean(expected[:3]), rtol=1e-6)
  np.testing.assert_allclose(results['pixel_accuracy'], accuracy, rtol=1e-6)


def test_iou_sums_over_batches_before_dividing(batch):
  """The IoU of a split is that of the summed confusion, not the mean of per-batch IoUs."""
  labels, predictions, num_classes, mask = batch
  halves = [metrics.confusion_matrix(labels[s], predictions[s], num_classes, mask[s])
            for s in (slice(0, 2), slice(2, 5))]
  summed = metrics.scores(halves[0] + halves[1])
  expected, _ = numpy_iou(*batch)
  np.testing.assert_allclose(summed['per_class_iou'], expected, rtol=1e-6)


def test_dice_matches_numpy(batch):
  labels, predictions, num_classes, mask = batch
  results = metrics.scores(metrics.confusion_matrix(labels, predictions, num_classes, mask))
  t, p = labels[mask], predictions[mask]
  for k in range(3):
    expected = 2 * np.sum((t == k) & (p == k)) / (np.sum(t == k) + np.sum(p == k))
    np.testing.assert_allclose(results['per_class_dice'][k], expected, rtol=1e-6)


def test_cross_entropy_matches_numpy_and_ignores_padding():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(3, 4, 4, 3)).astype(np.float32)
  labels = rng.integers(0, 3, (3, 4, 4))
  mask = np.array([1, 0, 1], bool)
  shifted = logits - logits.max(-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  nll = -np.take_along_axis(log_probs, labels[..., None], -1)[..., 0]
  expected = nll[mask].mean()
  got = metrics.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask))
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  # Garbage in a padded example changes nothing.
  logits[1] = 1e4
  got = metrics.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask))
  np.testing.assert_allclose(got, expected, rtol=1e-5)


# The losses.

K = 3


def _inputs(seed=0, b=3, h=4, w=5):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(b, h, w, K)).astype(np.float32)
  labels = rng.integers(0, K, (b, h, w))
  mask = np.array([True, False, True][:b])
  return logits, labels, mask


def test_weighted_cross_entropy_matches_numpy():
  logits, labels, mask = _inputs()
  weights = (0.5, 1.0, 4.0)
  np.testing.assert_allclose(metrics.weighted_cross_entropy(logits, labels, mask, weights),
                             reference_cross_entropy(logits, labels, mask, weights), rtol=1e-5)


def test_cross_entropy_weight_is_the_summed_weight_of_the_valid_pixels():
  _, labels, mask = _inputs(5)
  weights = np.array([0.5, 1.0, 4.0])
  np.testing.assert_allclose(metrics.cross_entropy_weight(labels, mask, tuple(weights)),
                             weights[labels[mask]].sum(), rtol=1e-6)
  assert float(metrics.cross_entropy_weight(labels, mask)) == mask.sum() * 4 * 5


def test_equal_weights_or_none_give_the_plain_cross_entropy():
  logits, labels, mask = _inputs(1)
  plain = metrics.cross_entropy(logits, labels, mask)
  np.testing.assert_allclose(plain, reference_cross_entropy(logits, labels, mask), rtol=1e-5)
  np.testing.assert_allclose(metrics.weighted_cross_entropy(logits, labels, mask, None), plain)
  np.testing.assert_allclose(metrics.weighted_cross_entropy(logits, labels, mask, (2.0,) * K),
                             plain, rtol=1e-6)
  np.testing.assert_array_equal(metrics.segmentation_loss(logits, labels, mask), plain)


def test_soft_dice_matches_numpy_and_is_zero_for_a_perfect_prediction():
  logits, labels, mask = _inputs(2)
  np.testing.assert_allclose(metrics.soft_dice_loss(logits, labels, mask),
                             reference_soft_dice(logits, labels, mask), rtol=1e-5)
  perfect = np.eye(K)[labels] * 50.0
  assert float(metrics.soft_dice_loss(perfect, labels, mask)) < 1e-6
  # Confidently wrong everywhere: no overlap, so each class's Dice is smooth / (its size + smooth).
  np.testing.assert_allclose(metrics.soft_dice_loss(-perfect, labels, mask),
                             reference_soft_dice(-perfect, labels, mask), rtol=1e-5)
  assert float(metrics.soft_dice_loss(-perfect, labels, mask)) > 0.9


def test_padded_examples_count_nothing_in_the_losses():
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
  want = (reference_cross_entropy(logits, labels, mask, weights) +
          0.7 * reference_soft_dice(logits, labels, mask))
  got = metrics.segmentation_loss(logits, labels, mask, class_weights=weights, dice_weight=0.7)
  np.testing.assert_allclose(got, want, rtol=1e-5)
