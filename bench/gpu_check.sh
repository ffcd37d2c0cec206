#!/usr/bin/env bash
# GPU check for a lent CUDA machine (an H200 with python3 + a CUDA build of torch preinstalled), from a
# fresh copy of the repository:
#
#   OUT=/some/dir bash bench/gpu_check.sh        # OUT defaults to ./out
#
# Steps, in priority order, each with a timeout inside an overall budget (ESAMP_GPU_CHECK_BUDGET seconds,
# default 470, so the whole run stays under 8 minutes):
#   1. build the extension, the C++ benchmarks and the C++ test harnesses with CMake (ESAMP_CUDA=ON,
#      ESAMP_CUDA_ARCHS=90 unless set; the reweight row kernels compile in parallel, one file per dtype);
#   2. tools/check_cubins.sh on the built library (every kernel family, cuBLAS linked, no local memory in the
#      hot kernels) and the plan harness (tests/cpp/test_cuda_plan);
#   3. pytest tests/test_cuda.py (every new path against the CPU backend, graph capture, trainer races) and
#      the CUDA parametrisations of tests/test_trainer.py;
#   4. the issue-12 timings with the C++ benchmarks (CUDA events, medians), each against its target:
#        reweight B=128, V=152064, H=3584, bf16: min-p 0.1 <= 3 logits reads; no filter <= cuBLAS GEMM + 2
#        reads; beta = 0 no filter <= 2 reads (bench_reweight_cuda, baselines measured on the device); the
#        dense path timed in both variants (ESAMP_CUDA_REWEIGHT_DENSE_GEMM=cublas / fused);
#        distiller 8 slots x 16 rows, R=64, L=2: train step <= 60 us, predict <= 20 us, for the auto engine and
#        both forced engines; warm start 1,024 rows of one slot in a 256-slot bank: <= 1 ms per step and
#        <= 64 MB of workspace (bench_distiller_cuda);
#   5. CUDA timing of esamp.ops / esamp.Distiller against the eager PyTorch baselines (CUDA events);
#   6. the vLLM and SGLang smoke runs, the rest of the test suite and the CPU Python benchmarks, if time is left.
# Files written under $OUT (at most 8, the device tool's limit): summary.txt, build.log, test_cuda.log,
# bench.log, vllm_smoke.log, sglang_smoke.log, tests_other.log, results.json (every benchmark's JSON,
# bench/results style: machine, command, timings, targets).
# Exit status: 0 when every step that ran passed, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/out}
mkdir -p "$OUT"
BUDGET=${ESAMP_GPU_CHECK_BUDGET:-470}
ARCHS=${ESAMP_CUDA_ARCHS:-90}
PY=${PYTHON:-python3}
START=$(date +%s)
TMP=$(mktemp -d)
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
FAILED=0

note() { echo "$*" | tee -a "$SUMMARY"; }
elapsed() { echo $(($(date +%s) - START)); }

# run_step NAME CAP_SECONDS LOG CMD...: runs CMD with a timeout of min(CAP, budget left - 15 s).
run_step() {
  local name=$1 cap=$2 log=$3
  shift 3
  local left=$((BUDGET - $(elapsed) - 15))
  local t=$((cap < left ? cap : left))
  if ((t < 20)); then
    note "[skipped] $name (budget exhausted at $(elapsed) s)"
    return 99
  fi
  echo "== $name (timeout ${t} s, started at $(elapsed) s)" >>"$log"
  local s=$(date +%s) rc
  if declare -F "$1" >/dev/null; then  # a shell function: run it in a child bash (timeout needs a program)
    timeout -k 5 "$t" bash -c "$(declare -f "$1"); $1" >>"$log" 2>&1
  else
    timeout -k 5 "$t" "$@" >>"$log" 2>&1
  fi
  rc=$?
  local d=$(($(date +%s) - s))
  if ((rc == 0)); then
    note "[ok]      $name (${d} s)"
  elif ((rc == 124 || rc == 137)); then
    note "[TIMEOUT] $name after ${d} s (see $(basename "$log"))"
    FAILED=1
  else
    note "[FAILED]  $name: exit $rc after ${d} s (see $(basename "$log"))"
    FAILED=1
  fi
  return $rc
}

