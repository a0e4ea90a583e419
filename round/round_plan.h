// The host planning of a device round, pure functions tested without a GPU (round_plan_test.cc):
// how long each STS list is, how wide the forced window must be, and when the sparse draft must
// pick its own lists again.
#pragma once

#include <cstdint>
#include <vector>

#include <span>

#include "kvstore/prefetch_planner.h"
#include "round/speculative.h"
#include "runtime/sts.h"

namespace scout::round {

// Offsets of the lists one kernels::BlockSelect call writes, for streams of nb[s] blocks and
// units ordered (stream, layer, KV head): each list holds min(nb, max(budget, sinks + window))
// blocks, or nb on a layer of budget.dense_layers (BlockSelect then keeps every block). The
// window is passed apart from the budget's: callers widen it (VerifyWindowBlocks).
std::vector<int32_t> StsListOffsets(const std::vector<int32_t>& nb, int layers, int kv_heads,
                                    const runtime::StsBudget& budget, int window_blocks);

// The forced window of a verification: at least the budget's, and wide enough that every
// stream's list holds the blocks of its new tokens (they must see themselves). first_new[s] is
// the position of stream s's first new token, nb[s] its blocks after the pass.
int VerifyWindowBlocks(const runtime::StsBudget& budget, const std::vector<int64_t>& first_new,
                       const std::vector<int32_t>& nb);

// One stream of a device round, as the grouping sees it: its options, the k it proposes this
// round, and how many tokens its context can still take after its pending ones.
struct StreamRound {
  const SpeculativeOptions* options = nullptr;
  int k = 0;
  int64_t room = 0;
};

// A group of streams that run one device round together: members (indices into the streams, in
// order) and the number of tokens each drafts. Streams share a group when their rounds are the
// same launches: the same head maps (by address), STS budget, sparse-draft budget and interval,
// SANTA samples, and greedy or sampled. They draft the group's largest k and propose their own;
// a stream whose context cannot take the largest k of the round (or that proposes none) runs in
// a group of its own k.
struct RoundGroup {
  std::vector<int> members;
  int k = 0;
  bool own_k = false;
};
std::vector<RoundGroup> PlanRoundGroups(std::span<const StreamRound> streams);

// The sparse draft's lists across rounds. They are picked by a refresh round's dense first step
// for the streams of that round, in its order, and cover each stream's blocks up to a bound that
// leaves room for the rounds until the next refresh.
class SparseDraftPlan {
 public:
  // Whether this round must pick the lists again: none yet, other streams or another map, the
  // refresh interval reached, or a stream's draft about to reach past its bound (draft_end[s]:
  // tokens its cache will hold after this round's steps). Call once a round; counts the round.
  bool StartRound(const std::vector<kvstore::SequenceId>& seqs, const std::vector<std::vector<int32_t>>& map_units,
                  const std::vector<int32_t>& draft_end, int refresh_rounds, int k);
  // After a failed round: pick again next time.
  void Invalidate() { valid_ = false; }
  // Blocks each stream's lists cover, its largest, and the extra window that reaches them.
  const std::vector<int32_t>& bound() const { return bound_; }
  int max_bound() const { return max_bound_; }
  int ahead_blocks() const { return ahead_; }

 private:
  bool valid_ = false;
  std::vector<kvstore::SequenceId> seqs_;
  std::vector<std::vector<int32_t>> map_units_;
  int rounds_since_ = 0;
  std::vector<int32_t> bound_;
  int max_bound_ = 0, ahead_ = 0;
};

}  // namespace scout::round
