"""HTTP speed and footprint: authserver against the tutorial's Node server and FastAPI.

    python bench/bench_http.py [--rounds 3] [--seconds 5] [--seed DIR]

What it runs, all on 127.0.0.1 (the servers pinned to CPU 0, wrk to CPU 1 with taskset):
- GET /users/getInfo with a valid Bearer token, keep-alive, 16 connections; for authserver
  twice: a token without a session (verification alone, as before sessions existed) and a
  login's token, whose session is checked too;
- the same with "Connection: close" on every request (a new connection each time);
- POST /users/authenticate with 1 and then 2 clients (authserver only, not pinned:
  the password hash should use both cores), and POST /users/refresh beside it (1 client,
  each request presenting the refresh token the previous answer gave: a real rotation);
- idle memory (RSS) and the time from start to first answer.
Rounds are interleaved (every server once per round); figures are medians of the rounds.
A peer that is not installed is skipped with a line saying why (see bench/README.md):
wrk (Debian's package), node + npm for the tutorial's server, fastapi + uvicorn + pyjwt
in the Python that runs this script.
"""

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
import authserver  # noqa: E402

SECRET = "bench-secret-0123456789abcdef-0123456789abcdef"
SEED_SECRET = "nodejs-jwt-auth-server-private-key"      # the tutorial's config/config.json
LOGIN = json.dumps({"username": "test", "password": "dGVzdA=="})

FASTAPI_APP = textwrap.dedent('''
    import jwt
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    SECRET = {secret!r}
    USERS = {{81623: {{"id": 81623, "username": "test", "firstName": "Test",
                     "lastName": "User", "phone": "5235234132"}}}}
    app = FastAPI()

    @app.get("/users/getInfo")
    def get_info(request: Request):
        header = request.headers.get("authorization", "")
        token = request.headers.get("x-access-token") or header.partition(" ")[2]
        if not token:
            return JSONResponse({{"error": True, "message": "No token provided."}}, 403)
        try:
            claims = jwt.decode(token, SECRET, algorithms=["HS256"])
        except jwt.PyJWTError as error:
            return JSONResponse({{"error": True, "name": type(error).__name__,
                                 "message": str(error)}}, 401)
        user = USERS.get(claims.get("id"))
        if user is None:
            return JSONResponse({{"error": True, "message": "user not found"}}, 401)
        return user
''')


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_answer(port, path="/", timeout=30):
    """Poll until the port answers HTTP; seconds it took."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
                if sock.recv(12).startswith(b"HTTP/1."):
                    return time.perf_counter() - started
        except OSError:
            pass
        time.sleep(0.002)
    raise RuntimeError(f"nothing answered on port {port}")


def http_post(port, path, body):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return json.loads(data.partition(b"\r\n\r\n")[2])


def rss_kib(pid):
    """Resident memory of a process and its children, from /proc."""
    total = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            total += int(line.split()[1])
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        for child in children.read_text().split():
            total += rss_kib(int(child))
    return total


class Server:
    """A server process pinned to CPU 0; name, port, token, and its start-up figures."""

    def __init__(self, name, command, port, cwd=None, env=None, pin=True, token=None):
        self.name, self.port, self.token = name, port, token
        prefix = ["taskset", "-c", "0"] if pin else []
        started = time.perf_counter()
        self.process = subprocess.Popen(prefix + command, cwd=cwd, env={**os.environ, **(env or {})},
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_answer(port)
        self.start_seconds = time.perf_counter() - started
        time.sleep(1)                                    # let it settle before reading RSS
        self.idle_rss = rss_kib(self.process.pid)

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_authserver(folder, pin=True):
    config = folder / "config.json"
    config.write_text(json.dumps({"secret": SECRET}))
    port = free_port()
    now = int(time.time())
    token = authserver.encode_token({"id": 81623, "username": "test", "iat": now,
                                     "exp": now + 86400}, SECRET)
    return Server("authserver", [sys.executable, str(ROOT / "authserver.py"), "--port", str(port),
                                 "--config", str(config)], port, pin=pin, token=token)


def start_node(seed):
    port = free_port()
    server = Server("tutorial's Node server", ["node", "index.js", "127.0.0.1"], port, cwd=seed,
                    env={"PORT": str(port)})
    server.token = http_post(port, "/users/authenticate", LOGIN)["token"]
    return server


def start_fastapi(folder):
    (folder / "fastapi_app.py").write_text(FASTAPI_APP.format(secret=SECRET))
    port = free_port()
    now = int(time.time())
    token = authserver.encode_token({"id": 81623, "username": "test", "iat": now,
                                     "exp": now + 86400}, SECRET)
    return Server("FastAPI + uvicorn + PyJWT",
                  [sys.executable, "-m", "uvicorn", "fastapi_app:app", "--port", str(port),
                   "--workers", "1", "--no-access-log", "--log-level", "warning"],
                  port, cwd=folder, token=token)


def prepare_seed(seed_arg):
    """A runnable copy of the tutorial's server with its node_modules, or a reason why not."""
    if not shutil.which("node"):
        return None, "node not installed"
    if seed_arg:
        return Path(seed_arg), None
    source = ROOT.parent / "shared" / "reference" / "seed-node"
    if not source.exists():
        return None, f"no {source}; pass --seed DIR"
    copy = Path(tempfile.gettempdir()) / "authserver-bench-seed-node"
    if not (copy / "node_modules").exists():
        if not shutil.which("npm"):
            return None, "npm not installed"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(source, copy)
        os.chmod(copy, 0o755)
        result = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=copy,
                                capture_output=True, text=True)
        if result.returncode:
            return None, f"npm ci failed: {result.stderr.strip()[-200:]}"
    return copy, None


