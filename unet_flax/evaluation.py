"""Scoring a trained workdir on a split: the IoU table, JSON, a confusion matrix, the worst images.

`evaluate_workdir(workdir)` runs the model once over the split. By default it scores the split as
the trainer does (the run's input mode, modes.py: its `score`, per example), so its totals are the
trainer's numbers; with `original_resolution=True` each photo is classified as predict.py
classifies it (the mode's `picture` and `classes`, from the encoded file) and scored against its
original-size mask. Per-image confusion matrices give both the totals and the worst images.
With flip_tta every path scores the flip test-time augmentation (models.flip_tta), and the
outputs say so.
"""

import heapq
import json
from collections.abc import Callable

import jax
import numpy as np
from etils import epath

from unet_flax import config as config_lib
from unet_flax import decode
from unet_flax import errors
from unet_flax import paths
from unet_flax import inference
from unet_flax import metrics
from unet_flax import plots
from unet_flax import reporting
from unet_flax import sources
from unet_flax.devices import Devices


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

  def offer(self, row: int, iou: float, pictures: Callable[[], tuple]) -> None:
    """pictures() -> (image, labels, prediction), called only for the rows drawn."""
    if self.k == 0:
      return
    item = (-iou, -row, pictures)
    if len(self._heap) < self.k:
      heapq.heappush(self._heap, item)
    elif item[:2] > self._heap[0][:2]:
      heapq.heapreplace(self._heap, item)

  def rows(self) -> list[tuple[int, float, tuple]]:
    """(row, mean IoU, (image, labels, prediction)), worst first (the earlier row at a tie)."""
    return [(-r, -i, p()) for i, r, p in sorted(self._heap, key=lambda x: (-x[0], -x[1]))]


def _per_image_at_network_resolution(model: inference.Model, data, devices: Devices,
                                     worst: _Worst) -> np.ndarray:
  """[N, K, K]: each example's confusion as the trainer scores the split (the mode's `score`)."""
  k = model.config.num_classes
  per_image = np.zeros((len(data), k, k), np.int64)

  def keep(row, confusion, prediction):
    per_image[row] = confusion
    # data[row] only for the rows drawn: crop mode decodes an uncached row again to get it.
    worst.offer(row, image_mean_iou(confusion[None])[0],
                lambda: (*data[row], prediction))

  model.mode.score(model.forward, model.params, data, devices, keep)
  return per_image


def _per_image_at_original_resolution(model: inference.Model, originals, batch_size: int,
                                      worst: _Worst) -> np.ndarray:
  """[N, K, K]: each photo classified as predict classifies it (the mode's `picture` and
  `classes`, from the encoded file), scored against its original-size mask."""
  config, k = model.config, model.config.num_classes
  per_image = np.zeros((len(originals), k, k), np.int64)
  progress = reporting.Progress('evaluated', len(originals))
  for start in range(0, len(originals), batch_size):
    rows = range(start, min(start + batch_size, len(originals)))
    examples = [originals[row] for row in rows]
    pictures = [model.mode.picture(data, name) for name, data, _ in examples]
    classes = model.mode.classes(model.forward, model.params, pictures, batch_size)
    for row, (name, data, labels), predicted in zip(rows, examples, classes):
      per_image[row] = metrics.host_confusion_matrices(labels[None], predicted[None], k,
                                                       config.ignore_label)[0]
      worst.offer(row, image_mean_iou(per_image[row][None])[0],
                  lambda data=data, name=name, labels=labels, predicted=predicted: (
                      inference.read_photo(config, data, name), labels, predicted))
    progress.update(rows[-1] + 1)
  return per_image


