"""The trained model as one inference function in files usable without this code.

`export(workdir, out)` writes the function in each of its formats (FORMATS), and model.json:

  <out>/model.jax_export  'jax': the function serialized with jax.export (StableHLO), lowered for
                          CPU, CUDA and TPU; runs with jax alone.
  <out>/model.onnx        'onnx': the same function converted by jax2onnx to an ONNX graph
                          (opset ONNX_OPSET), checked against jax by onnxruntime before it is
                          written; runs with onnxruntime alone (servers, phones, browsers, C++).
  <out>/model.json        S, num_classes K, class names, the checkpoint step, under 'files' each
                          format's file, and under 'mode' what to do around the function to get
                          what predict.py gets (resize mode: resize and upsample; crop mode: the
                          sliding window's tiling, overlap, scale and weights), with
                          image_max_value and ignore_label.

The function, in every format: uint8 pictures [B, S, S, 3] -> float32 logits [B, S, S, K], the
batch size B free (symbolic) unless fixed; the parameters baked in as constants. S is what the
run's input mode feeds the network (modes.py Mode.export): resize mode's image_size (whole photos,
resized), crop mode's crop_size (windows). Each format is one entry of FORMATS that lowers that
one function; none builds the model another way.

The parameters are baked in so that the artifact is one self-contained file: loading it needs
only jax (no Flax, no orbax, no parameter tree to rebuild and keep in step with the function).
The price is a new export for every checkpoint, and a file as large as the parameters
(about 31 MB for the default U-Net), which is what a parameter file beside it would weigh too.

docs/using.md shows how to run it without this package, in an environment with only
`jax flatbuffers pillow` or only `onnxruntime numpy pillow` installed, in either mode;
tests/export_test.py and tests/onnx_export_test.py run those snippets.
"""

import importlib.util
import json
import logging
import sys
from collections.abc import Callable

import numpy as np

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
ONNX_FILE = 'model.onnx'
# ONNX's operator set: 18 (2022) runs in every onnxruntime since 1.14, onnxruntime-web and
# -mobile included; the U-Net needs nothing newer (Conv, Relu, ReduceMax, Concat, Reshape...).
# Not 17: jax2onnx 0.13.0 writes ReduceMax's axes as an input, which only opset 18 allows.
ONNX_OPSET = 18
ONNX_INPUT, ONNX_OUTPUT = 'images', 'logits'
ONNX_INSTALL = "pip install -e '.[onnx]' (jax2onnx and onnxruntime)"
# How far onnxruntime's logits may be from jax's on the check batch before export refuses the
# file: float32 convolutions summed in another order differ by ~1e-6 of the logits' scale.
ONNX_TOLERANCE = 1e-3
# jax2onnx writes the model through onnx_ir, whose serializer warns once per value it knows the
# shape but not the type of ("The value type for shape [6] is not known... Skipping
# serialization"). Those values are the int64 shape tensors (Unsqueeze of the batch size, Concat
# with the other dimensions) that feed each Reshape when the batch is symbolic; what is skipped is
# their optional value_info hint, not a node, an input or an output: onnxruntime infers it, and
# check_onnx compares the file's logits with jax's before it is written. Hence WARNING is quieted
# on that logger while converting.
ONNX_SERDE_LOGGER = 'onnx_ir.serde'


def serving_function(model: inference.Model) -> tuple[Callable, tuple[int, int]]:
  """(serve, (height, width)): the one function every format lowers, and its pictures' size.

  serve(images [B, height, width, 3] uint8) -> logits [B, height, width, K] float32: the
  model's plain forward pass (no flip TTA) with the parameters closed over, so that each
  format bakes them in as constants; (height, width) is the input mode's (Mode.export).
  """
  # XLA's convolutions: no custom call (oneDNN's) that the loading process would lack.
  forward = models.forward(model.config, layers.xla_layer)

  def serve(images):
    return forward(model.params, images)
  return serve, model.mode.export()[0]


