// Speculative token sparsity: the draft's attention, summed per 16-token block, picks the blocks
// each target (layer, KV head) reads while it verifies the draft's tokens.
#pragma once

#include <cstdint>
#include <filesystem>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvstore/prefetch_planner.h"
#include "runtime/model_config.h"

namespace scout::runtime {

// For every target (layer, KV head), the draft attention heads (draft layer * draft heads +
// head, query heads) whose block masses stand for it.
struct HeadMap {
  int target_layers = 0;
  int target_kv_heads = 0;
  int draft_layers = 0;
  int draft_heads = 0;
  std::vector<std::vector<int32_t>> units;  // [target_layers * target_kv_heads]
};

// Proportional depth: target layer L reads draft layer floor(L * draft_layers / target_layers),
// all of its query heads.
HeadMap DefaultHeadMap(const ModelConfig& target, const ModelConfig& draft);

// The draft mapped onto itself: its (layer, KV head) reads the query heads of that KV group in the
// same layer. Drives the sparse draft (its later steps of a round over its own top blocks).
HeadMap SelfHeadMap(const ModelConfig& draft);

// JSON: {"target": {"layers": N, "kv_heads": N}, "draft": {"layers": N, "heads": N},
//        "map": [[draft heads of target unit 0], ...]}. InvalidArgument naming the file and the
// field when it does not match the models (shapes, unit count, head ids out of range).
absl::StatusOr<HeadMap> LoadHeadMap(const std::filesystem::path& path, const ModelConfig& target,
                                    const ModelConfig& draft);
absl::Status SaveHeadMap(const std::filesystem::path& path, const HeadMap& map);

struct StsBudget {
  int64_t budget_tokens = 0;     // per KV head; 0: use budget_fraction
  double budget_fraction = 0.1;  // of the context's blocks
  int sink_blocks = 1;           // always kept: the first blocks (attention sinks)
  int window_blocks = 4;         // always kept: the last blocks (recent tokens, the new ones)
  // Target layers that read every block (indices; negative ones count from the last layer, -1
  // being the last). Quest and most sparse-attention methods leave their first layers dense; on
  // the fixture pair STS's loss sits in the last layer (docs/FIDELITY.md).
  std::vector<int> dense_layers;

  // Whether layer `layer` of a `layers`-layer model is one of dense_layers.
  bool IsDenseLayer(int64_t layer, int64_t layers) const {
    for (int l : dense_layers) {
      if ((l >= 0 ? l : layers + l) == layer) return true;
    }
    return false;
  }
};

// Makes the lists of budget.dense_layers name every block of a context of nb blocks.
void ApplyDenseLayers(const StsBudget& budget, int64_t nb, kvstore::Selection* sel);

// "0,1" or "-1": dense_layers from a flag. InvalidArgument naming the text.
absl::StatusOr<std::vector<int>> ParseDenseLayers(absl::string_view text);

// Blocks per list for a context of nb blocks (sinks and window included, at most nb).
int64_t BudgetBlocks(const StsBudget& budget, int64_t nb);

// From block masses of `rows` draft query rows — [draft_layers][draft_heads][rows][mass_blocks]
// as CpuModel's SequenceInput::block_mass gives them — the target's Selection over a context of
// nb blocks (nb >= mass_blocks; later blocks have no mass and come in through the window):
// per unit, the max over rows of the summed mass of its draft heads, sinks and window forced,
// top blocks up to the budget, ascending.
kvstore::Selection BuildStsSelection(const HeadMap& map, std::span<const float> draft_mass, int rows,
                                     int64_t mass_blocks, int64_t nb, const StsBudget& budget);

// The same rule with the target's own masses ([target_layers][target_heads][rows][mass_blocks]):
// each KV head scored by its query heads' summed mass. The oracle selection of the evaluation.
kvstore::Selection BuildOracleSelection(const ModelConfig& target, std::span<const float> target_mass, int rows,
                                        int64_t mass_blocks, int64_t nb, const StsBudget& budget);

// Sinks, then the most recent blocks up to the budget (StreamingLLM-style), for every unit.
kvstore::Selection BuildWindowSelection(const ModelConfig& target, int64_t nb, const StsBudget& budget);

}  // namespace scout::runtime