def _draw(files: dict, stem, total, names, drawn: list, file_names: dict, step: int,
          what: str, how: str, num_examples: int, split: str) -> None:
  """The confusion-matrix heat map and the worst-k gallery (`drawn`: _Worst.rows()); adds the
  gallery to `files`.

  how: e.g. 'network resolution', 'original resolution, flip TTA'.
  """
  plots.confusion_matrix(files['confusion_matrix'], total, names,
                         title=f'{what}\nat {how}, rows sum to 100%')
  if not drawn:
    return
  files['worst'] = f'{stem}_worst.png'
  images, labels, predicted = (list(c) for c in zip(*(p for _, _, p in drawn)))
  plots.predictions(files['worst'], images, labels, predicted, names,
                    title=f'the {len(drawn)} worst of {num_examples} {split} images by mean IoU\n'
                    f'(step {step}, {how})',
                    row_titles=[f'{file_names[row]}\nmean IoU {iou:.3f}'
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


def _split_name(split: str) -> str:
  """A tfds split as a file name's part: 'test[:50%]' -> 'test_to50pct', 'train[80%:]' ->
  'train_80pctto', 'test[10:20]' -> 'test_10to20', 'train+test' kept; no brackets, colons or
  percent signs, which shells and some file systems take for something else, and distinct slices
  stay distinct."""
  name = split.replace('[', '_').replace(']', '').replace(':', 'to').replace('%', 'pct')
  return ''.join(c if c.isalnum() or c in '.+-_' else '-' for c in name)


def _output_stem(workdir, out, step, config, split, dataset, original,
                 flip_tta=False, no_ema=False, data_dir=None) -> epath.Path:
  """<out>.json's path without the suffix:
  <workdir>/eval/step_<N>[_dataset][_data_dir][_split][_original][_flip_tta][_no_ema]: another
  data set, data_dir or split than the run's is named, so no evaluation replaces another's."""
  if out and str(out).endswith('.json'):
    return paths.absolute(str(out)[:-len('.json')])
  name = f'step_{step}'
  for value, own in ((dataset, config.dataset), (data_dir, config.data_dir)):
    if value != own:
      name += '_' + ''.join(c if c.isalnum() else '-' for c in str(value)).strip('-')
  if split != config.eval_split:
    name += f'_{_split_name(split)}'
  directory = paths.absolute(out) if out else workdir / 'eval'
  return directory / (name + ('_original' if original else '') + ('_flip_tta' if flip_tta else '')
                       + ('_no_ema' if no_ema else ''))


def evaluate_workdir(workdir, *, step: int | None = None, split: str | None = None,
                     dataset: str | None = None, data_dir: str | None = None,
                     original_resolution: bool = False, flip_tta: bool = False, ema: bool = True,
                     worst_k: int = 6, out=None, batch_size: int | None = None,
                     log=print) -> dict:
  """Scores a checkpoint on a split; writes JSON, a confusion-matrix PNG and a worst-k gallery.

  Args:
    workdir: a training run's --workdir.
    step: the checkpoint; None: the latest.
    split, dataset, data_dir: default: the run's config.eval_split, dataset and data_dir.
    original_resolution: classify each photo as predict.py does and score it against its
      original-size mask, instead of scoring the split as the trainer does.
    flip_tta: score the flip test-time augmentation (models.flip_tta): the mean of the softmax
      probabilities of each image and its left-right mirror, twice the compute.
    ema: of a run that kept a moving average of its weights (config.ema_decay), score that
      average, as the trainer does; False: the trained weights themselves.
    worst_k: images drawn in the gallery of the worst by per-image mean IoU.
    out: a .json path, or a directory; default <workdir>/eval.
    batch_size: images (crop mode: windows) per forward pass; None: the run's
      config.batch_size, whose batches are the trainer's.
    log: where the table goes.

  Returns:
    The dict written as JSON.

  Raises:
    UserError: for a workdir that is no training run's, data that cannot be read, or a split that
      holds no example.
  """
  workdir = paths.absolute(workdir)
  model = inference.load_model(workdir, step, flip_tta=flip_tta, ema=ema)
  config, mode = model.config, model.mode
  if not ema and not config.ema_decay:
    raise errors.UserError(f'--noema: the run in {workdir} keeps no moving average of its weights '
                           '(config.ema_decay is 0), so its weights are what evaluate scores; '
                           'leave out --noema')
  no_ema = bool(config.ema_decay) and not ema
  count = jax.device_count()
  devices = Devices(-(-(batch_size or config.batch_size) // count) * count)
  dataset = dataset or config.dataset
  if dataset.startswith('folder:'):
    dataset = 'folder:' + str(paths.absolute(dataset[len('folder:'):]))
  # A data_dir from a received config.json is read, never written: only one the user passes
  # (or tfds's own default) may be prepared.
  prepare = bool(data_dir) or config.data_dir is None
  data_dir = str(paths.absolute(data_dir)) if data_dir else config.data_dir
  chosen_by = f'--split {split}' if split else f"the run's config.eval_split={config.eval_split!r}"
  split = split or config.eval_split
  stem = _output_stem(workdir, out, model.step, config, split, dataset, original_resolution,
                      flip_tta, no_ema, data_dir)
  paths.refuse_link(stem.parent)  # A received workdir's planted eval/ link: never written through.
  paths.check_output_dir(stem.parent, '--out')  # A file or read-only place fails before work.
  for suffix in ('.json', '_confusion.png', '_worst.png'):
    paths.refuse_link(f'{stem}{suffix}')
  source = sources.open_source(dataset, data_dir, config.num_classes,
                               decode.Options.from_config(config), prepare=prepare)
  sources.check_split(source, split, chosen_by)
  originals = sources.encoded_originals(source, split)
  worst = _Worst(worst_k)
  if original_resolution:
    per_image = _per_image_at_original_resolution(model, originals, devices.local_batch_size,
                                                  worst)
  else:
    data = mode.read_split(source, split)
    per_image = _per_image_at_network_resolution(model, data, devices, worst)
  total = per_image.sum(axis=0)
  results = jax.device_get(metrics.scores(total))
  results['confusion_matrix'] = total

  names = config_lib.class_names(config)
  what = f'step {model.step} on {dataset} {split} ({len(per_image)} images)'
  where = ("each image's original resolution, as predict.py classifies it" if original_resolution
           else mode.describe())
  if flip_tta:
    where += ', with flip TTA (mean softmax of each image and its mirror)'
  if config.ema_decay:
    where += (', the weights\' moving average' if ema else
              ', the trained weights (not their moving average)')
  log(f'evaluation of {what} at {where}:\n{reporting.iou_table(results, names)}')
  warning = reporting.prediction_warning(total, names)
  if warning:
    log(warning)
  resolution = 'original' if original_resolution else 'network'
  how = f'{resolution} resolution' + (', flip TTA' if flip_tta else '')
  files = {'json': f'{stem}.json', 'confusion_matrix': f'{stem}_confusion.png'}
  drawn = worst.rows()
  file_names = {row: originals[row][0] for row, _, _ in drawn}
  paths.make_output_dir(stem.parent, '--out')  # Only now: a refused run leaves no folder.
  with errors.disk_errors(str(stem.parent), flag='--out'):
    _draw(files, stem, total, names, drawn, file_names, model.step, what, how, len(per_image),
          split)
  report = _json_ready({
      'workdir': str(workdir), 'step': model.step, 'dataset': dataset, 'split': split,
      'num_examples': len(per_image), 'resolution': resolution, 'mode': mode.name,
      'flip_tta': flip_tta, 'ema': bool(config.ema_decay) and ema,
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
  with errors.disk_errors(files['json'], flag='--out'):
    paths.write_atomically(files['json'], lambda temporary: temporary.write_text(
        json.dumps(report, indent=2) + '\n'))
  log('wrote ' + ', '.join(reporting.shown(f) for f in files.values()))
  return report
