"""What the per-request checks cost: this authserver.py against an older one, and refresh vs login.

    python bench/bench_cost.py [--baseline fc0e828] [--rounds 5] [--seconds 4]

1. GET /users/getInfo, keep-alive, 16 connections, with the token a login gave: the
   authserver.py of the working tree against the one of --baseline (a git revision, by
   default the commit before the session checks and connection caps were added), each run
   from a temporary folder with its own config.json and users.json. Whatever the newer file
   does on every request (checking the token's session, counting connections per address)
   shows as the difference; the two take turns going first, round by round, and the
   change is the median of the rounds' ratios.
   Servers on CPU 0, wrk on CPU 1.
2. POST /users/authenticate and POST /users/refresh, one client each, on the current file,
   not pinned: a login hashes the password (PBKDF2); a refresh presents the refresh token
   the previous answer gave (rotation), and hashes nothing. The refresh is skipped, with a
   line saying so, when this authserver.py has no refresh route (a 404, or the 403 of a
   version where every unknown path needs a token, and no refreshToken from a login).

Goals (issue 10): the checks cost no more than 10 % of getInfo's req/s in all; a refresh is
at least 50x faster than a login.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import (LOGIN, LOGIN_SCRIPT, REFRESH_SCRIPT, ROOT, median_of, met, missing_wrk,
                    post, start_authserver, wrk)

BASELINE = "fc0e828"      # the last commit before sessions and connection caps


def extract_revision(revision, folder):
    """authserver.py and users.json as they were at `revision`, into folder; the .py's path."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("authserver.py", "users.json"):
        found = subprocess.run(["git", "-C", str(ROOT), "show", f"{revision}:{name}"],
                               capture_output=True)
        if found.returncode:
            raise SystemExit(f"cannot read {name} at {revision}: "
                             f"{found.stderr.decode(errors='replace').strip()}")
        (folder / name).write_bytes(found.stdout)
    return folder / "authserver.py"


def login_token(server):
    """A token from a real login (it carries a session where the server has sessions)."""
    status, answer = post(server.port, "/users/authenticate", LOGIN)
    if status != 200:
        raise SystemExit(f"{server.name}: login answered {status} {answer}")
    return answer["token"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=BASELINE, help=f"git revision (default {BASELINE})")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (5)")
    parser.add_argument("--seconds", type=int, default=4, help="per wrk run (4)")
    args = parser.parse_args()
    if missing_wrk():
        return 0
    folder = Path(tempfile.mkdtemp())
    old_source = extract_revision(args.baseline, folder / "baseline")
    print(f"{os.cpu_count()} CPUs; {sys.executable} (Python {sys.version.split()[0]}); "
          f"{args.rounds} interleaved rounds of {args.seconds}s; servers on CPU 0, wrk on CPU 1")
    try:
        per_request_cost(folder, old_source, args)
        login_and_refresh(folder, args)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


def per_request_cost(folder, old_source, args):
    """getInfo req/s of the baseline and of the current file, same run, taking turns."""
    servers = [start_authserver(folder / "baseline", source=old_source,
                                name=f"authserver.py at {args.baseline}"),
               start_authserver(folder / "current", name="authserver.py now")]
    runs = {server.name: [] for server in servers}
    try:
        for server in servers:
            server.token = login_token(server)
        for round_number in range(args.rounds):
            for server in servers[::1 if round_number % 2 == 0 else -1]:   # take turns first
                runs[server.name].append(wrk(server.port, "/users/getInfo", 16, args.seconds,
                                             [f"Authorization: Bearer {server.token}"]))
    finally:
        for server in servers:
            server.stop()
    print("\nGET /users/getInfo, keep-alive, 16 connections, a login's token (medians)")
    print(f"{'':34}{'req/s':>9}{'p99 ms':>9}{'non-2xx':>9}{'errors':>8}  each round's req/s")
    for server in servers:
        done = runs[server.name]
        print(f"{server.name:34}{median_of(done, 'rate'):9.0f}{median_of(done, 'p99'):9.2f}"
              f"{sum(r['non2xx'] for r in done):9d}{sum(r['errors'] for r in done):8d}  "
              + " ".join(f"{run['rate']:.0f}" for run in done))
    # Each round's two runs are next to each other in time: their ratio is what a busy
    # moment of the machine disturbs least; the median of the rounds' ratios is the figure.
    before, after = (runs[server.name] for server in servers)
    change = statistics.median(new["rate"] / old["rate"] for old, new in zip(before, after)) - 1
    print(f"goal: the checks added since {args.baseline} cost <= 10 % of getInfo's req/s: "
          f"{change:+.1%} (median of the rounds' ratios), {met(change >= -0.10)}")


def login_and_refresh(folder, args):
    """Logins/s and refreshes/s, one client each, on the current file."""
    server = start_authserver(folder / "refresh", pin=False, name="authserver.py now")
    try:
        login_script = folder / "login.lua"
        login_script.write_text(LOGIN_SCRIPT)
        logins = [wrk(server.port, "/users/authenticate", 1, args.seconds, script=login_script,
                      pin=False) for _ in range(args.rounds)]
        status, answer = post(server.port, "/users/authenticate", LOGIN)
        refresh_status, _ = post(server.port, "/users/refresh",
                                 '{"refreshToken": "not-a-refresh-token"}')
        refreshes = []
        if refresh_status != 404 and "refreshToken" in (answer or {}):
            for _ in range(args.rounds):
                first = post(server.port, "/users/authenticate", LOGIN)[1]["refreshToken"]
                script = folder / "refresh.lua"
                script.write_text(REFRESH_SCRIPT % first)
                refreshes.append(wrk(server.port, "/users/refresh", 1, args.seconds,
                                     script=script, pin=False))
    finally:
        server.stop()
    login_rate = median_of(logins, "rate")
    print(f"\nOne client, server not pinned (medians of {args.rounds})")
    print(f"POST /users/authenticate  {login_rate:10.2f} req/s  "
          f"(non-2xx {sum(r['non2xx'] for r in logins)})")
    if not refreshes:
        print(f"POST /users/refresh       skipped: no refresh route in this authserver.py "
              f"(it answers {refresh_status}, and a login gives no refreshToken)")
        return
    refresh_rate = median_of(refreshes, "rate")
    print(f"POST /users/refresh       {refresh_rate:10.2f} req/s  "
          f"(non-2xx {sum(r['non2xx'] for r in refreshes)}): {refresh_rate / login_rate:.0f}x a login")
    print(f"goal: a refresh >= 50x a login: {met(refresh_rate >= 50 * login_rate)}")


if __name__ == "__main__":
    sys.exit(main())