# ------------------------------------------------------------------------------------------ environment
{
  echo "esamp GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), budget ${BUDGET} s"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | head -2
  $PY -c 'import torch, sys
dev = torch.cuda.get_device_name() if torch.cuda.is_available() else None
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda, "| device", dev)' 2>&1
} | tee -a "$SUMMARY"

# ------------------------------------------------------------------------------------------ 1. build
NVCC=$(command -v nvcc || true)
[ -n "$NVCC" ] || NVCC=/usr/local/cuda/bin/nvcc
if head -c 2 "$NVCC" 2>/dev/null | grep -q '#!'; then  # a wrapper script: find the real compiler in it
  NVCC_REAL=$(grep -ao '/[^ ]*/bin/nvcc' "$NVCC" | head -1)
else
  NVCC_REAL=$(readlink -f "$NVCC")
fi
CUDA_ROOT=$(dirname "$(dirname "$NVCC_REAL")")
export ROOT PY ARCHS NVCC_REAL CUDA_ROOT TMP
note "nvcc: $NVCC_REAL ($("$NVCC_REAL" --version 2>/dev/null | tail -1))"
build() {
  cmake -S . -B build/gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v "$PY")" \
    -DESAMP_CUDA=ON -DESAMP_CUDA_ARCHS="$ARCHS" -DCMAKE_CUDA_COMPILER="$NVCC_REAL" -DCUDAToolkit_ROOT="$CUDA_ROOT" &&
    cmake --build build/gpu -j "$(nproc)" &&
    ln -sf "$ROOT/build/gpu/_C.so" python/esamp/_C.so
}
if ! run_step "build (CMake, sm_${ARCHS// /,sm_})" 300 "$OUT/build.log" build; then
  note "build failed: nothing else can run"
  exit 1
fi
grep -iE "warning" "$OUT/build.log" | grep -v "CMake Warning\|runtime search path\|may be hidden" | head -20 \
  | sed 's/^/  build warning: /' | tee -a "$SUMMARY"

# ------------------------------------------------------------------------------------------ 2. cubins
run_step "check_cubins (sm_${ARCHS// /,sm_})" 60 "$OUT/build.log" \
  env ESAMP_REQUIRE_ARCHS="${ARCHS//;/ }" PYTHON="$PY" tools/check_cubins.sh build/gpu/_C.so
tail -1 "$OUT/build.log" | sed 's/^/  /' | tee -a "$SUMMARY"
run_step "plan harness (tests/cpp/test_cuda_plan)" 60 "$OUT/build.log" build/gpu/test_cuda_plan
tail -1 "$OUT/build.log" | sed 's/^/  /' | tee -a "$SUMMARY"

# ------------------------------------------------------------------------------------------ 3. CUDA tests
run_step "pytest tests/test_cuda.py + CUDA trainer tests" 200 "$OUT/test_cuda.log" \
  env PYTHONPATH=python ESAMP_BUILD_DIR=build/gpu "$PY" -m pytest -q -p no:cacheprovider -rfEs --durations=12 \
  tests/test_cuda.py tests/test_trainer.py tests/test_cuda_plan.py
grep -E "passed|failed|error" "$OUT/test_cuda.log" | tail -1 | sed 's/^/  /' | tee -a "$SUMMARY"
if ! grep -Eq "[0-9]+ passed" "$OUT/test_cuda.log"; then  # all skipped = the GPU was not visible
  note "[FAILED]  tests/test_cuda.py ran no test (is torch.cuda.is_available() False on this machine?)"
  FAILED=1
fi

