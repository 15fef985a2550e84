"""Scoring a trained workdir on a split: the IoU table, JSON, a confusion matrix, the worst images.

`evaluate(workdir)` runs the model once over the split. At the network's resolution it uses the
trainer's own pipeline and eval step (per example), so its totals are the trainer's numbers; with
`original_resolution=True` it scores against the original-size masks (input_pipeline.originals:
tfds trimaps or folder masks), the logits upsampled bilinearly to each image's size as predict.py
does (inference.py). Per-image confusion matrices give both the totals and the worst images.
In crop mode (config.input_mode == 'crop') both resolutions are the image's own: each image is
predicted whole with the sliding window (tiles.py) and scored against its original mask.
With flip_tta every path scores the flip test-time augmentation's logits
(models.flip_tta_logits, through inference.Model), and the outputs say so.
"""

import functools
import heapq
import json

import jax
import numpy as np
from etils import epath

from unet_flax import checkpoints
from unet_flax import config as config_lib
from unet_flax import decode
from unet_flax import errors
from unet_flax import inference
from unet_flax import input_pipeline
from unet_flax import metrics
from unet_flax import plots
from unet_flax import reporting
from unet_flax import steps
from unet_flax import tiles
from unet_flax.devices import Devices


def confusions(labels: np.ndarray, predictions: np.ndarray, num_classes: int,
               ignore_label: int | None = None) -> np.ndarray:
  """Per-image confusion matrices: [N, H, W] labels and predictions -> [N, K, K] int64 counts.

  Pixels labelled ignore_label count nothing.
  """
  n, k = len(labels), num_classes
  labels = labels.reshape(n, -1).astype(np.int64)
  index = labels * k + predictions.reshape(n, -1)
  index += np.arange(n)[:, None] * k * k  # Each image counts into its own K x K block.
  if ignore_label is not None:
    index = index[labels != ignore_label]
  return np.bincount(index.ravel(), minlength=n * k * k).reshape(n, k, k)


def image_mean_iou(confusion: np.ndarray) -> np.ndarray:
  """[N, K, K] -> [N]: each image's mean IoU over the classes in its truth or prediction."""
  true_positives = np.diagonal(confusion, axis1=1, axis2=2).astype(np.float64)
  union = confusion.sum(axis=2) + confusion.sum(axis=1) - true_positives
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.nanmean(np.where(union > 0, true_positives / union, np.nan), axis=1)


class _Worst:
  """The k images of lowest mean IoU seen so far, with what to draw of them."""

  def __init__(self, k: int):
    self.k, self._heap = k, []  # (-iou, -row, picture rows): the best of the worst on top.

  def offer(self, row: int, iou: float, pictures) -> None:
    if self.k == 0:
      return
    item = (-iou, -row, pictures)
    if len(self._heap) < self.k:
      heapq.heappush(self._heap, item)
    elif item[:2] > self._heap[0][:2]:
      heapq.heapreplace(self._heap, item)

  def rows(self) -> list[tuple[int, float, tuple]]:
    """(row, mean IoU, (image, labels, prediction)), worst first (the earlier row at a tie)."""
    return [(-r, -i, p) for i, r, p in sorted(self._heap, key=lambda x: (-x[0], -x[1]))]


def _score_split(model: inference.Model, data, originals, devices: Devices, original: bool,
                 worst_k: int) -> tuple[np.ndarray, _Worst]:
  """One pass of the model over the split -> ([N, K, K] per-image confusions, the worst k).

  At the network's resolution the counts come from the trainer's eval step, per example; at the
  original one, from the network's logits upsampled to each original mask.
  """
  config, k = model.config, model.config.num_classes
  state = steps.TrainState(step=model.step, apply_fn=model.apply_fn(), params=model.params,
                           tx=None, opt_state=None)
  per_example = jax.jit(functools.partial(steps.eval_step_per_example, num_classes=k,
                                          ignore_label=config.ignore_label),
                        in_shardings=(devices.replicated, devices.data))
  logits_fn = model.logits_fn()
  per_image = np.zeros((len(data), k, k), np.int64)
  worst = _Worst(worst_k)
  progress = reporting.Progress('evaluated', len(data)) if original else None
  batches = input_pipeline.eval_batches(data, devices.local_batch_size)
  for i, batch in enumerate(devices.prefetch(batches)):
    rows = range(i * devices.local_batch_size,
                 min((i + 1) * devices.local_batch_size, len(data)))
    if not original:
      out = jax.device_get(per_example(state, batch))
      for j, row in enumerate(rows):
        per_image[row] = out['confusion'][j]
        iou = image_mean_iou(per_image[row][None])[0]
        worst.offer(row, iou, (data.images[row], data.labels[row], out['prediction'][j]))
      continue
    logits = np.asarray(jax.device_get(logits_fn(model.params, batch['image'])))
    for j, row in enumerate(rows):
      _, image, labels = originals[row]
      predicted = inference.upsample_classes(logits[j], *labels.shape)
      per_image[row] = confusions(labels[None], predicted[None], k, config.ignore_label)[0]
      worst.offer(row, image_mean_iou(per_image[row][None])[0], (image, labels, predicted))
    progress.update(rows[-1] + 1)
  return per_image, worst


