#!/usr/bin/env python3
"""Train small byte-level BPE tokenizers in the Llama-3, Qwen2 and Mistral styles and write goldens.

  python3 tools/make_tokenizer_fixtures.py OUTDIR [--vocab 3000] [--seed 0] [--corpus-mb 8]
  python3 tools/make_tokenizer_fixtures.py OUTDIR --throughput-only models/tokenizers
      (times tokenizers on the committed fixtures, the files bench/tokenizer_bench reads; writes
      OUTDIR/tokenizer_throughput_tokenizers.json only)

Runs on the GPU machine (needs `tokenizers` and `transformers` with jinja2; no network, no GPU use).
Writes, for NAME in llama3, qwen2, mistral:
  OUTDIR/NAME/tokenizer.json         Hugging Face tokenizer (byte-level BPE, trained on this repo's text)
  OUTDIR/NAME/tokenizer_config.json  bos/eos tokens and the model family's chat_template
  OUTDIR/NAME/encode_golden.json     ~3000 strings: ids (add_special_tokens False, and True for a subset),
                                     decode with skip_special_tokens False and True
  OUTDIR/NAME/chat_golden.json       conversations rendered by transformers' apply_chat_template
and OUTDIR/tokenizer_throughput_tokenizers.json (encode/decode MB/s of `tokenizers`, single thread).

Throughput corpus recipe (the C++ bench rebuilds it): docs = the "text" fields of
OUTDIR/llama3/encode_golden.json["cases"] in order; the corpus is docs repeated `repeats` times (recorded in
the throughput file; the smallest count whose UTF-8 size reaches --corpus-mb * 1e6 bytes). "encode" encodes
each doc separately with add_special_tokens=False; "decode" decodes each doc's ids; MB/s counts UTF-8 bytes of
the docs (1 MB = 1e6 bytes).
"""
import argparse, json, os, platform, random, sys, time, unicodedata

