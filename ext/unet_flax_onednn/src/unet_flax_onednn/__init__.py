"""oneDNN NHWC convolutions for JAX on CPU, through jax.ffi (unet-flax's conv backend).

`conv(x, w, padding, strides, groups)` equals `jax.lax.conv_general_dilated(x, w, strides,
padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=groups)` for float32 or
bfloat16 x and w of the same dtype, any kernel size, any strides, explicit zero padding ((top,
bottom), (left, right)) or 'SAME'/'VALID' (XLA's: a stride-2 'SAME' pads the odd row at the
bottom), and channel groups (w [KH, KW, C / groups, O]; depthwise: groups = C = O). Its
gradient (a `jax.custom_vjp`) uses oneDNN's backward-data and backward-weights primitives; bfloat16
accumulates in float32, and the weight gradient is written in float32 by oneDNN, then cast to w's
dtype. A bfloat16 convolution also takes a float32 w (a mixed-precision model's parameters): oneDNN
rounds it to bfloat16 as it lays it out for the primitive (to nearest even, as XLA's convert), and
its gradient stays the float32 oneDNN computed, so XLA never makes bfloat16 copies of the
parameters nor of their gradients. The three passes are also exposed alone (`conv_fwd`,
`conv_bwd_data`, `conv_bwd_weights`).

`conv_bias(x, w, b, padding, relu)` is the U-Net's layer, relu?(conv(x, w) + b), in one oneDNN
call (bias and ReLU applied to the float32 accumulator); its backward computes the bias gradient
in the weight-gradient pass. `layer` is unet-flax's `layers.LayerFunction` on oneDNN; the
project's --conv_backend flag chooses it. `implementation` names the oneDNN kernel a pass uses
(bench/onednn_layer.py prints it). `dtypes()` are those oneDNN convolves on this CPU: bfloat16
needs AVX-512; elsewhere `layer` computes it with XLA and the other calls refuse it. CPU only:
the FFI targets are registered for the 'cpu' platform alone.
"""

import ctypes
import functools

import jax
import jax.numpy as jnp
import numpy as np

from unet_flax_onednn import _library

_LIB = _library.load()  # An ImportError, saying why, where it was installed without it.

_TARGETS = {
    'unet_onednn_conv_fwd': 'UnetOnednnConvFwd',
    'unet_onednn_conv_bwd_data': 'UnetOnednnConvBwdData',
    'unet_onednn_conv_bwd_weights': 'UnetOnednnConvBwdWeights',
    'unet_onednn_conv_bias_fwd': 'UnetOnednnConvBiasFwd',
    'unet_onednn_conv_bwd_weights_bias': 'UnetOnednnConvBwdWeightsBias',
    'unet_onednn_conv_bias_sum_fwd': 'UnetOnednnConvBiasSumFwd',
}
for _name, _symbol in _TARGETS.items():
  jax.ffi.register_ffi_target(_name, jax.ffi.pycapsule(getattr(_LIB, _symbol)), platform='cpu')

_LIB.unet_onednn_impl.restype = ctypes.c_char_p
_LIB.unet_onednn_impl.argtypes = [ctypes.c_int, ctypes.c_int] + [ctypes.c_int64] * 14
_PASSES = {'fwd': 0, 'bwd_data': 1, 'bwd_weights': 2}
_DTYPES = (jnp.float32, jnp.bfloat16)
SAME_3X3 = ((1, 1), (1, 1))


@functools.cache
def dtypes() -> tuple:
  """The dtypes oneDNN convolves on this CPU: float32, and bfloat16 where oneDNN has kernels for
  it (x86-64 with AVX-512; oneDNN 3.2 creates no bfloat16 convolution on a CPU with AVX2 alone,
  where `layer` computes bfloat16 with XLA's convolutions). Asked of oneDNN once a process: can it
  create each pass of a 3x3 and of a stride-2 depthwise convolution."""
  probes = [(1, 8, 8, 8, 8, 3, 3, None, (1, 1), 1), (1, 8, 8, 8, 8, 3, 3, None, (2, 2), 8)]
  return tuple(dtype for dtype in _DTYPES
               if not any(implementation(pass_, dtype, *shape[:7], padding=shape[7],
                                         strides=shape[8], groups=shape[9]).startswith('error:')
                          for pass_ in _PASSES for shape in probes))


