"""HTTP speed and footprint: authserver against the tutorial's Node server and FastAPI.

    python bench/bench_http.py [--rounds 3] [--seconds 5] [--seed DIR]

What it runs, all on 127.0.0.1 (the servers pinned to CPU 0, wrk to CPU 1 with taskset):
- GET /users/getInfo with a valid Bearer token, keep-alive, 16 connections; for authserver
  twice: a token without a session (verification alone, as before sessions existed) and a
  login's token, whose session is checked too;
- the same with "Connection: close" on every request (a new connection each time);
- POST /users/authenticate with 1 and then 2 clients (authserver only, not pinned:
  the password hash should use both cores); then POST /users/refresh beside a login,
  one client each (bench_cost.py's login_and_refresh, the same measure);
- idle memory (RSS) and the time from start to first answer.
Rounds are interleaved (every server once per round); figures are medians of the rounds.
A peer that is not installed is skipped with a line saying why (see bench/README.md):
wrk (Debian's package), node + npm for the tutorial's server, fastapi + uvicorn + pyjwt
in the Python that runs this script.
"""

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from common import (LOGIN, LOGIN_SCRIPT, http_post, median_of, missing_wrk, start_authserver,
                    start_peers, wrk)
from bench_cost import login_and_refresh


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--seed", help="a copy of the tutorial's server with node_modules")
    args = parser.parse_args()
    if missing_wrk():
        return 0
    folder = Path(tempfile.mkdtemp())
    servers = start_peers(folder, args.seed)
    print(f"{os.cpu_count()} CPUs; {sys.executable} (Python {sys.version.split()[0]}); "
          f"{args.rounds} interleaved rounds of {args.seconds}s; servers on CPU 0, wrk on CPU 1")
    keep_alive = {server.name: [] for server in servers}
    closing = {server.name: [] for server in servers}
    with_session = []
    servers[0].session_token = http_post(servers[0].port, "/users/authenticate", LOGIN)["token"]
    try:
        for _ in range(args.rounds):
            for server in servers:
                bearer = f"Authorization: Bearer {server.token}"
                keep_alive[server.name].append(wrk(server.port, "/users/getInfo", 16, args.seconds, [bearer]))
                if server is servers[0]:
                    with_session.append(wrk(server.port, "/users/getInfo", 16, args.seconds,
                                            [f"Authorization: Bearer {server.session_token}"]))
                closing[server.name].append(wrk(server.port, "/users/getInfo", 16, args.seconds,
                                                [bearer, "Connection: close"]))
        report(servers, keep_alive, closing)
        report_sessions(keep_alive[servers[0].name], with_session)
    finally:
        for server in servers:
            server.stop()
    login_scaling(folder, args)
    login_and_refresh(folder, args)
    shutil.rmtree(folder, ignore_errors=True)
    return 0


def report(servers, keep_alive, closing):
    ours = servers[0].name
    print("\nGET /users/getInfo, valid Bearer token, 16 connections (medians)")
    print(f"{'server':28}{'keep-alive req/s':>18}{'p99 ms':>9}{'non-2xx':>9}{'errors':>8}"
          f"{'close req/s':>13}{'idle RSS MiB':>14}{'start s':>9}")
    for server in servers:
        runs, closed = keep_alive[server.name], closing[server.name]
        print(f"{server.name:28}{median_of(runs, 'rate'):18.0f}{median_of(runs, 'p99'):9.2f}"
              f"{sum(r['non2xx'] for r in runs):9d}{sum(r['errors'] for r in runs):8d}"
              f"{median_of(closed, 'rate'):13.0f}{server.idle_rss / 1024:14.1f}"
              f"{server.start_seconds:9.3f}")
    print()
    for server in servers[1:]:
        print(f"authserver / {server.name}: keep-alive "
              f"{median_of(keep_alive[ours], 'rate') / median_of(keep_alive[server.name], 'rate'):.1f}x, "
              f"Connection: close "
              f"{median_of(closing[ours], 'rate') / median_of(closing[server.name], 'rate'):.1f}x, "
              f"idle RSS {servers[0].idle_rss / server.idle_rss:.2f}x, "
              f"start-up time {servers[0].start_seconds / server.start_seconds:.2f}x")


def report_sessions(stateless, with_session):
    """What checking the session on every request costs getInfo."""
    before, after = median_of(stateless, "rate"), median_of(with_session, "rate")
    print(f"\nauthserver GET /users/getInfo, keep-alive: token without a session {before:.0f} "
          f"req/s, login token with its session checked {after:.0f} req/s "
          f"({(after - before) / before:+.1%}; non-2xx {sum(r['non2xx'] for r in with_session)})")


def login_scaling(folder, args):
    """POST /users/authenticate with 1 then 2 clients: does the hash use both cores?"""
    script = folder / "login.lua"
    script.write_text(LOGIN_SCRIPT)
    server = start_authserver(folder, pin=False)
    try:
        one, two = [], []
        for _ in range(args.rounds):
            one.append(wrk(server.port, "/users/authenticate", 1, args.seconds, script=str(script), pin=False))
            two.append(wrk(server.port, "/users/authenticate", 2, args.seconds, script=str(script), pin=False))
    finally:
        server.stop()
    rate_one, rate_two = median_of(one, "rate"), median_of(two, "rate")
    print(f"\nPOST /users/authenticate (PBKDF2, 600,000 rounds), server not pinned: "
          f"1 client {rate_one:.2f} logins/s, 2 clients {rate_two:.2f} logins/s: "
          f"{rate_two / rate_one:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