def _score_split_tiled(model: inference.Model, originals, worst_k: int,
                      window_batch: int) -> tuple[np.ndarray, _Worst]:
  """Crop mode: each image whole through the sliding window at its own resolution -> ([N, K, K]
  per-image confusions, the worst k)."""
  config, k = model.config, model.config.num_classes
  forward = model.logits_fn()
  per_image = np.zeros((len(originals), k, k), np.int64)
  worst = _Worst(worst_k)
  progress = reporting.Progress('evaluated', len(originals))
  for row in range(len(originals)):
    _, image, labels = originals[row]
    predicted = tiles.predict_classes(forward, model.params, image, config, window_batch)
    per_image[row] = confusions(labels[None], predicted[None], k, config.ignore_label)[0]
    worst.offer(row, image_mean_iou(per_image[row][None])[0], (image, labels, predicted))
    progress.update(row + 1)
  return per_image, worst


def _draw(files: dict, stem, total, names, worst: _Worst, originals, step: int,
          what: str, how: str, num_examples: int, split: str) -> None:
  """The confusion-matrix heat map and the worst-k gallery; adds the gallery to `files`.

  how: e.g. 'network resolution', 'original resolution, flip TTA'.
  """
  plots.confusion_matrix(files['confusion_matrix'], total, names,
                         title=f'{what}\nat {how}, rows sum to 100%')
  drawn = worst.rows()
  if not drawn:
    return
  files['worst'] = f'{stem}_worst.png'
  images, labels, predicted = (list(c) for c in zip(*(p for _, _, p in drawn)))
  plots.predictions(files['worst'], images, labels, predicted, names,
                    title=f'the {len(drawn)} worst of {num_examples} {split} images by mean IoU\n'
                    f'(step {step}, {how})',
                    row_titles=[f'{originals[row][0]}\nmean IoU {iou:.3f}'
                                for row, iou, _ in drawn])


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


def _output_stem(workdir, out, step, config, split, dataset, original,
                 flip_tta=False, no_ema=False) -> epath.Path:
  """<out>.json's path without the suffix:
  <workdir>/eval/step_<N>[_dataset][_split][_original][_flip_tta][_no_ema]."""
  if out and str(out).endswith('.json'):
    return errors.absolute(str(out)[:-len('.json')])
  name = f'step_{step}'
  if dataset != config.dataset:
    name += '_' + ''.join(c if c.isalnum() else '-' for c in dataset)
  if split != config.eval_split:
    name += f'_{split}'
  directory = errors.absolute(out) if out else workdir / 'eval'
  return directory / (name + ('_original' if original else '') + ('_flip_tta' if flip_tta else '')
                       + ('_no_ema' if no_ema else ''))


