"""config.py: `validate` refuses each bad value in one line naming the field, accepts every recipe
and makes the paths absolute; `load` reads stored config.json files of every shape."""

import importlib
import json
import os

import ml_collections
import pytest

from tests.conftest import ROOT
from unet_flax import config as config_lib
from unet_flax import errors

ONE = 'must be a whole number >= 1'

# (fields changed from the defaults, the whole message). The defaults' widths are (64, 128, 256).
BAD_VALUES = {
    'image_size 30': ({'image_size': 30}, 'config.image_size=30 is not divisible by 8 (the '
                      'encoder halves it 3 times); use 24 or 32'),
    'image_size 4': ({'image_size': 4}, 'config.image_size=4 is not divisible by 8 (the encoder '
                     'halves it 3 times); use 8'),
    'image_size 0': ({'image_size': 0}, f'config.image_size=0 {ONE}'),
    'log_every_steps 0': ({'log_every_steps': 0}, f'config.log_every_steps=0 {ONE}'),
    'checkpoint_every_steps 0': ({'checkpoint_every_steps': 0},
                                 f'config.checkpoint_every_steps=0 {ONE}'),
    'eval_every_epochs 0': ({'eval_every_epochs': 0}, f'config.eval_every_epochs=0 {ONE}'),
    'max_checkpoints_to_keep 0': ({'max_checkpoints_to_keep': 0},
                                  f'config.max_checkpoints_to_keep=0 {ONE}'),
    'batch_size 0': ({'batch_size': 0}, f'config.batch_size=0 {ONE}'),
    'batch_size -4': ({'batch_size': -4}, f'config.batch_size=-4 {ONE}'),
    'batch_size True': ({'batch_size': True}, f'config.batch_size=True {ONE}'),
    'dtype int8': ({'dtype': 'int8'}, "config.dtype='int8' must be one of float32, bfloat16"),
    'dtype float16': ({'dtype': 'float16'},
                      "config.dtype='float16' must be one of float32, bfloat16"),
    'seed -1': ({'seed': -1}, 'config.seed=-1 must be a whole number >= 0'),
    'dropout_rate 1.5': ({'dropout_rate': 1.5}, 'config.dropout_rate=1.5 must be a number in '
                         '[0, 1)'),
    'normalization batch': ({'normalization': 'batch'},
                            "config.normalization='batch' must be one of none, group"),
    'ema_decay 1': ({'ema_decay': 1.0}, 'config.ema_decay=1.0 must be a number in [0, 1)'),
    'adam_b1 1.5': ({'adam_b1': 1.5}, 'config.adam_b1=1.5 must be a number in [0, 1)'),
    'num_epochs 0': ({'num_epochs': 0}, f'config.num_epochs=0 {ONE}'),
    'num_classes 0': ({'num_classes': 0}, 'config.num_classes=0 must be a whole number in 2..256 '
                      '(labels are stored as uint8: classes 0..255)'),
    'class_weights of 2 for 3 classes': (
        {'class_weights': (1.0, 2.0)},
        'config.class_weights=(1.0, 2.0) needs one weight per class (config.num_classes=3)'),
    'class_weights all 0': ({'class_weights': (0.0, 0.0, 0.0)}, 'config.class_weights=(0.0, 0.0, '
                            '0.0) must be None or a tuple of numbers >= 0, not all 0, one per '
                            'class'),
    'warmup as long as the run': (
        {'schedule': 'warmup_cosine', 'num_epochs': 5, 'warmup_epochs': 5.0},
        'config.warmup_epochs=5.0 must be below config.num_epochs=5'),
    'frozen encoder as long as the run': (
        {'encoder': 'efficientnet_lite0', 'num_epochs': 2, 'encoder_frozen_epochs': 2.0},
        'config.encoder_frozen_epochs=2.0 must be below config.num_epochs=2'),
    # Both phases too long for the run: one message, not one per rerun.
    'warmup and frozen encoder as long as the run': (
        {'encoder': 'efficientnet_lite0', 'schedule': 'warmup_cosine', 'num_epochs': 1,
         'encoder_frozen_epochs': 1.0, 'warmup_epochs': 1.0},
        'config.num_epochs=1 must be above config.encoder_frozen_epochs=1.0 and '
        'config.warmup_epochs=1.0'),
    'schedule linear': ({'schedule': 'linear'},
                        "config.schedule='linear' must be one of constant, warmup_cosine"),
    'widths empty': ({'widths': ()}, 'config.widths=() must be a tuple of at most 12 whole '
                     'numbers in 1..8192, '
                     'e.g. (64, 128, 256)'),
    'augment_min_scale 0': ({'augment_min_scale': 0.0},
                            'config.augment_min_scale=0.0 must be a number in (0, 1]'),
    'augment_min_scale 1.5': ({'augment_min_scale': 1.5},
                              'config.augment_min_scale=1.5 must be a number in (0, 1]'),
    'augment_brightness -0.1': ({'augment_brightness': -0.1},
                                'config.augment_brightness=-0.1 must be a number in [0, 1)'),
    'augment_contrast 1': ({'augment_contrast': 1.0},
                           'config.augment_contrast=1.0 must be a number in [0, 1)'),
    'microbatches with dice': (
        {'num_microbatches': 2, 'dice_weight': 0.5},
        "config.num_microbatches=2 cannot be used with config.dice_weight=0.5 (a batch's Dice is "
        'not a sum over microbatches); set num_microbatches to 0 or 1'),
    'folder without a path': ({'dataset': 'folder:'}, "config.dataset='folder:' names no folder; "
                              'use folder:/path/to/data'),
    # Sizes are bounded before anything is allocated (not a MemoryError traceback).
    'num_classes 300 (labels are uint8)': (
        {'num_classes': 300}, 'config.num_classes=300 must be a whole number in 2..256 (labels '
        'are stored as uint8: classes 0..255)'),
    'image_size 65536': ({'image_size': 65536}, (
        'config.image_size=65536 must be at most 8192 (one 65536x65536 image and its mask take '
        '16.0 GiB as uint8, the first layer\'s activations of one image 1024.0 GiB)')),
    'crop_size 16384': ({'input_mode': 'crop', 'ignore_label': 255, 'crop_size': 16384}, (
        'config.crop_size=16384 must be at most 8192 (one 16384x16384 image and its mask take '
        '1.0 GiB as uint8, the first layer\'s activations of one image 64.0 GiB)')),
    'batch_size 10**9': ({'batch_size': 10 ** 9}, (
        'config.batch_size=1000000000 must be at most 65536 (a batch of 128x128 images and '
        'masks takes 61035.2 GiB as uint8 before the network runs)')),
    'batch_size x image_size': ({'batch_size': 65536, 'image_size': 1024}, (
        'config.batch_size=65536 is too large for config.image_size=1024: a batch of images and '
        'masks takes 256.0 GiB as uint8 (at most 64 GiB); lower either')),
    'widths too wide': ({'widths': (64, 100000)}, 'config.widths=(64, 100000) must be a tuple '
                        'of at most 12 whole numbers in 1..8192, e.g. (64, 128, 256)'),
    'mask_pattern of 300 characters': (
        {'dataset': 'folder:/data', 'mask_pattern': '{stem}' + 'x' * 294},
        "config.mask_pattern='{stem}" + 'x' * 73 + "... (300 characters) must be a file name holding '{stem}', at most 200 "
        "characters, e.g. '{stem}_mask'"),
    'class_names with a newline': (
        {'class_names': ('a', 'b\n', 'c')}, "config.class_names=('a', 'b\\n', 'c') must be "
        'None or a tuple of names, one per class, each at most 100 printable characters'),
}


