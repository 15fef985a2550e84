"""One conv layer, oneDNN (unet_flax_onednn) against XLA:CPU, alternated in one process.

python bench/onednn_layer.py [--rounds 9] [--calls 3] [--shapes 8x128x128x64x64,...]
python bench/onednn_layer.py --model [--batch 8] --passes layer   # every conv of the U-Net

For each shape (N x H x W x C -> O, 3x3, stride 1, SAME) and dtype (float32, bfloat16), times
four jitted functions per implementation: the forward, the input gradient, the weight gradient and
the whole layer (forward + both gradients, one jit). With --model, the shapes are the default
U-Net's 3x3 convolutions at 128x128 (the upsampling's four phase convolutions counted as the one
3x3 convolution of the same FLOPs at the input's resolution; the 1x1 logits left out) and the
totals over them are printed. Each round times XLA then oneDNN (`calls`
calls each, blocking at the end) so that both see the same machine load; the figures are medians
over rounds. XLA runs with unet-flax's CPU flags (runtime.configure_xla_cpu), as the trainer does.
"""

import argparse
import statistics
import time

from unet_flax import runtime

runtime.configure_xla_cpu()

import jax  # noqa: E402  (after the XLA flags)
import jax.numpy as jnp  # noqa: E402

import unet_flax_onednn as onednn  # noqa: E402


def xla_conv(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def model_shapes(batch, size=128, widths=(64, 128, 256)):
  """(N, H, W, C, O) of the default U-Net's 3x3 convolutions, outermost first."""
  shapes, c, s = [], 3, size
  for width in widths:
    shapes += [(batch, s, s, c, width), (batch, s, s, width, width)]
    c, s = width, s // 2
  shapes += [(batch, s, s, c, 2 * c), (batch, s, s, 2 * c, 2 * c)]
  c = 2 * c
  for width in reversed(widths):
    shapes.append((batch, s, s, c, width))  # Upsample: 9 taps over the four phases.
    s *= 2
    shapes += [(batch, s, s, 2 * width, width), (batch, s, s, width, width)]
    c = width
  return shapes


def passes(conv):
  def fwd(x, w, dy):
    return conv(x, w)

  def bwd_data(x, w, dy):
    return jax.vjp(lambda x: conv(x, w), x)[1](dy)[0]

  def bwd_weights(x, w, dy):
    return jax.vjp(lambda w: conv(x, w), w)[1](dy)[0]

  def layer(x, w, dy):
    y, vjp = jax.vjp(conv, x, w)
    return (y, *vjp(dy))
  return {'fwd': fwd, 'bwd_data': bwd_data, 'bwd_weights': bwd_weights, 'layer': layer}


def timed(fn, args, calls):
  start = time.perf_counter()
  for _ in range(calls):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / calls


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--shapes', default='8x128x128x64x64,8x128x128x128x64,8x32x32x256x512')
  parser.add_argument('--dtypes', default='float32,bfloat16')
  parser.add_argument('--passes', default='fwd,bwd_data,bwd_weights,layer')
  parser.add_argument('--model', action='store_true', help="the U-Net's shapes, with totals")
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--rounds', type=int, default=9)
  parser.add_argument('--calls', type=int, default=3)
  args = parser.parse_args()
  print(f'jax {jax.__version__}, XLA_FLAGS={__import__("os").environ.get("XLA_FLAGS")!r}')
  print(f'{"shape":>20} {"dtype":>8} {"pass":>11} {"xla ms":>8} {"onednn ms":>9} {"xla GF/s":>8} '
        f'{"dnnl GF/s":>9} {"speedup":>7} {"min xla":>7} {"min dnnl":>8}  oneDNN implementation', flush=True)
  shapes = (['x'.join(map(str, s)) for s in model_shapes(args.batch)] if args.model
            else args.shapes.split(','))
  totals = {}
  for shape in shapes:
    n, h, w_, c, o = map(int, shape.split('x'))
    gflop = 2 * n * h * w_ * c * o * 9 / 1e9  # One pass; the layer is three.
    for dtype in map(jnp.dtype, args.dtypes.split(',')):
      keys = jax.random.split(jax.random.key(0), 3)
      x = jax.random.normal(keys[0], (n, h, w_, c), jnp.float32).astype(dtype)
      w = (jax.random.normal(keys[1], (3, 3, c, o), jnp.float32) * 0.05).astype(dtype)
      dy = jax.random.normal(keys[2], (n, h, w_, o), jnp.float32).astype(dtype)
      operands = (x, w, dy)
      xla, dnnl = passes(xla_conv), passes(onednn.conv)
      for name in args.passes.split(','):
        fa, fb = jax.jit(xla[name]), jax.jit(dnnl[name])
        jax.block_until_ready(fa(*operands))
        jax.block_until_ready(fb(*operands))
        ta, tb = [], []
        for _ in range(args.rounds):
          ta.append(timed(fa, operands, args.calls))
          tb.append(timed(fb, operands, args.calls))
        a, b = statistics.median(ta), statistics.median(tb)
        t = totals.setdefault((dtype.name, name), [0.0, 0.0, 0.0])
        t[0] += a
        t[1] += b
        t[2] += gflop * (3 if name == 'layer' else 1)
        flop = gflop * (3 if name == 'layer' else 1)
        impl = ('+'.join(onednn.implementation(p, dtype, n, h, w_, c, o)
                         for p in ('fwd', 'bwd_data', 'bwd_weights'))
                if name == 'layer' else onednn.implementation(name, dtype, n, h, w_, c, o))
        print(f'{shape:>20} {dtype.name:>8} {name:>11} {a * 1e3:>8.1f} {b * 1e3:>9.1f} '
              f'{flop / a:>8.1f} {flop / b:>9.1f} {a / b:>6.2f}x {min(ta) * 1e3:>7.1f} {min(tb) * 1e3:>8.1f}  {impl}', flush=True)

  if args.model:
    print('totals over the model\'s 3x3 convolutions:')
    for (dtype, name), (a, b, flop) in totals.items():
      print(f'{dtype:>8} {name:>11}: xla {a * 1e3:.0f} ms, onednn {b * 1e3:.0f} ms, '
            f'{a / b:.2f}x ({flop:.0f} GFLOP: {flop / a:.0f} vs {flop / b:.0f} GFLOP/s)')


if __name__ == '__main__':
  main()
