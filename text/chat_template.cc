// Chat templates: a model's Jinja template (tokenizer_config.json or chat_template.jinja) parsed
// once and rendered over a request's messages. The engine is text/jinja/: lexer, parser, renderer
// and filters over Python-like values. Inside it errors travel as a C++ exception (TemplateError)
// because every evaluation step can fail; Parse and Render catch it and return absl::Status, so
// nothing escapes the API.
#include "text/chat_template.h"

#include "absl/strings/str_cat.h"
#include "runtime/model_config.h"
#include "text/jinja/parser.h"
#include "text/jinja/renderer.h"

namespace scout::text {

ChatTemplate::ChatTemplate(std::shared_ptr<const jinja::Template> t) : template_(std::move(t)) {}
ChatTemplate::ChatTemplate(ChatTemplate&&) noexcept = default;
ChatTemplate& ChatTemplate::operator=(ChatTemplate&&) noexcept = default;
ChatTemplate::~ChatTemplate() = default;

absl::StatusOr<ChatTemplate> ChatTemplate::Parse(absl::string_view source) {
  try {
    auto t = std::make_shared<jinja::Template>();
    t->body = jinja::ParseTokens(jinja::Lex(source));
    return ChatTemplate(std::move(t));
  } catch (const jinja::TemplateError& e) {
    return absl::InvalidArgumentError(absl::StrCat("chat template line ", e.line, ": ", e.message));
  }
}

absl::StatusOr<std::string> ChatTemplate::Render(const nlohmann::ordered_json& context) const {
  if (!context.is_object()) return absl::InvalidArgumentError("chat template context must be a JSON object");
  std::string out;
  try {
    jinja::Renderer r(&out);
    for (const auto& [k, v] : context.items()) r.SetVar(k, jinja::FromJson(v));
    r.Exec(template_->body);
  } catch (const jinja::TemplateError& e) {
    if (e.raised) return absl::InvalidArgumentError(e.message);
    return absl::InvalidArgumentError(absl::StrCat("chat template line ", e.line, ": ", e.message));
  }
  return out;
}

absl::StatusOr<std::string> ModelChatTemplate::Render(const nlohmann::ordered_json& messages, bool add_generation_prompt,
                                                      const nlohmann::ordered_json& extra) const {
  nlohmann::ordered_json ctx = nlohmann::ordered_json::object();
  if (!bos_token.empty()) ctx["bos_token"] = bos_token;
  if (!eos_token.empty()) ctx["eos_token"] = eos_token;
  if (extra.is_object()) {
    for (const auto& [k, v] : extra.items()) ctx[k] = v;
  }
  ctx["messages"] = messages;
  ctx["add_generation_prompt"] = add_generation_prompt;
  return chat_template.Render(ctx);
}

absl::StatusOr<std::optional<ModelChatTemplate>> LoadChatTemplate(const std::filesystem::path& model_dir) {
  const std::filesystem::path path = model_dir / "tokenizer_config.json";
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) return std::optional<ModelChatTemplate>();
  absl::StatusOr<std::string> text = runtime::ReadFile(path);
  if (!text.ok()) return text.status();
  const nlohmann::json j = nlohmann::json::parse(*text, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return absl::InvalidArgumentError(absl::StrCat(path.string(), ": not a JSON object"));
  std::string source;
  if (auto it = j.find("chat_template"); it != j.end() && it->is_string()) {
    source = it->get<std::string>();
  } else if (it != j.end() && it->is_array()) {
    for (const nlohmann::json& t : *it) {
      if (t.is_object() && t.value("name", "") == "default" && t.contains("template") && t["template"].is_string()) {
        source = t["template"].get<std::string>();
      }
    }
    if (source.empty()) return absl::InvalidArgumentError(absl::StrCat(path.string(), ": chat_template list has no \"default\""));
  }
  if (source.empty()) return std::optional<ModelChatTemplate>();
  absl::StatusOr<ChatTemplate> t = ChatTemplate::Parse(source);
  if (!t.ok()) return absl::InvalidArgumentError(absl::StrCat(path.string(), ": ", t.status().message()));
  auto token = [&](const char* key) -> std::string {
    auto it = j.find(key);
    if (it == j.end()) return "";
    if (it->is_string()) return it->get<std::string>();
    if (it->is_object() && it->contains("content") && (*it)["content"].is_string()) return (*it)["content"].get<std::string>();
    return "";
  };
  return std::optional<ModelChatTemplate>(ModelChatTemplate{*std::move(t), token("bos_token"), token("eos_token")});
}

}  // namespace scout::text
