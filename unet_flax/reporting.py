"""What the user sees: progress lines, IoU tables, metrics files and pictures.

Only the lead process (index 0) writes. Metrics go to <workdir>/metrics.jsonl (one JSON object per
line) and to TensorBoard event files under <workdir>/tensorboard (written by tensorboardX: no
TensorFlow needed); pictures to <workdir>/predictions/step_<N>.png.
"""

import contextlib
import json
import os
import sys
import time

import numpy as np
from etils import epath

from unet_flax import config as config_lib
from unet_flax import errors
from unet_flax import paths


def _duration(seconds: float) -> str:
  seconds = int(seconds)
  if seconds >= 3600:
    return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m'
  return f'{seconds // 60}m{seconds % 60:02d}s' if seconds >= 60 else f'{seconds}s'


def prediction_warning(confusion, names) -> str | None:
  """One line when an evaluation's predictions are degenerate, else None: one class predicted
  everywhere, or a class the labels hold never predicted. A model that has not learnt yet looks
  like this, and its mean IoU alone does not say so.

  Args:
    confusion: [K, K] counts, rows the true classes, columns the predicted ones.
    names: the classes' names.
  """
  confusion = np.asarray(confusion)
  predicted = [k for k in range(len(names)) if confusion[:, k].sum()]
  missed = [k for k in range(len(names)) if confusion[k].sum() and not confusion[:, k].sum()]
  fix = ('train longer (config.num_epochs, config.steps_per_epoch), check config.learning_rate, '
         'or raise the weight of rare classes (config.class_weights)')
  if len(predicted) == 1 and np.count_nonzero(confusion.sum(axis=1)) > 1:
    return (f'warning: the model predicts one class everywhere '
            f'({errors.printable(names[predicted[0]])!r}): it has not learnt the others yet; {fix}')
  if missed:
    listed = ', '.join(repr(errors.printable(names[k])) for k in missed)
    return f'warning: the labels hold {listed}, which the model never predicts; {fix}'
  return None


def iou_table(results: dict, names) -> str:
  """The per-class IoU and Dice of `metrics.scores`' results, as an aligned text table.

  Args:
    results: metrics.scores' dict.
    names: the classes' names, one per class ('class k' stands in for any missing).
  """
  per_class = results['per_class_iou']
  names = [errors.printable(n) for n in names]  # Names come from files: no terminal codes.
  names += [f'class {k}' for k in range(len(names), len(per_class))]
  width = max(len(n) for n in names + ['mean'])
  lines = [f'  {"class":<{width}}     IoU    Dice']
  for name, iou, dice in zip(names, per_class, results['per_class_dice']):
    lines.append(f'  {name:<{width}}  {iou:6.4f}  {dice:6.4f}')
  lines.append(f'  {"mean":<{width}}  {results["mean_iou"]:6.4f}  {results["mean_dice"]:6.4f}')
  lines.append(f'  pixel accuracy {results["pixel_accuracy"]:.4f}')
  return '\n'.join(lines)


def absent_classes(labels, names) -> str | None:
  """The warning for classes that occur in no training mask, or None if each occurs.

  A class no mask holds is never learnt, and its IoU stays NaN or 0 without a word: usually
  config.num_classes is larger than the data's classes, or the masks are not what they seem.

  Args:
    labels: [N, H, W] uint8 arrays of class indices (one or several: a split's labels, or its
      masks one by one); values past the classes (ignore_label) are not counted.
    names: the classes' names, one per class.
  """
  counts = np.zeros(len(names), np.int64)
  for array in labels:
    counts += np.bincount(np.asarray(array).ravel(), minlength=256)[:len(names)]
  absent = [k for k in range(len(names)) if not counts[k]]
  if not absent:
    return None
  listed = ', '.join(f'{k} ({errors.printable(names[k])!r})' for k in absent)
  if len(absent) == 1:
    return (f'warning: class {listed} occurs in no training mask: the model cannot learn it; '
            'check config.num_classes and the masks')
  return (f'warning: classes {listed} occur in no training mask: the model cannot learn them; '
          'check config.num_classes and the masks')


class Progress:
  """'done/total, img/s, ETA' on stderr for long loops: in place on a terminal, else every 10 s."""

  def __init__(self, what: str, total: int, stream=None):
    self.what, self.total = what, total
    self.stream = stream or sys.stderr
    self.in_place = self.stream.isatty()
    self.started = self._shown = time.perf_counter()

  def update(self, done: int, skipped: int = 0) -> None:
    """Shows `done` of the total gone through, of which `skipped` gave nothing (counted apart,
    so that the line agrees with what was written)."""
    now = time.perf_counter()
    if done < self.total and not self.in_place and now - self._shown < 10:
      return
    self._shown = now
    rate = done / max(now - self.started, 1e-9)
    eta = (self.total - done) / max(rate, 1e-9)
    counted = f'{done - skipped}/{self.total} images' + (f' ({skipped} skipped)' if skipped else '')
    line = f'{self.what} {counted}, {rate:.1f} img/s, ETA {eta:.0f}s'
    end = '\n' if done >= self.total or not self.in_place else ''
    print(('\r' if self.in_place else '') + line, end=end, file=self.stream, flush=True)


def shown(path) -> str:
  """`path` as the user would type it here: relative below the current directory."""
  relative = os.path.relpath(path)
  return str(path) if relative.startswith('..') else relative