# ------------------------------------------------------------------------------------------ 4. C++ benches
cpp_bench() {
  local rc=0
  build/gpu/bench_reweight_cuda --smoke && build/gpu/bench_distiller_cuda --smoke || rc=1
  # issue 12: reweight B=128, V=152064, H=3584, bf16 logits / LM head / prediction (dense path: auto variant)
  build/gpu/bench_reweight_cuda --reps 50 --warmup 5 --json "$TMP/bench_reweight_cuda.json" || rc=1
  # the dense path's two variants, forced: cuBLAS GEMM + streaming pass vs the fused tensor-core kernel
  # ((b) reweight and (g) reweight_logits without a filter: every row dense; (a) min-p 0.1: no row dense, where
  # the cuBLAS variant still runs its GEMM over all rows)
  for v in cublas fused; do
    ESAMP_CUDA_REWEIGHT_DENSE_GEMM=$v build/gpu/bench_reweight_cuda --reps 30 --warmup 3 --cases abg \
      --json "$TMP/bench_reweight_cuda_dense_$v.json" || rc=1
  done
  # TF32 dense mode: fp32 prediction with a bf16 LM head (no filter and min-p only)
  build/gpu/bench_reweight_cuda --reps 30 --warmup 3 --pdtype f32 --cases abg \
    --json "$TMP/bench_reweight_cuda_pred_f32.json" || rc=1
  # distiller 8 slots x 16 rows, R = 64, L = 2: the chosen engine and both forced ones
  for e in auto simt cublas; do
    build/gpu/bench_distiller_cuda --reps 100 --warmup 10 --engine $e \
      --json "$TMP/bench_distiller_cuda_8x16_$e.json" || rc=1
  done
  # warm start: 1,024 rows of one slot in a 256-slot bank (<= 1 ms per step, <= 64 MB of workspace)
  for e in auto cublas; do
    build/gpu/bench_distiller_cuda --reps 30 --warmup 3 --S 256 --rows 1024 --active 1 --engine $e \
      --train-target 1000 --predict-target 1000 --max-workspace-mb 64 \
      --json "$TMP/bench_distiller_cuda_warm_$e.json" || rc=1
  done
  # shared mode (S = 1, R = 384): cuBLAS everywhere
  build/gpu/bench_distiller_cuda --reps 50 --warmup 5 --S 1 --rows 128 --R 384 \
    --json "$TMP/bench_distiller_cuda_shared.json" || rc=1
  return $rc
}
run_step "C++ CUDA benchmarks (issue-12 targets)" 150 "$OUT/bench.log" cpp_bench

# ------------------------------------------------------------------------------------------ 5. Python CUDA timing
cat >"$TMP/cuda_vs_eager.py" <<'PYEOF'
"""CUDA timing of esamp ops against the eager PyTorch baselines (CUDA events, median of >= 20 after warm-up)."""
import json, statistics, sys
import torch
import esamp

out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}


