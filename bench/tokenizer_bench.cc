// Encode/decode throughput of the tokenizer.json BPE tokenizer, single-threaded, on the corpus that
// tools/make_tokenizer_fixtures.py times `tokenizers` on: the "text" of every case in
// DIR/llama3/encode_golden.json, in order, repeated until the UTF-8 size reaches --mb megabytes
// (1 MB = 1e6 bytes). Encode is per document without special tokens; decode is tokenizers'
// decode (DecodeText, special tokens kept). The numbers of `tokenizers` in --theirs (default
// DIR/tokenizer_throughput_tokenizers.json) are printed beside ours; compare them only when both
// ran on one machine, e.g.
//   python3 tools/make_tokenizer_fixtures.py /tmp/t --throughput-only models/tokenizers
//   tokenizer_bench --theirs /tmp/t/tokenizer_throughput_tokenizers.json
//
//   tokenizer_bench [--dir models/tokenizers] [--mb 8] [--theirs FILE] [--json OUT.json]
#include <chrono>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "nlohmann/json.hpp"
#include "text/bpe_tokenizer.h"
#include "runtime/model_config.h"

using scout::text::BpeTokenizer;
using json = nlohmann::json;

namespace {

double Seconds(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int main(int argc, char** argv) {
  std::string dir = "models/tokenizers", json_out, theirs_path;
  double mb = 8.0;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string f = argv[i], v = argv[i + 1];
    if (f == "--dir") dir = v;
    else if (f == "--mb") mb = std::stod(v);
    else if (f == "--json") json_out = v;
    else if (f == "--theirs") theirs_path = v;
    else {
      std::fprintf(stderr, "unknown flag %s\n", f.c_str());
      return 2;
    }
  }
  absl::StatusOr<std::string> golden = scout::runtime::ReadFile(dir + "/llama3/encode_golden.json");
  if (!golden.ok()) {
    std::fprintf(stderr, "%s\n", golden.status().ToString().c_str());
    return 1;
  }
  std::vector<std::string> docs;
  size_t doc_bytes = 0;
  const json cases = json::parse(*golden)["cases"];
  for (const json& c : cases) {
    docs.push_back(c["text"].get<std::string>());
    doc_bytes += docs.back().size();
  }
  const size_t target = static_cast<size_t>(mb * 1e6);
  const size_t repeats = std::max<size_t>(1, (target + doc_bytes - 1) / doc_bytes);
  const double bytes = static_cast<double>(doc_bytes) * repeats;

  json theirs;
  if (theirs_path.empty()) theirs_path = dir + "/tokenizer_throughput_tokenizers.json";
  if (absl::StatusOr<std::string> t = scout::runtime::ReadFile(theirs_path); t.ok()) {
    theirs = json::parse(*t, nullptr, false);
  }
  std::printf("corpus: %zu docs x %zu = %.2f MB; MB/s, single thread\n", docs.size(), repeats, bytes / 1e6);
  std::printf("%-9s %9s %10s %10s %12s %12s\n", "tokenizer", "tokens", "encode", "decode", "tok.encode", "tok.decode");
  json out = json::object();
  for (const char* name : {"llama3", "qwen2", "mistral"}) {
    absl::StatusOr<std::unique_ptr<BpeTokenizer>> tok = BpeTokenizer::FromFile(dir + "/" + name + "/tokenizer.json");
    if (!tok.ok()) {
      std::fprintf(stderr, "%s\n", tok.status().ToString().c_str());
      return 1;
    }
    (*tok)->Encode("warm up", false);
    std::vector<std::vector<int32_t>> ids;
    ids.reserve(docs.size() * repeats);
    auto t0 = std::chrono::steady_clock::now();
    for (size_t r = 0; r < repeats; ++r) {
      for (const std::string& d : docs) ids.push_back((*tok)->Encode(d, false));
    }
    const double enc_s = Seconds(t0);
    size_t tokens = 0;
    for (const auto& v : ids) tokens += v.size();
    size_t out_bytes = 0;
    t0 = std::chrono::steady_clock::now();
    for (const auto& v : ids) out_bytes += (*tok)->DecodeText(v, false)->size();
    const double dec_s = Seconds(t0);
    if (out_bytes == 0) return 1;
    double their_enc = 0, their_dec = 0;
    if (theirs.is_object() && theirs.contains("results") && theirs["results"].contains(name)) {
      their_enc = theirs["results"][name].value("encode_mb_s", 0.0);
      their_dec = theirs["results"][name].value("decode_mb_s", 0.0);
      if (theirs["results"][name].value("repeats", size_t{0}) == repeats && theirs["results"][name].value("tokens", size_t{0}) != tokens) {
        std::printf("(%s: token count differs from tokenizers' on the same corpus)\n", name);
      }
    }
    std::printf("%-9s %9zu %10.2f %10.2f %12.2f %12.2f\n", name, tokens, bytes / enc_s / 1e6, bytes / dec_s / 1e6, their_enc, their_dec);
    out[name] = {{"tokens", tokens}, {"encode_mb_s", bytes / enc_s / 1e6}, {"decode_mb_s", bytes / dec_s / 1e6}};
  }
  if (!json_out.empty()) std::ofstream(json_out) << json{{"bytes", bytes}, {"repeats", repeats}, {"results", out}}.dump(2) << "\n";
  return 0;
}
