#!/usr/bin/env python3
"""Streaming client for `scout serve` (OpenAI /v1/completions, stream: true), standard library
only. Sends `--concurrency` requests at once (each a different slice of the prompt file, so no
two share a prefix) and reports, over the tokens streamed while every request was decoding, the
median time between one request's consecutive text chunks, and the server's own mean
inter-token latency over the requests (scout_inter_token_latency_seconds from /metrics). With
one token a round (random weights accept no draft tokens) the latter is the server's time per
speculative round; text chunks can be fewer than tokens (bytes of a UTF-8 character are held
back until it is whole).

  python3 bench/stream_client.py --port 8000 --prompt-file p.txt [--bytes N] [--tokens 64] [--concurrency 8]
"""
import argparse
import http.client
import json
import statistics
import threading
import time


def one(port, prompt, tokens, out):
    conn = http.client.HTTPConnection("localhost", port, timeout=3600)
    body = json.dumps({"model": "target", "prompt": prompt, "max_tokens": tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True})
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        out["error"] = f"HTTP {resp.status}: {resp.read()[:300]!r}"
        return
    stamps = []
    for line in resp:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("choices") and chunk["choices"][0].get("text"):
            stamps.append(time.perf_counter())
    out["ttft"] = stamps[0] - t0 if stamps else None
    out["stamps"] = stamps


def itl(port):
    """(sum, count) of the server's scout_inter_token_latency_seconds histogram."""
    conn = http.client.HTTPConnection("localhost", port, timeout=60)
    conn.request("GET", "/metrics")
    total = count = 0.0
    for line in conn.getresponse().read().decode().splitlines():
        if line.startswith("scout_inter_token_latency_seconds_sum"):
            total = float(line.split()[-1])
        elif line.startswith("scout_inter_token_latency_seconds_count"):
            count = float(line.split()[-1])
    return total, count


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--prompt-file", required=True)
    ap.add_argument("--bytes", type=int, default=0, help="prompt length in bytes (0: the whole file)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--label", default="serve")
    args = ap.parse_args()
    text = open(args.prompt_file, encoding="utf-8", errors="replace").read()
    n = args.bytes or len(text)
    outs = [{} for _ in range(args.concurrency)]
    threads = []
    for i in range(args.concurrency):
        start = (i * 7919) % max(1, len(text) - n) if len(text) > n else 0
        prompt = f"[{i}] " + text[start:start + n - 8]
        threads.append(threading.Thread(target=one, args=(args.port, prompt, args.tokens, outs[i])))
    itl0 = itl(args.port)
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    itl1 = itl(args.port)
    server_itl = (itl1[0] - itl0[0]) / max(1.0, itl1[1] - itl0[1])
    errors = [o["error"] for o in outs if "error" in o]
    if errors:
        print(f"{args.label}: {len(errors)} errors, first: {errors[0]}")
        return
    # Gaps while all requests decode: from the last first token to the first last token.
    begin = max(o["stamps"][0] for o in outs)
    end = min(o["stamps"][-1] for o in outs)
    gaps = []
    for o in outs:
        s = [t for t in o["stamps"] if begin <= t <= end]
        gaps += [b - a for a, b in zip(s, s[1:])]
    if not gaps:
        print(f"{args.label}: no overlapping decode (tokens {[len(o['stamps']) for o in outs]})")
        return
    ttft = statistics.median(o["ttft"] for o in outs)
    print(f"{args.label}: median time between streamed chunks {1e3 * statistics.median(gaps):.3f} ms "
          f"(mean {1e3 * statistics.mean(gaps):.3f} ms, {len(gaps)} gaps while all {args.concurrency} decode); "
          f"median time to first token {ttft:.2f} s; the server's mean inter-token latency over these requests "
          f"{1e3 * server_itl:.3f} ms")


if __name__ == "__main__":
    main()
