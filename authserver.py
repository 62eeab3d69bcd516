"""authserver: a JWT login server in one file, standard library only.

A JSON Web Token (RFC 7519) is three base64url strings joined by dots. This is a
real one, as this server issues it, signed with the secret
"correct horse battery staple, 32B+" (node-jsonwebtoken makes the same bytes):

    eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9
    .eyJpZCI6ODE2MjMsInVzZXJuYW1lIjoidGVzdCIsImlhdCI6MTcwMDAwMDAwMCwiZXhwIjoxNzAwMDAzNjAwfQ
    .OfOVso6I8mP7uI5wrbaKcu7pScfscL-yLQEXLJvHwg8

- header    = base64url('{"alg":"HS256","typ":"JWT"}'): how the token is signed.
- payload   = base64url('{"id":81623,"username":"test","iat":1700000000,"exp":1700003600}'):
              the claims: who the user is, when the token was issued, when it expires.
- signature = base64url(HMAC-SHA256(secret, header + "." + payload)): only a holder of the
              secret can make it, so nobody can change a claim without the server noticing.

The payload is encoded, not encrypted: anyone can read it. What the server checks is that
the signature matches, that the algorithm is the one it uses (HS256, never "none"), and
that the token has not expired. `python authserver.py explain TOKEN` walks through every
check, and `python authserver.py attack` fires the classic forgeries at a running server,
to watch each check refuse the one it is there for (section 4).

The file reads top to bottom, each section using only what stands above it (the tests
check that, and that this list matches the sections' banners):

    1. Settings                            config.json, the signing secret, the limits
    2. base64url                           RFC 4648 §5, strict
    3. JWT                                 encode_token / decode_token: pure, no HTTP
    4. Attacks                             the classic forgeries, and what stops each
    5. Users and passwords                 users.json, PBKDF2, sign-up rules, login limits
    6. Sessions                            refresh tokens, logout, revocation, in SQLite
    7. HTTP errors and the JSON responder  HTTPError; a Response made into bytes
    8. Middleware                          the steps every request goes through
    9. Routes                              a table of (method, path) -> function
    10. The handler                        reading a request within limits, writing once
    11. The server                         connections, caps, slow clients, stopping
    12. Command line                       serving; adduser / passwd / sessions / revoke
    13. Teaching                           the token, explain and attack commands
    14. Main                               the command line's parser, and main()

It is the Node.js "JWT authentication server" tutorial's API, made safe: a teaching
example and a LAN demo, not a production identity provider (see README.md).
"""

import sys

# First, before anything an older Python cannot run: one line instead of a traceback.
# (Python 3.6 to 3.8 get this far; 3.5 and 2.7 cannot even parse the f-strings below.)
if sys.version_info < (3, 9):
    sys.exit("authserver needs Python 3.9+ (this is %d.%d)" % sys.version_info[:2])

import argparse
import base64
import binascii
import contextlib
import errno
import functools
import getpass
import glob
import hashlib
import hmac
import http.client
import http.server
import json
import math
import os
import re
import secrets
import shutil
import signal
import socket
import socketserver
import sqlite3
import ssl
import tempfile
import textwrap
import threading
import time
import traceback
import unicodedata
import urllib.parse
from collections import OrderedDict, deque, namedtuple
from datetime import datetime, timezone
from email.utils import formatdate
from http import HTTPStatus
from pathlib import Path

try:                                # POSIX: advisory whole-file locks
    import fcntl
except ImportError:                 # Windows: byte-range locks from the C runtime
    fcntl = None
    import msvcrt
try:
    import resource                 # POSIX: the open-file limit (ulimit -n)
except ImportError:
    resource = None                 # Windows: no such limit on sockets

HERE = Path(__file__).resolve().parent
CONFIG_FILE = HERE / "config.json"      # the files used when --config / --users are not given
USERS_FILE = HERE / "users.json"


# ---------------------------------------------------------------------------
# 1. Settings
# ---------------------------------------------------------------------------

# Every key config.json may hold, with its default. An unknown key is refused, so a
# misspelt "tokenLifeTime" is an error rather than a silent default.
DEFAULT_CONFIG = {
    "secret": "",                  # empty: generate one on first start, keep it in secretFile
    "secretFile": "authserver.secret",  # relative to the config file's folder
    "tokenLifetime": "1h",         # seconds, or "30s", "30m", "1h", "2d"
    "host": "127.0.0.1",
    "port": 4000,
    "leeway": 0,                   # seconds of clock skew allowed on exp, nbf and iat
    "issuer": None,                # when set: tokens carry "iss" and must carry it back
    "audience": None,              # likewise "aud"
    "maxBodyBytes": 16384,
    "requestTimeout": 10,          # seconds a client has to send a whole request, and
                                   # to take in a whole response
    # A class of 50 phones behind one address (a NAT, or emulators on the laptop) with a
    # browser's 6 connections each fits under the per-address cap; twice that in all
    # leaves most of the common 1024 open files (ulimit -n) for everything else.
    "maxConnections": 600,         # connections open at once, in all; beyond: 503
    "maxConnectionsPerAddress": 300,  # ... and from one client address
    "loginAttempts": 5,            # password checks one username may start ...
    "addressLoginAttempts": 50,    # ... and one client address (a whole class behind a NAT) ...
    "loginWindow": 60,             # ... in this many seconds; a right password is not counted
    "passwordIterations": 600000,  # PBKDF2 rounds for new hashes (OWASP 2023)
    "shutdownGrace": 10,           # seconds to let requests in flight finish on stop
    "accessLog": True,
    "allowRegistration": False,    # POST /users/register: anyone who can reach us may sign up
    # ... until users.json holds this many users (adduser is not bound by it). Each sign-up
    # rewrites the whole file, so n sign-ups write about n*n/2 records in all.
    "maxUsers": 10000,
    "refreshTokenLifetime": "14d",  # a refresh token's life from its issue (at least tokenLifetime)
    "sessionsFile": "authserver.sessions",  # SQLite, relative to the config file's folder
    "maxSessionsPerUser": 20,      # a user's oldest sessions end when a login goes past this
    "refreshGrace": 10,            # seconds a just-rotated refresh token still gets the same pair
}

MIN_SECRET_BYTES = 32          # RFC 7518 §3.2: an HS256 key at least as long as the hash
MAX_ITERATIONS = 10_000_000    # PBKDF2 rounds: more would take minutes per login
MAX_TOKEN_BYTES = 8192         # refuse longer tokens before doing any work on them
MAX_LINE_BYTES = 8192          # request line
MAX_HEADER_BYTES = 16384       # all header lines together, like Node's default
MAX_HEADERS = 100
DURATION = re.compile(r"(\d{1,9})\s*([smhd]?)")
DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}

# The numeric settings: (int for whole numbers only, float for any number, lowest, highest).
# Counts, sizes and the port are whole numbers; only times in seconds may be fractional.
# The bounds keep every value usable where it goes (a deque length, a thread timeout).
NUMBER_SETTINGS = {
    "port": (int, 0, 65535),
    "maxBodyBytes": (int, 1, 2 ** 30),
    "loginAttempts": (int, 1, 1_000_000),
    "addressLoginAttempts": (int, 1, 1_000_000),
    "maxConnections": (int, 1, 1_000_000),
    "maxConnectionsPerAddress": (int, 1, 1_000_000),
    "loginWindow": (int, 1, 86400),
    "passwordIterations": (int, 1, MAX_ITERATIONS),
    "leeway": (float, 0, 86400),
    "requestTimeout": (float, 0.001, 86400),
    "shutdownGrace": (float, 0, 86400),
    "maxSessionsPerUser": (int, 1, 1_000_000),
    "maxUsers": (int, 1, 1_000_000),
    "refreshGrace": (float, 0, 86400),
}


class ConfigError(Exception):
    """A problem with a file or setting the user controls; one line, exit code 2."""


def parse_duration(value, name):
    """Seconds from 3600 or "3600", "30m", "1h", "2d"."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = DURATION.fullmatch(value.strip()) if isinstance(value, str) else None
    if not match or int(match.group(1)) == 0:
        raise ConfigError(f'{name} must be a positive number of seconds or like "30m", "1h", "2d"')
    return int(match.group(1)) * DURATION_UNITS[match.group(2)]


def checked_number(value, name, where):
    """value, if NUMBER_SETTINGS allows it for name; else ConfigError naming where it came from."""
    kind, lowest, highest = NUMBER_SETTINGS[name]
    allowed = (int,) if kind is int else (int, float)     # type(), so that True is not 1
    # NaN and infinities fail the range check as well.
    if type(value) not in allowed or not lowest <= value <= highest:
        what = "a whole number" if kind is int else "a number"
        raise ConfigError(f"{where}: {name} must be {what} from {lowest} to {highest}")
    return value


def read_json_file(path, what):
    """Parse a JSON file, turning every failure into one ConfigError line naming it."""
    try:
        # utf-8-sig: Windows Notepad saves UTF-8 with a byte order mark, which RFC 8259 §8.1
        # lets a reader ignore. What we write has none (write_file_atomically).
        return json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise ConfigError(f"{what} {path}: no such file") from None
    except (OSError, ValueError) as error:
        raise ConfigError(f"{what} {path}: {error}") from None


def load_config(path):
    """config.json merged over the defaults, checked, with tokenLifetime in seconds."""
    loaded, where = read_json_file(path, "config file"), f"config file {path}"
    if not isinstance(loaded, dict):
        raise ConfigError(f"{where}: must hold a JSON object")
    unknown = sorted(set(loaded) - set(DEFAULT_CONFIG))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}")
    config = {**DEFAULT_CONFIG, **loaded, "path": Path(path)}
    for name in ("tokenLifetime", "refreshTokenLifetime"):
        config[name] = parse_duration(config[name], f"{where}: {name}")
    if config["refreshTokenLifetime"] < config["tokenLifetime"]:
        # A session must outlive the access tokens it issued, or they would be refused early.
        raise ConfigError(f"{where}: refreshTokenLifetime must be at least tokenLifetime")
    for name in NUMBER_SETTINGS:
        checked_number(config[name], name, where)
    for name in ("accessLog", "allowRegistration"):
        if type(config[name]) is not bool:
            raise ConfigError(f"{where}: {name} must be true or false")
    for name in ("secret", "secretFile", "host", "sessionsFile"):
        if not isinstance(config[name], str):
            raise ConfigError(f"{where}: {name} must be a string")
    if not config["sessionsFile"]:
        raise ConfigError(f"{where}: sessionsFile must not be empty")
    for name in ("issuer", "audience"):
        if config[name] is not None and not (isinstance(config[name], str) and config[name]):
            raise ConfigError(f"{where}: {name} must be null or a non-empty string")
    return config


def write_file_atomically(path, text, mode=0o600):
    """Replace path with text so that a crash leaves either the old file or the new one.

    The text goes to a temporary file in the same folder, is flushed to disk, and
    only then renamed over the old name: os.replace is atomic on POSIX and Windows.
    """
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, path.stat().st_mode & 0o777 if path.exists() else mode)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


# Two writers that each read a file, change it and write it back lose one change unless
# the whole read-modify-write is one critical section. A lock on the file itself is no
# good: os.replace puts a new file (a new inode) under the name, and Windows refuses to
# replace a file another process holds open. So the lock lives in a companion file,
# "<name>.lock", made once and never removed (removing it would let two writers lock two
# different files). The thread lock covers writers in one process, whatever the platform's
# file locks do between threads.
IN_PROCESS_LOCK = threading.RLock()


@contextlib.contextmanager
def file_lock(path):
    """Hold the exclusive lock for path, across threads and processes, until the block ends."""
    path = Path(path)
    with IN_PROCESS_LOCK, open(path.with_name(path.name + ".lock"), "a+b") as lock:
        lock_file(lock)
        try:
            yield
        finally:
            unlock_file(lock)


def lock_file(handle):
    """Block until this process holds the lock on handle (flock, or msvcrt on Windows)."""
    if fcntl is not None:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        return
    handle.seek(0)
    while True:
        try:
            msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK, 1)
            return
        except OSError as error:    # LK_LOCK gives up after 10 one-second tries; we don't
            if error.errno != getattr(errno, "EDEADLOCK", errno.EDEADLK):
                raise


def unlock_file(handle):
    if fcntl is not None:
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    else:
        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)


def temporaries_of(path):
    """The temporary copies write_file_atomically makes beside path (".users.json.XXXX")."""
    path = Path(path)
    return list(path.parent.glob(f".{glob.escape(path.name)}.*"))


def remove_stale_temporaries(path):
    """Delete the temporary copies a writer killed before its rename left beside path.

    Call it only with file_lock(path) held: then no live writer is halfway through one.
    """
    for leftover in temporaries_of(path):
        leftover.unlink(missing_ok=True)


def load_secret(config, make=True):
    """The HMAC key as bytes: config's "secret", else secretFile, made on first start (or,
    with make=False, None while there is no secretFile: a command that only reads)."""
    if config["secret"]:
        return checked_secret(config["secret"], f"secret in {config['path']}")
    path = config["path"].parent / config["secretFile"]
    if not path.exists() and not make:
        return None
    if not path.exists():
        # 256 random bits, different on every install: a secret shipped in the
        # repository would let anyone who read it sign tokens for any user. Made under
        # the lock, so two servers started together do not each make their own.
        try:
            with file_lock(path):
                if not path.exists():
                    write_file_atomically(path, secrets.token_urlsafe(32) + "\n")
        except OSError as error:
            raise ConfigError(f"cannot create secret file {path}: {error}") from None
    try:
        return checked_secret(path.read_text(encoding="utf-8-sig").strip(), f"secret file {path}")
    except OSError as error:
        raise ConfigError(f"secret file {path}: {error}") from None


# Keys people sign with: examples from tutorials, documentation and this file. A secret
# among them, or one of their variants below, is refused; the attack command tries the
# first six on a server, and all of them offline against a token's signature.
WORDLIST = (
    "", "secret", "password", "nodejs-jwt-auth-server-private-key", "your-256-bit-secret",
    "correct horse battery staple, 32B+", "a-string-secret-at-least-256-bits-long",
    "shhhhh", "keyboard cat", "changeme", "change-me", "secretkey", "secret-key", "secret_key",
    "jwtsecret", "jwt-secret", "jwt_secret", "mysecret", "my-secret", "my_secret_key",
    "supersecret", "s3cr3t", "key", "private", "private-key", "privatekey", "token", "auth",
    "admin", "test", "123456", "qwerty", "default", "your_jwt_secret", "your-secret-key",
)
WORDLIST_NUMBER = re.compile(r"0|[1-9][0-9]{0,2}")      # the suffixes 0 to 999


def word_forms(word):
    """A word as written, Capitalised and UPPER (each once)."""
    return dict.fromkeys((word, word.capitalize(), word.upper()))


def wordlist_guesses():
    """Each form of each word of WORDLIST, alone and followed by 0 to 999: 101,101 guesses."""
    for word in WORDLIST:
        for form in word_forms(word):
            yield form
            for number in range(1000):
                yield f"{form}{number}"


def in_wordlist(text):
    """Whether wordlist_guesses() tries text, without making all of them."""
    return any(text == form or text.startswith(form)
               and WORDLIST_NUMBER.fullmatch(text[len(form):])
               for word in WORDLIST for form in word_forms(word))


def checked_secret(text, where):
    """Refuse secrets too short to be an HS256 key, or copied from an example."""
    key, make_one = text.encode("utf-8"), ('Make one with: python -c "import secrets; '
                                           'print(secrets.token_urlsafe(32))"')
    if len(key) < MIN_SECRET_BYTES:
        raise ConfigError(f"{where} is {len(key)} bytes; HS256 needs at least "
                          f"{MIN_SECRET_BYTES} (RFC 7518 §3.2). {make_one}")
    if in_wordlist(text):
        raise ConfigError(f"{where} is a key copied from tutorials and examples (the attack "
                          f"command's wordlist holds it): anyone can sign tokens with it. "
                          f"{make_one}")
    return key


# ---------------------------------------------------------------------------
# 2. base64url (RFC 4648 §5): the alphabet A-Z a-z 0-9 - _, with no "=" padding
# ---------------------------------------------------------------------------

BASE64URL = re.compile(r"[A-Za-z0-9_-]*")
# The last character of a base64url text whose length is 2 or 3 mod 4 carries bits past
# the end of the data (4 or 2 of them); in the one true spelling they are zero.
SPARE_BITS = {2: 0b1111, 3: 0b11}
BASE64URL_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def b64url_encode(data):
    """bytes -> base64url text without padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text):
    """base64url text -> bytes; ValueError unless the text is exactly what we would write.

    Strict on purpose: no padding, no other alphabet, and no second spelling of the
    same bytes, so every token has one form only.
    """
    remainder = len(text) % 4
    if remainder == 1 or not BASE64URL.fullmatch(text):
        raise ValueError("not base64url")
    if remainder and BASE64URL_ALPHABET.index(text[-1]) & SPARE_BITS[remainder]:
        raise ValueError("not canonical base64url")
    return base64.urlsafe_b64decode(text + "=" * (-remainder % 4))


# ---------------------------------------------------------------------------
# 3. JWT: HS256 tokens (RFC 7519, RFC 7515), as pure functions
# ---------------------------------------------------------------------------

# The algorithm, as the functions below carry it out:
#
#   encode_token(claims, key):
#       header    = base64url('{"alg":"HS256","typ":"JWT"}')
#       payload   = base64url(compact JSON of the claims)
#       signature = base64url(HMAC-SHA256(key, header + "." + payload))
#       token     = header + "." + payload + "." + signature
#
#   decode_token(token, key), in this order and no other:
#       1. split_token      three segments of base64url characters
#       2. read_header      alg must be HS256: the token does not choose how it is checked
#       3. check_signature  recompute the HMAC over the "header.payload" received; compare
#       4. read_payload     only now, the claims: JSON, base64url-decoded
#       5. check_claims     exp, nbf, iat (and iss, aud when configured)
#
# That is all of it. Two speed tricks keep a decode within a few times the cost of the
# one HMAC it must compute (bench/bench_jwt.py measures the ratio); each sits beside the
# plain line it shortens, marked "Speed:": the one header this server writes is encoded
# once and recognised by its text, and the HMAC key is absorbed once per key, not per token.

COMPACT_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
JSON_WHITESPACE = " \t\n\r"          # RFC 8259 §2: the only whitespace JSON allows


def json_bytes(value):
    """Compact JSON as UTF-8 bytes: what goes into tokens and onto the wire."""
    return COMPACT_JSON.encode(value).encode("utf-8")


def reject_constant(name):
    """JSON allows no NaN or Infinity; Python's parser does unless told not to."""
    raise ValueError(f"{name} is not JSON")


STRICT_JSON = json.JSONDecoder(parse_constant=reject_constant)


def unique_members(pairs):
    """A JSON object's members as a dict; ValueError if a name comes twice."""
    members = dict(pairs)
    if len(members) != len(pairs):
        raise ValueError("a member name comes twice")
    return members


# RFC 7515 §4 lets a reader either refuse a header that names a member twice or keep the
# last: we refuse, because a proxy in front that keeps the first would read another header.
UNIQUE_JSON = json.JSONDecoder(parse_constant=reject_constant, object_pairs_hook=unique_members)


def parse_json_object(data, decoder=STRICT_JSON):
    """UTF-8 bytes -> dict; ValueError for anything else (also for absurd nesting)."""
    # decoder.decode(text) does the same, with two regex passes for the whitespace.
    text = data.decode("utf-8").strip(JSON_WHITESPACE)
    try:
        value, end = decoder.raw_decode(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    if end != len(text):
        raise ValueError("extra data after the JSON value")
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


# The error names and messages are node-jsonwebtoken's, so apps written for the
# tutorial can tell an expired token (log in again) from a forged one.
class TokenError(Exception):
    """A token that must not be trusted; name and message go to the client."""
    name = "JsonWebTokenError"


class TokenExpiredError(TokenError):
    name = "TokenExpiredError"


class NotBeforeError(TokenError):
    name = "NotBeforeError"


def as_key(secret):
    """The HMAC key: bytes as given, text as UTF-8."""
    return secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)


def sign(signing_input, key):
    """HMAC-SHA256 of the signing input (RFC 7518 §3.2), 32 bytes."""
    # Plainly: hmac.digest(key, signing_input, "sha256"). Speed: HMAC starts by hashing
    # the key into two blocks; copying an HMAC that has done so already (keyed_hmac,
    # just below) gives the same bytes for about 70 % of the cost.
    mac = keyed_hmac(key).copy()
    mac.update(signing_input)
    return mac.digest()


@functools.lru_cache(maxsize=8)
def keyed_hmac(key):
    """An HMAC-SHA256 object with the key already absorbed, made once per key; sign copies it."""
    return hmac.new(key, digestmod=hashlib.sha256)


HS256_HEADER = {"alg": "HS256", "typ": "JWT"}           # the one header this server writes
# Speed: its base64url text never changes, so it is made once, here, not per token.
HS256_HEADER_SEGMENT = b64url_encode(json_bytes(HS256_HEADER))


def encode_token(claims, secret):
    """Claims -> "header.payload.signature", signed with HS256."""
    payload_segment = b64url_encode(json_bytes(claims))
    signing_input = f"{HS256_HEADER_SEGMENT}.{payload_segment}"
    signature = sign(signing_input.encode("ascii"), as_key(secret))
    return f"{signing_input}.{b64url_encode(signature)}"


def make_claims(user, now, lifetime, issuer=None, audience=None, session_id=None):
    """What a login token says: who, issued when, until when (for whom, in which session)."""
    claims = {"id": user["id"], "username": user["username"],
              "iat": int(now), "exp": int(now) + lifetime}
    if session_id:
        claims["sid"] = session_id
    if issuer:
        claims["iss"] = issuer
    if audience:
        claims["aud"] = audience
    return claims


# decode_token is these five steps in order; `explain` prints each one as it runs it.

TOKEN_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


def split_token(token):
    """Step 1: three segments of base64url characters (the last may be empty), not too long."""
    if (not isinstance(token, str) or len(token) > MAX_TOKEN_BYTES
            or not TOKEN_SHAPE.fullmatch(token)):
        raise TokenError("jwt malformed")
    return token.split(".")


def read_header(header_segment):
    """Step 2: the header is a JSON object saying alg HS256 (once), and nothing we can't honour."""
    # Speed: the header this server writes, recognised by its text, needs no decoding.
    if header_segment == HS256_HEADER_SEGMENT:
        return HS256_HEADER
    try:
        header = parse_json_object(b64url_decode(header_segment), UNIQUE_JSON)
    except ValueError:
        raise TokenError("invalid token") from None
    if "crit" in header:
        # RFC 7515 §4.1.11: extensions we do not understand must make the token invalid.
        raise TokenError("invalid token")
    # The one algorithm we sign with. Trusting the token's own "alg" is the classic JWT
    # hole: "none" would need no signature at all.
    if header.get("alg") != "HS256":
        raise TokenError("invalid algorithm")
    return header


def check_signature(signing_input, signature_segment, key):
    """Step 3: recompute HMAC-SHA256 over the bytes received, compare in constant time.

    Comparing base64url texts rather than bytes also refuses a second spelling of the
    right signature, as strict decoding would.
    """
    if not signature_segment:
        raise TokenError("jwt signature is required")
    expected = b64url_encode(sign(signing_input, key))
    if not hmac.compare_digest(expected, signature_segment):
        raise TokenError("invalid signature")


