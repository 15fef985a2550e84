"""The training loop: train_and_evaluate(config, workdir).

Data, model, steps, checkpoints and reports each have their own module; this one drives them:
open the data set once, read its splits as the input mode says (modes.py), restore or initialise
the state, run the jitted train step, evaluate after epochs, save checkpoints, stop cleanly on
SIGTERM/SIGINT. The forward pass is built once (models.forward) and handed to the steps and the
mode. Only train.py (the entry point) and the tests import it.
"""

import functools
import sys
import time

import jax
import ml_collections
import numpy as np

from unet_flax import checkpoints
from unet_flax import config as config_lib
from unet_flax import errors
from unet_flax import layers
from unet_flax import metrics
from unet_flax import models
from unet_flax import modes
from unet_flax import preemption
from unet_flax import reporting
from unet_flax import sources
from unet_flax import steps
from unet_flax import workdir as workdir_lib
from unet_flax.devices import Devices


def steps_per_epoch(config: ml_collections.ConfigDict, num_train_examples: int) -> int:
  """config.steps_per_epoch, or (for 0) the full batches in the training split.

  Raises:
    UserError: if the split holds fewer examples than one batch.
  """
  per_epoch = config.steps_per_epoch or num_train_examples // config.batch_size
  if per_epoch < 1:
    raise errors.UserError(
        f'the training split has {num_train_examples} examples, fewer than '
        f'config.batch_size={config.batch_size}; lower the batch size')
  return per_epoch


def train_and_evaluate(config: ml_collections.ConfigDict, workdir, *,
                       allow_nonempty_workdir: bool = True,
                       allow_config_change: bool = False) -> steps.TrainState | None:
  """Trains and evaluates per the config; checkpoints, metrics and pictures go to `workdir`.

  Running it again with the same workdir resumes from the latest checkpoint, exactly: the step,
  optimizer state, dropout keys and position in the data order are those of an uninterrupted run.
  So a config that would train on differently (config.RESUME_FREE_FIELDS aside) is refused unless
  allow_config_change.
  On SIGTERM or SIGINT it saves a checkpoint at the current step and returns; before anything is
  written (while the data are prepared) it stops at once and returns None.

  Args:
    config: the run's config (checked by config.validate before anything is written).
    workdir: where the run's files go; relative to the current directory, `~` allowed.
    allow_nonempty_workdir: False: a workdir holding files that are not a run's is refused
      (workdir.check), as train.py does unless --allow_nonempty_workdir.
    allow_config_change: True: resume with fields that differ from the stored config.json (the
      model fields must still fit), and store the new config (train.py's --allow_config_change).

  Raises:
    UserError: for bad input (config, data, a workdir that does not fit), in one line.
  """
  config = config_lib.validate(config)
  devices = Devices(config.batch_size)
  workdir = workdir_lib.check(workdir, allow_nonempty=allow_nonempty_workdir)
  # Before the data are prepared (a download, for another recipe's data set).
  checkpoints.check_config(workdir, config, allow_change=allow_config_change)
  mode = modes.get(config)
  # A pretrained encoder's weights are read once, into the first checkpoint: a resume never
  # needs them. Read here, so a missing package or a bad file stops before anything is written.
  pretrained = (models.pretrained_params(config) if not checkpoints.restorable_steps(workdir)
                else None)
  try:
    # Until the workdir is written, a signal stops the run at once: nothing is lost.
    with preemption.Notice(at_once=True) as notice:
      # A bad data set or split, a file that cannot be read, or too few examples for a batch
      # fails before anything is written; a bad file first, since a smaller batch would not mend
      # it.
      source = sources.source_of(config)
      num_train = sources.check_data(config, source)
      notice.check()
      # Stored: predict needs no data.
      config.class_names = sources.class_names(config, source)
      train_data, eval_data, described = mode.read_splits(source)
      per_epoch = steps_per_epoch(config, num_train)
      if jax.process_index() == 0:
        print(f'data: {described}', flush=True)
        # Counted in the masks in memory: none when the data set is larger than the budget.
        absent = train_data.num_cached and reporting.absent_classes(
            mode.labels_in_memory(train_data), config.class_names)
        if absent and not train_data.all_cached:
          absent += (f' (counted in the {train_data.num_cached:,} training masks in memory, of '
                     f'{len(train_data):,})')
        if absent:
          print(absent, file=sys.stderr, flush=True)
      notice.check()
  except preemption.Stopped as e:
    print(f'stopped by {e} while preparing the data, before training; nothing was written to '
          f'{workdir}; rerun the same command to start', flush=True)
    return None
  with workdir_lib.Lock(workdir):
    manager = checkpoints.Manager(workdir, config)
    report = reporting.Reporter(workdir, config, is_lead=jax.process_index() == 0)
    try:
      # A full or read-only disk under metrics, pictures or data is one line naming the file.
      with (errors.disk_errors(None, errnos=errors.WRITE_ERRNOS),
            preemption.Notice() as notice):
        return _train(config, mode, per_epoch, train_data, eval_data, devices, manager, report,
                      notice, pretrained)
    finally:
      manager.close()  # Waits for the last checkpoint, also when stopping on an error.
      report.close()


