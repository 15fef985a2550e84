"""The U-Net of the chapter, in Flax linen, and the one forward pass on uint8 images.

Nothing here knows about data or training: `UNet` maps images [B, H, W, 3] to per-class logits
[B, H, W, num_classes]; the softmax belongs to the loss. `PretrainedUNet` is the same decoder
under a pretrained encoder (ENCODERS, chosen by config.encoder: one more encoder is one more
entry). `create(config)` is the one place a model is built; `init_params` gives its parameters (or only their shapes, under jax.eval_shape);
`forward(config)` is THE forward pass, built once per process and passed to whoever needs it:
the train step, the trainer's evaluations, evaluate, predict, the sliding window, export and the
benchmark. `flip_tta(forward)` wraps it. The convolutions, and their backends, are layers.py's.
"""

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from unet_flax import efficientnet
from unet_flax import layers

# (params, images [B, H, W, 3] uint8, dropout_rng=None) -> logits [B, H, W, K] float32; with a
# dropout key the network runs as in training (dropout on), else as in inference.
Forward = Callable[..., jax.Array]


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
  layer: layers.LayerFunction = layers.xla_layer
  normalization: str = 'none'

  @nn.compact
  def __call__(self, x, skip=None):
    """x: [B, H, W, C] (and a skip [B, H, W, Cs], concatenated after x) -> [B, H, W, features]."""
    normalize = self.normalization == 'group'
    for i in range(2):
      x = layers.Conv(self.features, (3, 3), use_bias=not normalize, relu=not normalize,
               dtype=self.dtype, layer=self.layer, name=f'Conv_{i}')(x, skip if i == 0 else None)
      if normalize:
        x = nn.GroupNorm(num_groups=num_groups(self.features), dtype=self.dtype,
                         name=f'GroupNorm_{i}')(x)
        x = nn.relu(x)
    return x


class _SegmentationNet(nn.Module):
  """What every network here has: logits per pixel, dropout at the deepest features, a compute
  dtype, the convolutions' layer function and the blocks' normalization (see UNet)."""

  num_classes: int = 3
  dropout_rate: float = 0.5
  dtype: Any = jnp.float32
  layer: layers.LayerFunction = layers.xla_layer
  normalization: str = 'none'


class UNet(_SegmentationNet):
  """Encoder of ConvBlocks and 2x2 max-pools, a bottleneck, decoder of upsample + skip + ConvBlock.

  Attributes:
    num_classes: logits per pixel.
    widths: features of each encoder block, outermost first; the bottleneck has twice the last.
    dropout_rate: dropout after the bottleneck.
    dtype: compute dtype (parameters stay float32); logits are returned as float32.
    fast_upsample: `Upsample` instead of `nn.ConvTranspose` (same parameters and results).
    normalization: 'none' (the chapter's model) or 'group': group norm after every 3x3
      convolution of the blocks (ConvBlock).
    layer: every convolution's function (layers.LayerFunction); not a parameter: the same
      params fit XLA's and oneDNN's. nn.ConvTranspose (fast_upsample=False) always runs in XLA.
  """

  widths: Sequence[int] = (64, 128, 256)
  fast_upsample: bool = True

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
      x = layers.max_pool_2x2(x)
    x = block(2 * self.widths[-1], name='bottleneck')(x)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    for i, (width, skip) in reversed(list(enumerate(zip(self.widths, skips)))):
      if self.fast_upsample:
        x = layers.Upsample(width, dtype=self.dtype, layer=self.layer, name=f'upsample_{i}')(x)
      else:
        x = nn.ConvTranspose(width, (3, 3), strides=(2, 2), padding='SAME',
                             kernel_init=layers.kernel_init, bias_init=layers.bias_init,
                             dtype=self.dtype, name=f'upsample_{i}')(x)
      x = block(width, name=f'up_{i}')(x, skip)  # The block's first conv sees [x, skip].
    x = layers.Conv(self.num_classes, (1, 1), dtype=self.dtype, layer=self.layer, name='logits')(x)
    return x.astype(jnp.float32)


class PretrainedUNet(_SegmentationNet):
  """A pretrained encoder under the chapter's decoder.

  The encoder gives features at strides 2, 4, 8, 16 and 32; from the deepest, each decoder level
  upsamples (`layers.Upsample`: the 3x3 stride-2 transposed convolution), concatenates the
  encoder's feature of that stride and runs a ConvBlock; one more level without a skip brings it
  back to full resolution, and a 1x1 convolution gives the logits.

  Attributes:
    encoder: the encoder's module class (ENCODERS), taking dtype and layer.
    num_classes: logits per pixel.
    decoder_widths: features of each decoder level, deepest first (one per encoder stride).
    dropout_rate: dropout on the deepest feature, as the chapter's after its bottleneck.
    dtype, layer, normalization: as UNet's.
  """

  encoder: Any = None
  decoder_widths: Sequence[int] = (256, 128, 64, 32, 16)

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
    """images: [B, H, W, 3] float in [0, 1], H and W divisible by the encoder's largest stride.

    Returns:
      logits: [B, H, W, num_classes] float32.
    """
    features = self.encoder(dtype=self.dtype, layer=self.layer, name='encoder')(images)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(features[-1])
    skips = list(reversed(features[:-1])) + [None]  # Strides 16, 8, 4, 2, then the full size.
    block = functools.partial(ConvBlock, dtype=self.dtype, layer=self.layer,
                              normalization=self.normalization)
    for i, (width, skip) in enumerate(zip(self.decoder_widths, skips, strict=True)):
      x = layers.Upsample(width, dtype=self.dtype, layer=self.layer, name=f'upsample_{i}')(x)
      x = block(width, name=f'up_{i}')(x, skip)
    x = layers.Conv(self.num_classes, (1, 1), dtype=self.dtype, layer=self.layer,
                    name='logits')(x)
    return x.astype(jnp.float32)


