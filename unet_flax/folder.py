"""`--config.dataset=folder:/path/to/data`: your own images and masks, through the same pipeline.

The folder holds:

  images/<stem>.<ext>: any size, any mode and format PIL reads (.jpg .png .tif .bmp .gif .webp
      ..., any case); made upright RGB and resized bilinearly, like the tfds images (decode.py).
  masks/<name>.<ext>: each image's mask, the size of the image; <name> is config.mask_pattern
      with the image's stem ('{stem}' by default, '{stem}_mask' for Carvana-style names), <ext>
      any format PIL reads, any case. What its values mean is config.mask_mode's:
        'values' (default): the stored values are the classes as they are (8- or 16-bit grey,
            palette indices; grey saved as RGB will do) - NO shift, unlike Oxford's trimaps -
            or mapped by config.mask_values ('0:0,255:1');
        'binary': two classes, 0 below half the value range and 1 from it: 0/255 masks and JPEG
            masks whose edges carry compression noise;
        'colour': RGB colours, each a class by classes.json's "colours".
      config.ignore_label (e.g. 255) marks pixels that count in no loss and no metric.
  classes.json (optional): {"names": ["background", "car", ...], "colours": [[0, 0, 0],
      [64, 0, 128], ...]}: the classes' names (the default of config.class_names) and, for
      colour masks, each class's colour.
  train.txt, test.txt (optional): one stem per line, each once. With both, they are the splits
      and share no stem; with one, the other split is every other image; with neither, a fixed
      80/20 split of the sorted stems (seeded by SPLIT_SEED, not config.seed, so every run
      evaluates on the same images). Another split name reads <name>.txt.

`num_classes` comes from the config. Each problem (a missing mask, an image and mask of
different sizes, a value that is no class, an unreadable file) is a one-line UserError naming
the file and, where a config field fixes it, the field. Only regular files are data (a directory,
FIFO or device named like an image is refused before it is read: decode.read_bytes); macOS's
'._*' files are skipped; lists and classes.json may be UTF-8 or UTF-16 with a byte-order mark.
"""

import dataclasses
import io
import json

from etils import epath
import numpy as np
from PIL import Image

from unet_flax import config as config_lib
from unet_flax import decode
from unet_flax import errors

# What PIL reads, by extension; matched whatever the case (x.JPG, x.PNG).
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp')
CLASSES_FILE = 'classes.json'
SPLIT_SEED = 0
TEST_FRACTION = 0.2


@dataclasses.dataclass(frozen=True)
class Example:
  image: epath.Path
  mask: epath.Path


def _by_stem(directory: epath.Path) -> dict[str, epath.Path]:
  """The image files of `directory` by stem; two files of one stem are refused."""
  files = {}
  for path in sorted(directory.iterdir()):
    # '._x.jpg': macOS's AppleDouble metadata beside x.jpg on a non-Mac disk, not an image.
    if path.suffix.lower() not in IMAGE_SUFFIXES or path.name.startswith('._'):
      continue
    if path.stem in files:
      raise errors.UserError(f'{files[path.stem]} and {path} have the same stem; rename or '
                             'remove one')
    files[path.stem] = path
  return files


