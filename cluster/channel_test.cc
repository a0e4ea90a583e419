#include "cluster/channel.h"

#include <sys/socket.h>
#include <netinet/in.h>
#include <unistd.h>

#include <atomic>
#include <cstring>

#include <gtest/gtest.h>

namespace scout::cluster {
namespace {

// A server whose handler answers each request with a reply echoing the request's Truncate length
// doubled, after an optional delay.
struct EchoServer {
  std::unique_ptr<Listener> listener;
  std::atomic<int> accepted{0};
  std::atomic<int> delay_ms{0};
  std::vector<std::shared_ptr<Channel>> channels;
  absl::Mutex mu;

  void Start() {
    absl::StatusOr<std::unique_ptr<Listener>> l = Listener::Start(
        "127.0.0.1", 0,
        [this](const std::string&) {
          return std::make_pair(
              Channel::Handler([this](Channel& c, v1::Envelope m) {
                if (m.body_case() != v1::Envelope::kRequest) return;
                if (delay_ms.load() > 0) absl::SleepFor(absl::Milliseconds(delay_ms.load()));
                v1::Envelope r;
                r.set_call_id(m.call_id());
                r.mutable_reply()->set_kv_used_blocks(2 * m.request().truncate().num_tokens());
                ASSERT_TRUE(c.Send(std::move(r)).ok());
              }),
              Channel::CloseHandler([](const absl::Status&) {}));
        },
        [this](std::shared_ptr<Channel> c) {
          absl::MutexLock lock(&mu);
          channels.push_back(std::move(c));
          ++accepted;
        });
    ASSERT_TRUE(l.ok()) << l.status();
    listener = std::move(*l);
  }
  ~EchoServer() {
    listener.reset();
    absl::MutexLock lock(&mu);
    for (auto& c : channels) c->Close();
  }
};

v1::Envelope Request(int64_t n) {
  v1::Envelope e;
  e.mutable_request()->mutable_truncate()->set_num_tokens(n);
  return e;
}

// Listeners and channels by name and over IPv6: a listener on "localhost" and one on "::1" (where
// the machine has IPv6 loopback) both answer a channel that connects by name or literal.
TEST(ChannelTest, ListensAndConnectsByNameAndOverIpv6) {
  auto serve = [](const std::string& listen_host, const std::string& connect_host) -> absl::Status {
    absl::StatusOr<std::unique_ptr<Listener>> l = Listener::Start(
        listen_host, 0,
        [](const std::string&) {
          return std::make_pair(Channel::Handler([](Channel& c, v1::Envelope m) {
                                  v1::Envelope r;
                                  r.set_call_id(m.call_id());
                                  r.mutable_reply()->set_kv_used_blocks(7);
                                  c.Send(std::move(r)).IgnoreError();
                                }),
                                Channel::CloseHandler([](const absl::Status&) {}));
        },
        [](std::shared_ptr<Channel>) {});
    if (!l.ok()) return l.status();
    absl::StatusOr<std::shared_ptr<Channel>> c =
        Channel::Connect(connect_host, (*l)->port(), absl::Seconds(5), nullptr, nullptr);
    if (!c.ok()) return c.status();
    absl::StatusOr<v1::Envelope> r = (*c)->Call(Request(1), absl::Seconds(5), "echo");
    (*c)->Close();
    if (!r.ok()) return r.status();
    EXPECT_EQ(r->reply().kv_used_blocks(), 7);
    return absl::OkStatus();
  };
  EXPECT_TRUE(serve("localhost", "localhost").ok());
  EXPECT_TRUE(serve("127.0.0.1", "localhost").ok());  // a name with an IPv6 address first falls back
  EXPECT_EQ(Listener::Start("no-such-host.invalid", 0, nullptr, nullptr).status().code(), absl::StatusCode::kUnavailable);
  absl::StatusOr<std::unique_ptr<Listener>> v6 = Listener::Start("::1", 0, nullptr, nullptr);
  if (!v6.ok()) {
    GTEST_SKIP() << "no IPv6 loopback here: " << v6.status();
  }
  v6->reset();
  EXPECT_TRUE(serve("::1", "::1").ok());
}

TEST(ChannelTest, CallsPairWithTheirRepliesAcrossThreads) {
  EchoServer server;
  server.Start();
  absl::StatusOr<std::shared_ptr<Channel>> c =
      Channel::Connect("127.0.0.1", server.listener->port(), absl::Seconds(5), nullptr, nullptr);
  ASSERT_TRUE(c.ok()) << c.status();
  std::vector<std::thread> threads;
  std::atomic<int> wrong{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 200; ++i) {
        const int64_t n = t * 1000 + i;
        absl::StatusOr<v1::Envelope> r = (*c)->Call(Request(n), absl::Seconds(10), "echo");
        if (!r.ok() || r->reply().kv_used_blocks() != 2 * n) ++wrong;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(wrong.load(), 0);
  (*c)->Close();
}

TEST(ChannelTest, LargeMessagesArriveWhole) {
  EchoServer server;
  server.Start();
  std::atomic<size_t> got{0};
  absl::StatusOr<std::unique_ptr<Listener>> l = Listener::Start(
      "127.0.0.1", 0,
      [&](const std::string&) {
        return std::make_pair(Channel::Handler([&](Channel&, v1::Envelope m) {
                                got = m.request().forward().batch(0).tokens_size();
                              }),
                              Channel::CloseHandler(nullptr));
      },
      [&](std::shared_ptr<Channel> ch) {
        absl::MutexLock lock(&server.mu);
        server.channels.push_back(ch);
      });
  ASSERT_TRUE(l.ok());
  absl::StatusOr<std::shared_ptr<Channel>> c = Channel::Connect("127.0.0.1", (*l)->port(), absl::Seconds(5), nullptr, nullptr);
  ASSERT_TRUE(c.ok());
  v1::Envelope e;
  v1::SequenceInput* in = e.mutable_request()->mutable_forward()->add_batch();
  for (int i = 0; i < 3'000'000; ++i) in->add_tokens(i);
  ASSERT_TRUE((*c)->Send(std::move(e)).ok());
  for (int i = 0; i < 200 && got.load() == 0; ++i) absl::SleepFor(absl::Milliseconds(20));
  EXPECT_EQ(got.load(), 3'000'000u);
  (*c)->Close();
}

TEST(ChannelTest, ASilentPeerMissesTheDeadline) {
  EchoServer server;
  server.Start();
  server.delay_ms = 1500;
  absl::StatusOr<std::shared_ptr<Channel>> c =
      Channel::Connect("127.0.0.1", server.listener->port(), absl::Seconds(5), nullptr, nullptr);
  ASSERT_TRUE(c.ok());
  const absl::Time t0 = absl::Now();
  absl::StatusOr<v1::Envelope> r = (*c)->Call(Request(1), absl::Milliseconds(200), "slow call");
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDeadlineExceeded) << r.status();
  EXPECT_NE(r.status().message().find("slow call"), std::string::npos);
  EXPECT_LT(absl::Now() - t0, absl::Seconds(1));
  (*c)->Close();
}

TEST(ChannelTest, AClosedConnectionFailsPendingCallsAtOnce) {
  EchoServer server;
  server.Start();
  server.delay_ms = 3000;
  absl::StatusOr<std::shared_ptr<Channel>> c =
      Channel::Connect("127.0.0.1", server.listener->port(), absl::Seconds(5), nullptr, nullptr);
  ASSERT_TRUE(c.ok());
  std::shared_ptr<PendingCall> call = (*c)->CallAsync(Request(1), absl::Seconds(30), "doomed call");
  // The server side goes away (as a killed process's socket would).
  for (int i = 0; i < 100 && server.accepted.load() == 0; ++i) absl::SleepFor(absl::Milliseconds(10));
  {
    absl::MutexLock lock(&server.mu);
    for (auto& ch : server.channels) ch->Close();
  }
  const absl::Time t0 = absl::Now();
  absl::StatusOr<v1::Envelope> r = call->Wait();
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable) << r.status();
  EXPECT_LT(absl::Now() - t0, absl::Seconds(5));
  EXPECT_FALSE((*c)->Call(Request(2), absl::Seconds(1), "after close").ok());
}

TEST(ChannelTest, RefusedConnectionNamesTheAddress) {
  // A port nothing listens on: bind one, then close it.
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  socklen_t len = sizeof a;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  const int port = ntohs(a.sin_port);
  ::close(fd);
  absl::StatusOr<std::shared_ptr<Channel>> c = Channel::Connect("127.0.0.1", port, absl::Seconds(2), nullptr, nullptr);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(c.status().message().find(std::to_string(port)), std::string::npos) << c.status();
}

// A listener that records why its one connection closed, and a raw socket dialling it (to send
// what a Channel never would).
struct RawPeer {
  absl::Notification closed;
  absl::Status why;
  std::vector<std::shared_ptr<Channel>> keep;
  std::unique_ptr<Listener> listener;
  int fd = -1;

