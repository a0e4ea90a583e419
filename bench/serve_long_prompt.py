#!/usr/bin/env python3
"""A long prompt arriving while sessions decode, against `scout serve` (OpenAI /v1/completions,
streaming; standard library only). Starts --sessions streaming requests, measures the time between
each one's consecutive text chunks for --window seconds (the baseline), then sends one prompt of
--long-bytes bytes (max_tokens 1) and measures the same gaps until its answer arrives. Prints p50,
p99 and max of both, their ratio, and the long prompt's time to its answer; writes --json.

  python3 bench/serve_long_prompt.py --port 8000 --prompt-file p.txt [--sessions 8]
      [--session-bytes 2000] [--long-bytes 131000] [--window 15] [--json out.json]
"""
import argparse
import http.client
import json
import threading
import time


def stream(port, prompt, tokens, stamps, stop):
    conn = http.client.HTTPConnection("localhost", port, timeout=3600)
    body = json.dumps({"model": "target", "prompt": prompt, "max_tokens": tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True})
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        stamps.append(("error", resp.status, resp.read()[:300]))
        return
    for line in resp:
        if stop.is_set():
            break
        line = line.strip()
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                stamps.append(time.perf_counter())
    conn.close()  # the server cancels a request whose client left


def gaps_between(all_stamps, t0, t1):
    gaps = []
    for stamps in all_stamps:
        s = [t for t in stamps if isinstance(t, float) and t0 <= t <= t1]
        gaps += [b - a for a, b in zip(s, s[1:])]
    return sorted(gaps)


def pct(sorted_vals, q):
    if not sorted_vals:
        return float("nan")
    return sorted_vals[min(len(sorted_vals) - 1, int(q * len(sorted_vals)))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--prompt-file", required=True)
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--session-bytes", type=int, default=2000)
    ap.add_argument("--session-tokens", type=int, default=6000)
    ap.add_argument("--long-bytes", type=int, default=131000)
    ap.add_argument("--window", type=float, default=15.0)
    ap.add_argument("--label", default="serve")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    text = open(a.prompt_file, encoding="utf-8", errors="replace").read()
    while len(text) < a.long_bytes + a.sessions * a.session_bytes:
        text += text
    stop = threading.Event()
    all_stamps = [[] for _ in range(a.sessions)]
    threads = []
    for i in range(a.sessions):
        start = a.long_bytes + i * a.session_bytes
        prompt = f"[{i}] " + text[start:start + a.session_bytes - 8]
        threads.append(threading.Thread(target=stream, args=(a.port, prompt, a.session_tokens, all_stamps[i], stop)))
        threads[-1].start()
    while not all(len(s) >= 3 for s in all_stamps):  # every session decoding
        if any(s and s[0] == "error" for s in all_stamps):
            raise SystemExit(f"a session failed: {[s for s in all_stamps if s and s[0] == 'error'][0]}")
        time.sleep(0.05)
    t_base = time.perf_counter()
    time.sleep(a.window)
    t_long = time.perf_counter()
    conn = http.client.HTTPConnection("localhost", a.port, timeout=3600)
    conn.request("POST", "/v1/completions",
                 json.dumps({"model": "target", "prompt": text[:a.long_bytes], "max_tokens": 1, "temperature": 0}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    answer = resp.read()
    t_done = time.perf_counter()
    stop.set()
    for t in threads:
        t.join()
    if resp.status != 200:
        raise SystemExit(f"long prompt: HTTP {resp.status}: {answer[:300]!r}")
    base = gaps_between(all_stamps, t_base, t_long)
    during = gaps_between(all_stamps, t_long, t_done)
    res = {"label": a.label, "sessions": a.sessions, "session_bytes": a.session_bytes, "long_bytes": a.long_bytes,
           "long_prompt_seconds": t_done - t_long,
           "baseline": {"gaps": len(base), "p50_ms": 1e3 * pct(base, 0.5), "p99_ms": 1e3 * pct(base, 0.99),
                        "max_ms": 1e3 * (base[-1] if base else float("nan"))},
           "during": {"gaps": len(during), "p50_ms": 1e3 * pct(during, 0.5), "p99_ms": 1e3 * pct(during, 0.99),
                      "max_ms": 1e3 * (during[-1] if during else float("nan"))}}
    res["p99_ratio"] = res["during"]["p99_ms"] / res["baseline"]["p99_ms"] if base and during else float("nan")
    b, d = res["baseline"], res["during"]
    print(f"{a.label}: {a.sessions} sessions decoding; time between streamed chunks p50/p99/max "
          f"{b['p50_ms']:.1f}/{b['p99_ms']:.1f}/{b['max_ms']:.1f} ms alone ({b['gaps']} gaps), "
          f"{d['p50_ms']:.1f}/{d['p99_ms']:.1f}/{d['max_ms']:.1f} ms while a {a.long_bytes}-byte prompt prefilled "
          f"({d['gaps']} gaps, {res['long_prompt_seconds']:.1f} s to its answer): p99 x{res['p99_ratio']:.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
