"""Images and masks of every PIL mode, and broken files, through input_pipeline.decode_example.

decode_example runs in load_split, before the first step: a bad file stops the run at preparation
time, naming the file, not with a crash mid-epoch.
"""

import io

import numpy as np
import pytest
from PIL import Image

from unet_flax import errors
from unet_flax import input_pipeline

SIZE = 8  # Output size; the pictures below are 32x32 of flat colours, so resizing changes nothing.
COLOUR = (200, 60, 10)


def _encode(image: Image.Image, fmt: str = 'PNG', **kwargs) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format=fmt, **kwargs)
  return buffer.getvalue()


def _flat(mode_colour, mode='RGB') -> Image.Image:
  return Image.new(mode, (32, 32), mode_colour)


# Oxford-style trimap: top half 1 (pet), bottom half 2 (background).
TRIMAP = np.repeat(np.array([1, 2], np.uint8), 16)[:, None].repeat(32, 1)
MASK = _encode(Image.fromarray(TRIMAP))
LABELS = np.repeat(np.array([0, 1], np.uint8), SIZE // 2)[:, None].repeat(SIZE, 1)


def _decode(image, mask=MASK, name=b'Abyssinian_1.jpg'):
  return input_pipeline.decode_example(
      {'image': image, 'segmentation_mask': mask, 'file_name': name}, SIZE, num_classes=3)


def _half_transparent() -> bytes:
  rgba = np.zeros((32, 32, 4), np.uint8)
  rgba[..., :3] = COLOUR
  rgba[16:, :, 3] = 255  # Top half transparent, its RGB arbitrary.
  return _encode(Image.fromarray(rgba))


# (image bytes or array, the RGB of its top and bottom halves).
PICTURES = {
    'RGB JPEG': (_encode(_flat(COLOUR), 'JPEG', quality=95), [COLOUR, COLOUR]),
    'L (grey)': (_encode(_flat(90, 'L')), [(90,) * 3] * 2),
    '1 (1-bit)': (_encode(_flat(1, '1')), [(255,) * 3] * 2),
    'P (palette)': (_encode(_flat(COLOUR).convert('P')), [COLOUR, COLOUR]),
    'LA': (_encode(_flat((90, 255), 'LA')), [(90,) * 3] * 2),
    'RGBA, half transparent': (_half_transparent(), [(255,) * 3, COLOUR]),  # Over white.
    'CMYK JPEG': (_encode(_flat(COLOUR).convert('CMYK'), 'JPEG', quality=95), [COLOUR, COLOUR]),
    # 16-bit grey: 0..65535 scaled to 0..255 (PIL's convert('RGB') clips: white).
    'I;16 (16-bit PNG)': (_encode(Image.fromarray(np.full((32, 32), 40000, np.uint16))),
                          [(156,) * 3] * 2),
    'uint16 array (decoded by tfds)': (np.full((32, 32, 1), 40000, np.uint16), [(156,) * 3] * 2),
    'RGBA array': (np.dstack([np.full((32, 32, 3), COLOUR, np.uint8),
                              np.full((32, 32, 1), 255, np.uint8)]), [COLOUR, COLOUR]),
}


@pytest.mark.parametrize('name', PICTURES)
def test_pictures_of_every_mode_become_rgb(name):
  data, (top, bottom) = PICTURES[name]
  image, labels = _decode(data)
  assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
  # Rows away from the middle, where bilinear resizing blends the halves.
  np.testing.assert_allclose(image[:SIZE // 2 - 1], np.broadcast_to(top, (SIZE // 2 - 1, SIZE, 3)),
                             atol=3)
  np.testing.assert_allclose(image[SIZE // 2 + 1:],
                             np.broadcast_to(bottom, (SIZE // 2 - 1, SIZE, 3)), atol=3)
  np.testing.assert_array_equal(labels, LABELS)


def _palette_mask() -> bytes:
  mask = Image.fromarray(TRIMAP, 'P')
  mask.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255])  # Red, green: their luminance is
  return _encode(mask)                                          # no class; the indices are.


MASKS = {
    'L': MASK,
    'P, indices are the classes': _palette_mask(),
    'I;16': _encode(Image.fromarray(TRIMAP.astype(np.uint16))),
    'grey saved as RGB': _encode(Image.fromarray(TRIMAP).convert('RGB')),
    'LA': _encode(Image.fromarray(TRIMAP).convert('LA')),
}


@pytest.mark.parametrize('name', MASKS)
def test_masks_of_every_one_channel_mode_keep_their_values(name):
  _, labels = _decode(PICTURES['RGB JPEG'][0], mask=MASKS[name])
  np.testing.assert_array_equal(labels, LABELS)


JPEG = PICTURES['RGB JPEG'][0]
BROKEN = {
    'empty file': (b'', MASK, 'Abyssinian_1.jpg: the file is empty'),
    'truncated JPEG': (JPEG[:len(JPEG) // 2], MASK, 'Abyssinian_1.jpg: cannot decode (Truncated'),
    'not an image': (b'not an image', MASK, 'Abyssinian_1.jpg: cannot decode (not an image'),
    'truncated mask': (JPEG, MASK[:len(MASK) // 2], 'Abyssinian_1.jpg (mask): cannot decode'),
    'label 4 in a trimap (3 classes)': (
        JPEG, _encode(Image.fromarray(TRIMAP * 2)),
        'Abyssinian_1.jpg (mask): trimap values [2, 4] are outside 1..3'),
    'label 0 in a trimap (shifts to -1)': (
        JPEG, _encode(Image.fromarray(TRIMAP - 1)),
        'Abyssinian_1.jpg (mask): trimap values [0, 1] are outside 1..3'),
    '16-bit mask value 258 (2 in 8 bits)': (
        JPEG, _encode(Image.fromarray(TRIMAP.astype(np.uint16) + 256)),
        'Abyssinian_1.jpg (mask): trimap values [257, 258] are outside 1..3'),
    'colour mask': (JPEG, _encode(_flat(COLOUR)),
                    'Abyssinian_1.jpg (mask): a colour RGB picture, not a mask'),
}


@pytest.mark.parametrize('name', BROKEN)
def test_broken_files_are_refused_naming_the_file(name):
  image, mask, message = BROKEN[name]
  with pytest.raises(errors.UserError) as raised:
    _decode(image, mask)
  assert str(raised.value).startswith(message)
  assert '\n' not in str(raised.value)
