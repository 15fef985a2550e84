"""Damaged files in a folder data set: python bench/fuzz_folder.py [--files 1650] [--seed 0]

Writes a folder data set of small PNG and JPEG images (RGB, grey, palette, 16-bit, with EXIF
orientation) and masks, then replaces one file at a time with a damaged copy (cut short at a
random byte, or with random bytes flipped) and decodes the example as training does
(folder.decode_example). Every failure must be a one-line UserError naming the damaged file; any
other exception, or a message that does not name it, is an escape. Prints the escapes and their
kinds, and exits 1 if there is one. tests/folder_test.py runs a short version.
"""

import argparse
import collections
import io
import pathlib
import sys
import tempfile

import numpy as np
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from unet_flax import decode  # pylint: disable=g-import-not-at-top,wrong-import-position
from unet_flax import errors  # pylint: disable=g-import-not-at-top,wrong-import-position
from unet_flax import folder  # pylint: disable=g-import-not-at-top,wrong-import-position


def _originals(rng) -> list[tuple[str, bytes, bytes]]:
  """(image suffix, image bytes, mask PNG bytes) of a few kinds of files, each 24x20."""
  def encode(image, fmt, **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()

  pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
  rgb = Image.fromarray(pixels)
  exif = Image.Exif()
  exif[0x0112] = 6  # Turned: the mask is stored 20x24 turned, like its image as shown.
  classes = (np.arange(20 * 24).reshape(20, 24) % 3).astype(np.uint8)
  mask = encode(Image.fromarray(classes), 'PNG')
  images = [
      ('.png', encode(rgb, 'PNG')),
      ('.png', encode(rgb.convert('L'), 'PNG')),
      ('.png', encode(rgb.convert('P'), 'PNG')),
      ('.png', encode(Image.fromarray((pixels[..., 0].astype(np.uint16) * 257)), 'PNG')),
      ('.png', encode(rgb, 'PNG', exif=exif)),
      ('.jpg', encode(rgb, 'JPEG', quality=90)),
      ('.jpg', encode(rgb, 'JPEG', quality=90, exif=exif)),
      ('.jpg', encode(rgb.convert('L'), 'JPEG', quality=90)),
  ]
  turned = encode(Image.fromarray(classes.T.copy()), 'PNG')
  return [(suffix, data, turned if b'Exif' in data[:200] or b'eXIf' in data else mask)
          for suffix, data in images]


def _damaged(data: bytes, rng) -> bytes:
  """`data` cut short at a random byte, or with 1-8 random bytes changed."""
  if rng.random() < 0.5:
    return data[:int(rng.integers(0, len(data)))]
  data = bytearray(data)
  for _ in range(int(rng.integers(1, 9))):
    data[int(rng.integers(0, len(data)))] = int(rng.integers(0, 256))
  return bytes(data)


def fuzz(root: pathlib.Path, num_files: int, seed: int = 0) -> tuple[int, collections.Counter]:
  """Decodes `num_files` damaged files (images and masks in turn) -> (escapes, their kinds)."""
  rng = np.random.default_rng(seed)
  originals = _originals(rng)
  (root / 'images').mkdir(parents=True)
  (root / 'masks').mkdir()
  escapes = collections.Counter()
  for i in range(num_files):
    suffix, image, mask = originals[i % len(originals)]
    damage_mask = i % 2 == 1
    image_path = root / 'images' / f'x{i}{suffix}'
    mask_path = root / 'masks' / f'x{i}.png'
    image_path.write_bytes(image if damage_mask else _damaged(image, rng))
    mask_path.write_bytes(_damaged(mask, rng) if damage_mask else mask)
    damaged = mask_path if damage_mask else image_path
    example = folder.Example(image_path, mask_path)
    for size in (16, None):
      try:
        folder.decode_example(example, size, 3, decode.Options())
      except errors.UserError as e:
        if str(damaged) not in str(e) or '\n' in str(e):
          escapes[f'UserError not naming the file: {str(e)[:80]}'] += 1
      except Exception as e:  # pylint: disable=broad-except  (what the fuzz looks for)
        escapes[f'{type(e).__name__}: {str(e)[:60]}'] += 1
    image_path.unlink()
    mask_path.unlink()
  return sum(escapes.values()), escapes


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--files', type=int, default=1650, help='Damaged files to decode.')
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    count, kinds = fuzz(pathlib.Path(tmp) / 'data', args.files, args.seed)
  print(f'{count} escapes in {args.files} damaged files (each decoded at size 16 and as stored)')
  for kind, n in kinds.most_common():
    print(f'  {n:5d}  {kind}')
  return 1 if count else 0


if __name__ == '__main__':
  sys.exit(main())
