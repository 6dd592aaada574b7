#!/usr/bin/env python3
"""What idle clients cost a relay, for one or more `burrow` binaries (to compare two builds).

    loadtest/idle-cost.py BURROW [OTHER_BURROW ...]

For each binary, a relay on the memory store on a free 127.0.0.1 port, then:
- sockets: 1000 idle clients of each kind, that read nothing more once answered: event
  subscribers over WebSockets (`GET /ws/e/t{i}`) and over SSE (`GET /e/t{i}`), each on a topic
  of its own, keep-alive connections that asked `/health` once, and agents' links
  (`GET /agent/connect?name=a{i}`) that carried nothing yet (`loadtest/agent-links.sh` measures
  those that did); the RSS (from /proc) of a relay of their own before and after, per socket;
- waiters: one message taken with `pending=300`, so that it is out with a consumer, and 500 polls
  waiting on its tunnel (`?pending=300&timeout=20`); the store reads (consumes) the relay makes in
  5 s, from its metrics page: each waiter reads once when it starts, and nothing is there for any
  of them until the message's visibility timeout ends.
Bounded (a few seconds per binary); every process and socket it opens is closed on exit.
"""

import re
import socket
import time

from local import each_binary, free_port, relay

SOCKETS = 1000
WAITERS = 500
WATCHED = 5.0


def request(port, head, body=b""):
    """One request on a new connection; the status and the whole answer."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(head.encode() + body)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return int(answer.split(b" ", 2)[1]), answer


def consumes(metrics_port):
    _, page = request(metrics_port, "GET /metrics HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n")
    found = re.search(rb'burrow_store_duration_seconds_count\{op="consume"\} (\d+)', page)
    return int(found.group(1)) if found else 0


def rss(pid):
    with open(f"/proc/{pid}/status") as status:
        line = next(l for l in status if l.startswith("VmRSS"))
    return int(line.split()[1])


# What each kind of idle client sends, and what its answer begins with once the relay holds it.
IDLE_CLIENTS = {
    "WebSocket subscriber": ("GET /ws/e/t{i} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                             "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                             "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n", b" 101 "),
    "SSE subscriber": ("GET /e/t{i} HTTP/1.1\r\nHost: x\r\n\r\n", b": subscribed"),
    "keep-alive connection": ("GET /health HTTP/1.1\r\nHost: x\r\n\r\n", b"OK"),
    "agent link": ("GET /agent/connect?name=a{i} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                   "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                   "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n", b" 101 "),
}


def per_socket(pid, port, head, answered):
    """The relay's RSS per idle client, in KiB: SOCKETS clients sending `head` (with `{i}` their
    number), each read until `answered`, then held for a moment."""
    opened = []
    try:
        before = rss(pid)
        for i in range(SOCKETS):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(head.format(i=i).encode())
            opened.append(s)
        for s in opened:
            answer = b""
            while answered not in answer:
                chunk = s.recv(4096)
                assert chunk, f"closed before {answered!r}: {answer[:200]!r}"
                answer += chunk
        time.sleep(0.5)
        return (rss(pid) - before) / SOCKETS
    finally:
        for s in opened:
            s.close()


def measure(binary):
    costs = []
    for kind, (head, answered) in IDLE_CLIENTS.items():
        # A fresh relay each: one would reuse for the next kind what the last one freed.
        port = free_port()
        with relay(binary, port, RUST_LOG="warn") as process:
            costs.append(f"{per_socket(process.pid, port, head, answered):.1f} KiB per idle {kind}")
    port, metrics_port = free_port(), free_port()
    metrics = f"127.0.0.1:{metrics_port}"
    opened = []
    with relay(binary, port, BURROW_METRICS_LISTEN=metrics, RUST_LOG="warn") as process:
        try:
            close = "Host: x\r\nConnection: close\r\n"
            status, _ = request(port, f"POST /t/busy HTTP/1.1\r\n{close}Content-Length: 1\r\n\r\n", b"m")
            assert status == 201, status
            status, _ = request(port, f"GET /t/busy?pending=300 HTTP/1.1\r\n{close}\r\n")
            assert status == 200, status
            for _ in range(WAITERS):
                s = socket.create_connection(("127.0.0.1", port))
                s.sendall(f"GET /t/busy/poll?pending=300&timeout=20 HTTP/1.1\r\n{close}\r\n".encode())
                opened.append(s)
            time.sleep(1.0)
            start = consumes(metrics_port)
            time.sleep(WATCHED)
            reads = (consumes(metrics_port) - start) / WATCHED
            print(f"{binary}: {'; '.join(costs)}; "
                  f"{reads:.0f} store reads a second by {WAITERS} waiting polls")
        finally:
            for s in opened:
                s.close()


if __name__ == "__main__":
    each_binary(measure, __doc__)
