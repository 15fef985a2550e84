"""Trains the U-Net: python train.py --config configs/default.py --workdir runs/pets

This file is intentionally kept short: the logic is in unet_flax/, where it can be tested.
Config fields are overridden with --config.<field>=<value>, e.g. --config.batch_size=8.
On several hosts (a TPU pod, or --coordinator_address & co.), run the same command on every host.
"""

import os

from absl import app
from absl import flags
from ml_collections import config_flags

from unet_flax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and pictures.')
config_flags.DEFINE_config_file('config', None, 'A config file, e.g. configs/default.py.',
                                lock_config=True)
flags.DEFINE_bool('allow_nonempty_workdir', False,
                  'Train in a --workdir that holds files but is not a training run (its '
                  'config.json, metrics.jsonl and curves.png would be replaced).')
flags.DEFINE_bool('allow_config_change', False,
                  'Resume a run with config fields that differ from its config.json (the model '
                  'fields must still fit); the resume is then no longer exact, and the new config '
                  'is stored.')
cli.define_process_flags()
flags.mark_flags_as_required(['config'])  # --workdir: checked by cli.run.


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  from unet_flax import errors  # pylint: disable=g-import-not-at-top  (after flag parsing: fast --help)
  filename = config_flags.get_config_filename(FLAGS['config'])
  if not os.path.isfile(filename):
    raise errors.UserError(f'the --config file {filename} does not exist; pass a file such as '
                           'configs/default.py')
  try:
    config = FLAGS.config
    config.to_dict()  # ml_collections loads the file lazily: here.
  except Exception as e:  # pylint: disable=broad-except  (whatever the file's own code raises)
    raise errors.UserError(cli.config_error(filename, e)) from None
  from unet_flax import train  # pylint: disable=g-import-not-at-top
  # On SIGTERM/SIGINT: saves, returns (exit 0).
  train.train_and_evaluate(config, FLAGS.workdir,
                           allow_nonempty_workdir=FLAGS.allow_nonempty_workdir,
                           allow_config_change=FLAGS.allow_config_change)


if __name__ == '__main__':
  cli.run(main, interrupted='interrupted: stopped without saving; rerun the same command to '
                            'resume from the last checkpoint')
