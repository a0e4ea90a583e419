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
  std::string json_out;       // optional: results as JSON lines
};

// Prints the table; returns a process exit code (non-zero with a message on error).
int RunDecodeBench(const DecodeBenchOptions& options);

}  // namespace scout::bench
