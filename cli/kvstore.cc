// `scout kvstore`: a KV store node of the cluster.
#include "cli/commands.h"

#include <cstdio>
#include <optional>
#include <string>

#include "absl/strings/str_cat.h"
#ifdef SCOUT_HAVE_UCX
#include "kvstore/remote_store.h"
#endif

#include <csignal>
#include <thread>

#include "cluster/worker.h"

namespace scout::cli {

// `scout kvstore`: a KV store node of the cluster (host memory, served over UCX).
int KvStore(int argc, char** argv) {
  Flags flags({
      {"host", "0.0.0.0", "address to listen on"},
      {"port", "7100", "port to listen on (0: any free port, printed at start)"},
      {"capacity-gb", "16", "host memory for KV units, in GB"},
      {"unit-bytes", "8192", "bytes of one (layer, KV head, 16-token block) unit: 64 x head_dim for bf16, 128 x head_dim "
                             "for the CPU backend's float32"},
      {"coordinator", "", "register with this coordinator (host:port of its control channel)"},
      {"advertise-host", "", "the host workers reach this node at (default: --host, or this machine's name)"},
      {"id", "", "this node's name in the cluster (default: host name and port)"},
      {"help", "", "show this help", true},
  });
  if (absl::Status s = flags.Parse(argc, argv); !s.ok()) return Fail(s);
  if (flags.GetBool("help")) {
    std::printf("usage: scout kvstore [flags]\n%s", flags.Help().c_str());
    return 0;
  }
  absl::StatusOr<int64_t> port = flags.GetInt("port"), unit = flags.GetInt("unit-bytes");
  absl::StatusOr<double> gb = flags.GetDouble("capacity-gb");
  for (const absl::Status& s : {port.status(), unit.status(), gb.status()}) {
    if (!s.ok()) return Fail(s);
  }
  if (*unit < 1 || *gb <= 0) return Fail(absl::InvalidArgumentError("--unit-bytes and --capacity-gb must be > 0"));
  std::optional<std::pair<std::string, int>> coord;
  if (!flags.Get("coordinator").empty()) {
    absl::StatusOr<std::pair<std::string, int>> c = ParseHostPort("coordinator", flags.Get("coordinator"));
    if (!c.ok()) return Fail(c.status());
    coord = *c;
  }
#ifdef SCOUT_HAVE_UCX
  const sigset_t signals = BlockStopSignals();
  const int64_t capacity = static_cast<int64_t>(*gb * 1e9 / static_cast<double>(*unit));
  absl::StatusOr<std::unique_ptr<kvstore::KvStoreServer>> server =
      kvstore::KvStoreServer::Start(flags.Get("host"), static_cast<int>(*port), static_cast<size_t>(*unit), capacity);
  if (!server.ok()) return Fail(server.status());
  std::fprintf(stderr, "scout: KV store on %s:%d (UCX), %lld units of %lld bytes\n", flags.Get("host").c_str(),
               (*server)->port(), static_cast<long long>(capacity), static_cast<long long>(*unit));
  absl::Notification stop;
  std::thread member;
  if (coord) {
    char hostname[256] = {0};
    gethostname(hostname, sizeof hostname - 1);
    std::string advertise = flags.Get("advertise-host");
    if (advertise.empty()) advertise = flags.Get("host") == "0.0.0.0" ? hostname : flags.Get("host");
    cluster::MemberOptions options{.coordinator_host = coord->first, .coordinator_port = coord->second};
    std::string id = flags.Get("id");
    if (id.empty()) id = absl::StrCat(hostname, "-", (*server)->port());
    options.registration.set_id(id);
    options.registration.set_role(cluster::v1::ROLE_KVSTORE);
    options.registration.set_kvstore_address(absl::StrCat(advertise, ":", (*server)->port()));
    options.registration.set_kv_unit_bytes(*unit);
    options.registration.set_capacity_units(capacity);
    kvstore::KvStoreServer* srv = server->get();
    member = std::thread([options, srv, &stop] {
      absl::Status s = cluster::RunClusterMember(
          options, nullptr,
          [srv] {
            cluster::v1::Heartbeat h;
            h.set_units_held(srv->units_held());
            return h;
          },
          nullptr, &stop);
      if (!s.ok()) {
        std::fprintf(stderr, "scout: error: %s\n", s.ToString().c_str());
        std::exit(1);
      }
    });
  }
  int sig = 0;
  sigwait(&signals, &sig);
  std::fprintf(stderr, "scout: signal %d, stopping (%lld units held)\n", sig, static_cast<long long>((*server)->units_held()));
  stop.Notify();
  if (member.joinable()) member.join();
  return 0;
#else
  return Fail(absl::UnavailableError("this scout was built without UCX (SCOUT_USE_UCX=OFF)"));
#endif
}

}  // namespace scout::cli
