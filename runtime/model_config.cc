#include "runtime/model_config.h"

#include <cerrno>
#include <algorithm>
#include <cstring>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "nlohmann/json.hpp"

namespace scout::runtime {
namespace {

using nlohmann::json;

absl::Status Bad(absl::string_view source, absl::string_view msg) {
  return absl::InvalidArgumentError(absl::StrCat(source, ": ", msg));
}

// Reads an integer field; required fields without a value are an error.
absl::Status GetInt(const json& j, absl::string_view source, const char* key, int64_t* out, bool required) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    return required ? Bad(source, absl::StrCat("missing field \"", key, "\"")) : absl::OkStatus();
  }
  if (!it->is_number_integer()) return Bad(source, absl::StrCat("field \"", key, "\" must be an integer"));
  *out = it->get<int64_t>();
  return absl::OkStatus();
}

absl::Status GetDouble(const json& j, absl::string_view source, const char* key, double* out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_number()) return Bad(source, absl::StrCat("field \"", key, "\" must be a number"));
  *out = it->get<double>();
  return absl::OkStatus();
}

absl::Status Unsupported(absl::string_view source, absl::string_view msg) {
  return absl::UnimplementedError(absl::StrCat(source, ": ", msg));
}

// The rope settings of config.json. transformers 5 writes {"rope_parameters": {"rope_type": ...,
// "rope_theta": ..., ...}}; earlier versions write "rope_theta" and an optional "rope_scaling"
// object ("type" before "rope_type"). `field` names the object in messages.
absl::Status ParseRope(const json& j, absl::string_view source, int64_t max_position_embeddings, RopeConfig* rope) {
  const json* scaling = nullptr;
  std::string field;
  if (auto it = j.find("rope_parameters"); it != j.end() && it->is_object()) {
    scaling = &*it;
    field = "rope_parameters";
    for (const char* per_layer : {"full_attention", "sliding_attention"}) {
      if (it->contains(per_layer)) {
        return Unsupported(source, absl::StrCat("\"rope_parameters\" per layer type (\"", per_layer,
                                                "\") is not supported"));
      }
    }
    if (absl::Status s = GetDouble(*it, source, "rope_theta", &rope->theta); !s.ok()) return s;
  } else if (auto it2 = j.find("rope_scaling"); it2 != j.end() && it2->is_object()) {
    scaling = &*it2;
    field = "rope_scaling";
  }
  if (absl::Status s = GetDouble(j, source, "rope_theta", &rope->theta); !s.ok()) return s;
  for (const json* obj : {&j, scaling}) {
    if (obj == nullptr) continue;
    if (auto p = obj->find("partial_rotary_factor"); p != obj->end() && !p->is_null() &&
                                                     !(p->is_number() && p->get<double>() == 1.0)) {
      return Unsupported(source, absl::StrCat("\"partial_rotary_factor\": ", p->dump(), " is not supported (1.0 only)"));
    }
  }
  if (scaling == nullptr) return absl::OkStatus();
  std::string type = "default";
  for (const char* key : {"rope_type", "type"}) {
    if (auto t = scaling->find(key); t != scaling->end() && t->is_string()) {
      type = t->get<std::string>();
      break;
    }
  }
  if (type == "dynamic") {
    return Unsupported(source, absl::StrCat("\"", field, "\": rope_type \"dynamic\" is not supported (its frequencies "
                                            "change with the length of each forward pass)"));
  }
  if (type != "default" && type != "linear" && type != "llama3" && type != "yarn") {
    return Unsupported(source, absl::StrCat("\"", field, "\": rope_type \"", type,
                                            "\" is not supported (supported: default, linear, llama3, yarn)"));
  }
  rope->type = type;
  auto need = [&](const char* key, double* dst) -> absl::Status {
    if (!scaling->contains(key) || (*scaling)[key].is_null()) {
      return Bad(source, absl::StrCat(type, " rope scaling lacks \"", key, "\" in \"", field, "\""));
    }
    return GetDouble(*scaling, source, key, dst);
  };
  if (type == "linear") {
    if (absl::Status s = need("factor", &rope->factor); !s.ok()) return s;
    if (rope->factor <= 0) return Bad(source, "linear rope scaling needs factor > 0");
  } else if (type == "llama3") {
    for (auto [key, dst] : {std::pair{"factor", &rope->factor}, std::pair{"low_freq_factor", &rope->low_freq_factor},
                            std::pair{"high_freq_factor", &rope->high_freq_factor}}) {
      if (absl::Status s = need(key, dst); !s.ok()) return s;
    }
    if (absl::Status s = GetInt(*scaling, source, "original_max_position_embeddings",
                                &rope->original_max_position_embeddings, true);
        !s.ok()) {
      return s;
    }
    if (rope->factor <= 0 || rope->high_freq_factor <= rope->low_freq_factor) {
      return Bad(source, "llama3 rope scaling needs factor > 0 and high_freq_factor > low_freq_factor");
    }
  } else if (type == "yarn") {
    // As transformers 5's standardize_rope_params: a top-level original_max_position_embeddings
    // wins, then the one in the rope object, then max_position_embeddings.
    rope->original_max_position_embeddings = max_position_embeddings;
    if (absl::Status s = GetInt(*scaling, source, "original_max_position_embeddings",
                                &rope->original_max_position_embeddings, false);
        !s.ok()) {
      return s;
    }
    if (absl::Status s = GetInt(j, source, "original_max_position_embeddings", &rope->original_max_position_embeddings,
                                false);
        !s.ok()) {
      return s;
    }
    if (rope->original_max_position_embeddings <= 0) {
      return Bad(source, "yarn rope scaling needs original_max_position_embeddings > 0");
    }
    // transformers 5 takes "factor" as given; only a missing one is derived from the lengths
    // (transformers 4 replaced it by that ratio whenever original_max_position_embeddings was set).
    rope->factor = static_cast<double>(max_position_embeddings) /
                   static_cast<double>(rope->original_max_position_embeddings);
    for (auto [key, dst] : {std::pair{"factor", &rope->factor}, std::pair{"beta_fast", &rope->beta_fast},
                            std::pair{"beta_slow", &rope->beta_slow}, std::pair{"mscale", &rope->mscale},
                            std::pair{"mscale_all_dim", &rope->mscale_all_dim},
                            std::pair{"attention_factor", &rope->attention_factor}}) {
      if (absl::Status s = GetDouble(*scaling, source, key, dst); !s.ok()) return s;
    }
    // transformers reads `beta_fast or 32`: a zero means the default too.
    if (rope->beta_fast == 0) rope->beta_fast = 32.0;
    if (rope->beta_slow == 0) rope->beta_slow = 1.0;
    if (auto t = scaling->find("truncate"); t != scaling->end() && !t->is_null()) {
      if (!t->is_boolean()) return Bad(source, absl::StrCat("field \"truncate\" in \"", field, "\" must be a boolean"));
      rope->truncate = t->get<bool>();
    }
    if (rope->factor <= 0) return Bad(source, "yarn rope scaling needs factor > 0");
    if (rope->attention_factor < 0) return Bad(source, "yarn rope scaling needs attention_factor >= 0");
  }
  return absl::OkStatus();
}

