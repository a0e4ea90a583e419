#include "kvstore/copy_engine.cuh"

#include <cuda.h>
#include <sys/mman.h>

#include <cerrno>
#include <cstring>
#include <memory>
#include <optional>
#include <string>

#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"

#include "absl/strings/str_cat.h"

#ifndef MAP_HUGE_2MB
#define MAP_HUGE_2MB (21 << 26)  // log2(2 MiB) << MAP_HUGE_SHIFT
#endif
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23  // Linux 5.14; older kernels answer EINVAL and the pages are touched
#endif

namespace scout::kvstore {
namespace {

constexpr int kThreads = 256;

// Per-layer counts of the units a signalled gather has stored (nullptr: no counting).
struct LayerCounts {
  const int32_t* layer_begin = nullptr;  // [num_layers + 1] the plan's layer ranges of units
  int num_layers = 0;
  unsigned long long* counters = nullptr;  // [num_layers]
};

// One warp per unit: all of its 16-byte loads are issued before any store, so a warp keeps a
// whole unit (8 KiB at 32 loads per lane... here unit_bytes / 512 per lane) in flight over PCIe.
// Signalled (counts.counters set): every layer's units in one launch, warps taking units in plan
// order so layers finish roughly in order; once a unit is stored its warp bumps its layer's
// counter, which another stream waits for with cuStreamWaitValue64 (WaitLayer).
template <int PER_LANE>
__global__ void __launch_bounds__(kThreads) GatherKernel(const std::byte* const* src, const int32_t* dst_slots,
                                                         int count, size_t unit_bytes, std::byte* pool,
                                                         LayerCounts counts) {
  const int lane = threadIdx.x & 31;
  const int warps = gridDim.x * (kThreads / 32);
  for (int u = blockIdx.x * (kThreads / 32) + (threadIdx.x >> 5); u < count; u += warps) {
    const uint4* s = reinterpret_cast<const uint4*>(src[u]);
    uint4* d = reinterpret_cast<uint4*>(pool + static_cast<size_t>(dst_slots[u]) * unit_bytes);
    uint4 v[PER_LANE];
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) v[i] = s[i * 32 + lane];
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) d[i * 32 + lane] = v[i];
    if (counts.counters == nullptr) continue;
    // Every lane's stores are visible device-wide before the count says the unit is in.
    __threadfence();
    __syncwarp();
    if (lane == 0) {
      int lo = 0, hi = counts.num_layers;  // the layer whose [layer_begin[l], layer_begin[l + 1]) holds u
      while (hi - lo > 1) {
        const int mid = (lo + hi) / 2;
        if (counts.layer_begin[mid] <= u) lo = mid; else hi = mid;
      }
      atomicAdd(&counts.counters[lo], 1ull);
    }
  }
}

// Any unit size that is a multiple of 512 bytes: loops of PER_LANE loads.
__global__ void __launch_bounds__(kThreads) GatherKernelAnySize(const std::byte* const* src, const int32_t* dst_slots,
                                                                int count, size_t unit_bytes, std::byte* pool) {
  const int lane = threadIdx.x & 31;
  const int warps = gridDim.x * (kThreads / 32);
  const size_t vecs = unit_bytes / 16;
  for (int u = blockIdx.x * (kThreads / 32) + (threadIdx.x >> 5); u < count; u += warps) {
    const uint4* s = reinterpret_cast<const uint4*>(src[u]);
    uint4* d = reinterpret_cast<uint4*>(pool + static_cast<size_t>(dst_slots[u]) * unit_bytes);
    for (size_t i = lane; i < vecs; i += 32) d[i] = s[i];
  }
}

__global__ void __launch_bounds__(kThreads) ScatterKernel(const int32_t* src_slots, std::byte* const* dst, int count,
                                                          size_t unit_bytes, const std::byte* pool) {
  const int lane = threadIdx.x & 31;
  const int warps = gridDim.x * (kThreads / 32);
  const size_t vecs = unit_bytes / 16;
  for (int u = blockIdx.x * (kThreads / 32) + (threadIdx.x >> 5); u < count; u += warps) {
    const uint4* s = reinterpret_cast<const uint4*>(pool + static_cast<size_t>(src_slots[u]) * unit_bytes);
    uint4* d = reinterpret_cast<uint4*>(dst[u]);
    for (size_t i = lane; i < vecs; i += 32) d[i] = s[i];
  }
}

}  // namespace

