// Randomised robustness harness for the torch-free CPU kernels, meant to run under
// AddressSanitizer + UndefinedBehaviorSanitizer (CI builds it with ESAMP_SANITIZE=address).
// Every buffer is allocated at its exact size so that any out-of-bounds read or write is caught.
// Checks: every call returns kOk, tokens are in [0, V), logprobs are <= 0 or -inf, distiller
// parameters and optimizer state stay finite with NaN/Inf rows in the batch.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "esamp/distiller.h"
#include "esamp/sampling.h"

using namespace esamp;

static int failures = 0;
#define EXPECT(cond, ...)                                   \
  do {                                                      \
    if (!(cond)) {                                          \
      ++failures;                                           \
      std::fprintf(stderr, "FAILED %s: ", #cond);           \
      std::fprintf(stderr, __VA_ARGS__);                    \
      std::fprintf(stderr, "\n");                           \
    }                                                       \
  } while (0)

struct Buf {
  std::vector<uint16_t> h;
  std::vector<float> f;
  DType d;
  const void* ptr() const { return d == DType::kF32 ? static_cast<const void*>(f.data()) : h.data(); }
  void* mptr() { return d == DType::kF32 ? static_cast<void*>(f.data()) : h.data(); }
};

static Buf make(std::mt19937_64& g, DType d, size_t n, float scale, double p_bad) {
  std::normal_distribution<float> nd(0.f, scale);
  std::uniform_real_distribution<double> u(0, 1);
  Buf b;
  b.d = d;
  std::vector<float> v(n);
  for (auto& x : v) {
    x = nd(g);
    double r = u(g);
    if (r < p_bad / 3) x = NAN;
    else if (r < 2 * p_bad / 3) x = -INFINITY;
    else if (r < p_bad) x = INFINITY;
  }
  if (d == DType::kF32) b.f = v;
  else {
    b.h.resize(n);
    for (size_t i = 0; i < n; ++i) b.h[i] = d == DType::kBF16 ? float_to_bf16_bits(v[i]) : float_to_f16_bits(v[i]);
  }
  return b;
}

int main(int argc, char** argv) {
  const int cases = argc > 1 ? std::atoi(argv[1]) : 400;
  std::mt19937_64 g(12345);
  auto ri = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(g); };
  auto rf = [&](float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(g); };
  const DType dts[3] = {DType::kF32, DType::kBF16, DType::kF16};
  int reweight_calls = 0, distiller_calls = 0;

  for (int c = 0; c < cases; ++c) {
    // ---------------- reweight / reweight_logits / mix_hidden / capture
    const int B = ri(1, 6), V = ri(1, 300), H = ri(1, 40);
    const int pad = ri(0, 3);  // row stride > width
    const DType ld = dts[ri(0, 2)], wd = dts[ri(0, 2)], pd = dts[ri(0, 2)];
    const double p_bad = c % 4 == 0 ? 0.1 : 0.0;
    Buf logits = make(g, ld, size_t(B) * (V + pad), 3.f, p_bad);
    Buf pred = make(g, pd, size_t(B) * (H + pad), 1.f, 0.0);
    Buf W = make(g, wd, size_t(V) * (H + pad), 0.2f, 0.0);
    Buf bias = make(g, wd, size_t(V), 0.1f, 0.0);
    std::vector<float> beta(B), T(B), top_p(B), min_p(B);
    std::vector<int64_t> top_k(B), seed(B), step(B);
    for (int r = 0; r < B; ++r) {
      beta[r] = ri(0, 3) == 0 ? 0.f : rf(0.f, 2.f);
      T[r] = ri(0, 5) == 0 ? 0.f : rf(0.05f, 3.f);
      top_k[r] = ri(-1, V + 2);
      top_p[r] = ri(0, 1) ? 1.f : rf(0.01f, 1.f);
      min_p[r] = ri(0, 1) ? 0.f : rf(0.f, 0.99f);
      seed[r] = static_cast<int64_t>(g());
      step[r] = static_cast<int64_t>(g());
    }
    ReweightProblem pr;
    pr.B = B; pr.V = V; pr.H = H;
    pr.logits = logits.ptr(); pr.logits_dtype = ld; pr.logits_stride = V + pad;
    pr.pred = pred.ptr(); pr.pred_dtype = pd; pr.pred_stride = H + pad;
    pr.weight = W.ptr(); pr.weight_dtype = wd; pr.weight_stride = H + pad;
    if (ri(0, 1)) { pr.bias = bias.ptr(); pr.bias_dtype = wd; }
    pr.p.beta = beta.data(); pr.p.temperature = T.data(); pr.p.top_k = top_k.data(); pr.p.top_p = top_p.data();
    pr.p.min_p = min_p.data(); pr.p.seed = seed.data(); pr.p.step = step.data();
    std::vector<int64_t> tokens(B, -7);
    std::vector<float> lp(B);
    EXPECT(reweight_cpu(pr, tokens.data(), lp.data(), CpuGemm{}) == Status::kOk, "reweight case %d", c);
    for (int r = 0; r < B; ++r) {
      EXPECT(tokens[r] >= 0 && tokens[r] < V, "case %d row %d token %lld V %d", c, r, (long long)tokens[r], V);
      EXPECT(!(lp[r] > 1e-5f), "case %d row %d logprob %g > 0", c, r, lp[r]);
    }
    std::vector<float> mixed(size_t(B) * V);
    EXPECT(reweight_logits_cpu(pr, mixed.data(), V, CpuGemm{}) == Status::kOk, "reweight_logits case %d", c);
    for (float m : mixed) EXPECT(!std::isnan(m) || p_bad > 0, "case %d NaN in mixed logits of finite input", c);
    ++reweight_calls;

    MixHiddenProblem mp;
    mp.B = B; mp.H = H; mp.hidden = pred.ptr(); mp.hidden_dtype = pd; mp.hidden_stride = H + pad;
    mp.pred = pred.ptr(); mp.pred_dtype = pd; mp.pred_stride = H + pad; mp.beta = beta.data();
    Buf out = make(g, pd, size_t(B) * H, 1.f, 0.0);
    mp.out = out.mptr(); mp.out_stride = H;
    EXPECT(mix_hidden_cpu(mp) == Status::kOk, "mix_hidden case %d", c);
    CaptureProblem cp;
    cp.N = B; cp.H = H; cp.hidden = pred.ptr(); cp.hidden_dtype = pd; cp.hidden_stride = H + pad;
    cp.residual = pred.ptr(); cp.residual_dtype = pd; cp.residual_stride = H + pad;
    cp.out = out.mptr(); cp.out_dtype = pd; cp.out_stride = H;
    EXPECT(capture_cpu(cp) == Status::kOk, "capture case %d", c);

    // ---------------- distiller bank
    if (c % 2 == 0) {
      DistillerShape sh;
      sh.H = ri(1, 24); sh.R = ri(1, 8); sh.L = ri(1, 3);
      const int S = ri(1, 4), N = ri(1, 12);
      const size_t P = size_t(sh.params_per_slot());
      std::vector<float> params(S * P), m(S * P), v(S * P), losses(S);
      std::vector<int64_t> stepc(S), all(S);
      double stats[kNumStats] = {0, 0, 0, 0};
      for (int s = 0; s < S; ++s) all[s] = s;
      DistillerBank bank{S, params.data(), m.data(), v.data(), stepc.data()};
      EXPECT(distiller_reset_cpu(sh, bank, all.data(), S, 7, nullptr) == Status::kOk, "reset case %d", c);
      const DType xd = dts[ri(0, 2)];
      AdamConfig cfg;
      for (int it = 0; it < 4; ++it) {
        Buf x = make(g, xd, size_t(N) * sh.H, 1.f, 0.05);
        Buf t = make(g, xd, size_t(N) * sh.H, 1.f, 0.05);
        std::vector<int64_t> sid(N);
        for (auto& s : sid) s = ri(0, S - 1);
        RowsIn rows;
        rows.N = N; rows.x = x.ptr(); rows.x_dtype = xd; rows.x_stride = sh.H;
        rows.t = t.ptr(); rows.t_dtype = xd; rows.t_stride = sh.H; rows.slot_ids = sid.data();
        EXPECT(distiller_train_step_cpu(sh, cfg, bank, rows, losses.data(), stats, CpuGemm{}) == Status::kOk,
               "train case %d", c);
        Buf y = make(g, xd, size_t(N) * sh.H, 1.f, 0.0);
        EXPECT(distiller_forward_cpu(sh, params.data(), S, rows, y.mptr(), xd, sh.H, CpuGemm{}) == Status::kOk,
               "forward case %d", c);
      }
      bool finite = true;
      for (size_t i = 0; i < params.size(); ++i)
        finite = finite && std::isfinite(params[i]) && std::isfinite(m[i]) && std::isfinite(v[i]);
      EXPECT(finite, "case %d: non-finite distiller state after NaN/Inf rows", c);
      EXPECT(stats[kStatRowsTrained] + stats[kStatRowsSkipped] == 4.0 * N, "case %d: row counters %g + %g != %d", c,
             stats[kStatRowsTrained], stats[kStatRowsSkipped], 4 * N);
      ++distiller_calls;
    }
  }
  std::printf("fuzz_kernels: %d reweight cases, %d distiller cases, %d failures\n", reweight_calls, distiller_calls,
              failures);
  return failures == 0 ? 0 : 1;
}
