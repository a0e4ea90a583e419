#include "runtime/model_config.h"

#include <cerrno>
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

absl::Status ParseRope(const json& j, absl::string_view source, RopeConfig* rope) {
  // transformers 5 writes {"rope_parameters": {"rope_type": ..., "rope_theta": ..., ...}};
  // earlier versions write "rope_theta" and an optional "rope_scaling" object.
  const json* scaling = nullptr;
  if (auto it = j.find("rope_parameters"); it != j.end() && it->is_object()) {
    scaling = &*it;
    if (absl::Status s = GetDouble(*it, source, "rope_theta", &rope->theta); !s.ok()) return s;
  } else if (auto it2 = j.find("rope_scaling"); it2 != j.end() && it2->is_object()) {
    scaling = &*it2;
  }
  if (absl::Status s = GetDouble(j, source, "rope_theta", &rope->theta); !s.ok()) return s;
  if (scaling == nullptr) return absl::OkStatus();
  std::string type = "default";
  for (const char* key : {"rope_type", "type"}) {
    if (auto t = scaling->find(key); t != scaling->end() && t->is_string()) {
      type = t->get<std::string>();
      break;
    }
  }
  if (type != "default" && type != "llama3") {
    return absl::UnimplementedError(absl::StrCat(source, ": rope scaling type \"", type,
                                                 "\" is not supported (supported: default, llama3)"));
  }
  rope->type = type;
  if (type == "llama3") {
    for (auto [key, dst] : {std::pair{"factor", &rope->factor}, std::pair{"low_freq_factor", &rope->low_freq_factor},
                            std::pair{"high_freq_factor", &rope->high_freq_factor}}) {
      if (!scaling->contains(key)) return Bad(source, absl::StrCat("llama3 rope scaling lacks \"", key, "\""));
      if (absl::Status s = GetDouble(*scaling, source, key, dst); !s.ok()) return s;
    }
    if (absl::Status s = GetInt(*scaling, source, "original_max_position_embeddings",
                                &rope->original_max_position_embeddings, true);
        !s.ok()) {
      return s;
    }
    if (rope->factor <= 0 || rope->high_freq_factor <= rope->low_freq_factor) {
      return Bad(source, "llama3 rope scaling needs factor > 0 and high_freq_factor > low_freq_factor");
    }
  }
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
  if (c.architecture != "LlamaForCausalLM" || (!model_type.empty() && model_type != "llama")) {
    return absl::UnimplementedError(absl::StrCat(source, ": unsupported architecture \"",
                                                 absl::StrJoin(archs, ","), "\" (model_type \"", model_type,
                                                 "\"); Scout runs LlamaForCausalLM"));
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
  if (absl::Status s = ParseRope(j, source, &c.rope); !s.ok()) return s;
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

  // Features of the Llama family that Scout does not run yet: refuse them by name.
  if (j.value("attention_bias", false)) return absl::UnimplementedError(absl::StrCat(source, ": \"attention_bias\": true is not supported"));
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
