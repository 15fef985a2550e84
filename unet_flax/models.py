"""The U-Net of the chapter, in Flax linen.

Nothing here knows about data or training: `UNet` maps images [B, H, W, 3] to per-class logits
[B, H, W, num_classes]; the softmax belongs to the loss.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# Keras's defaults, which the chapter relies on: glorot-uniform kernels and zero biases.
kernel_init = nn.initializers.glorot_uniform()
bias_init = nn.initializers.zeros


def _phase_kernel(kernel: jax.Array) -> jax.Array:
  """The 3x3 stride-2 transposed-conv kernel as a 2x2 conv kernel with 4x the outputs.

  `lax.conv_transpose(x, k, (2, 2), 'SAME')` (what `nn.ConvTranspose` computes, kernel not
  flipped) gives, along each spatial axis, y[2m] = k[0] x[m-1] + k[2] x[m] and
  y[2m+1] = k[1] x[m]. A 2x2 window over x padded by one in front sees (x[m-1], x[m]), so
  tap 0 carries (k[0], 0) and tap 1 carries (k[2], k[1]) for the (even, odd) output phases.

  Args:
    kernel: [3, 3, C, F].

  Returns:
    [2, 2, C, 4F], the output channels ordered (phase_y, phase_x, F).
  """
  zero = jnp.zeros_like(kernel[0])
  # [tap, phase, ...] along one axis: tap 0 = x[m-1], tap 1 = x[m].
  rows = jnp.stack([jnp.stack([kernel[0], zero]), jnp.stack([kernel[2], kernel[1]])])
  zero = jnp.zeros_like(rows[:, :, 0])
  cols = lambda i: rows[:, :, i]  # [ty, py, C, F] for kernel column i.
  taps = jnp.stack([jnp.stack([cols(0), zero]), jnp.stack([cols(2), cols(1)])])
  # taps: [tx, px, ty, py, C, F] -> [ty, tx, C, py, px, F].
  taps = taps.transpose(2, 0, 4, 3, 1, 5)
  c, f = kernel.shape[2:]
  return taps.reshape(2, 2, c, 4 * f)


class Upsample(nn.Module):
  """`nn.ConvTranspose(features, (3, 3), strides=(2, 2), padding='SAME')`, computed fast.

  Same parameters (`kernel` [3, 3, C, F], `bias` [F]) and the same outputs and gradients, but
  computed as one 2x2 convolution with 4F outputs followed by a depth-to-space shuffle: on
  XLA:CPU the gradient of a transposed (input-dilated) convolution is about 20x slower than that
  of a plain convolution of the same size.
  """

  features: int
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, C] -> [B, 2H, 2W, features]."""
    kernel = self.param('kernel', kernel_init, (3, 3, x.shape[-1], self.features),
                        self.param_dtype)
    bias = self.param('bias', bias_init, (self.features,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = jax.lax.conv_general_dilated(
        x, _phase_kernel(kernel), window_strides=(1, 1), padding=((1, 0), (1, 0)),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    b, h, w, _ = y.shape
    y = y.reshape(b, h, w, 2, 2, self.features).transpose(0, 1, 3, 2, 4, 5)
    return y.reshape(b, 2 * h, 2 * w, self.features) + bias


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


class ConvBlock(nn.Module):
  """Two 3x3 'same' convolutions, each followed by a ReLU."""

  features: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    for _ in range(2):
      x = nn.Conv(self.features, (3, 3), padding='SAME', kernel_init=kernel_init,
                  bias_init=bias_init, dtype=self.dtype)(x)
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
  """

  num_classes: int = 3
  widths: Sequence[int] = (64, 128, 256)
  dropout_rate: float = 0.5
  dtype: Any = jnp.float32
  fast_upsample: bool = True

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
    """images: [B, H, W, 3] float in [0, 1], H and W divisible by 2**len(widths).

    Returns:
      logits: [B, H, W, num_classes] float32.
    """
    x = images.astype(self.dtype)
    skips = []
    for i, width in enumerate(self.widths):
      x = ConvBlock(width, dtype=self.dtype, name=f'down_{i}')(x)
      skips.append(x)
      x = max_pool_2x2(x)
    x = ConvBlock(2 * self.widths[-1], dtype=self.dtype, name='bottleneck')(x)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    for i, (width, skip) in reversed(list(enumerate(zip(self.widths, skips)))):
      if self.fast_upsample:
        x = Upsample(width, dtype=self.dtype, name=f'upsample_{i}')(x)
      else:
        x = nn.ConvTranspose(width, (3, 3), strides=(2, 2), padding='SAME',
                             kernel_init=kernel_init, bias_init=bias_init,
                             dtype=self.dtype, name=f'upsample_{i}')(x)
      x = jnp.concatenate([x, skip], axis=-1)
      x = ConvBlock(width, dtype=self.dtype, name=f'up_{i}')(x)
    x = nn.Conv(self.num_classes, (1, 1), kernel_init=kernel_init, bias_init=bias_init,
                dtype=self.dtype, name='logits')(x)
    return x.astype(jnp.float32)


def param_count(params) -> int:
  return sum(p.size for p in jax.tree_util.tree_leaves(params))
