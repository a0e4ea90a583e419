#include "server/openai_server.h"

#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <optional>
#include <random>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "nlohmann/json.hpp"

namespace scout::server {
namespace {

using nlohmann::json;

// Token bytes may end inside a UTF-8 character (logprobs): such bytes become U+FFFD in JSON.
std::string Dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

void SendError(HttpResponder& out, int status, const std::string& message, const std::string& type,
               const std::string& param = "") {
  json err = {{"error", {{"message", message}, {"type", type}, {"code", status}}}};
  if (!param.empty()) err["error"]["param"] = param;
  out.Send(status, "application/json", err.dump());
}

// A chat message's content as one string: a string as it is, an array of parts (as agent
// frameworks send it) as its text parts joined. A part of another type, or another shape, is an
// error naming it (empty string returned, *error set).
template <typename Json>
std::string ContentText(const Json& content, std::string* error) {
  if (content.is_string()) return content.template get<std::string>();
  if (content.is_null()) return "";
  if (!content.is_array()) {
    *error = "a message's \"content\" must be a string or an array of text parts";
    return "";
  }
  std::string text;
  for (const auto& part : content) {
    if (!part.is_object() || !part.contains("type") || part["type"] != "text" || !part.contains("text") ||
        !part["text"].is_string()) {
      *error = absl::StrCat("content part ", part.dump(), " is not supported: only {\"type\": \"text\", \"text\": ...} parts are");
      return "";
    }
    text += part["text"].template get<std::string>();
  }
  return text;
}

// Fields this server does not implement yet: refused by name unless they ask for the default, so
// that nothing a client sets is silently ignored.
bool RefuseUnsupported(const json& j, bool chat, HttpResponder& out) {
  auto refuse = [&](const std::string& field, const std::string& why) {
    SendError(out, 400, absl::StrCat("\"", field, "\" is not supported by this server", why), "invalid_request_error", field);
    return true;
  };
  if (j.contains("best_of") && !j["best_of"].is_null() && !(j["best_of"].is_number_integer() && j["best_of"].get<int64_t>() == 1)) {
    return refuse("best_of", " (vLLM dropped it too: ask for n choices)");
  }
  if (j.contains("echo") && j["echo"].is_boolean() && j["echo"].get<bool>()) return refuse("echo", " yet");
  if (j.contains("logit_bias") && !j["logit_bias"].is_null() && !j["logit_bias"].empty()) return refuse("logit_bias", " yet");
  // `user` names the client's end user for the client's own records; a string is accepted and
  // has no effect, as in vLLM.
  if (j.contains("user") && !j["user"].is_null() && !j["user"].is_string()) {
    SendError(out, 400, "\"user\" must be a string", "invalid_request_error", "user");
    return true;
  }
  return false;
}

bool ValidSessionId(const std::string& id) {
  if (id.empty() || id.size() > 128) return false;
  return std::all_of(id.begin(), id.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == ':' || c == '-';
  });
}

// The HTTP status of an engine error: bad requests 400, a full server 429, models down 503.
int HttpStatusOf(absl::StatusCode code) {
  switch (code) {
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kOutOfRange:
      return 400;
    case absl::StatusCode::kResourceExhausted:
      return 429;
    case absl::StatusCode::kUnavailable:
      return 503;
    default:
      return 500;
  }
}

// One prompt of a request: text, or token ids.
struct PromptItem {
  std::string text;
  std::optional<std::vector<int32_t>> ids;
};

// The completions API's `prompt`: a string, token ids, or a batch of either (one choice each).
// std::nullopt when it is none of those.
std::optional<std::vector<PromptItem>> ParsePrompts(const json& prompt) {
  auto ids_of = [](const json& a) -> std::optional<std::vector<int32_t>> {
    if (!a.is_array() || a.empty()) return std::nullopt;
    std::vector<int32_t> ids;
    for (const json& x : a) {
      if (!x.is_number_integer()) return std::nullopt;
      const int64_t v = x.get<int64_t>();
      if (v < INT32_MIN || v > INT32_MAX) return std::nullopt;
      ids.push_back(static_cast<int32_t>(v));
    }
    return ids;
  };
  if (prompt.is_string()) return std::vector<PromptItem>{{.text = prompt.get<std::string>()}};
  if (!prompt.is_array() || prompt.empty()) return std::nullopt;
  if (std::optional<std::vector<int32_t>> ids = ids_of(prompt)) return std::vector<PromptItem>{{.ids = std::move(ids)}};
  std::vector<PromptItem> items;
  for (const json& p : prompt) {
    if (p.is_string()) {
      items.push_back({.text = p.get<std::string>()});
    } else if (std::optional<std::vector<int32_t>> ids = ids_of(p)) {
      items.push_back({.ids = std::move(ids)});
    } else {
      return std::nullopt;
    }
  }
  return items;
}

// An error for the client: OpenAI's error object with this status, message and param.
struct ApiError {
  int status = 400;
  std::string message;
  std::string param;
  bool Send(HttpResponder& out) const {
    SendError(out, status, message, "invalid_request_error", param);
    return false;
  }
};

// The chat request's messages as the prompt: through the model's chat template, or the
// fixtures' "Role: content" lines.
std::optional<ApiError> ChatPrompt(const json& j, const std::string& body, const text::ModelChatTemplate* chat_template,
                                   scheduler::CompletionRequest* req) {
  if (chat_template != nullptr) {
    // The model's own template. Parsed again keeping key order: tojson writes tool arguments as
    // the client ordered them.
    nlohmann::ordered_json oj = nlohmann::ordered_json::parse(body);
    for (auto& m : oj["messages"]) {  // content parts to text, as the templates expect
      if (!m.is_object() || !m.contains("content") || m["content"].is_string() || m["content"].is_null()) continue;
      std::string error;
      std::string text = ContentText(m["content"], &error);
      if (!error.empty()) {
        return ApiError{.message = error, .param = "messages"};
      }
      m["content"] = std::move(text);
    }
    nlohmann::ordered_json extra = nlohmann::ordered_json::object();
    if (oj.contains("tools") && !oj["tools"].is_null()) extra["tools"] = oj["tools"];
    absl::StatusOr<std::string> text = chat_template->Render(oj["messages"], /*add_generation_prompt=*/true, extra);
    if (!text.ok()) {
      return ApiError{.message = std::string(text.status().message()), .param = "messages"};
    }
    // The engine encodes prompts with the tokenizer's own BOS; the template's would be a second.
    if (!chat_template->bos_token.empty() && text->rfind(chat_template->bos_token, 0) == 0) {
      text->erase(0, chat_template->bos_token.size());
    }
    req->prompt = *std::move(text);
  } else {
    // The fixtures' chat template: one "Role: content" line per message, then the assistant's
    // turn opened.
    req->prompt.clear();
    for (const json& m : j["messages"]) {
      const std::string role = m.at("role").get<std::string>();
      if (role != "system" && role != "user" && role != "assistant") {
        return ApiError{.message = absl::StrCat("unknown role \"", role, "\""), .param = "messages"};
      }
      std::string r = role;
      r[0] = static_cast<char>(r[0] - 'a' + 'A');
      std::string error;
      const std::string content = ContentText(m.contains("content") ? m["content"] : json(), &error);
      if (!error.empty()) {
        return ApiError{.message = error, .param = "messages"};
      }
      absl::StrAppend(&req->prompt, r, ": ", content, "\n");
    }
    req->prompt += "Assistant:";
    req->stop.push_back("\nUser:");
  }
  return std::nullopt;
}

// Scout's own sparsity settings (a server with a draft).
void ScoutFields(const json& j, scheduler::CompletionRequest* req) {
  if (j.contains("sparsity") && !j["sparsity"].is_null()) req->sparsity = j["sparsity"].get<std::string>();
  if (j.contains("kv_budget_tokens") && !j["kv_budget_tokens"].is_null()) {
    req->kv_budget_tokens = j["kv_budget_tokens"].get<int64_t>();
  }
  if (j.contains("kv_budget_fraction") && !j["kv_budget_fraction"].is_null()) {
    req->kv_budget_fraction = j["kv_budget_fraction"].get<double>();
  }
  if (j.contains("dense_layers") && !j["dense_layers"].is_null()) {
    req->dense_layers = j["dense_layers"].get<std::vector<int>>();
  }
  if (j.contains("sparse_draft") && !j["sparse_draft"].is_null()) req->sparse_draft = j["sparse_draft"].get<bool>();
  if (j.contains("draft_kv_budget_fraction") && !j["draft_kv_budget_fraction"].is_null()) {
    req->draft_kv_budget_fraction = j["draft_kv_budget_fraction"].get<double>();
  }
  if (j.contains("draft_refresh_rounds") && !j["draft_refresh_rounds"].is_null()) {
    req->draft_refresh_rounds = j["draft_refresh_rounds"].get<int>();
  }
  if (j.contains("santa_samples") && !j["santa_samples"].is_null()) req->santa_samples = j["santa_samples"].get<int>();
}

// logprobs / top_logprobs and the penalties.
std::optional<ApiError> LogprobsAndPenalties(const json& j, bool chat, scheduler::CompletionRequest* req) {
  // logprobs: the completions API's is the number of alternatives; the chat API's a boolean
  // with top_logprobs the number.
  auto count = [&](const char* field, int64_t* v) -> std::optional<ApiError> {
    if (!j[field].is_number_integer() || j[field].get<int64_t>() < 0 || j[field].get<int64_t>() > scheduler::kMaxLogprobs) {
      return ApiError{.message = absl::StrCat("\"", field, "\" must be an integer from 0 to ", scheduler::kMaxLogprobs),
                      .param = field};
    }
    *v = j[field].get<int64_t>();
    return std::nullopt;
  };
  if (!chat && j.contains("logprobs") && !j["logprobs"].is_null()) {
    int64_t k = 0;
    if (std::optional<ApiError> e = count("logprobs", &k)) return e;
    req->logprobs = static_cast<int>(k);
  }
  if (chat) {
    const bool on = j.contains("logprobs") && !j["logprobs"].is_null() && j["logprobs"].get<bool>();
    int64_t k = 0;
    if (j.contains("top_logprobs") && !j["top_logprobs"].is_null()) {
      if (std::optional<ApiError> e = count("top_logprobs", &k)) return e;
      if (!on) return ApiError{.message = "\"top_logprobs\" needs \"logprobs\": true", .param = "top_logprobs"};
    }
    if (on) req->logprobs = static_cast<int>(k);
  }
  for (auto [field, value] : {std::pair{"presence_penalty", &req->penalties.presence},
                              std::pair{"frequency_penalty", &req->penalties.frequency},
                              std::pair{"repetition_penalty", &req->penalties.repetition}}) {
    if (!j.contains(field) || j[field].is_null()) continue;
    if (!j[field].is_number()) return ApiError{.message = absl::StrCat("\"", field, "\" must be a number"), .param = field};
    *value = j[field].get<float>();
  }
  if (absl::Status s = runtime::ValidatePenalties(req->penalties); !s.ok()) {
    const std::string message(s.message());
    return ApiError{.message = message, .param = message.substr(0, message.find(' '))};
  }
  return std::nullopt;
}

// Parses a completion request body. On error writes the OpenAI-style error and returns false.
// Choices a request may ask for (n): each is an engine request of its own.
constexpr int64_t kMaxChoices = 128;

bool ParseCompletion(const std::string& body, const std::string& model_name, bool chat,
                     const text::ModelChatTemplate* chat_template, scheduler::CompletionRequest* req, bool* stream,
                     bool* include_usage, std::vector<PromptItem>* prompts, int64_t* n, HttpResponder& out) {
  json j = json::parse(body, nullptr, false);
  if (j.is_discarded() || !j.is_object()) {
    SendError(out, 400, "request body is not a JSON object", "invalid_request_error");
    return false;
  }
  try {
    if (j.contains("model") && j["model"].get<std::string>() != model_name) {
      SendError(out, 404, absl::StrCat("model \"", j["model"].get<std::string>(), "\" does not exist; this server has \"",
                                       model_name, "\""), "invalid_request_error", "model");
      return false;
    }
    if (chat) {
      if (!j.contains("messages") || !j["messages"].is_array() || j["messages"].empty()) {
        SendError(out, 400, "\"messages\" must be a non-empty array", "invalid_request_error", "messages");
        return false;
      }
    }
    if (RefuseUnsupported(j, chat, out)) return false;
    if (chat) {
      if (std::optional<ApiError> e = ChatPrompt(j, body, chat_template, req); e.has_value()) return e->Send(out);
    } else if (!j.contains("prompt")) {
      SendError(out, 400, "\"prompt\" is required", "invalid_request_error", "prompt");
      return false;
    }
    std::optional<std::vector<PromptItem>> items = ParsePrompts(chat ? json(req->prompt) : j["prompt"]);
    if (!items.has_value()) {
      SendError(out, 400, "\"prompt\" must be a string, an array of token ids, or an array of either",
                "invalid_request_error", "prompt");
      return false;
    }
    *prompts = std::move(*items);
    req->prompt = prompts->front().text;
    req->prompt_ids = prompts->front().ids;
    req->max_tokens = j.value("max_tokens", int64_t{16});
    // The chat API's current name for it (the SDK sends this one); it wins over max_tokens.
    if (j.contains("max_completion_tokens") && !j["max_completion_tokens"].is_null()) {
      req->max_tokens = j["max_completion_tokens"].get<int64_t>();
    }
    req->sampling.temperature = j.value("temperature", 1.0f);
    req->sampling.top_p = j.value("top_p", 1.0f);
    req->sampling.top_k = j.value("top_k", 0);
    // Without a seed a request draws fresh randomness; with one it repeats.
    if (j.contains("seed") && !j["seed"].is_null()) {
      req->sampling.seed = j["seed"].get<uint64_t>();
    } else {
      static std::atomic<uint64_t> fresh{std::random_device{}() * 0x9E3779B97F4A7C15ull};
      req->sampling.seed = fresh.fetch_add(0xD1B54A32D192ED03ull);
    }
    req->ignore_eos = j.value("ignore_eos", false);
    if (j.contains("session_id") && !j["session_id"].is_null()) {
      req->session_id = j["session_id"].get<std::string>();
      if (!ValidSessionId(req->session_id)) {
        SendError(out, 400, "\"session_id\" must be 1 to 128 bytes of letters, digits and . _ : -",
                  "invalid_request_error", "session_id");
        return false;
      }
    }
    if (j.contains("stop") && !j["stop"].is_null()) {
      if (j["stop"].is_string()) {
        req->stop.push_back(j["stop"].get<std::string>());
      } else {
        for (const std::string& s : j["stop"].get<std::vector<std::string>>()) req->stop.push_back(s);
      }
    }
    ScoutFields(j, req);
    if (std::optional<ApiError> e = LogprobsAndPenalties(j, chat, req); e.has_value()) return e->Send(out);
    *n = 1;
    if (j.contains("n") && !j["n"].is_null()) {
      if (!j["n"].is_number_integer() || j["n"].get<int64_t>() < 1 || j["n"].get<int64_t>() > kMaxChoices) {
        SendError(out, 400, absl::StrCat("\"n\" must be an integer from 1 to ", kMaxChoices), "invalid_request_error", "n");
        return false;
      }
      *n = j["n"].get<int64_t>();
    }
    *stream = j.value("stream", false);
    if (j.contains("stream_options") && !j["stream_options"].is_null()) {
      *include_usage = j["stream_options"].value("include_usage", false);
    }
  } catch (const json::exception& e) {
    SendError(out, 400, absl::StrCat("malformed field: ", e.what()), "invalid_request_error");
    return false;
  }
  if (req->max_tokens < 1) {
    SendError(out, 400, absl::StrCat("\"max_tokens\" must be >= 1, got ", req->max_tokens), "invalid_request_error",
              "max_tokens");
    return false;
  }
  if (absl::Status s = runtime::ValidateSamplingParams(req->sampling); !s.ok()) {
    SendError(out, 400, std::string(s.message()), "invalid_request_error");
    return false;
  }
  return true;
}

// A choice's logprobs as the completions API gives them (tokens, token_logprobs, top_logprobs as
// token -> logprob maps, text_offset from `offset`, where the choice's text begins) ...
json CompletionLogprobs(std::span<const runtime::TokenLogprobs> lps, int64_t offset) {
  json tokens = json::array(), values = json::array(), tops = json::array(), offsets = json::array();
  for (const runtime::TokenLogprobs& lp : lps) {
    tokens.push_back(lp.chosen.bytes);
    values.push_back(lp.chosen.logprob);
    json top = json::object();
    for (const runtime::TokenLogprob& t : lp.top) top[t.bytes] = t.logprob;
    tops.push_back(std::move(top));
    offsets.push_back(offset);
    offset += static_cast<int64_t>(lp.chosen.bytes.size());
  }
  return {{"tokens", tokens}, {"token_logprobs", values}, {"top_logprobs", tops}, {"text_offset", offsets}};
}

// ... and as the chat API does (content: token, logprob, bytes, top_logprobs).
json ChatLogprobs(std::span<const runtime::TokenLogprobs> lps) {
  auto entry = [](const runtime::TokenLogprob& t) {
    std::vector<int> bytes(t.bytes.begin(), t.bytes.end());
    for (int& b : bytes) b &= 0xff;
    return json{{"token", t.bytes}, {"logprob", t.logprob}, {"bytes", bytes}};
  };
  json content = json::array();
  for (const runtime::TokenLogprobs& lp : lps) {
    json e = entry(lp.chosen);
    e["top_logprobs"] = json::array();
    for (const runtime::TokenLogprob& t : lp.top) e["top_logprobs"].push_back(entry(t));
    content.push_back(std::move(e));
  }
  return {{"content", content}};
}

json LogprobsJson(bool chat, std::span<const runtime::TokenLogprobs> lps, int64_t offset) {
  return chat ? ChatLogprobs(lps) : CompletionLogprobs(lps, offset);
}

// Several choices: a batch of prompts (completions API) and/or n choices of each, one engine
// request per choice, run at once; choice i*n + j is prompt i's j-th (OpenAI's order), each with
// its own seed (the request's + its index: distinct draws, repeatable with a seed), usage summed.
// Streamed, each choice's chunks carry its index and end with its finish_reason. Not on a session
// (a session continues one conversation): refused by name.
void RunChoices(scheduler::CompletionService* engine, const scheduler::CompletionRequest& base,
                const std::vector<PromptItem>& prompts, int64_t n, bool chat, bool stream, bool include_usage,
                const std::string& model_name, const std::string& id, HttpResponder& out) {
  if (!base.session_id.empty()) {
    SendError(out, 400,
              "a session continues one conversation: a request on one asks for one choice of one prompt (n 1)",
              "invalid_request_error", prompts.size() > 1 ? "prompt" : "n");
    return;
  }
  const size_t count = prompts.size() * static_cast<size_t>(n);
  const int64_t created =
      std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
  const char* chunk_object = chat ? "chat.completion.chunk" : "text_completion";
  const bool want_logprobs = base.logprobs.has_value();
  std::vector<int64_t> streamed_bytes(count, 0);  // text_offset of each choice's next chunk
  auto chunk = [&](size_t index, const std::string& text, const json& finish,
                   std::span<const runtime::TokenLogprobs> lps = {}) {
    json choice = {{"index", index}, {"logprobs", nullptr}, {"finish_reason", finish}};
    if (want_logprobs && !lps.empty()) choice["logprobs"] = LogprobsJson(chat, lps, streamed_bytes[index]);
    streamed_bytes[index] += static_cast<int64_t>(text.size());
    if (chat) {
      choice["delta"] = text.empty() ? json::object() : json{{"content", text}};
    } else {
      choice["text"] = text;
    }
    json c = {{"id", id}, {"object", chunk_object}, {"created", created}, {"model", model_name}, {"choices", {choice}}};
    return absl::StrCat("data: ", Dump(c), "\n\n");
  };
  absl::Mutex mu;  // the stream: one writer at a time
  bool began = false, gone = false;
  // Under mu: opens the stream once; false once the client has gone.
  auto write = [&](const std::string& data) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    if (gone) return false;
    if (!began) {
      began = true;
      if (!out.BeginStream("text/event-stream")) gone = true;
    }
    if (!gone && !out.Write(data)) gone = true;
    return !gone;
  };
  std::vector<absl::StatusOr<scheduler::CompletionResult>> results(count, absl::UnknownError("not run"));
  std::vector<std::thread> threads;
  for (size_t i = 0; i < count; ++i) {
    threads.emplace_back([&, i] {
      scheduler::CompletionRequest r = base;
      const PromptItem& p = prompts[i / static_cast<size_t>(n)];
      r.prompt = p.text;
      r.prompt_ids = p.ids;
      r.sampling.seed = base.sampling.seed + i;
      scheduler::TextCallback on_text;
      if (stream) {
        on_text = [&, i](absl::string_view text, std::span<const runtime::TokenLogprobs> lps,
                         std::span<const int32_t>) {
          if (text.empty() && (!want_logprobs || lps.empty())) return true;  // tokens without text
          absl::MutexLock lock(&mu);
          return write(chunk(i, std::string(text), nullptr, lps));
        };
      }
      results[i] = engine->Complete(r, on_text);
      if (!stream || !results[i].ok() || results[i]->finish_reason == "cancelled") return;
      absl::MutexLock lock(&mu);
      write(chunk(i, "", results[i]->finish_reason));
    });
  }
  for (std::thread& t : threads) t.join();
  int64_t prompt_tokens = 0, completion_tokens = 0, cached = 0;
  json choices = json::array();
  for (size_t i = 0; i < count; ++i) {
    if (!results[i].ok()) {
      if (stream) {
        absl::MutexLock lock(&mu);
        if (began) {  // the others' text is out: this one's error joins it
          const std::string message = absl::StrCat("choice ", i, ": ", results[i].status().message());
          write(absl::StrCat("data: ", json({{"error", {{"message", message}}}}).dump(), "\n\n"));
          continue;
        }
      }
      const int status = HttpStatusOf(results[i].status().code());
      SendError(out, status, absl::StrCat("choice ", i, ": ", results[i].status().message()),
                status == 400 ? "invalid_request_error" : "internal_error", prompts.size() > 1 ? "prompt" : "");
      return;
    }
    const scheduler::CompletionResult& r = *results[i];
    if (i % static_cast<size_t>(n) == 0) {  // a prompt's tokens count once, as OpenAI counts them
      prompt_tokens += r.prompt_tokens;
      cached += r.cached_tokens;
    }
    completion_tokens += r.completion_tokens;
    json choice = {{"index", i}, {"logprobs", nullptr}, {"finish_reason", r.finish_reason}};
    if (want_logprobs) choice["logprobs"] = LogprobsJson(chat, r.logprobs, 0);
    if (chat) {
      choice["message"] = {{"role", "assistant"}, {"content", r.text}};
    } else {
      choice["text"] = r.text;
    }
    choices.push_back(std::move(choice));
  }
  const json usage = {{"prompt_tokens", prompt_tokens}, {"completion_tokens", completion_tokens},
                      {"total_tokens", prompt_tokens + completion_tokens},
                      {"prompt_tokens_details", {{"cached_tokens", cached}}}};
  if (stream) {
    absl::MutexLock lock(&mu);
    if (include_usage) {
      json c = {{"id", id}, {"object", chunk_object}, {"created", created}, {"model", model_name},
                {"choices", json::array()}, {"usage", usage}};
      write(absl::StrCat("data: ", c.dump(), "\n\n"));
    }
    if (write("data: [DONE]\n\n")) out.EndStream();
    return;
  }
  json body = {{"id", id}, {"object", chat ? "chat.completion" : "text_completion"}, {"created", created},
               {"model", model_name}, {"choices", choices}, {"usage", usage}};
  out.Send(200, "application/json", Dump(body));
}

}  // namespace