# Single-threaded `tokenizers` for the throughput numbers (encode_batch uses rayon); must precede the import.
os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["RAYON_RS_NUM_CPUS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import tokenizers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# ------------------------------------------------------------------------------------------ chat templates
# Llama-3.1 Instruct (as shipped in meta-llama/Llama-3.1-8B-Instruct tokenizer_config.json).
LLAMA31_TEMPLATE = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\\n\\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# Qwen2.5 Instruct.
QWEN25_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Mistral Instruct v0.3 style (system message folded into the last user turn), without the tool-calling branches.
MISTRAL_TEMPLATE = """{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
        {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif %}
    {%- set ns.index = ns.index + 1 %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""

SPECS = {
    "llama3": dict(
        pattern=LLAMA3_PATTERN, nfc=False,
        special=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                 "<|eom_id|>", "<|python_tag|>"],
        added=[], bos="<|begin_of_text|>", eos="<|eot_id|>", template=LLAMA31_TEMPLATE, ignore_merges=True,
        tokenizer_class="PreTrainedTokenizerFast", model_max_length=131072),
    "qwen2": dict(
        pattern=QWEN2_PATTERN, nfc=True,
        special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        added=["<tool_call>", "</tool_call>"],  # Qwen2.5 ships these as added tokens with special: false
        bos=None, eos="<|im_end|>", pad="<|endoftext|>", template=QWEN25_TEMPLATE, ignore_merges=False,
        tokenizer_class="PreTrainedTokenizerFast", model_max_length=131072),
    "mistral": dict(
        pattern=LLAMA3_PATTERN, nfc=False,
        special=["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
        added=[], bos="<s>", eos="</s>", template=MISTRAL_TEMPLATE, ignore_merges=False,
        tokenizer_class="PreTrainedTokenizerFast", model_max_length=32768),
}

# ------------------------------------------------------------------------------------------ text
MULTILINGUAL = [
    "Привет, мир! Как дела? Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "Москва — столица России. В 2024 году население составило 13 миллионов человек.",
    "Γειά σου Κόσμε! Ξεσκεπάζω την ψυχοφθόρα βδελυγμία. Η Αθήνα είναι πρωτεύουσα.",
    "你好，世界！我们今天去公园散步吧。人工智能正在改变世界。",
    "東京は日本の首都です。ひらがなとカタカナと漢字を使います。ありがとうございます！",
    "안녕하세요 세계! 한국어는 한글로 씁니다. 감사합니다.",
    "مرحبا بالعالم! اللغة العربية تكتب من اليمين إلى اليسار. شكرا جزيلا.",
    "नमस्ते दुनिया! हिन्दी देवनागरी लिपि में लिखी जाती है। धन्यवाद।",
    "שלום עולם! עברית נכתבת מימין לשמאל.",
    "สวัสดีชาวโลก ภาษาไทยไม่มีการเว้นวรรคระหว่างคำ",
    "Xin chào thế giới! Tiếng Việt có rất nhiều dấu thanh: à á ả ã ạ ă ằ ắ ẳ ẵ ặ.",
    "Café crème, naïve façade, jalapeño, Zürich, Øresund, Ångström, Łódź, Ærøskøbing, São Paulo.",
    "Über die Straße gehen: Größe, Maß, Fußgänger, schön, häßlich, ÄÖÜäöüß.",
    "El pingüino Wenceslao hizo kilómetros bajo exhaustiva lluvia y frío, añoraba a su querido cachorro.",
    "Pchnąć w tę łódź jeża lub ośm skrzyń fig. Příliš žluťoučký kůň úpěl ďábelské ódy.",
    "Türkçe: Pijamalı hasta yağız şoföre çabucak güvendi. İstanbul, ıspanak.",
    "Emoji: 😀😃😄😁 👍🏽 👨‍👩‍👧‍👦 🇺🇸🇯🇵🇩🇪 ❤️ 1️⃣ 🏳️‍🌈 🧑🏿‍💻 ✨🚀🔥",
    "Math: ∀x∈ℝ, ∃y: x² + y² ≥ 0; ∑ᵢ aᵢ ≤ ∞; √2 ≈ 1.41421; π ≈ 3.14159; ½ ¾ ⅓",
    "Symbols: © ® ™ € £ ¥ ₹ ₽ § ¶ † ‡ • … ‰ ′ ″ ‹ › « » “quotes” ‘single’ — – ‐",
    "Ελληνικά και English mixed: the αβγ of ΔΕΖ, and Кириллица inside Latin text.",
    "ქართული ენა, Հայերեն լեզու, አማርኛ ቋንቋ, ᏣᎳᎩ ᎦᏬᏂᎯᏍᏗ",
    "தமிழ் மொழி, తెలుగు భాష, ಕನ್ನಡ ಭಾಷೆ, മലയാളം, বাংলা ভাষা, ਪੰਜਾਬੀ, ગુજરાતી",
    "Full-width: ＡＢＣ１２３！？ and half-width ｶﾀｶﾅ; ideographic space:\u3000end.",
    "def 函数(参数):\n    return 参数 * 2  # 中文注释\n",
    "print(\"Здравствуйте\")  // комментарий на русском\nint main() { return 0; }",
]

EMOJI = ["😀", "👍", "👍🏽", "👨‍👩‍👧‍👦", "👩🏻‍🔬", "🏳️‍🌈", "🇺🇸", "🇯🇵", "❤️", "1️⃣", "#️⃣", "🧑🏿‍💻", "🚀", "🔥", "✨",
         "🤷‍♂️", "👁‍🗨", "🐈‍⬛", "😶‍🌫️", "🫠", "🦀", "🐍", "\U0001F9D1\u200D\U0001F91D\u200D\U0001F9D1", "©️", "™"]

WORDS = ("the of and to in is you that it he was for on are as with his they at be this have from or one had by "
         "word but not what all were we when your can said there use an each which she do how their if will up "
         "other about out many then them these so some her would make like him into time has look two more write "
         "go see number no way could people my than first water been call who oil its now find long down day did "
         "get come made may part tokenizer token merge rank vocab byte unicode regex kernel tensor cache block").split()

CONTRACTIONS = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'T", "'RE", "'Ve", "'M", "'LL", "'lL", "'D",
                "’s", "'x", "''", "'ſ", "'K"]

SPECIAL_LITERALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>", "<s>", "</s>",
                    "[INST]", "[/INST]", "<unk>", "<|begin_of", "<|im_", "<|eot_id", "[INST", "<|eom_id|>",
                    "<|python_tag|>"]

SPACES = [" ", "  ", "   ", "\t", "\n", "\r\n", "\r", "\n\n", " \n", "\t\t", "\u00a0", "\u3000", "\u2009", "\u200b",
          "\u0085", "\u2028", "\x0b", "\x0c", "    ", " \t ", "\n  \n"]


def source_files():
    """Text files of this repo used for training and test strings (sorted; generated fixtures excluded)."""
    out = []
    skip_dirs = {".git", "__pycache__", "tokenizers", "node_modules"}
    for dp, dns, fns in os.walk(REPO):
        rel = os.path.relpath(dp, REPO)
        dns[:] = sorted(d for d in dns if d not in skip_dirs and not d.startswith("build") and not d.startswith("."))
        for f in sorted(fns):
            if f.endswith((".cc", ".h", ".md", ".py", ".cu", ".cuh", ".sh", ".yaml")):
                out.append(os.path.join(dp, f))
    lp = os.path.join(REPO, "models", "goldens", "long_prompt.txt")
    if os.path.exists(lp):
        out.append(lp)
    return sorted(set(out))


def read_texts():
    texts = []
    for p in source_files():
        try:
            with open(p, encoding="utf-8") as f:
                texts.append(f.read())
        except (UnicodeDecodeError, OSError):
            pass
    return texts


def training_iterator(texts, rng):
    for t in texts:
        yield t
    multi = MULTILINGUAL * 30  # enough repetitions that merges form for the other scripts too
    rng.shuffle(multi)
    for i in range(0, len(multi), 10):
        yield "\n".join(multi[i:i + 10])
    yield " ".join(EMOJI * 20)
    yield "\n".join(unicodedata.normalize("NFD", s) for s in MULTILINGUAL[10:16])


def make_test_strings(texts, rng, n=3000):
    lines = [ln for t in texts for ln in t.split("\n")]
    lines = [ln for ln in lines if ln.strip()]
    cases = ["", " ", "  ", "\n", "\t", "\r\n", "a", "A", "0", "'", "''", "'s", "\u00e9", "e\u0301", "😀", "\u200d",
             "\ufeff", "\ufffd", "\x00", "\x7f", "Hello world", " Hello world", "Hello world ", "Hello  world",
             "hello\n\nworld", "trailing spaces   ", "   leading spaces", "\t\ttabs\tinside\t", "x\r\ny\rz\n",
             "1234567890", "12345678901234567890123", "3.14159265358979", "1,000,000", "-42", "0x1F4A9",
             "I'M HERE, YOU'LL SEE, WE'VE DONE IT, SHE'D GO, IT'S ok, they'Re, don't", "o'clock rock'n'roll",
             "<|begin_of_text|>", "<|eot_id|><|eot_id|>", "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
             "[INST] hello [/INST] hi</s>", "<s>[INST]x[/INST]</s>", "<tool_call>\n{\"name\": \"f\"}\n</tool_call>",
             "<|begin_of<|begin_of_text|>text|>", "<<|eot_id|>>", "ſ", "\u212a", "İstanbul", "ǅ", "ﬁ ﬂ ﬀ",
             "Å Å Å", "ｶﾞ", "가", "\u1100\u1161\u11a8", "ẛ̣", "\U0010fffd", "\ue000", "\u0378"]
    # Every ASCII character and a few classes of code points on their own.
    cases += [chr(c) for c in range(128)]
    cases += [chr(c) + " " + chr(c) + chr(c) for c in range(0x80, 0x100)]
    planes = [(0x100, 0x2000), (0x2000, 0x3000), (0x3000, 0xA000), (0xAC00, 0xD7A4), (0xE000, 0xFFFE),
              (0x10000, 0x1FFFF), (0x1F300, 0x1FAFF), (0x20000, 0x2A6DF)]

    def rand_char():
        lo, hi = rng.choice(planes)
        while True:
            c = rng.randrange(lo, hi)
            if not (0xD800 <= c < 0xE000):
                return chr(c)

    def words(k):
        return " ".join(rng.choice(WORDS) for _ in range(k))

    def number():
        return "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 40)))

    gens = []
    gens.append(lambda: rng.choice(lines))  # one source line
    gens.append(lambda: "\n".join(lines[i] for i in range(*(lambda s: (s, s + rng.randint(2, 12)))(rng.randrange(len(lines) - 12)))))
    gens.append(lambda: rng.choice(MULTILINGUAL))
    gens.append(lambda: (lambda s: s[rng.randrange(len(s)):][:rng.randint(1, 60)])(rng.choice(MULTILINGUAL)))
    gens.append(lambda: unicodedata.normalize(rng.choice(["NFD", "NFKD", "NFC", "NFKC"]), rng.choice(MULTILINGUAL)))
    gens.append(lambda: "".join(rng.choice(EMOJI) + rng.choice(["", " ", "", "\u200d", "\ufe0f"]) for _ in range(rng.randint(1, 8))))
    gens.append(lambda: "".join(rng.choice([words(rng.randint(1, 3)), rng.choice(SPACES)]) for _ in range(rng.randint(2, 10))))
    gens.append(lambda: rng.choice(SPACES) * rng.randint(1, 6) + words(rng.randint(0, 4)) + rng.choice(SPACES) * rng.randint(0, 6))
    gens.append(lambda: " ".join(number() for _ in range(rng.randint(1, 4))) + rng.choice(["", ".", " apples", "px", "%"]))
    gens.append(lambda: rng.choice(WORDS) + number() + rng.choice(WORDS) + rng.choice(["", "_", "-", "."]) + number())
    gens.append(lambda: " ".join(rng.choice([rng.choice(WORDS), rng.choice(WORDS).upper(), rng.choice(WORDS).title()])
                                 + rng.choice(CONTRACTIONS + ["", "", ""]) for _ in range(rng.randint(1, 8))))
    gens.append(lambda: "".join(rng.choice([words(rng.randint(0, 3)), rng.choice(SPECIAL_LITERALS), "\n", " "])
                                for _ in range(rng.randint(1, 8))))
    gens.append(lambda: "".join(rand_char() for _ in range(rng.randint(1, 20))))
    gens.append(lambda: "".join(rng.choice("aeiouAEIOUnc") + rng.choice(["\u0301", "\u0300", "\u0308", "\u0303", "\u0327",
                                                                        "\u0323\u0302", ""]) for _ in range(rng.randint(1, 12))))
    gens.append(lambda: "".join(rng.choice(string_pieces) for _ in range(rng.randint(2, 12))))
    gens.append(lambda: "".join(chr(rng.randrange(0x20, 0x7f)) for _ in range(rng.randint(1, 40))))
    gens.append(lambda: rng.choice(lines).replace(" ", rng.choice(["  ", "\t", " \t", "\u00a0"])))

    string_pieces = (MULTILINGUAL + EMOJI + CONTRACTIONS + SPECIAL_LITERALS + SPACES + WORDS +
                     ["{", "}", "()", "->", "::", "==", "!=", "/*", "*/", "//", "#", "@", "$", "%", "^^", "&&", "||",
                      "...", "```", "\\n", "\\", "\"", "'", "`", "~", "0", "00", "123", "4567"])
    while len(cases) < n - 6:
        cases.append(rng.choice(gens)())
    # A few long documents.
    for _ in range(6):
        t = rng.choice([t for t in texts if len(t) > 4000] or texts)
        s = rng.randrange(max(1, len(t) - 4000))
        cases.append(t[s:s + 4000])
    # Keep valid Unicode only (no lone surrogates).
    return [c for c in cases if not any(0xD800 <= ord(ch) < 0xE000 for ch in c)]


# ------------------------------------------------------------------------------------------ training
def build_tokenizer(name, spec, texts, vocab_size, seed):
    tok = Tokenizer(models.BPE())
    if spec["nfc"]:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(spec["pattern"]), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer_kw = dict(vocab_size=vocab_size, min_frequency=2, special_tokens=[],
                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    try:
        trainer = trainers.BpeTrainer(show_progress=False, **trainer_kw)
    except TypeError:
        trainer = trainers.BpeTrainer(**trainer_kw)
    tok.train_from_iterator(training_iterator(texts, random.Random(seed)), trainer=trainer)

    # Special tokens come after the learned vocabulary, as in the real models (ids 128000+ in Llama-3).
    def added(content, special):
        try:
            return AddedToken(content, special=special, normalized=False)
        except TypeError:
            return AddedToken(content, normalized=False)
    tok.add_special_tokens([added(t, True) for t in spec["special"]])
    if spec["added"]:
        tok.add_tokens([added(t, False) for t in spec["added"]])

    if spec["bos"]:
        bos_id = tok.token_to_id(spec["bos"])
        tp = processors.TemplateProcessing(single=f"{spec['bos']} $A", pair=f"{spec['bos']} $A {spec['bos']} $B:1",
                                           special_tokens=[(spec["bos"], bos_id)])
        try:
            tok.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), tp])
        except Exception:
            tok.post_processor = tp
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    notes = []
    if spec["ignore_merges"]:
        j = json.loads(tok.to_str())
        j["model"]["ignore_merges"] = True
        try:
            t2 = Tokenizer.from_str(json.dumps(j))
            if json.loads(t2.to_str())["model"].get("ignore_merges") is True:
                tok = t2
                notes.append("ignore_merges=true")
            else:
                notes.append("ignore_merges unsupported by this tokenizers version (dropped)")
        except Exception as e:  # older versions reject the field
            notes.append(f"ignore_merges unsupported: {e}")
    return tok, notes


def tokenizer_config(name, spec, tok):
    added_decoder = {}
    for t in spec["special"] + spec["added"]:
        added_decoder[str(tok.token_to_id(t))] = dict(content=t, lstrip=False, normalized=False, rstrip=False,
                                                      single_word=False, special=t in spec["special"])
    cfg = {
        "added_tokens_decoder": added_decoder,
        "bos_token": spec["bos"],
        "chat_template": spec["template"],
        "clean_up_tokenization_spaces": False,
        "eos_token": spec["eos"],
        "model_max_length": spec["model_max_length"],
        "tokenizer_class": spec["tokenizer_class"],
    }
    if spec.get("pad"):
        cfg["pad_token"] = spec["pad"]
    if name == "qwen2":
        cfg["errors"] = "replace"
        cfg["split_special_tokens"] = False
    if spec["bos"]:
        cfg["add_bos_token"] = True
    return cfg


def encode_golden(tok, strings, with_specials_every=5):
    cases = []
    for i, s in enumerate(strings):
        ids = tok.encode(s, add_special_tokens=False).ids
        c = {"text": s, "ids": ids, "decode": tok.decode(ids, skip_special_tokens=False),
             "decode_skip_special": tok.decode(ids, skip_special_tokens=True)}
        if i % with_specials_every == 0:
            c["ids_with_special"] = tok.encode(s, add_special_tokens=True).ids
        cases.append(c)
    return cases


# ------------------------------------------------------------------------------------------ chat
TOOLS = [{"type": "function", "function": {
    "name": "get_current_weather", "description": "Get the current weather in a given location",
    "parameters": {"type": "object", "properties": {
        "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["location"]}}}]


def conversations(name):
    sys_msg = {"role": "system", "content": "You are a helpful assistant. Answer briefly."}
    u1 = {"role": "user", "content": "What is the capital of France?"}
    a1 = {"role": "assistant", "content": "Paris."}
    u2 = {"role": "user", "content": "And of Germany? Answer in one word."}
    convs = [
        ("single_user", [u1], {}),
        ("system_user", [sys_msg, u1], {}),
        ("multi_turn", [sys_msg, u1, a1, u2], {}),
        ("ends_with_assistant", [u1, a1], {}),
        ("whitespace_and_unicode", [{"role": "system", "content": "  Sé amable 😀 \n"},
                                    {"role": "user", "content": "\n  Привет! 你好 <|eot_id|> {{ not a template }} {% if %}  \n"},
                                    {"role": "assistant", "content": "  ¡Hola!\tΓειά 👨‍👩‍👧‍👦  "},
                                    {"role": "user", "content": "line1\nline2\r\n\ttabbed"}], {}),
        ("empty_content", [{"role": "user", "content": ""}], {}),
        ("long_multi_turn", [sys_msg] + [m for i in range(4) for m in (
            {"role": "user", "content": f"Question {i}: what is {i} + {i}?"},
            {"role": "assistant", "content": f"{i} + {i} = {2 * i}."})] + [u2], {}),
        ("quotes_and_escapes", [{"role": "user", "content": "He said \"hi\" and 'bye' \\ backslash"}], {}),
    ]
    if name == "llama3":
        convs += [
            ("no_system_date", [u1, a1, u2], {"date_string": "01 Jan 2025"}),
            ("tools", [sys_msg, {"role": "user", "content": "What's the weather in Paris?"}], {"tools": TOOLS}),
            ("tool_call", [{"role": "user", "content": "Weather in Paris?"},
                           {"role": "assistant", "tool_calls": [{"type": "function", "function": {
                               "name": "get_current_weather", "arguments": {"location": "Paris, France", "unit": "celsius"}}}]},
                           {"role": "tool", "content": "{\"temperature\": 22}"}], {"tools": TOOLS}),
            ("builtin_tools", [u1], {"builtin_tools": ["code_interpreter", "brave_search", "wolfram_alpha"]}),
            ("system_only", [sys_msg], {}),
        ]
    if name == "qwen2":
        convs += [
            ("system_only", [sys_msg], {}),
            ("tools", [sys_msg, {"role": "user", "content": "What's the weather in Paris?"}], {"tools": TOOLS}),
            ("tool_call", [{"role": "user", "content": "Weather in Paris and Rome?"},
                           {"role": "assistant", "content": "", "tool_calls": [
                               {"type": "function", "function": {"name": "get_current_weather", "arguments": {"location": "Paris"}}},
                               {"type": "function", "function": {"name": "get_current_weather", "arguments": {"location": "Rome"}}}]},
                           {"role": "tool", "content": "{\"temperature\": 22}"},
                           {"role": "tool", "content": "{\"temperature\": 25}"},
                           {"role": "assistant", "content": "Paris 22°C, Rome 25°C."}], {"tools": TOOLS}),
            ("second_system", [u1, {"role": "system", "content": "Now answer in French."}, u2], {}),
        ]
    if name == "mistral":
        convs += [
            ("error_not_alternating", [u1, u2], {}),
            ("error_bad_role", [u1, {"role": "tool", "content": "x"}], {}),
            ("system_multi_turn_folded", [sys_msg, u1, a1, u2, a1, u2], {}),
        ]
    return convs


def chat_golden(name, spec, outdir):
    import transformers
    from transformers import PreTrainedTokenizerFast
    path = os.path.join(outdir, name)
    kw = dict(tokenizer_file=os.path.join(path, "tokenizer.json"), eos_token=spec["eos"])
    if spec["bos"]:
        kw["bos_token"] = spec["bos"]
    if spec.get("pad"):
        kw["pad_token"] = spec["pad"]
    ht = PreTrainedTokenizerFast(**kw)
    ht.chat_template = spec["template"]
    out = []
    for cname, msgs, extra in conversations(name):
        for agp in (False, True):
            case = {"name": cname, "messages": msgs, "add_generation_prompt": agp, "kwargs": extra}
            try:
                kwargs = dict(extra)
                tools = kwargs.pop("tools", None)
                if tools is not None:
                    text = ht.apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=agp, **kwargs)
                else:
                    text = ht.apply_chat_template(msgs, tokenize=False, add_generation_prompt=agp, **kwargs)
                case["text"] = text
                case["ids"] = ht(text, add_special_tokens=False)["input_ids"]
            except Exception as e:  # raise_exception in the template -> TemplateError
                case["error"] = f"{type(e).__name__}: {e}"
            out.append(case)
    return {"transformers_version": transformers.__version__, "bos_token": spec["bos"], "eos_token": spec["eos"],
            "template_env": "transformers ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)",
            "cases": out}


# ------------------------------------------------------------------------------------------ throughput
def throughput(tok, docs, target_bytes):
    doc_bytes = sum(len(d.encode("utf-8")) for d in docs)
    repeats = max(1, -(-target_bytes // max(1, doc_bytes)))
    corpus = docs * repeats
    nbytes = doc_bytes * repeats
    res = {"repeats": repeats, "docs": len(corpus), "bytes": nbytes}
    tok.encode("warm up the cache", add_special_tokens=False)

    t = time.perf_counter()
    all_ids = [tok.encode(d, add_special_tokens=False).ids for d in corpus]
    dt = time.perf_counter() - t
    res["encode_mb_s"] = nbytes / dt / 1e6
    res["tokens"] = sum(len(x) for x in all_ids)

    t = time.perf_counter()
    tok.encode_batch(corpus, add_special_tokens=False)
    dt = time.perf_counter() - t
    res["encode_batch_mb_s"] = nbytes / dt / 1e6

    t = time.perf_counter()
    for ids in all_ids:
        tok.decode(ids, skip_special_tokens=False)
    dt = time.perf_counter() - t
    res["decode_mb_s"] = nbytes / dt / 1e6

    t = time.perf_counter()
    tok.decode_batch(all_ids, skip_special_tokens=False)
    dt = time.perf_counter() - t
    res["decode_batch_mb_s"] = nbytes / dt / 1e6
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outdir")
    ap.add_argument("--vocab", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--corpus-mb", type=float, default=8.0)
    ap.add_argument("--only", default="", help="comma-separated subset of llama3,qwen2,mistral")
    ap.add_argument("--throughput-only", default="", metavar="FIXTURES",
                    help="skip training: time tokenizers on FIXTURES/NAME/tokenizer.json over FIXTURES' golden strings")
    args = ap.parse_args()
    t0 = time.time()
    print(f"tokenizers {tokenizers.__version__}, python {platform.python_version()}", flush=True)
    if args.throughput_only:
        with open(os.path.join(args.throughput_only, "llama3", "encode_golden.json"), encoding="utf-8") as f:
            strings = [c["text"] for c in json.load(f)["cases"]]
        results = {}
        for name in SPECS:
            tok = Tokenizer.from_file(os.path.join(args.throughput_only, name, "tokenizer.json"))
            results[name] = throughput(tok, strings, int(args.corpus_mb * 1e6))
        write_throughput(args.outdir, results)
        print(f"done in {time.time() - t0:.1f}s", flush=True)
        return
    texts = read_texts()
    print(f"training text: {len(texts)} files, {sum(len(t) for t in texts)} chars", flush=True)
    strings = make_test_strings(texts, random.Random(args.seed))
    print(f"{len(strings)} test strings", flush=True)
    names = [n for n in SPECS if not args.only or n in args.only.split(",")]
    results = {}
    for name in names:
        spec = SPECS[name]
        d = os.path.join(args.outdir, name)
        os.makedirs(d, exist_ok=True)
        tok, notes = build_tokenizer(name, spec, texts, args.vocab, args.seed)
        tok.save(os.path.join(d, "tokenizer.json"))
        tok = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))  # golden from what was written
        with open(os.path.join(d, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(tokenizer_config(name, spec, tok), f, ensure_ascii=False, indent=2)
        cases = encode_golden(tok, strings)
        with open(os.path.join(d, "encode_golden.json"), "w", encoding="utf-8") as f:
            json.dump({"tokenizers_version": tokenizers.__version__, "notes": notes, "vocab_size": tok.get_vocab_size(),
                       "cases": cases}, f, ensure_ascii=False, separators=(",", ":"))
        print(f"{name}: vocab {tok.get_vocab_size()} ({', '.join(notes) or 'no notes'}), {len(cases)} encode cases "
              f"[{time.time() - t0:.1f}s]", flush=True)
        try:
            cg = chat_golden(name, spec, args.outdir)
            with open(os.path.join(d, "chat_golden.json"), "w", encoding="utf-8") as f:
                json.dump(cg, f, ensure_ascii=False, indent=1)
            errs = sum("error" in c for c in cg["cases"])
            print(f"{name}: {len(cg['cases'])} chat renders ({errs} raised) [{time.time() - t0:.1f}s]", flush=True)
        except ImportError as e:
            print(f"{name}: chat goldens skipped, transformers missing: {e}", flush=True)
        results[name] = throughput(tok, strings, int(args.corpus_mb * 1e6))

    write_throughput(args.outdir, results)
    print(f"done in {time.time() - t0:.1f}s", flush=True)


def write_throughput(outdir, results):
    os.makedirs(outdir, exist_ok=True)
    print("\ntokenizers (Rust) throughput, single thread (RAYON_NUM_THREADS=1), MB = 1e6 UTF-8 bytes")
    print(f"{'tokenizer':<10} {'corpus MB':>9} {'tokens':>9} {'encode':>8} {'enc_batch':>9} {'decode':>8} {'dec_batch':>9}")
    for name, r in results.items():
        print(f"{name:<10} {r['bytes'] / 1e6:9.2f} {r['tokens']:9d} {r['encode_mb_s']:8.2f} {r['encode_batch_mb_s']:9.2f} "
              f"{r['decode_mb_s']:8.2f} {r['decode_batch_mb_s']:9.2f}")
    meta = {"tokenizers_version": tokenizers.__version__, "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "threads": 1,
            "recipe": "docs = encode_golden.json cases[*].text of llama3 (same strings for every tokenizer), "
                      "corpus = docs repeated `repeats` times; encode each doc (add_special_tokens=False); "
                      "decode each doc's ids (skip_special_tokens=False); MB/s over UTF-8 bytes of the docs",
            "results": results}
    with open(os.path.join(outdir, "tokenizer_throughput_tokenizers.json"), "w") as f:
        json.dump(meta, f, indent=2)


if __name__ == "__main__":
    main()
