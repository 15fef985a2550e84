"""devices.py: one mesh over the devices, batches sharded on it in contiguous blocks, put ahead.

Device counts are fixed when JAX starts: 4 CPU devices need their own process.
"""

import subprocess
import sys
import textwrap

import jax
import numpy as np

from tests.conftest import ROOT
from tests.conftest import script_env
from unet_flax.devices import Devices

FOUR_DEVICES = textwrap.dedent('''
    import numpy as np
    from unet_flax import errors
    from unet_flax.devices import Devices
    try:
      Devices(6)
    except errors.UserError as e:
      print(e)
    devices = Devices(8)
    print(devices.per_device_batch_size, devices.local_batch_size, devices.platform)
    batch = devices.put({'label': np.arange(8)})
    print(sorted((s.device.id, s.data.tolist()) for s in batch['label'].addressable_shards))
''')


def test_four_devices_refuse_a_batch_they_cannot_split_and_take_contiguous_blocks(tmp_path):
  result = subprocess.run(
      [sys.executable, '-c', FOUR_DEVICES], cwd=ROOT, capture_output=True, text=True, timeout=120,
      env=script_env(tmp_path / 'cache', XLA_FLAGS='--xla_force_host_platform_device_count=4'))
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines() == [
      'config.batch_size=6 is not divisible by the 4 devices; use a multiple of 4',
      '2 8 cpu',
      '[(0, [0, 1]), (1, [2, 3]), (2, [4, 5]), (3, [6, 7])]']


def test_put_makes_global_arrays_and_prefetch_keeps_the_order_two_ahead():
  devices = Devices(3)  # One CPU device: any batch size.
  assert (devices.per_device_batch_size, devices.local_batch_size) == (3, 3)
  pulled = []

  def batches():
    for i in range(5):
      pulled.append(i)
      yield {'image': np.full((3, 2), i, np.uint8), 'label': np.arange(3) + i}

  placed = devices.prefetch(batches(), size=2)
  first = next(placed)
  assert pulled == [0, 1, 2]  # The first batch waits while two more are put.
  rest = list(placed)
  assert len(rest) == 4 and pulled == [0, 1, 2, 3, 4]
  for i, batch in enumerate([first, *rest]):
    assert isinstance(batch['image'], jax.Array) and batch['image'].sharding == devices.data
    np.testing.assert_array_equal(batch['image'], np.full((3, 2), i))
    np.testing.assert_array_equal(batch['label'], np.arange(3) + i)
  assert devices.replicated.spec == jax.sharding.PartitionSpec()