cudaError_t ScatterUnits(const int32_t* src_slots, std::byte* const* dst, int count, size_t unit_bytes,
                         const std::byte* pool, int num_sms, cudaStream_t stream) {
  if (count <= 0) return cudaSuccess;
  if (unit_bytes % 512 != 0) return cudaErrorInvalidValue;
  const int blocks = std::max(1, std::min((count + 7) / 8, 2 * num_sms));
  ScatterKernel<<<blocks, kThreads, 0, stream>>>(src_slots, dst, count, unit_bytes, pool);
  return cudaGetLastError();
}

namespace {

// Chunks are allocated from the store's threads (a new thread's current device is 0) and from
// the owner's: the allocators pin on the device current when they were made, and give the
// calling thread its own current device back.
class OnDevice {
 public:
  explicit OnDevice(int device) {
    cudaGetDevice(&previous_);
    if (previous_ != device) set_ = cudaSetDevice(device);
  }
  ~OnDevice() {
    if (set_.has_value()) cudaSetDevice(previous_);
  }
  cudaError_t status() const { return set_.value_or(cudaSuccess); }

 private:
  int previous_ = 0;
  std::optional<cudaError_t> set_;
};

std::string ErrnoText(int err) {
  char buf[128];
  return strerror_r(err, buf, sizeof buf);  // GNU: returns the message
}

}  // namespace

HostAllocator PinnedHostAllocator() {
  int device = 0;
  cudaGetDevice(&device);
  return {[device](size_t bytes) -> absl::StatusOr<void*> {
            OnDevice on(device);
            if (on.status() != cudaSuccess) {
              return absl::InternalError(absl::StrCat("cudaSetDevice(", device, "): ", cudaGetErrorString(on.status())));
            }
            void* p = nullptr;
            cudaError_t e = cudaHostAlloc(&p, bytes, cudaHostAllocMapped | cudaHostAllocPortable);
            if (e != cudaSuccess) {
              return absl::ResourceExhaustedError(
                  absl::StrCat("cudaHostAlloc of ", bytes, " bytes: ", cudaGetErrorString(e)));
            }
            void* dev = nullptr;
            if (cudaHostGetDevicePointer(&dev, p, 0) != cudaSuccess || dev != p) {
              cudaFreeHost(p);
              return absl::FailedPreconditionError("pinned memory is not addressable at the same pointer on the GPU");
            }
            return p;
          },
          [](void* p) { cudaFreeHost(p); }};
}

