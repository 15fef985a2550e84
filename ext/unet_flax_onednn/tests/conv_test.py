"""oneDNN conv against jax.lax.conv_general_dilated: forward, input gradient, weight gradient.

The U-Net's shapes: 3x3 'SAME' (ConvBlocks), 1x1 (logits) and the upsampling's four phase
kernels with their explicit padding (2x2, 2x1, 1x2, 1x1; layers.Upsample); odd sizes, batch 1.
The pretrained encoder's (efficientnet.py): depthwise 3x3 and 5x5 (groups = channels), stride 2
with TensorFlow's 'SAME' padding (one more at the bottom and the right), the 3-channel stem.

python -m pytest ext/unet_flax_onednn/tests (skipped where the extension is not installed).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

onednn = pytest.importorskip('unet_flax_onednn')

from unet_flax import layers  # noqa: E402

# bfloat16 where this CPU's oneDNN convolves it (dtypes(): AVX-512), else skipped with the reason.
NEEDS_BF16 = pytest.mark.skipif(jnp.bfloat16 not in onednn.dtypes(),
                                reason="this CPU's oneDNN has no bfloat16 convolution (no AVX-512)")
DTYPES = ['float32', pytest.param('bfloat16', marks=NEEDS_BF16)]

EVEN, ODD, NONE = (1, 0), (0, 0), (0, 0)  # Upsample's paddings of its even and odd phases.
SHAPES = [  # (N, H, W, C, O, KH, KW, padding)
    (1, 5, 7, 3, 4, 3, 3, 'SAME'),
    (2, 5, 7, 4, 8, 3, 3, 'SAME'),
    (2, 16, 16, 8, 3, 3, 3, 'SAME'),
    (1, 16, 16, 3, 8, 3, 3, 'SAME'),
    (2, 5, 7, 4, 8, 1, 1, 'SAME'),  # The logits.
    (1, 6, 5, 3, 4, 2, 2, 'SAME'),  # Even kernel: SAME pads the extra row/column at the end.
    # Upsample's phases: (even, even) 2x2, (even, odd) 2x1, (odd, even) 1x2, (odd, odd) 1x1.
    (1, 5, 7, 3, 4, 2, 2, (EVEN, EVEN)),
    (2, 4, 4, 8, 4, 2, 2, (EVEN, EVEN)),
    (1, 5, 7, 3, 4, 2, 1, (EVEN, ODD)),
    (2, 4, 3, 8, 4, 2, 1, (EVEN, ODD)),
    (1, 5, 7, 3, 4, 1, 2, (ODD, EVEN)),
    (2, 3, 4, 8, 4, 1, 2, (ODD, EVEN)),
    (1, 5, 7, 3, 4, 1, 1, (NONE, NONE)),
    (2, 4, 4, 8, 4, 1, 1, (NONE, NONE)),
    # Other explicit paddings: the output size follows them.
    (1, 5, 7, 3, 4, 3, 3, ((2, 0), (0, 1))),
    (2, 6, 5, 3, 4, 3, 2, 'VALID'),
]


def _reference(x, w, padding):
  return jax.lax.conv_general_dilated(x, w, (1, 1), padding,
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                      precision=jax.lax.Precision.HIGHEST)


def _operands(shape, dtype):
  n, h, w, c, o, kh, kw, padding = shape
  kx, kw_, kdy = jax.random.split(jax.random.key(n + h + w + c + o + kh + kw), 3)
  x = jax.random.normal(kx, (n, h, w, c), jnp.float32).astype(dtype)
  kernel = jax.random.normal(kw_, (kh, kw, c, o), jnp.float32).astype(dtype)
  y_shape = jax.eval_shape(functools.partial(_reference, padding=padding), x, kernel).shape
  dy = jax.random.normal(kdy, y_shape, jnp.float32).astype(dtype)
  return x, kernel, dy, padding


def _close(actual, expected, rtol):
  """Within rtol of the reference, relative to the reference's largest magnitude."""
  actual = np.asarray(actual, np.float32)
  expected = np.asarray(expected, np.float32)
  assert actual.shape == expected.shape
  scale = np.abs(expected).max()
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize('shape', SHAPES, ids=str)
@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('jit', [False, True])
def test_forward_and_gradients_match_xla(shape, dtype, jit):
  dtype = jnp.dtype(dtype)
  x, w, dy, padding = _operands(shape, dtype)
  # The reference is float32 on the same (rounded) operands: what oneDNN's f32 accumulation does.
  y_ref, vjp_ref = jax.vjp(functools.partial(_reference, padding=padding),
                           x.astype(jnp.float32), w.astype(jnp.float32))
  dx_ref, dw_ref = vjp_ref(dy.astype(jnp.float32))

  def f(x, w, dy):
    y, vjp = jax.vjp(functools.partial(onednn.conv, padding=padding), x, w)
    return (y, *vjp(dy))
  y, dx, dw = (jax.jit(f) if jit else f)(x, w, dy)

  assert y.dtype == dx.dtype == dw.dtype == dtype
  # bfloat16 results are rounded to 8 significant bits once (relative 2^-8 = 0.4%).
  rtol = 1e-5 if dtype == jnp.float32 else 1e-2
  _close(y, y_ref, rtol)
  _close(dx, dx_ref, rtol)
  _close(dw, dw_ref, rtol)


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('shape', [(2, 16, 16, 8, 4, 3, 3, 'SAME'),
                                   (2, 5, 7, 8, 4, 2, 2, (EVEN, EVEN))], ids=str)
