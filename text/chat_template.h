// Chat templates: the Jinja template a model's tokenizer_config.json carries, rendered the way
// transformers' apply_chat_template renders it (trim_blocks and lstrip_blocks on, transformers'
// tojson, raise_exception and strftime_now).
//
// Debian packages no C++ Jinja engine, so this is a small one for the subset that chat templates
// use: {{ }}, {% %} and {# #} with whitespace control; if/elif/else, for (loop.*, else, filter
// condition, tuple targets), set (names, namespace attributes, tuples, blocks), macro, break and
// continue; expressions with Python values and operators (~ + - * / // % **, comparisons, in,
// and/or/not, conditional expressions, slices, literals of lists, dicts and tuples); filters
// (trim, length, tojson, join, list, items, selectattr/rejectattr/select/reject, map, first, last,
// default, upper, lower, capitalize, title, replace, string, int, float, abs, round, unique, sort,
// reverse, dictsort, indent, safe, count, wordcount, batch) and tests (defined, undefined, none,
// string, number, integer, float, boolean, mapping, iterable, sequence, callable, true, false,
// equalto/eq/==, ne, gt, lt, ge, le, in, odd, even, divisibleby, sameas); string and dict methods
// (strip, split, startswith, replace, items, get, keys, ...). Anything else is an error naming the
// line, never silently wrong output.
#pragma once

#include <filesystem>
#include <memory>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "nlohmann/json.hpp"

namespace scout::text {

namespace jinja {
struct Template;
}

class ChatTemplate {
 public:
  // InvalidArgument with the line number for a syntax error or an unsupported construct.
  static absl::StatusOr<ChatTemplate> Parse(absl::string_view source);
  ChatTemplate(ChatTemplate&&) noexcept;
  ChatTemplate& operator=(ChatTemplate&&) noexcept;
  ~ChatTemplate();

  // Renders with `context` (a JSON object) as the template's variables: messages,
  // add_generation_prompt, bos_token, eos_token, tools, date_string, ... . Object key order is kept
  // (tojson writes keys in that order, as Python dicts do). InvalidArgument when the template
  // calls raise_exception (with its message) or fails at run time (with the line). Thread-safe.
  absl::StatusOr<std::string> Render(const nlohmann::ordered_json& context) const;

 private:
  explicit ChatTemplate(std::shared_ptr<const jinja::Template> t);
  std::shared_ptr<const jinja::Template> template_;
};

// A model folder's chat template and the tokens it refers to, from tokenizer_config.json.
struct ModelChatTemplate {
  ChatTemplate chat_template;
  std::string bos_token;  // "" when the config names none
  std::string eos_token;

  // messages: [{"role": ..., "content": ...}, ...]; `extra` (an object or null) adds variables
  // such as tools or date_string. bos_token and eos_token are set unless `extra` sets them.
  absl::StatusOr<std::string> Render(const nlohmann::ordered_json& messages, bool add_generation_prompt,
                                     const nlohmann::ordered_json& extra = nullptr) const;
};

// nullopt when the folder has no tokenizer_config.json or it carries no chat_template; a template
// given as a list of {name, template} picks "default". InvalidArgument when the file is malformed
// or the template does not parse.
absl::StatusOr<std::optional<ModelChatTemplate>> LoadChatTemplate(const std::filesystem::path& model_dir);

}  // namespace scout::text
