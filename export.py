"""Exports a trained model: python export.py --workdir runs/pets --out model/

Writes the inference function (uint8 images [B, S, S, 3] -> float32 logits [B, S, S, K],
parameters baked in) as <out>/model.jax_export (jax.export, StableHLO) and, where jax2onnx is
installed (the onnx extra), <out>/model.onnx checked by onnxruntime; and <out>/model.json (image
size, classes, the input mode's contract). docs/using.md shows how to run either without this
package.
"""

from absl import app
from absl import flags

from unet_flax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'The --workdir of a training run.')
flags.DEFINE_string('out', None, 'Directory for model.jax_export, model.onnx and model.json.')
flags.DEFINE_integer('step', None, 'Checkpoint step to export; default: the latest.')
flags.DEFINE_integer('batch_size', None,
                     'A fixed batch size; default: symbolic (any batch size at call time).',
                     lower_bound=1)
flags.DEFINE_list('platforms', ['cpu', 'cuda', 'tpu'], 'Platforms to lower model.jax_export for.')
flags.DEFINE_list('formats', None,
                  "Files to write: 'jax' (model.jax_export), 'onnx' (model.onnx, needs the onnx "
                  "extra); default: jax, and onnx where its converter is installed.")
flags.DEFINE_bool('overwrite', False, 'Replace the model\'s files in a non-empty --out, and remove '
                  'those of the formats not written (an earlier model.onnx).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  from unet_flax import errors  # pylint: disable=g-import-not-at-top  (fast --help)
  if not FLAGS.out:  # --workdir: checked by cli.run. '' is no directory either.
    raise errors.UserError('--out is required: the directory for the exported model, e.g. '
                           'python export.py --workdir runs/pets --out model/')
  from unet_flax import export  # pylint: disable=g-import-not-at-top
  info = export.export(FLAGS.workdir, FLAGS.out, step=FLAGS.step, batch_size=FLAGS.batch_size,
                       overwrite=FLAGS.overwrite, platforms=tuple(FLAGS.platforms),
                       formats=None if FLAGS.formats is None else tuple(FLAGS.formats))
  files = ', '.join(f'{entry["file"]} ({", ".join(entry["platforms"])})' if name == 'jax'
                    else f'{entry["file"]} (onnxruntime: logits within '
                         f'{entry["checked"]["max_abs_logit_diff"]:.1g} of jax\'s)'
                    for name, entry in info['files'].items())
  print(f'exported step {info["step"]} to {FLAGS.out}: input {info["input"]["shape"]} uint8, '
        f'logits {info["output"]["shape"]} float32; {files}')


if __name__ == '__main__':
  cli.run(main)
