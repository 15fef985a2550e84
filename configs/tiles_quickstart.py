"""Crop mode in a few CPU minutes: the quickstart's small U-Net on synthetic_pets/small at the
photos' own resolution (96-320 px a side), 64x64 random crops to train, overlapping 64x64 tiles
to evaluate and predict.

  python train.py --config configs/tiles_quickstart.py --workdir runs/tiles_quick
  python predict.py --workdir runs/tiles_quick --out masks/ photos/

configs/tiles.py is the full-size recipe (256x256 crops, the chapter's widths) for a folder of big
pictures; docs/native-resolution.md says what each costs on a CPU.
"""

from configs import quickstart


def get_config():
  config = quickstart.get_config()
  config.input_mode = 'crop'
  config.crop_size = 64
  config.tile_overlap = 0.25
  config.ignore_label = 255  # Pads what a crop or window finds past an image's edge.
  config.augment_flip = True
  # Random crops: an 'epoch' is as many steps as you like; each draws new crops.
  config.steps_per_epoch = 64
  config.num_epochs = 14
  config.eval_every_epochs = 7
  return config
