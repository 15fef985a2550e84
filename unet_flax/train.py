"""TrainState, train_step, eval_step and the loop: train_and_evaluate(config, workdir).

One `jax.sharding.Mesh` over every device of every host: batches are sharded on its 'data' axis,
the state is replicated, and `jit` places the collectives, so the same code runs on 1 CPU, 1 GPU
or a TPU pod.
"""

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from flax.training import train_state
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from unet_flax import augment
from unet_flax import checkpoints
from unet_flax import errors
from unet_flax import input_pipeline
from unet_flax import metrics
from unet_flax import models
from unet_flax import preemption
from unet_flax import reporting


# apply_if_finite applies an update anyway after this many non-finite ones in a row: never.
_NEVER_GIVE_UP = 2**31 - 1


class TrainState(train_state.TrainState):
  """flax's TrainState: step, params, opt_state; apply_fn and tx are static."""


def create_model(config: ml_collections.ConfigDict) -> models.UNet:
  return models.UNet(num_classes=config.num_classes, widths=tuple(config.widths),
                     dropout_rate=config.dropout_rate, dtype=jnp.dtype(config.dtype))


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam at config.learning_rate, constant or warmup + cosine decay per config.schedule, wrapped
  so that its state counts non-finite gradients (`total_notfinite`).

  With config.skip_nonfinite_updates such updates are skipped; without, they are applied (0
  tolerated) and the loop stops at its next check. Always wrapped: checkpoints of either setting
  have the same structure.
  """
  learning_rate = config.learning_rate
  schedule = config.get('schedule', 'constant')  # Absent from older runs' config.json.
  if schedule == 'warmup_cosine':
    # Steps are counted from the split's size, which the tfds metadata (or the folder's listing)
    # gives without decoding anything.
    per_epoch = steps_per_epoch(config, input_pipeline.num_examples(
        config.dataset, config.train_split, config.data_dir))
    if not 0 <= config.warmup_epochs < config.num_epochs:
      raise errors.UserError(f'config.warmup_epochs={config.warmup_epochs} must be at least 0 '
                             f'and below config.num_epochs={config.num_epochs}')
    learning_rate = optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, warmup_steps=round(config.warmup_epochs * per_epoch),
        decay_steps=config.num_epochs * per_epoch)
  elif schedule != 'constant':
    raise errors.UserError(f'config.schedule={schedule!r} is not one of constant, warmup_cosine')
  adam = optax.adam(learning_rate, b1=config.adam_b1, b2=config.adam_b2,
                    eps=config.adam_eps)
  skip = config.get('skip_nonfinite_updates', False)  # Absent from older runs' config.json.
  return optax.apply_if_finite(adam, max_consecutive_errors=_NEVER_GIVE_UP if skip else 0)


def create_train_state(config: ml_collections.ConfigDict, rng: jax.Array) -> TrainState:
  model = create_model(config)
  images = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
  params = model.init(rng, images, train=False)['params']
  return TrainState.create(apply_fn=model.apply, params=params, tx=create_optimizer(config))


def normalize(images: jax.Array) -> jax.Array:
  """uint8 [B, H, W, 3] -> float32 in [0, 1]. Done on the device: a quarter of the transfer."""
  return images.astype(jnp.float32) / 255.0


def train_step(state: TrainState, batch: dict, rng: jax.Array, *, class_weights=None,
               dice_weight: float = 0.0, microbatches: int = 1) -> tuple[TrainState, dict]:
  """One Adam step on the segmentation loss: softmax cross-entropy, by default unweighted.

  Args:
    state: the train state (donated by the caller's jit).
    batch: {'image': [B, H, W, 3] uint8, 'label': [B, H, W] int}.
    rng: the run's dropout key; each step folds in its own step number, so a resumed run draws
      the same dropout masks as an uninterrupted one.
    class_weights, dice_weight: per-class cross-entropy weights ([K] or None) and the weight of
      the soft Dice term; see metrics.segmentation_loss.
    microbatches: the gradient is accumulated over this many slices of each device's rows (see
      `num_microbatches`); the loss and gradient are those of the whole batch. Needs
      dice_weight == 0: a batch's Dice is not a sum over its parts.

  Returns:
    (new state, {'loss': scalar float32}).
  """
  dropout_rng = jax.random.fold_in(rng, state.step)
  labels = batch['label'].astype(jnp.int32)

  def loss_fn(params, images, labels, dropout_rng):
    logits = state.apply_fn({'params': params}, normalize(images), train=True,
                            rngs={'dropout': dropout_rng})
    mask = jnp.ones(labels.shape[0], jnp.bool_)
    return metrics.segmentation_loss(logits, labels, mask, class_weights=class_weights,
                                     dice_weight=dice_weight)

  if microbatches == 1:
    loss, grads = jax.value_and_grad(loss_fn)(state.params, batch['image'], labels, dropout_rng)
  else:
    if dice_weight:
      raise ValueError('microbatches need dice_weight == 0')
    loss, grads = _accumulated_value_and_grad(loss_fn, state.params, batch['image'], labels,
                                              dropout_rng, microbatches, class_weights)
  return state.apply_gradients(grads=grads), {'loss': loss}


def _accumulated_value_and_grad(loss_fn, params, images, labels, dropout_rng, count: int,
                                class_weights):
  """The whole batch's cross-entropy and its gradient, summed over `count` microbatches.

  Each microbatch's loss is a weighted mean over its pixels; scaled by its share of the batch's
  total pixel weight, the parts sum to the batch's mean. Each draws its own dropout masks. The
  loop is unrolled: XLA:CPU runs convolutions in a while loop's body far slower (a lax.scan of
  this step took over 100x as long).
  """
  def weight(labels):
    return metrics.cross_entropy_weight(labels, jnp.ones(labels.shape[0]), class_weights)

  def scaled_loss(params, images, labels, dropout_rng, share):
    return loss_fn(params, images, labels, dropout_rng) * share

  total = weight(labels)
  parts = []
  for i, (images_i, labels_i) in enumerate(zip(_microbatches(images, count),
                                               _microbatches(labels, count))):
    share = jnp.where(total > 0, weight(labels_i) / total, 0.0)
    parts.append(jax.value_and_grad(scaled_loss)(params, images_i, labels_i,
                                                 jax.random.fold_in(dropout_rng, i), share))
  return jax.tree.map(lambda *values: sum(values), *parts)


def _microbatches(x: jax.Array, count: int) -> list[jax.Array]:
  """[B, ...] -> `count` arrays [B / count, ...]; each takes a slice of every device's rows.

  The batch is sharded over the devices in contiguous blocks, so splitting each block rather than
  the whole batch keeps every microbatch where its rows already are: no data moves.
  """
  devices = jax.device_count()
  per_device = x.shape[0] // devices
  blocks = x.reshape(devices, per_device, *x.shape[1:])
  size = per_device // count
  return [blocks[:, i * size:(i + 1) * size].reshape(devices * size, *x.shape[1:])
          for i in range(count)]


def predict(state: TrainState, images: jax.Array) -> jax.Array:
  """images: [B, H, W, 3] uint8 -> predicted classes [B, H, W] int32."""
  logits = state.apply_fn({'params': state.params}, normalize(images), train=False)
  return jnp.argmax(logits, axis=-1)


def eval_step(state: TrainState, batch: dict, num_classes: int) -> jax.Array:
  """The [K, K] confusion matrix of one batch; examples with batch['mask'] == 0 count nothing."""
  labels = batch['label'].astype(jnp.int32)
  return metrics.confusion_matrix(labels, predict(state, batch['image']), num_classes,
                                  batch['mask'])


class Devices:
  """The mesh, the shardings, and host batches -> global arrays."""

  def __init__(self, global_batch_size: int):
    count = jax.device_count()
    if global_batch_size % count:
      raise errors.UserError(
          f'config.batch_size={global_batch_size} is not divisible by the {count} devices; '
          f'use a multiple of {count}')
    # Auto axes: jit propagates the batch sharding itself (explicit sharding-in-types is not needed).
    self.mesh = jax.make_mesh((count,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
    self.data = NamedSharding(self.mesh, P('data'))
    self.replicated = NamedSharding(self.mesh, P())
    self.local_batch_size = global_batch_size // jax.process_count()
    self.per_device_batch_size = global_batch_size // count

  def put(self, batch: dict) -> dict:
    """This process's rows of the global batch -> arrays sharded over all devices."""
    return {k: jax.make_array_from_process_local_data(self.data, v) for k, v in batch.items()}

  def prefetch(self, batches, size: int = 2):
    """Puts batches on the devices `size` ahead, so the step never waits for a transfer."""
    queue = []
    for batch in batches:
      queue.append(self.put(batch))
      if len(queue) > size:
        yield queue.pop(0)
    yield from queue


