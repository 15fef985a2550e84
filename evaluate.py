"""Scores a trained workdir: python evaluate.py --workdir runs/pets [--original_resolution]

Prints per-class IoU and Dice, mean IoU and pixel accuracy, and writes them as JSON with a
confusion-matrix PNG and a gallery of the worst images (<workdir>/eval/step_<N>*, or --out).
By default the split is scored as the trainer scores it (its pipeline and eval step, so the
numbers equal its metrics.jsonl); --original_resolution scores each image at its own size.
--flip_tta averages each image's and its mirror's probabilities (written to *_flip_tta.json).
A run that kept a moving average of its weights (config.ema_decay) is scored with that average;
--noema scores its trained weights (written to *_no_ema.json).
A crop-mode run (config.input_mode=crop) scores each image whole at its own size, with the
sliding window of overlapping tiles (unet_flax/tiles.py).
"""

from absl import app
from absl import flags

from unet_flax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'The --workdir of a training run.')
flags.DEFINE_integer('step', None, 'Checkpoint step to score; default: the latest.')
flags.DEFINE_string('split', None,
                    "Split to score, e.g. test, train, or a tfds slice such as 'test[:100]' or "
                    "'train+test'; default: the run's config.eval_split.")
flags.DEFINE_string('dataset', None,
                    "Data set to score on: a tfds name, or folder:/path/to/data (your own images "
                    "and masks, laid out as for training); default: the run's.")
flags.DEFINE_string('data_dir', None, "tfds data_dir; default: the run's.")
flags.DEFINE_bool('original_resolution', False,
                  "Score each image at its original size, classified as predict.py classifies "
                  "it, instead of as the trainer scores the split.")
flags.DEFINE_bool('flip_tta', False,
                  'Flip test-time augmentation: score the average of the softmax probabilities '
                  'of each image and its left-right mirror (twice the compute).')
flags.DEFINE_bool('ema', True,
                  "Of a run that kept a moving average of its weights (config.ema_decay), score "
                  "that average, as the trainer does; --noema: the trained weights (written to "
                  "*_no_ema.json).")
flags.DEFINE_integer('worst_k', 6, 'Images in the gallery of the worst; 0: no gallery.',
                     lower_bound=0)
flags.DEFINE_string('out', None, 'A .json file, or a directory; default: <workdir>/eval.')
flags.DEFINE_integer('batch_size', None,
                     "Images per forward pass; default: the run's config.batch_size.",
                     lower_bound=1)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  from unet_flax import evaluation  # pylint: disable=g-import-not-at-top  (fast --help)
  evaluation.evaluate_workdir(FLAGS.workdir, step=FLAGS.step, split=FLAGS.split, dataset=FLAGS.dataset,
                      data_dir=FLAGS.data_dir, original_resolution=FLAGS.original_resolution,
                      flip_tta=FLAGS.flip_tta, ema=FLAGS.ema, worst_k=FLAGS.worst_k,
                      out=FLAGS.out, batch_size=FLAGS.batch_size)


if __name__ == '__main__':
  cli.run(main)
