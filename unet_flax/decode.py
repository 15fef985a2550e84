"""Reading images and masks: the one way, for training, evaluation and predict alike.

Pictures become upright RGB uint8 (`to_rgb`): EXIF orientation applied; grey, palette, CMYK and
1-bit converted; 16-bit and float scaled to 8 bits; transparency over white. Masks keep their
stored values (palette indices, not colours). A file's size can be read from its header alone
(`stored_size`), for estimates made before decoding. Every failure is a one-line UserError
naming the file, the same whether the header or the whole file is read.
"""

import dataclasses
import io
import os
import stat
import sys
import threading

import ml_collections
import numpy as np
from PIL import Image
from PIL import ImageOps
from etils import epath

from unet_flax import errors

# What PIL raises on files that are not images, are cut short, or are too large to decode.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
# PIL modes that hold one value a pixel: 1-bit, 8-bit grey, palette indices, 16/32-bit integers.
MASK_MODES = ('1', 'L', 'P', 'I', 'I;16', 'I;16L', 'I;16B', 'I;16N')
# EXIF orientations 5-8 turn the picture by 90 degrees.
_TURNED = (5, 6, 7, 8)
_MAX_COLLAPSE_WARNINGS = 5
# Files larger than this are refused before they are read: no image or mask of a data set is
# near it (an uncompressed 16-bit RGB TIFF at the pixel cap is 0.8 GB), while a link to a device
# or a huge file would otherwise be read until the memory runs out.
MAX_FILE_BYTES = 2 * 1024 ** 3
# The most pixels an image may have to be decoded, unless UNET_FLAX_MAX_PIXELS says more:
# 2**27 (11585x11585) is 0.4 GB as RGB uint8, and predict holds several float copies of it.
# Pillow's own limit (about 179M pixels) is higher, and a 20 KB PNG can hold 13000x13000.
DEFAULT_MAX_PIXELS = 2 ** 27
MAX_PIXELS_ENV = 'UNET_FLAX_MAX_PIXELS'
_FILE_KINDS = ((stat.S_ISDIR, 'a directory'), (stat.S_ISFIFO, 'a FIFO'),
               (stat.S_ISCHR, 'a device'), (stat.S_ISBLK, 'a device'),
               (stat.S_ISSOCK, 'a socket'))


@dataclasses.dataclass(frozen=True)
class Options:
  """What a run's config says about reading its files.

  Attributes:
    image_max_value: for 16-bit and float pictures, the value shown as white; None: 65535 for
      16-bit, 1 for float pictures up to 1, else 255.
    mask_mode, mask_values, mask_pattern, ignore_label: how a folder's masks map to classes
      (config.py documents each; folder.py applies them).
  """
  image_max_value: float | None = None
  mask_mode: str = 'values'
  mask_values: tuple[tuple[int, int], ...] | None = None
  mask_pattern: str = '{stem}'
  ignore_label: int | None = None

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> 'Options':
    from unet_flax import config as config_lib  # pylint: disable=g-import-not-at-top
    values = config.mask_values
    return cls(image_max_value=config.image_max_value, mask_mode=config.mask_mode,
               mask_values=(tuple(sorted(config_lib.parse_mask_values(values).items()))
                            if values is not None else None),
               mask_pattern=config.mask_pattern, ignore_label=config.ignore_label)


class _CollapseWarnings:
  """Warns, naming the file, when a deep picture flattens to two grey levels or fewer in 8 bits:
  a model would train on blank images. At most a few lines, whatever the number of files."""

  def __init__(self):
    self._lock, self._count = threading.Lock(), 0

  def check(self, source: np.ndarray, result: np.ndarray, what: str, max_value: float) -> None:
    # Flattened: fewer than 3 levels left, and fewer than the source had.
    if len(np.unique(result)) >= min(len(np.unique(source)), 3):
      return
    with self._lock:
      self._count += 1
      count = self._count
    if count <= _MAX_COLLAPSE_WARNINGS:
      print(f'warning: {what}: its values {source.min():g}..{source.max():g} become '
            f'{len(np.unique(result))} grey level(s) in 8 bits when {max_value:g} is white; set '
            f'config.image_max_value to the real maximum (e.g. {source.max():g})'
            + ('; further warnings of this kind are not shown'
               if count == _MAX_COLLAPSE_WARNINGS else ''), file=sys.stderr, flush=True)


_collapse = _CollapseWarnings()