HostAllocator HugePageHostAllocator() {
  // The release function gets only the pointer: the lengths of the mappings are kept here.
  struct Mappings {
    absl::Mutex mu;
    absl::flat_hash_map<void*, size_t> length ABSL_GUARDED_BY(mu);
  };
  auto maps = std::make_shared<Mappings>();
  constexpr size_t kHuge = size_t{2} << 20;
  int device = 0;  // as PinnedHostAllocator
  cudaGetDevice(&device);
  return {[maps, device](size_t bytes) -> absl::StatusOr<void*> {
            OnDevice on(device);
            if (on.status() != cudaSuccess) {
              return absl::InternalError(absl::StrCat("cudaSetDevice(", device, "): ", cudaGetErrorString(on.status())));
            }
            const size_t len = (bytes + kHuge - 1) / kHuge * kHuge;
            // 2 MiB pages explicitly: the system's default huge page may be 1 GiB.
            void* p = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB | MAP_HUGE_2MB,
                           -1, 0);
            if (p == MAP_FAILED) {
              // No reserved huge pages: map 2 MiB more, keep the aligned part, ask for THP.
              void* raw = mmap(nullptr, len + kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
              if (raw == MAP_FAILED) {
                return absl::ResourceExhaustedError(absl::StrCat("mmap of ", len, " bytes: ", ErrnoText(errno)));
              }
              const uintptr_t base = reinterpret_cast<uintptr_t>(raw);
              const uintptr_t aligned = (base + kHuge - 1) / kHuge * kHuge;
              if (aligned > base) munmap(raw, aligned - base);
              if (const uintptr_t end = base + len + kHuge; end > aligned + len) {
                munmap(reinterpret_cast<void*>(aligned + len), end - (aligned + len));
              }
              p = reinterpret_cast<void*>(aligned);
              madvise(p, len, MADV_HUGEPAGE);  // a hint: without THP the pages stay 4 KiB
            }
            if (madvise(p, len, MADV_POPULATE_WRITE) != 0) {
              const int err = errno;
              if (err != EINVAL) {  // out of memory, say: an error, not the OOM killer's page faults
                munmap(p, len);
                return absl::ResourceExhaustedError(absl::StrCat("populating ", len, " bytes: ", ErrnoText(err)));
              }
              volatile char* c = static_cast<volatile char*>(p);  // a kernel before 5.14
              for (size_t off = 0; off < len; off += 4096) c[off] = 0;
            }
            if (cudaError_t e = cudaHostRegister(p, len, cudaHostRegisterMapped | cudaHostRegisterPortable);
                e != cudaSuccess) {
              munmap(p, len);
              return absl::ResourceExhaustedError(
                  absl::StrCat("cudaHostRegister of ", len, " bytes: ", cudaGetErrorString(e)));
            }
            void* dev = nullptr;
            if (cudaHostGetDevicePointer(&dev, p, 0) != cudaSuccess || dev != p) {
              cudaHostUnregister(p);
              munmap(p, len);
              return absl::FailedPreconditionError("registered memory is not addressable at the same pointer on the GPU");
            }
            absl::MutexLock lock(&maps->mu);
            maps->length[p] = len;
            return p;
          },
          [maps](void* p) {
            size_t len = 0;
            {
              absl::MutexLock lock(&maps->mu);
              auto it = maps->length.find(p);
              if (it == maps->length.end()) return;
              len = it->second;
              maps->length.erase(it);
            }
            cudaHostUnregister(p);
            munmap(p, len);
          }};
}

absl::StatusOr<HostAllocator> HostAllocatorNamed(const std::string& name) {
  if (name == "pinned") return PinnedHostAllocator();
  if (name == "hugepages") return HugePageHostAllocator();
  return absl::InvalidArgumentError(absl::StrCat("host memory \"", name, "\": expected pinned or hugepages"));
}

cudaError_t GatherUnits(const std::byte* const* src, const int32_t* dst_slots, int count, size_t unit_bytes,
                        std::byte* pool, int num_sms, cudaStream_t stream) {
  if (count <= 0) return cudaSuccess;
  if (unit_bytes % 512 != 0) return cudaErrorInvalidValue;
  // Two CTAs of 8 warps per SM keep ~16 units per SM in flight: enough for the PCIe link.
  const int blocks = std::max(1, std::min((count + 7) / 8, 2 * num_sms));
  switch (unit_bytes) {
    case 4096: GatherKernel<8><<<blocks, kThreads, 0, stream>>>(src, dst_slots, count, unit_bytes, pool, {}); break;
    case 8192: GatherKernel<16><<<blocks, kThreads, 0, stream>>>(src, dst_slots, count, unit_bytes, pool, {}); break;
    default: GatherKernelAnySize<<<blocks, kThreads, 0, stream>>>(src, dst_slots, count, unit_bytes, pool); break;
  }
  return cudaGetLastError();
}