def read_payload(payload_segment):
    """Step 4: only after the signature checks out, read the claims."""
    try:
        return parse_json_object(b64url_decode(payload_segment))
    except ValueError:
        raise TokenError("invalid token") from None


def is_number(value):
    """Finite JSON numbers only: True, "1700000000" and 1e400 (inf to Python) are not times."""
    return type(value) is int or (type(value) is float and math.isfinite(value))


def check_claims(claims, now, leeway=0, issuer=None, audience=None):
    """Step 5: the token is in its lifetime, and was made for us."""
    if "nbf" in claims:
        if not is_number(claims["nbf"]):
            raise TokenError("invalid nbf value")
        if claims["nbf"] > now + leeway:
            raise NotBeforeError("jwt not active")
    if "iat" in claims:
        if not is_number(claims["iat"]):
            raise TokenError("invalid iat value")
        if claims["iat"] > now + leeway:
            raise NotBeforeError("jwt not active")
    # We always set exp, so a token without one was not made by us.
    if not is_number(claims.get("exp")):
        raise TokenError("invalid exp value")
    # now - leeway, not exp + leeway: an int exp beyond a float's range cannot be added to
    # a float leeway, but compares with a float exactly.
    if now - leeway >= claims["exp"]:
        raise TokenExpiredError("jwt expired")
    if audience is not None:
        presented = claims.get("aud")
        audiences = presented if isinstance(presented, list) else [presented]
        if audience not in audiences:
            raise TokenError(f"jwt audience invalid. expected: {audience}")
    if issuer is not None and claims.get("iss") != issuer:
        raise TokenError(f"jwt issuer invalid. expected: {issuer}")


def decode_token(token, secret, now=None, leeway=0, issuer=None, audience=None):
    """Verify a token and return its claims; TokenError (or a subclass) if it fails."""
    header_segment, payload_segment, signature_segment = split_token(token)
    read_header(header_segment)
    signing_input = f"{header_segment}.{payload_segment}".encode("ascii")
    check_signature(signing_input, signature_segment, as_key(secret))
    claims = read_payload(payload_segment)
    check_claims(claims, time.time() if now is None else now, leeway, issuer, audience)
    return claims


# ---------------------------------------------------------------------------
# 4. Attacks: the classic forgeries, and the step of decode_token that stops each
# ---------------------------------------------------------------------------
# Every step above is there because some JWT library once went without it, and was
# broken. This section forges those attacks, as pure functions of a genuine token, so that
# each can be fired at a correct server and seen refused, by name: `python authserver.py
# attack` sends them from the command line, and the page's "Attack it" panel gets the very
# same list from GET /attacks. They come in the order of the steps that stop them. No
# forgery reaches step 4, read_payload: a payload gets past step 3 only with the key.
#
# A forger has no key. A few attacks are there to show a later step at work (a genuine
# signature on another algorithm, or on an exp gone by), and only the key's holder can
# make those: they are marked needs="key". Each is worth no more than the genuine token it
# is made from: the same user and session, never valid later, and (expired, not_yet_valid)
# out of reach of any server's leeway.

Attack = namedtuple("Attack", "name tries check message reference needs forge")
# name, tries        what the attack is, and what it tries, in a line each
# check, message     the step that must refuse it, and what that step says (the 401's message)
# reference          where the rule is written: RFC 7515 (JWS), 7518 (JWA), 7519 (JWT), 8725
#                    (JWT best practices)
# needs              None, "key" (the server's own: see above) or "refresh token"
# forge              Genuine -> the forged token

# What each step of decode_token guarantees: the explanation beside every refusal.
CHECKS = {
    "split_token": "a token is three base64url segments, without padding, at most "
                   f"{MAX_TOKEN_BYTES} characters, and nothing else",
    "read_header": "the server decides the algorithm (HS256), never the token; a header it "
                   "cannot honour, or cannot read in one way only, is refused",
    "check_signature": "the HMAC is recomputed with the server's own key over the bytes "
                       "received; no key is ever taken from the token",
    "check_claims": "a genuine signature is refused too outside its time: before nbf or "
                    "iat, or from exp on",
}
# The step a refusal's message comes from, when it is not the one expected (a server
# other than this one may refuse a forgery later, or earlier). read_payload says "invalid
# token" too, but no forgery gets that far: see above.
MESSAGE_CHECKS = {"jwt malformed": "split_token", "invalid algorithm": "read_header",
                  "invalid token": "read_header", "jwt signature is required": "check_signature",
                  "invalid signature": "check_signature", "jwt expired": "check_claims",
                  "jwt not active": "check_claims"}
FORGER_KEY = b"attacker-key"     # what a forger signs with when it names its own key


class Genuine:
    """A token the server issued, taken apart: what every forgery starts from."""

    def __init__(self, token, key=None, refresh_token=None, now=None):
        self.token = token
        self.header_segment, self.payload_segment, self.signature_segment = split_token(token)
        # Read, not trusted: a forger copies the claims, which anyone can read.
        self.claims = parse_json_object(b64url_decode(self.payload_segment))
        self.key, self.refresh_token = key, refresh_token
        self.now = time.time() if now is None else now


def segment(value):
    """A segment: a dict as compact JSON, or JSON text exactly as written, in base64url."""
    return b64url_encode(value.encode("utf-8") if isinstance(value, str) else json_bytes(value))


def signed_with(key, header, claims, digest="sha256"):
    """A token signed with any key, by any HMAC (sha256, sha384, sha512)."""
    signing_input = f"{segment(header)}.{segment(claims)}"
    signature = hmac.digest(as_key(key), signing_input.encode("ascii"), digest)
    return f"{signing_input}.{b64url_encode(signature)}"


# The forgeries most attacks are made of, each a function of the genuine token:

def unsigned(header):
    """header and the genuine claims, with an empty signature."""
    return lambda genuine: f"{segment(header)}.{segment(genuine.claims)}."


def header_changed(header):
    """header, with the genuine payload and signature."""
    return lambda genuine: ".".join((segment(header), genuine.payload_segment,
                                     genuine.signature_segment))


def signed_by(key, header, digest="sha256"):
    """The genuine claims under header, signed with key (None: the server's own)."""
    return lambda genuine: signed_with(genuine.key if key is None else key, header,
                                       genuine.claims, digest)


# -- Step 1, split_token: a token's shape ------------------------------------------------

def padded(genuine):
    """The genuine token with "=" padding on each segment: the same bytes, spelled otherwise."""
    return ".".join(part + "=" * (-len(part) % 4) for part in genuine.token.split("."))


def plain_base64(genuine):
    """The genuine token in plain base64: + / for - _, and padded. (HS256's 32-byte signature
    is 43 characters, so it always gains an "="; forged() drops a forgery that changed
    nothing, as this one might for another algorithm.)"""
    return padded(genuine).translate(str.maketrans("-_", "+/"))


def oversized(genuine):
    """The genuine claims padded past MAX_TOKEN_BYTES, signed by a forger."""
    return signed_with(FORGER_KEY, HS256_HEADER, {**genuine.claims, "pad": "A" * MAX_TOKEN_BYTES})


def shape_attacks():
    """Step 1: what split_token refuses before any work is done on it."""
    yield Attack('base64 with "=" padding', "the genuine token, each segment padded as plain "
                 "base64 pads it", "split_token", "jwt malformed", "RFC 7515 §2", None, padded)
    yield Attack("plain base64", "the genuine token in plain base64: + and / for - and _, "
                 "and padded", "split_token", "jwt malformed", "RFC 7515 §2; RFC 4648 §5",
                 None, plain_base64)
    yield Attack("oversized token", f"a payload padded past {MAX_TOKEN_BYTES} characters, "
                 "for the server to decode and hash", "split_token", "jwt malformed",
                 "MAX_TOKEN_BYTES, this server's limit", None, oversized)
    yield Attack("refresh token as an access token", "the login's refresh token, sent where "
                 "an access token goes; here it is not even a JWT, so it has no dots",
                 "split_token", "jwt malformed", "RFC 8725 §2.8, §3.12; RFC 6749 §1.5",
                 "refresh token", lambda genuine: genuine.refresh_token)


# -- Step 2, read_header: the token does not choose how it is checked --------------------

def none_attacks():
    """Step 2: alg "none", the unsecured JWT, in the spellings that slipped past checks."""
    for alg in ("none", "None", "NONE"):
        header = {"alg": alg, "typ": "JWT"}
        yield Attack(f'alg "{alg}", no signature', 'a header saying the token is not signed '
                     'at all (an "unsecured JWT")', "read_header", "invalid algorithm",
                     "RFC 8725 §2.1, §3.1; RFC 7518 §3.6", None, unsigned(header))
        yield Attack(f'alg "{alg}", signature kept', "the same, with the genuine signature "
                     "left on for a parser that wants one", "read_header", "invalid algorithm",
                     "RFC 8725 §2.1, §3.1; RFC 7518 §3.6", None, header_changed(header))


def algorithm_attacks():
    """Step 2: any other algorithm, however it is written, and a header read two ways."""
    for alg, digest in (("HS384", "sha384"), ("HS512", "sha512"), ("hs256", "sha256")):
        yield Attack(f'alg "{alg}", the server\'s own key', "a genuine signature, made by "
                     "another algorithm than the server's (or its name in another case: "
                     "alg is case-sensitive)", "read_header", "invalid algorithm",
                     "RFC 8725 §3.1; RFC 7515 §4.1.1", "key",
                     signed_by(None, {"alg": alg, "typ": "JWT"}, digest))
    for alg in ("RS256", "ES256"):
        yield Attack(f'alg "{alg}", signature kept', "a public-key algorithm: a server that "
                     "lets alg choose the check can be made to take its public key as an "
                     "HMAC key (key confusion)", "read_header", "invalid algorithm",
                     "RFC 8725 §2.1, §3.1", None, header_changed({"alg": alg, "typ": "JWT"}))
    yield Attack('alg "none" in JSON escapes', r'"\u006eone" is "none" to a JSON parser, '
                 "but not to a filter that looks at the text", "read_header",
                 "invalid algorithm", "RFC 8725 §3.1; RFC 8259 §7", None,
                 unsigned(r'{"alg":"\u006eone","typ":"JWT"}'))
    for first, last in (("HS256", "none"), ("none", "HS256")):
        yield Attack(f'alg twice: "{first}", then "{last}"', "a parser that keeps the first "
                     "and one that keeps the last read two different headers", "read_header",
                     "invalid token", "RFC 7515 §4", None,
                     unsigned(f'{{"alg":"{first}","alg":"{last}","typ":"JWT"}}'))
    yield Attack('"crit": ["b64"], the server\'s own key', "an extension the server does not "
                 "implement (RFC 7797's unencoded payload), marked as one it must",
                 "read_header", "invalid token", "RFC 7515 §4.1.11", "key",
                 signed_by(None, {**HS256_HEADER, "b64": False, "crit": ["b64"]}))


# -- Step 3, check_signature: only the key's holder can sign -----------------------------

def claims_changed(name, change):
    """The genuine header and signature, and one claim changed: change(old value, now)."""
    def forge(genuine):
        claims = {**genuine.claims, name: change(genuine.claims.get(name), genuine.now)}
        return f"{genuine.header_segment}.{segment(claims)}.{genuine.signature_segment}"
    return forge


def another_user(old, now):
    return old + 1 if type(old) is int else 1


def a_year_on(old, now):
    return (old if is_number(old) else int(now)) + 365 * 86400


def a_year_on_with(key):
    """The genuine claims with exp a year on, signed with key."""
    return lambda genuine: signed_with(key, HS256_HEADER, {
        **genuine.claims, "exp": a_year_on(genuine.claims.get("exp"), genuine.now)})


ONLINE_GUESSES = WORDLIST[:6]      # the keys tried on the server; all are tried offline


def key_guess_name(key):
    return f"signed with {json.dumps(key)}"


# Once the server accepts one of them, its name says the server's key: not to be shown.
KEY_GUESS_NAMES = frozenset(key_guess_name(key) for key in ONLINE_GUESSES)


def signature_attacks():
    """Step 3: a signature removed or kept on edited claims, or made with another key."""
    yield Attack("signature removed", "the genuine header and payload, and an empty "
                 "signature", "check_signature", "jwt signature is required", "RFC 7515 §5.2",
                 None, lambda genuine: f"{genuine.header_segment}.{genuine.payload_segment}.")
    edits = (("username", 'username changed to "admin"', lambda old, now: "admin"),
             ("id", "id changed to the next number (another user's, or nobody's)",
              another_user), ("exp", "exp moved a year on", a_year_on))
    for name, title, change in edits:
        yield Attack(f"payload edited: {title}", "a claim rewritten and the genuine signature "
                     "kept: base64url is an encoding, which anyone can rewrite",
                     "check_signature", "invalid signature", "RFC 7515 §5.2", None,
                     claims_changed(name, change))
    for key in ONLINE_GUESSES:
        yield Attack(key_guess_name(key), "a key from tutorials and examples, and with it "
                     "any claims a forger likes: here exp a year on", "check_signature",
                     "invalid signature", "RFC 8725 §2.2, §3.5", None, a_year_on_with(key))
    # Headers that name a key: a server that follows them lets the forger choose it. The
    # URLs are loopback ones: the attack never names a place outside this machine.
    injections = (
        ('"kid": "../../../../dev/null"', {"kid": "../../../../dev/null"}, b"",
         "a key file's path: /dev/null reads as an empty key, which signed this",
         "RFC 8725 §2.9, §3.10; RFC 7515 §4.1.4"),
        ('"kid" with SQL in it', {"kid": "x' UNION SELECT 'attacker-key' --"}, FORGER_KEY,
         "a key looked up in a database, which returns the forger's key",
         "RFC 8725 §2.9, §3.10; RFC 7515 §4.1.4"),
        ('"jku": a loopback URL', {"jku": "http://127.0.0.1/.well-known/jwks.json"},
         FORGER_KEY, "keys to fetch from a URL (the forger's, or a request into the "
         "server's network)", "RFC 8725 §2.9, §3.10; RFC 7515 §4.1.2"),
        ('"x5u": a loopback URL', {"x5u": "http://127.0.0.1/cert.pem"}, FORGER_KEY,
         "a certificate to fetch from a URL, likewise", "RFC 8725 §2.9, §3.10; RFC 7515 §4.1.5"),
        ('"jwk": a key in the header', {"jwk": {"kty": "oct", "k": b64url_encode(FORGER_KEY)}},
         FORGER_KEY, "the key itself, embedded in the token: the forger's",
         "RFC 8725 §3.10; RFC 7515 §4.1.3"),
    )
    for title, member, key, tries, reference in injections:
        yield Attack(title, tries, "check_signature", "invalid signature", reference, None,
                     signed_by(key, {**HS256_HEADER, **member}))
    yield Attack("a token from another server", "the same claims, signed by another server "
                 "with its own secret (were a secret shared, aud would have to tell them "
                 "apart)", "check_signature", "invalid signature", "RFC 8725 §2.7, §3.9", None,
                 lambda genuine: signed_with(secrets.token_bytes(32), HS256_HEADER,
                                             genuine.claims))


# -- Step 5, check_claims: a genuine signature, at the wrong time ------------------------

# Twice the longest leeway a server may allow (config's leeway is at most a day): the time
# forgeries are out of reach of any server's leeway, and of any clock off by less.
OUT_OF_REACH = 2 * NUMBER_SETTINGS["leeway"][2]


def expired(genuine):
    """The genuine claims, iat kept, exp moved back two days before iat: refused by every
    server, whatever its leeway or clock, as expired, and never later than the genuine."""
    claims = genuine.claims
    first = min(value for value in (claims.get("iat"), claims.get("exp"), genuine.now)
                if is_number(value))
    return encode_token({**claims, "exp": math.floor(first) - OUT_OF_REACH - 60}, genuine.key)


def not_yet_valid(genuine):
    """The genuine claims, exp kept, nbf two days past it: never valid where nbf is
    checked, and no more than the genuine token where it is not."""
    exp = genuine.claims.get("exp")
    latest = max(exp, genuine.now) if is_number(exp) else genuine.now
    return encode_token({**genuine.claims, "nbf": math.ceil(latest) + OUT_OF_REACH + 1},
                        genuine.key)


def time_attacks():
    """Step 5: the server's own signature, outside the token's time."""
    yield Attack("expired token replayed", "a token whose exp has passed, signed as the "
                 "server signs (an old captured one)", "check_claims", "jwt expired",
                 "RFC 7519 §4.1.4", "key", expired)
    yield Attack("nbf in the future", "a token not valid before its nbf, signed as the "
                 "server signs", "check_claims", "jwt not active", "RFC 7519 §4.1.5", "key",
                 not_yet_valid)


ATTACKS = [*shape_attacks(), *none_attacks(), *algorithm_attacks(), *signature_attacks(),
           *time_attacks()]


def unmet_need(attack, genuine):
    """What attack needs and genuine lacks: "key", "refresh token", or None."""
    if attack.needs == "key" and genuine.key is None:
        return "key"
    if attack.needs == "refresh token" and not genuine.refresh_token:
        return "refresh token"
    return None


def forged(attack, genuine):
    """attack's token, or None when it needs what genuine lacks (the key, a refresh token),
    or when it is the genuine token itself (alg RS256 kept on an RS256 token, say)."""
    if unmet_need(attack, genuine):
        return None
    token = attack.forge(genuine)
    return None if token == genuine.token else token


def header_text(token):
    """A forged token's header as JSON text, to show; read as leniently as a forger writes."""
    if not token or "." not in token:          # a refresh token has no header
        return None
    first = token.split(".")[0].rstrip("=").translate(str.maketrans("+/", "-_"))
    try:
        return b64url_decode(first).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None


def attack_fields(attack, token):
    """An attack and its forged token as JSON, for the page and for `attack --json`."""
    return {"name": attack.name, "tries": attack.tries, "check": attack.check,
            "message": attack.message, "reference": attack.reference, "needs": attack.needs,
            "token": token, "header": header_text(token)}


def verdict(attack, status, message):
    """("refused", check) for a 4xx, ("ACCEPTED", None) for a 2xx, ("unclear", None) else.

    The check is the one the attack aims at when the answer says what that check says,
    else the one the answer's message names (None for a message this file never sends).
    """
    if 200 <= status < 300:
        return "ACCEPTED", None
    if not 400 <= status < 500 or status == 429:
        return "unclear", None
    return "refused", attack.check if message == attack.message else MESSAGE_CHECKS.get(message)


# -- The secret, offline: how fast can a captured token's key be guessed? ---------------

def guess_secret(token, guesses):
    """(found, tried, seconds): try every guess as the key of token's signature, offline.

    found is a bool, never the key: whoever runs this learns that the key is weak, and
    what says so can be pasted anywhere. The search goes on after a find, to the end of
    the list, so that the rate it measures is the same either way.
    """
    header_segment, payload_segment, signature_segment = split_token(token)
    signing_input = f"{header_segment}.{payload_segment}".encode("ascii")
    signature = b64url_decode(signature_segment)
    found, tried, started = False, 0, time.perf_counter()
    for guess in guesses:
        tried += 1
        # == rather than compare_digest: offline, there is nobody to time the comparison.
        found |= hmac.digest(guess.encode("utf-8"), signing_input, "sha256") == signature
    return found, tried, time.perf_counter() - started


SECONDS_PER_YEAR = 365.25 * 86400
UNIVERSE_AGE_YEARS = 1.38e10


def duration_text(seconds):
    """0.31 s, 12 min, 5.2 h, 40 days, 300 years, 2.1e+63 years."""
    for limit, unit, size in ((60, "s", 1), (3600, "min", 60), (86400, "h", 3600),
                              (SECONDS_PER_YEAR, "days", 86400)):
        if seconds < limit:
            count = seconds / size
            return f"{count:.2g} {unit}" if count < 10 else f"{count:,.0f} {unit}"
    years = seconds / SECONDS_PER_YEAR
    if years < 1e6:
        return f"{years:,.0f} year{'s' if round(years) != 1 else ''}"
    return f"{years:.1e} years"


def key_bits(key):
    """The bits key would hold were each character drawn at random from the kinds it uses."""
    text = key.decode("utf-8", "replace")
    alphabet = sum(size for pattern, size in (("[a-z]", 26), ("[A-Z]", 26), ("[0-9]", 10),
                                              ("[^a-zA-Z0-9]", 33)) if re.search(pattern, text))
    return min(len(text) * math.log2(max(alphabet, 2)), 256.0)   # HMAC-SHA256 holds 256 at most


def search_times(rate, key=None):
    """[(what, how long a search of all of them takes at rate guesses a second)]: keys of
    common kinds, and one of key's length and kinds of character, were they random."""
    rows = [("a word from a 100,000-word dictionary", 1e5),
            ("6 random lowercase letters", 26.0 ** 6),
            ("10 random characters of any kind", 95.0 ** 10),
            ("256 random bits, as authserver makes", 2.0 ** 256)]
    if key is not None:
        length, bits = len(key.decode("utf-8", "replace")), key_bits(key)
        rows.append((f"the configured secret: {length} characters, {bits:.0f} bits", 2.0 ** bits))
    return [(what, count / rate) for what, count in rows]


# ---------------------------------------------------------------------------
# 5. Users and passwords
# ---------------------------------------------------------------------------

# Stored as Django does it: "pbkdf2_sha256$<iterations>$<salt>$<base64 hash>". The
# string says how it was made, so the iteration count can rise without breaking
# old hashes. PBKDF2-HMAC-SHA256 at 600,000 rounds is OWASP's 2023 advice.
HASH_ALGORITHM = "pbkdf2_sha256"


def hash_password(password, iterations=DEFAULT_CONFIG["passwordIterations"], salt=None):
    """A salted, slow, self-describing hash of password."""
    salt = salt or secrets.token_urlsafe(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt.encode("ascii"),
                                 iterations)
    return f"{HASH_ALGORITHM}${iterations}${salt}${base64.b64encode(digest).decode('ascii')}"


def split_password_hash(encoded):
    """(iterations, salt, digest) from a stored hash; ValueError if it is not one."""
    parts = encoded.split("$") if isinstance(encoded, str) else []
    if len(parts) != 4 or parts[0] != HASH_ALGORITHM or not parts[1].isdigit():
        raise ValueError("not a pbkdf2_sha256 hash")
    iterations = int(parts[1])
    if not 1 <= iterations <= MAX_ITERATIONS or not parts[2].isascii():
        raise ValueError("pbkdf2_sha256 hash with impossible parameters")
    return iterations, parts[2], base64.b64decode(parts[3], validate=True)


def verify_password(password, encoded):
    """Does password match the stored hash? Constant-time comparison."""
    iterations, salt, expected = split_password_hash(encoded)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt.encode("ascii"),
                                 iterations)
    return hmac.compare_digest(digest, expected)


def dummy_hash(iterations):
    """A hash no password matches, for unknown usernames to be checked against.

    Without it, "no such user" would answer in microseconds and "wrong password" in a
    third of a second, telling an attacker which usernames exist.
    """
    return f"{HASH_ALGORITHM}${iterations}$dummysalt${base64.b64encode(bytes(32)).decode()}"


def public_record(user):
    """A user as the API shows it: every field except passwords."""
    return {name: value for name, value in user.items() if "password" not in name.lower()}