def cuda_time(fn, warmup=5, reps=30):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        e1.synchronize()
        ts.append(e0.elapsed_time(e1) * 1e3)
    ts.sort()
    return {"median_us": statistics.median(ts), "p10_us": ts[len(ts) // 10], "p90_us": ts[(9 * len(ts)) // 10]}


def report(name, rows):
    es = rows["esamp"]["median_us"]
    print(f"{name}")
    for k, v in rows.items():
        ratio = "" if k == "esamp" else f"   esamp is {v['median_us'] / es:.2f}x faster"
        print(f"  {k:22s} median {v['median_us']:10.1f} us  p10 {v['p10_us']:10.1f}  p90 {v['p90_us']:10.1f}{ratio}")


# ---- reweight: B=128, V=152064, H=3584, bf16 logits and LM head, LM-like logits (Zipf head)
from esamp.reference.sampling import reweight_eager  # noqa: E402

B, V, H = 128, 152064, 3584
g = torch.Generator(device="cuda").manual_seed(0)
logits = torch.randn(B, V, device="cuda", generator=g) * 2.0
s = 12 + 6 * torch.rand(B, 1, device="cuda", generator=g)
a = 1 + 1.5 * torch.rand(B, 1, device="cuda", generator=g)
head = torch.argsort(torch.rand(B, V, device="cuda", generator=g), dim=1)[:, :256]
j = torch.arange(1, 257, device="cuda", dtype=torch.float32)[None, :]
logits.scatter_(1, head, s - a * torch.log(j))
logits = logits.to(torch.bfloat16)
W = (torch.randn(V, H, device="cuda", generator=g) * 0.05).to(torch.bfloat16)
pred = torch.randn(B, H, device="cuda", generator=g)
full = lambda x, dt=torch.float32: torch.full((B,), x, dtype=dt, device="cuda")  # noqa: E731
beta, T, k = full(0.25), full(1.0), full(0, torch.int64)
seed = esamp.ops.derive_row_seeds(0, B).cuda()
step = full(0, torch.int64)
out["reweight"] = {"B": B, "V": V, "H": H, "dtype": "bf16"}
for name, tp, mp in (("min_p=0.05", 1.0, 0.05), ("top_p=0.9", 0.9, 0.0)):
    top_p, min_p = full(tp), full(mp)
    sizes = torch.isfinite(esamp.ops.reweight_logits(logits, pred, W, beta=beta, temperature=T, top_k=k, top_p=top_p,
                                                     min_p=min_p)).sum(1).float()
    rows = {
        "esamp": cuda_time(lambda: esamp.ops.reweight(logits, pred, W, beta=beta, temperature=T, top_k=k, top_p=top_p,
                                                      min_p=min_p, seed=seed, step=step)),
        "eager (reweight_eager)": cuda_time(lambda: reweight_eager(logits, pred, W, None, beta, T, k, top_p, min_p,
                                                                  use_top_k=False, use_top_p=tp < 1,
                                                                  use_min_p=mp > 0)),
    }
    report(f"reweight {name}: |C| median {sizes.median().item():.0f}", rows)
    out["reweight"][name] = {"cand_median": sizes.median().item(), **rows}

# ---- distiller: 8 slots x 16 rows, H=3584, R=64, L=2
from esamp.reference.distiller import BatchedEagerDistiller  # noqa: E402

S, n, H, R, L = 8, 16, 3584, 64, 2
d = esamp.Distiller(H, R, L, S, device="cuda")
x = torch.randn(S * n, H, device="cuda", generator=g)
t = 0.5 * x + 0.3 * torch.randn(S * n, H, device="cuda", generator=g)
sid = torch.arange(S, device="cuda").repeat_interleave(n)
losses = torch.empty(S, device="cuda")
base = BatchedEagerDistiller(d.params.clone(), H, R, L, adam_kwargs={"fused": True})
xb, tb = x.view(S, n, H), t.view(S, n, H)
graph = torch.cuda.CUDAGraph()
side = torch.cuda.Stream()
side.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(side):
    d.train_step(x, t, sid, losses=losses)
torch.cuda.current_stream().wait_stream(side)
with torch.cuda.graph(graph):
    d.train_step(x, t, sid, losses=losses)


def base_fwd():
    with torch.no_grad():
        base.forward(xb)


rows_t = {"esamp": cuda_time(lambda: d.train_step(x, t, sid, losses=losses)),
          "esamp (CUDA graph)": cuda_time(graph.replay),
          "eager bmm + fused Adam": cuda_time(lambda: base.train_step(xb, tb))}
rows_f = {"esamp": cuda_time(lambda: d.forward(x, sid)), "eager bmm": cuda_time(base_fwd)}
report(f"distiller train step S={S} x {n} rows, H={H} R={R} L={L}", rows_t)
report("distiller predict", rows_f)
st = d.stats()
print(f"  counters: {st}")
out["distiller"] = {"S": S, "rows_per_slot": n, "H": H, "R": R, "L": L, "train": rows_t, "predict": rows_f,
                    "counters": st}
json.dump(out, open(sys.argv[1], "w"), indent=1)
if st["rows_trained"] <= 0:
    print("FAILED: the distiller trained zero rows")
    sys.exit(1)
PYEOF
run_step "CUDA timing vs eager PyTorch" 120 "$OUT/bench.log" \
  env PYTHONPATH=python "$PY" "$TMP/cuda_vs_eager.py" "$TMP/cuda_vs_eager.json"

run_step "every op on CUDA vs eager (+ FlashInfer when installed), SmolLM2 sizes" 90 "$OUT/bench.log" \
  env PYTHONPATH=python "$PY" bench/bench_ops.py --device cuda --no-compile --reps 20 --warmup 3 \
  --out "$TMP/ops_cuda.json"

# ------------------------------------------------------------------------------------------ 6. other tests
run_step "vLLM smoke (skips unless vLLM + CUDA + a model are present)" 120 "$OUT/vllm_smoke.log" \
  env PYTHONPATH=python "$PY" bench/vllm_smoke.py
run_step "SGLang smoke (skips unless SGLang + CUDA + a model are present)" 180 "$OUT/sglang_smoke.log" \
  env PYTHONPATH=python "$PY" bench/sglang_smoke.py
grep -h -E "^(vllm|sglang)_smoke: " "$OUT/vllm_smoke.log" "$OUT/sglang_smoke.log" 2>/dev/null | sed 's/^/  /' \
  | tee -a "$SUMMARY"

run_step "pytest tests (except test_cuda.py)" 150 "$OUT/tests_other.log" \
  env PYTHONPATH=python "$PY" -m pytest -q -p no:cacheprovider -rfE --ignore=tests/test_cuda.py tests
grep -E "passed|failed|error" "$OUT/tests_other.log" | tail -1 | sed 's/^/  /' | tee -a "$SUMMARY"

# ------------------------------------------------------------------------------------------ 7. CPU Python benches
cpu_py_bench() {
  local rc=0
  if [ -f bench/bench_reweight.py ]; then
    PYTHONPATH=python "$PY" bench/bench_reweight.py --no-compile --reps 20 --warmup 2 --cases a || rc=1
  fi
  if [ -f bench/bench_distiller.py ]; then
    PYTHONPATH=python "$PY" bench/bench_distiller.py --iters 20 --warmup 2 || rc=1
  fi
  return $rc
}
run_step "CPU Python benchmarks (short)" 90 "$OUT/bench.log" cpu_py_bench

# ------------------------------------------------------------------------------------------ results
"$PY" - "$TMP" "$OUT/results.json" <<'PYEOF' 2>&1 | tee -a "$SUMMARY"
import glob, json, os, sys
res = {}
for f in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
    try:
        res[os.path.basename(f)[:-5]] = json.load(open(f))
    except Exception as e:  # keep going, say why
        res[os.path.basename(f)[:-5]] = {"error": f"{type(e).__name__}: {e}"}
import platform, subprocess
try:
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=20).stdout.strip()
except Exception as e:  # keep going, say why
    gpu = f"unknown ({type(e).__name__})"
try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
except Exception:
    commit = "unknown"
res = {"machine": {"gpu": gpu, "host": platform.node(), "python": platform.python_version()},
       "command": "bench/gpu_check.sh", "commit": commit, "results": res}
json.dump(res, open(sys.argv[2], "w"), indent=1)
print(f"results.json: {', '.join(res['results']) or 'no benchmark results'}")
PYEOF
grep -E "^\(|median|counters|checks|output checks|baselines|plan:|workspace|target" "$OUT/bench.log" | head -60 \
  >>"$SUMMARY"
note "total $(elapsed) s; $([ $FAILED -eq 0 ] && echo 'all steps that ran passed' || echo 'SOME STEPS FAILED')"
rm -rf "$TMP"
exit $FAILED
