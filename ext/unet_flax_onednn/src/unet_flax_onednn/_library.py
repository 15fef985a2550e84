"""The extension's shared library, loaded; or an ImportError that says in one line why not.

The package installs without its library where it cannot be built: off x86-64 Linux
(pyproject.toml), or without a C++ compiler (CMakeLists.txt writes the reason into
_unavailable.txt). unet-flax's `layers` takes an ImportError as "no extension" and
runs on XLA's convolutions; the extension's tests skip with the message.
"""

import ctypes
import pathlib
import platform
import sys

_DIR = pathlib.Path(__file__).parent
LIBRARY = _DIR / 'libunet_flax_onednn_ffi.so'
UNAVAILABLE = _DIR / '_unavailable.txt'
REINSTALL = 'python -m pip install --force-reinstall ./ext/unet_flax_onednn'


def load() -> ctypes.CDLL:
  """The library, with libdnnl.so.3 (onednn-cpu-gomp) found through its RPATH."""
  if not LIBRARY.exists():
    if UNAVAILABLE.exists():  # No C++ compiler (CMakeLists.txt).
      reason = UNAVAILABLE.read_text().strip()
    elif (sys.platform, platform.machine()) != ('linux', 'x86_64'):  # pyproject.toml's override.
      reason = f'it builds on x86-64 Linux only, and this is {sys.platform} {platform.machine()}'
    else:
      reason = f'{LIBRARY.name} is missing from {_DIR}'
    raise ImportError(f'unet_flax_onednn was installed without its oneDNN library: {reason}; '
                      "unet-flax runs on XLA's convolutions without it")
  try:
    return ctypes.CDLL(str(LIBRARY))
  except OSError as e:  # libdnnl.so.3 gone, say: the runtime package was uninstalled.
    raise ImportError(f'unet_flax_onednn cannot load its library ({e}): reinstall it with its '
                      f'oneDNN runtime: {REINSTALL}') from e