# One rule for usernames, applied when the server loads users.json and when adduser
# writes it, so the command line can never write a file the server then refuses. Letters
# of any script are welcome (café, 山田); whitespace, control characters and lone surrogates
# (argv bytes that were not UTF-8) are not: nobody can see them, let alone type them.
MAX_USERNAME_CHARS = 64
# Control characters, invisible format characters (zero-width spaces, right-to-left
# overrides), lone surrogates, private-use and unassigned code points: each makes a name
# that prints like another one, or like nothing.
UNSEEN_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn"}
# Unicode's Default_Ignorable_Code_Point ranges (DerivedCoreProperties.txt), which a font
# draws as nothing whatever their category: "test" + a combining grapheme joiner (U+034F),
# a Hangul filler (U+3164) or a variation selector (U+FE00) prints as "test". Python's
# unicodedata lacks the property, so the ranges are written out here.
DEFAULT_IGNORABLE_RANGES = (
    (0x00AD, 0x00AD), (0x034F, 0x034F), (0x061C, 0x061C), (0x115F, 0x1160), (0x17B4, 0x17B5),
    (0x180B, 0x180F), (0x200B, 0x200F), (0x202A, 0x202E), (0x2060, 0x206F), (0x3164, 0x3164),
    (0xFE00, 0xFE0F), (0xFEFF, 0xFEFF), (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8),
    (0x1BCA0, 0x1BCA3), (0x1D173, 0x1D17A), (0xE0000, 0xE0FFF))
# Symbols drawn blank though not ignorable: the braille pattern with no dots, a musical
# null notehead, the Khitan filler.
BLANK_SYMBOLS = "\u2800\U0001d159\U00016fe4"
PRINTS_AS_NOTHING = re.compile("[" + "".join(
    f"{re.escape(chr(low))}-{re.escape(chr(high))}" for low, high in DEFAULT_IGNORABLE_RANGES)
    + re.escape(BLANK_SYMBOLS) + "]")


def check_username(name, where):
    """ConfigError, starting with where, unless name is a username users.json may hold."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: a username must be non-empty text, not {name!r}")
    if len(name) > MAX_USERNAME_CHARS:
        raise ConfigError(f"{where}: username {name[:20]!r}... is longer than "
                          f"{MAX_USERNAME_CHARS} characters")
    if any(char.isspace() or unicodedata.category(char) in UNSEEN_CATEGORIES for char in name):
        raise ConfigError(f"{where}: username {name!r} contains whitespace or a control "
                          f"character")
    unseen = PRINTS_AS_NOTHING.search(name)
    if unseen:
        raise ConfigError(f"{where}: username {name!r} contains U+{ord(unseen.group()):04X}, "
                          f"a character that prints as nothing")
    # One spelling per name: "café" with é as one code point (NFC), not as e + U+0301
    # (NFD, which macOS and some phone keyboards send). adduser, sign-up and login turn
    # what they are given into NFC; only a users.json edited by hand can hold the other.
    if not unicodedata.is_normalized("NFC", name):
        raise ConfigError(f"{where}: username {name!r} is not in Unicode NFC form; write it "
                          f"as {unicodedata.normalize('NFC', name)!r} (composed characters)")


def username_key(name):
    """What two names that a reader would take for one share: case and width set aside.

    "Alice", "ALICE" and full-width "ａｌｉｃｅ" all give "alice": users.json may hold one of
    them only. Logins still match the name exactly. Homoglyphs across scripts (Cyrillic
    "е" for Latin "e") would need Unicode's confusables data, which Python lacks.
    """
    return unicodedata.normalize("NFKC", name).casefold()


def check_users(users, path):
    """Refuse a users list that is not one; name the user and the fix."""
    if not isinstance(users, list) or not all(isinstance(user, dict) for user in users):
        raise ConfigError(f"users file {path}: must hold a JSON array of user objects")
    seen_names, name_by_id = set(), {}          # id -> the name with it
    for user in users:
        name, user_id = user.get("username"), user.get("id")
        check_username(name, f"users file {path}")
        if type(user_id) not in (int, str):
            raise ConfigError(f"users file {path}: user {name!r} needs an id (number or text)")
        # Only the same name twice is refused here. Two names in another case or width
        # ("test", "Test") are refused to a NEW name (refuse_taken), but a file that already
        # holds both, from an older version or a hand edit, must still load: refusing it
        # would keep every later change, a passwd included, from reaching the server.
        if name in seen_names:
            raise ConfigError(f"users file {path}: the username {name!r} appears twice")
        if user_id in name_by_id:
            raise ConfigError(f"users file {path}: the id {user_id!r} is used by both "
                              f"{name_by_id[user_id]!r} and {name!r}")
        seen_names.add(name)
        name_by_id[user_id] = name
        if "password" in user:
            raise ConfigError(
                f"users file {path}: user {name!r} has a plaintext password; replace it "
                f"with a hash: python authserver.py passwd {name} --users {path}")
        try:
            split_password_hash(user.get("passwordHash"))
        except (ValueError, binascii.Error):
            raise ConfigError(
                f"users file {path}: user {name!r} has no valid passwordHash; set one "
                f"with: python authserver.py passwd {name} --users {path}") from None


# -- changing users.json: adduser, passwd and sign-up, one writer at a time ----

class UsernameTaken(ConfigError):
    """adduser or sign-up for a name users.json already has."""


class TooManyUsers(ConfigError):
    """Sign-up when users.json already holds maxUsers users."""


def read_users_list(path):
    """The raw list in users.json, to be edited."""
    users = read_json_file(path, "users file")
    if not isinstance(users, list) or not all(isinstance(user, dict) for user in users):
        raise ConfigError(f"users file {path}: must hold a JSON array of user objects")
    return users


def save_users(path, users):
    write_file_atomically(path, json.dumps(users, indent=2, ensure_ascii=False) + "\n", 0o644)


def update_users_file(path, change):
    """Read users.json, let change(users) edit the list, write it back: one locked step.

    Returns what change returns. Slow work (hashing a password) belongs before the call,
    so that the lock is held for a read and a write only.
    """
    with file_lock(path):
        remove_stale_temporaries(path)
        users = read_users_list(path)
        result = change(users)
        check_users(users, path)        # never write a file the server would refuse to load
        save_users(path, users)
    return result


def find_record(users, username):
    return next((user for user in users if user.get("username") == username), None)


def find_user_record(users, username, path):
    """The record for username; ConfigError naming the file if there is none."""
    user = find_record(users, username)
    if user is None:
        raise ConfigError(f"no user {username!r} in {path}")
    return user


def refuse_taken(users, username, path):
    """UsernameTaken if users has username, or the same name in another case or width."""
    key = username_key(username)
    same = next((user["username"] for user in users if isinstance(user.get("username"), str)
                 and username_key(user["username"]) == key), None)
    if same == username:
        raise UsernameTaken(f"user {username!r} already exists in {path}; "
                            f"use: python authserver.py passwd {username}")
    if same is not None:
        raise UsernameTaken(f"user {username!r} is the same name as {same!r} in {path} "
                            f"(another case or width)")


def add_user_record(path, username, password_hash, fields, most_users=None):
    """Append a user with a fresh random id to users.json; UsernameTaken if the name is,
    TooManyUsers if the file already holds most_users (None: no limit)."""
    def append(users):
        if most_users is not None and len(users) >= most_users:
            raise TooManyUsers(f"{path} holds {len(users)} users, the most sign-up may make")
        refuse_taken(users, username, path)
        taken = {user.get("id") for user in users}
        # Five digits, as the tutorial's ids, drawn from a range at least ten times the
        # number of users: a free one is found at once, however many sign up.
        span = max(90000, 10 * len(users))
        user_id = next(candidate for candidate in iter(lambda: secrets.randbelow(span) + 10000, None)
                       if candidate not in taken)
        record = {"id": user_id, "username": username, "passwordHash": password_hash, **fields}
        users.append(record)
        return record
    return update_users_file(path, append)


# -- the rules for a new user: sign-up checks them before anything is written ---
# (The username's rule is check_username's, above, the same as for users.json and adduser.)

# NIST SP 800-63B §5.1.1.2: at least 8 characters, no composition rules ("a digit and a
# capital"), every printable character and Unicode allowed, and a check against passwords
# known to be common. The ceiling only bounds the work: PBKDF2 hashes a long password
# once, so 256 costs nothing, and is four times the 64 NIST asks verifiers to accept.
MIN_PASSWORD_CHARS = 8
MAX_PASSWORD_CHARS = 256
# The first guesses of every guessing tool: the most common passwords of 8 characters or
# more in the published leak lists (shorter ones fail the length rule already). A short
# list, not a breach corpus: it stops the worst choices and shows the rule.
COMMON_PASSWORDS = frozenset("""
    password password1 password123 12345678 123456789 1234567890 0123456789 11111111
    00000000 12341234 87654321 qwertyuiop qwerty123 1q2w3e4r 1qaz2wsx zaq12wsx
    iloveyou sunshine princess football baseball superman starwars welcome1
    abc12345 abcd1234 letmein1 trustno1 passw0rd whatever dragon123 monkey123
""".split())
# Profile fields beside username and password: the tutorial's, and no others. An
# allow-list, because any other name may mean something to someone: "role", "isAdmin" or
# "scope" to an app that reads getInfo, "sid" or "exp" to a reader of claims, a field an
# administrator added to users.json by hand. A user must not give those to himself.
# No "email": the tutorial's users have none, and the server would not verify one, while
# an app that found it in getInfo could take it for a verified address.
# Short text only: the apps built on the tutorial read them as strings, and users.json is
# read whole and rewritten on every change.
PROFILE_FIELDS = ("firstName", "lastName", "phone")
MAX_PROFILE_CHARS = 200


def check_new_password(password, username):
    """ValueError unless password may be chosen (length counted in characters, not bytes)."""
    if len(password) < MIN_PASSWORD_CHARS:
        raise ValueError(f"password must be at least {MIN_PASSWORD_CHARS} characters")
    if len(password) > MAX_PASSWORD_CHARS:
        raise ValueError(f"password must be at most {MAX_PASSWORD_CHARS} characters")
    if password.casefold() in COMMON_PASSWORDS:
        raise ValueError("password is one of the most common passwords; choose another")
    if password.casefold() == username.casefold():
        raise ValueError("password must not be the username")


def check_profile(fields):
    """ValueError unless fields (all but username and password) are profile text we keep."""
    for name, value in fields.items():
        if name not in PROFILE_FIELDS:
            raise ValueError(f"field {name!r} is not accepted: the profile fields are "
                             f"{', '.join(PROFILE_FIELDS)}")
        if (not isinstance(value, str) or len(value) > MAX_PROFILE_CHARS
                or not value.isprintable()):
            raise ValueError(f"{name} must be text of at most {MAX_PROFILE_CHARS} "
                             f"printable characters")


# A user as loaded: the record as users.json has it, and getInfo's answer for it, encoded
# once per load of the file instead of once per request.
User = namedtuple("User", "record public_json")
# What UserStore.read makes of the file; dummy_hash is checked when a name is unknown,
# name_keys holds every name's username_key (is a name taken in another case or width?).
UserTables = namedtuple("UserTables", "by_name by_id dummy_hash name_keys")


class UserStore:
    """users.json, looked up by name and by id, reloaded when the file changes.

    The lookup tables are replaced whole, in one assignment, so a request sees the old
    users or the new ones, never a mix.
    """

    RECHECK_SECONDS = 1.0

    def __init__(self, path, log=lambda message: None):
        self.path = Path(path)
        self.log = log
        # Called after a reload with the names whose user is gone or has another id or
        # password hash now: the server ends their sessions (AuthServer.end_stale_sessions).
        self.on_change = lambda names: None
        self.stamp = None
        self.next_check = 0.0
        self.reloading = threading.Lock()
        self.tables = self.read()

    def read(self):
        """Parse and check the file into UserTables, or ConfigError."""
        stamp = self.file_stamp()
        records = read_json_file(self.path, "users file")
        check_users(records, self.path)
        self.stamp = stamp
        users = [User(record, json_bytes(public_record(record))) for record in records]
        # Unknown names are checked against a hash as slow as the slowest real one.
        iterations = max((split_password_hash(record["passwordHash"])[0] for record in records),
                         default=DEFAULT_CONFIG["passwordIterations"])
        return UserTables(by_name={user.record["username"]: user for user in users},
                          by_id={user.record["id"]: user for user in users},
                          dummy_hash=dummy_hash(iterations),
                          name_keys={username_key(user.record["username"]) for user in users})

    def file_stamp(self):
        try:
            status = self.path.stat()
            return (status.st_mtime_ns, status.st_size, status.st_ino)
        except OSError:
            return None

    def refresh(self, force=False):
        """Reload if the file changed; at most once a second. A broken file is kept out.

        force: now, whatever the clock says; sign-up's new user must log in at once.
        """
        now = time.monotonic()
        if not force and now < self.next_check:
            return
        # One reload at a time: a thread that read an older file must not put its tables
        # in after a reload that started later (a sign-up that has written its user and
        # reloads) put in newer ones.
        with self.reloading:
            self.next_check = now + self.RECHECK_SECONDS
            if self.file_stamp() == self.stamp:
                if force:                           # asked (SIGHUP): say that nothing changed
                    self.log(f"users file unchanged: {len(self.tables.by_name)} users")
                return
            before = self.tables.by_name
            try:
                self.tables = self.read()
            except ConfigError as error:
                self.stamp = self.file_stamp()      # say it once, not every second
                self.log(f"users file not reloaded, keeping the last good one: {error}")
                return
        after = self.tables.by_name
        self.on_change([name for name, user in before.items()
                        if name not in after or changed_user(user, after[name])])
        self.log(f"users file reloaded: {len(after)} users")

    def find_by_name(self, username):
        """(the User or None, the hash to check the password against: a dummy if None)."""
        self.refresh()
        tables = self.tables
        user = tables.by_name.get(username)
        return user, user.record["passwordHash"] if user else tables.dummy_hash

    def count(self):
        """How many users the file held when last read."""
        self.refresh()
        return len(self.tables.by_name)

    def has_name_like(self, username):
        """Is username, or the same name in another case or width (username_key), taken?"""
        self.refresh()
        return username_key(username) in self.tables.name_keys

    def user_for(self, claims):
        """The User a verified token speaks of; TokenError if it no longer exists as such."""
        self.refresh()
        user_id = claims.get("id")
        user = self.tables.by_id.get(user_id) if type(user_id) in (int, str) else None  # True == 1
        if user is None or user.record["username"] != claims.get("username"):
            raise TokenError("user not found")
        return user


def password_fingerprint(password_hash):
    """What a session keeps of the password hash it was started under: 16 bytes of its
    SHA-256. Enough to tell that the hash changed; not the hash, which a copy of the
    sessions file would otherwise hand to an offline password guesser."""
    return hashlib.sha256(password_hash.encode("utf-8")).digest()[:16]


def session_owner(record):
    """(the user's id as JSON, the password's fingerprint): whom a session is for."""
    return json.dumps(record["id"]), password_fingerprint(record["passwordHash"])


def changed_user(before, after):
    """Is this another user now, or the same with another password? Then its sessions end."""
    return session_owner(before.record) != session_owner(after.record)


class LoginLimiter:
    """Password checks started per key, ("user", name) or ("address", ip), in a sliding window.

    A check is counted when it starts, in the same locked step that finds it allowed:
    counting only failures already made would let a burst of guesses sent at once all
    through before the first one is counted. limits gives each kind of key its own limit.
    Each kind has its own table of at most max_keys keys, dropping the least recently
    used, so a flood of made-up usernames cannot grow it without limit; and addresses,
    which come cheap (a botnet, an IPv6 /64), never push a username's count out.
    """

    def __init__(self, limits, window, max_keys=10000):
        self.limits, self.window, self.max_keys = limits, window, max_keys
        # kind -> (key -> deque of start times, oldest first), least recently used first
        self.started = {kind: OrderedDict() for kind in limits}
        self.lock = threading.Lock()

    def reserve(self, keys, now):
        """Count one check against every key and return 0; or, if any key has none left,
        count nothing and return the whole seconds until it has one."""
        with self.lock:
            waits = []
            for key in keys:
                times = self.started[key[0]].get(key)
                while times and times[0] <= now - self.window:
                    times.popleft()
                if times and len(times) >= self.limits[key[0]]:
                    waits.append(times[0] + self.window - now)
            if waits:
                return int(max(waits)) + 1
            for key in keys:
                table = self.started[key[0]]
                times = table.pop(key, None) or deque()
                times.append(now)
                table[key] = times              # to the end: the most recently used
                while len(table) > self.max_keys:
                    table.popitem(last=False)
        return 0

    def release(self, key, now):
        """Take back the check counted against key at now (a right password)."""
        with self.lock:
            times = self.started[key[0]].get(key)
            if times and now in times:
                times.remove(now)

    def forget(self, key):
        """Start key's count afresh."""
        with self.lock:
            self.started[key[0]].pop(key, None)


def decode_password(encoded):
    """The base64 password the page and apps send -> text; None if it is not base64.

    UTF-8 first (what apps send); Latin-1 otherwise, which is what a browser's
    btoa() makes of a password like "café".
    """
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


# ---------------------------------------------------------------------------
# 6. Sessions: refresh tokens, logout, revocation
# ---------------------------------------------------------------------------
# An access token is stateless: nobody can take it back before its exp. A session is the
# stateful half that makes logout possible. Each login starts one, in SQLite; the access
# token names it ("sid"), and a refresh token, random and opaque, renews it. Revoking the
# session refuses its access tokens from that moment and its refresh token for ever.
#
# The file holds SHA-256 hashes of refresh tokens only, never a token: a copy of it lets
# nobody in. Each refresh rotates the token (the old one is spent); a spent token coming
# back means two holders, a thief and the owner, so the whole session is revoked (RFC 9700
# §4.14.2).
#
# A session belongs to one account as it was at login: its user's id and a fingerprint of
# the password hash. A name is not enough (a removed user's name may be given to someone
# else), and a session started with a password that has since changed must end with it.

SESSION_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,            -- the access token's "sid"
    username TEXT NOT NULL,
    user_id TEXT,                   -- the user's id, as JSON (5 and "5" are two users)
    fingerprint BLOB,               -- password_fingerprint of the hash it was started under
    refresh_hash BLOB NOT NULL UNIQUE,  -- SHA-256 of the current refresh token
    previous_hash BLOB,             -- SHA-256 of the one it replaced ...
    sealed_successor BLOB,          -- ... and the current one, sealed (see seal), for refreshGrace
    rotated_at REAL NOT NULL,       -- when the current refresh token was issued
    created REAL NOT NULL,
    last_used REAL NOT NULL,
    expires REAL NOT NULL,          -- rotated_at + refreshTokenLifetime
    address TEXT NOT NULL,
    user_agent TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_by_user ON sessions (username, created);
CREATE INDEX IF NOT EXISTS sessions_by_expiry ON sessions (expires);
CREATE INDEX IF NOT EXISTS sessions_by_previous ON sessions (previous_hash);
CREATE INDEX IF NOT EXISTS sessions_sealed ON sessions (rotated_at)
    WHERE sealed_successor IS NOT NULL;     -- the seals a login clears past the grace
