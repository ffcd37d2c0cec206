// esamp::Trainer -- the persistent trainer (SPEC 6).  Owns a distiller bank and runs updates off the
// caller's critical path:
//   CPU : a worker thread fed through a bounded queue; rows are copied into a ring of K segments so the
//         caller may reuse its buffers as soon as observe() returns.
//   CUDA: a dedicated stream of the highest priority; rows are copied into the ring on the caller's
//         stream (so later writes by the caller are ordered after the copy), the trainer stream waits on
//         an event and trains; predict() makes the caller's stream wait on the last update's event.
//         Stream ordering (every cross-stream use is ordered by an event and recorded with record_stream):
//           construction: the bank, the ring and the init kernels live on the trainer stream, after an
//                         event of the constructing stream (gamma_init may have been written there);
//           load_state  : the trainer stream waits for the caller's stream before it copies the sources;
//           read-outs   : clones made on the trainer stream are recorded on the caller's stream;
//           destruction : waits for the trainer stream before the bank, ring and mirror are released.
//         Counters: after every update a kernel on the trainer stream copies them into mapped pinned host
//         memory (a sequence lock, esamp::StatsMirror), so stats() reads them on the host without any
//         copy or stream synchronisation; stats(fresh=true) waits only for the host-side event of the
//         last update when the mirror is behind (never blocking a stream).
// Ordering guarantee: predict() after observe() of step n sees the update of step n (and all before).
// Training calls go through the dispatcher (torch.ops.esamp.distiller_*), so each backend's kernels are
// used unchanged.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>

#if defined(ESAMP_WITH_CUDA)
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <atomic>
#endif

#include "validate.h"

namespace esamp_torch {
namespace {

using ForwardFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, double,
                             std::optional<at::ScalarType>);
using TrainFn = void(at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, const at::Tensor&,
                     const at::Tensor&, const at::Tensor&, int64_t, int64_t, double, double, double, double, double,
                     double);
using ResetFn = void(at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, const at::Tensor&, int64_t, int64_t, int64_t,
                     int64_t, const std::optional<at::Tensor>&);

const c10::TypedOperatorHandle<ForwardFn>& forward_op() {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("esamp::distiller_forward", "").typed<ForwardFn>();
  return op;
}
const c10::TypedOperatorHandle<TrainFn>& train_op() {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("esamp::distiller_train_step", "").typed<TrainFn>();
  return op;
}
const c10::TypedOperatorHandle<ResetFn>& reset_op() {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("esamp::distiller_reset", "").typed<ResetFn>();
  return op;
}

struct Job {
  enum Kind { kTrain, kReset } kind = kTrain;
  int seg = -1;
  int64_t rows = 0;
  at::Tensor slots;  // reset: slot list
};

}  // namespace

