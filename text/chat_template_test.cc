#include "text/chat_template.h"

#include <filesystem>
#include <fstream>
#include <random>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "text/bpe_tokenizer.h"
#include "runtime/model_config.h"

namespace scout::text {
namespace {

using ojson = nlohmann::ordered_json;

const std::filesystem::path kTokenizers = std::filesystem::path(SCOUT_SOURCE_DIR) / "models" / "tokenizers";

std::string Render(absl::string_view tmpl, const ojson& ctx) {
  absl::StatusOr<ChatTemplate> t = ChatTemplate::Parse(tmpl);
  if (!t.ok()) return absl::StrCat("PARSE ERROR: ", t.status().ToString());
  absl::StatusOr<std::string> r = t->Render(ctx);
  return r.ok() ? *r : absl::StrCat("RENDER ERROR: ", r.status().ToString());
}

// Small templates over the language's corners, with the output Python's jinja2 gives in
// transformers' environment (trim_blocks, lstrip_blocks, loopcontrols, its tojson).
constexpr const char* kJinjaCases = R"json([
{
"template": "{% for x in xs %}\n  {{ x }}\n{% endfor %}\n",
"context": {
"xs": [
1,
2
]
},
"expected": "  1\n  2\n"
},
{
"template": "a  {%- if true -%}  b  {%- endif -%}  c",
"context": {},
"expected": "abc"
},
{
"template": "  {% if true %}x{% endif %}  {% if true %}y{% endif %}\n",
"context": {},
"expected": "x  y"
},
{
"template": "{# c #}\n  {#- d -#}  e{{ 1 }} {{- 2 }} {{ 3 -}} f",
"context": {},
"expected": "e12 3f"
},
{
"template": "{{ 7 // 2 }} {{ -7 // 2 }} {{ 7 % 3 }} {{ -7 % 3 }} {{ 7 / 2 }} {{ 2 ** 10 }} {{ 1.5 * 2 }} {{ 0.1 + 0.2 }} {{ 1e20 }} {{ 1e-5 }} {{ 3 - 5 }}",
"context": {},
"expected": "3 -4 1 2 3.5 1024 3.0 0.30000000000000004 1e+20 1e-05 -2"
},
{
"template": "{{ 'a' ~ 1 ~ none ~ true }} {{ [1, 'b', none, 2.5] }} {{ {'k': 'v', 'n': [1]} }} {{ \"it's\" }}",
"context": {},
"expected": "a1NoneTrue [1, 'b', None, 2.5] {'k': 'v', 'n': [1]} it's"
},
{
"template": "{{ xs[1:] }} {{ xs[-1] }} {{ xs[::-1] }} {{ xs[:2] }} {{ 'hello'[1:3] }} {{ 'héllo'[1] }} {{ xs[10] }}|",
"context": {
"xs": [
1,
2,
3
]
},
"expected": "[2, 3] 3 [3, 2, 1] [1, 2] el é |"
},
{
"template": "{% for k, v in d | items %}{{ k }}={{ v }}{% if not loop.last %}, {% endif %}{% endfor %}",
"context": {
"d": {
"b": 1,
"a": 2
}
},
"expected": "b=1, a=2"
},
{
"template": "{% for x in xs if x > 1 %}{{ loop.index }}:{{ x }}{{ loop.first }}{{ loop.last }}{{ loop.length }} {% else %}empty{% endfor %}",
"context": {
"xs": [
1,
2,
3
]
},
"expected": "1:2TrueFalse2 2:3FalseTrue2 "
},
{
"template": "{% for x in [] %}x{% else %}empty{% endfor %}",
"context": {},
"expected": "empty"
},
{
"template": "{% set ns = namespace(n=0, s='') %}{% for x in xs %}{% set ns.n = ns.n + x %}{% set t = x %}{% endfor %}{{ ns.n }}{{ t is defined }}",
"context": {
"xs": [
1,
2,
3
]
},
"expected": "6False"
},
{
"template": "{{ xs | selectattr('role', 'equalto', 'user') | map(attribute='c') | join(',') }} {{ xs | rejectattr('role', 'eq', 'user') | list | length }}",
"context": {
"xs": [
{
"role": "user",
"c": "a"
},
{
"role": "bot",
"c": "b"
},
{
"role": "user",
"c": "c"
}
]
},
"expected": "a,c 1"
},
{
"template": "{{ '  x y  ' | trim }}|{{ 'Hello World' | upper }}|{{ 'ABC' | lower }}|{{ 'hello world' | title }}|{{ 'hello' | capitalize }}|{{ 'aXbX' | replace('X', '-') }}",
"context": {},
"expected": "x y|HELLO WORLD|abc|Hello World|Hello|a-b-"
},
{
"template": "{{ d | tojson }}\n{{ d | tojson(indent=2) }}\n{{ 'é\"\\n' | tojson }}\n{{ [] | tojson(indent=2) }}{{ {} | tojson }}{{ none | tojson }}{{ [1.0, 2] | tojson }}",
"context": {
"d": {
"b": [
1,
{
"x": null
}
],
"a": true,
"c": "é"
}
},
"expected": "{\"b\": [1, {\"x\": null}], \"a\": true, \"c\": \"é\"}\n{\n  \"b\": [\n    1,\n    {\n      \"x\": null\n    }\n  ],\n  \"a\": true,\n  \"c\": \"é\"\n}\n\"é\\\"\\n\"\n[]{}null[1.0, 2]"
},
{
"template": "{{ x is defined }}{{ y is defined }}{{ none is none }}{{ 's' is string }}{{ 1 is number }}{{ {} is mapping }}{{ 's' is iterable }}{{ 3 is odd }}{{ 4 is divisibleby 2 }}{{ 1 is integer }}{{ x is not none }}",
"context": {
"x": 1
},
"expected": "TrueFalseTrueTrueTrueTrueTrueTrueTrueTrueTrue"
},
{
"template": "{{ 1 if false }}|{{ 'a' if x else 'b' }}|{{ x and 'y' }}|{{ 0 or 'z' }}|{{ not x }}|{{ 1 < 2 < 3 }}|{{ 'b' in 'abc' }}|{{ 2 not in [1, 3] }}|{{ 'k' in {'k': 1} }}",
"context": {
"x": 1
},
"expected": "|a|y|z|False|True|True|True|True"
},
{
"template": "{% macro greet(name, punct='!') %}Hi {{ name }}{{ punct }}{% endmacro %}{{ greet('a') }} {{ greet('b', punct='?') }}",
"context": {},
"expected": "Hi a! Hi b?"
},
{
"template": "{% for x in xs %}{% if x == 2 %}{% continue %}{% endif %}{% if x == 4 %}{% break %}{% endif %}{{ x }}{% endfor %}",
"context": {
"xs": [
1,
2,
3,
4,
5
]
},
"expected": "13"
},
{
"template": "{% set a, b = [1, 2] %}{{ a }}{{ b }}{% set blk %}in {{ a }}{% endset %}[{{ blk }}]",
"context": {},
"expected": "12[in 1]"
},
{
"template": "{{ '  a b  c '.split() }} {{ 'a,b,,c'.split(',') }} {{ ' x '.strip() }} {{ 'abc'.startswith('ab') }} {{ 'abc'.endswith(('x', 'c')) }} {{ d.get('k') }} {{ d.get('z', 5) }} {{ d.keys() | list }}",
"context": {
"d": {
"k": "v"
}
},
"expected": "['a', 'b', 'c'] ['a', 'b', '', 'c'] x True True v 5 ['k']"
},
{
"template": "{{ xs | length }} {{ 'héllo' | length }} {{ xs | first }} {{ xs | last }} {{ xs | reverse | list }} {{ xs | sort | list }} {{ y | default('dflt') }} {{ '' | default('e', true) }} {{ xs | unique | list }}",
"context": {
"xs": [
3,
1,
2,
1
]
},
"expected": "4 5 3 1 [1, 2, 1, 3] [1, 1, 2, 3] dflt e [3, 1, 2]"
},
{
"template": "{{ msg.content is defined }}{{ msg.missing is defined }}{{ msg['role'] }}{{ msg.role | upper }}",
"context": {
"msg": {
"role": "user",
"content": null
}
},
"expected": "TrueFalseuserUSER"
},
{
"template": "{%- for m in messages %}\n    {%- if m.role == 'user' %}\n        {{- 'U:' + m.content }}\n    {%- else %}\n        {{- 'A:' + m.content | trim }}\n    {%- endif %}\n{%- endfor %}\n",
"context": {
"messages": [
{
"role": "user",
"content": "hi"
},
{
"role": "assistant",
"content": " yo "
}
]
},
"expected": "U:hiA:yo"
},
{
"template": "{{ \"a\" \"b\" }} {{ 'x\\ty' }} {{ '\\u00e9' }} {{ (1, 2) | list }} {{ range(3) | list }} {{ range(1, 7, 2) | list }}",
"context": {},
"expected": "ab x\ty é [1, 2] [0, 1, 2] [1, 3, 5]"
},
{
"template": "{% if x %}\n  yes\n{% elif y %}\n  y\n{% else %}\n  no\n{% endif %}\n",
"context": {
"x": 0,
"y": 1
},
"expected": "  y\n"
},
{
"template": "{{ 1 == 1.0 }} {{ true == 1 }} {{ [1, 2] == [1, 2] }} {{ 'a' < 'b' }} {{ none == none }} {{ x == y }}",
"context": {},
"expected": "True True True True True True"
},
{
"template": "{{ 'abc' | list }} {{ [1, 2, 3] | sum }} {{ [3, 1] | min }} {{ 'a b c' | wordcount }} {{ -3 | abs }} {{ 2.567 | round(1) }} {{ '42' | int + 1 }}",
"context": {},
"expected": "['a', 'b', 'c'] 6 1 3 3 2.6 43"
},
{
"template": "{{ 'line1\\nline2\\n\\nline4' | indent(2) }}|{{ 'x' | indent(2, true) }}",
"context": {},
"expected": "line1\n  line2\n\n  line4|  x"
},
{
"template": "{% set x = 1 %}{% for i in range(2) %}{% set x = x + 10 %}{{ x }} {% endfor %}{{ x }}",
"context": {},
"expected": "11 11 1"
}
])json";

