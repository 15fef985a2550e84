"""`--config.dataset=folder:/path/to/data`: your own images and masks, through the same pipeline.

The folder holds:

  images/<stem>.jpg (or .jpeg .png .bmp .gif .tif .tiff .webp): any size, any mode PIL reads;
      made RGB and resized bilinearly, like the tfds images.
  masks/<stem>.png: the size of its image, one channel (8- or 16-bit grey, or palette indices;
      grey saved as RGB will do) of class values 0..num_classes-1; resized nearest-neighbour. The values are the classes
      as they are: unlike Oxford's trimaps (1..3, shifted down by one), there is NO shift.
  train.txt, test.txt (optional): one stem per line. With both, they are the splits; with one,
      the other split is every other image; with neither, a fixed 80/20 split of the sorted
      stems (seeded by SPLIT_SEED, not config.seed, so every run evaluates on the same images).
      Another split name reads <name>.txt.

`num_classes` comes from the config. Each problem (a missing mask, an image and mask of
different sizes, a label not below num_classes, an unreadable file) is a one-line UserError
naming the file.
"""

import dataclasses
import io

from etils import epath
import numpy as np
from PIL import Image

from unet_flax import decode
from unet_flax import errors

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp')
MASK_SUFFIX = '.png'
SPLIT_SEED = 0
TEST_FRACTION = 0.2


@dataclasses.dataclass(frozen=True)
class Example:
  image: epath.Path
  mask: epath.Path


class Folder:
  """The examples of a folder data set; listing it checks that every image has its mask."""

  def __init__(self, root: str):
    self.root = epath.Path(root)
    images, masks = self.root / 'images', self.root / 'masks'
    for d in (images, masks):
      if not d.is_dir():
        raise errors.UserError(
            f'{d} is not a directory; a folder data set holds images/ and masks/ (see '
            'unet_flax/folder.py)')
    self.images = {}
    for path in sorted(images.iterdir()):
      if path.suffix.lower() not in IMAGE_SUFFIXES:
        continue
      if path.stem in self.images:
        raise errors.UserError(f'{self.images[path.stem]} and {path} have the same stem; '
                               'rename or remove one')
      self.images[path.stem] = path
    if not self.images:
      raise errors.UserError(f'{images} holds no images ({", ".join(IMAGE_SUFFIXES)}); add some')
    for stem, path in self.images.items():
      if not (masks / (stem + MASK_SUFFIX)).is_file():
        raise errors.UserError(f'{path} has no mask {masks / (stem + MASK_SUFFIX)}; add the mask '
                               'or remove the image')

  def _read_list(self, split: str) -> list[str]:
    path = self.root / f'{split}.txt'
    stems = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
      name = line.strip()
      if not name:
        continue
      if name not in self.images and epath.Path(name).stem in self.images:
        name = epath.Path(name).stem  # The list names files, not stems.
      if name not in self.images:
        raise errors.UserError(f'{path} line {number}: no image {name!r} in images/; fix the '
                               'line or add the image')
      stems.append(name)
    return stems

  def stems(self, split: str) -> list[str]:
    """The stems of `split`, in a fixed order."""
    lists = {name: self._read_list(name) for name in ('train', 'test')
             if (self.root / f'{name}.txt').is_file()}
    if split in lists:
      return lists[split]
    if split in ('train', 'test'):
      if lists:  # The one list given: this split is the rest.
        (taken,) = (set(stems) for stems in lists.values())
        return [s for s in self.images if s not in taken]
      stems = sorted(self.images)
      order = np.random.default_rng(SPLIT_SEED).permutation(len(stems))
      num_test = max(1, round(TEST_FRACTION * len(stems))) if len(stems) > 1 else 0
      chosen = order[:num_test] if split == 'test' else order[num_test:]
      return [stems[i] for i in sorted(chosen)]
    if (self.root / f'{split}.txt').is_file():
      return self._read_list(split)
    raise errors.UserError(f'split {split!r}: {self.root / (split + ".txt")} does not exist; '
                           'use train or test, or write the list')

  def examples(self, split: str) -> list[Example]:
    masks = self.root / 'masks'
    return [Example(self.images[s], masks / (s + MASK_SUFFIX)) for s in self.stems(split)]


def _header(path: epath.Path, data: bytes) -> Image.Image:
  """PIL's image of `data`, the header only; a UserError naming `path` if it is not an image."""
  try:
    return Image.open(io.BytesIO(data))
  except decode.DECODE_ERRORS as e:
    raise errors.UserError(f'{path}: cannot decode ({decode.reason(e)}); remove or replace the '
                           'file') from None


def decode_example(example: Example, size: int | None,
                   num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  """-> image [S, S, 3] uint8 (bilinear), labels [S, S] uint8 (nearest), as tfds examples decode.

  size None: both at their stored size, [H, W, 3] and [H, W], after the same checks.

  Raises:
    UserError: naming the file, for an unreadable image or mask, a mask whose size differs from
      its image's (both upright), or a label not below num_classes.
  """
  data = example.image.read_bytes()
  image_size = decode.upright_size(_header(example.image, data))
  mask_data = example.mask.read_bytes()
  values = decode.decode(mask_data, None, 'mask', str(example.mask))
  if values.shape != image_size:
    raise errors.UserError(
        f'{example.mask} is {values.shape[1]}x{values.shape[0]} but its image {example.image} is '
        f'{image_size[1]}x{image_size[0]}; masks must be the size of their image')
  bad = values[(values < 0) | (values >= num_classes)]
  if bad.size:
    raise errors.UserError(
        f'{example.mask}: label {int(bad.flat[0])} is not in 0..{num_classes - 1} '
        f'(config.num_classes={num_classes}; folder masks are not shifted); fix the mask or raise '
        'num_classes')
  image = decode.decode(data, size, 'picture', str(example.image))
  labels = decode.decode(values.astype(np.uint8), size, 'mask', str(example.mask))
  return image, labels
