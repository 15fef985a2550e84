"""Orbax checkpoints under <workdir>/checkpoints, and the run's config beside them.

The config is stored as <workdir>/config.json so that later tools (predict, evaluate, export) can
rebuild the model from the workdir alone, and so that a rerun with a config the checkpoints do not
fit is refused before anything is written.
"""

import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from unet_flax import errors

# Fields that decide the shapes and meaning of the parameters: a checkpoint only fits their values.
MODEL_FIELDS = ('widths', 'num_classes', 'image_size', 'dtype')
CONFIG_FILE = 'config.json'


def load_config(workdir) -> ml_collections.ConfigDict:
  """The config a workdir was trained with."""
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise errors.UserError(f'{path} not found: is {workdir} the --workdir of a training run?')
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def _comparable(value):
  return list(value) if isinstance(value, (list, tuple)) else value


def check_workdir(workdir: epath.Path) -> None:
  """Refuses a workdir that is a file or that cannot be written, with what to do."""
  if workdir.exists() and not workdir.is_dir():
    raise errors.UserError(f'--workdir {workdir} is a file, not a directory; choose another path')
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise errors.UserError(f'--workdir {workdir} cannot be created ({e.strerror}); '
                           'choose a writable path') from None
  if not os.access(workdir, os.W_OK):
    raise errors.UserError(f'--workdir {workdir} is not writable; choose a writable path')


class Manager:
  """Saves and restores the train state; knows the run's config."""

  def __init__(self, workdir, config: ml_collections.ConfigDict):
    self.workdir = epath.Path(workdir)
    check_workdir(self.workdir)
    options = ocp.CheckpointManagerOptions(max_to_keep=config.max_checkpoints_to_keep,
                                           create=True)
    self._manager = ocp.CheckpointManager(self.workdir / 'checkpoints', options=options)
    self._check_config(config)

  def _check_config(self, config):
    """Stores the config, or refuses one whose model fields differ from the stored one."""
    path = self.workdir / CONFIG_FILE
    if path.exists() and self.latest_step is not None:
      stored = json.loads(path.read_text())
      differ = [f'{k}: checkpoint {stored.get(k)!r}, config {_comparable(config[k])!r}'
                for k in MODEL_FIELDS if _comparable(stored.get(k)) != _comparable(config[k])]
      if differ:
        raise errors.UserError(
            f'the checkpoints in {self.workdir} do not fit this config ({"; ".join(differ)}); '
            'use another --workdir or the same model fields')
    if jax.process_index() == 0:
      path.write_text(config.to_json_best_effort(indent=2, sort_keys=True) + '\n')

  @property
  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def restore_or(self, state):
    """The latest checkpoint restored into `state`'s structure and shardings, or `state`."""
    step = self.latest_step
    if step is None:
      return state
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _saved(state))
    restored = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
    return state.replace(**restored)

  def save(self, step: int, state) -> None:
    if self._manager.latest_step() != step:
      self._manager.save(step, args=ocp.args.StandardSave(_saved(state)))

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


def _saved(state) -> dict:
  """What a checkpoint holds: everything of the state that changes while training."""
  return {'step': state.step, 'params': state.params, 'opt_state': state.opt_state}