def _check(a, b, kernel: bool = False):
  """a and b float32 or bfloat16 of one dtype; b a kernel (kernel=True) may also be float32
  where a is bfloat16 (oneDNN rounds it to bfloat16 as it lays it out)."""
  if a.dtype not in _DTYPES or (b.dtype != a.dtype and not (kernel and b.dtype == jnp.float32)):
    raise TypeError(f'unet_flax_onednn: float32 or bfloat16 operands of one dtype (a kernel '
                    f'may be float32), got {a.dtype} and {b.dtype}')
  if a.dtype not in dtypes():
    raise TypeError(f'unet_flax_onednn: oneDNN has no {a.dtype} convolution on this CPU (it '
                    f'needs AVX-512); use {", ".join(jnp.dtype(d).name for d in dtypes())}, or '
                    '`layer`, which computes the others with XLA')
  if a.ndim != 4 or b.ndim != 4:
    raise ValueError('unet_flax_onednn: rank-4 operands (NHWC, HWIO)')


def _check_groups(channels: int, kernel_in: int, out: int, groups: int) -> None:
  """C input channels, a kernel of kernel_in input and `out` output channels, in `groups`."""
  if groups < 1 or channels != kernel_in * groups or out % groups:
    raise ValueError(f'unet_flax_onednn: {channels} input channels, a kernel [KH, KW, '
                     f'{kernel_in}, {out}] and {groups} groups do not fit (need C = C/G * G and '
                     f'O divisible by G)')


def _strides(strides) -> tuple[int, int]:
  sh, sw = (strides, strides) if isinstance(strides, int) else strides
  if sh < 1 or sw < 1:
    raise ValueError(f'unet_flax_onednn: strides must be >= 1, got {strides}')
  return int(sh), int(sw)


def _pads(padding, spatial, kernel_size,
          strides=(1, 1)) -> tuple[tuple[int, int], tuple[int, int]]:
  """'SAME', 'VALID' or ((top, bottom), (left, right)) -> explicit padding (XLA's for the
  strings: a 'SAME' that pads an odd total puts the extra row and column at the end)."""
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(tuple(spatial), tuple(kernel_size), tuple(strides),
                                      padding)
  (pt, pb), (pl, pr) = padding
  return (int(pt), int(pb)), (int(pl), int(pr))


def _attrs(padding, strides=(1, 1), groups=1):
  (pt, pb), (pl, pr) = padding
  return dict(pad_top=np.int64(pt), pad_bottom=np.int64(pb), pad_left=np.int64(pl),
              pad_right=np.int64(pr), stride_h=np.int64(strides[0]),
              stride_w=np.int64(strides[1]), groups=np.int64(groups))


def _out_spatial(spatial, kernel_size, padding, strides=(1, 1)):
  return tuple((n + lo + hi - k) // s + 1
               for n, k, (lo, hi), s in zip(spatial, kernel_size, padding, strides))


def conv_fwd(x: jax.Array, w: jax.Array, padding=SAME_3X3, strides=(1, 1),
             groups: int = 1) -> jax.Array:
  """x [N,H,W,C], w [KH,KW,C/groups,O] -> y [N,OH,OW,O] in x's dtype."""
  _check(x, w, kernel=True)
  _check_groups(x.shape[3], w.shape[2], w.shape[3], groups)
  strides = _strides(strides)
  padding = _pads(padding, x.shape[1:3], w.shape[:2], strides)
  out = jax.ShapeDtypeStruct(
      (x.shape[0], *_out_spatial(x.shape[1:3], w.shape[:2], padding, strides), w.shape[3]),
      x.dtype)
  return jax.ffi.ffi_call('unet_onednn_conv_fwd', out)(x, w, **_attrs(padding, strides, groups))


def conv_bwd_data(dy: jax.Array, w: jax.Array, padding=SAME_3X3, strides=(1, 1),
                  groups: int = 1, spatial: tuple[int, int] | None = None) -> jax.Array:
  """dy [N,OH,OW,O], w [KH,KW,C/groups,O] -> dx [N,H,W,C] in dy's dtype (padding explicit).

  spatial: (H, W) of dx; None: the H and W a stride-1 convolution has (needed for strides > 1,
  where several input sizes give one output size).
  """
  _check(dy, w, kernel=True)
  strides = _strides(strides)
  (pt, pb), (pl, pr) = padding = _pads(padding, (), ())
  kh, kw = w.shape[:2]
  if spatial is None:
    if strides != (1, 1):
      raise ValueError('unet_flax_onednn: conv_bwd_data with strides needs the input spatial')
    spatial = (dy.shape[1] - pt - pb + kh - 1, dy.shape[2] - pl - pr + kw - 1)
  _check_groups(w.shape[2] * groups, w.shape[2], w.shape[3], groups)
  out = jax.ShapeDtypeStruct((dy.shape[0], *spatial, w.shape[2] * groups), dy.dtype)
  return jax.ffi.ffi_call('unet_onednn_conv_bwd_data', out)(dy, w,
                                                            **_attrs(padding, strides, groups))


