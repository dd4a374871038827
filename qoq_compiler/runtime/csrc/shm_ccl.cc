/*!
 * \file shm_ccl.cc
 * \brief "shm": a CPU collective-communication backend for TVM's Disco runtime.
 *
 * TVM ships CCL backends for GPUs only (nccl, rccl); this one lets a Disco session of CPU
 * workers run the collectives that tensor-parallel Relax programs call. Its workers are the
 * threads of a ThreadedSession, or worker 0 (a thread of the controller) plus the processes
 * 1..N-1 of a ProcessSession: they share one POSIX shared-memory segment.
 *
 * Memory layout of the segment (N = number of workers, S = kSlotBytes):
 *
 *     [0, kHeaderBytes)                     Header: the count of workers that mapped the
 *                                           segment and the barrier's two counters, on separate
 *                                           cache lines (a lock-free std::atomic<uint32_t> is
 *                                           address-free, so it works across processes)
 *     kHeaderBytes + ((p * N) + r) * S      slot of rank r in buffer p (p = 0, 1), S bytes
 *
 * Setup: `init_ccl` runs on the controller. It creates the segment under a fresh name
 * (/qoqc-ccl-<pid>-<counter>-<random>), reserves its memory (a full /dev/shm fails here, not
 * with a SIGBUS later), and calls `init_ccl_per_worker` on every worker, which maps the segment
 * and counts itself in `mapped`. The controller waits (futex, with the timeout below) until all
 * have, then unlinks the name, also when that wait or anything before it fails (an error the
 * caller can catch); a worker that cannot map it unlinks it too, as an error in a worker thread
 * ends the process at once. After init_ccl the segment lives only as long as the mappings: no
 * file is left in /dev/shm whenever, or however, the processes end.
 *
 * Barrier: a centralized counting barrier. A worker reads `generation`, then increments
 * `arrived`; the last to arrive resets `arrived` and bumps `generation` (release), which frees
 * the others (acquire). Waiters spin briefly, then sleep in futex(FUTEX_WAIT) on `generation`
 * (shared futexes, no FUTEX_PRIVATE_FLAG, as the waiters may be other processes); the last
 * arriver wakes them. A wait gives up with an error after the timeout (QOQC_CCL_TIMEOUT
 * seconds, read by the controller at init_ccl; 300 by default), as a dead peer never arrives.
 *
 * A collective works in steps of at most S bytes per rank. Step k uses buffer p = k % 2: every
 * worker copies its part into its slot of buffer p, waits at the barrier, then reads what it
 * needs from the slots. One barrier per step suffices: before a worker writes buffer p again at
 * step k + 2 it passes the barrier of step k + 1, which every worker reaches only after it has
 * finished reading buffer p at step k. All workers run the same collectives on tensors of the
 * same sizes (the SPMD contract of Disco), so their step counters agree.
 *
 *   allreduce: each worker reduces the slots of ranks 0, 1, ..., N-1 in that order into its own
 *              recv, with the same code, so every worker gets bit-identical results. float16
 *              and bfloat16 accumulate in float32 and round once (to nearest even); int32
 *              accumulates in int64 and wraps on store, as NCCL does.
 *   broadcast_from_worker0: worker 0 copies send into its slot; every worker copies it out.
 *
 * One worker group only (num_groups == 1), so in_group changes nothing.
 */
#include <fcntl.h>
#include <linux/futex.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <tvm/ffi/reflection/registry.h>
#include <tvm/runtime/disco/builtin.h>
#include <tvm/runtime/disco/disco_worker.h>
#include <tvm/runtime/disco/session.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace tvm {
namespace runtime {
namespace shm_ccl {

constexpr size_t kHeaderBytes = 4096;
constexpr size_t kSlotBytes = size_t{1} << 20;

static_assert(std::atomic<uint32_t>::is_always_lock_free && sizeof(std::atomic<uint32_t>) == 4,
              "the barrier needs address-free 32-bit atomics (futex words)");

struct Header {
  alignas(64) std::atomic<uint32_t> mapped;  // workers that mapped the segment (at init_ccl)
  alignas(64) std::atomic<uint32_t> arrived;
  alignas(64) std::atomic<uint32_t> generation;
};
static_assert(sizeof(Header) <= kHeaderBytes, "header too large");

size_t SegmentBytes(int64_t num_workers) {
  return kHeaderBytes + 2 * static_cast<size_t>(num_workers) * kSlotBytes;
}

std::string ErrnoText(int err) { return std::string(std::strerror(err)); }

/*! \brief The state of one worker: thread-local, as the workers of a ThreadedSession (and worker
 * 0 of a ProcessSession) are threads of one process. */
struct Context {
  char* base = nullptr;
  size_t bytes = 0;
  int rank = 0;
  int num_workers = 0;
  uint64_t step = 0;
  double timeout_s = 0;

