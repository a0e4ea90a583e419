// The seam between the decoding loop and whatever runs the model (CPU now, CUDA later).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/sampling.h"
#include "kvstore/block_table.h"
#include "kvstore/prefetch_planner.h"
#include "runtime/model_config.h"
#include "runtime/sts.h"

namespace scout::runtime {

using kvstore::SequenceId;

// New tokens of one sequence for one forward pass; they are appended at its current length.
struct SequenceInput {
  SequenceId seq = 0;
  std::span<const int32_t> tokens;
  bool all_logits = false;  // a row of logits for every new token; otherwise only for the last
  // Optional: per (layer, KV head), the ascending logical blocks this pass's attention reads
  // (STS: the target verifying the draft's tokens). Blocks of the new tokens must be listed for
  // them to see themselves. nullptr: dense.
  const kvstore::Selection* selection = nullptr;
  // Optional output: the attention probability each new token puts on each block, per layer and
  // query head: [layers][heads][tokens.size()][ceil(length after this pass / 16)]. The draft's
  // signal for STS, and the oracle's for evaluation.
  std::vector<float>* block_mass = nullptr;
  // Optional, when selection is null: Quest-style selection made inside the pass. Per layer and
  // KV head, each block is scored by the upper bound of q . k its per-dimension key minima and
  // maxima allow (max over the KV head's query heads and the new rows), and the top blocks are
  // kept within the budget, sinks and window forced. The lists used are written to
  // quest_selection if it is not null.
  const StsBudget* quest_budget = nullptr;
  kvstore::Selection* quest_selection = nullptr;
  // Optional: SANTA value sampling (kernels/santa.h) in this pass's attention, > 0 value rows
  // drawn per (KV head, 16 query rows); seeded by santa_seed and the layer. The CUDA backend
  // takes one sample count per pass (InvalidArgument when the inputs differ) and the first
  // input's seed.
  int santa_samples = 0;
  uint64_t santa_seed = 0;
};

// One (layer, KV head, 16-token logical block) of a sequence's KV.
struct KvUnitRef {
  int32_t layer = 0;
  int32_t head = 0;
  int32_t block = 0;
};

// A ResourceExhausted status carrying this payload says a step did not fit the GPU block cache of
// a host KV tier: the KV itself is safe in host memory, so a server can run the step without its
// newest sequences and bring them back once the others finish (preemption), instead of failing.
inline constexpr absl::string_view kGpuBlockCacheFullPayload = "scout.dev/gpu-block-cache-full";

// A pass that failed because of one sequence alone (its KV could not be read: the KV store node
// holding it is gone) carries this payload, the sequence's id in decimal: a server fails that
// sequence's request and runs the others again.
inline constexpr absl::string_view kFailedSequencePayload = "scout.dev/failed-sequence";

// What a host KV tier did since the model was made, in (layer, KV head, 16-token block) units.
struct HostKvTierStats {
  bool enabled = false;
  int64_t steps = 0;
  int64_t unit_hits = 0;        // selected units the GPU cache already held
  int64_t unit_misses = 0;      // selected units moved host -> GPU
  int64_t bytes_prefetched = 0;
  int64_t bytes_flushed = 0;    // new tokens' units written back GPU -> host
  double prefetch_seconds = 0;  // GPU time of the host -> GPU transfers (achieved bandwidth: bytes / this)
  double plan_ms = 0;           // host time spent planning
  int64_t cache_units_used = 0;  // the GPU block cache now
  int64_t cache_units_total = 0;
};

// A model with a paged KV cache holding any number of sequences. Not thread-safe: one caller.
class ModelBackend {
 public:
  virtual ~ModelBackend() = default;
  virtual const ModelConfig& config() const = 0;

  // AlreadyExists if the id is in use.
  virtual absl::Status AddSequence(SequenceId seq) = 0;
  // Frees the sequence's KV. NotFound if unknown.
  virtual absl::Status ReleaseSequence(SequenceId seq) = 0;
  // Forgets tokens at positions >= num_tokens (rollback of rejected speculative tokens).
  virtual absl::Status TruncateSequence(SequenceId seq, int64_t num_tokens) = 0;
  virtual absl::StatusOr<int64_t> SequenceLength(SequenceId seq) const = 0;