def _one_line_error(config, check=config_lib.validate) -> str:
  """The UserError that check(config) raises, which must be one line."""
  with pytest.raises(errors.UserError) as raised:
    check(config)
  message = str(raised.value)
  assert '\n' not in message
  return message


@pytest.mark.parametrize('name', BAD_VALUES)
def test_validate_refuses_a_bad_value_naming_the_field(name):
  changes, message = BAD_VALUES[name]
  config = config_lib.defaults()
  config.update(changes)
  assert _one_line_error(config) == message


def test_validate_refuses_a_negative_learning_rate_naming_the_field():
  # Only the start: the upper end of the range is open.
  config = config_lib.defaults()
  config.learning_rate = -0.1
  assert _one_line_error(config).startswith('config.learning_rate=-0.1 must be a number > 0')


def test_validate_refuses_an_unknown_field_and_a_missing_one():
  config = config_lib.defaults()
  config.batchsize = 8
  assert _one_line_error(config) == ('config.batchsize is not a config field; see '
                                     'unet_flax/config.py for the fields')
  values = config_lib.defaults().to_dict()
  del values['seed']
  assert _one_line_error(ml_collections.ConfigDict(values)) == (
      'config.seed is missing; add it (see unet_flax/config.py)')


@pytest.mark.parametrize('recipe', sorted(p.stem for p in (ROOT / 'configs').glob('*.py')))
def test_every_recipe_in_configs_is_valid(recipe):
  config = importlib.import_module(f'configs.{recipe}').get_config()
  assert set(config.to_dict()) == set(config_lib.defaults().to_dict())
  checked = config_lib.validate(config)
  path = config_lib.folder_path(config.dataset)
  if path is not None:  # A folder's path is made absolute; nothing else changes.
    assert checked.dataset == f'folder:{os.path.realpath(path)}'
    config.dataset = checked.dataset
  assert checked.to_dict() == config.to_dict()
  assert checked is not config


