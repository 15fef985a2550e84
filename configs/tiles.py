"""Large grayscale images with binary masks at native resolution: random crops, overlapping tiles.

For a folder of big pictures (microscopy, satellite, scanned pages; grey or RGB, any size) and
0/255 masks: training draws one random 256x256 crop per example at the images' own resolution,
and evaluation and predict cover each whole image with overlapping 256x256 windows whose logits
are blended (tiles.py). Grey pictures are read as RGB (decode.to_rgb). No data is shipped:

  python train.py --config configs/tiles.py --workdir runs/tiles \
      --config.dataset=folder:/path/to/data
  python evaluate.py --workdir runs/tiles
  python predict.py --workdir runs/tiles --out masks/ big/*.tif

--config.scale=0.5 halves every image (and mask) first, for objects larger than a crop.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset = 'folder:data/tiles'  # Replace with --config.dataset=folder:/path/to/data.
  config.input_mode = 'crop'
  config.crop_size = 256
  config.tile_overlap = 0.25
  config.mask_mode = 'binary'  # 0/255 masks (JPEG-noisy edges too): 0 below 128, 1 from it.
  config.num_classes = 2
  config.class_names = ('background', 'foreground')
  # Pads crops and windows of images smaller than 256 px; counts in no loss and no metric.
  config.ignore_label = 255
  config.augment_flip = True
  config.batch_size = 16
  # Random crops: an 'epoch' is as many steps as you like; each draws new crops.
  config.steps_per_epoch = 100
  config.num_epochs = 20
  return config
