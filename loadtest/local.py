"""What the Python load tests share: free ports on 127.0.0.1 and relays they start and stop."""

import contextlib
import os
import socket
import subprocess
import sys
import time


def free_port():
    """A port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(port, deadline):
    """Returns once something listens on `port`; exits the script at `deadline` (monotonic)."""
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"nothing listens on {port}")


@contextlib.contextmanager
def relay(binary, port, **settings):
    """`binary serve` on 127.0.0.1:`port` with the memory store and `settings` as environment
    variables, once it listens; stopped (SIGTERM) on leaving."""
    env = dict(os.environ, BURROW_STORE="memory", BURROW_LISTEN=f"127.0.0.1:{port}", **settings)
    process = subprocess.Popen([binary, "serve"], env=env)
    try:
        wait_for(port, time.monotonic() + 10)
        yield process
    finally:
        process.terminate()
        process.wait()


def each_binary(measure, doc):
    """Runs `measure` for each binary named on the command line; without one, shows `doc`."""
    if len(sys.argv) < 2:
        sys.exit(doc)
    for binary in sys.argv[1:]:
        measure(binary)
