"""Reading images and masks: the one way, for training, evaluation and predict alike.

Pictures become upright RGB uint8 (`to_rgb`): EXIF orientation applied; grey, palette, CMYK and
1-bit converted; 16-bit and float scaled to 8 bits; transparency over white. Masks keep their
stored values (palette indices, not colours). Every failure is a one-line UserError naming the
file.
"""

import io

import numpy as np
from PIL import Image
from PIL import ImageOps

from unet_flax import errors

# What PIL raises on files that are not images, are cut short, or are too large to decode.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
# PIL modes that hold one value a pixel: 1-bit, 8-bit grey, palette indices, 16/32-bit integers.
MASK_MODES = ('1', 'L', 'P', 'I', 'I;16', 'I;16L', 'I;16B', 'I;16N')
# EXIF orientations 5-8 turn the picture by 90 degrees.
_TURNED = (5, 6, 7, 8)


def reason(e: BaseException) -> str:
  """What went wrong reading a file, in a few words."""
  if isinstance(e, Image.UnidentifiedImageError):
    return 'not an image, or a format PIL does not read'
  if isinstance(e, OSError) and e.strerror:
    return e.strerror  # 'No such file or directory', 'Is a directory', ... without the path.
  message = str(e).strip()
  return message.splitlines()[0][:160] if message else type(e).__name__


def read_image(path, decode):
  """decode(the opened PIL image) of the file at `path`.

  Raises:
    UserError: naming the file, if it is missing, not an image, corrupt or cut short.
  """
  try:
    with Image.open(path) as image:
      return decode(image)
  except DECODE_ERRORS as e:  # Corrupt or cut-short data shows only when the pixels are decoded.
    raise errors.UserError(f'{path}: cannot read ({reason(e)})') from None


def upright_size(image: Image.Image) -> tuple[int, int]:
  """(height, width) of an opened image as shown, i.e. after its EXIF rotation."""
  width, height = image.size
  if image.getexif().get(0x0112, 1) in _TURNED:
    width, height = height, width
  return height, width


def to_rgb(image: Image.Image) -> Image.Image:
  """The upright RGB picture of a decoded image of any PIL mode, as a viewer shows it.

  The EXIF orientation is applied; grey, palette, CMYK and 1-bit are converted; 16-bit and float
  are scaled to 8 bits (PIL's convert clips them: a 16-bit photo comes out white): values above
  255 as 0..65535, floats up to 1 as 0..1; transparent ones go over white.
  """
  image = ImageOps.exif_transpose(image)
  if image.mode.startswith('I') or image.mode == 'F':
    pixels = np.asarray(image, np.float32)
    if image.mode.startswith('I;16') or pixels.max() > 255:
      pixels = pixels / 257  # 0..65535 -> 0..255.
    elif image.mode == 'F' and pixels.max() <= 1:
      pixels = pixels * 255  # Float pictures in [0, 1].
    image = Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))
  if 'A' in image.mode or 'a' in image.mode or 'transparency' in image.info:
    rgba = image.convert('RGBA')  # Transparent pixels hold arbitrary colours.
    image = Image.alpha_composite(Image.new('RGBA', rgba.size, 'white'), rgba)
  return image.convert('RGB')


def mask_values(image: Image.Image, what: str) -> np.ndarray:
  """[H, W] integers of a decoded mask: its stored values, upright.

  Palette masks give their indices, grey saved as RGB(A) its grey; a mask's alpha means nothing.

  Raises:
    UserError: naming `what`, for a colour picture (its colours are not classes).
  """
  image = ImageOps.exif_transpose(image)
  if image.mode in ('LA', 'La', 'PA'):
    image = image.getchannel(0)
  if image.mode in MASK_MODES:
    return np.asarray(image)
  rgb = np.asarray(image.convert('RGB'))
  if (rgb != rgb[..., :1]).any():
    raise errors.UserError(f'{what}: a colour {image.mode} picture, not a mask; save it with one '
                           'channel of class values')
  return rgb[..., 0]


def _resized(image: Image.Image, size: int | None, resample) -> np.ndarray:
  return np.asarray(image if size is None else image.resize((size, size), resample))


def decode(data, size: int | None, kind: str, what: str) -> np.ndarray:
  """Encoded bytes (or an already decoded array) -> a square picture or mask of side `size`.

  Args:
    data: the file's bytes, or a decoded [H, W(, C)] array (tfds's own decoding).
    size: the side to resize to (pictures bilinearly, masks nearest-neighbour, so that labels
      stay labels); None: at the stored size, neither drafted nor resized.
    kind: 'picture' -> [S, S, 3] uint8 RGB (`to_rgb`); 'mask' -> [S, S] of the stored values
      (`mask_values`; 16-bit values unchanged: the caller checks the range).
    what: names the file in errors.

  Raises:
    UserError: naming `what`, if the data is empty, cut short, not an image, or a colour mask.
  """
  try:
    if isinstance(data, np.ndarray):
      image = Image.fromarray(data.squeeze(-1) if data.shape[-1] == 1 else data)
    else:
      if not len(data):
        raise errors.UserError(f'{what}: the file is empty (0 bytes); remove or replace it')
      image = Image.open(io.BytesIO(data))
      if kind == 'picture' and size is not None:
        # JPEG decodes straight to the smallest scale (1/2, 1/4, 1/8) still >= size: 2-4x faster.
        image.draft('RGB', (size, size))
    image.load()  # Cut-short or corrupt data shows only when the pixels are decoded.
    if kind == 'mask':
      return _resized(Image.fromarray(mask_values(image, what)), size, Image.Resampling.NEAREST)
    return _resized(to_rgb(image), size, Image.Resampling.BILINEAR)
  except DECODE_ERRORS as e:
    raise errors.UserError(
        f'{what}: cannot decode ({reason(e)}); remove or replace the file') from None


def network_input(image: Image.Image, size: int) -> np.ndarray:
  """An opened photo -> [size, size, 3] uint8, resized exactly as the trainer resizes its data.

  Call before anything loads the pixels: like the trainer, a JPEG is decoded at the smallest
  scale (1/2 .. 1/8) still >= size.
  """
  image.draft('RGB', (size, size))
  return np.asarray(to_rgb(image).resize((size, size), Image.Resampling.BILINEAR))
