"""Trains the U-Net: python train.py --config configs/default.py --workdir runs/pets

This file is intentionally kept short: the logic is in unet_flax/, where it can be tested.
Config fields are overridden with --config.<field>=<value>, e.g. --config.batch_size=8.
On several hosts (a TPU pod, or --coordinator_address & co.), run the same command on every host.
"""

import logging as std_logging
import sys

from absl import app
from absl import logging
from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and pictures.')
config_flags.DEFINE_config_file('config', None, 'A config file, e.g. configs/default.py.',
                                lock_config=True)
flags.DEFINE_string('coordinator_address', None,
                    'host:port of process 0, to train over several processes (not needed on TPU '
                    'pods, where it is detected).')
flags.DEFINE_integer('num_processes', None, 'With --coordinator_address: how many processes.')
flags.DEFINE_integer('process_id', None, 'With --coordinator_address: this process, 0-based.')
flags.mark_flags_as_required(['config', 'workdir'])


def parse_flags(argv):
  """absl's flag parsing, with each mistake reported in one line instead of a traceback."""
  try:
    return FLAGS(argv)
  except (KeyError, AttributeError) as e:  # ml_collections: an override of an unknown field.
    message = str(e.args[0] if e.args else e).replace('\\n', ' ').replace("\\'", '')
    sys.exit(f'error: unknown config field {message.strip(chr(34) + chr(39))}; '
             'see configs/default.py for the fields')
  except SyntaxError as e:
    sys.exit(f'error: the --config file {e.filename} line {e.lineno}: {e.msg}; fix the file')
  except (flags.Error, ValueError, TypeError) as e:
    sys.exit(f'error: {e}; see python train.py --help')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO.
    # Orbax also logs each failed write with tracebacks; the error it raises is then one line.
    logging.get_absl_logger().addFilter(
        lambda record: '/orbax/' not in record.pathname or record.levelno < std_logging.ERROR)
  from unet_flax import errors  # pylint: disable=g-import-not-at-top  (after flag parsing: fast --help)
  from unet_flax import runtime  # pylint: disable=g-import-not-at-top
  try:
    config = FLAGS.config
    config.to_dict()  # ml_collections loads the file lazily: here.
  except Exception:  # pylint: disable=broad-except  (whatever the file's own code raises)
    sys.exit(f'error: cannot load the --config file {config_flags.get_config_filename(FLAGS["config"])}'
             ' (missing, or it fails to run); pass a file such as configs/default.py')
  try:
    runtime.setup(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    from unet_flax import train  # pylint: disable=g-import-not-at-top
    train.train_and_evaluate(config, FLAGS.workdir)  # On SIGTERM/SIGINT: saves, returns (exit 0).
  except errors.UserError as e:
    sys.exit(f'error: {e}')
  except KeyboardInterrupt:  # A second Ctrl-C: no waiting for a checkpoint.
    print('interrupted: stopped without saving; rerun the same command to resume from the last '
          'checkpoint', file=sys.stderr)
    sys.exit(130)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