// Which layers slide, for the architectures that have sliding windows. Mistral: every layer when
// "sliding_window" is set (transformers ignores "layer_types" for Mistral). Qwen2: the window
// only with "use_sliding_window", on the layers "layer_types" marks "sliding_attention", or,
// without layer_types (transformers 4), on layers >= "max_window_layers".
absl::Status ParseSlidingWindow(const json& j, absl::string_view source, ModelConfig* c) {
  if (c->architecture == "LlamaForCausalLM") return absl::OkStatus();  // Llama has no window
  int64_t window = 0;
  if (absl::Status s = GetInt(j, source, "sliding_window", &window, false); !s.ok()) return s;
  if (window < 0) return Bad(source, absl::StrCat("field \"sliding_window\" must be positive, got ", window));
  const int64_t layers = c->num_hidden_layers;
  std::vector<bool> sliding(layers, false);
  if (c->architecture == "MistralForCausalLM") {
    if (window == 0) return absl::OkStatus();
    sliding.assign(layers, true);
  } else {  // Qwen2ForCausalLM
    const bool use = j.value("use_sliding_window", false);
    if (!use) window = 0;
    if (auto lt = j.find("layer_types"); lt != j.end() && !lt->is_null()) {
      if (!lt->is_array() || static_cast<int64_t>(lt->size()) != layers) {
        return Bad(source, absl::StrCat("field \"layer_types\" must list num_hidden_layers (", layers, ") strings"));
      }
      for (int64_t i = 0; i < layers; ++i) {
        const json& t = (*lt)[i];
        const std::string type = t.is_string() ? t.get<std::string>() : t.dump();
        if (type == "sliding_attention") {
          sliding[i] = true;
        } else if (type != "full_attention") {
          return Unsupported(source, absl::StrCat("\"layer_types\"[", i, "]: \"", type,
                                                  "\" is not supported (full_attention, sliding_attention)"));
        }
      }
      const bool any = std::find(sliding.begin(), sliding.end(), true) != sliding.end();
      if (any && window == 0) {
        return Bad(source, "\"layer_types\" has sliding_attention layers but no \"sliding_window\" is in effect "
                           "(\"use_sliding_window\" false or \"sliding_window\" null)");
      }
      if (!any) return absl::OkStatus();
    } else {
      if (window == 0) return absl::OkStatus();
      int64_t max_window_layers = 28;  // transformers' default
      if (absl::Status s = GetInt(j, source, "max_window_layers", &max_window_layers, false); !s.ok()) return s;
      for (int64_t i = 0; i < layers; ++i) sliding[i] = i >= max_window_layers;
      if (max_window_layers >= layers) return absl::OkStatus();
    }
  }
  c->sliding_window = window;
  c->sliding_layers = std::move(sliding);
  return absl::OkStatus();
}

}  // namespace