  // One pass over the new tokens of every sequence in `batch` (distinct sequences, at least one
  // token each), appending their keys and values. `logits` receives vocab_size floats per row:
  // rows follow the batch order, tokens.size() rows for an all_logits sequence, else one.
  // All or nothing: on error no sequence changes. InvalidArgument for a bad token id, an empty
  // or duplicated input; OutOfRange past max_position_embeddings; ResourceExhausted when the KV
  // pool cannot hold the new tokens; NotFound for an unknown sequence.
  virtual absl::Status Forward(std::span<const SequenceInput> batch, std::vector<float>* logits) = 0;

  // Blocks of the KV pool in use and in all (each block: 16 tokens of every layer and KV head).
  struct KvCacheUsage {
    int64_t used_blocks = 0;
    int64_t total_blocks = 0;
  };
  virtual KvCacheUsage kv_cache_usage() const = 0;

  // Backends that keep the KV in a host-memory store and cache blocks on the GPU (the CUDA
  // backend's host KV tier) say what the tier did; others return zeros (enabled = false).
  virtual HostKvTierStats host_tier_stats() const { return {}; }

  // Moving a sequence's KV between processes (a cluster worker persists it to a KV store node,
  // and another adopts it after a failure). A unit is one (layer, KV head, 16-token block): its
  // 16 keys then its 16 values, kv_unit_bytes() bytes in the backend's own element type; units
  // go in (block, layer, KV head) order. 0: this backend cannot (a cluster rebuilds its
  // sequences from their tokens instead).
  virtual size_t kv_unit_bytes() const { return 0; }
  // Copies blocks [first_block, first_block + num_blocks) of the sequence to out (num_blocks *
  // layers * KV heads units). NotFound for an unknown sequence, OutOfRange past its blocks.
  virtual absl::Status ExportKv(SequenceId seq, int64_t first_block, int64_t num_blocks, std::byte* out) const {
    return absl::UnimplementedError("this backend cannot export its KV");
  }
  // An existing, empty sequence takes num_tokens tokens whose KV is `data` (all units of blocks
  // [0, ceil(num_tokens / 16))). FailedPrecondition if it is not empty; ResourceExhausted, with
  // nothing changed, when the pool cannot hold them. data == nullptr reserves the tokens and
  // leaves their KV unset: the caller fills each unit with WriteKvUnits before a pass reads it
  // (a cluster worker fetching a sequence's KV from its home lazily, as steps need it).
  virtual absl::Status ImportKv(SequenceId seq, int64_t num_tokens, const std::byte* data) {
    return absl::UnimplementedError("this backend cannot import KV");
  }
  // Overwrites single units of blocks the sequence holds: units[i]'s bytes at data + i *
  // kv_unit_bytes(). NotFound for an unknown sequence; OutOfRange for a layer, KV head or block
  // past it, with nothing written.
  virtual absl::Status WriteKvUnits(SequenceId seq, std::span<const KvUnitRef> units, const std::byte* data) {
    return absl::UnimplementedError("this backend cannot import KV");
  }

  // Whether this model's calls may run on one thread while `other`'s run on another (a draft's
  // prefill beside the target's): models that share no device and no state. Default false.
  virtual bool concurrent_with(const ModelBackend& other) const { return false; }

  // Sampling on the device: Forward, then per logit row the token drawn with that row's params
  // (kernels/sampling.h: the host Sampler's distribution, drawn from the row's seed alone), so
  // only the tokens come back. Backends that cannot say false and return Unimplemented.
  virtual bool samples_on_device() const { return false; }
  virtual absl::Status ForwardSampled(std::span<const SequenceInput> batch,
                                      std::span<const kernels::SampleRowParams> rows, std::vector<int32_t>* tokens) {
    return absl::UnimplementedError("this backend samples on the host");
  }
  // After ForwardSampled: the logit rows `rows` of that pass (for a request's logprobs), copied
  // to out ([rows.size()][vocab]), valid until the next pass. OutOfRange for a row the pass did
  // not have; Unimplemented where the logits are not kept.
  virtual absl::Status LastLogitRows(std::span<const int64_t> rows, std::vector<float>* out) const {
    return absl::UnimplementedError("this backend does not keep a pass's logits (logprobs)");
  }
  // Whether LastLogitRows works after ForwardSampled (backends that sample on the host return
  // logits from every pass anyway).
  virtual bool keeps_logit_rows() const { return false; }
};

}  // namespace scout::runtime
