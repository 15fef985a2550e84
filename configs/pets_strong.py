"""A stronger recipe for Oxford-IIIT Pet at 128x128, meant for one GPU (about 5,750 steps).

From the chapter's recipe (default.py) it changes: host augmentation (flip, scale-and-crop,
brightness, contrast), a longer run with linear warmup then cosine decay, a smaller batch, a
heavier cross-entropy weight on the rare border class plus a soft Dice term, and bfloat16
compute. It has not been run to completion here, so it promises no figures: compare its
mean_iou with default.py's on your own hardware.

  python train.py --config configs/pets_strong.py --workdir runs/pets_strong
"""

from configs import default


def get_config():
  config = default.get_config()
  config.augment_flip = True
  config.augment_min_scale = 0.6
  config.augment_brightness = 0.1
  config.augment_contrast = 0.2
  config.batch_size = 32
  config.num_epochs = 50  # 3680 // 32 = 115 steps an epoch.
  config.schedule = 'warmup_cosine'
  config.warmup_epochs = 2.0
  config.class_weights = (1.0, 1.0, 2.0)  # Pet, background, border: the border is rare.
  config.dice_weight = 0.5
  config.dtype = 'bfloat16'
  config.checkpoint_every_steps = 1000
  config.eval_every_epochs = 5
  return config
