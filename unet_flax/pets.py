"""tfds's `oxford_iiit_pet` 4.0.0, preparable without TensorFlow.

tfds's builder repairs 12 malformed archive members (PNGs, GIFs and corrupt
JPEGs named `*.jpg`) with `tf.image` and extracts the archives through
`tf.io.gfile`, so without TensorFlow its `download_and_prepare` fails.
`builder()` returns a subclass of that very builder which extracts with
`tarfile`, repairs with PIL and writes array_record files, so the result is
read back by the stock registered builder:

  pets.builder(data_dir).download_and_prepare()
  train = tfds.data_source('oxford_iiit_pet', split='train', data_dir=data_dir,
                           builder_kwargs={'file_format': 'array_record'},
                           download=False)
"""

from collections.abc import Iterator, Mapping
import contextlib
import io
import os
import tarfile
import tempfile

from etils import epath
from PIL import Image
from PIL import ImageFile
import requests
import tensorflow_datasets as tfds
from tensorflow_datasets.datasets.oxford_iiit_pet import (
    oxford_iiit_pet_dataset_builder as _tfds_pets)

from unet_flax import errors

# Where preparing the data set from archives downloaded by hand is told.
DOCS = 'docs/training.md'
# tf.io.encode_jpeg's default quality, so repaired members match tfds's.
_JPEG_QUALITY = 95
# Errors PIL raises for data it cannot parse (UnidentifiedImageError is an OSError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError)


@contextlib.contextmanager
def _load_truncated_images(enabled: bool) -> Iterator[None]:
  # PIL only has this module-level switch; restore it so importers are unaffected.
  previous = ImageFile.LOAD_TRUNCATED_IMAGES
  ImageFile.LOAD_TRUNCATED_IMAGES = enabled
  try:
    yield
  finally:
    ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _decode(data: bytes, *, truncated_ok: bool) -> Image.Image:
  image = Image.open(io.BytesIO(data))
  with _load_truncated_images(truncated_ok):
    image.load()  # Decodes all of it: open() only reads the header.
  return image


def as_rgb_jpeg(data: bytes, path: str, *, known_corrupt: bool = False) -> bytes:
  """Returns `data` if it is an intact RGB JPEG, else the image as one.

  Intact RGB JPEGs are kept byte for byte, as tfds keeps them. Anything else
  that PIL can decode (PNG with or without alpha, GIF, grayscale, truncated
  JPEG) is re-encoded the way tfds's `tf.image` repair does: alpha dropped (not
  composited), GIFs reduced to their first frame.

  Args:
    data: the member's bytes.
    path: its name, for error messages.
    known_corrupt: re-encode even when it decodes cleanly (tfds's list of
      corrupt samples, some of which only make libjpeg warn).

  Returns:
    JPEG bytes that decode to an HxWx3 uint8 image.

  Raises:
    errors.UserError: the data cannot be decoded as an image at all.
  """
  try:
    image = _decode(data, truncated_ok=False)
    if not known_corrupt and image.format == 'JPEG' and image.mode == 'RGB':
      return data
  except _DECODE_ERRORS:
    try:
      image = _decode(data, truncated_ok=True)
    except _DECODE_ERRORS as e:
      raise errors.UserError(f'{path}: cannot decode the image ({e}); replace the file '
                             '(e.g. download the archive again) and prepare again') from e
  buffer = io.BytesIO()
  # convert() drops alpha without compositing, as tfds's `[..., :-1]` does.
  image.convert('RGB').save(buffer, format='JPEG', quality=_JPEG_QUALITY)
  return buffer.getvalue()


def _extract_tar(archive: epath.Path, extract_dir: epath.Path) -> epath.Path:
  """Extracts `archive` where tfds's own extractor would put it, and returns that."""
  # Same name as tfds's extraction (`<method>.<archive>`), so each reuses the other's.
  out = extract_dir / f'TAR_GZ.{archive.name}'
  if not out.exists():
    extract_dir.mkdir(parents=True, exist_ok=True)
    tmp = epath.Path(tempfile.mkdtemp(prefix='incomplete.', dir=extract_dir))
    # 'r:*' sniffs the compression: despite their names the archives are plain tars.
    with tarfile.open(archive, 'r:*') as tar:
      # The 'data' filter (Python >= 3.10.12) refuses members escaping `tmp`.
      tar.extractall(tmp, **({'filter': 'data'} if hasattr(tarfile, 'data_filter') else {}))
    tmp.rename(out)  # Atomic: an interrupted extraction is never reused.
  return out


