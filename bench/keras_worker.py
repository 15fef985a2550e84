"""The chapter's Keras U-Net, timed on request: bench/peers.py's other contender.

Runs in a virtual environment of its own (pip install tensorflow-cpu pillow), never the project's.
peers.py starts it and sends one command a line on stdin; it answers one line on stdout:

  step <policy> <calls>   -> seconds per train_on_batch call (policy: float32, mixed_bfloat16)
  matmul <dtype> <n>      -> GFLOP/s of TensorFlow's n x n x n matmul (float32, bfloat16)
  quit

The models are built and warmed up first (the line 'ready'). Model and step as the chapter has
them: keras_unet.unet_model(3), Adam, sparse categorical cross-entropy, random images and labels
of batch B (argv[1]) at 128x128.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_unet import unet_model  # noqa: E402
import peer_protocol  # noqa: E402


def build(policy, batch):
  keras.mixed_precision.set_global_policy(policy)
  model = unet_model(3)
  model.compile(optimizer='adam', loss='sparse_categorical_crossentropy')
  rng = np.random.default_rng(0)
  x = rng.random((batch, 128, 128, 3)).astype(np.float32)
  y = rng.integers(0, 3, (batch, 128, 128, 1)).astype(np.int32)
  model.train_on_batch(x, y)
  model.train_on_batch(x, y)
  return model, x, y


_MATMULS = {}


def matmul_gflops(dtype, n, repeats=1):
  """GFLOP/s of a warmed-up n x n x n matmul (the first call per dtype and n warms it up)."""
  if (dtype, n) not in _MATMULS:
    a = tf.cast(tf.random.normal((n, n), dtype=tf.float32), dtype)
    mm = tf.function(lambda a: tf.matmul(a, a))
    mm(a).numpy()
    _MATMULS[dtype, n] = a, mm
  a, mm = _MATMULS[dtype, n]
  start = time.perf_counter()
  for _ in range(repeats):
    out = mm(a)
  out.numpy()
  return 2 * n ** 3 / ((time.perf_counter() - start) / repeats) / 1e9


def main():
  batch = int(sys.argv[1])
  models = {policy: build(policy, batch) for policy in ('float32', 'mixed_bfloat16')}
  keras.mixed_precision.set_global_policy('float32')
  dtypes = {'float32': tf.float32, 'bfloat16': tf.bfloat16}

  def step(policy):
    model, x, y = models[policy]
    return lambda: model.train_on_batch(x, y)
  peer_protocol.serve({policy: step(policy) for policy in models},
                      lambda dtype, n: matmul_gflops(dtypes[dtype], n),
                      f'tensorflow {tf.__version__} keras {keras.__version__}')


if __name__ == '__main__':
  main()
