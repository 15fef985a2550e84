"""Process-wide JAX set-up: several processes, and the persistent compilation cache."""

import importlib.metadata
import itertools
import os

import jax
from etils import epath

from unet_flax import errors


def compilation_cache_dir() -> epath.Path | None:
  """$UNET_FLAX_CACHE (None if set empty), else the user cache directory ($XDG_CACHE_HOME or
  ~/.cache)."""
  if 'UNET_FLAX_CACHE' in os.environ:
    return epath.Path(os.environ['UNET_FLAX_CACHE']) if os.environ['UNET_FLAX_CACHE'] else None
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return epath.Path(base) / 'unet_flax' / 'jax'


def enable_compilation_cache() -> None:
  """Compiled steps persist on disk, so a second run of the same command skips XLA compiles.

  Set UNET_FLAX_CACHE='' to turn it off.
  """
  path = compilation_cache_dir()
  if path is None:
    return
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError:
    return  # A read-only home only costs compile time.
  jax.config.update('jax_compilation_cache_dir', str(path))
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)


# XLA:CPU flags, each with the first jaxlib that knows it: an older jaxlib aborts at start-up on a
# flag it does not know, so a flag is only set where it exists.
# YNNPACK takes the reductions alone ('reduce': the max-pools, the loss's and gradients' sums),
# which it runs several times faster than XLA's own loops; the convolutions stay off it, whose
# weight gradients are slower there than in Eigen, and so do elementwise fusions, slower there
# in bfloat16 (docs/speed.md has the figures). jaxlib 0.8.1, 0.9.0, 0.10.2 and 0.12.1 parse it.
_XLA_CPU_FLAGS = {'--xla_cpu_experimental_ynn_fusion_type=reduce': (0, 8, 1)}


def _version(text: str) -> tuple[int, ...]:
  """'0.8.1' -> (0, 8, 1); '0.12.0.1' and '0.9.0rc1' compare by their leading numbers."""
  numbers = []
  for part in text.split('.')[:3]:
    digits = ''.join(itertools.takewhile(str.isdigit, part))
    numbers.append(int(digits or 0))
  return tuple(numbers)


def xla_cpu_flags(jaxlib_version: str | None = None) -> list[str]:
  """Our XLA:CPU flags that the installed jaxlib (or `jaxlib_version`) knows."""
  version = _version(jaxlib_version or importlib.metadata.version('jaxlib'))
  return [flag for flag, first in _XLA_CPU_FLAGS.items() if version >= first]


def configure_xla_cpu() -> None:
  """Adds our XLA:CPU flags to $XLA_FLAGS, unless the user set them. Call before JAX starts.

  They only concern the CPU backend; GPUs and TPUs ignore them.
  """
  flags = os.environ.get('XLA_FLAGS', '')
  for flag in xla_cpu_flags():
    if flag.split('=')[0] not in flags:
      flags = f'{flags} {flag}'.strip()
  os.environ['XLA_FLAGS'] = flags


def _is_multihost_tpu() -> bool:
  return ',' in os.environ.get('TPU_WORKER_HOSTNAMES', '')


def setup(coordinator_address: str | None = None, num_processes: int | None = None,
          process_id: int | None = None) -> None:
  """Joins the other processes of a multi-process run (if any) and enables the compile cache.

  With a coordinator address, the processes meet there (on CPU they talk through gloo); on a
  multi-host TPU slice everything is detected. Otherwise this is a single-process run.
  """
  configure_xla_cpu()
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise errors.UserError('--coordinator_address needs --num_processes and --process_id')
    # Only used where the devices are CPUs; harmless elsewhere.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif _is_multihost_tpu():
    jax.distributed.initialize()
  enable_compilation_cache()
