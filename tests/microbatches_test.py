"""microbatches.py: how many microbatches a step takes, how a batch is split, and that the summed
loss and gradient are the whole batch's."""

import functools

import jax
import numpy as np
import pytest

from tests.conftest import fixed_state
from tests.conftest import labelled_batch
from unet_flax import config as config_lib
from unet_flax import errors
from unet_flax import microbatches
from unet_flax import models
from unet_flax import steps
from unet_flax.devices import Devices


@pytest.mark.parametrize('per_device, want', [
    (8, 1), (16, 1),  # At most 16 examples: whole.
    (17, 1),  # 17 is prime: 17 of 1 would be below 8 each, so whole.
    (24, 2), (32, 2), (40, 4), (48, 3), (64, 4),  # The fewest parts of <= 16 examples.
    (34, 1),  # 2 x 17 is too many, 17 x 2 too few: whole.
    (100, 10),  # 4 x 25 and 5 x 20 are too many: 10 x 10.
])
def test_auto_count_on_cpus_makes_parts_of_8_to_16_examples(tiny_config, per_device, want):
  assert microbatches.count(tiny_config, per_device, 'cpu') == want


def test_count_elsewhere_with_dice_or_as_configured(tiny_config):
  assert microbatches.count(tiny_config, 64, 'gpu') == 1  # Accelerators get whole batches.
  assert microbatches.count(tiny_config, 64, 'tpu') == 1
  tiny_config.dice_weight = 0.5
  assert microbatches.count(tiny_config, 64, 'cpu') == 1  # A batch's Dice is no sum of parts.
  tiny_config.dice_weight = 0.0
  tiny_config.num_microbatches = 8
  assert microbatches.count(tiny_config, 64, 'cpu') == 8
  assert microbatches.count(tiny_config, 64, 'gpu') == 8
  tiny_config.num_microbatches = 3
  tiny_config.batch_size = 64
  with pytest.raises(errors.UserError) as raised:
    microbatches.count(tiny_config, 64, 'cpu')
  assert str(raised.value) == ('config.num_microbatches=3 must divide the 64 examples each device '
                               'gets of config.batch_size=64; use a divisor, or 0 for auto')


def test_the_train_steps_count_is_that_of_its_devices(tiny_config):
  tiny_config.batch_size = 64
  assert steps.num_microbatches(tiny_config, Devices(64)) == 4  # 1 CPU device: 64 rows.


def test_split_takes_a_slice_of_every_devices_rows(monkeypatch):
  x = np.arange(16 * 2).reshape(16, 2)
  one = microbatches.split(x, 4)
  np.testing.assert_array_equal(np.concatenate(one), x)  # One device: consecutive quarters.
  assert [part[:, 0].tolist() for part in one] == [[0, 2, 4, 6], [8, 10, 12, 14],
                                                   [16, 18, 20, 22], [24, 26, 28, 30]]
  # 4 devices hold rows 0-3, 4-7, 8-11, 12-15; each microbatch takes 2 rows of each.
  monkeypatch.setattr(jax, 'device_count', lambda: 4)
  parts = microbatches.split(x, 2)
  assert [part[:, 0].tolist() for part in parts] == [
      [0, 2, 8, 10, 16, 18, 24, 26], [4, 6, 12, 14, 20, 22, 28, 30]]
  assert parts[0].shape == (8, 2)


@pytest.mark.parametrize('class_weights', [None, (1.0, 0.5, 3.0)])
def test_microbatched_step_has_the_whole_batchs_loss_and_gradient(tiny_config, class_weights):
  tiny_config.dropout_rate = 0.0  # Microbatches draw their own dropout masks.
  batch = labelled_batch(tiny_config, 8)
  batch['label'][:4] = 2  # Parts of unequal class weight: shares, not a plain mean of the parts.
  step = jax.jit(functools.partial(steps.train_step, models.forward(tiny_config)),
                 static_argnames=('class_weights', 'num_microbatches'))
  results = [step(fixed_state(tiny_config), batch, jax.random.key(1), class_weights=class_weights,
                  num_microbatches=count) for count in (1, 4)]
  (whole, whole_metrics), (parts, parts_metrics) = results
  np.testing.assert_allclose(parts_metrics['loss'], whole_metrics['loss'], rtol=1e-6)
  # After one step Adam's first moment is (1 - b1) x the gradient.
  grads = [jax.tree.leaves(s.opt_state.inner_state[0].mu) for s in (whole, parts)]
  for got, want in zip(grads[1], grads[0]):
    # Float32 sums in another order: errors scale with the leaf's largest entries, not each
    # entry's own (an entry 1e-3 of the largest once differed by 7e-4 of itself, jax 0.12.1).
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())


def test_microbatches_and_a_dice_term_are_refused(tiny_config):
  tiny_config.update({'num_microbatches': 2, 'dice_weight': 0.5})
  with pytest.raises(errors.UserError, match=r'^config.num_microbatches=2 cannot be used with '
                     r'config.dice_weight=0.5'):
    config_lib.validate(tiny_config)
  with pytest.raises(ValueError, match='dice_weight == 0'):
    jax.eval_shape(functools.partial(steps.train_step, models.forward(tiny_config),
                                     dice_weight=0.5, num_microbatches=2),
                   fixed_state(tiny_config), labelled_batch(tiny_config, 4), jax.random.key(1))
