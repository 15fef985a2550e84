"""`synthetic_pets`: an offline stand-in for tfds's `oxford_iiit_pet` 4.0.0.

Importing this module registers the tfds builder `synthetic_pets`. Its features are those of
`oxford_iiit_pet`, so the input pipeline cannot tell the two apart:

  image:             [H, W, 3] uint8, JPEG; H and W drawn independently from [96, 320].
  segmentation_mask: [H, W, 1] uint8, PNG trimap: 1 = pet, 2 = background, 3 = border.
  label:             ClassLabel, the 37 Oxford breeds; species: ClassLabel Cat/Dog.
  file_name:         Text; head_bbox: BBox (ymin, xmin, ymax, xmax) in [0, 1].

Each image holds one procedural pet (ellipse body, round head, pointed or floppy ears, legs,
tail; random size, pose and position, sometimes cut by the image edge) over a textured
background (gradient, blobs, stripes, pet-coloured decoys), then JPEG compression. Colour alone
does not separate the classes: some pets take the background's colour and decoys take fur.
The border class is a 2..4 px band straddling the outline, as in the Oxford trimaps.

Example i of a split is generated from a seed derived from (split, i), so preparing twice gives
identical bytes. Configs (train / test examples): `small` 1024 / 256 (the default), `tiny` 24 / 12
(unit tests), `full` 3680 / 3669 (Oxford's sizes). Records are written as array_record, for
`tfds.data_source` random access without TensorFlow.
"""

import contextlib
import dataclasses
import io
import time
import zlib

from etils import epath
import numpy as np
from PIL import Image, ImageFilter
import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import tqdm_utils
from tensorflow_datasets.datasets.oxford_iiit_pet import oxford_iiit_pet_dataset_builder as _oxford

from unet_flax import errors

PET, BACKGROUND, BORDER = 1, 2, 3  # Oxford trimap values.
_LABELS = _oxford._LABEL_CLASSES  # pylint: disable=protected-access
_SPECIES = _oxford._SPECIES_CLASSES  # pylint: disable=protected-access
_SIZE_RANGE = (96, 320)  # Image heights and widths, drawn independently.
_MIN_PET_FRACTION = 0.03  # Redraw poses whose visible pet (or background) is below this.
_MAX_POSE_TRIES = 20
_MIN_LIMB_RADIUS = 3.0  # px; thinner limbs would vanish into the border band.
_JPEG_QUALITY = (55, 95)
_FORMAT = 'array_record'  # Random access without TensorFlow.
_SEED = 20240601  # Mixed into every example's seed; change it to get another data set.


@dataclasses.dataclass(eq=False)
class SyntheticPetsConfig(tfds.core.BuilderConfig):
  num_train: int = 0
  num_test: int = 0


def _smooth_noise(rng, h, w, cell_y, cell_x):
  """[h, w] float32 noise of unit scale, correlated over cells of about cell_y x cell_x px."""
  small = rng.standard_normal((h // cell_y + 2, w // cell_x + 2)).astype(np.float32)
  return np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC))  # float32: mode F.


def _dilate(mask, radius):
  """[H, W] bool -> [H, W] bool, dilated by a (2 radius + 1)^2 square; outside counts False."""
  out = mask.copy()
  for axis in (0, 1):
    src = np.moveaxis(out.copy(), axis, 0)
    dst = np.moveaxis(out, axis, 0)  # A view: writing it writes `out`.
    for s in range(1, radius + 1):
      dst[s:] |= src[:-s]
      dst[:-s] |= src[s:]
  return out


