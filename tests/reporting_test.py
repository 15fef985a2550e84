"""reporting.py: resuming metrics.jsonl, progress lines, the IoU table and what each call writes."""

import io
import json
import math
import os

import numpy as np
import pytest

from tests.conftest import tensorboard_scalars
from unet_flax import reporting

PET = ('pet', 'background', 'border')


class _Clock:
  """A stand-in for time.perf_counter that moves only when told."""

  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


@pytest.fixture
def clock(monkeypatch):
  clock = _Clock()
  monkeypatch.setattr(reporting.time, 'perf_counter', clock)
  return clock


def _lines(*records) -> str:
  return ''.join(json.dumps(r) + '\n' for r in records)


TRAIN = [{'step': s, 'split': 'train', 'loss': 1.0 / s} for s in range(1, 7)]
EVALS = [{'step': s, 'split': 'eval', 'mean_iou': 0.1 * s} for s in (3, 6)]


def test_resume_keeps_whole_records_up_to_the_step_and_ends_with_a_whole_line(tmp_path,
                                                                           tiny_config):
  path = tmp_path / 'metrics.jsonl'
  path.write_text(_lines(*TRAIN[:3], EVALS[0], *TRAIN[3:], EVALS[1]) + '{"step": 7, "spl')
  report = reporting.Reporter(tmp_path, tiny_config, is_lead=True)
  report.resume(4)
  assert path.read_text() == _lines(*TRAIN[:3], EVALS[0], TRAIN[3])
  assert [report.evaluated(s) for s in (3, 4, 6)] == [True, False, False]


def test_resume_drops_a_cut_short_line_and_records_of_no_step(tmp_path, tiny_config):
  path = tmp_path / 'metrics.jsonl'
  path.write_text(_lines(*TRAIN[:2]) + '[1, 2]\n' + _lines(EVALS[0])[:-1] + '\n{"step": 4, ')
  report = reporting.Reporter(tmp_path, tiny_config, is_lead=True)
  report.resume(6)
  assert path.read_text() == _lines(*TRAIN[:2], EVALS[0])
  assert report.evaluated(3) and not report.evaluated(6)


def test_resume_leaves_a_whole_file_alone_and_only_the_lead_rewrites(tmp_path, tiny_config):
  path = tmp_path / 'metrics.jsonl'
  text = _lines(*TRAIN, *EVALS)
  path.write_text(text)
  os.utime(path, ns=(1, 1))
  reporting.Reporter(tmp_path, tiny_config, is_lead=True).resume(6)
  assert path.read_text() == text and path.stat().st_mtime_ns == 1  # Not even rewritten.
  follower = reporting.Reporter(tmp_path, tiny_config, is_lead=False)
  follower.resume(2)
  assert path.read_text() == text
  reporting.Reporter(tmp_path / 'new', tiny_config, is_lead=True).resume(0)  # No file yet: fine.
  assert not (tmp_path / 'new').exists()


def test_train_logs_the_mean_loss_speed_and_eta(tmp_path, tiny_config, clock, capsys):
  tiny_config.batch_size = 8
  report = reporting.Reporter(tmp_path, tiny_config, is_lead=True)
  report.start(0, 10_000)
  clock.now = 5.0  # 10 steps in 5 s: 2 steps/s, 16 img/s; 9,990 steps left: 4,995 s.
  report.train(10, [{'loss': np.float32(1.0), 'nonfinite_updates': np.int32(0)},
                    {'loss': np.float32(3.0), 'nonfinite_updates': np.int32(1)}])
  clock.now = 65.0  # 10 steps in 60 s: ETA 9,980 x 6 s.
  report.train(20, [{'loss': 0.5, 'nonfinite_updates': 1}])
  clock.now = 66.0
  report.start(9_990, 10_000)  # A resumed run: the rate counts from its first step.
  clock.now = 71.0
  report.train(10_000, [{'loss': 0.25, 'nonfinite_updates': 1}])
  report.close()
  assert capsys.readouterr().out.splitlines() == [
      'step 10/10000 | loss 2.0000 | 16.0 img/s | ETA 1h23m',
      'step 20/10000 | loss 0.5000 | 1.3 img/s | ETA 16h38m',
      'step 10000/10000 | loss 0.2500 | 16.0 img/s | ETA 0s']
  records = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert records == [
      {'step': 10, 'split': 'train', 'loss': 2.0, 'images_per_second': 16.0,
       'nonfinite_updates': 1},
      {'step': 20, 'split': 'train', 'loss': 0.5, 'images_per_second': 8 / 6,
       'nonfinite_updates': 1},
      {'step': 10_000, 'split': 'train', 'loss': 0.25, 'images_per_second': 16.0,
       'nonfinite_updates': 1}]
  assert tensorboard_scalars(tmp_path / 'tensorboard') == {
      (f'train/{name}', step): value
      for step, loss, speed in [(10, 2.0, 16.0), (20, 0.5, 8 / 6), (10_000, 0.25, 16.0)]
      for name, value in [('loss', loss), ('images_per_second', pytest.approx(speed))]}


