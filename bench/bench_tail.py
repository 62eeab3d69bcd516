"""Where the p99 latency at 16 connections comes from.

    python bench/bench_tail.py [--seconds 5]

Runs wrk (16 connections, CPU 1) against two servers pinned to CPU 0:
- authserver, timing each request inside the server too (from its first line read to
  its response written), so the client's p99 can be set beside the server's own;
- a bare thread-per-connection server on the same machine that reads a request and
  writes a fixed answer: the floor of a thread per connection with almost no Python.
If the server's own p99 is small and the bare server's client p99 is small too, the
tail at 16 connections comes from the Python time per request meeting the GIL's
hand-off between threads, not from any one slow request.
"""

import argparse
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import authserver  # noqa: E402

SECRET = "bench-secret-0123456789abcdef-0123456789abcdef"

TIMED_AUTHSERVER = textwrap.dedent('''
    import json, signal, sys, time
    sys.path.insert(0, {root!r})
    import authserver
    durations = []
    handler = authserver.AuthRequestHandler
    respond, send = handler.respond, handler.send
    def timed_respond(self, line):
        self.timed_from = time.perf_counter()
        return respond(self, line)
    def timed_send(self, response):
        send(self, response)
        durations.append(time.perf_counter() - self.timed_from)
    handler.respond, handler.send = timed_respond, timed_send
    server = authserver.make_server({config!r}, None, "127.0.0.1", {port}, log_stream=open("/dev/null", "w"))
    def report(signum, frame):
        json.dump(durations, sys.stdout)
        sys.stdout.flush()
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, report)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
''')

BARE_SERVER = textwrap.dedent('''
    import socket, threading
    ANSWER = b"HTTP/1.1 200 OK\\r\\nContent-Type: application/json\\r\\nContent-Length: 88\\r\\n\\r\\n" + b"x" * 88
    def serve(connection):
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stream = connection.makefile("rb")
        try:
            while stream.readline(65537):
                while stream.readline(65537) not in (b"\\r\\n", b"\\n", b""):
                    pass
                connection.sendall(ANSWER)
        except OSError:
            pass
        connection.close()
    listener = socket.create_server(("127.0.0.1", {port}), backlog=1024)
    while True:
        connection, _ = listener.accept()
        threading.Thread(target=serve, args=(connection,), daemon=True).start()
''')


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(port):
    for _ in range(1000):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.01)
    raise RuntimeError(f"nothing listens on {port}")


def wrk(port, seconds, token):
    output = subprocess.run(
        ["taskset", "-c", "1", "wrk", "-t1", "-c16", f"-d{seconds}s", "--latency",
         "-H", f"Authorization: Bearer {token}", f"http://127.0.0.1:{port}/users/getInfo"],
        capture_output=True, text=True, check=True).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))
    found = {}
    for percent in ("50", "99"):
        value, unit = re.search(percent + r"%\s+([\d.]+)(us|ms|s)\b", output).groups()
        found[percent] = float(value) * {"us": 0.001, "ms": 1, "s": 1000}[unit]
    return rate, found["50"], found["99"]


def percentile(values, fraction):
    return sorted(values)[min(len(values) - 1, int(len(values) * fraction))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5)
    args = parser.parse_args()
    if not shutil.which("wrk"):
        print("wrk not installed: skipping (apt-get install wrk)")
        return 0
    folder = Path(tempfile.mkdtemp())
    config = folder / "config.json"
    config.write_text(json.dumps({"secret": SECRET}))
    now = int(time.time())
    token = authserver.encode_token({"id": 81623, "username": "test", "iat": now,
                                     "exp": now + 86400}, SECRET)

    port = free_port()
    timed = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-c",
                              TIMED_AUTHSERVER.format(root=str(ROOT), config=str(config), port=port)],
                             stdout=subprocess.PIPE, text=True)
    wait_for(port)
    rate, p50, p99 = wrk(port, args.seconds, token)
    timed.terminate()
    inside = json.loads(timed.communicate(timeout=30)[0])
    print(f"authserver       {rate:8.0f} req/s  client p50 {p50:6.2f} ms  p99 {p99:6.2f} ms"
          f"   inside the server: p50 {percentile(inside, 0.5) * 1000:.2f} ms, "
          f"p99 {percentile(inside, 0.99) * 1000:.2f} ms over {len(inside)} requests")

    port = free_port()
    bare = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-c", BARE_SERVER.format(port=port)])
    wait_for(port)
    rate, p50, p99 = wrk(port, args.seconds, token)
    bare.terminate()
    bare.wait()
    print(f"bare threaded    {rate:8.0f} req/s  client p50 {p50:6.2f} ms  p99 {p99:6.2f} ms")
    shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