class Trainer : public torch::CustomClassHolder {
 public:
  Trainer(int64_t hidden_size, int64_t rank, int64_t layers, int64_t slots, double lr, double adam_eps, double clip,
          double beta1, double beta2, double norm_eps, int64_t seed, std::string device, int64_t ring_rows,
          int64_t ring_segments, std::optional<at::Tensor> gamma_init)
      : H_(hidden_size), R_(rank), L_(layers), S_(slots), lr_(lr), adam_eps_(adam_eps), clip_(clip), beta1_(beta1),
        beta2_(beta2), norm_eps_(norm_eps), seed_(seed), ring_rows_(ring_rows), K_(ring_segments) {
    TORCH_CHECK(slots >= 1, "slots: expected >= 1, got ", slots);
    TORCH_CHECK(ring_rows >= 1, "ring_rows: expected >= 1, got ", ring_rows);
    TORCH_CHECK(ring_segments >= 1 && ring_segments <= 64, "ring_segments: expected in [1, 64], got ", ring_segments);
    check_adam(lr, beta1, beta2, adam_eps, clip);
    dev_ = c10::Device(device);
    TORCH_CHECK(rank >= 1 && layers >= 1 && hidden_size >= 1, "hidden_size/rank/layers: expected >= 1, got ",
                hidden_size, "/", rank, "/", layers);
#if defined(ESAMP_WITH_CUDA)
    if (dev_.is_cuda()) {
      const c10::cuda::CUDAGuard guard(dev_);
      auto caller = c10::cuda::getCurrentCUDAStream(dev_.index());
      if (gamma_init.has_value()) gamma_init_ = gamma_init->to(dev_, at::kFloat).contiguous();  // caller's stream
      stream_opt_ = c10::cuda::getStreamFromPool(/*isHighPriority=*/true, dev_.index());
      at::cuda::CUDAEvent ready;
      ready.record(caller);
      ready.block(stream());
      if (gamma_init_.has_value()) gamma_init_->record_stream(stream());
      seg_done_.resize(K_);
      void* host = nullptr;
      TORCH_CHECK(cudaHostAlloc(&host, sizeof(esamp::StatsMirror), cudaHostAllocMapped) == cudaSuccess,
                  "esamp.Trainer: cudaHostAlloc of the counters mirror failed: ", cudaGetErrorString(cudaGetLastError()));
      mirror_host_ = static_cast<esamp::StatsMirror*>(host);
      std::memset(host, 0, sizeof(esamp::StatsMirror));
      void* dptr = nullptr;
      TORCH_CHECK(cudaHostGetDevicePointer(&dptr, host, 0) == cudaSuccess,
                  "esamp.Trainer: cudaHostGetDevicePointer of the counters mirror failed");
      mirror_dev_ = static_cast<esamp::StatsMirror*>(dptr);
      last_good_ = at::zeros({esamp::kNumStats}, at::TensorOptions().dtype(at::kDouble));
      {
        c10::cuda::CUDAStreamGuard sg(stream());
        allocate();
        run_reset(at::arange(S_, at::TensorOptions().dtype(at::kLong).device(dev_)));
        publish_counters();
      }
      last_update_.record(stream());  // predict() right after construction waits for the init kernels
      return;
    }
#endif
    TORCH_CHECK(dev_.is_cpu(), "device: expected 'cpu' or a CUDA device with a CUDA build, got ", device);
    if (gamma_init.has_value()) gamma_init_ = gamma_init->to(dev_, at::kFloat).contiguous();
    allocate();
    run_reset(at::arange(S_, at::TensorOptions().dtype(at::kLong).device(dev_)));
    worker_ = std::thread([this] { this->loop(); });
  }

  ~Trainer() override {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    cv_job_.notify_all();
    if (worker_.joinable()) worker_.join();
#if defined(ESAMP_WITH_CUDA)
    if (dev_.is_cuda() && stream_opt_.has_value()) {
      // Pending updates still read the ring and write the bank and the mirror: let them finish before the
      // tensors go back to the caching allocator and the mirror is freed.  (A destructor cannot report
      // errors; a failed synchronisation leaves the mirror allocated rather than freeing it under a kernel.)
      const c10::cuda::CUDAGuard guard(dev_);
      const bool done = cudaStreamSynchronize(stream().stream()) == cudaSuccess;
      if (done && mirror_host_) cudaFreeHost(mirror_host_);
      mirror_host_ = nullptr;
    }
#endif
  }

  // Predictions for rows x with per-row slot ids; sees every update observed before this call.
  // CPU: waits for the queue to drain, then holds the worker off (a reader count) while it reads the
  // parameters, so an update queued concurrently by another thread never writes them mid-read.
  at::Tensor predict(const at::Tensor& x, const at::Tensor& slot_ids) {
#if defined(ESAMP_WITH_CUDA)
    if (dev_.is_cuda()) {
      const c10::cuda::CUDAGuard guard(dev_);
      wait_updates();
      params_.record_stream(c10::cuda::getCurrentCUDAStream(dev_.index()));  // read on the caller's stream
      return forward_op().call(params_, x, slot_ids, R_, L_, norm_eps_, std::nullopt);
    }
#endif
    return read_bank([&] {
      return std::vector<at::Tensor>{forward_op().call(params_, x, slot_ids, R_, L_, norm_eps_, std::nullopt)};
    })[0];
  }

