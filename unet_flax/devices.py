"""The devices of a run: one mesh over every device of every host, and batches put on it.

Batches are sharded on the mesh's 'data' axis and the state is replicated; `jit` places the
collectives, so the same code runs on 1 CPU, 1 GPU or a TPU pod.
"""

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from unet_flax import errors


class Devices:
  """The mesh, the shardings, and host batches -> global arrays."""

  def __init__(self, global_batch_size: int):
    count = jax.device_count()
    if global_batch_size % count:
      raise errors.UserError(
          f'config.batch_size={global_batch_size} is not divisible by the {count} devices; '
          f'use a multiple of {count}')
    # Auto axes: jit propagates the batch sharding itself (explicit sharding-in-types is not needed).
    self.mesh = jax.make_mesh((count,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
    self.data = NamedSharding(self.mesh, P('data'))
    self.replicated = NamedSharding(self.mesh, P())
    self.local_batch_size = global_batch_size // jax.process_count()
    self.per_device_batch_size = global_batch_size // count
    self.platform = jax.devices()[0].platform

  def put(self, batch: dict) -> dict:
    """This process's rows of the global batch -> arrays sharded over all devices."""
    return {k: jax.make_array_from_process_local_data(self.data, v) for k, v in batch.items()}

  def prefetch(self, batches, size: int = 2):
    """Puts batches on the devices `size` ahead, so the step never waits for a transfer."""
    queue = []
    for batch in batches:
      queue.append(self.put(batch))
      if len(queue) > size:
        yield queue.pop(0)
    yield from queue
