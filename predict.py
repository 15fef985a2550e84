"""Segments your own images: python predict.py --workdir runs/pets photos/*.jpg --out masks/

Writes <out>/<stem>_mask.png (uint8 classes 0..K-1 at the image's own resolution) and
<out>/<stem>_overlay.png (the photo tinted by class) for every image, of any size and mode.
The model is rebuilt from the workdir alone: its config.json and its latest checkpoint (or
--step). A file that cannot be read is named on stderr and skipped; the exit code is then 1.
"""

import sys

from absl import app
from absl import flags
from absl import logging

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'The --workdir of a training run.')
flags.DEFINE_string('out', None, 'Directory for the masks and overlays (created).')
flags.DEFINE_integer('step', None, 'Checkpoint step to use; default: the latest.')
flags.DEFINE_integer('batch_size', 8, 'Images per forward pass.', lower_bound=1)
flags.mark_flags_as_required(['workdir', 'out'])


def main(argv):
  paths = argv[1:]
  if not paths:
    raise app.UsageError('no images given; e.g. python predict.py --workdir runs/pets '
                         '--out masks/ photos/*.jpg')
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it reads at INFO.
  from unet_flax import errors  # pylint: disable=g-import-not-at-top  (fast --help)
  from unet_flax import inference  # pylint: disable=g-import-not-at-top
  from unet_flax import runtime  # pylint: disable=g-import-not-at-top
  try:
    runtime.setup()  # train.py's XLA flags and compile cache: the trainer's kernels.
    config, state = inference.load_model(FLAGS.workdir, FLAGS.step)
    failed = inference.predict_files(state, config, paths, FLAGS.out,
                                     batch_size=FLAGS.batch_size)
  except errors.UserError as e:
    sys.exit(f'error: {e}')
  done = len(paths) - len(failed)
  print(f'wrote masks and overlays of {done} of {len(paths)} images to {FLAGS.out}')
  if failed:
    sys.exit(f'error: {len(failed)} of {len(paths)} images could not be read (named above)')


if __name__ == '__main__':
  app.run(main)
