// `scout serve`: the OpenAI-compatible server on one machine.
#include "cli/commands.h"

#include <cstdio>
#include <string>

#include "runtime/backend_factory.h"
#ifdef SCOUT_HAVE_CUDA
#include <cuda_runtime.h>

#include "runtime/cuda_model.h"
#endif
#ifdef SCOUT_HAVE_NCCL
#include "runtime/tensor_parallel.h"
#endif

#include <csignal>

namespace scout::cli {

int Serve(int argc, char** argv) {
  Flags flags(FrontEndFlags(WithHostTierFlags({
      {"model", "", "model folder"},
      {"draft", "", "draft model folder: speculative decoding when given"},
      {"device", "cpu", "backend of the model: cpu, cuda or cuda:N"},
      {"draft-device", "", "backend of the draft (default: --device)"},
      {"tensor-parallel-size", "1", "cuda: split the model over this many GPUs (NCCL)"},
      {"target-devices", "", "cuda: the model's GPUs, comma-separated"},
      {"kv-cache-tokens", "0", "KV pool of each model in tokens (0: 4 x max_position_embeddings)"},
  })));
  if (absl::Status s = flags.Parse(argc, argv); !s.ok()) return Fail(s);
  if (flags.GetBool("help")) {
    std::printf("usage: scout serve --model DIR [flags]\n%s", flags.Help().c_str());
    return 0;
  }
  if (flags.Get("model").empty()) return Fail(absl::InvalidArgumentError("--model is required"));
  const sigset_t signals = BlockStopSignals();
  absl::StatusOr<int64_t> tp = flags.GetInt("tensor-parallel-size");
  if (!tp.ok()) return Fail(tp.status());
  absl::StatusOr<HostTierFlags> tier = ParseHostTier(flags);
  if (!tier.ok()) return Fail(tier.status());
  absl::StatusOr<int64_t> kv_tokens = flags.GetInt("kv-cache-tokens");
  if (!kv_tokens.ok()) return Fail(kv_tokens.status());
  if (*kv_tokens < 0) return Fail(absl::InvalidArgumentError("--kv-cache-tokens must be >= 0"));
  const bool split = *tp > 1 || !flags.Get("target-devices").empty();
  absl::StatusOr<std::unique_ptr<runtime::ModelBackend>> model =
      split ? runtime::LoadTensorParallel(flags.Get("model"), static_cast<int>(*tp), flags.Get("target-devices"), *kv_tokens, *tier)
            : runtime::LoadBackend(flags.Get("model"), flags.Get("device"), *kv_tokens, *tier);
  if (!model.ok()) return Fail(model.status());
  std::unique_ptr<runtime::ModelBackend> draft;
  if (!flags.Get("draft").empty()) {
    const std::string draft_device = flags.Get("draft-device").empty() ? flags.Get("device") : flags.Get("draft-device");
    absl::StatusOr<std::unique_ptr<runtime::ModelBackend>> d = runtime::LoadBackend(flags.Get("draft"), draft_device, *kv_tokens);
    if (!d.ok()) return Fail(d.status());
    draft = std::move(*d);
  }
  return RunFrontEnd(flags, signals, std::move(*model), std::move(draft));
}

}  // namespace scout::cli
