"""The U-Net's shapes, parameter count, the fast upsampling's exactness and flip TTA."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from tests.conftest import make_tiny_config
from tests.conftest import reference_flip_tta_logits
from unet_flax import config as config_lib
from unet_flax import models


def test_default_model_has_the_chapters_parameter_count():
  shapes = jax.eval_shape(lambda: models.UNet().init(
      jax.random.key(0), jnp.zeros((1, 128, 128, 3)), train=False))
  assert models.param_count(shapes['params']) == 8_557_635


def test_logits_shape_and_dtype():
  model = models.UNet(num_classes=5, widths=(4, 8), dtype=jnp.bfloat16)
  variables = model.init(jax.random.key(0), jnp.zeros((2, 16, 16, 3)), train=False)
  logits = model.apply(variables, jnp.ones((2, 16, 16, 3)), train=False)
  assert logits.shape == (2, 16, 16, 5)
  assert logits.dtype == jnp.float32  # The loss sees float32 even when computing in bf16.
  kernels = jax.tree.leaves(variables['params'])
  assert all(k.dtype == jnp.float32 for k in kernels)


def test_unet_fast_and_reference_upsampling_agree():
  x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3))
  fast = models.UNet(num_classes=3, widths=(4, 8), fast_upsample=True)
  reference = models.UNet(num_classes=3, widths=(4, 8), fast_upsample=False)
  variables = fast.init(jax.random.key(1), x, train=False)
  np.testing.assert_allclose(fast.apply(variables, x, train=False),
                             reference.apply(variables, x, train=False), atol=1e-5)


def test_dropout_only_in_training():
  model = models.UNet(num_classes=3, widths=(4,), dropout_rate=0.5)
  x = jax.random.uniform(jax.random.key(0), (1, 16, 16, 3))
  variables = model.init(jax.random.key(1), x, train=False)
  evals = [model.apply(variables, x, train=False) for _ in range(2)]
  np.testing.assert_array_equal(evals[0], evals[1])
  a, b = (model.apply(variables, x, train=True, rngs={'dropout': jax.random.key(i)})
          for i in (2, 3))
  assert not np.allclose(a, b)


def _conv3x3_same(x, kernel):
  """numpy: [B, H, W, C] x [3, 3, C, F] -> [B, H, W, F], zero padding."""
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  h, w = x.shape[1:3]
  return sum(np.einsum('bhwc,cf->bhwf', padded[:, dy:dy + h, dx:dx + w], kernel[dy, dx])
             for dy in range(3) for dx in range(3))


def _group_norm(x, groups, scale, offset, eps=1e-6):
  """numpy group normalization (Wu & He 2018) of [B, H, W, C] over H, W and each group's
  channels; flax's epsilon."""
  b, h, w, c = x.shape
  g = x.reshape(b, h, w, groups, c // groups)
  mean = g.mean(axis=(1, 2, 4), keepdims=True)
  var = g.var(axis=(1, 2, 4), keepdims=True)
  return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + offset


def test_group_norm_block_equals_numpy_conv_norm_relu():
  # 48 channels: 16 groups of 3 channels (the largest divisor of 32 and 48).
  assert models.num_groups(48) == 16 and models.num_groups(64) == 32
  x = np.asarray(jax.random.normal(jax.random.key(0), (2, 6, 5, 3)), np.float64)
  block = models.ConvBlock(48, normalization='group')
  params = block.init(jax.random.key(1), jnp.asarray(x, jnp.float32))['params']
  assert set(params['Conv_0']) == {'kernel'}  # The norm's offset takes the bias's place.
  keys = iter(jax.random.split(jax.random.key(2), 16))
  params = jax.tree.map(lambda p: jax.random.normal(next(keys), p.shape), params)
  got = block.apply({'params': params}, jnp.asarray(x, jnp.float32))
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  y = x
  for i in range(2):
    norm = p[f'GroupNorm_{i}']
    y = np.maximum(_group_norm(_conv3x3_same(y, p[f'Conv_{i}']['kernel']), 16, norm['scale'],
                               norm['bias']), 0)
  np.testing.assert_allclose(got, y, rtol=1e-4, atol=1e-4)


def test_normalization_none_is_the_chapters_block_and_group_adds_only_scales_and_offsets():
  images = jnp.zeros((1, 16, 16, 3))
  plain = models.UNet(widths=(4, 8)).init(jax.random.key(0), images, train=False)['params']
  normed = models.UNet(widths=(4, 8), normalization='group').init(
      jax.random.key(0), images, train=False)['params']
  assert set(plain['down_0']) == {'Conv_0', 'Conv_1'}
  # Per block convolution: its bias (F) is gone, a scale and an offset (2F) come.
  conv_features = 2 * (4 + 8 + 16 + 8 + 4)
  assert models.param_count(normed) == models.param_count(plain) + conv_features


def test_flip_tta_is_the_log_of_the_mean_softmax_of_image_and_mirror():
  module = models.UNet(num_classes=3, widths=(4, 8), dropout_rate=0.0)
  params = module.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False)['params']
  images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), np.uint8)
  def forward_fn(params, images):
    return module.apply({'params': params}, models.normalize(images), train=False)
  forward = functools.partial(forward_fn, params)
  tta = jax.jit(models.flip_tta(forward_fn))(params, images)
  assert tta.shape == (2, 16, 16, 3) and tta.dtype == jnp.float32
  expected = reference_flip_tta_logits(forward, images)
  np.testing.assert_allclose(tta, expected, atol=1e-5)
  # The network is not mirror-symmetric, so the augmentation changes the probabilities.
  assert np.abs(tta - jax.nn.log_softmax(forward(images))).max() > 1e-3