CREATE TABLE IF NOT EXISTS spent (  -- refresh tokens already rotated: reuse means theft
    hash BLOB PRIMARY KEY,
    session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS spent_by_session ON spent (session_id);
"""
SPENT_KEPT = 32                # spent hashes remembered per session; older ones are "unknown"
REFRESH_TOKEN_BYTES = 32
SESSION_ID_BYTES = 16          # the access token's "sid": 22 base64url characters
REFRESH_TOKEN_SHAPE = re.compile(r"[A-Za-z0-9_-]{43}")      # 32 bytes in base64url


class RefreshTokenError(TokenError):
    """A refresh token that renews nothing: unknown, expired, or its session ended."""
    name = "RefreshTokenError"


class RefreshTokenReuseError(RefreshTokenError):
    """A spent refresh token came back: the session is revoked."""
    name = "RefreshTokenReuseError"


class SessionRevokedError(TokenError):
    """A validly signed access token whose session has ended (logout, revoke, reuse)."""
    name = "SessionRevokedError"


class SessionStoreError(Exception):
    """The sessions file cannot be read or written right now (503, never a token)."""


# What a login or a refresh hands out: the session, its new refresh token, the time the
# access token that goes with it is issued at (its iat), and whose it is (session_owner).
Renewal = namedtuple("Renewal", "session_id username refresh_token issued_at owner")


def random_for_command_lines(size):
    """size random bytes whose base64url text never starts with "-": a command line would
    take such a text for an option (explain $REFRESH, revoke alice $SESSION). One draw in
    64 is drawn again, which leaves all but 0.02 of the bits."""
    while True:
        data = secrets.token_bytes(size)
        if data[0] >> 2 != BASE64URL_ALPHABET.index("-"):
            return data


def owner_refusal(user, owner):
    """Why a session recorded for owner can no longer renew for user (a User, or None if
    users.json has no such name): a RefreshTokenError, or None if it still can."""
    if user is None or session_owner(user.record)[0] != owner[0]:
        return RefreshTokenError("user not found")
    if session_owner(user.record) != tuple(owner):
        return RefreshTokenError("password changed; log in again")
    return None


def refresh_token_hash(token):
    """What the file keeps instead of the token: its SHA-256."""
    return hashlib.sha256(token.encode("utf-8")).digest()


def seal(successor, previous_token, key):
    """successor XOR HMAC-SHA256(server key, "successor:" + previous token): the same call
    opens it.

    Opening it takes the previous token, which the file never holds, and the server's
    key, which it never holds either: a copy of the file opens nothing, not even beside
    a spent token (from an old log or backup). And seals older than refreshGrace are
    cleared, so a copy made later holds none to open.
    """
    pad = hmac.new(key, b"successor:" + previous_token.encode("ascii"), hashlib.sha256).digest()
    return bytes(a ^ b for a, b in zip(successor, pad))


class SessionStore:
    """Sessions in SQLite, and in memory the ids of the live ones, for require_token.

    One connection behind a lock, not one per thread: SQLite lets one writer in at a time
    anyway, a Python lock queues our threads in turn where SQLite's busy handler would have
    them sleep and poll, and the in-memory set changes under the same lock as the rows.
    Two processes (a second server, the CLI) are kept apart by BEGIN IMMEDIATE.
    """

    RECHECK_SECONDS = 1.0
    MAX_DEAD_IDS = 10000
    # How long a request waits for our lock, and then for another process's write lock
    # (SQLite's busy timeout). Our transactions take milliseconds, so a lock held for a
    # second is someone else's long one (a backup, the sqlite3 shell, a stuck process):
    # waiting longer would only pile up clients and threads behind it. They get a 503
    # with Retry-After instead, each within about two seconds.
    BUSY_SECONDS = 1.0
    CHANGE_CHECK_WAIT = 0.1         # pick_up_changes: long enough to get past one transaction

    def __init__(self, path, refresh_lifetime, max_per_user, grace, log=lambda message: None,
                 key=None):
        self.path = Path(path)
        self.refresh_lifetime, self.max_per_user, self.grace = refresh_lifetime, max_per_user, grace
        self.key = key              # the server's secret, for seal; the CLI's stores rotate nothing
        self.log = log
        self.lock = threading.Lock()
        self.next_check = 0.0
        self.dead = set()           # sids known to be gone: refused without asking the file
        self.stale_names = set()    # users whose changed records end_stale has yet to apply
        try:
            self.connection = self.connect()
        except (sqlite3.Error, OSError) as error:
            raise ConfigError(f"sessions file {self.path}: {error}") from None
        try:
            self.data_version = self.query_one("PRAGMA data_version")[0]
            self.live = self.live_ids(time.time())
        except sqlite3.Error as error:
            self.connection.close()
            raise ConfigError(f"sessions file {self.path}: {error}") from None

    def connect(self):
        """Open (or create, mode 0600) the file, in WAL mode, with the tables."""
        if not self.path.exists():
            # Created here with its mode, so the file is never readable by others, not even
            # for a moment. (Windows ignores the mode; the folder's permissions apply.)
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        connection = sqlite3.connect(self.path, timeout=self.BUSY_SECONDS, isolation_level=None,
                                     check_same_thread=False)
        try:
            # WAL: readers never wait for the writer, and a kill -9 loses no committed
            # transaction. NORMAL: no fsync per commit (a power cut may lose the last ones;
            # their holders log in again), and the file is never left corrupt.
            if connection.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() != "wal":
                raise sqlite3.OperationalError("cannot switch to WAL mode")
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.execute("PRAGMA foreign_keys=ON")
            connection.executescript(SESSION_SCHEMA)
            # A file from before sessions knew their owner gets the columns; its sessions,
            # owned by nobody, end at start-up (end_stale), and their users log in again.
            columns = {row[1] for row in connection.execute("PRAGMA table_info(sessions)")}
            for column, kind in (("user_id", "TEXT"), ("fingerprint", "BLOB")):
                if column not in columns:
                    connection.execute(f"ALTER TABLE sessions ADD COLUMN {column} {kind}")
        except BaseException:
            connection.close()
            raise
        return connection

    def close(self):
        with self.lock:
            self.connection.close()

    def query_one(self, sql, parameters=()):
        return self.connection.execute(sql, parameters).fetchone()

    @contextlib.contextmanager
    def locked(self):
        """with store.locked(): the lock, or SessionStoreError after BUSY_SECONDS."""
        if not self.lock.acquire(timeout=self.BUSY_SECONDS):
            raise SessionStoreError("sessions file busy: another request waits for it")
        try:
            yield
        finally:
            self.lock.release()

    def transaction(self, work):
        """Run work() inside BEGIN IMMEDIATE ... COMMIT, under the lock; SessionStoreError if
        the file fails. Nothing is returned to a client before COMMIT has succeeded."""
        with self.locked():
            try:
                self.connection.execute("BEGIN IMMEDIATE")
                try:
                    result = work()
                    self.connection.execute("COMMIT")
                except BaseException:
                    self.connection.execute("ROLLBACK")
                    raise
            except sqlite3.Error as error:
                raise SessionStoreError(str(error)) from None
            return result

    # -- what require_token asks, on every request ---------------------------------

    def live_ids(self, now):
        return {row[0] for row in self.connection.execute(
            "SELECT id FROM sessions WHERE expires > ?", (now,))}

    def pick_up_changes(self):
        """At most once a second, reload the live ids if another process changed the file.

        PRAGMA data_version changes when another connection commits, and only then. A
        transaction holds the lock for milliseconds, so the look waits up to a tenth of a
        second for it (under a stream of logins or logouts, never waiting would put the
        look off again and again); one held longer is waiting for another process, and
        the look is put off to the next request: a getInfo never waits behind it.
        """
        now = time.monotonic()
        if now < self.next_check or not self.lock.acquire(timeout=self.CHANGE_CHECK_WAIT):
            return
        try:
            self.next_check = now + self.RECHECK_SECONDS
            version = self.query_one("PRAGMA data_version")[0]
            if version != self.data_version:
                self.live = self.live_ids(time.time())
                self.data_version = version
        except sqlite3.Error as error:
            self.log(f"sessions file not re-read, keeping what is known: {error}")
        finally:
            self.lock.release()

    def check_live(self, session_id):
        """SessionRevokedError unless the session is live. A set lookup, as a rule: the file
        is read only for an id this process has never seen (a session another server started
        a moment ago, or one that ended), and an id found gone is remembered."""
        self.pick_up_changes()
        if session_id in self.live:
            return
        if session_id not in self.dead:
            with self.locked():
                try:
                    found = self.query_one("SELECT 1 FROM sessions WHERE id = ? AND expires > ?",
                                           (session_id, time.time()))
                except sqlite3.Error as error:
                    raise SessionStoreError(str(error)) from None
                if found:
                    self.live.add(session_id)
                    return
                if len(self.dead) >= self.MAX_DEAD_IDS:
                    self.dead.clear()
                self.dead.add(session_id)
        raise SessionRevokedError("session revoked")

    # -- changes: each in one transaction ------------------------------------------

    def start(self, username, now, address="", user_agent="", owner=(None, None)):
        """A new session for owner (session_owner of the user's record): (its id, its first
        refresh token). Expired sessions and the user's oldest ones past maxSessionsPerUser
        go in the same transaction."""
        session_id = b64url_encode(random_for_command_lines(SESSION_ID_BYTES))
        refresh_token = b64url_encode(random_for_command_lines(REFRESH_TOKEN_BYTES))

        def work():
            ended = [row[0] for row in self.connection.execute(
                "SELECT id FROM sessions WHERE expires <= ? UNION "
                "SELECT id FROM (SELECT id FROM sessions WHERE username = ? "
                "ORDER BY created DESC LIMIT -1 OFFSET ?)", (now, username, self.max_per_user - 1))]
            self.delete(ended)
            # Seals past the grace open nothing any more; kept, a copy of the file would hold them.
            self.connection.execute("UPDATE sessions SET sealed_successor = NULL "
                                    "WHERE sealed_successor IS NOT NULL AND rotated_at <= ?",
                                    (now - self.grace,))
            self.connection.execute(
                "INSERT INTO sessions (id, username, user_id, fingerprint, refresh_hash, "
                "rotated_at, created, last_used, expires, address, user_agent) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (session_id, username, *owner, refresh_token_hash(refresh_token), now, now,
                 now, now + self.refresh_lifetime, address[:100], user_agent[:200]))
            # Live from here, under the lock with its row: a delete coming after this
            # transaction (a logoutAll, another login past maxSessionsPerUser) finds both.
            self.live.add(session_id)
            return ended
        try:
            self.transaction(work)
        except SessionStoreError:
            self.live.discard(session_id)       # rolled back: the id was never handed out
            raise
        return session_id, refresh_token

    def delete(self, session_ids):
        """Delete sessions (their spent hashes follow, ON DELETE CASCADE); call inside work."""
        for session_id in session_ids:
            self.connection.execute("DELETE FROM sessions WHERE id = ?", (session_id,))
            self.live.discard(session_id)

    def renew(self, refresh_token, now):
        """Rotate a refresh token: a Renewal with its successor; RefreshTokenError if none.

        Two refreshes at the same moment with the same token (an app's two tabs or two
        requests) are not theft: within refreshGrace seconds of a rotation the token it
        replaced gets the same successor again, unsealed from the row, and the same access
        token (same iat). After that, or for any older spent token, the session is revoked.
        """
        presented = refresh_token_hash(refresh_token)

        def work():
            row = self.query_one("SELECT id, username, expires, user_id, fingerprint "
                                 "FROM sessions WHERE refresh_hash = ?", (presented,))
            if row is not None:
                return self.rotate(row, refresh_token, now)
            row = self.query_one("SELECT id, username, sealed_successor, rotated_at, "
                                 "refresh_hash, user_id, fingerprint FROM sessions "
                                 "WHERE previous_hash = ?", (presented,))
            if row is not None and row[2] is not None and now - row[3] < self.grace:
                successor = b64url_encode(seal(row[2], refresh_token, self.key))
                if hmac.compare_digest(refresh_token_hash(successor), row[4]):
                    return Renewal(row[0], row[1], successor, int(row[3]), (row[5], row[6]))
            row = self.query_one("SELECT session_id FROM spent WHERE hash = ?", (presented,))
            if row is not None:
                self.delete([row[0]])
                return RefreshTokenReuseError(
                    "refresh token already used: the session is revoked; log in again")
            return RefreshTokenError("refresh token not recognised (revoked or never issued)")
        outcome = self.transaction(work)
        if isinstance(outcome, TokenError):
            raise outcome             # raised after COMMIT, so the revocation stands
        return outcome

    def rotate(self, row, refresh_token, now):
        """The current refresh token becomes spent; a new one takes its place."""
        session_id, username, expires, *owner = row
        if expires <= now:
            self.delete([session_id])
            return RefreshTokenError("refresh token expired; log in again")
        successor = random_for_command_lines(REFRESH_TOKEN_BYTES)
        successor_token = b64url_encode(successor)
        self.connection.execute(
            "UPDATE sessions SET refresh_hash = ?, previous_hash = ?, sealed_successor = ?, "
            "rotated_at = ?, last_used = ?, expires = ? WHERE id = ?",
            (refresh_token_hash(successor_token), refresh_token_hash(refresh_token),
             seal(successor, refresh_token, self.key) if self.grace else None,
             now, now, now + self.refresh_lifetime, session_id))
        self.connection.execute("INSERT OR IGNORE INTO spent VALUES (?, ?)",
                                (refresh_token_hash(refresh_token), session_id))
        self.connection.execute(
            "DELETE FROM spent WHERE session_id = ? AND rowid NOT IN (SELECT rowid FROM spent "
            "WHERE session_id = ? ORDER BY rowid DESC LIMIT ?)",
            (session_id, session_id, SPENT_KEPT))
        return Renewal(session_id, username, successor_token, int(now), tuple(owner))

    def end_by_token(self, refresh_token):
        """Logout: end the session this refresh token (current, previous or spent) belongs
        to. Returns how many sessions ended: 0 for a token already ended or never issued."""
        presented = refresh_token_hash(refresh_token)

        def work():
            found = self.connection.execute(
                "SELECT id FROM sessions WHERE refresh_hash = ? OR previous_hash = ? "
                "UNION SELECT session_id FROM spent WHERE hash = ?",
                (presented, presented, presented)).fetchall()
            self.delete(row[0] for row in found)
            return len(found)
        return self.transaction(work)

    def end_for_user(self, username, session_id=None):
        """Revoke every session of a user, or one; how many ended."""
        def work():
            found = self.connection.execute(
                "SELECT id FROM sessions WHERE username = ? AND (? IS NULL OR id = ?)",
                (username, session_id, session_id)).fetchall()
            self.delete(row[0] for row in found)
            return len(found)
        return self.transaction(work)

    def end_stale(self, users_by_name, names=()):
        """End the sessions of these users that their record in users_by_name did not start:
        the user is gone, the name is another user's now, or the password changed. Returns
        how many ended. Names are kept until done: a call that fails (SessionStoreError)
        leaves them for the next one."""
        self.stale_names.update(names)
        names = set(self.stale_names)

        def work():
            ended = []
            for name in names:
                user = users_by_name.get(name)
                owner = session_owner(user.record) if user is not None else None
                ended += [row[0] for row in self.connection.execute(
                    "SELECT id, user_id, fingerprint FROM sessions WHERE username = ?", (name,))
                    if (row[1], row[2]) != owner]
            self.delete(ended)
            return len(ended)
        ended = self.transaction(work) if names else 0
        self.stale_names -= names
        return ended

    def usernames(self):
        """Every name that has sessions in the file, live or expired."""
        with self.locked():
            try:
                return {row[0] for row in self.connection.execute(
                    "SELECT DISTINCT username FROM sessions")}
            except sqlite3.Error as error:
                raise SessionStoreError(str(error)) from None

    def sessions_of(self, username, now, owner=None):
        """A user's live sessions, oldest first, as the API shows them; only owner's, if given
        (the CLI shows every session of the name, the API those of the asking account)."""
        user_id, fingerprint = owner or (None, None)
        with self.locked():
            try:
                rows = self.connection.execute(
                    "SELECT id, created, last_used, expires, address, user_agent FROM sessions "
                    "WHERE username = ? AND expires > ? AND (? IS NULL OR (user_id = ? "
                    "AND fingerprint = ?)) ORDER BY created",
                    (username, now, user_id, user_id, fingerprint)).fetchall()
            except sqlite3.Error as error:
                raise SessionStoreError(str(error)) from None
        return [{"id": row[0], "created": int(row[1]), "lastUsed": int(row[2]),
                 "expires": int(row[3]), "address": row[4], "userAgent": row[5]} for row in rows]


# ---------------------------------------------------------------------------
# 7. HTTP errors and the JSON responder
# ---------------------------------------------------------------------------

class Response:
    """What goes back: a status, a body (dict -> JSON, or bytes), extra headers."""
    __slots__ = ("status", "body", "headers", "content_type")

    def __init__(self, status, body=b"", headers=(), content_type="application/json; charset=utf-8"):
        self.status, self.body, self.headers, self.content_type = status, body, headers, content_type


class HTTPError(Exception):
    """Raise anywhere to answer with status and a JSON {"message": ...}."""

    def __init__(self, status, message, body=None, headers=()):
        super().__init__(message)
        self.response = Response(status, body if body is not None else {"message": message},
                                 headers)


def named_error(status, name, message, headers=()):
    """An HTTPError in the tutorial's {"error": true, "name", "message"} shape."""
    return HTTPError(status, message, body={"error": True, "name": name, "message": message},
                     headers=headers)


def token_refused(error):
    """401 for a token that failed verification, in the tutorial's shape and RFC 6750's."""
    description = str(error).replace('"', "'")
    return named_error(401, error.name, str(error), headers=(
        ("WWW-Authenticate", f'Bearer error="invalid_token", error_description="{description}"'),))


def sessions_unavailable(sessions, error):
    """503 when the sessions file fails: no token is issued, no revocation claimed."""
    sessions.log(f"sessions file {sessions.path}: {error}")
    message = "Sessions are unavailable right now; try again shortly"
    return named_error(503, "SessionStoreError", message, headers=(("Retry-After", "5"),))


# Sent on every response, errors included: "*" is what the cors package sends by default,
# and it is what lets test.html call us when opened from disk (origin "null").
COMMON_HEADERS = (
    "Access-Control-Allow-Origin: *\r\n"
    "Access-Control-Expose-Headers: WWW-Authenticate, Retry-After\r\n"
    "X-Content-Type-Options: nosniff\r\n"
    "Cache-Control: no-store\r\n"              # tokens and user data are not for caches
)


STATUS_LINES = {status.value: f"HTTP/1.1 {status.value} {status.phrase}\r\n" for status in HTTPStatus}


@functools.lru_cache(maxsize=4)
def http_date(second):
    """The Date header, formatted once per second rather than once per request."""
    return formatdate(second, usegmt=True)


@functools.lru_cache(maxsize=4)
def log_time(second):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second))


SERVER_VERSION = "authserver/1.0"


def response_bytes(response, now, connection="", head=False):
    """A Response as bytes on the wire: status line, headers, then the JSON body.

    connection: "close" or "keep-alive" to say so in a Connection header, "" to say
    nothing. head: a HEAD request, answered with GET's headers and no body.
    """
    body, status = response.body, response.status
    payload = body if isinstance(body, bytes) else json_bytes(body)
    lines = [f"{STATUS_LINES[status]}Date: {http_date(int(now))}\r\n"
             f"Server: {SERVER_VERSION}\r\n{COMMON_HEADERS}"]
    if status != 204:
        lines.append(f"Content-Type: {response.content_type}\r\n"
                     f"Content-Length: {len(payload)}\r\n")
    lines.extend(f"{name}: {value}\r\n" for name, value in response.headers)
    if connection:
        lines.append(f"Connection: {connection}\r\n")
    lines.append("\r\n")
    head_bytes = "".join(lines).encode("latin-1")
    return head_bytes if head or status == 204 else head_bytes + payload


# ---------------------------------------------------------------------------
# 8. Middleware: every request runs through these steps, in this order
# ---------------------------------------------------------------------------
# A step takes the request and returns a Response to answer now, or None to go on;
# it may also raise HTTPError. The router is simply the last step. The table it looks
# in is the server's `routes`, a RouteTable: defined here, filled in by the next section.
#
# The request is the connection's handler (section 10). What a step or a route may use:
#   request.command        the method, "GET", "POST", ... (HEAD is routed as GET)
#   request.route_path     the path, without the query string
#   request.headers        Headers: any spelling of a name finds it ("Authorization")
#   request.body           the body's bytes, b"" when there is none
#   request.client_address (address, port) of the client
#   request.server         the AuthServer: config, key, users, sessions, routes, limiter
#   request.user, request.session_id   set by require_token for the routes after it


class Headers(dict):
    """A request's headers: names stored in lower case, and found in any case."""
    __slots__ = ()

    def get(self, name, default=None):
        return dict.get(self, name.lower(), default)

    def __getitem__(self, name):
        return dict.__getitem__(self, name.lower())

    def __contains__(self, name):
        return dict.__contains__(self, name.lower())


class RouteTable:
    """The routes a server answers: actions keyed by (method, path), and the public paths."""

    def __init__(self, actions, public_paths):
        self.actions = dict(actions)
        self.public_paths = frozenset(public_paths)

    def action_for(self, method, path):
        """The function that answers method on path, or None."""
        return self.actions.get((method, path))

    def is_public(self, path):
        """Whether path is answered without a token."""
        return path in self.public_paths

    def allowed_methods(self, path):
        """The Allow header for path, "" for an unknown one."""
        methods = sorted(method for method, route_path in self.actions if route_path == path)
        if "GET" in methods:
            methods.append("HEAD")
        return ", ".join(methods + ["OPTIONS"]) if methods else ""


CORS_METHODS = "GET,HEAD,PUT,PATCH,POST,DELETE"
HEADER_LIST = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~, -]*")


def answer_preflight(request):
    """CORS preflight (and any OPTIONS): 204 with what the browser asked to send."""
    if request.command != "OPTIONS":
        return None
    headers = [("Access-Control-Allow-Methods", CORS_METHODS),
               ("Allow", request.server.routes.allowed_methods(request.route_path)
                or CORS_METHODS)]
    asked = request.headers.get("access-control-request-headers")
    if asked and HEADER_LIST.fullmatch(asked):
        headers += [("Access-Control-Allow-Headers", asked),
                    ("Vary", "Access-Control-Request-Headers")]
    return Response(204, headers=headers)


def bearer_token(headers):
    """The token from x-access-token, or from "Authorization: Bearer <token>"."""
    token = headers.get("x-access-token", "").strip()
    if token:
        return token
    scheme, _, credentials = headers.get("authorization", "").strip().partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" else ""


# The server's config decides what its tokens say and what is asked of them; these two
# functions are the only places that read it for that. A new claim goes in both.

def login_claims(config, record, now, session_id=None):
    """What a token issued under config says of the user record (at login, or by `token`)."""
    return make_claims(record, now, config["tokenLifetime"], config["issuer"],
                       config["audience"], session_id)


def claim_checks(config):
    """What config asks of a token's claims: keywords for decode_token and check_claims
    (the server computes them once, as server.claim_checks)."""
    return {"leeway": config["leeway"], "issuer": config["issuer"], "audience": config["audience"]}


def require_token(request):
    """Every path but the public ones needs a valid token for a user who still exists."""
    if request.server.routes.is_public(request.route_path):
        return None
    token = bearer_token(request.headers)
    if not token:
        raise HTTPError(403, "No token provided.",
                        body={"error": True, "message": "No token provided."},
                        headers=(("WWW-Authenticate", 'Bearer realm="authserver"'),))
    server = request.server
    try:
        claims = decode_token(token, server.key, **server.claim_checks)
        # Signed by us, but is its user still there (and did the token name a real one)?
        request.user = server.users.user_for(claims)
        request.session_id = check_session(server.sessions, claims)
    except TokenError as error:
        raise token_refused(error) from None
    return None


def check_session(sessions, claims):
    """The token's session id, if it names one that is still live; None for a token without
    one (made before sessions existed, or by the token command): verified as before."""
    if "sid" not in claims:
        return None
    session_id = claims["sid"]
    if not isinstance(session_id, str):
        raise TokenError("invalid sid value")
    try:
        sessions.check_live(session_id)
    except SessionStoreError as error:
        raise sessions_unavailable(sessions, error) from None
    return session_id


def route(request):
    """Last step: the function for (method, path), or 404 / 405."""
    method = "GET" if request.command == "HEAD" else request.command
    action = request.server.routes.action_for(method, request.route_path)
    if action is not None:
        return action(request)
    allowed = request.server.routes.allowed_methods(request.route_path)
    if allowed:
        raise HTTPError(405, f"Method {request.command} not allowed on {request.route_path}",
                        headers=(("Allow", allowed),))
    raise HTTPError(404, f"No route for {request.route_path}")


MIDDLEWARE = [answer_preflight, require_token, route]


def run_middleware(request):
    for step in MIDDLEWARE:
        response = step(request)
        if response is not None:
            return response
    raise AssertionError("the router always answers")


# ---------------------------------------------------------------------------
# 9. Routes
# ---------------------------------------------------------------------------

def read_fields(request):
    """The fields of a JSON or form body, as a dict."""
    content_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    try:
        if content_type == "application/json":
            fields = parse_json_object(request.body)
        elif content_type == "application/x-www-form-urlencoded":
            fields = parse_form(request.body)
        else:
            raise HTTPError(415, "Content-Type must be application/json or "
                                 "application/x-www-form-urlencoded")
    except ValueError as error:
        raise HTTPError(400, f"Malformed body: {error}") from None
    return fields


def read_credentials(request):
    """username and the base64 password from a JSON or form body."""
    return credentials_from(read_fields(request))


def credentials_from(fields):
    """username (in NFC) and the base64 password from a body's fields; 400 unless text."""
    username, password = fields.get("username"), fields.get("password")
    if username is None or password is None:
        raise HTTPError(400, "username and password are required")
    if not isinstance(username, str) or not isinstance(password, str):
        raise HTTPError(400, "username and password must be strings")
    if "\x00" in username or "\x00" in password:
        raise HTTPError(400, "username and password must not contain NUL characters")
    # users.json holds names in NFC; a phone or a Mac may send "café" decomposed (NFD).
    return unicodedata.normalize("NFC", username), password


def parse_form(body):
    """application/x-www-form-urlencoded -> dict, each field once; ValueError otherwise."""
    pairs = urllib.parse.parse_qsl(body.decode("ascii"), keep_blank_values=True,
                                   strict_parsing=bool(body), errors="strict",
                                   max_num_fields=20)
    fields = dict(pairs)
    if len(fields) != len(pairs):
        raise ValueError("a field is repeated")
    return fields


