"""The line protocol of bench/peers.py's workers (keras_worker.py, torch_worker.py), in plain
Python: each worker runs in its peer's own venv and imports only this beside its framework.

  step <precision> <calls>  -> seconds per train step, as the worker's step(precision) runs it
  matmul <dtype> <n>        -> GFLOP/s of the framework's n x n x n matmul (float32, bfloat16)
  quit
"""

import sys
import time


def serve(steps: dict, matmul_gflops, banner: str) -> None:
  """Says 'ready <banner>', then answers commands from stdin, one line each, until 'quit'.

  Args:
    steps: precision (as peers.PEERS names it for this worker) -> a function running one step.
    matmul_gflops: (dtype name, n) -> GFLOP/s.
  """
  print(f'ready {banner}', flush=True)
  for line in sys.stdin:
    command, *args = line.split()
    if command == 'step':
      step, calls = steps[args[0]], int(args[1])
      start = time.perf_counter()
      for _ in range(calls):
        step()
      print((time.perf_counter() - start) / calls, flush=True)
    elif command == 'matmul':
      print(matmul_gflops(args[0], int(args[1])), flush=True)
    elif command == 'quit':
      return
    else:
      print(f'error: unknown command {command}', flush=True)
