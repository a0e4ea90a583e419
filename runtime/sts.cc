#include "runtime/sts.h"

#include <algorithm>
#include <cmath>
#include <fstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "kernels/block_select.h"
#include "nlohmann/json.hpp"

namespace scout::runtime {

HeadMap SelfHeadMap(const ModelConfig& draft) {
  HeadMap m{.target_layers = static_cast<int>(draft.num_hidden_layers),
            .target_kv_heads = static_cast<int>(draft.num_key_value_heads),
            .draft_layers = static_cast<int>(draft.num_hidden_layers),
            .draft_heads = static_cast<int>(draft.num_attention_heads),
            .units = {}};
  const int group = m.draft_heads / m.target_kv_heads;
  for (int l = 0; l < m.target_layers; ++l) {
    for (int h = 0; h < m.target_kv_heads; ++h) {
      std::vector<int32_t> heads;
      for (int g = 0; g < group; ++g) heads.push_back(l * m.draft_heads + h * group + g);
      m.units.push_back(heads);
    }
  }
  return m;
}

HeadMap DefaultHeadMap(const ModelConfig& target, const ModelConfig& draft) {
  HeadMap m{.target_layers = static_cast<int>(target.num_hidden_layers),
            .target_kv_heads = static_cast<int>(target.num_key_value_heads),
            .draft_layers = static_cast<int>(draft.num_hidden_layers),
            .draft_heads = static_cast<int>(draft.num_attention_heads),
            .units = {}};
  for (int l = 0; l < m.target_layers; ++l) {
    const int dl = static_cast<int>(int64_t{l} * m.draft_layers / m.target_layers);
    for (int h = 0; h < m.target_kv_heads; ++h) {
      std::vector<int32_t> heads;
      for (int dh = 0; dh < m.draft_heads; ++dh) heads.push_back(dl * m.draft_heads + dh);
      m.units.push_back(heads);
    }
  }
  return m;
}

absl::StatusOr<HeadMap> LoadHeadMap(const std::filesystem::path& path, const ModelConfig& target,
                                    const ModelConfig& draft) {
  absl::StatusOr<std::string> text = ReadFile(path);
  if (!text.ok()) return text.status();
  const std::string name = path.string();
  auto bad = [&](const std::string& why) { return absl::InvalidArgumentError(absl::StrCat(name, ": ", why)); };
  nlohmann::json j = nlohmann::json::parse(*text, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return bad("not a JSON object");
  try {
    HeadMap m{.target_layers = j.at("target").at("layers").get<int>(),
              .target_kv_heads = j.at("target").at("kv_heads").get<int>(),
              .draft_layers = j.at("draft").at("layers").get<int>(),
              .draft_heads = j.at("draft").at("heads").get<int>(),
              .units = j.at("map").get<std::vector<std::vector<int32_t>>>()};
    if (m.target_layers != target.num_hidden_layers || m.target_kv_heads != target.num_key_value_heads) {
      return bad(absl::StrCat("\"target\" is ", m.target_layers, " layers x ", m.target_kv_heads,
                              " KV heads but the target model has ", target.num_hidden_layers, " x ",
                              target.num_key_value_heads));
    }
    if (m.draft_layers != draft.num_hidden_layers || m.draft_heads != draft.num_attention_heads) {
      return bad(absl::StrCat("\"draft\" is ", m.draft_layers, " layers x ", m.draft_heads,
                              " heads but the draft model has ", draft.num_hidden_layers, " x ",
                              draft.num_attention_heads));
    }
    if (m.units.size() != static_cast<size_t>(m.target_layers) * m.target_kv_heads) {
      return bad(absl::StrCat("\"map\" has ", m.units.size(), " entries, expected ", m.target_layers * m.target_kv_heads));
    }
    for (size_t u = 0; u < m.units.size(); ++u) {
      if (m.units[u].empty()) return bad(absl::StrCat("\"map\"[", u, "] names no draft head"));
      for (int32_t h : m.units[u]) {
        if (h < 0 || h >= m.draft_layers * m.draft_heads) {
          return bad(absl::StrCat("\"map\"[", u, "] names draft head ", h, " of ", m.draft_layers * m.draft_heads));
        }
      }
    }
    return m;
  } catch (const nlohmann::json::exception& e) {
    return bad(absl::StrCat("malformed head map: ", e.what()));
  }
}

absl::Status SaveHeadMap(const std::filesystem::path& path, const HeadMap& m) {
  nlohmann::json j = {{"target", {{"layers", m.target_layers}, {"kv_heads", m.target_kv_heads}}},
                      {"draft", {{"layers", m.draft_layers}, {"heads", m.draft_heads}}},
                      {"map", m.units}};
  std::ofstream out(path);
  out << j.dump(1) << "\n";
  if (!out) return absl::InternalError(absl::StrCat(path.string(), ": write failed"));
  return absl::OkStatus();
}

int64_t BudgetBlocks(const StsBudget& b, int64_t nb) {
  int64_t want = b.budget_tokens > 0 ? (b.budget_tokens + kvstore::kBlockSize - 1) / kvstore::kBlockSize
                                     : static_cast<int64_t>(std::ceil(b.budget_fraction * nb));
  want = std::max<int64_t>(want, b.sink_blocks + b.window_blocks);
  return std::min(want, nb);
}

namespace {

// Runs the block-selection reference on masses laid out [units' sources][rows][mass_blocks],
// padded to nb blocks.
kvstore::Selection Select(int layers, int kv_heads, const std::vector<std::vector<int32_t>>& sources,
                          int num_sources, std::span<const float> mass, int rows, int64_t mass_blocks, int64_t nb,
                          const StsBudget& budget) {
  // kernels::BlockSelectRef wants [positions][sources][nb].
  std::vector<float> m(static_cast<size_t>(rows) * num_sources * nb, 0.0f);
  for (int src = 0; src < num_sources; ++src) {
    for (int r = 0; r < rows; ++r) {
      const float* from = mass.data() + (static_cast<size_t>(src) * rows + r) * mass_blocks;
      std::copy(from, from + mass_blocks, m.begin() + (static_cast<size_t>(r) * num_sources + src) * nb);
    }
  }
  std::vector<int32_t> indptr = {0}, heads;
  for (const auto& u : sources) {
    heads.insert(heads.end(), u.begin(), u.end());
    indptr.push_back(static_cast<int32_t>(heads.size()));
  }
  const int32_t nb32 = static_cast<int32_t>(nb);
  const int units = layers * kv_heads;
  const int64_t len = BudgetBlocks(budget, nb);
  std::vector<int32_t> out_indptr = kernels::SelectionOffsets({nb32}, units, static_cast<int>(len), budget.sink_blocks,
                                                              budget.window_blocks);
  kvstore::Selection sel{.num_layers = layers, .num_kv_heads = kv_heads, .indptr = out_indptr,
                         .blocks = std::vector<int32_t>(out_indptr.back())};
  kernels::BlockSelectRef({.mass = m.data(), .num_blocks = &nb32, .map_indptr = indptr.data(),
                           .map_heads = heads.data(), .out_indptr = out_indptr.data(), .out_blocks = sel.blocks.data(),
                           .num_seqs = 1, .num_positions = rows, .num_draft_heads = num_sources,
                           .max_blocks = nb32, .num_units = units, .budget_blocks = static_cast<int>(len),
                           .sink_blocks = budget.sink_blocks, .window_blocks = budget.window_blocks});
  return sel;
}

}  // namespace

absl::StatusOr<std::vector<int>> ParseDenseLayers(absl::string_view text) {
  std::vector<int> layers;
  for (absl::string_view part : absl::StrSplit(text, ',', absl::SkipEmpty())) {
    int l = 0;
    if (!absl::SimpleAtoi(part, &l)) {
      return absl::InvalidArgumentError(absl::StrCat("dense layers: \"", part, "\" is not a layer index"));
    }
    layers.push_back(l);
  }
  return layers;
}

void ApplyDenseLayers(const StsBudget& budget, int64_t nb, kvstore::Selection* sel) {
  if (budget.dense_layers.empty()) return;
  const int kvh = sel->num_kv_heads;
  kvstore::Selection out{.num_layers = sel->num_layers, .num_kv_heads = kvh, .indptr = {0}, .blocks = {}};
  for (int u = 0; u < sel->num_layers * kvh; ++u) {
    if (budget.IsDenseLayer(u / kvh, sel->num_layers)) {
      for (int64_t b = 0; b < nb; ++b) out.blocks.push_back(static_cast<int32_t>(b));
    } else {
      out.blocks.insert(out.blocks.end(), sel->blocks.begin() + sel->indptr[u], sel->blocks.begin() + sel->indptr[u + 1]);
    }
    out.indptr.push_back(static_cast<int32_t>(out.blocks.size()));
  }
  *sel = std::move(out);
}

kvstore::Selection BuildStsSelection(const HeadMap& map, std::span<const float> draft_mass, int rows,
                                     int64_t mass_blocks, int64_t nb, const StsBudget& budget) {
  kvstore::Selection sel = Select(map.target_layers, map.target_kv_heads, map.units, map.draft_layers * map.draft_heads,
                                  draft_mass, rows, mass_blocks, nb, budget);
  ApplyDenseLayers(budget, nb, &sel);
  return sel;
}

kvstore::Selection BuildOracleSelection(const ModelConfig& t, std::span<const float> target_mass, int rows,
                                        int64_t mass_blocks, int64_t nb, const StsBudget& budget) {
  return BuildStsSelection(SelfHeadMap(t), target_mass, rows, mass_blocks, nb, budget);
}

kvstore::Selection BuildWindowSelection(const ModelConfig& t, int64_t nb, const StsBudget& budget) {
  const int layers = static_cast<int>(t.num_hidden_layers), kvh = static_cast<int>(t.num_key_value_heads);
  const int64_t len = BudgetBlocks(budget, nb);
  kvstore::Selection sel{.num_layers = layers, .num_kv_heads = kvh, .indptr = {0}, .blocks = {}};
  for (int u = 0; u < layers * kvh; ++u) {
    for (int64_t b = 0; b < nb; ++b) {
      if (b < budget.sink_blocks || b >= nb - (len - std::min<int64_t>(budget.sink_blocks, len))) {
        sel.blocks.push_back(static_cast<int32_t>(b));
      }
    }
    sel.indptr.push_back(static_cast<int32_t>(sel.blocks.size()));
  }
  ApplyDenseLayers(budget, nb, &sel);
  return sel;
}

}  // namespace scout::runtime
