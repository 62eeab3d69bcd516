"""What the benchmarks share: ports, wrk and its output, tokens, and the servers under test.

Standard library only. Every address is loopback; nothing here runs a benchmark by itself.
"""

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
LOGIN = json.dumps({"username": "test", "password": "dGVzdA=="})   # users.json's "test" / "test"

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

# wrk POSTs a login with this script (-s FILE).
LOGIN_SCRIPT = (f'wrk.method = "POST"\nwrk.body = {json.dumps(LOGIN)}\n'
                f'wrk.headers["Content-Type"] = "application/json"\n')

# wrk refreshes with this one: each request presents the refresh token the previous answer
# gave (rotation), so one connection walks a real chain of refreshes.
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


def free_port():
    """A TCP port nothing listens on right now, on 127.0.0.1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def mint_token(lifetime=86400, secret=SECRET):
    """A token for users.json's "test" (id 81623), as a login would give, without the hash."""
    now = int(time.time())
    return authserver.encode_token({"id": 81623, "username": "test", "iat": now,
                                    "exp": now + lifetime}, secret)


def raise_open_files_limit():
    """Soft limit on open files up to the hard one (children inherit it); the new limit."""
    try:
        import resource
    except ImportError:                   # Windows: no such limit to raise
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


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


def post(port, path, body, timeout=30):
    """POST a JSON body, Connection: close; (status, parsed JSON body or None)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}".encode())
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    try:
        return status, json.loads(payload)
    except ValueError:
        return status, None


def http_post(port, path, body):
    """POST a JSON body; the parsed answer."""
    return post(port, path, body)[1]


def milliseconds(value, unit):
    return float(value) * {"us": 0.001, "ms": 1, "s": 1000}[unit]


def parse_wrk(output):
    """wrk --latency's report -> requests/s, p50 and p99 in ms, non-2xx count, socket errors."""
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))
    found = {"rate": rate}
    for percent in ("50", "99"):
        value, unit = re.search(r"^\s*" + percent + r"(?:\.0+)?%\s+([\d.]+)(us|ms|s)\s*$",
                                output, re.MULTILINE).groups()
        found["p" + percent] = milliseconds(value, unit)
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    found["non2xx"] = int(non_2xx.group(1)) if non_2xx else 0
    found["errors"] = sum(map(int, errors.groups())) if errors else 0
    return found


def wrk_command(port, path, connections, seconds, headers=(), script=None, pin=True,
                threads=1, timeout=None):
    """The wrk command line (pinned to CPU 1 with taskset unless pin is False)."""
    command = (["taskset", "-c", "1"] if pin else []) + [
        "wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency"]
    if timeout:
        command.append(f"--timeout={timeout}s")
    for header in headers:
        command += ["-H", header]
    if script:
        command += ["-s", str(script)]
    return command + [f"http://127.0.0.1:{port}{path}"]


def wrk(port, path, connections, seconds, headers=(), script=None, pin=True, threads=1,
        timeout=None):
    """Run wrk and parse its report (see parse_wrk)."""
    command = wrk_command(port, path, connections, seconds, headers, script, pin, threads, timeout)
    return parse_wrk(subprocess.run(command, capture_output=True, text=True, check=True).stdout)


def median_of(runs, key):
    return statistics.median(run[key] for run in runs)


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
    """A server process (pinned to CPU 0 unless pin is False); name, port, token, start-up figures."""

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
            self.process.wait()


def start_authserver(folder, pin=True, source=None, name="authserver", config=None):
    """authserver (source: the authserver.py to run) on a free port, its files in folder."""
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / "config.json"
    config_path.write_text(json.dumps({"secret": SECRET, **(config or {})}))
    users = folder / "users.json"
    if not users.exists():
        shutil.copyfile(ROOT / "users.json", users)
    port = free_port()
    source = source or ROOT / "authserver.py"
    return Server(name, [sys.executable, str(source), "--port", str(port), "--config",
                         str(config_path), "--users", str(users)], port, pin=pin, token=mint_token())


def start_node(seed, pin=True):
    port = free_port()
    server = Server("tutorial's Node server", ["node", "index.js", "127.0.0.1"], port, cwd=seed,
                    env={"PORT": str(port)}, pin=pin)
    server.token = http_post(port, "/users/authenticate", LOGIN)["token"]
    return server


def start_fastapi(folder, pin=True):
    (folder / "fastapi_app.py").write_text(FASTAPI_APP.format(secret=SECRET))
    port = free_port()
    return Server("FastAPI + uvicorn + PyJWT",
                  [sys.executable, "-m", "uvicorn", "fastapi_app:app", "--port", str(port),
                   "--workers", "1", "--no-access-log", "--log-level", "warning"],
                  port, cwd=folder, token=mint_token(), pin=pin)


def fastapi_missing():
    """Why FastAPI cannot be run by this Python, or None."""
    try:
        import fastapi, uvicorn, jwt  # noqa: F401,E401
    except ImportError as error:
        return f"{error.name} not installed in {sys.executable}"
    return None


def prepare_seed(seed_arg):
    """A runnable copy of the tutorial's server with its node_modules, or a reason why not."""
    if not shutil.which("node"):
        return None, "node not installed"
    if seed_arg:
        return Path(seed_arg), None
    # The project's checkout sits beside shared/ (or one level further down, in a worktree).
    candidates = [ROOT.parent / "shared", ROOT.parent.parent / "shared"]
    source = next((folder / "reference" / "seed-node" for folder in candidates
                   if (folder / "reference" / "seed-node").exists()), None)
    if source is None:
        return None, f"no {candidates[0]}/reference/seed-node; pass --seed DIR"
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


def start_peers(folder, seed_arg, pin=True):
    """authserver, then each peer that can run here; lines saying which were skipped and why."""
    servers = [start_authserver(folder / "authserver", pin=pin)]
    seed, reason = prepare_seed(seed_arg)
    if seed is None:
        print(f"skipping the tutorial's Node server: {reason}")
    else:
        servers.append(start_node(seed, pin=pin))
    reason = fastapi_missing()
    if reason:
        print(f"skipping FastAPI: {reason}")
    else:
        servers.append(start_fastapi(folder, pin=pin))
    return servers


def missing_wrk():
    """True (after saying so) when wrk is not installed."""
    if shutil.which("wrk"):
        return False
    print("wrk not installed: skipping every HTTP benchmark (apt-get install wrk)")
    return True


def met(condition):
    return "met" if condition else "NOT met"