TEST(ChatTemplateTest, MatchesJinja2OnLanguageCorners) {
  const ojson cases = ojson::parse(kJinjaCases);
  for (const ojson& c : cases) {
    ASSERT_TRUE(c.contains("expected")) << c.dump();
    EXPECT_EQ(Render(c["template"].get<std::string>(), c["context"]), c["expected"].get<std::string>()) << c["template"].get<std::string>();
  }
}

TEST(ChatTemplateTest, ErrorsNameTheLine) {
  absl::StatusOr<ChatTemplate> t = ChatTemplate::Parse("line one\n{% if x %}\n{{ y + }}\n{% endif %}");
  ASSERT_FALSE(t.ok());
  EXPECT_NE(t.status().message().find("line 3"), std::string::npos) << t.status();
  EXPECT_FALSE(ChatTemplate::Parse("{% if x %}never closed").ok());
  EXPECT_FALSE(ChatTemplate::Parse("{% include 'other.jinja' %}").ok());
  EXPECT_FALSE(ChatTemplate::Parse("{{ 'unterminated }}").ok());
  EXPECT_EQ(Render("{{ x | nosuchfilter }}", ojson::object()).find("RENDER ERROR"), 0u);
  EXPECT_NE(Render("\n\n{{ x.y }}", ojson::object()).find("line 3"), std::string::npos);  // attribute of undefined
  EXPECT_NE(Render("{{ 1 + 'a' }}", ojson::object()).find("unsupported operand"), std::string::npos);
  EXPECT_NE(Render("{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}", ojson::object()).find("too deep"), std::string::npos);
  // raise_exception's message comes back as it is.
  absl::StatusOr<std::string> r = ChatTemplate::Parse("{{ raise_exception('Roles must alternate') }}")->Render(ojson::object());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(r.status().message(), "Roles must alternate");
}

