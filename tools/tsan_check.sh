#!/usr/bin/env bash
# ThreadSanitizer check of the persistent trainer's CPU path (issue 7).
#
#   tools/tsan_check.sh            (JOBS=1 for a slow machine; BUILD_DIR=build/tsan by default)
#
# 1. Builds the extension with -fsanitize=thread (ESAMP_SANITIZE=thread; CPU only, no benchmarks) into its own
#    build directory.  The working tree's python/esamp/_C.so is NOT touched: the Python package is copied to a
#    temporary directory together with the TSan _C.so, and only that copy is put on PYTHONPATH.
# 2. Runs, with gcc's libtsan preloaded into python:
#      a. tests/test_trainer.py (CPU), including test_concurrent_threads_cpu;
#      b. a stress script: several Python threads calling observe / predict / reset / stats / pending
#         concurrently, (i) each thread on its own slots, (ii) several threads on one shared slot (the
#         "shared" distiller mode, S = 1);
#      c. a canary that MUST be reported (two threads training the same esamp.Distiller at once, a real
#         race by construction): if TSan stays silent there, the check fails because it would prove nothing.
# 3. Fails on any ThreadSanitizer report in a or b (data race, lock-order inversion, use of a destroyed mutex,
#    ...), on a crash, or on a hang (timeout).
#
# OMP_NUM_THREADS=1 for every run.  libgomp is not TSan-instrumented: the start and the end of a parallel region
# synchronise through futexes TSan cannot see, so any OpenMP team of 2+ threads makes TSan report the kernels'
# ordinary reads of data the calling thread wrote before the region (measured here: 108 such reports in one
# stress run, all inside "#pragma omp parallel" bodies against writes made just before the region).  With one
# OpenMP thread the regions run on the calling thread and every remaining report is a real race between the
# trainer's worker thread and the Python threads.  The kernels' OpenMP parallelism is covered by
# tests/test_determinism.py (bit-identical results with 1 and 2 threads) and by the ASan/UBSan fuzz harness.
# libtorch and python are uninstrumented: their memory accesses are invisible to TSan and their pthread calls are
# intercepted, so they need no suppression.  The flip side: a race is only reported when BOTH accesses are in
# instrumented code (esamp's kernels, csrc/torch/*.cpp and the torch headers inlined there); accesses made inside
# libtorch (at::copy_ into the trainer's ring, the GEMM callback's at::mm, .clone() in state_dict / last_losses)
# are not checked.  tools/tsan_suppressions.txt has one entry (glibc's release of a
# finished thread's dynamic TLS block; the reason is written there).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python}
BUILD=${BUILD_DIR:-build/tsan}
start=$(date +%s)

echo "== [tsan] building the extension with -fsanitize=thread into $BUILD"
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPython_EXECUTABLE="$(command -v "$PY")" \
      -DESAMP_CUDA=OFF -DESAMP_BUILD_BENCH=OFF -DESAMP_BUILD_CPP_TESTS=OFF -DESAMP_SANITIZE=thread >/dev/null
cmake --build "$BUILD" -j "${JOBS:-2}"

LIBTSAN=$(ldd "$BUILD/_C.so" | awk '/libtsan/ {print $3; exit}')
if [ -z "$LIBTSAN" ] || [ ! -f "$LIBTSAN" ]; then
  echo "[tsan] FAIL: $BUILD/_C.so is not linked against libtsan (ESAMP_SANITIZE=thread had no effect?)"
  exit 1
fi

LOGDIR="$ROOT/$BUILD/logs"
rm -rf "$LOGDIR"
mkdir -p "$LOGDIR"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/esamp-tsan.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
cp -r python/esamp "$WORK/esamp"
rm -f "$WORK/esamp/_C.so"
cp "$BUILD/_C.so" "$WORK/esamp/_C.so"
find "$WORK/esamp" -name __pycache__ -prune -exec rm -rf {} +

# --------------------------------------------------------------------------------------------------------------
cat > "$WORK/stress.py" <<'EOF'
"""Concurrent use of esamp.Trainer (CPU) from several Python threads; run under TSan by tools/tsan_check.sh."""
import os
import sys
import threading
import time

