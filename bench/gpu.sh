#!/usr/bin/env bash
# The GPU check, prepared to run once on a lent GPU machine (which has jax with CUDA, flax, optax
# and orbax, but not tensorflow-datasets, array_record or ml_collections, and no network).
#
#   bench/gpu.sh wheels 3.12   # here: the missing wheels for the device's Python into gpu_wheels/
#   bench/gpu.sh run           # there, in the repository root; results under $OUT (or ./gpu_out)
#
# `run` installs the wheels without dependencies (nothing replaces the device's CUDA jax), then
# runs, each under its own time limit so that one slow part cannot starve the others: the suite,
# the quickstart, bench/speed.py at batch 64 and 256 in float32 and bfloat16 with MFU against the
# GPU's datasheet peak, crop-mode megapixels/s, and the chapter's nn.ConvTranspose against the
# phase upsampling (models.Upsample). Every part's output lands in $OUT/<part>.log.
set -uo pipefail
cd "$(dirname "$0")/.."

# Left out of the wheels: the notebook test's Jupyter kernel (that test is deselected there) and
# pyarrow (45 MB; tensorflow-datasets lists it, the numpy path this project reads never imports it).
LEAVE_OUT='^(jax|jaxlib|jax-cuda|numpy|scipy|ml.dtypes|opt.einsum|flax|optax|orbax|tensorstore|chex|efficientnet|torch|nvidia|pyarrow|debugpy|jedi|ipykernel|ipython|uvloop|jupyter|nbclient|nbformat|tornado|pyzmq|traitlets|parso|prompt.toolkit|pygments|matplotlib.inline|comm|nest.asyncio|stack.data|asttokens|executing|pure.eval|wcwidth|decorator|pexpect|ptyprocess|fastjsonschema|jsonschema|referencing|rpds)'

wheels() {
  local version="$1"
  rm -rf gpu_wheels && mkdir -p gpu_wheels
  python -m pip freeze --exclude-editable | grep -viE "$LEAVE_OUT" | grep -v '^promise' \
    > gpu_wheels/requirements.txt
  python -m pip download -q -d gpu_wheels --no-deps --only-binary=:all: --python-version "$version" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 -r gpu_wheels/requirements.txt
  # promise has no wheel on PyPI: build its pure-Python one here.
  python -m pip wheel -q --no-deps -w gpu_wheels "$(python -m pip freeze | grep '^promise')"
  du -sh gpu_wheels
}

# NVIDIA's datasheet peaks, dense (no sparsity), TFLOP/s: H100 SXM and H200 (same compute):
# bfloat16 989.4, TF32 494.7 (XLA runs float32 convolutions and matmuls in TF32 on these GPUs).
peak_tflops() {
  local name dtype="$1"
  name="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)"
  case "$name:$dtype" in
    *H100*:bfloat16|*H200*:bfloat16) echo 989.4 ;;
    *H100*:float32|*H200*:float32) echo 494.7 ;;
    *) echo 0 ;;  # Unknown GPU: the table shows the measured matmul limit only.
  esac
}

part() {  # part NAME SECONDS COMMAND...: runs COMMAND under a time limit into $OUT/NAME.log.
  local name="$1" seconds="$2"; shift 2
  local started=$SECONDS
  timeout "$seconds" "$@" > "$OUT/$name.log" 2>&1
  echo "$name: exit $? in $((SECONDS - started)) s" | tee -a "$OUT/summary.txt"
}

run() {
  OUT="${OUT:-gpu_out}"; mkdir -p "$OUT"
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
  python -m pip install -q --no-deps --no-index gpu_wheels/*.whl > "$OUT/install.log" 2>&1
  python -m pip install -q --no-deps --no-build-isolation -e . >> "$OUT/install.log" 2>&1
  python -c 'import jax; print(jax.__version__, jax.devices())' | tee "$OUT/jax.txt"
  export UNET_FLAX_CACHE="$PWD/.gpu_cache"
  part suite 240 python -m pytest -q -x --ignore=tests/notebook_test.py -p no:cacheprovider
  part quickstart 120 python train.py --config configs/quickstart.py --workdir "$OUT/quick"
  for dtype in float32 bfloat16; do
    part "speed_$dtype" 90 python bench/speed.py --batch_sizes 64,256 --matmul_size 8192 \
      --config.dtype=$dtype --peak_tflops "$(peak_tflops $dtype)" --json "$OUT/speed_$dtype.json"
  done
  part tiles 60 python bench/speed.py --config configs/tiles.py --tiles_only --tiles_image=4096 \
    --window_batch 32 --json "$OUT/tiles.json"
  part conv_transpose 60 python bench/speed.py --batch_sizes 64 --upsample conv_transpose \
    --matmul_size 8192 --config.dtype=bfloat16 --json "$OUT/conv_transpose.json"
  cat "$OUT/summary.txt"
}

case "${1:-}" in
  wheels) wheels "${2:?the device Python version, e.g. 3.12}" ;;
  run) run ;;
  *) echo "usage: bench/gpu.sh wheels PYTHON_VERSION | bench/gpu.sh run" >&2; exit 2 ;;
esac
