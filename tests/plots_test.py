"""The pictures, read back as pixels: confusion matrices, prediction rows, curves, overlays."""

import json

import matplotlib
import numpy as np
from matplotlib.colors import to_rgb

from tests.conftest import colour_counts
from tests.conftest import png_pixels
from unet_flax import plots

NAMES = ('pet', 'background', 'border')

def _blues(fraction) -> tuple:
  """The heat map's colour of a row share in [0, 1], as uint8 RGB."""
  return tuple(int(round(c * 255)) for c in matplotlib.colormaps['Blues'](fraction)[:3])


def test_confusion_matrix_cells_show_row_shares(tmp_path):
  # Row-normalised: 90%/10% in rows 0 and 1 though their counts differ tenfold; row 2 is empty.
  plots.confusion_matrix(tmp_path / 'c.png', np.array([[90, 10, 0], [1, 9, 0], [0, 0, 0]]),
                         NAMES, 'c')
  high, low, zero = colour_counts(tmp_path / 'c.png', [_blues(0.9), _blues(0.1), _blues(0.0)],
                                  tolerance=2)
  # 2 cells of 90%, 2 of 10%, 5 of 0% (less their text; the colour bar adds a few rows).
  assert high > 2000, (high, low, zero)
  assert 0.8 < high / low < 1.25 and 0.3 < high / zero < 0.5, (high, low, zero)
  plots.confusion_matrix(tmp_path / 'identity.png', np.diag([10, 10, 10]), NAMES, 'c')
  full, empty = colour_counts(tmp_path / 'identity.png', [_blues(1.0), _blues(0.0)], tolerance=2)
  assert 0.4 < full / empty < 0.6, (full, empty)  # 3 cells of 100%, 6 of 0%.
  plots.confusion_matrix(tmp_path / 'again.png', np.diag([10, 10, 10]), NAMES, 'c')
  np.testing.assert_array_equal(png_pixels(tmp_path / 'again.png'),
                                png_pixels(tmp_path / 'identity.png'))
  assert not np.array_equal(png_pixels(tmp_path / 'c.png'), png_pixels(tmp_path / 'identity.png'))


def test_predictions_rows_show_the_image_and_both_masks_in_the_class_colours(tmp_path):
  palette = [tuple(c) for c in plots.class_palette(3)]
  np.testing.assert_array_equal(plots.class_palette(3),
                                [np.round(np.array(to_rgb(c)) * 255) for c in plots.CLASS_COLORS])
  green = (10, 200, 30)
  image = np.full((1, 16, 16, 3), green, np.uint8)
  truth = np.zeros((1, 16, 16), np.uint8)  # All pet.
  for predicted_class in (1, 2):
    path = tmp_path / f'{predicted_class}.png'
    plots.predictions(path, image, truth, np.full((1, 16, 16), predicted_class), NAMES,
                      title='t')
    counts = colour_counts(path, palette + [green])
    drawn = {0, predicted_class}
    # A 16x16 mask fills ~200x200 pixels; a legend swatch a few hundred.
    for k in range(3):
      assert (counts[k] > 10000) == (k in drawn), (predicted_class, counts)
    assert counts[3] > 10000
    assert 0.8 < counts[0] / counts[predicted_class] < 1.25  # Equal areas.
  # Rows of two sizes, titled.
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (8, 12, 3), np.uint8), rng.integers(0, 256, (10, 6, 3), np.uint8)]
  labels = [rng.integers(0, 3, image.shape[:2]) for image in images]
  plots.predictions(tmp_path / 'p.png', images, labels, labels, NAMES, title='rows of two sizes',
                    row_titles=['a\nIoU 0.5', 'b\nIoU 0.7'])
  assert min(colour_counts(tmp_path / 'p.png', palette)) > 2000


def _write_metrics(workdir, losses, ious):
  workdir.mkdir(parents=True)
  records = [{'step': s, 'split': 'train', 'loss': l} for s, l in enumerate(losses, 1)]
  records += [{'step': 3 * (i + 1), 'split': 'eval', 'mean_iou': v, 'pixel_accuracy': 0.9}
              for i, v in enumerate(ious)]
  text = ''.join(json.dumps(r) + '\n' for r in records) + '{"step": 7, "spl'  # Cut short.
  (workdir / 'metrics.jsonl').write_text(text)
  return plots.curves(workdir)