def authenticate(request):
    """POST /users/authenticate: a token for the right username and password."""
    username, encoded_password = read_credentials(request)
    server, now = request.server, time.time()
    limiter = server.limiter
    user_key, address_key = ("user", username), ("address", request.client_address[0])
    # The check is counted before the hash is computed, so no burst gets more than the limit.
    wait = limiter.reserve((user_key, address_key), now)
    if wait:
        raise HTTPError(429, f"Too many failed logins; try again in {wait} seconds",
                        headers=(("Retry-After", str(wait)),))
    user, stored_hash = server.users.find_by_name(username)
    password = decode_password(encoded_password)
    # The hash is always computed, even for an unknown user, so time tells nothing.
    with server.hash_slots:
        matches = verify_password(password or "", stored_hash)
    if not (matches and user and password is not None):
        raise HTTPError(400, "Username or password is incorrect")
    limiter.forget(user_key)                 # the user's count starts afresh ...
    limiter.release(address_key, now)        # ... and a right password is not held against
                                             # the others who share the address
    # The session is saved before any token leaves: if the file fails, the answer is 503.
    owner = session_owner(user.record)
    with session_errors(server.sessions):
        session_id, refresh_token = server.sessions.start(
            username, now, request.client_address[0], request.headers.get("user-agent", ""),
            owner)
    renewal = Renewal(session_id, username, refresh_token, int(now), owner)
    try:
        # The password was checked against the users file as this process last read it;
        # if passwd changed it meanwhile, the session (saved after that check) ends here.
        user = session_user(server, renewal)
    except RefreshTokenError:
        raise HTTPError(400, "Username or password is incorrect") from None
    return token_pair(server, user.record, renewal)


def token_pair(server, record, renewal):
    """The login answer: the tutorial's token and expiresIn, plus the refresh token.

    The access token's iat is the renewal's, so a refresh repeated within refreshGrace
    gets byte for byte the same token.
    """
    config = server.config
    claims = login_claims(config, record, renewal.issued_at, renewal.session_id)
    return Response(200, {"token": encode_token(claims, server.key),
                          "expiresIn": config["tokenLifetime"],
                          "refreshToken": renewal.refresh_token,
                          "refreshExpiresIn": config["refreshTokenLifetime"]})


@contextlib.contextmanager
def session_errors(sessions):
    """with session_errors(store): a failing sessions file becomes a JSON 503."""
    try:
        yield sessions
    except SessionStoreError as error:
        raise sessions_unavailable(sessions, error) from None


def read_refresh_token(request):
    """refreshToken from a JSON or form body; None if it is text of another shape than ours.

    Only the shape is checked here, for refresh and logout alike: a token of another
    length or alphabet (a lone surrogate included) was never issued, so it needs no
    lookup, and nothing but base64url text reaches the hashing and the database.
    """
    token = read_fields(request).get("refreshToken")
    if token is None:
        raise HTTPError(400, "refreshToken is required")
    if not isinstance(token, str) or not token:
        raise HTTPError(400, "refreshToken must be a non-empty string")
    return token if REFRESH_TOKEN_SHAPE.fullmatch(token) else None


def session_user(server, renewal):
    """The User of a session, if users.json still has them as the session began (same id,
    same password); if not, the session ends now and RefreshTokenError says why."""
    user = server.users.find_by_name(renewal.username)[0]
    refusal = owner_refusal(user, renewal.owner)
    if refusal is None:
        return user
    with session_errors(server.sessions):
        server.sessions.end_for_user(renewal.username, renewal.session_id)
    raise refusal


def refresh_refused(error):
    """401 for a refresh token that renews nothing, in the tutorial's error shape."""
    return named_error(401, error.name, str(error))


def refresh(request):
    """POST /users/refresh: a new access token and a new refresh token; the old one is spent."""
    refresh_token = read_refresh_token(request)
    server = request.server
    if refresh_token is None:
        raise refresh_refused(RefreshTokenError("refresh token not recognised "
                                                "(revoked or never issued)"))
    try:
        with session_errors(server.sessions):
            renewal = server.sessions.renew(refresh_token, time.time())
        user = session_user(server, renewal)
    except RefreshTokenError as error:
        raise refresh_refused(error) from None
    return token_pair(server, user.record, renewal)


def logout(request):
    """POST /users/logout: end the refresh token's session; 204 even if it had ended, or if
    there never was one (as for a token of another shape: a logout has nothing to refuse)."""
    refresh_token = read_refresh_token(request)
    if refresh_token is not None:
        with session_errors(request.server.sessions) as sessions:
            sessions.end_by_token(refresh_token)
    return Response(204)


def logout_all(request):
    """POST /users/logoutAll: end every session of the token's user."""
    with session_errors(request.server.sessions) as sessions:
        sessions.end_for_user(request.user.record["username"])
    return Response(204)


def list_sessions(request):
    """GET /users/sessions: the user's live sessions, the one asking marked current."""
    with session_errors(request.server.sessions) as sessions:
        found = sessions.sessions_of(request.user.record["username"], time.time(),
                                     session_owner(request.user.record))
    for session in found:
        session["current"] = session["id"] == request.session_id
    return Response(200, {"sessions": found})


def list_attacks(request):
    """GET /attacks: the classic forgeries of the caller's own token (section 4), for the
    page's "Attack it" panel, which sends each to GET /users/getInfo and shows the answer.

    The few that need a genuine signature are signed with this server's key; each is made
    never to be more than the token it came from (see section 4). The refresh-token attack
    comes without a token: the page holds its refresh token, and sends that.
    """
    genuine = Genuine(bearer_token(request.headers), request.server.key)
    return Response(200, {"target": "GET /users/getInfo", "checks": CHECKS,
                          "messages": MESSAGE_CHECKS,
                          "attacks": [attack_fields(attack, forged(attack, genuine))
                                      for attack in ATTACKS]})


def get_info(request):
    """GET /users/getInfo: the token's user, without password fields."""
    return Response(200, request.user.public_json)


def register(request):
    """POST /users/register (when allowRegistration is on): a new user; 201 with its record."""
    server = request.server
    if server.users.count() >= server.config["maxUsers"]:     # checked again under the lock
        raise users_full()
    fields = read_fields(request)
    username, encoded_password = credentials_from(fields)
    # Every well-formed attempt counts, at its start, against the address's login budget:
    # "taken" tells that a username exists, so a loop probing names gets no more tries than
    # a loop guessing passwords. A malformed body (400) learns nothing and counts nothing:
    # it must not buy an address a place in the limiter's table for free.
    wait = server.limiter.reserve((("address", request.client_address[0]),), time.time())
    if wait:
        raise HTTPError(429, f"Too many attempts from this address; try again in {wait} seconds",
                        headers=(("Retry-After", str(wait)),))
    password, profile = checked_registration(fields, username, encoded_password)
    if server.users.has_name_like(username):                    # saves hashing in vain
        raise username_taken(username)
    with server.hash_slots:             # slow, so before the users file is locked
        password_hash = hash_password(password, server.config["passwordIterations"])
    try:
        record = add_user_record(server.users.path, username, password_hash, profile,
                                 server.config["maxUsers"])
    except UsernameTaken:               # the file has the last word: two sign-ups at once
        raise username_taken(username) from None
    except TooManyUsers:
        raise users_full() from None
    except (ConfigError, OSError) as error:
        server.log(f"sign-up of {username!r} not saved: {error}")
        raise named_error(503, "UsersFileError", "Sign-up is unavailable right now; "
                          "try again shortly", headers=(("Retry-After", "5"),)) from None
    server.users.refresh(force=True)    # the new user can log in with the next request
    return Response(201, public_record(record))


def checked_registration(fields, username, encoded_password):
    """(password, profile fields) from a sign-up's fields, each checked; 400 if one fails."""
    password = decode_password(encoded_password)
    profile = {name: value for name, value in fields.items()
               if name not in ("username", "password")}
    try:
        check_username(username, "sign-up")
        if password is None:
            raise ValueError("password must be base64, as for login")
        check_new_password(password, username)
        check_profile(profile)
    except (ValueError, ConfigError) as error:
        raise named_error(400, "ValidationError", str(error)) from None
    return password, profile


def username_taken(username):
    """409 for a username users.json already has."""
    return named_error(409, "UsernameTakenError", f"username {username!r} is taken")


def users_full():
    """403 once users.json holds maxUsers users: sign-up is closed until an admin acts.

    403, not 507 Insufficient Storage: nothing is out of space, the server's owner set a
    limit; and a 5xx invites clients to retry, which would not help.
    """
    return named_error(403, "TooManyUsersError",
                       "Sign-up is closed: this server has as many users as it takes")


# The page may talk to this server only, and may not be framed by another site: even a
# tampered copy of it could not send a password elsewhere.
PAGE_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
               "img-src data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
               "frame-ancestors 'none'")


def serve_page(request):
    """GET /: test.html, the login page, which then talks to the server it came from."""
    page = request.server.page
    if page is None:
        raise HTTPError(404, "test.html is not next to authserver.py")
    return Response(200, page, headers=(("Content-Security-Policy", PAGE_POLICY),),
                    content_type="text/html; charset=utf-8")


HOST_HEADER = re.compile(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


def serve_openapi(request):
    """GET /openapi.json: the OpenAPI 3.1 document of the routes this server answers."""
    server = request.server
    host = request.headers.get("host", "")
    # The address the client reached us at, so an importer's requests go to the same
    # place; "/" (relative to the document) when Host is absent or odd.
    scheme = "https" if server.tls_context else "http"
    server_url = f"{scheme}://{host}" if HOST_HEADER.fullmatch(host) else "/"
    return Response(200, openapi_document(server.routes, server_url))


ROUTES = {
    ("POST", "/users/authenticate"): authenticate,
    ("GET", "/users/getInfo"): get_info,
    ("POST", "/users/refresh"): refresh,
    ("POST", "/users/logout"): logout,
    ("POST", "/users/logoutAll"): logout_all,
    ("GET", "/users/sessions"): list_sessions,
    ("POST", "/users/register"): register,
    ("GET", "/attacks"): list_attacks,
    ("GET", "/openapi.json"): serve_openapi,
    ("GET", "/"): serve_page,
}
# As in the tutorial, authentication runs before routing; only these paths skip it. A
# refresh token is its own credential: refresh and logout work after the access token expired.
PUBLIC_PATHS = {"/users/authenticate", "/users/refresh", "/users/logout", "/users/register",
                "/openapi.json", "/"}
# Routes that exist only when a setting turns them on. Off, the path is unknown in every
# way: the same 403 / 404 as any unknown path, and no Allow header or OpenAPI names it.
OPTIONAL_ROUTES = {("POST", "/users/register"): "allowRegistration"}


def route_table(config):
    """ROUTES without the optional ones config leaves off: the table a server routes by."""
    actions = {key: action for key, action in ROUTES.items()
               if key not in OPTIONAL_ROUTES or config[OPTIONAL_ROUTES[key]]}
    return RouteTable(actions, PUBLIC_PATHS & {path for _, path in actions})


# -- GET /openapi.json: the routes above, described for Postman, Insomnia and generators --
# Built from ROUTES as the server has them (optional routes only when on), and from
# ROUTE_DOCS below, keyed the same way: a route missing there fails the tests. What every
# route of a kind answers (a token route's 401/403, a POST's 411/413, a body's 415) is added
# by openapi_operation, so it is written once. A test walks a live server through every
# (route, status) listed and checks each body against its schema.

def ref(kind, name):
    return {"$ref": f"#/components/{kind}/{name}"}


BASE64_TEXT = {"type": "string", "contentEncoding": "base64"}
# The tutorial's profile fields, named so that generated clients have them. getInfo may
# show others, which an administrator added to users.json; sign-up takes these only.
PROFILE_TEXT = {name: {"type": "string"} for name in PROFILE_FIELDS}
TIMESTAMP = {"type": "integer", "description": "seconds since 1970-01-01 UTC"}
OPENAPI_SCHEMAS = {
    "Credentials": {
        "type": "object", "required": ["username", "password"],
        "properties": {"username": {"type": "string"},
                       "password": {**BASE64_TEXT, "description": "the password's UTF-8 "
                                    "bytes in base64 (btoa() in a browser)"}}},
    "Registration": {
        "type": "object", "required": ["username", "password"],
        "properties": {
            "username": {"type": "string", "minLength": 1, "maxLength": MAX_USERNAME_CHARS,
                         "description": "any letters; no spaces, control characters or "
                         "characters that print as nothing; taken also in another case or "
                         "width (Alice, ａｌｉｃｅ beside alice); stored in NFC"},
            "password": {**BASE64_TEXT, "description":
                         f"base64, as for login, of {MIN_PASSWORD_CHARS} to "
                         f"{MAX_PASSWORD_CHARS} characters; not one of the most common "
                         f"passwords, not the username; no other rules (NIST SP 800-63B)"},
            **{name: {"type": "string", "maxLength": MAX_PROFILE_CHARS}
               for name in PROFILE_FIELDS}},
        "additionalProperties": False,
        "description": "the profile fields are firstName, lastName and phone; any other "
                       "field is refused (400)"},
    "RefreshRequest": {
        "type": "object", "required": ["refreshToken"],
        "properties": {"refreshToken": {"type": "string"}}},
    "Login": {
        "type": "object", "required": ["token", "expiresIn", "refreshToken", "refreshExpiresIn"],
        "properties": {
            "token": {"type": "string", "description": "the access token, a JWT (HS256)"},
            "expiresIn": {"type": "integer", "description": "its lifetime in seconds"},
            "refreshToken": {"type": "string", "description": "opaque; for /users/refresh "
                             "and /users/logout"},
            "refreshExpiresIn": {"type": "integer", "description": "its lifetime in seconds"}}},
    "User": {
        "type": "object", "required": ["id", "username"],
        "properties": {"id": {"type": ["integer", "string"]}, "username": {"type": "string"},
                       **PROFILE_TEXT},
        "description": "the user's record without its password fields; the other fields are "
                       "the profile (firstName, lastName, phone ...)"},
    "Sessions": {
        "type": "object", "required": ["sessions"],
        "properties": {"sessions": {"type": "array", "items": ref("schemas", "Session")}}},
    "Session": {
        "type": "object",
        "required": ["id", "created", "lastUsed", "expires", "address", "userAgent", "current"],
        "properties": {"id": {"type": "string", "description": "the access token's sid"},
                       "created": TIMESTAMP, "lastUsed": TIMESTAMP, "expires": TIMESTAMP,
                       "address": {"type": "string"}, "userAgent": {"type": "string"},
                       "current": {"type": "boolean", "description": "the session asking"}}},
    "Message": {
        "type": "object", "required": ["message"],
        "properties": {"message": {"type": "string"}}},
    "NamedError": {
        "type": "object", "required": ["error", "name", "message"],
        "properties": {"error": {"enum": [True]}, "name": {"type": "string"},
                       "message": {"type": "string"}}},
    "NoToken": {
        "type": "object", "required": ["error", "message"],
        "properties": {"error": {"enum": [True]}, "message": {"enum": ["No token provided."]}}},
    "Attacks": {
        "type": "object", "required": ["target", "checks", "messages", "attacks"],
        "properties": {
            "target": {"type": "string", "description": "where to send each token"},
            "checks": {"type": "object", "description": "step of decode_token -> what it "
                       "guarantees"},
            "messages": {"type": "object", "description": "a 401's message -> the step that "
                         "sends it"},
            "attacks": {"type": "array", "items": ref("schemas", "Attack")}}},
    "Attack": {
        "type": "object",
        "required": ["name", "tries", "check", "message", "reference", "needs", "token",
                     "header"],
        "properties": {
            "name": {"type": "string"}, "tries": {"type": "string"},
            "check": {"type": "string", "description": "the step that must refuse it"},
            "message": {"type": "string", "description": "the 401's message when it does"},
            "reference": {"type": "string", "description": "the RFC section"},
            "needs": {"type": ["string", "null"], "description": '"refresh token": send '
                      "your own refresh token as the access token (token is null)"},
            "token": {"type": ["string", "null"], "description": "the forged token"},
            "header": {"type": ["string", "null"], "description": "its header, decoded"}}},
    "OpenAPI": {"type": "object", "required": ["openapi", "info", "paths"]},
}
OPENAPI_HEADERS = {
    "Retry-After": {"description": "seconds to wait before trying again",
                    "schema": {"type": "integer"}},
    "WWW-Authenticate": {"description": 'Bearer, with error="invalid_token" on a 401 (RFC 6750)',
                         "schema": {"type": "string"}},
}
OPENAPI_SECURITY = {
    "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
               "description": "Authorization: Bearer <token>"},
    "accessToken": {"type": "apiKey", "in": "header", "name": "x-access-token",
                    "description": "the tutorial's header: x-access-token: <token>"},
}

# route -> summary, the body's schema (sent as JSON or as a form), and what it answers:
# status -> (schema name, "html" or None for no body; when; headers sent with it).
ROUTE_DOCS = {
    ("POST", "/users/authenticate"): {
        "summary": "Log in: an access token and a refresh token (a new session)",
        "body": "Credentials",
        "responses": {
            200: ("Login", "logged in"),
            400: ("Message", "wrong username or password (one answer for both), a password "
                  "that is not base64, or a malformed body"),
            429: ("Message", "too many password checks for this username or address",
                  ["Retry-After"]),
            503: ("NamedError", "the sessions file cannot be written; no token is issued",
                  ["Retry-After"])}},
    ("GET", "/users/getInfo"): {
        "summary": "The token's user",
        "responses": {200: ("User", "the user, without password fields")}},
    ("POST", "/users/refresh"): {
        "summary": "A new token pair for a refresh token, which is spent (rotation)",
        "body": "RefreshRequest",
        "responses": {
            200: ("Login", "renewed; the old refresh token is spent"),
            400: ("Message", "no refreshToken, or a malformed body"),
            401: ("NamedError", "RefreshTokenError: unknown, expired or revoked, or its "
                  "user removed or its password changed since the login (the session ends); "
                  "RefreshTokenReuseError: already spent, so the session is now revoked"),
            503: ("NamedError", "the sessions file cannot be written", ["Retry-After"])}},
    ("POST", "/users/logout"): {
        "summary": "End the refresh token's session (its access tokens stop working)",
        "body": "RefreshRequest",
        "responses": {
            204: (None, "ended, already ended, or never issued (a token of another shape "
                  "too)"),
            400: ("Message", "no refreshToken, or a malformed body"),
            503: ("NamedError", "the sessions file cannot be written", ["Retry-After"])}},
    ("POST", "/users/logoutAll"): {
        "summary": "End every session of the token's user",
        "responses": {204: (None, "all ended")}},
    ("GET", "/users/sessions"): {
        "summary": "The token's user's live sessions, the current one marked",
        "responses": {200: ("Sessions", "oldest first")}},
    ("POST", "/users/register"): {
        "summary": "Sign up (only when the server's allowRegistration is on)",
        "body": "Registration",
        "responses": {
            201: ("User", "the new user, as getInfo will show it; log in next"),
            400: ("Message", "ValidationError: a rule the username, password or a profile "
                  "field breaks (the message says which), or a field that is not firstName, "
                  "lastName or phone; or a malformed body"),
            403: ("NamedError", "TooManyUsersError: the server holds maxUsers users; "
                  "sign-up is closed"),
            409: ("NamedError", "UsernameTakenError: the username is taken"),
            429: ("Message", "too many attempts from this address (each sign-up counts)",
                  ["Retry-After"]),
            503: ("NamedError", "the users file cannot be written", ["Retry-After"])}},
    ("GET", "/attacks"): {
        "summary": "The classic JWT forgeries of your own token, to send to GET "
                   "/users/getInfo and see each refused (the page's Attack it panel)",
        "responses": {200: ("Attacks", "one forged token per attack, and the step that "
                            "must refuse it")}},
    ("GET", "/openapi.json"): {
        "summary": "This document",
        "responses": {200: ("OpenAPI", "OpenAPI 3.1")}},
    ("GET", "/"): {
        "summary": "The login page (test.html)",
        "responses": {200: ("html", "the page"),
                      404: ("Message", "test.html is not beside authserver.py")}},
}
# What every route of a kind can answer besides its own.
TOKEN_ANSWERS = {
    401: ("NamedError", "the token failed verification: JsonWebTokenError (also for a user "
          "no longer in users.json), TokenExpiredError, NotBeforeError, or SessionRevokedError "
          "(logged out or revoked)",
          ["WWW-Authenticate"]),
    403: ("NoToken", "no token sent", ["WWW-Authenticate"]),
    503: ("NamedError", "the sessions file cannot be read", ["Retry-After"]),
}
POST_ANSWERS = {
    411: ("Message", "no Content-Length (chunked bodies are refused)"),
    413: ("Message", "a body larger than the server's maxBodyBytes"),
}
BODY_ANSWERS = {415: ("Message", "a Content-Type other than JSON or form")}

OPENAPI_DESCRIPTION = """\
The API of the Node.js JWT authentication tutorial, with sessions, refresh tokens and sign-up.

Every answer is JSON (the page excepted) and carries `Access-Control-Allow-Origin: *`;
`OPTIONS` on any path is a CORS preflight (204). Errors have the tutorial's shapes:
`{"message"}`, or `{"error": true, "name", "message"}` where a client may act on the name.

Before any route runs, a request itself can be refused, whatever its path, with
`{"message"}`: 400 (bad request line or header), 408 (not sent within the server's
requestTimeout), 411 (a chunked body), 413, 414 (request line over 8 KiB), 417 (an Expect
other than 100-continue), 431 (headers over 16 KiB), 501 (unknown method), 505 (HTTP
version); and 404 / 405 (with `Allow`) for an unknown path or method."""


def openapi_document(routes, server_url):
    """The OpenAPI 3.1 document of routes, as served at server_url."""
    paths = {}
    for (method, path), action in routes.actions.items():
        paths.setdefault(path, {})[method.lower()] = openapi_operation(method, path, action)
    return {"openapi": "3.1.0",
            "info": {"title": "authserver", "version": "1.0",
                     "description": OPENAPI_DESCRIPTION},
            "servers": [{"url": server_url}],
            "paths": paths,
            "components": {"schemas": OPENAPI_SCHEMAS, "headers": OPENAPI_HEADERS,
                           "securitySchemes": OPENAPI_SECURITY}}


def route_answers(method, path):
    """status -> (schema, when, headers...) for every answer of a route, its own and its kind's."""
    doc = ROUTE_DOCS[(method, path)]
    answers = dict(doc["responses"])
    kinds = [(path not in PUBLIC_PATHS, TOKEN_ANSWERS), (method == "POST", POST_ANSWERS),
             ("body" in doc, BODY_ANSWERS)]
    for applies, kind in kinds:
        for status, answer in kind.items():
            if applies:
                answers.setdefault(status, answer)
    return dict(sorted(answers.items()))


def openapi_operation(method, path, action):
    """One operation: its id (the function's name in camelCase), body, answers, security."""
    doc = ROUTE_DOCS[(method, path)]
    first, *rest = action.__name__.split("_")
    operation = {"operationId": first + "".join(word.title() for word in rest),
                 "summary": doc["summary"],
                 "security": ([{"bearer": []}, {"accessToken": []}]
                              if path not in PUBLIC_PATHS else []),
                 "responses": {str(status): openapi_response(*answer)
                               for status, answer in route_answers(method, path).items()}}
    if "body" in doc:
        schema = ref("schemas", doc["body"])
        operation["requestBody"] = {"required": True, "content": {
            "application/json": {"schema": schema},
            "application/x-www-form-urlencoded": {"schema": schema}}}
    return operation


def openapi_response(schema, when, headers=()):
    """A response object: what it means, its body's media type and schema, its headers."""
    response = {"description": when}
    if schema == "html":
        response["content"] = {"text/html": {"schema": {"type": "string"}}}
    elif schema is not None:
        response["content"] = {"application/json": {"schema": ref("schemas", schema)}}
    if headers:
        response["headers"] = {name: ref("headers", name) for name in headers}
    return response


# ---------------------------------------------------------------------------
# 10. The handler: read one request within limits, run the middleware, write once
# ---------------------------------------------------------------------------