class Reporter:
  """Progress, metrics and pictures of one training run."""

  def __init__(self, workdir, config, *, is_lead: bool):
    self.workdir = epath.Path(workdir)
    self.config = config
    self.is_lead = is_lead
    self._writer = None
    self._last = None
    self._purge_step = None
    self._evaluated = set()

  @property
  def writer(self):
    if self._writer is None:
      import tensorboardX  # pylint: disable=g-import-not-at-top  (slow import; lead only)
      # TensorBoard drops what a crashed run logged after the restored step.
      self._writer = tensorboardX.SummaryWriter(str(self.workdir / 'tensorboard'),
                                                purge_step=self._purge_step)
    return self._writer

  def resume(self, step: int) -> None:
    """Forgets what an interrupted run logged after `step`, the checkpoint restored.

    metrics.jsonl keeps its complete records of steps <= step (a line cut short by a kill is
    dropped) and ends with a whole line; TensorBoard purges its later events. So steps that are
    run again are logged once, and curves never go back in time.
    """
    path = self.workdir / 'metrics.jsonl'
    self._purge_step = step + 1
    if not self.is_lead or not path.exists():
      return
    kept = []
    for line in path.read_text().splitlines():
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(record, dict) and record.get('step', 0) <= step:
        kept.append(line)
        if record.get('split') == 'eval':
          self._evaluated.add(record['step'])
    text = ''.join(line + '\n' for line in kept)
    if text != path.read_text():
      paths.write_atomically(path, lambda temporary: temporary.write_text(text))

  def evaluated(self, step: int) -> bool:
    """Whether metrics.jsonl holds an evaluation of `step` (after `resume`)."""
    return step in self._evaluated

  def text(self, line: str) -> None:
    if self.is_lead:
      print(line, flush=True)

  def _record(self, step: int, split: str, values: dict) -> None:
    with (self.workdir / 'metrics.jsonl').open('a') as f:
      record = {'step': step, 'split': split, **values}
      # Strict JSON: an absent class's NaN IoU is null.
      f.write(json.dumps({k: None if isinstance(v, float) and np.isnan(v) else v
                          for k, v in record.items()}) + '\n')
    for name, value in values.items():
      if isinstance(value, float):
        self.writer.add_scalar(f'{split}/{name}', value, step)
    self.writer.flush()

  def start(self, step: int, total_steps: int) -> None:
    self.total_steps = total_steps
    self._last = (step, time.perf_counter())

  def train(self, step: int, history: list[dict]) -> None:
    """Logs the mean loss of the steps since the last call, with speed and ETA."""
    if not self.is_lead:
      return
    last_step, last_time = self._last
    now = time.perf_counter()
    self._last = (step, now)
    steps_per_second = (step - last_step) / max(now - last_time, 1e-9)
    loss = float(np.mean([h['loss'] for h in history]))
    images_per_second = steps_per_second * self.config.batch_size
    eta = (self.total_steps - step) / max(steps_per_second, 1e-9)
    self.text(f'step {step}/{self.total_steps} | loss {loss:.4f} | '
              f'{images_per_second:.1f} img/s | ETA {_duration(eta)}')
    self._record(step, 'train', {
        'loss': loss, 'images_per_second': images_per_second,
        # Skipped non-finite updates so far (config.skip_nonfinite_updates).
        'nonfinite_updates': int(history[-1].get('nonfinite_updates', 0))})

  def eval(self, step: int, epoch: int, results: dict, sample: dict | None) -> None:
    """Prints the IoU table, records the metrics and draws the predictions."""
    if not self.is_lead:
      return
    names = config_lib.class_names(self.config)
    self.text(f'eval after epoch {epoch} (step {step}):\n{iou_table(results, names)}')
    warning = prediction_warning(results['confusion_matrix'], names)
    if warning:
      self.text(warning)
    values = {
        'mean_iou': float(results['mean_iou']),
        'pixel_accuracy': float(results['pixel_accuracy']),
        'mean_dice': float(results['mean_dice']),
        **{f'iou_{name}': float(v) for name, v in zip(names, results['per_class_iou'])},
        'confusion_matrix': results['confusion_matrix'].tolist(),
    }
    self._record(step, 'eval', values)
    from unet_flax import plots  # pylint: disable=g-import-not-at-top  (matplotlib is slow)
    plots.curves(self.workdir)
    if sample is not None:
      path = self.workdir / 'predictions' / f'step_{step}.png'
      plots.predictions(path, **sample, names=names,
                        title=f'step {step}, mean IoU {values["mean_iou"]:.3f}')
    # The timer restarts so that evaluation does not count against training speed.
    self._last = (step, time.perf_counter())

  def done(self, evaluated: bool) -> None:
    """Says where the outputs are and what to run next."""
    workdir = shown(self.workdir)
    outputs = ('checkpoints/, metrics.jsonl, curves.png and predictions/' if evaluated
               else 'checkpoints/')
    self.text(f'{outputs} are in {workdir}\nnext:\n'
              f'  python predict.py --workdir {workdir} --out masks/ photos/*.jpg\n'
              f'  python evaluate.py --workdir {workdir} --original_resolution')

  def close(self) -> None:
    if self._writer is not None:
      # A full disk was reported where it struck; closing must not say it again, in a traceback.
      with contextlib.suppress(OSError):
        self._writer.close()
    sys.stdout.flush()
