"""The whole U-Net on oneDNN's convolutions against XLA's: loss, gradients, train step, params.

Tiny widths (4, 8) at 16x16. Every convolution (3x3, the upsampling's phases, the 1x1 logits)
runs through the extension when the process's backend is 'onednn' (layers.select_backend, the
tools' --conv_backend); the parameters are the same on both paths, so params (a checkpoint) from
one predict on the other.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

onednn = pytest.importorskip('unet_flax_onednn')

from unet_flax import config as config_lib  # noqa: E402
from unet_flax import errors  # noqa: E402
from unet_flax import export  # noqa: E402
from unet_flax import inference  # noqa: E402
from unet_flax import layers  # noqa: E402
from unet_flax import metrics  # noqa: E402
from unet_flax import models  # noqa: E402
from unet_flax import steps  # noqa: E402
from unet_flax import train  # noqa: E402

# Per U-Net of widths (4, 8): 5 ConvBlocks x 2 3x3 convolutions, 2 upsamplings x 4 phases, logits;
# the first convolution of each of the 2 decoder blocks runs as two, one per input (upsampled,
# skip), without their concatenation.
FORWARD_CONVS = 5 * 2 + 2 * 4 + 1 + 2
# bfloat16 where this CPU's oneDNN convolves it (dtypes(): AVX-512), else skipped with the reason.
NEEDS_BF16 = pytest.mark.skipif(jnp.bfloat16 not in onednn.dtypes(),
                                reason="this CPU's oneDNN has no bfloat16 convolution (no AVX-512)")


def _config(dtype='float32'):
  config = config_lib.defaults()
  config.image_size = 16
  config.widths = (4, 8)
  config.dropout_rate = 0.0
  config.dtype = dtype
  return config_lib.validate(config)


def _forward(config, backend):
  """models.forward of the config on the convolutions of `backend` for its dtype."""
  return models.forward(config, layers.layer_function(backend, config.dtype))


def _params(config):
  """Fixed random params (numpy), the same for both paths: init's shapes, no compiling of init."""
  shapes = jax.eval_shape(functools.partial(models.init_params, config), jax.random.key(0))
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), s.dtype), shapes)


def _batch(n):
  rng = np.random.default_rng(n)
  return (rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8),
          rng.integers(0, 3, (n, 16, 16)).astype(np.int32))


def _close(actual, expected, rtol):
  """Within rtol of the reference, relative to the reference's largest magnitude."""
  actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
  assert actual.shape == expected.shape
  np.testing.assert_allclose(actual, expected, rtol=rtol,
                             atol=rtol * max(np.abs(expected).max(), 1e-30))


def _loss_and_grads(config, backend, params, images, labels):
  forward = _forward(config, backend)

  def loss_fn(params):
    logits = forward(params, images)
    return metrics.segmentation_loss(logits, labels, jnp.ones(labels.shape[0], bool))
  fn = jax.jit(jax.value_and_grad(loss_fn))
  return fn(params), fn.lower(params).as_text().count('unet_onednn_conv')


def test_conv_backend_choice():
  assert layers.layer_function('xla') is layers.xla_layer
  assert layers.layer_function('onednn') is onednn.layer
  assert layers.resolve_backend('auto') == ('onednn' if jax.default_backend() == 'cpu'
                                            and jax.device_count() == 1 else 'xla')
  with pytest.raises(errors.UserError, match='--conv_backend'):
    layers.resolve_backend('mkl')


@pytest.mark.parametrize('batch', [1, 2])
def test_unet_loss_and_gradients_match_xla(batch):
  images, labels = _batch(batch)
  params = _params(_config())
  (loss_x, grads_x), calls_x = _loss_and_grads(_config(), 'xla', params, images, labels)
  (loss_o, grads_o), calls_o = _loss_and_grads(_config(), 'onednn', params, images, labels)
  assert calls_x == 0
  # Forward, backward-data and backward-weights of each, but the first layer's input gradient
  # (of the images) is never computed.
  assert calls_o == 3 * FORWARD_CONVS - 1
  _close(loss_o, loss_x, 1e-5)
  for path, g in jax.tree_util.tree_leaves_with_path(grads_x):
    _close(_at(grads_o, path), g, 1e-5)


# The EfficientNet-Lite0 U-Net: the stem, 16 blocks of expansion (not the first), depthwise and
# projection; 5 decoder levels of 4 upsampling phases and 2 convolutions, the first of 4 of them
# on [upsampled, skip] as two calls; the logits. The 9 blocks with 5x5 depthwise kernels compute
# their weight gradient as 4 windows of 3x3 (unet_flax_onednn._bwd_weights): 3 more calls each.
PRETRAINED_FORWARD_CONVS = (1 + 16 * 3 - 1) + 5 * (4 + 2) + 4 + 1
PRETRAINED_WINDOW_CALLS = 9 * 3