class Folder:
  """The examples of a folder data set; listing it checks that every image has its mask."""

  def __init__(self, root: str, mask_pattern: str = '{stem}'):
    self.root = epath.Path(root)
    images, masks = self.root / 'images', self.root / 'masks'
    for d in (images, masks):
      if not d.is_dir():
        raise errors.UserError(
            f'{d} is not a directory; a folder data set holds images/ and masks/ (see '
            'unet_flax/folder.py)')
    self.images = _by_stem(images)
    if not self.images:
      raise errors.UserError(f'{images} holds no images ({", ".join(IMAGE_SUFFIXES)}); add some')
    mask_files = _by_stem(masks)
    self.masks = {}
    for stem, path in self.images.items():
      # Plain substitution: str.format would reach attributes ('{stem.__class__}') and pad.
      name = mask_pattern.replace('{stem}', stem)
      if name not in mask_files:
        # A directory (FIFO, device) named like an image: that is the problem, not its mask.
        decode.check_regular(path)
        hint = ('; set config.mask_pattern to how masks are named, e.g. \'{stem}_mask\''
                if mask_files else '')
        raise errors.UserError(f'{path} has no mask named {name} (any image format) in {masks}; '
                               f'add the mask or remove the image{hint}')
      self.masks[stem] = mask_files[name]
    self.classes = self._read_classes()

  def _read_classes(self) -> dict | None:
    """classes.json: {'names': [...], 'colours': [[r, g, b], ...] or absent}, or None."""
    path = self.root / CLASSES_FILE
    if not path.exists():
      return None
    try:
      classes = json.loads(read_text(path))
      names = classes['names']
      colours = classes.get('colours', classes.get('colors'))
      ok = (isinstance(names, list) and names and all(isinstance(n, str) and n for n in names)
            and (colours is None or (isinstance(colours, list) and len(colours) == len(names)
                                     and all(isinstance(c, list) and len(c) == 3 and all(
                                         isinstance(v, int) and 0 <= v <= 255 for v in c)
                                             for c in colours))))
    except (ValueError, KeyError, TypeError, AttributeError):
      ok = False
    if not ok:
      raise errors.UserError(
          f'{path} is not {{"names": [...], "colours": [[r, g, b], ...]}} (colours optional, one '
          'per name, 0..255); fix it')
    # Told here: the advice to set config.num_classes to their count would name a value the
    # config refuses in turn.
    if len(names) < 2:
      example = json.dumps({'names': ['background', names[0]]})
      raise errors.UserError(
          f'{path} names 1 class; segmentation needs at least 2, e.g. the background and the '
          f'object: name one class per mask value, as {example}')
    if len(names) > config_lib.MAX_CLASSES:
      raise errors.UserError(f'{path} names {len(names)} classes; at most '
                             f'{config_lib.MAX_CLASSES} are possible: merge some')
    bad = [n for n in names if len(n) > config_lib.MAX_NAME or not n.isprintable()]
    if bad:  # Stored as config.class_names, which every later tool checks the same way.
      raise errors.UserError(f'{path}: class name {bad[0][:40]!r} is not a name of at most '
                             f'{config_lib.MAX_NAME} printable characters; fix it')
    return {'names': tuple(names), 'colours': None if colours is None else
            tuple(tuple(c) for c in colours)}

  def _read_list(self, split: str) -> list[str]:
    path = self.root / f'{split}.txt'
    lines = {}  # stem -> the numbers of the lines that list it, in the list's order.
    for number, line in enumerate(read_text(path).splitlines(), 1):
      name = line.strip()
      if not name:
        continue
      if name not in self.images and epath.Path(name).stem in self.images:
        name = epath.Path(name).stem  # The list names files, not stems.
      if name not in self.images:
        raise errors.UserError(f'{path} line {number}: no image {name!r} in images/; fix the '
                               'line or add the image')
      lines.setdefault(name, []).append(number)
    for name, numbers in lines.items():
      if len(numbers) > 1:  # Each repeat would be trained on (or scored) once more.
        listed = ', '.join(map(str, numbers[:-1])) + f' and {numbers[-1]}'
        raise errors.UserError(f'{path}: {name!r} is listed on lines {listed}; list each image '
                               'once')
    return list(lines)

  def stems(self, split: str) -> list[str]:
    """The stems of `split`, in a fixed order."""
    lists = {name: self._read_list(name) for name in ('train', 'test')
             if (self.root / f'{name}.txt').is_file()}
    if len(lists) == 2:
      test = set(lists['test'])
      both = [s for s in lists['train'] if s in test]
      if both:  # The model would be scored on images it trained on.
        raise errors.UserError(
            f'{self.root / "train.txt"} and {self.root / "test.txt"} both list {listed(both)}; '
            'the test set must not overlap the training set: keep each image in one list')
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
    return [Example(self.images[s], self.masks[s]) for s in self.stems(split)]


def listed(stems: list[str]) -> str:
  """'N image(s) (the first three stems, ...)', for messages about the images two lists share."""
  shown = ', '.join(map(repr, stems[:3])) + (', ...' if len(stems) > 3 else '')
  return f'{len(stems)} image{"s" * (len(stems) > 1)} ({shown})'


def read_text(path: epath.Path) -> str:
  """A list or classes.json as text: UTF-8, with or without a byte-order mark, or UTF-16 with
  one (what Windows editors save).

  Raises:
    UserError: naming the file, if it is none of these.
  """
  data = decode.read_bytes(path)
  encoding = 'utf-16' if data[:2] in (b'\xff\xfe', b'\xfe\xff') else 'utf-8-sig'
  try:
    return data.decode(encoding)
  except UnicodeDecodeError:
    raise errors.UserError(f'{path} is not UTF-8 or UTF-16 text; save it as UTF-8') from None


def _upright_size(path: epath.Path, data: bytes) -> tuple[int, int]:
  """(height, width) as shown, from the header and EXIF of `data`; a UserError naming `path` if it
  is not an image or has more pixels than decode.max_pixels()."""
  try:
    # getexif() reads past the header (a cut-short PNG fails there): inside the handled block.
    return decode.upright_size(decode.check_pixels(Image.open(io.BytesIO(data)), path))
  except decode.DECODE_ERRORS as e:
    raise decode.undecodable(path, e) from None


def decode_example(example: Example, size: int | None, num_classes: int,
                   options: decode.Options = decode.Options(),
                   colours: tuple | None = None) -> tuple[np.ndarray, np.ndarray]:
  """-> image [S, S, 3] uint8 (bilinear), labels [S, S] uint8 (nearest), as tfds examples decode.

  Args:
    example: an image and its mask.
    size: the side of both; None: at their stored size, [H, W, 3] and [H, W].
    num_classes: the classes 0..K-1; with options.ignore_label, that value is kept too.
    options: how to read the image and what the mask's values mean (decode.Options).
    colours: with mask_mode 'colour', each class's RGB colour (classes.json).

  Raises:
    UserError: naming the file, for an unreadable image or mask, a mask whose size differs from
      its image's (both upright), or a value that is no class, saying which config field fixes it.
  """
  data = decode.read_bytes(example.image)
  labels = decode_labels(example, data, num_classes, options, colours)
  image = decode.decode(data, size, 'picture', str(example.image), options.image_max_value)
  return image, decode.decode(labels, size, 'mask', str(example.mask))


