"""The U-Net of the chapter, in Flax linen, and its forward pass on uint8 images.

Nothing here knows about data or training: `UNet` maps images [B, H, W, 3] to per-class logits
[B, H, W, num_classes]; the softmax belongs to the loss. `create(config)` builds it from a run's
config, `init_params` gives its parameters (or only their shapes, under jax.eval_shape) and
`logits` is the forward pass that training, evaluation, predict and export share.

Every convolution goes through one function, the module attribute `layer` (`LayerFunction`:
a stride-1 convolution with its optional bias and ReLU): XLA's (`xla_layer`), or oneDNN's where
the optional extension ext/unet_flax_onednn is installed (`layer_function(config)`,
config.conv_backend), which computes the bias and ReLU inside the convolution. The parameters do
not depend on it: a checkpoint trained on one path restores and predicts on the other.
"""

import functools
import importlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from unet_flax import errors

# Keras's defaults, which the chapter relies on: glorot-uniform kernels and zero biases.
kernel_init = nn.initializers.glorot_uniform()
bias_init = nn.initializers.zeros


# (x [N, H, W, C] or a tuple of inputs concatenated along channels, kernel [KH, KW, C, O], bias
# [O] or None, padding ((top, bottom), (left, right)), relu) -> relu?(conv(x, kernel) + bias)
# [N, OH, OW, O], stride 1, NHWC x HWIO.
LayerFunction = Callable[..., jax.Array]
ONEDNN_MODULE = 'unet_flax_onednn'  # The optional extension: pip install ./ext/unet_flax_onednn