def reason(e: BaseException) -> str:
  """What went wrong reading a file, in a few words."""
  if isinstance(e, Image.UnidentifiedImageError):
    return 'not an image, or a format PIL does not read'
  if isinstance(e, OSError) and e.strerror:
    return e.strerror  # 'No such file or directory', 'Is a directory', ... without the path.
  message = str(e).strip()
  return message.splitlines()[0][:160] if message else type(e).__name__


def read_bytes(path) -> bytes:
  """The bytes of the regular file at `path`, read without blocking and at most MAX_FILE_BYTES.

  Only regular files are data: a directory, FIFO (whose open would wait for a writer), device
  (/dev/zero never ends) or socket is refused before a byte is read. URLs (gs://...) are read
  through etils.

  Raises:
    UserError: naming the file, if it is missing, a symlink loop, not a regular file, larger than
      MAX_FILE_BYTES or unreadable.
  """
  if '://' in os.fspath(path):
    return epath.Path(path).read_bytes()
  fd, _ = _open_regular(path)
  try:
    with os.fdopen(fd, 'rb', closefd=False) as f:
      return f.read(MAX_FILE_BYTES + 1)[:MAX_FILE_BYTES]
  except OSError as e:
    raise errors.UserError(f'{path}: cannot read ({reason(e)})') from None
  finally:
    os.close(fd)


def check_regular(path) -> None:
  """Refuses what `read_bytes` would refuse before reading a byte, reading none; URLs pass.

  Raises:
    UserError: as `read_bytes`, naming the file, if it is missing, a symlink loop, not a regular
      file or larger than MAX_FILE_BYTES.
  """
  if '://' not in os.fspath(path):
    os.close(_open_regular(path)[0])


def _open_regular(path) -> tuple[int, int]:
  """(an open descriptor, the size in bytes) of the regular file at `path`, not larger than
  MAX_FILE_BYTES; the caller closes it. Errors as `read_bytes`'s."""
  try:
    # O_NONBLOCK: opening a FIFO returns at once (then fstat refuses it); no effect on files.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
  except OSError as e:
    raise errors.UserError(f'{path}: cannot read ({reason(e)})') from None
  try:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
      kind = next((name for test, name in _FILE_KINDS if test(info.st_mode)), 'not a file')
      raise errors.UserError(f'{path}: not a regular file ({kind}); only regular files are read '
                             'as images: remove it or replace it with the file')
    if info.st_size > MAX_FILE_BYTES:
      raise errors.UserError(f'{path}: {info.st_size / 2**30:.1f} GiB, larger than the '
                             f'{MAX_FILE_BYTES / 2**30:.0f} GiB an image may have; remove it or '
                             'save it smaller')
  except OSError as e:
    os.close(fd)
    raise errors.UserError(f'{path}: cannot read ({reason(e)})') from None
  except errors.UserError:
    os.close(fd)
    raise
  return fd, info.st_size


def max_pixels() -> int:
  """The most pixels an image may have: $UNET_FLAX_MAX_PIXELS, else DEFAULT_MAX_PIXELS.

  Raises:
    UserError: if the variable is not a whole number >= 1.
  """
  text = os.environ.get(MAX_PIXELS_ENV)
  if text is None:
    return DEFAULT_MAX_PIXELS
  if not text.strip().isdigit() or int(text) < 1:
    raise errors.UserError(f'{MAX_PIXELS_ENV}={text!r} is not a whole number of pixels >= 1; fix '
                           'or unset it')
  return int(text)


def check_pixels(image: Image.Image, what) -> Image.Image:
  """`image` (opened, not decoded) if its header's size is within `max_pixels()`.

  Raises:
    UserError: naming `what`, with the size and how to raise the cap.
  """
  width, height = image.size
  cap = max_pixels()
  if width * height > cap:
    raise errors.UserError(
        f'{what}: {width}x{height} is {width * height:,} pixels, more than the {cap:,} this '
        f'program decodes (about {width * height * 3 / 1e9:.1f} GB as RGB); set {MAX_PIXELS_ENV} '
        'to raise the cap if you have the memory')
  return image


def upright_size(image: Image.Image) -> tuple[int, int]:
  """(height, width) of an opened image as shown, i.e. after its EXIF rotation."""
  width, height = image.size
  if image.getexif().get(0x0112, 1) in _TURNED:
    width, height = height, width
  return height, width