def _counting_nonfinite(step_fn):
  """step_fn, whose metrics also hold 'nonfinite_updates': how many so far, over the whole run."""
  @functools.wraps(step_fn)
  def step(state, batch, rng):
    state, step_metrics = step_fn(state, batch, rng)
    return state, {**step_metrics, 'nonfinite_updates': state.opt_state.total_notfinite}
  return step


def compile_steps(config, devices: Devices):
  """The jitted train and eval steps, with explicit shardings and the state donated."""
  repl, data = devices.replicated, devices.data
  class_weights = config.get('class_weights')  # Absent from older runs' config.json.
  if class_weights is not None:
    if len(class_weights) != config.num_classes:
      raise errors.UserError(f'config.class_weights={tuple(class_weights)} needs one weight per '
                             f'class, config.num_classes={config.num_classes}')
    class_weights = tuple(float(w) for w in class_weights)
  step = functools.partial(train_step, class_weights=class_weights,
                           dice_weight=float(config.get('dice_weight', 0.0)),
                           microbatches=num_microbatches(config, devices))
  train = jax.jit(_counting_nonfinite(step), in_shardings=(repl, data, repl),
                  out_shardings=(repl, repl), donate_argnums=0)
  evaluate = jax.jit(functools.partial(eval_step, num_classes=config.num_classes),
                     in_shardings=(repl, data), out_shardings=repl)
  return train, evaluate


