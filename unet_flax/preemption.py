"""SIGTERM and SIGINT while training: finish the step, save a checkpoint, exit cleanly.

Cloud schedulers announce a preemption with SIGTERM and wait a grace period before SIGKILL; Ctrl-C
sends SIGINT. Either only sets a flag here; the training loop reads it between steps. With several
processes, a signal may reach only some of them, so they all-gather their flags at log steps (where
the loop syncs anyway) and stop together at the same step. A second Ctrl-C stops at once, unsaved.
"""

import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Notice:
  """A context in which SIGTERM and SIGINT ask the training loop to stop after the current step."""

  def __init__(self):
    self.received: str | None = None  # The name of the first signal received.
    self._previous = {}

  def __enter__(self) -> 'Notice':
    if threading.current_thread() is threading.main_thread():  # Python's rule for handlers.
      for s in SIGNALS:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc_info) -> None:
    for s, handler in self._previous.items():
      # None: the previous handler was not installed from Python; the default is the closest.
      signal.signal(s, signal.SIG_DFL if handler is None else handler)
    self._previous = {}

  def _handle(self, signum, frame) -> None:
    del frame
    if signum == signal.SIGINT and self.received is not None:
      raise KeyboardInterrupt  # Ctrl-C twice: the user does not want to wait for the save.
    self.received = self.received or signal.Signals(signum).name

  def stop(self, sync: bool) -> bool:
    """Whether to stop after this step.

    Args:
      sync: whether this is a step where all processes call `stop` (a log step). A single process
        stops at the first step after the signal, sync or not.
    """
    if jax.process_count() == 1:
      return self.received is not None
    if not sync:
      return False
    flags = multihost_utils.process_allgather(np.int32(self.received is not None))
    return bool(np.any(flags))