TEST(ChatTemplateTest, RandomTemplatesFailCleanly) {
  // Soup of template fragments: whatever parses must render or fail with a status, never crash
  // (run under ASan too).
  const std::vector<std::string> parts = {
      "{{", "}}", "{%", "%}", "{#", "#}", "{%-", "-%}", " if ", " for ", " x ", " in ", " xs ", " endif ", " endfor ",
      " else ", " set ", " = ", "(", ")", "[", "]", "{", "}", ",", ":", "|", " length ", " tojson ", " is ", " not ",
      " defined ", "'s'", "\"", "1", "-", "+", "*", "//", "%", "~", ".", " loop.index ", " ns ", " namespace() ", "\n",
      " and ", " or ", " ~ ", "[1:]", " macro m() ", " endmacro ", " break ", " raise_exception('e') ", "x", " "};
  std::mt19937 rng(11);
  const ojson ctx = ojson::parse(R"({"xs": [1, "a", {"k": null}], "x": {"y": [true]}})");
  int parsed = 0;
  for (int i = 0; i < 3000; ++i) {
    std::string t;
    const int n = 1 + static_cast<int>(rng() % 14);
    for (int k = 0; k < n; ++k) t += parts[rng() % parts.size()];
    absl::StatusOr<ChatTemplate> tmpl = ChatTemplate::Parse(t);
    if (!tmpl.ok()) continue;
    ++parsed;
    (void)tmpl->Render(ctx);
  }
  EXPECT_GT(parsed, 100);
}