  ~Context() { Unmap(); }

  void Unmap() {
    if (base != nullptr) munmap(base, bytes);
    base = nullptr;
  }

  Header* header() const { return reinterpret_cast<Header*>(base); }

  char* Slot(int r) const {
    size_t index = static_cast<size_t>(step & 1) * num_workers + r;
    return base + kHeaderBytes + index * kSlotBytes;
  }

  static Context* Get() {
    thread_local Context ctx;
    return &ctx;
  }

  static Context* GetInitialized() {
    Context* ctx = Get();
    TVM_FFI_CHECK(ctx->base != nullptr, RuntimeError)
        << "shm CCL: this worker has no CCL; call init_ccl(\"shm\", ...) on the session first";
    return ctx;
  }
};

long Futex(std::atomic<uint32_t>* word, int op, uint32_t value, const timespec* timeout) {
  return syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), op, value, timeout, nullptr, 0);
}

inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

using Clock = std::chrono::steady_clock;

Clock::time_point Deadline(double seconds) {
  return Clock::now() +
         std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
}

/*! \brief Wait until *word != value: a short spin, then futex sleeps. False at the deadline. */
bool WaitForChange(std::atomic<uint32_t>* word, uint32_t value, Clock::time_point deadline) {
  for (int i = 0; i < 256; ++i) {
    if (word->load(std::memory_order_acquire) != value) return true;
    CpuRelax();
  }
  while (word->load(std::memory_order_acquire) == value) {
    int64_t left =
        std::chrono::duration_cast<std::chrono::nanoseconds>(deadline - Clock::now()).count();
    if (left <= 0) return false;
    timespec ts{static_cast<time_t>(left / 1000000000), static_cast<long>(left % 1000000000)};
    Futex(word, FUTEX_WAIT, value, &ts);  // EAGAIN, EINTR, ETIMEDOUT: look again
  }
  return true;
}

void Barrier(Context* ctx) {
  Header* h = ctx->header();
  uint32_t gen = h->generation.load(std::memory_order_acquire);
  if (h->arrived.fetch_add(1, std::memory_order_acq_rel) + 1 ==
      static_cast<uint32_t>(ctx->num_workers)) {
    h->arrived.store(0, std::memory_order_relaxed);
    h->generation.store(gen + 1, std::memory_order_release);
    Futex(&h->generation, FUTEX_WAKE, INT_MAX, nullptr);
    return;
  }
  TVM_FFI_CHECK(WaitForChange(&h->generation, gen, Deadline(ctx->timeout_s)), RuntimeError)
      << "shm CCL: worker " << ctx->rank << " waited " << ctx->timeout_s
      << " s at a barrier, and only " << h->arrived.load() << " of " << ctx->num_workers
      << " workers arrived: a worker died or the workers ran different collectives "
         "(QOQC_CCL_TIMEOUT sets the limit in seconds)";
}

double TimeoutFromEnv() {
  const char* env = std::getenv("QOQC_CCL_TIMEOUT");
  if (env == nullptr || *env == '\0') return 300.0;
  char* end = nullptr;
  double value = std::strtod(env, &end);
  TVM_FFI_CHECK(*end == '\0' && value > 0 && std::isfinite(value), ValueError)
      << "QOQC_CCL_TIMEOUT must be a positive number of seconds, got '" << env << "'";
  return value;
}

