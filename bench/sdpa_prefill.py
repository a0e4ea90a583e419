"""PyTorch SDPA prefill attention baseline for bench/prefill_bench (--sdpa-json): 32 query / 8 KV
heads, head dim 128, bf16, batch 1, one layer; a chunk of Q new tokens at the end of a context of
C (Q = C: a whole prompt, is_causal; Q < C: bottom-right causal through causal_lower_right, which
keeps SDPA on its fused kernels). Each backend is forced in turn (flash: FlashAttention-2 as
PyTorch ships it; cudnn where this build has it); median microseconds by triton's do_bench.
Writes {"C,Q": {"flash": us, "cudnn": us}}.

  python3 bench/sdpa_prefill.py --out sdpa_prefill.json [--rows 32768:32768,131072:131072,...]
"""
import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right
from triton.testing import do_bench


def call(q, k, v, qt, ctx):
    if qt == ctx:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(qt, ctx), enable_gqa=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows", default="32768:32768,131072:131072,32768:4096,131072:4096,131072:16384")
    args = ap.parse_args()
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}", flush=True)
    res = {}
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
    for row in args.rows.split(","):
        ctx, qt = (int(x) for x in row.split(":")) if ":" in row else (int(row), int(row))
        q = torch.randn(1, 32, qt, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, 8, ctx, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, 8, ctx, 128, device="cuda", dtype=torch.bfloat16)
        pairs = qt * ctx - qt * (qt - 1) / 2
        entry = {}
        for name, backend in backends.items():
            try:
                with sdpa_kernel([backend]):
                    call(q, k, v, qt, ctx)
                    us = do_bench(lambda: call(q, k, v, qt, ctx), warmup=25, rep=200, return_mode="median") * 1000.0
                entry[name] = us
                print(f"{ctx},{qt} {name}: {us:.1f} us, {4 * 32 * 128 * pairs / us / 1e6:.1f} TFLOP/s", flush=True)
            except RuntimeError as e:
                print(f"{ctx},{qt} {name}: not available ({str(e).splitlines()[0][:120]})", flush=True)
        res[f"{ctx},{qt}"] = entry
        del q, k, v
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