def export_model(model: inference.Model, *, batch_size: int | None = None,
                 platforms=PLATFORMS) -> jax.export.Exported:
  """serving_function(model) as a `jax.export.Exported`.

  Args:
    model: a restored model (inference.load_model).
    batch_size: a fixed batch size; None: symbolic, any batch size at call time.
    platforms: what to lower for.
  """
  serve, (height, width) = serving_function(model)
  batch = jax.export.symbolic_shape('b')[0] if batch_size is None else batch_size
  spec = jax.ShapeDtypeStruct((batch, height, width, 3), jnp.uint8)
  return jax.export.export(jax.jit(serve), platforms=platforms)(spec)


def onnx_installed() -> bool:
  """Whether the converter (jax2onnx) and the runtime that checks its output are importable."""
  return all(importlib.util.find_spec(name) for name in ('jax2onnx', 'onnxruntime'))


def _require_onnx() -> None:
  if not onnx_installed():
    raise errors.UserError(f'model.onnx needs jax2onnx and onnxruntime: {ONNX_INSTALL}, '
                           'or pass --formats=jax')


def onnx_model(model: inference.Model, *, batch_size: int | None = None) -> bytes:
  """serving_function(model) converted by jax2onnx: a serialized ONNX ModelProto.

  Its input 'images' is [B, S, S, 3] uint8 and its output 'logits' [B, S, S, K] float32, B
  symbolic ('b') unless batch_size fixes it. Raises UserError naming the install if jax2onnx is
  missing.
  """
  _require_onnx()
  import jax2onnx  # pylint: disable=g-import-not-at-top  (optional: the onnx extra)
  serve, (height, width) = serving_function(model)
  spec = jax.ShapeDtypeStruct(('b' if batch_size is None else batch_size, height, width, 3),
                              jnp.uint8)
  serde = logging.getLogger(ONNX_SERDE_LOGGER)
  level = serde.level
  serde.setLevel(logging.ERROR)  # See ONNX_SERDE_LOGGER: its warnings are harmless.
  try:
    proto = jax2onnx.to_onnx(serve, [spec], model_name='unet_flax', opset=ONNX_OPSET,
                             input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT])
  finally:
    serde.setLevel(level)
  return proto.SerializeToString()


def check_onnx(data: bytes, model: inference.Model, batch_size: int | None = None) -> dict:
  """Runs the ONNX model in onnxruntime and jax's forward pass on the same random pictures.

  Returns {'max_abs_logit_diff': float, 'mask_agreement': float (argmax equal, a fraction of
  pixels), 'images': how many, 'onnxruntime': its version}. Raises UserError if the logits
  differ by more than ONNX_TOLERANCE times their largest magnitude (at least 1).
  """
  import onnxruntime  # pylint: disable=g-import-not-at-top  (optional: the onnx extra)
  serve, (height, width) = serving_function(model)
  images = np.random.default_rng(0).integers(
      0, 256, (batch_size or 2, height, width, 3), np.uint8)
  session = onnxruntime.InferenceSession(data, providers=['CPUExecutionProvider'])
  got = session.run([ONNX_OUTPUT], {ONNX_INPUT: images})[0]
  want = np.asarray(jax.jit(serve)(images))
  diff = float(np.abs(got - want).max())
  if not diff <= ONNX_TOLERANCE * max(1.0, float(np.abs(want).max())):
    raise errors.UserError(f'model.onnx computes logits {diff:.3g} away from the jax model\'s '
                           f'in onnxruntime {onnxruntime.__version__}; export with --formats=jax '
                           'and report this with the versions of jax and jax2onnx')
  return {'max_abs_logit_diff': diff,
          'mask_agreement': float((got.argmax(-1) == want.argmax(-1)).mean()),
          'images': len(images), 'onnxruntime': onnxruntime.__version__}


def _jax_format(model, batch_size, platforms) -> tuple[str, bytes, dict]:
  exported = export_model(model, batch_size=batch_size, platforms=platforms)
  return MODEL_FILE, bytes(exported.serialize()), {
      'file': MODEL_FILE,
      'format': f'jax.export (StableHLO), calling convention {exported.calling_convention_version}',
      'platforms': list(exported.platforms), 'jax_version': jax.__version__}


def _onnx_format(model, batch_size, platforms) -> tuple[str, bytes, dict]:
  del platforms  # onnxruntime picks its execution provider where the file is run.
  data = onnx_model(model, batch_size=batch_size)
  return ONNX_FILE, data, {
      'file': ONNX_FILE, 'format': f'ONNX, opset {ONNX_OPSET}',
      'input_name': ONNX_INPUT, 'output_name': ONNX_OUTPUT,
      'jax2onnx_version': _version('jax2onnx'),
      'checked': check_onnx(data, model, batch_size)}


