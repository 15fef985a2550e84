"""The pipeline: loading splits into memory, shuffling, resuming, sharding, padding."""


import numpy as np
import pytest

from unet_flax import augment
from unet_flax import errors
from unet_flax import input_pipeline
from unet_flax import sources


def _example(i, size):
  """Example i, filled with i (a little noise on top, so augmentation shows): rows identify
  examples."""
  noise = np.random.default_rng(i).integers(0, 8, (size, size, 3), np.uint8)
  image = np.full((size, size, 3), i, np.uint8) | (noise << 5) if size > 2 else np.full(
      (size, size, 3), i, np.uint8)
  return image, np.full((size, size), i % 3, np.uint8)


def _split(n, size=2, cached=None, rows=None, num_examples=None):
  """A Split of examples `rows` (range(n)) whose first `cached` rows are in memory (all by
  default); the others are made by its `read` each time they are asked for."""
  rows = range(n) if rows is None else rows
  cached = len(rows) if cached is None else cached
  return input_pipeline.Split(
      num_examples or len(rows), rows,
      [_example(i, size) if r < cached else None for r, i in enumerate(rows)],
      lambda i: _example(i, size), (size, size))


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
  seen, batch_counts = [], set()
  for p in range(process_count):
    # The first shard's rows in memory, the second's decoded on the fly.
    shard = _split(0, rows=range(p, num_examples, process_count), num_examples=num_examples,
                   cached=None if p == 0 else 0)
    batches = list(input_pipeline.eval_batches(shard, 4, process_count, num_threads=2))
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
  images, labels = whole.stack()
  np.testing.assert_array_equal(shards[1].stack()[0], images[1::2])
  np.testing.assert_array_equal(shards[0].stack()[1], labels[0::2])
  assert set(np.unique(labels)) <= {0, 1, 2}
  assert source.num_examples('test') == 12


@pytest.mark.parametrize('cached', [0, 5, 40])
def test_batches_are_the_same_from_memory_and_decoded_on_the_fly(cached):
  """Augmented train batches, resumed mid-epoch or not, and eval batches: the same arrays
  whether none, some or all of the examples are in memory."""
  options = augment.Options(flip=True, min_scale=0.5, brightness=0.1, contrast=0.1)
  whole, split = _split(40, size=8), _split(40, size=8, cached=cached)
  assert split.num_cached == cached and split.all_cached == (cached == 40)
  for first in (0, 3):
    want = input_pipeline.train_batches(whole, 8, seed=1, epoch=2, process_index=1,
                                        first_step=first, augmentation=options)
    got = input_pipeline.train_batches(split, 8, seed=1, epoch=2, process_index=1,
                                       first_step=first, augmentation=options, num_threads=2)
    for a, b in zip(want, got, strict=True):
      np.testing.assert_array_equal(a['image'], b['image'])
      np.testing.assert_array_equal(a['label'], b['label'])
  for a, b in zip(input_pipeline.eval_batches(whole, 16), input_pipeline.eval_batches(split, 16),
                  strict=True):
    for key in ('image', 'label', 'mask'):
      np.testing.assert_array_equal(a[key], b[key])


def test_load_split_keeps_what_the_budget_holds_and_decodes_the_rest_alike(tiny_config):
  source = sources.source_of(tiny_config)
  example_bytes = 16 * 16 * 4  # uint8 RGB image and its labels.
  whole = input_pipeline.load_split(source, 'train', image_size=16)
  assert whole.all_cached and whole.cached_bytes == whole.held_bytes == 24 * example_bytes
  # Larger than its budget: nothing decoded before training; the first 5 examples decoded (by
  # the worker threads that make the batches) are kept, no more.
  part = input_pipeline.load_split(source, 'train', image_size=16,
                                   cache_bytes=5 * example_bytes + example_bytes - 1)
  assert part.num_cached == 0 and (part.held_rows, part.held_bytes) == (5, 5 * example_bytes)
  batches = list(input_pipeline.train_batches(part, 4, seed=0, epoch=0, process_index=0,
                                              num_threads=3))
  assert part.num_cached == 5 and part.cached_bytes == 5 * example_bytes
  for a, b in zip(batches, input_pipeline.train_batches(whole, 4, seed=0, epoch=0,
                                                         process_index=0), strict=True):
    np.testing.assert_array_equal(a['image'], b['image'])
  for a, b in zip(whole.stack(), part.stack()):  # Kept rows and rows decoded again: the same.
    np.testing.assert_array_equal(a, b)


def test_a_budget_beyond_free_memory_is_refused_with_the_estimate(monkeypatch):
  monkeypatch.setattr(input_pipeline, 'memory_available', lambda: 3 * 2 ** 30)
  input_pipeline.check_budget(2 * 2 ** 30, 10 * 2 ** 30, 'x')  # Fits: nothing said.
  input_pipeline.check_budget(100 * 2 ** 30, 2 * 2 ** 30, 'x')  # The data alone fits.
  with pytest.raises(errors.UserError) as raised:
    input_pipeline.check_budget(8 * 2 ** 30, 50_000 * 256 * 256 * 4, '50,000 examples at 256x256')
  assert str(raised.value) == (
      '50,000 examples at 256x256 take 12.2 GiB decoded, and config.cache_bytes=8589934592 would '
      'hold 8.0 GiB of them: more than the 3.0 GiB of memory this machine has free; set '
      'config.cache_bytes=1610612736 or less (the examples past it are decoded on the fly)')
  monkeypatch.setattr(input_pipeline, 'memory_available', lambda: None)
  input_pipeline.check_budget(8 * 2 ** 30, 10 * 2 ** 30, 'x')  # Unknown memory: not refused.


def test_a_worker_error_reaches_the_consumer_and_stops_the_pool():
  made = []

  def make(step):
    made.append(step)
    if step == 2:
      raise errors.UserError('masks/x.png: value 7 is not a class')
    return step

  batches = input_pipeline.made_ahead(make, range(100), in_workers=True, num_threads=2)
  assert [next(batches), next(batches)] == [0, 1]
  with pytest.raises(errors.UserError, match='^masks/x.png: value 7'):
    next(batches)
  assert len(made) < 20  # A few ahead, not the whole epoch.
