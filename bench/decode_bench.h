// `scout bench decode`: end-to-end decode throughput of the CUDA backend at production shapes
// (random weights), dense autoregressive against dense speculative, STS speculative and STS +
// SANTA, with the time split and the memory roofline measured in the same run.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace scout::bench {

struct DecodeBenchOptions {
  std::string target = "llama-3.1-8b";  // a preset name or a config.json path
  std::string draft = "llama-3.2-1b";
  std::vector<int64_t> contexts = {32768, 131072};
  std::vector<int> batches = {1, 8};
  int k = 4;                  // draft tokens per round
  double accepted = 3.0;      // assumed accepted draft tokens per round (random weights accept none)
  double budget_fraction = 0.1;  // STS: blocks kept per (layer, KV head), sinks and window included
  int sink_blocks = 1;
  int window_blocks = 4;
  int santa_samples = 512;
  int draft_refresh_rounds = 4;  // the "-sd/R" rows: the sparse draft's dense step every R rounds
  int iters = 20;             // timed rounds per configuration
  int device = 0;
  // Contexts run with the target's KV in the host store (the host KV tier: pinned host memory,
  // a GPU block cache, per-step prefetch of the selected units), mode STS-spec-sd/R;
  // the draft runs on draft_device (-1: device) with its KV on that GPU.
  std::vector<int64_t> host_contexts;
  std::vector<int> host_batches = {1};
  int draft_device = -1;
  int64_t gpu_cache_units = 0;  // target's GPU block cache in units (0: what the GPU has room for)
  bool signalled_prefetch = true;  // CudaModelOptions::signalled_prefetch of the host-store runs
  std::vector<double> host_budget_fractions = {0.02};  // STS budgets of the host-store runs
  // Host-store runs: fraction of each target list's blocks replaced every round (random weights
  // select the same blocks every round, so the turnover is set explicitly, as acceptance is).
  std::vector<double> host_turnovers = {0.0, 0.17, 0.5, 1.0};  // 0.17: measured on the fixture pair (FIDELITY.md)
  std::string json_out;       // optional: results as JSON lines
};

// Prints the table; returns a process exit code (non-zero with a message on error).
int RunDecodeBench(const DecodeBenchOptions& options);

}  // namespace scout::bench