def test_curves_draw_the_loss_left_and_the_scores_right(tmp_path):
  losses, ious = [1.0, 0.8, 0.6, 0.5, 0.45, 0.4], [0.3, 0.6]
  path = _write_metrics(tmp_path / 'a' / 'run', losses, ious)
  assert path == tmp_path / 'a' / 'run' / 'curves.png'
  base = png_pixels(path)
  # The same records in another directory of the same name: the same picture.
  same = png_pixels(_write_metrics(tmp_path / 'b' / 'run', losses, ious))
  np.testing.assert_array_equal(same, base)
  # Another mean IoU changes only the right half; another loss the left.
  other_iou = png_pixels(_write_metrics(tmp_path / 'c' / 'run', losses, [0.3, 0.9]))
  changed = np.any(other_iou != base, axis=(0, 2))
  width = base.shape[1]
  assert changed.any() and not changed[:width // 2].any()
  other_loss = png_pixels(_write_metrics(tmp_path / 'd' / 'run', [1.0, 0.9, 0.3, 0.5, 0.45, 0.4],
                                         ious))
  assert np.any(other_loss[:, :width // 2] != base[:, :width // 2])
  # The lines in their colours: the train loss blue on the left, mean IoU orange and pixel
  # accuracy green on the right.
  for colour, half in [('#4e79a7', 0), ('#f28e2b', 1), ('#59a14f', 1)]:
    rgb = np.round(np.array(to_rgb(colour)) * 255)
    near = np.all(np.abs(base.astype(int) - rgb) <= 8, axis=-1)
    sides = [near[:, :width // 2].sum(), near[:, width // 2:].sum()]
    assert sides[half] > 100 and sides[1 - half] == 0, (colour, sides)


def test_the_trainer_draws_the_curves_of_its_metrics(trained_workdir, tmp_path):
  copy = tmp_path / trained_workdir.name
  copy.mkdir()
  (copy / 'metrics.jsonl').write_text((trained_workdir / 'metrics.jsonl').read_text())
  np.testing.assert_array_equal(png_pixels(plots.curves(copy)),
                                png_pixels(trained_workdir / 'curves.png'))


def test_overlay_tints_each_pixel_by_its_class():
  image = np.full((2, 3, 3), 100, np.uint8)
  classes = np.array([[0, 1, 2], [2, 1, 0]])
  tinted = plots.overlay(image, classes, NAMES, alpha=0.5, legend=False)
  for k in range(3):
    expected = np.round(50 + 0.5 * 255 * np.array(to_rgb(plots.CLASS_COLORS[k])))
    np.testing.assert_array_equal(tinted[classes == k], np.broadcast_to(expected, (2, 3)))


def test_overlay_legend_names_the_classes_in_their_colours_over_the_corner():
  image = np.full((200, 300, 3), 100, np.uint8)
  classes = np.zeros((200, 300), int)
  plain = plots.overlay(image, classes, NAMES, legend=False)
  shown = plots.overlay(image, classes, NAMES)
  changed = np.argwhere(np.any(shown != plain, axis=-1))
  assert changed.size and changed[:, 0].max() < 100 and changed[:, 1].max() < 150  # Top left.
  for colour in plots.class_palette(3):  # A swatch of each class colour, unblended.
    assert np.all(shown == colour, axis=-1).sum() >= 25
  assert np.all(shown == 255, axis=-1).sum() > 100  # The white box.


def test_mask_image_keeps_classes_as_values_and_shows_their_colours():
  classes = np.array([[0, 1], [2, 3]])
  mask = plots.mask_image(classes, 4)
  assert mask.mode == 'P'
  np.testing.assert_array_equal(np.asarray(mask), classes)
  np.testing.assert_array_equal(np.asarray(mask.convert('RGB'))[classes == 3][0],
                                plots.class_palette(4)[3])
