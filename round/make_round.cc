#include <memory>

#include "round/speculative.h"
#ifdef SCOUT_HAVE_CUDA
#include "round/cuda_round.h"
#include "runtime/cuda_model.h"
#endif

namespace scout::round {

std::unique_ptr<SpeculativeRound> MakeRound(ModelBackend& target, ModelBackend& draft) {
#ifdef SCOUT_HAVE_CUDA
  auto* t = dynamic_cast<runtime::CudaModel*>(&target);
  auto* d = dynamic_cast<runtime::CudaModel*>(&draft);
  if (t != nullptr && d != nullptr) return std::make_unique<CudaRound>(*t, *d);
#endif
  return std::make_unique<HostRound>(target, draft);
}

}  // namespace scout::round
