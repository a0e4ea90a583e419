// The KV store service over UCX: a process (`scout kvstore`) that holds sessions' KV units in its
// host memory, and the client a target worker uses to write units and fetch the units a
// Selection names. Requests and replies are UCX active messages; bulk data goes by UCX's
// rendezvous protocol (RDMA where the hardware has it, TCP or shared memory here), never through
// a control channel. A unit is one (session, layer, KV head, 16-token block), as in the local
// tier (kvstore::UnitKey).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "kvstore/block_cache.h"

namespace scout::kvstore {

// The version of the KV store's messages (1 was the unversioned layout before it). A server and a
// client of different versions refuse each other's requests with FailedPrecondition naming both
// versions, rather than misread them. The parameters below that take one exist for tests of a
// mixed-version cluster.
inline constexpr uint32_t kKvWireVersion = 2;

class KvStoreServer {
 public:
  // Listens on host:port (port 0: any free one) and serves on its own thread until destroyed. The
  // host is a name (resolved through DNS to its first IPv4 address), an IPv4 address, or
  // "0.0.0.0"; a name that does not resolve gives Unavailable, an IPv6 address InvalidArgument.
  // It holds at most capacity_units units of unit_bytes each; a write beyond that is refused
  // (ResourceExhausted to the writer, nothing stored). Unavailable if UCX cannot listen.
  static absl::StatusOr<std::unique_ptr<KvStoreServer>> Start(const std::string& host, int port, size_t unit_bytes,
                                                              int64_t capacity_units,
                                                              uint32_t wire_version = kKvWireVersion);
  ~KvStoreServer();
  KvStoreServer(const KvStoreServer&) = delete;
  KvStoreServer& operator=(const KvStoreServer&) = delete;

  int port() const;
  int64_t units_held() const;

  struct Impl;

 private:
  explicit KvStoreServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// One connection to one server. Not thread-safe: one caller at a time. Every call waits at most
// the connection's timeout: a dead or silent server gives Unavailable or DeadlineExceeded naming
// it, never a hang.
// Bytes [offset, offset + length) of one stored unit.
struct UnitPatch {
  UnitKey key;
  uint32_t offset = 0;
  uint32_t length = 0;
};

class KvStoreClient {
 public:
  // host as KvStoreServer::Start's: a name resolves through DNS (the first address is used).
  // FailedPrecondition naming both versions when the server speaks another wire version.
  static absl::StatusOr<std::unique_ptr<KvStoreClient>> Connect(const std::string& host, int port, size_t unit_bytes,
                                                                absl::Duration timeout = absl::Seconds(30),
                                                                uint32_t wire_version = kKvWireVersion);
  ~KvStoreClient();
  KvStoreClient(const KvStoreClient&) = delete;
  KvStoreClient& operator=(const KvStoreClient&) = delete;

  // Writes units: keys[i]'s bytes at data + i * unit_bytes (a unit written again is replaced).
  absl::Status Put(std::span<const UnitKey> keys, const std::byte* data);
  // Overwrites byte ranges of units the server holds, the ranges' bytes one after another at
  // data (a worker writes only the rows a pass added to a partly filled block). All or
  // nothing: NotFound naming the first unit the server does not hold, InvalidArgument for a
  // range past a unit's end. Applied after every request sent before it on this connection.
  absl::Status Patch(std::span<const UnitPatch> patches, const std::byte* data);
  // Reads units into out + i * unit_bytes. NotFound naming the first unit the server does not
  // hold (never written, or its session released); nothing is written to out then.
  absl::Status Get(std::span<const UnitKey> keys, std::byte* out);
  // Forgets every unit of a session (OK if it holds none).
  absl::Status Release(SequenceId session);
  // Gives every unit of session `from` to session `to` without moving bytes; whatever `to` held
  // is forgotten first, and `from` is left empty (OK if it held nothing). A worker adopting a
  // sequence takes its units this way, so a predecessor taken for dead that still writes under
  // the old session cannot change what the adopter reads.
  absl::Status Move(SequenceId from, SequenceId to);

  struct Impl;

 private:
  explicit KvStoreClient(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace scout::kvstore
