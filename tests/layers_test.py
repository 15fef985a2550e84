"""layers.py: the fast forms of ConvTranspose, max-pool, the skip concatenation, the bias and nn.Conv
against flax's own layers and numpy, values and gradients."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unet_flax import errors
from unet_flax import layers


def test_upsample_equals_conv_transpose_values_and_gradients():
  x = jax.random.normal(jax.random.key(0), (2, 5, 6, 4))
  reference = nn.ConvTranspose(8, (3, 3), strides=(2, 2), padding='SAME')
  params = reference.init(jax.random.key(1), x)
  fast = layers.Upsample(8)
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


def test_max_pool_2x2_equals_flax_max_pool():
  x = jax.random.normal(jax.random.key(0), (2, 16, 12, 4))
  np.testing.assert_array_equal(layers.max_pool_2x2(x),
                                nn.max_pool(x, (2, 2), strides=(2, 2)))
  g = lambda pool, x: jax.grad(lambda x: jnp.sum(pool(x) * jnp.arange(4.0)))(x)
  flax_pool = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))
  np.testing.assert_array_equal(g(layers.max_pool_2x2, x), g(flax_pool, x))
  # Ties, as after a ReLU or in bfloat16: the gradient goes to each window's first maximum.
  ties = jnp.round(jax.random.uniform(jax.random.key(1), (2, 16, 12, 4)) * 2) / 2
  assert (ties[:, ::2, ::2] == ties[:, 1::2, 1::2]).any()
  np.testing.assert_array_equal(g(layers.max_pool_2x2, ties), g(flax_pool, ties))
  # numpy: the first maximum of each 2x2 window (row-major) receives the window's gradient.
  t = np.asarray(ties)
  want = np.zeros_like(t)
  for bi, i, j, ci in np.ndindex(2, 8, 6, 4):
    window = t[bi, 2 * i:2 * i + 2, 2 * j:2 * j + 2, ci].ravel()
    k = int(np.argmax(window))
    want[bi, 2 * i + k // 2, 2 * j + k % 2, ci] = ci
  np.testing.assert_array_equal(g(layers.max_pool_2x2, ties), want)


@pytest.mark.parametrize('kernel_size,relu', [((3, 3), True), ((3, 3), False), ((1, 1), False)])
def test_conv_is_flax_conv_with_the_same_parameters(kernel_size, relu):
  """layers.Conv (every convolution of the blocks and the logits) creates nn.Conv's parameters
  with the same values, and computes relu?(nn.Conv(x)), values and gradients."""
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 4))
  ours = layers.Conv(8, kernel_size, relu=relu)
  flax_conv = nn.Conv(8, kernel_size, padding='SAME', kernel_init=layers.kernel_init,
                      bias_init=layers.bias_init)
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
  (y, grads) = value_and_grads(layers.concatenate_channels)
  (y_ref, grads_ref) = value_and_grads(lambda a, b: jnp.concatenate([a, b], axis=-1))
  np.testing.assert_array_equal(layers.concatenate_channels(a, b),
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
      lambda b: (layers.add_bias(y, b) * weights).astype(jnp.float32).sum()))(
          jnp.zeros(3, jnp.bfloat16))
  assert grad.dtype == jnp.bfloat16
  want = np.asarray(weights, np.float64).sum(axis=(0, 1, 2))  # About 2048 each.
  np.testing.assert_allclose(np.asarray(grad, np.float64), want, rtol=2 ** -8)
  np.testing.assert_array_equal(layers.add_bias(y, jnp.ones(3, jnp.bfloat16)), y + 1)


def test_the_process_backend_is_decided_once_and_onednn_without_the_extension_is_one_line():
  try:
    assert layers.select_backend('xla') == 'xla' and layers.backend() == 'xla'
    assert layers.layer_function() is layers.xla_layer
    assert layers.layer_function(dtype='bfloat16') is layers.xla_layer
    assert layers.backend('bfloat16') == 'xla'
    assert layers.convolutions('bfloat16') == 'xla convolutions'
    if layers._onednn_layer() is None:  # Not installed, or installed without its library.
      assert layers.resolve_backend('auto') == 'xla'
      with pytest.raises(errors.UserError, match='needs the extension ext/unet_flax_onednn'):
        layers.select_backend('onednn')
    with pytest.raises(errors.UserError, match="'gpu' is not one of auto, xla, onednn"):
      layers.resolve_backend('gpu')
  finally:
    layers.select_backend('auto')