absl::StatusOr<std::unique_ptr<CudaCopyEngine>> CudaCopyEngine::Create(std::byte* pool, size_t unit_bytes,
                                                                       int num_layers, int max_transfers) {
  std::unique_ptr<CudaCopyEngine> e(new CudaCopyEngine());
  e->pool_ = pool;
  e->unit_bytes_ = unit_bytes;
  e->max_transfers_ = max_transfers;
  auto check = [](cudaError_t err, const char* what) -> absl::Status {
    if (err == cudaSuccess) return absl::OkStatus();
    return absl::InternalError(absl::StrCat("copy engine: ", what, ": ", cudaGetErrorString(err)));
  };
  int dev = 0;
  absl::Status s;
  if (!(s = check(cudaGetDevice(&dev), "cudaGetDevice")).ok()) return s;
  if (!(s = check(cudaDeviceGetAttribute(&e->num_sms_, cudaDevAttrMultiProcessorCount, dev), "SM count")).ok()) return s;
  // Highest priority, so a layer's gather is scheduled ahead of attention CTAs waiting for SMs
  // (how much of the copy it hides: docs/BENCHMARKS.md, the host tier).
  int least = 0, greatest = 0;
  if (!(s = check(cudaDeviceGetStreamPriorityRange(&least, &greatest), "priority range")).ok()) return s;
  if (!(s = check(cudaStreamCreateWithPriority(&e->stream_, cudaStreamNonBlocking, greatest), "stream")).ok()) return s;
  e->layer_events_.resize(num_layers);
  for (cudaEvent_t& ev : e->layer_events_) {
    if (!(s = check(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming), "event")).ok()) return s;
  }
  if (!(s = check(cudaEventCreateWithFlags(&e->upload_done_, cudaEventDisableTiming), "event")).ok()) return s;
  if (!(s = check(cudaMallocHost(&e->host_src_, sizeof(void*) * max_transfers), "staging")).ok()) return s;
  if (!(s = check(cudaMallocHost(&e->host_slots_, sizeof(int32_t) * max_transfers), "staging")).ok()) return s;
  if (!(s = check(cudaMalloc(&e->dev_src_, sizeof(void*) * max_transfers), "transfer list")).ok()) return s;
  if (!(s = check(cudaMalloc(&e->dev_slots_, sizeof(int32_t) * max_transfers), "transfer list")).ok()) return s;
  if (!(s = check(cudaMalloc(&e->counters_, sizeof(unsigned long long) * num_layers), "layer counters")).ok()) return s;
  if (!(s = check(cudaMemset(e->counters_, 0, sizeof(unsigned long long) * num_layers), "layer counters")).ok()) return s;
  if (!(s = check(cudaMalloc(&e->dev_layer_begin_, sizeof(int32_t) * (num_layers + 1)), "layer list")).ok()) return s;
  if (!(s = check(cudaMallocHost(&e->host_layer_begin_, sizeof(int32_t) * (num_layers + 1)), "layer list")).ok()) return s;
  e->targets_.assign(num_layers, 0);
  e->moved_.assign(num_layers, false);
  // Stream memory operations come from the driver; without them the engine keeps to events.
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult found{};
  if (cudaGetDriverEntryPointByVersion("cuStreamWaitValue64", &fn, 12000, cudaEnableDefault, &found) == cudaSuccess &&
      found == cudaDriverEntryPointSuccess && fn != nullptr) {
    e->wait_value_ = fn;
  }
  return e;
}

CudaCopyEngine::~CudaCopyEngine() {
  if (stream_ != nullptr) cudaStreamSynchronize(stream_);
  for (cudaEvent_t ev : layer_events_) cudaEventDestroy(ev);
  if (upload_done_ != nullptr) cudaEventDestroy(upload_done_);
  cudaFreeHost(host_src_);
  cudaFreeHost(host_slots_);
  cudaFree(dev_src_);
  cudaFree(dev_slots_);
  cudaFree(counters_);
  cudaFree(dev_layer_begin_);
  cudaFreeHost(host_layer_begin_);
  if (stream_ != nullptr) cudaStreamDestroy(stream_);
}

absl::Status CudaCopyEngine::UploadList(const std::vector<Transfer>& transfers) {
  const int n = static_cast<int>(transfers.size());
  if (n > max_transfers_) {
    return absl::InvalidArgumentError(absl::StrCat("plan of ", n, " transfers exceeds the engine's ", max_transfers_));
  }
  // The staging buffers may still feed the previous upload.
  cudaError_t err = cudaEventSynchronize(upload_done_);
  for (int i = 0; i < n && err == cudaSuccess; ++i) {
    host_src_[i] = transfers[i].src;
    host_slots_[i] = transfers[i].slot;
  }
  if (err == cudaSuccess && n > 0) err = cudaMemcpyAsync(dev_src_, host_src_, sizeof(void*) * n, cudaMemcpyHostToDevice, stream_);
  if (err == cudaSuccess && n > 0) err = cudaMemcpyAsync(dev_slots_, host_slots_, sizeof(int32_t) * n, cudaMemcpyHostToDevice, stream_);
  if (err == cudaSuccess) err = cudaEventRecord(upload_done_, stream_);
  if (err != cudaSuccess) return absl::InternalError(absl::StrCat("copy engine upload: ", cudaGetErrorString(err)));
  return absl::OkStatus();
}

