// A cluster worker: one model (target or draft) served to the coordinator. WorkerService is the
// plain class (a ModelBackend behind BackendRequest / BackendReply, plus the sequences' KV homes
// on KV store nodes), testable without a network; RunClusterMember is the thin loop that
// connects it to the coordinator over the control channel (register, heartbeats, reconnect).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "cluster/channel.h"
#include "cluster/control.pb.h"
#include "runtime/backend.h"

namespace scout::kvstore {
class KvStoreClient;
}

namespace scout::cluster {


// The model's identity for the cluster: workers whose fingerprint differs from the
// coordinator's are refused at registration.
std::string ModelFingerprint(const runtime::ModelConfig& config);

struct WorkerOptions {
  absl::Duration kv_timeout = absl::Seconds(10);  // each call to a KV store node
  // The remote KV tier. Every pass also writes its sequences' partial last block and their
  // length to their homes, so a home holds a whole sequence and an adopter runs nothing again
  // (but the last pass, if the worker died between its reply and its write).
  // An adopted sequence's KV stays on its home: each pass first fetches, of the units it reads
  // (the blocks its Selection lists, every block for a dense pass, and the block its new tokens
  // go into), those this worker does not hold yet. The rows a pass adds to a partly filled
  // block go as a patch, so the extra writes stay small (docs/BENCHMARKS.md).
  bool remote_tier = false;
};

// Serves one model. Not thread-safe: the runner calls Handle from one thread at a time.
class WorkerService {
 public:
  explicit WorkerService(std::unique_ptr<runtime::ModelBackend> model, const WorkerOptions& options = {});
  ~WorkerService();
  WorkerService(const WorkerService&) = delete;
  WorkerService& operator=(const WorkerService&) = delete;

  // Runs one request. Model errors come back in the reply's status (never as a lost reply).
  // A Forward queues the blocks it filled for their sequences' KV homes; Flush (after the reply
  // is on its way, before the next request) writes them, and sequences whose home could not be
  // written are listed in the next reply (their KV is still here).
  v1::BackendReply Handle(const v1::BackendRequest& request);
  void Flush();
  // Forgets every sequence (the coordinator that placed them is gone).
  void Reset();

  runtime::ModelBackend& model() { return *model_; }
  v1::Register Describe() const;  // role-independent fields of the registration
  v1::Heartbeat Heartbeat() const;

 private:
  struct Home {
    std::string address;
    uint64_t store_session = 0;
    bool writable = true;  // false after a write failed, until the coordinator names a new home
  };
  // An adopted sequence whose KV is partly still only on the node it was adopted from (remote
  // tier): of blocks [0, blocks), each (layer, KV head) unit is here where `here` says so. The
  // source stays even when the sequence stops writing there (no home), until nothing is away.
  struct Lazy {
    Home source;
    int64_t blocks = 0;
    std::vector<std::vector<bool>> here;  // [layer * kv_heads + head][block]
    int64_t missing = 0;
  };
  absl::Status AddSequence(int64_t seq, const v1::KvHome& home, bool clear_home);
  v1::BackendReply Forward(const v1::Forward& forward);
  // Returns how many tokens of KV the sequence took from its home.
  absl::StatusOr<int64_t> Adopt(const v1::AdoptSequence& adopt);
  absl::Status Truncate(int64_t seq, int64_t num_tokens);
  absl::Status MoveHome(int64_t seq, const Home& home);
  // Writes blocks [first, first + n) of the sequence to its home, and (length >= 0) its length
  // record in the same write: how many tokens of the home an adopter may trust. first_row > 0:
  // the home holds the first block's rows before it, and only the rows after go (a patch sent
  // before the write with the record).
  absl::Status Persist(int64_t seq, const Home& home, int64_t first_block, int64_t num_blocks, int64_t length = -1,
                       int first_row = 0);
  // What a home may claim of a sequence of `length` tokens once its blocks are written: all of
  // it with the remote tier (partial blocks are written), else its whole blocks.
  int64_t RecordFor(int64_t length) const;
  // Remote tier: the units a pass over `in` reads that are not here yet come from the node the
  // sequence was adopted from (Lazy::source). Errors name the sequence and the node.
  absl::Status FetchForPass(const runtime::SequenceInput& in, int64_t length);
  absl::Status FetchUnits(int64_t seq, Lazy& lazy, const std::vector<runtime::KvUnitRef>& want);
  absl::Status FetchAll(int64_t seq);
  // Whether `home` is where the sequence's units still away are (IsSource) or where it writes.
  bool IsSource(int64_t seq, const Home& home) const;
  bool IsHome(int64_t seq, const Home& home) const;
  // Nothing is away any more: forgets the lazy state, and frees the source if it is not home.
  void DoneFetching(int64_t seq);
  absl::StatusOr<kvstore::KvStoreClient*> Client(const std::string& address);
  void DropClient(const std::string& address);
  // Forgets a sequence's units on a node (best effort).
  void ReleaseHome(const Home& home);

  std::unique_ptr<runtime::ModelBackend> model_;
  WorkerOptions options_;
  absl::flat_hash_map<int64_t, Home> homes_;  // every sequence this worker holds ("" address: none)
  absl::flat_hash_map<int64_t, Lazy> lazy_;   // remote tier: sequences with units still away
  absl::flat_hash_map<std::string, std::unique_ptr<kvstore::KvStoreClient>> clients_;
  struct PersistJob {
    int64_t seq = 0;
    int64_t first_block = 0;
    int64_t num_blocks = 0;
    int64_t length = -1;  // >= 0: the length record goes with the blocks
    int first_row = 0;    // rows of the first block the home already holds
  };
  std::vector<PersistJob> pending_;           // queued by Forward, written by Flush
  std::vector<int64_t> unpersisted_;          // reported with the next reply
  absl::Status persist_error_;
  std::vector<std::byte> staging_;
  int64_t kv_bytes_written_ = 0;
  int64_t kv_bytes_read_ = 0;
  double kv_seconds_ = 0;
};

struct MemberOptions {
  v1::Register registration;  // id and role must be set
  std::string coordinator_host;
  int coordinator_port = 0;
  absl::Duration reconnect_interval = absl::Milliseconds(500);
  absl::Duration connect_timeout = absl::Seconds(5);
  // Called with what the coordinator's placement made of this member at each registration (its
  // GPUs in a target group and the draft paired with it, or why it stands by), and again from the
  // connection's thread whenever the placement changes it.
  std::function<void(const v1::Assignment&)> on_assignment;
  // Messages other than requests and assignments (a target group's Generate, CancelGenerate and
  // DeleteSession: GroupService::Handle), on the connection's reader thread.
  std::function<bool(Channel&, const v1::Envelope&)> on_message;
};

// Connects to the coordinator, registers and sends heartbeats at the interval it asks for;
// `serve` answers its requests (may be null: KV store nodes only register and beat) and
// `after_reply` runs once each reply is sent, before the next request (a worker's Flush); `beat`
// fills each heartbeat, and `lost` runs when a connection ends (a worker forgets its sequences:
// the coordinator has moved them). Reconnects until `stop` is notified, then returns OK. A
// refused registration (another model, another protocol version) is returned: it will not
// change by retrying.
absl::Status RunClusterMember(const MemberOptions& options,
                              std::function<v1::BackendReply(const v1::BackendRequest&)> serve,
                              std::function<v1::Heartbeat()> beat, std::function<void()> lost,
                              absl::Notification* stop, std::function<void()> after_reply = nullptr);

}  // namespace scout::cluster