  // Queue one optimizer step on rows (x, t); returns at once (the rows are copied first).
  void observe(const at::Tensor& x, const at::Tensor& t, const at::Tensor& slot_ids) {
    rethrow();
    TORCH_CHECK(x.dim() == 2 && x.size(1) == H_, "x: expected [N, H] with H = ", H_, ", got ", shape_str(x));
    TORCH_CHECK(t.sizes() == x.sizes(), "target: expected shape ", shape_str(x), ", got ", shape_str(t));
    TORCH_CHECK(slot_ids.dim() == 1 && slot_ids.size(0) == x.size(0) && slot_ids.scalar_type() == at::kLong,
                "slot_ids: expected int64 [N] with N = ", x.size(0), ", got ", slot_ids.scalar_type(), " ",
                shape_str(slot_ids));
    TORCH_CHECK(x.device() == dev_ && t.device() == dev_ && slot_ids.device() == dev_,
                "x/target/slot_ids: expected tensors on ", dev_, ", got ", x.device(), "/", t.device(), "/",
                slot_ids.device());
    const int64_t N = x.size(0);
    TORCH_CHECK(N <= ring_rows_, "x: ", N, " rows exceed the trainer's ring capacity ring_rows = ", ring_rows_,
                "; construct the Trainer with a larger ring_rows");
    if (dev_.is_cpu()) check_slot_list(slot_ids, S_, params_);
    if (N == 0) return;
#if defined(ESAMP_WITH_CUDA)
    if (dev_.is_cuda()) {
      const c10::cuda::CUDAGuard guard(dev_);
      int seg = next_seg_;
      next_seg_ = (next_seg_ + 1) % K_;
      auto caller = c10::cuda::getCurrentCUDAStream(dev_.index());
      // The segment may still be read by an earlier update: the caller's stream waits for it.
      if (seg_done_[seg].isCreated()) seg_done_[seg].block(caller);
      ring_x_[seg].narrow(0, 0, N).copy_(x, /*non_blocking=*/true);
      ring_t_[seg].narrow(0, 0, N).copy_(t, true);
      ring_s_[seg].narrow(0, 0, N).copy_(slot_ids, true);
      for (at::Tensor* r : {&ring_x_, &ring_t_, &ring_s_}) r->record_stream(caller);  // written on that stream
      at::cuda::CUDAEvent copied;
      copied.record(caller);
      copied.block(stream());
      {
        c10::cuda::CUDAStreamGuard sg(stream());
        train_segment(seg, N);
        publish_counters();
      }
      seg_done_[seg].record(stream());
      last_update_.record(stream());
      return;
    }
#endif
    std::unique_lock<std::mutex> lk(mu_);
    cv_done_.wait(lk, [&] { return stop_ || !error_.empty() || any_free_segment(); });
    rethrow_locked();
    int seg = 0;
    while (seg_busy_[seg]) ++seg;
    seg_busy_[seg] = true;
    lk.unlock();
    ring_x_[seg].narrow(0, 0, N).copy_(x);
    ring_t_[seg].narrow(0, 0, N).copy_(t);
    ring_s_[seg].narrow(0, 0, N).copy_(slot_ids);
    lk.lock();
    Job j;
    j.kind = Job::kTrain;
    j.seg = seg;
    j.rows = N;
    queue_.push_back(std::move(j));
    ++submitted_;
    lk.unlock();
    cv_job_.notify_one();
  }

  // Re-initialise these slots (ordered after every update observed before this call).
  void reset(const at::Tensor& slot_ids) {
    rethrow();
    check_slot_list(slot_ids, S_, params_);
#if defined(ESAMP_WITH_CUDA)
    if (dev_.is_cuda()) {
      const c10::cuda::CUDAGuard guard(dev_);
      auto caller = c10::cuda::getCurrentCUDAStream(dev_.index());
      at::Tensor s = slot_ids.clone();
      at::cuda::CUDAEvent ready;
      ready.record(caller);
      ready.block(stream());
      {
        c10::cuda::CUDAStreamGuard sg(stream());
        run_reset(s);
        s.record_stream(stream());
      }
      last_update_.record(stream());
      return;
    }
#endif
    Job j;
    j.kind = Job::kReset;
    j.slots = slot_ids.clone();
    {
      std::lock_guard<std::mutex> lk(mu_);
      queue_.push_back(std::move(j));
      ++submitted_;
    }
    cv_job_.notify_one();
  }

  // Block the host until every queued update has finished.
  void synchronize() {
#if defined(ESAMP_WITH_CUDA)
    if (dev_.is_cuda()) {
      const c10::cuda::CUDAGuard guard(dev_);
      stream().synchronize();
      return;
    }
#endif
    std::unique_lock<std::mutex> lk(mu_);
    cv_done_.wait(lk, [&] { return completed_ == submitted_ || !error_.empty(); });
    rethrow_locked();
  }