absl::Status CudaCopyEngine::Upload(const PrefetchPlan& plan) {
  if (plan.layer_begin.size() != layer_events_.size() + 1) {
    return absl::InvalidArgumentError("plan and engine disagree on the number of layers");
  }
  if (absl::Status s = UploadList(plan.transfers); !s.ok()) return s;
  // The layer list too, for LaunchSignalled (UploadList waited for the last one to leave the
  // staging).
  for (size_t l = 0; l < plan.layer_begin.size(); ++l) host_layer_begin_[l] = plan.layer_begin[l];
  cudaError_t err = cudaMemcpyAsync(dev_layer_begin_, host_layer_begin_, sizeof(int32_t) * plan.layer_begin.size(),
                                    cudaMemcpyHostToDevice, stream_);
  if (err == cudaSuccess) err = cudaEventRecord(upload_done_, stream_);
  if (err != cudaSuccess) return absl::InternalError(absl::StrCat("copy engine upload: ", cudaGetErrorString(err)));
  return absl::OkStatus();
}

absl::Status CudaCopyEngine::Fetch(const AppendPlan& plan) {
  if (absl::Status s = UploadList(plan.fetch); !s.ok()) return s;
  const cudaError_t err = GatherUnits(dev_src_, dev_slots_, static_cast<int>(plan.fetch.size()), unit_bytes_, pool_,
                                      num_sms_, stream_);
  if (err != cudaSuccess) return absl::InternalError(absl::StrCat("copy engine fetch: ", cudaGetErrorString(err)));
  return absl::OkStatus();
}

absl::Status CudaCopyEngine::Flush(const AppendPlan& plan) {
  if (absl::Status s = UploadList(plan.flush); !s.ok()) return s;
  // dev_src_ holds the host units, the destinations here.
  const cudaError_t err = ScatterUnits(dev_slots_, const_cast<std::byte* const*>(reinterpret_cast<const std::byte* const*>(dev_src_)),
                                       static_cast<int>(plan.flush.size()), unit_bytes_, pool_, num_sms_, stream_);
  if (err != cudaSuccess) return absl::InternalError(absl::StrCat("copy engine flush: ", cudaGetErrorString(err)));
  return absl::OkStatus();
}

absl::Status CudaCopyEngine::LaunchGroup(int begin, int count, int first_layer, int end_layer) {
  cudaError_t err = GatherUnits(dev_src_ + begin, dev_slots_ + begin, count, unit_bytes_, pool_, num_sms_, stream_);
  for (int layer = first_layer; layer < end_layer && err == cudaSuccess; ++layer) {
    err = cudaEventRecord(layer_events_[layer], stream_);
  }
  if (err != cudaSuccess) {
    return absl::InternalError(absl::StrCat("copy engine layers ", first_layer, "-", end_layer - 1, ": ", cudaGetErrorString(err)));
  }
  return absl::OkStatus();
}

absl::Status CudaCopyEngine::LaunchLayer(const PrefetchPlan& plan, int layer) {
  if (layer < 0 || layer >= static_cast<int>(layer_events_.size())) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " outside the engine's ", layer_events_.size()));
  }
  const int first = plan.layer_begin[layer], count = plan.layer_begin[layer + 1] - first;
  signalled_ = false;
  return LaunchGroup(first, count, layer, layer + 1);
}

