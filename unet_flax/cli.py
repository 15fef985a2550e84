"""The one shell of the command-line tools: train.py, predict.py, evaluate.py and export.py.

`cli.run(main)` parses the flags (a mistake, a missing or empty --workdir included, is one line,
not a traceback), quiets the libraries' INFO logs, sets up the process as the trainer does
(runtime.setup: XLA:CPU flags, the compile cache, several processes), decides its convolutions
once (--conv_backend, layers.select_backend), runs `main(argv)` and turns a `UserError` into one
line on stderr.

Exit codes: 0 done (also after a SIGTERM/Ctrl-C save), 1 a UserError or bad flags (what to do is
on stderr), 130 a second Ctrl-C (stopped without saving). `main` may return another code.

Nothing heavy is imported here or before the flags are parsed, so `--help` answers at once.
"""

import difflib
import logging as std_logging
import sys
import traceback
from collections.abc import Callable

from absl import app
from absl import flags
from absl import logging

FLAGS = flags.FLAGS
flags.DEFINE_enum('conv_backend', 'auto', ['auto', 'xla', 'onednn'],
                  "Convolutions of this process: 'auto' takes oneDNN on a one-device CPU where "
                  "the extension ext/unet_flax_onednn is installed, else XLA; 'xla'; 'onednn'. "
                  'A speed choice: checkpoints fit either.')


def define_process_flags() -> None:
  """--coordinator_address, --num_processes, --process_id: several processes without a TPU pod."""
  flags.DEFINE_string('coordinator_address', None,
                      'host:port of process 0, to run over several processes (not needed on TPU '
                      'pods, where it is detected).')
  flags.DEFINE_integer('num_processes', None, 'With --coordinator_address: how many processes.')
  flags.DEFINE_integer('process_id', None, 'With --coordinator_address: this process, 0-based.')


def _user_frames(e: BaseException) -> list[traceback.FrameSummary]:
  """The frames of `e`'s traceback in the user's files: not a library's, not this shell's."""
  return [f for f in traceback.extract_tb(e.__traceback__)
          if 'site-packages' not in f.filename and not f.filename.startswith('<')
          and f.filename != __file__]


def _repeated_overrides(argv: list[str]) -> list[str]:
  """Config fields given twice (--config.widths=... twice), which ml_collections would concatenate
  for tuples instead of taking the last."""
  names = [a.split('=', 1)[0] for a in argv[1:] if a.startswith('--config.')]
  return sorted({n for n in names if names.count(n) > 1})


def _unknown_override(argv: list[str]) -> str | None:
  """The first --config.NAME override whose NAME is no config field, with the nearest field
  (`batch_szie (did you mean batch_size?)`); None if every one is a field."""
  from unet_flax import config as config_lib  # pylint: disable=g-import-not-at-top  (fast --help)
  fields = list(config_lib.defaults())
  for arg in argv[1:]:
    if arg.startswith('--config.'):
      name = arg.split('=', 1)[0][len('--config.'):].split('.')[0]
      if name not in fields:
        near = difflib.get_close_matches(name, fields, n=1)
        return name + (f' (did you mean {near[0]}?)' if near else '')
  return None


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with each mistake reported in one line instead of a traceback."""
  if any(a.startswith('--config.conv_backend') for a in argv[1:]):
    sys.exit('error: config.conv_backend is no longer a config field: the convolutions are a '
             'setting of the process; pass --conv_backend=VALUE instead')
  repeated = _repeated_overrides(argv)
  if repeated:
    sys.exit(f'error: {repeated[0]} is given more than once; give each config field once')
  try:
    remaining = FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    if _user_frames(e) or isinstance(e, SyntaxError):  # A --config file's own code failed.
      sys.exit(f'error: {config_error(None, e)}')
    if isinstance(e, (KeyError, AttributeError)):  # ml_collections: an unknown field's override.
      unknown = _unknown_override(argv)
      if unknown is None:  # Not one of ours (a config file's own field): the library's words.
        unknown = str(e.args[0] if e.args else e).replace('\\n', ' ').replace("\\'", '')
        unknown = unknown.strip(chr(34) + chr(39))
      sys.exit(f'error: unknown config field {unknown}; see unet_flax/config.py for the fields')
    if isinstance(e, OSError):  # ml_collections: a --config file that cannot be read.
      sys.exit(f'error: the --config file {e.filename or ""} cannot be read ({e.strerror or e}); '
               'pass a file such as configs/default.py')
    if isinstance(e, (flags.Error, ValueError, TypeError)):
      sys.exit(f'error: {e}; see python {sys.argv[0]} --help')
    raise
  _require_workdir(remaining)
  return remaining


def _require_workdir(remaining: list[str]) -> None:
  """Refuses a missing or empty --workdir of a tool that has one (every tool does): checked here
  rather than by absl's required flags, whose message is theirs, and which take '' (which would
  mean the current directory)."""
  if 'workdir' not in FLAGS or FLAGS.workdir:
    return
  if any(a.split('=', 1)[0] == '--workdir' for a in remaining[1:]):
    return  # Given after predict's images: predict says where flags go.
  sys.exit("error: --workdir is required: the run's directory, e.g. --workdir runs/pets")


def config_error(filename: str | None, e: BaseException) -> str:
  """One line for a config file whose code fails: its file and line, and the error."""
  frames = _user_frames(e)
  if isinstance(e, SyntaxError):
    return f'the config file {e.filename} line {e.lineno}: {e.msg}; fix the file'
  where = f'{frames[-1].filename} line {frames[-1].lineno}' if frames else filename
  return f'the config file fails at {where} ({type(e).__name__}: {e}); fix the file'


def _quiet_libraries() -> None:
  if FLAGS['verbosity'].present:
    return
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file it reads and writes at INFO.
  # Orbax also logs each failed write with tracebacks; the error it raises is then one line.
  logging.get_absl_logger().addFilter(
      lambda record: '/orbax/' not in record.pathname or record.levelno < std_logging.ERROR)


def run(main: Callable[[list[str]], int | None], *,
        interrupted: str = 'interrupted: stopped') -> None:
  """Runs `main(argv)` as a command-line tool; see the module docstring for what it adds.

  Args:
    main: the tool, given the arguments left after the flags.
    interrupted: the line printed when Ctrl-C stops it (a second Ctrl-C, for the trainer).
  """

  def wrapped(argv):
    _quiet_libraries()
    from unet_flax import errors  # pylint: disable=g-import-not-at-top  (after --help)
    from unet_flax import runtime  # pylint: disable=g-import-not-at-top
    try:
      if 'coordinator_address' in FLAGS:
        runtime.setup(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
      else:
        runtime.setup()
      from unet_flax import layers  # pylint: disable=g-import-not-at-top  (jax: after setup)
      layers.select_backend(FLAGS.conv_backend)  # Before anything is read or written.
      return main(argv)
    except errors.UserError as e:
      sys.exit(f'error: {e}')
    except KeyboardInterrupt:
      print(interrupted, file=sys.stderr)
      sys.exit(130)

  app.run(wrapped, flags_parser=_parse_flags)
