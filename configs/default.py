"""The chapter's recipe, exactly: U-Net 64-128-256 (+512 bottleneck) on Oxford-IIIT Pet at 128x128.

Differences from the chapter are its bugs, fixed: masks are resized nearest-neighbour (bilinear
resizing invents labels between classes), every test example is evaluated exactly once (the chapter
evaluates 5 batches), and the data set is tfds's oxford_iiit_pet 4.x (3.x no longer exists).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  # Data.
  config.dataset = 'oxford_iiit_pet'  # A tfds name, or 'folder:/path/to/data'.
  config.data_dir = ml_collections.config_dict.placeholder(str)  # tfds data_dir; None: tfds's.
  config.train_split = 'train'
  config.eval_split = 'test'
  config.image_size = 128  # Images are resized to image_size x image_size.
  config.num_classes = 3  # Trimap classes: 0 pet, 1 background, 2 border.
  config.input_threads = 0  # Decode/resize threads for the first pass; 0: one per core.
  # Train-batch augmentation on the host (unet_flax/augment.py); all off: the chapter's recipe.
  config.augment_flip = False  # Flip image and mask left-right together, half of the examples.
  config.augment_min_scale = 1.0  # Crop a random square of side >= this x the image; 1: none.
  config.augment_brightness = 0.0  # Image only: add uniform(-b, b) x 255; 0: none.
  config.augment_contrast = 0.0  # Image only: scale about its mean by uniform(1-c, 1+c); 0: none.

  # Model.
  config.widths = (64, 128, 256)  # Encoder widths; the bottleneck is twice the last.
  config.dropout_rate = 0.5  # Dropout after the bottleneck.
  config.dtype = 'float32'  # Compute dtype: 'float32' or 'bfloat16' (params stay float32).

  # Optimisation: Keras's Adam defaults.
  config.batch_size = 64  # Global batch, split over all devices of all hosts.
  # Gradients accumulated over this many parts of each device's batch (the same loss and
  # gradient, but not with dice_weight); 0: auto, microbatches of 16 on CPUs, else 1.
  config.num_microbatches = 0
  config.learning_rate = 1e-3
  config.adam_b1 = 0.9
  config.adam_b2 = 0.999
  config.adam_eps = 1e-7  # Keras's epsilon, not optax's 1e-8.
  config.skip_nonfinite_updates = False  # NaN/Inf loss or gradients: True skips the step's update.
  config.num_epochs = 5
  # Steps per epoch: 0 means train_examples // batch_size (3680 // 64 = 57 for Pet).
  config.steps_per_epoch = 0
  config.schedule = 'constant'  # Learning rate: 'constant', or 'warmup_cosine' (to 0 at the end).
  config.warmup_epochs = 0.0  # With 'warmup_cosine': epochs of linear warmup from 0.
  # Cross-entropy weight of each class, e.g. (1.0, 1.0, 3.0) for a rare border; None: all 1.
  config.class_weights = ml_collections.config_dict.placeholder(tuple)
  config.dice_weight = 0.0  # Weight of a soft Dice loss added to the cross-entropy; 0: none.

  # Bookkeeping.
  config.seed = 0
  config.log_every_steps = 10  # Host syncs for metrics happen only here.
  config.eval_every_epochs = 1
  config.checkpoint_every_steps = 200  # Also saved at the end of every epoch.
  config.max_checkpoints_to_keep = 3
  config.num_prediction_images = 3  # Test images drawn in predictions.png after each eval.
  return config
