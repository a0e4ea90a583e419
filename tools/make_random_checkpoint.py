#!/usr/bin/env python3
"""Writes a random-weight Hugging Face checkpoint at a production shape, so that the product path
(`scout generate`, `scout serve`) can be benchmarked as a user runs it, on machines that cannot
download real weights. Speed does not depend on the values.

The vocabulary is the fixtures' byte tokenizer (models/scout-tiny-target/scout_tokenizer.json:
256 bytes, BOS 256, EOS 257), so an N-byte prompt is N + 1 tokens and target and draft share it.
Runs on the GPU machine (torch, transformers): the weights are drawn on the GPU in bf16.

  python3 tools/make_random_checkpoint.py --shape llama-3.1-8b --out /tmp/ckpt/target
  python3 tools/make_random_checkpoint.py --shape llama-3.2-1b --out /tmp/ckpt/draft --seed 2
"""
import argparse
import inspect
import json
import os
import shutil
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "models", "scout-tiny-target", "scout_tokenizer.json")

# Llama-3.x shapes (the published config.json files), with the byte vocabulary.
SHAPES = {
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, tie_word_embeddings=False, rope_factor=8.0),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, tie_word_embeddings=True, rope_factor=32.0),
    "llama-3.2-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                         num_key_value_heads=8, head_dim=128, tie_word_embeddings=True, rope_factor=32.0),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", required=True, choices=sorted(SHAPES))
    ap.add_argument("--out", required=True, help="folder to write (created; must not hold a checkpoint already)")
    ap.add_argument("--max-position", type=int, default=131072,
                    help="max_position_embeddings (Llama 3.1: 131072; raise it for million-token prompts)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    if os.path.exists(os.path.join(args.out, "config.json")):
        sys.exit(f"{args.out} already holds a checkpoint")
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (the weights are drawn there)")
    s = dict(SHAPES[args.shape])
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": s.pop("rope_factor"), "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    kwargs = dict(s, vocab_size=258, bos_token_id=256, eos_token_id=257, pad_token_id=None, rms_norm_eps=1e-5,
                  max_position_embeddings=args.max_position, attention_bias=False, mlp_bias=False, hidden_act="silu")
    params = inspect.signature(LlamaConfig.__init__).parameters
    if "rope_parameters" in params:
        kwargs["rope_parameters"] = rope
    else:
        kwargs["rope_scaling"] = rope
        kwargs["rope_theta"] = rope["rope_theta"]
    config = LlamaConfig(**kwargs)
    torch.manual_seed(args.seed)
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(config, torch_dtype=torch.bfloat16)
    # Uniform weights scaled by 1 / sqrt(fan-in) (activations stay O(1) through the layers), norms 1.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                bound = (3.0 / p.shape[1]) ** 0.5
                p.uniform_(-bound, bound)
            else:
                p.fill_(1.0)
    n = sum(p.numel() for p in model.parameters())
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True, max_shard_size="4GB")
    shutil.copy(TOKENIZER, os.path.join(args.out, "scout_tokenizer.json"))
    with open(os.path.join(args.out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 256, "eos_token_id": 257}, f)
    print(f"{args.shape}: {n / 1e9:.2f}B parameters, bf16, byte vocabulary, max_position_embeddings "
          f"{args.max_position}, written to {args.out}")


if __name__ == "__main__":
    main()