def test_weight_gradient_is_float32(dtype, shape):
  x, w, dy, padding = _operands(shape, jnp.dtype(dtype))
  dw = onednn.conv_bwd_weights(x, dy, w.shape[:2], padding)
  assert dw.dtype == jnp.float32
  _, vjp_ref = jax.vjp(functools.partial(_reference, padding=padding),
                       x.astype(jnp.float32), w.astype(jnp.float32))
  _close(dw, vjp_ref(dy.astype(jnp.float32))[1], 1e-5)  # f32 accumulation and output.


# (N, H, W, C, O, KH, KW, padding, strides, groups): EfficientNet-Lite0's convolutions at 16x16,
# widths 4-8, and other strided and grouped ones. efficientnet.same_padding: a stride-2 3x3 of an
# even size pads (0, 1), a 5x5 (1, 2); at stride 1 (1, 1) and (2, 2).
GEOMETRIES = [
    (2, 16, 16, 3, 8, 3, 3, ((0, 1), (0, 1)), 2, 1),  # The stem.
    (2, 16, 16, 8, 8, 3, 3, ((1, 1), (1, 1)), 1, 8),  # Depthwise 3x3.
    (2, 16, 16, 8, 8, 5, 5, ((2, 2), (2, 2)), 1, 8),  # Depthwise 5x5.
    (2, 16, 16, 8, 8, 3, 3, ((0, 1), (0, 1)), 2, 8),  # Depthwise 3x3, stride 2.
    (2, 16, 16, 8, 8, 5, 5, ((1, 2), (1, 2)), 2, 8),  # Depthwise 5x5, stride 2.
    (1, 14, 13, 4, 4, 5, 5, 'SAME', 2, 4),  # XLA's 'SAME' pads rows (1, 2), columns (2, 2).
    (1, 9, 11, 6, 4, 3, 3, 'SAME', (2, 1), 2),  # Two groups of 3 -> 2, unequal strides.
    (2, 8, 8, 4, 8, 3, 3, 'SAME', 1, 4),  # A channel multiplier of 2.
    (1, 16, 16, 4, 6, 3, 3, 'VALID', 3, 1),  # Rows that no window reaches get no gradient.
    (2, 16, 16, 8, 4, 1, 1, 'VALID', 2, 1),  # A strided 1x1 (a ResNet shortcut).
]


def _passes(geometry) -> int:
  """oneDNN calls of a convolution's forward and both gradients: a depthwise kernel wider than
  3 taps has its weight gradient computed as 2 windows a side (2 x 2 calls for 5x5)."""
  n, h, w, c, o, kh, kw, *_, groups = geometry
  windows = (1 + (kh > 3)) * (1 + (kw > 3)) if groups == c == o else 1
  return 2 + windows


