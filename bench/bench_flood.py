"""What a legitimate client gets while others flood the server.

    python bench/bench_flood.py [--seconds 5] [--idle 5000] [--slowloris 1000] [--logins 50]

A legitimate client (wrk, 16 keep-alive connections from 127.0.0.1, GET /users/getInfo with
a Bearer token) is measured against one authserver during each of these, and, as the
quiet figure to compare with, just before each:
- idle: another address, 127.0.0.2, holds --idle connections open and sends nothing;
- slowloris: 127.0.0.2 holds --slowloris connections, each sending its request one byte a
  second (it never ends one: the server's requestTimeout cuts it off, and it reconnects);
- logins: --logins people log in at once and again (PBKDF2 on every core), each as their own
  user from their own address (127.0.0.10 and up), so that no failed-login limit applies.
The flooders reopen a connection the server closed after --reopen seconds, doubling the
wait each time the server refuses a slot at once (a connection cap), up to 16 s: they keep
holding what the server lets them hold without turning into a connect flood. Each line
says how many connections the flood held, and how long after the flood let go the server
answered again. Nothing is pinned to a CPU: the logins are meant to take every core. The
open-files limit is raised to its hard limit first (the server inherits it).

Goals (issue 10): the legitimate client's p99 stays under 50 ms and its req/s within 30 % of
the quiet figure, in every case.
"""

import argparse
import heapq
import http.client
import json
import multiprocessing
import os
import selectors
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import ROOT, met, missing_wrk, raise_open_files_limit, start_authserver, wrk

FLOOD_ADDRESS = "127.0.0.2"
SLOW_REQUEST = b"GET /users/getInfo HTTP/1.1\r\nHost: x\r\nX-Slow: "
HELD, OPENED, REFUSED, READY = range(4)          # the flooder's counters, shared with us


def flood(port, count, slow, reopen, stop, counters):
    """Hold `count` connections from FLOOD_ADDRESS until `stop` is set (in a child process).

    Idle: connect and wait. Slow: send a request's start, then one more byte every second.
    A connection the server closes is reopened after `reopen` s; a slot refused at once
    (closed within a second of opening) waits twice as long each time, up to 16 s.
    """
    raise_open_files_limit()
    selector = selectors.DefaultSelector()
    sockets, opened, waits = [None] * count, [0.0] * count, [reopen] * count
    due = [(0.0, index) for index in range(count)]       # (when, slot): open it, or trickle
    scheduled = [0.0] * count                            # the one entry of a slot that counts
    held = 0
    while not stop.is_set():
        now = time.monotonic()
        while due and due[0][0] <= now:
            when, index = heapq.heappop(due)
            if when != scheduled[index]:
                continue                          # replaced by a later entry
            if sockets[index] is None:
                sock = socket.socket()
                try:
                    sock.bind((FLOOD_ADDRESS, 0))
                    sock.settimeout(2)
                    sock.connect(("127.0.0.1", port))
                    sock.setblocking(False)
                except OSError:
                    sock.close()
                    scheduled[index] = now + waits[index]
                    heapq.heappush(due, (scheduled[index], index))
                    continue
                sockets[index], opened[index] = sock, now
                selector.register(sock, selectors.EVENT_READ, index)
                held += 1
                counters[OPENED] += 1
                data = SLOW_REQUEST if slow else None
            else:
                data = b"x"
            if data:
                try:
                    sockets[index].send(data)
                except OSError:
                    pass
                scheduled[index] = now + 1
                heapq.heappush(due, (scheduled[index], index))
        counters[HELD] = held
        counters[READY] = 1
        wait = min(0.05, max(0.0, due[0][0] - time.monotonic())) if due else 0.05
        for key, _ in selector.select(timeout=wait):
            index, sock = key.data, key.fileobj
            try:
                if sock.recv(65536):
                    continue                  # an answer (408, 503); the end follows
            except BlockingIOError:
                continue
            except OSError:
                pass
            selector.unregister(sock)
            sock.close()
            sockets[index] = None
            held -= 1
            now = time.monotonic()
            if now - opened[index] < 1:       # refused at once: a cap; back off
                counters[REFUSED] += 1
                waits[index] = min(waits[index] * 2, 16)
            else:
                waits[index] = reopen
            scheduled[index] = now + waits[index]
            heapq.heappush(due, (scheduled[index], index))
    for sock in sockets:
        if sock is not None:
            sock.close()


class Flood:
    """A flooder in a child process, from the moment it holds what it can until stopped."""

    def __init__(self, port, count, slow, reopen):
        self.stop_event = multiprocessing.Event()
        self.counters = multiprocessing.Array("i", 4)
        self.process = multiprocessing.Process(
            target=flood, args=(port, count, slow, reopen, self.stop_event, self.counters),
            daemon=True)
        self.process.start()
        deadline = time.monotonic() + 60
        while not self.counters[READY] and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(2)                     # let the server take the last of them in

    def held(self):
        return self.counters[HELD]

    def stop(self):
        self.stop_event.set()
        self.process.join(30)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join()