def wrk(port, path, connections, seconds, headers=(), script=None, pin=True):
    """Run wrk; requests/s, p99 ms, non-2xx count, socket errors."""
    command = (["taskset", "-c", "1"] if pin else []) + [
        "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
    for header in headers:
        command += ["-H", header]
    if script:
        command += ["-s", script]
    output = subprocess.run(command + [f"http://127.0.0.1:{port}{path}"], capture_output=True,
                            text=True, check=True).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)\b", output)
    p99_ms = float(p99.group(1)) * {"us": 0.001, "ms": 1, "s": 1000}[p99.group(2)]
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    return {"rate": rate, "p99": p99_ms, "non2xx": int(non_2xx.group(1)) if non_2xx else 0,
            "errors": sum(map(int, errors.groups())) if errors else 0}


def median_of(runs, key):
    return statistics.median(run[key] for run in runs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--seed", help="a copy of the tutorial's server with node_modules")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        print("wrk not installed: skipping every HTTP benchmark (apt-get install wrk)")
        return 0
    folder = Path(tempfile.mkdtemp())
    servers = [start_authserver(folder)]
    seed, reason = prepare_seed(args.seed)
    if seed is None:
        print(f"skipping the tutorial's Node server: {reason}")
    else:
        servers.append(start_node(seed))
    try:
        import fastapi, uvicorn, jwt  # noqa: F401,E401
        servers.append(start_fastapi(folder))
    except ImportError as error:
        print(f"skipping FastAPI: {error.name} not installed in {sys.executable}")
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


REFRESH_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
token = "%s"
request = function()
  return wrk.format(nil, nil, nil, '{"refreshToken":"' .. token .. '"}')
end
response = function(status, headers, body)
  local next = string.match(body, '"refreshToken":"([^"]+)"')
  if next then token = next end
end
"""


def login_scaling(folder, args):
    """POST /users/authenticate with 1 then 2 clients: does the hash use both cores?"""
    script = folder / "login.lua"
    script.write_text(f'wrk.method = "POST"\nwrk.body = {json.dumps(LOGIN)}\n'
                      f'wrk.headers["Content-Type"] = "application/json"\n')
    server = start_authserver(folder, pin=False)
    try:
        one, two = [], []
        for _ in range(args.rounds):
            one.append(wrk(server.port, "/users/authenticate", 1, args.seconds, script=str(script), pin=False))
            two.append(wrk(server.port, "/users/authenticate", 2, args.seconds, script=str(script), pin=False))
        renewals = []
        for _ in range(args.rounds):
            refresh_script = folder / "refresh.lua"
            first = http_post(server.port, "/users/authenticate", LOGIN)["refreshToken"]
            refresh_script.write_text(REFRESH_SCRIPT % first)
            renewals.append(wrk(server.port, "/users/refresh", 1, args.seconds,
                                script=str(refresh_script), pin=False))
    finally:
        server.stop()
    rate_one, rate_two = median_of(one, "rate"), median_of(two, "rate")
    print(f"\nPOST /users/authenticate (PBKDF2, 600,000 rounds), server not pinned: "
          f"1 client {rate_one:.2f} logins/s, 2 clients {rate_two:.2f} logins/s: "
          f"{rate_two / rate_one:.2f}x")
    print(f"POST /users/refresh (rotation, one SQLite transaction), 1 client: "
          f"{median_of(renewals, 'rate'):.0f} refreshes/s, "
          f"non-2xx {sum(r['non2xx'] for r in renewals)}")


if __name__ == "__main__":
    sys.exit(main())
