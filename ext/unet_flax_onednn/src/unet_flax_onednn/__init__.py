"""oneDNN stride-1 'SAME' convolutions for JAX on CPU, through jax.ffi (issue 15's gate prototype).

`conv(x, w)` equals `jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
dimension_numbers=('NHWC', 'HWIO', 'NHWC'))` for float32 or bfloat16 x and w of the same dtype;
its gradient (a `jax.custom_vjp`) uses oneDNN's backward-data and backward-weights primitives. The
weight gradient is accumulated and written in float32 by oneDNN, then cast to w's dtype.
The three passes are also exposed alone (`conv_fwd`, `conv_bwd_data`, `conv_bwd_weights`).
CPU only.
"""

import ctypes
import pathlib

import jax
import jax.numpy as jnp

_LIB = ctypes.cdll.LoadLibrary(str(pathlib.Path(__file__).parent / 'libunet_flax_onednn_ffi.so'))

_TARGETS = {
    'unet_onednn_conv_fwd': 'UnetOnednnConvFwd',
    'unet_onednn_conv_bwd_data': 'UnetOnednnConvBwdData',
    'unet_onednn_conv_bwd_weights': 'UnetOnednnConvBwdWeights',
}
for _name, _symbol in _TARGETS.items():
  jax.ffi.register_ffi_target(_name, jax.ffi.pycapsule(getattr(_LIB, _symbol)), platform='cpu')

_LIB.unet_onednn_impl.restype = ctypes.c_char_p
_LIB.unet_onednn_impl.argtypes = [ctypes.c_int, ctypes.c_int] + [ctypes.c_int64] * 7
_PASSES = {'fwd': 0, 'bwd_data': 1, 'bwd_weights': 2}
_DTYPES = (jnp.float32, jnp.bfloat16)


def _check(a, b):
  if a.dtype != b.dtype or a.dtype not in _DTYPES:
    raise TypeError(f'unet_flax_onednn: float32 or bfloat16 operands of one dtype, '
                    f'got {a.dtype} and {b.dtype}')
  if a.ndim != 4 or b.ndim != 4:
    raise ValueError('unet_flax_onednn: rank-4 operands (NHWC, HWIO)')


def conv_fwd(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [N,H,W,C], w [KH,KW,C,O] -> y [N,H,W,O] in x's dtype."""
  _check(x, w)
  out = jax.ShapeDtypeStruct(x.shape[:3] + (w.shape[3],), x.dtype)
  return jax.ffi.ffi_call('unet_onednn_conv_fwd', out)(x, w)


def conv_bwd_data(dy: jax.Array, w: jax.Array) -> jax.Array:
  """dy [N,H,W,O], w [KH,KW,C,O] -> dx [N,H,W,C] in dy's dtype."""
  _check(dy, w)
  out = jax.ShapeDtypeStruct(dy.shape[:3] + (w.shape[2],), dy.dtype)
  return jax.ffi.ffi_call('unet_onednn_conv_bwd_data', out)(dy, w)


def conv_bwd_weights(x: jax.Array, dy: jax.Array, kernel_size=(3, 3)) -> jax.Array:
  """x [N,H,W,C], dy [N,H,W,O] -> dw [KH,KW,C,O] in float32."""
  _check(x, dy)
  out = jax.ShapeDtypeStruct(tuple(kernel_size) + (x.shape[3], dy.shape[3]), jnp.float32)
  return jax.ffi.ffi_call('unet_onednn_conv_bwd_weights', out)(x, dy)


@jax.custom_vjp
def conv(x: jax.Array, w: jax.Array) -> jax.Array:
  """Stride-1 'SAME' convolution, NHWC x HWIO -> NHWC, through oneDNN."""
  return conv_fwd(x, w)


def _conv_fwd_rule(x, w):
  return conv_fwd(x, w), (x, w)


def _conv_bwd_rule(residuals, dy):
  x, w = residuals
  dy = dy.astype(x.dtype)
  dx = conv_bwd_data(dy, w)
  dw = conv_bwd_weights(x, dy, w.shape[:2]).astype(w.dtype)
  return dx, dw


conv.defvjp(_conv_fwd_rule, _conv_bwd_rule)


def implementation(pass_: str, dtype, n, h, w, c, o, kh=3, kw=3) -> str:
  """The oneDNN implementation (e.g. 'brg_conv_fwd:avx512_core') a pass uses at a shape."""
  bf16 = int(jnp.dtype(dtype) == jnp.bfloat16)
  return _LIB.unet_onednn_impl(_PASSES[pass_], bf16, n, h, w, c, o, kh, kw).decode()


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, preferred_element_type=None):
  """`jax.lax.conv_general_dilated`, through oneDNN where this prototype covers the case.

  Covered: stride 1, 'SAME', no dilation or groups, NHWC x HWIO -> NHWC, float32 or bfloat16
  operands of one dtype, a 3x3 kernel. Anything else goes to XLA. For flax's
  `nn.Conv(..., conv_general_dilated=...)`.
  """
  def ones(v):
    return v is None or all(d == 1 for d in v)
  nhwc = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, ('NHWC', 'HWIO', 'NHWC'))
  same = padding == 'SAME' or (not isinstance(padding, str)
                               and [tuple(p) for p in padding] == [(1, 1), (1, 1)])
  if (lhs.ndim == 4 and tuple(rhs.shape[:2]) == (3, 3) and tuple(window_strides) == (1, 1)
      and same and ones(lhs_dilation) and ones(rhs_dilation) and feature_group_count == 1
      and jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == nhwc
      and lhs.dtype == rhs.dtype and lhs.dtype in _DTYPES and preferred_element_type is None):
    return conv(lhs, rhs)
  return jax.lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
      precision=precision, preferred_element_type=preferred_element_type)