def _kernel_shape(x, dy, kernel_size, groups):
  _check_groups(x.shape[3], x.shape[3] // groups, dy.shape[3], groups)
  return tuple(kernel_size) + (x.shape[3] // groups, dy.shape[3])


def conv_bwd_weights(x: jax.Array, dy: jax.Array, kernel_size=(3, 3), padding=SAME_3X3,
                     strides=(1, 1), groups: int = 1) -> jax.Array:
  """x [N,H,W,C], dy [N,OH,OW,O] -> dw [KH,KW,C/groups,O] in float32."""
  _check(x, dy)
  strides = _strides(strides)
  padding = _pads(padding, x.shape[1:3], kernel_size, strides)
  out = jax.ShapeDtypeStruct(_kernel_shape(x, dy, kernel_size, groups), jnp.float32)
  return jax.ffi.ffi_call('unet_onednn_conv_bwd_weights', out)(
      x, dy, **_attrs(padding, strides, groups))


def conv_bias_fwd(x: jax.Array, w: jax.Array, b: jax.Array, padding=SAME_3X3,
                  relu: bool = False, strides=(1, 1), groups: int = 1) -> jax.Array:
  """x [N,H,W,C], w [KH,KW,C/groups,O], b [O] -> relu?(conv(x, w) + b) [N,OH,OW,O] in x's
  dtype."""
  _check(x, w, kernel=True)
  _check_groups(x.shape[3], w.shape[2], w.shape[3], groups)
  if b.dtype != x.dtype or b.shape != (w.shape[3],):
    raise ValueError(f'unet_flax_onednn: the bias must be [{w.shape[3]}] of {x.dtype}, '
                     f'got {b.shape} of {b.dtype}')
  strides = _strides(strides)
  padding = _pads(padding, x.shape[1:3], w.shape[:2], strides)
  out = jax.ShapeDtypeStruct(
      (x.shape[0], *_out_spatial(x.shape[1:3], w.shape[:2], padding, strides), w.shape[3]),
      x.dtype)
  return jax.ffi.ffi_call('unet_onednn_conv_bias_fwd', out)(
      x, w, b, **_attrs(padding, strides, groups), relu=np.int64(bool(relu)))


def conv_bwd_weights_bias(x: jax.Array, dy: jax.Array, kernel_size=(3, 3), padding=SAME_3X3,
                          strides=(1, 1), groups: int = 1) -> tuple[jax.Array, jax.Array]:
  """x [N,H,W,C], dy [N,OH,OW,O] -> (dw [KH,KW,C/groups,O], db [O]), both float32, in one
  pass."""
  _check(x, dy)
  strides = _strides(strides)
  padding = _pads(padding, x.shape[1:3], kernel_size, strides)
  out = (jax.ShapeDtypeStruct(_kernel_shape(x, dy, kernel_size, groups), jnp.float32),
         jax.ShapeDtypeStruct((dy.shape[3],), jnp.float32))
  return tuple(jax.ffi.ffi_call('unet_onednn_conv_bwd_weights_bias', out)(
      x, dy, **_attrs(padding, strides, groups)))


# oneDNN's fast depthwise weight gradient (jit_dw) takes kernels of up to this many taps a side;
# a larger one would fall to a generic grouped kernel, one channel at a time (10-20x slower).
_DW_TAPS = 3


def _depthwise_windows(size: int) -> list[tuple[int, slice]]:
  """A kernel side of `size` taps as windows of at most _DW_TAPS: (offset, the window's taps
  to keep), covering 0..size-1 once. Windows of 3 at offsets 0 and size - 3 (overlapping, so
  that neither is shorter than 3 and each keeps its padding below its size)."""
  if size <= _DW_TAPS:
    return [(0, slice(0, size))]
  if size > 2 * _DW_TAPS:
    raise ValueError(f'unet_flax_onednn: depthwise kernels of up to {2 * _DW_TAPS} taps a side')
  return [(0, slice(0, _DW_TAPS)), (size - _DW_TAPS, slice(2 * _DW_TAPS - size, _DW_TAPS))]


def _window_input(padded, axis, offset, taps, stride, out):
  """The rows (along `axis`) of the zero-padded input that a `taps`-tap window at `offset` of
  the kernel reads for `out` outputs: a VALID convolution of them is that window's."""
  return jax.lax.slice_in_dim(padded, offset, offset + (out - 1) * stride + taps, axis=axis)


def _bwd_weights(x, dy, kernel_size, padding, strides, groups, bias: bool):
  """conv_bwd_weights(_bias): dw [KH,KW,C/groups,O] float32 (and db [O] where bias).

  A depthwise kernel wider than _DW_TAPS is computed as windows of 3 taps a side
  (_depthwise_windows), each the weight gradient of a VALID convolution of the input's padded
  rows and columns it reads: oneDNN's depthwise kernel takes at most 3 taps and 1 row of
  padding a side.
  """
  windows = [_depthwise_windows(k) for k in kernel_size]
  depthwise = groups == x.shape[3] == dy.shape[3]
  if not depthwise or all(len(w) == 1 for w in windows):
    if bias:
      return conv_bwd_weights_bias(x, dy, kernel_size, padding, strides, groups)
    return conv_bwd_weights(x, dy, kernel_size, padding, strides, groups), None
  padded = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  taps = [min(k, _DW_TAPS) for k in kernel_size]
  valid = ((0, 0), (0, 0))
  rows, db = [], None
  for offset_y, keep_y in windows[0]:
    window_rows = _window_input(padded, 1, offset_y, taps[0], strides[0], dy.shape[1])
    row = []
    for offset_x, keep_x in windows[1]:
      window = _window_input(window_rows, 2, offset_x, taps[1], strides[1], dy.shape[2])
      if bias and db is None:
        dw, db = conv_bwd_weights_bias(window, dy, taps, valid, strides, groups)
      else:
        dw = conv_bwd_weights(window, dy, taps, valid, strides, groups)
      row.append(dw[keep_y, keep_x])
    rows.append(jnp.concatenate(row, axis=1))
  return jnp.concatenate(rows, axis=0), db


def conv(x: jax.Array, w: jax.Array, padding='SAME', strides=(1, 1),
         groups: int = 1) -> jax.Array:
  """A convolution, NHWC x HWIO -> NHWC, through oneDNN (forward and both gradients).

  Args:
    x: [N, H, W, C] float32 or bfloat16.
    w: [KH, KW, C / groups, O] of x's dtype, or float32 (rounded to x's dtype in oneDNN).
    padding: 'SAME', 'VALID' or ((top, bottom), (left, right)), each >= 0.
    strides: (stride_h, stride_w) or one int, each >= 1.
    groups: channel groups (lax's feature_group_count); C and O divisible by it.

  Returns:
    [N, OH, OW, O] of x's dtype, OH = (H + top + bottom - KH) // stride_h + 1 (likewise OW).
  """
  _check(x, w, kernel=True)
  strides = _strides(strides)
  return _conv(x, w, _pads(padding, x.shape[1:3], w.shape[:2], strides), strides, int(groups))


# The geometry is static (Python ints): nondiff arguments of the custom_vjp.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, w, padding, strides, groups):
  return conv_fwd(x, w, padding, strides, groups)


def _conv_fwd_rule(x, w, padding, strides, groups):
  return conv_fwd(x, w, padding, strides, groups), (x, w)


def _conv_bwd_rule(padding, strides, groups, residuals, dy):
  x, w = residuals
  dy = dy.astype(x.dtype)
  dx = conv_bwd_data(dy, w, padding, strides, groups, x.shape[1:3])
  dw, _ = _bwd_weights(x, dy, w.shape[:2], padding, strides, groups, bias=False)
  return dx, dw.astype(w.dtype)


_conv.defvjp(_conv_fwd_rule, _conv_bwd_rule)


def conv_bias(x: jax.Array, w: jax.Array, b: jax.Array | None, padding='SAME',
              relu: bool = False, strides=(1, 1), groups: int = 1) -> jax.Array:
  """relu?(conv(x, w) + b): an NHWC x HWIO convolution, its bias and ReLU in oneDNN.

  The bias and the ReLU are applied to the float32 accumulator, so a bfloat16 output is rounded
  once. Gradients: the ReLU's mask (dy where the output > 0) in XLA, then oneDNN's
  backward-data and one backward-weights pass that also gives the bias gradient.

  Args:
    x: [N, H, W, C] float32 or bfloat16.
    w: [KH, KW, C / groups, O] of x's dtype, or float32 (rounded to x's dtype in oneDNN).
    b: [O] of x's dtype, or None: no bias (then `conv`, and relu applied by XLA).
    padding: 'SAME', 'VALID' or ((top, bottom), (left, right)), each >= 0.
    relu: apply max(0, .) to the result.
    strides: (stride_h, stride_w) or one int, each >= 1.
    groups: channel groups (lax's feature_group_count).

  Returns:
    [N, OH, OW, O] of x's dtype (OH, OW as `conv`'s).
  """
  _check(x, w, kernel=True)
  strides = _strides(strides)
  padding = _pads(padding, x.shape[1:3], w.shape[:2], strides)
  if b is None:
    y = _conv(x, w, padding, strides, int(groups))
    return jax.nn.relu(y) if relu else y
  return _conv_bias(x, w, b.astype(x.dtype), padding, bool(relu), strides, int(groups))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _conv_bias(x, w, b, padding, relu, strides, groups):
  return conv_bias_fwd(x, w, b, padding, relu, strides, groups)


def _conv_bias_fwd_rule(x, w, b, padding, relu, strides, groups):
  y = conv_bias_fwd(x, w, b, padding, relu, strides, groups)
  return y, (x, w, y if relu else None)


def _through_relu(dy, y, dtype):
  """The cotangent of the pre-ReLU sum, in the operands' dtype: dy where y > 0 (y None: no
  ReLU)."""
  dy = dy.astype(dtype)
  return dy if y is None else jnp.where(y > 0, dy, jnp.zeros_like(dy))


def _conv_bias_bwd_rule(padding, relu, strides, groups, residuals, dy):
  x, w, y = residuals
  dy = _through_relu(dy, y, x.dtype)
  dx = conv_bwd_data(dy, w, padding, strides, groups, x.shape[1:3])
  dw, db = _bwd_weights(x, dy, w.shape[:2], padding, strides, groups, bias=True)
  return dx, dw.astype(w.dtype), db.astype(x.dtype)  # b was cast to x's dtype.


_conv_bias.defvjp(_conv_bias_fwd_rule, _conv_bias_bwd_rule)


def conv_pair_bias(a: jax.Array, b: jax.Array, w: jax.Array, bias: jax.Array, padding='SAME',
                   relu: bool = False) -> jax.Array:
  """relu?(conv(concatenate([a, b], -1), w) + bias), without the concatenation.

  Two oneDNN calls: conv(a, w[:, :, :Ca]), then conv(b, w[:, :, Ca:]) with the bias, the first's
  result summed in (in place) and the ReLU, all on the accumulator. The gradients are those of
  `conv_bias` on the concatenation, computed per input.

  Args:
    a: [N, H, W, Ca] float32 or bfloat16.
    b: [N, H, W, Cb] of a's dtype.
    w: [KH, KW, Ca + Cb, O] of a's dtype, or float32 (rounded to a's dtype in oneDNN).
    bias: [O].
    padding: 'SAME', 'VALID' or ((top, bottom), (left, right)), each >= 0.
    relu: apply max(0, .) to the result.

  Returns:
    [N, OH, OW, O] of a's dtype.
  """
  _check(a, w, kernel=True)
  _check(b, w, kernel=True)
  if a.shape[:3] != b.shape[:3] or a.shape[3] + b.shape[3] != w.shape[2]:
    raise ValueError(f'unet_flax_onednn: inputs {a.shape} and {b.shape} do not concatenate to '
                     f'the kernel\'s {w.shape[2]} input channels')
  padding = _pads(padding, a.shape[1:3], w.shape[:2])
  return _conv_pair_bias(a, b, w, bias.astype(a.dtype), padding, bool(relu))


def _conv_pair_bias_call(a, b, w, bias, padding, relu):
  partial = conv_fwd(a, w[:, :, :a.shape[3]], padding)
  out = jax.ShapeDtypeStruct(partial.shape, partial.dtype)
  return jax.ffi.ffi_call('unet_onednn_conv_bias_sum_fwd', out, input_output_aliases={3: 0})(
      b, w[:, :, a.shape[3]:], bias, partial, **_attrs(padding), relu=np.int64(relu))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _conv_pair_bias(a, b, w, bias, padding, relu):
  return _conv_pair_bias_call(a, b, w, bias, padding, relu)


def _conv_pair_bias_fwd_rule(a, b, w, bias, padding, relu):
  y = _conv_pair_bias_call(a, b, w, bias, padding, relu)
  return y, (a, b, w, y if relu else None)


def _conv_pair_bias_bwd_rule(padding, relu, residuals, dy):
  a, b, w, y = residuals
  dy = _through_relu(dy, y, a.dtype)
  w_a, w_b = w[:, :, :a.shape[3]], w[:, :, a.shape[3]:]
  da = conv_bwd_data(dy, w_a, padding)
  db = conv_bwd_data(dy, w_b, padding)
  dw_a = conv_bwd_weights(a, dy, w.shape[:2], padding)
  dw_b, dbias = conv_bwd_weights_bias(b, dy, w.shape[:2], padding)
  dw = jnp.concatenate([dw_a, dw_b], axis=2)
  return da, db, dw.astype(w.dtype), dbias.astype(a.dtype)  # bias was cast to a's dtype.


_conv_pair_bias.defvjp(_conv_pair_bias_fwd_rule, _conv_pair_bias_bwd_rule)


def layer(x, kernel: jax.Array, bias: jax.Array | None, padding, relu: bool = False,
          strides=(1, 1), groups: int = 1) -> jax.Array:
  """unet-flax's layer function (layers.LayerFunction): `conv_bias` (or `conv_pair_bias` for a
  pair of inputs to concatenate along channels, with a zero bias where there is none) where
  oneDNN covers the operands (inputs of one dtype of `dtypes()`: float32, and bfloat16 on CPUs
  with AVX-512; the kernel of their dtype or float32), else XLA's concatenation, convolution,
  bias and ReLU in the inputs' dtype."""
  inputs = tuple(x) if isinstance(x, (tuple, list)) else (x,)
  dtype = inputs[0].dtype
  covered = all(v.dtype == dtype and v.ndim == 4 for v in inputs) and (
      dtype in dtypes() and kernel.dtype in (dtype, jnp.float32) and kernel.ndim == 4)
  strides = _strides(strides)
  if covered and len(inputs) == 2 and strides == (1, 1) and groups == 1:
    if bias is None:  # Group norm's blocks: the fused call needs one; adding 0 changes nothing.
      bias = jnp.zeros(kernel.shape[3], dtype)
    return conv_pair_bias(*inputs, kernel, bias, padding, relu)
  x = inputs[0] if len(inputs) == 1 else jnp.concatenate(inputs, axis=-1)
  if covered:
    return conv_bias(x, kernel, bias, padding, relu, strides, groups)
  y = jax.lax.conv_general_dilated(x, kernel.astype(dtype), strides, padding,
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                   feature_group_count=groups)
  if bias is not None:
    # Added in float32, as oneDNN adds it, so that its gradient is summed in float32: a bfloat16
    # sum stops growing at 256 for a sum of ones (unet-flax's layers.add_bias has the same reason).
    y = (y.astype(jnp.float32) + bias.astype(jnp.float32)).astype(dtype)
  return jax.nn.relu(y) if relu else y


def implementation(pass_: str, dtype, n, h, w, c, o, kh=3, kw=3, padding=None, strides=(1, 1),
                   groups: int = 1) -> str:
  """The oneDNN implementation (e.g. 'brg_conv_fwd:avx512_core') a pass uses at a shape
  (input [n, h, w, c], kernel [kh, kw, c / groups, o]), or 'error: ' and oneDNN's reason where it
  has none (a bfloat16 convolution on a CPU without AVX-512)."""
  strides = _strides(strides)
  (pt, pb), (pl, pr) = _pads('SAME' if padding is None else padding, (h, w), (kh, kw), strides)
  bf16 = int(jnp.dtype(dtype) == jnp.bfloat16)
  return _LIB.unet_onednn_impl(_PASSES[pass_], bf16, n, h, w, c, o, kh, kw, pt, pb, pl, pr,
                               *strides, groups).decode()
