#include "scheduler/policy.h"

#include <algorithm>
#include <set>

#include "absl/strings/numbers.h"
#include "runtime/backend.h"

namespace scout::scheduler::policy {

std::vector<size_t> AdmitInOrder(std::span<const std::string> waiting_sessions, int room,
                                 const std::function<bool(const std::string&)>& session_busy) {
  std::vector<size_t> admitted;
  std::set<std::string> joining;
  for (size_t i = 0; i < waiting_sessions.size() && static_cast<int>(admitted.size()) < room; ++i) {
    const std::string& sid = waiting_sessions[i];
    if (!sid.empty()) {
      if (joining.contains(sid) || session_busy(sid)) continue;
      joining.insert(sid);
    }
    admitted.push_back(i);
  }
  return admitted;
}

KvAdmission AdmitByKv(const KvRequest& r) {
  if (!r.fits_in_limit) return KvAdmission::kStart;
  if (r.need > r.free_blocks - r.reserved && (r.reserved > 0 || r.others_running)) return KvAdmission::kDefer;
  if (r.need > r.free_blocks) return KvAdmission::kEvictFirst;
  return KvAdmission::kStart;
}

void OrderForEviction(std::vector<IdleSession>& idle) {
  std::sort(idle.begin(), idle.end(), [](const IdleSession& a, const IdleSession& b) {
    return a.last_used != b.last_used ? a.last_used < b.last_used : a.id < b.id;
  });
}

bool ShouldEvict(const IdleSession& s, std::chrono::steady_clock::time_point now, double idle_timeout_s,
                 int64_t blocks_wanted, int64_t free_blocks) {
  const bool timed_out =
      idle_timeout_s > 0 && std::chrono::duration<double>(now - s.last_used).count() > idle_timeout_s;
  const bool pressure = blocks_wanted > 0 && free_blocks < blocks_wanted;
  return timed_out || pressure;
}

PassFailure OnFailedPass(const absl::Status& status, size_t running, const std::function<bool(int64_t)>& in_pass) {
  if (running > 1) {
    if (absl::optional<absl::Cord> failed = status.GetPayload(runtime::kFailedSequencePayload); failed.has_value()) {
      int64_t id = 0;
      if (absl::SimpleAtoi(std::string(*failed), &id) && in_pass(id)) return {.action = PassFailure::kEndOne, .sequence = id};
    }
    if (status.code() == absl::StatusCode::kResourceExhausted) {
      return {.action = status.GetPayload(runtime::kGpuBlockCacheFullPayload).has_value() ? PassFailure::kSitOutNewest
                                                                                            : PassFailure::kEndNewest};
    }
  }
  return {.action = PassFailure::kEndAll};
}

}  // namespace scout::scheduler::policy
