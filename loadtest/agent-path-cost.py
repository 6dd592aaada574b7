#!/usr/bin/env python3
"""The agent's CPU per request for hostile request paths: what a client can make `burrow agent`
spend on its dot-segment check (docs/PERFORMANCE.md, "Session 11").

    loadtest/agent-path-cost.py target/release/burrow [OTHER_BURROW ...]

For each binary: starts a relay (memory store), a one-line Python upstream and an agent on free
127.0.0.1 ports, sends each ~60 KB path 20 times, one connection each, and prints the agent's
CPU (utime + stime from /proc, 10 ms ticks: ±0.5 ms per request) and the statuses it saw. Stops
everything it started, by itself, within about a minute.
"""
import os
import socket
import subprocess
import sys
import time

from local import free_port, wait_for

ROUNDS = 20
UPSTREAM = """
import http.server, socketserver, sys
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", "2"); self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *args): pass
socketserver.ThreadingTCPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""
FDFA = "\ufdfa".encode()
CASES = {
    "plain a x 60000": b"a" * 60000,
    "%25 x 19990, 2e": b"%25" * 19990 + b"2e",
    "U+FDFA x 19986, deep": FDFA * 19986 + b"%2525252525252525252e",
    "%uFDFA x 10000, deep": b"%uFDFA" * 10000 + b"%2525252525252525252e",
    "U+3300 x 19990, deep": "\u3300".encode() * 19990 + b"%25252525252e",
    "U+FDFA + 27 a, x 2000": (FDFA + b"a" * 27) * 2000 + b"%2525252525252525252e",
    "CJK + U+337F, x 6600": "資料\u337f".encode() * 6600,
    "a x 59980, then deep": b"a" * 59980 + b"%2525252525252541",
    "(e, U+0344) x 21799": "e\u0344".encode() * 21799,
    "(e, U+0344) x 21795, deep": "e\u0344".encode() * 21795 + b"%25252541",
    "(e, U+0344) x 21790, %EF%BC%85": "e\u0344".encode() * 21790 + b"%EF%BC%8541",
    "marks + ％ escapes (searched)": ("a\u0344" * 21300 + "\u0345%252525%u0344%e0\uff05\uff12\uff15\uff25\uff26"
                        "\uff05\uff12\uff15\uff22\uff23\uff05\uff12\uff15\uff18\uff15%EF%BC%85"
                        "\u034541\uff45%u").encode(),
    "deep, then %e0 x 19993": b"%2525252525252541" + b"%e0" * 19993,
    "deep, then (é, %e0) x 12000": b"%2525252525252541" + "é%e0".encode() * 11996,
}


def request(port, path):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /r/cost" + path + b" HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return answer.split(b"\r\n", 1)[0].decode(errors="replace")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(burrow):
    relay_port, upstream_port = free_port(), free_port()
    quiet = {"RUST_LOG": "warn", "BURROW_ACCESS_LOG": "0"}
    started = []
    try:
        started.append(subprocess.Popen([sys.executable, "-c", UPSTREAM, str(upstream_port)]))
        env = dict(os.environ, BURROW_LISTEN=f"127.0.0.1:{relay_port}", **quiet)
        started.append(subprocess.Popen([burrow, "serve"], env=env, stderr=subprocess.DEVNULL))
        wait_for(relay_port, time.monotonic() + 10)
        wait_for(upstream_port, time.monotonic() + 10)
        agent = subprocess.Popen(
            [burrow, "agent", "--relay", f"http://127.0.0.1:{relay_port}", "--name", "cost",
             "--upstream", f"http://127.0.0.1:{upstream_port}/api"],
            env=dict(os.environ, **quiet), stderr=subprocess.DEVNULL)
        started.append(agent)
        deadline = time.monotonic() + 10
        while request(relay_port, b"/ready") != "HTTP/1.1 200 OK":
            if time.monotonic() > deadline:
                sys.exit("the agent did not connect")
            time.sleep(0.1)
        print(burrow)
        for name, path in CASES.items():
            before = cpu_seconds(agent.pid)
            statuses = sorted({request(relay_port, b"/" + path) for _ in range(ROUNDS)})
            spent = (cpu_seconds(agent.pid) - before) / ROUNDS * 1000
            print(f"  {name:<24} {len(path):>6} bytes  {spent:5.2f} ms/request  {', '.join(statuses)}")
    finally:
        for process in started:
            process.kill()
            process.wait()


for binary in sys.argv[1:] or ["target/release/burrow"]:
    measure(binary)