RESULTS = {
    'per_class_iou': np.array([0.5, 0.25, np.nan]),
    'per_class_dice': np.array([2 / 3, 0.4, np.nan]),
    'mean_iou': np.float32(0.375), 'mean_dice': np.float32(8 / 15),
    'pixel_accuracy': np.float32(0.6),
    'confusion_matrix': np.array([[3, 1, 0], [2, 1, 0], [0, 0, 0]]),
}


def test_iou_table_lines_up_each_classs_iou_and_dice():
  assert reporting.iou_table(RESULTS, PET).splitlines() == [
      '  class          IoU    Dice',
      '  pet         0.5000  0.6667',
      '  background  0.2500  0.4000',
      '  border         nan     nan',
      '  mean        0.3750  0.5333',
      '  pixel accuracy 0.6000']
  four = {**RESULTS, 'per_class_iou': np.array([0.5, 0.25, 0.0, 1.0]),
          'per_class_dice': np.array([0.5, 0.25, 0.0, 1.0])}
  assert reporting.iou_table(four, ('a', 'b')).splitlines()[1:5] == [
      '  a        0.5000  0.5000',
      '  b        0.2500  0.2500',
      '  class 2  0.0000  0.0000',
      '  class 3  1.0000  1.0000']


def test_eval_prints_the_table_and_records_every_score(tmp_path, tiny_config, capsys):
  (tmp_path / 'metrics.jsonl').write_text(_lines(*TRAIN[:3]))
  report = reporting.Reporter(tmp_path, tiny_config, is_lead=True)
  report.start(3, 6)
  report.eval(3, 1, RESULTS, sample=None)
  report.close()
  out = capsys.readouterr().out
  assert out == f'eval after epoch 1 (step 3):\n{reporting.iou_table(RESULTS, PET)}\n'
  *train, record = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert train == TRAIN[:3]
  border = record.pop('iou_border')
  assert border is None or math.isnan(border)  # No pixels of the class: no IoU.
  assert record == {'step': 3, 'split': 'eval', 'mean_iou': 0.375,
                    'pixel_accuracy': float(np.float32(0.6)),
                    'mean_dice': float(np.float32(8 / 15)),
                    'iou_pet': 0.5, 'iou_background': 0.25,
                    'confusion_matrix': [[3, 1, 0], [2, 1, 0], [0, 0, 0]]}
  assert report.evaluated(3) is False  # Only what resume read: a run evaluates each step once.
  assert (tmp_path / 'curves.png').is_file() and not (tmp_path / 'predictions').exists()


def test_a_follower_writes_and_prints_nothing(tmp_path, tiny_config, capsys):
  report = reporting.Reporter(tmp_path, tiny_config, is_lead=False)
  report.start(0, 6)
  report.train(1, [{'loss': 1.0}])
  report.eval(3, 1, RESULTS, sample=None)
  report.done(evaluated=True)
  report.close()
  assert capsys.readouterr().out == '' and list(tmp_path.iterdir()) == []