const char* ScoutVersion() { return SCOUT_VERSION; }

namespace {

// POST /tokenize: {"prompt": text} or {"messages": [...]} (rendered as /v1/chat/completions
// would), "add_special_tokens" (default true: the BOS the engine adds to a new prompt) ->
// {"count", "max_model_len", "tokens"}, so that count is the usage.prompt_tokens of the same
// request. POST /detokenize: {"tokens": [ids]} -> {"prompt": text}.
void Tokenize(const HttpRequest& req, HttpResponder& out, const text::Tokenizer& tok, absl::Mutex& mu,
              scheduler::CompletionService* engine, const std::string& model_name,
              const text::ModelChatTemplate* chat_template) {
  json j = json::parse(req.body, nullptr, false);
  if (j.is_discarded() || !j.is_object()) {
    SendError(out, 400, "request body is not a JSON object", "invalid_request_error");
    return;
  }
  std::string text;
  if (j.contains("messages")) {
    scheduler::CompletionRequest creq;
    bool stream = false, include_usage = false;
    std::vector<PromptItem> prompts;
    int64_t n = 1;
    if (!ParseCompletion(req.body, model_name, /*chat=*/true, chat_template, &creq, &stream, &include_usage, &prompts,
                         &n, out)) {
      return;
    }
    text = creq.prompt;
  } else if (j.contains("prompt") && j["prompt"].is_string()) {
    if (j.contains("model") && j["model"] != model_name) {
      SendError(out, 404, absl::StrCat("model ", j["model"].dump(), " does not exist; this server has \"", model_name,
                                       "\""), "invalid_request_error", "model");
      return;
    }
    text = j["prompt"].get<std::string>();
  } else {
    SendError(out, 400, "\"prompt\" (a string) or \"messages\" is required", "invalid_request_error", "prompt");
    return;
  }
  const json& special = j.contains("add_special_tokens") ? j["add_special_tokens"] : json(true);
  if (!special.is_boolean()) {
    SendError(out, 400, "\"add_special_tokens\" must be a boolean", "invalid_request_error", "add_special_tokens");
    return;
  }
  std::vector<int32_t> ids;
  {
    absl::MutexLock lock(&mu);
    ids = tok.Encode(text, special.get<bool>());
  }
  out.Send(200, "application/json",
           json({{"count", ids.size()}, {"max_model_len", engine->max_model_len()}, {"tokens", ids}}).dump());
}

void Detokenize(const HttpRequest& req, HttpResponder& out, const text::Tokenizer& tok, absl::Mutex& mu) {
  json j = json::parse(req.body, nullptr, false);
  if (j.is_discarded() || !j.is_object() || !j.contains("tokens") || !j["tokens"].is_array()) {
    SendError(out, 400, "\"tokens\" must be an array of token ids", "invalid_request_error", "tokens");
    return;
  }
  std::vector<int32_t> ids;
  for (const json& t : j["tokens"]) {
    if (!t.is_number_integer() || t.get<int64_t>() < 0 || t.get<int64_t>() >= tok.vocab_size()) {
      SendError(out, 400, absl::StrCat("token ", t.dump(), " is not an id of this vocabulary (0 to ", tok.vocab_size() - 1,
                                       ")"), "invalid_request_error", "tokens");
      return;
    }
    ids.push_back(static_cast<int32_t>(t.get<int64_t>()));
  }
  absl::StatusOr<std::string> text;
  {
    absl::MutexLock lock(&mu);
    text = tok.Decode(ids);
  }
  if (!text.ok()) {
    SendError(out, 400, std::string(text.status().message()), "invalid_request_error", "tokens");
    return;
  }
  out.Send(200, "application/json", json({{"prompt", *text}}).dump());
}

// POST /v1/completions and /v1/chat/completions: one choice streamed or not (several through
// RunChoices); `number` names the response, `tenant` prefixes the client's session id.
void ServeCompletion(scheduler::CompletionService* engine, const std::string& model_name,
                     const text::ModelChatTemplate* chat_template, int64_t number, const std::string& tenant,
                     const std::string& path, const HttpRequest& req, HttpResponder& out) {
  const bool chat = path == "/v1/chat/completions";
  if (req.method != "POST") {
    SendError(out, 405, absl::StrCat("use POST for ", path), "invalid_request_error");
    return;
  }
  scheduler::CompletionRequest creq;
  bool stream = false, include_usage = false;
  std::vector<PromptItem> prompts;
  int64_t n = 1;
  if (!ParseCompletion(req.body, model_name, chat, chat_template, &creq, &stream, &include_usage, &prompts, &n,
                       out)) {
    return;
  }
  const std::string id = absl::StrCat(chat ? "chatcmpl-" : "cmpl-", number);
  if (prompts.size() > 1 || n > 1) {
    RunChoices(engine, creq, prompts, n, chat, stream, include_usage, model_name, id, out);
    return;
  }
  if (!creq.session_id.empty()) creq.session_id = tenant + creq.session_id;
  const char* object = chat ? "chat.completion" : "text_completion";
  const int64_t created =
      std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
  int64_t streamed_bytes = 0;  // text_offset of the next chunk's logprobs
  auto chunk = [&](const std::string& text, const json& finish, std::span<const runtime::TokenLogprobs> lps = {}) {
    json choice = {{"index", 0}, {"logprobs", nullptr}, {"finish_reason", finish}};
    if (creq.logprobs.has_value() && !lps.empty()) choice["logprobs"] = LogprobsJson(chat, lps, streamed_bytes);
    streamed_bytes += static_cast<int64_t>(text.size());
    if (chat) {
      choice["delta"] = text.empty() ? json::object() : json{{"content", text}};
    } else {
      choice["text"] = text;
    }
    json c = {{"id", id}, {"object", chat ? "chat.completion.chunk" : "text_completion"}, {"created", created},
              {"model", model_name}, {"choices", {choice}}};
    return absl::StrCat("data: ", Dump(c), "\n\n");
  };
  bool streaming = false;
  absl::StatusOr<scheduler::CompletionResult> r =
      engine->Complete(creq, [&](absl::string_view text, std::span<const runtime::TokenLogprobs> lps,
                                 std::span<const int32_t>) {
        if (!stream || (text.empty() && (!creq.logprobs.has_value() || lps.empty()))) return true;
        if (!streaming) {
          if (!out.BeginStream("text/event-stream")) return false;
          streaming = true;
        }
        return out.Write(chunk(std::string(text), nullptr, lps));
      });
  if (!r.ok()) {
    const int status = HttpStatusOf(r.status().code());
    if (!streaming && (status == 429 || status == 503)) {
      json err = {{"error", {{"message", r.status().message()}, {"type", "server_busy"}, {"code", status}}}};
      out.Send(status, "application/json", err.dump(), {{"Retry-After", "1"}});
    } else if (!streaming) {
      SendError(out, status, std::string(r.status().message()),
                status == 400 ? "invalid_request_error" : "internal_error");
    } else {
      out.Write(absl::StrCat("data: ", json({{"error", {{"message", r.status().message()}}}}).dump(), "\n\n"));
      out.EndStream();
    }
    return;
  }
  const json usage = {{"prompt_tokens", r->prompt_tokens},
                      {"completion_tokens", r->completion_tokens},
                      {"total_tokens", r->prompt_tokens + r->completion_tokens},
                      {"prompt_tokens_details", {{"cached_tokens", r->cached_tokens}}}};
  if (stream) {
    if (!streaming && !out.BeginStream("text/event-stream")) return;
    if (r->finish_reason == "cancelled") return;  // the client is gone
    out.Write(chunk("", r->finish_reason));
    if (include_usage) {  // stream_options.include_usage: one more chunk, no choices, the usage
      json c = {{"id", id}, {"object", chat ? "chat.completion.chunk" : "text_completion"}, {"created", created},
                {"model", model_name}, {"choices", json::array()}, {"usage", usage}};
      out.Write(absl::StrCat("data: ", c.dump(), "\n\n"));
    }
    out.Write("data: [DONE]\n\n");
    out.EndStream();
    return;
  }
  json choice = {{"index", 0}, {"logprobs", nullptr}, {"finish_reason", r->finish_reason}};
  if (creq.logprobs.has_value()) choice["logprobs"] = LogprobsJson(chat, r->logprobs, 0);
  if (chat) {
    choice["message"] = {{"role", "assistant"}, {"content", r->text}};
  } else {
    choice["text"] = r->text;
  }
  json body = {{"id", id}, {"object", object}, {"created", created}, {"model", model_name},
               {"choices", {choice}}, {"usage", usage}};
  out.Send(200, "application/json", Dump(body));
}

}  // namespace