def test_forward_is_the_modules_apply_on_normalized_uint8_with_dropout_only_given_a_key():
  config = make_tiny_config(None)
  params = models.init_params(config, jax.random.key(0))
  images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), np.uint8)
  forward = models.forward(config)
  module = models.create(config)
  want = module.apply({'params': params}, images.astype(np.float32) / 255, train=False)
  np.testing.assert_allclose(forward(params, images), want, rtol=1e-6, atol=1e-6)
  key = jax.random.key(3)
  trained = module.apply({'params': params}, images.astype(np.float32) / 255, train=True,
                         rngs={'dropout': key})
  np.testing.assert_allclose(forward(params, images, key), trained, rtol=1e-6, atol=1e-6)
  assert np.abs(np.asarray(trained) - np.asarray(want)).max() > 1e-4  # Dropout did something.


def _pretrained_config(size=32):
  config = make_tiny_config(None)
  config.update({'encoder': 'efficientnet_lite0', 'image_size': size, 'dropout_rate': 0.0})
  return config


def test_a_pretrained_encoder_is_one_registry_entry_under_the_chapters_decoder():
  config = _pretrained_config()
  module = models.create(config)
  assert isinstance(module, models.PretrainedUNet)
  params = models.init_params(config, jax.random.key(0))
  assert set(params) == {'encoder', 'logits', *(f'{kind}_{i}' for kind in ('upsample', 'up')
                                                  for i in range(5))}
  # The decoder: per level the chapter's Upsample (3x3 transposed convolution) and ConvBlock,
  # whose first convolution sees [upsampled, the encoder's feature of that stride].
  skips = (112, 40, 24, 16, 0)
  widths = models.DECODER_WIDTHS
  below = (320,) + widths[:-1]
  for i, (width, skip, c) in enumerate(zip(widths, skips, below)):
    assert params[f'upsample_{i}']['kernel'].shape == (3, 3, c, width)
    assert params[f'up_{i}']['Conv_0']['kernel'].shape == (3, 3, width + skip, width)
  assert params['logits']['kernel'].shape == (1, 1, widths[-1], 3)
  images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), np.uint8)
  logits = models.forward(config)(params, images)
  assert logits.shape == (2, 32, 32, 3) and logits.dtype == jnp.float32
  # The chapter's model is untouched: the same count as Keras's.
  assert models.param_count(jax.eval_shape(
      lambda: models.init_params(config_lib.defaults(), jax.random.key(0)))) == 8_557_635


def test_with_pretrained_replaces_the_encoder_and_nothing_else():
  config = _pretrained_config()
  params = models.init_params(config, jax.random.key(0))
  pretrained = {'encoder': jax.tree.map(np.ones_like, params['encoder'])}
  merged = models.with_pretrained(params, pretrained)
  assert all((np.asarray(x) == 1).all() for x in jax.tree.leaves(merged['encoder']))
  assert merged['logits'] is params['logits']
  assert models.with_pretrained(params, None) is params
  assert models.pretrained_params(config) is None  # No encoder_weights: random.