absl::Status CudaCopyEngine::LaunchLayers(const PrefetchPlan& plan) {
  const int layers = static_cast<int>(layer_events_.size());
  if (plan.layer_begin.size() != layer_events_.size() + 1) {
    return absl::InvalidArgumentError("plan and engine disagree on the number of layers");
  }
  signalled_ = false;
  for (int first = 0; first < layers;) {
    int end = first + 1;
    while (end < layers && plan.layer_begin[end] - plan.layer_begin[first] < min_launch_units_) ++end;
    const int begin = plan.layer_begin[first];
    if (absl::Status s = LaunchGroup(begin, plan.layer_begin[end] - begin, first, end); !s.ok()) return s;
    first = end;
  }
  return absl::OkStatus();
}

absl::Status CudaCopyEngine::LaunchSignalled(const PrefetchPlan& plan) {
  const int layers = static_cast<int>(layer_events_.size());
  if (plan.layer_begin.size() != layer_events_.size() + 1) {
    return absl::InvalidArgumentError("plan and engine disagree on the number of layers");
  }
  if (wait_value_ == nullptr) return LaunchLayers(plan);
  cudaError_t err = cudaSuccess;
  const int count = plan.layer_begin[layers];
  if (err == cudaSuccess && count > 0) {
    if (unit_bytes_ % 512 != 0) return absl::InvalidArgumentError("unit size is not a multiple of 512 bytes");
    const int blocks = std::max(1, std::min((count + 7) / 8, signal_ctas_));
    const LayerCounts counts{.layer_begin = dev_layer_begin_, .num_layers = layers, .counters = counters_};
    switch (unit_bytes_) {
      case 4096:
        GatherKernel<8><<<blocks, kThreads, 0, stream_>>>(dev_src_, dev_slots_, count, unit_bytes_, pool_, counts);
        break;
      case 8192:
        GatherKernel<16><<<blocks, kThreads, 0, stream_>>>(dev_src_, dev_slots_, count, unit_bytes_, pool_, counts);
        break;
      default:
        return LaunchLayers(plan);  // other sizes: per-layer launches and events
    }
    err = cudaGetLastError();
  }
  for (int l = 0; l < layers && err == cudaSuccess; ++l) {
    moved_[l] = plan.layer_begin[l + 1] > plan.layer_begin[l];
    targets_[l] += static_cast<uint64_t>(plan.layer_begin[l + 1] - plan.layer_begin[l]);
    err = cudaEventRecord(layer_events_[l], stream_);  // after the whole gather: for callers of layer_done
  }
  if (err != cudaSuccess) return absl::InternalError(absl::StrCat("copy engine signalled gather: ", cudaGetErrorString(err)));
  signalled_ = true;
  return absl::OkStatus();
}

absl::Status CudaCopyEngine::WaitLayer(cudaStream_t stream, int layer) {
  if (layer < 0 || layer >= static_cast<int>(layer_events_.size())) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " outside the engine's ", layer_events_.size()));
  }
  if (!signalled_) {
    const cudaError_t err = cudaStreamWaitEvent(stream, layer_events_[layer], 0);
    if (err != cudaSuccess) return absl::InternalError(absl::StrCat("prefetch wait: ", cudaGetErrorString(err)));
    return absl::OkStatus();
  }
  // A layer the launch moved nothing for: its earlier units were waited for by earlier steps, so
  // no event is recorded for it (a cross-stream wait is not free).
  if (!moved_[layer]) return absl::OkStatus();
  using WaitValue64 = CUresult (*)(CUstream, CUdeviceptr, cuuint64_t, unsigned int);
  const CUresult r = reinterpret_cast<WaitValue64>(wait_value_)(
      reinterpret_cast<CUstream>(stream), reinterpret_cast<CUdeviceptr>(counters_ + layer), targets_[layer],
      CU_STREAM_WAIT_VALUE_GEQ);
  if (r != CUDA_SUCCESS) return absl::InternalError(absl::StrCat("cuStreamWaitValue64 failed: ", static_cast<int>(r)));
  return absl::OkStatus();
}

absl::Status CudaCopyEngine::Launch(const PrefetchPlan& plan) {
  return signal_ ? LaunchSignalled(plan) : LaunchLayers(plan);
}

absl::Status CudaCopyEngine::Execute(const PrefetchPlan& plan) {
  if (absl::Status s = Upload(plan); !s.ok()) return s;
  return Launch(plan);
}

}  // namespace scout::kvstore