HttpHandler MakeOpenAiHandler(scheduler::CompletionService* engine, monitoring::ServerMetrics* metrics,
                              const std::string& model_name, const text::ModelChatTemplate* chat_template,
                              const FrontEndOptions& options) {
  auto counter = std::make_shared<std::atomic<int64_t>>(0);
  std::shared_ptr<const text::Tokenizer> tokenizer = options.tokenizer;
  auto tokenizer_mu = std::make_shared<absl::Mutex>();
  // Each key's tenant is its position: sessions live in the engine as "tN/<id>" ('/' is not in a
  // client's session id, so tenants cannot reach each other's).
  auto tenants = std::make_shared<absl::flat_hash_map<std::string, std::string>>();
  for (size_t i = 0; i < options.api_keys.size(); ++i) tenants->emplace(options.api_keys[i], absl::StrCat("t", i, "/"));
  return [engine, metrics, model_name, chat_template, counter, tenants, tokenizer, tokenizer_mu](
             const HttpRequest& req, HttpResponder& out) {
    const std::string path = req.target.substr(0, req.target.find('?'));
    std::string tenant;  // prefix of this client's sessions in the engine
    if (!tenants->empty() && (path.rfind("/v1/", 0) == 0 || path == "/tokenize" || path == "/detokenize")) {
      constexpr absl::string_view kBearer = "Bearer ";
      const auto it = absl::StartsWith(req.authorization, kBearer)
                          ? tenants->find(req.authorization.substr(kBearer.size()))
                          : tenants->end();
      if (it == tenants->end()) {
        json err = {{"error", {{"message", req.authorization.empty() ? "no API key: send Authorization: Bearer KEY"
                                                                     : "invalid API key"},
                               {"type", "invalid_request_error"}, {"code", "invalid_api_key"}}}};
        out.Send(401, "application/json", err.dump(), {{"WWW-Authenticate", "Bearer"}});
        return;
      }
      tenant = it->second;
    }
    if (path == "/health") {
      if (engine->draining()) {
        out.Send(503, "text/plain", "draining");
      } else {
        out.Send(200, "text/plain", "OK");
      }
    } else if (path == "/ready") {  // readiness: 503 while draining or when admission is full
      if (engine->ready()) {
        out.Send(200, "text/plain", "ready");
      } else {
        out.Send(503, "text/plain", engine->draining() ? "draining" : "full");
      }
    } else if (path == "/metrics") {
      out.Send(200, "text/plain; version=0.0.4", metrics->Serialize());
    } else if (path == "/version") {
      out.Send(200, "application/json", json({{"version", ScoutVersion()}}).dump());
    } else if (path == "/tokenize" || path == "/detokenize") {
      if (req.method != "POST") {
        SendError(out, 405, absl::StrCat("use POST for ", path), "invalid_request_error");
      } else if (tokenizer == nullptr) {
        SendError(out, 501, "this server has no tokenizer for /tokenize", "not_implemented");
      } else if (path == "/tokenize") {
        Tokenize(req, out, *tokenizer, *tokenizer_mu, engine, model_name, chat_template);
      } else {
        Detokenize(req, out, *tokenizer, *tokenizer_mu);
      }
    } else if (path == "/v1/sessions" && req.method == "GET") {
      json data = json::array();
      for (const scheduler::SessionInfo& si : engine->ListSessions()) {
        if (!absl::StartsWith(si.id, tenant) || si.id.find('/', tenant.size()) != std::string::npos) continue;
        data.push_back({{"id", si.id.substr(tenant.size())}, {"object", "session"}, {"tokens", si.tokens}});
      }
      out.Send(200, "application/json", json({{"object", "list"}, {"data", data}}).dump());
    } else if (path.rfind("/v1/sessions/", 0) == 0 && req.method == "DELETE") {
      const std::string id = path.substr(std::string("/v1/sessions/").size());
      absl::Status st = ValidSessionId(id) ? engine->DeleteSession(tenant + id)
                                           : absl::NotFoundError(absl::StrCat("no session \"", id, "\""));
      if (st.code() == absl::StatusCode::kNotFound) st = absl::NotFoundError(absl::StrCat("no session \"", id, "\""));
      if (st.code() == absl::StatusCode::kNotFound) {
        SendError(out, 404, std::string(st.message()), "invalid_request_error", "session_id");
      } else if (!st.ok()) {
        SendError(out, 500, std::string(st.message()), "internal_error");
      } else {
        out.Send(200, "application/json", json({{"id", id}, {"object", "session"}, {"deleted", true}}).dump());
      }
    } else if (path == "/v1/models") {
      json models = {{"object", "list"},
                     {"data", {{{"id", model_name}, {"object", "model"}, {"owned_by", "scout"},
                                {"max_model_len", engine->max_model_len()}}}}};
      out.Send(200, "application/json", models.dump());
    } else if (path == "/v1/completions" || path == "/v1/chat/completions") {
      ServeCompletion(engine, model_name, chat_template, (*counter)++, tenant, path, req, out);
    } else {
      SendError(out, 404, absl::StrCat("no route for ", req.method, " ", path), "invalid_request_error");
    }
  };
}

}  // namespace scout::server
