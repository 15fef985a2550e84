"""PNG pictures for people: predictions beside the truth, with a legend for the class colours."""

import matplotlib

matplotlib.use('Agg')  # Files only; never a window.

import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np
from etils import epath
from matplotlib.colors import ListedColormap  # pylint: disable=g-import-not-at-top
from matplotlib.patches import Patch  # pylint: disable=g-import-not-at-top

from unet_flax import input_pipeline

# pet, background, border; further classes (own data sets) cycle through tab10.
CLASS_COLORS = ('#f28e2b', '#4e79a7', '#edc948')


def class_colors(num_classes: int) -> list:
  extra = [plt.get_cmap('tab10')(i % 10) for i in range(max(num_classes - len(CLASS_COLORS), 0))]
  return list(CLASS_COLORS[:num_classes]) + extra


def class_names(num_classes: int) -> list[str]:
  names = list(input_pipeline.CLASS_NAMES[:num_classes])
  return names + [f'class {i}' for i in range(len(names), num_classes)]


def _legend(fig, num_classes: int) -> None:
  handles = [Patch(color=c, label=n)
             for c, n in zip(class_colors(num_classes), class_names(num_classes))]
  fig.legend(handles=handles, loc='lower center', ncol=num_classes, frameon=False)


def predictions(path, image: np.ndarray, label: np.ndarray, prediction: np.ndarray,
                title: str = '', num_classes: int = 3) -> None:
  """Rows of input / true mask / predicted mask, like the chapter's `display()`.

  Args:
    path: the PNG to write (parent directories are created).
    image: [N, H, W, 3] uint8.
    label, prediction: [N, H, W] int in [0, num_classes).
  """
  cmap = ListedColormap(class_colors(num_classes))
  n = len(image)
  fig, axes = plt.subplots(n, 3, figsize=(9, 3 * n + 0.6), squeeze=False)
  for row in range(n):
    for col, (picture, name) in enumerate(
        [(image[row], 'Input Image'), (label[row], 'True Mask'),
         (prediction[row], 'Predicted Mask')]):
      ax = axes[row, col]
      if picture.ndim == 3:
        ax.imshow(picture)
      else:
        ax.imshow(picture, cmap=cmap, vmin=0, vmax=num_classes - 1, interpolation='nearest')
      ax.set_title(name)
      ax.axis('off')
  if title:
    fig.suptitle(title)
  _legend(fig, num_classes)
  fig.tight_layout(rect=(0, 0.05, 1, 1))
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=80)
  plt.close(fig)
