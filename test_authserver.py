"""Tests for authserver.py: known answers, tables of bad tokens, and real HTTP.

Run: python -m unittest -v
Every server here is real, on 127.0.0.1 port 0, in a thread or a subprocess.
"""

import base64
import hashlib
import http
import http.client
import io
import json
import os
import shutil
import signal
import socket
import socketserver
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest
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


def read_response(sock):
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

    def test_shipped_users_hold_hashes_of_the_tutorial_passwords(self):
        users = json.loads((HERE / "users.json").read_text())
        self.assertEqual([user["username"] for user in users], ["test", "ncuser"])
        for user, password in zip(users, ("test", "ncpassword")):
            self.assertNotIn("password", user)
            self.assertTrue(user["passwordHash"].startswith("pbkdf2_sha256$600000$"))
            self.assertTrue(verify_password(password, user["passwordHash"]))

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

    def test_shipped_config_has_no_secret(self):
        config = json.loads((HERE / "config.json").read_text())
        self.assertEqual(config["secret"], "")
        self.assertEqual(config["port"], 4000)


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
        self.assertEqual(set(body), {"token", "expiresIn"})
        self.assertEqual(body["expiresIn"], 3600)
        claims = decode_token(body["token"], SECRET)
        self.assertEqual(set(claims), {"id", "username", "iat", "exp"})
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
        server = start_server(self, loginAttempts=3, loginWindow=60)
        client = Client(server)
        for name in ("a", "b", "c"):
            client.request("POST", "/users/authenticate", login_body(name, "x"))
        self.assertEqual(client.request("POST", "/users/authenticate", login_body("ncuser", "ncpassword"))[0], 429)
        client.close()

    def test_password_hashes_run_one_per_cpu_at_most(self):
        server = start_server(self, loginAttempts=100)
        server.hashing = threading.BoundedSemaphore(2)
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
        limiter = authserver.LoginLimiter(attempts=2, window=60, max_keys=100)
        limiter.record_failure([("user", "a")], 1000)
        limiter.record_failure([("user", "a")], 1010)
        self.assertEqual(limiter.retry_after([("user", "a")], 1020), 41)
        self.assertEqual(limiter.retry_after([("user", "a")], 1061), 0)
        for n in range(10000):
            limiter.record_failure([("user", str(n))], 2000)
        self.assertEqual(len(limiter.failures), 100)


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


class TestHostileHTTP(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.server = start_server(cls)

    @classmethod
    def addCleanup(cls, function, *args, **kwargs):         # start_server registers its stop
        cls.addClassCleanup(function, *args, **kwargs)

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
        with mock.patch.dict(authserver.ROUTES, {("GET", "/"): lambda request: 1 / 0}):
            status, _, body = raw_exchange(self.server, b"GET / HTTP/1.1\r\n\r\n")
        self.assertEqual((status, json.loads(body)), (500, {"message": "Internal Server Error"}))
        self.assertIn("ZeroDivisionError", self.server.test_log.getvalue())
        self.assertEqual(raw_exchange(self.server, b"GET / HTTP/1.1\r\n\r\n")[0], 200)

    def test_send_error_writes_json(self):
        # http.server's own error path, kept as a safety net: JSON like every other answer.
        handler = authserver.AuthRequestHandler.__new__(authserver.AuthRequestHandler)
        handler.server, handler.wfile = self.server, io.BytesIO()
        handler.command, handler.route_path, handler.request_version = "GET", "/", "HTTP/1.1"
        handler.client_address, handler.started = ("127.0.0.1", 1), time.perf_counter()
        handler.send_error(414)
        head, _, body = handler.wfile.getvalue().partition(b"\r\n\r\n")
        phrase = http.HTTPStatus(414).phrase               # "URI Too Long" from Python 3.13 on
        self.assertTrue(head.startswith(f"HTTP/1.1 414 {phrase}\r\n".encode()))
        self.assertIn(b"Connection: close", head)
        self.assertEqual(json.loads(body), {"message": phrase})

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
        self.assertEqual(server.deadlines, {})

    def test_listen_backlog(self):
        self.assertGreaterEqual(authserver.AuthServer.request_queue_size, 128)

    def test_slow_and_idle_clients_do_not_block_others_and_are_cut_off(self):
        server = start_server(self, requestTimeout=1)
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

def run_cli(*args, stdin="", timeout=60):
    return subprocess.run([sys.executable, str(HERE / "authserver.py"), *map(str, args)],
                          input=stdin, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "NO_COLOR": "1"})


class ServerProcess:
    """python authserver.py ... as a subprocess; the port read from its banner."""

    def __init__(self, test, *args):
        self.process = subprocess.Popen(
            [sys.executable, str(HERE / "authserver.py"), "--port", "0", *map(str, args)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        test.addCleanup(self.close)
        self.banner = [self.process.stdout.readline()]
        while not self.banner[-1].startswith("Ctrl-C"):
            line = self.process.stdout.readline()
            if not line:
                raise AssertionError(f"server did not start: {self.process.stderr.read()}")
            self.banner.append(line)
        self.port = int(self.banner[1].strip().split()[0].rsplit(":", 1)[1])

    def close(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
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
        for token, code, verdict in cases:
            with self.subTest(verdict):
                result = run_cli("explain", token, "--config", files.config, "--users", files.users)
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
        self.assertIn("users file reloaded: 1 users", server.process.stderr.readline())
        status, _, body = raw_exchange(server.port, post(json.dumps(login_body("ncuser", "ncpassword"))))
        self.assertEqual(status, 400)

    def test_ctrl_c_stops_cleanly(self):
        files = Files(self)
        server = ServerProcess(self, "--config", files.config, "--users", files.users)
        server.process.send_signal(signal.SIGINT)
        self.assertEqual(server.process.wait(timeout=10), 0)
        self.assertEqual(server.process.stdout.read(), "authserver stopped.\n")
        self.assertNotIn("Traceback", server.process.stderr.read())

    def test_sigterm_lets_a_request_in_flight_finish_then_exits_0(self):
        files = Files(self)
        server = ServerProcess(self, "--config", files.config, "--users", files.users)
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            body = json.dumps(login_body()).encode()
            sock.sendall(b"POST /users/authenticate HTTP/1.1\r\nContent-Type: application/json\r\n"
                         b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
            self.assertEqual(sock.recv(100), b"HTTP/1.1 100 Continue\r\n\r\n")   # in flight now
            server.process.send_signal(signal.SIGTERM)
            line = server.process.stderr.readline()
            self.assertIn("stopping: waiting for 1 request(s) in flight", line)
            with self.assertRaises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", server.port), timeout=5).close()
            sock.sendall(body)
            status, headers, answer = read_response(sock)
        self.assertEqual((status, headers["connection"]), (200, "close"))
        self.assertIn("token", json.loads(answer))
        self.assertEqual(server.process.wait(timeout=10), 0)
        self.assertIn("authserver stopped.", server.process.stdout.read())



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
        for script in scripts:
            with self.subTest(script.name):
                done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True,
                                      text=True, timeout=60)
                self.assertEqual((done.returncode, done.stderr), (0, ""))
                self.assertIn("usage:", done.stdout)


if __name__ == "__main__":
    unittest.main()
