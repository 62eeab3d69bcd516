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
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from common import ROOT, SECRET, free_port, mint_token, missing_wrk, wait_for_answer, wrk

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


def percentile(values, fraction):
    return sorted(values)[min(len(values) - 1, int(len(values) * fraction))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5)
    args = parser.parse_args()
    if missing_wrk():
        return 0
    folder = Path(tempfile.mkdtemp())
    config = folder / "config.json"
    config.write_text(json.dumps({"secret": SECRET}))
    bearer = [f"Authorization: Bearer {mint_token()}"]

    port = free_port()
    timed = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-c",
                              TIMED_AUTHSERVER.format(root=str(ROOT), config=str(config), port=port)],
                             stdout=subprocess.PIPE, text=True)
    wait_for_answer(port)
    run = wrk(port, "/users/getInfo", 16, args.seconds, bearer)
    timed.terminate()
    inside = json.loads(timed.communicate(timeout=30)[0])
    print(f"authserver       {run['rate']:8.0f} req/s  client p50 {run['p50']:6.2f} ms  "
          f"p99 {run['p99']:6.2f} ms"
          f"   inside the server: p50 {percentile(inside, 0.5) * 1000:.2f} ms, "
          f"p99 {percentile(inside, 0.99) * 1000:.2f} ms over {len(inside)} requests")

    port = free_port()
    bare = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-c", BARE_SERVER.format(port=port)])
    wait_for_answer(port)
    run = wrk(port, "/users/getInfo", 16, args.seconds, bearer)
    bare.terminate()
    bare.wait()
    print(f"bare threaded    {run['rate']:8.0f} req/s  client p50 {run['p50']:6.2f} ms  "
          f"p99 {run['p99']:6.2f} ms")
    shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
