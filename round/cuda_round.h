// The speculative round on the GPUs of a CUDA target and draft (one GPU, or the draft on its own).
// Per round, for the streams that share a configuration (a group):
//  1. The draft's k steps, enqueued back to back. Step 0 feeds each stream's pending tokens; each
//     later step reads the token the step before drew on the device (argmax, or kernels::Sample
//     with a seed from the stream's generator). With STS each step's attention writes its block
//     mass, [stream][slot][draft layer * heads][block]. With a sparse draft, step 0 of a refresh
//     round attends densely and kernels::BlockSelect over its mass picks the draft's own lists,
//     which every later step, and every step of the next draft_refresh_rounds - 1 rounds, reads.
//  2. STS: kernels::BlockSelect over the round's mass picks the target's lists, on the draft's GPU.
//     They reach the target by a device copy, or through the host when the target keeps its KV in
//     the host tier (which plans its prefetch from host lists).
//  3. The target verifies every stream's pending and drafted tokens in one pass (dense, STS, or
//     STS + SANTA), its input tokens assembled on the device.
//  4. One host synchronisation. Greedy rounds read back only the drafted tokens and the target's
//     argmax tokens, and acceptance is their common prefix. Sampled rounds read back the draft's
//     and the target's logit rows and run exact rejection sampling (VerifyDraft) on the host.
// Streams whose options differ (STS or not, budgets, head maps, sparse draft, SANTA, greedy or
// sampled) run as separate groups, one after the other (round_plan.h: PlanRoundGroups). A pass
// that fails rolls back its group and the groups after it; groups before it have completed their
// round, consistently, and simply advance again when the caller runs the round anew.
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "round/speculative.h"
#include "runtime/cuda_model.h"

namespace scout::round {

class CudaRound final : public SpeculativeRound {
 public:
  // use_graphs: the draft's steps and the verification run as CUDA graphs kept per step shape
  // (DeviceStepOptions::use_graph); false for plain launches (the same results).
  CudaRound(runtime::CudaModel& target, runtime::CudaModel& draft, bool use_graphs = true);
  ~CudaRound() override;
  CudaRound(const CudaRound&) = delete;
  CudaRound& operator=(const CudaRound&) = delete;

  absl::Status Run(std::span<SpeculativeStream* const> streams) override;
  const char* name() const override { return "cuda"; }

  struct Buffers;
  struct Group;

 private:
  struct GroupState;
  // A group's round: Plan, then SetUp, DraftSteps, Verify and ReadBack (a failure in any rolls
  // the group back, Abort), then Accept.
  absl::Status RunGroup(const Group& group);
  void Plan(const Group& g, GroupState& st);
  absl::Status SetUp(const Group& g, GroupState& st);
  absl::Status DraftSteps(const Group& g, GroupState& st);
  absl::Status Verify(const Group& g, GroupState& st);
  absl::Status ReadBack(const Group& g, GroupState& st);
  absl::Status Accept(const Group& g, GroupState& st);
  // After a failed pass: waits for both GPUs, then puts every stream of the group back.
  absl::Status Abort(const Group& group, absl::Status why);

  runtime::CudaModel& target_;
  runtime::CudaModel& draft_;
  const bool use_graphs_;
  std::unique_ptr<Buffers> buf_;
  uint64_t rounds_ = 0;
};

}  // namespace scout::round
