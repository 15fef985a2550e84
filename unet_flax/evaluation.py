"""Scoring a trained workdir on a split: the IoU table, JSON, a confusion matrix, the worst images.

`evaluate(workdir)` scores a split with the trainer's own pipeline and eval step, so its numbers
are the trainer's; with `original_resolution=True` it scores against the original-size masks
(input_pipeline.originals: tfds trimaps or folder masks), the logits upsampled bilinearly to each
image's size as predict.py does (inference.py).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from unet_flax import inference
from unet_flax import input_pipeline
from unet_flax import metrics
from unet_flax import plots
from unet_flax import reporting
from unet_flax import train

# ---------------------------------------------------------------------------------------------
# Per-image scores, on the host.


def confusions(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
  """Per-image confusion matrices: [N, H, W] labels and predictions -> [N, K, K] int64 counts."""
  n, k = len(labels), num_classes
  index = labels.reshape(n, -1).astype(np.int64) * k + predictions.reshape(n, -1)
  index += np.arange(n)[:, None] * k * k  # Each image counts into its own K x K block.
  return np.bincount(index.ravel(), minlength=n * k * k).reshape(n, k, k)


def image_mean_iou(confusion: np.ndarray) -> np.ndarray:
  """[N, K, K] -> [N]: each image's mean IoU over the classes in its truth or prediction."""
  true_positives = np.diagonal(confusion, axis1=1, axis2=2).astype(np.float64)
  union = confusion.sum(axis=2) + confusion.sum(axis=1) - true_positives
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.nanmean(np.where(union > 0, true_positives / union, np.nan), axis=1)


# ---------------------------------------------------------------------------------------------
# Predictions at the network's resolution and at the original one.


def _network_predictions(state, data, devices) -> np.ndarray:
  """[N, S, S] uint8: train.predict over the split, in the trainer's eval batches."""
  predict = jax.jit(train.predict)
  predictions = []
  for batch in devices.prefetch(input_pipeline.eval_batches(data, devices.local_batch_size)):
    predictions.append(np.asarray(jax.device_get(predict(state, batch['image']))))
  return np.concatenate(predictions)[:len(data)].astype(np.uint8)


def _logit_batches(state, images: np.ndarray, rows, devices: train.Devices):
  """(rows, logits [b, S, S, K] on the host) for the given rows of `images`, in fixed batches."""
  batch_size = devices.local_batch_size
  rows = list(rows)
  predict = jax.jit(inference.logits_fn)
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    batch = devices.put({'image': inference.padded_batch(list(images[chunk]), batch_size)})
    yield chunk, np.asarray(jax.device_get(predict(state, batch['image'])))[:len(chunk)]


def _original_predictions(state, data, originals, rows, devices):
  """Yields, a batch of `rows` at a time, [(row, image, labels, predicted)] at original size.

  image: [H, W, 3] uint8; labels: the original mask's classes [H, W] uint8; predicted: the
  network's logits upsampled bilinearly to [H, W] before the argmax, uint8.
  """
  for chunk, logits in _logit_batches(state, data.images, rows, devices):
    batch = []
    for row, image_logits in zip(chunk, logits):
      _, image, labels = originals[row]
      batch.append((row, image, labels, inference.upsample_classes(image_logits, *labels.shape)))
    yield batch


def _original_confusions(state, data, originals, config, devices) -> np.ndarray:
  """[N, K, K] per-image confusion matrices at each image's original resolution."""
  k = config.num_classes
  result = np.zeros((len(data), k, k), np.int64)
  progress = inference.Progress('evaluated', len(data))
  for batch in _original_predictions(state, data, originals, range(len(data)), devices):
    for row, _, labels, predicted in batch:
      result[row] = confusions(labels[None], predicted[None], k)[0]
    progress.update(batch[-1][0] + 1)
  return result


# ---------------------------------------------------------------------------------------------
# Scores, pictures and the report.


def _score(state, data, originals, config, devices, original: bool):
  """(results as from metrics.iou + 'confusion_matrix', [N, K, K] per image, [N, S, S] or None).

  At the network's resolution the totals come from the trainer's own eval step and batches, so
  they are the numbers of its metrics.jsonl.
  """
  if original:
    per_image = _original_confusions(state, data, originals, config, devices)
    results = jax.device_get(metrics.iou(jnp.asarray(per_image.sum(axis=0))))
    results['confusion_matrix'] = per_image.sum(axis=0)
    return results, per_image, None
  _, eval_fn = train.compile_steps(config, devices)
  results = train.evaluate(eval_fn, state, data, devices)
  predictions = _network_predictions(state, data, devices)
  return results, confusions(data.labels, predictions, config.num_classes), predictions


def _worst_gallery(path, worst, file_names, image_iou, data, originals, state, config, devices,
                   predictions, title) -> None:
  """Draws input / truth / prediction of the `worst` rows, titled with their names and IoUs.

  With `predictions` ([N, S, S]) at the network's resolution; without, at the original one.
  """
  if predictions is not None:
    images, labels, predicted = data.images[worst], data.labels[worst], predictions[worst]
  else:
    drawn = [x for batch in _original_predictions(state, data, originals, worst, devices)
             for x in batch]
    _, images, labels, predicted = (list(column) for column in zip(*drawn))
  row_titles = [f'{file_names[r]}\nmean IoU {image_iou[r]:.3f}' for r in worst]
  plots.predictions(path, images, labels, predicted, title=title,
                    num_classes=config.num_classes, row_titles=row_titles)