def _pet_mask(rng, h, w, cat):
  """Draws a random pet silhouette: ([h, w] bool mask, head box (y0, x0, y1, x1) in px)."""
  # Proportions are fractions of the body's semi-axes a, b or of the head radius rh, by eye.
  y, x = np.mgrid[:h, :w].astype(np.float32) + 0.5  # Pixel centres.
  a = rng.uniform(0.22, 0.45) * min(h, w)  # Body semi-major axis; sets the scale of the rest.
  b = a * rng.uniform(0.45, 0.65)
  theta = rng.uniform(-np.pi / 4, np.pi / 4) + rng.choice([0.0, np.pi])  # Facing right / left.
  u = np.array([np.cos(theta), np.sin(theta)])  # Body axis (x, y), towards the head.
  n = np.array([-u[1], u[0]]) * np.sign(u[0])  # Perpendicular, pointing down (y grows down).
  # Mostly well inside, sometimes near or past an edge so that the pet gets cut.
  c = np.array([w, h]) * (rng.uniform(-0.05, 1.05, 2) if rng.random() < 0.25 else
                          rng.uniform(0.25, 0.75, 2))

  def ellipse(centre, axis, ra, rb):
    dx, dy = x - centre[0], y - centre[1]
    p, q = dx * axis[0] + dy * axis[1], -dx * axis[1] + dy * axis[0]
    return (p / ra) ** 2 + (q / rb) ** 2 <= 1.0

  def capsule(p0, p1, r):
    d = p1 - p0
    t = np.clip(((x - p0[0]) * d[0] + (y - p0[1]) * d[1]) / (d @ d), 0.0, 1.0)
    r = max(r, _MIN_LIMB_RADIUS)
    return (x - p0[0] - t * d[0]) ** 2 + (y - p0[1] - t * d[1]) ** 2 <= r ** 2

  def triangle(p0, p1, p2):
    cross = lambda s, e: (e[0] - s[0]) * (y - s[1]) - (e[1] - s[1]) * (x - s[0])
    c0, c1, c2 = cross(p0, p1), cross(p1, p2), cross(p2, p0)
    return ((c0 >= 0) & (c1 >= 0) & (c2 >= 0)) | ((c0 <= 0) & (c1 <= 0) & (c2 <= 0))

  mask = ellipse(c, u, a, b)
  rh = b * rng.uniform(0.75, 1.05)  # Head radius.
  head = c + u * a * rng.uniform(0.8, 1.1) - n * b * rng.uniform(0.3, 0.9)
  mask |= ellipse(head, u, rh, rh * rng.uniform(0.85, 1.0))
  up = -n @ np.array([[np.cos(0.3), np.sin(0.3)], [-np.sin(0.3), np.cos(0.3)]])  # Ears lean.
  side = np.array([-up[1], up[0]])
  ears = []
  for sgn in (-1.0, 1.0):
    base = head + rh * (0.7 * up + sgn * 0.55 * side)
    if cat or rng.random() < 0.3:  # Pointed ears: all cats, some dogs.
      tip = base + rh * rng.uniform(0.6, 1.0) * (up + sgn * 0.35 * side)
      ears.append(triangle(base - 0.4 * rh * side, base + 0.4 * rh * side, tip))
    else:  # Floppy ears hang along the sides of the head.
      ears.append(ellipse(head + rh * sgn * 0.85 * side + 0.3 * rh * n, n, 0.75 * rh, 0.35 * rh))
  for ear in ears:
    mask |= ear
  legs = [(-0.55, 0.55), (-0.6, -0.4, 0.4, 0.6)][rng.integers(2)]  # Two or four visible.
  for along in legs:
    top = c + u * a * along + n * b * 0.5
    foot = top + b * rng.uniform(0.8, 1.4) * (n + u * rng.uniform(-0.4, 0.4))
    mask |= capsule(top, foot, b * rng.uniform(0.15, 0.25))
  tail = c - u * a * 0.9
  mask |= capsule(tail, tail - u * a * rng.uniform(0.5, 1.0) - n * b * rng.uniform(-1.2, 0.6),
                  b * rng.uniform(0.1, 0.2))
  # Head box (y0, x0, y1, x1), roughly: the ears stick out above the head.
  head_px = head[1] - rh * 1.8, head[0] - rh * 1.5, head[1] + rh * 1.3, head[0] + rh * 1.5
  return mask, head_px


def _texture(rng, h, w, colour, fur):
  """[h, w, 3] float32 in ~[0, 255]: colour over noise; fur is streaky, otherwise blotchy."""
  cells = (2, int(rng.integers(4, 9))) if fur else (int(rng.integers(16, 64)),) * 2
  noise = _smooth_noise(rng, h, w, *(cells if rng.random() < 0.5 else cells[::-1]))
  return colour + noise[..., None] * rng.uniform(8, 30) * rng.uniform(0.5, 1.0, 3)


