"""SIGTERM and SIGINT while training: finish the step, save a checkpoint, exit cleanly.

Cloud schedulers announce a preemption with SIGTERM and wait a grace period before SIGKILL; Ctrl-C
sends SIGINT. Either only sets a flag here; the training loop reads it between steps. With several
processes, a signal may reach only some of them, so they all-gather their flags at log steps (where
the loop syncs anyway) and stop together at the same step. A second Ctrl-C stops at once, unsaved.
"""

import signal
import sys
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(Exception):
  """Raised by a Notice(at_once=True) on SIGTERM or SIGINT; its message names the signal."""


class Notice:
  """A context in which SIGTERM and SIGINT ask the training loop to stop after the current step.

  With at_once=True (before anything is written) they raise `Stopped` instead, at once.
  """

  def __init__(self, at_once: bool = False):
    self.received: str | None = None  # The name of the first signal received.
    self.at_once = at_once
    self._previous = {}

  def __enter__(self) -> 'Notice':
    if threading.current_thread() is threading.main_thread():  # Python's rule for handlers.
      for s in SIGNALS:
        self._previous[s] = signal.signal(s, self._handle)
    if self.at_once:
      self._unraisable = sys.unraisablehook
      sys.unraisablehook = self._drop_lost_stop
    return self

  def __exit__(self, *exc_info) -> None:
    for s, handler in self._previous.items():
      # None: the previous handler was not installed from Python; the default is the closest.
      signal.signal(s, signal.SIG_DFL if handler is None else handler)
    self._previous = {}
    if self.at_once:
      sys.unraisablehook = self._unraisable

  def _drop_lost_stop(self, unraisable) -> None:
    """A Stopped raised where Python cannot propagate it is not an error: `check` raises it
    again at the next stage."""
    if not isinstance(unraisable.exc_value, Stopped):
      self._unraisable(unraisable)

  def _handle(self, signum, frame) -> None:
    del frame
    if signum == signal.SIGINT and self.received is not None:
      raise KeyboardInterrupt  # Ctrl-C twice: the user does not want to wait for the save.
    first = self.received is None
    self.received = self.received or signal.Signals(signum).name
    self.check()
    if first and jax.process_index() == 0:  # Said at once: the save may take a step or two.
      print(f'received {self.received}: stopping after the current step and saving a checkpoint'
            + (' (Ctrl-C again stops at once, unsaved)' if signum == signal.SIGINT else ''),
            file=sys.stderr, flush=True)

  def check(self) -> None:
    """With at_once, raises Stopped if a signal came: also where the handler's own raise was lost
    (Python drops exceptions raised while it runs a garbage-collection callback)."""
    if self.at_once and self.received is not None:
      raise Stopped(self.received)

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
