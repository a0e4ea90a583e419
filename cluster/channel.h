// The control channel's transport: protobuf Envelopes (control.proto) framed by a 4-byte
// big-endian length over one TCP connection (Boost.Asio). Either side may send requests and
// one-way messages; a reply carries its request's call_id. Each channel has one reader thread
// that hands incoming requests and one-way messages to its handler and wakes callers waiting for
// replies. Calls have deadlines; a closed connection fails every pending call at once, so a dead
// peer is never waited for past its deadline.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "cluster/control.pb.h"

namespace scout::cluster {

// This build's protocol version (Envelope.version).
inline constexpr uint32_t kProtocolVersion = 1;
// Frames longer than this are refused (a corrupt length must not allocate gigabytes).
inline constexpr uint32_t kMaxFrameBytes = 1u << 30;

v1::Status ToProto(const absl::Status& status);
absl::Status FromProto(const v1::Status& status);

class Channel;

// A reply on its way: Wait returns it, or DeadlineExceeded past the deadline, or Unavailable
// once the channel closes.
class PendingCall {
 public:
  absl::StatusOr<v1::Envelope> Wait();

 private:
  friend class Channel;
  absl::Notification done_;
  absl::Mutex mu_;
  absl::StatusOr<v1::Envelope> result_ ABSL_GUARDED_BY(mu_) = absl::UnknownError("pending");
  absl::Time deadline_;
  std::string what_;  // names the call in errors
};

class Channel : public std::enable_shared_from_this<Channel> {
 public:
  // Called on the reader thread for each incoming request or one-way message. It may Send (a
  // reply) and may Close the channel.
  using Handler = std::function<void(Channel& channel, v1::Envelope message)>;
  // Called once, on the reader thread, when the connection ends (peer closed, error, Close).
  using CloseHandler = std::function<void(const absl::Status& why)>;

  // Dials host:port within `timeout`. Unavailable naming the address if it cannot connect.
  static absl::StatusOr<std::shared_ptr<Channel>> Connect(const std::string& host, int port, absl::Duration timeout,
                                                          Handler on_message, CloseHandler on_close);
  ~Channel();
  Channel(const Channel&) = delete;
  Channel& operator=(const Channel&) = delete;

  // Sends one message (its version set here). Thread-safe. Unavailable once closed.
  absl::Status Send(v1::Envelope message);
  // Sends a request (call_id and deadline set here) and returns its pending reply.
  std::shared_ptr<PendingCall> CallAsync(v1::Envelope request, absl::Duration timeout, std::string what);
  absl::StatusOr<v1::Envelope> Call(v1::Envelope request, absl::Duration timeout, std::string what) {
    return CallAsync(std::move(request), timeout, std::move(what))->Wait();
  }

  // Ends the connection: the reader stops, pending calls fail with Unavailable. Idempotent;
  // callable from any thread, including the handler. A channel lives until its connection ends
  // (its reader holds it), so owners Close channels they are done with.
  void Close();
  bool closed() const { return closed_.load(); }
  const std::string& peer() const { return peer_; }

 private:
  friend class Listener;
  struct Socket;  // the Boost.Asio socket and its io_context
  Channel(std::unique_ptr<Socket> socket, std::string peer, Handler on_message, CloseHandler on_close);
  void Start();
  void ReadLoop();
  void FailPending(const absl::Status& why);

  std::unique_ptr<Socket> socket_;
  std::string peer_;
  Handler on_message_;
  CloseHandler on_close_;
  std::atomic<bool> closed_{false};
  std::thread reader_;
  absl::Mutex write_mu_;  // one frame at a time
  absl::Mutex fd_mu_;     // shutdown vs close of the socket (never held while blocking)
  absl::Mutex calls_mu_;
  uint64_t next_call_ ABSL_GUARDED_BY(calls_mu_) = 1;
  absl::flat_hash_map<uint64_t, std::shared_ptr<PendingCall>> calls_ ABSL_GUARDED_BY(calls_mu_);
};

// Accepts connections on host:port (0: any free port) on its own thread; each becomes a Channel
// with the handlers `make` returns for it.
class Listener {
 public:
  using MakeHandlers = std::function<std::pair<Channel::Handler, Channel::CloseHandler>(const std::string& peer)>;
  using OnChannel = std::function<void(std::shared_ptr<Channel>)>;
  // Unavailable if it cannot listen.
  static absl::StatusOr<std::unique_ptr<Listener>> Start(const std::string& host, int port, MakeHandlers make,
                                                         OnChannel on_channel);
  ~Listener();
  int port() const { return port_; }

 private:
  struct Acceptor;
  Listener(std::unique_ptr<Acceptor> acceptor, MakeHandlers make, OnChannel on_channel);
  void AcceptLoop();

  std::unique_ptr<Acceptor> acceptor_;
  int port_;
  MakeHandlers make_;
  OnChannel on_channel_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

}  // namespace scout::cluster