class _DownloadManager:
  """What tfds's `_split_generators` needs of a DownloadManager, minus TensorFlow.

  tfds downloads (and checks checksums) without TensorFlow, but its extractor
  writes through `tf.io.gfile`; so extract with `tarfile`, or skip both steps
  when the archives are already extracted.
  """

  def __init__(self, dl_manager, extracted_dirs: Mapping[str, epath.PathLike] | None):
    self._dl_manager = dl_manager
    self._extracted_dirs = extracted_dirs

  def download_and_extract(self, urls: Mapping[str, str]) -> dict[str, epath.Path]:
    if self._extracted_dirs is not None:
      missing = set(urls) - set(self._extracted_dirs)
      if missing:
        raise ValueError(f'extracted_dirs lacks {sorted(missing)}; needs {sorted(urls)}.')
      return {k: epath.Path(self._extracted_dirs[k]) for k in urls}
    try:
      archives = self._dl_manager.download(dict(urls))
    except (requests.exceptions.ConnectionError, tfds.download.DownloadError) as e:
      # Offline, tfds retries for minutes, then ends in a long traceback: one line instead.
      request = getattr(e, 'request', None)  # requests' errors carry the request that failed.
      url = getattr(request, 'url', None) or ', '.join(urls.values())
      raise errors.UserError(
          f'downloading the Oxford-IIIT Pet archives failed ({type(e).__name__} from {url}); '
          'offline, prepare the data set from archives downloaded elsewhere: see "The Pet data '
          f'without a download" in {DOCS}') from None
    extract_dir = self._dl_manager.download_dir / 'extracted'
    return {k: _extract_tar(path, extract_dir) for k, path in archives.items()}


class Builder(_tfds_pets.Builder, skip_registration=True):
  """tfds's `oxford_iiit_pet` with the malformed members repaired by PIL."""

  # Without this, the name would derive from the class name ('builder'); it
  # sets the data dir `<data_dir>/oxford_iiit_pet/4.0.0` that tfds reads.
  name = 'oxford_iiit_pet'
  # Metadata (description, citation) and checksums are looked up next to the
  # defining module; point both at tfds's so the DatasetInfo and the download
  # verification are the original's.
  pkg_dir_path = epath.Path(_tfds_pets.__file__).parent

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # Not `_tfds_pets.Builder.code_path`: on Python >= 3.9 tfds evaluates it
    # with `importlib_resources`, a backport it neither requires nor has here.
    return epath.Path(_tfds_pets.__file__)

  def __init__(self, *, extracted_dirs: Mapping[str, epath.PathLike] | None = None,
               download_dir: epath.PathLike | None = None, **kwargs):
    self._extracted_dirs = extracted_dirs
    self._download_dir = download_dir
    super().__init__(**kwargs)

  def download_and_prepare(self, *, download_dir: epath.PathLike | None = None, **kwargs):
    super().download_and_prepare(download_dir=download_dir or self._download_dir, **kwargs)

  def _split_generators(self, dl_manager):
    return super()._split_generators(_DownloadManager(dl_manager, self._extracted_dirs))

  def _generate_examples(self, images_dir_path, annotations_dir_path, images_list_file):
    # tfds's `_generate_examples` with the `tf.image` repair replaced by `as_rgb_jpeg`.
    # pylint: disable=protected-access
    trimaps_dir = os.path.join(annotations_dir_path, 'trimaps')
    xmls_dir = os.path.join(annotations_dir_path, 'xmls')
    with epath.Path(images_list_file).open('r') as images_list:
      for line in images_list:
        name, label, species, _ = line.strip().split(' ')
        image_path = os.path.join(images_dir_path, name + '.jpg')
        image = as_rgb_jpeg(epath.Path(image_path).read_bytes(), image_path,
                            known_corrupt=name in _tfds_pets._CORRUPT_SAMPLES)
        try:
          head_bbox = _tfds_pets._get_head_bbox(os.path.join(xmls_dir, name + '.xml'))
        except FileNotFoundError:  # Test images have no head annotation.
          head_bbox = _tfds_pets._EMPTY_BBOX
        yield name + '.jpg', {
            'image': image,
            'label': int(label) - 1,
            'species': int(species) - 1,
            'file_name': name + '.jpg',
            'segmentation_mask': os.path.join(trimaps_dir, name + '.png'),
            'head_bbox': head_bbox,
        }


def builder(data_dir: epath.PathLike | None = None, *,
            download_dir: epath.PathLike | None = None,
            extracted_dirs: Mapping[str, epath.PathLike] | None = None,
            ) -> tfds.core.DatasetBuilder:
  """Returns the `oxford_iiit_pet` 4.0.0 builder, writing array_record files.

  With internet, `builder(data_dir).download_and_prepare()` downloads both
  archives (checksums verified against tfds's) into `download_dir` (default
  `<data_dir>/downloads`), extracts them to `<download_dir>/extracted/` and
  prepares `<data_dir>/oxford_iiit_pet/4.0.0/`.

  With the archives downloaded by hand (`images.tar.gz` and
  `annotations.tar.gz` from https://www.robots.ox.ac.uk/~vgg/data/pets/),
  extract them and pass `extracted_dirs={'images': a, 'annotations': b}`,
  where `a/images/*.jpg` and `b/annotations/trainval.txt` exist (both may be
  the same directory); nothing is then downloaded.

  Either way, read the result with
  `tfds.data_source('oxford_iiit_pet', data_dir=data_dir,
  builder_kwargs={'file_format': 'array_record'}, download=False)`.

  Args:
    data_dir: tfds data dir; defaults to tfds's (`$TFDS_DATA_DIR` or
      `~/tensorflow_datasets`).
    download_dir: where the archives are downloaded and extracted.
    extracted_dirs: already-extracted archives, keyed 'images' and
      'annotations'; skips the download.

  Returns:
    The builder; call `download_and_prepare()` on it.
  """
  return Builder(data_dir=data_dir, file_format='array_record',
                 download_dir=download_dir, extracted_dirs=extracted_dirs)
