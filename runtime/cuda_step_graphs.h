// Internal to the CUDA backend: steps kept as CUDA graphs. Two kinds: graphs kept per step
// shape (DeviceStepOptions::use_graph: captured on a shape's first step, replayed with refilled
// index arrays after, the least recently used dropped past a bound) and numbered captures
// (CudaModel::CaptureForward / Replay). Each graph owns its staging copy and index buffer, so
// later steps cannot disturb it; it shares the layer stack's activation buffers and is valid
// while they are not reallocated (its generation). Not thread-safe.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "runtime/cuda_buffers.h"

namespace scout::runtime::cuda {

struct StepGraph {
  cudaGraphExec_t exec = nullptr;  // null until captured
  PinnedBuffer staging;
  DeviceBuffer index;
  uint64_t generation = 0;  // the layer stack's generation at capture
  // Kept per shape only:
  std::string key;
  cudaEvent_t done = nullptr;  // its last launch (and so its staging upload) has run
  uint64_t last_use = 0;
};

class StepGraphs {
 public:
  StepGraphs() = default;
  StepGraphs(const StepGraphs&) = delete;
  StepGraphs& operator=(const StepGraphs&) = delete;
  ~StepGraphs();

  // The graph kept for `key` (everything a launch bakes in): *replay = true when it was
  // captured before, after waiting for its last launch so its staging may be rewritten; else
  // a new entry to capture into (past kMaxShapes, the least recently used goes).
  absl::StatusOr<StepGraph*> ForShape(const std::string& key, bool* replay);
  // Drops a kept entry (its capture failed).
  void DropShape(StepGraph* g);
  // A new numbered entry to capture into; its id is numbered() - 1.
  StepGraph* NewNumbered();
  // Drops the last numbered entry if its capture failed.
  void DropFailedNumbered();
  StepGraph* Numbered(int id) const;
  int numbered() const { return static_cast<int>(numbered_.size()); }

  // Ends the capture begun on `stream` into g, and instantiates it unless `status` (the
  // enqueueing's) is an error; returns the first error.
  static absl::Status EndCapture(cudaStream_t stream, StepGraph* g, uint64_t generation, absl::Status status);

  int64_t captures = 0, replays = 0;  // of kept graphs
  static constexpr size_t kMaxShapes = 48;

 private:
  std::vector<std::unique_ptr<StepGraph>> shapes_, numbered_;
  uint64_t clock_ = 0;
};

}  // namespace scout::runtime::cuda
