"""The layers under every model: one convolution contract, its XLA and oneDNN backends, and the
XLA:CPU kernels the U-Net is made of.

Every convolution of a model goes through one *layer function* (`LayerFunction`): relu?(conv(x,
kernel) + bias), strided or grouped (depthwise) where the model asks. `xla_layer` is XLA's, on
every platform; the optional extension ext/unet_flax_onednn provides oneDNN's, which computes the
bias and the ReLU inside the convolution. Which one runs is a setting of the process, decided once
(`select_backend`, the tools' --conv_backend flag), not of a run: the parameters do not depend on
it, so a checkpoint trained on one backend restores, evaluates and predicts on the other.

The rest are the pieces whose XLA:CPU forms are slow and are written here in a faster form with
the same values and gradients: `add_bias` (its bias gradient summed in float32), `max_pool_2x2`
(nn.max_pool's gradient as elementwise masks), `concatenate_channels` (bfloat16 skips as bit
patterns), `Upsample` (nn.ConvTranspose as four phase convolutions) and `Conv` (nn.Conv's
parameters, one layer-function call).
"""

import functools
import importlib
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp

from unet_flax import errors

BACKENDS = ('auto', 'xla', 'onednn')
ONEDNN_MODULE = 'unet_flax_onednn'  # The optional extension: pip install ./ext/unet_flax_onednn


class LayerFunction(Protocol):
  """A convolution with its optional bias and ReLU, NHWC x HWIO, as lax.conv_general_dilated.

  Args:
    x: [N, H, W, C], or a pair ([N, H, W, Ca], [N, H, W, Cb]) to concatenate along channels
      (a decoder's [upsampled, skip]; oneDNN convolves each with its part of the kernel).
    kernel: [KH, KW, C / groups, O] (C = Ca + Cb for a pair), of x's dtype or float32 (the
      parameters as stored: computed in x's dtype, rounded to it as `astype` rounds; its
      gradient is float32 then).
    bias: [O] of x's dtype or float32, or None.
    padding: ((top, bottom), (left, right)) zeros, or 'SAME' / 'VALID'.
    relu: apply max(0, .) to the result.
    strides: (stride_h, stride_w).
    groups: channel groups (lax's feature_group_count; C and O divisible by it): output channel
      o sees the input channels of group o // (O / groups). A depthwise convolution has
      groups = C = O.

  Returns:
    relu?(conv(x, kernel) + bias): [N, (H + top + bottom - KH) // stride_h + 1,
    (W + left + right - KW) // stride_w + 1, O] of x's dtype.
  """

  def __call__(self, x: jax.Array | tuple[jax.Array, jax.Array], kernel: jax.Array,
               bias: jax.Array | None, padding, relu: bool = False,
               strides: tuple[int, int] = (1, 1), groups: int = 1) -> jax.Array:
    ...

# Keras's defaults, which the chapter relies on: glorot-uniform kernels and zero biases.
kernel_init = nn.initializers.glorot_uniform()
bias_init = nn.initializers.zeros


def xla_layer(x: jax.Array | tuple[jax.Array, jax.Array], kernel: jax.Array,
              bias: jax.Array | None, padding, relu: bool = False,
              strides: tuple[int, int] = (1, 1), groups: int = 1) -> jax.Array:
  """relu?(conv(x, kernel) + bias) in XLA: the `LayerFunction` of every platform (arguments and
  result as LayerFunction's; a pair is joined by `concatenate_channels`)."""
  if isinstance(x, tuple):
    x = concatenate_channels(*x)
  y = jax.lax.conv_general_dilated(x, kernel.astype(x.dtype), tuple(strides), padding,
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                   feature_group_count=groups)
  if bias is not None:
    y = add_bias(y, bias.astype(x.dtype))
  return nn.relu(y) if relu else y


@jax.custom_vjp
def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
  """y [..., C] + bias [C], whose bias gradient is summed in float32 whatever the dtype.

  Autodiff's sum of a bfloat16 gradient may accumulate in bfloat16 on XLA:CPU, which stops
  growing at 256 for a sum of ones: a bias gradient over B x H x W pixels came out wrong.
  """
  return y + bias