def _json_ready(value):
  """Arrays -> lists and NaN -> None, so that the file is strict JSON."""
  if isinstance(value, dict):
    return {k: _json_ready(v) for k, v in value.items()}
  if isinstance(value, np.ndarray):
    value = value.tolist()
  if isinstance(value, (list, tuple)):
    return [_json_ready(v) for v in value]
  if isinstance(value, (float, np.floating)):
    return None if np.isnan(value) else float(value)
  return int(value) if isinstance(value, np.integer) else value


def _output_stem(workdir, out, step, config, split, dataset, original) -> epath.Path:
  """<out>.json's path without the suffix: <workdir>/eval/step_<N>[_split][_original]."""
  if out and str(out).endswith('.json'):
    return epath.Path(str(out)[:-len('.json')])
  name = f'step_{step}'
  if dataset != config.dataset:
    name += '_' + ''.join(c if c.isalnum() else '-' for c in dataset)
  if split != config.eval_split:
    name += f'_{split}'
  return epath.Path(out or epath.Path(workdir) / 'eval') / (name + ('_original' if original
                                                                   else ''))


def evaluate(workdir, *, step: int | None = None, split: str | None = None,
             dataset: str | None = None, data_dir: str | None = None,
             original_resolution: bool = False, worst_k: int = 6, out=None,
             log=print) -> dict:
  """Scores a checkpoint on a split; writes JSON, a confusion-matrix PNG and a worst-k gallery.

  Args:
    workdir: a training run's --workdir.
    step: the checkpoint; None: the latest.
    split, dataset, data_dir: default: the run's config.eval_split, dataset and data_dir.
    original_resolution: score each image at its original size (logits upsampled bilinearly,
      truth = the original mask) instead of at the network's image_size x image_size.
    worst_k: images drawn in the gallery of the worst by per-image mean IoU.
    out: a .json path, or a directory; default <workdir>/eval.
    log: where the table goes.

  Returns:
    The dict written as JSON.
  """
  workdir = epath.Path(workdir)
  config = inference.trained_config(workdir)
  dataset, data_dir = dataset or config.dataset, data_dir or config.data_dir
  split = split or config.eval_split
  devices = train.Devices(config.batch_size)
  state = inference.restore(workdir, config, step, devices.replicated)
  step = int(state.step)
  data = input_pipeline.load_split(
      dataset, split, data_dir=data_dir, image_size=config.image_size,
      num_classes=config.num_classes, num_threads=config.input_threads)
  # Originals are decoded only where needed: every row at original resolution, else the worst.
  originals = input_pipeline.originals(dataset, split, data_dir, config.num_classes)
  results, per_image, predictions = _score(state, data, originals, config, devices,
                                           original_resolution)
  image_iou = image_mean_iou(per_image)
  worst = [int(r) for r in np.argsort(image_iou, kind='stable')[:max(worst_k, 0)]]
  file_names = {r: originals[r][0] for r in worst}

  names = plots.class_names(config.num_classes)
  what = f'step {step} on {dataset} {split} ({len(data)} images)'
  where = ("each image's original resolution (logits upsampled bilinearly)"
           if original_resolution else f"the network's {config.image_size}x"
           f'{config.image_size} resolution (as the trainer evaluates)')
  log(f'evaluation of {what} at {where}:\n{reporting.iou_table(results, names)}')
  resolution = 'original' if original_resolution else 'network'
  stem = _output_stem(workdir, out, step, config, split, dataset, original_resolution)
  files = {'json': f'{stem}.json', 'confusion_matrix': f'{stem}_confusion.png'}
  plots.confusion_matrix(files['confusion_matrix'], results['confusion_matrix'],
                         title=f'{what}\nat {resolution} resolution, rows sum to 100%')
  if worst:
    files['worst'] = f'{stem}_worst.png'
    _worst_gallery(files['worst'], worst, file_names, image_iou, data, originals, state, config,
                   devices, predictions,
                   f'the {len(worst)} worst of {len(data)} {split} images by mean IoU\n'
                   f'(step {step}, {resolution} resolution)')
  report = _json_ready({
      'workdir': str(workdir), 'step': step, 'dataset': dataset, 'split': split,
      'num_examples': len(data), 'resolution': resolution, 'image_size': config.image_size,
      'mean_iou': results['mean_iou'], 'pixel_accuracy': results['pixel_accuracy'],
      'mean_dice': results['mean_dice'],
      'per_class_iou': dict(zip(names, results['per_class_iou'])),
      'per_class_dice': dict(zip(names, results['per_class_dice'])),
      'confusion_matrix': results['confusion_matrix'],
      'worst': [{'index': r, 'file_name': file_names[r], 'mean_iou': image_iou[r]}
                for r in worst],
      'files': files,
  })
  epath.Path(files['json']).parent.mkdir(parents=True, exist_ok=True)
  epath.Path(files['json']).write_text(json.dumps(report, indent=2) + '\n')
  log('wrote ' + ', '.join(files.values()))
  return report