def to_rgb(image: Image.Image, max_value: float | None = None, what: str = '') -> Image.Image:
  """The upright RGB picture of a decoded image of any PIL mode, as a viewer shows it.

  The EXIF orientation is applied; grey, palette, CMYK and 1-bit are converted; transparent
  pictures go over white. 16-bit and float pictures are scaled to 8 bits (PIL's convert clips
  them: a 16-bit photo comes out white) so that `max_value` is white; without it, 65535 for
  16-bit data (and integers above 255), 1 for float data up to 1, else 255. A picture that
  flattens to two grey levels or fewer is named in a warning (`what`).
  """
  image = ImageOps.exif_transpose(image)
  if image.mode.startswith('I') or image.mode == 'F':
    pixels = np.asarray(image, np.float32)
    finite = np.isfinite(pixels)
    if not finite.all():  # NaN would become black (0) below, with a bare RuntimeWarning.
      raise errors.UserError(f'{what or "a picture"}: holds NaN or infinite values '
                             f'({finite.size - int(finite.sum()):,} of {finite.size:,} pixels); '
                             'replace them with numbers in the file')
    if max_value is None:
      if image.mode.startswith('I;16') or pixels.max() > 255:
        max_value = 65535.0
      elif image.mode == 'F' and pixels.max() <= 1:
        max_value = 1.0
      else:
        max_value = 255.0
    scaled = np.clip(np.round(pixels * (255.0 / max_value)), 0, 255).astype(np.uint8)
    _collapse.check(pixels, scaled, what or 'a picture', max_value)
    image = Image.fromarray(scaled)
  if 'A' in image.mode or 'a' in image.mode or 'transparency' in image.info:
    rgba = image.convert('RGBA')  # Transparent pixels hold arbitrary colours.
    image = Image.alpha_composite(Image.new('RGBA', rgba.size, 'white'), rgba)
  return image.convert('RGB')


def mask_values(image: Image.Image, what: str) -> np.ndarray:
  """[H, W] integers of a decoded mask: its stored values, upright.

  Palette masks give their indices, grey saved as RGB(A) its grey; a mask's alpha means nothing.

  Raises:
    UserError: naming `what`, for a colour picture (its colours are not classes), or a mask whose
      classes are in its alpha channel (one colour under an alpha that varies).
  """
  image = ImageOps.exif_transpose(image)
  if 'A' in image.mode and image.mode in ('LA', 'La', 'PA', 'RGBA', 'RGBa'):
    alpha = np.asarray(image.getchannel('A'))
    colours = np.asarray(image.convert('RGB' if image.mode == 'PA' else image.mode[:-1]))
    if (colours == colours.flat[0]).all() and (alpha != alpha.flat[0]).any():
      raise errors.UserError(
          f'{what}: its classes are in the alpha channel (its colours are one colour); save the '
          'alpha channel as a one-channel (L) PNG, e.g. Image.open(f).getchannel("A").save(f)')
  if image.mode in ('LA', 'La', 'PA'):
    image = image.getchannel(0)
  if image.mode in MASK_MODES:
    return np.asarray(image)
  rgb = np.asarray(image.convert('RGB'))
  if (rgb != rgb[..., :1]).any():
    raise errors.UserError(f'{what}: a colour {image.mode} picture, not a mask; save it with one '
                           'channel of class values (folder data sets: or set '
                           'config.mask_mode=colour, or binary)')
  return rgb[..., 0]


def _resized(image: Image.Image, size: int | None, resample) -> np.ndarray:
  return np.asarray(image if size is None else image.resize((size, size), resample))


