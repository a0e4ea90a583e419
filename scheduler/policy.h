// The scheduler's decisions as pure functions of what the engine tells them (no model, no
// locks, no clock of their own), so they are tested without a model (policy_test.cc):
//   admission by batch room: which waiting requests join the running batch, in arrival order;
//   admission by KV: whether a joining request starts, waits for running ones, or first makes
//     idle sessions give way;
//   eviction: which idle sessions lose their KV, least recently used first;
//   preemption: what a pass that failed does to the requests in it.
// scheduler::Engine applies them.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"

namespace scout::scheduler::policy {

// Indices into `waiting` (arrival order) of the requests that join now: at most `room`, skipping
// a request whose session already has one running (session_busy) or joining before it; they
// keep their place for a later pass. An empty session id is a one-off request.
std::vector<size_t> AdmitInOrder(std::span<const std::string> waiting_sessions, int room,
                                 const std::function<bool(const std::string&)>& session_busy);

// A joining request against the KV pool: need = the blocks it may still take (prompt and
// max_tokens); free = blocks free now; reserved = what the running requests may still take.
struct KvRequest {
  int64_t need = 0;
  int64_t free_blocks = 0;
  int64_t reserved = 0;
  bool others_running = false;
  bool fits_in_limit = true;  // within max_model_len (else it starts, to fail with a clear error)
};
enum class KvAdmission {
  kStart,       // it fits (or it is to fail anyway)
  kDefer,       // running requests will free, or stop needing, the room it lacks: it waits in order
  kEvictFirst,  // nothing runs to wait for: idle sessions give way, then it starts if it fits
};
KvAdmission AdmitByKv(const KvRequest& r);

// Eviction: idle sessions, least recently used first; one is dropped when it has been idle past
// idle_timeout_s (> 0), or while fewer than blocks_wanted (> 0) blocks are free.
struct IdleSession {
  std::string id;
  std::chrono::steady_clock::time_point last_used;
};
void OrderForEviction(std::vector<IdleSession>& idle);
bool ShouldEvict(const IdleSession& s, std::chrono::steady_clock::time_point now, double idle_timeout_s,
                 int64_t blocks_wanted, int64_t free_blocks);

// Preemption: what to do after a pass over `running` requests (the newest last) failed with
// `status`; in_pass: whether a sequence is one of the pass's.
struct PassFailure {
  enum Action {
    kEndOne,      // one sequence's own failure (kFailedSequencePayload): end its request, run the rest again
    kSitOutNewest,  // only the GPU block cache is short: the newest request skips passes until there is room
    kEndNewest,   // the KV pool is full: the newest request ends with the error, the others run again
    kEndAll,      // anything else, or nothing left to give way: every request ends with the error
  } action = kEndAll;
  int64_t sequence = 0;  // kEndOne: the failed sequence
};
PassFailure OnFailedPass(const absl::Status& status, size_t running, const std::function<bool(int64_t)>& in_pass);

}  // namespace scout::scheduler::policy
