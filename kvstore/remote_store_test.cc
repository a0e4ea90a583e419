// The KV store service over UCX: in one process, and as separate processes on loopback, one of
// them killed mid-session.
#include "kvstore/remote_store.h"


#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"
#include "ucp/api/ucp.h"
#include "gtest/gtest.h"

namespace scout::kvstore {
namespace {

constexpr size_t kUnit = 8192;  // Llama-3.1-8B: 16 tokens x K and V x 128 x bf16

std::vector<std::byte> RandomBytes(size_t n, std::mt19937& rng) {
  std::vector<std::byte> v(n);
  for (auto& b : v) b = std::byte(rng());
  return v;
}

TEST(RemoteKvStoreTest, WritesReadsReleasesAndRefusesByName) {
  absl::StatusOr<std::unique_ptr<KvStoreServer>> server = KvStoreServer::Start("127.0.0.1", 0, kUnit, 700);
  ASSERT_TRUE(server.ok()) << server.status();
  ASSERT_GT((*server)->port(), 0);
  absl::StatusOr<std::unique_ptr<KvStoreClient>> client = KvStoreClient::Connect("127.0.0.1", (*server)->port(), kUnit);
  ASSERT_TRUE(client.ok()) << client.status();
  std::mt19937 rng(5);
  // Two sessions, 600 units (4.9 MB in one write: the rendezvous path).
  std::vector<UnitKey> keys;
  for (int64_t s : {11, 12}) {
    for (int layer = 0; layer < 3; ++layer) {
      for (int head = 0; head < 2; ++head) {
        for (int block = 0; block < 50; ++block) keys.push_back({s, layer, head, block});
      }
    }
  }
  std::vector<std::byte> data = RandomBytes(keys.size() * kUnit, rng);
  ASSERT_TRUE((*client)->Put(keys, data.data()).ok());
  EXPECT_EQ((*server)->units_held(), 600);
  // Read back in another order, small (eager) and large (rendezvous) requests.
  std::vector<size_t> order(keys.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::shuffle(order.begin(), order.end(), rng);
  for (size_t batch : {1, 7, 600}) {
    std::vector<UnitKey> want_keys;
    for (size_t i = 0; i < batch; ++i) want_keys.push_back(keys[order[i]]);
    std::vector<std::byte> got(batch * kUnit);
    absl::Status st = (*client)->Get(want_keys, got.data());
    ASSERT_TRUE(st.ok()) << st;
    for (size_t i = 0; i < batch; ++i) {
      ASSERT_EQ(std::memcmp(got.data() + i * kUnit, data.data() + order[i] * kUnit, kUnit), 0) << "unit " << i;
    }
  }
  // A rewrite replaces; a unit never written is NotFound, by name, and nothing is written out.
  std::vector<std::byte> fresh = RandomBytes(kUnit, rng), got(2 * kUnit, std::byte{0x5a});
  ASSERT_TRUE((*client)->Put({&keys[3], 1}, fresh.data()).ok());
  ASSERT_TRUE((*client)->Get({&keys[3], 1}, got.data()).ok());
  EXPECT_EQ(std::memcmp(got.data(), fresh.data(), kUnit), 0);
  const std::vector<UnitKey> missing = {keys[0], {11, 0, 0, 999}};
  std::fill(got.begin(), got.end(), std::byte{0x5a});
  absl::Status st = (*client)->Get(missing, got.data());
  EXPECT_EQ(st.code(), absl::StatusCode::kNotFound) << st;
  EXPECT_NE(st.message().find("block 999"), std::string::npos) << st;
  EXPECT_EQ(got[0], std::byte{0x5a});
  // Capacity: 700 units; 200 more are refused whole.
  std::vector<UnitKey> more;
  for (int block = 0; block < 200; ++block) more.push_back({13, 0, 0, block});
  std::vector<std::byte> more_data(more.size() * kUnit);
  st = (*client)->Put(more, more_data.data());
  EXPECT_EQ(st.code(), absl::StatusCode::kResourceExhausted) << st;
  EXPECT_EQ((*server)->units_held(), 600);
  // Releasing a session frees its units; they are gone.
  ASSERT_TRUE((*client)->Release(11).ok());
  EXPECT_EQ((*server)->units_held(), 300);
  EXPECT_EQ((*client)->Get({&keys[0], 1}, got.data()).code(), absl::StatusCode::kNotFound);
  ASSERT_TRUE((*client)->Put(more, more_data.data()).ok());
  // Moving session 12 to 14: its units answer under 14, none under 12, and nothing is counted
  // twice; moving onto a session that holds units forgets those first.
  ASSERT_TRUE((*client)->Move(12, 14).ok());
  EXPECT_EQ((*server)->units_held(), 500);
  const size_t k12 = 300;  // keys[300..599] were session 12's
  UnitKey moved = keys[k12 + 217];  // layer 2: session 13 has only layer 0
  EXPECT_EQ((*client)->Get({&moved, 1}, got.data()).code(), absl::StatusCode::kNotFound);
  moved.session = 14;
  ASSERT_TRUE((*client)->Get({&moved, 1}, got.data()).ok());
  EXPECT_EQ(std::memcmp(got.data(), data.data() + (k12 + 217) * kUnit, kUnit), 0);
  ASSERT_TRUE((*client)->Move(13, 14).ok());  // 13's 200 units replace 14's 300
  EXPECT_EQ((*server)->units_held(), 200);
  EXPECT_EQ((*client)->Get({&moved, 1}, got.data()).code(), absl::StatusCode::kNotFound);
  ASSERT_TRUE((*client)->Move(99, 98).ok());  // nothing to move
  EXPECT_EQ((*server)->units_held(), 200);
  // Patches overwrite byte ranges of held units, copy on write, all or nothing.
  {
    UnitKey k{14, 0, 0, 5};  // held: one of session 13's units, moved to 14
    std::vector<std::byte> before(kUnit), after(kUnit);
    ASSERT_TRUE((*client)->Get({&k, 1}, before.data()).ok());
    std::vector<std::byte> bytes = RandomBytes(100 + 28, rng);
    const UnitPatch two[] = {{.key = k, .offset = 8, .length = 100}, {.key = k, .offset = kUnit - 28, .length = 28}};
    ASSERT_TRUE((*client)->Patch(two, bytes.data()).ok());
    ASSERT_TRUE((*client)->Get({&k, 1}, after.data()).ok());
    std::vector<std::byte> want = before;
    std::memcpy(want.data() + 8, bytes.data(), 100);
    std::memcpy(want.data() + kUnit - 28, bytes.data() + 100, 28);
    EXPECT_EQ(after, want);
    EXPECT_EQ((*server)->units_held(), 200);
    UnitKey absent = k;
    absent.block = 9999;
    const UnitPatch bad[] = {{.key = k, .offset = 0, .length = 4}, {.key = absent, .offset = 0, .length = 4}};
    st = (*client)->Patch(bad, bytes.data());
    EXPECT_EQ(st.code(), absl::StatusCode::kNotFound) << st;
    const UnitPatch past[] = {{.key = k, .offset = kUnit - 2, .length = 4}};
    EXPECT_EQ((*client)->Patch(past, bytes.data()).code(), absl::StatusCode::kInvalidArgument);
    ASSERT_TRUE((*client)->Get({&k, 1}, after.data()).ok());
    EXPECT_EQ(after, want);  // neither refused patch changed anything
  }
  // Bad addresses are refused at once.
  EXPECT_EQ(KvStoreClient::Connect("not-an-ip.invalid", 1, kUnit).status().code(), absl::StatusCode::kUnavailable);
}

// Two KV store processes on loopback: a client writes to both, one is killed (-9), its reads fail
// with a clear error within the client's timeout, and the other keeps serving.
TEST(RemoteKvStoreTest, SeparateProcessesAndAKilledNode) {
  int ports[2] = {0, 0};
  pid_t pids[2] = {0, 0};
  for (int k = 0; k < 2; ++k) {
    int fds[2];
    ASSERT_EQ(pipe(fds), 0);
    const pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {  // the KV store node: serve until killed
      close(fds[0]);
      absl::StatusOr<std::unique_ptr<KvStoreServer>> s = KvStoreServer::Start("127.0.0.1", 0, kUnit, 100000);
      const int port = s.ok() ? (*s)->port() : -1;
      if (write(fds[1], &port, sizeof(port)) != sizeof(port)) _exit(1);
      close(fds[1]);
      while (true) pause();
    }
    close(fds[1]);
    ASSERT_EQ(read(fds[0], &ports[k], sizeof(int)), static_cast<ssize_t>(sizeof(int)));
    close(fds[0]);
    pids[k] = pid;
    ASSERT_GT(ports[k], 0) << "KV store process " << k << " could not listen";
  }
  std::vector<std::unique_ptr<KvStoreClient>> clients;
  for (int k = 0; k < 2; ++k) {
    absl::StatusOr<std::unique_ptr<KvStoreClient>> c =
        KvStoreClient::Connect("127.0.0.1", ports[k], kUnit, absl::Seconds(5));
    ASSERT_TRUE(c.ok()) << c.status();
    clients.push_back(std::move(*c));
  }
  std::mt19937 rng(9);
  std::vector<UnitKey> keys;
  // 1200 units: 9.8 MB a reply, sent zero-copy from the units (the small replies above are copied).
  for (int block = 0; block < 1200; ++block) keys.push_back({1, block % 4, 0, block});
  std::vector<std::byte> data[2] = {RandomBytes(keys.size() * kUnit, rng), RandomBytes(keys.size() * kUnit, rng)};
  for (int k = 0; k < 2; ++k) ASSERT_TRUE(clients[k]->Put(keys, data[k].data()).ok());
  std::vector<std::byte> got(keys.size() * kUnit);
  for (int k = 0; k < 2; ++k) {
    ASSERT_TRUE(clients[k]->Get(keys, got.data()).ok());
    EXPECT_EQ(std::memcmp(got.data(), data[k].data(), got.size()), 0) << "node " << k;
  }
  ASSERT_EQ(kill(pids[0], SIGKILL), 0);
  ASSERT_EQ(waitpid(pids[0], nullptr, 0), pids[0]);
  const auto t0 = std::chrono::steady_clock::now();
  absl::Status st = clients[0]->Get(keys, got.data());
  const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_TRUE(st.code() == absl::StatusCode::kUnavailable || st.code() == absl::StatusCode::kDeadlineExceeded) << st;
  EXPECT_NE(st.message().find(std::to_string(ports[0])), std::string::npos) << st;
  EXPECT_LT(waited, 8.0);
  EXPECT_EQ(clients[0]->Release(1).code(), absl::StatusCode::kUnavailable);  // stays refused, at once
  // The other node is untouched.
  ASSERT_TRUE(clients[1]->Get(keys, got.data()).ok());
  EXPECT_EQ(std::memcmp(got.data(), data[1].data(), got.size()), 0);
  clients.clear();
  kill(pids[1], SIGKILL);
  waitpid(pids[1], nullptr, 0);
}

}  // namespace
// Nodes are reached by name (DNS, as the manifests advertise them), not only by IPv4 literal; a
// name that does not resolve is an error naming it.
TEST(RemoteStoreTest, NodesAreReachedByName) {
  constexpr size_t kUnit = 64;
  std::vector<std::byte> unit(kUnit, std::byte{7}), back(kUnit);
  auto roundtrip = [&](const std::string& listen, const std::string& connect) {
    absl::StatusOr<std::unique_ptr<KvStoreServer>> server = KvStoreServer::Start(listen, 0, kUnit, 10);
    if (!server.ok()) return server.status();
    absl::StatusOr<std::unique_ptr<KvStoreClient>> client =
        KvStoreClient::Connect(connect, (*server)->port(), kUnit, absl::Seconds(5));
    if (!client.ok()) return client.status();
    const UnitKey key{.session = 1, .layer = 0, .head = 0, .block = 0};
    if (absl::Status s = (*client)->Put({&key, 1}, unit.data()); !s.ok()) return s;
    if (absl::Status s = (*client)->Get({&key, 1}, back.data()); !s.ok()) return s;
    EXPECT_EQ(back, unit) << listen << " -> " << connect;
    return absl::OkStatus();
  };
  EXPECT_TRUE(roundtrip("localhost", "localhost").ok());
  // IPv6 is refused by name (remote_store.cc says why), not crashed on.
  absl::StatusOr<std::unique_ptr<KvStoreServer>> v6 = KvStoreServer::Start("[::1]", 0, kUnit, 10);
  EXPECT_EQ(v6.status().code(), absl::StatusCode::kInvalidArgument) << v6.status();
  EXPECT_NE(v6.status().message().find("IPv6"), std::string::npos) << v6.status();
  absl::StatusOr<std::unique_ptr<KvStoreClient>> nowhere =
      KvStoreClient::Connect("no-such-node.invalid", 4000, kUnit, absl::Seconds(2));
  ASSERT_FALSE(nowhere.ok());
  EXPECT_EQ(nowhere.status().code(), absl::StatusCode::kUnavailable) << nowhere.status();
  EXPECT_NE(nowhere.status().message().find("no-such-node.invalid"), std::string::npos) << nowhere.status();
}

// A server and a client of different KV wire versions refuse each other by name, whichever is
// the newer, instead of misreading the messages; the same versions then work on the same server.
TEST(RemoteStoreTest, PeersOfAnotherWireVersionAreRefusedByName) {
  constexpr size_t kUnit = 64;
  const uint32_t newer = kKvWireVersion + 1;
  absl::StatusOr<std::unique_ptr<KvStoreServer>> server = KvStoreServer::Start("127.0.0.1", 0, kUnit, 10);
  ASSERT_TRUE(server.ok()) << server.status();
  absl::StatusOr<std::unique_ptr<KvStoreClient>> ahead =
      KvStoreClient::Connect("127.0.0.1", (*server)->port(), kUnit, absl::Seconds(5), newer);
  ASSERT_FALSE(ahead.ok());
  EXPECT_EQ(ahead.status().code(), absl::StatusCode::kFailedPrecondition) << ahead.status();
  EXPECT_NE(ahead.status().message().find(absl::StrCat("version ", kKvWireVersion)), std::string::npos) << ahead.status();
  EXPECT_NE(ahead.status().message().find(absl::StrCat("version ", newer)), std::string::npos) << ahead.status();
  absl::StatusOr<std::unique_ptr<KvStoreClient>> same =
      KvStoreClient::Connect("127.0.0.1", (*server)->port(), kUnit, absl::Seconds(5));
  ASSERT_TRUE(same.ok()) << same.status();
  std::vector<std::byte> unit(kUnit, std::byte{3}), back(kUnit);
  const UnitKey key{.session = 2, .layer = 1, .head = 0, .block = 4};
  ASSERT_TRUE((*same)->Put({&key, 1}, unit.data()).ok());
  ASSERT_TRUE((*same)->Get({&key, 1}, back.data()).ok());
  EXPECT_EQ(back, unit);

  absl::StatusOr<std::unique_ptr<KvStoreServer>> newer_server = KvStoreServer::Start("127.0.0.1", 0, kUnit, 10, newer);
  ASSERT_TRUE(newer_server.ok()) << newer_server.status();
  absl::StatusOr<std::unique_ptr<KvStoreClient>> behind =
      KvStoreClient::Connect("127.0.0.1", (*newer_server)->port(), kUnit, absl::Seconds(5));
  ASSERT_FALSE(behind.ok());
  EXPECT_EQ(behind.status().code(), absl::StatusCode::kFailedPrecondition) << behind.status();
  EXPECT_NE(behind.status().message().find(absl::StrCat("speaks KV wire version ", newer)), std::string::npos)
      << behind.status();
}

// A client of wire version 1 (before the version prefix), in raw UCX as that build sent it: its
// ping ({op, count, id, session}) is answered in the reply layout it reads ({id, code, pad,
// length}), with FailedPrecondition naming both versions, instead of being dropped to time out.
TEST(RemoteStoreTest, AVersionOneClientIsToldTheVersionInItsOwnLayout) {
  absl::StatusOr<std::unique_ptr<KvStoreServer>> server = KvStoreServer::Start("127.0.0.1", 0, 64, 10);
  ASSERT_TRUE(server.ok()) << server.status();
  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES;
  params.features = UCP_FEATURE_AM;
  ucp_config_t* config = nullptr;
  ASSERT_EQ(ucp_config_read(nullptr, nullptr, &config), UCS_OK);
  ucp_context_h context = nullptr;
  ASSERT_EQ(ucp_init(&params, config, &context), UCS_OK);
  ucp_config_release(config);
  ucp_worker_params_t wp{};
  wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  wp.thread_mode = UCS_THREAD_MODE_SINGLE;
  ucp_worker_h worker = nullptr;
  ASSERT_EQ(ucp_worker_create(context, &wp, &worker), UCS_OK);
  struct Reply {
    bool done = false;
    uint64_t id = 0;
    int32_t code = 0;
    std::string message;
  } reply;
  ucp_am_handler_param_t hp{};
  hp.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB | UCP_AM_HANDLER_PARAM_FIELD_ARG;
  hp.id = 18;  // the reply message id of every version
  hp.arg = &reply;
  hp.cb = [](void* arg, const void* header, size_t header_length, void* data, size_t length,
             const ucp_am_recv_param_t*) -> ucs_status_t {
    auto* r = static_cast<Reply*>(arg);
    if (header_length != 24) return UCS_OK;
    std::memcpy(&r->id, header, 8);
    std::memcpy(&r->code, static_cast<const char*>(header) + 8, 4);
    r->message.assign(static_cast<const char*>(data), length);
    r->done = true;
    return UCS_OK;
  };
  ASSERT_EQ(ucp_worker_set_am_recv_handler(worker, &hp), UCS_OK);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>((*server)->port()));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ucp_ep_params_t ep_params{};
  ep_params.field_mask = UCP_EP_PARAM_FIELD_FLAGS | UCP_EP_PARAM_FIELD_SOCK_ADDR | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
  ep_params.flags = UCP_EP_PARAMS_FLAGS_CLIENT_SERVER;
  ep_params.err_mode = UCP_ERR_HANDLING_MODE_PEER;  // as every version's client asked
  ep_params.sockaddr.addr = reinterpret_cast<const sockaddr*>(&addr);
  ep_params.sockaddr.addrlen = sizeof(addr);
  ucp_ep_h ep = nullptr;
  ASSERT_EQ(ucp_ep_create(worker, &ep_params, &ep), UCS_OK);
  struct {
    uint32_t op = 4;  // ping
    uint32_t count = 0;
    uint64_t id = 77;
    int64_t session = 0;
  } v1_ping;
  ucp_request_param_t rp{};
  rp.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
  rp.flags = UCP_AM_SEND_FLAG_REPLY;
  ucs_status_ptr_t sent = ucp_am_send_nbx(ep, 17, &v1_ping, sizeof(v1_ping), nullptr, 0, &rp);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (!reply.done && std::chrono::steady_clock::now() < deadline) ucp_worker_progress(worker);
  if (sent != nullptr && !UCS_PTR_IS_ERR(sent)) {
    while (ucp_request_check_status(sent) == UCS_INPROGRESS) ucp_worker_progress(worker);
    ucp_request_free(sent);
  }
  ASSERT_TRUE(reply.done) << "no reply to a version-1 ping";
  EXPECT_EQ(reply.id, 77u);
  EXPECT_EQ(reply.code, static_cast<int32_t>(absl::StatusCode::kFailedPrecondition));
  EXPECT_NE(reply.message.find(absl::StrCat("KV wire version ", kKvWireVersion)), std::string::npos) << reply.message;
  EXPECT_NE(reply.message.find("client version 1"), std::string::npos) << reply.message;
  ucp_request_param_t close_params{};
  ucs_status_ptr_t closing = ucp_ep_close_nbx(ep, &close_params);
  if (closing != nullptr && !UCS_PTR_IS_ERR(closing)) {
    while (ucp_request_check_status(closing) == UCS_INPROGRESS) ucp_worker_progress(worker);
    ucp_request_free(closing);
  }
  ucp_worker_destroy(worker);
  ucp_cleanup(context);
}

}  // namespace scout::kvstore
