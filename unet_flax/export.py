"""The trained model as one serialized StableHLO function (`jax.export`), usable without this code.

`export(workdir, out)` writes two files:

  <out>/model.jax_export  the inference function: uint8 pictures [B, S, S, 3] -> float32 logits
                          [B, S, S, K], the batch size B free (symbolic); the parameters are
                          baked in as constants, lowered for CPU, CUDA and TPU. S is what the
                          run's input mode feeds the network (modes.py): resize mode's
                          image_size (whole photos, resized), crop mode's crop_size (windows).
  <out>/model.json        S, num_classes K, class names, the checkpoint step, and under 'mode'
                          what to do around the function to get what predict.py gets (resize
                          mode: resize and upsample; crop mode: the sliding window's tiling,
                          overlap, scale and weights), with image_max_value and ignore_label.

The parameters are baked in so that the artifact is one self-contained file: loading it needs
only jax (no Flax, no orbax, no parameter tree to rebuild and keep in step with the function).
The price is a new export for every checkpoint, and a file as large as the parameters
(about 31 MB for the default U-Net), which is what a parameter file beside it would weigh too.

docs/using.md shows how to run it without this package, in an environment with only
`jax flatbuffers pillow` installed, in either mode; tests/export_test.py runs those snippets.
"""

import json

import jax
import jax.numpy as jnp
from etils import epath

from unet_flax import config as config_lib
from unet_flax import errors
from unet_flax import paths
from unet_flax import inference
from unet_flax import layers
from unet_flax import models

MODEL_FILE = 'model.jax_export'
INFO_FILE = 'model.json'
# Lowered for each: the file then runs wherever the user's jax runs, not only where it was made.
PLATFORMS = ('cpu', 'cuda', 'tpu')
KNOWN_PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')  # jax.export's names ('gpu' is not one).


def export_model(model: inference.Model, *, batch_size: int | None = None,
                 platforms=PLATFORMS) -> jax.export.Exported:
  """The model's forward pass at its input mode's picture size, parameters baked in, as a
  `jax.export.Exported`.

  Args:
    model: a restored model (inference.load_model).
    batch_size: a fixed batch size; None: symbolic, any batch size at call time.
    platforms: what to lower for.
  """
  # XLA's convolutions: no custom call (oneDNN's) that the loading process would lack.
  forward = models.forward(model.config, layers.xla_layer)

  def serve(images):
    """images: [B, h, w, 3] uint8 -> logits [B, h, w, K] float32."""
    return forward(model.params, images)  # The closed-over params become constants.

  batch = jax.export.symbolic_shape('b')[0] if batch_size is None else batch_size
  height, width = model.mode.export()[0]
  spec = jax.ShapeDtypeStruct((batch, height, width, 3), jnp.uint8)
  return jax.export.export(jax.jit(serve), platforms=platforms)(spec)


def _check_out(out: epath.Path, overwrite: bool) -> None:
  """Refuses a file, or a directory that holds files, unless told to overwrite."""
  if out.exists() and not out.is_dir():
    raise errors.UserError(f'--out {out} is a file; pass a directory for the exported model')
  if out.exists() and any(out.iterdir()) and not overwrite:
    raise errors.UserError(f'--out {out} is not empty; pass --overwrite to replace '
                           f'{MODEL_FILE} and {INFO_FILE} there, or choose another --out')


def _write(out: epath.Path, files: dict[str, bytes | str]) -> None:
  """Writes each file whole or not at all (paths.write_atomically)."""
  try:
    out.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise errors.UserError(f'cannot create --out {out} ({e.strerror or e}); choose a writable '
                           'path') from None
  for name, data in files.items():
    paths.write_atomically(out / name, lambda temporary, data=data: (
        temporary.write_bytes(data) if isinstance(data, bytes) else temporary.write_text(data)))


def export(workdir, out, *, step: int | None = None, batch_size: int | None = None,
           overwrite: bool = False, platforms=PLATFORMS) -> dict:
  """Writes <out>/model.jax_export and <out>/model.json for a checkpoint of `workdir`.

  Args:
    workdir: a training run's --workdir.
    out: the directory to write; refused if it holds files, unless `overwrite`.
    step: the checkpoint; None: the latest.
    batch_size: fixed batch size; None: symbolic.
    platforms: what to lower for.

  Returns:
    The contents of model.json.
  """
  unknown = sorted(set(platforms) - set(KNOWN_PLATFORMS))
  if unknown or not platforms:
    raise errors.UserError(f'--platforms {",".join(platforms)}: {", ".join(unknown) or "none"} '
                           f'not known; choose from {",".join(KNOWN_PLATFORMS)}')
  out = paths.absolute(out)
  _check_out(out, overwrite)
  model = inference.load_model(workdir, step)
  config = model.config
  exported = export_model(model, batch_size=batch_size, platforms=platforms)
  batch = 'b' if batch_size is None else batch_size
  (height, width), contract = model.mode.export()
  k = config.num_classes
  info = {
      'format': f'jax.export (StableHLO), calling convention {exported.calling_convention_version}',
      'file': MODEL_FILE,
      'image_size': config.image_size,
      'num_classes': k,
      'class_names': list(config_lib.class_names(config)),
      'mode': contract,
      'input': {'shape': [batch, height, width, 3], 'dtype': 'uint8',
                'meaning': f'RGB pictures, 0..255, as mode.how says ({contract["name"]} mode)'},
      'output': {'shape': [batch, height, width, k], 'dtype': 'float32',
                 'meaning': 'logits; the argmax over the last axis is the class'},
      # 16-bit and float photos: the value shown as white (None: 65535, or 1 for floats <= 1).
      'image_max_value': config.image_max_value,
      'ignore_label': config.ignore_label,
      'platforms': list(exported.platforms),
      'step': model.step,
      'jax_version': jax.__version__,
  }
  _write(out, {MODEL_FILE: bytes(exported.serialize()),
               INFO_FILE: json.dumps(info, indent=2) + '\n'})
  return info