# Auto microbatches on CPU: at most this many examples per device each. Measured on a 2-core
# CPU, default model at batch 64: 26.5 s a step as one batch, 24.2 s as 4 microbatches of 16
# (the working set of each fits the caches better), 24.7 s as 8 of 8.
_CPU_MICROBATCH = 16


def num_microbatches(config, devices: Devices) -> int:
  """config.num_microbatches, or for 0 (auto): on CPUs, the fewest that make microbatches of at
  most 16 examples per device (and at least 8); elsewhere 1, so that accelerators get whole
  batches. Always 1 with a Dice term, whose value for a batch is not a sum over its parts."""
  per_device = devices.per_device_batch_size
  dice = config.get('dice_weight', 0.0)
  count = config.get('num_microbatches', 0)  # Absent from older runs' config.json.
  if count:
    if count < 0 or per_device % count:
      raise errors.UserError(
          f'config.num_microbatches={count} must divide the {per_device} examples each device '
          f'gets of config.batch_size={config.batch_size}; use a divisor, or 0 for auto')
    if count > 1 and dice:
      raise errors.UserError(
          f'config.num_microbatches={count} cannot be used with config.dice_weight={dice} (a '
          "batch's Dice is not a sum over microbatches); set num_microbatches to 0 or 1")
    return count
  if dice or jax.devices()[0].platform != 'cpu':
    return 1
  for count in range(1, per_device + 1):
    if per_device % count == 0 and per_device // count <= _CPU_MICROBATCH:
      return count if per_device // count >= 8 else 1
  return 1


def evaluate(eval_fn, state, split: input_pipeline.Split, devices: Devices) -> dict[str, Any]:
  """Metrics of the whole split: confusion matrices summed on device, then one fetch."""
  batches = input_pipeline.eval_batches(split, devices.local_batch_size, jax.process_count())
  confusion = None
  for batch in devices.prefetch(batches):
    c = eval_fn(state, batch)
    confusion = c if confusion is None else confusion + c
  results = jax.device_get(metrics.iou(confusion))
  results['confusion_matrix'] = np.asarray(jax.device_get(confusion))
  return results