def evaluate(workdir, *, step: int | None = None, split: str | None = None,
             dataset: str | None = None, data_dir: str | None = None,
             original_resolution: bool = False, flip_tta: bool = False, ema: bool = True,
             worst_k: int = 6, out=None, batch_size: int | None = None, log=print) -> dict:
  """Scores a checkpoint on a split; writes JSON, a confusion-matrix PNG and a worst-k gallery.

  Args:
    workdir: a training run's --workdir.
    step: the checkpoint; None: the latest.
    split, dataset, data_dir: default: the run's config.eval_split, dataset and data_dir.
    original_resolution: score each image at its original size (logits upsampled bilinearly,
      truth = the original mask) instead of at the network's image_size x image_size.
    flip_tta: score the flip test-time augmentation (models.flip_tta_logits): the mean of the
      softmax probabilities of each image and its left-right mirror, twice the compute.
    ema: of a run that kept a moving average of its weights (config.ema_decay), score that
      average, as the trainer does; False: the trained weights themselves.
    worst_k: images drawn in the gallery of the worst by per-image mean IoU.
    out: a .json path, or a directory; default <workdir>/eval.
    batch_size: images per forward pass; None: the run's config.batch_size, whose batches are
      the trainer's.
    log: where the table goes.

  Returns:
    The dict written as JSON.

  Raises:
    UserError: for a workdir that is no training run's, or data that cannot be read.
  """
  workdir = errors.absolute(workdir)
  model = inference.load_model(workdir, step, flip_tta=flip_tta, ema=ema)
  config = model.config
  no_ema = bool(config.ema_decay) and not ema
  count = jax.device_count()
  devices = Devices(-(-(batch_size or config.batch_size) // count) * count)
  dataset = dataset or config.dataset
  if dataset.startswith('folder:'):
    dataset = 'folder:' + str(errors.absolute(dataset[len('folder:'):]))
  data_dir = str(errors.absolute(data_dir)) if data_dir else config.data_dir
  split = split or config.eval_split
  stem = _output_stem(workdir, out, model.step, config, split, dataset, original_resolution,
                      flip_tta, no_ema)
  errors.make_output_dir(stem.parent, '--out')  # A full or read-only place fails before work.
  options = decode.Options.from_config(config)
  originals = input_pipeline.originals(dataset, split, data_dir, config.num_classes, options)
  if config.input_mode == 'crop':
    original_resolution = True  # Crop mode has no other resolution: both are the image's own.
    stem = _output_stem(workdir, out, model.step, config, split, dataset, True, flip_tta,
                        no_ema)
    data = originals
    per_image, worst = _score_split_tiled(model, originals, worst_k,
                                          batch_size or tiles.WINDOW_BATCH)
  else:
    data = input_pipeline.load_split(
        dataset, split, data_dir=data_dir, image_size=config.image_size,
        num_classes=config.num_classes, num_threads=config.input_threads, options=options)
    per_image, worst = _score_split(model, data, originals, devices, original_resolution,
                                    worst_k)
  total = per_image.sum(axis=0)
  results = jax.device_get(metrics.iou(total))
  results['confusion_matrix'] = total

  names = config_lib.class_names(config)
  what = f'step {model.step} on {dataset} {split} ({len(data)} images)'
  where = ("each image's original resolution (logits upsampled bilinearly)"
           if original_resolution else f"the network's {config.image_size}x"
           f'{config.image_size} resolution (as the trainer evaluates)')
  if config.input_mode == 'crop':
    where = (f"each image's original resolution ({config.crop_size}x{config.crop_size} "
             f'sliding window, overlap {config.tile_overlap:g}, scale {config.scale:g})')
  if flip_tta:
    where += ', with flip TTA (mean softmax of each image and its mirror)'
  if config.ema_decay:
    where += (', the weights\' moving average' if ema else
              ', the trained weights (not their moving average)')
  log(f'evaluation of {what} at {where}:\n{reporting.iou_table(results, names)}')
  resolution = 'original' if original_resolution else 'network'
  how = f'{resolution} resolution' + (', flip TTA' if flip_tta else '')
  files = {'json': f'{stem}.json', 'confusion_matrix': f'{stem}_confusion.png'}
  with checkpoints.disk_errors(str(stem.parent), flag='--out'):
    _draw(files, stem, total, names, worst, originals, model.step, what, how, len(data), split)
  drawn = worst.rows()
  file_names = {row: originals[row][0] for row, _, _ in drawn}
  report = _json_ready({
      'workdir': str(workdir), 'step': model.step, 'dataset': dataset, 'split': split,
      'num_examples': len(data), 'resolution': resolution, 'flip_tta': flip_tta,
      'ema': bool(config.ema_decay) and ema,
      'image_size': config.image_size,
      'mean_iou': results['mean_iou'], 'pixel_accuracy': results['pixel_accuracy'],
      'mean_dice': results['mean_dice'],
      'per_class_iou': dict(zip(names, results['per_class_iou'])),
      'per_class_dice': dict(zip(names, results['per_class_dice'])),
      'confusion_matrix': total,
      'worst': [{'index': row, 'file_name': file_names[row], 'mean_iou': iou}
                for row, iou, _ in drawn],
      'files': files,
  })
  with checkpoints.disk_errors(files['json'], flag='--out'):
    epath.Path(files['json']).write_text(json.dumps(report, indent=2) + '\n')
  log('wrote ' + ', '.join(reporting.shown(f) for f in files.values()))
  return report
