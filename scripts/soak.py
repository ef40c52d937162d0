#!/usr/bin/env python3
"""Soak test: minutes of mixed hostile and normal load against `gptj serve`, not run in CI.

    cargo build --release && scripts/soak.py --minutes 10 [--binary target/release/gptj]

It starts the server (`builtin:tiny`) on 127.0.0.1, runs worker threads that each loop over
normal requests, streams dropped midway, slow readers, stalled readers (a stream never
read), oversized prompts and idle sockets, and samples the server's RSS, open descriptors,
KV blocks in use and requests in flight every 10 s. At the end it stops the load, waits, and
checks that KV blocks and in-flight requests are back to 0, descriptors back near the
baseline, RSS flat (no growth across the second half), and that no answer was a 5xx.
Exit status 1 if any check fails. Standard library only.
"""

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

MODEL = "eleutherai-gpt-j-6b"


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


class Soak:
    def __init__(self, port, pid):
        self.port, self.pid = port, pid
        self.lock = threading.Lock()
        self.counts = {}
        self.stop = False

    def count(self, what):
        with self.lock:
            self.counts[what] = self.counts.get(what, 0) + 1

    def url(self, path):
        return f"http://127.0.0.1:{self.port}{path}"

    def metric(self, name):
        text = urllib.request.urlopen(self.url("/metrics"), timeout=10).read().decode()
        return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines()
                   if l.startswith(name) and (l[len(name)] in " {"))

    def post(self, path, body, timeout=120):
        req = urllib.request.Request(self.url(path), data=json.dumps(body).encode())
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                r.read()
                return r.status
        except urllib.error.HTTPError as e:
            e.read()
            return e.code

    def raw(self, head_and_body, rcvbuf=None):
        s = socket.socket()
        if rcvbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.settimeout(30)
        s.connect(("127.0.0.1", self.port))
        s.sendall(head_and_body)
        return s

    def stream_request(self, n, echo_prompt):
        body = json.dumps({"prompt": echo_prompt, "n": n, "echo": True, "max_tokens": 64,
                           "stream": True}).encode()
        return (b"POST /openai/v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n"
                % len(body)) + body

    # ---- the kinds of client ----

    def normal(self):
        status = self.post(f"/v1/models/{MODEL}:predict",
                           {"instances": ["The secret to a happy life is"],
                            "parameters": {"max_new_tokens": random.randint(4, 32)}})
        self.count(f"normal {status}")

    def dropped_stream(self):
        s = self.raw(self.stream_request(4, "Once upon a time"))
        try:
            s.recv(random.randint(100, 4000))
        except OSError:
            pass
        s.close()
        self.count("dropped stream")

    def slow_reader(self):
        s = self.raw(self.stream_request(8, "hello " * 200), rcvbuf=4096)
        try:
            for _ in range(random.randint(2, 6)):
                if not s.recv(200):
                    break
                time.sleep(1)
        except OSError:
            pass
        s.close()
        self.count("slow reader")

    def stalled_reader(self):
        prompt = " " + "=" * 65
        s = self.raw(self.stream_request(32, prompt * 1500), rcvbuf=4096)
        time.sleep(random.uniform(6, 12))  # never reads; the server cuts it off
        s.close()
        self.count("stalled reader")

    def oversized(self):
        status = self.post(f"/v1/models/{MODEL}:predict",
                           {"instances": ["a" * 1_900_000], "parameters": {"max_new_tokens": 4}})
        self.count(f"oversized {status}")

    def idle_socket(self):
        s = socket.socket()
        s.connect(("127.0.0.1", self.port))
        time.sleep(random.uniform(1, 4))
        s.close()
        self.count("idle socket")

    def worker(self):
        kinds = [self.normal] * 6 + [self.dropped_stream] * 2 + [
            self.slow_reader, self.stalled_reader, self.oversized, self.idle_socket]
        while not self.stop:
            try:
                random.choice(kinds)()
            except Exception as e:  # a client-side failure is counted, not fatal
                self.count(f"client error {type(e).__name__}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default="target/release/gptj")
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--port", type=int, default=18777)
    a = ap.parse_args()
    log = open("/tmp/gptj-soak.log", "w")
    server = subprocess.Popen(
        [a.binary, "serve", "--model", "builtin:tiny", "--host", "127.0.0.1",
         "--port", str(a.port), "--write-timeout", "5s", "--keep-alive-timeout", "5s"],
        stdout=log, stderr=log)
    soak = Soak(a.port, server.pid)
    for _ in range(600):
        try:
            if urllib.request.urlopen(soak.url(f"/v1/models/{MODEL}"), timeout=2).status == 200:
                break
        except Exception:
            time.sleep(0.1)
    base = (rss_mib(server.pid), fds(server.pid))
    print(f"soak: baseline RSS {base[0]:.0f} MiB, {base[1]} fds; {a.workers} workers for {a.minutes} min")
    threads = [threading.Thread(target=soak.worker, daemon=True) for _ in range(a.workers)]
    for t in threads:
        t.start()
    samples = []
    end = time.time() + a.minutes * 60
    while time.time() < end:
        time.sleep(10)
        sample = (time.time(), rss_mib(server.pid), fds(server.pid),
                  soak.metric("gptj_kv_cache_blocks_used"), soak.metric("gptj_http_requests_in_flight"))
        samples.append(sample)
        print(f"soak: t={sample[0] - end + a.minutes * 60:5.0f}s RSS {sample[1]:6.0f} MiB  fds {sample[2]:4}"
              f"  kv blocks {sample[3]:6.0f}  in flight {sample[4]:3.0f}", flush=True)
    soak.stop = True
    for t in threads:
        t.join(timeout=60)
    time.sleep(10)
    after = (rss_mib(server.pid), fds(server.pid), soak.metric("gptj_kv_cache_blocks_used"),
             soak.metric("gptj_http_requests_in_flight"))
    text = urllib.request.urlopen(soak.url("/metrics"), timeout=10).read().decode()
    server_5xx = sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines()
                     if l.startswith("gptj_http_requests_total{") and 'status="5' in l
                     and 'status="503"' not in l)
    server.terminate()
    server.wait(timeout=60)
    half = samples[len(samples) // 2:]
    growth = (half[-1][1] - half[0][1]) if len(half) > 1 else 0.0
    print(f"soak: clients: {json.dumps(dict(sorted(soak.counts.items())))}")
    print(f"soak: after: RSS {after[0]:.0f} MiB, {after[1]} fds, kv blocks {after[2]:.0f}, "
          f"in flight {after[3]:.0f}; RSS growth over the second half {growth:+.0f} MiB; "
          f"5xx other than 503: {server_5xx:.0f}; server exit {server.returncode}")
    ok = (after[2] == 0 and after[3] == 0 and after[1] <= base[1] + 8 and server_5xx == 0
          and growth < 50 and server.returncode == 0
          and not any(k.startswith("normal 5") and k != "normal 503" for k in soak.counts))
    print("soak: PASSED" if ok else "soak: FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
