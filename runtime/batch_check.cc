#include "runtime/batch_check.h"

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"

namespace scout::runtime {
namespace {

absl::Status CheckSelection(const ModelConfig& c, const SequenceInput& in, int64_t end) {
  const kvstore::Selection& sel = *in.selection;
  const int64_t nb = kvstore::BlocksFor(end);
  if (sel.num_layers != c.num_hidden_layers || sel.num_kv_heads != c.num_key_value_heads ||
      sel.indptr.size() != static_cast<size_t>(sel.num_layers * sel.num_kv_heads + 1) || sel.indptr.front() != 0 ||
      sel.indptr.back() != static_cast<int32_t>(sel.blocks.size())) {
    return absl::InvalidArgumentError(absl::StrCat("selection for sequence ", in.seq, " is not ", c.num_hidden_layers,
                                                   " x ", c.num_key_value_heads, " lists"));
  }
  for (size_t l = 0; l + 1 < sel.indptr.size(); ++l) {
    if (sel.indptr[l] > sel.indptr[l + 1]) {
      return absl::InvalidArgumentError(absl::StrCat("selection indptr of sequence ", in.seq, " decreases at ", l));
    }
  }
  for (size_t l = 0; l + 1 < sel.indptr.size(); ++l) {
    for (int32_t j = sel.indptr[l]; j < sel.indptr[l + 1]; ++j) {
      if (sel.blocks[j] < 0 || sel.blocks[j] >= nb || (j > sel.indptr[l] && sel.blocks[j] <= sel.blocks[j - 1])) {
        return absl::InvalidArgumentError(
            absl::StrCat("selection list ", l, " of sequence ", in.seq, " is not ascending blocks below ", nb));
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<BatchShape> CheckBatch(const ModelConfig& c, const kvstore::BlockTableManager& tables,
                                      std::span<const SequenceInput> batch) {
  if (batch.empty()) return absl::InvalidArgumentError("Forward needs at least one sequence");
  absl::flat_hash_set<SequenceId> seen;
  BatchShape shape;
  shape.start.resize(batch.size());
  for (size_t i = 0; i < batch.size(); ++i) {
    const SequenceInput& in = batch[i];
    if (!seen.insert(in.seq).second) {
      return absl::InvalidArgumentError(absl::StrCat("sequence ", in.seq, " appears twice in one batch"));
    }
    if (in.tokens.empty()) return absl::InvalidArgumentError(absl::StrCat("sequence ", in.seq, " has no new tokens"));
    for (int32_t t : in.tokens) {
      if (t < 0 || t >= c.vocab_size) {
        return absl::InvalidArgumentError(absl::StrCat("token id ", t, " outside vocabulary of ", c.vocab_size));
      }
    }
    const kvstore::BlockTable* table = tables.Find(in.seq);
    if (table == nullptr) return absl::NotFoundError(absl::StrCat("unknown sequence ", in.seq));
    shape.start[i] = table->num_tokens;
    const int64_t end = shape.start[i] + static_cast<int64_t>(in.tokens.size());
    if (end > c.max_position_embeddings) {
      return absl::OutOfRangeError(absl::StrCat("sequence ", in.seq, " would reach ", end,
                                                " tokens, past max_position_embeddings ", c.max_position_embeddings));
    }
    shape.blocks_needed += *tables.BlocksNeeded(in.seq, end);
    if (in.quest_budget != nullptr) {
      const StsBudget& b = *in.quest_budget;
      if (b.sink_blocks < 0 || b.window_blocks < 0 || b.budget_tokens < 0 ||
          (b.budget_tokens == 0 && !(b.budget_fraction > 0 && b.budget_fraction <= 1))) {
        return absl::InvalidArgumentError("quest budget needs sinks, window, tokens >= 0 and a fraction in (0, 1]");
      }
    }
    if (in.selection != nullptr) {
      if (absl::Status s = CheckSelection(c, in, end); !s.ok()) return s;
    }
    shape.total_tokens += static_cast<int64_t>(in.tokens.size());
    shape.logit_rows += in.all_logits ? static_cast<int64_t>(in.tokens.size()) : 1;
  }
  if (shape.blocks_needed > tables.allocator().num_free()) {
    return absl::ResourceExhaustedError(absl::StrCat("KV pool full: this step needs ", shape.blocks_needed, " blocks, ",
                                                     tables.allocator().num_free(), " of ",
                                                     tables.allocator().capacity(), " free"));
  }
  return shape;
}

absl::Status GrowForBatch(kvstore::BlockTableManager& tables, std::span<const SequenceInput> batch,
                          const BatchShape& shape) {
  for (size_t i = 0; i < batch.size(); ++i) {
    absl::Status s = tables.Grow(batch[i].seq, shape.start[i] + static_cast<int64_t>(batch[i].tokens.size()));
    if (!s.ok()) return s;
  }
  return absl::OkStatus();
}

void ListsWithNewBlocks(const int32_t* indptr, const int32_t* blocks, int64_t num_kv_heads, int64_t start, int64_t n,
                        std::vector<int32_t>* out_indptr, std::vector<int32_t>* out_blocks) {
  const int32_t first_new = static_cast<int32_t>(start / kvstore::kBlockSize);
  const int32_t nb = static_cast<int32_t>(kvstore::BlocksFor(start + n));
  for (int64_t kh = 0; kh < num_kv_heads; ++kh) {
    for (int32_t j = indptr[kh]; j < indptr[kh + 1] && blocks[j] < first_new; ++j) out_blocks->push_back(blocks[j]);
    for (int32_t b = first_new; b < nb; ++b) out_blocks->push_back(b);
    out_indptr->push_back(static_cast<int32_t>(out_blocks->size()));
  }
}

absl::Status CheckKvUnits(const ModelConfig& config, SequenceId seq, int64_t num_blocks,
                          std::span<const KvUnitRef> units) {
  for (const KvUnitRef& u : units) {
    if (u.layer < 0 || u.layer >= config.num_hidden_layers || u.head < 0 || u.head >= config.num_key_value_heads ||
        u.block < 0 || u.block >= num_blocks) {
      return absl::OutOfRangeError(absl::StrCat("KV unit (layer ", u.layer, ", head ", u.head, ", block ", u.block,
                                                ") is outside sequence ", seq, ": ", config.num_hidden_layers,
                                                " layers, ", config.num_key_value_heads, " KV heads, ", num_blocks,
                                                " blocks"));
    }
  }
  return absl::OkStatus();
}

}  // namespace scout::runtime
