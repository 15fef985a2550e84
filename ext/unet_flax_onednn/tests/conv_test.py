"""oneDNN conv against jax.lax.conv_general_dilated: forward, input gradient, weight gradient.

python -m pytest ext/unet_flax_onednn/tests (skipped where the extension is not installed).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

onednn = pytest.importorskip('unet_flax_onednn')

SHAPES = [  # (N, H, W, C, O, K)
    (1, 5, 7, 3, 4, 3),
    (2, 5, 7, 4, 8, 3),
    (2, 16, 16, 8, 3, 3),
    (1, 16, 16, 3, 8, 3),
    (2, 5, 7, 4, 8, 1),
    (1, 6, 5, 3, 4, 2),  # Even kernel: SAME pads the extra row/column at the end, as XLA.
]


def _reference(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                      precision=jax.lax.Precision.HIGHEST)


def _operands(shape, dtype):
  n, h, w, c, o, k = shape
  kx, kw, kdy = jax.random.split(jax.random.key(sum(shape)), 3)
  x = jax.random.normal(kx, (n, h, w, c), jnp.float32).astype(dtype)
  kernel = jax.random.normal(kw, (k, k, c, o), jnp.float32).astype(dtype)
  dy = jax.random.normal(kdy, (n, h, w, o), jnp.float32).astype(dtype)
  return x, kernel, dy


def _close(actual, expected, rtol):
  """Within rtol of the reference, relative to the reference's largest magnitude."""
  actual = np.asarray(actual, np.float32)
  expected = np.asarray(expected, np.float32)
  assert actual.shape == expected.shape
  scale = np.abs(expected).max()
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
@pytest.mark.parametrize('jit', [False, True])
def test_forward_and_gradients_match_xla(shape, dtype, jit):
  dtype = jnp.dtype(dtype)
  x, w, dy = _operands(shape, dtype)
  # The reference is float32 on the same (rounded) operands: what oneDNN's f32 accumulation does.
  y_ref, vjp_ref = jax.vjp(_reference, x.astype(jnp.float32), w.astype(jnp.float32))
  dx_ref, dw_ref = vjp_ref(dy.astype(jnp.float32))

  def f(x, w, dy):
    y, vjp = jax.vjp(onednn.conv, x, w)
    return (y, *vjp(dy))
  y, dx, dw = (jax.jit(f) if jit else f)(x, w, dy)

  assert y.dtype == dx.dtype == dw.dtype == dtype
  # bfloat16 results are rounded to 8 significant bits once (relative 2^-8 = 0.4%).
  rtol = 1e-5 if dtype == jnp.float32 else 1e-2
  _close(y, y_ref, rtol)
  _close(dx, dx_ref, rtol)
  _close(dw, dw_ref, rtol)


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_weight_gradient_is_float32(dtype):
  x, w, dy = _operands((2, 16, 16, 8, 4, 3), jnp.dtype(dtype))
  dw = onednn.conv_bwd_weights(x, dy)
  assert dw.dtype == jnp.float32
  _, vjp_ref = jax.vjp(_reference, x.astype(jnp.float32), w.astype(jnp.float32))
  _close(dw, vjp_ref(dy.astype(jnp.float32))[1], 1e-5)  # f32 accumulation and output.


def test_mixed_dtypes_rejected():
  x, w, _ = _operands((1, 5, 7, 3, 4, 3), jnp.float32)
  with pytest.raises(TypeError):
    onednn.conv(x, w.astype(jnp.bfloat16))
