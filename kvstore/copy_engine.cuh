// The GPU copy engine: moves a prefetch plan's units from pinned, device-mapped host memory into
// the GPU slot pool with a gather kernel (one warp per unit, 16-byte loads straight over PCIe) on
// its own stream: one launch for every layer that counts each layer's units in, so a layer's
// attention waits (WaitLayer) only for its own units; or one launch per layer with events.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kvstore/host_store.h"
#include "kvstore/prefetch_planner.h"

namespace scout::kvstore {

// Host memory that kernels read directly: cudaHostAlloc(Mapped | Portable). Requires unified
// addressing (the device pointer equals the host pointer), which every 64-bit CUDA system has;
// allocation fails with FailedPrecondition otherwise.
HostAllocator PinnedHostAllocator();

// The same contract from 2 MiB pages: each chunk is mapped anonymous (MAP_HUGETLB when the system
// has huge pages reserved, else transparent huge pages asked for with MADV_HUGEPAGE), populated
// (MADV_POPULATE_WRITE, or touched page by page on kernels without it) and then registered
// (cudaHostRegister, Mapped | Portable). Pinning runs over far fewer pages than cudaHostAlloc's,
// so a large store comes up faster; ResourceExhausted naming the step that failed.
HostAllocator HugePageHostAllocator();

// Which of the two a flag names: "pinned" or "hugepages"; InvalidArgument otherwise.
absl::StatusOr<HostAllocator> HostAllocatorNamed(const std::string& name);

// Copies count units: pool[dst_slots[i]] = *src[i], unit_bytes each (a multiple of 512).
// src and dst_slots are device-readable arrays. Returns launch errors.
cudaError_t GatherUnits(const std::byte* const* src, const int32_t* dst_slots, int count, size_t unit_bytes,
                        std::byte* pool, int num_sms, cudaStream_t stream);

// The write-back direction: *dst[i] = pool[src_slots[i]], unit_bytes each (a multiple of 512),
// stores straight into mapped host memory over PCIe.
cudaError_t ScatterUnits(const int32_t* src_slots, std::byte* const* dst, int count, size_t unit_bytes,
                         const std::byte* pool, int num_sms, cudaStream_t stream);

// Runs plans on one stream. Not thread-safe.
class CudaCopyEngine {
 public:
  // pool: num_slots units of unit_bytes on the device. max_transfers bounds one plan.
  static absl::StatusOr<std::unique_ptr<CudaCopyEngine>> Create(std::byte* pool, size_t unit_bytes, int num_layers,
                                                                int max_transfers);
  ~CudaCopyEngine();
  CudaCopyEngine(const CudaCopyEngine&) = delete;
  CudaCopyEngine& operator=(const CudaCopyEngine&) = delete;

  // Uploads the plan's transfer list and launches its gathers (Launch). Asynchronous: a stream
  // waits for layer l's units with WaitLayer (or layer_done(l) after LaunchLayers).
  absl::Status Execute(const PrefetchPlan& plan);
  // Execute in two halves, for callers that interleave other work between layers: Upload once,
  // then Launch (LaunchSignalled, or LaunchLayers with set_signal(false)), or LaunchLayer for
  // each layer in order (each records layer_done(layer)).
  absl::Status Upload(const PrefetchPlan& plan);
  absl::Status Launch(const PrefetchPlan& plan);
  void set_signal(bool on) { signal_ = on; }
  bool signal() const { return signal_; }
  // CTAs of 8 warps the signalled gather runs on (each warp keeps one unit in flight). It stays
  // resident for the whole step, beside the attention kernels that wait for its layers, so it
  // takes no more SMs than the PCIe link needs: 8 CTAs (512 KiB in flight at 8 KiB units) move
  // 2% of a 128k session at 83% of the link and let the attention beside them go fastest; 32 or
  // 264 CTAs moved no faster and slowed the attention (docs/BENCHMARKS.md).
  void set_signal_ctas(int ctas) { signal_ctas_ = std::max(1, ctas); }
  absl::Status LaunchLayer(const PrefetchPlan& plan, int layer);
  // All layers in order, consecutive layers grouped into one gather until a group moves at
  // least min_launch_units() units; every layer's event is recorded after the gather that moves
  // it. Each launch leaves the PCIe link idle while it starts and drains, so small steps go
  // faster in a few launches; the price is that a layer's attention waits for the rest of its
  // group.
  absl::Status LaunchLayers(const PrefetchPlan& plan);
  // One gather for every layer of the plan: each layer's last unit in raises a counter, and
  // WaitLayer makes a stream wait for it (cuStreamWaitValue64), so a layer's attention waits
  // only for its own units without a launch per layer. layer_done events are recorded after the
  // whole gather. Falls back to LaunchLayers where the driver has no stream memory operations
  // or the unit is not 4 or 8 KiB. Call after Upload.
  absl::Status LaunchSignalled(const PrefetchPlan& plan);
  // Makes `stream` wait until the last launch's units of `layer` are in (an event wait after
  // LaunchLayers or LaunchLayer).
  absl::Status WaitLayer(cudaStream_t stream, int layer);
  bool can_signal() const { return wait_value_ != nullptr; }
  // 1 (the default): one gather per layer. Grouping moves a small step's units faster (2% of a
  // 128k session with 90% overlap: 65-70% of the PCIe roofline per layer, 78-85% in groups of
  // 4096 units) but makes each layer's attention wait for its whole group, and a step whose
  // attention runs beside its copies took longer that way (docs/BENCHMARKS.md has the sweep).
  void set_min_launch_units(int units) { min_launch_units_ = std::max(1, units); }
  int min_launch_units() const { return min_launch_units_; }
  // The write path on the engine's stream: Fetch before the kernel that writes the new rows
  // (which must wait for it), Flush after that kernel (order it with an event or the stream).
  absl::Status Fetch(const AppendPlan& plan);
  absl::Status Flush(const AppendPlan& plan);
  cudaEvent_t layer_done(int layer) const { return layer_events_[layer]; }
  cudaStream_t stream() const { return stream_; }

 private:
  CudaCopyEngine() = default;
  // Stages and uploads a transfer list (waiting until the previous upload has left the staging).
  absl::Status UploadList(const std::vector<Transfer>& transfers);

  std::byte* pool_ = nullptr;
  size_t unit_bytes_ = 0;
  int max_transfers_ = 0;
  int num_sms_ = 0;
  int min_launch_units_ = 1;
  // Signalled gathers: per-layer counts of units moved, ever (device), what each reaches once
  // the last launch is done (host), the plan's layer list, and the driver's cuStreamWaitValue64.
  unsigned long long* counters_ = nullptr;
  std::vector<uint64_t> targets_;
  std::vector<bool> moved_;  // per layer: the last signalled launch moved some of its units
  int32_t* dev_layer_begin_ = nullptr;
  int32_t* host_layer_begin_ = nullptr;
  void* wait_value_ = nullptr;
  bool signalled_ = false;  // the last launch was signalled
  bool signal_ = true;      // Launch signals (where it can)
  int signal_ctas_ = 8;
  cudaStream_t stream_ = nullptr;
  // One gather of transfers [begin, begin + count), then the events of layers [first, end).
  absl::Status LaunchGroup(int begin, int count, int first_layer, int end_layer);
  std::vector<cudaEvent_t> layer_events_;
  cudaEvent_t upload_done_ = nullptr;
  // Pinned staging of the transfer list and its device copy.
  const std::byte** host_src_ = nullptr;
  int32_t* host_slots_ = nullptr;
  const std::byte** dev_src_ = nullptr;
  int32_t* dev_slots_ = nullptr;
};

}  // namespace scout::kvstore
