#!/usr/bin/env python3
"""Baseline for `scout bench decode`: transformers' own dense generation (SDPA attention, static
KV cache, greedy) of a random-weight Llama-3.1-8B-shaped model at a long context, on the GPU.

  python3 bench/hf_decode_baseline.py [--context 32768] [--new-tokens 64] [--batch 1] [--json FILE]

Decode tokens/s = new_tokens / (time(generate N+1 tokens) - time(generate 1 token)): the prefill
cancels out. Runs on the GPU machine (torch, transformers; no downloads: the config is built here).
"""
import argparse
import json
import time

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM


def llama31_8b():
    return LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
        rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    torch.manual_seed(0)
    cfg = llama31_8b()
    cfg._attn_implementation = "sdpa"
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg)
    model.eval()
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.context), device="cuda")
    mask = torch.ones_like(ids)

    def gen(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 cache_implementation="static", pad_token_id=0)
        torch.cuda.synchronize()
        assert out.shape[1] == a.context + n
        return time.perf_counter() - t

    gen(2)  # warm-up (kernels, cache allocation)
    t1 = min(gen(1) for _ in range(2))
    tn = min(gen(a.new_tokens + 1) for _ in range(2))
    decode_s = tn - t1
    tps = a.batch * a.new_tokens / decode_s
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, {torch.cuda.get_device_name()}")
    print(f"Llama-3.1-8B shape, bf16, SDPA, static cache, greedy: context {a.context}, batch {a.batch}: "
          f"prefill+1 {t1:.3f} s, decode {a.new_tokens} tokens {decode_s:.3f} s -> {tps:.1f} tokens/s "
          f"({1e3 * decode_s / a.new_tokens:.2f} ms a step)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"context": a.context, "batch": a.batch, "new_tokens": a.new_tokens, "prefill_s": t1,
                       "decode_s": decode_s, "tokens_per_s": tps, "transformers": transformers.__version__,
                       "torch": torch.__version__, "device": torch.cuda.get_device_name()}, f)


if __name__ == "__main__":
    main()
