#!/usr/bin/env python3
"""Hostile clients against a real `scout serve` (the tiny fixture model on the CPU), standard library
only: CONNECTIONS half-open connections (half a request header, then silence) while /health must
keep answering quickly; the connection cap (503 beyond it); bad JSON, wrong types, oversized
bodies; REQUESTS requests cancelled at random points (streams dropped mid-way, connections closed
before the answer). Afterwards the server answers, its KV cache usage is back to idle and its RSS is
within 20% of what it was before.

  python3 tests/hostile_client_test.py SCOUT_BINARY SOURCE_DIR [--connections 2000] [--requests 200]
"""
import argparse
import http.client
import json
import os
import random
import resource
import socket
import subprocess
import sys
import threading
import time


SERVERS = []  # started ones, killed on failure


def fail(msg):
    print(f"FAIL: {msg}")
    for server in SERVERS:
        server.proc.kill()
    sys.exit(1)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Server:
    def __init__(self, scout, src, *flags):
        self.port = free_port()
        self.proc = subprocess.Popen([scout, "serve", "--model", os.path.join(src, "models", "scout-tiny-target"),
                                      "--host", "127.0.0.1", "--port", str(self.port), *flags],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        SERVERS.append(self)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        fail("scout serve did not come up")

    def get(self, path, timeout=10):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        c.request("GET", path)
        r = c.getresponse()
        body = r.read()
        c.close()
        return r.status, body

    def post(self, path, body, timeout=60):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        c.request("POST", path, body, {"Content-Type": "application/json"})
        r = c.getresponse()
        data = r.read()
        c.close()
        return r.status, data

    def metric(self, name):
        for line in self.get("/metrics")[1].decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        return None

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            fail("scout serve did not stop on SIGTERM")


def half_open(port, n):
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
        socks.append(s)
    return socks


def health_ms(server, times=5):
    worst = 0.0
    for _ in range(times):
        t = time.perf_counter()
        status, _ = server.get("/health")
        worst = max(worst, 1e3 * (time.perf_counter() - t))
        if status != 200:
            fail(f"/health answered {status} while hostile connections were open")
    return worst


def cancelled_request(port, rng):
    """One completion dropped at a random point: before the answer, or mid-stream."""
    body = json.dumps({"prompt": rng.choice(["def f(", "import os\n", "class A:\n"]), "max_tokens": rng.randint(1, 64),
                       "stream": rng.random() < 0.7, "ignore_eos": True})
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
    s.settimeout(30)
    want = rng.randint(0, 2000)  # bytes of the answer to read before leaving
    got = 0
    try:
        while got < want:
            chunk = s.recv(min(4096, want - got))
            if not chunk:
                break
            got += len(chunk)
    except OSError:
        pass
    s.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("scout")
    ap.add_argument("src")
    ap.add_argument("--connections", type=int, default=int(os.environ.get("HOSTILE_CONNECTIONS", 2000)))
    ap.add_argument("--requests", type=int, default=int(os.environ.get("HOSTILE_REQUESTS", 200)))
    a = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    n = min(a.connections, hard - 200)

    # The connection cap: with 5 open, the sixth gets 503; once they close, service resumes.
    capped = Server(a.scout, a.src, "--max-connections", "5")
    socks = half_open(capped.port, 5)
    deadline = time.time() + 5  # until the server has accepted all five
    while True:
        status, body = capped.get("/health")
        if status == 503 or time.time() > deadline:
            break
        time.sleep(0.1)
    if status != 503 or b"maximum of 5 connections" not in body:
        fail(f"a sixth connection over --max-connections 5: {status} {body[:200]!r}")
    for s in socks:
        s.close()
    time.sleep(0.3)
    if capped.get("/health")[0] != 200:
        fail("no service after the capped connections closed")
    capped.stop()

    server = Server(a.scout, a.src, "--timeout-request-header", "60")
    for _ in range(3):  # warm: the first requests allocate what every later one reuses
        server.post("/v1/completions", json.dumps({"prompt": "def f(", "max_tokens": 8}))
    idle_kv = server.metric("scout_kv_cache_usage_ratio")
    rss0 = rss_kb(server.proc.pid)

    t = time.perf_counter()
    socks = half_open(server.port, n)
    opened_s = time.perf_counter() - t
    worst = health_ms(server)
    print(f"{n} half-open connections (opened in {opened_s:.1f} s): /health answered within {worst:.1f} ms; "
          f"server RSS {rss_kb(server.proc.pid) / 1024:.1f} MiB (was {rss0 / 1024:.1f})")
    if worst > 1000:
        fail(f"/health took {worst:.0f} ms with {n} half-open connections")
    for s in socks:
        s.close()

    # Bad input: each gets its 4xx, none takes the server down.
    for body, want in [("{not json", 400), ('{"prompt": 5}', 400), ('{"prompt": "a", "max_tokens": "x"}', 400),
                       ('{"prompt": "a", "temperature": -1}', 400), ("[]", 400)]:
        status, data = server.post("/v1/completions", body)
        if status != want:
            fail(f"{body!r}: {status} {data[:200]!r}, wanted {want}")
    big = b'{"prompt": "' + b"a" * (70 << 20) + b'"}'
    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        c.request("POST", "/v1/completions", big, {"Content-Type": "application/json"})
        status = c.getresponse().status
    except OSError as e:
        status = f"connection error {e}"
    c.close()
    if status != 413:
        fail(f"a 70 MB body: {status}, wanted 413")

    # Requests dropped at random points, several at a time.
    rng = random.Random(7)
    todo = list(range(a.requests))
    lock = threading.Lock()

    def worker(seed):
        r = random.Random(seed)
        while True:
            with lock:
                if not todo:
                    return
                todo.pop()
            cancelled_request(server.port, r)

    threads = [threading.Thread(target=worker, args=(rng.random(),)) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    status, data = server.post("/v1/completions", json.dumps({"prompt": "def f(", "max_tokens": 8}))
    if status != 200:
        fail(f"after the cancelled requests: {status} {data[:200]!r}")
    deadline = time.time() + 30
    while time.time() < deadline:
        if server.metric("scout_num_requests_running") == 0 and server.metric("scout_kv_cache_usage_ratio") == idle_kv:
            break
        time.sleep(0.2)
    kv = server.metric("scout_kv_cache_usage_ratio")
    if kv != idle_kv:
        fail(f"KV cache usage {kv} after every request ended, {idle_kv} before")
    time.sleep(1.0)  # the timed-out and closed connections' last buffers go
    rss1 = rss_kb(server.proc.pid)
    print(f"after {a.requests} cancelled requests and the bad input: RSS {rss1 / 1024:.1f} MiB "
          f"({100.0 * (rss1 - rss0) / rss0:+.1f}% of before), KV cache usage {kv} (idle {idle_kv})")
    if rss1 > 1.2 * rss0:
        fail(f"RSS {rss1} kB after the hostile clients, {rss0} kB before (more than 20% up)")
    server.stop()
    print("hostile_client_test: ok")


if __name__ == "__main__":
    main()
