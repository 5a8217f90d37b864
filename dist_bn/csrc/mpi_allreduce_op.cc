// DistBnMpiAllreduce: the sum of a float64 vector over an MPI communicator,
// as one MPI_Iallreduce issued from a TensorFlow kernel (dist_bn/mpi_op.py).
//
// Why a kernel: the same collective through a tf.numpy_function costs about
// 120 us of Python per call, more than the wire; a deep net issues two per BN
// layer per step. Here it costs the MPI call plus a few us.
//
// Pairing: each call is two all-reduces. First the header [t, t^2, k, k^2]
// (t the collective's name tag folded with its length, k its sequence
// number): the sums equal n*t, n*t^2, n*k, n*k^2 exactly when every rank sent
// the same t and k. Only then the payload, whose length is now known to agree
// (MPI leaves unequal counts undefined: Open MPI truncates, hangs or crashes).
// On a mismatch every rank knows at once; they exchange what they called and
// the kernel fails with one line naming each rank's collective.
//
// Waiting: an AsyncOpKernel. It polls MPI_Test on the calling thread for a
// short while (yielding the core between polls, after DIST_BN_MPI_SPIN_US of
// pure spinning, 0 by default as measured fastest: a blocking MPI_Allreduce
// busy-waits, which on a machine with more threads than cores starves the
// late peer), then hands the request to one poller thread, so a slow peer
// never holds one of TensorFlow's inter-op threads. Collectives in flight are
// listed for dist_bn's watchdog (dist_bn_oldest_inflight), which ends the job
// with one line when one waits past DIST_BN_COLLECTIVE_TIMEOUT_S.
#include <mpi.h>
#include <sched.h>
#include <time.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace dist_bn {
namespace {

using tensorflow::AsyncOpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using Clock = std::chrono::steady_clock;

constexpr int kTagValues = 4;
constexpr int64_t kTagModulus = int64_t{1} << 20;
constexpr int kNameBytes = 160;
constexpr double kMismatchExchangeS = 10.0;

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

int64_t EnvMicros(const char* name, int64_t fallback) {
  const char* raw = std::getenv(name);
  if (raw == nullptr || *raw == '\0') return fallback;
  char* end = nullptr;
  long long value = std::strtoll(raw, &end, 10);
  return (end != raw && *end == '\0' && value >= 0) ? value : fallback;
}

// Collectives in flight, for the watchdog: id -> (start, sequence, key).
struct Inflight {
  Clock::time_point start;
  int64_t sequence;
  int64_t key;
};
std::mutex inflight_mutex;
std::map<uint64_t, Inflight> inflight;
uint64_t next_inflight_id = 0;

uint64_t EnterInflight(int64_t sequence, int64_t key) {
  std::lock_guard<std::mutex> lock(inflight_mutex);
  uint64_t id = next_inflight_id++;
  inflight[id] = Inflight{Clock::now(), sequence, key};
  return id;
}

void LeaveInflight(uint64_t id) {
  std::lock_guard<std::mutex> lock(inflight_mutex);
  inflight.erase(id);
}

class MpiAllreduceOp;

// One call: the header all-reduce (stage 0), then the payload's (stage 1).
struct Pending {
  const MpiAllreduceOp* op;
  OpKernelContext* ctx;
  AsyncOpKernel::DoneCallback done;
  MPI_Request request;
  int stage;
  double tags[kTagValues], summed_tags[kTagValues];
  const double* input;
  double* output;
  int64_t n, sequence;
  uint64_t inflight_id;
};

// One thread that polls the requests no kernel call is waiting on any more.
class Poller {
 public:
  static Poller& Get() {
    static Poller* poller = new Poller();  // never destroyed: outlives TF's threads
    return *poller;
  }
  void Add(Pending* pending) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      incoming_.push_back(pending);
    }
    wake_.notify_one();
  }

 private:
  Poller() : thread_([this] { Loop(); }) { thread_.detach(); }
  void Loop();

  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<Pending*> incoming_;
  std::thread thread_;
};