def test_done_names_the_outputs_and_the_next_commands_relative_to_here(tmp_path, tiny_config,
                                                                        capsys, monkeypatch):
  monkeypatch.chdir(tmp_path)
  reporting.Reporter(tmp_path / 'runs' / 'a', tiny_config, is_lead=True).done(evaluated=True)
  reporting.Reporter('/', tiny_config, is_lead=True).done(evaluated=False)
  assert capsys.readouterr().out.splitlines() == [
      'checkpoints/, metrics.jsonl, curves.png and predictions/ are in runs/a',
      'next:',
      '  python predict.py --workdir runs/a --out masks/ photos/*.jpg',
      '  python evaluate.py --workdir runs/a --original_resolution',
      'checkpoints/ are in /',
      'next:',
      '  python predict.py --workdir / --out masks/ photos/*.jpg',
      '  python evaluate.py --workdir / --original_resolution']


class _Terminal(io.StringIO):
  def isatty(self):
    return True


def test_progress_prints_every_10_seconds_to_a_file_and_in_place_on_a_terminal(clock):
  log = io.StringIO()
  progress = reporting.Progress('evaluated', 20, stream=log)
  for now, done in [(2.0, 2), (9.9, 4), (10.0, 5), (15.0, 8), (20.0, 20)]:
    clock.now = now
    progress.update(done)
  assert log.getvalue() == ('evaluated 5/20 images, 0.5 img/s, ETA 30s\n'
                            'evaluated 20/20 images, 1.0 img/s, ETA 0s\n')
  terminal = _Terminal()
  clock.now = 0.0
  progress = reporting.Progress('evaluated', 4, stream=terminal)
  for now, done in [(1.0, 1), (2.0, 4)]:
    clock.now = now
    progress.update(done)
  assert terminal.getvalue() == ('\revaluated 1/4 images, 1.0 img/s, ETA 3s'
                                 '\revaluated 4/4 images, 2.0 img/s, ETA 0s\n')


def test_absent_classes_are_found_from_the_labels():
  labels = np.array([[[0, 0], [2, 2]], [[0, 2], [0, 0]]], np.uint8)
  assert reporting.absent_classes([labels], ('bg', 'cat', 'dog')) == (
      "warning: class 1 ('cat') occurs in no training mask: the model cannot learn it; check "
      'config.num_classes and the masks')
  assert reporting.absent_classes([labels[:1], labels[1:]], ('bg', 'x', 'y', 'z')).startswith(
      "warning: classes 1 ('x'), 3 ('z') occur in no training mask")
  assert reporting.absent_classes([labels], ('a', 'b', 'c')) == (
      "warning: class 1 ('b') occurs in no training mask: the model cannot learn it; check "
      'config.num_classes and the masks')
  assert reporting.absent_classes([labels, labels[:, :1]], ('a', 'b'))[:8] == 'warning:'


def test_class_names_with_terminal_escapes_are_printed_escaped():
  names = ('\x1b[2J\x1b[Hbg', 'cat\r', 'dog')
  table = reporting.iou_table(RESULTS, names)
  assert '\x1b' not in table and '\r' not in table
  assert table.splitlines()[1].startswith('  \\x1b[2J\\x1b[Hbg  0.5000')


def test_a_degenerate_evaluation_is_named_in_one_line_with_what_usually_fixes_it():
  names = ('cell', 'membrane')
  one_class = np.array([[0, 700], [0, 300]])  # ISBI-like: every pixel called membrane.
  line = reporting.prediction_warning(one_class, names)
  assert line.startswith("warning: the model predicts one class everywhere ('membrane'): it has "
                         'not learnt the others yet; train longer')
  missed = np.array([[50, 0, 0], [0, 30, 0], [5, 0, 0]])  # Class 2 labelled, never predicted.
  assert reporting.prediction_warning(missed, ('a', 'b', 'c')).startswith(
      "warning: the labels hold 'c', which the model never predicts;")
  assert reporting.prediction_warning(np.array([[5, 1], [2, 9]]), names) is None
  assert reporting.prediction_warning(np.array([[7, 0], [0, 0]]), names) is None  # One class held.
