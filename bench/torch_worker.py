"""The chapter's U-Net in PyTorch, timed on request: a contender of bench/peers.py.

Runs in a virtual environment of its own (pip install torch, the CPU build), never the project's.
peers.py starts it and sends one command a line on stdin; it answers one line on stdout:

  step <precision> <calls>  -> seconds per train step (precision: float32, or bfloat16 =
                               torch.autocast('cpu', torch.bfloat16) around the forward pass)
  matmul <dtype> <n>        -> GFLOP/s of torch's n x n x n matmul (float32, bfloat16)
  quit

The model is the chapter's (keras_unet.py's layers in PyTorch: same widths, 3x3 'same'
convolutions, 2x2 max pooling, stride-2 3x3 transposed convolutions, dropout 0.5, 1x1 head), in
channels_last memory format, the layout oneDNN prefers on CPUs; Adam, cross-entropy on random
images and labels of batch B (argv[1]) at 128x128. Models are built and warmed up first (the
line 'ready').
"""

import sys
import time

import torch
from torch import nn

import peer_protocol  # bench/, beside this file


def _two_convs(cin, cout):
  return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(),
                       nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU())


class UNet(nn.Module):
  """The chapter's U-Net: [B, 3, 128, 128] float32 images -> [B, classes, 128, 128] logits."""

  def __init__(self, classes=3, widths=(64, 128, 256), bottom=512):
    super().__init__()
    ins = (3,) + widths[:-1]
    self.down = nn.ModuleList(_two_convs(i, w) for i, w in zip(ins, widths))
    self.bottom = _two_convs(widths[-1], bottom)
    self.dropout = nn.Dropout(0.5)
    outs = tuple(reversed(widths))
    ups_in = (bottom,) + outs[:-1]
    # Keras's Conv2DTranspose(f, 3, strides=2, padding='same'): output exactly twice the input.
    self.up = nn.ModuleList(nn.ConvTranspose2d(i, o, 3, 2, padding=1, output_padding=1)
                            for i, o in zip(ups_in, outs))
    self.convs = nn.ModuleList(_two_convs(2 * o, o) for o in outs)
    self.head = nn.Conv2d(widths[0], classes, 1)

  def forward(self, x):
    skips = []
    for block in self.down:
      x = block(x)
      skips.append(x)
      x = nn.functional.max_pool2d(x, 2)
    x = self.dropout(self.bottom(x))
    for up, convs, skip in zip(self.up, self.convs, reversed(skips)):
      x = convs(torch.cat([up(x), skip], 1))
    return self.head(x)


def build(precision, batch):
  """A train step of its own model and Adam, warmed up twice; returns step()."""
  torch.manual_seed(0)
  model = UNet().to(memory_format=torch.channels_last)
  optimizer = torch.optim.Adam(model.parameters(), 1e-3)
  x = torch.rand(batch, 3, 128, 128).to(memory_format=torch.channels_last)
  y = torch.randint(0, 3, (batch, 128, 128))

  def step():
    optimizer.zero_grad()
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=precision == 'bfloat16'):
      logits = model(x)
    loss = nn.functional.cross_entropy(logits.float(), y)
    loss.backward()
    optimizer.step()
  step()
  step()
  return step


_MATMULS = {}


def matmul_gflops(dtype, n):
  """GFLOP/s of a warmed-up n x n x n matmul (the first call per dtype and n warms it up)."""
  if (dtype, n) not in _MATMULS:
    a = torch.randn(n, n).to(dtype)
    torch.mm(a, a)
    _MATMULS[dtype, n] = a
  a = _MATMULS[dtype, n]
  start = time.perf_counter()
  torch.mm(a, a)
  return 2 * n ** 3 / (time.perf_counter() - start) / 1e9


def main():
  batch = int(sys.argv[1])
  steps = {precision: build(precision, batch) for precision in ('float32', 'bfloat16')}
  dtypes = {'float32': torch.float32, 'bfloat16': torch.bfloat16}
  peer_protocol.serve(steps, lambda dtype, n: matmul_gflops(dtypes[dtype], n),
                      f'torch {torch.__version__}, {torch.get_num_threads()} threads')

if __name__ == '__main__':
  main()