TEST(ChatTemplateTest, LoadsFromTheModelFolder) {
  const std::filesystem::path dir = std::filesystem::path(::testing::TempDir()) / absl::StrCat("scout_chat_", getpid());
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  absl::StatusOr<std::optional<ModelChatTemplate>> none = LoadChatTemplate(dir);
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(none->has_value());
  std::ofstream(dir / "tokenizer_config.json")
      << R"({"bos_token": {"content": "<s>"}, "eos_token": "</s>", "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"}]})";
  absl::StatusOr<std::optional<ModelChatTemplate>> t = LoadChatTemplate(dir);
  ASSERT_TRUE(t.ok()) << t.status();
  ASSERT_TRUE(t->has_value());
  const ojson msgs = ojson::parse(R"([{"role": "user", "content": "hi"}])");
  EXPECT_EQ(*(*t)->Render(msgs, true), "<s>[user]hi</s>[assistant]");
  std::ofstream(dir / "tokenizer_config.json") << R"({"chat_template": "{% if %}"})";
  EXPECT_EQ(LoadChatTemplate(dir).status().code(), absl::StatusCode::kInvalidArgument);
}

// models/tokenizers/NAME/chat_golden.json: conversations rendered by transformers'
// apply_chat_template with each family's real template, and the ids of the rendered text.
class ChatGoldenTest : public ::testing::TestWithParam<std::string> {};

TEST_P(ChatGoldenTest, RendersLikeTransformers) {
  const std::filesystem::path dir = kTokenizers / GetParam();
  if (!std::filesystem::exists(dir / "chat_golden.json")) GTEST_SKIP() << "no goldens in " << dir;
  absl::StatusOr<std::optional<ModelChatTemplate>> tmpl = LoadChatTemplate(dir);
  ASSERT_TRUE(tmpl.ok()) << tmpl.status();
  ASSERT_TRUE(tmpl->has_value());
  absl::StatusOr<std::unique_ptr<BpeTokenizer>> tok = BpeTokenizer::FromFile(dir / "tokenizer.json");
  ASSERT_TRUE(tok.ok()) << tok.status();
  absl::StatusOr<std::string> text = runtime::ReadFile(dir / "chat_golden.json");
  ASSERT_TRUE(text.ok());
  const ojson golden = ojson::parse(*text);
  int n = 0;
  for (const ojson& c : golden["cases"]) {
    ++n;
    const std::string what = absl::StrCat(GetParam(), " ", c["name"].get<std::string>(), " add_generation_prompt=", c["add_generation_prompt"].get<bool>());
    absl::StatusOr<std::string> got = (*tmpl)->Render(c["messages"], c["add_generation_prompt"].get<bool>(), c["kwargs"]);
    if (c.contains("error")) {
      ASSERT_FALSE(got.ok()) << what;
      // transformers prefixes the exception type ("TemplateError: ").
      const std::string want = c["error"].get<std::string>();
      EXPECT_EQ(want.substr(want.find(": ") + 2), got.status().message()) << what;
      continue;
    }
    ASSERT_TRUE(got.ok()) << what << ": " << got.status();
    EXPECT_EQ(*got, c["text"].get<std::string>()) << what;
    // The rendered prompt is tokenized without adding BOS again (the template wrote it).
    EXPECT_EQ((*tok)->Encode(*got, false), c["ids"].get<std::vector<int32_t>>()) << what;
  }
  EXPECT_GE(n, 20);
}

INSTANTIATE_TEST_SUITE_P(Families, ChatGoldenTest, ::testing::Values("llama3", "qwen2", "mistral"));

}  // namespace
}  // namespace scout::text