  // The counters (rows trained, rows skipped, loss sum, steps) as a float64 [4] tensor.
  // CPU: as of the last finished update, taken under the lock without waiting for queued work.
  // CUDA: a host tensor read from the pinned mirror -- no copy, no stream synchronisation.  fresh=true
  // (the default) returns the counters of every update observed before the call, waiting on the host for
  // the last update's event only when the mirror is behind; fresh=false never waits (the counters as of the
  // last finished update).
  at::Tensor stats(bool fresh) {
#if defined(ESAMP_WITH_CUDA)
    if (dev_.is_cuda()) {
      unsigned long long seq = 0;
      at::Tensor c = read_mirror(&seq);
      const unsigned long long want = published_.load();
      if (!fresh || seq >= want) return c;
      const c10::cuda::CUDAGuard guard(dev_);
      last_update_.synchronize();  // host-side wait for one event; no stream is stalled
      for (int spin = 0; spin < 1000 && seq < want; ++spin) c = read_mirror(&seq);
      TORCH_CHECK(seq >= want, "esamp.Trainer: the counters mirror is behind after the last update (", seq, " < ",
                  want, ")");
      return c;
    }
#endif
    std::lock_guard<std::mutex> lk(mu_);
    return snapshot_.defined() ? snapshot_.clone() : counters_.clone();
  }

  at::Tensor last_losses() {
    return read_bank([&] { return std::vector<at::Tensor>{losses_.clone()}; })[0];
  }

  // Copies of the bank tensors (for state dicts), taken after every queued update.
  std::vector<at::Tensor> state() {
    return read_bank([&] {
      return std::vector<at::Tensor>{params_.clone(), exp_avg_.clone(), exp_avg_sq_.clone(), step_.clone(),
                                     counters_.clone()};
    });
  }

  // Overwrite the bank (load_state_dict), ordered after every queued update.
  void load_state(std::vector<at::Tensor> src) {
    TORCH_CHECK(src.size() == 5, "state: expected 5 tensors (params, exp_avg, exp_avg_sq, step, counters), got ",
                src.size());
    at::Tensor* dst[5] = {&params_, &exp_avg_, &exp_avg_sq_, &step_, &counters_};
    const char* names[5] = {"params", "exp_avg", "exp_avg_sq", "step", "counters"};
    for (int i = 0; i < 5; ++i)
      TORCH_CHECK(src[i].sizes() == dst[i]->sizes(), "state[", names[i], "]: expected shape ", shape_str(*dst[i]),
                  ", got ", shape_str(src[i]));
#if defined(ESAMP_WITH_CUDA)
    if (dev_.is_cuda()) {
      const c10::cuda::CUDAGuard guard(dev_);
      auto caller = c10::cuda::getCurrentCUDAStream(dev_.index());
      // Sources on the device may still be written by work queued on the caller's stream: convert them
      // there, then the trainer stream waits for that stream before copying.
      std::vector<at::Tensor> conv(5);
      for (int i = 0; i < 5; ++i) conv[i] = src[i].to(dev_, dst[i]->scalar_type());
      at::cuda::CUDAEvent ready;
      ready.record(caller);
      ready.block(stream());
      {
        c10::cuda::CUDAStreamGuard sg(stream());
        for (int i = 0; i < 5; ++i) {
          dst[i]->copy_(conv[i], /*non_blocking=*/true);
          if (conv[i].is_cuda()) conv[i].record_stream(stream());
        }
        publish_counters();
      }
      last_update_.record(stream());
      stream().synchronize();  // the sources may be host memory the caller reuses at once
      return;
    }
#endif
    read_bank([&] {  // the worker is held off, so writing here is exclusive with updates too
      for (int i = 0; i < 5; ++i) dst[i]->copy_(src[i].to(dst[i]->device(), dst[i]->scalar_type()));
      return std::vector<at::Tensor>{};
    });
  }

  int64_t pending() {
    std::lock_guard<std::mutex> lk(mu_);
    return submitted_ - completed_;
  }

