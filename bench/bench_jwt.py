"""JWT core speed: authserver's encode_token / decode_token against PyJWT and the HMAC floor.

    python bench/bench_jwt.py [--rounds 61] [--calls 3000] [--repeat 7] [--number 20000]

Every candidate runs the same claims with the same secret, in one process, measured two
ways, each in microseconds per call:
- interleaved rounds: every candidate once per round, in turn (so a busy moment hurts
  all alike); the median of the rounds;
- timeit: 7 runs of timeit.timeit(number=20000) per candidate, the candidates taking
  turns between runs; the median of the 7 (issue 9's measure).
The floor is one hmac.digest(key, msg, "sha256") over the same signing input: no decode can
cost less. PyJWT is skipped, with a line saying so, when it is not installed
(see bench/README.md).

Goals (issues 9 and 10): decode_token <= 3x and encode_token <= 2.5x the floor;
decode_token >= 5x faster than PyJWT's jwt.decode (full verification), encode_token >= 3x
faster than jwt.encode.
"""

import argparse
import hmac
import statistics
import sys
import time
import timeit

from common import SECRET, authserver, met

try:
    import jwt as pyjwt
except ImportError:
    pyjwt = None

FLOOR = "floor: hmac.digest(key, msg, 'sha256')"
CLAIMS = {"id": 81623, "username": "test", "iat": int(time.time()), "exp": int(time.time()) + 3600}


def candidates():
    """name -> (group, zero-argument function); the floor is one HMAC-SHA256 of the same input."""
    token = authserver.encode_token(CLAIMS, SECRET)
    signing_input = token.rpartition(".")[0].encode("ascii")
    key = SECRET.encode()
    found = {
        "decode: authserver.decode_token": ("decode", lambda: authserver.decode_token(token, SECRET)),
        "encode: authserver.encode_token": ("encode", lambda: authserver.encode_token(CLAIMS, SECRET)),
        FLOOR: ("floor", lambda: hmac.digest(key, signing_input, "sha256")),
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


def interleaved(found, rounds, calls):
    """Median µs per call of each candidate over rounds that take turns."""
    samples = {name: [] for name in found}
    names = list(found)
    for round_number in range(rounds):
        rotated = names[round_number % len(names):] + names[:round_number % len(names)]
        for name in rotated:
            samples[name].append(measure(found[name][1], calls))
    return {name: statistics.median(values) for name, values in samples.items()}


def with_timeit(found, repeat, number):
    """Median µs per call of each candidate over `repeat` timeit runs of `number` calls.

    The repeats take turns across the candidates (as timeit.repeat would, one candidate
    after another, but interleaved), so that a busy moment of the machine is shared.
    """
    samples = {name: [] for name in found}
    for _ in range(repeat):
        for name, (_, function) in found.items():
            samples[name].append(timeit.timeit(function, number=number))
    return {name: statistics.median(values) / number * 1e6 for name, values in samples.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=61, help="interleaved rounds (61)")
    parser.add_argument("--calls", type=int, default=3000, help="calls per round (3000)")
    parser.add_argument("--repeat", type=int, default=7, help="timeit repeats (7)")
    parser.add_argument("--number", type=int, default=20000, help="calls per timeit repeat (20000)")
    args = parser.parse_args()
    print(f"Python {sys.version.split()[0]}; {args.rounds} interleaved rounds of {args.calls} "
          f"calls; timeit: {args.repeat} repeats of {args.number} calls")
    if pyjwt is None:
        print("PyJWT not installed: skipping the PyJWT comparison (pip install pyjwt)")
    else:
        print(f"PyJWT {pyjwt.__version__}")
    found = candidates()
    results = {"rounds": interleaved(found, args.rounds, args.calls),
               "timeit": with_timeit(found, args.repeat, args.number)}
    print(f"\n{'':42}{'rounds us':>10}{'x floor':>9}{'timeit us':>11}{'x floor':>9}")
    for name in found:
        row = "".join(f"{median[name]:{10 if way == 'rounds' else 11}.2f}"
                      f"{median[name] / median[FLOOR]:9.2f}" for way, median in results.items())
        print(f"{name:42}{row}")
    print()
    for way, median in results.items():
        for group, limit in (("decode", 3), ("encode", 2.5)):
            ratio = median[f"{group}: authserver.{group}_token"] / median[FLOOR]
            print(f"{way:6} goal: {group}_token <= {limit}x the floor: {ratio:.2f}x, "
                  f"{met(ratio <= limit)}")
        if pyjwt is not None:
            for group, limit in (("decode", 5), ("encode", 3)):
                ours = median[f"{group}: authserver.{group}_token"]
                faster = median[f"{group}: PyJWT jwt.{group}"] / ours
                print(f"{way:6} goal: {group}_token >= {limit}x faster than PyJWT's "
                      f"jwt.{group}: {faster:.2f}x, {met(faster >= limit)}")


if __name__ == "__main__":
    main()
