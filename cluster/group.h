// The cluster's data plane: a target group runs its own engine (scheduler::Engine over its local
// model, its draft in-process) and the coordinator hands it whole requests. GroupService is the
// group's side: it runs each Generate the coordinator sends on a thread of its own, streams the
// text back as GeneratePiece messages and ends with GenerateDone; nothing of a pass or a draft
// step crosses the network. The coordinator's side is Router (cluster/router.h).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>

#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "cluster/channel.h"
#include "cluster/control.pb.h"
#include "scheduler/completion_service.h"

namespace scout::cluster {

// scheduler::CompletionRequest <-> its wire form. The prompt travels as token ids only:
// FromWire InvalidArgument if prompt_ids is empty.
v1::CompletionRequest ToWire(const scheduler::CompletionRequest& request, const std::vector<int32_t>& prompt_ids);
absl::StatusOr<scheduler::CompletionRequest> FromWire(const v1::CompletionRequest& wire);
v1::TokenLogprobs ToWire(const runtime::TokenLogprobs& lp);
runtime::TokenLogprobs FromWire(const v1::TokenLogprobs& wire);

class GroupService {
 public:
  // engine must outlive the service.
  explicit GroupService(scheduler::CompletionService* engine) : engine_(engine) {}
  // Cancels what still runs and waits for it.
  ~GroupService();
  GroupService(const GroupService&) = delete;
  GroupService& operator=(const GroupService&) = delete;

  // A message from the coordinator: Generate (started on a thread of its own), CancelGenerate or
  // DeleteSession. False for any other kind.
  bool Handle(Channel& channel, const v1::Envelope& message);
  // The connection to the coordinator ended: running requests are cancelled (nobody reads their
  // text) and, once they have stopped, every session is dropped. The coordinator has moved the
  // sessions to other groups by then (it took this one for dead), so copies kept here would be
  // stale if it sent them back.
  void Lost();
  int running() const;

 private:
  void Run(std::shared_ptr<Channel> channel, uint64_t stream, scheduler::CompletionRequest request,
           std::shared_ptr<std::atomic<bool>> cancelled);

  scheduler::CompletionService* engine_;
  mutable absl::Mutex mu_;
  absl::flat_hash_map<uint64_t, std::shared_ptr<std::atomic<bool>>> running_ ABSL_GUARDED_BY(mu_);
};

}  // namespace scout::cluster