class MpiAllreduceOp : public AsyncOpKernel {
 public:
  explicit MpiAllreduceOp(OpKernelConstruction* ctx) : AsyncOpKernel(ctx) {
    tensorflow::int64 comm, tag, key;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("comm", &comm));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("name_tag", &tag));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("key", &key));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("collective", &collective_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("description", &description_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("ranks", &ranks_));
    // Open MPI's MPI_Comm is a pointer, MPICH's an int: mpi4py's handle fits both.
    comm_ = (MPI_Comm)(intptr_t)comm;
    MPI_Comm_size(comm_, &size_);
    name_tag_ = tag;
    key_ = key;
    spin_us_ = EnvMicros("DIST_BN_MPI_SPIN_US", 0);
    inline_us_ = EnvMicros("DIST_BN_MPI_INLINE_POLL_US", 1000);
  }

  void ComputeAsync(OpKernelContext* ctx, DoneCallback done) override {
    const Tensor& payload = ctx->input(0);
    const Tensor& sequence = ctx->input(1);
    OP_REQUIRES_ASYNC(ctx, payload.dims() == 1,
                      tensorflow::errors::InvalidArgument("dist_bn: the payload must be 1-D"), done);
    OP_REQUIRES_ASYNC(ctx, tensorflow::TensorShapeUtils::IsScalar(sequence.shape()),
                      tensorflow::errors::InvalidArgument("dist_bn: the sequence must be a scalar"),
                      done);
    Tensor* output = nullptr;
    OP_REQUIRES_OK_ASYNC(ctx, ctx->allocate_output(0, payload.shape(), &output), done);
    auto* p = new Pending();
    p->op = this;
    p->ctx = ctx;
    p->done = std::move(done);
    p->stage = 0;
    p->input = payload.flat<double>().data();
    p->output = output->flat<double>().data();
    p->n = payload.NumElements();
    p->sequence = sequence.scalar<tensorflow::int64>()();
    OwnTags(p->n, p->sequence, p->tags);
    p->inflight_id = EnterInflight(p->sequence, key_);
    // The fixed-size header first: ranks whose payloads differ in length (or
    // that called different collectives) learn it before any payload moves,
    // since an all-reduce of unequal counts is undefined in MPI (Open MPI
    // truncates, hangs or crashes).
    int rc = MPI_Iallreduce(p->tags, p->summed_tags, kTagValues, MPI_DOUBLE, MPI_SUM, comm_,
                            &p->request);
    if (rc != MPI_SUCCESS) {
      Fail(p, rc);
      return;
    }
    // Poll here first: the peer is usually there within microseconds.
    const auto start = Clock::now();
    const auto spin = std::chrono::microseconds(spin_us_);
    const auto budget = std::chrono::microseconds(inline_us_);
    while (!Step(p)) {
      auto waited = Clock::now() - start;
      if (waited > budget) {
        Poller::Get().Add(p);
        return;
      }
      if (waited > spin) sched_yield();
    }
  }

  // Tests the request in flight and moves the call on; true once done() ran.
  bool Step(Pending* p) const {
    int flag = 0;
    MPI_Finalized(&flag);
    if (flag) {  // Horovod ends MPI in every process when one rank leaves
      LeaveInflight(p->inflight_id);
      p->ctx->SetStatus(tensorflow::errors::Aborted(
          "dist_bn: MPI was finalized during collective '", collective_, "' (a rank left the job)"));
      auto done = std::move(p->done);
      delete p;
      done();
      return true;
    }
    int rc = MPI_Test(&p->request, &flag, MPI_STATUS_IGNORE);
    if (rc != MPI_SUCCESS) return Fail(p, rc);
    if (!flag) return false;
    if (p->stage == 0) {
      for (int i = 0; i < kTagValues; ++i) {
        if (p->summed_tags[i] != size_ * p->tags[i]) return Fail(p, MPI_SUCCESS);
      }
      p->stage = 1;
      rc = MPI_Iallreduce(p->input, p->output, static_cast<int>(p->n), MPI_DOUBLE, MPI_SUM, comm_,
                          &p->request);
      return rc != MPI_SUCCESS ? Fail(p, rc) : false;
    }
    LeaveInflight(p->inflight_id);
    auto done = std::move(p->done);
    delete p;
    done();
    return true;
  }

 private:
  // Every rank of a mis-paired collective gets here at once: fail with who called what.
  bool Fail(Pending* p, int rc) const {
    LeaveInflight(p->inflight_id);
    p->ctx->SetStatus(tensorflow::errors::FailedPrecondition(Mismatch(p->n, p->sequence, rc)));
    auto done = std::move(p->done);
    delete p;
    done();
    return true;
  }

  // [t, t^2, k, k^2], t < 2^20 and k < 2^20: n*t^2 is exact in float64 for 2^13 ranks.
  void OwnTags(int64_t n, int64_t sequence, double* out) const {
    const double t = static_cast<double>((name_tag_ + 7919 * n) % (kTagModulus - 1) + 1);
    const double k = static_cast<double>(((sequence % kTagModulus) + kTagModulus) % kTagModulus);
    out[0] = t;
    out[1] = t * t;
    out[2] = k;
    out[3] = k * k;
  }

  // Every rank of a mis-paired collective gets here: gather who called what.
  std::string Mismatch(int64_t n, int64_t sequence, int rc) const {
    struct Record {
      char name[kNameBytes];
      int64_t sequence;
      int64_t length;
    };
    Record own{};
    std::strncpy(own.name, collective_.c_str(), kNameBytes - 1);
    own.sequence = sequence;
    own.length = n;
    int size = 0;
    MPI_Comm_size(comm_, &size);
    std::vector<Record> all(size);
    MPI_Request request = MPI_REQUEST_NULL;
    bool gathered = MPI_Iallgather(&own, sizeof(Record), MPI_BYTE, all.data(), sizeof(Record),
                                   MPI_BYTE, comm_, &request) == MPI_SUCCESS;
    const auto start = Clock::now();
    while (gathered) {
      int flag = 0;
      if (MPI_Test(&request, &flag, MPI_STATUS_IGNORE) != MPI_SUCCESS) gathered = false;
      if (flag) break;
      if (Seconds(Clock::now() - start) > kMismatchExchangeS) gathered = false;
      struct timespec pause = {0, 1000000};
      nanosleep(&pause, nullptr);
    }
    int world_rank = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
    std::string seen;
    if (gathered) {
      for (int i = 0; i < size; ++i) {
        if (i) seen += ", ";
        std::string name(all[i].name, strnlen(all[i].name, kNameBytes));
        seen += "rank " + std::to_string(i < static_cast<int>(ranks_.size()) ? ranks_[i] : i) +
                ": '" + name + "' (#" + std::to_string(all[i].sequence) + ", " +
                std::to_string(all[i].length) + " values)";
      }
    } else {
      seen = "rank " + std::to_string(world_rank) + ": '" + collective_ + "' (#" +
             std::to_string(sequence) + ", " + std::to_string(n) + " values); the other ranks did not say";
    }
    std::string reason;
    for (int i = 0; gathered && i < size; ++i) {
      if (all[i].length != n) reason = " (payload lengths differ: channel counts?)";
    }
    if (rc != MPI_SUCCESS) {
      char text[MPI_MAX_ERROR_STRING];
      int length = 0;
      MPI_Error_string(rc, text, &length);
      reason = " (" + std::string(text, length) + ")";
    }
    std::string message = "dist_bn: mis-paired collective in " + description_ + reason + ": " + seen +
                          ". Every rank of a process set must call the same SyncBatchNormalization "
                          "layers in the same order with the same training flag.";
    std::fprintf(stderr, "%s\n", message.c_str());
    std::fflush(stderr);
    return message;
  }

  MPI_Comm comm_;
  int size_ = 0;
  int64_t name_tag_ = 0, key_ = 0, spin_us_ = 0, inline_us_ = 0;
  std::string collective_, description_;
  std::vector<tensorflow::int64> ranks_;
};