def _version(package: str) -> str:
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  return metadata.version(package)


# Each format: (model, batch_size, platforms) -> (file name, its bytes, its model.json entry).
FORMATS = {'jax': _jax_format, 'onnx': _onnx_format}
# The file each format writes: with --overwrite, those of an earlier export that this one does not
# write are removed, so that no model.onnx of another run or step stays beside a new model.json.
FORMAT_FILES = {'jax': MODEL_FILE, 'onnx': ONNX_FILE}


def default_formats() -> tuple[str, ...]:
  """'jax', and 'onnx' where its converter is installed."""
  return ('jax', 'onnx') if onnx_installed() else ('jax',)


def _check_out(out: epath.Path, overwrite: bool) -> None:
  """Refuses a file, or a directory that holds files, unless told to overwrite."""
  if out.exists() and not out.is_dir():
    raise errors.UserError(f'--out {out} is a file; pass a directory for the exported model')
  if out.exists() and any(out.iterdir()) and not overwrite:
    raise errors.UserError(f'--out {out} is not empty; pass --overwrite to replace '
                           f'the model\'s files there, or choose another --out')


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


def _remove_stale(out: epath.Path, written: set[str]) -> None:
  """Removes the format files (FORMAT_FILES) in `out` that are not in `written`, saying so;
  nothing else in `out` is touched."""
  for name in sorted(set(FORMAT_FILES.values()) - written):
    if (out / name).exists():
      (out / name).unlink()
      print(f'note: removed {out / name} of an earlier export: this export did not write it',
            file=sys.stderr)


def export(workdir, out, *, step: int | None = None, batch_size: int | None = None,
           overwrite: bool = False, platforms=PLATFORMS,
           formats: tuple[str, ...] | None = None) -> dict:
  """Writes the model in each of `formats` and <out>/model.json for a checkpoint of `workdir`.

  Args:
    workdir: a training run's --workdir.
    out: the directory to write; refused if it holds files, unless `overwrite`, which replaces
      the model's files there and removes those of its formats this export does not write.
    step: the checkpoint; None: the latest.
    batch_size: fixed batch size; None: symbolic.
    platforms: what the jax format is lowered for.
    formats: names from FORMATS; None: default_formats(), saying on stderr when 'onnx' is left
      out for want of its converter. An explicit 'onnx' without it is a UserError.

  Returns:
    The contents of model.json.
  """
  unknown = sorted(set(platforms) - set(KNOWN_PLATFORMS))
  if unknown or not platforms:
    raise errors.UserError(f'--platforms {",".join(platforms)}: {", ".join(unknown) or "none"} '
                           f'not known; choose from {",".join(KNOWN_PLATFORMS)}')
  onnx_left_out = formats is None and 'onnx' not in default_formats()
  if formats is None:
    formats = default_formats()
  unknown = sorted(set(formats) - set(FORMATS))
  if unknown or not formats:
    raise errors.UserError(f'--formats {",".join(formats)}: {", ".join(unknown) or "none"} '
                           f'not known; choose from {",".join(FORMATS)}')
  if 'onnx' in formats:
    _require_onnx()  # Before the checkpoint is read.
  out = paths.absolute(out)
  _check_out(out, overwrite)
  model = inference.load_model(workdir, step)
  if onnx_left_out:  # Said once nothing refuses the export, not beside a refusal.
    print(f'note: model.onnx not written: its converter is not installed ({ONNX_INSTALL})',
          file=sys.stderr)
  config = model.config
  written = {name: FORMATS[name](model, batch_size, platforms) for name in formats}
  batch = 'b' if batch_size is None else batch_size
  (height, width), contract = model.mode.export()
  k = config.num_classes
  info = {
      'files': {name: entry for name, (_, _, entry) in written.items()},
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
      'step': model.step,
  }
  _write(out, {**{file: data for file, data, _ in written.values()},
               INFO_FILE: json.dumps(info, indent=2) + '\n'})
  _remove_stale(out, {file for file, _, _ in written.values()})
  return info
