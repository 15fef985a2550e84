"""The U-Net of the chapter, in Flax linen, and its forward pass on uint8 images.

Nothing here knows about data or training: `UNet` maps images [B, H, W, 3] to per-class logits
[B, H, W, num_classes]; the softmax belongs to the loss. `create(config)` builds it from a run's
config, `init_params` gives its parameters (or only their shapes, under jax.eval_shape) and
`logits` is the forward pass that training, evaluation, predict and export share.

Every convolution goes through one function, the module attribute `conv` (jax.lax's
conv_general_dilated signature): XLA's, or oneDNN's where the optional extension
ext/unet_flax_onednn is installed (`conv_function(config)`, config.conv_backend). The parameters
do not depend on it: a checkpoint trained on one path restores and predicts on the other.
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


ConvFunction = Callable[..., jax.Array]  # jax.lax.conv_general_dilated's signature.
ONEDNN_MODULE = 'unet_flax_onednn'  # The optional extension: pip install ./ext/unet_flax_onednn


def _onednn_conv() -> ConvFunction | None:
  """The extension's conv_general_dilated, or None where it is not installed."""
  try:
    return importlib.import_module(ONEDNN_MODULE).conv_general_dilated
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
    return 'onednn' if platform == 'cpu' and jax.device_count() == 1 and _onednn_conv() else 'xla'
  if platform != 'cpu':
    raise errors.UserError(f"config.conv_backend='onednn' runs on CPUs only, and jax's backend "
                           f"here is {platform}; use 'auto' or 'xla'")
  if _onednn_conv() is None:
    raise errors.UserError("config.conv_backend='onednn' needs the extension: pip install "
                           "./ext/unet_flax_onednn (README, Speed), or use 'auto' or 'xla'")
  return 'onednn'


def conv_function(config: ml_collections.ConfigDict) -> ConvFunction:
  """The convolution of `conv_backend(config)`, for `UNet(conv=...)`."""
  if conv_backend(config) == 'onednn':
    return _onednn_conv()
  return jax.lax.conv_general_dilated


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
  conv: ConvFunction = jax.lax.conv_general_dilated

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
    phases = [[self.conv(x, kernel[taps[py]][:, taps[px]], (1, 1), (pads[py], pads[px]),
                         dimension_numbers=('NHWC', 'HWIO', 'NHWC')) for px in (0, 1)]
              for py in (0, 1)]
    # [B, H, (py), W, (px), F] -> [B, 2H, 2W, F].
    y = jnp.stack([jnp.stack(row, axis=3) for row in phases], axis=2)
    b, h, _, w, _, f = y.shape
    return y.reshape(b, 2 * h, 2 * w, f) + bias


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """`nn.max_pool(x, (2, 2), strides=(2, 2))` for even H, W, as a reshape and a max.

  The same values; its gradient is an elementwise select, where `nn.max_pool`'s is XLA's
  select-and-scatter, which costs about 3x as much on CPU. (At ties within a window, which after
  a ReLU are zeros whose gradient is zero anyway, the gradient is shared instead of picked.)

  Args:
    x: [B, H, W, C] with even H and W.

  Returns:
    [B, H/2, W/2, C].
  """
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


GROUP_NORM_GROUPS = 32  # Wu & He, "Group Normalization" (ECCV 2018): 32 groups of channels.


def num_groups(features: int) -> int:
  """Group norm's groups for `features` channels: 32, or the largest divisor of both below it."""
  return math.gcd(GROUP_NORM_GROUPS, features)


class ConvBlock(nn.Module):
  """Two 3x3 'same' convolutions, each followed by a ReLU (the chapter's block).

  With normalization='group' each convolution is followed by group normalization before its
  ReLU (`num_groups(features)` groups, a learnt scale and offset per channel) and has no bias of
  its own, which the normalization's offset would cancel.
  """

  features: int
  dtype: Any = None
  conv: ConvFunction = jax.lax.conv_general_dilated
  normalization: str = 'none'

  @nn.compact
  def __call__(self, x):
    normalize = self.normalization == 'group'
    for i in range(2):
      x = nn.Conv(self.features, (3, 3), padding='SAME', use_bias=not normalize,
                  kernel_init=kernel_init, bias_init=bias_init, dtype=self.dtype,
                  conv_general_dilated=self.conv, name=f'Conv_{i}')(x)
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
    conv: every convolution's function (`conv_function`); not a parameter: the same params fit
      XLA's and oneDNN's. nn.ConvTranspose (fast_upsample=False) always runs in XLA.
  """

  num_classes: int = 3
  widths: Sequence[int] = (64, 128, 256)
  dropout_rate: float = 0.5
  dtype: Any = jnp.float32
  fast_upsample: bool = True
  conv: ConvFunction = jax.lax.conv_general_dilated
  normalization: str = 'none'

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
    """images: [B, H, W, 3] float in [0, 1], H and W divisible by 2**len(widths).

    Returns:
      logits: [B, H, W, num_classes] float32.
    """
    x = images.astype(self.dtype)
    block = functools.partial(ConvBlock, dtype=self.dtype, conv=self.conv,
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
        x = Upsample(width, dtype=self.dtype, conv=self.conv, name=f'upsample_{i}')(x)
      else:
        x = nn.ConvTranspose(width, (3, 3), strides=(2, 2), padding='SAME',
                             kernel_init=kernel_init, bias_init=bias_init,
                             dtype=self.dtype, name=f'upsample_{i}')(x)
      x = jnp.concatenate([x, skip], axis=-1)
      x = block(width, name=f'up_{i}')(x)
    x = nn.Conv(self.num_classes, (1, 1), kernel_init=kernel_init, bias_init=bias_init,
                dtype=self.dtype, conv_general_dilated=self.conv, name='logits')(x)
    return x.astype(jnp.float32)


def param_count(params) -> int:
  return sum(p.size for p in jax.tree_util.tree_leaves(params))


def create(config: ml_collections.ConfigDict) -> UNet:
  """The U-Net of a run's config (widths, num_classes, dropout_rate, dtype, normalization,
  conv_backend)."""
  return UNet(num_classes=config.num_classes, widths=tuple(config.widths),
              dropout_rate=config.dropout_rate, dtype=jnp.dtype(config.dtype),
              normalization=config.normalization, conv=conv_function(config))


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
