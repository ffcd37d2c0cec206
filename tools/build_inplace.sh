#!/usr/bin/env bash
# Developer build: configure + build into build/dev and link python/esamp/_C.so to the result,
# so that `PYTHONPATH=python pytest` runs against the working tree.  Uses the active python.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
SP=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
CUDA_ROOT=""
if command -v nvcc >/dev/null 2>&1; then
  real=$(grep -o '/[^ ]*/bin/nvcc' "$(command -v nvcc)" 2>/dev/null | head -1 || true)
  [ -n "$real" ] || real=$(readlink -f "$(command -v nvcc)")
  CUDA_ROOT=$(dirname "$(dirname "$real")")
fi
BUILD=${BUILD_DIR:-build/dev}
args=(-S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=${BUILD_TYPE:-Release} -DPython_EXECUTABLE="$(command -v $PY)"
      -DESAMP_CUDA=${ESAMP_CUDA:-AUTO} -DESAMP_CUDA_ARCHS="${ESAMP_CUDA_ARCHS:-80;90}"
      -DESAMP_SANITIZE="${ESAMP_SANITIZE:-}")
[ -n "$CUDA_ROOT" ] && args+=(-DCMAKE_CUDA_COMPILER="$CUDA_ROOT/bin/nvcc" -DCUDAToolkit_ROOT="$CUDA_ROOT")
cmake "${args[@]}" >/dev/null
cmake --build "$BUILD" -j "${JOBS:-2}"
ln -sf "$(pwd)/$BUILD/_C.so" python/esamp/_C.so
echo "built $BUILD/_C.so"
