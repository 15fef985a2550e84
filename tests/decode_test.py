"""decode.py: pictures of every PIL mode become RGB, masks keep their values, broken files are
one-line errors naming the file, and photos for predict are resized as the trainer's data is."""

import io

import numpy as np
import pytest
from PIL import Image

from tests.conftest import gradient_picture
from unet_flax import decode
from unet_flax import errors

SIZE = 8  # Output size; the pictures below are 32x32 of flat colours, so resizing changes nothing.
COLOUR = (200, 60, 10)
NAME = 'Abyssinian_1.jpg'


def _encode(image: Image.Image, fmt: str = 'PNG', **kwargs) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format=fmt, **kwargs)
  return buffer.getvalue()


def _flat(mode_colour, mode='RGB') -> Image.Image:
  return Image.new(mode, (32, 32), mode_colour)


# An Oxford-style trimap: top half 1 (pet), bottom half 2 (background).
TRIMAP = np.repeat(np.array([1, 2], np.uint8), 16)[:, None].repeat(32, 1)
MASK = _encode(Image.fromarray(TRIMAP))
RESIZED_TRIMAP = np.repeat(np.array([1, 2], np.uint8), SIZE // 2)[:, None].repeat(SIZE, 1)


def _picture(data):
  return decode.decode(data, SIZE, 'picture', NAME)


def _mask(data):
  return decode.decode(data, SIZE, 'mask', f'{NAME} (mask)')


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
  image = _picture(data)
  assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
  # Rows away from the middle, where bilinear resizing blends the halves.
  np.testing.assert_allclose(image[:SIZE // 2 - 1], np.broadcast_to(top, (SIZE // 2 - 1, SIZE, 3)),
                             atol=3)
  np.testing.assert_allclose(image[SIZE // 2 + 1:],
                             np.broadcast_to(bottom, (SIZE // 2 - 1, SIZE, 3)), atol=3)


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
    'array (decoded by tfds)': TRIMAP[..., None],
}


@pytest.mark.parametrize('name', MASKS)
def test_masks_of_every_one_channel_mode_keep_their_values(name):
  np.testing.assert_array_equal(_mask(MASKS[name]), RESIZED_TRIMAP)


def test_size_none_keeps_the_stored_size():
  image = Image.fromarray(gradient_picture(10, 14))
  np.testing.assert_array_equal(decode.decode(_encode(image), None, 'picture', NAME),
                                gradient_picture(10, 14))
  np.testing.assert_array_equal(decode.decode(MASK, None, 'mask', NAME), TRIMAP)


JPEG = PICTURES['RGB JPEG'][0]
BROKEN = {
    'empty file': (b'', 'picture', f'{NAME}: the file is empty (0 bytes)'),
    'truncated JPEG': (JPEG[:len(JPEG) // 2], 'picture', f'{NAME}: cannot decode (Truncated'),
    'not an image': (b'not an image', 'picture',
                     f'{NAME}: cannot decode (not an image, or a format PIL does not read)'),
    'truncated mask': (MASK[:len(MASK) // 2], 'mask', f'{NAME} (mask): cannot decode'),
    'colour mask': (_encode(_flat(COLOUR)), 'mask',
                    f'{NAME} (mask): a colour RGB picture, not a mask'),
}


@pytest.mark.parametrize('name', BROKEN)
def test_broken_files_are_refused_naming_the_file(name):
  data, kind, message = BROKEN[name]
  with pytest.raises(errors.UserError) as raised:
    (_picture if kind == 'picture' else _mask)(data)
  assert str(raised.value).startswith(message)
  assert '\n' not in str(raised.value)


def test_read_bytes_and_picture_size_name_a_missing_or_unreadable_file(tmp_path):
  with pytest.raises(errors.UserError) as raised:
    decode.read_bytes(tmp_path / 'gone.jpg')
  assert str(raised.value) == f'{tmp_path / "gone.jpg"}: cannot read (No such file or directory)'
  with pytest.raises(errors.UserError) as raised:
    decode.picture_size(b'not an image', 'text.jpg')
  assert str(raised.value) == ('text.jpg: cannot decode (not an image, or a format PIL does not '
                               'read); remove or replace the file')
  Image.fromarray(gradient_picture(6, 7)).save(tmp_path / 'good.png')
  data = decode.read_bytes(tmp_path / 'good.png')
  assert decode.picture_size(data, 'good.png') == (6, 7)
  np.testing.assert_array_equal(decode.decode(data, None, 'picture', 'good.png'),
                                gradient_picture(6, 7))


def test_to_rgb_handles_16_bit_alpha_and_exif_rotation(tmp_path):
  sixteen = Image.fromarray(np.full((4, 6), 128 * 257, np.uint16))  # 257: 0..65535 -> 0..255.
  assert sixteen.mode == 'I;16'
  np.testing.assert_array_equal(np.asarray(decode.to_rgb(sixteen)), 128)  # Not clipped white.
  clear = Image.fromarray(np.zeros((3, 3, 4), np.uint8), 'RGBA')
  np.testing.assert_array_equal(np.asarray(decode.to_rgb(clear)), 255)  # Shown on white.
  image = Image.fromarray(gradient_picture(5, 9))
  exif = image.getexif()
  exif[0x0112] = 6  # Stored landscape, shown portrait (turned 90 degrees clockwise).
  image.save(tmp_path / 'turned.png', exif=exif)
  with Image.open(tmp_path / 'turned.png') as turned:
    assert decode.upright_size(turned) == (9, 5)
    np.testing.assert_array_equal(np.asarray(decode.to_rgb(turned)),
                                  np.rot90(gradient_picture(5, 9), k=-1))


def test_a_float_picture_holding_nan_is_one_line_naming_it():
  pixels = np.full((8, 8), 0.5, np.float32)
  pixels[2, 3] = np.nan
  data = _encode(Image.fromarray(pixels), 'TIFF')
  with pytest.raises(errors.UserError) as raised:
    _picture(data)
  assert str(raised.value) == (f'{NAME}: holds NaN or infinite values (1 of 64 pixels); replace '
                               'them with numbers in the file')


def test_pictures_past_the_pixel_cap_are_refused_from_the_header(monkeypatch):
  monkeypatch.setenv('UNET_FLAX_MAX_PIXELS', '1000')
  big = _encode(Image.new('L', (40, 30)))  # 1200 pixels.
  for run in (lambda: _picture(big), lambda: _mask(big)):
    with pytest.raises(errors.UserError) as raised:
      run()
    assert str(raised.value) == (
        f'{NAME}{" (mask)" if "(mask)" in str(raised.value) else ""}: 40x30 is 1,200 pixels, '
        'more than the 1,000 this program decodes (about 0.0 GB as RGB); set '
        'UNET_FLAX_MAX_PIXELS to raise the cap if you have the memory')
  monkeypatch.setenv('UNET_FLAX_MAX_PIXELS', '1200')
  assert _picture(big).shape == (SIZE, SIZE, 3)


def test_read_bytes_refuses_a_fifo_at_once(tmp_path):
  import os  # pylint: disable=g-import-not-at-top
  os.mkfifo(tmp_path / 'pipe.png')
  with pytest.raises(errors.UserError) as raised:
    decode.read_bytes(tmp_path / 'pipe.png')
  assert str(raised.value) == (f'{tmp_path / "pipe.png"}: not a regular file (a FIFO); only '
                               'regular files are read as images: remove it or replace it with '
                               'the file')


def test_stored_size_reads_the_header_alone_and_refuses_as_decode_does(tmp_path, monkeypatch):
  turned = Image.fromarray(gradient_picture(5, 9))
  exif = turned.getexif()
  exif[0x0112] = 6  # Shown 9x5: the same pixels, which is what stored_size is for.
  turned.save(tmp_path / 'turned.jpg', exif=exif)
  Image.fromarray(np.full((7, 3), 40000, np.uint16)).save(tmp_path / 'deep.png')
  Image.fromarray(gradient_picture(6, 11)).save(tmp_path / 'colour.tif')
  decoded = {name: decode.decode(decode.read_bytes(tmp_path / name), None, 'picture', name)
             for name in ('turned.jpg', 'deep.png', 'colour.tif')}
  # No pixel decoded: every format's load (TIFF's its own) fails from here on.
  from PIL import ImageFile  # pylint: disable=g-import-not-at-top
  for owner in (Image.Image, ImageFile.ImageFile):
    monkeypatch.setattr(owner, 'load', lambda self: 1 / 0)
  for name, array in decoded.items():
    height, width = decode.stored_size(tmp_path / name, name)
    assert decode.stored_size((tmp_path / name).read_bytes(), name) == (height, width)
    assert height * width == array.shape[0] * array.shape[1] and array.shape[2] == 3
  assert decode.stored_size(tmp_path / 'turned.jpg', '') == (5, 9)
  monkeypatch.undo()

  def message(run):
    with pytest.raises(errors.UserError) as raised:
      run()
    return str(raised.value)
  # Headers that cannot be read: decode's line for the same bytes, read_bytes's for the same path.
  for name in ('empty file', 'not an image'):
    data, _, _ = BROKEN[name]
    assert message(lambda: decode.stored_size(data, NAME)) == message(lambda: _picture(data))
    (tmp_path / 'broken.png').write_bytes(data)
    assert (message(lambda: decode.stored_size(tmp_path / 'broken.png', 'broken.png'))
            == message(lambda: decode.decode(decode.read_bytes(tmp_path / 'broken.png'), None,
                                             'picture', 'broken.png')))
  import os  # pylint: disable=g-import-not-at-top
  os.mkfifo(tmp_path / 'pipe.png')  # Refused at once: a FIFO's open would wait for a writer.
  for path in (tmp_path / 'gone.png', tmp_path / 'pipe.png', tmp_path):
    assert (message(lambda: decode.stored_size(path, path))
            == message(lambda: decode.read_bytes(path)))
  monkeypatch.setenv('UNET_FLAX_MAX_PIXELS', '20')
  assert (message(lambda: decode.stored_size(tmp_path / 'colour.tif', 'colour.tif'))
          == message(lambda: decode.decode((tmp_path / 'colour.tif').read_bytes(), None, 'picture',
                                           'colour.tif')))