void Poller::Loop() {
  std::vector<Pending*> active;
  auto last_progress = Clock::now();
  while (true) {
    {
      std::unique_lock<std::mutex> lock(mutex_);
      if (active.empty()) wake_.wait(lock, [this] { return !incoming_.empty(); });
      while (!incoming_.empty()) {
        active.push_back(incoming_.front());
        incoming_.pop_front();
        last_progress = Clock::now();
      }
    }
    bool progress = false;
    for (size_t i = 0; i < active.size();) {
      Pending* p = active[i];
      const int stage = p->stage;
      if (p->op->Step(p)) {  // done: p is gone
        active[i] = active.back();
        active.pop_back();
        progress = true;
      } else {
        progress |= p->stage != stage;
        ++i;
      }
    }
    const auto now = Clock::now();
    if (progress) last_progress = now;
    if (Seconds(now - last_progress) < 0.002) {
      sched_yield();
    } else {  // a peer far behind: poll every 50 us rather than take a core
      struct timespec pause = {0, 50000};
      nanosleep(&pause, nullptr);
    }
  }
}

}  // namespace
}  // namespace dist_bn

// For dist_bn's watchdog: how many collectives are in flight, and the oldest's
// age in seconds, sequence number and key (dist_bn/mpi_op.py names the key).
extern "C" int dist_bn_oldest_inflight(double* age_s, int64_t* sequence, int64_t* key) {
  std::lock_guard<std::mutex> lock(dist_bn::inflight_mutex);
  const auto now = dist_bn::Clock::now();
  bool first = true;
  for (const auto& entry : dist_bn::inflight) {
    double age = dist_bn::Seconds(now - entry.second.start);
    if (first || age > *age_s) {
      *age_s = age;
      *sequence = entry.second.sequence;
      *key = entry.second.key;
      first = false;
    }
  }
  return static_cast<int>(dist_bn::inflight.size());
}

REGISTER_OP("DistBnMpiAllreduce")
    .Input("payload: double")
    .Input("sequence: int64")
    .Output("summed: double")
    .Attr("comm: int")
    .Attr("name_tag: int")
    .Attr("key: int")
    .Attr("collective: string")
    .Attr("description: string")
    .Attr("ranks: list(int)")
    .SetIsStateful()
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* c) {
      c->set_output(0, c->input(0));
      return tensorflow::OkStatus();
    });

REGISTER_KERNEL_BUILDER(Name("DistBnMpiAllreduce").Device(tensorflow::DEVICE_CPU),
                        dist_bn::MpiAllreduceOp);
