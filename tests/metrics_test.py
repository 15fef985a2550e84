"""metrics.py against independent numpy references, on tiny shapes."""

import jax.numpy as jnp
import numpy as np
import pytest

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


def test_iou_matches_set_counting_and_skips_absent_class(batch):
  labels, predictions, num_classes, mask = batch
  results = metrics.iou(metrics.confusion_matrix(labels, predictions, num_classes, mask))
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
  summed = metrics.iou(halves[0] + halves[1])
  expected, _ = numpy_iou(*batch)
  np.testing.assert_allclose(summed['per_class_iou'], expected, rtol=1e-6)


def test_dice_matches_numpy(batch):
  labels, predictions, num_classes, mask = batch
  results = metrics.iou(metrics.confusion_matrix(labels, predictions, num_classes, mask))
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