def _pet_colour(rng):
  """A fur colour: mostly browns, greys, black, white and ginger, sometimes anything."""
  if rng.random() < 0.2:
    return rng.uniform(0, 255, 3)
  palette = np.array([[90, 60, 35], [150, 110, 70], [200, 170, 130], [40, 40, 40],
                      [120, 120, 120], [235, 230, 220], [210, 120, 50]], np.float32)
  return palette[rng.integers(len(palette))] + rng.normal(0, 15, 3)


def _generate(rng):
  """One example: ([H, W, 3] uint8 image, [H, W] uint8 trimap, label, head box in [0, 1])."""
  h, w = (int(v) for v in rng.integers(_SIZE_RANGE[0], _SIZE_RANGE[1] + 1, 2))
  label = int(rng.integers(len(_LABELS)))
  cat = _LABELS[label][0].isupper()  # Oxford capitalises cat breeds only.
  for _ in range(_MAX_POSE_TRIES):  # Keeps the last pose if none passes; never seen to happen.
    pet, head_px = _pet_mask(rng, h, w, cat)
    if _MIN_PET_FRACTION < pet.mean() < 1.0 - _MIN_PET_FRACTION:
      break
  y, x = np.mgrid[:h, :w].astype(np.float32) / max(h, w)
  # Colour amplitudes are in 0..255 units, by eye. Background: blotches, a colour gradient,
  # sometimes stripes, and decoys in pet colours and fur.
  bg_colour = rng.uniform(0, 255, 3)
  image = _texture(rng, h, w, bg_colour, fur=False)
  image += (x * rng.normal() + y * rng.normal())[..., None] * rng.normal(0, 40, 3)
  if rng.random() < 0.4:
    period = rng.uniform(6, 40) / max(h, w)
    stripes = np.sin((x * np.cos(rng.uniform(0, np.pi)) + y * np.sin(rng.uniform(0, np.pi))) *
                     2 * np.pi / period)
    image += stripes[..., None] * rng.normal(0, 20, 3)
  for _ in range(rng.integers(0, 4)):
    cy, cx, ry, rx = rng.uniform(0, 1, 4) * [h, w, 0.3 * h, 0.3 * w] + 4
    decoy = ((y * max(h, w) - cy) / ry) ** 2 + ((x * max(h, w) - cx) / rx) ** 2 <= 1
    fill = _texture(rng, h, w, _pet_colour(rng), fur=rng.random() < 0.5)
    image[decoy] = fill[decoy]
  # Pet: fur over a colour that sometimes matches the background, shaded towards the outline.
  pet_colour = bg_colour + rng.normal(0, 25, 3) if rng.random() < 0.3 else _pet_colour(rng)
  fur = _texture(rng, h, w, pet_colour, fur=True)
  if rng.random() < 0.3:  # Patches of a second colour, like a calico or a spaniel.
    patches = _smooth_noise(rng, h, w, 12, 12)[..., None] > 0.5
    fur = np.where(patches, _texture(rng, h, w, _pet_colour(rng), fur=True), fur)
  pet_u8 = Image.fromarray(pet.astype(np.uint8) * 255)
  depth = np.asarray(pet_u8.filter(ImageFilter.GaussianBlur(0.05 * min(h, w))), np.float32) / 255
  fur *= 0.7 + 0.4 * depth[..., None]
  alpha = np.asarray(pet_u8.filter(ImageFilter.BoxBlur(1)), np.float32)[..., None] / 255
  image = image * (1 - alpha) + fur * alpha + rng.normal(0, rng.uniform(1, 6), (h, w, 3))
  image = np.clip(image, 0, 255).astype(np.uint8)
  # The border band straddles the outline: in_r px inside the pet, out_r px outside it. Image
  # edges are not outlines, so `_dilate` treats outside pixels as neither class.
  in_r, out_r = rng.integers(1, 3, 2)
  border = (pet & _dilate(~pet, in_r)) | (~pet & _dilate(pet, out_r))
  trimap = np.where(border, BORDER, np.where(pet, PET, BACKGROUND)).astype(np.uint8)
  y0, x0, y1, x1 = np.clip(np.array(head_px) / [h, w, h, w], 0.0, 1.0)
  return image, trimap, label, tfds.features.BBox(ymin=y0, xmin=x0, ymax=y1, xmax=x1)