def test_validate_makes_data_dir_and_a_folder_absolute(tmp_path, monkeypatch):
  home, here = tmp_path / 'home', tmp_path / 'here'
  home.mkdir()
  here.mkdir()
  monkeypatch.setenv('HOME', str(home))
  monkeypatch.chdir(here)
  here, home = here.resolve(), home.resolve()

  def checked(**changes):
    config = config_lib.defaults()
    config.update(changes)
    return config_lib.validate(config)

  assert checked(data_dir='tfds').data_dir == str(here / 'tfds')
  assert checked(data_dir='../tfds/./x').data_dir == str(tmp_path.resolve() / 'tfds' / 'x')
  assert checked(data_dir='~/tfds').data_dir == str(home / 'tfds')
  assert checked(data_dir='gs://bucket/tfds').data_dir == 'gs://bucket/tfds'
  assert checked(data_dir=None).data_dir is None
  assert checked(dataset='folder:pets').dataset == f'folder:{here / "pets"}'
  assert checked(dataset='folder:~/pets').dataset == f'folder:{home / "pets"}'
  assert checked(dataset='synthetic_pets/tiny').dataset == 'synthetic_pets/tiny'
  config = config_lib.defaults()
  config.data_dir = 'tfds'
  config_lib.validate(config)
  assert config.data_dir == 'tfds'  # A copy is changed, not the caller's config.


# config.load: a run's stored config.json.

@pytest.fixture
def stored(tmp_path, tiny_config):
  """(path, the stored fields): a config.json as checkpoints.Manager writes it."""
  path = tmp_path / 'config.json'
  path.write_text(config_lib.validate(tiny_config).to_json_best_effort(indent=2, sort_keys=True))
  return path, json.loads(path.read_text())


def _load_error(path) -> str:
  return _one_line_error(path, config_lib.load)


def test_load_reads_what_was_stored_with_tuples_and_floats(stored, tiny_config):
  path, fields = stored
  fields['learning_rate'] = 1  # JSON wrote 1.0 as 1: the field holds floats.
  path.write_text(json.dumps(fields))
  loaded = config_lib.load(path)
  want = config_lib.validate(tiny_config).to_dict()
  want['learning_rate'] = 1.0
  assert loaded.to_dict() == want
  assert loaded.widths == (4, 8) and isinstance(loaded.learning_rate, float)


def test_load_gives_a_deleted_non_model_field_todays_default(stored):
  path, fields = stored
  assert fields['log_every_steps'] == 1
  del fields['log_every_steps']
  path.write_text(json.dumps(fields))
  loaded = config_lib.load(path)
  assert loaded.log_every_steps == config_lib.defaults().log_every_steps == 10
  assert loaded.widths == (4, 8) and loaded.image_size == 16  # The rest as stored.


@pytest.mark.parametrize('field', [f for f in config_lib.MODEL_FIELDS
                                   if f not in config_lib.LATER_MODEL_FIELDS])
def test_load_refuses_a_deleted_model_field(stored, field):
  path, fields = stored
  del fields[field]
  path.write_text(json.dumps(fields))
  assert _load_error(path) == (f'config.{field} is missing in {path}, and the checkpoints need '
                               'it; restore the file from a copy, or use another --workdir')


def test_load_gives_a_run_older_than_normalization_the_chapters_model(stored):
  path, fields = stored
  fields['normalization'] = 'group'
  path.write_text(json.dumps(fields))
  assert config_lib.load(path).normalization == 'group'
  del fields['normalization']  # Stored before the field existed: its model had none.
  path.write_text(json.dumps(fields))
  assert config_lib.load(path).normalization == 'none'


@pytest.mark.parametrize('text, message', [
    ('[4, 8]', '{path} holds a list, not a config; restore it from a copy, or use another '
               '--workdir'),
    ('"widths"', '{path} holds a str, not a config; restore it from a copy, or use another '
                 '--workdir'),
    ('{}', 'config.widths is missing in {path}, and the checkpoints need it; restore the file '
           'from a copy, or use another --workdir'),
])
def test_load_refuses_a_file_that_is_no_config(tmp_path, text, message):
  path = tmp_path / 'config.json'
  path.write_text(text)
  assert _load_error(path) == message.format(path=path)


@pytest.mark.parametrize('value, shown', [(None, 'None'), ('(4, 8)', "'(4, 8)'"),
                                          ([4, 'x'], "(4, 'x')")])
