#include "runtime/tensor_parallel.h"

#include <nccl.h>

#include <set>
#include <thread>

#include "absl/strings/str_cat.h"

namespace scout::runtime {

absl::StatusOr<std::unique_ptr<TensorParallelModel>> TensorParallelModel::Load(const std::filesystem::path& model_dir,
                                                                               const TensorParallelOptions& options) {
  absl::StatusOr<Checkpoint> ckpt = LoadCheckpoint(model_dir);
  if (!ckpt.ok()) return ckpt.status();
  return Create(ckpt->config, ckpt->weights, options);
}

absl::StatusOr<std::unique_ptr<TensorParallelModel>> TensorParallelModel::Create(const ModelConfig& config,
                                                                                 const LlamaWeights& weights,
                                                                                 const TensorParallelOptions& options) {
  const int n = static_cast<int>(options.devices.size());
  if (n < 1) return absl::InvalidArgumentError("tensor parallelism needs at least one device");
  if (std::set<int>(options.devices.begin(), options.devices.end()).size() != options.devices.size()) {
    return absl::InvalidArgumentError("tensor-parallel devices repeat");
  }
  for (auto [v, what] : {std::pair{config.num_attention_heads, "num_attention_heads"},
                         std::pair{config.num_key_value_heads, "num_key_value_heads"},
                         std::pair{config.intermediate_size, "intermediate_size"}}) {
    if (v % n != 0) {
      return absl::InvalidArgumentError(absl::StrCat("--tensor-parallel-size ", n, " does not divide ", what, " = ", v));
    }
  }
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) count = 0;
  for (int d : options.devices) {
    if (d < 0 || d >= count) {
      return absl::UnavailableError(absl::StrCat("tensor parallelism over device ", d, ": ", count, " GPUs present"));
    }
  }
  auto m = std::unique_ptr<TensorParallelModel>(new TensorParallelModel());
  if (n > 1) {
    std::vector<ncclComm_t> comms(n);
    if (ncclResult_t r = ncclCommInitAll(comms.data(), n, options.devices.data()); r != ncclSuccess) {
      return absl::InternalError(absl::StrCat("ncclCommInitAll: ", ncclGetErrorString(r)));
    }
    m->comms_.assign(comms.begin(), comms.end());
  }
  for (int i = 0; i < n; ++i) {
    absl::StatusOr<std::unique_ptr<CudaModel>> shard = CudaModel::Create(
        config, weights,
        {.device = options.devices[i], .kv_budget_tokens = options.kv_budget_tokens, .tp_rank = i, .tp_size = n,
         .nccl_comm = n > 1 ? m->comms_[i] : nullptr, .host_kv_tokens = options.host_kv_tokens,
         .gpu_cache_units = options.gpu_cache_units, .host_kv_memory = options.host_kv_memory});
    if (!shard.ok()) return shard.status();
    m->shards_.push_back(std::move(*shard));
  }
  return m;
}

HostKvTierStats TensorParallelModel::host_tier_stats() const {
  HostKvTierStats sum;
  for (const auto& shard : shards_) {
    const HostKvTierStats s = shard->host_tier_stats();
    sum.enabled = s.enabled;
    sum.steps = s.steps;
    sum.unit_hits += s.unit_hits;
    sum.unit_misses += s.unit_misses;
    sum.bytes_prefetched += s.bytes_prefetched;
    sum.bytes_flushed += s.bytes_flushed;
    sum.prefetch_seconds = std::max(sum.prefetch_seconds, s.prefetch_seconds);  // the shards move in parallel
    sum.plan_ms = std::max(sum.plan_ms, s.plan_ms);
    sum.cache_units_used += s.cache_units_used;
    sum.cache_units_total += s.cache_units_total;
  }
  return sum;
}

TensorParallelModel::~TensorParallelModel() {
  shards_.clear();
  for (void* c : comms_) ncclCommDestroy(static_cast<ncclComm_t>(c));
}

template <typename Op>
absl::Status TensorParallelModel::ForEachShard(Op op) {
  absl::Status first;
  for (auto& s : shards_) {
    absl::Status st = op(*s);
    if (first.ok() && !st.ok()) first = st;
  }
  return first;
}

absl::Status TensorParallelModel::AddSequence(SequenceId seq) {
  return ForEachShard([&](CudaModel& s) { return s.AddSequence(seq); });
}
absl::Status TensorParallelModel::ReleaseSequence(SequenceId seq) {
  return ForEachShard([&](CudaModel& s) { return s.ReleaseSequence(seq); });
}
absl::Status TensorParallelModel::TruncateSequence(SequenceId seq, int64_t num_tokens) {
  return ForEachShard([&](CudaModel& s) { return s.TruncateSequence(seq, num_tokens); });
}

absl::Status TensorParallelModel::Forward(std::span<const SequenceInput> batch, std::vector<float>* logits) {
  if (shards_.size() == 1) return shards_.front()->Forward(batch, logits);
  // The checks that can fail run identically in every shard before any NCCL call, so either
  // all shards enter the all-reduces or none does.
  std::vector<absl::Status> status(shards_.size());
  std::vector<std::vector<float>> other(shards_.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < shards_.size(); ++i) {
    threads.emplace_back([&, i] { status[i] = shards_[i]->Forward(batch, i == 0 ? logits : &other[i]); });
  }
  for (std::thread& t : threads) t.join();
  for (const absl::Status& s : status) {
    if (!s.ok()) return s;
  }
  return absl::OkStatus();
}

}  // namespace scout::runtime
