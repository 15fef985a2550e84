"""Exports a trained model: python export.py --workdir runs/pets --out model/

Writes <out>/model.jax_export, the inference function serialized with jax.export (StableHLO;
uint8 images [B, S, S, 3] -> float32 logits [B, S, S, K], parameters baked in), and
<out>/model.json (image size, classes). unet_flax/export.py shows how to run it with jax alone.
"""

from absl import app
from absl import flags

from unet_flax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'The --workdir of a training run.')
flags.DEFINE_string('out', None, 'Directory for model.jax_export and model.json.')
flags.DEFINE_integer('step', None, 'Checkpoint step to export; default: the latest.')
flags.DEFINE_integer('batch_size', None,
                     'A fixed batch size; default: symbolic (any batch size at call time).',
                     lower_bound=1)
flags.DEFINE_list('platforms', ['cpu', 'cuda', 'tpu'], 'Platforms to lower for.')
flags.DEFINE_bool('overwrite', False, 'Replace the files of a non-empty --out.')
flags.mark_flags_as_required(['workdir', 'out'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  from unet_flax import export  # pylint: disable=g-import-not-at-top  (fast --help)
  info = export.export(FLAGS.workdir, FLAGS.out, step=FLAGS.step, batch_size=FLAGS.batch_size,
                       overwrite=FLAGS.overwrite, platforms=tuple(FLAGS.platforms))
  print(f'exported step {info["step"]} to {FLAGS.out}: input {info["input"]["shape"]} uint8, '
        f'logits {info["output"]["shape"]} float32, for {", ".join(info["platforms"])}')


if __name__ == '__main__':
  cli.run(main)
