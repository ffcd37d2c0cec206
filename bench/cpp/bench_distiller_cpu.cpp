// C++ benchmark (no libtorch): one distiller-bank train step and one forward on the CPU through
// esamp::distiller_train_step_cpu / distiller_forward_cpu with the portable sgemm_reference GEMM.
//
//   bench_distiller_cpu [--hidden 576] [--rank 384] [--layers 2] [--slots 4] [--rows-per-slot 16]
//                       [--iters 30] [--warmup 5]
//
// Prints the median wall time (us) of --iters runs after --warmup, GFLOP/s of the GEMM work, and the
// bank's counters (a run that trained zero rows exits with status 1).  Threads: OMP_NUM_THREADS.
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "esamp/distiller.h"
#include "esamp/philox.h"

namespace {

int64_t arg_int(int argc, char** argv, const char* name, int64_t def) {
  for (int i = 1; i + 1 < argc; ++i)
    if (std::strcmp(argv[i], name) == 0) return std::atoll(argv[i + 1]);
  return def;
}

template <typename F>
double median_us(F&& fn, int warmup, int iters) {
  for (int i = 0; i < warmup; ++i) fn();
  std::vector<double> ts;
  for (int i = 0; i < iters; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    fn();
    ts.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(ts.begin(), ts.end());
  return ts[ts.size() / 2];
}

void check(esamp::Status s, const char* what) {
  if (s != esamp::Status::kOk) {
    std::fprintf(stderr, "%s failed: %s\n", what, esamp::status_string(s));
    std::exit(2);
  }
}

}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--help") == 0 || std::strcmp(argv[i], "-h") == 0) {
      std::printf("usage: %s [--hidden H] [--rank R] [--layers L] [--slots S] [--rows-per-slot n] [--iters N] "
                  "[--warmup W]\n", argv[0]);
      return 0;
    }
  }
  esamp::DistillerShape sh;
  sh.H = arg_int(argc, argv, "--hidden", 576);
  sh.R = arg_int(argc, argv, "--rank", 384);
  sh.L = arg_int(argc, argv, "--layers", 2);
  const int64_t S = arg_int(argc, argv, "--slots", 4);
  const int64_t n = arg_int(argc, argv, "--rows-per-slot", 16);
  const int iters = static_cast<int>(arg_int(argc, argv, "--iters", 30));
  const int warmup = static_cast<int>(arg_int(argc, argv, "--warmup", 5));
  if (sh.H < 1 || sh.R < 1 || sh.L < 1 || S < 1 || n < 1 || iters < 20 || warmup < 0) {
    std::fprintf(stderr, "invalid arguments (sizes must be >= 1, --iters >= 20)\n");
    return 2;
  }
  const int64_t P = sh.params_per_slot(), H = sh.H, N = S * n;

  std::vector<float> params(S * P), exp_avg(S * P), exp_avg_sq(S * P);
  std::vector<int64_t> step(S), slots(S);
  for (int64_t s = 0; s < S; ++s) slots[s] = s;
  esamp::DistillerBank bank{S, params.data(), exp_avg.data(), exp_avg_sq.data(), step.data()};
  check(esamp::distiller_reset_cpu(sh, bank, slots.data(), S, 0, nullptr), "distiller_reset_cpu");

  // Rows: x, t ~ N(0, 1) (Philox normals with other seeds), slot of row i = i / n.
  std::vector<float> x(N * H), t(N * H), y(N * H), losses(S);
  for (int64_t i = 0; i < N * H; ++i) {
    x[i] = esamp::init_normal(101, static_cast<uint64_t>(i));
    t[i] = esamp::init_normal(202, static_cast<uint64_t>(i));
  }
  std::vector<int64_t> sid(N);
  for (int64_t i = 0; i < N; ++i) sid[i] = i / n;
  esamp::RowsIn rows;
  rows.N = N;
  rows.x = x.data();
  rows.x_stride = H;
  rows.t = t.data();
  rows.t_stride = H;
  rows.slot_ids = sid.data();
  double stats[esamp::kNumStats] = {0, 0, 0, 0};
  esamp::AdamConfig cfg;
  esamp::CpuGemm gemm;  // fn = nullptr -> esamp::sgemm_reference

  const double fwd_flops = static_cast<double>(S) * sh.L * (2.0 * n * H * 2 * sh.R + 2.0 * n * sh.R * H);
  const double train_flops = 3.0 * fwd_flops;  // backward: dB, dh, dW1, dX = twice the forward
  std::printf("distiller bank CPU (sgemm_reference): S = %lld slots x %lld rows, H = %lld, R = %lld, L = %lld, "
              "P = %lld params/slot, OpenMP threads = %d, median of %d runs after %d warm-up\n",
              (long long)S, (long long)n, (long long)H, (long long)sh.R, (long long)sh.L, (long long)P,
              omp_get_max_threads(), iters, warmup);
  const double t_train = median_us(
      [&] { check(esamp::distiller_train_step_cpu(sh, cfg, bank, rows, losses.data(), stats, gemm), "train_step"); },
      warmup, iters);
  std::printf("  train_step  %10.1f us  %6.2f GFLOP/s\n", t_train, train_flops / t_train * 1e-3);
  const double t_fwd = median_us(
      [&] {
        check(esamp::distiller_forward_cpu(sh, params.data(), S, rows, y.data(), esamp::DType::kF32, H, gemm),
              "forward");
      },
      warmup, iters);
  std::printf("  forward     %10.1f us  %6.2f GFLOP/s\n", t_fwd, fwd_flops / t_fwd * 1e-3);
  std::printf("  counters: rows trained %.0f, rows skipped %.0f, loss sum %.4f, steps %.0f; last losses:",
              stats[esamp::kStatRowsTrained], stats[esamp::kStatRowsSkipped], stats[esamp::kStatLossSum],
              stats[esamp::kStatSteps]);
  for (int64_t s = 0; s < S; ++s) std::printf(" %.4f", losses[s]);
  std::printf("\n");
  if (stats[esamp::kStatRowsTrained] <= 0) {
    std::fprintf(stderr, "FAILED: zero rows trained\n");
    return 1;
  }
  return 0;
}