import torch

import esamp

assert os.path.dirname(os.path.dirname(os.path.abspath(esamp.__file__))) == os.environ["ESAMP_TSAN_PKG"], \
    f"imported {esamp.__file__}, not the TSan copy"
mode = sys.argv[1]
errors = []


def guarded(fn):
    def run(*a):
        try:
            fn(*a)
        except BaseException as e:  # reported below
            errors.append(f"{fn.__name__}{a}: {e!r}")
    return run


def start(fns):
    threads = [threading.Thread(target=f, args=a) for f, a in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


if mode == "own_slots":
    # Each request thread owns two slots: observe (rows of both slots in one batch), predict, now and then
    # reset one of its slots; a monitor thread polls the counters.  4 threads x 40 steps.
    H, R, L, S, NT, ITERS = 64, 8, 2, 8, 4, 40
    tr = esamp.Trainer(H, R, L, S, ring_rows=64, ring_segments=3, seed=1)
    done = threading.Event()

    @guarded
    def request(k):
        g = torch.Generator().manual_seed(k)
        ids = torch.tensor([2 * k, 2 * k + 1] * 8)
        for it in range(ITERS):
            x, t = torch.randn(16, H, generator=g), torch.randn(16, H, generator=g)
            tr.observe(x, t, ids)
            y = tr.predict(x[:6], ids[:6])
            assert torch.isfinite(y).all()
            if it % 7 == 3:
                tr.reset([2 * k + 1])

    @guarded
    def monitor():
        while not done.is_set():
            tr.stats()
            tr.pending()

    m = threading.Thread(target=monitor)
    m.start()
    start([(request, (k,)) for k in range(NT)])
    done.set()
    m.join()
    tr.synchronize()
    st = tr.stats()
    assert st["rows_trained"] == NT * ITERS * 16 and st["steps"] == NT * ITERS, st
elif mode == "shared_slot":
    # One shared distiller (S = 1): a feeder thread queues small updates, each after the previous one finished
    # and a short pause, while two threads predict large batches on the same slot without pause.  predict()
    # must never read the parameters while an update writes them (an update queued by another thread can
    # start while a prediction is running).
    H, R, L, ITERS = 128, 16, 2, 120
    tr = esamp.Trainer(H, R, L, 1, ring_rows=8, ring_segments=2, seed=2)
    done = threading.Event()

    @guarded
    def feeder():
        g = torch.Generator().manual_seed(0)
        for k in range(ITERS):
            tr.observe(torch.randn(4, H, generator=g), torch.randn(4, H, generator=g), torch.zeros(4, dtype=torch.long))
            while tr.pending():
                time.sleep(0.0005)
            time.sleep(0.001 * (k % 4))
        done.set()

    @guarded
    def predictor(k):
        x = torch.randn(256, H, generator=torch.Generator().manual_seed(10 + k))
        while not done.is_set():
            assert torch.isfinite(tr.predict(x, torch.zeros(256, dtype=torch.long))).all()

    start([(feeder, ()), (predictor, (0,)), (predictor, (1,))])
    tr.synchronize()
    assert tr.stats()["rows_trained"] == ITERS * 4, tr.stats()
elif mode == "canary":
    # A real race by construction: two threads take train steps on the same bank at the same time (esamp.Distiller
    # is not thread-safe, like any torch module).  TSan must report it.
    d = esamp.Distiller(64, 8, 2, 1)

    def train(k):
        g = torch.Generator().manual_seed(k)
        for _ in range(30):
            d.train_step(torch.randn(8, 64, generator=g), torch.randn(8, 64, generator=g), torch.zeros(8, dtype=torch.long))

    start([(train, (0,)), (train, (1,))])
else:
    raise SystemExit(f"unknown mode {mode}")
if errors:
    raise SystemExit("errors in threads:\n" + "\n".join(errors))
print(f"[stress] {mode}: done")
EOF
# --------------------------------------------------------------------------------------------------------------

export ESAMP_TSAN_PKG="$WORK"
TSAN_OPTS="halt_on_error=0 exitcode=66 second_deadlock_stack=1 report_signal_unsafe=0"
TSAN_OPTS="$TSAN_OPTS suppressions=$ROOT/tools/tsan_suppressions.txt print_suppressions=1"

# run NAME CMD...: runs CMD under TSan; sets REPORTS (number of TSan reports) and RC.  Retries once with ASLR
# disabled when the TSan runtime cannot map its shadow memory (kernels with high mmap randomisation).
run_tsan() {
  local name=$1
  shift
  local log="$LOGDIR/$name.log"
  local t0
  t0=$(date +%s)
  set +e
  env LD_PRELOAD="$LIBTSAN" TSAN_OPTIONS="$TSAN_OPTS" OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH="$WORK" \
      timeout 1200 "$@" >"$log" 2>&1
  RC=$?
  if grep -q "unexpected memory mapping" "$log"; then
    env LD_PRELOAD="$LIBTSAN" TSAN_OPTIONS="$TSAN_OPTS" OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH="$WORK" \
        timeout 1200 setarch "$(uname -m)" -R "$@" >"$log" 2>&1
    RC=$?
  fi
  set -e
  REPORTS=$(grep -c "WARNING: ThreadSanitizer" "$log" || true)
  local supp
  supp=$(awk '/^Suppressions used:/ {p = 1; next} p && /race:/ {print $1 " x" $NF}' "$log" | paste -sd' ' -)
  echo "[tsan] $name: exit $RC, $REPORTS ThreadSanitizer report(s), $(( $(date +%s) - t0 )) s${supp:+ (suppressed: $supp)}"
  if [ "$REPORTS" -gt 0 ]; then
    grep -E "^SUMMARY: ThreadSanitizer" "$log" | sort | uniq -c | sed 's/^/[tsan]   /'
  fi
  LAST_LOG=$log
}

fail=0
check_clean() {
  if [ "$RC" -ne 0 ] || [ "$REPORTS" -ne 0 ]; then
    fail=1
    echo "[tsan] FAIL: $1 -- first report or error below (full log: $LAST_LOG)"
    if [ "$REPORTS" -gt 0 ]; then
      awk '/WARNING: ThreadSanitizer/ {p = 1} p {print} /^SUMMARY: ThreadSanitizer/ && p {exit}' "$LAST_LOG" \
        | cut -c1-240 | grep -v -E "c10::impl::|c10::KernelFunction|c10::Dispatcher::|std::__invoke|std::thread::_" \
        | head -60 || true
    else
      tail -30 "$LAST_LOG" || true
    fi
  fi
}

echo "== [tsan] tests/test_trainer.py (CPU) under ThreadSanitizer"
run_tsan pytest_trainer "$PY" -c "
import os, sys, esamp
assert os.path.dirname(os.path.dirname(os.path.abspath(esamp.__file__))) == os.environ['ESAMP_TSAN_PKG'], esamp.__file__
import pytest
sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '$ROOT/tests/test_trainer.py', '-k', 'not cuda']))"
check_clean "tests/test_trainer.py under TSan"

for mode in own_slots shared_slot; do
  echo "== [tsan] stress: $mode"
  run_tsan "stress_$mode" "$PY" "$WORK/stress.py" "$mode"
  check_clean "stress $mode"
done

echo "== [tsan] canary (a deliberate race; must be reported)"
run_tsan canary "$PY" "$WORK/stress.py" canary
if [ "$REPORTS" -eq 0 ]; then
  fail=1
  echo "[tsan] FAIL: the deliberate race was not reported: TSan is not effective in this setup"
  tail -20 "$LAST_LOG"
fi

echo "[tsan] total $(( $(date +%s) - start )) s"
if [ "$fail" -ne 0 ]; then
  echo "[tsan] FAILED"
  exit 1
fi
echo "[tsan] OK: no ThreadSanitizer report in the trainer tests and stress runs; the canary race was reported"
