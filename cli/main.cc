// scout: one binary, subcommands in the style of `vllm serve` / `vllm bench`; each in a file of
// its own (cli/commands.h). `scout bench` runs scout-bench, the benchmarks' own binary (bench/),
// so that the product links no benchmark code.
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "server/openai_server.h"

namespace scout::cli {
namespace {

void Usage() {
  std::printf(
      "usage: scout <command> [flags]\n\n"
      "commands:\n"
      "  generate   generate text from a prompt on the CPU backend (--speculative with --draft)\n"
      "  eval       fidelity of sparse attention (STS, oracle, Quest, window) against dense on a text\n"
      "  calibrate  choose the draft heads that stand for each target (layer, KV head)\n"
      "  serve      OpenAI-compatible HTTP server (/v1/completions, /v1/models, /health, /metrics)\n"
      "  coordinator  the cluster's HTTP front end and scheduler over registered workers\n"
      "  worker     serves the target or draft model to a coordinator (--role target|draft)\n"
      "  kvstore    a KV store node: sessions' KV units in host memory, served over UCX\n"
      "  bench decode  decode throughput at production shapes on the GPU (dense, speculative, STS, SANTA)\n"
      "  bench serve   load against an OpenAI-compatible server (rate, concurrency, agent sessions), as vllm bench serve\n\n"
      "Run `scout <command> --help` for its flags.\n");
}

// `scout bench NAME ...`: execs scout-bench from the directory of this executable (the build's
// bin/, or an install's), as `scout-bench NAME ...`.
int Bench(int argc, char** argv) {
  std::error_code ec;
  const std::filesystem::path self = std::filesystem::read_symlink("/proc/self/exe", ec);
  const std::filesystem::path bench = (ec ? std::filesystem::path(argv[0]) : self).parent_path() / "scout-bench";
  std::vector<char*> args = {const_cast<char*>("scout-bench")};
  for (int i = 2; i < argc; ++i) args.push_back(argv[i]);
  args.push_back(nullptr);
  execv(bench.c_str(), args.data());
  std::fprintf(stderr, "scout: bench runs %s, which could not be started (%s): build it with SCOUT_BUILD_BENCHMARKS=ON\n",
               bench.c_str(), std::strerror(errno));
  return 2;
}

}  // namespace
}  // namespace scout::cli

int main(int argc, char** argv) {
  if (argc < 2 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h") {
    scout::cli::Usage();
    return argc < 2 ? 2 : 0;
  }
  std::string cmd = argv[1];
  if (cmd == "--version" || cmd == "version") {
    std::printf("scout %s\n", scout::server::ScoutVersion());
    return 0;
  }
  if (cmd == "generate") return scout::cli::Generate(argc - 2, argv + 2);
  if (cmd == "eval") return scout::cli::Eval(argc - 2, argv + 2);
  if (cmd == "calibrate") return scout::cli::Calibrate(argc - 2, argv + 2);
  if (cmd == "serve") return scout::cli::Serve(argc - 2, argv + 2);
  if (cmd == "kvstore") return scout::cli::KvStore(argc - 2, argv + 2);
  if (cmd == "coordinator") return scout::cli::Coordinator(argc - 2, argv + 2);
  if (cmd == "worker") return scout::cli::Worker(argc - 2, argv + 2);
  if (cmd == "bench") return scout::cli::Bench(argc, argv);
  std::fprintf(stderr, "scout: unknown command \"%s\"\n", cmd.c_str());
  scout::cli::Usage();
  return 2;
}