KNOWN_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
# An HTTP "token" (RFC 9110 §5.6.2), what a method or a header name is made of; not a JWT.
HTTP_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
HTTP_VERSION = re.compile(r"HTTP/\d\.\d")
BAD_VALUE_CHARS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class ClientGone(ConnectionError):
    """The client closed the connection in the middle of a request."""


class AuthRequestHandler(http.server.BaseHTTPRequestHandler):
    """One connection: requests read by hand so that every byte is bounded and timed."""

    protocol_version = "HTTP/1.1"      # keep-alive: one connection serves many requests
    server_version = SERVER_VERSION
    # Nagle's algorithm holds back a small write until the last one is acknowledged, and
    # the client delays that ACK: 40 ms lost per keep-alive request. We write each
    # response in one piece anyway; this makes sure nothing waits.
    disable_nagle_algorithm = True

    speaks_plain_http = False          # set when plain HTTP arrives on the HTTPS port

    def setup(self):
        """Wrap in TLS here, in the connection's own thread, not in the accept loop."""
        if self.server.tls_context is not None and self.sends_plain_http():
            self.speaks_plain_http = True
        elif self.server.tls_context is not None:
            self.request = self.server.tls_context.wrap_socket(
                self.request, server_side=True, do_handshake_on_connect=False)
            self.server.watch(self.request)
            try:
                self.request.do_handshake()
            except OSError:
                self.request.close()
                raise
            finally:
                self.server.unwatch(self.request)
        super().setup()

    def sends_plain_http(self):
        """Peek at the first byte: a TLS handshake starts with 0x16, an HTTP method with A-Z."""
        self.server.watch(self.request)             # a client that sends nothing is cut off
        try:
            first = self.request.recv(1, socket.MSG_PEEK)
        except OSError:
            return False                            # the handshake will fail and say why
        finally:
            self.server.unwatch(self.request)
        return first.isalpha() and first.isupper()

    def finish(self):
        """Always run, even after an error: forget the connection, close TLS."""
        self.server.unwatch(self.connection)
        super().finish()
        if self.server.tls_context is not None:
            self.request.close()    # socketserver closes only the plain socket TLS took over

    def handle(self):
        """Requests until the connection closes; on the HTTPS port, plain HTTP gets a hint."""
        if self.speaks_plain_http:
            self.answer_plain_http()
        else:
            super().handle()

    def answer_plain_http(self):
        """400 in plain HTTP, which a browser or curl shows, instead of a silent close."""
        self.command, self.route_path = "-", "-"
        self.server.watch(self.connection)
        line = self.rfile.readline(MAX_LINE_BYTES + 1)
        self.started = time.perf_counter()
        try:
            self.read_request(line)         # read it all: closing on unread bytes resets
        except (HTTPError, ClientGone):
            pass
        finally:
            self.server.unwatch(self.connection)
        host = getattr(self, "headers", {}).get("host", "")
        if not HOST_HEADER.fullmatch(host):
            address, port = self.server.server_address[:2]
            host = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
        path = self.route_path if self.route_path.startswith("/") else "/"
        self.close_connection = True
        self.send(Response(400, {"message": f"This port speaks HTTPS: use https://{host}{path}"}))

    def handle_one_request(self):
        """Wait for a request; from its first byte on, it is in flight until answered."""
        self.close_connection = True
        self.command, self.route_path = "-", "-"        # what the log says if reading fails
        server = self.server
        server.watch(self.connection)
        line = self.rfile.readline(MAX_LINE_BYTES + 1)
        if not line:
            server.unwatch(self.connection)
            return                  # the client closed, or sat idle past requestTimeout
        with server.in_flight:
            self.started = time.perf_counter()
            self.send(self.respond(line))

    def respond(self, request_line):
        """Read the rest of the request, run it through the middleware: a Response."""
        try:
            try:
                self.read_request(request_line)
            finally:
                self.server.unwatch(self.connection)
            return run_middleware(self)
        except HTTPError as error:
            return error.response
        except OSError:
            raise                   # the connection broke: handle_error logs one line
        except Exception:
            # Our bug, not the client's: the traceback goes to the log, never to them.
            self.server.log(f"error in {self.command} {self.route_path}:\n"
                            f"{traceback.format_exc()}")
            return Response(500, {"message": "Internal Server Error"})

    # -- reading ------------------------------------------------------------

    def read_request(self, line):
        """Request line, headers, body. Until all are read, the connection will close."""
        if not line.endswith(b"\n"):
            if len(line) > MAX_LINE_BYTES:
                raise HTTPError(414, "Request line too long")
            self.fail_incomplete()
        self.parse_request_line(line)
        self.headers = self.read_headers()
        self.body = self.read_body()
        self.close_connection = self.wants_close()

    def fail_incomplete(self):
        """A request cut short: 408 if we cut it (too slow), else the client left."""
        if self.server.overdue(self.connection):
            raise HTTPError(408, "Request not received in time")
        raise ClientGone("connection closed in the middle of a request")

    def parse_request_line(self, line):
        """ "GET /users/getInfo HTTP/1.1" -> command, path, version."""
        parts = line.rstrip(b"\r\n").decode("latin-1").split(" ")
        if len(parts) != 3:
            raise HTTPError(400, "Bad request line")
        method, target, version = parts
        if version not in ("HTTP/1.1", "HTTP/1.0"):
            if HTTP_VERSION.fullmatch(version):
                raise HTTPError(505, f"HTTP version {version} is not supported")
            raise HTTPError(400, "Bad request line")
        if not HTTP_TOKEN.fullmatch(method):
            raise HTTPError(400, "Bad request line")
        if not target.startswith("/") or not target.isascii() or not target.isprintable():
            raise HTTPError(400, "Bad request target")
        self.command, self.request_version = method, version
        self.route_path = target.partition("?")[0]      # the query string plays no part
        if method not in KNOWN_METHODS:
            raise HTTPError(501, f"Method {method} is not implemented")

    def read_headers(self):
        """Header lines into Headers; bounded in size and count."""
        headers, total = Headers(), 0
        while True:
            line = self.rfile.readline(MAX_HEADER_BYTES + 1 - total)
            total += len(line)
            if total > MAX_HEADER_BYTES or len(headers) > MAX_HEADERS:
                raise HTTPError(431, "Request headers too large")
            if not line.endswith(b"\n"):
                self.fail_incomplete()
            if line in (b"\r\n", b"\n"):
                return headers
            name, colon, value = line.decode("latin-1").partition(":")
            value = value.strip(" \t\r\n")
            # No space before the colon, no folded lines, no control characters: each is
            # a way to make two servers read one request differently (RFC 9112 §5).
            if not colon or not HTTP_TOKEN.fullmatch(name) or BAD_VALUE_CHARS.search(value):
                raise HTTPError(400, "Bad header line")
            name = name.lower()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value

    def read_body(self):
        """Exactly Content-Length bytes, and no more than maxBodyBytes of them."""
        if "transfer-encoding" in self.headers:
            raise HTTPError(411, "Send a Content-Length; chunked bodies are not accepted")
        length_text = self.headers.get("content-length")
        if length_text is None:
            if self.command in ("POST", "PUT", "PATCH"):
                raise HTTPError(411, "Content-Length required")
            return b""
        if not (length_text.isascii() and length_text.isdigit()):
            raise HTTPError(400, "Bad Content-Length")
        digits, limit = length_text.lstrip("0") or "0", self.server.config["maxBodyBytes"]
        # Count the digits before int(): Python refuses to convert more than 4,300 of them.
        if len(digits) > len(str(limit)) or int(digits) > limit:
            raise HTTPError(413, f"Body larger than {limit} bytes")
        length = int(digits)
        expect = self.headers.get("expect", "").lower()
        if expect == "100-continue":
            self.write_in_time(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.server.watch(self.connection)      # the body, within requestTimeout from now
        elif expect:
            raise HTTPError(417, "Only Expect: 100-continue is understood")
        body = self.rfile.read(length)
        if len(body) < length:
            self.fail_incomplete()
        return body

    def wants_close(self):
        """HTTP/1.1 keeps the connection unless told to close; HTTP/1.0 the other way."""
        tokens = {token.strip() for token in self.headers.get("connection", "").lower().split(",")}
        if self.request_version == "HTTP/1.0":
            return "keep-alive" not in tokens
        return "close" in tokens

    # -- writing ------------------------------------------------------------

    def send(self, response):
        """One log line, then the response's bytes in one write."""
        now = time.time()
        if self.server.stopping:
            self.close_connection = True
        if self.close_connection:
            connection = "close"            # say so, or clients see a read error
        else:
            connection = "keep-alive" if self.request_version == "HTTP/1.0" else ""
        data = response_bytes(response, now, connection, head=self.command == "HEAD")
        # Log first, so the line is written by the time the client has its answer.
        self.server.log_request(self, response.status, now)
        self.write_in_time(data)

    def write_in_time(self, data):
        """Write data within requestTimeout, or fail: a client that does not read holds no thread.

        A socket timeout would not do: it restarts whenever the client reads a byte.
        """
        server = self.server
        server.watch(self.connection, socket.SHUT_RDWR)
        try:
            self.wfile.write(data)
        except OSError:
            if server.overdue(self.connection):
                raise ClientGone("response not taken in time") from None
            raise
        finally:
            server.unwatch(self.connection)


# ---------------------------------------------------------------------------
# 11. The server: connections, caps, slow clients, stopping
# ---------------------------------------------------------------------------

class InFlight:
    """Counts requests being answered, so a stop can wait for them to finish."""

    def __init__(self):
        self.count = 0
        self.changed = threading.Condition()

    def __enter__(self):
        with self.changed:
            self.count += 1

    def __exit__(self, *exc_info):
        with self.changed:
            self.count -= 1
            self.changed.notify_all()

    def wait_idle(self, timeout):
        with self.changed:
            return self.changed.wait_for(lambda: self.count == 0, timeout)


class ConnectionSlots:
    """Connections open now, in all and per client address, within the caps.

    Besides the two caps, two shares, so that no flood takes every slot:
    - one address holds at most half of all slots, whatever maxConnectionsPerAddress says
      (the open-file limit may have lowered the total below it);
    - the last fifth of the slots is kept for newcomers, addresses holding fewer than
      NEWCOMER_CONNECTIONS. A class behind one NAT may need its ~300, so the per-address
      cap cannot be small; but then two flooding addresses (a laptop's IPv4 and IPv6, two
      phones) would fill 600 slots, and a third address must still get in.
    """

    NEWCOMER_CONNECTIONS = 8            # a browser's 6, and some to spare

    def __init__(self, most, most_per_address):
        self.most = most
        self.most_per_address = max(1, min(most_per_address, most // 2))
        reserved = most // 5
        self.open_to_all = most - reserved
        # With few slots the reserve is small: a newcomer may take half of it at most.
        self.newcomer_below = min(self.NEWCOMER_CONNECTIONS, max(1, reserved // 2))
        self.total = 0
        self.per_address = {}            # only addresses with a connection open: bounded
        self.lock = threading.Lock()

    def take(self, address):
        """A slot for a new connection from address: None if taken, else why not."""
        with self.lock:
            held = self.per_address.get(address, 0)
            if self.total >= self.most:
                return "Server busy: too many connections; try again in a moment"
            if held >= self.most_per_address or (self.total >= self.open_to_all
                                                 and held >= self.newcomer_below):
                return "Too many connections from your address; try again in a moment"
            self.total += 1
            self.per_address[address] = self.per_address.get(address, 0) + 1
            return None

    def release(self, address):
        with self.lock:
            self.total -= 1
            left = self.per_address.pop(address) - 1
            if left:
                self.per_address[address] = left


# What a connection beyond a cap gets, written whole by the accept loop itself. Retry-After
# is short because slots free up fast: every connection's reads and writes are timed.
BUSY_RETRY_SECONDS = 1
# accept() failing for want of a resource (files, buffers, memory): the listening socket
# stays readable, so retrying at once would spin. These back off instead.
ACCEPT_SHORTAGES = {getattr(errno, name) for name in ("EMFILE", "ENFILE", "ENOBUFS", "ENOMEM")
                    if hasattr(errno, name)}
ACCEPT_BACKOFF_SECONDS = (0.01, 0.5)        # first wait, longest wait (doubling between)
# Open files kept for all but connections: the listening socket, the log, the users file...
SPARE_FILES = 64


def connections_files_allow(wanted, log):
    """wanted, or fewer if the open-file limit (ulimit -n) is too low and cannot be raised.

    Running out of files first would leave new clients waiting in the listen backlog for
    an idle connection to time out; a cap that fits answers them 503 at once.
    """
    if resource is None:
        return wanted
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = wanted + SPARE_FILES
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return wanted
    try:                            # a process may raise its own soft limit up to the hard one
        raised = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
        soft = raised
    except (ValueError, OSError):
        pass
    fitting = max(soft - SPARE_FILES, 1)
    if fitting < wanted:
        log(f"open files limited to {soft} (ulimit -n): at most {fitting} connections")
    return min(wanted, fitting)


class AuthServer(http.server.ThreadingHTTPServer):
    """A thread per connection, within caps, plus one watchman that cuts off slow clients."""

    daemon_threads = True
    request_queue_size = 1024       # the default of 5 drops connections in a burst
    allow_reuse_port = False        # a taken port must be an error, not a shared one

    def __init__(self, address, config, users, key, tls_context=None, log_stream=None):
        self.config, self.users, self.key, self.tls_context = config, users, key, tls_context
        self.log_stream = log_stream if log_stream is not None else sys.stderr
        self.routes = route_table(config)
        self.claim_checks = claim_checks(config)      # what require_token asks of claims
        self.limiter = LoginLimiter({"user": config["loginAttempts"],
                                     "address": config["addressLoginAttempts"]},
                                    config["loginWindow"])
        # One password hash per CPU at a time: a burst of logins waits its turn instead of
        # taking every core from the requests behind it.
        self.hash_slots = threading.BoundedSemaphore(os.cpu_count() or 1)
        page = HERE / "test.html"
        self.page = page.read_bytes() if page.exists() else None
        self.deadlines = {}              # connection -> (monotonic deadline, how to cut it)
        most = connections_files_allow(config["maxConnections"], self.log)
        self.connections = ConnectionSlots(most, config["maxConnectionsPerAddress"])
        self.accept_backoff = 0.0        # seconds to wait after accept() fails for want of files
        self.in_flight = InFlight()
        self.stopping = False
        self.stopped = threading.Event()
        self.sessions = None             # make_server sets it
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, AuthRequestHandler)
        threading.Thread(target=self.cut_off_slow_clients, daemon=True).start()

    def server_close(self):
        super().server_close()
        if getattr(self, "sessions", None) is not None:
            self.sessions.close()

    def server_bind(self):
        # http.server looks up the host's full DNS name here, which can take seconds.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    # -- accepting, within the caps -----------------------------------------------

    def get_request(self):
        """accept(); when the system runs out of files or memory, wait a little, say it once."""
        try:
            accepted = super().get_request()
        except OSError as error:
            if error.errno not in ACCEPT_SHORTAGES:
                raise                       # e.g. a client gone before accept: nothing to wait for
            first, longest = ACCEPT_BACKOFF_SECONDS
            if not self.accept_backoff:
                self.log(f"cannot accept connections ({error.strerror or error}); "
                         f"waiting until some close")
            self.accept_backoff = min(self.accept_backoff * 2 or first, longest)
            time.sleep(self.accept_backoff)
            raise
        self.accept_backoff = 0.0
        return accepted

    def process_request(self, request, client_address):
        """Give the connection a thread if a slot is free; else a 503 and close.

        This replaces ThreadingMixIn's: its threads are daemons, which it does not keep
        (Python 3.9-3.13 alike), and stop() waits for requests in flight, not for threads.
        """
        address = client_address[0]
        refusal = self.connections.take(address)
        if refusal is not None:
            self.refuse_connection(request, refusal)
            return
        thread = threading.Thread(target=self.process_request_thread,
                                  args=(request, client_address), daemon=True)
        try:
            thread.start()
        except RuntimeError as error:           # "can't start new thread"
            self.connections.release(address)
            self.log(f"{address} connection refused: {error}")
            self.shutdown_request(request)

    def process_request_thread(self, request, client_address):
        """The connection's thread; however it ends, its slot is given back."""
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.release(client_address[0])

    def refuse_connection(self, request, message):
        """A 503 in one non-blocking send, then close: the accept loop never waits on a client.

        On an HTTPS port the client expects a TLS handshake first, which would take time
        here, so it is simply closed.
        """
        if self.tls_context is None:
            busy = Response(503, {"message": message},
                            headers=(("Retry-After", str(BUSY_RETRY_SECONDS)),))
            try:
                request.setblocking(False)
                request.send(response_bytes(busy, time.time(), "close"))
                request.shutdown(socket.SHUT_WR)
                request.recv(65536)          # what the client sent already: closing on
            except OSError:                  # unread bytes would reset the connection
                pass
        self.shutdown_request(request)

    # -- slow clients ---------------------------------------------------------

    def watch(self, connection, cut=socket.SHUT_RD):
        """The client has requestTimeout seconds to send the next request, whole.

        Also used for writing, with cut=SHUT_RDWR: then the client has as long to take
        in a whole response, and a write it leaves blocked fails when that time is up.
        """
        self.deadlines[connection] = (time.monotonic() + self.config["requestTimeout"], cut)

    def unwatch(self, connection):
        self.deadlines.pop(connection, None)

    def overdue(self, connection):
        deadline, _ = self.deadlines.get(connection, (None, None))
        return deadline is not None and time.monotonic() >= deadline

    def cut_off_slow_clients(self):
        """Shut connections past their deadline; between times, look at the users file.

        A per-read socket timeout is not enough: a client sending one byte every few
        seconds (slowloris) never trips it. Shutting down the read side wakes the
        handler's blocked read with end-of-file; it then answers 408 and closes. A
        client that does not read its answers is shut both ways: the blocked write fails.
        """
        interval = min(0.25, self.config["requestTimeout"] / 4) or 0.05
        while not self.stopped.wait(interval):
            now = time.monotonic()
            for connection, (deadline, cut) in list(self.deadlines.items()):
                if deadline <= now:
                    try:
                        socket.socket.shutdown(connection, cut)
                    except OSError:
                        pass
            self.notice_users_file()

    def notice_users_file(self):
        """An idle server notices an edited users file too (refresh checks once a second)."""
        try:
            self.users.refresh()
            if self.sessions is not None and self.sessions.stale_names:
                self.end_stale_sessions()           # the last try found the file busy
        except Exception:                # the watchman must live on: our bug, logged
            self.log(f"error checking the users file:\n{traceback.format_exc()}")

    def end_stale_sessions(self, names=()):
        """End the sessions of these users that users.json no longer backs (a user gone, a
        name given to another, a password changed), in every process that notices: a
        login with the old password in the second before the reload is ended too."""
        try:
            ended = self.sessions.end_stale(self.users.tables.by_name, names)
        except SessionStoreError as error:
            self.log(f"sessions of changed users not ended yet, trying again: {error}")
            return
        if ended:
            self.log(f"{ended} session(s) ended: their user is gone or has a new password")

    # -- logging ------------------------------------------------------------------

    def log(self, message):
        self.log_stream.write(f"{log_time(int(time.time()))} {message}\n")
        self.log_stream.flush()

    def log_request(self, handler, status, now):
        """One line a request: no body, no token, no Authorization header, no query."""
        if self.config["accessLog"]:
            elapsed = (time.perf_counter() - handler.started) * 1000
            self.log_stream.write(f"{log_time(int(now))} {handler.client_address[0]} "
                                  f"{handler.command} {handler.route_path} {status} "
                                  f"{elapsed:.1f}ms\n")

    def handle_error(self, request, client_address):
        """A client's broken connection is one line; anything else is our bug: traceback."""
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            self.log(f"{client_address[0]} connection ended: {error.__class__.__name__}: {error}")
        else:
            self.log(f"error with {client_address[0]}:\n{traceback.format_exc()}")

    # -- stopping -------------------------------------------------------------------

    def stop(self):
        """Stop accepting, let requests in flight finish (up to shutdownGrace), close."""
        self.stopping = True
        self.socket.close()
        busy = self.in_flight.count
        if busy:
            self.log(f"stopping: waiting for {busy} request(s) in flight")
        self.in_flight.wait_idle(self.config["shutdownGrace"])
        self.stopped.set()
        self.server_close()


def make_server(config_path=None, users_path=None, host=None, port=None,
                tls_context=None, log_stream=None):
    """Load config, secret and users, and bind a server (not yet serving)."""
    config = load_config(config_path or CONFIG_FILE)
    key = load_secret(config)
    users = UserStore(users_path or USERS_FILE)
    try:
        if temporaries_of(users.path):          # left by a writer that was killed: the lock
            with file_lock(users.path):         # tells them from a live writer's
                remove_stale_temporaries(users.path)
    except OSError:
        pass                # a read-only folder: then nobody can have left anything there
    sessions = open_sessions(config, key)
    host = config["host"] if host is None else host
    port = config["port"] if port is None else checked_number(port, "port", "--port")
    try:
        server = AuthServer((host, port), config, users, key, tls_context, log_stream)
    except OSError as error:
        sessions.close()
        raise ConfigError(f"cannot listen on {host} port {port}: {error.strerror or error}") from None
    users.log = server.log          # reloads are worth a line in the server's log
    server.sessions = sessions
    sessions.log = server.log
    users.on_change = server.end_stale_sessions
    # users.json may have changed while no server was running.
    try:
        server.end_stale_sessions(sessions.usernames())
    except SessionStoreError as error:
        server.log(f"sessions file {sessions.path}: {error}")
    return server


def sessions_path(config):
    """sessionsFile, beside the config file."""
    return config["path"].parent / config["sessionsFile"]


def open_sessions(config, key=None):
    """The SessionStore in sessionsFile, beside the config file; ConfigError if unusable.

    key: the server's secret, which sealing needs (the CLI's stores end sessions only)."""
    return SessionStore(sessions_path(config),
                        config["refreshTokenLifetime"], config["maxSessionsPerUser"],
                        config["refreshGrace"], key=key)


def make_tls_context(cert_file, key_file):
    """A server-side TLS context (TLS 1.2 or newer) from PEM files."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(f"TLS certificate {cert_file} / key {key_file}: {error}") from None
    return context


# ---------------------------------------------------------------------------
# 12. Command line: serving, users, sessions
# ---------------------------------------------------------------------------

def lan_addresses():
    """This machine's IPv4 addresses that other devices on the LAN can reach."""
    found = set()
    try:
        found.update(info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None,
                                                                socket.AF_INET))
    except OSError:
        pass
    try:
        # connect() on a UDP socket sends nothing; it only asks the kernel which local
        # address it would use for the default route (192.0.2.1 is a documentation address).
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))
            found.add(probe.getsockname()[0])
    except OSError:
        pass
    return sorted(address for address in found if not address.startswith(("127.", "0.")))


def server_urls(server, scheme):
    """Every URL the server answers at, for the start-up banner."""
    host, port = server.server_address[:2]
    if host in ("0.0.0.0", "::"):
        urls = [f"{scheme}://127.0.0.1:{port}"]
        urls += [f"{scheme}://{address}:{port}  (LAN)" for address in lan_addresses()]
        urls.append(f"{scheme}://10.0.2.2:{port}  (from the Android emulator)")
        return urls
    return [f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"]


def serve(args):
    """python authserver.py: serve until Ctrl-C or SIGTERM."""
    tls_context = None
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    if args.tls_cert:
        tls_context = make_tls_context(args.tls_cert, args.tls_key)
    server = make_server(args.config, args.users, args.host, args.port, tls_context)
    stop_signals, reload_signals = [], []

    def request_stop(signum, frame):
        signal.signal(signum, signal.SIG_DFL)     # pressed twice: stop at once
        stop_signals.append(signum)               # no lock taken: see the loop below

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, lambda signum, frame: reload_signals.append(signum))
    # Python runs signal handlers in the main thread, so the accept loop gets a thread of its
    # own: an exception raised inside socketserver while it hands a connection to its thread
    # would make it close that connection under the request being answered on it.
    accepting = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5})
    accepting.start()
    # The banner comes last: whoever reads it may stop us at once, and that is handled now.
    scheme = "https" if tls_context else "http"
    print("authserver listening on:", *server_urls(server, scheme), sep="\n  ", flush=True)
    print("Ctrl-C to stop.", flush=True)
    # Sleep rather than wait on a lock: the handler runs in this thread between two steps,
    # and a lock this thread held at that moment would deadlock it.
    while not stop_signals:
        time.sleep(0.2)
        if reload_signals:
            reload_signals.clear()
            server.users.refresh(force=True)
    server.shutdown()                         # the accept loop ends ...
    accepting.join()
    server.stop()                             # ... then requests in flight finish
    print("authserver stopped.", flush=True)
    return 0