 private:
  // Runs fn after every queued update, with the CPU worker held off while fn runs (CUDA: on the
  // trainer stream after the last update, then synchronised).
  template <typename F>
  std::vector<at::Tensor> read_bank(F fn) {
#if defined(ESAMP_WITH_CUDA)
    if (dev_.is_cuda()) {
      const c10::cuda::CUDAGuard guard(dev_);
      auto caller = c10::cuda::getCurrentCUDAStream(dev_.index());
      std::vector<at::Tensor> out;
      {
        c10::cuda::CUDAStreamGuard sg(stream());
        out = fn();
      }
      stream().synchronize();
      // The copies were allocated on the trainer stream; the caller uses them on its own stream.
      for (at::Tensor& t : out)
        if (t.is_cuda()) t.record_stream(caller);
      return out;
    }
#endif
    {
      std::unique_lock<std::mutex> lk(mu_);
      const int64_t target = submitted_;
      // Every update queued before this call is done AND none is running (a job queued later by another
      // thread may have been popped meanwhile; it must not write while we read).
      cv_done_.wait(lk, [&] { return (completed_ >= target && !running_) || !error_.empty(); });
      rethrow_locked();
      ++readers_;
    }
    struct Release {
      Trainer* t;
      ~Release() {
        {
          std::lock_guard<std::mutex> lk(t->mu_);
          --t->readers_;
        }
        t->cv_job_.notify_all();
      }
    } release{this};
    return fn();
  }

  bool any_free_segment() const {
    for (bool b : seg_busy_)
      if (!b) return true;
    return false;
  }

  void rethrow() {
    std::lock_guard<std::mutex> lk(mu_);
    rethrow_locked();
  }
  void rethrow_locked() {
    if (!error_.empty()) {
      std::string e = error_;
      TORCH_CHECK(false, "esamp.Trainer: an update failed on the worker: ", e);
    }
  }

  void wait_updates() {
#if defined(ESAMP_WITH_CUDA)
    if (dev_.is_cuda()) {
      if (last_update_.isCreated()) last_update_.block(c10::cuda::getCurrentCUDAStream(dev_.index()));
      return;
    }
#endif
    synchronize();
  }

  // Bank, counters, losses and ring (on the current stream: the trainer stream on CUDA).
  void allocate() {
    esamp::DistillerShape sh;
    sh.H = H_;
    sh.R = R_;
    sh.L = L_;
    auto f32 = at::TensorOptions().dtype(at::kFloat).device(dev_);
    params_ = at::empty({S_, sh.params_per_slot()}, f32);
    exp_avg_ = at::zeros_like(params_);
    exp_avg_sq_ = at::zeros_like(params_);
    step_ = at::zeros({S_}, f32.dtype(at::kLong));
    counters_ = at::zeros({esamp::kNumStats}, f32.dtype(at::kDouble));
    losses_ = at::full({S_}, NAN, f32);
    ring_x_ = at::empty({K_, ring_rows_, H_}, f32);
    ring_t_ = at::empty({K_, ring_rows_, H_}, f32);
    ring_s_ = at::empty({K_, ring_rows_}, f32.dtype(at::kLong));
    seg_busy_.assign(K_, false);
  }

#if defined(ESAMP_WITH_CUDA)
  // Enqueues the copy of the counters into the pinned mirror (on the current stream = the trainer stream).
  void publish_counters() {
    if (!mirror_dev_) return;
    const unsigned long long seq = published_.fetch_add(1) + 1;
    esamp::Status st = esamp::stats_mirror_cuda(counters_.data_ptr<double>(), mirror_dev_, seq,
                                                c10::cuda::getCurrentCUDAStream(dev_.index()).stream());
    check_status(st, "Trainer.stats mirror");
  }

  // A consistent snapshot of the mirror (sequence lock); the last consistent one if a write is in progress.
  at::Tensor read_mirror(unsigned long long* seq) {
    std::lock_guard<std::mutex> lk(mirror_mu_);
    for (int attempt = 0; attempt < 64; ++attempt) {
      const unsigned long long e = mirror_host_->seq_end;
      std::atomic_thread_fence(std::memory_order_acquire);
      double v[esamp::kNumStats];
      for (int k = 0; k < esamp::kNumStats; ++k) v[k] = mirror_host_->v[k];
      std::atomic_thread_fence(std::memory_order_acquire);
      const unsigned long long b = mirror_host_->seq_begin;
      if (b == e) {
        double* d = last_good_.data_ptr<double>();
        for (int k = 0; k < esamp::kNumStats; ++k) d[k] = v[k];
        last_seq_ = e;
        break;
      }
    }
    *seq = last_seq_;
    return last_good_.clone();
  }
#endif

