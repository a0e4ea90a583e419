#include "runtime/cuda_step_graphs.h"

#include <algorithm>

namespace scout::runtime::cuda {
namespace {

void Destroy(StepGraph& g) {
  if (g.done != nullptr) {
    cudaEventSynchronize(g.done);
    cudaEventDestroy(g.done);
  }
  if (g.exec != nullptr) cudaGraphExecDestroy(g.exec);
}

}  // namespace

StepGraphs::~StepGraphs() {
  for (auto& g : shapes_) Destroy(*g);
  for (auto& g : numbered_) Destroy(*g);
}

absl::StatusOr<StepGraph*> StepGraphs::ForShape(const std::string& key, bool* replay) {
  ++clock_;
  for (auto& g : shapes_) {
    if (g->key == key && g->exec != nullptr) {
      g->last_use = clock_;
      *replay = true;
      SCOUT_RETURN_IF_CUDA(cudaEventSynchronize(g->done), "step graph wait");
      return g.get();
    }
  }
  *replay = false;
  if (shapes_.size() >= kMaxShapes) {
    auto oldest = std::min_element(shapes_.begin(), shapes_.end(),
                                   [](const auto& a, const auto& b) { return a->last_use < b->last_use; });
    Destroy(**oldest);
    shapes_.erase(oldest);
  }
  auto g = std::make_unique<StepGraph>();
  g->key = key;
  g->last_use = clock_;
  SCOUT_RETURN_IF_CUDA(cudaEventCreateWithFlags(&g->done, cudaEventDisableTiming), "step graph event");
  shapes_.push_back(std::move(g));
  return shapes_.back().get();
}

void StepGraphs::DropShape(StepGraph* g) {
  auto it = std::find_if(shapes_.begin(), shapes_.end(), [g](const auto& p) { return p.get() == g; });
  if (it == shapes_.end()) return;
  Destroy(**it);
  shapes_.erase(it);
}

StepGraph* StepGraphs::NewNumbered() {
  numbered_.push_back(std::make_unique<StepGraph>());
  return numbered_.back().get();
}

void StepGraphs::DropFailedNumbered() {
  if (!numbered_.empty() && numbered_.back()->exec == nullptr) numbered_.pop_back();
}

StepGraph* StepGraphs::Numbered(int id) const {
  return id >= 0 && id < numbered() ? numbered_[id].get() : nullptr;
}

absl::Status StepGraphs::EndCapture(cudaStream_t stream, StepGraph* g, uint64_t generation, absl::Status status) {
  cudaGraph_t graph = nullptr;
  const cudaError_t end = cudaStreamEndCapture(stream, &graph);
  if (status.ok() && end != cudaSuccess) status = CudaStatus(end, "graph capture");
  if (status.ok()) {
    const cudaError_t inst = cudaGraphInstantiate(&g->exec, graph, 0);
    if (inst != cudaSuccess) status = CudaStatus(inst, "graph instantiate");
  }
  if (graph != nullptr) cudaGraphDestroy(graph);
  g->generation = generation;
  return status;
}

}  // namespace scout::runtime::cuda