def test_load_refuses_widths_of_the_wrong_type(stored, value, shown):
  path, fields = stored
  fields['widths'] = value
  path.write_text(json.dumps(fields))
  assert _load_error(path) == (f'config.widths={shown} in {path} must be a tuple of at most 12 '
                               'whole numbers in 1..8192, e.g. (64, 128, 256)')


def test_load_refuses_a_damaged_missing_or_unknown_file(stored):
  path, fields = stored
  path.write_text(json.dumps(fields)[:-10])  # Cut short.
  message = _load_error(path)
  assert message.startswith(f'{path} cannot be read (')
  assert message.endswith('); restore it from a copy, or use another --workdir')
  path.write_bytes(b'\xff\xfe\x00')
  assert _load_error(path).startswith(f'{path} cannot be read (')
  path.unlink()
  assert _load_error(path) == (f'{path} not found: is {path.parent} the --workdir of a training '
                               'run?')
  path.write_text(json.dumps({**fields, 'batchsize': 8}))
  assert _load_error(path) == f'config.batchsize in {path} is not a config field; remove it'
  path.write_text(json.dumps({**fields, 'image_size': 16.0}))  # JSON can hold what Python can't.
  assert _load_error(path) == f'config.image_size=16.0 in {path} must be a whole number >= 1'
  path.write_text(json.dumps({**fields, 'image_size': 30}))  # Valid alone, not with the widths.
  assert _load_error(path).startswith(f'config.image_size=30 in {path} is not divisible by 4')


def test_class_names_default_to_the_data_sets_own():
  config = config_lib.defaults()
  assert config_lib.class_names(config) == ('pet', 'background', 'border')
  config.num_classes = 4
  assert config_lib.class_names(config) == ('class 0', 'class 1', 'class 2', 'class 3')
  config.class_names = ('sky', 'road', 'car', 'sign')
  assert config_lib.class_names(config) == ('sky', 'road', 'car', 'sign')
  config.class_names = ('sky',)
  with pytest.raises(errors.UserError, match=r"config.class_names=\('sky',\) needs one name per "
                                             r'class \(config.num_classes=4\)'):
    config_lib.validate(config)


def test_validate_warns_of_a_tile_overlap_near_1(capsys):
  config = config_lib.defaults()
  config.update({'input_mode': 'crop', 'ignore_label': 255, 'tile_overlap': 0.95})
  config_lib.validate(config)
  assert capsys.readouterr().err == (
      'warning: config.tile_overlap=0.95 moves each 256x256 window by 12 pixels: 3,969 windows '
      'for a 1000x1000 photo; 0.25 to 0.5 is usual\n')
  config.tile_overlap = 0.5
  config_lib.validate(config)
  assert not capsys.readouterr().err


def test_a_pretrained_encoders_fields_and_sizes_are_checked():
  config = config_lib.defaults()
  config.encoder_weights = 'imagenet'
  with pytest.raises(errors.UserError, match=r"^config.encoder_weights='imagenet' is for a "
                     r"pretrained config.encoder"):
    config_lib.validate(config)
  config = config_lib.defaults()
  config.encoder = 'efficientnet_lite0'
  config.image_size = 48
  with pytest.raises(errors.UserError, match=r'^config.image_size=48 is not divisible by 32 \(the '
                     r'encoder halves it 5 times\); use 32 or 64'):
    config_lib.validate(config)
  config.image_size = 64
  config.encoder = 'resnet'
  with pytest.raises(errors.UserError, match=r"^config.encoder='resnet' must be one of unet, "
                     r'efficientnet_lite0'):
    config_lib.validate(config)
  config.encoder, config.encoder_weights = 'efficientnet_lite0', 'weights/lite0.pth'
  assert config_lib.validate(config).encoder_weights.endswith('/weights/lite0.pth')
  assert config_lib.validate(config).encoder_weights.startswith('/')


def test_load_reads_runs_older_than_the_encoder_and_the_process_backend(stored):
  """Runs stored before config.encoder are the chapter's U-Net; conv_backend, once a field, is
  now each tool's --conv_backend flag: a stored one is dropped, a given one refused."""
  path, fields = stored
  del fields['encoder']
  fields['conv_backend'] = 'onednn'
  path.write_text(json.dumps(fields))
  loaded = config_lib.load(path)
  assert loaded.encoder == 'unet' and 'conv_backend' not in loaded
  config = config_lib.defaults()
  config.conv_backend = 'xla'
  assert _one_line_error(config) == ('config.conv_backend is no longer a config field: the '
                                     'convolutions are a setting of the process; pass '
                                     '--conv_backend=VALUE to the tool instead')