  void Start() {
    absl::StatusOr<std::unique_ptr<Listener>> l = Listener::Start(
        "127.0.0.1", 0,
        [this](const std::string&) {
          return std::make_pair(Channel::Handler(nullptr), Channel::CloseHandler([this](const absl::Status& s) {
                                  why = s;
                                  closed.Notify();
                                }));
        },
        [this](std::shared_ptr<Channel> ch) { keep.push_back(ch); });
    ASSERT_TRUE(l.ok());
    listener = std::move(*l);
    fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(static_cast<uint16_t>(listener->port()));
    ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  }
  void Write(const void* data, size_t n) { ASSERT_EQ(::write(fd, data, n), static_cast<ssize_t>(n)); }
  ~RawPeer() {
    if (fd >= 0) ::close(fd);
  }
};

TEST(ChannelTest, GarbageAndOversizedFramesCloseTheConnection) {
  for (const bool oversized : {false, true}) {
    RawPeer peer;
    peer.Start();
    const unsigned char garbage[] = {0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff};
    const unsigned char huge[] = {0xff, 0xff, 0xff, 0xff};
    if (oversized) {
      peer.Write(huge, sizeof huge);
    } else {
      peer.Write(garbage, sizeof garbage);
    }
    ASSERT_TRUE(peer.closed.WaitForNotificationWithTimeout(absl::Seconds(5)));
    EXPECT_EQ(peer.why.code(), absl::StatusCode::kDataLoss) << peer.why;
  }
}

TEST(ChannelTest, AnotherProtocolVersionIsRefused) {
  RawPeer peer;
  peer.Start();
  v1::Envelope e;
  e.set_version(kProtocolVersion + 1);
  e.mutable_heartbeat();
  const std::string body = e.SerializeAsString();
  const uint32_t n = static_cast<uint32_t>(body.size());
  const unsigned char header[4] = {static_cast<unsigned char>(n >> 24), static_cast<unsigned char>(n >> 16),
                                   static_cast<unsigned char>(n >> 8), static_cast<unsigned char>(n)};
  peer.Write(header, 4);
  peer.Write(body.data(), body.size());
  ASSERT_TRUE(peer.closed.WaitForNotificationWithTimeout(absl::Seconds(5)));
  EXPECT_EQ(peer.why.code(), absl::StatusCode::kFailedPrecondition) << peer.why;
  EXPECT_NE(peer.why.message().find("protocol version 2"), std::string::npos) << peer.why;
}

TEST(ChannelTest, StatusPayloadsSurviveTheWire) {
  absl::Status s = absl::ResourceExhaustedError("cache full");
  s.SetPayload("scout.dev/x", absl::Cord("1"));
  const absl::Status back = FromProto(ToProto(s));
  EXPECT_EQ(back, s);
  EXPECT_TRUE(FromProto(ToProto(absl::OkStatus())).ok());
}

}  // namespace
}  // namespace scout::cluster