def _reference_geometry(x, w, padding, strides, groups):
  strides = (strides, strides) if isinstance(strides, int) else strides
  return jax.lax.conv_general_dilated(x, w, strides, padding,
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                      feature_group_count=groups,
                                      precision=jax.lax.Precision.HIGHEST)


def _geometry_operands(geometry, dtype):
  n, h, w, c, o, kh, kw, padding, strides, groups = geometry
  keys = jax.random.split(jax.random.key(h * w + c * o + kh * groups), 4)
  x = jax.random.normal(keys[0], (n, h, w, c), jnp.float32).astype(dtype)
  kernel = jax.random.normal(keys[1], (kh, kw, c // groups, o), jnp.float32).astype(dtype)
  bias = jax.random.normal(keys[2], (o,), jnp.float32).astype(dtype)
  reference = functools.partial(_reference_geometry, padding=padding, strides=strides,
                                groups=groups)
  dy = jax.random.normal(keys[3], jax.eval_shape(reference, x, kernel).shape).astype(dtype)
  return x, kernel, bias, dy, reference


@pytest.mark.parametrize('geometry', GEOMETRIES, ids=str)
@pytest.mark.parametrize('dtype', DTYPES)
def test_strided_and_grouped_conv_match_xla(geometry, dtype):
  """conv with strides and groups: output, input gradient and kernel gradient, jitted, against
  XLA's float32 convolution of the same (rounded) operands; all three passes are oneDNN's."""
  dtype = jnp.dtype(dtype)
  x, w, _, dy, reference = _geometry_operands(geometry, dtype)
  *_, padding, strides, groups = geometry
  y_ref, vjp_ref = jax.vjp(reference, x.astype(jnp.float32), w.astype(jnp.float32))
  dx_ref, dw_ref = vjp_ref(dy.astype(jnp.float32))

  def f(x, w, dy):
    y, vjp = jax.vjp(functools.partial(onednn.conv, padding=padding, strides=strides,
                                       groups=groups), x, w)
    return (y, *vjp(dy))
  assert _ffi_calls(f, x, w, dy) == _passes(geometry)
  y, dx, dw = jax.jit(f)(x, w, dy)
  assert y.dtype == dx.dtype == dw.dtype == dtype
  rtol = 1e-5 if dtype == jnp.float32 else 1e-2
  _close(y, y_ref, rtol)
  _close(dx, dx_ref, rtol)
  _close(dw, dw_ref, rtol)


@pytest.mark.parametrize('geometry', [GEOMETRIES[0], GEOMETRIES[3], GEOMETRIES[4], GEOMETRIES[6]],
                         ids=str)
@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('relu', [False, True])
def test_strided_and_grouped_layer_matches_xla(geometry, dtype, relu):
  """The layer function on the encoder's convolutions: relu?(conv(x, w) + b) in one oneDNN call
  (three with the gradients), and the gradients of x, w and b, against XLA's layer."""
  dtype = jnp.dtype(dtype)
  x, w, b, dy, _ = _geometry_operands(geometry, dtype)
  *_, padding, strides, groups = geometry
  strides = (strides, strides) if isinstance(strides, int) else strides
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(x.shape[1:3], w.shape[:2], strides, padding)
  reference = functools.partial(layers.xla_layer, padding=padding, relu=relu, strides=strides,
                                groups=groups)
  y_ref, vjp_ref = jax.vjp(lambda *v: reference(*v).astype(jnp.float32),
                           *(v.astype(jnp.float32) for v in (x, w, b)))
  grads_ref = vjp_ref(dy.astype(jnp.float32))

  def f(x, w, b, dy):
    y, vjp = jax.vjp(functools.partial(onednn.layer, padding=padding, relu=relu,
                                       strides=strides, groups=groups), x, w, b)
    return (y, *vjp(dy))
  # Fused forward, backward-data, backward-weights (the first window's with the bias's).
  _check_layer(f, (x, w, b, dy), _passes(geometry), y_ref, grads_ref, dtype, relu)


@pytest.mark.parametrize('size', [4, 5, 6])
@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('height', [11, 12])
def test_wide_depthwise_weight_gradient_matches_xla(size, stride, height):
  """A depthwise kernel of 4-6 taps a side, whose weight gradient is computed as 2 x 2 windows
  of 3 taps over the padded input's rows and columns they read: against XLA's, at odd and even
  sizes (where 'SAME' pads differently at the two ends), and each window's oneDNN kernel is the
  depthwise one."""
  geometry = (2, height, 12, 8, 8, size, size, 'SAME', stride, 8)
  x, w, _, dy, reference = _geometry_operands(geometry, jnp.float32)
  dw_ref = jax.vjp(reference, x, w)[1](dy)[1]

  def dw(x, w, dy):
    return jax.vjp(functools.partial(onednn.conv, strides=stride, groups=8), x, w)[1](dy)[1]
  assert _ffi_calls(dw, x, w, dy) == 4  # The windows (the unused forward and dx are dropped).
  _close(jax.jit(dw)(x, w, dy), dw_ref, 1e-5)
  pads = jax.lax.padtype_to_pads(x.shape[1:3], (size, size), (stride, stride), 'SAME')
  padded = jnp.pad(x, ((0, 0), *pads, (0, 0)))
  for offset_y, _ in onednn._depthwise_windows(size):
    for offset_x, _ in onednn._depthwise_windows(size):
      rows = onednn._window_input(padded, 1, offset_y, 3, stride, dy.shape[1])
      window = onednn._window_input(rows, 2, offset_x, 3, stride, dy.shape[2])
      impl = onednn.implementation('bwd_weights', jnp.float32, *window.shape, 8, 3, 3,
                                   'VALID', stride, 8)
      assert impl.startswith('jit_dw'), (offset_y, offset_x, impl)


def test_groups_that_do_not_fit_are_rejected():
  x = jnp.zeros((1, 8, 8, 6))
  with pytest.raises(ValueError, match='groups'):
    onednn.conv(x, jnp.zeros((3, 3, 2, 4)), groups=2)  # 6 channels are 2 groups of 3, not 2.
  with pytest.raises(ValueError, match='groups'):
    onednn.conv(x, jnp.zeros((3, 3, 1, 4)), groups=6)  # 4 outputs do not split into 6 groups.
  with pytest.raises(ValueError, match='strides'):
    onednn.conv(x, jnp.zeros((3, 3, 6, 4)), strides=0)


def test_mixed_dtypes_rejected():
  x, w, _, _ = _operands(SHAPES[0], jnp.float32)
  with pytest.raises(TypeError):
    onednn.conv(x, w.astype(jnp.bfloat16))


@NEEDS_BF16
@pytest.mark.parametrize('pair', [False, True])
def test_a_float32_kernel_is_rounded_in_onednn_and_its_gradient_stays_float32(pair):
  """A bfloat16 layer given float32 parameters (a mixed-precision model's): the output of the
  kernel rounded to bfloat16 first (oneDNN's reorder rounds to nearest even, as astype), in as
  many oneDNN calls and with no bfloat16 copy of the kernel nor of its gradient in XLA; the
  kernel's gradient is oneDNN's float32 one, within 1e-5 of XLA's float32 on the rounded
  operands, where a bfloat16 gradient would be off by up to 2^-9."""
  x, w, dy, padding = _operands(SHAPES[2], jnp.bfloat16)
  w32 = w.astype(jnp.float32) * 1.001  # Not bfloat16 values: rounding them matters.
  w16 = w32.astype(jnp.bfloat16)
  b = jnp.linspace(-0.5, 0.5, w.shape[3], dtype=jnp.float32)
  inputs = (x[..., :5], x[..., 5:]) if pair else x

  def f(w, b):
    return onednn.layer(inputs, w, b, padding)
  y, vjp = jax.vjp(f, w32, b)
  np.testing.assert_array_equal(y, f(w16, b.astype(jnp.bfloat16)))
  dw, db = vjp(dy)
  assert dw.dtype == db.dtype == jnp.float32
  _, vjp_ref = jax.vjp(lambda w: _reference(x.astype(jnp.float32), w, padding),
                       w16.astype(jnp.float32))
  want = vjp_ref(dy.astype(jnp.float32))[0]
  _close(dw, want, 1e-5)
  assert np.abs(np.asarray(dw.astype(jnp.bfloat16), np.float32) - want).max() > 1e-4 * np.abs(
      want).max()  # The check above could tell a bfloat16 gradient.
  lowered = jax.jit(lambda w, b, dy: jax.vjp(f, w, b)[1](dy)).lower(w32, b, dy).as_text()
  assert _ffi_calls(f, w32, b) == _ffi_calls(f, w16, b.astype(jnp.bfloat16)) == (2 if pair else 1)
  kernel_type = 'x'.join(map(str, w.shape))
  assert f'tensor<{kernel_type}xbf16>' not in lowered


def _check_layer(f, operands, calls, y_ref, grads_ref, dtype, relu):
  """f(*operands) -> (y, *gradients) makes `calls` oneDNN calls, keeps `dtype`, and is within
  1e-5 (float32) or 1e-2 (bfloat16) of the reference's output and gradients."""
  assert _ffi_calls(f, *operands) == calls
  y, *grads = jax.jit(f)(*operands)
  assert y.dtype == dtype and all(g.dtype == dtype for g in grads)
  rtol = 1e-5 if dtype == jnp.float32 else 1e-2
  if relu:
    assert (y_ref == 0).any() and (y_ref > 0).any()  # The mask matters.
  _close(y, y_ref, rtol)
  for got, want in zip(grads, grads_ref):
    _close(got, want, rtol)


def _ffi_calls(fn, *args) -> int:
  return jax.jit(fn).lower(*args).as_text().count('unet_onednn_conv')


def _reference_layer(x, w, b, padding, relu):
  y = _reference(x, w, padding) + b
  return jax.nn.relu(y) if relu else y


@pytest.mark.parametrize('shape', [SHAPES[0], SHAPES[2], SHAPES[4], SHAPES[7]], ids=str)
@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('relu', [False, True])
def test_conv_bias_matches_xla(shape, dtype, relu):
  """The fused layer relu?(conv(x, w) + b): output and the gradients of x, w and b."""
  dtype = jnp.dtype(dtype)
  x, w, dy, padding = _operands(shape, dtype)
  b = jax.random.normal(jax.random.key(7), (w.shape[3],), jnp.float32).astype(dtype)
  f32 = [v.astype(jnp.float32) for v in (x, w, b)]
  y_ref, vjp_ref = jax.vjp(functools.partial(_reference_layer, padding=padding, relu=relu), *f32)
  grads_ref = vjp_ref(dy.astype(jnp.float32))

  def f(x, w, b, dy):
    y, vjp = jax.vjp(functools.partial(onednn.conv_bias, padding=padding, relu=relu), x, w, b)
    return (y, *vjp(dy))
  # Fused forward, backward-data, backward-weights+bias.
  _check_layer(f, (x, w, b, dy), 3, y_ref, grads_ref, dtype, relu)


@NEEDS_BF16
def test_conv_bias_weight_and_bias_gradients_are_float32():
  x, w, dy, padding = _operands(SHAPES[2], jnp.bfloat16)
  dw, db = onednn.conv_bwd_weights_bias(x, dy, w.shape[:2], padding)
  assert dw.dtype == db.dtype == jnp.float32
  dy32 = dy.astype(jnp.float32)
  np.testing.assert_allclose(db, dy32.sum((0, 1, 2)), rtol=1e-5, atol=1e-5 * np.abs(db).max())
  _, vjp_ref = jax.vjp(functools.partial(_reference, padding=padding),
                       x.astype(jnp.float32), w.astype(jnp.float32))
  _close(dw, vjp_ref(dy32)[1], 1e-5)


def test_conv_bias_rejects_a_bias_of_the_wrong_shape():
  x, w, _, padding = _operands(SHAPES[0], jnp.float32)
  with pytest.raises(ValueError, match='bias'):
    onednn.conv_bias_fwd(x, w, jnp.zeros(w.shape[3] + 1), padding)


@pytest.mark.parametrize('bias', [False, True])
def test_layer_is_the_fused_call_and_xla_elsewhere(bias):
  x, w, _, padding = _operands(SHAPES[0], jnp.float32)
  b = jnp.arange(w.shape[3], dtype=jnp.float32) / 4 - 0.5 if bias else None

  def f(x, w):
    return onednn.layer(x, w, b, padding, relu=True)
  assert _ffi_calls(f, x, w) == 1
  want = _reference(x, w, padding) + (0 if b is None else b)
  _close(f(x, w), jax.nn.relu(want), 1e-5)
  x16, w16 = x.astype(jnp.float16), w.astype(jnp.float16)
  assert _ffi_calls(f, x16, w16) == 0


def _cpu_flags() -> set:
  with open('/proc/cpuinfo') as f:
    return {flag for line in f if line.startswith('flags') for flag in line.split(':')[1].split()}


def test_dtypes_are_those_this_cpu_has_kernels_for():
  """oneDNN's answer against the CPU's own flags: bfloat16 with AVX512_BF16 or AMX, never on a
  CPU without AVX-512."""
  flags = _cpu_flags()
  assert jnp.float32 in onednn.dtypes()
  if flags & {'avx512_bf16', 'amx_bf16'}:
    assert jnp.bfloat16 in onednn.dtypes()
  if 'avx512f' not in flags:
    assert jnp.bfloat16 not in onednn.dtypes()


@pytest.mark.skipif(jnp.bfloat16 in onednn.dtypes(),
                    reason="this CPU's oneDNN convolves bfloat16: no dtype to fall back for")
@pytest.mark.parametrize('pair', [False, True])
def test_a_dtype_onednn_lacks_here_is_xla_in_layer_and_refused_by_conv(pair):
  """On a CPU with AVX2 alone: `layer` computes bfloat16 with XLA's convolution, no oneDNN call,
  within bfloat16's rounding of float32 on the same operands, the bias gradient too (summed in
  float32: a bfloat16 sum of 8 x 16 x 16 terms is off by several percent); `conv` says why it
  cannot."""
  x, w, dy, padding = _operands(SHAPES[2], jnp.bfloat16)
  b = jnp.linspace(-0.5, 0.5, w.shape[3], dtype=jnp.float32)
  inputs = (x, x[..., ::-1]) if pair else (x,)
  w = jnp.concatenate([w, w], axis=2) if pair else w

  def loss(layer, dtype, w, b, *inputs):
    inputs = tuple(v.astype(dtype) for v in inputs)
    y = layer(inputs if pair else inputs[0], w, b, padding, relu=True)
    return (y.astype(jnp.float32) * dy.astype(jnp.float32)).sum()
  grad = functools.partial(jax.value_and_grad, argnums=tuple(range(2 + len(inputs))))
  got = grad(functools.partial(loss, onednn.layer, jnp.bfloat16))(w.astype(jnp.float32), b,
                                                                 *inputs)
  want = grad(functools.partial(loss, _reference_pair_layer, jnp.float32))(
      w.astype(jnp.float32), b, *inputs)
  assert _ffi_calls(functools.partial(loss, onednn.layer, jnp.bfloat16),
                    w.astype(jnp.float32), b, *inputs) == 0
  _close(got[0], want[0], 1e-2)
  for g, r in zip(got[1], want[1]):
    _close(g, r, 1e-2)
  with pytest.raises(TypeError) as raised:
    onednn.conv(x, w[:, :, :x.shape[3]], padding)
  assert str(raised.value) == (
      'unet_flax_onednn: oneDNN has no bfloat16 convolution on this CPU (it needs AVX-512); use '
      'float32, or `layer`, which computes the others with XLA')


def _reference_pair_layer(x, w, b, padding, relu):
  """_reference_layer of x or of a pair's concatenation along channels."""
  x = jnp.concatenate(x, axis=-1) if isinstance(x, tuple) else x
  return _reference_layer(x, w.astype(x.dtype), b.astype(x.dtype), padding, relu)


def test_concurrent_calls_give_each_its_own_result():
  """XLA runs independent custom calls from any of its threads, at once where it can. Six
  different convolutions' gradients in one jit, five times, each against XLA's. (oneDNN's
  default scratchpad is tied to the thread that created a primitive; before each call brought
  its own, the trainer's weight gradients once came out wrong on a loaded machine.)"""
  shapes = [(2, 12 + i, 12, 8 + 4 * i, 8, 3, 3, 'SAME') for i in range(6)]
  operands = [_operands(shape, jnp.float32) for shape in shapes]

  def grads(ops):
    out = []
    for x, w, dy in ops:
      _, vjp = jax.vjp(onednn.conv, x, w)
      out.append(vjp(dy))
    return out
  refs = []
  for x, w, dy, padding in operands:
    _, vjp = jax.vjp(functools.partial(_reference, padding=padding), x, w)
    refs.append(vjp(dy))
  fn = jax.jit(grads)
  for _ in range(5):
    for got, want in zip(fn([ops[:3] for ops in operands]), refs):
      _close(got[0], want[0], 1e-5)
      _close(got[1], want[1], 1e-5)


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('relu', [False, True])
@pytest.mark.parametrize('batch', [1, 2])
def test_conv_pair_bias_is_conv_bias_of_the_concatenation(dtype, relu, batch):
  """The decoder's first convolution of [upsampled, skip]: two calls, the second summing into
  the first's output in place; values and the gradients of both inputs, kernel and bias."""
  dtype = jnp.dtype(dtype)
  keys = jax.random.split(jax.random.key(batch), 5)
  a = jax.random.normal(keys[0], (batch, 6, 5, 3)).astype(dtype)
  b = jax.random.normal(keys[1], (batch, 6, 5, 4)).astype(dtype)
  w = jax.random.normal(keys[2], (3, 3, 7, 8)).astype(dtype)
  bias = jax.random.normal(keys[3], (8,)).astype(dtype)
  dy = jax.random.normal(keys[4], (batch, 6, 5, 8)).astype(dtype)

  def reference(a, b, w, bias):
    return _reference_layer(jnp.concatenate([a, b], axis=-1), w, bias, 'SAME', relu)
  y_ref, vjp_ref = jax.vjp(reference, *(v.astype(jnp.float32) for v in (a, b, w, bias)))
  grads_ref = vjp_ref(dy.astype(jnp.float32))

  def f(a, b, w, bias, dy):
    y, vjp = jax.vjp(functools.partial(onednn.conv_pair_bias, padding='SAME', relu=relu),
                     a, b, w, bias)
    return (y, *vjp(dy))
  assert _ffi_calls(f, a, b, w, bias, dy) == 6  # Per input: forward, backward-data, -weights.
  y, *grads = jax.jit(f)(a, b, w, bias, dy)
  rtol = 1e-5 if dtype == jnp.float32 else 1e-2
  _close(y, y_ref, rtol)
  for got, want in zip(grads, grads_ref):
    assert got.dtype == dtype
    _close(got, want, rtol)
  # The layer function takes the pair the same way, also without a bias (group norm's blocks):
  # oneDNN's two calls, no concatenation.
  _close(onednn.layer((a, b), w, bias, ((1, 1), (1, 1)), relu), y_ref, rtol)
  no_bias = functools.partial(onednn.layer, bias=None, padding=((1, 1), (1, 1)), relu=relu)
  assert _ffi_calls(lambda a, b, w: no_bias((a, b), w), a, b, w) == 2
  _close(no_bias((a, b), w), reference(a, b, w, jnp.zeros_like(bias)), rtol)


def test_conv_pair_bias_rejects_inputs_that_do_not_fit_the_kernel():
  a, b = jnp.zeros((1, 4, 4, 3)), jnp.zeros((1, 4, 4, 4))
  with pytest.raises(ValueError, match='concatenate'):
    onednn.conv_pair_bias(a, b, jnp.zeros((3, 3, 8, 2)), jnp.zeros(2))