# Pretrained encoders by config.encoder: the module, and the reader of its starting weights
# (source -> the encoder's parameter tree). config.ENCODER_LEVELS holds how often each halves.
# segmentation_models_pytorch's U-Net decoder widths.
DECODER_WIDTHS = (256, 128, 64, 32, 16)
ENCODERS = {
    'efficientnet_lite0': (efficientnet.EfficientNetLite0Encoder,
                           lambda source: efficientnet.imagenet_params(source)[0]),
}


def param_count(params) -> int:
  return sum(p.size for p in jax.tree_util.tree_leaves(params))


def create(config: ml_collections.ConfigDict,
           layer: layers.LayerFunction = layers.xla_layer) -> UNet:
  """The U-Net of a run's config (widths, num_classes, dropout_rate, dtype, normalization), its
  convolutions computed by `layer` (which changes no parameter)."""
  common = dict(num_classes=config.num_classes, dropout_rate=config.dropout_rate,
                dtype=jnp.dtype(config.dtype), normalization=config.normalization, layer=layer)
  if config.encoder in ENCODERS:
    return PretrainedUNet(encoder=ENCODERS[config.encoder][0], decoder_widths=DECODER_WIDTHS,
                          **common)
  return UNet(widths=tuple(config.widths), **common)


def init_params(config: ml_collections.ConfigDict, rng: jax.Array):
  """The initial parameters of `create(config)` for config.image_size inputs.

  Under `jax.eval_shape` it computes nothing: the shapes alone, to restore a checkpoint into.
  """
  images = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
  return create(config).init(rng, images, train=False)['params']


def pretrained_params(config: ml_collections.ConfigDict) -> dict | None:
  """{'encoder': the pretrained encoder's starting parameters} (numpy float32), read from
  config.encoder_weights; None where there are none (the chapter's U-Net, or no weights).

  Raises:
    UserError: naming the package or file and the fix, if the weights cannot be read or do not
      fit the encoder (efficientnet.imagenet_params).
  """
  if config.encoder not in ENCODERS or config.encoder_weights is None:
    return None
  return {'encoder': ENCODERS[config.encoder][1](config.encoder_weights)}


def with_pretrained(params, pretrained: dict | None):
  """params with the subtrees of `pretrained` (pretrained_params) in place of theirs."""
  return params if pretrained is None else {**params, **pretrained}


def normalize(images: jax.Array) -> jax.Array:
  """uint8 [B, H, W, 3] -> float32 in [0, 1]. Done on the device: a quarter of the transfer."""
  return images.astype(jnp.float32) / 255.0


def forward(config: ml_collections.ConfigDict,
            layer: layers.LayerFunction | None = None) -> Forward:
  """The forward pass of the config's model: (params, images, dropout_rng=None) -> logits.

  Args:
    config: the run's config (its model fields).
    layer: the convolutions; None: the process's backend for config.dtype
      (layers.backend(config.dtype)).

  Returns:
    forward(params, images [B, H, W, 3] uint8, dropout_rng=None) -> logits [B, H, W, K] float32.
    With a dropout key the network runs as in training (dropout on, the key's masks); without,
    as in inference. A pure function: jit it where it is called.
  """
  module = create(config, layer or layers.layer_function(dtype=config.dtype))

  def apply(params, images: jax.Array, dropout_rng: jax.Array | None = None) -> jax.Array:
    train = dropout_rng is not None
    return module.apply({'params': params}, normalize(images), train=train,
                        rngs={'dropout': dropout_rng} if train else None)
  return apply


def flip_tta(forward_fn: Forward) -> Forward:
  """Flip test-time augmentation of an inference forward pass: the log of the mean softmax of
  the images and their mirrors.

  The network sees each image and its left-right mirror; the mirror's probabilities are flipped
  back before the mean, so twice the compute. Computed as a logsumexp of the log-softmaxes,
  which is log(mean) without a log(0) where a probability underflows.

  Returns:
    (params, images [B, H, W, C]) -> [B, H, W, K] float32: log((softmax(f(x)) +
    flip(softmax(f(flip(x))))) / 2), flip reversing the width axis (2). Its softmax is the mean
    probability; its argmax, that mean's.
  """

  def apply(params, images: jax.Array) -> jax.Array:
    plain = jax.nn.log_softmax(forward_fn(params, images), axis=-1)
    mirrored = jax.nn.log_softmax(forward_fn(params, jnp.flip(images, axis=2)), axis=-1)
    return jnp.logaddexp(plain, jnp.flip(mirrored, axis=2)) - jnp.log(2.0)
  return apply