def steps_per_epoch(config, num_train_examples: int) -> int:
  steps = config.steps_per_epoch or num_train_examples // config.batch_size
  if steps < 1:
    raise errors.UserError(
        f'the training split has {num_train_examples} examples, fewer than '
        f'config.batch_size={config.batch_size}; lower the batch size')
  return steps


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains and evaluates per the config; checkpoints, metrics and pictures go to `workdir`.

  Running it again with the same workdir resumes from the latest checkpoint, exactly: the step,
  optimizer state, dropout keys and position in the data order are those of an uninterrupted run.
  On SIGTERM or SIGINT it saves a checkpoint at the current step and returns.
  """
  workdir = epath.Path(workdir)
  devices = Devices(config.batch_size)
  checkpoints.check_workdir(workdir)
  input_pipeline.get_builder(config.dataset, config.data_dir)  # A bad name fails before writing.
  manager = checkpoints.Manager(workdir, config)
  report = reporting.Reporter(workdir, config, is_lead=jax.process_index() == 0)
  try:
    # A full or read-only disk under metrics, pictures or data is one line naming the file.
    with (checkpoints.disk_errors(None, errnos=checkpoints.WRITE_ERRNOS),
          preemption.Notice() as notice):
      return _train(config, devices, manager, report, notice)
  finally:
    manager.close()  # Waits for the last checkpoint, also when stopping on an error.
    report.close()


def _train(config, devices: Devices, manager: checkpoints.Manager, report: reporting.Reporter,
           notice: preemption.Notice) -> TrainState:
  read = functools.partial(
      input_pipeline.load_split, config.dataset, data_dir=config.data_dir,
      image_size=config.image_size, num_classes=config.num_classes,
      process_index=jax.process_index(), process_count=jax.process_count(),
      num_threads=config.input_threads)
  started = time.perf_counter()
  train_data, eval_data = read(config.train_split), read(config.eval_split)
  report.text(f'data: {train_data.num_examples} train and {eval_data.num_examples} eval '
              f'examples at {config.image_size}x{config.image_size}, decoded in '
              f'{time.perf_counter() - started:.1f}s')

  rng = jax.random.key(config.seed)
  init_rng, dropout_rng = jax.random.split(rng)
  state = jax.jit(functools.partial(create_train_state, config),
                  out_shardings=devices.replicated)(init_rng)
  microbatches = num_microbatches(config, devices)
  report.text(f'model: {models.param_count(state.params):,} parameters, '
              f'{jax.device_count()} {jax.devices()[0].platform} device(s), '
              f'{jax.process_count()} process(es)'
              + (f', gradients summed over {microbatches} microbatches a step'
                 if microbatches > 1 else ''))
  state = manager.restore_or(state)
  train_fn, eval_fn = compile_steps(config, devices)

  per_epoch = steps_per_epoch(config, train_data.num_examples)
  total_steps = per_epoch * config.num_epochs
  step = int(state.step)
  if step:
    report.text(f'resumed from step {step} of {total_steps}')
  report.start(step, total_steps)
  nonfinite = NonFiniteCheck(config.skip_nonfinite_updates,
                             int(jax.device_get(state.opt_state.total_notfinite)))
  history = []
  for batch in devices.prefetch(_batches_from(step, train_data, config, devices, per_epoch,
                                              total_steps)):
    state, step_metrics = train_fn(state, batch, dropout_rng)
    history.append(step_metrics)
    step += 1
    end_of_epoch = step % per_epoch == 0
    log = step % config.log_every_steps == 0 or end_of_epoch
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
    epoch = step // per_epoch
    if end_of_epoch and (epoch % config.eval_every_epochs == 0 or step == total_steps):
      results = evaluate(eval_fn, state, eval_data, devices)
      report.eval(step, epoch, results, sample=_prediction_sample(state, eval_data, config))
    if save:
      manager.save(step, state)
  return state


def _batches_from(step: int, split: input_pipeline.Split, config, devices: Devices,
                  per_epoch: int, total_steps: int):
  """This process's batches of steps step+1 .. total_steps, those of an uninterrupted run."""
  augmentation = augment.Options.from_config(config)
  while step < total_steps:
    epoch, first = divmod(step, per_epoch)
    yield from input_pipeline.train_batches(
        split, devices.local_batch_size, seed=config.seed, epoch=epoch,
        process_index=jax.process_index(), first_step=first, num_steps=per_epoch,
        augmentation=augmentation)
    step += per_epoch - first


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


def _prediction_sample(state, split: input_pipeline.Split, config) -> dict | None:
  """A few test images with true and predicted masks, for the picture of each evaluation."""
  n = min(config.num_prediction_images, len(split))
  if n == 0 or jax.process_index() != 0:
    return None
  images = split.images[:n]
  predicted = jax.jit(predict)(jax.device_get(state), images)
  return {'image': images, 'label': split.labels[:n], 'prediction': np.asarray(predicted)}
