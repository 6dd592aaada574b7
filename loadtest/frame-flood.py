#!/usr/bin/env python3
"""What one WebSocket peer sending tiny frames without end costs everyone else on its relay, for
one or more `burrow` binaries (to compare two builds).

    loadtest/frame-flood.py BURROW [OTHER_BURROW ...]

For each binary, a relay on the memory store (with a token, so that an agent may connect) on a
free 127.0.0.1 port, then for each flooder in turn — an agent (`/agent/connect`) sending 1-byte
DATA frames for a stream that does not exist, and an event subscriber (`/ws/e/x`) sending empty
pongs — `FLOOD` seconds of the flood while four threads ask `/health`, each on a new connection,
and print how many were answered and their p50 / p99 (before, the same without a flood).
Bounded (about 20 s per binary); every process and socket it opens is closed on exit.
"""

import base64
import os
import socket
import struct
import threading
import time

from local import each_binary, free_port, relay

FLOOD = 6.0
TOKEN = "flood-token"


def ws_frame(opcode, payload):
    """A masked client frame (payloads under 126 bytes)."""
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked


def agent_data_frame():
    """An agent's DATA frame (docs/AGENT-PROTOCOL.md: type 2, stream id, payload) of one byte."""
    return struct.pack(">BI", 2, 99) + b"x"


def health(port, until, latencies):
    while time.time() < until:
        started = time.time()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                while s.recv(4096):
                    pass
            latencies.append(time.time() - started)
        except OSError:
            latencies.append(float("inf"))


def flood(port, path, blob, until):
    with socket.create_connection(("127.0.0.1", port)) as s:
        key = base64.b64encode(os.urandom(16)).decode()
        s.sendall((f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                   f"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                   f"Sec-WebSocket-Key: {key}\r\nAuthorization: Bearer {TOKEN}\r\n\r\n").encode())
        assert b" 101 " in s.recv(4096), f"{path}: the upgrade was refused"
        s.settimeout(2)
        try:
            while time.time() < until:
                s.sendall(blob)
        except OSError:
            pass


def measured(port, what, flooder=None):
    until = time.time() + FLOOD
    latencies = []
    askers = [threading.Thread(target=health, args=(port, until, latencies)) for _ in range(4)]
    for asker in askers:
        asker.start()
    if flooder:
        flood(port, *flooder, until)
    for asker in askers:
        asker.join()
    latencies.sort()
    n = len(latencies)
    print(f"  {what}: /health answered {n} times in {FLOOD:.0f} s, "
          f"p50 {latencies[n // 2] * 1000:.1f} ms, p99 {latencies[int(n * 0.99)] * 1000:.1f} ms")


def measure(binary):
    port = free_port()
    settings = dict(TUNNEL_ACCESS_TOKEN=TOKEN, TUNNEL_PUBLIC_IDS="x", RUST_LOG="error")
    with relay(binary, port, **settings):
        print(binary)
        measured(port, "no flood")
        tiny_data = ws_frame(2, agent_data_frame()) * 5000
        measured(port, "an agent's 1-byte DATA frames",
                 ("/agent/connect?name=flooder", tiny_data))
        measured(port, "a subscriber's empty pongs", ("/ws/e/x", ws_frame(10, b"") * 20000))


if __name__ == "__main__":
    each_binary(measure, __doc__)
