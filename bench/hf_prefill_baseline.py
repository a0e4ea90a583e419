#!/usr/bin/env python3
"""Prefill baseline for `scout generate --device cuda`: transformers runs one forward over an
N-token prompt (bf16, attn_implementation="sdpa", a KV cache kept as generate would, only the last
row's logits) of the same checkpoint. Median of 3 after a warm-up; prints and writes tokens/s.

  python3 bench/hf_prefill_baseline.py --model CKPT --tokens 32761,131001 [--json FILE]

Runs on the GPU machine (torch, transformers; the checkpoint from tools/make_random_checkpoint.py).
"""
import argparse
import json
import time

import torch
import transformers
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", default="32761,131001")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    model = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=torch.bfloat16, attn_implementation="sdpa")
    model = model.cuda().eval()
    vocab = model.config.vocab_size
    res = {"transformers": transformers.__version__, "torch": torch.__version__,
           "device": torch.cuda.get_device_name(), "rows": []}
    for n in map(int, a.tokens.split(",")):
        ids = torch.randint(0, min(vocab, 256), (1, n), device="cuda")

        def once():
            torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.no_grad():
                out = model(ids, use_cache=True, logits_to_keep=1)
            torch.cuda.synchronize()
            del out
            return time.perf_counter() - t

        once()
        times = sorted(once() for _ in range(3))
        s = times[1]
        print(f"transformers {transformers.__version__} SDPA bf16 prefill of {n} tokens: {s:.3f} s, "
              f"{n / s:.0f} tokens/s ({torch.cuda.get_device_name()})", flush=True)
        res["rows"].append({"tokens": n, "seconds": s, "tokens_per_s": n / s})
        torch.cuda.empty_cache()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
