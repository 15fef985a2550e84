"""PNG pictures for people: predictions beside the truth, confusion matrices, training curves.

Every picture has a title, labelled axes and a legend for the class colours.
"""

import json

import matplotlib

matplotlib.use('Agg')  # Files only; never a window.

import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np
from etils import epath
from matplotlib.colors import ListedColormap, to_rgb  # pylint: disable=g-import-not-at-top
from matplotlib.patches import Patch  # pylint: disable=g-import-not-at-top
from PIL import Image  # pylint: disable=g-import-not-at-top
from PIL import ImageDraw  # pylint: disable=g-import-not-at-top
from PIL import ImageFont  # pylint: disable=g-import-not-at-top


# pet, background, border; further classes (own data sets) cycle through tab10.
CLASS_COLORS = ('#f28e2b', '#4e79a7', '#edc948')


def class_colors(num_classes: int) -> list:
  extra = [plt.get_cmap('tab10')(i % 10) for i in range(max(num_classes - len(CLASS_COLORS), 0))]
  return list(CLASS_COLORS[:num_classes]) + extra


def _legend(fig, names) -> None:
  handles = [Patch(color=c, label=n) for c, n in zip(class_colors(len(names)), names)]
  fig.legend(handles=handles, loc='outside lower center', ncol=min(len(names), 6),
             frameon=False)


def _save(fig, path) -> None:
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=80)
  plt.close(fig)


def predictions(path, image: np.ndarray, label: np.ndarray, prediction: np.ndarray,
                names, title: str = '', row_titles=None) -> None:
  """Rows of input / true mask / predicted mask, like the chapter's `display()`.

  Args:
    path: the PNG to write (parent directories are created).
    image: [N, H, W, 3] uint8, or a list of N [H_i, W_i, 3] (rows may differ in size).
    label, prediction: [N, H, W] int in [0, K), or lists of [H_i, W_i]; other values (an
      ignore label) are drawn white.
    names: the K classes' names, for the legend.
    row_titles: N strings that replace 'Input Image' above each row (e.g. its name and IoU).
  """
  num_classes = len(names)
  cmap = ListedColormap(class_colors(num_classes)).with_extremes(over='white')
  n = len(image)
  # Constrained layout keeps every title, the suptitle and the legend clear of the pictures.
  fig, axes = plt.subplots(n, 3, figsize=(9, 3 * n + 1), squeeze=False, layout='constrained')
  for row in range(n):
    for col, (picture, name) in enumerate(
        [(image[row], row_titles[row] if row_titles else 'Input Image'),
         (label[row], 'True Mask'), (prediction[row], 'Predicted Mask')]):
      ax = axes[row, col]
      if picture.ndim == 3:
        ax.imshow(picture)
      else:
        ax.imshow(picture, cmap=cmap, vmin=0, vmax=num_classes - 1, interpolation='nearest')
      ax.set_title(name, fontsize=9 if row_titles and col == 0 else None)
      ax.axis('off')
  if title:
    fig.suptitle(title)
  _legend(fig, names)
  _save(fig, path)


def class_palette(num_classes: int) -> np.ndarray:
  """[num_classes, 3] uint8: the RGB colour of each class, as in every picture."""
  return np.array([np.round(np.array(to_rgb(c)) * 255) for c in class_colors(num_classes)],
                  np.uint8)


def mask_image(classes: np.ndarray, num_classes: int) -> Image.Image:
  """A palette ('P') PIL image of a mask: the pixel values are the classes, shown in their colours.

  Args:
    classes: [H, W] int in [0, num_classes), num_classes <= 256.
  """
  mask = Image.fromarray(classes.astype(np.uint8), 'P')
  mask.putpalette(class_palette(num_classes).ravel().tolist())
  return mask


def overlay(image: np.ndarray, classes: np.ndarray, names, alpha: float = 0.45,
            legend: bool = True) -> np.ndarray:
  """The photo with each pixel tinted by its class colour, and a legend naming the classes.

  Args:
    image: [H, W, 3] uint8.
    classes: [H, W] int in [0, K).
    names: the K classes' names.
    alpha: the weight of the class colour.
    legend: draw the class names over their colours in the top-left corner.

  Returns:
    [H, W, 3] uint8.
  """
  palette = class_palette(len(names)).astype(np.float32)
  tinted = np.round((1 - alpha) * image.astype(np.float32) + alpha * palette[classes])
  tinted = tinted.astype(np.uint8)
  return _draw_legend(tinted, names) if legend else tinted


