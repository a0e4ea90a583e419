// The KV store service over UCX: how fast a worker fetches scattered 8 KiB units from a KV store
// node in another process, by request size, against copying the same units in one process (the
// naive baseline: what memory alone allows on this machine).
//   remote_kv_bench [--units 32768] [--seconds 2] [--transports default,tcp]
// A transport list entry sets UCX_TLS for both processes ("default": UCX's own choice).
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "kvstore/remote_store.h"

namespace {

using scout::kvstore::KvStoreClient;
using scout::kvstore::KvStoreServer;
using scout::kvstore::UnitKey;
using Clock = std::chrono::steady_clock;
constexpr size_t kUnit = 8192;

int Run(int units, double seconds, const std::string& tls) {
  if (tls != "default") setenv("UCX_TLS", tls.c_str(), 1);
  int fds[2];
  if (pipe(fds) != 0) return 1;
  const pid_t pid = fork();
  if (pid == 0) {
    close(fds[0]);
    auto s = KvStoreServer::Start("127.0.0.1", 0, kUnit, units);
    const int port = s.ok() ? (*s)->port() : -1;
    if (write(fds[1], &port, sizeof(port)) != sizeof(port)) _exit(1);
    while (true) pause();
  }
  close(fds[1]);
  int port = -1;
  if (read(fds[0], &port, sizeof(port)) != sizeof(port) || port <= 0) {
    std::fprintf(stderr, "remote_kv_bench: the KV store process did not start\n");
    return 1;
  }
  auto client = KvStoreClient::Connect("127.0.0.1", port, kUnit);
  if (!client.ok()) {
    std::fprintf(stderr, "remote_kv_bench: %s\n", std::string(client.status().message()).c_str());
    kill(pid, SIGKILL);
    return 1;
  }
  std::mt19937 rng(1);
  std::vector<UnitKey> keys;
  for (int i = 0; i < units; ++i) keys.push_back({1, i % 32, (i / 32) % 8, i / 256});
  std::vector<std::byte> data(static_cast<size_t>(units) * kUnit);
  for (size_t i = 0; i < data.size(); i += 64) data[i] = std::byte(rng());
  const auto t0 = Clock::now();
  for (int at = 0; at < units; at += 4096) {
    const int n = std::min(4096, units - at);
    if (auto s = (*client)->Put({keys.data() + at, static_cast<size_t>(n)}, data.data() + static_cast<size_t>(at) * kUnit); !s.ok()) {
      std::fprintf(stderr, "remote_kv_bench: %s\n", std::string(s.message()).c_str());
      kill(pid, SIGKILL);
      return 1;
    }
  }
  const double put_s = std::chrono::duration<double>(Clock::now() - t0).count();
  std::printf("transport %s: wrote %d units (%.0f MB) in %.2f s (%.2f GB/s)\n", tls.c_str(), units,
              units * kUnit / 1e6, put_s, units * kUnit / put_s / 1e9);
  std::printf("%8s %10s %12s %12s %12s %8s\n", "units", "MB/req", "req/s", "GB/s", "memcpy GB/s", "ratio");
  std::vector<std::byte> out(static_cast<size_t>(units) * kUnit);
  for (int batch : {1, 16, 256, 4096, units}) {
    if (batch > units) continue;
    std::vector<UnitKey> pick(batch);
    std::vector<int> idx(batch);
    int reqs = 0;
    double remote_s = 0;
    while (remote_s < seconds) {
      for (int i = 0; i < batch; ++i) {
        idx[i] = static_cast<int>(rng() % units);
        pick[i] = keys[idx[i]];
      }
      const auto a = Clock::now();
      if (auto s = (*client)->Get(pick, out.data()); !s.ok()) {
        std::fprintf(stderr, "remote_kv_bench: %s\n", std::string(s.message()).c_str());
        kill(pid, SIGKILL);
        return 1;
      }
      remote_s += std::chrono::duration<double>(Clock::now() - a).count();
      ++reqs;
    }
    // Baseline: the same gather as memcpy within this process.
    int copies = 0;
    double copy_s = 0;
    while (copy_s < seconds / 4) {
      const auto a = Clock::now();
      for (int i = 0; i < batch; ++i) std::memcpy(out.data() + static_cast<size_t>(i) * kUnit, data.data() + static_cast<size_t>(idx[i]) * kUnit, kUnit);
      copy_s += std::chrono::duration<double>(Clock::now() - a).count();
      ++copies;
    }
    const double gbps = static_cast<double>(reqs) * batch * kUnit / remote_s / 1e9;
    const double copy_gbps = static_cast<double>(copies) * batch * kUnit / copy_s / 1e9;
    std::printf("%8d %10.3f %12.1f %12.2f %12.2f %7.0f%%\n", batch, batch * kUnit / 1e6, reqs / remote_s, gbps, copy_gbps,
                100 * gbps / copy_gbps);
  }
  client->reset();
  kill(pid, SIGKILL);
  waitpid(pid, nullptr, 0);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  int units = 32768;
  double seconds = 2;
  std::vector<std::string> transports = {"default", "tcp"};
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--units" && absl::SimpleAtoi(value, &units) && units > 0) continue;
    if (flag == "--seconds" && absl::SimpleAtod(value, &seconds) && seconds > 0) continue;
    if (flag == "--transports") {
      transports = absl::StrSplit(value, ',', absl::SkipEmpty());
      continue;
    }
    std::fprintf(stderr, "usage: remote_kv_bench [--units N] [--seconds S] [--transports default,tcp]\n");
    return 2;
  }
  for (const std::string& t : transports) {
    if (int rc = Run(units, seconds, t); rc != 0) return rc;
  }
  return 0;
}