# -- managing users -----------------------------------------------------------

def read_password(stdin=None, prompt="New password: ", repeat="Repeat it: "):
    """From the terminal with getpass (asked twice, unless repeat is None), or one line from
    stdin for scripts."""
    stdin = stdin or sys.stdin
    try:
        if stdin.isatty():
            password = getpass.getpass(prompt)
            if repeat and getpass.getpass(repeat) != password:
                raise ConfigError("the two passwords differ")
        else:
            line = stdin.readline()
            if not line:
                raise EOFError
            password = line.rstrip("\r\n")
    except EOFError:                    # Ctrl-D at the prompt, or nothing piped in
        if stdin.isatty():
            print(file=sys.stderr)      # getpass left the cursor after its prompt
        raise ConfigError("no password given (end of input)") from None
    if not password:
        raise ConfigError("empty password refused")
    return password


def add_user(args):
    """python authserver.py adduser NAME: a new user with a hashed password."""
    username = args.username                                    # in NFC: username_argument
    check_username(username, "adduser")
    path = args.users
    refuse_taken(read_users_list(path), username, path)         # say so before the prompt
    password_hash = hash_password(read_password(),
                                  load_config(args.config)["passwordIterations"])
    fields = {field: value for field, value in (("firstName", args.first_name),
                                                ("lastName", args.last_name),
                                                ("phone", args.phone)) if value is not None}
    record = add_user_record(path, username, password_hash, fields)
    print(f"added user {username!r} (id {record['id']}) to {path}")
    say_a_server_picks_it_up(path)
    return 0


def change_password(args):
    """python authserver.py passwd NAME: a new password hash, every other field kept."""
    path = args.users
    find_user_record(read_users_list(path), args.username, path)     # before the prompt
    config = load_config(args.config)
    with contextlib.closing(open_sessions(config)) as sessions:
        password_hash = hash_password(read_password(), config["passwordIterations"])

        def set_hash(users):
            user = find_user_record(users, args.username, path)
            user.pop("password", None)
            user["passwordHash"] = password_hash

        update_users_file(path, set_hash)
        # Whoever was logged in with the old password is logged out: often why it changed.
        ended = end_sessions(sessions, args.username)
    print(f"password changed for {args.username!r} in {path}; {ended} session(s) revoked")
    say_a_server_picks_it_up(path)
    return 0


def say_a_server_picks_it_up(path):
    """Whoever changes users.json beside a running server wonders whether to restart it."""
    # No: its watchman looks at the file every second (UserStore.refresh), idle or not.
    print(f"A server running with {path} picks this up within a second.")


# -- sessions -------------------------------------------------------------------

@contextlib.contextmanager
def sessions_file_errors(sessions):
    """with sessions_file_errors(store): a failing sessions file is a one-line ConfigError."""
    try:
        yield sessions
    except SessionStoreError as error:
        raise ConfigError(f"sessions file {sessions.path}: {error}") from None


def end_sessions(sessions, username, session_id=None):
    """Revoke a user's sessions (or one) from the command line; ConfigError if the file fails."""
    with sessions_file_errors(sessions):
        return sessions.end_for_user(username, session_id)


def named_user(args):
    """The User args.username names in the users file; ConfigError if there is none."""
    users = UserStore(args.users)
    user = users.find_by_name(args.username)[0]
    if user is None:
        raise ConfigError(f"no user {args.username!r} in {users.path}")
    return user


def sessions_for_command(args):
    """The SessionStore, for a user in the users file or a name with sessions left (a user
    removed from the file, whose sessions the admin cleans up); ConfigError if neither."""
    users = UserStore(args.users)
    sessions = open_sessions(load_config(args.config))
    try:
        with sessions_file_errors(sessions):
            known = (users.find_by_name(args.username)[0] is not None
                     or args.username in sessions.usernames())
        if not known:
            raise ConfigError(f"no user {args.username!r} in {users.path}, and no sessions")
    except ConfigError:
        sessions.close()
        raise
    return sessions


def printable(text):
    """text with anything a terminal might obey (escape sequences) shown as escapes."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def list_sessions_command(args):
    """python authserver.py sessions NAME: the user's live sessions."""
    with contextlib.closing(sessions_for_command(args)) as sessions:
        with sessions_file_errors(sessions):
            found = sessions.sessions_of(args.username, time.time())
    if not found:
        print(f"no live sessions for {args.username!r}")
    for session in found:
        # The User-Agent is whatever the client sent: escapes, not terminal controls.
        print(f"{session['id']}  created {log_time(session['created'])}  "
              f"last used {log_time(session['lastUsed'])}  expires {log_time(session['expires'])}  "
              f"{session['address'] or '-'}  {printable(session['userAgent']) or '-'}")
    return 0


def revoke_command(args):
    """python authserver.py revoke NAME [SESSION]: end all the user's sessions, or one."""
    with contextlib.closing(sessions_for_command(args)) as sessions:
        ended = end_sessions(sessions, args.username, args.session)
    if args.session and not ended:
        raise ConfigError(f"no session {args.session!r} for user {args.username!r}")
    print(f"{ended} session(s) of {args.username!r} revoked; their access tokens are refused "
          f"within a second")
    return 0


# ---------------------------------------------------------------------------
# 13. Teaching: the token, explain and attack commands
# ---------------------------------------------------------------------------

def issue_token(args):
    """python authserver.py token NAME: a token exactly as a login would return it."""
    config = load_config(args.config)
    claims = login_claims(config, named_user(args).record, time.time())
    print(encode_token(claims, load_secret(config)))
    return 0


class Narrator:
    """Prints explain's steps, in colour on a terminal unless NO_COLOR is set."""

    COLOURS = {"ok": "32", "fail": "31", "header": "35", "payload": "36", "signature": "33",
               "dim": "2", "bold": "1"}

    def __init__(self, stream):
        self.stream = stream
        self.colour = stream.isatty() and not os.environ.get("NO_COLOR")
        self.after_failure = []         # lines a failed step leaves to say after its FAIL

    def paint(self, text, style):
        return f"\033[{self.COLOURS[style]}m{text}\033[0m" if self.colour else text

    def say(self, text=""):
        print(text, file=self.stream)

    def step(self, number, title):
        self.say()
        self.say(self.paint(f"{number}. {title}", "bold"))

    def check(self, passed, text):
        mark = self.paint("ok  ", "ok") if passed else self.paint("FAIL", "fail")
        self.say(f"   {mark} {text}")


def claims_lines(claims, now):
    """The claims as JSON, then iat, nbf and exp as dates: what step 4 shows."""
    lines = [f"   {printable(COMPACT_JSON.encode(claims))}"]
    return lines + [f"   {describe_time(name, claims[name], now)}"
                    for name in ("iat", "nbf", "exp") if name in claims]


def untrusted_payload_lines(payload_segment, now, narrator):
    """The payload of a token refused at its header or signature: readable, but not trusted."""
    warning = narrator.paint("Readable, but not trusted:", "fail")
    try:
        claims = parse_json_object(b64url_decode(payload_segment))
    except ValueError:
        return ["", f"   {warning} (the payload is not even base64url JSON: nothing to read)"]
    return ["", f"   {warning} the payload is only base64url (encoded, not encrypted),",
            "   and without a valid signature anyone could have written it:"
            ] + claims_lines(claims, now)


def describe_time(name, value, now):
    """ "exp 1700003600 = 2023-11-14 23:13:20 UTC (in 59m 12s)"."""
    if not is_number(value):
        return f"{name} {value!r} (not a number)"
    try:
        when = datetime.fromtimestamp(value, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, ValueError, OSError):
        return f"{name} {value} (beyond any calendar date)"
    delta = int(value - now)
    span = f"{abs(delta) // 3600}h {abs(delta) % 3600 // 60}m {abs(delta) % 60}s"
    return f"{name} {value} = {when} ({'in ' + span if delta > 0 else span + ' ago'})"


def explain_steps(token, key, config, users, narrator, now):
    """Run decode_token's five steps one by one, then find the user, as require_token does."""
    narrator.step(1, "Split at the dots: header.payload.signature  (split_token)")
    try:
        header_segment, payload_segment, signature_segment = split_token(token)
    except TokenError:
        narrator.after_failure = [f"   {line}" for line in malformed_reasons(token)]
        raise
    for part, segment in (("header", header_segment), ("payload", payload_segment),
                          ("signature", signature_segment)):
        narrator.say(f"   {part:<10}{narrator.paint(segment or '(empty)', part)}")
    narrator.check(True, f"3 segments of base64url, {len(token)} characters")
    # The lesson of a refused header or a failed signature: the claims were never secret,
    # only unproven. Until the signature checks out, a failure shows them so.
    narrator.after_failure = untrusted_payload_lines(payload_segment, now, narrator)

    narrator.step(2, "Decode the header: base64url -> JSON  (read_header)")
    try:
        header_text = b64url_decode(header_segment).decode("utf-8", "replace")
        # A hostile token must not reach the terminal's control sequences.
        narrator.say("   " + printable(header_text))
    except ValueError:
        narrator.say("   (not base64url)")
    read_header(header_segment)
    narrator.check(True, 'alg is "HS256", the only algorithm this server accepts; no "crit"')

    narrator.step(3, "Recompute the signature  (check_signature)")
    signing_input = f"{header_segment}.{payload_segment}".encode("ascii")
    narrator.say(f"   signing input = header + \".\" + payload ({len(signing_input)} bytes):")
    narrator.say(f"   {narrator.paint(header_segment, 'header')}."
                 f"{narrator.paint(payload_segment, 'payload')}")
    computed = b64url_encode(sign(signing_input, key))
    narrator.say(f"   HMAC-SHA256(secret, signing input), base64url:")
    narrator.say(f"   computed  {narrator.paint(computed, 'signature')}")
    narrator.say(f"   presented {narrator.paint(signature_segment or '(empty)', 'signature')}")
    check_signature(signing_input, signature_segment, key)
    narrator.check(True, "they match (hmac.compare_digest, constant time)")
    narrator.after_failure = []

    narrator.step(4, "Decode the payload: base64url -> JSON  (read_payload)")
    claims = read_payload(payload_segment)
    for line in claims_lines(claims, now):
        narrator.say(line)

    narrator.step(5, f"Check the claims at {int(now)}, leeway {config['leeway']}s  (check_claims)")
    check_claims(claims, now, **claim_checks(config))
    narrator.check(True, "not before nbf or iat, not after exp")

    shown = os.path.relpath(users.path) if users.path.is_relative_to(Path.cwd()) else users.path
    narrator.step(6, f"Find the user in {shown}  (require_token)")
    users.user_for(claims)
    narrator.check(True, f"id {claims['id']!r} is user {claims['username']!r}")
    explain_session(claims, config, narrator)


def explain_session(claims, config, narrator):
    """Step 7: a token that names a session is good only while the session lives."""
    narrator.step(7, "Is the session still live?  (check_session)")
    if "sid" not in claims:
        narrator.say("   no sid: a token without a session (made by the token command, or "
                     "before sessions existed)")
        narrator.check(True, "nothing to revoke it by: it is good until its exp")
        return
    narrator.say(f"   sid {claims['sid']!r}, looked up in {config['sessionsFile']}")
    if not isinstance(claims["sid"], str):
        raise TokenError("invalid sid value")
    with sessions_to_read(config) as connection:
        live = connection is not None and connection.execute(
            "SELECT 1 FROM sessions WHERE id = ? AND expires > ?",
            (claims["sid"], time.time())).fetchone()
    if not live:
        raise SessionRevokedError("session revoked")
    narrator.check(True, "the session is live: nobody logged it out or revoked it")


@contextlib.contextmanager
def sessions_to_read(config):
    """A read-only connection to the sessions file (None if there is none): explain looks,
    and never creates or changes the server's state."""
    path = sessions_path(config)
    if not path.exists():
        yield None
        return
    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro",
                                                uri=True)) as connection:
            yield connection
    except sqlite3.Error as error:
        raise ConfigError(f"sessions file {path}: {error}") from None


def explain_refresh_token(token, config, users, narrator):
    """What a refresh token is, and whether this server's database knows it."""
    narrator.step(1, "This is a refresh token, not a JWT")
    narrator.say("   43 base64url characters = 32 random bytes from secrets. No header, no")
    narrator.say("   claims, no signature: nothing in it can be read or checked on its own.")
    narrator.say("   It means something only to the server that keeps its SHA-256 in the")
    narrator.say("   sessions file, which is exactly what makes it revocable: delete the")
    narrator.say("   row and it is worthless. A JWT, checked by its signature alone, cannot be.")
    narrator.step(2, f"Look up its SHA-256 in {config['sessionsFile']}  (SessionStore.renew)")
    digest = refresh_token_hash(token)
    narrator.say(f"   sha256 {digest.hex()}")
    unknown = RefreshTokenError("refresh token not recognised (revoked or never issued)")
    now = time.time()
    with sessions_to_read(config) as connection:
        if connection is None:
            narrator.say(f"   there is no {config['sessionsFile']} yet: no sessions at all")
            raise unknown
        row = connection.execute("SELECT id, username, expires, user_id, fingerprint "
                                 "FROM sessions WHERE refresh_hash = ?", (digest,)).fetchone()
        rotated = connection.execute("SELECT rotated_at FROM sessions WHERE previous_hash = ? "
                                     "AND sealed_successor IS NOT NULL", (digest,)).fetchone()
        spent = connection.execute("SELECT 1 FROM spent WHERE hash = ?", (digest,)).fetchone()
    if row is None and rotated is not None and now - rotated[0] < config["refreshGrace"]:
        narrator.check(True, f"spent {now - rotated[0]:.1f}s ago, within the grace "
                             f"(refreshGrace {config['refreshGrace']}s)")
        return ("Verdict: spent within the grace. POST /users/refresh answers 200 with the "
                "same new pair again; after the grace, presenting it revokes its session.")
    if row is None:
        raise (RefreshTokenReuseError("refresh token already used: presenting it revokes "
                                      "its session") if spent else unknown)
    if row[2] <= now:
        raise RefreshTokenError("refresh token expired; log in again")
    refusal = owner_refusal(users.find_by_name(row[1])[0], row[3:5])
    if refusal is not None:             # the server ends such a session when it sees it
        raise refusal
    narrator.check(True, f"the current refresh token of session {row[0]!r}, user {row[1]!r}; "
                         f"{describe_time('expires', int(row[2]), now)}")
    return "Verdict: valid. POST /users/refresh would renew it (and spend it)."


# What devtools and curl show is the whole header line, and that is what gets copied.
PASTED_HEADER = re.compile(
    r"(authorization\s*:\s*bearer\s+|bearer\s+|x-access-token\s*:\s*)(.*)", re.I | re.S)
SINGLE_QUOTED = re.compile(r"'(.+)'", re.S)


def unquoted(text):
    """The text inside the quotes of a JSON string or member copied whole, or None.

    "eyJ…", "token": "eyJ…", and a whole {"token": "eyJ…", ...} (the token member, or the
    only one), as a login answer or a script holds them; also 'eyJ…' from code or a shell.
    """
    for candidate in (text, "{" + text.rstrip(",") + "}"):
        try:
            value = json.loads(candidate, strict=False)     # a line break inside: wrapped
        except ValueError:
            continue
        if isinstance(value, dict):
            value = value.get("token", next(iter(value.values())) if len(value) == 1 else None)
        return value.strip() if isinstance(value, str) and value.strip() else None
    quoted = SINGLE_QUOTED.fullmatch(text)
    return quoted.group(1).strip() if quoted else None


def unwrap_pasted(text):
    """(token, notes): text without what copying added around and inside a token.

    A teaching tool should teach rather than stop, so explain takes these off and says so,
    as a teacher would: quotes and whitespace are never part of a token, nor is a header's
    name, so what is left is exactly the token that was copied. The server itself still
    refuses the text as pasted (jwt malformed): guessing is for the teacher, not the lock.
    """
    notes = []
    inside = unquoted(text)
    if inside is not None:
        text = inside
        notes.append("Note: this looks copied with its quotes (from JSON or code); the token "
                     "is what is between them.")
    pasted = PASTED_HEADER.fullmatch(text)
    if pasted:
        text = pasted.group(2).strip()
        after = "x-access-token: " if pasted.group(1).lower().startswith("x") else "Bearer "
        notes.append(f"Note: this looks like a whole header; the token is the part after "
                     f"'{after}'.")
    if any(char.isspace() for char in text):
        text = "".join(text.split())
        notes.append("Note: the token has a line break or space inside (a terminal wraps long "
                     "lines when copying); explaining it without them.")
    if notes:
        notes.append("      (Sent as pasted, it is refused: jwt malformed.)")
    return text, notes


SEGMENT_NAMES = ("header", "payload", "signature")
SEGMENT_COUNT_HINTS = {
    1: "a JWT has a dot between each of its parts: this text has none",
    2: "the signature is missing: was the token cut short when it was copied?",
    5: "5 segments is an encrypted JWT (JWE), which this server neither makes nor reads",
}
CHARACTER_HINTS = {
    **dict.fromkeys("\"'", "a quote is not part of a token: copy what is between the quotes"),
    **dict.fromkeys("+/", "+ and / belong to plain base64; base64url uses - and _ instead"),
    "=": "'=' is base64 padding, which a JWT leaves out (RFC 7515 §2)",
}


def malformed_reasons(token):
    """Why split_token refuses token: its length, its segments, its first foreign character."""
    if len(token) > MAX_TOKEN_BYTES:
        return [f"why: {len(token)} characters, longer than the {MAX_TOKEN_BYTES} this server "
                f"reads of a token"]
    reasons, segments = [], token.split(".")
    if len(segments) != 3:
        dots = len(segments) - 1
        counted = "no dot" if dots == 0 else f"{dots} dot" + ("s" if dots > 1 else "")
        reasons.append(f"why: {len(segments)} segment{'s' if dots else ''} ({counted}); "
                       f"a JWT has 3: header.payload.signature")
        reasons.append("hint: " + SEGMENT_COUNT_HINTS.get(
            len(segments), "more than 2 dots: two tokens run together, or text after one?"))
    foreign = next((at for at, char in enumerate(token)
                    if char != "." and char not in BASE64URL_ALPHABET), None)
    if foreign is not None:
        char, segment = token[foreign], token.count(".", 0, foreign)
        where = SEGMENT_NAMES[segment] if segment < 3 else f"segment {segment + 1}"
        reasons.append(f"why: character {foreign + 1} of {len(token)}, {printable(repr(char))}, "
                       f"in the {where}, is not base64url (A-Z a-z 0-9 - _)")
        if char in CHARACTER_HINTS or char.isspace():
            reasons.append("hint: " + CHARACTER_HINTS.get(
                char, "a space or line break: the token was wrapped; join its lines"))
    elif len(segments) == 3:
        reasons += [f"why: the {name} is empty" for name, segment
                    in zip(SEGMENT_NAMES[:2], segments) if not segment]
    return reasons


def read_token(args):
    """The token to explain: the argument, or stdin (piped in, or pasted after "explain -")."""
    if args.token not in (None, "-"):
        return args.token.strip()
    if sys.stdin.isatty():
        if args.token is None:          # waiting silently for input would look like a hang
            sys.stderr.write(args.usage())
            raise ConfigError("give the token as an argument, or pipe it in: "
                              "... | python authserver.py explain")
        print("Paste the token, then Enter:", file=sys.stderr, flush=True)
        text = sys.stdin.readline()
    else:
        text = sys.stdin.read()
    if not text.strip():
        raise ConfigError("no token on stdin")
    return text.strip()


def say_refused(narrator, what, error):
    """The verdict on a refused token: the 401 body exactly as the server sends it; exit 1."""
    body = named_error(401, error.name, str(error)).response.body
    narrator.say(narrator.paint(f"Verdict: {what} 401 {json_bytes(body).decode()}", "fail"))
    return 1


def explain(args):
    """python authserver.py explain TOKEN: verification step by step; exit 0 if valid."""
    token = read_token(args)
    config = load_config(args.config)
    key = load_secret(config)
    users = UserStore(args.users)
    narrator = Narrator(sys.stdout)
    now = time.time()
    token, notes = unwrap_pasted(token)
    for note in notes:
        narrator.say(note)
    if REFRESH_TOKEN_SHAPE.fullmatch(token):
        try:
            verdict = explain_refresh_token(token, config, users, narrator)
        except RefreshTokenError as error:
            narrator.check(False, f"{error.name}: {error}")
            narrator.say()
            return say_refused(narrator, "POST /users/refresh answers", error)
        narrator.say()
        narrator.say(narrator.paint(verdict, "ok"))
        return 0
    try:
        explain_steps(token, key, config, users, narrator, now)
    except TokenError as error:
        narrator.check(False, f"{error.name}: {error}")
        for line in narrator.after_failure:
            narrator.say(line)
        narrator.say()
        return say_refused(narrator, "rejected. The server answers", error)
    narrator.say()
    narrator.say(narrator.paint("Verdict: valid. The server would accept this token.", "ok"))
    return 0


# -- attack: section 4's forgeries, sent to a running server -----------------------------
# It talks to the one URL it is given (or the config's), and to nothing else: http.client
# follows no redirect and reads no proxy setting, as urllib would. What the server under
# attack answers is hostile input like any other: read within limits, shown as escapes.

MAX_ANSWER_BYTES = 65536        # of a server's answer: enough for any message of ours
ANSWER_DEADLINE = 30            # seconds for a whole answer, however slowly it trickles
SENDABLE = re.compile(r"[!-~]{1,16384}")    # a token that can go into a header as it is


class Unanswered(Exception):
    """A request that got no answer (refused, reset, cut off): why, in a line."""