static absl::StatusOr<ModelConfig> ParseConfigJson(absl::string_view json_text, absl::string_view source) {
  json j = json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return Bad(source, "not valid JSON");
  if (!j.is_object()) return Bad(source, "top level is not a JSON object");
  ModelConfig c;

  std::vector<std::string> archs;
  if (auto it = j.find("architectures"); it != j.end() && it->is_array()) {
    for (const json& a : *it) {
      if (a.is_string()) archs.push_back(a.get<std::string>());
    }
  }
  std::string model_type = j.value("model_type", "");
  if (archs.empty()) return Bad(source, "missing field \"architectures\"");
  c.architecture = archs.front();
  // Each architecture Scout runs, with the model_type transformers writes for it.
  const std::pair<const char*, const char*> kArchitectures[] = {
      {"LlamaForCausalLM", "llama"}, {"Qwen2ForCausalLM", "qwen2"}, {"MistralForCausalLM", "mistral"}};
  const char* want_type = nullptr;
  for (auto [arch, type] : kArchitectures) {
    if (c.architecture == arch) want_type = type;
  }
  if (want_type == nullptr || (!model_type.empty() && model_type != want_type)) {
    return absl::UnimplementedError(absl::StrCat(source, ": unsupported architecture \"",
                                                 absl::StrJoin(archs, ","), "\" (model_type \"", model_type,
                                                 "\"); Scout runs LlamaForCausalLM, Qwen2ForCausalLM and "
                                                 "MistralForCausalLM"));
  }
  struct IntField {
    const char* key;
    int64_t* dst;
    bool required;
  };
  for (const IntField& f : {IntField{"vocab_size", &c.vocab_size, true}, {"hidden_size", &c.hidden_size, true},
                            {"intermediate_size", &c.intermediate_size, true},
                            {"num_hidden_layers", &c.num_hidden_layers, true},
                            {"num_attention_heads", &c.num_attention_heads, true},
                            {"num_key_value_heads", &c.num_key_value_heads, false},
                            {"head_dim", &c.head_dim, false},
                            {"max_position_embeddings", &c.max_position_embeddings, true},
                            {"bos_token_id", &c.bos_token_id, false}}) {
    if (absl::Status s = GetInt(j, source, f.key, f.dst, f.required); !s.ok()) return s;
  }
  if (c.num_key_value_heads == 0) c.num_key_value_heads = c.num_attention_heads;
  if (c.num_attention_heads > 0 && c.head_dim == 0) c.head_dim = c.hidden_size / c.num_attention_heads;
  if (absl::Status s = GetDouble(j, source, "rms_norm_eps", &c.rms_norm_eps); !s.ok()) return s;
  if (absl::Status s = ParseRope(j, source, c.max_position_embeddings, &c.rope); !s.ok()) return s;
  c.tie_word_embeddings = j.value("tie_word_embeddings", false);
  if (auto it = j.find("eos_token_id"); it != j.end()) {
    if (it->is_number_integer()) {
      c.eos_token_ids.push_back(it->get<int64_t>());
    } else if (it->is_array()) {
      for (const json& e : *it) {
        if (!e.is_number_integer()) return Bad(source, "field \"eos_token_id\" must hold integers");
        c.eos_token_ids.push_back(e.get<int64_t>());
      }
    }
  }

  if (c.architecture == "Qwen2ForCausalLM") {
    c.qkv_bias = true;  // Qwen2's q, k and v projections always have biases, its output projection none
  } else if (c.architecture == "LlamaForCausalLM") {
    c.qkv_bias = c.o_bias = j.value("attention_bias", false);  // Llama's flag covers o_proj too
  }
  // Features of the Llama family that Scout does not run yet: refuse them by name.
  if (j.value("mlp_bias", false)) return absl::UnimplementedError(absl::StrCat(source, ": \"mlp_bias\": true is not supported"));
  if (std::string act = j.value("hidden_act", "silu"); act != "silu") {
    return absl::UnimplementedError(absl::StrCat(source, ": \"hidden_act\": \"", act, "\" is not supported (silu only)"));
  }

  for (auto [name, v] : {std::pair{"vocab_size", c.vocab_size}, {"hidden_size", c.hidden_size},
                         {"intermediate_size", c.intermediate_size}, {"num_hidden_layers", c.num_hidden_layers},
                         {"num_attention_heads", c.num_attention_heads}, {"num_key_value_heads", c.num_key_value_heads},
                         {"head_dim", c.head_dim}, {"max_position_embeddings", c.max_position_embeddings}}) {
    if (v <= 0) return Bad(source, absl::StrCat("field \"", name, "\" must be positive, got ", v));
  }
  if (c.num_attention_heads % c.num_key_value_heads != 0) {
    return Bad(source, absl::StrCat("num_attention_heads (", c.num_attention_heads,
                                    ") is not a multiple of num_key_value_heads (", c.num_key_value_heads, ")"));
  }
  if (c.head_dim % 2 != 0) return Bad(source, absl::StrCat("head_dim must be even for RoPE, got ", c.head_dim));
  if (c.rms_norm_eps <= 0) return Bad(source, "rms_norm_eps must be positive");
  if (c.rope.theta <= 0) return Bad(source, "rope_theta must be positive");
  if (absl::Status s = ParseSlidingWindow(j, source, &c); !s.ok()) return s;
  return c;
}

absl::StatusOr<ModelConfig> ParseModelConfig(absl::string_view json_text, absl::string_view source) {
  // nlohmann::json throws on a field of the wrong type (value(), get<>()): keep that inside.
  try {
    return ParseConfigJson(json_text, source);
  } catch (const nlohmann::json::exception& e) {
    return Bad(source, absl::StrCat("malformed field: ", e.what()));
  }
}

absl::StatusOr<std::string> ReadFile(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    int err = errno;
    if (err == ENOENT) return absl::NotFoundError(absl::StrCat(path.string(), ": no such file"));
    if (err == EACCES) return absl::PermissionDeniedError(absl::StrCat(path.string(), ": permission denied"));
    return absl::InternalError(absl::StrCat(path.string(), ": cannot open: ", std::strerror(err)));
  }
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) return absl::InternalError(absl::StrCat(path.string(), ": read failed"));
  return ss.str();
}

absl::StatusOr<ModelConfig> LoadModelConfig(const std::filesystem::path& model_dir) {
  std::filesystem::path path = model_dir / "config.json";
  absl::StatusOr<std::string> text = ReadFile(path);
  if (!text.ok()) return text.status();
  return ParseModelConfig(*text, path.string());
}

}  // namespace scout::runtime