def _add_bias_fwd(y, bias):
  return y + bias, jnp.zeros((0,), bias.dtype)  # An empty array: bias's dtype, for its gradient.


def _add_bias_bwd(bias_dtype, dy):
  db = jnp.sum(dy.astype(jnp.float32), axis=tuple(range(dy.ndim - 1)))
  return dy, db.astype(bias_dtype.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


def _onednn_layer() -> LayerFunction | None:
  """The extension's layer function, or None where it is not installed or cannot load."""
  try:
    return importlib.import_module(ONEDNN_MODULE).layer
  except ImportError:
    return None


def _onednn_missing() -> str:
  """Why `_onednn_layer` is None: the extension is not installed, or its ImportError (installed
  without its library: no C++ compiler, not x86-64 Linux)."""
  try:
    importlib.import_module(ONEDNN_MODULE)
  except ImportError as e:
    if isinstance(e, ModuleNotFoundError) and e.name == ONEDNN_MODULE:
      return ('which is not installed: install it as docs/speed.md says (oneDNN convolutions on '
              'CPUs)')
    return f'which does not load here ({e})'
  return 'which imports here but has no layer function'


def resolve_backend(requested: str = 'auto') -> str:
  """'xla' or 'onednn': the convolutions that `requested` ('auto', 'xla', 'onednn') gives here.

  'auto' takes oneDNN where the extension is installed and jax runs on one CPU device (a
  custom call is not partitioned: over several devices XLA would gather the batch onto each).
  GPUs and TPUs never take it.

  Raises:
    UserError: an unknown name, or 'onednn' where the backend is not CPU or the extension is
      missing.
  """
  if requested not in BACKENDS:
    raise errors.UserError(f'--conv_backend={requested!r} is not one of {", ".join(BACKENDS)}')
  if requested == 'xla':
    return 'xla'
  platform = jax.default_backend()
  if requested == 'auto':
    return 'onednn' if platform == 'cpu' and jax.device_count() == 1 and _onednn_layer() else 'xla'
  if platform != 'cpu':
    raise errors.UserError(f"--conv_backend=onednn runs on CPUs only, and jax's backend here is "
                           f"{platform}; use auto or xla")
  if _onednn_layer() is None:
    raise errors.UserError(f'--conv_backend=onednn needs the extension ext/unet_flax_onednn, '
                           f'{_onednn_missing()}; or use auto or xla')
  return 'onednn'


_selected: str | None = None  # The process's backend, once decided.


def select_backend(requested: str = 'auto') -> str:
  """Decides the process's convolutions (`resolve_backend`) and returns 'xla' or 'onednn'.

  The tools call it once, from their --conv_backend flag, before anything is read or written;
  a later call replaces the choice (tests compare the two backends).
  """
  global _selected
  _selected = resolve_backend(requested)
  return _selected


def _onednn_covers(dtype) -> bool:
  """Whether the extension convolves `dtype` on this CPU (its dtypes(): float32, and bfloat16
  with AVX-512)."""
  return jnp.dtype(dtype) in importlib.import_module(ONEDNN_MODULE).dtypes()


def backend(dtype=None) -> str:
  """The process's convolutions: those `select_backend` chose, else 'auto''s; of `dtype` (a
  config.dtype), 'xla' where oneDNN has no convolution of it on this CPU (bfloat16 on a CPU
  without AVX-512)."""
  chosen = _selected or select_backend('auto')
  if chosen == 'onednn' and dtype is not None and not _onednn_covers(dtype):
    return 'xla'
  return chosen


def convolutions(dtype) -> str:
  """`backend(dtype)` in words, for logs: 'xla convolutions', 'onednn convolutions', or why a
  process that chose oneDNN convolves `dtype` with XLA."""
  name = backend(dtype)
  if name != backend():
    return f"{name} convolutions (this CPU's oneDNN has no {jnp.dtype(dtype).name} ones)"
  return f'{name} convolutions'


def layer_function(name: str | None = None, dtype=None) -> LayerFunction:
  """The layer function of backend `name` ('xla' or 'onednn'; None: the process's) for `dtype`
  (a config.dtype; None: any): XLA's where oneDNN has no convolution of that dtype here."""
  name = name or backend()
  if name == 'onednn' and (dtype is None or _onednn_covers(dtype)):
    return _onednn_layer()
  return xla_layer



class Upsample(nn.Module):
  """`nn.ConvTranspose(features, (3, 3), strides=(2, 2), padding='SAME')`, computed fast.

  Same parameters (`kernel` [3, 3, C, F], `bias` [F]) and the same outputs and gradients, but
  no zero is ever multiplied. Along each spatial axis the transposed convolution (kernel not
  flipped, as `nn.ConvTranspose` computes it) gives

      y[2m] = k[0] x[m-1] + k[2] x[m],    y[2m+1] = k[1] x[m],

  so each of the four output phases (even/odd row x even/odd column) is a small stride-1
  convolution of x with taps of the kernel (2x2, 2x1, 1x2 and 1x1: the 9 taps once each), and
  the phases are interleaved. On XLA:CPU the gradient of the input-dilated convolution behind
  nn.ConvTranspose is about 20x slower than that of these plain ones.
  """

  features: int
  dtype: Any = None
  param_dtype: Any = jnp.float32
  layer: LayerFunction = xla_layer

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, C] -> [B, 2H, 2W, features]."""
    kernel = self.param('kernel', kernel_init, (3, 3, x.shape[-1], self.features),
                        self.param_dtype)
    bias = self.param('bias', bias_init, (self.features,), self.param_dtype)
    # The kernel and bias as stored: the layer function computes in x's dtype.
    x, = nn.dtypes.promote_dtype(
        x, dtype=nn.dtypes.canonicalize_dtype(x, kernel, bias, dtype=self.dtype))
    # Per axis and output phase, the kernel taps and the padding: the even phase takes
    # (k[0], k[2]) over (x[m-1], x[m]), so it is padded by one in front; the odd one k[1] over x[m].
    # Static slices, not index arrays: an index array is a gather, whose gradient is a scatter-add.
    taps = (slice(0, 3, 2), slice(1, 2))
    pads = ((1, 0), (0, 0))
    # Each output pixel is in one phase: the bias is added to each (inside oneDNN's call).
    phases = [[self.layer(x, kernel[taps[py]][:, taps[px]], bias, (pads[py], pads[px]))
               for px in (0, 1)] for py in (0, 1)]
    # [B, H, (py), W, (px), F] -> [B, 2H, 2W, F].
    y = jnp.stack([jnp.stack(row, axis=3) for row in phases], axis=2)
    b, h, _, w, _, f = y.shape
    return y.reshape(b, 2 * h, 2 * w, f)


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
  """`nn.max_pool(x, (2, 2), strides=(2, 2))` for even H, W, as a reshape and a max.

  The same values and gradients, ties included: each window's gradient goes to its first
  maximum in row-major order, as nn.max_pool's select-and-scatter gives it. Here the gradient is
  elementwise masks over the windows, where XLA's select-and-scatter costs about 3x as much on
  CPU, and jnp.max's own gradient shares it among ties through a sum and a division.

  Args:
    x: [B, H, W, C] with even H and W.

  Returns:
    [B, H/2, W/2, C].
  """
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _max_pool_2x2_fwd(x):
  y = max_pool_2x2(x)
  return y, (x, y)


def _max_pool_2x2_bwd(residuals, dy):
  x, y = residuals
  # Per window position (0, 0), (0, 1), (1, 0), (1, 1) in row-major order: that position's
  # pixels of every window ([B, H/2, W/2, C], strided slices), where the window's first maximum
  # is. Masks at the pooled size, then the four phases interleaved, as in Upsample: a 6-D mask
  # over [B, H/2, 2, W/2, 2, C] made XLA:CPU's fusion 3-6x slower.
  taken = None
  phases = []
  for i in (0, 1):
    row = []
    for j in (0, 1):
      is_max = x[:, i::2, j::2] == y
      first = is_max if taken is None else is_max & ~taken
      taken = is_max if taken is None else taken | is_max
      row.append(jnp.where(first, dy, jnp.zeros((), dy.dtype)))
    phases.append(jnp.stack(row, axis=3))  # [B, H/2, W/2, (j), C]
  return (jnp.stack(phases, axis=2).reshape(x.shape),)  # [B, H/2, (i), W/2, (j), C]


max_pool_2x2.defvjp(_max_pool_2x2_fwd, _max_pool_2x2_bwd)


@jax.custom_vjp
def _concatenate_bf16_channels(a: jax.Array, b: jax.Array) -> jax.Array:
  as_bits = functools.partial(jax.lax.bitcast_convert_type, new_dtype=jnp.uint16)
  joined = jnp.concatenate([as_bits(a), as_bits(b)], axis=-1)
  return jax.lax.bitcast_convert_type(joined, jnp.bfloat16)


def _concatenate_bf16_channels_fwd(a, b):
  return _concatenate_bf16_channels(a, b), a.shape[-1]


def _concatenate_bf16_channels_bwd(channels_a, dy):
  bits = jax.lax.bitcast_convert_type(dy.astype(jnp.bfloat16), jnp.uint16)
  return tuple(jax.lax.bitcast_convert_type(part, jnp.bfloat16)
               for part in (bits[..., :channels_a], bits[..., channels_a:]))


_concatenate_bf16_channels.defvjp(_concatenate_bf16_channels_fwd, _concatenate_bf16_channels_bwd)


def concatenate_channels(a: jax.Array, b: jax.Array) -> jax.Array:
  """`jnp.concatenate([a, b], axis=-1)`, the decoder's skip connection; the same values and
  gradients.

  bfloat16 operands are joined as their uint16 bit patterns: XLA:CPU widens a bfloat16
  concatenation (and the slices of its gradient) to float32 and back, which made it 4x slower.

  Args:
    a: [..., Ca].
    b: [..., Cb] of a's dtype and leading shape.

  Returns:
    [..., Ca + Cb].
  """
  if a.dtype == b.dtype == jnp.bfloat16:
    return _concatenate_bf16_channels(a, b)
  return jnp.concatenate([a, b], axis=-1)


class Conv(nn.Module):
  """A stride-1 'SAME' convolution with its bias and, optionally, a ReLU: nn.Conv's parameters.

  The same parameters as `nn.Conv(features, kernel_size, padding='SAME')` (`kernel` [KH, KW, C,
  features], Keras's glorot-uniform; `bias` [features], zeros; created in that order, so with
  the same values), computed by `layer` in one call, which lets oneDNN apply the bias and the
  ReLU inside the convolution.
  """

  features: int
  kernel_size: tuple[int, int] = (3, 3)
  use_bias: bool = True
  relu: bool = False
  dtype: Any = None
  param_dtype: Any = jnp.float32
  layer: LayerFunction = xla_layer

  @nn.compact
  def __call__(self, x: jax.Array, skip: jax.Array | None = None) -> jax.Array:
    """x: [B, H, W, C] -> [B, H, W, features]; with skip [B, H, W, Cs], the convolution of
    their concatenation [x, skip] along channels (the kernel has C + Cs input channels)."""
    channels = x.shape[-1] + (0 if skip is None else skip.shape[-1])
    kernel = self.param('kernel', kernel_init, (*self.kernel_size, channels, self.features),
                        self.param_dtype)
    bias = (self.param('bias', bias_init, (self.features,), self.param_dtype) if self.use_bias
            else None)
    # The kernel and bias as stored: the layer function computes in x's dtype.
    x, skip = nn.dtypes.promote_dtype(
        x, skip, dtype=nn.dtypes.canonicalize_dtype(x, skip, kernel, bias, dtype=self.dtype))
    padding = tuple(jax.lax.padtype_to_pads(x.shape[1:3], self.kernel_size, (1, 1), 'SAME'))
    return self.layer(x if skip is None else (x, skip), kernel, bias, padding, self.relu)
