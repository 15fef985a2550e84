"""The pictures: curves from metrics.jsonl, confusion matrices, overlays, prediction rows."""

import json

import numpy as np
from matplotlib.colors import to_rgb
from PIL import Image

from unet_flax import plots

NAMES = ('pet', 'background', 'border')

PNG = b'\x89PNG'


def test_curves_of_a_training_run(trained_workdir, tmp_path):
  # The trainer draws them after every evaluation.
  assert (trained_workdir / 'curves.png').read_bytes()[:4] == PNG
  records = [{'step': s, 'split': 'train', 'loss': 1.0 / s} for s in range(1, 7)]
  records += [{'step': s, 'split': 'eval', 'mean_iou': 0.1 * s, 'pixel_accuracy': 0.15 * s}
              for s in (3, 6)]
  text = ''.join(json.dumps(r) + '\n' for r in records) + '{"step": 7, "spl'  # Cut short.
  (tmp_path / 'metrics.jsonl').write_text(text)
  path = plots.curves(tmp_path)
  assert path == tmp_path / 'curves.png' and path.read_bytes()[:4] == PNG
  assert Image.open(path).size == (880, 320)


def test_confusion_matrix_and_predictions_pictures(tmp_path):
  plots.confusion_matrix(tmp_path / 'c.png', np.array([[5, 1, 0], [2, 9, 1], [0, 0, 0]]),
                         NAMES, 'c')
  assert (tmp_path / 'c.png').read_bytes()[:4] == PNG
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (8, 12, 3), np.uint8), rng.integers(0, 256, (10, 6, 3), np.uint8)]
  labels = [rng.integers(0, 3, image.shape[:2]) for image in images]
  plots.predictions(tmp_path / 'p.png', images, labels, labels, NAMES, title='rows of two sizes',
                    row_titles=['a\nIoU 0.5', 'b\nIoU 0.7'])
  assert (tmp_path / 'p.png').read_bytes()[:4] == PNG


def test_overlay_tints_each_pixel_by_its_class():
  image = np.full((2, 3, 3), 100, np.uint8)
  classes = np.array([[0, 1, 2], [2, 1, 0]])
  tinted = plots.overlay(image, classes, NAMES, alpha=0.5, legend=False)
  for k in range(3):
    expected = np.round(50 + 0.5 * 255 * np.array(to_rgb(plots.CLASS_COLORS[k])))
    np.testing.assert_array_equal(tinted[classes == k], np.broadcast_to(expected, (2, 3)))
