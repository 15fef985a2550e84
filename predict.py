"""Segments your own images: python predict.py --workdir runs/pets --out masks/ photos/*.jpg

Takes image files, directories (their images) and glob patterns (photos/*.jpg, quoted or not).
Writes <out>/<stem>_mask.png (a palette PNG: the pixel values are the classes 0..K-1, shown in
the class colours, at the image's own resolution) and <out>/<stem>_overlay.png (the photo tinted
by class, with a legend) for every image, of any size and mode. The model is rebuilt from the
workdir alone: its config.json and its latest checkpoint (or --step). A file that cannot be read
is named on stderr and skipped; the exit code is then 1. Photos are read and classified as the
run's input mode says (unet_flax/modes.py); a crop-mode run predicts each image whole with
overlapping tiles (unet_flax/tiles.py), and --batch_size is then the number of windows per pass.

Flags go before the images: flag parsing stops at the first image, so that a file a shell glob
picks up named like a flag (`--out=x.png`) is an image, not a flag.
"""

import sys

from absl import flags

from unet_flax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'The --workdir of a training run.')
flags.DEFINE_string('out', None, 'Directory for the masks and overlays (created).')
flags.DEFINE_integer('step', None, 'Checkpoint step to use; default: the latest.')
flags.DEFINE_integer('batch_size', 8, 'Images per forward pass.', lower_bound=1)
flags.DEFINE_bool('flip_tta', False,
                  'Flip test-time augmentation: the average of the softmax probabilities of each '
                  'image and its left-right mirror (twice the compute).')
flags.DEFINE_bool('overwrite', False, 'Replace masks and overlays that exist in --out.')
# Not GNU-style: arguments after the first positional one are positional too (photos/*.jpg may
# expand to '--out=x.png').
FLAGS.set_gnu_getopt(False)


def main(argv):
  from unet_flax import errors  # pylint: disable=g-import-not-at-top  (fast --help)
  example = 'e.g. python predict.py --workdir runs/pets --out masks/ photos/*.jpg'
  paths = argv[1:]
  import os  # pylint: disable=g-import-not-at-top
  misplaced = [p for p in paths if p.startswith('--') and not os.path.exists(p)]
  if misplaced:  # Before the required flags: --out after the photos is not a missing --out.
    raise errors.UserError(f'{misplaced[0]} comes after the images; flags go before them, '
                           f'{example}')
  if FLAGS.out is None:  # --workdir: checked by cli.run.
    raise errors.UserError(f'--out is required; {example}')
  if not paths:
    raise errors.UserError(f'no images given; {example}')
  from unet_flax import inference  # pylint: disable=g-import-not-at-top
  paths = inference.expand_inputs(paths)
  model = inference.load_model(FLAGS.workdir, FLAGS.step, flip_tta=FLAGS.flip_tta)
  failed = inference.predict_files(model, paths, FLAGS.out, batch_size=FLAGS.batch_size,
                                   overwrite=FLAGS.overwrite)
  done = len(paths) - len(failed)
  tta = ' (flip TTA)' if FLAGS.flip_tta else ''
  if done:  # Else --out was not even created (inference.predict_files makes it at its first write).
    print(f'wrote masks and overlays{tta} of {done} of {len(paths)} images to {FLAGS.out}')
  if failed:
    nothing = '; nothing was written' if not done else ''
    print(f'error: {len(failed)} of {len(paths)} images could not be read (named above){nothing}',
          file=sys.stderr)
    return 1


if __name__ == '__main__':
  cli.run(main)
