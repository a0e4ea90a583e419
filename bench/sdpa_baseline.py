"""PyTorch SDPA decode attention baseline at Llama-3.1-8B shapes (32 q heads, 8 KV heads, head dim
128, bf16, enable_gqa), contiguous KV. Runs on the GPU machine; writes {"ctx,batch,q": median us}
for bench/attention_bench --sdpa-json. For q > 1 the causal mask is bottom-right aligned
(the new rows are the context's last) and passed as torch.nn.attention.bias.causal_lower_right,
which SDPA runs on its flash / memory-efficient kernels; a boolean mask would send it to the
math-like kernel, about 10x slower. The first run of each shape checks the result against the
boolean mask. L2 is flushed between runs: by default by
triton.testing.do_bench (it zeroes 256 MB: L2 left full of dirty lines); with --flush read by
reading 256 MB before each of 100 event-timed runs (median), as attention_bench --flush read.

  python3 bench/sdpa_baseline.py --out sdpa.json [--contexts ...] [--batches 1,16] [--q-tokens 1,5]
                                 [--flush write|read]
"""
import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from triton.testing import do_bench


def causal_fn(q, k, v, qt, ctx):
    """The fast bottom-right causal SDPA call, checked once against the boolean mask."""
    mask = torch.ones(qt, ctx, dtype=torch.bool, device="cuda").tril(diagonal=ctx - qt)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    del mask
    bias = causal_lower_right(qt, ctx)
    try:
        fn = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)
        got = fn()
        how = "causal_lower_right, enable_gqa"
    except (RuntimeError, TypeError, ValueError):
        # Older CausalBias dispatch without GQA: the KV heads shared by expanding views.
        group = q.shape[1] // k.shape[1]
        fn = lambda: F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                                    attn_mask=bias)
        got = fn()
        how = "causal_lower_right, KV repeated"
    err = ((got.float() - want.float()).norm() / want.float().norm()).item()
    if err > 1e-2:
        raise SystemExit(f"bottom-right causal SDPA disagrees with the boolean mask: relative error {err:.3g}")
    return fn, how


def bench_read_flush(fn, reps=100):
    """Median microseconds of fn, each run after reading (not writing) 256 MB."""
    cache = torch.ones(256 << 18, dtype=torch.int32, device="cuda")
    for _ in range(10):
        fn()
    times = []
    for _ in range(reps):
        cache.sum()
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000.0)
    times.sort()
    return times[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--contexts", default="32768,131072,524288,1048576")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--q-tokens", default="1,5")
    ap.add_argument("--flush", default="write", choices=["write", "read"])
    args = ap.parse_args()
    res = {}
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}, flush {args.flush}", flush=True)
    for ctx in map(int, args.contexts.split(",")):
        for b in map(int, args.batches.split(",")):
            for qt in map(int, args.q_tokens.split(",")):
                key = f"{ctx},{b},{qt}"
                kv_bytes = 2 * b * 8 * ctx * 128 * 2
                free, _ = torch.cuda.mem_get_info()
                if kv_bytes + (4 << 30) > free:
                    print(f"{key}: skip (KV {kv_bytes / 2**30:.1f} GiB)", flush=True)
                    continue
                try:
                    q = torch.randn(b, 32, qt, 128, device="cuda", dtype=torch.bfloat16)
                    k = torch.randn(b, 8, ctx, 128, device="cuda", dtype=torch.bfloat16)
                    v = torch.randn(b, 8, ctx, 128, device="cuda", dtype=torch.bfloat16)
                    how = "no mask"
                    fn = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                    if qt > 1:  # bottom-right causal: query t sees keys <= ctx - qt + t
                        fn, how = causal_fn(q, k, v, qt, ctx)
                    if args.flush == "write":
                        us = do_bench(fn, warmup=25, rep=100, return_mode="median") * 1000.0
                    else:
                        us = bench_read_flush(fn)
                    res[key] = us
                    print(f"{key}: {us:.1f} us ({kv_bytes / us / 1e6:.2f} TB/s of KV; {how})", flush=True)
                    del q, k, v
                except torch.OutOfMemoryError:
                    print(f"{key}: OOM", flush=True)
                torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
