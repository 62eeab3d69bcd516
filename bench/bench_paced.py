"""Latency at a fixed offered load, beside the latency at saturation, for the three servers.

    python bench/bench_paced.py [--seconds 10] [--connections 64] [--loads 1500,3000] [--seed DIR]

Saturation (what bench_http.py measures) sends as fast as 16 connections can: the p99 there is
the queue of threads waiting for CPython's GIL, a load no class or app sends. Here wrk paces
each of 64 keep-alive connections with a Lua delay() of about connections / load seconds
between its requests, so the servers see a steady offered load, and the p50 / p99 are what a
client feels at that load. Loads: 1,500 and 3,000 req/s, and the highest the tutorial's Node
server sustains (80 % of its saturation rate in this run). GET /users/getInfo with a valid
Bearer token; servers pinned to CPU 0, wrk to CPU 1. A server that cannot keep up shows an
achieved rate below the offered one and a p99 that grows with its queue (wrk paces a
connection from its last answer, so a slow server is offered less: its p99 is a lower bound).

Goals (issue 10): authserver's p99 < 5 ms at 3,000 req/s, and below FastAPI's at every load.
"""

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from common import median_of, met, missing_wrk, start_peers, wrk

SATURATION_CONNECTIONS = 16
NODE_SHARE = 0.8          # "the highest load the Node server sustains": 80 % of its saturation


def pacing_script(connections, load):
    """wrk Lua: every connection waits about connections / load s between its requests."""
    mean_ms = connections * 1000 / load
    # Uniform between half and one and a half times the mean, so the connections drift
    # apart instead of all sending in the same millisecond; wrk counts the delay in whole ms.
    return (f"-- {connections} connections x 1 request every ~{mean_ms:.1f} ms = ~{load} req/s\n"
            f"local mean = {mean_ms:.3f}\n"
            "function init(args)\n"
            "  math.randomseed(os.time())\n"
            "end\n"
            "function delay()\n"
            "  return mean * (0.5 + math.random())\n"
            "end\n")


def node_load(servers, saturation):
    """The highest load the Node server sustains in this run (None without it)."""
    for server in servers:
        if "Node" in server.name:
            return int(median_of(saturation[server.name], "rate") * NODE_SHARE) // 100 * 100
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10, help="per load and server (default 10)")
    parser.add_argument("--connections", type=int, default=64, help="paced connections (64)")
    parser.add_argument("--loads", default="1500,3000", help="offered req/s, comma-separated")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds; medians")
    parser.add_argument("--seed", help="a copy of the tutorial's server with node_modules")
    args = parser.parse_args()
    if missing_wrk():
        return 0
    folder = Path(tempfile.mkdtemp())
    servers = start_peers(folder, args.seed)
    print(f"{os.cpu_count()} CPUs; {sys.executable} (Python {sys.version.split()[0]}); "
          f"servers on CPU 0, wrk on CPU 1; {args.rounds} round(s) of {args.seconds}s")
    try:
        saturation = {server.name: [] for server in servers}
        for _ in range(args.rounds):
            for server in servers:
                saturation[server.name].append(wrk(
                    server.port, "/users/getInfo", SATURATION_CONNECTIONS, args.seconds,
                    [f"Authorization: Bearer {server.token}"]))
        loads = sorted({int(load) for load in args.loads.split(",")}
                       | ({node_load(servers, saturation)} - {None}))
        paced = {(load, server.name): [] for load in loads for server in servers}
        for _ in range(args.rounds):
            for load in loads:
                script = folder / f"paced-{load}.lua"
                script.write_text(pacing_script(args.connections, load))
                for server in servers:
                    paced[load, server.name].append(wrk(
                        server.port, "/users/getInfo", args.connections, args.seconds,
                        [f"Authorization: Bearer {server.token}"], script=script))
        report(servers, saturation, paced, loads, args)
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(folder, ignore_errors=True)
    return 0


def report(servers, saturation, paced, loads, args):
    print(f"\nGET /users/getInfo, keep-alive. Saturation: {SATURATION_CONNECTIONS} connections "
          f"as fast as they go (the p99 is the GIL's queue, see bench_tail.py)")
    print(f"{'server':28}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'non-2xx':>9}{'errors':>8}")
    for server in servers:
        runs = saturation[server.name]
        print(f"{server.name:28}{median_of(runs, 'rate'):9.0f}{median_of(runs, 'p50'):9.2f}"
              f"{median_of(runs, 'p99'):9.2f}{sum(r['non2xx'] for r in runs):9d}"
              f"{sum(r['errors'] for r in runs):8d}")
    print(f"\nPaced: {args.connections} connections, each waiting ~{args.connections}/load s "
          f"between requests (wrk Lua delay())")
    print(f"{'offered req/s':>14}  {'server':28}{'achieved':>10}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'non-2xx':>9}{'errors':>8}")
    for load in loads:
        for server in servers:
            runs = paced[load, server.name]
            print(f"{load:14d}  {server.name:28}{median_of(runs, 'rate'):10.0f}"
                  f"{median_of(runs, 'p50'):9.2f}{median_of(runs, 'p99'):9.2f}"
                  f"{sum(r['non2xx'] for r in runs):9d}{sum(r['errors'] for r in runs):8d}")
    ours = servers[0].name
    print()
    if 3000 in loads:
        p99 = median_of(paced[3000, ours], "p99")
        print(f"goal: authserver p99 < 5 ms at 3,000 req/s: {p99:.2f} ms, {met(p99 < 5)}")
    fastapi = [server.name for server in servers if "FastAPI" in server.name]
    if fastapi:
        below = [median_of(paced[load, ours], "p99") < median_of(paced[load, fastapi[0]], "p99")
                 for load in loads]
        detail = ", ".join(f"{load}: {median_of(paced[load, ours], 'p99'):.2f} vs "
                           f"{median_of(paced[load, fastapi[0]], 'p99'):.2f} ms"
                           for load in loads)
        print(f"goal: authserver p99 below FastAPI's at every load ({detail}): {met(all(below))}")


if __name__ == "__main__":
    sys.exit(main())
