"""Tests for authserver.py: known answers, tables of bad tokens, and real HTTP.

Run: python -m unittest -v
Every server here is real, on 127.0.0.1 port 0, in a thread or a subprocess.
"""

import os
import sys

# Before `import authserver`: its own check ends in SystemExit, which unittest's discovery
# catches (a bare except) and reports as a failed import, traceback and all. A SkipTest
# would report success. So: one line, and out at once with a failure's exit code.
# (This file must stay parseable by Python 3.6 to 3.8 for this line to be reached.)
if sys.version_info < (3, 9):
    sys.stderr.write("authserver needs Python 3.9+ (this is %d.%d)\n" % sys.version_info[:2])
    sys.stderr.flush()
    os._exit(1)

import ast
import base64
import contextlib
import errno
import hashlib
import hmac
import http
import http.client
import http.server
import io
import json
import runpy
import re
import queue
import select
import shutil
import signal
import socket
import socketserver
import ssl
import struct
import subprocess
import tempfile
import threading
import time
import unittest
import urllib.parse
from html.parser import HTMLParser
from pathlib import Path
from unittest import mock

import authserver
from authserver import (TokenError, b64url_decode, b64url_encode, decode_token, encode_token,
                        hash_password, verify_password)

HERE = Path(__file__).resolve().parent
SECRET = "a-test-secret-of-more-than-32-bytes-for-hs256"
FAST_ITERATIONS = 1000          # the shipped users.json uses 600,000; tests need speed
NOW = 1700000000


def b64(text):
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def make_user(user_id, username, password, **fields):
    return {"id": user_id, "username": username,
            "passwordHash": hash_password(password, FAST_ITERATIONS), **fields}


TEST_USERS = [
    make_user(81623, "test", "test", firstName="Test", lastName="User", phone="5235234132"),
    make_user(26858, "ncuser", "ncpassword", firstName="En", lastName="Cee", phone="7685496767"),
    make_user(555, "café", "pässwörd"),
]


class Files:
    """A temporary folder with config.json and users.json for one server."""

    def __init__(self, test, users=None, **config):
        self.folder = Path(tempfile.mkdtemp())
        test.addCleanup(shutil.rmtree, self.folder, True)
        self.config = self.folder / "config.json"
        self.users = self.folder / "users.json"
        self.config.write_text(json.dumps({"secret": SECRET, "accessLog": True, **config}))
        self.users.write_text(json.dumps(TEST_USERS if users is None else users))


def start_server(test, files=None, tls_context=None, **config):
    """A real server on 127.0.0.1:0 in a thread; stopped when the test ends."""
    files = files or Files(test, **config)
    log = io.StringIO()
    server = authserver.make_server(files.config, files.users, "127.0.0.1", 0, tls_context, log)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()

    def stop():
        server.shutdown()
        server.stop()
        thread.join()
    test.addCleanup(stop)
    server.test_log = log
    return server


def token_for(user_id=81623, username="test", secret=SECRET, now=None, lifetime=3600, **extra):
    now = time.time() if now is None else now
    claims = {"id": user_id, "username": username, "iat": int(now), "exp": int(now) + lifetime}
    claims.update(extra)
    return encode_token(claims, secret)


def forge(header, payload, secret=SECRET, signature=None):
    """A token with any header and payload, signed with secret (or a given signature)."""
    head = b64url_encode(json.dumps(header, separators=(",", ":")).encode())
    body = b64url_encode(json.dumps(payload, separators=(",", ":")).encode())
    if signature is None:
        signature = b64url_encode(authserver.sign(f"{head}.{body}".encode(), secret.encode()))
    return f"{head}.{body}.{signature}"


class Client:
    """http.client on one keep-alive connection to a test server."""

    def __init__(self, server, context=None):
        port = server.server_address[1]
        if context is None:
            self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        else:
            self.connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=10,
                                                          context=context)

    def request(self, method, path, body=None, headers=None):
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
            headers = {"Content-Type": "application/json", **(headers or {})}
        self.connection.request(method, path, body=body, headers=headers or {})
        response = self.connection.getresponse()
        data = response.read()
        parsed = json.loads(data) if data and "json" in response.getheader("Content-Type", "") else data
        return response.status, response, parsed

    def close(self):
        self.connection.close()


def raw_exchange(server, data, timeout=10):
    """Send raw bytes to a server (or a port), read one response: (status, headers, body)."""
    port = server if isinstance(server, int) else server.server_address[1]
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        return read_response(sock)


def read_response(sock, timeout=10):
    """One response from sock: (status, headers, body). Never waits for ever."""
    if sock.gettimeout() is None:
        sock.settimeout(timeout)        # a broken server fails the test instead of hanging it
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before a whole response: {buffer!r}")
        buffer += chunk
    head, _, body = buffer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", 0))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


def login_body(username="test", password="test"):
    return {"username": username, "password": b64(password)}


# ---------------------------------------------------------------------------
# Known answers
# ---------------------------------------------------------------------------

class TestBase64url(unittest.TestCase):

    def test_round_trip_without_padding(self):
        for data in (b"", b"f", b"fo", b"foo", b"foob", bytes(range(256))):
            text = b64url_encode(data)
            self.assertNotIn("=", text)
            self.assertEqual(b64url_decode(text), data)

    def test_strictness(self):
        for bad in ("Zg==", "Zm9v+", "Zm9v/", "Z", "Zh", "Zm9 v", "Zm9v\n", "é"):
            with self.subTest(bad=bad), self.assertRaises(ValueError):
                b64url_decode(bad)


class TestKnownAnswers(unittest.TestCase):
    """RFC 7515 Appendix A.1 and RFC 7519 §6.1, byte for byte."""

    RFC7515_KEY = ("AyM1SysPpbyDfgZld3umj1qzKObwVMkoqQ-EstJQLr_T-1qS0gZH75aKtMN3Yj0iPS4hcgUuTwjAz"
                   "Zr1Z9CAow")
    RFC7515_TOKEN = ("eyJ0eXAiOiJKV1QiLA0KICJhbGciOiJIUzI1NiJ9"
                     ".eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ"
                     ".dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk")

    def test_rfc7515_a1_signature(self):
        key = b64url_decode(self.RFC7515_KEY)
        head, body, signature = self.RFC7515_TOKEN.split(".")
        self.assertEqual(b64url_encode(authserver.sign(f"{head}.{body}".encode(), key)), signature)
        self.assertEqual(signature, "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk")

    def test_rfc7515_a1_verifies_before_exp(self):
        claims = decode_token(self.RFC7515_TOKEN, b64url_decode(self.RFC7515_KEY), now=1300819379)
        self.assertEqual(claims, {"iss": "joe", "exp": 1300819380, "http://example.com/is_root": True})

    def test_rfc7515_a1_expired_after_exp(self):
        with self.assertRaises(authserver.TokenExpiredError) as caught:
            decode_token(self.RFC7515_TOKEN, b64url_decode(self.RFC7515_KEY), now=1300819380)
        self.assertEqual(str(caught.exception), "jwt expired")

    def test_rfc7519_unsecured_token_refused(self):
        unsecured = ("eyJhbGciOiJub25lIn0"
                     ".eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ"
                     ".")
        with self.assertRaises(TokenError) as caught:
            decode_token(unsecured, SECRET, now=1300819379)
        self.assertEqual(str(caught.exception), "invalid algorithm")

    def test_same_bytes_as_node_jsonwebtoken(self):
        # jwt.sign({id:81623,username:"test",iat:1700000000,exp:1700003600}, secret) in Node.
        node = ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"
                ".eyJpZCI6ODE2MjMsInVzZXJuYW1lIjoidGVzdCIsImlhdCI6MTcwMDAwMDAwMCwiZXhwIjoxNzAwMDAzNjAwfQ"
                ".OfOVso6I8mP7uI5wrbaKcu7pScfscL-yLQEXLJvHwg8")
        claims = {"id": 81623, "username": "test", "iat": 1700000000, "exp": 1700003600}
        self.assertEqual(encode_token(claims, "correct horse battery staple, 32B+"), node)
        self.assertIn(node.replace("\n", ""), authserver.__doc__.replace("\n    ", ""))

    def test_secret_may_be_bytes_or_text(self):
        token = encode_token({"exp": NOW + 10}, SECRET.encode())
        self.assertEqual(decode_token(token, SECRET, now=NOW), {"exp": NOW + 10})


# ---------------------------------------------------------------------------
# A table of bad tokens -> node-jsonwebtoken's error name and message
# ---------------------------------------------------------------------------

GOOD_HEADER = {"alg": "HS256", "typ": "JWT"}
GOOD_CLAIMS = {"id": 81623, "username": "test", "iat": NOW, "exp": NOW + 3600}
VALID = forge(GOOD_HEADER, GOOD_CLAIMS)
HEAD, BODY, SIGNATURE = VALID.split(".")


def tampered_payload():
    claims = dict(GOOD_CLAIMS, id=26858)
    return f"{HEAD}.{b64url_encode(json.dumps(claims).encode())}.{SIGNATURE}"


BAD_TOKENS = [
    # (description, token, error name, message)
    ("two segments", f"{HEAD}.{BODY}", "JsonWebTokenError", "jwt malformed"),
    ("four segments", VALID + ".x", "JsonWebTokenError", "jwt malformed"),
    ("empty header", f".{BODY}.{SIGNATURE}", "JsonWebTokenError", "jwt malformed"),
    ("padding", f"{HEAD}=.{BODY}.{SIGNATURE}", "JsonWebTokenError", "jwt malformed"),
    ("base64 not base64url", f"{HEAD}.{BODY}+.{SIGNATURE}", "JsonWebTokenError", "jwt malformed"),
    ("non-ASCII", f"{HEAD}.{BODY}é.{SIGNATURE}", "JsonWebTokenError", "jwt malformed"),
    ("too long", forge(GOOD_HEADER, dict(GOOD_CLAIMS, pad="x" * 9000)), "JsonWebTokenError",
     "jwt malformed"),
    ("header not JSON", f"{b64url_encode(b'not json')}.{BODY}.{SIGNATURE}", "JsonWebTokenError",
     "invalid token"),
    ("header an array", forge(["HS256"], GOOD_CLAIMS), "JsonWebTokenError", "invalid token"),
    ("crit header", forge(dict(GOOD_HEADER, crit=["exp"]), GOOD_CLAIMS), "JsonWebTokenError",
     "invalid token"),
    ("alg none", forge({"alg": "none"}, GOOD_CLAIMS, signature=""), "JsonWebTokenError",
     "invalid algorithm"),
    ("alg NONE", forge({"alg": "NONE"}, GOOD_CLAIMS, signature=""), "JsonWebTokenError",
     "invalid algorithm"),
    ("alg HS384", forge({"alg": "HS384", "typ": "JWT"}, GOOD_CLAIMS), "JsonWebTokenError",
     "invalid algorithm"),
    ("alg HS512", forge({"alg": "HS512", "typ": "JWT"}, GOOD_CLAIMS), "JsonWebTokenError",
     "invalid algorithm"),
    ("alg RS256", forge({"alg": "RS256", "typ": "JWT"}, GOOD_CLAIMS), "JsonWebTokenError",
     "invalid algorithm"),
    ("no alg", forge({"typ": "JWT"}, GOOD_CLAIMS), "JsonWebTokenError", "invalid algorithm"),
    # Signed right, and the last alg is HS256: a parser keeping the last would accept it;
    # one keeping the first (a proxy in front, say) would read "none".
    ("alg twice", authserver.signed_with(SECRET, '{"alg":"none","alg":"HS256","typ":"JWT"}',
                                         GOOD_CLAIMS), "JsonWebTokenError", "invalid token"),
    ("empty signature", f"{HEAD}.{BODY}.", "JsonWebTokenError", "jwt signature is required"),
    ("wrong secret", forge(GOOD_HEADER, GOOD_CLAIMS, secret="another-secret-that-is-32-bytes-long!"),
     "JsonWebTokenError", "invalid signature"),
    ("tampered payload", tampered_payload(), "JsonWebTokenError", "invalid signature"),
    ("truncated signature", VALID[:-2], "JsonWebTokenError", "invalid signature"),
    ("non-canonical signature", VALID[:-1] + chr(ord(VALID[-1]) + 1), "JsonWebTokenError",
     "invalid signature"),
    ("payload not JSON", forge(GOOD_HEADER, GOOD_CLAIMS).split(".")[0] + "." +
     b64url_encode(b"{nope") + "." + b64url_encode(authserver.sign(
         (HEAD + "." + b64url_encode(b"{nope")).encode(), SECRET.encode())),
     "JsonWebTokenError", "invalid token"),
    ("payload an array", forge(GOOD_HEADER, [1, 2]), "JsonWebTokenError", "invalid token"),
    # The signature is checked before the payload is read: a payload that is not even JSON,
    # under a signature that is not its own, is refused for the signature.
    ("payload not JSON, signature not its own", f"{HEAD}.{b64url_encode(b'{nope')}.{SIGNATURE}",
     "JsonWebTokenError", "invalid signature"),
    ("no exp", forge(GOOD_HEADER, {"id": 81623, "username": "test"}), "JsonWebTokenError",
     "invalid exp value"),
    ("exp a string", forge(GOOD_HEADER, dict(GOOD_CLAIMS, exp=str(NOW + 60))), "JsonWebTokenError",
     "invalid exp value"),
    ("exp a boolean", forge(GOOD_HEADER, dict(GOOD_CLAIMS, exp=True)), "JsonWebTokenError",
     "invalid exp value"),
    ("expired", forge(GOOD_HEADER, dict(GOOD_CLAIMS, exp=NOW)), "TokenExpiredError", "jwt expired"),
    ("nbf in the future", forge(GOOD_HEADER, dict(GOOD_CLAIMS, nbf=NOW + 60)), "NotBeforeError",
     "jwt not active"),
    ("nbf a string", forge(GOOD_HEADER, dict(GOOD_CLAIMS, nbf="0")), "JsonWebTokenError",
     "invalid nbf value"),
    ("iat in the future", forge(GOOD_HEADER, dict(GOOD_CLAIMS, iat=NOW + 60)), "NotBeforeError",
     "jwt not active"),
    ("iat a string", forge(GOOD_HEADER, dict(GOOD_CLAIMS, iat="now")), "JsonWebTokenError",
     "invalid iat value"),
]


class TestTokenTable(unittest.TestCase):

    def test_valid_token(self):
        self.assertEqual(decode_token(VALID, SECRET, now=NOW), GOOD_CLAIMS)

    def test_bad_tokens(self):
        for description, token, name, message in BAD_TOKENS:
            with self.subTest(description):
                with self.assertRaises(TokenError) as caught:
                    decode_token(token, SECRET, now=NOW)
                self.assertEqual((caught.exception.name, str(caught.exception)), (name, message))

    def test_nan_in_payload_refused(self):
        payload = b64url_encode(b'{"exp":NaN}')
        token = f"{HEAD}.{payload}.{b64url_encode(authserver.sign(f'{HEAD}.{payload}'.encode(), SECRET.encode()))}"
        with self.assertRaises(TokenError):
            decode_token(token, SECRET, now=NOW)

    def test_leeway(self):
        expired = forge(GOOD_HEADER, dict(GOOD_CLAIMS, exp=NOW - 5))
        self.assertEqual(decode_token(expired, SECRET, now=NOW, leeway=10)["exp"], NOW - 5)
        early = forge(GOOD_HEADER, dict(GOOD_CLAIMS, nbf=NOW + 5))
        self.assertEqual(decode_token(early, SECRET, now=NOW, leeway=10)["nbf"], NOW + 5)

    def test_issuer_and_audience(self):
        token = forge(GOOD_HEADER, dict(GOOD_CLAIMS, iss="me", aud="app"))
        self.assertEqual(decode_token(token, SECRET, now=NOW, issuer="me", audience="app")["iss"], "me")
        for issuer, audience, message in (("you", "app", "jwt issuer invalid. expected: you"),
                                          ("me", "web", "jwt audience invalid. expected: web")):
            with self.subTest(message), self.assertRaises(TokenError) as caught:
                decode_token(token, SECRET, now=NOW, issuer=issuer, audience=audience)
            self.assertEqual(str(caught.exception), message)
        with self.assertRaises(TokenError):
            decode_token(VALID, SECRET, now=NOW, issuer="me")


# ---------------------------------------------------------------------------
# Passwords, config, users file
# ---------------------------------------------------------------------------

class TestPasswords(unittest.TestCase):

    def test_hash_format_and_round_trip(self):
        stored = hash_password("s3cret", 1000, salt="abc")
        algorithm, iterations, salt, digest = stored.split("$")
        self.assertEqual((algorithm, iterations, salt), ("pbkdf2_sha256", "1000", "abc"))
        self.assertEqual(base64.b64decode(digest),
                         hashlib.pbkdf2_hmac("sha256", b"s3cret", b"abc", 1000))
        self.assertTrue(verify_password("s3cret", stored))
        self.assertFalse(verify_password("s3cret!", stored))

    def test_default_is_owasp_2023(self):
        with mock.patch("hashlib.pbkdf2_hmac", return_value=bytes(32)) as pbkdf2:
            stored = hash_password("x")
        self.assertTrue(stored.startswith("pbkdf2_sha256$600000$"))
        self.assertEqual(pbkdf2.call_args[0][3], 600000)
        self.assertNotEqual(hash_password("x", 1000), hash_password("x", 1000))   # salted

    def test_no_password_field_is_ever_public(self):
        record = {"id": 1, "username": "u", "passwordHash": "x", "oldPassword": "y",
                  "PASSWORD_HINT": "z", "email": "u@example.org"}
        self.assertEqual(authserver.public_record(record),
                         {"id": 1, "username": "u", "email": "u@example.org"})

    def test_password_decoding(self):
        self.assertEqual(authserver.decode_password(b64("pässwörd")), "pässwörd")
        latin1 = base64.b64encode("café".encode("latin-1")).decode()     # what btoa() sends
        self.assertEqual(authserver.decode_password(latin1), "café")
        for bad in ("not base64!", "dGVzdA", "é"):
            self.assertIsNone(authserver.decode_password(bad))


class TestConfig(unittest.TestCase):

    def test_durations(self):
        for value, seconds in ((90, 90), ("90", 90), ("30s", 30), ("30m", 1800), ("1h", 3600),
                               ("2d", 172800)):
            self.assertEqual(authserver.parse_duration(value, "x"), seconds)
        for bad in ("", "1w", "-5", 0, True, "0h", None):
            with self.subTest(bad=bad), self.assertRaises(authserver.ConfigError):
                authserver.parse_duration(bad, "x")

    def test_secret_generated_once_and_kept(self):
        files = Files(self)
        files.config.write_text("{}")
        config = authserver.load_config(files.config)
        first = authserver.load_secret(config)
        self.assertGreaterEqual(len(first), 43)                  # 256 bits, base64url
        secret_file = files.folder / "authserver.secret"
        self.assertEqual(secret_file.stat().st_mode & 0o777, 0o600)
        self.assertEqual(authserver.load_secret(config), first)
        other = Files(self)
        other.config.write_text("{}")
        self.assertNotEqual(authserver.load_secret(authserver.load_config(other.config)), first)

    def test_short_secret_refused(self):
        files = Files(self, secret="too-short")
        with self.assertRaises(authserver.ConfigError) as caught:
            authserver.load_secret(authserver.load_config(files.config))
        self.assertIn("RFC 7518", str(caught.exception))
        self.assertIn("secrets.token_urlsafe(32)", str(caught.exception))

    def test_unknown_key_refused(self):
        files = Files(self, tokenLifeTime="1h")
        with self.assertRaises(authserver.ConfigError) as caught:
            authserver.load_config(files.config)
        self.assertIn("tokenLifeTime", str(caught.exception))

    def test_wrong_types_refused(self):
        for setting in ({"port": 70000}, {"port": "4000"}, {"requestTimeout": 0},
                        {"loginAttempts": True}, {"issuer": 5}, {"audience": ""}, {"host": None}):
            with self.subTest(setting), self.assertRaises(authserver.ConfigError) as caught:
                authserver.load_config(Files(self, **setting).config)
            self.assertIn(next(iter(setting)), str(caught.exception))


class TestUsersFile(unittest.TestCase):

    def test_plaintext_password_refused(self):
        files = Files(self, users=[{"id": 1, "username": "bob", "password": "hunter2"}])
        with self.assertRaises(authserver.ConfigError) as caught:
            authserver.make_server(files.config, files.users, "127.0.0.1", 0, log_stream=io.StringIO())
        self.assertIn("'bob'", str(caught.exception))
        self.assertIn("python authserver.py passwd bob", str(caught.exception))

    def test_duplicate_usernames_refused(self):
        files = Files(self, users=[make_user(1, "bob", "x"), make_user(2, "bob", "y")])
        with self.assertRaises(authserver.ConfigError):
            authserver.UserStore(files.users)

    def test_atomic_write_survives_a_failure_midway(self):
        files = Files(self)
        before = files.users.read_bytes()
        with mock.patch("os.fsync", side_effect=OSError("disk full")):
            with self.assertRaises(OSError):
                authserver.save_users(files.users, [])
        self.assertEqual(files.users.read_bytes(), before)
        self.assertEqual(sorted(p.name for p in files.folder.iterdir()), ["config.json", "users.json"])

    def test_hot_reload_and_broken_file_kept_out(self):
        server = start_server(self)
        server.users.RECHECK_SECONDS = 0            # check the file on every request
        client = Client(server)
        self.addCleanup(client.close)
        users = TEST_USERS + [make_user(777, "newbie", "fresh")]
        authserver.save_users(server.users.path, users)
        status, _, body = client.request("POST", "/users/authenticate", login_body("newbie", "fresh"))
        self.assertEqual(status, 200, body)
        server.users.path.write_text("[{broken")
        status, _, body = client.request("POST", "/users/authenticate", login_body("newbie", "fresh"))
        self.assertEqual(status, 200, body)
        self.assertIn("users file not reloaded, keeping the last good one", server.test_log.getvalue())
        # A user removed from the file: their still-valid token no longer opens getInfo.
        newbie_token = body["token"]
        authserver.save_users(server.users.path, TEST_USERS)
        status, _, body = client.request("GET", "/users/getInfo",
                                         headers={"x-access-token": newbie_token})
        self.assertEqual((status, body["message"]), (401, "user not found"))

    def test_unknown_names_cost_as_much_as_the_slowest_hash_after_a_reload(self):
        files = Files(self)
        store = authserver.UserStore(files.users, log=lambda message: None)
        self.assertEqual(store.find_by_name("nobody")[1].split("$")[1], str(FAST_ITERATIONS))
        authserver.save_users(files.users, TEST_USERS + [
            {"id": 9, "username": "slow", "passwordHash": hash_password("x", 2000)}])
        store.refresh(force=True)
        self.assertEqual(store.find_by_name("nobody")[1].split("$")[1], "2000")
        self.assertFalse(verify_password("", store.find_by_name("nobody")[1]))


# ---------------------------------------------------------------------------
# The API, end to end
# ---------------------------------------------------------------------------

class TestAPI(unittest.TestCase):

    def setUp(self):
        self.server = start_server(self)
        self.client = Client(self.server)
        self.addCleanup(self.client.close)

    def login(self, username="test", password="test"):
        return self.client.request("POST", "/users/authenticate", login_body(username, password))

    def test_login_with_json(self):
        status, response, body = self.login()
        self.assertEqual(status, 200)
        self.assertEqual(set(body), {"token", "expiresIn", "refreshToken", "refreshExpiresIn"})
        self.assertEqual(body["expiresIn"], 3600)
        claims = decode_token(body["token"], SECRET)
        self.assertEqual(set(claims), {"id", "username", "iat", "exp", "sid"})
        self.assertEqual((claims["id"], claims["username"]), (81623, "test"))
        self.assertEqual(claims["exp"] - claims["iat"], 3600)
        self.assertEqual(response.getheader("Content-Type"), "application/json; charset=utf-8")
        self.assertEqual(response.getheader("Cache-Control"), "no-store")
        self.assertEqual(response.getheader("Access-Control-Allow-Origin"), "*")

    def test_login_with_form(self):
        form = f"username=ncuser&password={b64('ncpassword')}".replace("=", "%3D").replace(
            "username%3D", "username=").replace("&password%3D", "&password=")
        status, _, body = self.client.request(
            "POST", "/users/authenticate", form,
            {"Content-Type": "application/x-www-form-urlencoded"})
        self.assertEqual(status, 200, body)
        self.assertEqual(decode_token(body["token"], SECRET)["username"], "ncuser")

    def test_login_non_ascii_password(self):
        status, _, body = self.login("café", "pässwörd")
        self.assertEqual(status, 200, body)

    def test_wrong_password_unknown_user_and_bad_base64_answer_alike(self):
        expected = (400, {"message": "Username or password is incorrect"})
        for body in (login_body("test", "nope"), login_body("nobody", "test"),
                     {"username": "test", "password": "not base64!"}):
            with self.subTest(body=body):
                status, _, answer = self.client.request("POST", "/users/authenticate", body)
                self.assertEqual((status, answer), expected)

    def test_unknown_user_costs_a_full_hash(self):
        real_iterations = []
        original = hashlib.pbkdf2_hmac

        def counting(name, password, salt, iterations):
            real_iterations.append(iterations)
            return original(name, password, salt, iterations)
        with mock.patch("hashlib.pbkdf2_hmac", side_effect=counting):
            self.login("test", "wrong")
            self.login("nobody", "wrong")
        self.assertEqual(real_iterations, [FAST_ITERATIONS, FAST_ITERATIONS])

    def test_get_info_with_bearer_and_x_access_token(self):
        token = self.login()[2]["token"]
        expected = {"id": 81623, "username": "test", "firstName": "Test", "lastName": "User",
                    "phone": "5235234132"}
        for headers in ({"Authorization": f"Bearer {token}"}, {"x-access-token": token},
                        {"Authorization": f"bearer {token}"}):
            with self.subTest(headers=list(headers)):
                status, response, body = self.client.request("GET", "/users/getInfo", headers=headers)
                self.assertEqual((status, body), (200, expected))
                self.assertEqual(response.getheader("Access-Control-Allow-Origin"), "*")

    def test_no_token_is_403(self):
        for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Basic dGVzdDp0ZXN0"},
                        {"x-access-token": ""}):
            with self.subTest(headers=headers):
                status, response, body = self.client.request("GET", "/users/getInfo", headers=headers)
                self.assertEqual((status, body), (403, {"error": True, "message": "No token provided."}))
                self.assertEqual(response.getheader("Access-Control-Allow-Origin"), "*")

    def test_bad_tokens_are_401_with_name_message_and_www_authenticate(self):
        cases = [
            (token_for(now=time.time() - 7200), "TokenExpiredError", "jwt expired"),
            (token_for(nbf=int(time.time()) + 600), "NotBeforeError", "jwt not active"),
            (token_for(secret="some-other-secret-which-is-long-enough"), "JsonWebTokenError",
             "invalid signature"),
            ("abc.def", "JsonWebTokenError", "jwt malformed"),
            (forge({"alg": "none"}, {"id": 81623, "username": "test", "exp": 2 ** 40}, signature=""),
             "JsonWebTokenError", "invalid algorithm"),
            (forge({"alg": "HS512"}, {"id": 81623, "username": "test", "exp": 2 ** 40}),
             "JsonWebTokenError", "invalid algorithm"),
        ]
        for token, name, message in cases:
            with self.subTest(message):
                status, response, body = self.client.request(
                    "GET", "/users/getInfo", headers={"Authorization": f"Bearer {token}"})
                self.assertEqual((status, body), (401, {"error": True, "name": name, "message": message}))
                self.assertEqual(response.getheader("WWW-Authenticate"),
                                 f'Bearer error="invalid_token", error_description="{message}"')

    def test_signed_token_for_missing_user_is_401_and_server_lives(self):
        for user_id, username in ((99999, "test"), ("81623", "test"), (81623, "ncuser"),
                                  ([81623], "test"), (True, "test"), (None, None)):
            with self.subTest(user_id=user_id):
                token = token_for(user_id, username)
                status, _, body = self.client.request(
                    "GET", "/users/getInfo", headers={"Authorization": f"Bearer {token}"})
                self.assertEqual((status, body), (401, {"error": True, "name": "JsonWebTokenError",
                                                        "message": "user not found"}))
        status, _, _ = self.client.request("GET", "/users/getInfo",
                                           headers={"Authorization": f"Bearer {token_for()}"})
        self.assertEqual(status, 200)

    def test_auth_before_routing(self):
        status, _, body = self.client.request("GET", "/nowhere")
        self.assertEqual((status, body), (403, {"error": True, "message": "No token provided."}))
        status, _, body = self.client.request("GET", "/nowhere",
                                              headers={"Authorization": f"Bearer {token_for()}"})
        self.assertEqual((status, body), (404, {"message": "No route for /nowhere"}))

    def test_wrong_method_is_405_with_allow(self):
        status, response, body = self.client.request(
            "DELETE", "/users/getInfo", headers={"Authorization": f"Bearer {token_for()}"})
        self.assertEqual((status, body), (405, {"message": "Method DELETE not allowed on /users/getInfo"}))
        self.assertEqual(response.getheader("Allow"), "GET, HEAD, OPTIONS")
        status, response, body = self.client.request("GET", "/users/authenticate")
        self.assertEqual(status, 405)
        self.assertEqual(response.getheader("Allow"), "POST, OPTIONS")

    def test_head(self):
        status, response, body = self.client.request(
            "HEAD", "/users/getInfo", headers={"Authorization": f"Bearer {token_for()}"})
        self.assertEqual((status, body), (200, b""))
        self.assertEqual(response.getheader("Content-Length"), "88")

    def test_cors_preflight(self):
        status, response, body = self.client.request("OPTIONS", "/users/getInfo", headers={
            "Origin": "null", "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization,content-type"})
        self.assertEqual((status, body), (204, b""))
        self.assertEqual(response.getheader("Access-Control-Allow-Origin"), "*")
        self.assertEqual(response.getheader("Access-Control-Allow-Methods"), "GET,HEAD,PUT,PATCH,POST,DELETE")
        self.assertEqual(response.getheader("Access-Control-Allow-Headers"), "authorization,content-type")
        self.assertEqual(response.getheader("Vary"), "Access-Control-Request-Headers")
        self.assertIsNone(response.getheader("Content-Length"))

    def test_page_served_at_root(self):
        status, response, body = self.client.request("GET", "/")
        self.assertEqual(status, 200)
        self.assertEqual(response.getheader("Content-Type"), "text/html; charset=utf-8")
        self.assertIn("connect-src 'self'", response.getheader("Content-Security-Policy"))
        self.assertIn("frame-ancestors 'none'", response.getheader("Content-Security-Policy"))
        self.assertEqual(body, (HERE / "test.html").read_bytes())
        for element in ('id="id_username"', 'id="id_password"', "id='btn'", "id='infoBtn'",
                        'id="output"'):
            self.assertIn(element.encode(), body)

    def test_page_loads_nothing_from_elsewhere(self):
        page = (HERE / "test.html").read_text()
        self.assertNotRegex(page, r"(src|href)\s*=\s*['\"]?(https?:)?//")
        self.assertNotIn("@import", page)
        self.assertIn("'http://localhost:4000'", page)       # opened from disk
        self.assertIn("location.protocol.startsWith('http') ? location.origin", page)  # served
        self.assertIn("params.get('api')", page)

    def test_log_has_one_line_per_request_and_no_secrets(self):
        token = self.login()[2]["token"]
        self.client.request("GET", "/users/getInfo?token=" + token,
                            headers={"Authorization": f"Bearer {token}"})
        lines = self.server.test_log.getvalue().splitlines()
        self.assertEqual(len(lines), 2, lines)
        self.assertRegex(lines[0], r"^\S+Z 127\.0\.0\.1 POST /users/authenticate 200 \d+\.\dms$")
        self.assertRegex(lines[1], r"^\S+Z 127\.0\.0\.1 GET /users/getInfo 200 \d+\.\dms$")
        log = self.server.test_log.getvalue()
        for secret in (token, b64("test"), SECRET, "Bearer"):
            self.assertNotIn(secret, log)

    def test_issuer_and_audience_when_configured(self):
        server = start_server(self, issuer="authserver.local", audience="demo-app")
        client = Client(server)
        token = client.request("POST", "/users/authenticate", login_body())[2]["token"]
        claims = decode_token(token, SECRET)
        self.assertEqual((claims["iss"], claims["aud"]), ("authserver.local", "demo-app"))
        self.assertEqual(client.request("GET", "/users/getInfo",
                                        headers={"x-access-token": token})[0], 200)
        status, _, body = client.request("GET", "/users/getInfo", headers={"x-access-token": token_for()})
        self.assertEqual((status, body["message"]), (401, "jwt audience invalid. expected: demo-app"))
        client.close()


class TestBruteForce(unittest.TestCase):

    def test_429_after_too_many_failures_per_user(self):
        server = start_server(self, loginAttempts=3, loginWindow=60)
        client = Client(server)
        for _ in range(3):
            self.assertEqual(client.request("POST", "/users/authenticate", login_body("test", "x"))[0], 400)
        status, response, body = client.request("POST", "/users/authenticate", login_body("test", "test"))
        self.assertEqual(status, 429)
        self.assertEqual(body, {"message": f"Too many failed logins; try again in "
                                           f"{response.getheader('Retry-After')} seconds"})
        self.assertTrue(1 <= int(response.getheader("Retry-After")) <= 61)
        client.close()

    def test_429_per_address_across_usernames(self):
        server = start_server(self, loginAttempts=3, addressLoginAttempts=3, loginWindow=60)
        client = Client(server)
        for name in ("a", "b", "c"):
            client.request("POST", "/users/authenticate", login_body(name, "x"))
        self.assertEqual(client.request("POST", "/users/authenticate", login_body("ncuser", "ncpassword"))[0], 429)
        client.close()

    def test_password_hashes_run_one_per_cpu_at_most(self):
        server = start_server(self, loginAttempts=100)
        server.hash_slots = threading.BoundedSemaphore(2)
        running, most, lock = [0], [0], threading.Lock()
        original = hashlib.pbkdf2_hmac

        def slow_hash(*args):
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
            time.sleep(0.05)                        # stands in for the cost of a real hash
            with lock:
                running[0] -= 1
            return original(*args)
        answers = []

        def login():
            answers.append(raw_exchange(server, post(json.dumps(login_body())))[0])
        with mock.patch("hashlib.pbkdf2_hmac", side_effect=slow_hash):
            threads = [threading.Thread(target=login) for _ in range(6)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        self.assertEqual(answers, [200] * 6)
        self.assertLessEqual(most[0], 2)

    def test_window_slides_and_memory_is_bounded(self):
        limiter = authserver.LoginLimiter({"user": 2}, window=60, max_keys=100)
        self.assertEqual(limiter.reserve([("user", "a")], 1000), 0)
        self.assertEqual(limiter.reserve([("user", "a")], 1010), 0)
        self.assertEqual(limiter.reserve([("user", "a")], 1020), 41)
        self.assertEqual(limiter.reserve([("user", "a")], 1061), 0)
        for n in range(10000):
            limiter.reserve([("user", str(n))], 2000)
        self.assertEqual(len(limiter.started["user"]), 100)


# ---------------------------------------------------------------------------
# Hostile HTTP: every bad request gets its 4xx, in JSON
# ---------------------------------------------------------------------------

def post(body, content_type="application/json", extra=""):
    body = body.encode() if isinstance(body, str) else body
    return (f"POST /users/authenticate HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body


HOSTILE = [
    # (description, raw request, status)
    ("malformed JSON", post("{username"), 400),
    ("JSON array", post("[1,2]"), 400),
    ("JSON null", post("null"), 400),
    ("invalid UTF-8", post(b'{"username":"\xff","password":"dGVzdA=="}'), 400),
    ("deeply nested", post("[" * 8000 + "]" * 8000), 400),
    ("username a number", post('{"username":1,"password":"dGVzdA=="}'), 400),
    ("password an object", post('{"username":"test","password":{}}'), 400),
    ("missing password", post('{"username":"test"}'), 400),
    ("NUL in username", post('{"username":"te\\u0000st","password":"dGVzdA=="}'), 400),
    ("NaN", post('{"username":NaN,"password":"dGVzdA=="}'), 400),
    ("text/plain", post('{"username":"test","password":"dGVzdA=="}', "text/plain"), 415),
    ("repeated form field", post("username=a&username=b&password=x",
                                 "application/x-www-form-urlencoded"), 400),
    ("form with bad UTF-8", post("username=%ff&password=x", "application/x-www-form-urlencoded"), 400),
    ("body too large", post("x" * 20000), 413),
    ("no Content-Length", b"POST /users/authenticate HTTP/1.1\r\nHost: x\r\n\r\n", 411),
    ("negative Content-Length", b"POST /users/authenticate HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
    ("text Content-Length", b"POST /users/authenticate HTTP/1.1\r\nContent-Length: ten\r\n\r\n", 400),
    ("chunked", b"POST /users/authenticate HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 411),
    ("bad request line", b"GARBAGE\r\n\r\n", 400),
    ("HTTP/0.9", b"GET /\r\n\r\n", 400),
    ("HTTP/2.0", b"GET / HTTP/2.0\r\n\r\n", 505),
    ("unknown method", b"BREW / HTTP/1.1\r\n\r\n", 501),
    ("request line too long", b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\n\r\n", 414),
    ("headers too large", b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", 431),
    ("too many headers", b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % n for n in range(150)) + b"\r\n", 431),
    ("space before colon", b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", 400),
    ("folded header", b"GET / HTTP/1.1\r\nX-A: 1\r\n  folded\r\n\r\n", 400),
    ("absolute-form target", b"GET http://evil/ HTTP/1.1\r\n\r\n", 400),
    ("path traversal", b"GET /../../etc/passwd HTTP/1.1\r\n\r\n", 403),
    ("token of 100 KB", b"GET /users/getInfo HTTP/1.1\r\nx-access-token: " + b"a" * 100000 + b"\r\n\r\n", 431),
    ("unknown Expect", post('{"username":"test","password":"dGVzdA=="}', extra="Expect: teapot\r\n"), 417),
]


class SharedServerCase(unittest.TestCase):
    """One server for all the tests of a class, with the settings in server_config."""

    server_config = {}

    @classmethod
    def setUpClass(cls):
        cls.server = start_server(cls, **cls.server_config)

    @classmethod
    def addCleanup(cls, function, *args, **kwargs):         # start_server registers its stop
        cls.addClassCleanup(function, *args, **kwargs)


class TestHostileHTTP(SharedServerCase):

    def test_each_hostile_request_gets_its_status_in_json(self):
        for description, request, expected in HOSTILE:
            with self.subTest(description):
                status, headers, body = raw_exchange(self.server, request)
                self.assertEqual(status, expected, body)
                self.assertEqual(headers["content-type"], "application/json; charset=utf-8")
                self.assertEqual(headers["access-control-allow-origin"], "*")
                self.assertIn("message", json.loads(body))
        # ... and the server is still fine.
        status, _, _ = raw_exchange(self.server, post(json.dumps(login_body())))
        self.assertEqual(status, 200)

    def test_an_error_closes_the_connection_it_could_not_read(self):
        status, headers, _ = raw_exchange(self.server, post("x" * 20000))
        self.assertEqual((status, headers["connection"]), (413, "close"))

    def test_expect_100_continue(self):
        with socket.create_connection(("127.0.0.1", self.server.server_address[1]), timeout=10) as sock:
            body = json.dumps(login_body()).encode()
            sock.sendall(b"POST /users/authenticate HTTP/1.1\r\nContent-Type: application/json\r\n"
                         b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
            self.assertEqual(sock.recv(100), b"HTTP/1.1 100 Continue\r\n\r\n")
            sock.sendall(body)
            self.assertEqual(read_response(sock)[0], 200)

    def test_unexpected_exception_is_a_json_500_and_the_server_lives(self):
        with mock.patch.dict(self.server.routes.actions, {("GET", "/"): lambda request: 1 / 0}):
            status, _, body = raw_exchange(self.server, b"GET / HTTP/1.1\r\n\r\n")
        self.assertEqual((status, json.loads(body)), (500, {"message": "Internal Server Error"}))
        self.assertIn("ZeroDivisionError", self.server.test_log.getvalue())
        self.assertEqual(raw_exchange(self.server, b"GET / HTTP/1.1\r\n\r\n")[0], 200)

    def test_http_servers_own_error_pages_are_never_reached(self):
        # Requests http.server would answer with send_error's HTML: we answer each in JSON.
        too_many_headers = b"".join(b"X-%d: 1\r\n" % number for number in range(101))
        table = [(b"GET / HTTP/1.1 extra\r\n\r\n", 400),
                 (b"GET / HTTP/2.0\r\n\r\n", 505),
                 (b"BREW / HTTP/1.1\r\n\r\n", 501),
                 (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414),
                 (b"GET / HTTP/1.1\r\n" + too_many_headers + b"\r\n", 431),
                 (b"POST / HTTP/1.1\r\nExpect: nope\r\nContent-Length: 1\r\n\r\nx", 417)]
        with mock.patch.object(http.server.BaseHTTPRequestHandler, "send_error") as send_error:
            for request, expected in table:
                with self.subTest(expected=expected):
                    status, headers, body = raw_exchange(self.server, request)
                    self.assertEqual(status, expected)
                    self.assertEqual(headers["content-type"], "application/json; charset=utf-8")
                    self.assertIn("message", json.loads(body))
        send_error.assert_not_called()

    def test_reset_connection_is_one_log_line(self):
        handled = threading.Event()
        original = self.server.handle_error

        def noting(request, client_address):
            original(request, client_address)
            handled.set()
        with mock.patch.object(self.server, "handle_error", noting):
            with socket.create_connection(("127.0.0.1", self.server.server_address[1])) as sock:
                sock.sendall(b"POST /users/authenticate HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
            self.assertTrue(handled.wait(10))
        # The server logged the close in one line, and serves the next client.
        self.assertEqual(raw_exchange(self.server, b"GET / HTTP/1.1\r\n\r\n")[0], 200)
        log = self.server.test_log.getvalue()
        self.assertIn("connection ended: ClientGone", log)
        self.assertNotIn("Traceback", log)


# ---------------------------------------------------------------------------
# Connections: keep-alive, Connection: close, one write, slow clients
# ---------------------------------------------------------------------------

class TestConnections(unittest.TestCase):

    def test_keep_alive_answers_several_requests_on_one_connection(self):
        server = start_server(self)
        with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10) as sock:
            request = f"GET /users/getInfo HTTP/1.1\r\nAuthorization: Bearer {token_for()}\r\n\r\n".encode()
            for _ in range(5):
                sock.sendall(request)
                status, headers, body = read_response(sock)
                self.assertEqual(status, 200)
                self.assertNotIn("connection", headers)
                self.assertEqual(json.loads(body)["id"], 81623)

    def test_connection_close_is_honoured_and_echoed(self):
        server = start_server(self)
        for request in (b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", b"GET / HTTP/1.0\r\n\r\n"):
            with self.subTest(request), socket.create_connection(
                    ("127.0.0.1", server.server_address[1]), timeout=10) as sock:
                sock.sendall(request)
                status, headers, body = read_response(sock)
                self.assertEqual((status, headers["connection"]), (200, "close"))
                self.assertEqual(sock.recv(10), b"")       # and the server did close

    def test_http10_keep_alive_is_echoed(self):
        server = start_server(self)
        status, headers, _ = raw_exchange(server, b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        self.assertEqual((status, headers["connection"]), (200, "keep-alive"))

    def test_a_response_is_one_write_with_content_length(self):
        server = start_server(self)
        writes = []
        original = socketserver._SocketWriter.write

        def recording(writer, data):
            writes.append(bytes(data))
            return original(writer, data)
        with mock.patch.object(socketserver._SocketWriter, "write", recording):
            status, headers, body = raw_exchange(
                server, f"GET /users/getInfo HTTP/1.1\r\nx-access-token: {token_for()}\r\n\r\n".encode())
        self.assertEqual(status, 200)
        self.assertEqual(len(writes), 1)
        self.assertTrue(writes[0].endswith(body))
        self.assertEqual(int(headers["content-length"]), len(body))

    def test_nagle_is_off(self):
        server = start_server(self)
        seen = []
        original = authserver.AuthRequestHandler.setup

        def spying(handler):
            original(handler)
            seen.append(handler.connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        with mock.patch.object(authserver.AuthRequestHandler, "setup", spying):
            raw_exchange(server, b"GET / HTTP/1.1\r\n\r\n")
        self.assertEqual(len(seen), 1)
        self.assertTrue(seen[0])

    def test_a_reset_connection_leaves_nothing_watched(self):
        server = start_server(self)
        handled = threading.Event()
        original = server.handle_error

        def noting(request, client_address):
            original(request, client_address)
            handled.set()
        with mock.patch.object(server, "handle_error", noting):
            sock = socket.create_connection(("127.0.0.1", server.server_address[1]))
            raw_exchange(server, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")  # past accept
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()                                                # RST, not FIN
            self.assertTrue(handled.wait(10))
        self.assertIn("ConnectionResetError", server.test_log.getvalue())
        # raw_exchange's own connection is unwatched just after its answer was read.
        self.assertTrue(poll_until(lambda: server.deadlines == {}), server.deadlines)

    def test_listen_backlog(self):
        self.assertGreaterEqual(authserver.AuthServer.request_queue_size, 128)

    def test_slow_and_idle_clients_do_not_block_others_and_are_cut_off(self):
        server = start_server(self, requestTimeout=1, maxConnections=1000,
                              maxConnectionsPerAddress=1000)      # one address may hold 500
        port = server.server_address[1]
        stalled, idle = [], []
        try:
            for _ in range(200):
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                sock.sendall(b"GET /users/getInfo HTTP/1.1\r\nX-Slow: ")   # never finished
                stalled.append(sock)
                idle.append(socket.create_connection(("127.0.0.1", port), timeout=10))
            started = time.monotonic()
            status, _, _ = raw_exchange(server, b"GET / HTTP/1.1\r\n\r\n", timeout=3)
            self.assertEqual(status, 200)
            self.assertLess(time.monotonic() - started, 1.0)
            # Each stalled client gets a 408 once its second is up, then EOF.
            for sock in stalled[:20]:
                status, headers, body = read_response(sock)
                self.assertEqual((status, headers["connection"]), (408, "close"))
                self.assertEqual(json.loads(body), {"message": "Request not received in time"})
                self.assertEqual(sock.recv(10), b"")
            for sock in idle[:20]:
                self.assertEqual(sock.recv(10), b"")      # idle: closed without a word
        finally:
            for sock in stalled + idle:
                sock.close()

    def test_slowloris_trickle_is_cut_off_too(self):
        server = start_server(self, requestTimeout=1)
        with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\n")
            started = time.monotonic()
            answer = b""
            while not answer and time.monotonic() - started < 5:
                sock.sendall(b"X")                          # a byte at a time, never a line
                sock.settimeout(0.2)
                try:
                    answer = sock.recv(100)
                except socket.timeout:
                    pass
            self.assertTrue(answer.startswith(b"HTTP/1.1 408 "), answer)
            self.assertLess(time.monotonic() - started, 3)


class TestTLS(unittest.TestCase):

    CERT = """-----BEGIN CERTIFICATE-----
MIIBnDCCAUGgAwIBAgIUe4CFqbVT7UNqj5SwJMFnAc1a4yIwCgYIKoZIzj0EAwIw
FDESMBAGA1UEAwwJbG9jYWxob3N0MCAXDTI2MTEyODIyMjk1OFoYDzIxMjYxMTA0
MjIyOTU4WjAUMRIwEAYDVQQDDAlsb2NhbGhvc3QwWTATBgcqhkjOPQIBBggqhkjO
PQMBBwNCAAQy77YPWaH0WS6nfGpNEkPAVbSUfO1GHExNnE4XTKGPLKUwJ7RHJQ0J
HGjvfr9Th1Q4ZFG13QrnUCP+o9YHSGp3o28wbTAdBgNVHQ4EFgQUexgFjHXT6uRu
OnQ9zGbeGcXxckgwHwYDVR0jBBgwFoAUexgFjHXT6uRuOnQ9zGbeGcXxckgwDwYD
VR0TAQH/BAUwAwEB/zAaBgNVHREEEzARgglsb2NhbGhvc3SHBH8AAAEwCgYIKoZI
zj0EAwIDSQAwRgIhANuzhGMgnrdXVv80K1C8AjYATwZC2E5F6v8rztDW/T/VAiEA
5Pyzk9bhtkMXIMe6ILNW/gQzICRv78BkZM3E9DqBrnU=
-----END CERTIFICATE-----
"""
    # A throwaway self-signed key for localhost / 127.0.0.1, made for this test only.
    KEY = """-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgPlpMgkD3a+sPjhFG
KhwDK4SGoQ9qmdUGgd4q3uh2OLuhRANCAAQy77YPWaH0WS6nfGpNEkPAVbSUfO1G
HExNnE4XTKGPLKUwJ7RHJQ0JHGjvfr9Th1Q4ZFG13QrnUCP+o9YHSGp3
-----END PRIVATE KEY-----
"""

    def test_https_round_trip(self):
        files = Files(self)
        (files.folder / "cert.pem").write_text(self.CERT)
        (files.folder / "key.pem").write_text(self.KEY)
        context = authserver.make_tls_context(files.folder / "cert.pem", files.folder / "key.pem")
        server = start_server(self, files, tls_context=context)
        client_context = ssl.create_default_context(cadata=self.CERT)
        client = Client(server, client_context)
        status, _, body = client.request("POST", "/users/authenticate", login_body())
        self.assertEqual(status, 200)
        status, _, info = client.request("GET", "/users/getInfo",
                                         headers={"Authorization": f"Bearer {body['token']}"})
        self.assertEqual((status, info["username"]), (200, "test"))
        client.close()
        # Plain HTTP to the TLS port is refused without harming the server.
        with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
            try:
                self.assertNotIn(b"200 OK", sock.recv(100))
            except ConnectionResetError:
                pass
        client = Client(server, client_context)
        self.assertEqual(client.request("GET", "/")[0], 200)
        client.close()


# ---------------------------------------------------------------------------
# The command line, as a subprocess
# ---------------------------------------------------------------------------

def run_cli(*args, stdin="", timeout=30):
    return subprocess.run([sys.executable, str(HERE / "authserver.py"), *map(str, args)],
                          input=stdin, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "NO_COLOR": "1"})


class ServerProcess:
    """python authserver.py ... as a subprocess; the port read from its banner.

    Its output is read by two threads into queues, so that every read here has a timeout
    (a pipe has none): a server that hangs fails the test instead of hanging the suite.
    """

    def __init__(self, test, *args):
        self.process = subprocess.Popen(
            [sys.executable, str(HERE / "authserver.py"), "--port", "0", *map(str, args)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        test.addCleanup(self.close)
        self.lines = {"stdout": queue.Queue(), "stderr": queue.Queue()}
        self.pumps = [threading.Thread(target=self.pump, args=(stream, self.lines[name]),
                                       daemon=True)
                      for name, stream in (("stdout", self.process.stdout),
                                           ("stderr", self.process.stderr))]
        for pump in self.pumps:
            pump.start()
        self.banner = [self.readline()]
        while not self.banner[-1].startswith("Ctrl-C"):
            line = self.readline()
            if not line:
                raise AssertionError(f"server did not start: {self.read_rest('stderr')}")
            self.banner.append(line)
        self.port = int(self.banner[1].strip().split()[0].rsplit(":", 1)[1])

    @staticmethod
    def pump(stream, lines):
        for line in iter(stream.readline, ""):
            lines.put(line)
        lines.put("")                                   # end of output

    def readline(self, stream="stdout", timeout=20):
        """The next line the server wrote on stream; "" at its end; fails after timeout."""
        try:
            return self.lines[stream].get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line on the server's {stream} in {timeout} s") from None

    def read_rest(self, stream, timeout=20):
        """Everything left on stream up to its end (the process must be ending)."""
        lines = []
        while not lines or lines[-1]:
            lines.append(self.readline(stream, timeout))
        return "".join(lines)

    def close(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=20)
        for pump in self.pumps:
            pump.join(timeout=20)
        self.process.stdout.close()
        self.process.stderr.close()


class TestCommandLine(unittest.TestCase):

    def test_missing_config_is_one_line_and_exit_2(self):
        result = run_cli("--config", "/nonexistent/config.json")
        self.assertEqual(result.returncode, 2)
        self.assertEqual(result.stderr, "authserver: config file /nonexistent/config.json: no such file\n")

    def test_malformed_users_file(self):
        files = Files(self)
        files.users.write_text("{not json")
        result = run_cli("--config", files.config, "--users", files.users)
        self.assertEqual(result.returncode, 2)
        self.assertTrue(result.stderr.startswith(f"authserver: users file {files.users}:"))
        self.assertEqual(len(result.stderr.splitlines()), 1)

    def test_short_secret_refuses_to_start(self):
        files = Files(self, secret="short")
        result = run_cli("--config", files.config, "--users", files.users)
        self.assertEqual(result.returncode, 2)
        self.assertIn("RFC 7518", result.stderr)

    def test_taken_port(self):
        files = Files(self)
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            result = run_cli("--config", files.config, "--users", files.users, "--port", port)
        self.assertEqual(result.returncode, 2)
        self.assertEqual(result.stderr.count("\n"), 1)
        self.assertIn(f"cannot listen on 127.0.0.1 port {port}", result.stderr)

    def test_adduser_and_passwd(self):
        files = Files(self, passwordIterations=FAST_ITERATIONS)
        common = ("--config", files.config, "--users", files.users)
        result = run_cli("adduser", "alice", "--first-name", "Alice", "--phone", "123", *common,
                         stdin="wonderland\n")
        self.assertEqual(result.returncode, 0, result.stderr)
        users = json.loads(files.users.read_text())
        alice = users[-1]
        self.assertEqual([u["username"] for u in users], ["test", "ncuser", "café", "alice"])
        self.assertEqual((alice["firstName"], alice["phone"]), ("Alice", "123"))
        self.assertEqual(len({u["id"] for u in users}), 4)
        self.assertTrue(verify_password("wonderland", alice["passwordHash"]))
        self.assertNotIn("wonderland", files.users.read_text())
        self.assertEqual(run_cli("adduser", "alice", *common, stdin="x\n").returncode, 2)
        result = run_cli("passwd", "alice", *common, stdin="looking-glass\n")
        self.assertEqual(result.returncode, 0, result.stderr)
        after = json.loads(files.users.read_text())
        self.assertTrue(verify_password("looking-glass", after[-1]["passwordHash"]))
        self.assertEqual(after[:3], users[:3])                       # others untouched
        self.assertEqual({k: v for k, v in after[-1].items() if k != "passwordHash"},
                         {k: v for k, v in alice.items() if k != "passwordHash"})
        self.assertEqual(run_cli("passwd", "nobody", *common, stdin="x\n").returncode, 2)
        self.assertEqual(run_cli("passwd", "alice", *common, stdin="\n").returncode, 2)

    def test_passwd_fixes_a_plaintext_user(self):
        files = Files(self, users=[{"id": 1, "username": "bob", "password": "hunter2"}],
                      passwordIterations=FAST_ITERATIONS)
        self.assertEqual(run_cli("passwd", "bob", "--config", files.config, "--users", files.users,
                                 stdin="hunter3\n").returncode, 0)
        authserver.UserStore(files.users)          # now loads

    def test_token_command_gives_a_token_the_server_accepts(self):
        files = Files(self)
        result = run_cli("token", "test", "--config", files.config, "--users", files.users)
        self.assertEqual(result.returncode, 0, result.stderr)
        token = result.stdout.strip()
        server = start_server(self, files)
        client = Client(server)
        status, _, body = client.request("GET", "/users/getInfo", headers={"Authorization": f"Bearer {token}"})
        self.assertEqual((status, body["username"]), (200, "test"))
        client.close()
        self.assertEqual(run_cli("token", "nobody", "--config", files.config,
                                 "--users", files.users).returncode, 2)

    def test_explain(self):
        files = Files(self)
        now = time.time()
        expired = token_for(now=now - 7200)
        tampered = token_for().split(".")
        tampered[1] = b64url_encode(json.dumps({"id": 26858, "username": "ncuser", "exp": 2 ** 40}).encode())
        cases = [
            (token_for(), 0, "Verdict: valid"),
            (token_for()[:-3] + "AAA", 1, "JsonWebTokenError: invalid signature"),
            (".".join(tampered), 1, "JsonWebTokenError: invalid signature"),
            (forge({"alg": "none"}, {"exp": 2 ** 40}, signature=""), 1,
             "JsonWebTokenError: invalid algorithm"),
            (expired, 1, "TokenExpiredError: jwt expired"),
            ("not-a-token", 1, "JsonWebTokenError: jwt malformed"),
            (token_for(99999, "ghost"), 1, "JsonWebTokenError: user not found"),
        ]
        server = start_server(self, files)                     # what the server itself says
        client = Client(server)
        self.addCleanup(client.close)
        for token, code, verdict in cases:      # in this process; below, as a command
            with self.subTest(verdict):
                result = subprocess.CompletedProcess("explain", *main_in_process(
                    "explain", token, "--config", files.config, "--users", files.users))
                self.assertEqual(result.returncode, code, result.stdout + result.stderr)
                self.assertIn(verdict, result.stdout)
                self.assertNotIn(SECRET, result.stdout)
                self.assertNotIn("\033[", result.stdout)
                status, _, answer = client.request(
                    "GET", "/users/getInfo", headers={"Authorization": f"Bearer {token}"})
                server_verdict = ("Verdict: valid" if status == 200
                                  else f"{answer['name']}: {answer['message']}")
                self.assertIn(server_verdict, result.stdout)
        # The values a learner wants to see, for a valid token.
        token = token_for()
        head, body, signature = token.split(".")
        out = run_cli("explain", "--config", files.config, "--users", files.users,
                      stdin=token + "\n").stdout
        for value in (head, body, signature, '{"alg":"HS256","typ":"JWT"}', '"username":"test"',
                      f"computed  {signature}", f"presented {signature}", "UTC", "in 0h 59m",
                      "id 81623 is user 'test'"):
            self.assertIn(value, out)
        out = run_cli("explain", expired, "--config", files.config, "--users", files.users).stdout
        self.assertIn("ago)", out)

    def test_explain_survives_hostile_tokens(self):
        files = Files(self)
        far = forge(GOOD_HEADER, {"id": 81623, "username": "test", "exp": 10 ** 20})
        result = run_cli("explain", far, "--config", files.config, "--users", files.users)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("exp 100000000000000000000 (beyond any calendar date)", result.stdout)
        raw_escape = b64url_encode(b'{"alg":"HS256","x":"\x1b[2J"}')     # not even JSON
        result = run_cli("explain", f"{raw_escape}.{BODY}.{SIGNATURE}", "--config", files.config,
                         "--users", files.users)
        self.assertEqual((result.returncode, result.stderr), (1, ""))
        self.assertIn('{"alg":"HS256","x":"\\x1b[2J"}', result.stdout)
        self.assertNotIn("\x1b", result.stdout)

    @unittest.skipUnless(hasattr(os, "openpty"), "needs a POSIX terminal")
    def test_explain_colours_a_terminal_unless_no_color(self):
        files = Files(self)
        for environment, coloured in (({}, True), ({"NO_COLOR": "1"}, False)):
            leader, follower = os.openpty()
            env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
            process = subprocess.Popen(
                [sys.executable, str(HERE / "authserver.py"), "explain", token_for(),
                 "--config", str(files.config), "--users", str(files.users)],
                stdout=follower, stderr=follower, env={**env, **environment})
            os.close(follower)
            output = b""
            while True:
                # A pty has no timeout of its own: wait for output at most 30 s.
                if not select.select([leader], [], [], 30)[0]:
                    process.kill()
                    self.fail(f"explain wrote nothing for 30 s: {output!r}")
                try:
                    chunk = os.read(leader, 65536)
                except OSError:                     # the terminal closed: the program ended
                    break
                if not chunk:
                    break
                output += chunk
            os.close(leader)
            self.assertEqual(process.wait(timeout=30), 0)
            self.assertIn(b"Verdict: valid", output)
            self.assertEqual(b"\033[" in output, coloured, environment)

    def test_lan_banner_lists_urls(self):
        files = Files(self)
        server = ServerProcess(self, "--host", "0.0.0.0", "--config", files.config, "--users", files.users)
        banner = "".join(server.banner)
        self.assertIn(f"http://127.0.0.1:{server.port}", banner)
        self.assertIn(f"http://10.0.2.2:{server.port}  (from the Android emulator)", banner)
        status, _, _ = raw_exchange(server.port, b"GET / HTTP/1.1\r\n\r\n")
        self.assertEqual(status, 200)

    def test_sighup_reloads_users_at_once(self):
        files = Files(self)
        server = ServerProcess(self, "--config", files.config, "--users", files.users)
        authserver.save_users(files.users, TEST_USERS[:1])
        server.process.send_signal(signal.SIGHUP)
        self.assertIn("users file reloaded: 1 users", server.readline("stderr"))
        status, _, body = raw_exchange(server.port, post(json.dumps(login_body("ncuser", "ncpassword"))))
        self.assertEqual(status, 400)

    def test_ctrl_c_stops_cleanly(self):
        files = Files(self)
        server = ServerProcess(self, "--config", files.config, "--users", files.users)
        server.process.send_signal(signal.SIGINT)
        self.assertEqual(server.process.wait(timeout=10), 0)
        self.assertEqual(server.read_rest("stdout"), "authserver stopped.\n")
        self.assertNotIn("Traceback", server.read_rest("stderr"))

    def test_sigterm_lets_a_request_in_flight_finish_then_exits_0(self):
        files = Files(self)
        server = ServerProcess(self, "--config", files.config, "--users", files.users)
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            body = json.dumps(login_body()).encode()
            sock.sendall(b"POST /users/authenticate HTTP/1.1\r\nContent-Type: application/json\r\n"
                         b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
            self.assertEqual(sock.recv(100), b"HTTP/1.1 100 Continue\r\n\r\n")   # in flight now
            server.process.send_signal(signal.SIGTERM)
            line = server.readline("stderr")
            self.assertIn("stopping: waiting for 1 request(s) in flight", line)
            with self.assertRaises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", server.port), timeout=5).close()
            sock.sendall(body)
            status, headers, answer = read_response(sock)
        self.assertEqual((status, headers["connection"]), (200, "close"))
        self.assertIn("token", json.loads(answer))
        self.assertEqual(server.process.wait(timeout=10), 0)
        self.assertIn("authserver stopped.", server.read_rest("stdout"))


# authserver run as if on Windows: no fcntl, and an msvcrt whose byte-range lock is made of
# POSIX record locks, so that the fallback path is exercised by real processes.
AS_IF_ON_WINDOWS = """
import fcntl, sys, types
msvcrt = types.ModuleType("msvcrt")
msvcrt.LK_UNLCK, msvcrt.LK_LOCK = 0, 1
def locking(fd, mode, nbytes):
    fcntl.lockf(fd, fcntl.LOCK_EX if mode == msvcrt.LK_LOCK else fcntl.LOCK_UN, nbytes, 0)
msvcrt.locking = locking
sys.modules["msvcrt"], sys.modules["fcntl"] = msvcrt, None
sys.path.insert(0, sys.argv.pop(1))
import authserver
assert authserver.fcntl is None
sys.exit(authserver.main(sys.argv[1:]))
"""


class TestUsersFileWriters(unittest.TestCase):
    """adduser, passwd (and sign-up) at the same time lose nothing and leave nothing behind."""

    def run_at_once(self, commands, prefix=()):
        """Start every command as a process, then give them all their password at once."""
        processes = []
        for args, password in commands:
            process = subprocess.Popen([sys.executable, *prefix, *map(str, args)],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
            self.addCleanup(process.kill)
            processes.append((process, password))
        results = [process.communicate(password + "\n", timeout=60) for process, password in processes]
        for (process, _), (out, err) in zip(processes, results):
            self.assertEqual(process.returncode, 0, err)
        return results

    def adduser_commands(self, files, count, prefix_args=()):
        common = ("--config", files.config, "--users", files.users)
        return [((*prefix_args, "adduser", f"user{number}", *common), f"password{number}")
                for number in range(count)]

    def assert_all_added(self, files, count):
        users = json.loads(files.users.read_text())
        names = sorted(user["username"] for user in users)
        self.assertEqual(names, sorted(["test", "ncuser", "café"] + [f"user{n}" for n in range(count)]))
        self.assertEqual(len({user["id"] for user in users}), len(users))
        authserver.UserStore(files.users)                    # and the server still loads it

    @unittest.skipIf(sys.platform == "win32", "uses fcntl")
    def test_a_dozen_adduser_processes_at_once_all_land(self):
        files = Files(self, passwordIterations=FAST_ITERATIONS)
        self.run_at_once(self.adduser_commands(files, 12), prefix=(str(HERE / "authserver.py"),))
        self.assert_all_added(files, 12)
        self.assertEqual(sorted(p.name for p in files.folder.iterdir()),
                         ["config.json", "users.json", "users.json.lock"])

    @unittest.skipIf(sys.platform == "win32", "simulates Windows with fcntl")
    def test_the_windows_lock_path_keeps_every_user_too(self):
        files = Files(self, passwordIterations=FAST_ITERATIONS)
        self.run_at_once(self.adduser_commands(files, 6, prefix_args=(HERE,)),
                         prefix=("-c", AS_IF_ON_WINDOWS))
        self.assert_all_added(files, 6)

    def test_passwd_beside_adduser_keeps_both(self):
        files = Files(self, passwordIterations=FAST_ITERATIONS)
        common = ("--config", files.config, "--users", files.users)
        script = str(HERE / "authserver.py")
        self.run_at_once([((script, "adduser", "alice", *common), "wonderland"),
                          ((script, "passwd", "test", *common), "new-test-password")])
        users = {user["username"]: user for user in json.loads(files.users.read_text())}
        self.assertTrue(verify_password("wonderland", users["alice"]["passwordHash"]))
        self.assertTrue(verify_password("new-test-password", users["test"]["passwordHash"]))

    @unittest.skipIf(sys.platform == "win32", "probes with fcntl")
    def test_the_lock_is_held_from_the_read_to_the_rename(self):
        files = Files(self)
        probe = ("import fcntl, sys\n"
                 "with open(sys.argv[1], 'a+b') as lock:\n"
                 "    try:\n"
                 "        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
                 "    except BlockingIOError:\n"
                 "        print('held')\n"
                 "    else:\n"
                 "        print('free')\n")
        lock_path = str(files.users) + ".lock"
        seen = []

        def another_process_sees(when):
            result = subprocess.run([sys.executable, "-c", probe, lock_path], capture_output=True,
                                    text=True, timeout=30)
            seen.append((when, result.stdout.strip()))

        reading, saving = authserver.read_users_list, authserver.save_users
        with mock.patch.object(authserver, "read_users_list",
                               lambda path: another_process_sees("read") or reading(path)), \
                mock.patch.object(authserver, "save_users",
                                  lambda *args: another_process_sees("rename") or saving(*args)):
            authserver.update_users_file(files.users,
                                         lambda users: another_process_sees("change"))
        another_process_sees("after")
        self.assertEqual(seen, [("read", "held"), ("change", "held"), ("rename", "held"),
                                ("after", "free")])

    def test_msvcrt_lock_is_retried_until_it_is_had(self):
        calls = []

        def locking(fd, mode, nbytes):
            calls.append(mode)
            if len(calls) < 3:          # LK_LOCK's own ten tries ran out, twice
                raise OSError(getattr(authserver.errno, "EDEADLOCK", authserver.errno.EDEADLK),
                              "Resource deadlock avoided")

        fake = mock.Mock(LK_LOCK=1, LK_UNLCK=0, locking=locking)
        files = Files(self)
        with mock.patch.object(authserver, "fcntl", None), \
                mock.patch.object(authserver, "msvcrt", fake, create=True):
            with authserver.file_lock(files.users):
                self.assertEqual(calls, [1, 1, 1])
        self.assertEqual(calls, [1, 1, 1, 0])

    def test_msvcrt_errors_other_than_timeout_are_raised(self):
        fake = mock.Mock(LK_LOCK=1, LK_UNLCK=0,
                         locking=mock.Mock(side_effect=OSError(authserver.errno.EBADF, "bad")))
        files = Files(self)
        with mock.patch.object(authserver, "fcntl", None), \
                mock.patch.object(authserver, "msvcrt", fake, create=True):
            with self.assertRaises(OSError):
                with authserver.file_lock(files.users):
                    pass

    @unittest.skipUnless(hasattr(signal, "SIGKILL"), "needs kill -9")
    def test_a_writer_killed_before_its_rename_leaves_no_copy_for_long(self):
        files = Files(self, passwordIterations=FAST_ITERATIONS)
        killed_at_rename = ("import os, signal, sys; sys.path.insert(0, sys.argv.pop(1)); "
                            "import authserver; "
                            "os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL); "
                            "authserver.main(sys.argv[1:])")
        common = ("--config", str(files.config), "--users", str(files.users))
        killed = subprocess.run([sys.executable, "-c", killed_at_rename, str(HERE), "adduser",
                                 "ghost", *common], input="boo\n", text=True,
                                capture_output=True, timeout=60)
        self.assertEqual(killed.returncode, -signal.SIGKILL)
        leftovers = list(files.folder.glob(".users.json.*"))
        self.assertEqual(len(leftovers), 1)                     # the copy of the hashes
        self.assertIn(b"passwordHash", leftovers[0].read_bytes())
        # The next start of the server removes it (and so does the next write).
        authserver.make_server(files.config, files.users, "127.0.0.1", 0,
                               log_stream=io.StringIO()).server_close()
        self.assertEqual(list(files.folder.glob(".users.json.*")), [])
        leftovers[0].write_text("[]")
        self.assertEqual(run_cli("adduser", "alice", *common, stdin="x\n").returncode, 0)
        self.assertEqual(list(files.folder.glob(".users.json.*")), [])
        self.assertNotIn("ghost", files.users.read_text())

    def test_ids_do_not_run_out_when_every_five_digit_one_is_taken(self):
        files = Files(self)
        users = [{"id": 10000 + number, "username": f"u{number}"} for number in range(90000)]
        added = []
        with mock.patch.object(authserver, "read_users_list", return_value=users), \
                mock.patch.object(authserver, "check_users"), \
                mock.patch.object(authserver, "save_users"):
            # In a thread: drawing only five-digit ids would look for a free one for ever.
            worker = threading.Thread(target=lambda: added.append(
                authserver.add_user_record(files.users, "newcomer", "hash", {})), daemon=True)
            worker.start()
            worker.join(timeout=20)
        self.assertEqual(len(added), 1, "no free id found")
        self.assertNotIn(added[0]["id"], range(10000, 100000))

    def test_a_server_that_only_reads_makes_no_lock_file(self):
        files = Files(self)
        start_server(self, files)
        self.assertNotIn("users.json.lock", [path.name for path in files.folder.iterdir()])

    def test_two_servers_started_together_share_one_secret(self):
        files = Files(self, secret="")
        barrier = threading.Barrier(8)
        config = authserver.load_config(files.config)
        keys = []

        def start():
            barrier.wait(timeout=10)
            keys.append(authserver.load_secret(config))
        threads = [threading.Thread(target=start) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        self.assertEqual(len(keys), 8)
        self.assertEqual(len(set(keys)), 1)
        self.assertEqual((files.folder / "authserver.secret").read_bytes().strip(), keys[0])
# ---------------------------------------------------------------------------
# The command line's rough edges: explain, prompts, usernames, old Pythons
# ---------------------------------------------------------------------------

def explain_cli(files, *args, stdin=""):
    """authserver.main(["explain", ...]) in this process (faster than run_cli), stdin piped."""
    argv = ["explain", *args, "--config", str(files.config), "--users", str(files.users)]
    out, err = io.StringIO(), io.StringIO()
    with mock.patch("sys.stdin", io.StringIO(stdin)), mock.patch("sys.stdout", out), \
            mock.patch("sys.stderr", err):
        code = authserver.main(argv)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


class TestCliExplain(unittest.TestCase):

    def setUp(self):
        self.files = Files(self)

    def test_a_failed_signature_still_shows_the_payload_marked_not_trusted(self):
        now = time.time()
        head, _, signature = token_for().split(".")
        forged = {"id": 26858, "username": "ncuser", "iat": int(now), "exp": int(now) + 600}
        tampered = f"{head}.{b64url_encode(json.dumps(forged).encode())}.{signature}"
        unsigned = ".".join(token_for().split(".")[:2]) + "."
        for token, error in ((tampered, "invalid signature"),
                             (unsigned, "jwt signature is required")):
            with self.subTest(error):
                result = explain_cli(self.files, token)
                self.assertEqual((result.returncode, result.stderr), (1, ""))
                out = result.stdout
                order = [out.index(f"FAIL JsonWebTokenError: {error}"),
                         out.index("Readable, but not trusted:"),
                         out.index('"username":'), out.index("exp "),
                         out.index("Verdict: rejected")]
                self.assertEqual(order, sorted(order), out)
                if token is tampered:
                    self.assertIn(f'{{"id":26858,"username":"ncuser","iat":{int(now)},'
                                  f'"exp":{int(now) + 600}}}', out)
                    self.assertIn(f"exp {int(now) + 600} = 20", out)
                    self.assertIn("(in 0h 9m", out)

    def test_payload_shown_untrusted_is_made_harmless_and_a_good_signature_shows_no_warning(self):
        hostile = forge(GOOD_HEADER, {"username": "\x9b2J\u202eevil", "exp": 2 ** 40},
                        signature=SIGNATURE)
        out = explain_cli(self.files, hostile).stdout
        self.assertIn("Readable, but not trusted:", out)
        self.assertIn('"username":"\\x9b2J\\u202eevil"', out)
        self.assertNotIn("\x9b", out)
        self.assertNotIn("\u202e", out)
        not_json = f"{HEAD}.{b64url_encode(b'not json')}.{SIGNATURE}"
        self.assertIn("not trusted: (the payload is not even base64url JSON: nothing to read)",
                      explain_cli(self.files, not_json).stdout)
        for token in (token_for(), token_for(now=time.time() - 7200)):    # valid; expired
            self.assertNotIn("not trusted", explain_cli(self.files, token).stdout)

    def test_a_pasted_header_gets_a_note_and_the_token_is_explained(self):
        token = token_for()
        for pasted, after in ((f"Bearer {token}", "Bearer "),
                              (f"Authorization: Bearer {token}", "Bearer "),
                              (f"authorization:bearer   {token}\n", "Bearer "),
                              (f"x-access-token: {token}", "x-access-token: "),
                              (f"X-Access-Token:{token}", "x-access-token: ")):
            with self.subTest(pasted):
                result = explain_cli(self.files, pasted)
                self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
                self.assertTrue(result.stdout.startswith(
                    "Note: this looks like a whole header; the token is the part after "
                    f"'{after}'.\n"), result.stdout)
                self.assertIn("Verdict: valid", result.stdout)
        piped = explain_cli(self.files, stdin=f"Authorization: Bearer {token}\n")
        self.assertEqual(piped.returncode, 0)
        self.assertIn("the part after 'Bearer '", piped.stdout)
        self.assertNotIn("Note:", explain_cli(self.files, token).stdout)
        # The server itself keeps refusing such a token.
        server = start_server(self, self.files)
        client = Client(server)
        self.addCleanup(client.close)
        for headers in ({"Authorization": f"Bearer Bearer {token}"},
                        {"x-access-token": f"x-access-token: {token}"}):
            status, _, body = client.request("GET", "/users/getInfo", headers=headers)
            self.assertEqual((status, body["message"]), (401, "jwt malformed"))

    def test_stdin_piped_or_dash_and_nothing_piped(self):
        token = token_for()
        for args in ((), ("-",)):
            result = run_cli("explain", *args, "--config", self.files.config,
                             "--users", self.files.users, stdin=token + "\n")
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertIn("Verdict: valid", result.stdout)
        for stdin in ("", " \n"):
            result = explain_cli(self.files, stdin=stdin)
            self.assertEqual((result.returncode, result.stdout, result.stderr),
                             (2, "", "authserver: no token on stdin\n"))

    def test_a_closed_pipe_is_no_traceback(self):
        read_end, write_end = os.pipe()
        os.close(read_end)                     # like `explain TOKEN | head -1`, head gone
        try:
            result = subprocess.run(
                [sys.executable, str(HERE / "authserver.py"), "explain", token_for(),
                 "--config", str(self.files.config), "--users", str(self.files.users)],
                stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60)
        finally:
            os.close(write_end)
        self.assertEqual((result.returncode, result.stderr), (1, ""))


class TestCliInterrupts(unittest.TestCase):
    """Ctrl-C and Ctrl-D at a prompt: one line and a non-zero exit, never a traceback."""

    def test_keyboard_interrupt_in_a_command_is_one_line_and_130(self):
        files = Files(self, passwordIterations=FAST_ITERATIONS)
        before = files.users.read_bytes()
        for command in ("passwd", "adduser"):
            stderr = io.StringIO()
            with self.subTest(command), mock.patch("sys.stderr", stderr), \
                    mock.patch.object(authserver, "read_password",
                                      side_effect=KeyboardInterrupt):
                try:
                    code = authserver.main([command, "someone" if command == "adduser" else "test",
                                            "--config", str(files.config),
                                            "--users", str(files.users)])
                except KeyboardInterrupt:
                    self.fail("the KeyboardInterrupt escaped main()")
            self.assertEqual((code, stderr.getvalue()), (130, "authserver: interrupted\n"))
        self.assertEqual(files.users.read_bytes(), before)

    def test_end_of_piped_input_at_the_password_prompt(self):
        files = Files(self, passwordIterations=FAST_ITERATIONS)
        for command, name in (("passwd", "test"), ("adduser", "newcomer")):
            result = run_cli(command, name, "--config", files.config, "--users", files.users,
                             stdin="")
            self.assertEqual((result.returncode, result.stderr),
                             (2, "authserver: no password given (end of input)\n"))
        self.assertEqual(json.loads(files.users.read_text()), TEST_USERS)


@unittest.skipUnless(hasattr(os, "openpty"), "needs a POSIX terminal")
class TestCliTerminal(unittest.TestCase):
    """The command line on a real (pseudo) terminal, as a person at a keyboard meets it."""

    def spawn(self, *args):
        """authserver.py with stdin, stdout and stderr on a new terminal; (process, leader)."""
        self.files = Files(self, passwordIterations=FAST_ITERATIONS)
        leader, follower = os.openpty()
        # A new session has no controlling terminal, so getpass uses this one (stdin) and
        # never the terminal the tests run in.
        process = subprocess.Popen(
            [sys.executable, str(HERE / "authserver.py"), *args,
             "--config", str(self.files.config), "--users", str(self.files.users)],
            stdin=follower, stdout=follower, stderr=follower, start_new_session=True,
            env={**os.environ, "NO_COLOR": "1", "COLUMNS": "80"})     # a new pty is 0 wide
        os.close(follower)

        def close():
            if process.poll() is None:
                process.kill()
            process.wait()
            os.close(leader)
        self.addCleanup(close)
        return process, leader

    def read_until(self, leader, text=None, timeout=30):
        """What the program wrote, up to text (or up to its end), within timeout seconds."""
        output, deadline = b"", time.monotonic() + timeout
        while text is None or text not in output:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.fail(f"waited {timeout}s for {text or 'the end'!r}; got {output!r}")
            if not select.select([leader], [], [], remaining)[0]:
                continue
            try:
                chunk = os.read(leader, 65536)
            except OSError:                     # EIO: every writer is gone
                chunk = b""
            if not chunk:
                if text is None:
                    return output
                self.fail(f"ended before {text!r}: {output!r}")
            output += chunk
        return output

    def test_ctrl_c_at_the_getpass_prompt(self):
        process, leader = self.spawn("passwd", "test")
        before = self.files.users.read_bytes()
        prompt = self.read_until(leader, b"New password: ")
        process.send_signal(signal.SIGINT)
        self.assertEqual(prompt + self.read_until(leader),
                         b"New password: \r\nauthserver: interrupted\r\n")
        self.assertEqual(process.wait(timeout=30), 130)
        self.assertEqual(self.files.users.read_bytes(), before)

    def test_ctrl_d_at_the_getpass_prompt(self):
        process, leader = self.spawn("adduser", "newcomer")
        before = self.files.users.read_bytes()
        prompt = self.read_until(leader, b"New password: ")
        os.write(leader, b"\x04")                # Ctrl-D at the start of a line: end of input
        self.assertEqual(prompt + self.read_until(leader),
                         b"New password: \r\nauthserver: no password given (end of input)\r\n")
        self.assertEqual(process.wait(timeout=30), 2)
        self.assertEqual(self.files.users.read_bytes(), before)

    def test_explain_without_a_token_on_a_terminal_prints_usage(self):
        process, leader = self.spawn("explain")
        output = self.read_until(leader).decode()
        self.assertEqual(process.wait(timeout=30), 2)
        self.assertTrue(output.startswith("usage: authserver.py explain "), output)
        self.assertTrue(output.endswith(
            "authserver: give the token as an argument, or pipe it in: "
            "... | python authserver.py explain\r\n"), output)

    def test_explain_dash_on_a_terminal_asks_for_the_token(self):
        process, leader = self.spawn("explain", "-")
        self.read_until(leader, b"Paste the token, then Enter:")
        os.write(leader, token_for().encode() + b"\n")
        self.assertIn(b"Verdict: valid", self.read_until(leader))
        self.assertEqual(process.wait(timeout=30), 0)
        for key, code, line in ((b"\x03", 130, b"authserver: interrupted"),
                                (b"\x04", 2, b"authserver: no token on stdin")):
            process, leader = self.spawn("explain", "-")
            self.read_until(leader, b"Paste the token, then Enter:")
            if key == b"\x03":
                process.send_signal(signal.SIGINT)
            else:
                os.write(leader, key)
            self.assertTrue(self.read_until(leader).rstrip().endswith(line))
            self.assertEqual(process.wait(timeout=30), code)


class TestCliUsernames(unittest.TestCase):
    """One rule for usernames, the same when adduser writes users.json and when it is loaded."""

    ALLOWED = ["test", "ncuser", "café", "山田", "o'brien", "user@example.org", "x" * 64]
    REFUSED = ["", " ", "a b", " lead", "trail ", "a\tb", "a\nb", "a\x00b", "a\x7f", "a\x85b",
               "a\u00a0b", "a\u2028b", "a\u3000b", "\udcff", "x" * 65,
               "ad\u200bmin", "\u202eadmin", "a\ufeffb", "a\ue000b", "a\U000e0001b"]

    def test_the_rule(self):
        for name in self.ALLOWED:
            with self.subTest(name=name):
                authserver.check_username(name, "here")
        for name in self.REFUSED + [None, 5, ["a"]]:
            with self.subTest(name=name), self.assertRaises(authserver.ConfigError) as caught:
                authserver.check_username(name, "here")
            self.assertTrue(str(caught.exception).startswith("here: "))
            self.assertNotIn("\n", str(caught.exception))

    def test_adduser_and_the_server_agree(self):
        files = Files(self, passwordIterations=FAST_ITERATIONS)
        for name in self.ALLOWED[3:] + self.REFUSED:           # the first three are there
            with self.subTest(name=name):
                before = files.users.read_bytes()
                stderr = io.StringIO()
                with mock.patch("sys.stdin", io.StringIO("pw\n")), \
                        mock.patch("sys.stdout", io.StringIO()), mock.patch("sys.stderr", stderr):
                    code = authserver.main(["adduser", name, "--config", str(files.config),
                                            "--users", str(files.users)])
                if name in self.REFUSED:
                    self.assertEqual(code, 2)
                    self.assertTrue(stderr.getvalue().startswith("authserver: adduser: "))
                    self.assertEqual(files.users.read_bytes(), before)
                    # ... and the server refuses a file holding that name, by the same rule.
                    broken = Files(self, users=TEST_USERS + [make_user(7, name, "pw")])
                    with self.assertRaises(authserver.ConfigError) as caught:
                        authserver.UserStore(broken.users)
                    self.assertEqual(str(caught.exception).partition(": ")[2],
                                     stderr.getvalue().strip().partition(": adduser: ")[2])
                else:
                    self.assertEqual(code, 0, stderr.getvalue())
                    store = authserver.UserStore(files.users)       # the server loads it
                    self.assertIsNotNone(store.find_by_name(name)[0])

    def test_adduser_empty_name_on_the_command_line(self):
        files = Files(self, passwordIterations=FAST_ITERATIONS)
        before = files.users.read_bytes()
        result = run_cli("adduser", "", "--config", files.config, "--users", files.users,
                         stdin="pw\n")
        self.assertEqual((result.returncode, result.stderr),
                         (2, "authserver: adduser: a username must be non-empty text, not ''\n"))
        self.assertEqual(files.users.read_bytes(), before)


class TestCliOldPython(unittest.TestCase):
    """Older Pythons say what they need in one line, wherever they get far enough to run."""

    MESSAGE = "authserver needs Python 3.9+ (this is {})"

    def test_the_check_runs_before_anything_else(self):
        with mock.patch.object(sys, "version_info", (3, 8, 18, "final", 0)), \
                self.assertRaises(SystemExit) as caught:
            runpy.run_path(str(HERE / "authserver.py"), run_name="on_python_3_8")
        self.assertEqual(caught.exception.code, self.MESSAGE.format("3.8"))

    def test_real_older_interpreters(self):
        # 3.6 to 3.8 parse the whole file; 3.5 and 2.7 stop at its first f-string.
        found = {}
        for version in ("3.6", "3.7", "3.8"):
            candidates = sorted(Path.home().glob(f".pyenv/versions/{version}.*/bin/python"))
            which = shutil.which(f"python{version}")
            if which and "shims" not in Path(which).parts:      # a pyenv shim may not run
                candidates.append(Path(which))
            if candidates:
                found[version] = candidates[0]
        if "3.8" not in found:
            self.skipTest("no Python 3.8 here")
        for version, python in found.items():
            with self.subTest(python=str(python)):
                result = subprocess.run([str(python), str(HERE / "authserver.py"), "--help"],
                                        capture_output=True, text=True, timeout=60)
                self.assertEqual((result.returncode, result.stdout, result.stderr),
                                 (1, "", self.MESSAGE.format(version) + "\n"))

# ---------------------------------------------------------------------------
# The page: its HTML as served, and the page itself in a real (headless) browser
# ---------------------------------------------------------------------------

class PageReader(HTMLParser):
    """The text a reader sees: in all, per element id, and the <mark>ed parts per id."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
            "track", "wbr"}

    def __init__(self, html):
        super().__init__()
        self.open, self.text, self.by_id, self.marks = [], [], {}, {}
        self.hidden_depth = 0
        self.feed(html)
        self.close()
        self.visible = "".join(self.text)

    def handle_starttag(self, tag, attrs):
        if tag in self.VOID:
            return
        attrs = dict(attrs)
        unseen = tag in ("script", "style") or "hidden" in attrs
        self.open.append((tag, attrs.get("id"), unseen))
        self.hidden_depth += unseen
        if attrs.get("id"):
            self.by_id.setdefault(attrs["id"], "")

    def handle_endtag(self, tag):
        while self.open:
            open_tag, _, unseen = self.open.pop()
            self.hidden_depth -= unseen
            if open_tag == tag:
                break

    def handle_data(self, data):
        ids = [element_id for _, element_id, _ in self.open if element_id]
        for element_id in ids:
            self.by_id[element_id] += data
        if any(tag == "mark" for tag, _, _ in self.open) and ids:
            self.marks.setdefault(ids[-1], []).append(data)
        if not self.hidden_depth:
            self.text.append(data)


def page_scripts(html):
    return "".join(re.findall(r"<script>(.*?)</script>", html, re.S))


class TestPageServed(unittest.TestCase):
    """test.html as the server sends it: ids, policy, and what the page does, read in its HTML."""

    @classmethod
    def setUpClass(cls):
        server = start_server(cls)
        client = Client(server)
        cls.status, cls.response, body = client.request("GET", "/")
        client.close()
        cls.html = body.decode("utf-8")
        cls.page = PageReader(cls.html)
        cls.script = page_scripts(cls.html)

    @classmethod
    def addCleanup(cls, function, *args, **kwargs):         # start_server registers its stop
        cls.addClassCleanup(function, *args, **kwargs)

    def test_the_tutorials_ids_and_the_labs_are_there(self):
        self.assertEqual(self.status, 200)
        for element_id in ("id_username", "id_password", "btn", "infoBtn", "output",
                           "refreshBtn", "logoutBtn", "result", "tokenBox", "tokenView",
                           "verifyBtn", "tamperBtn", "decodedHeader", "decodedPayload", "times"):
            self.assertEqual(len(re.findall(rf"""id=['"]{element_id}['"]""", self.html)), 1,
                             element_id)

    def test_it_loads_nothing_from_elsewhere_and_the_policy_says_so(self):
        self.assertEqual(self.response.getheader("Content-Security-Policy"), authserver.PAGE_POLICY)
        self.assertIn("default-src 'none'", authserver.PAGE_POLICY)
        self.assertIn("connect-src 'self'", authserver.PAGE_POLICY)
        self.assertNotRegex(self.html, r"<script[^>]*\ssrc|<link[^>]*stylesheet|@import|url\(")
        for link in re.findall(r"""(?:src|href|action)\s*=\s*['"]([^'"]*)""", self.html):
            self.assertRegex(link, r"^(#|data:)", "everything inline or data:")

    def test_the_served_page_does_not_mention_api_links(self):
        self.assertNotIn("?api=", self.page.visible)
        self.assertEqual(self.page.by_id["diskHint"], "")
        # The hint is written by the script only for a copy opened from disk.
        self.assertRegex(self.script,
                         r"if \(location\.protocol === 'file:'\) \{\s*"
                         r"show\('diskHint', '[^']*\?api=")

    def test_enter_in_the_password_field_logs_in(self):
        form = re.search(r'<form id="loginForm">(.*?)</form>', self.html, re.S).group(1)
        self.assertIn('id="id_password"', form)
        self.assertIn('enterkeyhint="go"', form)
        self.assertIn("""<button id='btn' type="submit">""", form)   # Enter submits the form
        for other in ("infoBtn", "refreshBtn", "logoutBtn"):
            self.assertRegex(form, rf"""id=['"]{other}['"] type="button">""")
        self.assertIn("$('loginForm').addEventListener('submit', authReq)", self.script)
        self.assertRegex(self.script, r"async function authReq\(event\) \{\s*"
                                      r"if \(event\) event\.preventDefault\(\)")

    def test_nothing_is_shown_empty_before_the_first_request(self):
        self.assertRegex(self.html, r'<section id="exchange" hidden>')
        self.assertRegex(self.html, r'<div id="decoded" [^>]*hidden>')
        self.assertIn("[hidden] { display: none !important; }", self.html)   # over .grid's display

    def test_the_refresh_token_lives_in_a_variable_only(self):
        for store in ("localStorage", "sessionStorage", "document.cookie", "indexedDB"):
            self.assertNotIn(store, self.script)
        self.assertIn("let refreshToken = null", self.script)

    def test_a_password_note_says_base64_is_not_encryption(self):
        self.assertIn("base64: an encoding, not encryption", self.page.by_id["encodingNote"])
        self.assertEqual(base64.b64decode("dGVzdA==").decode(), "test")   # the note's example


def find_browser():
    """A Chromium-family browser on PATH, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


BROWSER = find_browser()


class Browser:
    """Headless Chromium driven through --remote-debugging-pipe: the DevTools protocol as
    NUL-terminated JSON on the browser's file descriptors 3 (in) and 4 (out); stdlib only."""

    def __init__(self, test):
        profile = tempfile.mkdtemp()
        test.addCleanup(shutil.rmtree, profile, True)
        browser_in, self.commands = os.pipe()
        self.replies, browser_out = os.pipe()
        self.process = subprocess.Popen(
            # bash, not sh: dash reads only one-digit descriptors, and with a server's
            # sessions file open the pipes get numbers above 9.
            ["bash", "-c", f'exec "$@" 3<&{browser_in} 4>&{browser_out}', "bash", BROWSER,
             "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run",
             "--disable-extensions", "--disable-background-networking", "--remote-debugging-pipe",
             "--user-data-dir=" + profile, "about:blank"],
            pass_fds=(browser_in, browser_out),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(browser_in)
        os.close(browser_out)
        test.addCleanup(self.close)
        self.buffer, self.last_id = b"", 0

    def call(self, method, session=None, timeout=30, **params):
        """Send one command, return its result (events on the way are skipped)."""
        self.last_id += 1
        message = {"id": self.last_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self.commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self.buffer:
                raw, _, self.buffer = self.buffer.partition(b"\0")
                reply = json.loads(raw)
                if reply.get("id") == self.last_id:
                    if "error" in reply:
                        raise AssertionError(f"{method}: {reply['error']}")
                    return reply["result"]
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.replies], [], [], left)[0]:
                raise AssertionError(f"the browser did not answer {method} in {timeout} s")
            chunk = os.read(self.replies, 1 << 20)
            if not chunk:
                raise AssertionError("the browser has gone")
            self.buffer += chunk

    def open(self, url, width=1280, height=900):
        """A new tab (its own session) showing url, at the given window size."""
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        tab = Tab(self, session)
        tab.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                 deviceScaleFactor=1, mobile=width < 640)
        tab.call("Page.navigate", url=url)
        return tab

    def close(self):
        try:
            self.call("Browser.close", timeout=3)
            self.process.wait(timeout=5)
        except (AssertionError, OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        for fd in (self.commands, self.replies):
            os.close(fd)


class Tab:
    """One page in the Browser: evaluate JavaScript, wait for a condition, press keys."""

    def __init__(self, browser, session):
        self.browser, self.session = browser, session

    def call(self, method, **params):
        return self.browser.call(method, session=self.session, **params)

    def evaluate(self, expression):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression, timeout=20):
        """Poll expression until it is truthy (the page works asynchronously); return it."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = self.evaluate(expression)
            except AssertionError:              # the page is still loading
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"still false after {timeout} s: {expression}")
            time.sleep(0.02)

    def result(self):
        """The line beside the buttons, once a request has finished."""
        return self.wait_for("(t => t && t !== '…' && t)"
                             "((document.getElementById('result') || {}).textContent)")

    def click(self, element_id):
        self.evaluate(f"document.getElementById({element_id!r}).click()")

    def dom(self):
        return self.evaluate("document.documentElement.outerHTML")

    def press_enter(self):
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter",
                      windowsVirtualKeyCode=13, text="\r" if kind == "keyDown" else "")


def local_date(seconds):
    """The page's local date format, computed by Python in the same time zone."""
    moment = time.localtime(seconds)
    offset = moment.tm_gmtoff // 60
    sign = "-" if offset < 0 else "+"
    return (time.strftime("%Y-%m-%d %H:%M:%S", moment) +
            f" UTC{sign}{abs(offset) // 60:02d}:{abs(offset) % 60:02d}")


BROWSER_REASON = "no chromium / chrome on PATH (or not a POSIX system, where the pipe works)"


class ModuleScope:
    """Cleanups for what lives as long as this module's tests: run after the last of them."""
    addCleanup = staticmethod(unittest.addModuleCleanup)


SHARED = {}


def shared_browser():
    """One headless browser for every class that drives pages (each in tabs of its own):
    started once, closed when the module's tests end."""
    if "browser" not in SHARED:
        SHARED["browser"] = Browser(ModuleScope())
        unittest.addModuleCleanup(SHARED.pop, "browser", None)
    return SHARED["browser"]


@unittest.skipUnless(BROWSER and os.name == "posix", BROWSER_REASON)
class TestPageInBrowser(unittest.TestCase):
    """The page in headless Chromium, driven by links (#token=...&tamper&verify): the DOM."""

    @classmethod
    def setUpClass(cls):
        cls.server = start_server(cls)
        cls.browser = shared_browser()
        base = f"http://127.0.0.1:{cls.server.server_address[1]}/"
        now = int(time.time())
        cls.valid = token_for(now=now, lifetime=3600)
        cls.expired = token_for(now=now - 180, lifetime=60)
        cls.edited = cls.expired.split(".")
        cls.edited[1] = b64url_encode(b64url_decode(cls.edited[1]).replace(b'"test"', b'"admin"'))
        cls.edited = ".".join(cls.edited)
        with socket.socket() as closed:                  # a port where nothing listens
            closed.bind(("127.0.0.1", 0))
            closed_port = closed.getsockname()[1]
        from_disk = (HERE / "test.html").as_uri() + "?api=http://127.0.0.1:"
        scenarios = {
            "valid": base + "#token=" + cls.valid + "&verify",
            "tampered": base + "#token=" + cls.valid + "&tamper&verify",
            "edited": base + f"#signed={cls.expired}&token={cls.edited}&verify",
            "header_line": base + "#token=Bearer%20" + cls.valid + "&verify",
            "disk_no_token": from_disk + f"{cls.server.server_address[1]}#verify",
            "disk_server_down": from_disk + f"{closed_port}#verify",
        }
        # All tabs at once, in one browser: the class costs about one browser start.
        tabs = {name: cls.browser.open(url) for name, url in scenarios.items()}
        cls.dom = {}
        for name, tab in tabs.items():
            tab.result()
            cls.dom[name] = tab.dom()
        cls.read = {name: PageReader(dom) for name, dom in cls.dom.items()}

    @classmethod
    def addCleanup(cls, function, *args, **kwargs):         # start_server registers its stop
        cls.addClassCleanup(function, *args, **kwargs)

    def test_a_valid_token_is_decoded_dated_and_accepted(self):
        page = self.read["valid"]
        claims = decode_token(self.valid, SECRET)
        self.assertIn('"username": "test"', page.by_id["decodedPayload"])
        self.assertIn('"alg": "HS256"', page.by_id["decodedHeader"])
        self.assertEqual(page.by_id["time-exp"],
                         f"exp expires {local_date(claims['exp'])} (in 60 min)")
        self.assertTrue(page.by_id["time-iat"].startswith(
            f"iat issued {local_date(claims['iat'])} ("))
        self.assertNotIn("time-nbf", page.by_id)
        # The parts, coloured, nothing marked: it is the token the server signed.
        view = re.search(r'<pre id="tokenView"[^>]*>(.*?)</pre>', self.dom["valid"], re.S).group(1)
        head, body, signature = self.valid.split(".")
        self.assertEqual(view, f'<span class="header">{head}</span>.<span class="payload">{body}'
                               f'</span>.<span class="signature">{signature}</span>\n')
        self.assertEqual(page.visible.count(body), 1, "the token appears once")
        self.assertEqual(page.by_id["verdict"], "200: the server accepts this token.")
        self.assertEqual(page.by_id["result"], "200 OK")
        self.assertIn('"username": "test"', page.by_id["output"])
        self.assertEqual(page.by_id["diskHint"], "")
        self.assertNotIn("?api=", page.visible)

    def test_tamper_changes_the_username_and_the_server_says_invalid_signature(self):
        page = self.read["tampered"]
        self.assertIn('"username": "admin"', page.by_id["decodedPayload"])
        self.assertEqual(page.marks["changes"], ['username: "test" → "admin"'])
        head, body, signature = self.valid.split(".")
        marked = "".join(page.marks["tokenView"])
        self.assertTrue(marked, "the changed characters are marked")
        tampered = page.by_id["tokenView"].strip()
        self.assertEqual(tampered.split(".")[0::2], [head, signature])   # header, signature kept
        self.assertIn(marked, tampered.split(".")[1])
        self.assertEqual(json.loads(b64url_decode(tampered.split(".")[1]))["username"], "admin")
        self.assertEqual(page.by_id["result"], "401 Unauthorized: invalid signature")
        self.assertTrue(page.by_id["verdict"].startswith("401 invalid signature"))
        self.assertIn("Authorization: Bearer " + head[:12] + "…", page.by_id["httpRequest"])

    def test_an_edited_expired_token_shows_the_change_its_dates_and_the_servers_verdict(self):
        page = self.read["edited"]
        claims = json.loads(b64url_decode(self.expired.split(".")[1]))
        self.assertEqual(page.marks["changes"], ['username: "test" → "admin"'])
        self.assertEqual(page.by_id["tokenView"].strip(), self.edited)
        self.assertTrue(page.marks["tokenView"])
        # The signature is checked before the dates, so the answer is about the edit.
        self.assertEqual(page.by_id["result"], "401 Unauthorized: invalid signature")
        self.assertRegex(page.by_id["time-exp"],
                         rf"^exp expired {re.escape(local_date(claims['exp']))} \(\d min ago\): "
                         r"the server now answers jwt expired$")

    def test_a_pasted_header_line_gets_a_hint(self):
        page = self.read["header_line"]
        self.assertEqual(page.by_id["changes"], 'This is a header line, not a token: keep only '
                                                'what follows "Bearer" (a token starts with eyJ).')
        self.assertEqual(page.by_id["result"], "401 Unauthorized: jwt malformed")

    def test_no_token_sends_none_and_the_tutorials_403_shows_from_disk(self):
        page = self.read["disk_no_token"]
        self.assertEqual(page.by_id["result"], "403 Forbidden: No token provided.")
        self.assertEqual(page.by_id["httpRequest"],
                         f"GET http://127.0.0.1:{self.server.server_address[1]}/users/getInfo\n"
                         "Accept: application/json")
        self.assertEqual(json.loads(page.by_id["output"]),
                         {"error": True, "message": "No token provided."})
        self.assertIn("?api=http://", page.by_id["diskHint"])        # opened from disk: the hint

    def test_a_request_without_an_answer_says_why_beside_the_buttons(self):
        page = self.read["disk_server_down"]
        self.assertRegex(page.by_id["result"], r"^GET /users/getInfo: no answer: the server is down")
        self.assertIn("Is the server running at http://127.0.0.1:", page.by_id["result"])
        self.assertEqual(page.by_id["httpStatus"], "no answer")
        # The result line comes right after the buttons, before anything else.
        self.assertRegex(self.dom["disk_server_down"],
                         r'id="logoutBtn"[^<]*</button>\s*</form>\s*<p id="result"')


    def login_by_enter(self, tab):
        tab.wait_for("document.readyState === 'complete'")
        tab.evaluate("document.getElementById('id_username').value = 'test';"
                     "document.getElementById('id_password').value = 'test';"
                     "document.getElementById('id_password').focus()")
        tab.press_enter()
        return tab.result()

    def test_enter_in_the_password_field_logs_in(self):
        tab = self.browser.open(f"http://127.0.0.1:{self.server.server_address[1]}/")
        self.assertEqual(self.login_by_enter(tab), "200 OK: logged in as test; the token is below.")
        page = PageReader(tab.dom())
        claims = decode_token(page.by_id["tokenView"].strip(), SECRET)
        self.assertEqual(claims["username"], "test")
        self.assertIn('"password":"dGVzdA=="', page.by_id["httpRequest"])
        self.assertIn("not encryption", page.visible)            # the note beside the request
        self.assertEqual(page.visible.count(page.by_id["tokenView"].strip().split(".")[2]), 1)

    def edit(self, tab, element_id, old, new):
        """Change text in a textarea as a user would: the value, then an input event."""
        tab.evaluate(f"(area => {{ area.value = area.value.replace({old!r}, {new!r});"
                     f" area.dispatchEvent(new Event('input')) }})"
                     f"(document.getElementById({element_id!r}))")

    def test_editing_the_decoded_payload_or_the_token_and_asking_the_server(self):
        tab = self.browser.open(f"http://127.0.0.1:{self.server.server_address[1]}/")
        self.login_by_enter(tab)
        signed = PageReader(tab.dom()).by_id["tokenView"].strip()
        self.edit(tab, "decodedPayload", '"test"', '"admin"')
        tab.click("verifyBtn")
        self.assertEqual(tab.result(), "401 Unauthorized: invalid signature")
        page = PageReader(tab.dom())
        edited = page.by_id["tokenView"].strip()
        self.assertEqual(json.loads(b64url_decode(edited.split(".")[1]))["username"], "admin")
        self.assertEqual(edited.split(".")[2], signed.split(".")[2])
        self.assertEqual(page.marks["changes"], ['username: "test" → "admin"'])
        self.assertTrue(page.marks["tokenView"])
        # Back to "test" by hand in the token box: the signature fits again.
        self.edit(tab, "tokenBox", edited, signed)
        self.assertNotIn("changes", PageReader(tab.dom()).marks)
        tab.click("verifyBtn")
        self.assertEqual(tab.result(), "200 OK")
        # One character of the signature changed: only it is marked.
        last = "A" if signed[-1] != "A" else "B"
        self.edit(tab, "tokenBox", signed, signed[:-1] + last)
        tab.click("verifyBtn")
        self.assertEqual(tab.result(), "401 Unauthorized: invalid signature")
        self.assertEqual(PageReader(tab.dom()).marks["tokenView"], [last])
        # Forget the tokens: "Get user info" sends none, and the server says 403.
        tab.click("forgetBtn")
        tab.click("infoBtn")
        self.assertEqual(tab.result(), "403 Forbidden: No token provided.")

    def test_on_a_phone_the_exchange_comes_before_the_token_and_nothing_grey_is_empty(self):
        tab = self.browser.open(f"http://127.0.0.1:{self.server.server_address[1]}/", 390, 844)
        tab.wait_for("document.readyState === 'complete'")
        empty_grey = ("[...document.querySelectorAll('*')].filter(e => e.offsetParent !== null &&"
                      " !e.textContent.trim() && !/^(INPUT|TEXTAREA|BUTTON)$/.test(e.tagName) &&"
                      " getComputedStyle(e).backgroundColor === 'rgb(244, 244, 246)').length")
        self.assertEqual(tab.evaluate(empty_grey), 0)
        self.assertTrue(tab.evaluate("document.getElementById('exchange').hidden"))
        self.login_by_enter(tab)
        tab.click("infoBtn")
        self.assertEqual(tab.result(), "200 OK")
        top = "document.getElementById({!r}).getBoundingClientRect().top"
        self.assertLess(tab.evaluate(top.format("result")), 400)       # beside the buttons
        self.assertLess(tab.evaluate(top.format("httpStatus")), 844)    # on the first screen
        self.assertLess(tab.evaluate(top.format("output")), tab.evaluate(top.format("tokenBox")))
        self.assertEqual(tab.evaluate("document.documentElement.scrollWidth"), 390)  # no sideways
        self.assertEqual(tab.evaluate(empty_grey), 0)

    def test_refresh_and_log_out_show_their_exchange_whatever_the_server_answers(self):
        port = self.server.server_address[1]
        tab = self.browser.open(f"http://127.0.0.1:{port}/")
        self.login_by_enter(tab)
        for button, path in (("refreshBtn", "/users/refresh"), ("logoutBtn", "/users/logout")):
            tab.click(button)
            status = tab.result()
            page = PageReader(tab.dom())
            self.assertTrue(page.by_id["httpRequest"].startswith(
                f"POST http://127.0.0.1:{port}{path}\n"), page.by_id["httpRequest"])
            self.assertIn(page.by_id["httpStatus"].split(" ")[0], status)
            self.assertNotEqual(page.by_id["httpStatus"], "no answer")
            self.assertNotIn("Authorization", page.by_id["httpRequest"])   # a refresh token only
        self.assertIn('"username": "test"', PageReader(tab.dom()).by_id["decodedPayload"])

    def test_refresh_rotates_log_out_revokes_and_get_user_info_is_refused(self):
        server = self.server
        tab = self.browser.open(f"http://127.0.0.1:{server.server_address[1]}/")
        self.login_by_enter(tab)
        first_refresh = tab.evaluate("refreshToken")
        tab.click("refreshBtn")
        self.assertEqual(tab.result(),
                         "200 OK: a new access token (below) and a new refresh token.")
        page = PageReader(tab.dom())
        second = page.by_id["tokenView"].strip()
        second_refresh = tab.evaluate("refreshToken")
        self.assertNotEqual(second_refresh, first_refresh)                # rotated
        self.assertIn(f'"refreshToken": "{second_refresh[:8]}…{second_refresh[-4:]} '
                      f'(kept in memory only)"', page.by_id["output"])
        tab.click("logoutBtn")
        self.assertTrue(tab.result().startswith("204: logged out."))
        tab.click("infoBtn")
        self.assertEqual(tab.result(), "401 Unauthorized: session revoked")
        page = PageReader(tab.dom())
        self.assertIn("Authorization: Bearer " + second[:12] + "…", page.by_id["httpRequest"])
        self.assertFalse(tab.evaluate("Object.keys(localStorage).length"))


def serve_in_background(test, server):
    """Serve server (an http.server stand-in on 127.0.0.1:0) in a thread until the test ends;
    its address as server.url."""
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    test.addCleanup(thread.join)
    test.addCleanup(server.server_close)
    test.addCleanup(server.shutdown)
    return server


class LifecycleStub(http.server.ThreadingHTTPServer):
    """Stands in for issue 11's refresh / logout routes (as specified) until the server has them."""

    def __init__(self, test):
        super().__init__(("127.0.0.1", 0), LifecycleStubHandler)
        self.bodies, self.bearer = {}, []
        self.refresh_number, self.revoked = 1, False
        serve_in_background(test, self)

    @staticmethod
    def refresh_token(number):
        return f"refresh-{number}-{'0123456789abcdef' * 2}"   # opaque, as long as a real one

    def current_refresh_token(self):
        return self.refresh_token(self.refresh_number)

    def pair(self):
        return {"token": token_for(jti=str(self.refresh_number)), "expiresIn": 3600,
                "refreshToken": self.current_refresh_token(), "refreshExpiresIn": 1209600}


class LifecycleStubHandler(http.server.BaseHTTPRequestHandler):

    def answer(self, status, body=None):
        data = json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Access-Control-Allow-Headers", "authorization, content-type")
        self.send_header("Access-Control-Allow-Methods", "GET, POST")
        if body is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_OPTIONS(self):
        self.answer(204)

    def do_GET(self):
        self.server.bearer.append(self.headers.get("Authorization", "").partition(" ")[2])
        if self.server.revoked:
            self.answer(401, {"error": True, "name": "JsonWebTokenError",
                              "message": "session revoked"})
        else:
            self.answer(200, {"id": 81623, "username": "test"})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.bodies.setdefault(self.path, []).append(body)
        stub = self.server
        if self.path == "/users/authenticate":
            self.answer(200, stub.pair())
        elif (self.path == "/users/refresh"
              and body.get("refreshToken") == stub.current_refresh_token()):
            stub.refresh_number += 1
            self.answer(200, stub.pair())
        elif self.path == "/users/logout":
            stub.revoked = True
            self.answer(204)
        else:
            self.answer(401, {"error": True, "name": "RefreshTokenError",
                              "message": "refresh token spent"})

    def log_message(self, *args):
        pass



# ---------------------------------------------------------------------------
# Sign-up: POST /users/register
# ---------------------------------------------------------------------------

class ClassScope:
    """Lets Files and start_server, which clean up after a test, serve a whole class."""

    def __init__(self, cls):
        self.addCleanup = cls.addClassCleanup


def exchange(server, method, path, body=None, headers=None, content_type="application/json"):
    """One request on a new connection: (status, headers with lower-case names, raw body)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    try:
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
        if body is not None:
            headers = {"Content-Type": content_type, **(headers or {})}
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        data = response.read()
        return response.status, {name.lower(): value for name, value in response.getheaders()}, data
    finally:
        connection.close()


def signup_body(username, password="correct horse", **fields):
    return {"username": username, "password": b64(password), **fields}


class TestSignup(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.shipped_users = (HERE / "users.json").read_bytes()
        cls.files = Files(ClassScope(cls), allowRegistration=True, addressLoginAttempts=1000,
                          passwordIterations=FAST_ITERATIONS)
        cls.server = start_server(ClassScope(cls), cls.files)

    @classmethod
    def tearDownClass(cls):
        assert (HERE / "users.json").read_bytes() == cls.shipped_users, "shipped users.json changed"

    def register(self, body, server=None, **options):
        status, headers, data = exchange(server or self.server, "POST", "/users/register",
                                         body, **options)
        return status, headers, json.loads(data) if data else None

    def stored(self, username, files=None):
        users = json.loads((files or self.files).users.read_text(encoding="utf-8"))
        return [user for user in users if user["username"] == username]

    def test_201_with_the_public_record_then_login_and_getinfo_at_once(self):
        status, headers, body = self.register(signup_body("zoë", firstName="Zoë", phone="555"))
        self.assertEqual(status, 201, body)
        self.assertEqual(list(body), ["id", "username", "firstName", "phone"])
        self.assertEqual({**body, "id": 0}, {"id": 0, "username": "zoë", "firstName": "Zoë",
                                             "phone": "555"})
        self.assertIs(type(body["id"]), int)
        self.assertEqual(headers["access-control-allow-origin"], "*")
        [record] = self.stored("zoë")
        self.assertEqual(record["id"], body["id"])
        self.assertTrue(record["passwordHash"].startswith(f"pbkdf2_sha256${FAST_ITERATIONS}$"))
        self.assertTrue(verify_password("correct horse", record["passwordHash"]))
        # The store re-reads the file at most once a second; the new user is there at once.
        status, _, login = exchange(self.server, "POST", "/users/authenticate",
                                    login_body("zoë", "correct horse"))
        self.assertEqual(status, 200, login)
        token = json.loads(login)["token"]
        status, _, info = exchange(self.server, "GET", "/users/getInfo",
                                   headers={"Authorization": f"Bearer {token}"})
        self.assertEqual((status, json.loads(info)), (200, body))

    def test_form_body_like_login(self):
        form = urllib.parse.urlencode({"username": "formuser", "password": b64("form body ok"),
                                       "lastName": "Form"})
        status, _, body = self.register(form, content_type="application/x-www-form-urlencoded")
        self.assertEqual((status, body["username"], body["lastName"]), (201, "formuser", "Form"))

    def test_taken_is_409_also_when_the_server_has_not_seen_the_file_change(self):
        expected = {"error": True, "name": "UsernameTakenError",
                    "message": "username 'test' is taken"}
        self.assertEqual(self.register(signup_body("test"))[::2], (409, expected))
        self.assertEqual(self.register(signup_body("twice"))[0], 201)
        self.assertEqual(self.register(signup_body("twice", "another password"))[0], 409)
        # Another process (adduser) adds a name; the server's copy is up to a second old,
        # so the locked write is what finds it taken.
        self.server.users.next_check = time.monotonic() + 3600
        self.addCleanup(setattr, self.server.users, "next_check", 0.0)
        authserver.add_user_record(self.files.users, "fromcli", hash_password("x", 1000), {})
        status, _, body = self.register(signup_body("fromcli"))
        self.assertEqual((status, body["name"]), (409, "UsernameTakenError"))
        self.assertEqual(len(self.stored("fromcli")), 1)

    def test_password_rules(self):
        """NIST SP 800-63B: length in characters, a few common ones refused, nothing else."""
        table = [
            ("seven77", "password must be at least 8 characters"),
            ("ü" * 7, "password must be at least 8 characters"),     # 14 bytes, 7 characters
            ("x" * 257, "password must be at most 256 characters"),
            ("Password1", "password is one of the most common passwords; choose another"),
            ("12345678", "password is one of the most common passwords; choose another"),
            ("PW-rules-user", "password must not be the username"),
        ]
        for password, message in table:
            with self.subTest(password=password[:20]):
                status, _, body = self.register(signup_body("pw-rules-user", password))
                self.assertEqual((status, body), (400, {"error": True, "name": "ValidationError",
                                                        "message": message}))
        not_base64 = {"username": "pw-rules-user", "password": "not base64!"}
        self.assertEqual(self.register(not_base64)[2]["message"],
                         "password must be base64, as for login")
        self.assertEqual(self.stored("pw-rules-user"), [])
        # No composition rules: any 8 characters, all one letter or all non-ASCII, will do.
        for number, password in enumerate(["aaaaaaaa", "ü" * 8, "x" * 256, "tr0ub4d&"]):
            with self.subTest(password=password[:20]):
                self.assertEqual(self.register(signup_body(f"pw-ok-{number}", password))[0], 201)
                self.assertEqual(exchange(self.server, "POST", "/users/authenticate",
                                          login_body(f"pw-ok-{number}", password))[0], 200)

    def test_username_rules(self):
        # The rule is check_username's, the one users.json and adduser obey.
        table = [("", "a username must be non-empty text, not ''"),
                 ("x" * 65, "username 'xxxxxxxxxxxxxxxxxxxx'... is longer than 64 characters")]
        table += [(name, f"username {name!r} contains whitespace or a control character")
                  for name in (" lead", "with space", "tab\there", "bell\x07", "no\u00a0break",
                               "line\u2028sep")]
        for username, message in table:
            with self.subTest(username=username):
                status, _, body = self.register(signup_body(username))
                self.assertEqual((status, body), (400, {"error": True, "name": "ValidationError",
                                                        "message": f"sign-up: {message}"}))
        self.assertEqual(self.register(signup_body("nul\x00"))[::2], (400, {
            "message": "username and password must not contain NUL characters"}))
        for username in ["y" * 64, "名前", "café-au-lait", "o'brien"]:
            with self.subTest(username=username):
                self.assertEqual(self.register(signup_body(username))[0], 201)

    def test_wrong_types_and_fields_are_400(self):
        text = "must be text of at most 200 printable characters"
        ours = "is not accepted: the profile fields are firstName, lastName, phone"
        strings = "username and password must be strings"
        table = [
            ({"username": 5, "password": b64("correct horse")}, strings),
            ({"username": "types", "password": ["x"]}, strings),
            ({"username": "types"}, "username and password are required"),
            (signup_body("types", phone=5550100), f"phone {text}"),
            (signup_body("types", firstName=["a"]), f"firstName {text}"),
            (signup_body("types", lastName={"x": "y"}), f"lastName {text}"),
            (signup_body("types", firstName="x" * 201), f"firstName {text}"),
            (signup_body("types", lastName="two\nlines"), f"lastName {text}"),
            (signup_body("types", age="30"), f"field 'age' {ours}"),
            (signup_body("types", id="1"), f"field 'id' {ours}"),
            (signup_body("types", passwordHash="pbkdf2_sha256$1$a$b"), f"field 'passwordHash' {ours}"),
            (signup_body("types", **{"first name": "x"}), f"field 'first name' {ours}"),
        ]
        for body, message in table:
            with self.subTest(body=body):
                status, _, answer = self.register(body)
                self.assertEqual(status, 400)
                self.assertEqual(answer["message"], message)
        self.assertEqual(self.register([1, 2])[::2],
                         (400, {"message": "Malformed body: not a JSON object"}))
        self.assertEqual(self.register("{", content_type="application/json")[0], 400)
        self.assertEqual(self.register("x", content_type="text/plain")[0], 415)
        self.assertEqual(self.stored("types"), [])
        longest = signup_body("types", **{name: "x" * 200 for name in authserver.PROFILE_FIELDS})
        self.assertEqual(self.register(longest)[0], 201)

    def test_twenty_at_once_all_land(self):
        barrier = threading.Barrier(20)
        results = {}

        def sign_up(number):
            barrier.wait(timeout=30)
            body = signup_body(f"crowd{number}", f"crowd password {number}")
            results[number] = self.register(body)[0]
        threads = [threading.Thread(target=sign_up, args=(n,)) for n in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        self.assertEqual(results, {n: 201 for n in range(20)})
        users = json.loads(self.files.users.read_text(encoding="utf-8"))
        crowd = [user for user in users if user["username"].startswith("crowd")]
        self.assertEqual(sorted(user["username"] for user in crowd),
                         sorted(f"crowd{n}" for n in range(20)))
        self.assertEqual(len({user["id"] for user in users}), len(users))
        for number in range(20):            # each one in the server's tables already
            self.assertIsNotNone(self.server.users.tables.by_name.get(f"crowd{number}"))

    def test_same_name_at_once_exactly_one_wins(self):
        barrier = threading.Barrier(10)
        statuses = []

        def sign_up(number):
            barrier.wait(timeout=30)
            statuses.append(self.register(signup_body("contested", f"password number {number}"))[0])
        threads = [threading.Thread(target=sign_up, args=(n,)) for n in range(10)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        self.assertEqual(sorted(statuses), [201] + [409] * 9)
        self.assertEqual(len(self.stored("contested")), 1)

    def test_a_slow_older_reload_cannot_undo_a_newer_one(self):
        """Sign-up reloads after its write; a reload that read the file before must not win."""
        files = Files(self)
        store = authserver.UserStore(files.users)
        has_read, go, waiting = threading.Event(), threading.Event(), threading.Event()
        original_read = store.read

        def read():                             # the older reload stops after reading
            tables = original_read()
            if threading.current_thread() is older:
                has_read.set()
                go.wait(timeout=30)
            return tables
        store.read = read

        class Watched:                          # says when the newer reload waits its turn
            def __init__(self, lock):
                self.lock = lock

            def __enter__(self):
                if threading.current_thread() is newer:
                    waiting.set()
                return self.lock.__enter__()

            def __exit__(self, *exc_info):
                return self.lock.__exit__(*exc_info)
        store.reloading = Watched(store.reloading)
        authserver.save_users(files.users, TEST_USERS[:1])
        older = threading.Thread(target=store.refresh, kwargs={"force": True})
        newer = threading.Thread(target=store.refresh, kwargs={"force": True})
        older.start()
        self.assertTrue(has_read.wait(timeout=30))
        deadline = time.monotonic() + 30
        authserver.save_users(files.users, TEST_USERS[:1] + [make_user(9, "late", "x")])
        newer.start()
        while not (waiting.is_set() or not newer.is_alive()):
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.01)
        go.set()
        older.join(timeout=30)
        newer.join(timeout=30)
        self.assertIn("late", store.tables.by_name)

    def test_off_by_default_it_is_an_unknown_path(self):
        server = start_server(self)             # no allowRegistration in its config
        before = server.users.path.read_bytes()
        token = {"Authorization": f"Bearer {token_for()}"}
        for method, body, headers in [("POST", signup_body("ghost"), None),
                                      ("POST", signup_body("ghost"), token),
                                      ("GET", None, token), ("OPTIONS", None, None)]:
            with self.subTest(method=method, token=bool(headers)):
                off = exchange(server, method, "/users/register", body, headers)
                unknown = exchange(server, method, "/users/nosuchroute", body, headers)
                self.assertEqual(off[0], unknown[0])
                self.assertEqual(off[2].replace(b"/users/register", b"/users/nosuchroute"),
                                 unknown[2])
                for name in ("allow", "www-authenticate", "content-type"):
                    self.assertEqual(off[1].get(name), unknown[1].get(name))
        self.assertEqual(exchange(server, "POST", "/users/register", signup_body("ghost"))[0], 403)
        self.assertEqual(exchange(server, "POST", "/users/register", signup_body("ghost"), token)[0],
                         404)
        self.assertEqual(server.users.path.read_bytes(), before)
        document = json.loads(exchange(server, "GET", "/openapi.json")[2])
        self.assertNotIn("/users/register", document["paths"])
        # On, it is a route like the others: public, POST only.
        self.assertEqual(exchange(self.server, "OPTIONS", "/users/register")[1]["allow"],
                         "POST, OPTIONS")
        self.assertEqual(exchange(self.server, "GET", "/users/register")[:2][0], 405)

    def test_allow_registration_must_be_a_boolean(self):
        for value in ("yes", 1, None):
            files = Files(self, allowRegistration=value)
            with self.subTest(value=value), self.assertRaises(authserver.ConfigError) as caught:
                authserver.load_config(files.config)
            self.assertEqual(str(caught.exception),
                             f"config file {files.config}: allowRegistration must be true or false")

    def test_every_attempt_counts_against_the_address(self):
        files = Files(self, allowRegistration=True, addressLoginAttempts=3,
                      passwordIterations=FAST_ITERATIONS)
        server = start_server(self, files)
        self.assertEqual(self.register(signup_body("probe1"), server)[0], 201)
        self.assertEqual(self.register(signup_body("test"), server)[0], 409)       # a probe
        self.assertEqual(self.register(signup_body("bad name"), server)[0], 400)
        status, headers, body = self.register(signup_body("probe2"), server)
        self.assertEqual(status, 429)
        self.assertTrue(1 <= int(headers["retry-after"]) <= 60, headers)
        self.assertEqual(body, {"message": f"Too many attempts from this address; try again in "
                                           f"{headers['retry-after']} seconds"})
        self.assertEqual(self.stored("probe2", files), [])
        # The budget is the address's, shared with logins: probing by login is no way round.
        self.assertEqual(exchange(server, "POST", "/users/authenticate", login_body())[0], 429)

    def test_a_users_file_that_cannot_be_written_is_503_and_left_as_it_was(self):
        files = Files(self, allowRegistration=True, passwordIterations=FAST_ITERATIONS)
        server = start_server(self, files)
        expected = {"error": True, "name": "UsersFileError",
                    "message": "Sign-up is unavailable right now; try again shortly"}
        with mock.patch("os.fsync", side_effect=OSError(28, "No space left on device")):
            status, headers, body = self.register(signup_body("diskfull"), server)
        self.assertEqual((status, headers["retry-after"], body), (503, "5", expected))
        self.assertEqual(self.stored("diskfull", files), [])
        self.assertEqual(sorted(path.name for path in files.folder.glob(".users.json.*")), [])
        files.users.write_text("[{broken")
        status, _, body = self.register(signup_body("broken"), server)
        self.assertEqual((status, body), (503, expected))
        self.assertEqual(files.users.read_text(), "[{broken")
        self.assertIn("sign-up of 'broken' not saved", server.test_log.getvalue())



# ---------------------------------------------------------------------------
# GET /openapi.json: a document that is true of the live server
# ---------------------------------------------------------------------------

JSON_TYPES = {"object": lambda v: isinstance(v, dict), "array": lambda v: isinstance(v, list),
              "string": lambda v: isinstance(v, str), "boolean": lambda v: isinstance(v, bool),
              "integer": lambda v: type(v) is int, "null": lambda v: v is None,
              "number": lambda v: type(v) in (int, float)}
# The JSON Schema keywords the checker understands; any other in a response schema is an
# error, so the document cannot promise what no test checks.
SCHEMA_KEYWORDS = {"$ref", "type", "required", "properties", "enum", "items", "description"}


def schema_errors(schema, value, document, where="body"):
    """What in value breaks schema (a subset of JSON Schema): a list of texts, [] if none."""
    unknown = set(schema) - SCHEMA_KEYWORDS
    if unknown:
        raise AssertionError(f"{where}: the checker does not know {sorted(unknown)}")
    if "$ref" in schema:
        target = document
        for part in schema["$ref"].lstrip("#/").split("/"):
            target = target[part]
        return schema_errors(target, value, document, where)
    if "type" in schema:
        types = [schema["type"]] if isinstance(schema["type"], str) else schema["type"]
        if not any(JSON_TYPES[name](value) for name in types):
            return [f"{where}: {value!r} is not of type {schema['type']}"]
    errors = []
    if "enum" in schema and not any(type(value) is type(option) and value == option
                                    for option in schema["enum"]):
        errors.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if isinstance(value, dict):
        errors += [f"{where}: {name!r} is missing" for name in schema.get("required", ())
                   if name not in value]
        for name, subschema in schema.get("properties", {}).items():
            if name in value:
                errors += schema_errors(subschema, value[name], document, f"{where}.{name}")
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            errors += schema_errors(schema["items"], item, document, f"{where}[{index}]")
    return errors


def documented_pairs(document):
    """Every (method, path, status) the document says the server answers."""
    return {(method.upper(), path, int(status))
            for path, operations in document["paths"].items()
            for method, operation in operations.items()
            for status in operation["responses"]}


class TestOpenAPISchemaChecker(unittest.TestCase):
    """The checker the walk relies on must itself find what is wrong."""

    DOCUMENT = {"components": {"schemas": {"Point": {
        "type": "object", "required": ["x", "tag"],
        "properties": {"x": {"type": "integer"}, "tag": {"enum": ["a", True]},
                       "list": {"type": "array", "items": {"type": ["string", "null"]}}}}}}}

    def test_table(self):
        point = {"$ref": "#/components/schemas/Point"}
        table = [({"x": 1, "tag": "a"}, 0), ({"x": 1, "tag": True, "list": ["s", None]}, 0),
                 ({"x": True, "tag": "a"}, 1), ({"x": 1.0, "tag": "a"}, 1), ({"tag": "a"}, 1),
                 ({"x": 1, "tag": 1}, 1), ({"x": 1, "tag": "b"}, 1), ([], 1), ("x", 1),
                 ({"x": 1, "tag": "a", "list": [1, "s", {}]}, 2), ({}, 2)]
        for value, count in table:
            with self.subTest(value=value):
                self.assertEqual(len(schema_errors(point, value, self.DOCUMENT)), count)

    def test_unknown_keywords_are_refused(self):
        with self.assertRaises(AssertionError):
            schema_errors({"type": "string", "maxLength": 3}, "abcd", {})


class TestOpenAPI(unittest.TestCase):
    """The document lists every route, and a walk through the live server proves each answer."""

    @classmethod
    def setUpClass(cls):
        scope = ClassScope(cls)
        cls.files = Files(scope, allowRegistration=True, loginAttempts=2,
                          addressLoginAttempts=1000, passwordIterations=FAST_ITERATIONS)
        cls.server = start_server(scope, cls.files)
        cls.limited = start_server(scope, Files(scope, allowRegistration=True,
                                                addressLoginAttempts=1,
                                                passwordIterations=FAST_ITERATIONS))
        cls.full = start_server(scope, Files(scope, allowRegistration=True, maxUsers=3,
                                             passwordIterations=FAST_ITERATIONS))
        # A server whose files have failed: its sessions database closed under it, its
        # users.json no longer JSON (it keeps the users it had loaded).
        cls.broken_files = Files(scope, allowRegistration=True, passwordIterations=FAST_ITERATIONS)
        cls.broken = start_server(scope, cls.broken_files)
        cls.broken.sessions.close()
        cls.broken_files.users.write_text("[{broken")
        status, headers, data = exchange(cls.server, "GET", "/openapi.json")
        assert status == 200, data
        cls.document = json.loads(data)

    # -- the walk: one way to make the server give each documented answer ---------------

    def call(self, method, path, body=None, headers=None, server=None, **options):
        return exchange(server or self.server, method, path, body, headers, **options)

    def login(self, username="test", password="test"):
        answer = self.call("POST", "/users/authenticate", login_body(username, password))
        return json.loads(answer[2])

    # Ways to get an answer that a body and headers alone do not give; each takes the
    # method and the path, and returns what exchange returns.

    def without_length(self, method, path):
        return raw_exchange(self.server, f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())

    def too_large(self, method, path):
        length = self.server.config["maxBodyBytes"] + 1
        return raw_exchange(self.server, f"{method} {path} HTTP/1.1\r\nContent-Length: "
                                         f"{length}\r\n\r\n".encode())

    def text_body(self, method, path):
        return self.call(method, path, "hello", content_type="text/plain")

    def locked_out(self, method, path):         # loginAttempts is 2 on this server
        for _ in range(2):
            self.call(method, path, login_body("ncuser", "wrong"))
        return self.call(method, path, login_body("ncuser", "wrong"))

    def refreshed(self, method, path):
        return self.call(method, path, {"refreshToken": self.login()["refreshToken"]})

    def logged_in(self, method, path):
        token = self.login()["token"]
        return self.call(method, path, b"" if method == "POST" else None,
                         {"Authorization": f"Bearer {token}"})

    def without_page(self, method, path):
        page, self.server.page = self.server.page, None
        try:
            return self.call(method, path)
        finally:
            self.server.page = page

    def limited_twice(self, method, path):     # addressLoginAttempts is 1 on that server
        self.call(method, path, signup_body("walker"), server=self.limited)
        return self.call(method, path, signup_body("walker"), server=self.limited)

    # (method, path, status) -> how to make the server give that answer: the name of a
    # method above, or what to send (body, headers) and to which server (main if none).
    UNSEEN = {"x-access-token": token_for(sid="never-seen-session")}  # its file is read
    REFRESH = {"refreshToken": "A" * 43}            # the shape of one, issued by nobody
    WALK = {
        ("POST", "/users/authenticate", 200): {"body": login_body()},
        ("POST", "/users/authenticate", 400): {"body": login_body("test", "wrong")},
        ("POST", "/users/authenticate", 429): "locked_out",
        ("POST", "/users/authenticate", 503): {"body": login_body(), "server": "broken"},
        ("GET", "/users/getInfo", 200): "logged_in",
        ("GET", "/users/getInfo", 401): {"headers": {"x-access-token": token_for()[:-2]}},
        ("GET", "/users/getInfo", 403): {},
        ("GET", "/users/getInfo", 503): {"headers": UNSEEN, "server": "broken"},
        ("POST", "/users/refresh", 200): "refreshed",
        ("POST", "/users/refresh", 400): {"body": {}},
        ("POST", "/users/refresh", 401): {"body": REFRESH},
        ("POST", "/users/refresh", 503): {"body": REFRESH, "server": "broken"},
        ("POST", "/users/logout", 204): "refreshed",
        ("POST", "/users/logout", 400): {"body": {"refreshToken": 1}},
        ("POST", "/users/logout", 503): {"body": REFRESH, "server": "broken"},
        ("POST", "/users/logoutAll", 204): "logged_in",
        ("POST", "/users/logoutAll", 401): {"body": b"", "headers": {"x-access-token": "x.y.z"}},
        ("POST", "/users/logoutAll", 403): {"body": b""},
        ("POST", "/users/logoutAll", 503): {"body": b"", "headers": UNSEEN, "server": "broken"},
        ("GET", "/users/sessions", 200): "logged_in",
        ("GET", "/users/sessions", 401): {"headers": {"x-access-token": token_for(lifetime=-10)}},
        ("GET", "/users/sessions", 403): {},
        ("GET", "/users/sessions", 503): {"headers": UNSEEN, "server": "broken"},
        ("POST", "/users/register", 201): {"body": signup_body("walk-new", firstName="W")},
        ("POST", "/users/register", 400): {"body": signup_body("walk bad")},
        ("POST", "/users/register", 403): {"body": signup_body("walk-full"), "server": "full"},
        ("POST", "/users/register", 409): {"body": signup_body("test")},
        ("POST", "/users/register", 429): "limited_twice",
        ("POST", "/users/register", 503): {"body": signup_body("walk-503"), "server": "broken"},
        ("GET", "/attacks", 200): "logged_in",
        ("GET", "/attacks", 401): {"headers": {"x-access-token": token_for()[:-2]}},
        ("GET", "/attacks", 403): {},
        ("GET", "/attacks", 503): {"headers": UNSEEN, "server": "broken"},
        ("GET", "/openapi.json", 200): {},
        ("GET", "/", 200): {},
        ("GET", "/", 404): "without_page",
    }
    # Every POST answers 411 and 413 the same way, and every POST with a body 415.
    for _path in ("/users/authenticate", "/users/refresh", "/users/logout", "/users/logoutAll",
                  "/users/register"):
        WALK.update({("POST", _path, 411): "without_length", ("POST", _path, 413): "too_large"})
        if _path != "/users/logoutAll":
            WALK[("POST", _path, 415)] = "text_body"
    del _path

    def walk(self, method, path, status):
        """The answer WALK says how to get."""
        how = self.WALK[(method, path, status)]
        if isinstance(how, str):
            return getattr(self, how)(method, path)
        server = getattr(self, how.get("server", "server"))
        return self.call(method, path, how.get("body"), how.get("headers"), server)

    def test_every_documented_answer_is_walked_and_every_walk_documented(self):
        self.assertEqual(sorted(documented_pairs(self.document)), sorted(self.WALK))

    def test_walk_the_live_server_through_every_documented_answer(self):
        for method, path, status in sorted(self.WALK):
            with self.subTest(method=method, path=path, status=status):
                got, headers, data = self.walk(method, path, status)
                self.assertEqual(got, status, data[:300])
                documented = self.document["paths"][path][method.lower()]["responses"][str(status)]
                self.assertEqual(headers.get("access-control-allow-origin"), "*")
                for name in documented.get("headers", {}):
                    self.assertIn(name.lower(), headers)
                if "content" not in documented:
                    self.assertEqual(data, b"")
                    continue
                [(media_type, media)] = documented["content"].items()
                self.assertEqual(headers["content-type"].partition(";")[0], media_type)
                value = (json.loads(data) if media_type == "application/json"
                         else data.decode("utf-8"))
                self.assertEqual(schema_errors(media["schema"], value, self.document), [])

    def test_every_route_is_documented(self):
        self.assertEqual(set(authserver.ROUTE_DOCS), set(authserver.ROUTES))
        served = {(method.upper(), path) for path, operations in self.document["paths"].items()
                  for method in operations}
        self.assertEqual(served, set(authserver.ROUTES))
        # A route added to ROUTES without its documentation breaks the document.
        with mock.patch.dict(authserver.ROUTES, {("GET", "/new"): authserver.get_info}), \
                self.assertRaises(KeyError):
            authserver.openapi_document(
                authserver.RouteTable(authserver.ROUTES, authserver.PUBLIC_PATHS), "/")

    def test_document(self):
        status, headers, data = self.call("GET", "/openapi.json", headers={"Host": "example.test:4000"})
        document = json.loads(data)
        self.assertEqual((status, document["openapi"]), (200, "3.1.0"))
        self.assertEqual(document["servers"], [{"url": "http://example.test:4000"}])
        self.assertEqual(self.document["servers"],
                         [{"url": f"http://127.0.0.1:{self.server.server_address[1]}"}])
        odd = raw_exchange(self.server, b"GET /openapi.json HTTP/1.1\r\nHost: a/b\"c\r\n\r\n")
        self.assertEqual(json.loads(odd[2])["servers"], [{"url": "/"}])
        self.assertEqual(document["components"]["securitySchemes"], {
            "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                       "description": "Authorization: Bearer <token>"},
            "accessToken": {"type": "apiKey", "in": "header", "name": "x-access-token",
                            "description": "the tutorial's header: x-access-token: <token>"}})
        paths = document["paths"]
        self.assertEqual(paths["/users/getInfo"]["get"]["security"],
                         [{"bearer": []}, {"accessToken": []}])
        self.assertEqual(paths["/users/authenticate"]["post"]["security"], [])
        self.assertEqual(paths["/users/getInfo"]["get"]["operationId"], "getInfo")
        self.assertEqual(set(paths["/users/authenticate"]["post"]["requestBody"]["content"]),
                         {"application/json", "application/x-www-form-urlencoded"})
        # Every $ref points at something.
        def refs(node):
            if isinstance(node, dict):
                yield from ([node["$ref"]] if "$ref" in node else [])
                for child in node.values():
                    yield from refs(child)
            elif isinstance(node, list):
                for child in node:
                    yield from refs(child)
        for reference in set(refs(document)):
            target = document
            for part in reference.lstrip("#/").split("/"):
                target = target[part]


# ---------------------------------------------------------------------------
# Login limits under concurrency, config numbers, and tests that catch broken code
# ---------------------------------------------------------------------------

class HeldChecks:
    """verify_password, wrapped: records every password check started and holds it until
    release is set, so that no check can finish (and be counted) before all have arrived."""

    def __init__(self):
        self.started, self.lock, self.release = [], threading.Lock(), threading.Event()
        self.original = authserver.verify_password

    def __call__(self, password, encoded):
        with self.lock:
            self.started.append(password)
        self.release.wait(30)
        return self.original(password, encoded)


def login_burst(test, server, bodies):
    """One login per body, each on its own connection, all sent at once (a Barrier), with
    every password check held until each request is being checked or has been answered.
    Returns (the passwords whose check started, [(status, headers, body)] in body order)."""
    held = HeldChecks()
    server.hash_slots = threading.BoundedSemaphore(len(bodies))   # count checks, not queueing
    port, results = server.server_address[1], [None] * len(bodies)
    barrier = threading.Barrier(len(bodies), timeout=30)

    def send(index, body):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            request = post(json.dumps(body))
            barrier.wait()
            sock.sendall(request)
            results[index] = read_response(sock, 30)
    with mock.patch.object(authserver, "verify_password", held):
        threads = [threading.Thread(target=send, args=pair, daemon=True)
                   for pair in enumerate(bodies)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        try:
            while len(held.started) + sum(result is not None for result in results) < len(bodies):
                test.assertLess(time.monotonic(), deadline, "the logins never all arrived")
                time.sleep(0.01)
        finally:
            held.release.set()
            for thread in threads:
                thread.join(30)
    test.assertNotIn(None, results, "a login got no answer")
    return held.started, results


class TestLimitsConcurrentLogins(unittest.TestCase):
    """No more than the limit of password checks may START in a window, however many
    requests arrive together."""

    def assert_429(self, result, window):
        status, headers, body = result
        wait = int(headers["retry-after"])
        self.assertTrue(1 <= wait <= window + 1, wait)
        self.assertEqual((status, json.loads(body)),
                         (429, {"message": f"Too many failed logins; try again in {wait} seconds"}))

    def test_100_guesses_at_once_start_at_most_login_attempts_checks(self):
        server = start_server(self, loginAttempts=5, loginWindow=60)
        bodies = [login_body("test", f"guess-{n}") for n in range(99)]
        bodies.insert(50, login_body("test", "test"))              # one right password
        started, results = login_burst(self, server, bodies)
        # Exactly 5: every request reached the limiter before any check could finish.
        self.assertEqual(len(started), 5, started)
        right = started.count("test")                               # 1 if it was among them
        statuses = [status for status, _, _ in results]
        self.assertEqual({code: statuses.count(code) for code in set(statuses)},
                         {code: count for code, count in ((429, 95), (400, 5 - right), (200, right))
                          if count})
        for result in results:
            if result[0] == 429:
                self.assert_429(result, 60)
        if right:
            self.assertEqual(results[50][0], 200)

    def test_an_address_starts_at_most_address_login_attempts_checks(self):
        server = start_server(self, loginAttempts=5, addressLoginAttempts=4, loginWindow=60)
        bodies = [login_body(f"user-{n}", "guess") for n in range(20)]   # 20 names, 1 address
        started, results = login_burst(self, server, bodies)
        self.assertEqual(len(started), 4, started)
        statuses = [status for status, _, _ in results]
        self.assertEqual((statuses.count(400), statuses.count(429)), (4, 16))
        for result in results:
            if result[0] == 429:
                self.assert_429(result, 60)


class TestLimitsPerUserAndAddress(unittest.TestCase):

    def statuses(self, server, logins, source=None):
        """The status of each (username, password) login, in turn, from address source."""
        connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1],
                                                timeout=10, source_address=source)
        self.addCleanup(connection.close)
        statuses = []
        for login in logins:
            connection.request("POST", "/users/authenticate", json.dumps(login_body(*login)),
                               {"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            statuses.append(response.status)
        return statuses

    def test_user_and_address_limits_are_separate(self):
        server = start_server(self, loginAttempts=2, addressLoginAttempts=5)
        # Two typos lock "test" out, but not the neighbour "ncuser" on the same address ...
        self.assertEqual(self.statuses(server, [("test", "x"), ("test", "y"), ("test", "test"),
                                                ("ncuser", "ncpassword")]),
                         [400, 400, 429, 200])
        # ... until the address has started 5 checks that were not right (the 429 and the
        # 200 do not count): then everyone on it waits.
        self.assertEqual(self.statuses(server, [("a", "x"), ("b", "x"), ("c", "x"),
                                                ("ncuser", "ncpassword")]),
                         [400, 400, 400, 429])
        try:
            other = self.statuses(server, [("ncuser", "ncpassword"), ("test", "test")],
                                  source=("127.0.0.2", 0))
        except OSError as error:                 # 127.0.0.2 is not local on every system
            self.skipTest(f"no second loopback address: {error}")
        # Another address is served; the username stays locked wherever it comes from.
        self.assertEqual(other, [200, 429])

    def test_a_right_password_resets_the_user_and_is_not_held_against_the_address(self):
        server = start_server(self, loginAttempts=3, addressLoginAttempts=100)
        right, wrong = ("test", "test"), ("test", "wrong")
        self.assertEqual(self.statuses(server, [wrong, wrong, right, wrong, wrong, right]),
                         [400, 400, 200, 400, 400, 200])
        server = start_server(self, loginAttempts=100, addressLoginAttempts=2)
        self.assertEqual(self.statuses(server, [right, ("ncuser", "ncpassword")] * 3), [200] * 6)

    def test_limiter_drops_the_least_recently_used_key_when_full(self):
        limiter = authserver.LoginLimiter({"user": 1}, window=60, max_keys=3)
        for name in "abcd":
            self.assertEqual(limiter.reserve([("user", name)], 1000), 0)
        self.assertEqual(list(limiter.started["user"]),
                         [("user", "b"), ("user", "c"), ("user", "d")])
        self.assertEqual(limiter.reserve([("user", "d")], 1001), 60)    # the newest is kept
        self.assertEqual(limiter.reserve([("user", "a")], 1001), 0)     # the oldest forgotten

    def test_a_refused_key_counts_nothing_against_the_others(self):
        limiter = authserver.LoginLimiter({"user": 1, "address": 10}, window=60)
        keys = [("user", "a"), ("address", "x")]
        self.assertEqual(limiter.reserve(keys, 1000), 0)
        self.assertEqual(limiter.reserve(keys, 1001), 60)
        self.assertEqual(len(limiter.started["address"][("address", "x")]), 1)
        limiter.release(("address", "x"), 1000)
        self.assertEqual(len(limiter.started["address"][("address", "x")]), 0)


class TestLimitsConfigNumbers(unittest.TestCase):

    def load(self, text):
        files = Files(self)
        files.config.write_text(text)
        return files, authserver.load_config(files.config)

    def assert_refused(self, text, name):
        files = Files(self)
        files.config.write_text(text)
        with self.assertRaises(authserver.ConfigError) as caught:
            authserver.load_config(files.config)
        message = str(caught.exception)
        self.assertTrue(message.startswith(f"config file {files.config}: {name} must be "),
                        message)
        self.assertNotIn("\n", message)

    def test_whole_numbers_and_numbers_and_booleans(self):
        max_iterations = authserver.MAX_ITERATIONS
        for name, value in (("loginAttempts", 2.5), ("passwordIterations", 1000.0),
                            ("port", 4000.0), ("maxBodyBytes", True), ("maxBodyBytes", 0),
                            ("addressLoginAttempts", 0), ("addressLoginAttempts", "50"),
                            ("addressLoginAttempts", 2.0), ("loginWindow", 1.5),
                            ("loginAttempts", 10 ** 30), ("passwordIterations", max_iterations + 1),
                            ("leeway", -1), ("leeway", True), ("requestTimeout", 0),
                            ("shutdownGrace", "10"), ("shutdownGrace", 10 ** 9),
                            ("accessLog", "false"), ("accessLog", 0), ("accessLog", None),
                            ("tokenLifetime", "forever"), ("tokenLifetime", "9" * 5000)):
            with self.subTest(name=name, value=str(value)[:20]):
                self.assert_refused(json.dumps({"secret": SECRET, name: value}), name)
        # What Python's json reads as inf or nan is no number of seconds either.
        for text in ("1e400", "-1e400", "NaN", "Infinity"):
            with self.subTest(text):
                self.assert_refused(f'{{"leeway": {text}}}', "leeway")
        files, config = self.load(json.dumps({"leeway": 0.5, "requestTimeout": 2.5,
                                              "shutdownGrace": 0.5, "passwordIterations": 1000,
                                              "accessLog": False}))
        self.assertEqual((config["leeway"], config["requestTimeout"], config["shutdownGrace"],
                          config["loginAttempts"], config["addressLoginAttempts"]),
                         (0.5, 2.5, 0.5, 5, 50))

    def test_command_line_port_and_config_errors_are_one_line_exit_2(self):
        files = Files(self)
        # In this process (main refuses before it serves); one run as a command is enough.
        result = run_cli("--port", "99999", "--config", files.config, "--users", files.users)
        self.assertEqual((result.returncode, result.stderr),
                         (2, "authserver: --port: port must be a whole number from 0 to 65535\n"))
        for port in ("-1", "65536"):
            with self.subTest(port=port):
                code, out, err = main_in_process("--port", port, "--config", files.config,
                                                 "--users", files.users)
                self.assertEqual((code, out, err),
                                 (2, "", "authserver: --port: port must be a whole number "
                                         "from 0 to 65535\n"))
        for setting, message in (({"accessLog": "false"}, "accessLog must be true or false"),
                                 ({"tokenLifetime": "1w"}, "tokenLifetime must be")):
            with self.subTest(setting):
                bad = Files(self, **setting)
                result = subprocess.CompletedProcess("serve", *main_in_process(
                    "--config", bad.config, "--users", bad.users))
                self.assertEqual(result.returncode, 2)
                self.assertTrue(result.stderr.startswith(
                    f"authserver: config file {bad.config}: {message}"), result.stderr)
                self.assertEqual(result.stderr.count("\n"), 1)


def signed(payload_text):
    """A token whose payload is exactly this JSON text (json.dumps cannot write 1e400)."""
    payload = b64url_encode(payload_text.encode())
    signature = b64url_encode(authserver.sign(f"{HEAD}.{payload}".encode(), SECRET.encode()))
    return f"{HEAD}.{payload}.{signature}"


class TestLimitsHugeNumbers(SharedServerCase):
    """No number makes a 500: claims beyond a float beside a fractional leeway, JSON numbers
    Python reads as infinity, a Content-Length of thousands of digits."""

    server_config = {"leeway": 0.5}

    def get_info(self, token):
        status, _, body = raw_exchange(
            self.server, f"GET /users/getInfo HTTP/1.1\r\nx-access-token: {token}\r\n\r\n".encode())
        return status, json.loads(body)

    def test_claim_values_beyond_a_float(self):
        now = int(time.time())
        head = f'"id":81623,"username":"test","iat":{now}'
        huge = "1" + "0" * 309
        cases = [
            (f'{{{head},"exp":{huge}}}', 200, None),
            (f'{{{head},"exp":-{huge}}}', 401, "jwt expired"),
            (f'{{{head},"exp":{now + 60},"nbf":{huge}}}', 401, "jwt not active"),
            (f'{{"id":81623,"username":"test","iat":{huge},"exp":{now + 60}}}', 401,
             "jwt not active"),
            (f'{{{head},"exp":1e400}}', 401, "invalid exp value"),
            (f'{{{head},"exp":{now + 60},"nbf":-1e400}}', 401, "invalid nbf value"),
            (f'{{"id":81623,"username":"test","iat":-1e400,"exp":{now + 60}}}', 401,
             "invalid iat value"),
        ]
        for payload, status, message in cases:
            with self.subTest(payload[-40:]):
                answer = self.get_info(signed(payload))
                self.assertEqual(answer[0], status, answer)
                if message:
                    self.assertEqual(answer[1]["message"], message)
        self.assertNotIn("Traceback", self.server.test_log.getvalue())

    def test_content_length_of_any_length_is_400_or_413(self):
        for digits, status, message in (
                ("9" * 4301, 413, "Body larger than 16384 bytes"),
                ("1" + "0" * 10000, 413, "Body larger than 16384 bytes"),
                ("16385", 413, "Body larger than 16384 bytes"),
                ("0" * 5000 + "2", 400, "username and password are required")):
            with self.subTest(digits=digits[:10], length=len(digits)):
                request = ("POST /users/authenticate HTTP/1.1\r\nContent-Type: application/json\r\n"
                           f"Content-Length: {digits}\r\n\r\n{{}}").encode()
                answer = raw_exchange(self.server, request)
                self.assertEqual((answer[0], json.loads(answer[2])), (status, {"message": message}))


def header_value(head, name):
    """The value of header name in a raw response head, or None."""
    for line in head.decode("latin-1").split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == name:
            return value.strip()
    return None


class TestLimitsCatchMutations(SharedServerCase):
    """Each test here fails for a plausible wrong change to authserver.py that the rest of
    the suite would let through."""

    def test_signature_is_compared_with_compare_digest(self):
        with mock.patch("hmac.compare_digest", wraps=hmac.compare_digest) as spy:
            self.assertEqual(decode_token(VALID, SECRET, now=NOW), GOOD_CLAIMS)
        self.assertIn(SIGNATURE, [argument for call in spy.call_args_list for argument in call[0]])

    def test_leeway_applies_to_iat(self):
        early = forge(GOOD_HEADER, dict(GOOD_CLAIMS, iat=NOW + 5))
        self.assertEqual(decode_token(early, SECRET, now=NOW, leeway=10)["iat"], NOW + 5)
        with self.assertRaises(authserver.NotBeforeError):
            decode_token(early, SECRET, now=NOW, leeway=4)

    def test_audience_may_be_a_list(self):
        for aud, accepted in ((["web", "app"], True), ("app", True), (["web"], False), ([], False)):
            with self.subTest(aud=aud):
                token = forge(GOOD_HEADER, dict(GOOD_CLAIMS, aud=aud))
                if accepted:
                    claims = decode_token(token, SECRET, now=NOW, audience="app")
                    self.assertEqual(claims["aud"], aud)
                else:
                    with self.assertRaises(TokenError):
                        decode_token(token, SECRET, now=NOW, audience="app")

    def test_head_answer_has_no_body(self):
        for path, headers in (("/users/getInfo", f"x-access-token: {token_for()}\r\n"), ("/", "")):
            with self.subTest(path), socket.create_connection(
                    ("127.0.0.1", self.server.server_address[1]), timeout=10) as sock:
                sock.sendall(f"HEAD {path} HTTP/1.1\r\n{headers}Connection: close\r\n\r\n".encode())
                received = b""
                while True:                                     # to the end: the server closes
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    received += chunk
                head, _, body = received.partition(b"\r\n\r\n")
                self.assertTrue(head.startswith(b"HTTP/1.1 200 OK\r\n"), head)
                self.assertGreater(int(header_value(head, "content-length")), 0)
                self.assertEqual(body, b"")

    def test_nul_in_credentials_has_its_own_message(self):
        for body in ('{"username":"te\\u0000st","password":"dGVzdA=="}',
                     '{"username":"test","password":"dGVz\\u0000dA=="}'):
            with self.subTest(body):
                status, _, answer = raw_exchange(self.server, post(body))
                self.assertEqual((status, json.loads(answer)), (400, {
                    "message": "username and password must not contain NUL characters"}))

    def test_transfer_encoding_with_content_length_is_refused(self):
        request = post(json.dumps(login_body()), extra="Transfer-Encoding: chunked\r\n")
        status, headers, body = raw_exchange(self.server, request)
        self.assertEqual((status, json.loads(body), headers["connection"]), (411, {
            "message": "Send a Content-Length; chunked bodies are not accepted"}, "close"))

    def test_control_characters_in_header_values_are_refused(self):
        for value in (b"a\x00b", b"a\x01b", b"a\x1bb", b"a\rb", b"a\x7fb"):
            with self.subTest(value=value):
                status, _, body = raw_exchange(self.server,
                                               b"GET / HTTP/1.1\r\nX-Note: " + value + b"\r\n\r\n")
                self.assertEqual((status, json.loads(body)), (400, {"message": "Bad header line"}))
        tab = raw_exchange(self.server, b"GET / HTTP/1.1\r\nX-Note: a\tb\r\n\r\n")
        self.assertEqual(tab[0], 200)                   # a tab is allowed (RFC 9110 §5.5)

    def test_secret_needs_32_bytes(self):
        for text, accepted in (("x" * 31, False), ("x" * 32, True), ("é" * 15, False),
                               ("é" * 16, True)):
            with self.subTest(length=len(text.encode())):
                files = Files(self, secret=text)
                config = authserver.load_config(files.config)
                if accepted:
                    self.assertEqual(authserver.load_secret(config), text.encode())
                else:
                    with self.assertRaises(authserver.ConfigError):
                        authserver.load_secret(config)

    def test_duplicate_user_ids_refused(self):
        files = Files(self, users=[make_user(7, "ann", "x"), make_user(7, "bob", "y")])
        with self.assertRaises(authserver.ConfigError) as caught:
            authserver.UserStore(files.users)
        self.assertIn("the id 7 is used by both 'ann' and 'bob'", str(caught.exception))
        files = Files(self, users=[make_user(7, "ann", "x"), make_user("7", "bob", "y")])
        self.assertEqual(len(authserver.UserStore(files.users).tables.by_id), 2)  # 7 is not "7"

    def test_pbkdf2_iterations_are_capped(self):
        digest = base64.b64encode(bytes(32)).decode()
        at_cap = f"pbkdf2_sha256${authserver.MAX_ITERATIONS}$salt${digest}"
        over = f"pbkdf2_sha256${authserver.MAX_ITERATIONS + 1}$salt${digest}"
        self.assertEqual(authserver.split_password_hash(at_cap)[0], authserver.MAX_ITERATIONS)
        with mock.patch("hashlib.pbkdf2_hmac") as pbkdf2:
            with self.assertRaises(ValueError):
                verify_password("x", over)                 # refused before any hashing
        pbkdf2.assert_not_called()
        files = Files(self, users=[{"id": 1, "username": "slow", "passwordHash": over}])
        with self.assertRaises(authserver.ConfigError) as caught:
            authserver.UserStore(files.users)
        self.assertIn("'slow' has no valid passwordHash", str(caught.exception))


class TestLimitsShippedFiles(unittest.TestCase):

    def test_shipped_files_have_the_right_shape(self):
        """The one test that reads the shipped users.json and config.json, for their shape
        only: a newcomer's passwd or adduser must leave the suite green."""
        users_path = HERE / "users.json"
        users = json.loads(users_path.read_text(encoding="utf-8"))
        authserver.check_users(users, users_path)      # hashes, never plaintext; unique
        for user in users:
            self.assertEqual([name for name in user if "password" in name.lower()],
                             ["passwordHash"])
        config = authserver.load_config(HERE / "config.json")
        self.assertEqual(config["secret"], "")          # no secret ships with the code
        # Every setting is there to be seen and changed, in the order the README lists them.
        self.assertEqual(list(json.loads((HERE / "config.json").read_text(encoding="utf-8"))),
                         list(authserver.DEFAULT_CONFIG))

# ---------------------------------------------------------------------------
# Sessions: refresh tokens, logout, revocation
# ---------------------------------------------------------------------------

REVOKED = {"error": True, "name": "SessionRevokedError", "message": "session revoked"}
NOT_RECOGNISED = {"error": True, "name": "RefreshTokenError",
                  "message": "refresh token not recognised (revoked or never issued)"}


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def main_in_process(*args, stdin=None):
    """authserver.main(args) here, not in a subprocess: (exit code, stdout, stderr).

    stdin: text for it to read (else whatever sys.stdin is, perhaps patched by the test)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.ExitStack() as patches:
        if stdin is not None:
            patches.enter_context(mock.patch("sys.stdin", io.StringIO(stdin)))
        patches.enter_context(mock.patch("sys.stdout", out))
        patches.enter_context(mock.patch("sys.stderr", err))
        code = authserver.main([str(arg) for arg in args])
    return code, out.getvalue(), err.getvalue()


def poll_until(condition, timeout=10):
    """Call condition() until it is true or the deadline passes; its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        threading.Event().wait(0.02)


class SessionsCase(unittest.TestCase):
    """A server per test (servers are cheap); helpers to log in, refresh and log out."""

    config = {}

    def setUp(self):
        self.files = Files(self, **self.config)
        self.server = start_server(self, self.files)
        self.client = self.new_client(self.server)

    def new_client(self, server):
        client = Client(server)
        self.addCleanup(client.close)
        return client

    def login(self, username="test", password="test", client=None, headers=None):
        status, _, body = (client or self.client).request(
            "POST", "/users/authenticate", login_body(username, password), headers)
        self.assertEqual(status, 200, body)
        return body

    def refresh(self, refresh_token, client=None):
        status, _, body = (client or self.client).request(
            "POST", "/users/refresh", {"refreshToken": refresh_token})
        return status, body

    def info(self, token, client=None):
        status, _, body = (client or self.client).request("GET", "/users/getInfo",
                                                          headers=bearer(token))
        return status, body

    def sessions_file(self):
        return self.files.folder / "authserver.sessions"


class TestSessionsTokens(SessionsCase):

    def test_login_returns_both_tokens_and_the_access_token_names_the_session(self):
        body = self.login(headers={"User-Agent": "phone-app/1.0"})
        self.assertEqual(set(body), {"token", "expiresIn", "refreshToken", "refreshExpiresIn"})
        self.assertEqual((body["expiresIn"], body["refreshExpiresIn"]), (3600, 14 * 86400))
        self.assertRegex(body["refreshToken"], r"^[A-Za-z0-9_-]{43}$")
        claims = decode_token(body["token"], SECRET)
        self.assertRegex(claims["sid"], r"^[A-Za-z0-9_-]{22}$")
        status, _, listed = self.client.request("GET", "/users/sessions",
                                                headers=bearer(body["token"]))
        self.assertEqual(status, 200, listed)
        [session] = listed["sessions"]
        self.assertEqual(set(session), {"id", "created", "lastUsed", "expires", "address",
                                        "userAgent", "current"})
        self.assertEqual((session["id"], session["address"], session["userAgent"],
                          session["current"]), (claims["sid"], "127.0.0.1", "phone-app/1.0", True))
        self.assertEqual(session["expires"] - session["created"], 14 * 86400)

    def test_refresh_rotates_both_tokens(self):
        first = self.login()
        status, second = self.refresh(first["refreshToken"])
        self.assertEqual(status, 200, second)
        self.assertEqual(set(second), {"token", "expiresIn", "refreshToken", "refreshExpiresIn"})
        self.assertNotEqual(second["refreshToken"], first["refreshToken"])
        self.assertEqual(decode_token(second["token"], SECRET)["sid"],
                         decode_token(first["token"], SECRET)["sid"])
        self.assertEqual(self.info(second["token"])[0], 200)
        status, third = self.refresh(second["refreshToken"])
        self.assertEqual(status, 200, third)
        self.assertNotIn(third["refreshToken"], (first["refreshToken"], second["refreshToken"]))

    def test_refresh_with_a_form_body(self):
        first = self.login()
        status, _, body = self.client.request(
            "POST", "/users/refresh", f"refreshToken={first['refreshToken']}",
            {"Content-Type": "application/x-www-form-urlencoded"})
        self.assertEqual(status, 200, body)

    def test_bad_refresh_and_logout_bodies_are_4xx(self):
        cases = [({}, 400, "refreshToken is required"),
                 ({"refreshToken": 5}, 400, "refreshToken must be a non-empty string"),
                 ({"refreshToken": ""}, 400, "refreshToken must be a non-empty string"),
                 ("[1]", 400, "Malformed body: not a JSON object")]
        for path in ("/users/refresh", "/users/logout"):
            for body, code, message in cases:
                with self.subTest(path=path, body=body):
                    headers = {"Content-Type": "application/json"}
                    status, _, answer = self.client.request("POST", path, body, headers)
                    self.assertEqual((status, answer), (code, {"message": message}))
            status, _, _ = self.client.request("POST", path, "x", {"Content-Type": "text/plain"})
            self.assertEqual(status, 415)
        for token in ("A" * 43, "not a token", "x" * 5000):
            with self.subTest(token=token[:10]):
                self.assertEqual(self.refresh(token), (401, NOT_RECOGNISED))

    def test_two_refreshes_at_the_same_moment_get_the_same_pair(self):
        # Two threads on this server, one on a second server on the same files (another
        # SQLite connection, as another process would have).
        other = start_server(self, self.files)
        first = self.login()
        clients = [self.new_client(self.server), self.new_client(self.server),
                   self.new_client(other)]
        barrier = threading.Barrier(len(clients))
        answers = [None] * len(clients)

        def refresh(index):
            barrier.wait(timeout=10)
            answers[index] = self.refresh(first["refreshToken"], clients[index])
        threads = [threading.Thread(target=refresh, args=(index,)) for index in range(len(clients))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        self.assertEqual([status for status, _ in answers], [200] * len(clients), answers)
        self.assertEqual(len({json.dumps(body, sort_keys=True) for _, body in answers}), 1)
        pair = answers[0][1]
        self.assertEqual(self.info(pair["token"])[0], 200)
        self.assertEqual(self.refresh(pair["refreshToken"])[0], 200)   # and it rotates on

    def test_token_without_sid_is_verified_as_before(self):
        self.assertEqual(self.info(token_for())[0], 200)
        status, _, listed = self.client.request("GET", "/users/sessions",
                                                headers=bearer(token_for()))
        self.assertEqual((status, listed), (200, {"sessions": []}))
        status, body = self.info(token_for(sid=5))
        self.assertEqual((status, body["message"]), (401, "invalid sid value"))

    def test_sessions_list_marks_the_current_one_and_only_the_users(self):
        first = self.login(headers={"User-Agent": "laptop"})
        second = self.login(headers={"User-Agent": "phone"})
        self.login("ncuser", "ncpassword")
        status, _, listed = self.client.request("GET", "/users/sessions",
                                                headers=bearer(second["token"]))
        self.assertEqual(status, 200)
        self.assertEqual([(s["userAgent"], s["current"]) for s in listed["sessions"]],
                         [("laptop", False), ("phone", True)])
        self.assertEqual([s["id"] for s in listed["sessions"]],
                         [decode_token(t, SECRET)["sid"] for t in (first["token"], second["token"])])
        self.assertEqual(self.client.request("GET", "/users/sessions")[0], 403)
        self.assertEqual(self.client.request("POST", "/users/sessions", {},
                                             bearer(second["token"]))[0], 405)


class TestSessionsRevocation(SessionsCase):

    config = {"refreshGrace": 0}

    def test_reuse_after_rotation_revokes_the_session(self):
        first = self.login()
        status, second = self.refresh(first["refreshToken"])
        self.assertEqual(status, 200)
        self.assertEqual(self.info(second["token"])[0], 200)
        status, body = self.refresh(first["refreshToken"])           # the spent one again
        self.assertEqual((status, body), (401, {
            "error": True, "name": "RefreshTokenReuseError",
            "message": "refresh token already used: the session is revoked; log in again"}))
        self.assertEqual(self.info(second["token"]), (401, REVOKED))
        self.assertEqual(self.info(first["token"]), (401, REVOKED))
        self.assertEqual(self.refresh(second["refreshToken"]), (401, NOT_RECOGNISED))

    def test_logout_refuses_the_access_token_at_once_and_is_idempotent(self):
        body = self.login()
        other = self.login()
        status, response, answer = self.client.request("POST", "/users/logout",
                                                       {"refreshToken": body["refreshToken"]})
        self.assertEqual((status, answer, response.getheader("Content-Length")), (204, b"", None))
        status, response, answer = self.client.request("GET", "/users/getInfo",
                                                       headers=bearer(body["token"]))
        self.assertEqual((status, answer), (401, REVOKED))
        self.assertEqual(response.getheader("WWW-Authenticate"),
                         'Bearer error="invalid_token", error_description="session revoked"')
        self.assertEqual(self.refresh(body["refreshToken"]), (401, NOT_RECOGNISED))
        for token in (body["refreshToken"], "never-issued"):
            with self.subTest(token=token):
                status, _, _ = self.client.request("POST", "/users/logout", {"refreshToken": token})
                self.assertEqual(status, 204)
        self.assertEqual(self.info(other["token"])[0], 200)          # the other session lives

    def test_logout_all_ends_every_session_of_the_user_only(self):
        first, second = self.login(), self.login()
        theirs = self.login("ncuser", "ncpassword")
        self.assertEqual(self.client.request("POST", "/users/logoutAll", b"",
                                             {**bearer(first["token"]), "Content-Length": "0"})[0], 204)
        for body in (first, second):
            self.assertEqual(self.info(body["token"]), (401, REVOKED))
            self.assertEqual(self.refresh(body["refreshToken"]), (401, NOT_RECOGNISED))
        self.assertEqual(self.info(theirs["token"])[0], 200)
        self.assertEqual(self.client.request("POST", "/users/logoutAll", b"")[0], 403)

    def test_a_deleted_user_cannot_refresh(self):
        body = self.login()
        authserver.save_users(self.files.users, TEST_USERS[1:])
        self.server.users.refresh(force=True)       # the reload ends the user's sessions
        self.assertEqual(self.refresh(body["refreshToken"]), (401, NOT_RECOGNISED))
        self.assertEqual(self.server.sessions.sessions_of("test", time.time()), [])

    def test_oldest_sessions_end_past_max_sessions_per_user(self):
        self.server.sessions.max_per_user = 2
        bodies = [self.login() for _ in range(3)]
        self.assertEqual(self.info(bodies[0]["token"]), (401, REVOKED))
        self.assertEqual(self.refresh(bodies[0]["refreshToken"]), (401, NOT_RECOGNISED))
        status, _, listed = self.client.request("GET", "/users/sessions",
                                                headers=bearer(bodies[2]["token"]))
        self.assertEqual(len(listed["sessions"]), 2)
        self.assertEqual(self.info(bodies[1]["token"])[0], 200)

    def test_a_revocation_by_another_process_is_seen_within_seconds(self):
        body, kept = self.login(), self.login("ncuser", "ncpassword")
        common = ("--config", self.files.config, "--users", self.files.users)
        result = run_cli("sessions", "test", *common)
        self.assertEqual(result.returncode, 0, result.stderr)
        sid = decode_token(body["token"], SECRET)["sid"]
        self.assertIn(sid, result.stdout)
        self.assertIn("127.0.0.1", result.stdout)
        result = run_cli("revoke", "test", sid, *common)
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        self.assertIn("1 session(s) of 'test' revoked", result.stdout)
        self.assertEqual(poll_until(lambda: self.info(body["token"])[0] == 401), True)
        self.assertEqual(self.info(body["token"]), (401, REVOKED))
        self.assertEqual(self.info(kept["token"])[0], 200)
        for args in (("revoke", "nobody"), ("revoke", "test", sid), ("sessions", "nobody")):
            with self.subTest(args=args):
                code, _, error = main_in_process(*args, *common)
                self.assertEqual((code, len(error.splitlines())), (2, 1))
                self.assertTrue(error.startswith("authserver: no "), error)

    def test_passwd_revokes_the_users_sessions(self):
        self.files.config.write_text(json.dumps({"secret": SECRET, "refreshGrace": 0,
                                                 "passwordIterations": FAST_ITERATIONS}))
        body, kept = self.login(), self.login("ncuser", "ncpassword")
        result = run_cli("passwd", "test", "--config", self.files.config, "--users",
                         self.files.users, stdin="a-new-password\n")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("1 session(s) revoked", result.stdout)
        self.assertEqual(poll_until(lambda: self.info(body["token"])[0] == 401), True)
        self.assertEqual(self.refresh(body["refreshToken"]), (401, NOT_RECOGNISED))
        self.assertEqual(self.info(kept["token"])[0], 200)

    def test_explain_a_refresh_token_and_a_revoked_access_token(self):
        body = self.login()
        common = ("--config", self.files.config, "--users", self.files.users)
        # After "--": one refresh token in 64 begins with "-", which argparse takes for an option.
        code, out, error = main_in_process("explain", *common, "--", body["refreshToken"])
        self.assertEqual(code, 0, out + error)
        for text in ("This is a refresh token, not a JWT", "what makes it revocable",
                     hashlib.sha256(body["refreshToken"].encode()).hexdigest(),
                     "Verdict: valid. POST /users/refresh would renew it"):
            self.assertIn(text, out)
        code, out, error = main_in_process("explain", body["token"], *common)
        self.assertEqual(code, 0, out + error)
        self.assertIn("7. Is the session still live?", out)
        self.client.request("POST", "/users/logout", {"refreshToken": body["refreshToken"]})
        code, out, error = main_in_process("explain", body["token"], *common)
        self.assertEqual(code, 1, out + error)
        self.assertIn("FAIL SessionRevokedError: session revoked", out)
        self.assertIn('"name":"SessionRevokedError","message":"session revoked"', out)
        code, out, error = main_in_process("explain", *common, "--", body["refreshToken"])
        self.assertEqual(code, 1, out + error)
        self.assertIn("FAIL RefreshTokenError: refresh token not recognised", out)


class TestSessionsStorage(SessionsCase):

    def test_the_file_never_holds_a_refresh_token(self):
        first = self.login()
        status, second = self.refresh(first["refreshToken"])
        self.assertEqual(status, 200)
        stored = b"".join(path.read_bytes() for path in self.files.folder.glob("authserver.sessions*"))
        for token in (first["refreshToken"], second["refreshToken"]):     # (not printed)
            self.assertFalse(token.encode() in stored, "a refresh token is in the file")
            self.assertFalse(b64url_decode(token) in stored, "a refresh token is in the file")
            self.assertTrue(hashlib.sha256(token.encode()).digest() in stored)
        if os.name == "posix":
            self.assertEqual(self.sessions_file().stat().st_mode & 0o777, 0o600)

    def test_a_failing_sessions_file_is_503_and_no_token(self):
        body = self.login()

        class Broken:
            def execute(self, *args):
                raise authserver.sqlite3.OperationalError("attempt to write a readonly database")
        with mock.patch.object(self.server.sessions, "connection", Broken()):
            expected = {"error": True, "name": "SessionStoreError",
                        "message": "Sessions are unavailable right now; try again shortly"}
            for path, request_body in (("/users/authenticate", login_body()),
                                       ("/users/refresh", {"refreshToken": body["refreshToken"]}),
                                       ("/users/logout", {"refreshToken": body["refreshToken"]})):
                with self.subTest(path=path):
                    status, response, answer = self.client.request("POST", path, request_body)
                    self.assertEqual((status, answer), (503, expected))
                    self.assertEqual(response.getheader("Retry-After"), "5")
            # A live session is checked in memory: getInfo does not need the file ...
            self.assertEqual(self.info(body["token"])[0], 200)
            # ... unless it is one this process has never seen.
            self.assertEqual(self.info(token_for(sid="started-elsewhere")), (503, expected))
        self.assertIn("attempt to write a readonly database", self.server.test_log.getvalue())
        self.assertNotIn("Traceback", self.server.test_log.getvalue())
        self.assertEqual(self.refresh(body["refreshToken"])[0], 200)     # nothing was spent

    def test_purge_of_expired_sessions(self):
        store = authserver.SessionStore(self.files.folder / "purge.sessions", refresh_lifetime=10,
                                        max_per_user=5, grace=0)
        self.addCleanup(store.close)
        store.start("test", NOW)
        store.start("ncuser", NOW + 5)
        store.start("ncuser", NOW + 11)          # the first has expired: purged now
        with store.lock:
            names = [row[0] for row in store.connection.execute("SELECT username FROM sessions")]
        self.assertEqual(names, ["ncuser", "ncuser"])

    def test_restart_then_refresh(self):
        body = self.login()
        restarted = start_server(self, self.files)       # a new process's view: fresh store
        client = self.new_client(restarted)
        self.server.sessions.close()
        status, renewed = self.refresh(body["refreshToken"], client)
        self.assertEqual(status, 200, renewed)
        self.assertEqual(self.info(renewed["token"], client)[0], 200)

    def test_kill_9_in_the_middle_of_logins_leaves_a_usable_file(self):
        process = ServerProcess(self, "--config", self.files.config, "--users", self.files.users)
        first = json.loads(raw_exchange(process.port, post(json.dumps(login_body())))[2])
        stop, logins = threading.Event(), []

        def keep_logging_in():
            while not stop.is_set():        # as another user: test's first session stays
                try:
                    raw_exchange(process.port, post(json.dumps(login_body("ncuser", "ncpassword"))),
                                 timeout=5)
                except (OSError, AssertionError):
                    return
                logins.append(1)
        threads = [threading.Thread(target=keep_logging_in) for _ in range(2)]
        for thread in threads:
            thread.start()
        self.assertTrue(poll_until(lambda: len(logins) >= 4))     # logins are flowing now
        process.process.kill()                   # SIGKILL on POSIX: no cleanup at all
        process.process.wait(timeout=10)
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
        check = authserver.sqlite3.connect(self.sessions_file())
        self.addCleanup(check.close)
        self.assertEqual(check.execute("PRAGMA integrity_check").fetchone(), ("ok",))
        status, renewed = self.refresh(first["refreshToken"])
        self.assertEqual(status, 200, renewed)

    def test_an_unusable_sessions_file_refuses_to_start(self):
        self.sessions_file().unlink()
        for name in ("authserver.sessions-wal", "authserver.sessions-shm"):
            (self.files.folder / name).unlink(missing_ok=True)
        self.sessions_file().write_bytes(b"this is not an SQLite database\n" * 200)
        result = run_cli("--config", self.files.config, "--users", self.files.users)
        self.assertEqual((result.returncode, len(result.stderr.splitlines())), (2, 1), result.stderr)
        self.assertTrue(result.stderr.startswith(
            f"authserver: sessions file {self.sessions_file()}: file is not a database"),
            result.stderr)
        missing = Files(self, sessionsFile="no/such/folder/sessions")
        with self.assertRaises(authserver.ConfigError) as caught:
            authserver.make_server(missing.config, missing.users, "127.0.0.1", 0,
                                   log_stream=io.StringIO())
        self.assertTrue(str(caught.exception).startswith(
            f"sessions file {missing.folder / 'no' / 'such'}"), caught.exception)

    def test_a_locked_or_read_only_sessions_file_refuses_to_start(self):
        # Simulated: as root here, a chmod would not stop SQLite from writing.
        for failure in ("database is locked", "attempt to write a readonly database"):
            with self.subTest(failure=failure), mock.patch(
                    "authserver.sqlite3.connect",
                    side_effect=authserver.sqlite3.OperationalError(failure)):
                with self.assertRaises(authserver.ConfigError) as caught:
                    authserver.make_server(self.files.config, self.files.users, "127.0.0.1", 0,
                                           log_stream=io.StringIO())
                self.assertEqual(str(caught.exception),
                                 f"sessions file {self.sessions_file()}: {failure}")

    def test_config_keys_are_checked(self):
        cases = [({"refreshTokenLifetime": "30m"}, "refreshTokenLifetime must be at least tokenLifetime"),
                 ({"refreshTokenLifetime": "soon"}, "refreshTokenLifetime must be a positive"),
                 ({"maxSessionsPerUser": 0}, "maxSessionsPerUser must be a whole number from 1 to"),
                 ({"maxSessionsPerUser": "5"}, "maxSessionsPerUser must be a whole number from 1 to"),
                 ({"maxSessionsPerUser": 2.5}, "maxSessionsPerUser must be a whole number from 1 to"),
                 ({"refreshGrace": -1}, "refreshGrace must be a number from 0 to"),
                 ({"maxSessionsPerUser": 0},
                  "maxSessionsPerUser must be a whole number from 1 to 1000000"),
                 ({"maxSessionsPerUser": "5"},
                  "maxSessionsPerUser must be a whole number from 1 to 1000000"),
                 ({"refreshGrace": -1}, "refreshGrace must be a number from 0 to 86400"),
                 ({"sessionsFile": 5}, "sessionsFile must be a string"),
                 ({"sessionsFile": ""}, "sessionsFile must not be empty")]
        for config, message in cases:
            with self.subTest(config=config):
                files = Files(self, **config)
                with self.assertRaises(authserver.ConfigError) as caught:
                    authserver.load_config(files.config)
                self.assertIn(message, str(caught.exception))
# Connections within caps: 503 beyond them, accept errors, threads, slow readers
# ---------------------------------------------------------------------------

def connect_from(server, source="127.0.0.1"):
    """A connection to server from a loopback address of our choice."""
    return socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10,
                                    source_address=(source, 0))


class TestConnsConfig(unittest.TestCase):

    def test_caps_must_be_whole_numbers_of_at_least_one(self):
        for name in ("maxConnections", "maxConnectionsPerAddress"):
            for bad in (0, -1, 2.5, 10.0, "10", True, None, 1_000_001):
                with self.subTest(name=name, bad=bad):
                    files = Files(self, **{name: bad})
                    with self.assertRaises(authserver.ConfigError) as caught:
                        authserver.load_config(files.config)
                    self.assertEqual(str(caught.exception), f"config file {files.config}: "
                                     f"{name} must be a whole number from 1 to 1000000")
        config = authserver.load_config(Files(self, maxConnections=1,
                                              maxConnectionsPerAddress=1).config)
        self.assertEqual((config["maxConnections"], config["maxConnectionsPerAddress"]), (1, 1))

    def test_defaults_fit_a_class_behind_one_address_and_the_common_file_limit(self):
        defaults = authserver.DEFAULT_CONFIG
        self.assertGreaterEqual(defaults["maxConnectionsPerAddress"], 50 * 6)
        self.assertLess(defaults["maxConnections"], 1024 - 100)
        self.assertGreater(defaults["maxConnections"], defaults["maxConnectionsPerAddress"])


class TestConnsCaps(unittest.TestCase):
    """One server with caps of 4 per address and 8 in all."""

    @classmethod
    def setUpClass(cls):
        cls.server = start_server(cls, maxConnections=8, maxConnectionsPerAddress=4)

    @classmethod
    def addCleanup(cls, function, *args, **kwargs):         # start_server registers its stop
        cls.addClassCleanup(function, *args, **kwargs)

    def setUp(self):
        self.held = []

    def hold(self, count, source="127.0.0.1"):
        """count idle connections from source, each counted by the server before the next."""
        for _ in range(count):
            before = self.server.connections.total
            self.held.append(connect_from(self.server, source))
            self.assertTrue(poll_until(lambda: self.server.connections.total == before + 1))

    def assert_all_released(self):
        connections = self.server.connections
        self.assertTrue(poll_until(lambda: connections.total == 0), connections.total)
        self.assertEqual(connections.per_address, {})

    def tearDown(self):
        for sock in self.held:               # close what the test held, then check it is freed
            sock.close()
        self.assert_all_released()

    def assert_503(self, sock, message):
        status, headers, body = read_response(sock)
        self.assertEqual(status, 503)
        self.assertEqual(json.loads(body), {"message": message})
        self.assertEqual(headers.pop("date")[-3:], "GMT")
        self.assertEqual(headers, {
            "server": "authserver/1.0",
            "access-control-allow-origin": "*",
            "access-control-expose-headers": "WWW-Authenticate, Retry-After",
            "x-content-type-options": "nosniff",
            "cache-control": "no-store",
            "content-type": "application/json; charset=utf-8",
            "content-length": str(len(body)),
            "retry-after": "1",
            "connection": "close",
        })
        self.assertEqual(sock.recv(10), b"")                 # and closed

    def test_beyond_the_per_address_cap_a_503_and_close(self):
        self.hold(4)
        with connect_from(self.server) as fifth:
            self.assert_503(fifth, "Too many connections from your address; try again in a moment")
        self.assertEqual(self.server.connections.total, 4)
        self.assertNotIn("Traceback", self.server.test_log.getvalue())

    def test_the_503_is_sent_without_blocking_the_accept_loop(self):
        self.hold(4)
        blocking_at_send = []
        original = socket.socket.send

        def recording(sock, data, *flags):
            if bytes(data).startswith(b"HTTP/1.1 503 "):
                blocking_at_send.append(sock.getblocking())
            return original(sock, data, *flags)
        with mock.patch.object(socket.socket, "send", recording):
            with connect_from(self.server) as fifth:
                self.assertEqual(read_response(fifth)[0], 503)
        self.assertEqual(blocking_at_send, [False])

    def test_another_address_is_served_while_one_is_at_its_cap_then_the_total_cap(self):
        try:
            connect_from(self.server, "127.0.0.2").close()
            connect_from(self.server, "127.0.0.3").close()
            connect_from(self.server, "127.0.0.4").close()
        except OSError as error:
            self.skipTest(f"cannot send from 127.0.0.2 to 127.0.0.4 here: {error}")
        self.assertTrue(poll_until(lambda: self.server.connections.total == 0))
        self.hold(4, "127.0.0.1")
        with connect_from(self.server, "127.0.0.2") as neighbour:
            neighbour.sendall(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
            self.assertEqual(read_response(neighbour)[0], 200)
        self.assertTrue(poll_until(lambda: self.server.connections.total == 4))
        self.hold(3, "127.0.0.2")               # now 7: the last slot is kept for a newcomer
        with connect_from(self.server, "127.0.0.2") as fourth:
            self.assert_503(fourth, "Too many connections from your address; try again in a moment")
        self.hold(1, "127.0.0.3")                               # now 8: the server's cap
        with connect_from(self.server, "127.0.0.4") as fourth_address:
            self.assert_503(fourth_address, "Server busy: too many connections; try again in a moment")

    def test_slots_are_given_back_however_a_connection_ends(self):
        port = self.server.server_address[1]
        for _ in range(3):
            # answered and closed by the server
            self.assertEqual(raw_exchange(self.server, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")[0], 200)
            # a client error, then closed
            self.assertEqual(raw_exchange(self.server, b"NOT HTTP\r\n\r\n")[0], 400)
            # closed by the client while idle, and in the middle of a request
            connect_from(self.server).close()
            with connect_from(self.server) as sock:
                sock.sendall(b"POST /users/authenticate HTTP/1.1\r\nContent-Length: 10\r\n\r\nab")
            # reset by the client (RST, not FIN)
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(b"GET / HTTP/1.1\r\n")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        self.assert_all_released()
        self.assertEqual(raw_exchange(self.server, b"GET / HTTP/1.1\r\n\r\n")[0], 200)


class TestConnsExhaustion(unittest.TestCase):

    def test_accept_out_of_files_backs_off_logs_one_line_and_serves_after(self):
        server = start_server(self)
        listening, original = server.socket, socket.socket.accept
        calls = []

        def out_of_files(sock):
            if sock is listening:
                calls.append(time.monotonic())
                if len(calls) <= 6:                         # as with ulimit -n, for a while
                    raise OSError(errno.EMFILE, "Too many open files")
            return original(sock)
        with mock.patch.object(socket.socket, "accept", out_of_files):
            # Waiting to be accepted the whole time, then answered.
            status, _, _ = raw_exchange(server, b"GET / HTTP/1.1\r\n\r\n")
        self.assertEqual(status, 200)
        # Six failures, then success: in between, waits of 10, 20, 40, 80, 160 and 320 ms,
        # where a spin retries at once (thousands of times in the same time).
        self.assertEqual(len(calls), 7)
        self.assertGreaterEqual(calls[6] - calls[0], 0.6)
        log = server.test_log.getvalue()
        self.assertEqual(log.count("cannot accept connections"), 1, log)
        self.assertIn("Too many open files", log)
        self.assertNotIn("Traceback", log)

    def test_other_accept_errors_are_not_waited_on(self):
        server = start_server(self)
        with mock.patch.object(server, "log") as log, \
                mock.patch.object(socketserver.TCPServer, "get_request",
                                  side_effect=ConnectionAbortedError(errno.ECONNABORTED, "gone")):
            with self.assertRaises(ConnectionAbortedError):
                server.get_request()
        log.assert_not_called()
        self.assertEqual(server.accept_backoff, 0.0)

    def test_a_thread_that_cannot_start_is_one_line_and_a_closed_connection(self):
        server = start_server(self)
        original = threading.Thread.start

        def no_threads_left(thread):
            if getattr(thread, "_target", None) == server.process_request_thread:
                raise RuntimeError("can't start new thread")
            return original(thread)
        with mock.patch.object(threading.Thread, "start", no_threads_left):
            with connect_from(server) as sock:
                try:
                    self.assertEqual(sock.recv(10), b"")
                except ConnectionResetError:
                    pass
            self.assertTrue(poll_until(lambda: "can't start" in server.test_log.getvalue()))
        log = server.test_log.getvalue()
        self.assertEqual(log.strip().splitlines(),
                         [log.strip().split(" ", 1)[0] +
                          " 127.0.0.1 connection refused: can't start new thread"])
        self.assertEqual(server.connections.total, 0)
        self.assertEqual(raw_exchange(server, b"GET / HTTP/1.1\r\n\r\n")[0], 200)

    def fake_resource(self, soft, hard, may_raise):
        """The resource module of a POSIX system with these open-file limits."""
        infinity = -1
        limits = [soft, hard]

        def setrlimit(which, values):
            if not may_raise or (hard != infinity and values[0] > hard):
                raise ValueError("not allowed to raise the soft limit")
            limits[0] = values[0]
        return mock.Mock(RLIMIT_NOFILE=7, RLIM_INFINITY=infinity,
                         getrlimit=lambda which: tuple(limits), setrlimit=mock.Mock(wraps=setrlimit))

    def test_the_cap_fits_the_open_file_limit(self):
        for soft, hard, may_raise, most, raised_to, logged in (
                (256, 256, False, 192, None, True),          # ulimit -n 256: fewer connections
                (256, 4096, True, 600, 664, False),          # soft limit raised to what is needed
                (256, -1, True, 600, 664, False),            # hard limit: unlimited
                (100, 400, True, 336, 400, True),            # raised as far as allowed
                (256, 4096, False, 192, None, True),         # not allowed to raise it
                (4096, 4096, True, 600, None, False),        # enough already
                (-1, -1, True, 600, None, False)):           # no limit at all
            with self.subTest(soft=soft, hard=hard, may_raise=may_raise):
                fake = self.fake_resource(soft, hard, may_raise)
                with mock.patch.object(authserver, "resource", fake):
                    server = start_server(self)
                self.assertEqual(server.connections.most, most)
                if raised_to is not None:
                    fake.setrlimit.assert_called_once_with(7, (raised_to, hard))
                    self.assertEqual(fake.getrlimit(7)[0], raised_to)
                log = server.test_log.getvalue()
                self.assertEqual(f"open files limited to" in log, logged, log)
                if logged:
                    self.assertIn(f"at most {most} connections", log)

    def test_without_an_open_file_limit_the_cap_is_as_configured(self):
        with mock.patch.object(authserver, "resource", None):          # Windows
            server = start_server(self, maxConnections=5000)
        self.assertEqual(server.connections.most, 5000)
        self.assertEqual(server.test_log.getvalue(), "")

    def test_connection_threads_are_not_kept_anywhere(self):
        server = start_server(self)
        for _ in range(20):
            raw_exchange(server, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
        self.assertNotIn("_threads", vars(server))        # ThreadingMixIn's list: not made
        self.assertTrue(poll_until(lambda: server.connections.total == 0))


class TestConnsSlowReaders(unittest.TestCase):

    def test_a_client_that_never_reads_is_cut_off_and_its_slot_freed(self):
        server = start_server(self, requestTimeout=0.5)
        sock = socket.socket()
        self.addCleanup(sock.close)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)    # before connect: the window
        sock.settimeout(10)
        sock.connect(("127.0.0.1", server.server_address[1]))
        sock.sendall(b"GET / HTTP/1.1\r\n\r\n" * 600)                # ~5 MB of answers, never read
        self.assertTrue(poll_until(lambda: server.connections.total == 0))
        self.assertTrue(poll_until(
            lambda: "connection ended: ClientGone: response not taken in time"
                    in server.test_log.getvalue()))
        self.assertEqual(server.deadlines, {})
        self.assertEqual(raw_exchange(server, b"GET / HTTP/1.1\r\n\r\n")[0], 200)

    def test_a_blocked_100_continue_is_cut_off_too(self):
        # A full send buffer: a write stays blocked until the socket's write side is shut,
        # as in the kernel (shutting the read side does not wake a blocked send).
        server = start_server(self, requestTimeout=0.5)
        write_side_shut = threading.Event()
        original = socket.socket.shutdown
        sock = socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10)
        self.addCleanup(sock.close)

        def shutdown(this, how):
            if this is sock and how in (socket.SHUT_WR, socket.SHUT_RDWR):
                write_side_shut.set()
            return original(this, how)

        def blocked_write(data):
            if not write_side_shut.wait(10):
                raise AssertionError("still blocked")
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")
        handler = authserver.AuthRequestHandler.__new__(authserver.AuthRequestHandler)
        handler.server, handler.connection, handler.command = server, sock, "POST"
        handler.headers = {"content-length": "2", "expect": "100-continue"}
        handler.wfile = mock.Mock(write=blocked_write)
        server.watch(sock)                              # reading the request, as respond() does
        with mock.patch.object(socket.socket, "shutdown", shutdown):
            with self.assertRaises(authserver.ClientGone) as caught:
                handler.read_body()
        self.assertEqual(str(caught.exception), "response not taken in time")

    def test_a_client_that_reads_gets_its_answers_in_full(self):
        server = start_server(self, requestTimeout=0.5)
        with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\n\r\n" * 50)
            stream = sock.makefile("rb")                # one buffer for all the answers
            for _ in range(50):
                head = b""
                while not head.endswith(b"\r\n\r\n"):
                    line = stream.readline()
                    self.assertTrue(line, f"closed after {head!r}")
                    head += line
                self.assertTrue(head.startswith(b"HTTP/1.1 200 OK\r\n"), head)
                length = int(head.partition(b"Content-Length: ")[2].partition(b"\r\n")[0])
                self.assertEqual(stream.read(length), server.page)

    def test_an_idle_connection_gives_its_slot_back_after_request_timeout(self):
        server = start_server(self, requestTimeout=0.5)
        with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10) as sock:
            self.assertEqual(sock.recv(10), b"")               # cut off by the watchman
        self.assertTrue(poll_until(lambda: server.connections.total == 0))


class TestConnsTLS(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        files = Files(cls, maxConnectionsPerAddress=2)
        (files.folder / "cert.pem").write_text(TestTLS.CERT)
        (files.folder / "key.pem").write_text(TestTLS.KEY)
        context = authserver.make_tls_context(files.folder / "cert.pem", files.folder / "key.pem")
        cls.server = start_server(cls, files, tls_context=context)
        cls.client_context = ssl.create_default_context(cadata=TestTLS.CERT)

    @classmethod
    def addCleanup(cls, function, *args, **kwargs):
        cls.addClassCleanup(function, *args, **kwargs)

    def assert_https_works(self):
        client = Client(self.server, self.client_context)
        try:
            self.assertEqual(client.request("GET", "/")[0], 200)
        finally:
            client.close()

    def test_plain_http_on_the_https_port_is_told_so_in_plain_http(self):
        port = self.server.server_address[1]
        for request, url in (
                (f"GET / HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n", f"https://localhost:{port}/"),
                ("GET /users/getInfo?x=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
                 "https://127.0.0.1/users/getInfo"),
                ("POST /users/authenticate HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
                 f"https://127.0.0.1:{port}/users/authenticate"),
                ("GET / HTTP/1.1\r\nHost: evil\"host\r\n\r\n", f"https://127.0.0.1:{port}/"),
                ("HELLO\r\n\r\n", f"https://127.0.0.1:{port}/")):
            with self.subTest(request), socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(request.encode())
                status, headers, body = read_response(sock)
                self.assertEqual(status, 400)
                self.assertEqual(json.loads(body), {"message": f"This port speaks HTTPS: use {url}"})
                self.assertEqual((headers["connection"], headers["content-type"]),
                                 ("close", "application/json; charset=utf-8"))
                self.assertEqual(sock.recv(10), b"")
        self.assertIn("127.0.0.1 GET / 400", self.server.test_log.getvalue())
        self.assert_https_works()

    def test_failed_handshakes_give_their_slots_back(self):
        port = self.server.server_address[1]
        for _ in range(4):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(b"\x16\x03\x01\x00\x05hello")          # a TLS record, not a hello
                try:
                    self.assertIn(sock.recv(100)[:1], (b"\x15", b""))   # a TLS alert, or nothing
                except ConnectionResetError:
                    pass
            distrusting = ssl.create_default_context()              # our cert is not its CA
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                with self.assertRaises(ssl.SSLError):
                    distrusting.wrap_socket(sock, server_hostname="localhost")
        self.assertTrue(poll_until(lambda: self.server.connections.total == 0))
        self.assert_https_works()

    def test_beyond_the_cap_an_https_connection_is_closed_without_a_word(self):
        port = self.server.server_address[1]
        held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
        try:
            self.assertTrue(poll_until(lambda: self.server.connections.total == 2))
            with socket.create_connection(("127.0.0.1", port), timeout=10) as third:
                self.assertEqual(third.recv(10), b"")
        finally:
            for sock in held:
                sock.close()
        self.assertTrue(poll_until(lambda: self.server.connections.total == 0))


class TestConnsUsersFile(unittest.TestCase):

    def test_an_idle_server_notices_a_changed_users_file(self):
        files = Files(self)
        server = start_server(self, files)
        authserver.save_users(files.users, TEST_USERS[:1])          # no request after this
        self.assertTrue(poll_until(
            lambda: "users file reloaded: 1 users" in server.test_log.getvalue()),
            server.test_log.getvalue())
        self.assertEqual(list(server.users.tables.by_name), ["test"])

    def test_a_broken_users_file_written_while_idle_is_reported(self):
        files = Files(self)
        server = start_server(self, files)
        files.users.write_text("[{\"id\": 1}]")
        self.assertTrue(poll_until(
            lambda: "users file not reloaded" in server.test_log.getvalue()))
        self.assertEqual(len(server.users.tables.by_name), 3)

    @unittest.skipUnless(hasattr(signal, "SIGHUP"), "no SIGHUP on this system")
    def test_sighup_on_an_unchanged_users_file_says_so(self):
        files = Files(self)
        server = ServerProcess(self, "--config", files.config, "--users", files.users)
        server.process.send_signal(signal.SIGHUP)
        line = server.readline("stderr")
        self.assertTrue(line.endswith(" users file unchanged: 3 users\n"), line)


# ---------------------------------------------------------------------------
# The page's lab: each lesson reachable in the order the page's hint gives
# ---------------------------------------------------------------------------

@unittest.skipUnless(BROWSER and os.name == "posix", BROWSER_REASON)
class TestPageLabLessons(unittest.TestCase):
    """The lab as a newcomer uses it: buttons pressed in the hint's order, in headless Chromium."""

    @classmethod
    def setUpClass(cls):
        cls.server = start_server(ClassScope(cls))
        cls.browser = shared_browser()
        cls.url = f"http://127.0.0.1:{cls.server.server_address[1]}/"

    def logged_in(self, url=None):
        """A new tab, logged in as test: (tab, the token the server issued)."""
        tab = self.browser.open(url or self.url)
        tab.wait_for("document.readyState === 'complete'")
        tab.evaluate("document.getElementById('id_username').value = 'test';"
                     "document.getElementById('id_password').value = 'test'")
        tab.click("btn")
        self.assertEqual(tab.result(), "200 OK: logged in as test; the token is below.")
        return tab, self.box(tab)

    @staticmethod
    def box(tab):
        return tab.evaluate("document.getElementById('tokenBox').value")

    def press(self, tab, button):
        """Click a button that sends a request; the line beside the buttons once answered."""
        tab.evaluate("document.getElementById('result').textContent = ''")
        tab.click(button)
        return tab.result()

    def test_log_out_after_tamper_puts_the_issued_token_back_and_the_server_says_revoked(self):
        tab, issued = self.logged_in()
        tab.click("tamperBtn")
        self.assertNotEqual(self.box(tab), issued)
        self.assertTrue(self.press(tab, "logoutBtn").startswith("204: logged out."))
        self.assertEqual(self.box(tab), issued)
        self.assertEqual(PageReader(tab.dom()).by_id["changes"], "")     # nothing edited now
        self.assertEqual(self.press(tab, "infoBtn"), "401 Unauthorized: session revoked")

    def test_the_hints_order_reaches_every_lesson_and_no_refresh_token_sends_nothing(self):
        tab = self.browser.open(self.url)
        tab.wait_for("document.readyState === 'complete'")
        page = PageReader(tab.dom())
        self.assertIn("the tutorial's demo users (if their passwords have not been changed)",
                      " ".join(page.by_id["demoUsers"].split()))
        hint = " ".join(page.by_id["hint"].split())
        steps = ["log in", '"Get user info" (200', "log out", "session revoked",
                 "Forget the tokens", "403"]
        where = [hint.find(step) for step in steps]
        self.assertNotIn(-1, where, hint)
        self.assertEqual(where, sorted(where), hint)
        # A fresh page has no refresh token: Refresh and Log out send nothing and say so.
        for button in ("refreshBtn", "logoutBtn"):
            tab.click(button)
            self.assertEqual(tab.result(), "Log in first: there is no refresh token yet.")
            self.assertTrue(tab.evaluate("document.getElementById('exchange').hidden"))
        # The hint, step by step.
        tab, issued = self.logged_in()
        self.assertEqual(self.press(tab, "infoBtn"), "200 OK")
        self.assertTrue(self.press(tab, "logoutBtn").startswith("204: logged out."))
        self.assertEqual(self.press(tab, "infoBtn"), "401 Unauthorized: session revoked")
        tab.click("forgetBtn")
        self.assertEqual(self.press(tab, "infoBtn"), "403 Forbidden: No token provided.")
        # After Forget there is no refresh token either: nothing is sent.
        for button in ("refreshBtn", "logoutBtn"):
            tab.click(button)
            self.assertEqual(tab.result(), "Log in first: there is no refresh token yet.")
            self.assertEqual(PageReader(tab.dom()).by_id["httpRequest"],     # the last one sent
                             f"GET {self.url}users/getInfo\nAccept: application/json")

    def test_the_request_shows_which_token_was_sent(self):
        tab, issued = self.logged_in()
        head, body, signature = issued.split(".")
        self.assertEqual(self.press(tab, "infoBtn"), "200 OK")
        sent = PageReader(tab.dom()).by_id["httpRequest"].splitlines()[-1]
        self.assertEqual(sent, f"Authorization: Bearer {head[:12]}….{body[:10]}…{signature[-6:]}"
                               " (the token in the box below)")
        tab.click("tamperBtn")
        tampered = self.box(tab).split(".")[1]
        first = len(os.path.commonprefix([tampered, body]))
        self.assertEqual(self.press(tab, "verifyBtn"), "401 Unauthorized: invalid signature")
        sent_tampered = PageReader(tab.dom()).by_id["httpRequest"].splitlines()[-1]
        self.assertEqual(sent_tampered,
                         f"Authorization: Bearer {head[:12]}….…{tampered[first:first + 10]}…"
                         f"{signature[-6:]} (edited: not the token the server signed)")
        self.assertNotEqual(sent_tampered.split(" (")[0], sent.split(" (")[0])

    def test_once_asked_the_changes_line_says_what_the_server_said(self):
        tab, issued = self.logged_in()
        tab.click("tamperBtn")
        changes = " ".join(PageReader(tab.dom()).by_id["changes"].split())
        self.assertTrue(changes.endswith("The signature was not recomputed: ask the server."),
                        changes)
        self.assertEqual(self.press(tab, "verifyBtn"), "401 Unauthorized: invalid signature")
        changes = " ".join(PageReader(tab.dom()).by_id["changes"].split())
        self.assertTrue(changes.startswith('Changed since the server signed it: username: '), changes)
        self.assertTrue(changes.endswith(". The server checked: invalid signature."), changes)
        tab.click("tamperBtn")                               # a new edit: not asked yet
        changes = " ".join(PageReader(tab.dom()).by_id["changes"].split())
        self.assertTrue(changes.endswith("The signature was not recomputed: ask the server."),
                        changes)

    def test_a_change_of_length_says_why_the_rest_of_the_payload_is_marked(self):
        tab, issued = self.logged_in()
        note = "document.getElementById('lengthNote')"
        self.assertTrue(tab.evaluate(note + ".hidden"))
        tab.click("tamperBtn")                                        # "test" -> "admin"
        tampered = self.box(tab).split(".")[1]
        self.assertNotEqual(len(tampered), len(issued.split(".")[1]))
        self.assertTrue(PageReader(tab.dom()).marks["tokenView"][-1]
                        .endswith(tampered[-6:]), "the mark runs to the payload's end")
        self.assertFalse(tab.evaluate(note + ".hidden"))
        self.assertIn("a change of length shifts every base64url character after it",
                      tab.evaluate(note + ".textContent"))
        # One character of the signature changed: the same length, no such line.
        last = "A" if issued[-1] != "A" else "B"
        tab.evaluate("(area => { area.value = %s; area.dispatchEvent(new Event('input')) })"
                     "(document.getElementById('tokenBox'))" % json.dumps(issued[:-1] + last))
        self.assertTrue(tab.evaluate(note + ".hidden"))

    def test_a_new_login_answers_the_servers_own_token_not_an_edited_one(self):
        tab, issued = self.logged_in()
        tab.click("tamperBtn")
        self.assertEqual(self.press(tab, "btn"), "200 OK: logged in as test; the token is below.")
        new = self.box(tab)
        head, body, signature = new.split(".")
        self.assertIn(f'"token": "{head[:12]}….{body[:10]}…{signature[-6:]} '
                      f'(the token in the box below)"', PageReader(tab.dom()).by_id["output"])

    def test_a_login_without_a_refresh_token_names_the_server_not_the_user(self):
        stub = TutorialStub(self)                  # the tutorial's server: a token, nothing more
        tab, _ = self.logged_in((HERE / "test.html").as_uri() + "?api=" + stub.url)
        tab.click("logoutBtn")
        self.assertEqual(tab.result(), "This server's login gave no refresh token: it has no "
                                       "Refresh / Log out.")
        self.assertNotIn("/users/logout", stub.bodies)                     # nothing was sent


class TutorialStub(LifecycleStub):
    """The tutorial's server: a login answers a token and expiresIn, no refresh token."""

    def pair(self):
        return {"token": token_for(), "expiresIn": 3600}


SECTION_BANNER = re.compile(r"# (\d+)\. (.+)")


def module_sections(source):
    """[(line, number, title)] of the top-level "# N. Title" banners of a module's source."""
    return [(line, int(match.group(1)), match.group(2))
            for line, text in enumerate(source.splitlines(), 1)
            for match in [SECTION_BANNER.fullmatch(text)] if match]


def names_used_before_defined(source):
    """[(user, name)]: top-level code that uses a module-level name a later section defines."""
    tree, sections = ast.parse(source), module_sections(source)

    def section_of(line):
        return max([number for start, number, _ in sections if start <= line], default=0)

    defined_in = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names = [node.name]
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [name.id for target in targets for name in ast.walk(target)
                     if isinstance(name, ast.Name)]
        else:
            names = []
        for name in names:
            defined_in.setdefault(name, section_of(node.lineno))
    found = []
    for node in tree.body:
        user = getattr(node, "name", f"line {node.lineno}")
        for name in ast.walk(node):
            if (isinstance(name, ast.Name) and name.id in defined_in
                    and defined_in[name.id] > section_of(node.lineno)):
                found.append((user, name.id))
    return found


class TestChapterLayout(unittest.TestCase):
    """The module docstring's promises about the file's layout are kept."""

    source = Path(authserver.__file__).read_text(encoding="utf-8")

    def test_each_section_uses_only_what_stands_above_it(self):
        self.assertEqual(names_used_before_defined(self.source), [])

    def test_the_docstring_lists_the_sections(self):
        listed = re.findall(r"^    (\d+)\. (\S.*?)  +\S", authserver.__doc__, re.MULTILINE)
        banners = [(str(number), re.split(r": | \(", title)[0])
                   for _, number, title in module_sections(self.source)]
        self.assertEqual(listed, banners)
        self.assertEqual([number for _, number, _ in module_sections(self.source)],
                         list(range(1, len(banners) + 1)))

    def test_the_guard_sees_a_name_from_a_later_section(self):
        source = ("# 1. First\ndef early():\n    return LATE\n"
                  "# 2. Second\nLATE = 1\ndef later():\n    return early()\n")
        self.assertEqual(names_used_before_defined(source), [("early", "LATE")])


class TestChapterRequest(unittest.TestCase):
    """What a middleware step sees of a request, and the bytes a Response becomes."""

    def test_a_new_step_finds_headers_in_any_spelling(self):
        seen = []

        def step(request):
            headers = request.headers
            seen.append((headers.get("Authorization"), headers["X-Custom"],
                         "X-CUSTOM" in headers, headers.get("X-Absent", "-")))
            return authserver.Response(200, {"ok": True})

        server = start_server(self)
        with mock.patch.object(authserver, "MIDDLEWARE", [step] + authserver.MIDDLEWARE):
            client = Client(server)
            self.addCleanup(client.close)
            status, _, body = client.request("GET", "/users/getInfo", headers={
                "authorization": "Bearer abc", "x-custom": "1"})
        self.assertEqual((status, body), (200, {"ok": True}))
        self.assertEqual(seen, [("Bearer abc", "1", True, "-")])

    def test_response_bytes(self):
        now = 1700000000
        date = "Tue, 14 Nov 2023 22:13:20 GMT"
        common = ("Server: authserver/1.0\r\nAccess-Control-Allow-Origin: *\r\n"
                  "Access-Control-Expose-Headers: WWW-Authenticate, Retry-After\r\n"
                  "X-Content-Type-Options: nosniff\r\nCache-Control: no-store\r\n")
        json_type = "Content-Type: application/json; charset=utf-8\r\n"
        table = [
            ((authserver.Response(200, {"a": "é"}), now), f"HTTP/1.1 200 OK\r\nDate: {date}\r\n"
             f"{common}{json_type}Content-Length: 10\r\n\r\n" + '{"a":"é"}'),
            ((authserver.Response(404, {"message": "x"}, headers=(("Allow", "GET"),)), now, "close"),
             f"HTTP/1.1 404 Not Found\r\nDate: {date}\r\n{common}{json_type}"
             'Content-Length: 15\r\nAllow: GET\r\nConnection: close\r\n\r\n{"message":"x"}'),
            ((authserver.Response(200, b"<p>"), now, "keep-alive", True),
             f"HTTP/1.1 200 OK\r\nDate: {date}\r\n{common}{json_type}Content-Length: 3\r\n"
             "Connection: keep-alive\r\n\r\n"),
            ((authserver.Response(204, headers=(("Allow", "GET"),)), now),
             f"HTTP/1.1 204 No Content\r\nDate: {date}\r\n{common}Allow: GET\r\n\r\n"),
        ]
        for arguments, expected in table:
            with self.subTest(arguments=arguments[1:]):
                self.assertEqual(authserver.response_bytes(*arguments), expected.encode("utf-8"))


# ---------------------------------------------------------------------------
# bench/: the mechanisms the benchmarks rely on (never a time: speed is measured in bench/)
# ---------------------------------------------------------------------------

def import_bench(name):
    """A module of bench/, which imports its siblings by name."""
    import importlib
    folder = str(HERE / "bench")
    sys.path.insert(0, folder)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(folder)


WRK_REPORT = """Running 3s test @ http://127.0.0.1:4000/users/getInfo
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.00ms    1.29ms  24.83ms   92.12%
    Req/Sec    14.02k     3.10k   17.50k    99.50%
  Latency Distribution
     50%  672.00us
     75%    1.00ms
     90%    1.95ms
     99%    1.20s
  41939 requests in 3.00s, 15.48MB read
  Socket errors: connect 1, read 2, write 3, timeout 4
  Non-2xx or 3xx responses: 5
Requests/sec:  13958.25
Transfer/sec:      5.15MB
"""


class TestBenchMechanisms(unittest.TestCase):

    def test_wrk_report_is_parsed_with_units(self):
        common = import_bench("common")
        self.assertEqual(common.parse_wrk(WRK_REPORT),
                         {"rate": 13958.25, "p50": 0.672, "p99": 1200.0, "non2xx": 5, "errors": 10})

    def test_pacing_script_delays_each_request(self):
        script = import_bench("bench_paced").pacing_script(64, 3000)
        self.assertIn("function delay()", script)
        self.assertIn("local mean = 21.333", script)      # 64 connections / 3,000 req/s, in ms

    def test_parse_json_object_allows_only_json_whitespace(self):
        self.assertEqual(authserver.parse_json_object(b' \t\r\n{"a": 1} \n'), {"a": 1})
        for text in (b'\x0c{"a": 1}', b'{"a": 1}\x0b', b'{"a": 1} x', b'{"a": 1}{}', b" ", b""):
            with self.subTest(text), self.assertRaises(ValueError):
                authserver.parse_json_object(text)

    def test_every_bench_script_imports_and_answers_help(self):
        scripts = sorted((HERE / "bench").glob("bench_*.py"))
        self.assertGreaterEqual(len(scripts), 6)
        running = {script.name: subprocess.Popen(           # all at once: each is a startup
            [sys.executable, str(script), "--help"], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True) for script in scripts}
        for name, process in running.items():
            with self.subTest(name):
                out, err = process.communicate(timeout=60)
                self.assertEqual((process.returncode, err), (0, ""))
                self.assertIn("usage:", out)


# ---------------------------------------------------------------------------
# The command line for newcomers: why a token is malformed, help texts, BOMs, old Pythons
# ---------------------------------------------------------------------------

def normalised(text):
    """text with every run of whitespace as one space: argparse wraps to the terminal."""
    return " ".join(text.split())


def help_text(*args):
    """What `python authserver.py ARGS --help` prints (exit 0), run in this process."""
    out = io.StringIO()
    with mock.patch("sys.stdout", out), mock.patch.dict(os.environ, {"COLUMNS": "100"}), \
            self_exit() as caught:
        authserver.main([*args, "--help"])
    assert caught.code == 0, caught.code
    return out.getvalue()


class self_exit:
    """Catches the SystemExit of --help; .code is its exit code."""

    code = "no SystemExit"

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace):
        if kind is SystemExit:
            self.code = error.code
            return True
        return False


class TestCliFixesMalformed(unittest.TestCase):
    """explain says why a token is malformed, and takes back what copying added to it."""

    def setUp(self):
        self.files = Files(self)
        self.token = token_for()

    def explain(self, *args, stdin=""):
        return explain_cli(self.files, *args, stdin=stdin)

    def assert_explained_with_note(self, result, *phrases):
        self.assertEqual((result.returncode, result.stderr), (0, ""), result.stdout)
        first_step = result.stdout.index("1. Split at the dots")
        notes = result.stdout[:first_step]
        self.assertTrue(notes.startswith("Note: "), result.stdout)
        for phrase in phrases:
            self.assertIn(phrase, normalised(notes))
        self.assertIn("(Sent as pasted, it is refused: jwt malformed.)", normalised(notes))
        self.assertIn(f"3 segments of base64url, {len(self.token)} characters", result.stdout)
        self.assertIn("Verdict: valid", result.stdout)

    def test_json_quotes_are_taken_off_with_a_note(self):
        token = self.token
        for pasted in (f'"{token}"', f'"token":"{token}"', f'"token": "{token}",',
                       f'{{"token":"{token}","expiresIn":"1h"}}', f"'{token}'"):
            with self.subTest(pasted):
                self.assert_explained_with_note(self.explain(pasted),
                                                "copied with its quotes")
        piped = self.explain(stdin=f'  "token":"{token}"\n')
        self.assert_explained_with_note(piped, "copied with its quotes")

    def test_a_wrapped_token_is_joined_with_a_note(self):
        token = self.token
        for pasted in (token[:40] + "\n" + token[40:], token[:70] + "\r\n  " + token[70:],
                       token[:10] + " " + token[10:90] + "\t" + token[90:]):
            with self.subTest(pasted):
                self.assert_explained_with_note(self.explain(pasted), "line break or space")
                self.assert_explained_with_note(self.explain(stdin=pasted + "\n"),
                                                "line break or space")
        both = self.explain(f'"token": "{token[:50]}\n{token[50:]}"')
        self.assert_explained_with_note(both, "copied with its quotes", "line break or space")
        self.assertNotIn("Note:", self.explain(token).stdout)

    def assert_malformed(self, token, *why):
        result = self.explain(token)
        self.assertEqual((result.returncode, result.stderr), (1, ""), result.stdout)
        out = result.stdout
        fail = out.index("FAIL JsonWebTokenError: jwt malformed")
        verdict = out.index("Verdict: rejected")
        reasons = normalised(out[fail:verdict])
        for phrase in why:
            self.assertIn(phrase, reasons, out)
        return reasons

    def test_the_number_of_segments(self):
        head, payload, signature = self.token.split(".")
        self.assert_malformed(f"{head}.{payload}", "2 segments (1 dot); a JWT has 3",
                              "header.payload.signature", "cut short")
        self.assert_malformed(f"{self.token}.{signature}", "4 segments (3 dots); a JWT has 3")
        self.assert_malformed(head, "1 segment (no dot); a JWT has 3")
        self.assert_malformed(f"{self.token}.a.b", "5 segments (4 dots)", "encrypted")

    def test_the_first_character_that_is_not_base64url_and_where(self):
        head, payload, signature = self.token.split(".")
        at = len(head) + 1 + 20                 # 0-based: the 21st character of the payload
        for char, hint in (("!", None), ("+", "base64url uses - and _"),
                           ("=", "padding"), ('"', "quote"), ("é", None)):
            with self.subTest(char):
                bad = self.token[:at] + char + self.token[at + 1:]
                reasons = self.assert_malformed(
                    bad, f"character {at + 1} of {len(bad)}, {char!r}, in the payload, is not "
                         f"base64url (A-Z a-z 0-9 - _)")
                if hint:
                    self.assertIn(hint, reasons)
        # Quotes copied on one side only are not taken off: the reason names them.
        self.assert_malformed(self.token + '",', f"character {len(self.token) + 1} of "
                                                 f"{len(self.token) + 2}, '\"', in the signature")
        self.assert_malformed(f".{payload}.{signature}", "the header is empty")
        self.assert_malformed(self.token + "A" * 9000, "longer than the 8192")

    def test_the_server_itself_keeps_refusing_such_tokens(self):
        server = start_server(self, self.files)
        client = Client(server)
        self.addCleanup(client.close)
        token = self.token
        for headers in ({"Authorization": f'Bearer "{token}"'},
                        {"x-access-token": f'"{token}"'},
                        {"Authorization": f"Bearer {token[:40]} {token[40:]}"},
                        {"x-access-token": f"{token[:40]} {token[40:]}"},
                        {"x-access-token": ".".join(token.split(".")[:2])}):
            with self.subTest(headers):
                status, _, body = client.request("GET", "/users/getInfo", headers=headers)
                self.assertEqual((status, body["message"]), (401, "jwt malformed"))


class TestCliFixesRefusedHeader(unittest.TestCase):
    """A refused header (alg none, crit, not JSON) still shows the payload, not trusted."""

    def test_the_payload_is_shown_readable_but_not_trusted(self):
        files = Files(self)
        now = int(time.time())
        claims = {"id": 81623, "username": "test", "iat": now, "exp": now + 600}
        payload = b64url_encode(json.dumps(claims, separators=(",", ":")).encode())
        for token, error in (
                (forge({"alg": "none", "typ": "JWT"}, claims, signature=""), "invalid algorithm"),
                (forge({"alg": "HS512"}, claims), "invalid algorithm"),
                (forge({"alg": "HS256", "crit": ["x"], "x": 1}, claims), "invalid token"),
                (f"{b64url_encode(b'not json')}.{payload}.{SIGNATURE}", "invalid token")):
            with self.subTest(error=error, token=token):
                result = explain_cli(files, token)
                self.assertEqual((result.returncode, result.stderr), (1, ""))
                out = result.stdout
                order = [out.index("2. Decode the header"),
                         out.index(f"FAIL JsonWebTokenError: {error}"),
                         out.index("Readable, but not trusted:"),
                         out.index(f'{{"id":81623,"username":"test","iat":{now},'
                                   f'"exp":{now + 600}}}'),
                         out.index(f"exp {now + 600} = 20"),
                         out.index("Verdict: rejected")]
                self.assertEqual(order, sorted(order), out)
                self.assertNotIn("3. Recompute the signature", out)


class TestCliFixesHelp(unittest.TestCase):
    """Every command's --help says what it does, in words a newcomer needs."""

    def test_the_main_help_says_no_command_means_serve(self):
        text = normalised(help_text()).lower()
        self.assertIn("with no command it serves", text)

    def test_adduser_and_passwd_say_where_the_password_comes_from(self):
        for command in ("adduser", "passwd"):
            with self.subTest(command):
                text = normalised(help_text(command))
                self.assertIn("asks for the password twice", text)
                self.assertIn("reads one line from stdin", text)

    def test_token_says_it_has_no_session_and_that_is_true(self):
        text = normalised(help_text("token"))
        self.assertIn("belongs to no session (no sid claim)", text)
        self.assertIn("cannot be revoked", text)
        files = Files(self)
        code, out, err = main_in_process("token", "test", "--config", files.config,
                                         "--users", files.users)
        self.assertEqual((code, err), (0, ""))
        claims = json.loads(b64url_decode(out.strip().split(".")[1]))
        self.assertEqual(sorted(claims), ["exp", "iat", "id", "username"])
        # ... and revoking the user's sessions leaves it good.
        self.assertEqual(main_in_process("revoke", "test", "--config", files.config,
                                         "--users", files.users)[0], 0)
        server = start_server(self, files)
        client = Client(server)
        self.addCleanup(client.close)
        status, _, body = client.request("GET", "/users/getInfo", headers=bearer(out.strip()))
        self.assertEqual((status, body["username"]), (200, "test"))

    def test_explain_sessions_and_revoke(self):
        explain_help = normalised(help_text("explain"))
        for phrase in ("read from stdin", "'-'", "Authorization: Bearer"):
            self.assertIn(phrase, explain_help)
        self.assertIn("list a user's live sessions", normalised(help_text("sessions")).lower())
        self.assertIn("end all of a user's sessions, or the one given",
                      normalised(help_text("revoke")).lower())


class TestCliFixesRunningServer(unittest.TestCase):
    """passwd and adduser say that a running server picks the change up, and it does."""

    def run_with_password(self, files, *args, password="n3w-pa55w0rd"):
        with mock.patch("sys.stdin", io.StringIO(password + "\n")):
            return main_in_process(*args, "--config", files.config, "--users", files.users)

    def test_passwd_and_adduser(self):
        files = Files(self, passwordIterations=FAST_ITERATIONS)
        server = start_server(self, files)
        client = Client(server)
        self.addCleanup(client.close)
        line = (f"A server running with {files.users} picks this up within a second.")
        for reloads, (args, login) in enumerate(
                ((("passwd", "test"), login_body("test", "n3w-pa55w0rd")),
                 (("adduser", "newcomer"), login_body("newcomer", "n3w-pa55w0rd"))), 1):
            with self.subTest(args[0]):
                code, out, err = self.run_with_password(files, *args)
                self.assertEqual((code, err), (0, ""))
                self.assertEqual(out.splitlines()[1:], [line], out)
                # No request in between: the idle server notices by itself (not by polling
                # logins, which would meet the failed-login limiter first).
                self.assertTrue(poll_until(
                    lambda: server.test_log.getvalue().count("users file reloaded") == reloads))
                status, _, body = client.request("POST", "/users/authenticate", login)
                self.assertEqual(status, 200, body)


class TestCliFixesByteOrderMark(unittest.TestCase):
    """config.json and users.json saved by Windows Notepad (UTF-8 with a BOM) are read."""

    def test_json_files_with_a_bom(self):
        files = Files(self, passwordIterations=FAST_ITERATIONS)
        for path in (files.config, files.users):
            path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
        server = start_server(self, files)
        client = Client(server)
        self.addCleanup(client.close)
        status, _, body = client.request("POST", "/users/authenticate", login_body())
        self.assertEqual(status, 200, body)
        code, out, err = main_in_process("token", "test", "--config", files.config,
                                         "--users", files.users)
        self.assertEqual((code, err), (0, ""))
        with mock.patch("sys.stdin", io.StringIO("n3w-pa55w0rd\n")):
            code, out, err = main_in_process("adduser", "newcomer", "--config", files.config,
                                             "--users", files.users)
        self.assertEqual((code, err), (0, ""))
        written = files.users.read_bytes()
        self.assertTrue(written.startswith(b"[\n"), written[:10])     # written without one
        self.assertEqual([user["username"] for user in json.loads(written)],
                         ["test", "ncuser", "café", "newcomer"])
        # A BOM is not a licence for other encodings: Latin-1 is still one line, exit 2.
        files.users.write_bytes('[{"id": 1, "username": "caf\xe9"}]'.encode("latin-1"))
        code, out, err = main_in_process("token", "test", "--config", files.config,
                                         "--users", files.users)
        self.assertEqual(code, 2)
        self.assertTrue(err.startswith(f"authserver: users file {files.users}: 'utf-8"), err)
        self.assertEqual(len(err.splitlines()), 1)


    def test_a_secret_file_saved_with_a_bom_is_the_same_secret(self):
        files = Files(self, secret="")
        (files.folder / "authserver.secret").write_bytes(b"\xef\xbb\xbf" + SECRET.encode() + b"\r\n")
        self.assertEqual(authserver.load_secret(authserver.load_config(files.config)),
                         SECRET.encode())


class TestCliFixesDuplicateUsers(unittest.TestCase):
    """A duplicate in users.json is named: the username twice, or the id with both names."""

    def test_which_is_twice(self):
        for users, message in (
                ([make_user(1, "bob", "x"), make_user(2, "bob", "y")],
                 "the username 'bob' appears twice"),
                ([make_user(7, "ann", "x"), make_user(8, "cid", "z"), make_user(7, "bob", "y")],
                 "the id 7 is used by both 'ann' and 'bob'"),
                ([make_user("u7", "ann", "x"), make_user("u7", "bob", "y")],
                 "the id 'u7' is used by both 'ann' and 'bob'")):
            with self.subTest(message):
                files = Files(self, users=users)
                with self.assertRaises(authserver.ConfigError) as caught:
                    authserver.UserStore(files.users)
                self.assertEqual(str(caught.exception), f"users file {files.users}: {message}")


class TestCliFixesOldPython(unittest.TestCase):
    """`python -m unittest` on Python 3.6 to 3.8: one line and a non-zero exit."""

    def test_the_test_suite_on_older_interpreters(self):
        found = {}
        for version in ("3.6", "3.7", "3.8"):
            candidates = sorted(Path.home().glob(f".pyenv/versions/{version}.*/bin/python"))
            if candidates:                       # not the shims: a pyenv shim may not run
                found[version] = candidates[0]
        if "3.8" not in found:
            self.skipTest("no Python 3.8 in ~/.pyenv/versions")
        folder = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, folder, True)
        for name in ("authserver.py", "test_authserver.py"):
            shutil.copy(HERE / name, folder / name)
        for version, python in found.items():
            with self.subTest(python=str(python)):
                result = subprocess.run([str(python), "-m", "unittest"], cwd=folder,
                                        capture_output=True, text=True, timeout=60,
                                        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
                self.assertEqual((result.stdout, result.stderr),
                                 ("", f"authserver needs Python 3.9+ (this is {version})\n"))
                self.assertNotEqual(result.returncode, 0)


# Fixes: look-alike usernames, sign-up's fields and growth, the limiter's tables,
# connection shares
# ---------------------------------------------------------------------------

def registration(server, body):
    """POST /users/register: (status, parsed JSON body)."""
    status, _, data = exchange(server, "POST", "/users/register", body)
    return status, json.loads(data) if data else None


# Names that print like "test" (or like nothing at all after it): Unicode's
# Default_Ignorable_Code_Point characters of every category, and blank symbols.
INVISIBLE_TAILS = ["\u034f", "\u3164", "\u2800", "\ufe00", "\u00ad", "\u115f", "\u1160",
                   "\u17b4", "\u180b", "\u061c", "\ufe0f", "\uffa0", "\U0001d173",
                   "\U0001bca0", "\U000e0100", "\u2064"]


class TestNameFixesUsernames(unittest.TestCase):
    """One name, one account: no invisible tails, NFC only, case and width folded."""

    @classmethod
    def setUpClass(cls):
        cls.files = Files(ClassScope(cls), allowRegistration=True, addressLoginAttempts=1000,
                          passwordIterations=FAST_ITERATIONS)
        cls.server = start_server(ClassScope(cls), cls.files)

    def names(self, files=None):
        return [user["username"] for user in
                json.loads((files or self.files).users.read_text(encoding="utf-8"))]

    def test_the_rule_refuses_invisible_and_blank_characters(self):
        for tail in INVISIBLE_TAILS:
            with self.subTest(tail=f"U+{ord(tail):04X}"), \
                    self.assertRaises(authserver.ConfigError) as caught:
                authserver.check_username("test" + tail, "here")
            self.assertTrue(str(caught.exception).startswith("here: "))
        for name in ("café", "山田", "o'brien", "Ünïcödé", "ｆｕｌｌ"):      # still fine alone
            authserver.check_username(name, "here")

    def test_the_rule_refuses_names_not_in_nfc(self):
        with self.assertRaises(authserver.ConfigError) as caught:
            authserver.check_username("cafe\u0301", "here")
        self.assertTrue(str(caught.exception).startswith("here: "))
        self.assertIn("NFC", str(caught.exception))

    def test_sign_up_refuses_look_alikes_of_existing_names(self):
        before = self.names()
        for name in ["test" + tail for tail in INVISIBLE_TAILS]:
            with self.subTest(name=name):
                status, body = registration(self.server, signup_body(name))
                self.assertEqual((status, body.get("name")), (400, "ValidationError"), body)
        for name in ("Test", "TEST", "ｔｅｓｔ", "ＴＥＳＴ", "cafe\u0301", "CAFÉ", "NCUSER"):
            with self.subTest(name=name):
                status, body = registration(self.server, signup_body(name))
                self.assertEqual((status, body.get("name")), (409, "UsernameTakenError"), body)
        self.assertEqual(self.names(), before)

    def test_sign_up_one_name_in_any_case_or_width_gets_one_account(self):
        self.assertEqual(registration(self.server, signup_body("alice"))[0], 201)
        for name in ("Alice", "ALICE", "ａｌｉｃｅ", "ＡＬＩＣＥ"):
            with self.subTest(name=name):
                self.assertEqual(registration(self.server, signup_body(name))[0], 409)
        self.assertEqual([name for name in self.names() if name.casefold().endswith("ice")
                          or "ｉ" in name], ["alice"])

    def test_sign_up_stores_nfc_and_nfd_logs_in(self):
        status, body = registration(self.server, signup_body("noe\u0308l", "snow on the roof"))
        self.assertEqual((status, body["username"]), (201, "no\u00ebl"))
        self.assertIn("no\u00ebl", self.names())
        self.assertEqual(registration(self.server, signup_body("no\u00ebl"))[0], 409)
        for spelling in ("no\u00ebl", "noe\u0308l"):
            with self.subTest(spelling=ascii(spelling)):
                status, _, data = exchange(self.server, "POST", "/users/authenticate",
                                           login_body(spelling, "snow on the roof"))
                self.assertEqual(status, 200, data)
                claims = decode_token(json.loads(data)["token"], SECRET)
                self.assertEqual(claims["username"], "no\u00ebl")

    def test_login_normalises_to_nfc_but_stays_exact(self):
        status, _, data = exchange(self.server, "POST", "/users/authenticate",
                                   login_body("cafe\u0301", "pässwörd"))          # NFD, from a phone
        self.assertEqual(status, 200, data)
        for other in ("CAFÉ", "Test", "ｔｅｓｔ"):                                  # logins are exact
            with self.subTest(other=other):
                status, _, data = exchange(self.server, "POST", "/users/authenticate",
                                           login_body(other, "pässwörd" if "É" in other else "test"))
                self.assertEqual((status, json.loads(data)),
                                 (400, {"message": "Username or password is incorrect"}))

    def test_a_file_that_holds_one_name_twice_loads_and_takes_no_third(self):
        """Case or width twins already in users.json (an older version's adduser, a hand
        edit) still load, so passwd keeps reaching the server; no new twin gets in."""
        for first, second in (("alice", "ALICE"), ("alice", "ａｌｉｃｅ"), ("straße", "STRASSE"),
                              ("café", "CAFÉ")):
            with self.subTest(first=first, second=second):
                files = Files(self, users=[make_user(1, first, "pw"), make_user(2, second, "pw")],
                              passwordIterations=FAST_ITERATIONS)
                store = authserver.UserStore(files.users)
                self.assertEqual(sorted(store.tables.by_name), sorted([first, second]))
                code, _, stderr = main_in_process("adduser", first.title(), "--config", files.config,
                                               "--users", files.users, stdin="a passphrase\n")
                self.assertEqual(code, 2, stderr)
                code, _, stderr = main_in_process("passwd", first, "--config", files.config,
                                               "--users", files.users, stdin="a passphrase\n")
                self.assertEqual(code, 0, stderr)
                authserver.UserStore(files.users)                    # and it still loads
        files = Files(self, users=[make_user(1, "cafe\u0301", "pw")])            # NFD on disk
        with self.assertRaises(authserver.ConfigError):
            authserver.UserStore(files.users)

    def test_no_writer_writes_a_file_the_server_would_refuse(self):
        files = Files(self)
        before = files.users.read_bytes()
        with self.assertRaises(authserver.ConfigError):
            authserver.update_users_file(files.users, lambda users: users.append(dict(users[0])))
        self.assertEqual(files.users.read_bytes(), before)

    def test_passwd_revoke_and_sessions_take_the_name_as_typed_on_macos(self):
        files = Files(self, passwordIterations=FAST_ITERATIONS)          # holds "café" (NFC)
        for command, stdin in (("passwd", "a passphrase\n"), ("sessions", ""), ("revoke", "")):
            with self.subTest(command=command):
                code, _, stderr = main_in_process(command, "cafe\u0301", "--config", files.config,
                                               "--users", files.users, stdin=stdin)
                self.assertEqual((code, stderr.count("no user")), (0, 0), stderr)

    def test_adduser_normalises_and_refuses_the_same_name(self):
        files = Files(self, passwordIterations=FAST_ITERATIONS)
        for name in ("Test", "ＴＥＳＴ", "cafe\u0301", "test\u034f", "test\u3164", "test\u2800"):
            with self.subTest(name=name):
                before = files.users.read_bytes()
                code, _, stderr = main_in_process("adduser", name, "--config", files.config,
                                               "--users", files.users, stdin="a passphrase\n")
                self.assertEqual(code, 2, stderr)
                self.assertTrue(stderr.startswith("authserver: "), stderr)
                self.assertEqual(stderr.count("\n"), 1, stderr)
                self.assertEqual(files.users.read_bytes(), before)
        code, _, stderr = main_in_process("adduser", "noe\u0308l", "--config", files.config,
                                       "--users", files.users, stdin="a passphrase\n")
        self.assertEqual(code, 0, stderr)
        self.assertIn("no\u00ebl", self.names(files))
        self.assertNotIn("noe\u0308l", self.names(files))


class TestNameFixesProfileFields(unittest.TestCase):
    """Sign-up takes the tutorial's profile fields, and no field of its own choosing."""

    @classmethod
    def setUpClass(cls):
        cls.files = Files(ClassScope(cls), allowRegistration=True, addressLoginAttempts=1000,
                          passwordIterations=FAST_ITERATIONS)
        cls.server = start_server(ClassScope(cls), cls.files)

    def test_fields_outside_the_allow_list_are_refused(self):
        before = self.files.users.read_bytes()
        for field, value in (("role", "admin"), ("isAdmin", "true"), ("scope", "admin"),
                             ("sid", "x"), ("exp", "9999999999"), ("iat", "0"), ("iss", "me"),
                             ("nickname", "eve"), ("username2", "x"), ("Role", "admin")):
            with self.subTest(field=field):
                status, body = registration(self.server,
                                            signup_body(f"eve-{field}", **{field: value}))
                self.assertEqual((status, body.get("name")), (400, "ValidationError"), body)
                self.assertIn(repr(field), body["message"])
                self.assertIn("firstName, lastName, phone", body["message"])
        self.assertEqual(self.files.users.read_bytes(), before)

    def test_the_tutorials_fields_are_kept_and_shown(self):
        profile = {"firstName": "Eve", "lastName": "Adams", "phone": "555-0100"}
        status, body = registration(self.server, signup_body("eve2", **profile))
        self.assertEqual(status, 201, body)
        self.assertEqual({**body, "id": 0}, {"id": 0, "username": "eve2", **profile})

    def test_the_openapi_document_lists_exactly_those_fields(self):
        document = json.loads(exchange(self.server, "GET", "/openapi.json")[2])
        schema = document["components"]["schemas"]["Registration"]
        self.assertEqual(sorted(schema["properties"]),
                         sorted(["username", "password", "firstName", "lastName", "phone"]))
        self.assertIs(schema.get("additionalProperties"), False)


class TestNameFixesMaxUsers(unittest.TestCase):
    """maxUsers: sign-up stops at a number of users, with a 403 in the tutorial's shape."""

    FULL = {"error": True, "name": "TooManyUsersError",
            "message": "Sign-up is closed: this server has as many users as it takes"}

    def test_the_setting(self):
        self.assertEqual(authserver.DEFAULT_CONFIG["maxUsers"], 10000)
        for bad in (0, -1, 2.5, "10", True, None, 1_000_001):
            with self.subTest(bad=bad):
                files = Files(self, maxUsers=bad)
                with self.assertRaises(authserver.ConfigError) as caught:
                    authserver.load_config(files.config)
                self.assertEqual(str(caught.exception), f"config file {files.config}: "
                                 f"maxUsers must be a whole number from 1 to 1000000")

    def test_sign_up_beyond_max_users_is_403_and_writes_nothing(self):
        files = Files(self, allowRegistration=True, maxUsers=4, passwordIterations=FAST_ITERATIONS)
        server = start_server(self, files)
        self.assertEqual(registration(server, signup_body("fourth"))[0], 201)
        before = files.users.read_bytes()
        self.assertEqual(registration(server, signup_body("fifth")), (403, self.FULL))
        self.assertEqual(files.users.read_bytes(), before)
        # The administrator is not bound by it: adduser still adds.
        code, _, stderr = main_in_process("adduser", "staff", "--config", files.config,
                                       "--users", files.users, stdin="a passphrase\n")
        self.assertEqual(code, 0, stderr)
        document = json.loads(exchange(server, "GET", "/openapi.json")[2])
        answer = document["paths"]["/users/register"]["post"]["responses"]["403"]
        self.assertEqual(answer["content"]["application/json"]["schema"],
                         {"$ref": "#/components/schemas/NamedError"})

    def test_sign_ups_at_once_stop_at_the_limit(self):
        files = Files(self, allowRegistration=True, maxUsers=5, passwordIterations=FAST_ITERATIONS)
        server = start_server(self, files)
        barrier = threading.Barrier(6)
        statuses = []

        def sign_up(number):
            barrier.wait(timeout=30)
            statuses.append(registration(server, signup_body(f"racer{number}"))[0])
        threads = [threading.Thread(target=sign_up, args=(n,)) for n in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        self.assertEqual(sorted(statuses), [201, 201] + [403] * 4)
        self.assertEqual(len(json.loads(files.users.read_text(encoding="utf-8"))), 5)


class TestNameFixesLimiterTables(unittest.TestCase):
    """Cheap requests from many addresses cannot push a username's count out of the limiter."""

    def test_address_keys_never_evict_user_keys(self):
        limiter = authserver.LoginLimiter({"user": 2, "address": 100}, window=60, max_keys=3)
        for _ in range(2):
            self.assertEqual(limiter.reserve([("user", "test"), ("address", "a")], 1000), 0)
        self.assertEqual(limiter.reserve([("user", "test")], 1001), 60)
        for number in range(10):
            self.assertEqual(limiter.reserve([("address", f"10.0.0.{number}")], 1002), 0)
        self.assertEqual(limiter.reserve([("user", "test")], 1003), 58)
        for name in "abc":                          # user keys are still bounded, among themselves
            limiter.reserve([("user", name)], 1004)
        self.assertEqual(limiter.reserve([("user", "test")], 1005), 0)

    def start(self, **config):
        files = Files(self, allowRegistration=True, passwordIterations=FAST_ITERATIONS, **config)
        server = start_server(self, files)
        return server

    def test_many_addresses_signing_up_cannot_reset_a_users_count(self):
        server = self.start(loginAttempts=2)
        server.limiter = authserver.LoginLimiter({"user": 2, "address": 50}, 60, max_keys=5)
        try:
            connect_from(server, "127.0.2.1").close()
        except OSError as error:
            self.skipTest(f"cannot send from 127.0.2.1 here: {error}")
        wrong = json.dumps(login_body("test", "a guess"))
        self.assertEqual([raw_exchange(server, post(wrong))[0] for _ in range(3)], [400, 400, 429])
        port = server.server_address[1]
        for number in range(1, 13):                  # malformed (400) and taken (409) sign-ups
            for body, status in (({"username": "x"}, 400), (signup_body("ncuser"), 409)):
                with connect_from(server, f"127.0.2.{number}") as sock:
                    sock.sendall(post(json.dumps(body)).replace(b"/users/authenticate",
                                                                b"/users/register"))
                    self.assertEqual(read_response(sock)[0], status)
        self.assertEqual(raw_exchange(server, post(wrong))[0], 429)

    def test_a_malformed_sign_up_costs_nothing(self):
        server = self.start(addressLoginAttempts=2)
        for body in ({"username": "x"}, {"password": b64("correct horse")}, [1],
                     {"username": 5, "password": b64("correct horse")}):
            with self.subTest(body=body):
                self.assertEqual(registration(server, body)[0], 400)
        self.assertEqual(exchange(server, "POST", "/users/register", "{")[0], 400)
        self.assertEqual(registration(server, signup_body("first"))[0], 201)
        self.assertEqual(registration(server, signup_body("second"))[0], 201)
        self.assertEqual(registration(server, signup_body("third"))[0], 429)


class TestNameFixesConnectionShares(unittest.TestCase):
    """No address, and no two addresses, may take every connection slot."""

    def setUp(self):
        self.held = []
        self.addCleanup(lambda: [sock.close() for sock in self.held])

    def hold_all(self, server, source):
        """Open connections from source until one gets 503; how many were served."""
        for _ in range(50):
            sock = connect_from(server, source)
            sock.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n")
            status = read_response(sock)[0]
            if status == 503:
                sock.close()
                return len([s for s in self.held if s.getsockname()[0] == source])
            self.assertEqual(status, 200)
            self.held.append(sock)                   # kept open: it holds its slot
        self.fail(f"no 503 for {source} after 50 connections")

    def assert_served(self, server, source):
        with connect_from(server, source) as sock:
            sock.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            self.assertEqual(read_response(sock)[0], 200)

    def skip_unless_sources(self, server, *sources):
        for source in sources:
            try:
                connect_from(server, source).close()
            except OSError as error:
                self.skipTest(f"cannot send from {source} here: {error}")

    def test_one_address_gets_at_most_half_when_the_file_limit_lowers_the_total(self):
        # A POSIX system with ulimit -n 74, hard: room for 10 connections besides the spare files.
        fake = mock.Mock(RLIMIT_NOFILE=7, RLIM_INFINITY=-1, getrlimit=lambda which: (74, 74),
                         setrlimit=mock.Mock(side_effect=ValueError("not allowed")))
        with mock.patch.object(authserver, "resource", fake):
            server = start_server(self)                  # 600 in all, 300 per address: defaults
        self.skip_unless_sources(server, "127.0.0.2")
        self.assertLessEqual(self.hold_all(server, "127.0.0.1"), 5)
        self.assert_served(server, "127.0.0.2")

    def test_one_address_gets_at_most_half_of_a_low_total(self):
        server = start_server(self, maxConnections=10, maxConnectionsPerAddress=300)
        self.skip_unless_sources(server, "127.0.0.2")
        self.assertLessEqual(self.hold_all(server, "127.0.0.1"), 5)
        self.assert_served(server, "127.0.0.2")

    def test_two_flooding_addresses_leave_room_for_a_third(self):
        server = start_server(self, maxConnections=10, maxConnectionsPerAddress=5)
        self.skip_unless_sources(server, "127.0.0.2", "127.0.0.3")
        self.assertTrue(poll_until(lambda: server.connections.total == 0))
        first = self.hold_all(server, "127.0.0.1")
        second = self.hold_all(server, "127.0.0.3")
        self.assertGreaterEqual(first + second, 6)      # the flood got most of the slots ...
        self.assert_served(server, "127.0.0.2")          # ... and a newcomer is still served


# ---------------------------------------------------------------------------
# Sessions, fixed: the owner of a session, passwd's race, the seal, a busy file
# ---------------------------------------------------------------------------

SESSION_BUSY = {"error": True, "name": "SessionStoreError",
                "message": "Sessions are unavailable right now; try again shortly"}


def sessions_rows(files, sql, parameters=()):
    """Rows of the sessions file, read through a connection of our own."""
    connection = authserver.sqlite3.connect(files.folder / "authserver.sessions")
    try:
        return connection.execute(sql, parameters).fetchall()
    finally:
        connection.close()


class TestSessionFixesOwner(SessionsCase):
    """A session belongs to one account, not to a name that a later account may take."""

    def test_a_removed_users_refresh_token_does_not_open_the_next_account_of_that_name(self):
        old = self.login()
        # The first "test" is removed and a new person gets the name (another id, password).
        authserver.save_users(self.files.users,
                              TEST_USERS[1:] + [make_user(11111, "test", "the-new-test")])
        self.server.users.refresh(force=True)
        status, body = self.refresh(old["refreshToken"])
        self.assertEqual(status, 401, body)
        self.assertEqual(body["name"], "RefreshTokenError", body)
        self.assertEqual(self.info(old["token"])[0], 401)
        new = self.login("test", "the-new-test")
        self.assertEqual(self.info(new["token"]), (200, {"id": 11111, "username": "test"}))
        status, _, listed = self.client.request("GET", "/users/sessions",
                                                headers=bearer(new["token"]))
        self.assertEqual((status, [s["id"] for s in listed["sessions"]]),
                         (200, [decode_token(new["token"], SECRET)["sid"]]))
        self.assertEqual(self.refresh(old["refreshToken"])[0], 401)

    def test_sessions_and_revoke_work_for_a_name_no_longer_in_the_users_file(self):
        body = self.login()
        sid = decode_token(body["token"], SECRET)["sid"]
        # The admin's users file no longer has "test" (the server's still has: it keeps
        # the session live, so that there is something to clean up).
        removed = self.files.folder / "removed.json"
        authserver.save_users(removed, TEST_USERS[1:])
        common = ("--config", self.files.config, "--users", removed)
        code, out, error = main_in_process("sessions", "test", *common)
        self.assertEqual((code, error), (0, ""))
        self.assertIn(sid, out)
        code, out, error = main_in_process("revoke", "test", *common)
        self.assertEqual((code, error), (0, ""))
        self.assertIn("1 session(s) of 'test' revoked", out)
        self.assertEqual(poll_until(lambda: self.info(body["token"])[0] == 401), True)
        for args in (("sessions", "nobody"), ("revoke", "nobody")):
            with self.subTest(args=args):
                code, _, error = main_in_process(*args, *common)
                self.assertEqual((code, len(error.splitlines())), (2, 1), error)
                self.assertTrue(error.startswith("authserver: no "), error)


class TestSessionFixesPasswd(unittest.TestCase):
    """passwd ends every session started with the old password, even one a second later."""

    def test_logins_with_the_old_password_while_passwd_runs_are_all_ended(self):
        # (The limits: the loop's failures once the new password is in are not the point.)
        files = Files(self, passwordIterations=FAST_ITERATIONS, loginAttempts=100000,
                      addressLoginAttempts=100000)
        server = start_server(self, files)
        # Hold the server's reload of users.json until the test lets it go: the window in
        # which the old password still works is then certain, not a matter of luck.
        server.users.next_check = float("inf")
        stop, passwd_done = threading.Event(), threading.Event()
        logins = []                          # (after passwd had finished?, the answer)

        def log_in_again_and_again():
            client = Client(server)
            try:
                while not stop.is_set():
                    status, _, body = client.request("POST", "/users/authenticate",
                                                     login_body("test", "test"))
                    if status == 200:
                        logins.append((passwd_done.is_set(), body))
            finally:
                client.close()
        thread = threading.Thread(target=log_in_again_and_again)
        thread.start()
        self.addCleanup(thread.join, 30)
        self.addCleanup(stop.set)
        self.assertTrue(poll_until(lambda: logins))
        result = run_cli("passwd", "test", "--config", files.config, "--users", files.users,
                         stdin="the-new-password\n")
        self.assertEqual(result.returncode, 0, result.stderr)
        passwd_done.set()
        self.assertTrue(poll_until(lambda: any(after for after, _ in logins)))
        server.users.next_check = 0          # the server may now notice the new file
        self.assertTrue(poll_until(
            lambda: "users file reloaded" in server.test_log.getvalue()),
            server.test_log.getvalue())
        stop.set()
        thread.join(timeout=30)
        self.assertFalse(thread.is_alive())
        client = Client(server)
        self.addCleanup(client.close)
        live = [(after, client.request("GET", "/users/getInfo", headers=bearer(body["token"]))[0],
                 client.request("POST", "/users/refresh",
                                {"refreshToken": body["refreshToken"]})[0])
                for after, body in logins]
        # (after passwd had finished?, getInfo's status, refresh's status) of each one alive
        self.assertEqual([answers for answers in live if answers[1:] != (401, 401)], [])
        status, _, body = client.request("POST", "/users/authenticate",
                                         login_body("test", "the-new-password"))
        self.assertEqual(status, 200, body)
        status, _, answer = client.request("GET", "/users/getInfo", headers=bearer(body["token"]))
        self.assertEqual(status, 200, answer)

    def test_a_session_of_a_changed_password_cannot_refresh(self):
        files = Files(self, passwordIterations=FAST_ITERATIONS)
        server = start_server(self, files)
        client = Client(server)
        self.addCleanup(client.close)
        status, _, body = client.request("POST", "/users/authenticate", login_body())
        self.assertEqual(status, 200, body)
        # The hash changes by hand (not passwd, which revokes): the session was started
        # under the old one.
        authserver.save_users(files.users, [make_user(81623, "test", "changed")] + TEST_USERS[1:])
        server.users.refresh(force=True)
        status, _, answer = client.request("POST", "/users/refresh",
                                           {"refreshToken": body["refreshToken"]})
        self.assertEqual(status, 401, answer)
        self.assertEqual(set(answer), {"error", "name", "message"})
        self.assertEqual(client.request("GET", "/users/getInfo",
                                        headers=bearer(body["token"]))[0], 401)


class TestSessionFixesOwnerChecks(SessionsCase):
    """The checks behind the sweep: at each refresh, and when a server starts."""

    def test_refresh_checks_the_owner_even_before_a_reload_ends_the_sessions(self):
        self.server.users.on_change = lambda names: None     # as a process that missed it
        same_id, other_id = self.login(), self.login("ncuser", "ncpassword")
        authserver.save_users(self.files.users, [make_user(81623, "test", "changed"),
                                                 make_user(4242, "ncuser", "ncpassword")])
        self.server.users.refresh(force=True)
        self.assertEqual(self.refresh(same_id["refreshToken"]), (401, {
            "error": True, "name": "RefreshTokenError",
            "message": "password changed; log in again"}))
        self.assertEqual(self.refresh(other_id["refreshToken"]), (401, {
            "error": True, "name": "RefreshTokenError", "message": "user not found"}))
        for body in (same_id, other_id):                     # and their sessions ended
            self.assertEqual(self.refresh(body["refreshToken"]), (401, NOT_RECOGNISED))
            self.assertEqual(self.info(body["token"])[0], 401)

    def test_a_login_whose_password_changed_while_it_ran_is_refused(self):
        self.server.users.on_change = lambda names: None     # only the login's own check
        store, users = self.server.sessions, self.server.users
        start = store.start

        def start_then_passwd(*args, **kwargs):
            """The session is saved; then passwd's new hash lands and is read."""
            started = start(*args, **kwargs)
            authserver.save_users(self.files.users,
                                  [make_user(81623, "test", "changed")] + TEST_USERS[1:])
            users.refresh(force=True)
            return started
        with mock.patch.object(store, "start", start_then_passwd):
            status, _, body = self.client.request("POST", "/users/authenticate", login_body())
        self.assertEqual((status, body), (400, {"message": "Username or password is incorrect"}))
        self.assertEqual(store.sessions_of("test", time.time()), [])

    def test_a_reload_that_finds_the_sessions_file_busy_ends_them_later(self):
        body = self.login()
        holder = authserver.sqlite3.connect(self.sessions_file(), isolation_level=None, timeout=0)
        self.addCleanup(holder.close)
        holder.execute("BEGIN IMMEDIATE")
        self.addCleanup(lambda: holder.in_transaction and holder.execute("ROLLBACK"))
        authserver.save_users(self.files.users,
                              [make_user(81623, "test", "changed")] + TEST_USERS[1:])
        log = self.server.test_log
        self.assertTrue(poll_until(lambda: "sessions of changed users not ended yet"
                                   in log.getvalue()), log.getvalue())
        holder.execute("ROLLBACK")
        self.assertTrue(poll_until(lambda: "1 session(s) ended" in log.getvalue()),
                        log.getvalue())
        self.assertEqual(self.info(body["token"]), (401, REVOKED))

    def test_a_server_starting_ends_the_sessions_of_users_changed_meanwhile(self):
        self.server.users.on_change = lambda names: None     # as if it had been stopped
        self.server.users.next_check = float("inf")
        body = self.login()
        kept = self.login("ncuser", "ncpassword")
        authserver.save_users(self.files.users,
                              [make_user(81623, "test", "changed")] + TEST_USERS[1:])
        started = start_server(self, self.files)
        client = self.new_client(started)
        self.assertEqual(self.info(body["token"], client), (401, REVOKED))
        self.assertEqual(self.info(kept["token"], client)[0], 200)
        self.assertIn("1 session(s) ended", started.test_log.getvalue())

    def test_a_sessions_file_from_before_owners_gets_the_columns(self):
        self.server.sessions.close()
        for path in self.files.folder.glob("authserver.sessions*"):
            path.unlink()
        old = authserver.sqlite3.connect(self.sessions_file())
        old.executescript("""
            CREATE TABLE sessions (id TEXT PRIMARY KEY, username TEXT NOT NULL,
                refresh_hash BLOB NOT NULL UNIQUE, previous_hash BLOB, sealed_successor BLOB,
                rotated_at REAL NOT NULL, created REAL NOT NULL, last_used REAL NOT NULL,
                expires REAL NOT NULL, address TEXT NOT NULL, user_agent TEXT NOT NULL);
            INSERT INTO sessions VALUES ('old-session', 'test', x'00', NULL, NULL, 1, 1, 1,
                                         4000000000, '', '');""")
        old.commit()
        old.close()
        started = start_server(self, self.files)
        client = self.new_client(started)
        self.assertEqual(self.info(token_for(sid="old-session"), client), (401, REVOKED))
        body = self.login(client=client)
        self.assertEqual(self.info(body["token"], client)[0], 200)
        self.assertEqual(self.refresh(body["refreshToken"], client)[0], 200)


class TestSessionFixesSeal(SessionsCase):
    """A spent refresh token and a copy of the file give nobody the current token."""

    def test_a_spent_token_and_a_copy_of_the_file_do_not_open_the_seal(self):
        first = self.login()
        status, second = self.refresh(first["refreshToken"])
        self.assertEqual(status, 200, second)
        spent = first["refreshToken"]
        [(sealed,)] = sessions_rows(self.files, "SELECT sealed_successor FROM sessions "
                                    "WHERE previous_hash = ?",
                                    (hashlib.sha256(spent.encode()).digest(),))
        self.assertIsNotNone(sealed)                 # the grace still needs it
        pad = hmac.new(spent.encode(), b"successor", hashlib.sha256).digest()
        opened = bytes(a ^ b for a, b in zip(sealed, pad))
        self.assertNotEqual(opened, b64url_decode(second["refreshToken"]))
        # The server, with its key, still opens it: within the grace, the same pair again.
        self.assertEqual(self.refresh(spent), (200, second))


class TestSessionFixesSealCleared(SessionsCase):

    config = {"refreshGrace": 0.2}

    def test_seals_older_than_the_grace_are_cleared_when_sessions_are_purged(self):
        first = self.login()
        self.assertEqual(self.refresh(first["refreshToken"])[0], 200)

        def seals_left():
            self.login("ncuser", "ncpassword")           # a login purges
            return sessions_rows(self.files, "SELECT count(*) FROM sessions "
                                 "WHERE sealed_successor IS NOT NULL")[0][0]
        self.assertEqual(poll_until(lambda: seals_left() == 0), True)


class TestSessionFixesMalformedTokens(SharedServerCase):

    def test_a_lone_surrogate_refresh_token_is_refused_not_a_500(self):
        body = b'{"refreshToken":"\\ud800"}'
        for path, expected in (("/users/logout", 204), ("/users/refresh", 401)):
            with self.subTest(path=path):
                request = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           f"Content-Length: {len(body)}\r\n\r\n").encode() + body
                status, _, answer = raw_exchange(self.server, request)
                self.assertEqual(status, expected, answer)
                if expected == 401:
                    self.assertEqual(json.loads(answer), NOT_RECOGNISED)
        client = Client(self.server)
        self.addCleanup(client.close)
        for token in ("A" * 42, "A" * 44, "é" * 43, "A" * 42 + "="):
            with self.subTest(token=token):
                status, _, answer = client.request("POST", "/users/logout",
                                                   {"refreshToken": token})
                self.assertEqual((status, answer), (204, b""))
        self.assertNotIn("Traceback", self.server.test_log.getvalue())


class TestSessionFixesBusyFile(SessionsCase):
    """Another process holding the sessions file's write lock stalls nobody for long."""

    def test_a_locked_file_gives_prompt_503s_and_getinfo_goes_on(self):
        body = self.login()
        holder = authserver.sqlite3.connect(self.sessions_file(), isolation_level=None, timeout=0)
        self.addCleanup(holder.close)
        holder.execute("BEGIN IMMEDIATE")              # what a backup or the sqlite3 shell does
        self.addCleanup(lambda: holder.in_transaction and holder.execute("ROLLBACK"))
        answers = []

        def log_in():
            client = self.new_client(self.server)
            started = time.monotonic()
            try:
                status, _, answer = client.request("POST", "/users/authenticate", login_body())
            except OSError as error:                    # no answer in the client's 10 s
                status, answer = None, repr(error)
            answers.append((status, answer, time.monotonic() - started))
        threads = [threading.Thread(target=log_in) for _ in range(3)]
        for thread in threads:
            thread.start()
        other = self.new_client(self.server)
        checks = 0
        # getInfo all the time the logins wait: its once-a-second look at the file must
        # not queue behind them.
        while any(thread.is_alive() for thread in threads) or checks < 3:
            started = time.monotonic()
            status, answer = self.info(body["token"], other)
            self.assertEqual(status, 200, answer)
            self.assertLess(time.monotonic() - started, 3)   # generous: a stall is 5 s and more
            checks += 1
            threading.Event().wait(0.05)
        for thread in threads:
            thread.join(timeout=30)
        self.assertEqual([(status, answer) for status, answer, _ in answers],
                         [(503, SESSION_BUSY)] * 3)
        for _, _, seconds in answers:
            self.assertLess(seconds, 4)                 # each, not one after another
        holder.execute("ROLLBACK")
        self.assertEqual(self.info(self.login()["token"])[0], 200)

    def test_the_change_check_does_not_wait_for_the_lock(self):
        body = self.login()
        store = self.server.sessions
        client = Client(self.server)
        client.connection.timeout = 5
        self.addCleanup(client.close)
        with store.lock:                     # a transaction waiting for another process
            store.next_check = 0             # and the once-a-second look is due now
            status, _, answer = client.request("GET", "/users/getInfo",
                                               headers=bearer(body["token"]))
        self.assertEqual(status, 200, answer)
        self.assertEqual(self.info(body["token"])[0], 200)      # and it looks next time

class TestSessionFixesLiveSet(SessionsCase):

    def test_a_session_deleted_right_after_its_commit_is_not_accepted(self):
        store = self.server.sessions
        commit = store.transaction
        inside = []

        def commit_then_log_out_everywhere(work):
            """A transaction, then at once another's logoutAll: the window a thread may
            be preempted in, made certain."""
            result = commit(work)
            if not inside:
                inside.append(1)
                try:
                    store.end_for_user("test")
                finally:
                    inside.clear()
            return result
        with mock.patch.object(store, "transaction", commit_then_log_out_everywhere):
            status, _, body = self.client.request("POST", "/users/authenticate", login_body())
        if status == 200:                                # or the login saw its session end
            self.assertEqual(self.info(body["token"]), (401, REVOKED))
            self.assertEqual(self.refresh(body["refreshToken"]), (401, NOT_RECOGNISED))
        self.assertEqual(store.sessions_of("test", time.time()), [])


class TestSessionFixesExplain(SessionsCase):

    def test_explain_a_refresh_token_spent_within_the_grace(self):
        first = self.login()
        status, second = self.refresh(first["refreshToken"])
        self.assertEqual(status, 200)
        common = ("--config", self.files.config, "--users", self.files.users)
        code, out, error = main_in_process("explain", *common, "--", first["refreshToken"])
        self.assertIn("within the grace", out)
        self.assertIn("the same new pair again", out)
        self.assertNotIn("presenting it revokes its session\n", out)
        verdict = out.strip().splitlines()[-1]
        self.assertIn("200", verdict)
        self.assertEqual(code, 0, out + error)
        self.assertEqual(self.refresh(first["refreshToken"]), (200, second))   # as it said

    def test_explain_a_refresh_token_creates_no_sessions_file(self):
        files = Files(self)
        code, out, error = main_in_process("explain", "A" * 43, "--config", files.config,
                                           "--users", files.users)
        self.assertEqual(code, 1, out + error)
        self.assertIn("no sessions", out)
        self.assertEqual(sorted(path.name for path in files.folder.iterdir()),
                         ["config.json", "users.json"])


class TestSessionFixesCliOutput(SessionsCase):

    def test_sessions_prints_the_user_agent_escaped(self):
        user_agent = b"C1 \x9b31m red, bidi \xe2\x80\xae txt.exe"
        body = json.dumps(login_body()).encode()
        request = (b"POST /users/authenticate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                   b"\r\nUser-Agent: " + user_agent + b"\r\nContent-Length: %d\r\n\r\n" % len(body)
                   + body)
        status, _, answer = raw_exchange(self.server, request)
        self.assertEqual(status, 200, answer)
        code, out, error = main_in_process("sessions", "test", "--config", self.files.config,
                                           "--users", self.files.users)
        self.assertEqual((code, error), (0, ""))
        self.assertEqual([hex(ord(c)) for c in out if not (c.isprintable() or c == "\n")], [])
        # (The header's bytes are read as Latin-1: U+202E's UTF-8 arrives as "â\x80®".)
        self.assertIn("C1 \\x9b31m red, bidi \u00e2\\x80\u00ae txt.exe", out)



class TestRefreshTokensOnACommandLine(unittest.TestCase):
    """A refresh token pasted after `explain` must not read as an option."""

    def test_no_refresh_token_or_session_id_starts_with_a_dash(self):
        for size in (authserver.REFRESH_TOKEN_BYTES, authserver.SESSION_ID_BYTES):
            draws = iter([b"\xf8" + bytes(size - 1), b"\x04" + bytes(size - 1)])  # "-…", "B…"
            with mock.patch.object(authserver.secrets, "token_bytes", lambda n: next(draws)):
                data = authserver.random_for_command_lines(size)
            self.assertEqual(authserver.b64url_encode(b"\xf8" + bytes(size - 1))[0], "-")
            self.assertEqual(authserver.b64url_encode(data)[0], "B")
        files = Files(self)
        sessions = authserver.open_sessions(authserver.load_config(files.config), b"k" * 32)
        self.addCleanup(sessions.close)
        draws = iter([b"\xf8" + bytes(15), b"\x04" + bytes(15), b"\xf8" + bytes(31),
                      b"\x08" + bytes(31)])
        with mock.patch.object(authserver.secrets, "token_bytes", lambda n: next(draws)):
            session_id, refresh_token = sessions.start("test", time.time())
        self.assertEqual((session_id[0], refresh_token[0]), ("B", "C"))

    def test_explain_takes_a_refresh_token_as_it_is_pasted(self):
        files = Files(self)
        server = start_server(self, files)
        client = Client(server)
        self.addCleanup(client.close)
        _, _, body = client.request("POST", "/users/authenticate", login_body())
        code, out, err = main_in_process("explain", body["refreshToken"], "--config",
                                         files.config, "--users", files.users)
        self.assertEqual((code, err), (0, ""), out)
        self.assertIn("Verdict: valid. POST /users/refresh would renew it", out)


    def test_explain_agrees_with_the_server_on_a_changed_password(self):
        files = Files(self)
        server = start_server(self, files)
        client = Client(server)
        self.addCleanup(client.close)
        _, _, body = client.request("POST", "/users/authenticate", login_body())
        # A copy with the password changed, which the running server does not read (it
        # would end the session itself on its next look at its own file).
        changed = [dict(user) for user in TEST_USERS]
        changed[0]["passwordHash"] = hash_password("changed by hand", FAST_ITERATIONS)
        edited = files.folder / "edited-users.json"
        authserver.save_users(edited, changed)
        code, out, _ = main_in_process("explain", body["refreshToken"], "--config",
                                       files.config, "--users", edited)
        self.assertEqual(code, 1, out)
        self.assertIn("password changed; log in again", out)

    def test_explain_reads_the_sessions_file_and_never_makes_one(self):
        files = Files(self)
        token = token_for(sid="a-session-nobody-started", now=time.time())
        code, out, err = main_in_process("explain", token, "--config", files.config,
                                         "--users", files.users)
        self.assertEqual((code, err), (1, ""), out)
        self.assertIn("FAIL SessionRevokedError: session revoked", out)
        self.assertEqual(sorted(path.name for path in files.folder.iterdir()),
                         ["config.json", "users.json"])


if __name__ == "__main__":
    unittest.main()


# ---------------------------------------------------------------------------
# The attack lab: section 4's forgeries, GET /attacks, and the attack command
# ---------------------------------------------------------------------------

class TestAttackRoute(SessionsCase):
    """GET /attacks: the forgeries of the caller's token, each refused where it says."""

    def test_every_forgery_is_refused_by_the_step_it_names(self):
        login = self.login()
        status, _, body = self.client.request("GET", "/attacks", headers=bearer(login["token"]))
        self.assertEqual(status, 200, body)
        self.assertEqual((body["target"], body["checks"], body["messages"]),
                         ("GET /users/getInfo", authserver.CHECKS, authserver.MESSAGE_CHECKS))
        self.assertEqual([attack["name"] for attack in body["attacks"]],
                         [attack.name for attack in authserver.ATTACKS])
        for attack in body["attacks"]:
            with self.subTest(attack["name"]):
                token = attack["token"]
                if attack["needs"] == "refresh token":       # the page sends its own
                    self.assertIsNone(token)
                    token = login["refreshToken"]
                status, answer = self.info(token)
                self.assertEqual((status, answer["message"]), (401, attack["message"]))
        # Each of those refusals was made by the step named: the same tokens, decoded here.
        for attack in body["attacks"]:
            if attack["token"] and attack["check"] != "split_token":
                with self.assertRaises(TokenError):
                    authserver.decode_token(attack["token"], self.server.key)

    def test_the_tokens_signed_with_the_servers_key_are_never_more_than_the_callers(self):
        login = self.login()
        _, _, body = self.client.request("GET", "/attacks", headers=bearer(login["token"]))
        genuine = authserver.decode_token(login["token"], self.server.key)
        by_name = {attack["name"]: attack["token"] for attack in body["attacks"]}
        for name in ('alg "HS384", the server\'s own key', "expired token replayed",
                     "nbf in the future"):
            with self.subTest(name):
                header, payload, signature = by_name[name].split(".")
                claims = json.loads(b64url_decode(payload))
                # Same user, same session; never valid later than the genuine token.
                self.assertEqual({key: claims[key] for key in ("id", "username", "sid")},
                                 {key: genuine[key] for key in ("id", "username", "sid")})
                self.assertLessEqual(claims["exp"], genuine["exp"])
                if "nbf" in claims:
                    self.assertGreaterEqual(claims["nbf"], claims["exp"])
        self.assertLess(json.loads(b64url_decode(
            by_name["expired token replayed"].split(".")[1]))["exp"], time.time())

    def test_it_needs_a_valid_token(self):
        status, _, body = self.client.request("GET", "/attacks")
        self.assertEqual((status, body["message"]), (403, "No token provided."))
        status, answer = self.client.request("GET", "/attacks", headers=bearer(
            token_for(secret="another-secret-that-is-32-bytes-long!")))[::2]
        self.assertEqual((status, answer["message"]), (401, "invalid signature"))


class VulnerableServer(http.server.ThreadingHTTPServer):
    """A deliberately broken stand-in for a JWT server, for the attack command to catch.

    Its tokens are signed with key; flaw "none" also takes any token whose header says alg
    none, unchecked, as the libraries of 2015 did. Every request it gets is recorded.
    """

    def __init__(self, test, key, flaw=None):
        super().__init__(("127.0.0.1", 0), VulnerableHandler)
        self.key, self.flaw, self.requests = key, flaw, []
        serve_in_background(test, self)

    def verify(self, token):
        """The claims, or TokenError: decode_token with its key, unless the flaw lets it by."""
        if self.flaw == "none":
            header = json.loads(b64url_decode(token.split(".")[0] + "=" * 0) or b"{}")
            if str(header.get("alg", "")).lower() == "none":
                return json.loads(b64url_decode(token.split(".")[1]))
        return decode_token(token, self.key)


class VulnerableHandler(http.server.BaseHTTPRequestHandler):

    def answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.requests.append(("POST", self.path, body))
        credentials = json.loads(body)
        if self.path == "/users/logout":            # flaw "logout": it fails
            self.answer(500, {"message": "the database is down"})
        elif credentials.get("username") == "test" and credentials.get("password") == b64("test"):
            login = {"token": token_for(secret=self.server.key), "expiresIn": 3600}
            if self.server.flaw == "logout":
                login["refreshToken"] = "R" * 43
            self.answer(200, login)
        else:
            self.answer(400, {"message": "Username or password is incorrect"})

    def do_GET(self):
        token = self.headers.get("Authorization", "").partition(" ")[2]
        self.server.requests.append(("GET", self.path, token))
        try:
            claims = self.server.verify(token)
        except (TokenError, ValueError) as error:
            self.answer(401, {"error": True, "name": "JsonWebTokenError", "message": str(error)})
        else:
            self.answer(200, {"id": claims.get("id"), "username": claims.get("username")})

    def log_message(self, *args):
        pass


class Terminal(io.StringIO):
    """A StringIO that says it is a terminal, so the output is in colour."""

    def isatty(self):
        return True


def run_attack(*args, stdin=None, guesses=None, stdout=None):
    """main(["attack", ...]) in this process: (exit code, stdout, stderr).

    guesses: what the offline search tries (default: the whole wordlist's 101,101)."""
    with contextlib.ExitStack() as patches:
        if guesses is not None:
            patches.enter_context(mock.patch.object(authserver, "wordlist_guesses",
                                                    lambda: iter(guesses)))
        patches.enter_context(mock.patch.dict(os.environ, {"COLUMNS": "100"}))
        if stdout is None:
            return main_in_process("attack", *args, stdin=stdin)
        err = io.StringIO()
        patches.enter_context(mock.patch("sys.stdout", stdout))
        patches.enter_context(mock.patch("sys.stderr", err))
        code = authserver.main(["attack", *map(str, args)])
        return code, stdout.getvalue(), err.getvalue()


FEW_GUESSES = ["", "secret", "password"]       # for tests that do not look at the search


class TestAttackCommand(unittest.TestCase):
    """python authserver.py attack, against a real server and against broken stand-ins."""

    @classmethod
    def setUpClass(cls):
        scope = ClassScope(cls)
        cls.files = Files(scope, passwordIterations=FAST_ITERATIONS)
        cls.server = start_server(scope, cls.files)
        cls.url = f"http://127.0.0.1:{cls.server.server_address[1]}"

    def attack_json(self, *args, **options):
        code, out, err = run_attack(*args, "--json", **options)
        self.assertEqual(err, "")
        return code, json.loads(out)

    def test_a_real_server_refuses_every_attack_by_the_step_it_names(self):
        code, report = self.attack_json("--config", self.files.config, "--url", self.url,
                                        "--user", "test", "--password", "test")
        self.assertEqual(code, 0)
        self.assertEqual(report["counts"], {"refused": len(authserver.ATTACKS), "ACCEPTED": 0,
                                            "unclear": 0, "skipped": 0})
        self.assertEqual([result["name"] for result in report["attacks"]],
                         [attack.name for attack in authserver.ATTACKS])
        for result in report["attacks"]:
            with self.subTest(result["name"]):
                self.assertEqual((result["status"], result["answer"], result["refusedBy"]),
                                 (401, result["message"], result["check"]))
        self.assertEqual((report["secret"]["found"], report["secret"]["guesses"]),
                         (False, 101101))
        self.assertGreater(report["secret"]["perSecond"], 0)
        self.assertEqual(report["secret"]["configuredBits"], 256)
        self.assertNotIn(SECRET, json.dumps(report))
        self.assertTrue(report["ok"])
        # The login's session was logged out: the tokens in the report are dead.
        self.assertEqual(self.server.sessions.sessions_of("test", time.time(), None), [])

    def test_the_report_says_for_each_attack_what_it_tried_and_what_refused_it(self):
        code, out, err = run_attack("--config", self.files.config, "--url", self.url,
                                    "--user", "test", stdin="test\n", guesses=FEW_GUESSES)
        self.assertEqual((code, err), (0, ""))
        self.assertIn("\nread_header: the server decides the algorithm (HS256), never the "
                      "token;", out)
        self.assertIn('  refused  alg "none", no signature\n'
                      '           a header saying the token is not signed at all (an '
                      '"unsecured JWT")\n           header {"alg":"none","typ":"JWT"}\n'
                      '           eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.', out)
        self.assertIn("\n           401 invalid algorithm: refused by read_header (RFC 8725 "
                      "§2.1, §3.1; RFC 7518 §3.6)\n", out)
        self.assertIn("\n           401 jwt expired: refused by check_claims (RFC 7519 "
                      "§4.1.4)\n", out)
        # The 11,000-character token is cut to fit the line; the count says how long it was.
        oversized = re.search(r"oversized token\n.*\n.*\n( +eyJ\S+\.\.\.\S+ \((\d+) "
                              r"characters\))\n", out)
        self.assertLessEqual(len(oversized.group(1)), 99)
        self.assertGreater(int(oversized.group(2)), authserver.MAX_TOKEN_BYTES)
        self.assertIn("\n  3 guesses from the wordlist", out)
        self.assertNotIn(SECRET, out)                # the server's own secret, known here
        self.assertIn(f"\n{len(authserver.ATTACKS)} attacks: {len(authserver.ATTACKS)} refused, "
                      f"0 ACCEPTED, 0 unclear, 0 skipped.\nVerdict: every attack was refused "
                      f"and the secret was not guessed.\n", out)
        self.assertTrue(all(len(line) <= 100 for line in out.splitlines()), out)

    def test_without_the_servers_key_the_attacks_that_need_it_are_skipped(self):
        other = Files(self, secret="another-secret-that-is-32-bytes-long!")
        code, report = self.attack_json("--config", other.config, "--url", self.url,
                                        "--user", "test", "--password", "test",
                                        guesses=FEW_GUESSES)
        skipped = [result["name"] for result in report["attacks"]
                   if result["verdict"] == "skipped"]
        self.assertEqual(skipped, [attack.name for attack in authserver.ATTACKS
                                   if attack.needs == "key"])
        self.assertEqual((code, report["counts"]["ACCEPTED"], report["secret"]["configuredBits"]),
                         (0, 0, None))
        code, out, _ = run_attack("--config", other.config, "--url", self.url, "--user", "test",
                                  "--password", "test", guesses=FEW_GUESSES)
        self.assertIn("  skipped  expired token replayed\n", out)
        self.assertIn("needs the server's key: run attack beside the server, with its config", out)

    def test_from_a_token_the_refresh_token_attack_is_skipped_and_nothing_is_logged_out(self):
        token = json.loads(exchange(self.server, "POST", "/users/authenticate",
                                    login_body())[2])["token"]
        code, report = self.attack_json("--config", self.files.config, "--url", self.url,
                                        "--token", token, guesses=FEW_GUESSES)
        self.assertEqual(code, 0)
        [skipped] = [result for result in report["attacks"] if result["verdict"] == "skipped"]
        self.assertEqual(skipped["needs"], "refresh token")
        self.assertEqual(exchange(self.server, "GET", "/users/getInfo",
                                  headers=bearer(token))[0], 200)

    def test_a_server_that_takes_alg_none_is_reported_vulnerable_in_red_exit_1(self):
        stand_in = VulnerableServer(self, SECRET, flaw="none")
        code, report = self.attack_json("--config", self.files.config, "--url", stand_in.url,
                                        "--user", "test", "--password", "test",
                                        guesses=FEW_GUESSES)
        self.assertEqual(code, 1)
        accepted = [result["name"] for result in report["attacks"]
                    if result["verdict"] == "ACCEPTED"]
        self.assertEqual(accepted, [f'alg "{alg}", {kind}' for alg in ("none", "None", "NONE")
                                    for kind in ("no signature", "signature kept")]
                         + ['alg "none" in JSON escapes', 'alg twice: "HS256", then "none"'])
        self.assertFalse(report["ok"])
        code, out, _ = run_attack("--config", self.files.config, "--url", stand_in.url,
                                  "--user", "test", "--password", "test", guesses=FEW_GUESSES,
                                  stdout=Terminal())
        self.assertEqual(code, 1)
        self.assertIn('\033[31mACCEPTED\033[0m alg "none", no signature\n', out)
        self.assertIn("\n           \033[31m200 OK: the server accepted a forged token: it is "
                      "vulnerable", out)
        self.assertIn("\033[31mVerdict: VULNERABLE (see above).\033[0m", out)
        self.assertIn("  \033[32mrefused \033[0m signature removed\n", out)
        with mock.patch.dict(os.environ, {"NO_COLOR": "1"}):
            code, out, _ = run_attack("--config", self.files.config, "--url", stand_in.url,
                                      "--user", "test", "--password", "test",
                                      guesses=FEW_GUESSES, stdout=Terminal())
        self.assertEqual(code, 1)
        self.assertNotIn("\033[", out)

    def test_a_server_signing_with_secret_is_caught_online_and_offline_and_never_shown(self):
        stand_in = VulnerableServer(self, "secret")
        code, report = self.attack_json("--config", self.files.config, "--url", stand_in.url,
                                        "--user", "test", "--password", "test",
                                        guesses=FEW_GUESSES)
        self.assertEqual(code, 1)
        # Accepted, that attack's name, its place among the six or its token would say the
        # key: the six are folded into one row, without a token.
        hidden = "signed with a key from the wordlist (which one is not shown)"
        self.assertEqual([(result["name"], result["token"]) for result in report["attacks"]
                          if result["verdict"] == "ACCEPTED"], [(hidden, None)])
        self.assertEqual(len(report["attacks"]), len(authserver.ATTACKS) - 5)
        self.assertNotIn('"secret"', json.dumps(report["attacks"]))
        self.assertTrue(report["secret"]["found"])
        # A key the online attacks do not try, found offline, and shown nowhere.
        stand_in = VulnerableServer(self, "Jwt_secret42")
        code, out, _ = run_attack("--config", self.files.config, "--url", stand_in.url,
                                  "--user", "test", "--password", "test")
        self.assertEqual(code, 1)
        self.assertIn("The server's secret was found in the wordlist: change it. (It is not "
                      "shown here.)", out)
        self.assertNotIn("Jwt_secret42", out)
        code, report = self.attack_json("--config", self.files.config, "--url", stand_in.url,
                                        "--user", "test", "--password", "test",
                                        guesses=["x", "Jwt_secret42"])
        self.assertNotIn("Jwt_secret42", json.dumps(report))
        self.assertEqual((code, report["secret"]["found"], report["counts"]["ACCEPTED"]),
                         (1, True, 0))

    def test_the_readmes_stand_in_signs_with_secret_and_takes_alg_none(self):
        stand_in = VulnerableServer(self, "secret", flaw="none")
        code, report = self.attack_json("--config", self.files.config, "--url", stand_in.url,
                                        "--user", "test", "--password", "test",
                                        guesses=FEW_GUESSES)
        self.assertEqual((code, report["counts"]),
                         (1, {"refused": 16, "ACCEPTED": 9, "unclear": 0, "skipped": 7}))
        self.assertTrue(report["secret"]["found"])

    def test_every_request_goes_to_the_url_given_and_headers_name_loopback_only(self):
        stand_in = VulnerableServer(self, SECRET)
        code, _ = self.attack_json("--config", self.files.config, "--url", stand_in.url,
                                   "--user", "test", "--password", "test", guesses=FEW_GUESSES)
        self.assertEqual(code, 0)
        self.assertEqual([request[:2] for request in stand_in.requests],
                         [("POST", "/users/authenticate")]
                         + [("GET", "/users/getInfo")] * len(authserver.ATTACKS))
        forgery = authserver.Genuine(token_for(), SECRET.encode(), "R" * 43)
        for attack in authserver.ATTACKS:
            header = authserver.header_text(authserver.forged(attack, forgery)) or "{}"
            for name in ("jku", "x5u"):
                value = json.loads(header).get(name) if header.startswith("{") else None
                if value:
                    self.assertIn(urllib.parse.urlsplit(value).hostname, ("127.0.0.1", "::1"))

    def test_no_redirect_is_followed_and_no_proxy_used(self):
        elsewhere = socket.socket()                 # what a redirect or a proxy would reach
        elsewhere.bind(("127.0.0.1", 0))
        elsewhere.listen(8)
        elsewhere.setblocking(False)
        self.addCleanup(elsewhere.close)
        other = f"http://127.0.0.1:{elsewhere.getsockname()[1]}"

        class Redirect(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(302)
                self.send_header("Location", f"{other}/users/getInfo")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass
        redirecting = serve_in_background(
            self, http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect))
        proxies = {name: other for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY")}
        with mock.patch.dict(os.environ, proxies):
            code, out, err = run_attack("--config", self.files.config, "--url",
                                        redirecting.url,
                                        "--token", token_for(), guesses=FEW_GUESSES)
        self.assertEqual((code, out, err), (2, "", "authserver: the genuine token itself is "
                                                   "refused: 302 Found\n"))
        with self.assertRaises(BlockingIOError):
            elsewhere.accept()

    def test_a_session_that_cannot_be_logged_out_is_said_to_be_live(self):
        stand_in = VulnerableServer(self, SECRET, flaw="logout")
        code, out, err = run_attack("--config", self.files.config, "--url", stand_in.url,
                                    "--user", "test", "--password", "test", guesses=FEW_GUESSES)
        self.assertEqual(code, 0)
        self.assertEqual(err, "authserver: the attack's session was not logged out (500 the "
                              "database is down): its tokens are live until they expire\n")
        self.assertEqual(stand_in.requests[-1][:2], ("POST", "/users/logout"))
        self.assertIn("Verdict: every attack was refused", out)

    def test_what_cannot_be_done_is_one_line_and_exit_2(self):
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        closed.close()
        cases = [
            (("--url", f"http://127.0.0.1:{port}", "--token", token_for()),
             f"authserver: http://127.0.0.1:{port}: [Errno"),
            (("--url", self.url), "authserver: attack needs a genuine token to forge from:"),
            (("--url", self.url, "--user", "test", "--password", "wrong"),
             f"authserver: logging in as 'test' at {self.url}: 400 "),
            (("--url", self.url, "--token", token_for(lifetime=-10)),
             "authserver: the genuine token itself is refused: 401 jwt expired"),
            (("--url", self.url, "--token", "not-a-token"),
             "authserver: the genuine token is not a JWT"),
            (("--url", "ftp://127.0.0.1/", "--token", "x"), "authserver: --url 'ftp://127.0.0.1/'"),
            (("--url", "http://127.0.0.1:99999", "--token", "x"),
             "authserver: --url 'http://127.0.0.1:99999'"),
            (("--url", "http://[::1:4000", "--token", "x"), "authserver: --url 'http://[::1:4000'"),
            (("--url", "http://user:pw@127.0.0.1:4000", "--token", "x"), "authserver: --url "),
            (("--url", self.url + "/?x=1", "--token", "x"), "authserver: --url "),
        ]
        for args, first_line in cases:
            with self.subTest(args=args):
                code, out, err = run_attack("--config", self.files.config, *args,
                                            guesses=FEW_GUESSES)
                self.assertEqual((code, out), (2, ""))
                self.assertTrue(err.startswith(first_line), err)
                self.assertEqual(err.count("\n"), 1, err)

    def test_https_with_the_servers_certificate(self):
        files = Files(self, passwordIterations=FAST_ITERATIONS)
        (files.folder / "cert.pem").write_text(TestTLS.CERT)
        (files.folder / "key.pem").write_text(TestTLS.KEY)
        context = authserver.make_tls_context(files.folder / "cert.pem", files.folder / "key.pem")
        server = start_server(self, files, tls_context=context)
        url = f"https://127.0.0.1:{server.server_address[1]}"
        code, report = self.attack_json("--config", files.config, "--url", url, "--tls-cert",
                                        files.folder / "cert.pem", "--user", "test",
                                        "--password", "test", guesses=FEW_GUESSES)
        self.assertEqual((code, report["counts"]["refused"]), (0, len(authserver.ATTACKS)))
        code, out, err = run_attack("--config", files.config, "--url", url, "--token",
                                    token_for(), guesses=FEW_GUESSES)
        self.assertEqual(code, 2)
        self.assertIn("to trust a self-signed certificate, give it: --tls-cert cert.pem", err)

    def test_the_default_url_is_the_configs_server(self):
        files = Files(self, port=self.server.server_address[1], host="0.0.0.0")
        code, report = self.attack_json("--config", files.config, "--token", token_for(),
                                        guesses=FEW_GUESSES)
        self.assertEqual((code, report["url"]), (0, self.url))

    def test_as_a_command_the_exit_code_says_vulnerable(self):
        stand_in = VulnerableServer(self, SECRET, flaw="none")
        result = run_cli("attack", "--config", self.files.config, "--url", stand_in.url,
                         "--token", token_for(), "--json")
        self.assertEqual((result.returncode, result.stderr), (1, ""))
        self.assertFalse(json.loads(result.stdout)["ok"])


# ---------------------------------------------------------------------------
# The page's "Attack it" panel (issue 12): GET /attacks, each forgery sent to getInfo
# ---------------------------------------------------------------------------

class TestLabPageServed(unittest.TestCase):
    """The panel as served: its ids, and no word of the attack list written into the page."""

    @classmethod
    def setUpClass(cls):
        server = start_server(ClassScope(cls))
        client = Client(server)
        cls.status, _, body = client.request("GET", "/")
        client.close()
        cls.html = body.decode("utf-8")
        cls.script = page_scripts(cls.html)

    def test_the_panels_ids_are_there_once(self):
        self.assertEqual(self.status, 200)
        for element_id in ("attackBtn", "attackResult", "attackTable", "attackRows",
                           "attackChecks"):
            self.assertEqual(len(re.findall(rf"""id=['"]{element_id}['"]""", self.html)), 1,
                             element_id)
        self.assertRegex(self.html, r'<table id="attackTable" [^>]*hidden>')
        self.assertIn("$('attackBtn').onclick = attackIt", self.script)

    def test_names_tries_checks_and_references_come_only_from_the_server(self):
        for attack in authserver.ATTACKS:
            for text in (attack.name, attack.tries, attack.reference):
                self.assertNotIn(text, self.html)
        for check, guarantee in authserver.CHECKS.items():
            self.assertNotIn(check, self.html)
            self.assertNotIn(guarantee, self.html)

    def test_what_a_server_sends_is_written_as_text_never_as_html(self):
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
            self.assertNotIn(sink, self.script)


class AttackStub(TutorialStub):
    """A vulnerable stand-in: a login answers a token and no refresh token, GET /attacks
    the forgeries it is given (404 for None), and getInfo takes a token whose header says
    alg none; any other, 401 invalid signature. release holds GET /attacks while clear."""

    def __init__(self, test, attacks=None):
        super().__init__(test)
        self.RequestHandlerClass = AttackStubHandler      # no request has come yet
        self.attacks, self.paths, self.issued = attacks, [], []
        self.release = threading.Event()
        self.release.set()
        test.addCleanup(self.release.set)                 # runs before the stub stops

    def pair(self):
        self.issued.append(token_for())
        return {"token": self.issued[-1], "expiresIn": 3600}


class AttackStubHandler(LifecycleStubHandler):

    def do_GET(self):
        stub = self.server
        stub.paths.append(self.path)
        stub.bearer.append(self.headers.get("Authorization", "").partition(" ")[2])
        if self.path == "/attacks" and stub.release.wait(30) and stub.attacks is None:
            self.answer(404, {"error": True, "message": "Not found"})
        elif self.path == "/attacks":
            self.answer(200, {"target": "GET /users/getInfo", "checks": authserver.CHECKS,
                              "messages": authserver.MESSAGE_CHECKS, "attacks": stub.attacks})
        elif json.loads(authserver.header_text(stub.bearer[-1]) or "{}").get("alg") == "none":
            self.answer(200, {"id": 81623, "username": "admin"})
        else:
            self.answer(401, {"error": True, "name": "JsonWebTokenError",
                              "message": "invalid signature"})


# Each row of the panel, as the reader sees it.
ATTACK_ROWS = """[...document.querySelectorAll('#attackRows tr')].map(row => {
  const lines = [...row.cells].map(cell => [...cell.children].map(line => line.textContent))
  return {name: lines[0][0], tries: lines[0][1], header: lines[1][0], token: lines[1][1],
          answer: lines[2] && lines[2][0], verdict: lines[3] && lines[3][0],
          reference: lines[3] && lines[3][1], explanation: row.cells[3] && row.cells[3].title,
          red: !!(row.cells[3] && row.cells[3].querySelector('.bad')), focusable: row.tabIndex === 0}
})"""
SHOWN_EXCHANGE = ("['httpRequest', 'httpStatus', 'output']"
                  ".map(id => document.getElementById(id).textContent)")
NO_SIDEWAYS_SCROLL = ("document.documentElement.scrollWidth === "
                      "document.documentElement.clientWidth")
HOSTILE_HEADER = '{"alg":"<img src=x onerror=\\"document.title=\'pwned\'\\">","typ":"JWT"}'


@unittest.skipUnless(BROWSER and os.name == "posix", BROWSER_REASON)
class TestLabPageAttackIt(unittest.TestCase):
    """Attack it in headless Chromium: against the server that served the page, against it
    from disk (?api=), and against a vulnerable stand-in."""

    @classmethod
    def setUpClass(cls):
        scope = ClassScope(cls)
        cls.server = start_server(scope, Files(scope))
        cls.browser = shared_browser()
        cls.url = f"http://127.0.0.1:{cls.server.server_address[1]}/"
        genuine = authserver.Genuine(token_for(), SECRET)
        named = {attack.name: attack for attack in authserver.ATTACKS}
        none, removed, refresh, tokenless = (named[name] for name in (
            'alg "none", no signature', "signature removed", "refresh token as an access token",
            "plain base64"))
        hostile = authserver.unsigned(HOSTILE_HEADER)(genuine)
        cls.stub_attacks = [authserver.attack_fields(none, none.forge(genuine)),
                            authserver.attack_fields(removed, removed.forge(genuine)),
                            {"name": "<b>bold</b>", "tries": "<i>markup</i>", "check":
                             "read_header", "message": "invalid algorithm", "reference": "<u>",
                             "needs": None, "token": hostile, "header": HOSTILE_HEADER},
                            authserver.attack_fields(refresh, None),
                            authserver.attack_fields(tokenless, None)]
        cls.stub = AttackStub(scope, cls.stub_attacks)
        disk = (HERE / "test.html").as_uri() + "?api="
        # Three runs at once, in one browser: served (on a phone), from disk, the stand-in.
        cls.tabs = {"served": cls.browser.open(cls.url, 390, 844),
                    "disk": cls.browser.open(disk + cls.url.rstrip("/")),
                    "vulnerable": cls.browser.open(disk + cls.stub.url)}
        for name, tab in cls.tabs.items():
            cls.start_login(tab)
        for tab in cls.tabs.values():
            tab.result()
        cls.tabs["vulnerable"].click("tamperBtn")   # the box edited: the issued token is sent
        for tab in cls.tabs.values():
            tab.click("attackBtn")
        cls.summary = {name: cls.finished(tab) for name, tab in cls.tabs.items()}
        cls.rows = {name: tab.evaluate(ATTACK_ROWS) for name, tab in cls.tabs.items()}

    @staticmethod
    def start_login(tab, username="test", password="test"):
        tab.wait_for("document.readyState === 'complete'")
        tab.evaluate(f"document.getElementById('id_username').value = {json.dumps(username)};"
                     f"document.getElementById('id_password').value = {json.dumps(password)};"
                     "document.getElementById('btn').click()")

    @staticmethod
    def finished(tab):
        """The panel's line once every attack has had its answer."""
        return tab.wait_for("(line => / attacks: /.test(line.textContent) && "
                            "[line.textContent, line.className])"
                            "(document.getElementById('attackResult'))")

    def assert_all_refused_where_they_say(self, name):
        rows = self.rows[name]
        self.assertEqual(self.summary[name], [f"{len(authserver.ATTACKS)} attacks: "
                                              f"{len(authserver.ATTACKS)} refused", "ok"])
        self.assertEqual(len(rows), len(authserver.ATTACKS))
        for attack, row in zip(authserver.ATTACKS, rows):
            with self.subTest(name=name, attack=attack.name):
                self.assertEqual((row["name"], row["tries"]), (attack.name, attack.tries))
                self.assertEqual(row["answer"], "401 Unauthorized: " + attack.message)
                self.assertEqual((row["verdict"], row["reference"], row["explanation"]),
                                 ("refused by " + attack.check, attack.reference,
                                  authserver.CHECKS[attack.check]))
                self.assertFalse(row["red"])
                self.assertTrue(row["focusable"])

    def test_served_every_attack_is_refused_by_the_check_it_names(self):
        self.assert_all_refused_where_they_say("served")
        legend = self.tabs["served"].evaluate(
            "document.getElementById('attackChecks').textContent")
        for check, guarantee in authserver.CHECKS.items():
            self.assertIn(f"{check}: {guarantee}", legend)

    def test_from_disk_the_attacks_go_to_the_server_named_in_api(self):
        self.assert_all_refused_where_they_say("disk")
        self.assertTrue(self.tabs["disk"].evaluate(NO_SIDEWAYS_SCROLL))

    def test_rows_show_each_header_decoded_and_long_tokens_cut_even_on_a_phone(self):
        tab = self.tabs["served"]
        for attack, row in zip(authserver.ATTACKS, self.rows["served"]):
            with self.subTest(attack.name):
                self.assertLess(len(row["token"]), 70)
                if attack.needs != "refresh token":
                    self.assertIsNotNone(re.fullmatch(r"eyJ[\w=+/-]{29}… \((\d+) characters\)",
                                                      row["token"]), row["token"])
                    self.assertIn('"alg"', row["header"])
        oversized = self.rows["served"][2]
        self.assertGreater(int(re.search(r"\((\d+) characters", oversized["token"])[1]), 11000)
        self.assertTrue(tab.evaluate(NO_SIDEWAYS_SCROLL))
        self.assertEqual(tab.evaluate("document.documentElement.clientWidth"), 390)

    def test_a_click_or_a_key_on_a_row_shows_its_exchange_with_the_whole_token(self):
        tab = self.tabs["served"]
        rows = self.rows["served"]
        pick = "document.querySelectorAll('#attackRows tr')[%d]"
        for index, how in ((2, "click"), (5, "Enter"), (30, " ")):
            with self.subTest(how):
                if how == "click":
                    tab.evaluate(pick % index + ".click()")
                else:
                    tab.evaluate(pick % index + ".focus()")
                    for kind in ("keyDown", "keyUp"):
                        tab.call("Input.dispatchKeyEvent", type=kind, key=how,
                                 code="Enter" if how == "Enter" else "Space",
                                 windowsVirtualKeyCode=13 if how == "Enter" else 32)
                request, status, body = tab.evaluate(SHOWN_EXCHANGE)
                first, *headers = request.splitlines()
                self.assertEqual(first, f"GET {self.url}users/getInfo")
                token = headers[-1].partition("Authorization: Bearer ")[2]
                shown = re.fullmatch(r"(.*)… \((\d+) characters\)", rows[index]["token"])
                self.assertEqual((token[:len(shown[1])], len(token)),
                                 (shown[1], int(shown[2])))
                self.assertEqual(authserver.header_text(token), rows[index]["header"])
                self.assertEqual(status, "401 Unauthorized")
                self.assertEqual(json.loads(body)["message"],
                                 authserver.ATTACKS[index].message)
                self.assertEqual(tab.evaluate("document.querySelector('#attackRows tr.shown')"
                                              ".rowIndex"), index + 1)   # the head is row 0

    def test_the_refresh_token_row_sends_the_pages_own_and_shows_it_cut(self):
        tab = self.tabs["served"]
        index = [attack.needs for attack in authserver.ATTACKS].index("refresh token")
        refresh_token = tab.evaluate("refreshToken")
        cut = f"{refresh_token[:8]}…{refresh_token[-4:]} (kept in memory only)"
        self.assertEqual(self.rows["served"][index]["token"], cut)
        tab.evaluate(f"document.querySelectorAll('#attackRows tr')[{index}].click()")
        request, status, body = tab.evaluate(SHOWN_EXCHANGE)
        self.assertEqual(request.splitlines()[-1], "Authorization: Bearer " + cut)
        self.assertEqual((status, json.loads(body)["message"]), ("401 Unauthorized",
                                                                  "jwt malformed"))
        self.assertNotIn(refresh_token, tab.evaluate("document.body.textContent"))

    def test_a_vulnerable_server_gets_accepted_in_red_and_markup_stays_text(self):
        tab = self.tabs["vulnerable"]
        accepted, removed, hostile, refresh, tokenless = self.rows["vulnerable"]
        self.assertEqual(self.summary["vulnerable"],
                         ["5 attacks: 2 refused, 1 ACCEPTED, 2 skipped. ACCEPTED: this server "
                          "took a forged token, it is vulnerable.", "bad"])
        self.assertEqual((accepted["answer"], accepted["verdict"], accepted["red"]),
                         ("200 OK", "ACCEPTED", True))
        # Not the message the attack expects: the step is the one the message names.
        self.assertEqual((removed["answer"], removed["verdict"]),
                         ("401 Unauthorized: invalid signature", "refused by check_signature"))
        self.assertEqual((hostile["name"], hostile["tries"], hostile["header"],
                          hostile["reference"]),
                         ("<b>bold</b>", "<i>markup</i>", HOSTILE_HEADER, "<u>"))
        self.assertEqual(tab.evaluate("document.querySelectorAll('#attackTable b, "
                                      "#attackTable i, #attackTable u, img').length"), 0)
        self.assertNotEqual(tab.evaluate("document.title"), "pwned")
        self.assertEqual((refresh["answer"], refresh["verdict"], refresh["focusable"]),
                         ("not sent", "skipped: needs a refresh token, and the page has none",
                          False))
        self.assertEqual((tokenless["token"], tokenless["verdict"]), ("(none)", "skipped: the server "
                         "sent no token for it (yours left it nothing to change)"))
        # GET /attacks with the token the login gave (not the tampered one in the box), then
        # the three forgeries, one at a time, in the order served.
        self.assertEqual(self.stub.paths, ["/attacks"] + ["/users/getInfo"] * 3)
        self.assertEqual(self.stub.bearer, self.stub.issued +
                         [attack["token"] for attack in self.stub_attacks[:3]])
        tab.evaluate("document.querySelectorAll('#attackRows tr')[0].click()")
        request, status, body = tab.evaluate(SHOWN_EXCHANGE)
        self.assertEqual(request.splitlines()[-1],
                         "Authorization: Bearer " + self.stub_attacks[0]["token"])
        self.assertEqual((status, json.loads(body)), ("200 OK", {"id": 81623,
                                                                 "username": "admin"}))

    def test_before_login_attack_it_sends_nothing_and_says_to_log_in(self):
        stub = AttackStub(self, self.stub_attacks)
        tab = self.browser.open((HERE / "test.html").as_uri() + "?api=" + stub.url)
        tab.wait_for("document.readyState === 'complete'")
        tab.evaluate("document.getElementById('tokenBox').value = %s" % json.dumps(token_for()))
        tab.click("attackBtn")
        self.assertEqual(tab.evaluate("document.getElementById('attackResult').textContent"),
                         "Log in first: the attacks are forged from the token the server "
                         "issues at login.")
        self.assertTrue(tab.evaluate("document.getElementById('attackTable').hidden"))
        tab.click("infoBtn")                 # a request after it: the stub saw only that one
        tab.result()
        self.assertEqual(stub.paths, ["/users/getInfo"])

    def test_an_old_server_or_none_at_all_is_said_beside_the_button(self):
        stub = AttackStub(self)              # no /attacks: 404, as an old server answers
        stub.release.clear()
        tab = self.browser.open((HERE / "test.html").as_uri() + "?api=" + stub.url)
        self.start_login(tab)
        tab.result()
        tab.click("attackBtn")
        # Held: the button is disabled until the answer is in.
        tab.wait_for("document.getElementById('attackBtn').disabled")
        stub.release.set()
        tab.wait_for("!document.getElementById('attackBtn').disabled")
        line = "document.getElementById('attackResult').textContent"
        self.assertEqual(tab.evaluate(line), "GET /attacks: 404 Not Found: Not found "
                                             "(an older server without this route?)")
        self.assertTrue(tab.evaluate("document.getElementById('attackTable').hidden"))
        stub.shutdown()
        stub.server_close()
        tab.click("attackBtn")
        self.assertTrue(tab.wait_for(f"/no answer/.test({line}) && {line}").startswith(
            "GET /attacks: no answer: the server is down"))

    def test_the_pages_verdict_is_authservers(self):
        tab = self.tabs["disk"]
        attack = authserver.ATTACKS[0]
        cases = [(status, message) for status in (200, 204, 302, 400, 401, 403, 404, 429, 500)
                 for message in (attack.message, "invalid signature", "no such thing", "")]
        found = tab.evaluate("%s.map(([status, message]) => attackVerdict(%s, status, message, "
                             "new Map(Object.entries(%s))))"
                             % (json.dumps(cases), json.dumps(authserver.attack_fields(attack, None)),
                                json.dumps(authserver.MESSAGE_CHECKS)))
        self.assertEqual(found, [list(authserver.verdict(attack, status, message))
                                 for status, message in cases])


class HostileHandler(http.server.BaseHTTPRequestHandler):
    """A server under attack that answers badly in the way its mode says (see HostileServer)."""

    protocol_version = "HTTP/1.1"

    def answer(self, status, data, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.server.paths.append(self.path)
        if self.path == "/users/logout":
            self.answer(204, b"")
        else:
            self.answer(200, json.dumps({"token": self.server.genuine,
                                         "refreshToken": self.server.refresh_token}).encode())

    def do_GET(self):
        token = self.headers.get("Authorization", "").partition(" ")[2]
        self.server.paths.append(self.path)
        if token == self.server.genuine and self.server.mode != "refuse_all":
            return self.answer(200, b'{"id": 81623, "username": "test"}')
        self.server.forgeries += 1
        getattr(self, f"forgery_{self.server.mode}")(token)

    def forgery_refuse_all(self, token):        # the genuine token too
        self.answer(401, b'{"message": "jwt expired"}')

    def forgery_list_message(self, token):      # a message that is not text
        self.answer(401, b'{"message": [1, {"a": 2}]}')

    def forgery_deep(self, token):              # JSON nested past Python's recursion limit
        self.answer(401, b"[" * 60000)

    def forgery_escapes(self, token):           # a message that would drive the terminal
        self.answer(401, json.dumps({"message": "\x1b]0;PWNED\x07\x1b[2Jall refused"}).encode())

    def forgery_reset_big(self, token):         # a proxy that cuts a connection it dislikes
        if len(token) > authserver.MAX_TOKEN_BYTES:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
        else:
            self.answer(401, b'{"message": "invalid signature"}')

    def forgery_silent(self, token):            # a server that stops answering
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)

    def forgery_trickle(self, token):           # the first answer, a byte at a time, never whole
        if self.server.forgeries > 1:
            return self.answer(401, b'{"message": "invalid signature"}')
        self.send_response(401)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        with contextlib.suppress(OSError):
            while not self.server.stopping.wait(0.05):
                self.wfile.write(b" ")
                self.wfile.flush()

    def log_message(self, *args):
        pass


class HostileServer(http.server.ThreadingHTTPServer):
    """Logs in with a genuine token (and refresh_token), then answers forgeries by mode."""

    daemon_threads = True

    def __init__(self, test, mode, refresh_token="R" * 43):
        super().__init__(("127.0.0.1", 0), HostileHandler)
        self.mode, self.refresh_token, self.genuine = mode, refresh_token, token_for()
        self.paths, self.forgeries, self.stopping = [], 0, threading.Event()
        serve_in_background(test, self)
        test.addCleanup(self.stopping.set)


class TestAttackHostileServers(unittest.TestCase):
    """What the server under attack answers is hostile input: never a traceback, a hang or
    an escape sequence on the terminal, and the report is made whatever one answer was."""

    def setUp(self):
        self.files = Files(self)

    def attack(self, server, *args):
        return run_attack("--config", self.files.config, "--url", server.url, "--user", "test",
                          "--password", "test", *args, guesses=FEW_GUESSES)

    def assert_no_escapes(self, *texts):
        for text in texts:
            self.assertNotIn("\x1b", text)
            self.assertNotIn("\x07", text)

    def test_odd_messages_are_shown_as_text_and_judged_refused(self):
        for mode, shown in (("list_message", '401 [1, {"a": 2}]: refused'),
                            ("deep", "401 " + "[" * 40), ("escapes", "401 \\x1b]0;PWNED")):
            with self.subTest(mode):
                server = HostileServer(self, mode)
                code, out, err = self.attack(server)
                self.assertEqual((code, err), (0, ""))
                self.assertIn(shown, out)
                self.assert_no_escapes(out)
                self.assertEqual(server.paths[-1], "/users/logout")

    def test_a_login_answer_with_an_unsendable_refresh_token_is_not_one(self):
        for refresh_token in ("abc\r\nX-Injected: 1", "\x1b]0;PWNED\x07", "caf\u00e9"):
            with self.subTest(refresh_token=refresh_token):
                server = HostileServer(self, "list_message", refresh_token)
                code, report = (lambda c, o, e: (c, json.loads(o)))(*self.attack(server, "--json"))
                self.assertEqual(code, 0)
                [skipped] = [result for result in report["attacks"]
                             if result["verdict"] == "skipped" and result["needs"]]
                self.assertEqual(skipped["needs"], "refresh token")
                self.assertNotIn("/users/logout", server.paths)
                code, out, err = self.attack(server)
                self.assert_no_escapes(out, err)

    def test_a_connection_cut_on_one_forgery_is_unclear_and_the_rest_still_run(self):
        server = HostileServer(self, "reset_big")
        code, out, err = self.attack(server)
        self.assertEqual((code, err), (1, ""))
        self.assertIn("  unclear  oversized token\n", out)
        self.assertIn("           no answer: ", out)
        self.assertEqual(server.forgeries, len(authserver.ATTACKS))
        self.assertIn("\nVerdict: inconclusive: 1 answers were neither a refusal nor an "
                      "acceptance (see above).\n", out)
        self.assertEqual(server.paths[-1], "/users/logout")

    def test_a_server_that_stops_answering_is_not_sent_the_rest(self):
        server = HostileServer(self, "silent")
        code, report = (lambda c, o, e: (c, json.loads(o)))(*self.attack(server, "--json"))
        self.assertEqual((code, server.forgeries), (1, authserver.MAX_UNANSWERED))
        answers = [result["answer"] for result in report["attacks"]]
        self.assertTrue(all(answer.startswith("no answer: ")
                            for answer in answers[:authserver.MAX_UNANSWERED]), answers)
        self.assertEqual(set(answers[authserver.MAX_UNANSWERED:]),
                         {"not sent: the server stopped answering"})
        self.assertEqual(report["counts"]["unclear"], len(authserver.ATTACKS))
        self.assertEqual(server.paths[-1], "/users/logout")

    def test_a_run_that_stops_halfway_still_logs_its_session_out(self):
        server = HostileServer(self, "refuse_all")
        code, out, err = self.attack(server)
        self.assertEqual((code, out), (2, ""))
        self.assertEqual(err, "authserver: the genuine token itself is refused: 401 jwt expired\n")
        self.assertEqual(server.paths, ["/users/authenticate", "/users/getInfo", "/users/logout"])

    def test_the_refresh_token_is_shown_in_part_only(self):
        server = HostileServer(self, "list_message", refresh_token="Rr" * 21 + "X")
        code, report = (lambda c, o, e: (c, json.loads(o)))(*self.attack(server, "--json"))
        [row] = [result for result in report["attacks"] if result["needs"] == "refresh token"]
        self.assertEqual(row["token"], "RrRrRrRr...rRrX (the refresh token, not shown whole)")
        code, out, err = self.attack(server)
        self.assertNotIn("Rr" * 21 + "X", out + err)

    def test_an_answer_that_trickles_is_cut_off_at_the_deadline(self):
        self.assertEqual(authserver.ANSWER_DEADLINE, 30)         # as the README says
        server = HostileServer(self, "trickle")
        with mock.patch.object(authserver, "ANSWER_DEADLINE", 0.5):
            code, report = (lambda c, o, e: (c, json.loads(o)))(*self.attack(server, "--json"))
        self.assertEqual(code, 1)
        first = report["attacks"][0]
        self.assertEqual((first["verdict"], first["answer"]),
                         ("unclear", "no answer: no whole answer within 0.5 s"))
        self.assertEqual(report["counts"]["refused"], len(authserver.ATTACKS) - 1)


class TestAttackLeeway(unittest.TestCase):
    """The forgeries signed with the server's key outrun its leeway, and never a token's exp."""

    def test_with_a_long_leeway_every_forgery_is_still_refused_and_none_outlives_the_token(self):
        files = Files(self, leeway=120, passwordIterations=FAST_ITERATIONS)
        server = start_server(self, files)
        genuine = token_for(lifetime=-100)      # past its exp, still within the leeway
        status, _, body = exchange(server, "GET", "/attacks", headers=bearer(genuine))
        self.assertEqual(status, 200, body)
        attacks = {attack["name"]: attack for attack in json.loads(body)["attacks"]}
        genuine_exp = decode_token(genuine, SECRET, leeway=120)["exp"]
        for name, message in (("expired token replayed", "jwt expired"),
                              ("nbf in the future", "jwt not active")):
            with self.subTest(name):
                token = attacks[name]["token"]
                self.assertLessEqual(json.loads(b64url_decode(token.split(".")[1]))["exp"],
                                     genuine_exp)
                status, _, answer = exchange(server, "GET", "/users/getInfo",
                                             headers=bearer(token))
                self.assertEqual((status, json.loads(answer)["message"]), (401, message))
        url = f"http://127.0.0.1:{server.server_address[1]}"
        code, out, err = run_attack("--config", files.config, "--url", url, "--user", "test",
                                    "--password", "test", "--json", guesses=FEW_GUESSES)
        self.assertEqual((code, json.loads(out)["counts"]["refused"]),
                         (0, len(authserver.ATTACKS)))


class TestAttackSecretsAndArguments(unittest.TestCase):

    def test_a_secret_from_the_wordlist_refuses_to_start_and_says_so_without_showing_it(self):
        for secret in ("nodejs-jwt-auth-server-private-key", "Nodejs-jwt-auth-server-private-key7",
                       "correct horse battery staple, 32B+",
                       "A-STRING-SECRET-AT-LEAST-256-BITS-LONG999"):
            with self.subTest(secret=secret):
                files = Files(self, secret=secret)
                code, out, err = main_in_process("--config", files.config, "token", "test")
                self.assertEqual((code, out), (2, ""))
                self.assertIn("is a key copied from tutorials and examples", err)
                self.assertIn("Make one with: python -c", err)
                self.assertNotIn(secret, err)
        self.assertEqual(authserver.checked_secret(SECRET, "x"), SECRET.encode())
        # in_wordlist agrees with the list the attack tries, without making it.
        guesses = set(authserver.wordlist_guesses())
        for text in ("secret", "Secret0", "SECRET999", "secret1000", "secret01", "secret-1",
                     "Jwt_secret42", "jwt_secret42 ", "keyboard cat7"):
            self.assertEqual(authserver.in_wordlist(text), text in guesses, text)

    def test_host_and_port_before_the_command_name_the_server_and_a_pasted_header_is_taken(self):
        files = Files(self, passwordIterations=FAST_ITERATIONS)
        server = start_server(self, files)
        port = server.server_address[1]
        with mock.patch.object(authserver, "wordlist_guesses", lambda: iter(FEW_GUESSES)):
            code, out, err = main_in_process("--host", "127.0.0.1", "--port", port, "attack",
                                             "--config", files.config, "--token",
                                             f"Bearer {token_for()}", "--json")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(json.loads(out)["url"], f"http://127.0.0.1:{port}")


class HugeAnswerHandler(AttackStubHandler):
    """AttackStub's, but what it accepts it answers with a megabyte: one long "word"."""

    def do_GET(self):
        if self.path == "/users/getInfo" and json.loads(authserver.header_text(
                self.headers.get("Authorization", "").partition(" ")[2]) or "{}").get("alg") == "none":
            self.server.paths.append(self.path)
            return self.answer(200, {"username": "eyJ" + "a" * 1_000_000})
        super().do_GET()


@unittest.skipUnless(BROWSER and os.name == "posix", BROWSER_REASON)
class TestLabPageHostileAnswers(unittest.TestCase):
    """A server's answers are hostile input to the page too: values of any type, tokens
    that cannot be sent, a megabyte of answer. The panel finishes, and says what it saw."""

    def test_odd_values_an_unsendable_token_and_a_huge_answer(self):
        genuine = authserver.Genuine(token_for(), SECRET)
        none = next(attack for attack in authserver.ATTACKS if attack.name == 'alg "none", no signature')
        odd = {"name": {"toString": 1}, "tries": 5, "check": {"toString": 1}, "message": [1],
               "reference": None, "needs": None, "token": "eyJ.abc\ndef", "header": {"a": 1}}
        stub = AttackStub(self, [odd, authserver.attack_fields(none, none.forge(genuine))])
        stub.RequestHandlerClass = HugeAnswerHandler
        tab = shared_browser().open((HERE / "test.html").as_uri() + "?api=" + stub.url)
        TestLabPageAttackIt.start_login(tab)
        tab.result()
        tab.click("attackBtn")
        self.assertEqual(TestLabPageAttackIt.finished(tab),
                         ["2 attacks: 1 ACCEPTED, 1 skipped. ACCEPTED: this server took a "
                          "forged token, it is vulnerable.", "bad"])
        odd_row, none_row = tab.evaluate(ATTACK_ROWS)
        self.assertEqual((odd_row["name"], odd_row["tries"], odd_row["header"]),
                         ('{"toString":1}', "5", '{"a":1}'))
        self.assertEqual(odd_row["verdict"], "skipped: this token cannot go in a header as it is")
        self.assertEqual(stub.paths, ["/attacks", "/users/getInfo"])
        tab.evaluate("document.querySelectorAll('#attackRows tr')[1].click()")
        shown = tab.wait_for("(text => text.endsWith('characters in all)') && text)"
                             "(document.getElementById('output').textContent)")
        self.assertLess(len(shown), 70000)
        whole = len(json.dumps({"username": "eyJ" + "a" * 1_000_000}))
        self.assertTrue(shown.endswith(f"… ({whole} characters in all)"), shown[-80:])


class TestAttackForgeries(unittest.TestCase):
    """Section 4's forgeries, as pure functions."""

    def test_the_time_forgeries_are_refused_whatever_the_leeway_and_never_outlive_the_token(self):
        now = 1_800_000_000
        for claims in ({"id": 1, "username": "a", "iat": now - 10, "exp": now + 3600},
                       {"id": 1, "username": "a", "iat": now - 0.5, "exp": now + 0.25},
                       {"id": 1, "username": "a", "exp": 10 ** 400},      # beyond a float
                       {"id": 1, "username": "a", "iat": float(now), "exp": now - 30}):
            genuine = authserver.Genuine(encode_token(claims, SECRET), SECRET.encode(), now=now)
            expired, not_yet = authserver.expired(genuine), authserver.not_yet_valid(genuine)
            for leeway in (0, 0.5, 61, 86400):
                with self.subTest(claims=claims, leeway=leeway):
                    with self.assertRaises(authserver.TokenExpiredError):
                        decode_token(expired, SECRET, now=now, leeway=leeway)
                    with self.assertRaises(authserver.NotBeforeError):
                        decode_token(not_yet, SECRET, now=now, leeway=leeway)
            for token in (expired, not_yet):
                forged_claims = json.loads(b64url_decode(token.split(".")[1]))
                self.assertLessEqual(forged_claims["exp"], claims["exp"])
                self.assertEqual(forged_claims.get("iat"), claims.get("iat"))

    def test_verdicts(self):
        [none] = [attack for attack in authserver.ATTACKS if attack.name == 'alg "none", no signature']
        for status, message, expected in (
                (200, None, ("ACCEPTED", None)), (204, "", ("ACCEPTED", None)),
                (401, "invalid algorithm", ("refused", "read_header")),
                (401, "invalid signature", ("refused", "check_signature")),
                (403, "No token provided.", ("refused", None)), (400, None, ("refused", None)),
                (429, "slow down", ("unclear", None)), (500, "oops", ("unclear", None)),
                (503, None, ("unclear", None)), (302, None, ("unclear", None))):
            with self.subTest(status=status, message=message):
                self.assertEqual(authserver.verdict(none, status, message), expected)

    def test_a_forgery_that_would_be_the_token_itself_is_not_made(self):
        rs256 = authserver.signed_with(SECRET, {"alg": "RS256", "typ": "JWT"},
                                       {"id": 1, "username": "a", "exp": 2 ** 40})
        genuine = authserver.Genuine(rs256)
        [kept] = [attack for attack in authserver.ATTACKS
                  if attack.name == 'alg "RS256", signature kept']
        self.assertIsNone(authserver.forged(kept, genuine))
        result = authserver.run_attack(kept, genuine, target=None)
        self.assertEqual((result["verdict"], result["skipped"]), ("skipped", "same"))

    def test_a_console_without_the_characters_gets_escapes_not_a_traceback(self):
        files = Files(self)
        result = subprocess.run([sys.executable, str(HERE / "authserver.py"), "--users",
                                 str(files.users), "explain", "--config", str(files.config),
                                 token_for(555, "café", username_extra="☃")],
                                capture_output=True, timeout=30,
                                env={**os.environ, "NO_COLOR": "1", "PYTHONIOENCODING": "ascii"})
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(b"caf\\xe9", result.stdout)
        self.assertNotIn(b"Traceback", result.stderr)