def _train(config, mode: modes.Mode, per_epoch: int, train_data, eval_data, devices: Devices,
           manager: checkpoints.Manager, report: reporting.Reporter,
           notice: preemption.Notice, pretrained: dict | None) -> steps.TrainState:
  forward = models.forward(config)  # The process's convolutions (layers.backend(config.dtype)).
  rng = jax.random.key(config.seed)
  init_rng, dropout_rng = jax.random.split(rng)
  state = jax.jit(functools.partial(steps.create_train_state, config,
                                    steps_per_epoch=per_epoch),
                  out_shardings=devices.replicated)(init_rng, pretrained=pretrained)
  microbatches = steps.num_microbatches(config, devices)
  encoder = (f'{config.encoder} encoder' + (f' from {config.encoder_weights} weights'
                                            if config.encoder_weights else '')
             if config.encoder in models.ENCODERS else "the chapter's U-Net")
  report.text(f'model: {encoder}, {models.param_count(state.params):,} parameters, '
              f'{jax.device_count()} {devices.platform} device(s), '
              f'{jax.process_count()} process(es), {layers.convolutions(config.dtype)}'
              + (f', gradients summed over {microbatches} microbatches a step'
                 if microbatches > 1 else ''))
  state = manager.restore_or(state)
  total_steps = per_epoch * config.num_epochs
  step = int(state.step)
  report.resume(step)
  # A run stopped (SIGTERM) right after an epoch's last step saved it unevaluated.
  owes_eval = step > 0 and _evaluates_at(step, config, per_epoch, total_steps) and not (
      report.evaluated(step))
  if step > total_steps:  # Only with allow_config_change: fewer epochs than were trained.
    report.text(f'already trained beyond this config: step {step} is in {manager.directory}, '
                f'past its {total_steps} steps (config.num_epochs={config.num_epochs})')
    report.done(evaluated=False)
    return state
  if step >= total_steps and not owes_eval:
    report.text(f'already trained: step {step} of {total_steps} is in {manager.directory}')
    report.done(evaluated=False)
    return state
  if step:
    report.text(f'resumed from step {step} of {total_steps}')

  train_fn, _ = steps.compile_steps(config, devices, forward)
  evaluate = functools.partial(_score_eval_split, forward, mode, eval_data, devices, config)
  if owes_eval:
    report.text(f'evaluating step {step}, which the interrupted run saved but did not evaluate')
    report.eval(step, step // per_epoch, *evaluate(state))
    if step >= total_steps:
      report.done(evaluated=True)
      return state
  report.text('compiling the train step...')
  started = time.perf_counter()
  train_fn = train_fn.lower(state, _batch_shapes(mode, devices), dropout_rng).compile()
  report.text(f'compiled in {time.perf_counter() - started:.1f}s; training')
  report.start(step, total_steps)
  first_step = step
  nonfinite = NonFiniteCheck(config.skip_nonfinite_updates,
                             int(jax.device_get(state.opt_state.total_notfinite)))
  history = []
  for batch in devices.prefetch(_batches_from(step, mode, train_data, devices, per_epoch,
                                              total_steps)):
    state, step_metrics = train_fn(state, batch, dropout_rng)
    if history:
      # At most two steps in flight: a signal is answered after the current step, not after a
      # queue of them (the host still prepares the next batch while the device computes).
      jax.block_until_ready(history[-1]['loss'])
    history.append(step_metrics)
    step += 1
    end_of_epoch = step % per_epoch == 0
    log = _logs_at(step, first_step, config.log_every_steps) or end_of_epoch
    stop = notice.stop(sync=log)  # With several processes, they agree at log steps.
    save = step % config.checkpoint_every_steps == 0 or end_of_epoch
    if log or save or stop:
      # The one host sync of the interval; a checkpoint is only written of finite steps.
      history = jax.device_get(history)
      nonfinite.check(step, history, manager)
    if log:
      report.train(step, nonfinite.reported(step, history, report))
      history = []
    if stop:  # Saved before any evaluation: a preemption's grace period is short.
      manager.save(step, state)
      manager.wait()
      report.text(f'preempted at step {step}: checkpoint saved to {manager.path(step)}; '
                  'rerun the same command to resume')
      break
    if _evaluates_at(step, config, per_epoch, total_steps):
      report.eval(step, step // per_epoch, *evaluate(state))
    if save:
      manager.save(step, state)
  else:
    report.done(evaluated=True)
  return state


def _logs_at(step: int, first_step: int, log_every_steps: int) -> bool:
  """Whether a progress line follows `step`: every log_every_steps-th step, and before the first
  of those, after 1, 2, 4, 8, ... steps of this run, so that a slow step (a big model on a CPU)
  still shows its speed and ETA within a few steps of the compile. A function of the steps alone,
  so every process logs (and syncs) at the same steps."""
  done = step - first_step
  return step % log_every_steps == 0 or (done < log_every_steps and done & (done - 1) == 0)


def _evaluates_at(step: int, config, per_epoch: int, total_steps: int) -> bool:
  """Whether the run evaluates after `step`: the end of every eval_every_epochs-th epoch, and of
  the last."""
  epoch, within = divmod(step, per_epoch)
  return within == 0 and (epoch % config.eval_every_epochs == 0 or step == total_steps)


def _batch_shapes(mode: modes.Mode, devices: Devices) -> dict:
  """The shapes, dtypes and shardings of a global train batch, to compile the step ahead."""
  shape = (devices.local_batch_size * jax.process_count(), *mode.batch_shape())
  return {'image': jax.ShapeDtypeStruct((*shape, 3), np.uint8, sharding=devices.data),
          'label': jax.ShapeDtypeStruct(shape, np.uint8, sharding=devices.data)}


def _batches_from(step: int, mode: modes.Mode, split, devices: Devices, per_epoch: int,
                  total_steps: int):
  """This process's batches of steps step+1 .. total_steps, those of an uninterrupted run."""
  while step < total_steps:
    epoch, first = divmod(step, per_epoch)
    yield from mode.train_batches(split, devices.local_batch_size, epoch=epoch,
                                  process_index=jax.process_index(), first_step=first,
                                  num_steps=per_epoch)
    step += per_epoch - first


def _score_eval_split(forward, mode: modes.Mode, split, devices: Devices, config,
              state: steps.TrainState) -> tuple[dict, dict | None]:
  """(the eval split's metrics, a few examples with their predictions for the picture), scored
  with the weights evaluation uses (steps.inference_params) by the mode."""
  params = steps.inference_params(state)
  confusion = mode.score(forward, params, split, devices)
  results = jax.device_get(metrics.scores(confusion))
  results['confusion_matrix'] = confusion
  n = min(config.num_prediction_images, len(split))
  sample = (mode.sample(forward, params, split, n, devices)
            if n and jax.process_index() == 0 else None)
  return results, sample


class NonFiniteCheck:
  """Stops at the first non-finite loss or update, or with config.skip_nonfinite_updates, counts.

  It reads metrics the loop has fetched anyway, so it adds no host sync; it runs before every
  checkpoint, so a checkpoint never holds a state that a non-finite step produced.
  """

  def __init__(self, skip: bool, count: int):
    self.skip = skip
    self.count = count  # Non-finite updates before the steps of the history last checked.
    self.reported_count = count

  def check(self, step: int, history: list[dict], manager: checkpoints.Manager) -> None:
    """Raises UserError naming the first bad step of `history`, the metrics of steps ..`step`."""
    count = self.count
    for i, step_metrics in enumerate(history):
      loss, updates = float(step_metrics['loss']), int(step_metrics['nonfinite_updates'])
      if not self.skip and (not np.isfinite(loss) or updates > count):
        bad = step - len(history) + 1 + i
        what = f'the loss is {loss}' if not np.isfinite(loss) else 'the gradients are not finite'
        latest = manager.latest_step
        kept = (f'the last checkpoint, {manager.path(latest)}, is untouched' if latest is not None
                else 'no checkpoint was saved')
        raise errors.UserError(
            f'{what} at step {bad}: training stopped without saving it ({kept}); lower '
            'config.learning_rate or check the data, or set config.skip_nonfinite_updates=True')
      count = updates

  def reported(self, step: int, history: list[dict], report: reporting.Reporter) -> list[dict]:
    """The steps the report averages: those with a finite loss (all if none); tells the skips."""
    self.count = int(history[-1]['nonfinite_updates'])
    if self.count > self.reported_count:
      report.text(f'step {step}: {self.count - self.reported_count} non-finite update(s) skipped '
                  f'({self.count} in all)')
      self.reported_count = self.count
    finite = [h for h in history if np.isfinite(h['loss'])]
    return finite or history
