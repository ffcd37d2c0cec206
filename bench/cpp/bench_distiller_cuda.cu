// C++ benchmark of the CUDA distiller bank (no libtorch: links esamp_core, esamp_cuda_kernels and cuBLAS).
//
//   bench_distiller_cuda [--reps 200] [--warmup 20] [--S 8] [--rows 16] [--H 3584] [--R 64] [--L 2]
//                        [--active 0] [--engine auto|simt|cublas] [--json FILE]
//   bench_distiller_cuda --smoke    # tiny sizes, a few reps, checks the counters; exit code 0 = ok
//   bench_distiller_cuda --S 256 --rows 1024 --active 1   # warm start: 1,024 rows of one slot, 256-slot bank
//
// Problem: a bank of S slots; --active slots (0 = all S) get --rows rows each per step (N = active * rows),
// fp32 x and t.  The plan (engine, bucket capacity, workspace) is printed; the workspace size is reported
// (issue 12's warm-start target: <= 64 MB).
// Measures with CUDA events, median / p10 / p90 over --reps after --warmup:
//   predict     : distiller_forward_cuda on the N rows,
//   train step  : distiller_train_step_cuda (forward + backward + per-slot clip + Adam),
// each launched eagerly and as a replayed CUDA graph of one call (the launchers are capturable), and
// reports GFLOP/s (matrix FLOPs: forward 6 H R per row and block, train 18 H R) and the bytes the
// optimizer must move (params + 2 moments read and written, gradient written and read: 32 bytes per
// parameter of every active slot) as GB/s.  Targets from the issue: train step <= 60 us, predict <= 20 us.
// The counters of the bank (rows trained, rows skipped, loss sum, steps) are printed; a run that
// trained zero rows fails.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <cublas_v2.h>

#include "../../csrc/cuda/distiller_cuda.cuh"
#include "esamp/common.h"
#include "esamp/cuda_plan.h"
#include "esamp/distiller.h"
#include "esamp/philox.h"
#include "bench_util.h"

using namespace esamp;
using namespace esamp_bench;

namespace {

// t = 0.5 x + 0.3 noise
__global__ void make_target(float* t, const float* x, int64_t n, uint64_t seed) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    t[i] = 0.5f * x[i] + 0.3f * init_normal(seed, static_cast<uint64_t>(i));
}

struct Timing {
  double med, p10, p90;
};

// Times fn() (which enqueues work on `stream` and returns a Status) eagerly and as a replayed graph.
template <typename F>
void time_both(F fn, cudaStream_t stream, int warmup, int reps, Timing* eager, Timing* graph) {
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  std::vector<double> us;
  for (int i = 0; i < warmup + reps; ++i) {
    CK(cudaEventRecord(e0, stream));
    const Status st = fn();
    CK(cudaEventRecord(e1, stream));
    if (st != Status::kOk) {
      std::printf("kernel failed: %s\n", status_string(st));
      std::exit(1);
    }
    CK(cudaEventSynchronize(e1));
    float ms = 0.f;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    if (i >= warmup) us.push_back(1e3 * ms);
  }
  *eager = {pct(us, 0.5), pct(us, 0.1), pct(us, 0.9)};
  cudaGraph_t g;
  cudaGraphExec_t ge;
  CK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  const Status st = fn();
  CK(cudaStreamEndCapture(stream, &g));
  if (st != Status::kOk) {
    std::printf("kernel failed during capture: %s\n", status_string(st));
    std::exit(1);
  }
  CK(cudaGraphInstantiate(&ge, g, 0));
  us.clear();
  for (int i = 0; i < warmup + reps; ++i) {
    CK(cudaEventRecord(e0, stream));
    CK(cudaGraphLaunch(ge, stream));
    CK(cudaEventRecord(e1, stream));
    CK(cudaEventSynchronize(e1));
    float ms = 0.f;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    if (i >= warmup) us.push_back(1e3 * ms);
  }
  *graph = {pct(us, 0.5), pct(us, 0.1), pct(us, 0.9)};
  CK(cudaGraphExecDestroy(ge));
  CK(cudaGraphDestroy(g));
  CK(cudaEventDestroy(e0));
  CK(cudaEventDestroy(e1));
}

}  // namespace

