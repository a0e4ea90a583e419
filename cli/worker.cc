// `scout worker`: serves the target or the draft model to a coordinator.
#include "cli/commands.h"

#include <cstdio>
#include <string>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "runtime/backend_factory.h"
#ifdef SCOUT_HAVE_CUDA
#include <cuda_runtime.h>

#include "runtime/cuda_model.h"
#endif
#ifdef SCOUT_HAVE_NCCL
#include "runtime/tensor_parallel.h"
#endif
#include <unistd.h>

#include <csignal>
#include <thread>

#include "cluster/worker.h"

namespace scout::cli {

// `scout worker`: serves the target or the draft model to a coordinator.
int Worker(int argc, char** argv) {
  Flags flags(WithHostTierFlags({
      {"model", "", "model folder"},
      {"role", "target", "target or draft"},
      {"coordinator", "127.0.0.1:8100", "the coordinator's control address, host:port"},
      {"id", "", "this worker's name in the cluster (default: host name and process id)"},
      {"device", "cpu", "backend: cpu, cuda or cuda:N"},
      {"tensor-parallel-size", "1", "cuda: split the model over this many GPUs (NCCL)"},
      {"target-devices", "", "cuda: the model's GPUs, comma-separated"},
      {"gpu-class", "", "the class placement knows this worker's GPUs by (default: cpu, or the CUDA device name)"},
      {"kv-budget-tokens", "0", "cpu: tokens of KV the worker holds (0: four sequences of the model's context)"},
      {"kv-remote-tier", "",
       "keep sequences whole on their KV store homes (partial blocks and lengths too) and, after an adoption, fetch "
       "per step only the KV units the step reads",
       true},
      {"help", "", "show this help", true},
  }));
  if (absl::Status s = flags.Parse(argc, argv); !s.ok()) return Fail(s);
  if (flags.GetBool("help")) {
    std::printf("usage: scout worker --model DIR --role target|draft --coordinator HOST:PORT [flags]\n%s",
                flags.Help().c_str());
    return 0;
  }
  if (flags.Get("model").empty()) return Fail(absl::InvalidArgumentError("--model is required"));
  const std::string role = flags.Get("role");
  if (role != "target" && role != "draft") {
    return Fail(absl::InvalidArgumentError(absl::StrCat("--role must be target or draft, got \"", role, "\"")));
  }
  absl::StatusOr<std::pair<std::string, int>> coord = ParseHostPort("coordinator", flags.Get("coordinator"));
  if (!coord.ok()) return Fail(coord.status());
  const sigset_t signals = BlockStopSignals();
  absl::StatusOr<int64_t> tp = flags.GetInt("tensor-parallel-size"), kv_tokens = flags.GetInt("kv-budget-tokens");
  if (!tp.ok()) return Fail(tp.status());
  if (!kv_tokens.ok()) return Fail(kv_tokens.status());
  absl::StatusOr<HostTierFlags> tier = ParseHostTier(flags);
  if (!tier.ok()) return Fail(tier.status());
  const bool split = *tp > 1 || !flags.Get("target-devices").empty();
  absl::StatusOr<std::unique_ptr<runtime::ModelBackend>> model =
      split ? runtime::LoadTensorParallel(flags.Get("model"), static_cast<int>(*tp), flags.Get("target-devices"), *kv_tokens, *tier)
            : runtime::LoadBackend(flags.Get("model"), flags.Get("device"), *kv_tokens, *tier);
  if (!model.ok()) return Fail(model.status());
  cluster::WorkerService service(std::move(*model), {.remote_tier = flags.GetBool("kv-remote-tier")});
  cluster::MemberOptions options{.registration = service.Describe(), .coordinator_host = coord->first,
                                   .coordinator_port = coord->second};
  std::string id = flags.Get("id");
  if (id.empty()) {
    char host[256] = {0};
    gethostname(host, sizeof host - 1);
    id = absl::StrCat(host, "-", getpid());
  }
  options.registration.set_id(id);
  options.registration.set_role(role == "target" ? cluster::v1::ROLE_TARGET : cluster::v1::ROLE_DRAFT);
  options.on_assignment = [](const cluster::v1::Assignment& a) {
    if (!a.placed()) return;
    if (a.serving()) {
      std::fprintf(stderr, "scout: placement: serving on GPU(s) %s of this worker%s\n",
                   absl::StrJoin(a.gpus(), ",").c_str(), a.draft().empty() ? "" : absl::StrCat(", draft ", a.draft()).c_str());
    } else {
      std::fprintf(stderr, "scout: placement: standing by (%s)\n", a.note().c_str());
    }
  };
  // What placement knows the worker by: its devices (the CPU counts as one), their class and
  // memory.
  const bool on_cpu = flags.Get("device") == "cpu" && !split;
  std::string gpu_class = flags.Get("gpu-class");
  int64_t device_memory = 0;
#ifdef SCOUT_HAVE_CUDA
  if (!on_cpu) {
    int index = 0;
    if (flags.Get("device").rfind("cuda:", 0) == 0) (void)absl::SimpleAtoi(flags.Get("device").substr(5), &index);
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, index) == cudaSuccess) {
      device_memory = static_cast<int64_t>(prop.totalGlobalMem);
      if (gpu_class.empty()) gpu_class = prop.name;
    }
  }
#endif
  if (gpu_class.empty()) gpu_class = on_cpu ? "cpu" : "cuda";
  options.registration.set_gpu_class(gpu_class);
  options.registration.set_num_gpus(split ? static_cast<int32_t>(*tp) : 1);
  options.registration.set_gpu_memory_bytes(device_memory);
  absl::Notification stop;
  std::thread signal_thread([&] {
    int sig = 0;
    sigwait(&signals, &sig);
    std::fprintf(stderr, "scout: signal %d, leaving the cluster\n", sig);
    stop.Notify();
  });
  signal_thread.detach();
  std::fprintf(stderr, "scout: %s worker %s (%s) for %s\n", role.c_str(), id.c_str(), gpu_class.c_str(),
               flags.Get("model").c_str());
  absl::Status s = cluster::RunClusterMember(
      options, [&service](const cluster::v1::BackendRequest& r) { return service.Handle(r); },
      [&service] { return service.Heartbeat(); }, [&service] { service.Reset(); }, &stop,
      [&service] { service.Flush(); });
  if (!s.ok()) return Fail(s);
  return 0;
}

}  // namespace scout::cli