def _pretrained_config(dtype='float32'):
  """The EfficientNet-Lite0 U-Net at the smallest size its encoder takes (32x32)."""
  config = _config(dtype)
  config.encoder = 'efficientnet_lite0'
  config.image_size = 32
  return config_lib.validate(config)


def _pretrained_batch(n):
  rng = np.random.default_rng(n)
  return (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
          rng.integers(0, 3, (n, 32, 32)).astype(np.int32))


def _pretrained_params(config):
  """Fixed random params with He-like scales, so that activations neither vanish nor reach the
  ReLU6 clip everywhere through 16 blocks."""
  shapes = jax.eval_shape(functools.partial(models.init_params, config), jax.random.key(0))
  rng = np.random.default_rng(0)

  def init(s):
    fan_in = int(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 1
    return jnp.asarray(rng.normal(0, 1 / np.sqrt(fan_in) if len(s.shape) > 1 else 0.1, s.shape),
                       s.dtype)
  return jax.tree.map(init, shapes)


def test_pretrained_unet_runs_every_convolution_in_onednn_and_matches_xla():
  """The encoder's stem (stride 2), depthwise (3x3, 5x5, strides 1 and 2) and 1x1 convolutions
  go through the process's layer function like the decoder's: no XLA convolution is left in the
  oneDNN path's loss and gradient, which match XLA's in float32."""
  config = _pretrained_config()
  images, labels = _pretrained_batch(2)
  params = _pretrained_params(config)
  (loss_x, grads_x), _ = _loss_and_grads(config, 'xla', params, images, labels)
  (loss_o, grads_o), calls = _loss_and_grads(config, 'onednn', params, images, labels)
  text = jax.jit(_forward(config, 'onednn')).lower(params, images).as_text()
  assert 'convolution' not in text.replace('unet_onednn_conv', '')
  # The images' gradient is never computed.
  assert calls == 3 * PRETRAINED_FORWARD_CONVS - 1 + PRETRAINED_WINDOW_CALLS
  _close(loss_o, loss_x, 1e-5)
  for path, g in jax.tree_util.tree_leaves_with_path(grads_x):
    _close(_at(grads_o, path), g, 1e-5)


def _flat(tree):
  return np.concatenate([np.asarray(v, np.float32).ravel() for v in jax.tree.leaves(tree)])


def _assert_bfloat16_as_accurate_as_xla(config_of, params, images, labels):
  """Both paths' bfloat16 loss and gradients against XLA's float32: the oneDNN path's relative
  errors no worse than XLA's own bfloat16 path's (within 25%) and under 3%."""
  (loss, grads), _ = _loss_and_grads(config_of('float32'), 'xla', params, images, labels)
  errors = {}
  for backend in ('xla', 'onednn'):
    (loss_b, grads_b), calls = _loss_and_grads(config_of('bfloat16'), backend, params, images,
                                               labels)
    assert (calls > 0) == (backend == 'onednn')
    errors[backend] = (abs(float(loss_b) - float(loss)) / abs(float(loss)),
                       np.linalg.norm(_flat(grads_b) - _flat(grads)) / np.linalg.norm(_flat(grads)))
  for xla_error, onednn_error in zip(errors['xla'], errors['onednn']):
    assert onednn_error <= max(1.25 * xla_error, 2e-3), errors
    assert onednn_error < 3e-2, errors


@NEEDS_BF16
@pytest.mark.parametrize('batch', [1, 2])
def test_unet_bfloat16_is_as_accurate_as_xla(batch):
  """In bfloat16 the two paths round differently (oneDNN adds the bias and applies the ReLU
  before its one rounding; XLA rounds the convolution, then the sum), and 19 layers carry the
  differences on, so neither is the other's reference: both are held to the float32 result."""
  images, labels = _batch(batch)
  _assert_bfloat16_as_accurate_as_xla(_config, _params(_config()), images, labels)


@NEEDS_BF16
def test_pretrained_unet_bfloat16_is_as_accurate_as_xla():
  """The same for the EfficientNet-Lite0 U-Net, whose depthwise and strided convolutions are
  oneDNN's too (XLA computes its depthwise ones in float32 and rounds once)."""
  images, labels = _pretrained_batch(2)
  _assert_bfloat16_as_accurate_as_xla(_pretrained_config, _pretrained_params(_pretrained_config()),
                                      images, labels)


def _at(tree, path):
  for key in path:
    tree = tree[key.key]
  return tree


def test_train_step_matches_xla():
  """The trainer's own jitted step (microbatches: 2) on both paths, from one state.

  With plain SGD at rate 1 the update is the gradient; Adam's first update is lr * sign(g), whose
  sign flips where a gradient is ~0 would hide the comparison.
  """
  images, labels = _batch(4)
  batch = {'image': images, 'label': labels.astype(np.uint8)}
  results = []
  for backend in ('xla', 'onednn'):
    config = _config()
    config.batch_size = 4
    config.num_microbatches = 2
    state = steps.TrainState.create(apply_fn=None, params=_params(config), tx=optax.sgd(1.0))
    step = jax.jit(functools.partial(steps.train_step, _forward(config, backend),
                                     num_microbatches=2))
    assert (step.lower(state, batch, jax.random.key(0)).as_text().count('unet_onednn_conv')
            > 0) == (backend == 'onednn')
    results.append(step(state, batch, jax.random.key(0)))
  (state_x, out_x), (state_o, out_o) = results
  _close(out_o['loss'], out_x['loss'], 1e-5)
  start = _params(_config())
  for path, p in jax.tree_util.tree_leaves_with_path(state_x.params):
    _close(_at(start, path) - _at(state_o.params, path), _at(start, path) - p, 1e-5)


@pytest.mark.parametrize('trained_on,predicted_on', [('onednn', 'xla'), ('xla', 'onednn')])
def test_params_of_one_path_predict_on_the_other(trained_on, predicted_on):
  """A checkpoint is its params: those initialised and trained on one path fit the other."""
  images, labels = _batch(2)
  config = _config()
  params = models.init_params(config, jax.random.key(0))
  state = steps.TrainState.create(apply_fn=None, params=params,
                                  tx=steps.create_optimizer(config))
  batch = {'image': images, 'label': labels.astype(np.uint8)}
  trained = _forward(config, trained_on)
  state, _ = jax.jit(functools.partial(steps.train_step, trained))(state, batch,
                                                                   jax.random.key(0))
  want = jax.jit(trained)(state.params, images)
  got = jax.jit(_forward(config, predicted_on))(state.params, images)
  _close(got, want, 1e-5)


@pytest.mark.skipif(jnp.bfloat16 in onednn.dtypes(),
                    reason="this CPU's oneDNN convolves bfloat16: no dtype it lacks")
def test_a_dtype_onednn_lacks_on_this_cpu_takes_xla_convolutions_and_says_so():
  """bfloat16 on a CPU without AVX-512 (AVX2 alone): a process that chose oneDNN runs the
  model's bfloat16 convolutions on XLA's layer function (whose bias gradient is summed in
  float32, layers.add_bias), its float32 ones on oneDNN, and its reports say which."""
  try:
    layers.select_backend('onednn')
    assert (layers.backend('float32'), layers.backend('bfloat16')) == ('onednn', 'xla')
    assert layers.convolutions('float32') == 'onednn convolutions'
    assert layers.convolutions('bfloat16') == ("xla convolutions (this CPU's oneDNN has no "
                                               'bfloat16 ones)')
    assert layers.layer_function(dtype='bfloat16') is layers.xla_layer
    for dtype, calls in (('bfloat16', 0), ('float32', FORWARD_CONVS)):
      forward = models.forward(_config(dtype))
      assert jax.jit(forward).lower(_params(_config()), _batch(1)[0]).as_text().count(
          'unet_onednn_conv') == calls
  finally:
    layers.select_backend('auto')


def test_export_uses_xla_convolutions():
  """The exported model must load where the extension is not installed."""
  config = _config()
  try:
    layers.select_backend('onednn')
    model = inference.make_model(config, 0, _params(config))
    assert jax.jit(model.forward).lower(model.params, _batch(1)[0]).as_text().count(
        'unet_onednn_conv') > 0
    exported = export.export_model(model, batch_size=1, platforms=('cpu',))
  finally:
    layers.select_backend('auto')
  assert 'unet_onednn' not in exported.mlir_module()


def test_a_crop_mode_run_trains_and_evaluates_on_the_process_backend(tmp_path, capsys):
  """The trainer's report names the process's convolutions, and its one forward pass, which the
  crop mode's sliding-window evaluations use too, runs through the extension."""
  from tests.conftest import make_tiny_config  # pylint: disable=g-import-not-at-top
  config = make_tiny_config(str(tmp_path / 'tfds'))
  config.update({'input_mode': 'crop', 'crop_size': 16, 'ignore_label': 255,
                 'steps_per_epoch': 1, 'num_epochs': 1})
  try:
    assert layers.select_backend('onednn') == 'onednn'
    train.train_and_evaluate(config, str(tmp_path / 'run'))
    forward = models.forward(config_lib.validate(config))
    windows = np.zeros((4, 16, 16, 3), np.uint8)
    assert jax.jit(forward).lower(_params(_config()), windows).as_text().count(
        'unet_onednn_conv') == FORWARD_CONVS
  finally:
    layers.select_backend('auto')
  out = capsys.readouterr().out
  assert 'onednn convolutions' in out
  assert 'eval after epoch 1' in out