def _encode(array, fmt, **kwargs):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format=fmt, **kwargs)
  return buffer.getvalue()


class SyntheticPets(tfds.core.GeneratorBasedBuilder):
  """Procedural pets with Oxford-IIIT Pet's features; see the module docstring."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [  # The first is the default.
      SyntheticPetsConfig(name='small', num_train=1024, num_test=256),
      SyntheticPetsConfig(name='tiny', num_train=24, num_test=12),
      SyntheticPetsConfig(name='full', num_train=3680, num_test=3669),
  ]
  # tfds's own lookup of this file needs the `importlib_resources` backport, which nothing
  # installs; the checksums file it looks for next to it does not exist either way.
  code_path = epath.Path(__file__)

  def __init__(self, *, file_format=None, **kwargs):
    # array_record unless told otherwise, so that `tfds.data_source` works with no arguments.
    super().__init__(file_format=file_format or _FORMAT, **kwargs)

  def download_and_prepare(self, *, download_config=None, **kwargs):
    # The data are generated here, never on GCS: skip tfds's network lookup for a copy there.
    download_config = download_config or tfds.download.DownloadConfig()
    # Generation takes seconds: progress bars would only flood the logs with carriage returns.
    bars_were_on = getattr(tqdm_utils, '_active', True)
    tfds.display_progress_bar(False)
    config = self.builder_config
    print(f'generating {self.name}/{config.name} ({config.num_train:,} train and '
          f'{config.num_test:,} test images) in {self.data_dir}...', flush=True)
    started = time.perf_counter()
    try:
      # tfds's own lines speak of a download of "Unknown size": nothing is downloaded here.
      with contextlib.redirect_stdout(io.StringIO()):
        super().download_and_prepare(
            download_config=download_config.replace(try_download_gcs=False), **kwargs)
    finally:
      tfds.display_progress_bar(bars_were_on)
    print(f'generated in {time.perf_counter() - started:.0f}s', flush=True)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(encoding_format='jpeg'),
            'label': tfds.features.ClassLabel(names=_LABELS),
            'species': tfds.features.ClassLabel(names=_SPECIES),
            'file_name': tfds.features.Text(),
            'segmentation_mask': tfds.features.Image(shape=(None, None, 1), use_colormap=True),
            'head_bbox': tfds.features.BBoxFeature(),
        }),
        supervised_keys=('image', 'label'),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    sizes = {'train': self.builder_config.num_train, 'test': self.builder_config.num_test}
    return {split: self._generate_examples(split, n) for split, n in sizes.items()}

  def _generate_examples(self, split, num_examples):
    split_seed = zlib.crc32(split.encode())  # Stable across runs, unlike hash().
    for i in range(num_examples):
      rng = np.random.default_rng([_SEED, split_seed, i])
      image, trimap, label, head_bbox = _generate(rng)
      file_name = f'{_LABELS[label]}_{split}_{i:05d}.jpg'
      yield file_name, {
          'image': _encode(image, 'JPEG', quality=int(rng.integers(*_JPEG_QUALITY))),
          'label': label,
          'species': 0 if _LABELS[label][0].isupper() else 1,
          'file_name': file_name,
          'segmentation_mask': _encode(trimap, 'PNG'),
          'head_bbox': head_bbox,
      }


def builder(config_name: str | None, data_dir) -> tfds.core.DatasetBuilder:
  """The `synthetic_pets/<config_name>` builder over data_dir, reading/writing array_record.

  config_name None (the data set named without a config) is the default config, `small`.
  """
  known = [c.name for c in SyntheticPets.BUILDER_CONFIGS]
  if config_name and config_name not in known:
    raise errors.UserError(f'config.dataset=synthetic_pets/{config_name} names no configuration; '
                           f'use one of {", ".join("synthetic_pets/" + n for n in known)}')
  name = f'synthetic_pets/{config_name}' if config_name else 'synthetic_pets'
  return tfds.builder(name, data_dir=data_dir, file_format=_FORMAT)