int main(int argc, char** argv) {
  int reps = 200, warmup = 20;
  int64_t S = 8, rows = 16, H = 3584, R = 64, L = 2, active = 0;
  std::string json, engine_s = "auto";
  double train_target = 60, predict_target = 20, max_ws_mb = 0;  // issue 12 targets (us); 0 = no limit
  bool smoke = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() { return esamp_bench::arg_value(argc, argv, i); };
    if (a == "--smoke") smoke = true;
    else if (a == "--reps") reps = std::atoi(next());
    else if (a == "--warmup") warmup = std::atoi(next());
    else if (a == "--S") S = std::atoll(next());
    else if (a == "--rows") rows = std::atoll(next());
    else if (a == "--H") H = std::atoll(next());
    else if (a == "--R") R = std::atoll(next());
    else if (a == "--L") L = std::atoll(next());
    else if (a == "--active") active = std::atoll(next());
    else if (a == "--train-target") train_target = std::atof(next());
    else if (a == "--predict-target") predict_target = std::atof(next());
    else if (a == "--max-workspace-mb") max_ws_mb = std::atof(next());
    else if (a == "--engine") engine_s = next();
    else if (a == "--json") json = next();
    else {
      std::fprintf(stderr, "unknown argument %s\n", a.c_str());
      return 2;
    }
  }
  if (smoke) {
    S = 3;
    rows = 5;
    H = 96;
    R = 8;
    L = 2;
    reps = 3;
    warmup = 1;
  }
  if (active <= 0 || active > S) active = S;
  const int engine = engine_s == "simt" ? 0 : (engine_s == "cublas" ? 1 : -1);
  if (reps < 1 || warmup < 0 || S < 1 || rows < 1 || H < 1 || R < 1 || L < 1 ||
      (engine < 0 && engine_s != "auto")) {
    std::fprintf(stderr, "bad arguments\n");
    return 2;
  }
  int dev = 0;
  CK(cudaGetDevice(&dev));
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, dev));
  cudaStream_t stream;
  CK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));

  DistillerShape sh;
  sh.H = H;
  sh.R = R;
  sh.L = L;
  const int64_t P = sh.params_per_slot(), N = active * rows;
  DistillerBank bank;
  bank.S = S;
  bank.params = dalloc<float>(S * P);
  bank.exp_avg = dalloc<float>(S * P);
  bank.exp_avg_sq = dalloc<float>(S * P);
  bank.step = dalloc<int64_t>(S);
  std::vector<int64_t> hs(S);
  for (int64_t s = 0; s < S; ++s) hs[s] = s;
  int64_t* slots_all = dalloc<int64_t>(S);
  CK(cudaMemcpy(slots_all, hs.data(), S * 8, cudaMemcpyHostToDevice));
  Status st = distiller_reset_cuda(sh, bank, slots_all, S, 0, nullptr, stream);
  if (st != Status::kOk) {
    std::printf("reset failed: %s\n", status_string(st));
    return 1;
  }
  float* x = dalloc<float>(N * H);
  float* t = dalloc<float>(N * H);
  float* y = dalloc<float>(N * H);
  fill_normal<<<1024, 256, 0, stream>>>(x, DType::kF32, N * H, 5, 1.f);
  make_target<<<1024, 256, 0, stream>>>(t, x, N * H, 6);
  CK(cudaGetLastError());
  std::vector<int64_t> hid(N);
  // interleaved slots: each of the first `active` slots gets `rows` rows (gcd(7, active) == 1 when 7 does
  // not divide it; else round-robin)
  for (int64_t i = 0; i < N; ++i) hid[i] = active % 7 ? (i * 7) % active : i % active;
  int64_t* slot_ids = dalloc<int64_t>(N);
  CK(cudaMemcpy(slot_ids, hid.data(), N * 8, cudaMemcpyHostToDevice));
  float* losses = dalloc<float>(S);
  double* stats = dalloc<double>(kNumStats);
  CK(cudaMemset(stats, 0, kNumStats * sizeof(double)));

  RowsIn rin;
  rin.N = N;
  rin.x = x;
  rin.x_stride = H;
  rin.t = t;
  rin.t_stride = H;
  rin.slot_ids = slot_ids;
  cublasHandle_t handle;
  if (cublasCreate(&handle) != CUBLAS_STATUS_SUCCESS) {
    std::printf("cublasCreate failed\n");
    return 1;
  }
  // bound to the stream with a workspace of its own (as torch's handle is), so capture never allocates
  const size_t cublas_ws_bytes = 32u << 20;
  void* cublas_ws = dalloc<char>(cublas_ws_bytes);
  if (cublasSetStream(handle, stream) != CUBLAS_STATUS_SUCCESS ||
      cublasSetWorkspace(handle, cublas_ws, cublas_ws_bytes) != CUBLAS_STATUS_SUCCESS) {
    std::printf("cublasSetStream/cublasSetWorkspace failed\n");
    return 1;
  }
  const size_t wsb = distiller_cuda_workspace_bytes(sh, S, N, engine, true);
  void* ws = dalloc<char>(wsb);
  AdamConfig cfg;
  DeviceInfo di;
  di.sm_count = prop.multiProcessorCount;
  di.cc_major = prop.major;
  DistillerPlanOptions po;
  po.rows_engine = engine;
  const DistillerPlan plan = plan_distiller(sh, S, N, di, po);

  std::printf("bench_distiller_cuda on %s (%d SMs): S=%lld slots, %lld active x %lld rows (N=%lld), H=%lld R=%lld "
              "L=%lld, P=%lld params/slot, %d reps after %d warm-up (CUDA events)\n",
              prop.name, prop.multiProcessorCount, (long long)S, (long long)active, (long long)rows, (long long)N,
              (long long)H, (long long)R, (long long)L, (long long)P, reps, warmup);
  std::printf("plan: row products %s (bucket capacity %lld, %lld buckets, %lld positions), weight gradients %s, "
              "SIMT tile %d rows, split-K %d; workspace %.2f MB (%.2f MiB)\n",
              plan.rows == RowsEngine::kCublas ? "cuBLAS" : "SIMT", (long long)plan.cap, (long long)plan.nb_max,
              (long long)plan.R_pad, plan.wgrad == WgradEngine::kCublas ? "cuBLAS + buffer" : "fused SIMT (2 passes)",
              plan.bm, plan.splits, wsb / 1e6, wsb / 1048576.0);

  Timing fe, fg, te, tg;
  time_both(
      [&] {
        return distiller_forward_cuda(sh, bank.params, S, rin, y, DType::kF32, H, ws, wsb, handle, stream, engine);
      },
      stream, warmup, reps, &fe, &fg);
  time_both(
      [&] {
        return distiller_train_step_cuda(sh, cfg, bank, rin, losses, stats, ws, wsb, handle, stream, engine);
      },
      stream, warmup, reps, &te, &tg);
  CK(cudaStreamSynchronize(stream));

  double hstats[kNumStats];
  std::vector<float> hl(S);
  CK(cudaMemcpy(hstats, stats, sizeof(hstats), cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(hl.data(), losses, S * 4, cudaMemcpyDeviceToHost));
  std::vector<int64_t> hstep(S);
  CK(cudaMemcpy(hstep.data(), bank.step, S * 8, cudaMemcpyDeviceToHost));

  const double fwd_flop = 6.0 * H * R * L * N, train_flop = 18.0 * H * R * L * N;
  // the optimizer moves params + 2 moments (read and written) of every active slot: 24 bytes per parameter
  const double opt_bytes = 24.0 * P * active;
  auto line = [&](const char* name, const Timing& tm, double flop, double bytes, double target) {
    std::printf("%-22s median %9.1f us  p10 %9.1f  p90 %9.1f  %8.1f GFLOP/s", name, tm.med, tm.p10, tm.p90,
                flop / (tm.med * 1e-6) / 1e9);
    if (bytes > 0) std::printf("  %7.1f GB/s (optimizer bytes)", bytes / (tm.med * 1e-6) / 1e9);
    std::printf("  target %.0f us: %.2fx\n", target, tm.med / target);
  };
  line("predict (eager)", fe, fwd_flop, 0, predict_target);
  line("predict (graph)", fg, fwd_flop, 0, predict_target);
  line("train step (eager)", te, train_flop, opt_bytes, train_target);
  line("train step (graph)", tg, train_flop, opt_bytes, train_target);
  if (max_ws_mb > 0)
    std::printf("workspace %.2f MB: %s the %.0f MB target\n", wsb / 1e6, wsb / 1e6 <= max_ws_mb ? "within" : "ABOVE",
                max_ws_mb);
  std::printf("counters: rows trained %.0f, rows skipped %.0f, loss sum %.4f, steps %.0f; last losses:", hstats[0],
              hstats[1], hstats[2], hstats[3]);
  for (int64_t s = 0; s < std::min<int64_t>(S, 8); ++s) std::printf(" %.4f", hl[s]);
  std::printf("; step[0] %lld\n", (long long)hstep[0]);
  const int64_t expected_steps = 2 * (warmup + reps);  // eager calls + graph replays (capture runs nothing)
  bool ok = hstats[0] > 0 && hstats[1] == 0 && std::isfinite(hstats[2]) && hstats[3] == expected_steps;
  for (int64_t s = 0; s < S; ++s)
    ok = ok && (s < active ? std::isfinite(hl[s]) && hstep[s] == expected_steps : std::isnan(hl[s]) && hstep[s] == 0);
  if (!json.empty()) {
    FILE* f = std::fopen(json.c_str(), "w");
    if (f) {
      std::fprintf(f,
                   "{\"bench\": \"distiller_cuda\", \"device\": \"%s\", \"S\": %lld, \"active\": %lld, "
                   "\"rows_per_slot\": %lld, \"engine\": \"%s\", \"workspace_mb\": %.3f, \"H\": "
                   "%lld, \"R\": %lld, \"L\": %lld, \"predict_eager_us\": %.2f, \"predict_graph_us\": %.2f, "
                   "\"train_eager_us\": %.2f, \"train_graph_us\": %.2f, \"train_gflops_graph\": %.1f, "
                   "\"train_opt_gbps_graph\": %.1f, \"rows_trained\": %.0f, \"rows_skipped\": %.0f, \"steps\": %.0f, "
                   "\"train_target_us\": %.1f, \"predict_target_us\": %.1f, \"max_workspace_mb\": %.1f, \"ok\": %s}\n",
                   prop.name, (long long)S, (long long)active, (long long)rows,
                   plan.rows == RowsEngine::kCublas ? "cublas" : "simt", wsb / 1e6, (long long)H, (long long)R,
                   (long long)L, fe.med, fg.med,
                   te.med, tg.med, train_flop / (tg.med * 1e-6) / 1e9, opt_bytes / (tg.med * 1e-6) / 1e9, hstats[0],
                   hstats[1], hstats[3], train_target, predict_target, max_ws_mb, ok ? "true" : "false");
      std::fclose(f);
    }
  }
  std::printf("checks: %s\n", ok ? "ok" : "FAILED (zero trained rows, skipped rows, NaN losses or wrong step counts)");
  cublasDestroy(handle);
  return ok ? 0 : 1;
}