def decode(data, size: int | None, kind: str, what: str,
           max_value: float | None = None) -> np.ndarray:
  """Encoded bytes (or an already decoded array) -> a square picture or mask of side `size`.

  Args:
    data: the file's bytes, or a decoded [H, W(, C)] array (tfds's own decoding).
    size: the side to resize to (pictures bilinearly, masks nearest-neighbour, so that labels
      stay labels); None: at the stored size, neither drafted nor resized.
    kind: 'picture' -> [S, S, 3] uint8 RGB (`to_rgb`); 'mask' -> [S, S] of the stored values
      (`mask_values`; 16-bit values unchanged: the caller checks the range); 'grey' -> [S, S]
      uint8 luminance of any mask (JPEG masks, whose edges are noisy in every channel);
      'rgb' -> [S, S, 3] uint8 colours of a colour mask.
    what: names the file in errors and warnings.
    max_value: pictures only, see `to_rgb`.

  Raises:
    UserError: naming `what`, if the data is empty, cut short, not an image, or (kind 'mask') a
      colour picture.
  """
  try:
    if isinstance(data, np.ndarray):
      image = Image.fromarray(data.squeeze(-1) if data.shape[-1] == 1 else data)
    else:
      if not len(data):
        raise _empty(what)
      image = check_pixels(Image.open(io.BytesIO(data)), what)
      if kind == 'picture' and size is not None:
        # JPEG decodes straight to the smallest scale (1/2, 1/4, 1/8) still >= size: 2-4x faster.
        image.draft('RGB', (size, size))
    image.load()  # Cut-short or corrupt data shows only when the pixels are decoded.
    if kind == 'picture':
      return _resized(to_rgb(image, max_value, what), size, Image.Resampling.BILINEAR)
    if kind == 'mask':
      values = Image.fromarray(mask_values(image, what))
    else:
      upright = ImageOps.exif_transpose(image)
      if upright.mode in ('I', 'I;16', 'I;16L', 'I;16B', 'I;16N') and kind == 'grey':
        upright = Image.fromarray((np.asarray(upright, np.float32) / 257).round().astype(np.uint8))
      values = upright.convert('L' if kind == 'grey' else 'RGB')
    return _resized(values, size, Image.Resampling.NEAREST)
  except DECODE_ERRORS as e:
    raise undecodable(what, e) from None


def undecodable(what, e: BaseException) -> errors.UserError:
  """The one line for a file that is not an image PIL can decode (or is cut short)."""
  return errors.UserError(f'{what}: cannot decode ({reason(e)}); remove or replace the file')


def _empty(what) -> errors.UserError:
  return errors.UserError(f'{what}: the file is empty (0 bytes); remove or replace it')


def picture_size(data: bytes, what: str) -> tuple[int, int]:
  """(height, width) of an encoded picture as shown (after its EXIF rotation), from its header.

  Raises:
    UserError: naming `what`, if the data is not an image.
  """
  try:
    with Image.open(io.BytesIO(data)) as image:
      return upright_size(image)
  except DECODE_ERRORS as e:
    raise undecodable(what, e) from None


def stored_size(file, what) -> tuple[int, int]:
  """(height, width) of a picture or mask as stored, from its header alone: no pixel is decoded.

  Its EXIF rotation is not read: turning a picture swaps its sides, and keeps its number of
  pixels (which is what a memory estimate needs). The pixel cap is checked, as `decode` does.

  Args:
    file: the file's path (only its first bytes are read), or its encoded bytes.
    what: names the file in errors.

  Raises:
    UserError: naming `what`, with the line `read_bytes` or `decode` gives for the same file:
      missing or not a regular file, empty, not an image, or more pixels than `max_pixels()`.
  """
  if isinstance(file, bytes):
    return _header_size(io.BytesIO(file), len(file), what)
  if '://' in os.fspath(file):
    with epath.Path(file).open('rb') as f:
      return _header_size(f, None, what)
  fd, size = _open_regular(file)
  try:
    with os.fdopen(fd, 'rb', closefd=False) as f:
      return _header_size(f, size, what)
  finally:
    os.close(fd)


def _header_size(f, size: int | None, what) -> tuple[int, int]:
  """(height, width) in the header of the image file `f` of `size` bytes (None: unknown)."""
  if size == 0:
    raise _empty(what)
  try:
    with Image.open(f) as image:
      width, height = check_pixels(image, what).size
  except DECODE_ERRORS as e:
    raise undecodable(what, e) from None
  return height, width


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
  """(height, width) x scale, rounded, at least 1 px each."""
  return max(1, round(height * scale)), max(1, round(width * scale))


def rescale(array: np.ndarray, scale: float, kind: str) -> np.ndarray:
  """An image [H, W, 3] ('picture': bilinear) or mask [H, W] ('mask': nearest) times `scale`.

  scale 1 returns the array itself: nothing is resampled.
  """
  if scale == 1:
    return array
  height, width = scaled_size(*array.shape[:2], scale)
  resample = Image.Resampling.BILINEAR if kind == 'picture' else Image.Resampling.NEAREST
  return np.asarray(Image.fromarray(array).resize((width, height), resample))


def resize_mask(classes: np.ndarray, height: int, width: int) -> np.ndarray:
  """[h, w] uint8 classes -> [height, width] uint8, nearest-neighbour (the same array if equal)."""
  if classes.shape == (height, width):
    return classes
  return np.asarray(Image.fromarray(classes).resize((width, height), Image.Resampling.NEAREST))
