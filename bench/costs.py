"""What each recipe in configs/ costs to train here: steps, train-step img/s, wall time, memory.

  python bench/costs.py [--configs default,quickstart] [--steps 3] [--conv_backend auto]

Each config runs in a process of its own (so its peak memory is its own): the trainer's train
step (steps.compile_steps, the process's convolutions) is compiled at the config's batch and
input size (image_size; crop_size in crop mode) and timed over --steps steps of random data,
after one warm-up step. Printed per config: total steps (steps_per_epoch x num_epochs, where
steps_per_epoch 0 is the train split's size // batch_size: the split's size is that of
TRAIN_EXAMPLES below, through tfds's split slicing), compile seconds, img/s, the training time
that implies (evaluations and data preparation not included), the process's peak RSS, and the
decoded data the run keeps in memory besides (resize mode: every train and eval example at
image_size, 4 bytes a pixel; crop mode: at most config.cache_bytes).
"""

import argparse
import importlib
import json
import pathlib
import resource
import subprocess
import sys
import types

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Examples in each data set's splits, from the data sets' own documentation (tfds catalog;
# synthetic.py). A folder data set's size is the user's: configs/tiles.py sets steps_per_epoch.
TRAIN_EXAMPLES = {
    'oxford_iiit_pet': {'train': 3680, 'test': 3669},
    'synthetic_pets/small': {'train': 1024, 'test': 256},
}
CONFIGS = ('default', 'quickstart', 'pets_strong', 'pets_pretrained', 'tiles_quickstart',
           'tiles')


def _config(name: str):
  return importlib.import_module(f'configs.{name}').get_config()


def _split_examples(config, split: str) -> int | None:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  sizes = TRAIN_EXAMPLES.get(config.dataset)
  if sizes is None:
    return None
  # to_absolute reads each split's num_examples, as tfds's SplitInfo has it.
  infos = {name: types.SimpleNamespace(num_examples=n) for name, n in sizes.items()}
  instructions = tfds.core.ReadInstruction.from_spec(split).to_absolute(infos)
  # None bounds are the split's ends.
  return sum((sizes[i.splitname] if i.to is None else i.to) - (i.from_ or 0)
             for i in instructions)


def measure(name: str, num_steps: int, backend: str) -> dict:
  """Compiles and times `name`'s train step in this process; -> figures (see the module doc)."""
  from unet_flax import runtime  # pylint: disable=g-import-not-at-top
  runtime.configure_xla_cpu()
  import speed  # pylint: disable=g-import-not-at-top  (bench/speed.py, beside this file)
  from unet_flax import layers  # pylint: disable=g-import-not-at-top
  from unet_flax import models  # pylint: disable=g-import-not-at-top
  layers.select_backend(backend)
  config = _config(name)
  config.encoder_weights = None  # Random weights: the same speed, no package needed.
  side = config.crop_size if config.input_mode == 'crop' else config.image_size
  train_examples = _split_examples(config, config.train_split)
  per_epoch = config.steps_per_epoch or train_examples // config.batch_size
  batch_config = config.copy_and_resolve_references()
  batch_config.image_size = side  # speed.train_step's batch: a crop mode's crops.
  timed = speed.train_step(batch_config, config.batch_size, models.forward(config), per_epoch)
  seconds = timed.run(num_steps)
  if config.input_mode == 'crop':
    data_bytes = config.cache_bytes
  else:
    examples = train_examples + (_split_examples(config, config.eval_split) or 0)
    data_bytes = examples * side * side * 4
  return {
      'config': name, 'batch_size': config.batch_size, 'side': side,
      'mode': config.input_mode, 'dtype': config.dtype, 'backend': layers.backend(config.dtype),
      'steps': per_epoch * config.num_epochs, 'compile_seconds': timed.compile_seconds,
      'images_per_second': config.batch_size / seconds,
      'train_hours': per_epoch * config.num_epochs * seconds / 3600,
      'peak_rss_gib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
      'data_gib': data_bytes / 2 ** 30,
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--configs', default=','.join(CONFIGS))
  parser.add_argument('--steps', type=int, default=3, help='timed steps per config')
  parser.add_argument('--conv_backend', default='auto', choices=('auto', 'xla', 'onednn'))
  parser.add_argument('--one', help=argparse.SUPPRESS)  # The child process's config.
  args = parser.parse_args()
  if args.one:
    print(json.dumps(measure(args.one, args.steps, args.conv_backend)))
    return
  print('| config | mode, input | batch | steps | compile s | img/s | training time | '
        'peak RSS of the step | decoded data besides |')
  print('| --- | --- | --- | --- | --- | --- | --- | --- | --- |')
  for name in args.configs.split(','):
    child = subprocess.run(
        [sys.executable, __file__, '--one', name, '--steps', str(args.steps),
         '--conv_backend', args.conv_backend], capture_output=True, text=True, check=False)
    if child.returncode:
      print(f'| {name} | failed: {child.stderr.strip().splitlines()[-1:]} |', flush=True)
      continue
    r = json.loads(child.stdout.strip().splitlines()[-1])
    hours = r['train_hours']
    wall = f'{hours:.1f} h' if hours >= 1 else f'{hours * 60:.0f} min'
    print(f'| {name} | {r["mode"]}, {r["side"]}x{r["side"]} ({r["backend"]}, {r["dtype"]}) | '
          f'{r["batch_size"]} | {r["steps"]} | {r["compile_seconds"]:.0f} | '
          f'{r["images_per_second"]:.1f} | {wall} | {r["peak_rss_gib"]:.1f} GiB | '
          + ('at most ' if r['mode'] == 'crop' else '') + f'{r["data_gib"]:.2f} GiB |', flush=True)


if __name__ == '__main__':
  main()
