"""The torch-free state_dict reader: files written here in torch's layouts, opcode by opcode.

The writer below emits the pickle opcodes and persistent ids that torch.save writes (GLOBAL
'torch._utils _rebuild_tensor_v2', BINPERSID of ('storage', torch.FloatStorage, key, 'cpu',
numel[, view])), so no torch is needed; expected values are read out of the storages with explicit
index arithmetic, not with the reader's as_strided.
"""

import os
import pickle
import struct
import zipfile

import numpy as np
import pytest

from unet_flax import errors
from unet_flax import torch_weights


class Global:
  def __init__(self, module, name):
    self.module, self.name = module, name


class Call:  # REDUCE: callable(*args).
  def __init__(self, fn, args):
    self.fn, self.args = fn, args


class PersistentId:
  def __init__(self, pid):
    self.pid = pid


def _ops(obj) -> bytes:
  """Protocol-2 opcodes that rebuild obj (of the kinds above and plain values)."""
  if isinstance(obj, Global):
    return b'c' + f'{obj.module}\n{obj.name}\n'.encode()
  if isinstance(obj, Call):
    return _ops(obj.fn) + _ops(tuple(obj.args)) + pickle.REDUCE
  if isinstance(obj, PersistentId):
    return _ops(obj.pid) + pickle.BINPERSID
  if obj is None:
    return pickle.NONE
  if isinstance(obj, bool):
    return pickle.NEWTRUE if obj else pickle.NEWFALSE
  if isinstance(obj, int):
    if -2**31 <= obj < 2**31:
      return pickle.BININT + struct.pack('<i', obj)
    data = obj.to_bytes((obj.bit_length() + 8) // 8, 'little', signed=True)
    return pickle.LONG1 + bytes([len(data)]) + data
  if isinstance(obj, str):
    data = obj.encode()
    return pickle.BINUNICODE + struct.pack('<I', len(data)) + data
  if isinstance(obj, tuple):
    return pickle.MARK + b''.join(map(_ops, obj)) + pickle.TUPLE
  if isinstance(obj, list):
    return pickle.EMPTY_LIST + pickle.MARK + b''.join(map(_ops, obj)) + pickle.APPENDS
  if isinstance(obj, dict):  # As torch's OrderedDict: OrderedDict() then SETITEMS.
    items = b''.join(_ops(k) + _ops(v) for k, v in obj.items())
    return _ops(Call(Global('collections', 'OrderedDict'), ())) + pickle.MARK + items + (
        pickle.SETITEMS)
  raise TypeError(obj)


def dumps(obj) -> bytes:
  return pickle.PROTO + b'\x02' + _ops(obj) + pickle.STOP


STORAGE_TYPES = {np.dtype('float32'): 'FloatStorage', np.dtype('int64'): 'LongStorage',
                 np.dtype('float16'): 'HalfStorage'}


def tensor(key, storage, offset, shape, strides, legacy=True):
  """torch's pickle of a tensor on `storage` (a 1-D array named `key`); legacy files' persistent
  ids end with a storage view (None: the whole storage), zip files' do not."""
  pid = ('storage', Global('torch', STORAGE_TYPES[storage.dtype]), key, 'cpu', storage.size)
  return Call(Global('torch._utils', '_rebuild_tensor_v2'),
              (PersistentId(pid + (None,) * legacy), offset, tuple(shape), tuple(strides), False,
               Call(Global('collections', 'OrderedDict'), ())))


def legacy_file(path, state, storages, main_pickle=None):
  """torch's legacy layout: magic, protocol, sys info, the dict, storage keys, storages."""
  with open(path, 'wb') as f:
    f.write(dumps(0x1950a86a20f9469cfc6c))
    f.write(dumps(1001))
    f.write(dumps({'protocol_version': 1001, 'little_endian': True,
                   'type_sizes': {'short': 2, 'int': 4, 'long': 4}}))
    f.write(main_pickle if main_pickle is not None else dumps(state))
    f.write(dumps(list(storages)))
    for storage in storages.values():
      f.write(struct.pack('<q', storage.size) + storage.astype(storage.dtype.newbyteorder('<'))
              .tobytes())
  return path


def zip_file(path, state, storages, main_pickle=None):
  """torch's zip layout: archive/data.pkl, archive/data/<key>, archive/byteorder."""
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('archive/data.pkl', main_pickle if main_pickle is not None else dumps(state))
    archive.writestr('archive/byteorder', 'little')
    for key, storage in storages.items():
      archive.writestr(f'archive/data/{key}', storage.tobytes())
  return path


def strided(storage, offset, shape, strides):
  """The elements of a view, one index at a time."""
  out = np.empty(shape, storage.dtype)
  for index in np.ndindex(*shape):
    out[index] = storage[offset + sum(i * s for i, s in zip(index, strides))]
  return out


def example(legacy=True):
  """(state, storages, expected): a contiguous tensor, a scalar, a transposed view with an
  offset on the same storage, and float16."""
  weights = np.arange(12, dtype=np.float32) * 0.5 - 2
  steps = np.array([7], np.int64)
  half = np.array([1.5, -2.25, 3.0], np.float16)
  state = {
      'conv.weight': tensor('0', weights, 0, (2, 3), (3, 1), legacy),
      'bn.num_batches_tracked': tensor('1', steps, 0, (), (), legacy),
      'view.t': tensor('0', weights, 1, (3, 2), (1, 4), legacy),  # Transposed, from element 1.
      'half': tensor('2', half, 0, (3,), (1,), legacy),
  }
  expected = {
      'conv.weight': strided(weights, 0, (2, 3), (3, 1)),
      'bn.num_batches_tracked': np.array(7, np.int64),
      'view.t': strided(weights, 1, (3, 2), (1, 4)),
      'half': half,
  }
  return state, {'0': weights, '1': steps, '2': half}, expected


def check(got, expected):
  assert set(got) == set(expected)
  for k, want in expected.items():
    assert got[k].dtype == want.dtype and got[k].shape == want.shape, k
    np.testing.assert_array_equal(got[k], want, err_msg=k)
    assert got[k].flags.c_contiguous and got[k].flags.writeable, k


def test_legacy_file_round_trips_values_dtypes_shapes_and_views(tmp_path):
  state, storages, expected = example()
  check(torch_weights.load_state_dict(legacy_file(tmp_path / 'w.pth', state, storages)), expected)


def test_legacy_storage_view_offsets_the_tensor(tmp_path):
  # Legacy files name a view of a storage: ('view key', offset, numel) as the persistent id's
  # 6th element; the tensor's own offset counts from the view's start.
  storage = np.arange(10, dtype=np.float32)
  pid = ('storage', Global('torch', 'FloatStorage'), '0', 'cpu', 10, ('v', 4, 5))
  state = {'x': Call(Global('torch._utils', '_rebuild_tensor_v2'),
                     (PersistentId(pid), 1, (2, 2), (2, 1), False, None))}
  got = torch_weights.load_state_dict(legacy_file(tmp_path / 'w.pth', state, {'0': storage}))
  np.testing.assert_array_equal(got['x'], [[5, 6], [7, 8]])


def test_zip_file_round_trips(tmp_path):
  state, storages, expected = example(legacy=False)
  check(torch_weights.load_state_dict(zip_file(tmp_path / 'w.pth', state, storages)), expected)


class RunsACommand:
  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return os.system, (self.command,)


@pytest.mark.parametrize('layout', ['bare pickle', 'legacy', 'zip'])
def test_a_pickle_that_calls_os_system_is_refused_without_running_it(tmp_path, layout):
  marker = tmp_path / 'ran'
  evil = pickle.dumps({'x': RunsACommand(f'touch {marker}')}, protocol=2)
  path = tmp_path / 'evil.pth'
  if layout == 'bare pickle':
    path.write_bytes(evil)
  elif layout == 'legacy':
    legacy_file(path, None, {}, main_pickle=evil)
  else:
    zip_file(path, None, {}, main_pickle=evil)
  with pytest.raises(errors.UserError, match=r'refused: its pickle calls posix\.system'):
    torch_weights.load_state_dict(path)
  assert not marker.exists()
  # The pickle is live: unrestricted, it would have run the command.
  if layout == 'bare pickle':
    pickle.loads(evil)  # noqa: S301 (the point of the test)
    assert marker.exists()


@pytest.mark.parametrize('name', [('builtins', 'eval'), ('builtins', 'getattr'),
                                  ('subprocess', 'Popen'), ('torch', 'load'),
                                  ('torch._utils', '_rebuild_device_tensor_from_numpy')])
def test_every_other_global_is_refused(tmp_path, name):
  path = tmp_path / 'w.pth'
  legacy_file(path, None, {}, main_pickle=dumps({'x': Call(Global(*name), ('1',))}))
  with pytest.raises(errors.UserError, match=f'calls {".".join(name)}, which a state_dict'):
    torch_weights.load_state_dict(path)


@pytest.mark.parametrize('damage', ['truncated', 'count past the end'])
def test_a_file_cut_short_is_a_user_error(tmp_path, damage):
  state, storages, _ = example()
  path = legacy_file(tmp_path / 'w.pth', state, storages)
  data = path.read_bytes()
  if damage == 'truncated':
    data = data[:-5]
  else:  # A storage's element count far past the file's end: refused before any allocation.
    first = storages['0'][:2].tobytes()
    data = data.replace(struct.pack('<q', 12) + first, struct.pack('<q', 2**60) + first)
  path.write_bytes(data)
  with pytest.raises(errors.UserError, match=r'w\.pth is cut short; copy or download it again'):
    torch_weights.load_state_dict(path)


def test_a_tensor_past_its_storage_is_refused(tmp_path):
  storage = np.arange(6, dtype=np.float32)
  state = {'x': tensor('0', storage, 2, (2, 3), (3, 1))}  # Elements 2..7 of 6.
  with pytest.raises(errors.UserError, match='reaches past the end of its storage'):
    torch_weights.load_state_dict(legacy_file(tmp_path / 'w.pth', state, {'0': storage}))


@pytest.mark.parametrize('content,reason', [
    (b'not a pickle at all', r'is not a PyTorch state_dict \(its bytes are no pickle torch.save '
                             r'writes\); give a file written by torch.save'),
    (b'hello\n', r'is not a PyTorch state_dict \(its bytes are no pickle'),
    (dumps(12345), 'is not a PyTorch state_dict .no PyTorch magic number'),
])
def test_other_files_are_user_errors(tmp_path, content, reason):
  path = tmp_path / 'w.pth'
  path.write_bytes(content)
  with pytest.raises(errors.UserError, match=reason):
    torch_weights.load_state_dict(path)


def test_non_tensor_entries_and_missing_files(tmp_path):
  path = legacy_file(tmp_path / 'w.pth', None, {}, main_pickle=dumps({'epoch': 3}))
  with pytest.raises(errors.UserError, match='entries other than named tensors'):
    torch_weights.load_state_dict(path)
  with pytest.raises(errors.UserError, match='cannot read weights file .*missing.pth'):
    torch_weights.load_state_dict(tmp_path / 'missing.pth')
