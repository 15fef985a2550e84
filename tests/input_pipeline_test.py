"""The pipeline: loading splits into memory, shuffling, resuming, sharding, padding."""


import numpy as np
import pytest

from unet_flax import augment
from unet_flax import input_pipeline
from unet_flax import sources


def _split(n, size=2):
  """A Split whose example i is filled with i: rows identify examples."""
  ids = np.arange(n, dtype=np.uint8)
  images = np.broadcast_to(ids[:, None, None, None], (n, size, size, 3)).copy()
  return input_pipeline.Split(images, images[..., 0].copy(), n)


def _ids(batch):
  return batch['image'][:, 0, 0, 0].tolist()


def test_epoch_order_is_a_function_of_seed_and_epoch_and_differs_between_epochs():
  split = _split(40)
  epoch = lambda seed, e: [_ids(b) for b in input_pipeline.train_batches(
      split, 8, seed=seed, epoch=e, process_index=0)]
  assert epoch(0, 0) == epoch(0, 0)
  assert epoch(0, 0) != epoch(0, 1)
  assert epoch(0, 0) != epoch(1, 0)
  for e in (0, 1):
    assert sorted(sum(epoch(0, e), [])) == list(range(40))  # Every example once an epoch.
  np.testing.assert_array_equal(input_pipeline.epoch_permutation(3, 2, 1, 40),
                                input_pipeline.epoch_permutation(3, 2, 1, 40))


def test_train_batches_from_first_step_are_the_rest_of_the_epoch():
  split = _split(40)
  batches = lambda first: [_ids(b) for b in input_pipeline.train_batches(
      split, 8, seed=0, epoch=3, process_index=0, first_step=first)]
  assert len(batches(0)) == 5
  assert batches(2) == batches(0)[2:]
  assert batches(5) == []


def test_train_batches_longer_than_the_shard_wrap_around_the_order():
  split = _split(10)
  batches = [_ids(b) for b in input_pipeline.train_batches(split, 4, seed=0, epoch=0,
                                                           process_index=0, num_steps=5)]
  assert [len(b) for b in batches] == [4] * 5
  assert sorted(sum(batches, [])) == sorted(list(range(10)) * 2)  # Positions 0..19 mod 10.


def test_augmented_batches_resume_exactly():
  split = _split(40, size=8)
  options = augment.Options(flip=True, min_scale=0.5, brightness=0.1, contrast=0.1)
  batches = lambda first: list(input_pipeline.train_batches(
      split, 8, seed=0, epoch=1, process_index=0, first_step=first, augmentation=options))
  for resumed, whole in zip(batches(3), batches(0)[3:]):
    np.testing.assert_array_equal(resumed['image'], whole['image'])
    np.testing.assert_array_equal(resumed['label'], whole['label'])
  plain = list(input_pipeline.train_batches(split, 8, seed=0, epoch=1, process_index=0))
  assert any(not np.array_equal(a['image'], p['image']) for a, p in zip(batches(0), plain))


@pytest.mark.parametrize('num_examples', [5, 12, 13])
@pytest.mark.parametrize('process_count', [1, 2])
def test_eval_batches_pad_and_mask_every_example_exactly_once(num_examples, process_count):
  whole = _split(num_examples)
  seen, batch_counts = [], set()
  for p in range(process_count):
    shard = input_pipeline.Split(whole.images[p::process_count], whole.labels[p::process_count],
                                 num_examples)
    batches = list(input_pipeline.eval_batches(shard, 4, process_count))
    batch_counts.add(len(batches))
    for batch in batches:
      assert batch['image'].shape == (4, 2, 2, 3) and batch['mask'].shape == (4,)
      assert not batch['image'][~batch['mask']].any()  # Padding is zeros.
      seen += batch['image'][batch['mask'], 0, 0, 0].tolist()
  assert len(batch_counts) == 1  # Every process runs the same number of steps.
  assert batch_counts == {input_pipeline.num_eval_batches(num_examples, 4, process_count)}
  assert sorted(seen) == list(range(num_examples))


def test_load_split_shards_are_disjoint_and_cover_the_split(tiny_config):
  source = sources.source_of(tiny_config)
  read = lambda p, n: input_pipeline.load_split(source, 'test', image_size=16, process_index=p,
                                                process_count=n)
  whole = read(0, 1)
  shards = [read(p, 2) for p in range(2)]
  assert whole.num_examples == shards[0].num_examples == 12
  assert [len(s) for s in shards] == [6, 6]
  np.testing.assert_array_equal(shards[1].images, whole.images[1::2])
  np.testing.assert_array_equal(shards[0].labels, whole.labels[0::2])
  assert set(np.unique(whole.labels)) <= {0, 1, 2}
  assert source.num_examples('test') == 12
