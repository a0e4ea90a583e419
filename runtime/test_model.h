// Test helper: writes small random Llama checkpoints in Hugging Face layout.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "runtime/model_config.h"

namespace scout::runtime::testing {

// A small GQA config: 2 layers, hidden 32, 4 query / 2 KV heads of 16, vocab 40.
ModelConfig TinyConfig();

// config.json text for `c` in the classic (transformers 4) form.
std::string ConfigJson(const ModelConfig& c);

// Writes config.json and random weights (normal, std 0.2; norms near 1) into dir, in bf16,
// as `shards` files with an index when shards > 1.
void WriteRandomModel(const std::filesystem::path& dir, const ModelConfig& c, uint32_t seed, int shards = 1);

// n token ids uniform in [0, vocab), from a seeded generator.
std::vector<int32_t> RandomTokens(int n, int vocab, uint32_t seed);

// A fresh empty directory under the test's temporary folder.
std::filesystem::path FreshDir(const std::string& name);

}  // namespace scout::runtime::testing