  void train_segment(int seg, int64_t N) {
    at::Tensor x = ring_x_[seg].narrow(0, 0, N);
    at::Tensor t = ring_t_[seg].narrow(0, 0, N);
    at::Tensor s = ring_s_[seg].narrow(0, 0, N);
    train_op().call(params_, exp_avg_, exp_avg_sq_, step_, losses_, counters_, x, t, s, R_, L_, norm_eps_, lr_,
                    beta1_, beta2_, adam_eps_, clip_);
  }

  void run_reset(const at::Tensor& slots) {
    reset_op().call(params_, exp_avg_, exp_avg_sq_, step_, slots, H_, R_, L_, seed_, gamma_init_);
  }

  void loop() {
    for (;;) {
      Job j;
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_job_.wait(lk, [&] { return (stop_ && queue_.empty()) || (!queue_.empty() && readers_ == 0); });
        if (queue_.empty()) return;  // stop requested and nothing left
        j = std::move(queue_.front());
        queue_.pop_front();
        running_ = true;
      }
      std::string err;
      try {
        if (j.kind == Job::kTrain) {
          train_segment(j.seg, j.rows);
        } else {
          run_reset(j.slots);
        }
      } catch (const std::exception& e) {
        err = e.what();
      }
      at::Tensor snap = counters_.clone();
      {
        std::lock_guard<std::mutex> lk(mu_);
        if (j.kind == Job::kTrain) seg_busy_[j.seg] = false;
        if (!err.empty() && error_.empty()) error_ = err;
        snapshot_ = snap;
        running_ = false;
        ++completed_;
      }
      cv_done_.notify_all();
    }
  }

  int64_t H_, R_, L_, S_;
  double lr_, adam_eps_, clip_, beta1_, beta2_, norm_eps_;
  int64_t seed_, ring_rows_, K_;
  c10::Device dev_{c10::kCPU};
  at::Tensor params_, exp_avg_, exp_avg_sq_, step_, counters_, losses_, snapshot_, last_good_;
  std::optional<at::Tensor> gamma_init_;
  at::Tensor ring_x_, ring_t_, ring_s_;
  // CPU worker state
  std::thread worker_;
  std::mutex mu_;
  std::condition_variable cv_job_, cv_done_;
  std::deque<Job> queue_;
  std::vector<bool> seg_busy_;
  int64_t submitted_ = 0, completed_ = 0;
  int64_t readers_ = 0;  // predictions reading the parameters right now (the worker waits for 0)
  bool running_ = false;  // the worker is executing a job
  bool stop_ = false;
  std::string error_;
#if defined(ESAMP_WITH_CUDA)
  std::optional<c10::cuda::CUDAStream> stream_opt_;
  c10::cuda::CUDAStream& stream() { return *stream_opt_; }
  std::vector<at::cuda::CUDAEvent> seg_done_;
  at::cuda::CUDAEvent last_update_;
  int next_seg_ = 0;
  std::atomic<unsigned long long> published_{0};  // mirror writes enqueued (sequence numbers 1, 2, ...)
  unsigned long long last_seq_ = 0;                // sequence number of last_good_
  esamp::StatsMirror* mirror_host_ = nullptr;
  esamp::StatsMirror* mirror_dev_ = nullptr;
  std::mutex mirror_mu_;
#endif
};

TORCH_LIBRARY_FRAGMENT(esamp, m) {
  m.class_<Trainer>("Trainer")
      .def(torch::init<int64_t, int64_t, int64_t, int64_t, double, double, double, double, double, double, int64_t,
                       std::string, int64_t, int64_t, std::optional<at::Tensor>>())
      .def("predict", &Trainer::predict)
      .def("observe", &Trainer::observe)
      .def("reset", &Trainer::reset)
      .def("synchronize", &Trainer::synchronize)
      .def("stats", &Trainer::stats, "", {torch::arg("fresh") = true})
      .def("last_losses", &Trainer::last_losses)
      .def("state", &Trainer::state)
      .def("load_state", &Trainer::load_state)
      .def("pending", &Trainer::pending);
}

}  // namespace esamp_torch