void InitCCL(Session sess, ffi::Shape device_ids) {
  int64_t num_workers = sess->GetNumWorkers();
  TVM_FFI_CHECK_EQ(static_cast<int64_t>(device_ids.size()), num_workers, ValueError)
      << "shm CCL: expected one device id per worker (" << num_workers << "), got "
      << device_ids;
  double timeout_s = TimeoutFromEnv();
  static std::atomic<uint64_t> counter{0};
  std::string name = "/qoqc-ccl-" + std::to_string(getpid()) + "-" +
                     std::to_string(counter.fetch_add(1)) + "-" +
                     std::to_string(std::random_device()());
  int fd = shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  TVM_FFI_CHECK(fd >= 0, RuntimeError)
      << "shm CCL: cannot create the shared memory segment " << name << ": " << ErrnoText(errno);
  // Whether the workers mapped the segment or failed, its name goes when this function returns.
  struct Cleanup {
    std::string name;
    void* header = MAP_FAILED;
    ~Cleanup() {
      if (header != MAP_FAILED) munmap(header, kHeaderBytes);
      shm_unlink(name.c_str());
    }
  } cleanup{name};
  int err = posix_fallocate(fd, 0, static_cast<off_t>(SegmentBytes(num_workers)));
  if (err == 0) {
    cleanup.header = mmap(nullptr, kHeaderBytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (cleanup.header == MAP_FAILED) err = errno;
  }
  close(fd);
  TVM_FFI_CHECK(err == 0, RuntimeError) << "shm CCL: cannot reserve " << SegmentBytes(num_workers)
                                        << " bytes in /dev/shm: " << ErrnoText(err);
  DRef func = sess->GetGlobalFunc("runtime.disco.shm.init_ccl_per_worker");
  sess->CallPacked(func, name, timeout_s);
  Header* h = static_cast<Header*>(cleanup.header);
  Clock::time_point deadline = Deadline(timeout_s);
  for (uint32_t n; (n = h->mapped.load(std::memory_order_acquire)) < num_workers;) {
    TVM_FFI_CHECK(WaitForChange(&h->mapped, n, deadline), RuntimeError)
        << "shm CCL: only " << h->mapped.load() << " of " << num_workers
        << " workers set up the CCL within " << timeout_s
        << " s: a worker died or is busy (QOQC_CCL_TIMEOUT sets the limit in seconds)";
  }
}

void MapSegment(Context* ctx, const DiscoWorker* worker, const std::string& name) {
  TVM_FFI_CHECK_EQ(worker->num_groups, 1, ValueError)
      << "shm CCL supports one worker group only, but the session has " << worker->num_groups;
  int fd = shm_open(name.c_str(), O_RDWR, 0);
  TVM_FFI_CHECK(fd >= 0, RuntimeError)
      << "shm CCL: worker " << worker->worker_id << " cannot open the shared memory segment "
      << name << ": " << ErrnoText(errno);
  size_t bytes = SegmentBytes(worker->num_workers);
  struct stat st;
  bool size_ok = fstat(fd, &st) == 0 && static_cast<size_t>(st.st_size) == bytes;
  void* base = size_ok ? mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0) : nullptr;
  int err = errno;
  close(fd);
  TVM_FFI_CHECK(size_ok, RuntimeError)
      << "shm CCL: the shared memory segment " << name << " does not have the " << bytes
      << " bytes that " << worker->num_workers << " workers need";
  TVM_FFI_CHECK(base != MAP_FAILED, RuntimeError)
      << "shm CCL: cannot map the shared memory segment " << name << ": " << ErrnoText(err);
  ctx->base = static_cast<char*>(base);
  ctx->bytes = bytes;
}

void InitCCLPerWorker(std::string name, double timeout_s) {
  DiscoWorker* worker = DiscoWorker::ThreadLocal();
  Context* ctx = Context::Get();
  ctx->Unmap();
  try {
    MapSegment(ctx, worker, name);
  } catch (...) {
    // An error in a worker thread ends the whole process, the controller included, before it
    // could clean up: remove the name here.
    shm_unlink(name.c_str());
    throw;
  }
  ctx->rank = worker->worker_id;
  ctx->num_workers = worker->num_workers;
  ctx->step = 0;
  ctx->timeout_s = timeout_s;
  worker->ccl = "shm";
  Header* h = ctx->header();
  h->mapped.fetch_add(1, std::memory_order_release);
  Futex(&h->mapped, FUTEX_WAKE, INT_MAX, nullptr);
}