class Target:
    """The server under attack: requests to its URL only, each on a connection of its own."""

    def __init__(self, url, tls_cert=None, timeout=10):
        try:
            parts = urllib.parse.urlsplit(url)
            parts.port              # ValueError for a port out of range
        except ValueError:
            parts = None
        if (parts is None or parts.scheme not in ("http", "https") or not parts.hostname
                or "@" in parts.netloc or parts.query or parts.fragment):
            raise ConfigError(f"--url {printable(url)!r}: give http://HOST:PORT or "
                              f"https://HOST:PORT, perhaps with a path")
        self.url, self.host, self.port = url.rstrip("/"), parts.hostname, parts.port
        self.base_path, self.timeout = parts.path.rstrip("/"), timeout
        self.tls_context = None
        if parts.scheme == "https":
            try:    # a self-signed certificate is its own authority: --tls-cert trusts it
                self.tls_context = ssl.create_default_context(cafile=tls_cert)
            except (OSError, ssl.SSLError) as error:
                raise ConfigError(f"--tls-cert {tls_cert}: {error}") from None

    def send(self, method, path, body=None, headers=None):
        """(status, answer as a dict) for one request; Unanswered if there is no answer."""
        if self.tls_context is None:
            connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        else:
            connection = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout,
                                                     context=self.tls_context)
        # The timeout bounds each read; this bounds the whole answer, sent a byte at a time.
        too_late = threading.Event()
        deadline = threading.Timer(ANSWER_DEADLINE, cut_off, (connection, too_late))
        deadline.start()
        try:
            connection.request(method, self.base_path + path, body, headers or {})
            response = connection.getresponse()
            data = response.read(MAX_ANSWER_BYTES)
            if too_late.is_set() or response.length and len(data) < MAX_ANSWER_BYTES:
                raise http.client.IncompleteRead(data)      # cut off, or closed early
            return response.status, answer_of(data)
        except ssl.SSLCertVerificationError as error:
            raise ConfigError(f"{printable(self.url)}: {error.verify_message}; to trust a "
                              f"self-signed certificate, give it: --tls-cert cert.pem") from None
        except (OSError, http.client.HTTPException, ValueError) as error:
            why = (f"no whole answer within {ANSWER_DEADLINE} s" if too_late.is_set()
                   else str(error) or type(error).__name__)
            raise Unanswered(printable(why)) from None
        finally:
            deadline.cancel()
            deadline.join()         # a cut_off under way finishes before the socket closes
            connection.close()

    def ask(self, method, path, body=None, headers=None):
        """send, for the requests without which there is no attack: no answer is ConfigError."""
        try:
            return self.send(method, path, body, headers)
        except Unanswered as error:
            raise ConfigError(f"{printable(self.url)}: {error} (is the server running? "
                              f"python authserver.py)") from None


def cut_off(connection, too_late):
    """Shut a connection whose answer is past its deadline: the blocked read returns."""
    too_late.set()
    with contextlib.suppress(OSError, AttributeError):
        connection.sock.shutdown(socket.SHUT_RDWR)


def answer_of(data):
    """The answer as a dict whose "message", if any, is text: JSON, or {"message": text}."""
    try:
        answer = json.loads(data)
    except (ValueError, RecursionError):
        answer = None
    if not isinstance(answer, dict):
        text = data.decode("utf-8", "replace").strip()
        answer = {"message": text} if text else {}
    message = answer.get("message")
    if message is not None and not isinstance(message, str):
        message = json.dumps(message)
    return {**answer, "message": message[:200] if message is not None else None}


def answer_text(status, answer):
    """ "401 invalid signature", or "302 Found" for an answer that has no message."""
    message = answer.get("message")
    return f"{status} {printable(message if message is not None else status_phrase(status))}"


def status_phrase(status):
    """ "OK" for 200: what to show of an answer without a message."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def default_url(args, config):
    """The server --host/--port, or else config, describes, as reached from this machine."""
    host = args.host or config["host"]
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    host = f"[{host}]" if ":" in host else host
    port = config["port"] if args.port is None else args.port
    return f"{'https' if args.tls_cert else 'http'}://{host}:{port}"


def genuine_token(args, target):
    """(access token, refresh token or None): --token's, or a real login's."""
    if args.token:
        return unwrap_pasted(args.token)[0], None      # "Bearer eyJ..." as explain takes it
    if not args.user:
        raise ConfigError("attack needs a genuine token to forge from: --user NAME (the "
                          "password is asked for, or --password PW) or --token TOKEN")
    password = args.password
    if password is None:
        password = read_password(prompt=f"Password for {args.user}: ", repeat=None)
    body = json_bytes({"username": args.user,
                       "password": base64.b64encode(password.encode("utf-8")).decode()})
    status, answer = target.ask("POST", "/users/authenticate", body,
                                {"Content-Type": "application/json"})
    token, refresh_token = answer.get("token"), answer.get("refreshToken")
    if status != 200 or not isinstance(token, str):
        raise ConfigError(f"logging in as {args.user!r} at {printable(target.url)}: "
                          f"{answer_text(status, answer)}")
    # A refresh token that could not be sent as it is (a line break, an escape) is not one.
    sendable = isinstance(refresh_token, str) and SENDABLE.fullmatch(refresh_token)
    return token, refresh_token if sendable else None


def server_secret(args, token):
    """This machine's secret, if it is the secret that signed token; else None.

    Only the key's holder can make the attacks marked needs="key"; run beside the server,
    with its config, attack is that holder. The secret is read, never made, never shown.
    """
    try:
        key = load_secret(load_config(args.config), make=False)
    except ConfigError:
        return None
    if key is None:
        return None
    header_segment, payload_segment, signature_segment = token.split(".")
    signature = b64url_encode(sign(f"{header_segment}.{payload_segment}".encode("ascii"), key))
    return key if hmac.compare_digest(signature, signature_segment) else None


def genuine_of(args, token, refresh_token):
    """The genuine token taken apart, with the server's key when this machine has it."""
    if not SENDABLE.fullmatch(token):
        raise ConfigError("the genuine token cannot be sent in a header as it is")
    try:
        genuine = Genuine(token, None, refresh_token)
        b64url_decode(genuine.signature_segment)
    except (TokenError, ValueError):
        raise ConfigError("the genuine token is not a JWT (header.payload.signature)") from None
    genuine.key = server_secret(args, token)
    return genuine


MAX_UNANSWERED = 3      # requests in a row without an answer, before the rest are not sent


def run_attacks(genuine, target):
    """Every attack sent in turn, unless the server stops answering: the results."""
    results, unanswered = [], 0
    for attack in ATTACKS:
        if unanswered >= MAX_UNANSWERED:   # else a silent server costs 30 s an attack
            results.append(attack_result(attack, None, "unclear", "not sent: the server "
                                         "stopped answering"))
            continue
        results.append(run_attack(attack, genuine, target))
        answered = results[-1]["status"] is not None or results[-1]["verdict"] == "skipped"
        unanswered = 0 if answered else unanswered + 1
    return hide_the_key(results)


def attack_result(attack, token, verdict_word, answer=None, skipped=None):
    """What the report and --json say of one attack (the answer's fields still empty)."""
    return {**attack_fields(attack, token), "status": None, "answer": answer,
            "verdict": verdict_word, "refusedBy": None, "skipped": skipped}


def run_attack(attack, genuine, target):
    """Send attack's forged token to GET /users/getInfo: attack_fields with the answer."""
    token = forged(attack, genuine)
    if token is None:
        return attack_result(attack, None, "skipped", skipped=unmet_need(attack, genuine) or "same")
    result = attack_result(attack, token, "unclear")
    if attack.needs == "refresh token":     # shown in part only: it may still be live
        result["token"] = f"{token[:8]}...{token[-4:]} (the refresh token, not shown whole)"
    try:
        status, answer = target.send("GET", "/users/getInfo",
                                     headers={"Authorization": f"Bearer {token}"})
    except Unanswered as error:     # a proxy in front may cut a connection it dislikes
        return {**result, "answer": f"no answer: {error}"}
    result["status"], result["answer"] = status, answer["message"]
    result["verdict"], result["refusedBy"] = verdict(attack, status, answer["message"])
    return result


def hide_the_key(results):
    """results, where the server took one of the keys the attack guessed, without saying
    which: the guesses folded into one row, without a token. A row each would say it by
    its name, its place in the list, or its token (which that key, and only it, signed)."""
    guesses = [result for result in results if result["name"] in KEY_GUESS_NAMES]
    taken = [result for result in guesses if result["verdict"] == "ACCEPTED"]
    if not taken:
        return results
    folded = {**taken[0], "name": "signed with a key from the wordlist (which one is not "
              "shown)", "tries": f"{len(guesses)} keys from tutorials and examples, each "
              f"signing exp a year on: the server took one", "token": None}
    first, rest = guesses[0], {id(result) for result in guesses[1:]}
    return [folded if result is first else result for result in results
            if id(result) not in rest]


def secret_strength(token, key):
    """The wordlist tried offline against token's signature, and what the rate means."""
    found, tried, seconds = guess_secret(token, wordlist_guesses())
    rate = tried / max(seconds, 1e-9)
    # The configured secret's row only where it is known, and not when it was just found.
    known = key if key is not None and not found else None
    return {"found": found, "guesses": tried, "seconds": round(seconds, 3),
            "perSecond": round(rate),
            "configuredBits": None if known is None else round(key_bits(known)),
            "searchTimes": [{"what": what, "seconds": time_needed}
                            for what, time_needed in search_times(rate, known)]}


def attack_command(args):
    """python authserver.py attack: forge section 4's attacks and send each to a server."""
    url = args.url or default_url(args, load_config(args.config))
    target = Target(url, args.tls_cert)
    token, refresh_token = genuine_token(args, target)
    try:
        genuine = genuine_of(args, token, refresh_token)
        status, answer = target.ask("GET", "/users/getInfo",
                                    headers={"Authorization": f"Bearer {token}"})
        if status != 200:   # then a refusal of a forgery would prove nothing
            raise ConfigError(f"the genuine token itself is refused: "
                              f"{answer_text(status, answer)}")
        results = run_attacks(genuine, target)
    finally:
        if refresh_token:   # leave no session behind: the tokens printed below are dead
            log_out(target, refresh_token)
    strength = secret_strength(token, genuine.key)
    counts = {name: sum(result["verdict"] == name for result in results)
              for name in ("refused", "ACCEPTED", "unclear", "skipped")}
    safe = not (counts["ACCEPTED"] or counts["unclear"] or strength["found"])
    if args.json:
        print(json.dumps({"url": target.url, "attacks": results, "counts": counts,
                          "secret": strength, "ok": safe}, indent=2))
    else:
        print_attack_report(target, results, counts, strength)
    return 0 if safe else 1


def log_out(target, refresh_token):
    """End the attack's session; if that fails, say so, and that its tokens still live."""
    try:
        status, answer = target.send("POST", "/users/logout",
                                     json_bytes({"refreshToken": refresh_token}),
                                     {"Content-Type": "application/json"})
    except (Unanswered, ConfigError) as error:
        status, answer = None, {"message": str(error)}
    if status != 204:
        said = answer_text(status, answer) if status else printable(answer["message"])
        print(f"authserver: the attack's session was not logged out ({said}): its tokens are "
              f"live until they expire", file=sys.stderr)


# -- attack's report ------------------------------------------------------------------

SKIP_REASONS = {
    "key": "needs the server's key: run attack beside the server, with its config",
    "refresh token": "needs a refresh token: log in with --user rather than --token",
    "same": "made from this token, it would be the token itself: nothing to send",
}
VERDICT_MARKS = {"refused": ("refused ", "ok"), "ACCEPTED": ("ACCEPTED", "fail"),
                 "unclear": ("unclear ", "fail"), "skipped": ("skipped ", "dim")}
ATTACK_INDENT = " " * 11


def indented(text, width, narrator, style=None):
    """text in lines of at most width characters under an attack's name, painted in style."""
    return [ATTACK_INDENT + (narrator.paint(line, style) if style else line)
            for line in textwrap.wrap(text, width - len(ATTACK_INDENT), break_on_hyphens=False)]


def cut_to(text, room):
    """text, or its start and end around "..." with its length, in room characters."""
    if len(text) <= room:
        return text
    length = f" ({len(text)} characters)"
    keep = max(room - len(length) - 3, 8)
    return f"{text[:keep - keep // 3]}...{text[len(text) - keep // 3:]}{length}"


def attack_lines(result, narrator, width):
    """One attack's lines: verdict and name, what it tries, its header and token, the answer."""
    mark, style = VERDICT_MARKS[result["verdict"]]
    lines = [f"  {narrator.paint(mark, style)} {printable(result['name'])}",
             *indented(result["tries"], width, narrator)]
    if result["verdict"] == "skipped":
        return lines + indented(SKIP_REASONS[result["skipped"]], width, narrator)
    room = width - len(ATTACK_INDENT)
    if result["header"] is not None:
        lines.append(ATTACK_INDENT + cut_to(f"header {printable(result['header'])}", room))
    token = result["token"] or "(the token is not shown: it would tell the key)"
    lines.append(ATTACK_INDENT + narrator.paint(cut_to(printable(token), room), "dim"))
    answer = (result["answer"] if result["status"] is None     # no answer: why not
              else answer_text(result["status"], {"message": result["answer"]}))
    return lines + indented(f"{answer}: {attack_outcome(result)}", width, narrator,
                            "fail" if style == "fail" else None)


def attack_outcome(result):
    """What the answer to a sent attack means."""
    check, reference = result["check"], result["reference"]
    if result["verdict"] == "ACCEPTED":
        return f"the server accepted a forged token: it is vulnerable ({reference})"
    if result["verdict"] == "unclear":
        return "neither accepted nor refused: try again"
    if result["refusedBy"] == check:
        return f"refused by {check} ({reference})"
    by = f", by {result['refusedBy']} going by its message" if result["refusedBy"] else ""
    return f"refused{by} (authserver refuses it in {check}: {reference})"


def secret_lines(strength, narrator, width):
    """What the offline search found, and how long keys of each kind last at its rate."""
    lines = ["", narrator.paint("The secret, offline", "bold")]
    lines += textwrap.wrap(
        f"{strength['guesses']:,} guesses from the wordlist ({len(WORDLIST)} words, each as "
        f"written, Capitalised and UPPER, alone and followed by 0 to 999) against the token's "
        f"signature: {duration_text(strength['seconds'])}, {strength['perSecond']:,} guesses a "
        f"second on this machine (Python, one core).", width, initial_indent="  ",
        subsequent_indent="  ")
    if strength["found"]:
        lines.append("  " + narrator.paint("The server's secret was found in the wordlist: "
                                           "change it. (It is not shown here.)", "fail"))
    else:
        lines.append("  " + narrator.paint("Not found in the wordlist.", "ok"))
    lines.append("  At that rate, a search of every key of a kind takes:")
    lines += [f"    {row['what']:<50} {duration_text(row['seconds'])}"
              for row in strength["searchTimes"]]
    return lines + textwrap.wrap(
        f"(The universe is {UNIVERSE_AGE_YEARS:.1e} years old. Hardware built for guessing "
        f"goes far faster than this: read these as the least an attacker can do.)", width,
        initial_indent="  ", subsequent_indent="  ")


def verdict_line(counts, found):
    """The last line: (text, style)."""
    if counts["ACCEPTED"] or found:
        return "Verdict: VULNERABLE (see above).", "fail"
    if counts["unclear"]:
        return (f"Verdict: inconclusive: {counts['unclear']} answers were neither a refusal nor "
                f"an acceptance (see above).", "fail")
    if counts["skipped"]:
        return (f"Verdict: every attack sent was refused and the secret was not guessed "
                f"({counts['skipped']} could not be made here).", "ok")
    return "Verdict: every attack was refused and the secret was not guessed.", "ok"


def print_attack_report(target, results, counts, strength):
    """The report: the attacks, grouped by the step they aim at; the secret; the verdict."""
    narrator = Narrator(sys.stdout)
    width = min(max(shutil.get_terminal_size((100, 24)).columns, 60), 100) - 1
    for line in textwrap.wrap(f"Attacking {printable(target.url)}, your own server: a genuine "
                              f"token, which it accepts, forged {len(results)} ways, each sent "
                              f"to GET /users/getInfo.", width):
        narrator.say(line)
    check = None
    for result in results:
        if result["check"] != check:
            check = result["check"]
            narrator.say()
            for line in textwrap.wrap(f"{check}: {CHECKS[check]}", width):
                narrator.say(narrator.paint(line, "bold"))
        for line in attack_lines(result, narrator, width):
            narrator.say(line)
    for line in secret_lines(strength, narrator, width):
        narrator.say(line)
    narrator.say()
    narrator.say(f"{len(results)} attacks: {counts['refused']} refused, {counts['ACCEPTED']} "
                 f"ACCEPTED, {counts['unclear']} unclear, {counts['skipped']} skipped.")
    narrator.say(narrator.paint(*verdict_line(counts, strength["found"])))


# ---------------------------------------------------------------------------
# 14. Main: the command line's parser, and main()
# ---------------------------------------------------------------------------

def username_argument(text):
    """A username as typed, in NFC: "café" typed on macOS (e + U+0301) names the same user."""
    return unicodedata.normalize("NFC", text)


def build_parser():
    """python authserver.py [--host H] [--port P] [...] | adduser | passwd | ... | attack"""
    parser = argparse.ArgumentParser(
        prog="authserver.py", description=(
            "A JWT login server, standard library only. With no command it serves: the API "
            "(POST /users/authenticate, GET /users/getInfo, ...) and the page at /, on --host "
            "and --port, until Ctrl-C. The commands manage users and sessions, explain "
            "tokens, and attack a running server with the classic forgeries."))
    parser.add_argument("--host", help="address to listen on (0.0.0.0: the whole LAN)")
    parser.add_argument("--port", type=int, help="port (default 4000; 0: any free port)")
    parser.add_argument("--config", type=Path, default=CONFIG_FILE,
                        help="config file (default: config.json beside this file)")
    parser.add_argument("--users", type=Path, default=USERS_FILE,
                        help="users file (default: users.json beside this file)")
    parser.add_argument("--tls-cert", help="PEM certificate: serve HTTPS")
    parser.add_argument("--tls-key", help="PEM private key for --tls-cert")
    parser.set_defaults(action=serve)
    files = argparse.ArgumentParser(add_help=False)
    # SUPPRESS, so an option given before the command is not reset by the command.
    files.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="config file")
    files.add_argument("--users", type=Path, default=argparse.SUPPRESS, help="users file")
    config_file = argparse.ArgumentParser(add_help=False)
    config_file.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="config file")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    adduser = commands.add_parser("adduser", parents=[files], help="add a user", description=(
        "Add a user to the users file, with a new random id. It asks for the password twice "
        "on a terminal (not shown as you type), or reads one line from stdin when one is "
        "piped in: echo 'pw' | python authserver.py adduser NAME. The password is stored "
        "hashed (PBKDF2)."))
    adduser.add_argument("username", type=username_argument)
    adduser.add_argument("--first-name")
    adduser.add_argument("--last-name")
    adduser.add_argument("--phone")
    adduser.set_defaults(action=add_user)

    passwd = commands.add_parser("passwd", parents=[files], help="change a user's password",
                                 description=(
        "Set a user's password (every other field is kept) and revoke the user's sessions. "
        "It asks for the password twice on a terminal (not shown as you type), or reads one "
        "line from stdin when one is piped in."))
    passwd.add_argument("username", type=username_argument)
    passwd.set_defaults(action=change_password)

    sessions = commands.add_parser("sessions", parents=[files], help="list a user's sessions",
                                   description=(
        "List a user's live sessions, one per login not yet logged out, revoked or expired: "
        "its id (for revoke), when it was created and last used, when it expires, and the "
        "address and browser it came from."))
    sessions.add_argument("username", type=username_argument)
    sessions.set_defaults(action=list_sessions_command)

    revoke = commands.add_parser("revoke", parents=[files],
                                 help="revoke a user's sessions (all, or the one given)",
                                 description=(
        "End all of a user's sessions, or the one given: their refresh tokens are refused at "
        "once, and their access tokens within a second, by a running server too. Tokens from "
        "the token command have no session, and are not affected."))
    revoke.add_argument("username", type=username_argument)
    revoke.add_argument("session", nargs="?", help="a session id from the sessions command")
    revoke.set_defaults(action=revoke_command)

    token = commands.add_parser("token", parents=[files], help="print a token for a user",
                                description=(
        "Print an access token for a user, signed as a login's, without the password: for "
        "curl and for explain. It belongs to no session (no sid claim), so it cannot be "
        "revoked, by logout, revoke or passwd: it is good until its exp (tokenLifetime)."))
    token.add_argument("username", type=username_argument)
    token.set_defaults(action=issue_token)

    explain_command = commands.add_parser("explain", parents=[files],
                                          help="verify a token step by step", description=(
        "Verify a token as the server does, one step at a time, with the real values; exit 0 "
        "if the server would accept it. The token is the argument; without one, or with '-', "
        "it is read from stdin (piped in, or pasted on a terminal). A whole header line "
        "(Authorization: Bearer eyJ..., x-access-token: eyJ...), a token in its JSON quotes "
        "or one wrapped over lines is explained too, with a note. A refresh token is looked "
        "up in the sessions file."))
    explain_command.add_argument("token", nargs="?", help="the token (default: read stdin)")
    explain_command.set_defaults(action=explain, usage=explain_command.format_usage)

    attacks = commands.add_parser("attack", parents=[config_file],
                                  help="fire the classic JWT attacks at a server",
                                  description=(
        "For your own servers only. Get a genuine token (by logging in, or --token), forge "
        "from it each classic JWT attack (alg none, an edited payload, a guessable key, "
        "another algorithm, a key named in the header, an expired token, ...), send each to "
        "GET /users/getInfo, and say for each whether the server refused it, and which check "
        "of authserver.py did; then try a wordlist against the token's key, offline (the key "
        "is never shown). Exit 0 when every attack sent was refused and the key was not "
        "guessed; 1 otherwise; 2 when the server cannot be reached, the login fails or the "
        "genuine token is itself refused. A login's session is logged out at the end. The "
        "attacks that need the server's key are made only where its secret is: run beside "
        "the server, with its config. In colour on a terminal, unless NO_COLOR is set."))
    attacks.add_argument("--url", help="the server: http://HOST:PORT or https://HOST:PORT "
                         "(default: --host and --port given before attack, else the config's, "
                         "on this machine)")
    attacks.add_argument("--user", type=username_argument, help="log in as this user")
    attacks.add_argument("--password", help="the user's password (default: asked for, or "
                         "read from stdin)")
    attacks.add_argument("--token", help="forge from this token instead of logging in")
    attacks.add_argument("--tls-cert", default=argparse.SUPPRESS,
                         help="trust this certificate (a self-signed one); the default URL is "
                         "then https")
    attacks.add_argument("--json", action="store_true",
                         help="print the results as one JSON document")
    attacks.set_defaults(action=attack_command)
    return parser


def main(argv=None):
    # A character the console's encoding lacks (in a server's message, a token's claims) is
    # shown as an escape rather than ending in a traceback: Windows writes cp1252 to a file.
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)
    try:
        code = args.action(args)
        sys.stdout.flush()              # a closed pipe is reported here, not at exit
        return code
    except BrokenPipeError:
        # Whoever read our output went away (explain ... | head): nothing more to say.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except ConfigError as error:
        print(f"authserver: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C in a command (the server stops cleanly on its own): one line, and the
        # shell's code for "ended by SIGINT". On a terminal, first end the prompt's line.
        print("\nauthserver: interrupted" if sys.stderr.isatty() else "authserver: interrupted",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