def _draw_legend(picture: np.ndarray, names) -> np.ndarray:
  """Colour swatches and class names in a white box at the top left, scaled to the picture."""
  canvas = Image.fromarray(picture)
  draw = ImageDraw.Draw(canvas)
  size = max(10, min(canvas.size) // 25)
  font = ImageFont.load_default(size)
  pad = size // 2
  text_width = max(draw.textlength(name, font=font) for name in names)
  box = (pad, pad, pad * 4 + size + text_width, pad * 2 + len(names) * (size + pad))
  draw.rectangle(box, fill=(255, 255, 255))
  for k, (name, colour) in enumerate(zip(names, class_palette(len(names)))):
    top = pad * 2 + k * (size + pad)
    draw.rectangle((pad * 2, top, pad * 2 + size, top + size), fill=tuple(int(c) for c in colour),
                   outline=(0, 0, 0))
    draw.text((pad * 3 + size, top), name, fill=(0, 0, 0), font=font)
  return np.asarray(canvas)


def confusion_matrix(path, confusion: np.ndarray, names, title: str = '') -> None:
  """A heat map of the row-normalised confusion matrix, each cell with its % and pixel count.

  Args:
    path: the PNG to write.
    confusion: [K, K] counts; row = true class, column = predicted class.
    names: the K classes' names.
  """
  confusion = np.asarray(confusion, np.int64)
  k = len(confusion)
  # Row-normalised: each row shows where the pixels of one true class went (its recall on the
  # diagonal), which raw counts hide when the classes differ in size.
  percent = 100 * confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
  fig, ax = plt.subplots(figsize=(1.6 * k + 2.6, 1.4 * k + 1.6))
  im = ax.imshow(percent, cmap='Blues', vmin=0, vmax=100)
  for t in range(k):
    for p in range(k):
      ax.text(p, t, f'{percent[t, p]:.1f}%\n{confusion[t, p]:,} px', ha='center', va='center',
              fontsize=9, color='white' if percent[t, p] > 55 else 'black')
  ax.set_xticks(range(k), names)
  ax.set_yticks(range(k), names)
  ax.set_xlabel('predicted class')
  ax.set_ylabel('true class')
  ax.set_title(title or 'confusion matrix', fontsize=10)
  fig.colorbar(im, ax=ax, label='% of the true class\'s pixels')
  fig.tight_layout()
  _save(fig, path)


def _read_metrics(path: epath.Path) -> list[dict]:
  """The records of metrics.jsonl; a line cut short by a killed run is skipped."""
  records = []
  for line in path.read_text().splitlines():
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return records


def curves(workdir) -> epath.Path:
  """Draws <workdir>/metrics.jsonl as <workdir>/curves.png: train loss and eval IoU by step."""
  workdir = epath.Path(workdir)
  records = _read_metrics(workdir / 'metrics.jsonl')
  train = [(r['step'], r['loss']) for r in records if r.get('split') == 'train' and 'loss' in r]
  evals = [r for r in records if r.get('split') == 'eval' and 'mean_iou' in r]
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
  if train:
    left.plot(*zip(*train), '.-' if len(train) < 50 else '-', color='#4e79a7', label='train loss')
  left.set_xlabel('step')
  left.set_ylabel('cross-entropy')
  left.set_title('training loss')
  if train:
    left.legend()
  steps = [r['step'] for r in evals]
  right.plot(steps, [r['mean_iou'] for r in evals], 'o-', color='#f28e2b', label='mean IoU')
  right.plot(steps, [r['pixel_accuracy'] for r in evals], 's--', color='#59a14f',
             label='pixel accuracy')
  right.set_xlabel('step')
  right.set_ylabel('score')
  right.set_ylim(0, 1)
  right.set_title('evaluation')
  right.legend(loc='lower right')
  for ax in (left, right):
    ax.grid(alpha=0.3)
  fig.suptitle(f'{workdir.name}: training curves')
  fig.tight_layout()
  path = workdir / 'curves.png'
  _save(fig, path)
  return path