/*! \brief The first byte of a CPU tensor's data, after checking it can be used as a buffer. */
char* DataOf(const Tensor& t, const char* what) {
  TVM_FFI_CHECK(t.defined(), ValueError) << "shm CCL: tensor `" << what << "` is None";
  TVM_FFI_CHECK(t->device.device_type == kDLCPU, ValueError)
      << "shm CCL: tensor `" << what << "` must be on the CPU, but is on " << t->device;
  TVM_FFI_CHECK(t.IsContiguous(), ValueError)
      << "shm CCL: tensor `" << what << "` must be contiguous";
  return static_cast<char*>(t->data) + t->byte_offset;
}

void CheckSameLayout(const Tensor& send, const Tensor& recv) {
  TVM_FFI_CHECK(send->dtype == recv->dtype, ValueError)
      << "shm CCL: send and recv have different dtypes (" << send->dtype << ", " << recv->dtype
      << ")";
  TVM_FFI_CHECK_EQ(send.numel(), recv.numel(), ValueError)
      << "shm CCL: send and recv have different numbers of elements";
}

uint32_t BitsOf(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

float FloatOf(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

struct Float32 {
  using Storage = float;
  using Acc = float;
  static Acc Load(Storage x) { return x; }
  static Storage Store(Acc a) { return a; }
};

struct Int32 {
  using Storage = int32_t;
  using Acc = int64_t;  // no overflow for any number of workers; Store wraps, as in NCCL
  static Acc Load(Storage x) { return x; }
  static Storage Store(Acc a) { return static_cast<Storage>(static_cast<uint32_t>(a)); }
};

struct Float16 {
  using Storage = uint16_t;
  using Acc = float;
  static Acc Load(Storage h) {
    uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    uint32_t exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
    if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float
      float magnitude = static_cast<float>(mantissa) * 0x1p-24f;
      return sign ? -magnitude : magnitude;
    }
    if (exponent == 0x1f) return FloatOf(sign | 0x7f800000u | (mantissa << 13));  // inf, NaN
    return FloatOf(sign | ((exponent + 112) << 23) | (mantissa << 13));
  }
  static Storage Store(Acc f) {  // round to nearest, ties to even
    uint32_t bits = BitsOf(f);
    uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
    uint32_t magnitude = bits & 0x7fffffffu;
    if (magnitude > 0x7f800000u) return sign | 0x7e00u;            // NaN
    if (magnitude >= 0x477ff000u) return sign | 0x7c00u;           // >= 65520 rounds to inf
    if (magnitude < 0x38800000u) {                                 // below 2^-14: subnormal
      float units = FloatOf(magnitude) * 0x1p24f;                  // exact; < 1024
      return sign | static_cast<uint16_t>(std::nearbyint(units));  // 1024 is the least normal
    }
    uint32_t rebiased = magnitude - (112u << 23);
    rebiased += 0xfffu + ((rebiased >> 13) & 1u);
    return sign | static_cast<uint16_t>(rebiased >> 13);
  }
};

struct BFloat16 {
  using Storage = uint16_t;
  using Acc = float;
  static Acc Load(Storage b) { return FloatOf(static_cast<uint32_t>(b) << 16); }
  static Storage Store(Acc f) {  // round to nearest, ties to even
    uint32_t bits = BitsOf(f);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<Storage>((bits >> 16) | 0x40u);
    return static_cast<Storage>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
  }
};

/*! \brief out[i] = op(...op(op(slot_0[i], slot_1[i]), slot_2[i])..., slot_{N-1}[i]). */
template <typename T, typename Op>
void ReduceSlots(const Context* ctx, int64_t count, typename T::Storage* out, Op op) {
  using S = typename T::Storage;
  std::vector<const S*> src(ctx->num_workers);
  for (int r = 0; r < ctx->num_workers; ++r) src[r] = reinterpret_cast<const S*>(ctx->Slot(r));
  for (int64_t i = 0; i < count; ++i) {
    typename T::Acc acc = T::Load(src[0][i]);
    for (int r = 1; r < ctx->num_workers; ++r) acc = op(acc, T::Load(src[r][i]));
    out[i] = T::Store(acc);
  }
}

template <typename T>
void AllReduceTyped(Context* ctx, const char* send, char* recv, int64_t numel, ReduceKind kind) {
  using S = typename T::Storage;
  using A = typename T::Acc;
  const int64_t per_step = kSlotBytes / sizeof(S);
  for (int64_t begin = 0; begin < numel; begin += per_step) {
    int64_t count = std::min(per_step, numel - begin);
    std::memcpy(ctx->Slot(ctx->rank), send + begin * sizeof(S), count * sizeof(S));
    Barrier(ctx);
    S* out = reinterpret_cast<S*>(recv) + begin;
    if (kind == ReduceKind::kSum) {
      ReduceSlots<T>(ctx, count, out, [](A a, A b) { return a + b; });
    } else if (kind == ReduceKind::kMax) {
      ReduceSlots<T>(ctx, count, out, [](A a, A b) { return b > a ? b : a; });
    } else {
      ReduceSlots<T>(ctx, count, out, [](A a, A b) { return b < a ? b : a; });
    }
    ++ctx->step;
  }
}

void AllReduce(Tensor send, int kind, bool /*in_group: one group*/, Tensor recv) {
  Context* ctx = Context::GetInitialized();
  auto reduce_kind = static_cast<ReduceKind>(kind);
  TVM_FFI_CHECK(reduce_kind == ReduceKind::kSum || reduce_kind == ReduceKind::kMax ||
                    reduce_kind == ReduceKind::kMin,
                ValueError)
      << "shm CCL: allreduce supports sum, max and min, not "
      << (0 <= kind && kind <= 4 ? ReduceKind2String(reduce_kind) : std::to_string(kind));
  const char* src = DataOf(send, "send");
  char* dst = DataOf(recv, "recv");
  CheckSameLayout(send, recv);
  DLDataType dtype = send->dtype;
  int64_t numel = send.numel();
  if (dtype == DLDataType{kDLFloat, 32, 1}) {
    AllReduceTyped<Float32>(ctx, src, dst, numel, reduce_kind);
  } else if (dtype == DLDataType{kDLFloat, 16, 1}) {
    AllReduceTyped<Float16>(ctx, src, dst, numel, reduce_kind);
  } else if (dtype == DLDataType{kDLBfloat, 16, 1}) {
    AllReduceTyped<BFloat16>(ctx, src, dst, numel, reduce_kind);
  } else if (dtype == DLDataType{kDLInt, 32, 1}) {
    AllReduceTyped<Int32>(ctx, src, dst, numel, reduce_kind);
  } else {
    TVM_FFI_THROW(ValueError) << "shm CCL: allreduce supports float32, float16, bfloat16 and "
                                 "int32, not "
                              << dtype;
  }
}

void BroadcastFromWorker0(ffi::Optional<Tensor> send, bool /*in_group: one group*/, Tensor recv) {
  Context* ctx = Context::GetInitialized();
  char* dst = DataOf(recv, "recv");
  const char* src = nullptr;
  if (ctx->rank == 0) {
    TVM_FFI_CHECK(send.has_value(), ValueError) << "shm CCL: worker 0 has no `send` tensor";
    src = DataOf(send.value(), "send");
    CheckSameLayout(send.value(), recv);
  }
  const size_t bytes = ffi::GetDataSize(*recv.operator->());
  for (size_t begin = 0; begin < bytes; begin += kSlotBytes) {
    size_t count = std::min(kSlotBytes, bytes - begin);
    if (ctx->rank == 0) std::memcpy(ctx->Slot(0), src + begin, count);
    Barrier(ctx);
    std::memcpy(dst + begin, ctx->Slot(0), count);
    ++ctx->step;
  }
}

TVM_FFI_STATIC_INIT_BLOCK() {
  namespace refl = tvm::ffi::reflection;
  refl::GlobalDef()
      .def("runtime.disco.shm.init_ccl", InitCCL)
      .def("runtime.disco.shm.init_ccl_per_worker", InitCCLPerWorker)
      .def("runtime.disco.shm.allreduce", AllReduce)
      .def("runtime.disco.shm.broadcast_from_worker0", BroadcastFromWorker0)
      .def("runtime.disco.shm.sync_worker", []() {});  // CPU collectives finish before returning
}

}  // namespace shm_ccl
}  // namespace runtime
}  // namespace tvm
