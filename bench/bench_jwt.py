"""JWT core speed: authserver's encode_token / decode_token against PyJWT and the HMAC floor.

    python bench/bench_jwt.py [--rounds 61] [--calls 3000]

Every candidate runs the same claims with the same secret, in one process, interleaved
round by round (so a busy moment hurts all alike); each figure is the median of the
rounds, in microseconds per call. PyJWT is skipped, with a line saying so, when it is
not installed (see bench/README.md).
"""

import argparse
import hmac
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import authserver  # noqa: E402

try:
    import jwt as pyjwt
except ImportError:
    pyjwt = None

SECRET = "bench-secret-0123456789abcdef-0123456789abcdef"
CLAIMS = {"id": 81623, "username": "test", "iat": int(time.time()), "exp": int(time.time()) + 3600}


def candidates():
    """name -> (group, zero-argument function); the floor is one HMAC-SHA256 of the same input."""
    token = authserver.encode_token(CLAIMS, SECRET)
    signing_input = token.rpartition(".")[0].encode("ascii")
    key = SECRET.encode()
    found = {
        "decode: authserver.decode_token": ("decode", lambda: authserver.decode_token(token, SECRET)),
        "encode: authserver.encode_token": ("encode", lambda: authserver.encode_token(CLAIMS, SECRET)),
        "floor: hmac.digest(key, msg, 'sha256')": ("floor", lambda: hmac.digest(key, signing_input, "sha256")),
    }
    if pyjwt is not None:
        assert pyjwt.decode(token, SECRET, algorithms=["HS256"]) == CLAIMS
        assert authserver.decode_token(pyjwt.encode(CLAIMS, SECRET, algorithm="HS256"), SECRET) == CLAIMS
        found["decode: PyJWT jwt.decode"] = ("decode", lambda: pyjwt.decode(token, SECRET, algorithms=["HS256"]))
        found["encode: PyJWT jwt.encode"] = ("encode", lambda: pyjwt.encode(CLAIMS, SECRET, algorithm="HS256"))
    return found


def measure(function, calls):
    started = time.perf_counter()
    for _ in range(calls):
        function()
    return (time.perf_counter() - started) / calls * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=61)
    parser.add_argument("--calls", type=int, default=3000)
    args = parser.parse_args()
    print(f"Python {sys.version.split()[0]}, {args.rounds} interleaved rounds of {args.calls} calls")
    if pyjwt is None:
        print("PyJWT not installed: skipping the PyJWT comparison (pip install pyjwt)")
    else:
        print(f"PyJWT {pyjwt.__version__}")
    found = candidates()
    samples = {name: [] for name in found}
    names = list(found)
    for round_number in range(args.rounds):
        rotated = names[round_number % len(names):] + names[:round_number % len(names)]
        for name in rotated:
            samples[name].append(measure(found[name][1], args.calls))
    median = {name: statistics.median(values) for name, values in samples.items()}
    floor = median["floor: hmac.digest(key, msg, 'sha256')"]
    print(f"\n{'':42}{'us/call':>9}{'x floor':>9}")
    for name in names:
        print(f"{name:42}{median[name]:9.2f}{median[name] / floor:9.1f}")
    if pyjwt is not None:
        print()
        for group in ("decode", "encode"):
            ours = median[f"{group}: authserver.{group}_token"]
            theirs = median[f"{group}: PyJWT jwt.{group}"]
            print(f"{group}: authserver is {theirs / ours:.1f}x faster than PyJWT")


if __name__ == "__main__":
    main()