def answers_again(port, limit=300):
    """Seconds until the server answers a request again after a flood let go (None: never)."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"GET /users/getInfo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if sock.recv(12).startswith(b"HTTP/1.1 "):
                    return time.monotonic() - started
        except OSError:
            pass
    return None


def measure(server, seconds, connections):
    return wrk(server.port, "/users/getInfo", connections, seconds,
               [f"Authorization: Bearer {server.token}"], pin=False)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5, help="per measurement (default 5)")
    parser.add_argument("--connections", type=int, default=16,
                        help="the legitimate client's connections (16)")
    parser.add_argument("--idle", type=int, default=5000, help="idle connections (5000)")
    parser.add_argument("--slowloris", type=int, default=1000, help="slowloris connections (1000)")
    parser.add_argument("--logins", type=int, default=50, help="logins at once (50)")
    parser.add_argument("--reopen", type=float, default=1.0,
                        help="seconds before a flooder reopens a closed connection (1)")
    args = parser.parse_args()
    if missing_wrk():
        return 0
    limit = raise_open_files_limit()
    needed = max(args.idle, args.slowloris) + 200
    if limit is not None and limit < needed:
        print(f"open-files limit {limit} < {needed}: run `ulimit -n {needed}` first "
              f"(or pass a smaller --idle)")
        return 1
    folder = Path(tempfile.mkdtemp())
    storm_users(folder, args.logins)
    server = start_authserver(folder, pin=False)
    print(f"{os.cpu_count()} CPUs; {sys.executable} (Python {sys.version.split()[0]}); "
          f"open files {limit}; nothing pinned; {args.seconds}s per measurement; "
          f"legitimate client: {args.connections} keep-alive connections from 127.0.0.1")
    results = []              # (what, quiet run just before, run during it, note)
    try:
        for name, count, slow in (("idle", args.idle, False),
                                  ("slowloris", args.slowloris, True)):
            quiet = measure(server, args.seconds, args.connections)
            flooder = Flood(server.port, count, slow, args.reopen)
            try:
                held_before = flooder.held()
                run = measure(server, args.seconds, args.connections)
                held_after = flooder.held()
            finally:
                flooder.stop()
            recovery = answers_again(server.port)
            results.append((f"{count} {name} from {FLOOD_ADDRESS}", quiet, run,
                            f"held {held_before} / {held_after} (start / end), "
                            f"{flooder.counters[REFUSED]} refused at once; answered again "
                            + (f"{recovery:.1f} s after the flood closed" if recovery is not None
                               else "only after more than 300 s")))
        quiet = measure(server, args.seconds, args.connections)
        results.append((f"{args.logins} logins at once", quiet, *login_storm(server, args)))
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)
    report(results)
    return 0


def storm_users(folder, count):
    """users.json plus `count` users stormNN, each with "test"'s hash (password "test")."""
    users = json.loads((ROOT / "users.json").read_text())
    test_hash = next(user["passwordHash"] for user in users if user["username"] == "test")
    users += [{"id": 900000 + number, "username": f"storm{number:02d}", "passwordHash": test_hash}
              for number in range(count)]
    (folder / "users.json").write_text(json.dumps(users))


def log_in_again_and_again(port, number, stop, counts):
    """One person logging in, again and again, from their own address 127.0.0.(10+number)."""
    body = json.dumps({"username": f"storm{number:02d}", "password": "dGVzdA=="})
    while not stop.is_set():
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120,
                                                source_address=(f"127.0.0.{10 + number}", 0))
        try:
            while not stop.is_set():
                connection.request("POST", "/users/authenticate", body,
                                   {"Content-Type": "application/json"})
                response = connection.getresponse()
                response.read()
                counts[response.status == 200] += 1
        except OSError:
            counts["errors"] += 1
        finally:
            connection.close()


def login_storm(server, args):
    """getInfo measured while `logins` people log in at once, each from their own address and
    as their own user (so that no failed-login limit applies): PBKDF2 on every core."""
    stop = threading.Event()
    counts = {True: 0, False: 0, "errors": 0}
    people = [threading.Thread(target=log_in_again_and_again,
                               args=(server.port, number, stop, counts), daemon=True)
              for number in range(args.logins)]
    for person in people:
        person.start()
    time.sleep(2)                         # the logins queue up and every core is hashing
    started = time.monotonic()
    run = measure(server, args.seconds, args.connections)
    done, refused = counts[True], counts[False]
    elapsed = time.monotonic() - started
    stop.set()
    for person in people:
        person.join(120)
    return run, (f"{done / elapsed:.1f} logins/s got through meanwhile (refused {refused}, "
                 f"connection errors {counts['errors']})")


def report(results):
    print("\nGET /users/getInfo for the legitimate client: quiet (just before), then during it")
    print(f"{'while':30}{'quiet req/s':>12}{'req/s':>8}{'change':>8}{'quiet p99':>10}"
          f"{'p99 ms':>8}{'non-2xx':>8}{'errors':>7}  the flood")
    for name, quiet, run, note in results:
        print(f"{name:30}{quiet['rate']:12.0f}{run['rate']:8.0f}"
              f"{run['rate'] / quiet['rate'] - 1:+8.0%}{quiet['p99']:10.2f}{run['p99']:8.2f}"
              f"{run['non2xx']:8d}{run['errors']:7d}  {note}")
    print()
    for name, quiet, run, _ in results:
        kept = run["rate"] >= 0.7 * quiet["rate"]
        print(f"goal while {name}: p99 < 50 ms ({run['p99']:.1f} ms) and req/s within 30 % of "
              f"quiet ({run['rate'] / quiet['rate'] - 1:+.0%}): {met(run['p99'] < 50 and kept)}")


if __name__ == "__main__":
    sys.exit(main())