def xla_layer(x: jax.Array | tuple[jax.Array, jax.Array], kernel: jax.Array,
              bias: jax.Array | None, padding, relu: bool = False) -> jax.Array:
  """relu?(conv(x, kernel) + bias) in XLA: the `LayerFunction` of every platform.

  Args:
    x: [N, H, W, C], or a pair ([N, H, W, Ca], [N, H, W, Cb]) to concatenate along channels
      (`concatenate_channels`; oneDNN's layer convolves each with its part of the kernel).
    kernel: [KH, KW, C, O] of x's dtype.
    bias: [O] of x's dtype, or None.
    padding: ((top, bottom), (left, right)) zeros, or 'SAME' / 'VALID'.
    relu: apply max(0, .) to the result.

  Returns:
    [N, H + top + bottom - KH + 1, W + left + right - KW + 1, O] of x's dtype.
  """
  if isinstance(x, tuple):
    x = concatenate_channels(*x)
  y = jax.lax.conv_general_dilated(x, kernel, (1, 1), padding,
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  if bias is not None:
    y = add_bias(y, bias)
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
  """The extension's layer function, or None where it is not installed."""
  try:
    return importlib.import_module(ONEDNN_MODULE).layer
  except ImportError:
    return None


def conv_backend(config: ml_collections.ConfigDict) -> str:
  """'xla' or 'onednn': the convolutions that config.conv_backend asks for on this process.

  'auto' takes oneDNN where the extension is installed and jax runs on one CPU device (a
  custom call is not partitioned: over several devices XLA would gather the batch onto each).
  GPUs and TPUs never take it.

  Raises:
    UserError: 'onednn' asked for where the backend is not CPU or the extension is missing.
  """
  backend = config.conv_backend
  if backend == 'xla':
    return 'xla'
  platform = jax.default_backend()
  if backend == 'auto':
    return 'onednn' if platform == 'cpu' and jax.device_count() == 1 and _onednn_layer() else 'xla'
  if platform != 'cpu':
    raise errors.UserError(f"config.conv_backend='onednn' runs on CPUs only, and jax's backend "
                           f"here is {platform}; use 'auto' or 'xla'")
  if _onednn_layer() is None:
    raise errors.UserError("config.conv_backend='onednn' needs the extension "
                           "ext/unet_flax_onednn, which is not installed: build it as the README "
                           "says (Speed, oneDNN convolutions on CPUs), or use 'auto' or 'xla'")
  return 'onednn'


def layer_function(config: ml_collections.ConfigDict) -> LayerFunction:
  """The convolutions of `conv_backend(config)`, for `UNet(layer=...)`."""
  if conv_backend(config) == 'onednn':
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
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
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
  b, h, w, c = x.shape
  is_max = x.reshape(b, h // 2, 2, w // 2, 2, c) == y[:, :, None, :, None, :]
  taken = jnp.zeros(y.shape, bool)
  first = []  # Per window position (0, 0), (0, 1), (1, 0), (1, 1): the window's first maximum.
  for i in (0, 1):
    for j in (0, 1):
      first.append(is_max[:, :, i, :, j] & ~taken)
      taken = taken | first[-1]
  mask = jnp.stack([jnp.stack(first[:2], axis=3), jnp.stack(first[2:], axis=3)], axis=2)
  dx = jnp.where(mask, dy[:, :, None, :, None, :], jnp.zeros((), dy.dtype))
  return (dx.reshape(x.shape),)


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


GROUP_NORM_GROUPS = 32  # Wu & He, "Group Normalization" (ECCV 2018): 32 groups of channels.


def num_groups(features: int) -> int:
  """Group norm's groups for `features` channels: 32, or the largest divisor of both below it."""
  return math.gcd(GROUP_NORM_GROUPS, features)


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
    x, skip, kernel, bias = nn.dtypes.promote_dtype(x, skip, kernel, bias, dtype=self.dtype)
    padding = tuple(jax.lax.padtype_to_pads(x.shape[1:3], self.kernel_size, (1, 1), 'SAME'))
    return self.layer(x if skip is None else (x, skip), kernel, bias, padding, self.relu)


class ConvBlock(nn.Module):
  """Two 3x3 'same' convolutions, each followed by a ReLU (the chapter's block).

  With normalization='group' each convolution is followed by group normalization before its
  ReLU (`num_groups(features)` groups, a learnt scale and offset per channel) and has no bias of
  its own, which the normalization's offset would cancel.
  """

  features: int
  dtype: Any = None
  layer: LayerFunction = xla_layer
  normalization: str = 'none'

  @nn.compact
  def __call__(self, x, skip=None):
    """x: [B, H, W, C] (and a skip [B, H, W, Cs], concatenated after x) -> [B, H, W, features]."""
    normalize = self.normalization == 'group'
    for i in range(2):
      x = Conv(self.features, (3, 3), use_bias=not normalize, relu=not normalize,
               dtype=self.dtype, layer=self.layer, name=f'Conv_{i}')(x, skip if i == 0 else None)
      if normalize:
        x = nn.GroupNorm(num_groups=num_groups(self.features), dtype=self.dtype,
                         name=f'GroupNorm_{i}')(x)
        x = nn.relu(x)
    return x


class UNet(nn.Module):
  """Encoder of ConvBlocks and 2x2 max-pools, a bottleneck, decoder of upsample + skip + ConvBlock.

  Attributes:
    num_classes: logits per pixel.
    widths: features of each encoder block, outermost first; the bottleneck has twice the last.
    dropout_rate: dropout after the bottleneck.
    dtype: compute dtype (parameters stay float32); logits are returned as float32.
    fast_upsample: `Upsample` instead of `nn.ConvTranspose` (same parameters and results).
    normalization: 'none' (the chapter's model) or 'group': group norm after every 3x3
      convolution of the blocks (ConvBlock).
    layer: every convolution's function (`layer_function`); not a parameter: the same params
      fit XLA's and oneDNN's. nn.ConvTranspose (fast_upsample=False) always runs in XLA.
  """

  num_classes: int = 3
  widths: Sequence[int] = (64, 128, 256)
  dropout_rate: float = 0.5
  dtype: Any = jnp.float32
  fast_upsample: bool = True
  layer: LayerFunction = xla_layer
  normalization: str = 'none'

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
    """images: [B, H, W, 3] float in [0, 1], H and W divisible by 2**len(widths).

    Returns:
      logits: [B, H, W, num_classes] float32.
    """
    x = images.astype(self.dtype)
    block = functools.partial(ConvBlock, dtype=self.dtype, layer=self.layer,
                              normalization=self.normalization)
    skips = []
    for i, width in enumerate(self.widths):
      x = block(width, name=f'down_{i}')(x)
      skips.append(x)
      x = max_pool_2x2(x)
    x = block(2 * self.widths[-1], name='bottleneck')(x)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    for i, (width, skip) in reversed(list(enumerate(zip(self.widths, skips)))):
      if self.fast_upsample:
        x = Upsample(width, dtype=self.dtype, layer=self.layer, name=f'upsample_{i}')(x)
      else:
        x = nn.ConvTranspose(width, (3, 3), strides=(2, 2), padding='SAME',
                             kernel_init=kernel_init, bias_init=bias_init,
                             dtype=self.dtype, name=f'upsample_{i}')(x)
      x = block(width, name=f'up_{i}')(x, skip)  # The block's first conv sees [x, skip].
    x = Conv(self.num_classes, (1, 1), dtype=self.dtype, layer=self.layer, name='logits')(x)
    return x.astype(jnp.float32)


def param_count(params) -> int:
  return sum(p.size for p in jax.tree_util.tree_leaves(params))


def create(config: ml_collections.ConfigDict) -> UNet:
  """The U-Net of a run's config (widths, num_classes, dropout_rate, dtype, normalization,
  conv_backend)."""
  return UNet(num_classes=config.num_classes, widths=tuple(config.widths),
              dropout_rate=config.dropout_rate, dtype=jnp.dtype(config.dtype),
              normalization=config.normalization, layer=layer_function(config))


def init_params(config: ml_collections.ConfigDict, rng: jax.Array):
  """The initial parameters of `create(config)` for config.image_size inputs.

  Under `jax.eval_shape` it computes nothing: the shapes alone, to restore a checkpoint into.
  """
  images = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
  return create(config).init(rng, images, train=False)['params']


def normalize(images: jax.Array) -> jax.Array:
  """uint8 [B, H, W, 3] -> float32 in [0, 1]. Done on the device: a quarter of the transfer."""
  return images.astype(jnp.float32) / 255.0


def logits(model: UNet, params, images: jax.Array, *, train: bool = False,
           rngs=None) -> jax.Array:
  """images: [B, H, W, 3] uint8 -> logits [B, H, W, K] float32 (dropout only with train=True)."""
  return model.apply({'params': params}, normalize(images), train=train, rngs=rngs)


def flip_tta_logits(logits_fn: Callable[[jax.Array], jax.Array], images: jax.Array) -> jax.Array:
  """Flip test-time augmentation: the log of the mean softmax of the images and their mirrors.

  The network sees each image and its left-right mirror; the mirror's probabilities are flipped
  back before the mean, so twice the compute. Computed as a logsumexp of the log-softmaxes,
  which is log(mean) without a log(0) where a probability underflows.

  Args:
    logits_fn: images -> logits [B, H, W, K] float32, e.g. functools.partial(logits, model,
      params) on uint8 images or a module's apply on float ones.
    images: [B, H, W, C] of the dtype logits_fn takes (uint8 or float).

  Returns:
    [B, H, W, K] float32: log((softmax(f(x)) + flip(softmax(f(flip(x))))) / 2), flip reversing
    the width axis (2). Its softmax is the mean probability; its argmax, that mean's.
  """
  plain = jax.nn.log_softmax(logits_fn(images), axis=-1)
  mirrored = jax.nn.log_softmax(logits_fn(jnp.flip(images, axis=2)), axis=-1)
  return jnp.logaddexp(plain, jnp.flip(mirrored, axis=2)) - jnp.log(2.0)
