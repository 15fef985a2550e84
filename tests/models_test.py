"""The U-Net's shapes, parameter count, the fast upsampling's exactness and flip TTA."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import reference_flip_tta_logits
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


def test_upsample_equals_conv_transpose_values_and_gradients():
  x = jax.random.normal(jax.random.key(0), (2, 5, 6, 4))
  reference = nn.ConvTranspose(8, (3, 3), strides=(2, 2), padding='SAME')
  params = reference.init(jax.random.key(1), x)
  fast = models.Upsample(8)
  # The same parameter names and shapes: checkpoints interchange.
  assert jax.tree.map(jnp.shape, fast.init(jax.random.key(1), x)) == jax.tree.map(
      jnp.shape, params)
  params = jax.tree.map(lambda p: p + jax.random.normal(jax.random.key(2), p.shape), params)
  np.testing.assert_allclose(fast.apply(params, x), reference.apply(params, x), atol=1e-5)

  weights = jax.random.normal(jax.random.key(3), (2, 10, 12, 8))
  def grads(module):
    return jax.grad(lambda p, x: jnp.sum(module.apply(p, x) * weights), argnums=(0, 1))(params, x)
  for got, want in zip(jax.tree.leaves(grads(fast)), jax.tree.leaves(grads(reference))):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


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


def test_max_pool_2x2_equals_flax_max_pool():
  x = jax.random.normal(jax.random.key(0), (2, 16, 12, 4))
  np.testing.assert_array_equal(models.max_pool_2x2(x),
                                nn.max_pool(x, (2, 2), strides=(2, 2)))
  g = lambda pool, x: jax.grad(lambda x: jnp.sum(pool(x) * jnp.arange(4.0)))(x)
  flax_pool = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))
  np.testing.assert_array_equal(g(models.max_pool_2x2, x), g(flax_pool, x))
  # Ties, as after a ReLU or in bfloat16: the gradient goes to each window's first maximum.
  ties = jnp.round(jax.random.uniform(jax.random.key(1), (2, 16, 12, 4)) * 2) / 2
  assert (ties[:, ::2, ::2] == ties[:, 1::2, 1::2]).any()
  np.testing.assert_array_equal(g(models.max_pool_2x2, ties), g(flax_pool, ties))
  # numpy: the first maximum of each 2x2 window (row-major) receives the window's gradient.
  t = np.asarray(ties)
  want = np.zeros_like(t)
  for bi, i, j, ci in np.ndindex(2, 8, 6, 4):
    window = t[bi, 2 * i:2 * i + 2, 2 * j:2 * j + 2, ci].ravel()
    k = int(np.argmax(window))
    want[bi, 2 * i + k // 2, 2 * j + k % 2, ci] = ci
  np.testing.assert_array_equal(g(models.max_pool_2x2, ties), want)


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


def test_flip_tta_logits_is_the_log_of_the_mean_softmax_of_image_and_mirror():
  module = models.UNet(num_classes=3, widths=(4, 8), dropout_rate=0.0)
  params = module.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False)['params']
  images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), np.uint8)
  forward = functools.partial(models.logits, module, params)
  tta = jax.jit(models.flip_tta_logits, static_argnums=0)(forward, images)
  assert tta.shape == (2, 16, 16, 3) and tta.dtype == jnp.float32
  expected = reference_flip_tta_logits(forward, images)
  np.testing.assert_allclose(tta, expected, atol=1e-5)
  # The network is not mirror-symmetric, so the augmentation changes the probabilities.
  assert np.abs(tta - jax.nn.log_softmax(forward(images))).max() > 1e-3


@pytest.mark.parametrize('kernel_size,relu', [((3, 3), True), ((3, 3), False), ((1, 1), False)])
def test_conv_is_flax_conv_with_the_same_parameters(kernel_size, relu):
  """models.Conv (every convolution of the blocks and the logits) creates nn.Conv's parameters
  with the same values, and computes relu?(nn.Conv(x)), values and gradients."""
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 4))
  ours = models.Conv(8, kernel_size, relu=relu)
  flax_conv = nn.Conv(8, kernel_size, padding='SAME', kernel_init=models.kernel_init,
                      bias_init=models.bias_init)
  params = ours.init(jax.random.key(1), x)
  reference_params = flax_conv.init(jax.random.key(1), x)
  jax.tree.map(np.testing.assert_array_equal, params, reference_params)
  params = jax.tree.map(lambda p: p + jax.random.normal(jax.random.key(2), p.shape), params)

  def reference(params, x):
    y = flax_conv.apply(params, x)
    return jax.nn.relu(y) if relu else y
  y, grads = jax.value_and_grad(lambda p: (ours.apply(p, x) ** 2).sum())(params)
  y_ref, grads_ref = jax.value_and_grad(lambda p: (reference(p, x) ** 2).sum())(params)
  np.testing.assert_allclose(y, y_ref, rtol=1e-6)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5), grads, grads_ref)


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_concatenate_channels_equals_jnp_concatenate(dtype):
  a = jax.random.normal(jax.random.key(0), (2, 4, 6, 3)).astype(dtype)
  b = jax.random.normal(jax.random.key(1), (2, 4, 6, 5)).astype(dtype)
  weights = jax.random.normal(jax.random.key(2), (2, 4, 6, 8)).astype(dtype)

  def value_and_grads(concatenate):
    return jax.value_and_grad(lambda a, b: jnp.sum(concatenate(a, b) * weights), (0, 1))(a, b)
  (y, grads) = value_and_grads(models.concatenate_channels)
  (y_ref, grads_ref) = value_and_grads(lambda a, b: jnp.concatenate([a, b], axis=-1))
  np.testing.assert_array_equal(models.concatenate_channels(a, b),
                                jnp.concatenate([a, b], axis=-1))
  np.testing.assert_array_equal(y, y_ref)
  for got, want in zip(grads, grads_ref):
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


def test_add_bias_gradient_is_summed_in_float32():
  """A bfloat16 bias gradient over 2 x 32 x 32 pixels: autodiff's sum of ones on XLA:CPU stops at
  256 (it accumulates in bfloat16); add_bias's is the float32 sum, then rounded once."""
  y = jnp.zeros((2, 32, 32, 3), jnp.bfloat16)
  weights = jnp.asarray(np.random.default_rng(0).uniform(0.5, 1.5, y.shape), jnp.bfloat16)
  grad = jax.jit(jax.grad(
      lambda b: (models.add_bias(y, b) * weights).astype(jnp.float32).sum()))(
          jnp.zeros(3, jnp.bfloat16))
  assert grad.dtype == jnp.bfloat16
  want = np.asarray(weights, np.float64).sum(axis=(0, 1, 2))  # About 2048 each.
  np.testing.assert_allclose(np.asarray(grad, np.float64), want, rtol=2 ** -8)
  np.testing.assert_array_equal(models.add_bias(y, jnp.ones(3, jnp.bfloat16)), y + 1)
