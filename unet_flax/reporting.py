"""What the user sees: progress lines, IoU tables, metrics files and pictures.

Only the lead process (index 0) writes. Metrics go to <workdir>/metrics.jsonl (one JSON object per
line) and to TensorBoard event files under <workdir>/tensorboard (written by tensorboardX: no
TensorFlow needed); pictures to <workdir>/predictions/step_<N>.png.
"""

import json
import sys
import time

import numpy as np
from etils import epath

from unet_flax import input_pipeline


def _duration(seconds: float) -> str:
  seconds = int(seconds)
  if seconds >= 3600:
    return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m'
  return f'{seconds // 60}m{seconds % 60:02d}s' if seconds >= 60 else f'{seconds}s'


def iou_table(results: dict, class_names=input_pipeline.CLASS_NAMES) -> str:
  """The per-class IoU and Dice of `metrics.iou`'s results, as an aligned text table."""
  per_class = results['per_class_iou']
  names = list(class_names) + [f'class {i}' for i in range(len(class_names), len(per_class))]
  width = max(len(n) for n in names + ['mean'])
  lines = [f'  {"class":<{width}}     IoU    Dice']
  for name, iou, dice in zip(names, per_class, results['per_class_dice']):
    lines.append(f'  {name:<{width}}  {iou:6.4f}  {dice:6.4f}')
  lines.append(f'  {"mean":<{width}}  {results["mean_iou"]:6.4f}  {results["mean_dice"]:6.4f}')
  lines.append(f'  pixel accuracy {results["pixel_accuracy"]:.4f}')
  return '\n'.join(lines)


class Reporter:
  """Progress, metrics and pictures of one training run."""

  def __init__(self, workdir, config, *, is_lead: bool):
    self.workdir = epath.Path(workdir)
    self.config = config
    self.is_lead = is_lead
    self._writer = None
    self._last = None

  @property
  def writer(self):
    if self._writer is None:
      import tensorboardX  # pylint: disable=g-import-not-at-top  (slow import; lead only)
      self._writer = tensorboardX.SummaryWriter(str(self.workdir / 'tensorboard'))
    return self._writer

  def text(self, line: str) -> None:
    if self.is_lead:
      print(line, flush=True)

  def _record(self, step: int, split: str, values: dict) -> None:
    with (self.workdir / 'metrics.jsonl').open('a') as f:
      f.write(json.dumps({'step': step, 'split': split, **values}) + '\n')
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
    self.text(f'eval after epoch {epoch} (step {step}):\n{iou_table(results)}')
    values = {
        'mean_iou': float(results['mean_iou']),
        'pixel_accuracy': float(results['pixel_accuracy']),
        'mean_dice': float(results['mean_dice']),
        **{f'iou_{name}': float(v)
           for name, v in zip(input_pipeline.CLASS_NAMES, results['per_class_iou'])},
        'confusion_matrix': results['confusion_matrix'].tolist(),
    }
    self._record(step, 'eval', values)
    from unet_flax import plots  # pylint: disable=g-import-not-at-top  (matplotlib is slow)
    plots.curves(self.workdir)
    if sample is not None:
      path = self.workdir / 'predictions' / f'step_{step}.png'
      plots.predictions(path, **sample, title=f'step {step}, mean IoU {values["mean_iou"]:.3f}')
    # The timer restarts so that evaluation does not count against training speed.
    self._last = (step, time.perf_counter())

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
    sys.stdout.flush()