def decode_labels(example: Example, image_data: bytes, num_classes: int,
                  options: decode.Options = decode.Options(),
                  colours: tuple | None = None) -> np.ndarray:
  """An example's labels [H, W] uint8 at their stored size, checked against the size of its
  image, whose encoded bytes `image_data` are (only the header is read). Arguments and errors as
  `decode_example`'s."""
  image_size = _upright_size(example.image, image_data)
  kind = {'values': 'mask', 'binary': 'grey', 'colour': 'rgb'}[options.mask_mode]
  stored = decode.decode(decode.read_bytes(example.mask), None, kind, str(example.mask))
  if stored.shape[:2] != image_size:
    raise errors.UserError(
        f'{example.mask} is {stored.shape[1]}x{stored.shape[0]} but its image {example.image} is '
        f'{image_size[1]}x{image_size[0]}; masks must be the size of their image')
  return _classes(stored, example.mask, num_classes, options, colours)


def _classes(stored: np.ndarray, path, num_classes: int, options: decode.Options,
             colours) -> np.ndarray:
  """A mask's stored values (or colours) -> [H, W] uint8 classes (or ignore_label)."""
  ignore = options.ignore_label
  if options.mask_mode == 'binary':
    return (stored >= 128).astype(np.uint8)  # 'grey' masks are 8-bit: half range is 128.
  if options.mask_mode == 'colour':
    if colours is None:
      raise errors.UserError(f"config.mask_mode='colour' needs each class's colour: add "
                             f'"colours" to {path.parent.parent / CLASSES_FILE}')
    code = (stored.astype(np.int64) * [65536, 256, 1]).sum(-1)
    table = {r * 65536 + g * 256 + b: k for k, (r, g, b) in enumerate(colours)}
    found = np.unique(code)
    unknown = [c for c in found.tolist() if c not in table]
    if unknown:
      rgb = (unknown[0] // 65536, unknown[0] // 256 % 256, unknown[0] % 256)
      raise errors.UserError(f'{path}: colour {rgb} is no class of classes.json\'s "colours"; '
                             'add it, or fix the mask')
    labels = np.zeros(code.shape, np.uint8)
    for c in found.tolist():
      labels[code == c] = table[c]
    return labels
  if (options.mask_values is None and np.issubdtype(stored.dtype, np.unsignedinteger)
      and stored.size and stored.max() < num_classes):
    return stored.astype(np.uint8, copy=False)  # Classes as stored: the common case, checked fast.
  values = stored.astype(np.int64)
  if options.mask_values is not None:
    mapping = dict(options.mask_values)
    found = np.unique(values).tolist()
    unknown = [v for v in found if v not in mapping]
    if unknown:
      raise errors.UserError(
          f'{path}: value {unknown[0]} is not in config.mask_values={_pairs(options.mask_values)!r}'
          '; add it to the map')
    mapped = np.zeros(values.shape, np.uint8)
    for v in found:
      mapped[values == v] = mapping[v]
    return mapped
  bad = values[((values < 0) | (values >= num_classes)) & (values != (-1 if ignore is None else
                                                                         ignore))]
  if bad.size:
    raise errors.UserError(f'{path}: value {int(bad.flat[0])} is not a class 0..{num_classes - 1} '
                           f'(folder masks are not shifted); {_fix(values, num_classes)}')
  return values.astype(np.uint8)


def _black_and_white(values: np.ndarray) -> bool:
  """Whether 8-bit values cluster near 0 and near 255 (both), as JPEG-saved 0/255 masks do."""
  dark, light = values <= 48, values >= 207
  return bool(dark.any() and light.any() and (dark | light).mean() >= 0.95)


def _pairs(mask_values) -> str:
  return ','.join(f'{v}:{k}' for v, k in mask_values)


def _fix(values: np.ndarray, num_classes: int) -> str:
  """Which config field would read these mask values, for the error's 'what to do'."""
  found = set(np.unique(values).tolist())
  if found <= {0, 255} and num_classes == 2:
    return 'for 0/255 masks set config.mask_mode=binary'
  if found == {0, 255}:  # Two classes stored as 0/255, or class 0 with a void label.
    return ('for 0/255 masks set config.mask_mode=binary and config.num_classes=2; if 255 means '
            "'don't care' set config.ignore_label=255")
  void_explains = 255 in found and max(found - {255}, default=0) < num_classes
  if max(found) <= 255 and not void_explains and _black_and_white(values):
    return ('these look like black/white masks with compression noise (JPEG): set '
            'config.mask_mode=binary and config.num_classes=2')
  if 255 in found and max(found - {255}, default=0) < num_classes:
    return ("if 255 means 'don't care' set config.ignore_label=255, else raise "
            'config.num_classes or map values with config.mask_values')
  return 'raise config.num_classes, or map values to classes with config.mask_values'
